# Stage 3: train each run's velocity network (mmfm.train.loop.train): noise from its source (N(0, I)
# or the spatial GMM), paired with the data by its coupling (independent, or the image's own CLS mode),
# the network conditioned on nothing or on the mode. `gpu: N` runs N processes (torchrun's agent).
#
# The run folder keeps its checkpoints across failed or timed-out jobs: the next attempt resumes from
# the latest one (a changed setting other than steps / evaluation cadence starts the run afresh).
# Declared outputs are written last, so a failed job leaves nothing Snakemake takes as complete.
# One trainer at a time: `mmfm train` locks the run folder for its whole life.


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
    wildcard_constraints:
        run=runs_on_one_node("train"),
    threads: res("train", "threads", per_run=True)
    resources:
        gpu=res("train", "gpu", per_run=True),
        mem_mb=res("train", "mem_mb", per_run=True),
        runtime=res("train", "runtime", per_run=True),
    conda:
        TORCH_ENV
    script:
        "../scripts/train.py"


# A run whose resources give `nodes > 1`: one SLURM job of `nodes` tasks (one per node, each with the
# node's GPUs and threads); the script starts one torchrun agent per task with srun, and the agents
# meet at the c10d rendezvous on the allocation's first node.
use rule train as train_nodes with:
    wildcard_constraints:
        run=runs_on_nodes("train"),
    resources:
        **node_resources("train"),
