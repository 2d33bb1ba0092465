# Stage 6: the report across runs (mmfm.report): results/summary.json, a table of the runs, the loss
# and distance curves over training, the distance over NFE, the GMM weights, the R^10 table beside the
# paper's and each rule's runtime and memory. `snakemake --report results/report.html` collects these
# with the sample grids into one HTML page.


rule report:
    input:
        **report_inputs(),
    output:
        **report_outputs(),
    params:
        report=config["report"],
        runs=mc.evaluated_runs(config),
        baseline=mc.baseline(config),
        metric=config["eval"]["metric"],
        final_nfe=mc.final_nfe(config),
        benchmarks=BENCH,
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{BENCH}/report/all.tsv"
    threads: res("report", "threads")
    resources:
        gpu=res("report", "gpu"),
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    conda:
        TORCH_ENV
    script:
        "../scripts/report.py"
