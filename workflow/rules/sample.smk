# Stage 4: samples of each run's EMA network at each NFE (Euler steps): source noise through the ODE,
# decoded by the tokenizer into ADM's .npz (arr_0 uint8 NHWC) and a PNG grid (mmfm.sample.sample_run).
# `gpu: N` runs N processes; per-sample seeds make the set the same on any number of processes or nodes.


rule sample:
    input:
        unpack(sample_inputs),
    output:
        npz=f"{RESULTS}/samples/{{run}}/nfe-{{nfe}}.npz",
        grid=report(
            f"{RESULTS}/samples/{{run}}/nfe-{{nfe}}.png",
            caption="../report/samples.rst",
            category="4. Samples",
            subcategory="{run}",
            labels={"run": "{run}", "NFE": "{nfe}"},
        ),
    params:
        sample=lambda wildcards: mc.sample_settings(config, wildcards.run),
        encoder=config["encoder"],
        decoder=config["decoder"],
    log:
        f"{LOGS}/sample/{{run}}/nfe-{{nfe}}.log",
    benchmark:
        f"{BENCH}/sample/{{run}}/nfe-{{nfe}}.tsv"
    wildcard_constraints:
        run=runs_on_one_node("sample"),
    threads: res("sample", "threads", per_run=True)
    resources:
        gpu=res("sample", "gpu", per_run=True),
        mem_mb=res("sample", "mem_mb", per_run=True),
        runtime=res("sample", "runtime", per_run=True),
    conda:
        TORCH_ENV
    script:
        "../scripts/sample.py"


# A run whose sample resources give `nodes > 1`: one agent per node, as for train (train.smk).
use rule sample as sample_nodes with:
    wildcard_constraints:
        run=runs_on_nodes("sample"),
    resources:
        **node_resources("sample"),
