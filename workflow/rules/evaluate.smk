# Stage 5: each run's sample sets against the data: the Fréchet distance in the tokenizer's space
# (offline demo) or Inception FID against a reference (eval.metric fid), one point per NFE; the
# headline number is the one at eval.final_nfe. The distance over training steps is the run's fd.csv.


rule evaluate:
    input:
        unpack(evaluate_inputs),
        model=lambda wildcards: ema_file(wildcards.run),
    output:
        curve=f"{RESULTS}/eval/{{run}}/nfe_curve.csv",
        final=f"{RESULTS}/eval/{{run}}/final.json",
    params:
        eval=config["eval"],
        encoder=config["encoder"],
    log:
        f"{LOGS}/evaluate/{{run}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{run}}.tsv"
    threads: res("evaluate", "threads")
    resources:
        gpu=res("evaluate", "gpu"),
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
    conda:
        TORCH_ENV
    script:
        "../scripts/evaluate.py"
