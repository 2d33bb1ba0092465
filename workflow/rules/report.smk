# Stage 6: the report across runs: results/summary.json (mmfm.report: every number, one file) and the results
# page results/index.html (mmfm.page: the runs table beside the paper's, the curves, every run's samples side
# by side beside the data, the GMM, the R^10 table, the data, every job's time and memory, links to every
# artifact). It decodes the data and mode-mean grids with the config's tokenizer on the job's device.
# `mmfm report` builds the same page from whatever exists; `snakemake --report` includes it.


rule report:
    input:
        **report_inputs(),
    output:
        **report_outputs(),
    params:
        report=config["report"],
        runs=config["runs"],
        train=config["train"],
        sample=config["sample"],
        eval=config["eval"],
        encoder=config["encoder"],
        decoder=config["decoder"],
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
