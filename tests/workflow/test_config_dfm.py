"""``method: dfm`` in the workflow's config: every bad input of the issue stops before any job with the key named
(more stages than the grid allows, probabilities that do not sum to 1, thresholds out of order, dfm-euler on another
method's run and another sampler on a DFM run); the DFM run's sample sets leave out NFEs below its stage count and
get a rule of their own."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from mmfm import config as mc

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"


def default_config() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def problems(cfg: dict) -> list[str]:
    return mc.schema_errors(cfg, SCHEMA)


def _run(cfg: dict) -> dict:
    return cfg["runs"]["dfm-gmm-mode"]


@pytest.mark.parametrize("edit, expected", [
    (lambda c: _run(c)["train"].update(dfm_stages=4, dfm_stage_weights=[0.1, 0.2, 0.3, 0.4]),
     r"runs.dfm-gmm-mode.train.dfm_stages: 4 stages need a square grid with a side divisible by 2\^3 = 8; the "
     r"pixels tokenizer's 4 x 4 grid allows at most 3"),
    (lambda c: _run(c)["train"].update(dfm_stage_weights=[0.5, 0.6]),
     r"runs.dfm-gmm-mode.train: dfm_stage_weights: the probabilities must sum to 1"),
    (lambda c: _run(c)["train"].update(dfm_stages=3, dfm_stage_weights=[0.2, 0.3, 0.5]) or
     _run(c)["sample"].update(dfm_starts=[0.9, 0.6]),
     r"runs.dfm-gmm-mode.sample.dfm_starts: thresholds out of order \[0.9, 0.6\]"),
    (lambda c: _run(c)["sample"].update(dfm_starts=[0.5, 0.6]),
     r"runs.dfm-gmm-mode.sample.dfm_starts: expected 1 thresholds in \(0, 1\)"),
    (lambda c: c["runs"]["gmm-mode"].update(sample={"method": "dfm-euler"}),
     r"runs.gmm-mode.sample.method: dfm-euler samples a DFM network's stages; this run has method 'fm'"),
    (lambda c: _run(c)["sample"].update(method=["dfm-euler", "euler"]),
     r"runs.dfm-gmm-mode.sample.method: euler cannot sample a DFM network"),
    (lambda c: c["eval"].update(nfe=[1, 4], final_nfe=1),
     r"eval.final_nfe: 1 network calls cannot give each of the 2 stages of the DFM run 'dfm-gmm-mode' a step"),
])
def test_bad_input_names_the_key(edit, expected):
    cfg = copy.deepcopy(default_config())
    edit(cfg)
    assert problems(cfg) == []
    with pytest.raises(mc.ConfigError, match=expected):
        mc.check(cfg, ROOT)


def test_three_stages_on_the_demo_grid_are_valid():
    cfg = copy.deepcopy(default_config())
    _run(cfg)["train"].update(dfm_stages=3, dfm_stage_weights=[0.2, 0.3, 0.5])
    _run(cfg)["sample"].update(dfm_starts=[0.8, 0.9])
    mc.check(cfg, ROOT)
    assert [n for _, n, _ in mc.sample_sets(cfg, "dfm-gmm-mode")] == [4, 8, 16]


def test_sample_sets_and_rules():
    cfg = default_config()
    sets = mc.sample_sets(cfg, "dfm-gmm-mode")
    assert [(s, n) for s, n, _ in sets] == [("dfm-euler", n) for n in (2, 4, 8, 16)]  # NFE 1 < 2 stages: left out
    assert sets[0][2].endswith("samples/dfm-gmm-mode/nfe-2")
    assert len(mc.sample_sets(cfg, "gmm-mode")) == 5
    groups = mc.sampler_groups(cfg)
    assert groups["_dfm_euler"] == ["dfm-gmm-mode"] and "gmm-mode" in groups[""]
    # two DFM runs of other stage counts write other sets: two rules
    two = copy.deepcopy(cfg)
    two["runs"]["dfm3"] = copy.deepcopy(_run(cfg))
    two["runs"]["dfm3"]["train"].update(dfm_stages=3, dfm_stage_weights=[0.2, 0.3, 0.5])
    groups = mc.sampler_groups(two)
    assert groups["_dfm_euler"] == ["dfm-gmm-mode"] and groups["_dfm_euler_"] == ["dfm3"]
