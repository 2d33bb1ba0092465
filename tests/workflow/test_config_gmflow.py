"""GMFlow's keys in the workflow config: each bad combination is a ConfigError naming the key before any job."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmfm import config as mc

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
RUN = "gm-gmm-mode-cond"


def demo() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def test_the_demo_has_its_gmflow_run():
    cfg = demo()
    assert mc.schema_errors(cfg, SCHEMA) == []
    mc.check(cfg, ROOT)
    assert mc.run_method(cfg, RUN) == "gmflow" and mc.run_method(cfg, "gmm-mode-cond") == "fm"
    mine, base = mc.train_settings(cfg, RUN), mc.train_settings(cfg, "gmm-mode-cond")
    assert mine.pop("method") == "gmflow" and "method" not in base  # fm adds nothing: older runs stay unchanged
    assert mine == base  # everything else as gmm-mode-cond


def _with(edit):
    cfg = demo()
    edit(cfg)
    return cfg


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["runs"]["gmm-mode"].update(sample={"method": "gm-ode"}),
     "runs.gmm-mode.sample.method: gm-ode samples a GMFlow network's mixture; this run has method 'fm'"),
    (lambda c: c["runs"][RUN].update(coupling="ot", source="gaussian", conditioning="none"),
     f"runs.{RUN}: coupling: 'ot' cannot be used with method 'gmflow'"),
    (lambda c: c["runs"][RUN].update(conditioning="none"), f"runs.{RUN}.train: gm_allow_approx:"),
    (lambda c: c["spatial"].update(covariance="diag"), "spatial.covariance: the GMFlow run"),
    (lambda c: c["runs"][RUN].update(train={"gm_init": RUN}), f"runs.{RUN}.train.gm_init: a run cannot initialize"),
    (lambda c: c["runs"][RUN].update(train={"gm_init": "gmm-mode"}),
     f"runs.{RUN}.train.gm_init: 'gmm-mode' is another network than this run (conditioning 'none' vs 'mode')"),
    (lambda c: c["runs"][RUN].update(train={"gm_init": "nope"}), f"runs.{RUN}.train.gm_init: 'nope' is neither"),
    (lambda c: c["runs"][RUN].update(train={"gm_trans_ratio": 0}), f"runs.{RUN}.train.gm_trans_ratio: 0 is less"),
    (lambda c: c["runs"][RUN].update(method="gm"), f"runs.{RUN}.method: 'gm' is not one of"),
    (lambda c: c["runs"][RUN].update(train={"gm_groups": 5}),
     f"runs.{RUN}.train.gm_groups: 5 does not divide the token width 12 of the pixels tokenizer"),
])
def test_bad_gmflow_settings_name_the_key(edit, message):
    cfg = _with(edit)
    errors = mc.schema_errors(cfg, SCHEMA)
    if errors:
        assert any(e.startswith(message) for e in errors), errors
        return
    with pytest.raises(mc.ConfigError) as err:
        mc.check(cfg, ROOT)
    assert str(err.value).startswith(message), str(err.value)


def test_gm_init_names_a_velocity_run_of_the_same_network():
    cfg = _with(lambda c: c["runs"][RUN].update(train={"gm_init": "gmm-mode-cond"}))
    mc.check(cfg, ROOT)
    assert mc.network_runs(cfg, RUN) == ["gmm-mode-cond"]
    cfg["runs"]["gmm-mode-cond"]["method"] = "gmflow"
    with pytest.raises(mc.ConfigError, match="gm_init: 'gmm-mode-cond' is a gmflow run"):
        mc.check(cfg, ROOT)
