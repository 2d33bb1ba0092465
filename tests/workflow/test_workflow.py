"""The Snakemake workflow end to end (slow): a tiny DAG run for real, then dry runs that must plan exactly
the jobs whose settings changed; bad configs that stop before any job; every preset's full DAG over a
stand-in artifact tree; the linter; the HTML report.

    python -m pytest tests/workflow -m slow
"""

from __future__ import annotations

import re
import shutil
from collections import Counter

import pytest
from toyrun import standin_tree
import yaml

from tests.workflow.conftest import ROOT, TINY_RUNS, planned, smk  # and the session's `demo` fixture

PRESETS = sorted((ROOT / "workflow" / "presets").glob("*.yaml"))

pytestmark = pytest.mark.slow


def by_rule(jobs) -> dict[str, list[str | None]]:
    out: dict[str, list] = {}
    for rule, wc in jobs:
        out.setdefault(rule, []).append(wc.get("run"))
    return {k: sorted(v, key=str) for k, v in out.items()}


def test_demo_outputs_and_nothing_left_to_do(demo):
    workdir, configfile = demo
    for run in TINY_RUNS:
        assert (workdir / f"results/runs/{run}/ema.safetensors").is_file()
        assert (workdir / f"results/runs/{run}/fd.csv").is_file()
        assert (workdir / f"results/eval/{run}/nfe_curve.csv").read_text().count("\n") == 3  # header + 2 NFE
    summary = yaml.safe_load((workdir / "results/summary.json").read_text())
    assert set(summary["runs"]) == set(TINY_RUNS) and summary["baseline"] == "gauss-indep"
    assert (workdir / "results/benchmarks/train/gmm-mode.tsv").is_file()
    assert planned(workdir, "--configfile", configfile) == []


def test_report_html(demo):
    workdir, configfile = demo
    smk(workdir, "--configfile", configfile, "--report", str(workdir / "results/report.html"))
    html = (workdir / "results/report.html").read_text(errors="replace")
    assert "R^10" in html and "gmm-mode" in html


@pytest.mark.parametrize("triggers", [[], ["--rerun-triggers", "params"]], ids=["default-triggers", "params"])
def test_one_runs_training_setting_reruns_only_that_run(demo, triggers):
    workdir, configfile = demo
    jobs = planned(workdir, "--configfile", configfile, "--config", "runs={gmm-mode: {train: {lr: 0.002}}}",
                   *triggers)
    assert by_rule(jobs) == {"train": ["gmm-mode"], "sample": ["gmm-mode", "gmm-mode"], "evaluate": ["gmm-mode"],
                             "report": [None], "all": [None]}


def test_gmm_k_reruns_the_gmm_stages_and_what_follows_not_encoding(demo):
    workdir, configfile = demo
    jobs = planned(workdir, "--configfile", configfile, "--config", "gmm={k: 3}")
    assert by_rule(jobs) == {"fit_cls_gmm": [None], "spatial_stats": [None, None], "spatial_gmm": [None],
                             "train": ["gmm-mode"], "sample": ["gmm-mode", "gmm-mode"], "evaluate": ["gmm-mode"],
                             "report": [None], "all": [None]}


@pytest.mark.parametrize("override, first", [("gmm={rows: originals}", "fit_cls_gmm"),
                                             ("spatial={rows_from: originals}", "spatial_stats")])
def test_row_sets_rerun_their_gmm_stage_and_what_follows_not_encoding(demo, override, first):
    """gmm.rows reruns the CLS fit and everything after it; spatial.rows_from the spatial stages onwards."""
    workdir, configfile = demo
    jobs = by_rule(planned(workdir, "--configfile", configfile, "--config", override))
    expected = {"fit_cls_gmm": [None], "spatial_stats": [None, None], "spatial_gmm": [None], "train": ["gmm-mode"],
                "sample": ["gmm-mode", "gmm-mode"], "evaluate": ["gmm-mode"], "report": [None], "all": [None]}
    if first == "spatial_stats":
        del expected["fit_cls_gmm"]
    assert jobs == expected


