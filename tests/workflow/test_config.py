"""The workflow's config: the schema, mmfm.config's checks and views, the presets (fast, in-process)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
from toyrun import standin_tree
import yaml

from mmfm import config as mc
from mmfm.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
PRESETS = sorted((ROOT / "workflow" / "presets").glob("*.yaml"))


def default_config() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def problems(cfg: dict) -> list[str]:
    return mc.schema_errors(cfg, SCHEMA)


def test_default_config_is_valid():
    cfg = default_config()
    assert problems(cfg) == []
    mc.check(cfg, ROOT)


def test_default_runs_differ_only_in_source_coupling_conditioning():
    """The demo's MM-FM runs differ only in source, coupling and conditioning; its GMFlow run (method gmflow)
    only in its method besides (tests/workflow/test_config_gmflow.py)."""
    cfg = default_config()
    settings = {r: mc.train_settings(cfg, r) for r in mc.run_names(cfg) if mc.run_method(cfg, r) == "fm"}
    assert len(settings) == 4
    strip = [{k: v for k, v in s.items() if k not in mc.RUN_TRAIN_KEYS} for s in settings.values()]
    assert all(s == strip[0] for s in strip)
    assert {(s["source"], s["coupling"], s["conditioning"]) for s in settings.values()} == {
        ("gaussian", "independent", "none"), ("gmm", "independent", "none"), ("gmm", "mode-soft", "none"),
        ("gmm", "mode-soft", "mode")}


def test_schema_train_keys_are_train_config_fields():
    """The schema lists the training keys (unknown keys fail at start); it must follow TrainConfig."""
    schema = yaml.safe_load(SCHEMA.read_text())
    listed = set(schema["$defs"]["train"]["properties"])
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    set_by_workflow = {"source", "coupling", "conditioning", "method", "gmm", "cls_gmm", "data_fingerprint"}
    assert listed == fields - set_by_workflow


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c["gmm"].update(kk=3), "gmm: unknown key(s) ['kk']"),
    (lambda c: c.update(extra={}), "config: unknown key(s) ['extra']"),
    (lambda c: c["gmm"].update(k=0), "gmm.k: 0 is less than the minimum of 1"),
    (lambda c: c["spatial"].update(groups=0), "spatial.groups: 0 is less than the minimum of 1"),
    (lambda c: c["train"].update(lr="fast"), "train.lr: 'fast' is not of type 'number'"),
    (lambda c: c["runs"]["gmm-mode"].update(coupling="mode"), "runs.gmm-mode.coupling:"),
    (lambda c: c["runs"]["gmm-mode"]["train"].update(lrr=1) if "train" in c["runs"]["gmm-mode"]
     else c["runs"]["gmm-mode"].update(train={"lrr": 1}), "runs.gmm-mode.train: unknown key(s) ['lrr']"),
    (lambda c: c["eval"].update(metric="fid"), "eval.reference: None is not of type 'string'"),
    (lambda c: c["data"].update(source="folder"), "data.images: None is not of type 'string'"),
    (lambda c: (c["data"].pop("images"), c["data"].update(source="folder")), "data: 'images' is a required"),
])
def test_schema_errors_name_the_key(edit, expected):
    cfg = default_config()
    edit(cfg)
    got = problems(cfg)
    assert any(line.startswith(expected) for line in got), got


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c["sample"].update(guide="nope"), "runs.gauss-indep.sample.guide: 'nope' is neither a run"),
    (lambda c: c["runs"]["gmm-mode-cond"].update(sample={"guide": "gmm-mode"}),
     "runs.gmm-mode-cond.sample.guide: the guide run 'gmm-mode' has conditioning 'none'"),
    (lambda c: c["runs"]["gmm-mode"].update(sample={"guide": "gmm-mode"}), "runs.gmm-mode.sample.guide: a run cannot"),
    (lambda c: c["report"].update(baseline="nope"), "report.baseline: 'nope' is not an evaluated run"),
    (lambda c: c["runs"]["gmm-mode"].update(source="gaussian"), "runs.gmm-mode: coupling: 'mode-soft' needs source"),
    (lambda c: c["runs"]["gauss-indep"].update(conditioning="mode"), "runs.gauss-indep: conditioning: 'mode' needs"),
    (lambda c: c["train"].update(model="ditdh-huge"), "runs.gauss-indep.train: model: expected one of"),
    (lambda c: c["eval"].update(final_nfe=3), "eval.final_nfe: 3 is not one of eval.nfe"),
    (lambda c: c["spatial"].update(groups=3), "spatial.groups: 3 map jobs over shards.num_shards = 2 shards"),
    (lambda c: c["encoder"].update(patch_size=3), "encoder.patch_size: 3 does not divide"),
    (lambda c: c["encoder"].update(name="dinov2", patch_size=None, pool=None), "decoder.path: the dinov2 tokenizer"),
    (lambda c: c["data"].update(source="folder", images="no/such/folder"), "data.images: no/such/folder does not exist"),
    (lambda c: c["encoder"].update(norm_stats="no/stat.pt"), "encoder.norm_stats: no/stat.pt does not exist"),
])
def test_check_names_the_key(edit, expected, tmp_path):
    cfg = default_config()
    edit(cfg)
    assert problems(cfg) == []
    with pytest.raises(mc.ConfigError) as err:
        mc.check(cfg, tmp_path)
    assert str(err.value).startswith(expected), str(err.value)


def test_views():
    cfg = default_config()
    cfg["runs"]["gmm-mode"]["train"] = {"lr": 0.002}
    cfg["runs"]["gmm-mode"]["resources"] = {"train": {"gpu": 2}}
    assert mc.train_settings(cfg, "gmm-mode")["lr"] == 0.002
    assert mc.train_settings(cfg, "gmm-indep")["lr"] == cfg["train"]["lr"]
    assert mc.resources(cfg, "train", "gmm-mode")["gpu"] == 2
    assert mc.resources(cfg, "train", "gmm-indep")["gpu"] == 0
    assert mc.resources(cfg, "sample", "gmm-mode")["gpu"] == 0
    with_files = mc.with_gmm_files(mc.train_settings(cfg, "gmm-mode"), "s.safetensors", "c.safetensors")
    assert (with_files["gmm"], with_files["cls_gmm"]) == ("s.safetensors", "c.safetensors")
    assert "cls_gmm" not in mc.with_gmm_files(mc.train_settings(cfg, "gmm-indep"), "s", "c")
    assert "gmm" not in mc.with_gmm_files(mc.train_settings(cfg, "gauss-indep"), "s", "c")
    assert mc.final_nfe(cfg) == cfg["eval"]["final_nfe"]
    cfg["eval"]["final_nfe"] = None
    assert mc.final_nfe(cfg) == max(cfg["eval"]["nfe"])
    assert mc.baseline(cfg) == cfg["report"]["baseline"]


def test_typed_overrides():
    got = mc.typed_overrides({"runs": {"x": {"train": {"lr": "0.002", "shuffle": "false", "model": "ditdh-demo",
                                                        "final_lr": "null", "betas": ["0.9", "0.95"]}}}})
    assert got["runs"]["x"]["train"] == {"lr": 0.002, "shuffle": False, "model": "ditdh-demo", "final_lr": None,
                                         "betas": [0.9, 0.95]}


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_validate_and_point_at_artifacts(preset, tmp_path):
    cfg = yaml.safe_load(preset.read_text())
    assert problems(cfg) == []
    with pytest.raises(mc.ConfigError, match="does not exist"):  # nothing there yet: names the key
        mc.check(copy.deepcopy(cfg), tmp_path)
    made = standin_tree(preset, tmp_path)
    assert {a.key for a in mc.artifacts(cfg)} >= {"data.images", "encoder.path", "encoder.norm_stats", "decoder.path",
                                                  "eval.reference", "eval.inception"}
    assert all(p.exists() for p in made)
    mc.check(cfg, tmp_path)
    assert cfg["gmm"]["k"] == 8192 and cfg["train"]["global_batch"] == 1024 and cfg["eval"]["metric"] == "fid"


def test_shard_groups():
    assert mc.shard_groups(4) == [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]
    assert mc.shard_groups(256, 8) == [range(32 * g, 32 * (g + 1)) for g in range(8)]
    assert [len(r) for r in mc.shard_groups(10, 3)] == [3, 3, 4]
    assert [i for r in mc.shard_groups(10, 3) for i in r] == list(range(10))  # contiguous, each shard once
    assert mc.shard_groups(5, 1) == [range(5)]
    for bad in (0, 6):
        with pytest.raises(mc.ConfigError, match=f"spatial.groups: {bad} map jobs over shards.num_shards = 5"):
            mc.shard_groups(5, bad)


def test_row_set_keys_default_to_every_row_and_name_the_key():
    """gmm.rows and spatial.rows_from: schema defaults 'all' (the demo counts every row, as before)."""
    schema = yaml.safe_load(SCHEMA.read_text())
    assert schema["properties"]["gmm"]["properties"]["rows"]["default"] == "all"
    assert schema["properties"]["spatial"]["properties"]["rows_from"]["default"] == "all"
    cfg = default_config()
    assert "rows" not in cfg["gmm"] and "rows_from" not in cfg["spatial"]  # the demo takes the defaults
    for section, key in (("gmm", "rows"), ("spatial", "rows_from")):
        bad = default_config()
        bad[section][key] = "mirrors"
        assert any(line.startswith(f"{section}.{key}: 'mirrors' is not one of ['all', 'originals']")
                   for line in problems(bad)), problems(bad)
        good = default_config()
        good[section][key] = "originals"
        assert problems(good) == []


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_use_the_releases_rows_and_precision(preset):
    """The release: CLS GMM on the images alone; spatial statistics over the originals, each with its latent
    flip in its own mode; fp32 encoding (stored float16 here)."""
    cfg = yaml.safe_load(preset.read_text())
    assert cfg["shards"]["flip"] is True and cfg["shards"]["dtype"] == "float16"
    assert cfg["gmm"]["rows"] == "originals"
    assert cfg["spatial"]["rows_from"] == "originals" and cfg["spatial"]["flip"] is True
    assert cfg["encoder"]["precision"] == "fp32"


def _image_folder(root: Path, counts: dict[str, int], other: dict[str, list[str]] | None = None) -> Path:
    from PIL import Image

    folder = root / "imgs"
    for cls, n in counts.items():
        (folder / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / cls / f"{i}.png")
    for cls, names in (other or {}).items():
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for name in names:
            (folder / cls / name).write_text("not an image")
    return folder


def folder_config(folder: Path, k: int, flip: bool = False) -> dict:
    cfg = default_config()
    cfg["data"].update(source="folder", images=str(folder))
    cfg["gmm"]["k"] = k
    cfg["shards"]["flip"] = flip
    assert problems(cfg) == []
    return cfg


def test_image_folder_checked_before_any_job(tmp_path):
    """gmm.k against the images the listing counts (mirrors count when the fit uses them), empty classes and
    classes without a readable extension named, before any job."""
    folder = _image_folder(tmp_path, {"a": 3, "b": 2})
    mc.check(folder_config(folder, 5), tmp_path)
    with pytest.raises(mc.ConfigError, match=r"^gmm\.k: 6 modes need at least 6 rows .* holds 5$"):
        mc.check(folder_config(folder, 6), tmp_path)
    mc.check(folder_config(folder, 10, flip=True), tmp_path)  # 5 images and their 5 mirrors
    cfg = folder_config(folder, 10, flip=True)
    cfg["gmm"]["rows"] = "originals"  # the fit leaves the mirrors out
    with pytest.raises(mc.ConfigError, match="gmm.k: 10 modes"):
        mc.check(cfg, tmp_path)
    (folder / "c").mkdir()
    with pytest.raises(mc.ConfigError, match=r"^data\.images: class folder .*/c holds no image; readable"):
        mc.check(folder_config(folder, 2), tmp_path)
    (folder / "c" / "notes.txt").write_text("x")
    with pytest.raises(mc.ConfigError, match=r"class folder .*/c holds no image \(it holds notes\.txt\)"):
        mc.check(folder_config(folder, 2), tmp_path)


def test_digits_k_is_checked_against_the_demo(tmp_path):
    cfg = default_config()
    cfg["gmm"]["k"] = mc.DIGITS_IMAGES + 1
    with pytest.raises(mc.ConfigError, match=f"gmm.k: {mc.DIGITS_IMAGES + 1} modes .* the digits demo has 1797"):
        mc.check(cfg, ROOT)
    cfg["shards"]["flip"] = True  # the mirrors double the rows
    mc.check(cfg, ROOT)


def test_fid_without_inception_weights_is_named(tmp_path, monkeypatch):
    cfg = default_config()
    ref = tmp_path / "ref.npz"
    ref.write_bytes(b"")
    cfg["eval"].update(metric="fid", reference=str(ref))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(mc.ConfigError, match=r"^eval\.inception: metric fid needs .*torch/hub/checkpoints/pt_incep"):
        mc.check(cfg, ROOT)
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / mc.FID_WEIGHTS_FILE).write_bytes(b"")
    mc.check(cfg, ROOT)  # the torch hub cache holds them


def test_disk_warning_compares_the_shards_with_free_space(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    cfg = default_config()
    geo_bytes = 1797 * (16 * 12 + 12) * 4  # the demo's pixels tokens (4 x 4 grid of 12) and its descriptor
    cfg["shards"]["dtype"] = "float32"
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(0, 0, geo_bytes))
    assert mc.disk_warnings(cfg, tmp_path) == []
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(0, 0, geo_bytes - 1))
    (warning,) = mc.disk_warnings(cfg, tmp_path)
    assert warning.startswith("results_dir: results has 0.0 GB free; the latent shards alone will take")


def test_results_dir_moves_every_output(tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory",
                          str(tmp_path), "-n", "--config", "results_dir=mine/out"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    paths = [w for w in res.stdout.split() if "/" in w and w.rstrip(",").endswith((".json", ".parquet", ".log",
                                                                                     ".safetensors", ".npz"))]
    assert paths and all(p.rstrip(",").startswith("mine/out/") for p in paths), paths[:20]
    assert "mine/out/summary.json" in res.stdout


def test_sample_method_is_a_sampler_or_a_list_of_them():
    """sample.method, shared or a run's own: one sampler or a list, the first the headline sampler; the schema
    takes the names, mmfm.config.check refuses an empty list and a sampler listed twice, naming the key."""
    cfg = default_config()
    cfg["sample"]["method"] = "heun"
    cfg["runs"]["gmm-mode"]["sample"] = {"method": ["euler", "dopri5"]}
    assert problems(cfg) == []
    assert mc.samplers(cfg, "gauss-indep") == ["heun"] and mc.samplers(cfg, "gmm-mode") == ["euler", "dopri5"]
    assert mc.sampler_dir(cfg, "gmm-mode", "euler") == "" and mc.sampler_dir(cfg, "gmm-mode", "dopri5") == "dopri5/"
    sets = mc.sample_sets(cfg, "gmm-mode")
    assert len(sets) == 2 * len(cfg["eval"]["nfe"]) and sets[0] == ("euler", 1, "results/samples/gmm-mode/nfe-1")
    assert ("dopri5", 16, "results/samples/gmm-mode/dopri5/nfe-16") in sets
    assert mc.nfe_curve_files(cfg, "gmm-mode") == {"euler": "results/eval/gmm-mode/nfe_curve.csv",
                                                   "dopri5": "results/eval/gmm-mode/dopri5/nfe_curve.csv"}
    assert mc.nfe_curve_files(cfg, "gmm-mode", results="out", name="{run}")["dopri5"] == \
        "out/eval/{run}/dopri5/nfe_curve.csv"
    groups = mc.sampler_groups(cfg)
    assert groups[""] == [r for r in mc.run_names(cfg) if mc.samplers(cfg, r) == ["heun"]]
    assert groups["_euler_dopri5"] == ["gmm-mode"]
    mc.check(cfg, ROOT)
    del cfg["sample"]["method"]
    assert mc.samplers(cfg, "gauss-indep") == ["euler"]  # the default

    for bad, message in (("rk4", "'rk4' is not one of"), (["euler", "rk4"], "'rk4' is not one of"),
                         ({"a": 1}, "is not of type 'array'")):
        cfg = default_config()
        cfg["sample"]["method"] = bad
        assert any(line.startswith("sample.method:") and message in line for line in problems(cfg)), problems(cfg)
    cfg = default_config()
    cfg["runs"]["gmm-mode"]["sample"] = {"method": ["heun", "rk4"]}
    assert any(line.startswith("runs.gmm-mode.sample.method:") for line in problems(cfg)), problems(cfg)


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c["sample"].update(method=[]), "sample.method: an empty list"),
    (lambda c: c["runs"]["gmm-mode"].update(sample={"method": []}), "runs.gmm-mode.sample.method: an empty list"),
    (lambda c: c["runs"]["gmm-mode"].update(sample={"method": ["heun", "euler", "heun"]}),
     "runs.gmm-mode.sample.method: heun listed more than once"),
    (lambda c: c["sample"].update(method=["euler", "euler"]), "sample.method: euler listed more than once"),
])
def test_a_bad_sampler_list_names_its_key(edit, expected):
    cfg = default_config()
    edit(cfg)
    assert problems(cfg) == []
    with pytest.raises(mc.ConfigError) as err:
        mc.check(cfg, ROOT)
    assert str(err.value).startswith(expected), str(err.value)


def test_method_settings_become_the_sample_flags_its_parser_knows():
    """gm_* / gm2_* / dmf_* / dfm_* keys of a run's sample settings: flags of `mmfm sample` where its parser has
    them (lists as several values, None left out, a bare flag for a boolean), named as left out where not."""
    import argparse

    from mmfm.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["sample"]
    options = {opt: a for a in sub._actions for opt in a.option_strings}
    settings = {"n": 8, "method": "gm-ode", "gm_substeps": 4, "gm2_coefs": [0.005, 1.0], "gm_order": None,
                "dfm_steps": 3}
    flags, left_out = mc.method_flags(settings, options)
    assert left_out == (["dfm_steps"] if "--dfm-steps" not in options else [])
    assert flags == ["--gm2-coefs", "0.005", "1.0", "--gm-substeps", "4"]  # keys in sorted order
    assert sub.parse_args(["--model", "m", "--out", "o", *flags]).gm2_coefs == [0.005, 1.0]
    switch = argparse.ArgumentParser().add_argument("--gm-orthogonal", action="store_true")
    assert mc.method_flags({"gm_orthogonal": True}, {"--gm-orthogonal": switch}) == (["--gm-orthogonal"], [])
    assert mc.method_flags({"gm_orthogonal": False}, {"--gm-orthogonal": switch}) == ([], [])
    assert mc.method_flags({"n": 8, "seed": 0}, options) == ([], [])
