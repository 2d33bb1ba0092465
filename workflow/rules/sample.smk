# Stage 4: samples of each run's EMA network, one job per run: every sampler of its sample.method (the first is
# the headline sampler) at every NFE of eval.nfe, source noise through the ODE, decoded by the tokenizer into
# ADM's .npz (arr_0 uint8 NHWC) and a PNG grid (mmfm.sample.sample_run through `mmfm sample`, in-process).
# The headline sampler's sets are samples/{run}/nfe-{nfe}.npz, another sampler S's samples/{run}/S/nfe-{nfe}.npz.
# `gpu: N` runs N processes; per-sample seeds make the set the same on any number of processes or nodes.
#
# A rule's outputs are patterns of its wildcards, so the runs are grouped by their samplers (mmfm.config
# .sampler_groups): `sample` takes the runs of the shared sample.method, `sample_euler_heun` (say) a run whose
# own sample.method is [euler, heun]; each has its `_nodes` variant for runs over several nodes (train.smk).
# Such a rule takes the profile's set-resources / set-threads of `sample` (`sample_nodes`): profiles name those.

for _suffix, _runs in SAMPLER_GROUPS.items():
    for _nodes in (False, True):
        _base = "sample_nodes" if _nodes else "sample"

        rule:
            name:
                f"sample{_suffix}{'_nodes' if _nodes else ''}"
            input:
                unpack(sample_inputs),
            output:
                **sample_outputs(_runs[0]),
            params:
                sample=lambda wildcards: mc.sample_settings(config, wildcards.run),
                encoder=config["encoder"],
                decoder=config["decoder"],
            log:
                f"{LOGS}/sample/{{run}}.log",
            benchmark:
                f"{BENCH}/sample/{{run}}.tsv"
            wildcard_constraints:
                run=(runs_on_nodes if _nodes else runs_on_one_node)("sample", _runs),
            threads: threads_as_base_rule(_base, _suffix, res("sample", "threads", per_run=True))
            resources:
                **as_base_rule(_base, _suffix, node_resources("sample") if _nodes else one_node_resources("sample")),
            conda:
                TORCH_ENV
            script:
                "../scripts/sample.py"
