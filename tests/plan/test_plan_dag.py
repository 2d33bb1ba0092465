"""The plan's jobs per rule against the jobs ``snakemake -n`` lists for the same config."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from toyrun import standin_tree
import yaml

from mmfm import config as mc
from mmfm.plan import dag
from mmfm.plan.load import read_configfile, validate

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "workflow" / "presets").glob("*.yaml"))


def dry_run_counts(workdir: Path, *args: str) -> Counter:
    """``snakemake -n``'s "Job stats" table: jobs per rule."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir), "-n",
           "--cores", "1", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = (res.stdout + res.stderr).split("Job stats:", 1)[1]
    rows = re.findall(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)
    return Counter({rule: int(n) for rule, n in rows if rule != "total"})


def planned_counts(configfile: Path, root: Path, overrides: dict | None = None) -> Counter:
    cfg = read_configfile(configfile)
    for section, values in (overrides or {}).items():
        cfg.setdefault(section, {}).update(values)
    cfg, _ = validate(cfg, root)
    return Counter({rule: len(js) for rule, js in dag.jobs(cfg).items()})


def test_demo_jobs_equal_snakemakes(tmp_path):
    assert planned_counts(ROOT / "config.yaml", tmp_path) == dry_run_counts(tmp_path)


def test_a_guide_only_run_and_groups_follow_the_dag(tmp_path):
    """A run that is not evaluated is trained only when it guides an evaluated run; spatial.groups sets the map
    jobs; a run over two nodes is a train_nodes job."""
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["runs"]["guide"] = {**cfg["runs"]["gmm-mode"], "evaluate": False}
    cfg["runs"]["unused"] = {**cfg["runs"]["gmm-mode"], "evaluate": False}
    cfg["runs"]["gmm-mode"]["sample"] = {"guide": "guide", "guidance_scale": 1.5}
    cfg["runs"]["gmm-indep"]["resources"] = {"train": {"nodes": 2, "gpus_per_node": 0}}
    cfg["spatial"]["groups"] = 1
    configfile = tmp_path / "cfg.yaml"
    configfile.write_text(yaml.safe_dump(cfg))
    planned = planned_counts(configfile, tmp_path)
    # every run of config.yaml (one of them the two-node gmm-indep) and the guide; not the unused run
    assert planned["train"] + planned["train_nodes"] == len(cfg["runs"]) - 1
    assert planned["train_nodes"] == 1 and planned["spatial_stats"] == 1
    assert planned == dry_run_counts(tmp_path, "--configfile", str(configfile))


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS[:1], ids=[p.stem for p in PRESETS[:1]])
def test_preset_jobs_equal_snakemakes(preset, tmp_path):
    """The full ImageNet DAG over a stand-in artifact tree (workflow/scripts/standin_tree.py)."""
    standin_tree(preset, tmp_path)
    assert planned_counts(preset, tmp_path) == dry_run_counts(tmp_path, "--configfile", str(preset))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_jobs_follow_the_config(preset, tmp_path):
    cfg = yaml.safe_load(preset.read_text())
    runs = cfg["runs"]
    evaluated = [r for r in runs if runs[r].get("evaluate", True)]
    # trained: the evaluated runs, their guides, and the velocity runs their GMFlow heads start from
    needed = {(runs[r].get("sample") or {}).get("guide") for r in evaluated} | \
        {(runs[r].get("train") or {}).get("gm_init") for r in evaluated}
    trained = [r for r in runs if r in evaluated or r in needed]
    per_run = Counter()  # one sample and one evaluate job per evaluated run, in the rules of its samplers
    for suffix, members in mc.sampler_groups(cfg).items():
        n = len([r for r in members if r in evaluated])
        per_run.update({f"sample{suffix}": n, f"evaluate{suffix}": n})
    assert planned_counts(preset, tmp_path) == Counter({
        "encode": cfg["shards"]["num_shards"], "fit_cls_gmm": 1, "spatial_stats": cfg["spatial"]["groups"],
        "spatial_gmm": 1, "train": len(trained), "toy_r10": 1, "report": 1, "all": 1}) + per_run


def test_runs_with_their_own_samplers_are_jobs_of_their_own_rules(tmp_path):
    """One sample job per run whatever its samplers; a run whose sample.method is not the shared one is a job of
    sample_<samplers> / evaluate_<samplers>, as in the workflow; a run over two nodes of sample_<...>_nodes."""
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["runs"] = {r: cfg["runs"][r] for r in ("gauss-indep", "gmm-indep", "gmm-mode")}
    cfg["runs"]["gmm-mode"]["sample"] = {"method": ["euler", "heun"]}
    cfg["runs"]["gmm-indep"]["sample"] = {"method": ["euler", "heun"]}
    cfg["runs"]["gmm-indep"]["resources"] = {"sample": {"nodes": 2, "gpus_per_node": 0}}
    configfile = tmp_path / "cfg.yaml"
    configfile.write_text(yaml.safe_dump(cfg))
    planned = planned_counts(configfile, tmp_path)
    assert (planned["sample"], planned["sample_euler_heun"], planned["sample_euler_heun_nodes"]) == (1, 1, 1)
    assert (planned["evaluate"], planned["evaluate_euler_heun"]) == (1, 2)
    assert planned == dry_run_counts(tmp_path, "--configfile", str(configfile))
    jobs = dag.jobs(validate(read_configfile(configfile), tmp_path)[0])
    assert list(jobs).index("sample_euler_heun") < list(jobs).index("evaluate") < list(jobs).index("evaluate_euler_heun")
    assert jobs["sample_euler_heun_nodes"][0].resources["nodes"] == 2