def test_sampling_setting_reruns_sampling_not_training(demo):
    workdir, configfile = demo
    rules = Counter(r for r, _ in planned(workdir, "--configfile", configfile, "--config", "sample={n: 48}"))
    assert rules == Counter({"sample": 4, "evaluate": 2, "report": 1, "all": 1})


def test_failed_job_leaves_no_complete_output(demo, tmp_path):
    workdir, configfile = demo
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy, symlinks=True)
    target = "results/runs/gmm-mode/ema.safetensors"
    res = smk(copy, target, "--cores", "1", "--configfile", configfile, "--config", "train={global_batch: 1000000}",
              check=False)  # (the target first: --config takes every argument after it)
    assert res.returncode != 0
    assert "cannot fill one global batch" in (copy / "results/logs/train/gmm-mode.log").read_text()
    assert not (copy / target).exists()
    jobs = planned(copy, "--configfile", configfile)  # the original settings: the run is redone
    assert ("train", {"run": "gmm-mode"}) in jobs


def test_spatial_groups_set_the_map_jobs(tmp_path):
    """spatial.groups: 1 -> one spatial_stats job over both shards of the demo (default: one per shard)."""
    text = smk(tmp_path, "-n", "--cores", "1", "--config", "spatial={groups: 1}").stdout
    blocks = re.findall(r"^rule spatial_stats:\n(.*?)(?:\n\n|\Z)", text, re.S | re.M)
    assert len(blocks) == 1 and "wildcards: group=0000" in blocks[0], text[-3000:]
    assert "input: results/shards/shard-0000.parquet, results/shards/shard-0001.parquet" in blocks[0]


# (every message is tested in-process in test_config.py; these check that the Snakefile stops on them)
@pytest.mark.parametrize("override, message", [
    ("gmm={k: 0}", "gmm.k: 0 is less than the minimum of 1"),
    ("gmm={kk: 3}", "gmm: unknown key(s) ['kk']"),
    ("runs={gmm-mode: {sample: {guide: no-such-run}}}", "runs.gmm-mode.sample.guide: 'no-such-run' is neither a run"),
])
def test_bad_config_stops_before_any_job(tmp_path, override, message):
    res = smk(tmp_path, "-n", "--cores", "1", "--config", override, check=False)
    assert res.returncode != 0
    assert message in res.stderr + res.stdout
    assert not (tmp_path / "results").exists()


def test_preset_missing_artifact_is_named(tmp_path):
    res = smk(tmp_path, "-n", "--cores", "1", "--configfile", str(PRESETS[0]), check=False)
    assert res.returncode != 0
    assert re.search(r"invalid config: data\.images: artifacts/\S+ does not exist", res.stderr + res.stdout)


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_lists_the_full_dag(preset, tmp_path):
    standin_tree(preset, tmp_path)
    cfg = yaml.safe_load(preset.read_text())
    rules = Counter(r for r, _ in planned(tmp_path, "--configfile", str(preset)))
    shards, runs = cfg["shards"]["num_shards"], cfg["runs"]
    evaluated = [r for r in runs if runs[r].get("evaluate", True)]
    groups = cfg["spatial"].get("groups") or shards  # one spatial_stats job per group of shards
    assert rules == Counter({"encode": shards, "fit_cls_gmm": 1, "spatial_stats": groups, "spatial_gmm": 1,
                             "train": len(runs), "sample": len(evaluated) * len(cfg["eval"]["nfe"]),
                             "evaluate": len(evaluated), "toy_r10": 1, "report": 1, "all": 1})


def test_lint_is_clean(tmp_path):
    res = smk(tmp_path, "--lint", check=False)
    assert res.returncode == 0, res.stdout + res.stderr
