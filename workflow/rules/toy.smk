# The paper's R^10 experiment (docs/method.md §4): Compact and Spread targets; Gaussian/independent,
# GMM/independent and GMM/mode flows; path length Len and W2^2 beside the paper's table.


rule toy_r10:
    output:
        json=f"{RESULTS}/toy_r10/r10.json",
        csv=f"{RESULTS}/toy_r10/r10.csv",
        plot=report(
            f"{RESULTS}/toy_r10/r10.png",
            caption="../report/toy_r10.rst",
            category="5. R^10 toy",
        ),
    params:
        toy_r10=config["toy_r10"],
    log:
        f"{LOGS}/toy_r10.log",
    benchmark:
        f"{BENCH}/toy_r10/all.tsv"
    threads: res("toy_r10", "threads")
    resources:
        gpu=res("toy_r10", "gpu"),
        mem_mb=res("toy_r10", "mem_mb"),
        runtime=res("toy_r10", "runtime"),
    conda:
        TORCH_ENV
    script:
        "../scripts/toy_r10.py"
