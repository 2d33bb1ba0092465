"""DMF's keys in the workflow config: the demo's DMF run, its init and guide as inputs of its train job, and each
bad combination a ConfigError naming the key before any job."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmfm import config as mc
from mmfm.plan import dag

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
RUN = "dmf-gmm-mode"


def demo() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def _with(edit):
    cfg = demo()
    edit(cfg)
    return cfg


def test_the_demo_fine_tunes_gmm_mode():
    cfg = demo()
    assert mc.schema_errors(cfg, SCHEMA) == []
    mc.check(cfg, ROOT)
    assert mc.run_method(cfg, RUN) == "dmf" and mc.samplers(cfg, RUN) == ["flowmap"]
    assert mc.network_inputs(cfg, RUN) == {"dmf_init": "gmm-mode"} and mc.network_runs(cfg, RUN) == ["gmm-mode"]
    files = mc.with_network_files(mc.train_settings(cfg, RUN), cfg, RUN)
    assert files["dmf_init"] == "results/runs/gmm-mode/ema.safetensors"
    # the init run is trained even when it is not evaluated itself
    cfg["runs"]["gmm-mode"]["evaluate"] = False
    assert "gmm-mode" in dag.trained_runs(cfg)


def test_ag_guidance_defaults_to_the_init_runs_guide():
    def edit(c):
        c["runs"]["gmm-mode"]["sample"] = {"guide": "gmm-indep"}
        c["runs"][RUN]["train"]["dmf_guidance"] = "ag-mg"

    cfg = _with(edit)
    mc.check(cfg, ROOT)
    assert mc.network_inputs(cfg, RUN) == {"dmf_init": "gmm-mode", "dmf_guide": "gmm-indep"}
    assert mc.network_runs(cfg, RUN) == ["gmm-mode", "gmm-indep"]
    cfg["runs"][RUN]["train"]["dmf_guide"] = "gauss-indep"  # named: it wins
    assert mc.network_inputs(cfg, RUN)["dmf_guide"] == "gauss-indep"


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["runs"]["gmm-mode"].update(sample={"method": "flowmap"}),
     "runs.gmm-mode.sample.method: flowmap jumps with a DMF flow map; this run has method 'fm'"),
    (lambda c: c["runs"][RUN]["train"].update(dmf_init=RUN), f"runs.{RUN}.train.dmf_init: a run cannot initialize"),
    (lambda c: c["runs"][RUN]["train"].update(dmf_init="nope"), f"runs.{RUN}.train.dmf_init: 'nope' is neither"),
    (lambda c: c["runs"][RUN]["train"].update(dmf_init="gm-gmm-mode-cond"),
     f"runs.{RUN}.train.dmf_init: 'gm-gmm-mode-cond' is a gmflow run"),
    (lambda c: c["runs"][RUN]["train"].update(dmf_init="gmm-mode-cond"),
     f"runs.{RUN}.train.dmf_init: 'gmm-mode-cond' differs from this run (conditioning 'mode' vs 'none')"),
    (lambda c: c["runs"][RUN].update(model="ditdh-tiny"),
     f"runs.{RUN}.train.dmf_init: 'gmm-mode' differs from this run (model 'ditdh-demo' vs 'ditdh-tiny')"),
    (lambda c: c["runs"][RUN]["train"].update(dmf_depth=5),
     f"runs.{RUN}.train: dmf_depth: expected an integer in [1, 4]"),
    (lambda c: c["runs"][RUN]["train"].update(dmf_depth=0), f"runs.{RUN}.train.dmf_depth: 0 is less than"),
    (lambda c: c["runs"][RUN]["train"].update(dmf_guidance="ag-mg"),
     f"runs.{RUN}.train.dmf_guide: dmf_guidance 'ag-mg' needs an autoguide"),
    (lambda c: c["runs"][RUN]["train"].update(dmf_guidance="ag-mg", dmf_guide="gmm-mode-cond"),
     f"runs.{RUN}.train.dmf_guide: the guide run 'gmm-mode-cond' has conditioning 'mode'"),
    (lambda c: c["runs"][RUN]["train"].update(dmf_derivative="autograd"),
     f"runs.{RUN}.train.dmf_derivative: 'autograd' is not one of"),
    (lambda c: c["runs"][RUN].update(method="meanflow"), f"runs.{RUN}.method: 'meanflow' is not one of"),
])
def test_bad_dmf_settings_name_the_key(edit, message):
    cfg = _with(edit)
    errors = mc.schema_errors(cfg, SCHEMA)
    if errors:
        assert any(e.startswith(message) for e in errors), errors
        return
    with pytest.raises(mc.ConfigError) as err:
        mc.check(cfg, ROOT)
    assert str(err.value).startswith(message), str(err.value)
