"""The jobs of a config's DAG, as ``snakemake -n`` lists them for a fresh working directory.

The rules are those of ``workflow/rules/*.smk``; the jobs each makes follow from the same config helpers the
rules call (:mod:`mmfm.config`):

- ``export_digits``: 1 when ``data.source`` is ``digits``;
- ``encode``: ``shards.num_shards``;
- ``fit_cls_gmm`` 1, ``spatial_stats`` one per group of :func:`mmfm.config.spatial_groups`, ``spatial_gmm`` 1,
  when some run draws from the GMM (the report reads the spatial GMM then, so all three are in the DAG);
- ``train`` / ``train_nodes``: every evaluated run and every run that guides one (a run that is neither is in
  no rule's input); a run over several nodes is a ``train_nodes`` job;
- ``sample`` / ``sample_nodes``: evaluated runs x ``eval.nfe``; ``evaluate``: evaluated runs;
- ``toy_r10``: 1 when enabled; ``report`` 1; ``all`` 1 (a local rule, no resources).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmfm import config as mc

#: Rules in the order the workflow runs them (and the plan prints them).
RULES = ("export_digits", "encode", "fit_cls_gmm", "spatial_stats", "spatial_gmm", "train", "train_nodes",
         "sample", "sample_nodes", "evaluate", "toy_r10", "report", "all")
#: The config's resource section of each rule (``*_nodes`` share their stage's).
STAGE = {r: r.removesuffix("_nodes") for r in RULES}


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
    """Runs whose ``ema.safetensors`` some rule needs: the evaluated runs and their guide runs, config order."""
    need = set(mc.evaluated_runs(config))
    need |= {g for r in mc.evaluated_runs(config) if (g := mc.guide_run(config, r)) is not None}
    return [r for r in mc.run_names(config) if r in need]


def jobs(config: dict) -> dict[str, list[Job]]:
    """``{rule: [Job, ...]}`` of the config's DAG (rules without jobs left out), in :data:`RULES` order."""
    out: dict[str, list[Job]] = {}

    def add(rule: str, wildcards: dict | None = None, run: str | None = None) -> None:
        per_run = run if STAGE[rule] in mc.MULTI_NODE else None  # only train / sample take a run's resources
        res = None if rule == "all" else mc.resources(config, STAGE[rule], per_run)
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
    for run in mc.evaluated_runs(config):
        for nfe in mc.nfes(config):
            add("sample_nodes" if run in many else "sample", {"run": run, "nfe": str(nfe)}, run)
    for run in mc.evaluated_runs(config):
        add("evaluate", {"run": run}, run)
    if config["toy_r10"]["enabled"]:
        add("toy_r10")
    add("report")
    add("all")
    return {r: out[r] for r in RULES if r in out}
