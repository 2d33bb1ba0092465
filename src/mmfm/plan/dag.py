"""The jobs of a config's DAG, as ``snakemake -n`` lists them for a fresh working directory.

The rules are those of ``workflow/rules/*.smk``; the jobs each makes follow from the same config helpers the
rules call (:mod:`mmfm.config`):

- ``export_digits``: 1 when ``data.source`` is ``digits``;
- ``encode``: ``shards.num_shards``;
- ``fit_cls_gmm`` 1, ``spatial_stats`` one per group of :func:`mmfm.config.spatial_groups`, ``spatial_gmm`` 1,
  when some run draws from the GMM (the report reads the spatial GMM then, so all three are in the DAG);
- ``train`` / ``train_nodes``: every evaluated run and every run that guides one (a run that is neither is in
  no rule's input); a run over several nodes is a ``train_nodes`` job;
- ``sample`` / ``sample_nodes``: one job per evaluated run (every sampler of its ``sample.method`` at every NFE of
  ``eval.nfe``); ``evaluate``: evaluated runs. Runs whose samplers are not the shared ``sample.method``'s are
  jobs of rules of their own, ``sample_<samplers>`` / ``sample_<samplers>_nodes`` / ``evaluate_<samplers>``
  (:func:`mmfm.config.sampler_groups`);
- ``toy_r10``: 1 when enabled; ``report`` 1; ``all`` 1 (a local rule, no resources).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmfm import config as mc

#: Rules in the order the workflow runs them (and the plan prints them); ``sample_<samplers>`` (``_nodes``) and
#: ``evaluate_<samplers>`` rules of runs with their own samplers follow ``sample_nodes`` and ``evaluate``.
RULES = ("export_digits", "encode", "fit_cls_gmm", "spatial_stats", "spatial_gmm", "train", "train_nodes",
         "sample", "sample_nodes", "evaluate", "toy_r10", "report", "all")
#: The config's resource section of each rule (``*_nodes`` share their stage's).
STAGE = {r: r.removesuffix("_nodes") for r in RULES}


def stage(rule: str) -> str:
    """The stage of a rule: its resource section and the plan's method (``sample_euler_heun_nodes`` -> sample)."""
    base = rule.removesuffix("_nodes")
    for name in ("sample", "evaluate"):
        if base.startswith(name + "_"):
            return name
    return STAGE.get(base, base)


@dataclass
class Job:
    """One job: its rule, wildcards and resources (``mmfm.config.resources`` of its stage; ``None`` for
    the local rule ``all``)."""

    rule: str
    wildcards: dict = field(default_factory=dict)
    resources: dict | None = None

    @property
    def run(self) -> str | None:
        return self.wildcards.get("run")


def trained_runs(config: dict) -> list[str]:
    """Runs whose ``ema.safetensors`` some rule needs: the evaluated runs, their guide runs and the velocity runs
    another run's training reads (GMFlow's ``gm_init``, DMF's ``dmf_init`` and ``dmf_guide``), in config order."""
    need, todo = set(), list(mc.evaluated_runs(config))
    while todo:
        run = todo.pop()
        if run in need:
            continue
        need.add(run)
        if (g := mc.guide_run(config, run)) is not None and run in mc.evaluated_runs(config):
            todo.append(g)
        todo.extend(mc.network_runs(config, run))
    return [r for r in mc.run_names(config) if r in need]


def jobs(config: dict) -> dict[str, list[Job]]:
    """``{rule: [Job, ...]}`` of the config's DAG (rules without jobs left out), in :data:`RULES` order."""
    out: dict[str, list[Job]] = {}

    def add(rule: str, wildcards: dict | None = None, run: str | None = None) -> None:
        per_run = run if stage(rule) in mc.MULTI_NODE else None  # only train / sample take a run's resources
        res = None if rule == "all" else mc.resources(config, stage(rule), per_run)
        out.setdefault(rule, []).append(Job(rule, dict(wildcards or {}), res))

    if mc.digits(config):
        add("export_digits")
    for i in range(config["shards"]["num_shards"]):
        add("encode", {"shard": f"{i:04d}"})
    if mc.any_gmm(config):
        add("fit_cls_gmm")
        for g in range(len(mc.spatial_groups(config))):
            add("spatial_stats", {"group": f"{g:04d}"})
        add("spatial_gmm")
    many = set(mc.multi_node_runs(config, "train"))
    for run in trained_runs(config):
        add("train_nodes" if run in many else "train", {"run": run}, run)
    many = set(mc.multi_node_runs(config, "sample"))
    group = {run: suffix for suffix, runs in mc.sampler_groups(config).items() for run in runs}
    evaluated = mc.evaluated_runs(config)
    for run in evaluated:
        add(f"sample{group[run]}{'_nodes' if run in many else ''}", {"run": run}, run)
    for run in evaluated:
        add(f"evaluate{group[run]}", {"run": run}, run)
    if config["toy_r10"]["enabled"]:
        add("toy_r10")
    add("report")
    add("all")
    own = [s for s in dict.fromkeys(group[r] for r in evaluated) if s]  # rules of runs with their own samplers
    i, j = RULES.index("evaluate"), RULES.index("evaluate") + 1
    order = [*RULES[:i], *(f"sample{s}{n}" for s in own for n in ("", "_nodes")), *RULES[i:j],
             *(f"evaluate{s}" for s in own), *RULES[j:]]
    return {r: out[r] for r in order if r in out}
