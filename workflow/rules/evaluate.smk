# Stage 5: each run's sample sets against the data: the Fréchet distance in the tokenizer's space
# (offline demo) or Inception FID against a reference (eval.metric fid), one point per NFE and sampler: one
# NFE curve per sampler (eval/{run}/nfe_curve.csv for the headline sampler, eval/{run}/S/nfe_curve.csv for
# another sampler S). The headline number is the headline sampler's at eval.final_nfe. The distance over
# training steps is the run's fd.csv. One rule per group of runs with the same samplers, as for sample (an
# `evaluate_<samplers>` rule takes the profile's set-resources / set-threads of `evaluate`).

for _suffix, _runs in SAMPLER_GROUPS.items():

    rule:
        name:
            f"evaluate{_suffix}"
        input:
            unpack(evaluate_inputs),
            model=lambda wildcards: ema_file(wildcards.run),
        output:
            **evaluate_outputs(_runs[0]),
        params:
            eval=config["eval"],
            encoder=config["encoder"],
        log:
            f"{LOGS}/evaluate/{{run}}.log",
        benchmark:
            f"{BENCH}/evaluate/{{run}}.tsv"
        wildcard_constraints:
            run=runs_pattern(_runs),
        threads: threads_as_base_rule("evaluate", _suffix, res("evaluate", "threads"))
        resources:
            **as_base_rule("evaluate", _suffix, {k: res("evaluate", k) for k in ("gpu", "mem_mb", "runtime")}),
        conda:
            TORCH_ENV
        script:
            "../scripts/evaluate.py"
