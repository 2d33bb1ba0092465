"""The Snakemake workflow end to end (slow): a tiny DAG run for real, then dry runs that must plan exactly
the jobs whose settings changed; bad configs that stop before any job; every preset's full DAG over a
stand-in artifact tree; the linter; the HTML report.

    python -m pytest tests/workflow -m slow
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter

import numpy as np
import pytest
from toyrun import standin_tree
import yaml

from mmfm import config as mc
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
    # one sample job per run (every NFE's set), one log and benchmark each
    assert sorted(p.name for p in (workdir / "results/benchmarks/sample").iterdir()) == \
        sorted(f"{r}.tsv" for r in TINY_RUNS)
    assert sorted(p.name for p in (workdir / "results/logs/sample").iterdir()) == sorted(f"{r}.log" for r in TINY_RUNS)
    assert summary["stages"]["sample"]["jobs"] == len(TINY_RUNS)
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
    assert by_rule(jobs) == {"train": ["gmm-mode"], "sample": ["gmm-mode"], "evaluate": ["gmm-mode"],
                             "report": [None], "all": [None]}


def test_gmm_k_reruns_the_gmm_stages_and_what_follows_not_encoding(demo):
    workdir, configfile = demo
    jobs = planned(workdir, "--configfile", configfile, "--config", "gmm={k: 3}")
    assert by_rule(jobs) == {"fit_cls_gmm": [None], "spatial_stats": [None, None], "spatial_gmm": [None],
                             "train": ["gmm-mode"], "sample": ["gmm-mode"], "evaluate": ["gmm-mode"],
                             "report": [None], "all": [None]}


@pytest.mark.parametrize("override, first", [("gmm={rows: originals}", "fit_cls_gmm"),
                                             ("spatial={rows_from: originals}", "spatial_stats")])
def test_row_sets_rerun_their_gmm_stage_and_what_follows_not_encoding(demo, override, first):
    """gmm.rows reruns the CLS fit and everything after it; spatial.rows_from the spatial stages onwards."""
    workdir, configfile = demo
    jobs = by_rule(planned(workdir, "--configfile", configfile, "--config", override))
    expected = {"fit_cls_gmm": [None], "spatial_stats": [None, None], "spatial_gmm": [None], "train": ["gmm-mode"],
                "sample": ["gmm-mode"], "evaluate": ["gmm-mode"], "report": [None], "all": [None]}
    if first == "spatial_stats":
        del expected["fit_cls_gmm"]
    assert jobs == expected


def test_sampling_setting_reruns_sampling_not_training(demo):
    workdir, configfile = demo
    rules = Counter(r for r, _ in planned(workdir, "--configfile", configfile, "--config", "sample={n: 48}"))
    assert rules == Counter({"sample": 2, "evaluate": 2, "report": 1, "all": 1})  # one sample job per run


def test_a_second_sampler_gives_its_sets_and_its_curve(demo, tmp_path):
    """sample.method [euler, heun] on one run: its one sample job writes both samplers' sets (heun's under
    samples/gmm-mode/heun/), evaluate both curves; summary.json has both under fd_over_nfe, the page both."""
    workdir, configfile = demo
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy, symlinks=True)
    two = ("--configfile", configfile, "--config", "runs={gmm-mode: {sample: {method: [euler, heun]}}}")
    assert by_rule(planned(copy, *two)) == {"sample_euler_heun": ["gmm-mode"], "evaluate_euler_heun": ["gmm-mode"],
                                            "report": [None], "all": [None]}
    smk(copy, "--cores", "2", *two)
    res = copy / "results"
    for sub, method in (("", "euler"), ("heun/", "heun")):
        for nfe in (1, 2):
            assert (res / f"samples/gmm-mode/{sub}nfe-{nfe}.png").is_file()
            with np.load(res / f"samples/gmm-mode/{sub}nfe-{nfe}.npz", allow_pickle=False) as f:
                meta = json.loads(str(f["meta"]))
            assert (meta["method"], meta["steps"], len(f.files)) == (method, nfe, 2)
        rows = (res / f"eval/gmm-mode/{sub}nfe_curve.csv").read_text().splitlines()
        assert rows[0] == "step,nfe,fd" and [r.split(",")[1] for r in rows[1:]] == ["1", "2"]
    summary = json.loads((res / "summary.json").read_text())
    fd = summary["runs"]["gmm-mode"]["fd_over_nfe"]
    assert list(fd) == ["euler", "heun"] and [[n for n, _ in pts] for pts in fd.values()] == [[1, 2], [1, 2]]
    assert fd["euler"] != fd["heun"]
    assert list(summary["runs"]["gauss-indep"]["fd_over_nfe"]) == ["euler"]
    final = json.loads((res / "eval/gmm-mode/final.json").read_text())
    assert summary["runs"]["gmm-mode"]["final"] == final["fd"] == pytest.approx(dict(fd["euler"])[2], rel=1e-5)
    assert summary["stages"]["sample"]["jobs"] == 2 and not summary["missing"]
    page = (res / "index.html").read_text()
    assert 'data-key="fd_over_nfe/heun/2"' in page and 'data-key="fd_over_nfe/euler/1"' in page
    assert "samples/gmm-mode/heun/nfe-2.png" in page and "gmm-mode (heun)" in page
    assert "eval/gmm-mode/heun/nfe_curve.csv" in page
    assert planned(copy, *two) == []


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
    # trained: the evaluated runs, their guides, and the velocity runs their GMFlow heads start from (the
    # preset's gm-mode-gmm is off: evaluate false, nothing needs it)
    needed = {(runs[r].get("sample") or {}).get("guide") for r in evaluated} | \
        {(runs[r].get("train") or {}).get("gm_init") for r in evaluated}
    trained = [r for r in runs if r in evaluated or r in needed]
    groups = cfg["spatial"].get("groups") or shards  # one spatial_stats job per group of shards
    per_run = Counter()  # one sample and one evaluate job per evaluated run, in the rules of its samplers
    for suffix, members in mc.sampler_groups(cfg).items():
        n = len([r for r in members if r in evaluated])
        per_run.update({f"sample{suffix}": n, f"evaluate{suffix}": n})
    assert rules == Counter({"encode": shards, "fit_cls_gmm": 1, "spatial_stats": groups, "spatial_gmm": 1,
                             "train": len(trained), "toy_r10": 1, "report": 1, "all": 1}) + per_run


def test_lint_is_clean(tmp_path):
    res = smk(tmp_path, "--lint", check=False)
    assert res.returncode == 0, res.stdout + res.stderr
