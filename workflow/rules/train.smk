# Stage 3: train each run's velocity network (mmfm.train.loop.train): noise from its source (N(0, I)
# or the spatial GMM), paired with the data by its coupling (independent, or the image's own CLS mode),
# the network conditioned on nothing or on the mode. `gpu: N` runs N processes (torchrun).
#
# The run folder keeps its checkpoints across failed or timed-out jobs: the next attempt resumes from
# the latest one (a changed setting other than steps / evaluation cadence starts the run afresh).
# Declared outputs are written last, so a failed job leaves nothing Snakemake takes as complete.


rule train:
    input:
        unpack(train_inputs),
    output:
        ema=f"{RESULTS}/runs/{{run}}/ema.safetensors",
    params:
        train=lambda wildcards: mc.train_settings(config, wildcards.run),
        run_dir=lambda wildcards: f"{RESULTS}/runs/{wildcards.run}",
    log:
        f"{LOGS}/train/{{run}}.log",
    benchmark:
        f"{BENCH}/train/{{run}}.tsv"
    threads: res("train", "threads", per_run=True)
    resources:
        gpu=res("train", "gpu", per_run=True),
        mem_mb=res("train", "mem_mb", per_run=True),
        runtime=res("train", "runtime", per_run=True),
    conda:
        TORCH_ENV
    script:
        "../scripts/train.py"
