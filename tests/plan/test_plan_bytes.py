"""`mmfm plan`'s byte counts against the files the real stages write on a tiny config (the digits demo with
stored flips, float16 shards and the release's row sets, as in the presets; three shards, K = 4)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from mmfm import config as mc
from mmfm.plan import GPUS, build_plan
from mmfm.plan import artifacts as art

ROOT = Path(__file__).resolve().parents[2]
RUN = "gmm-mode"


def tiny_config() -> dict:
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["runs"] = {r: cfg["runs"][r] for r in ("gauss-indep", RUN)}
    cfg["shards"].update(num_shards=3, flip=True, dtype="float16", batch_size=64, row_group_rows=100)
    cfg["gmm"].update(k=4, rows="originals", max_iter=20)
    cfg["spatial"].update(flip=True, rows_from="originals", groups=2)
    cfg["train"].update(model="ditdh-tiny", global_batch=32, micro_batch_max=16, steps=4, checkpoint_every=2,
                        keep_last=1, log_every=1, eval_every=0)
    cfg["sample"].update(n=40, batch_size=16)
    cfg["eval"].update(nfe=[2], final_nfe=2)
    return cfg


def sizes(folder: Path, pattern: str) -> list[int]:
    return sorted(p.stat().st_size for p in folder.glob(pattern) if p.is_file())


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The data stages, one run's training and one sample set, run for real in a working directory, the way
    the workflow's scripts call them (relative paths); returns ``(workdir, config file, config)``."""
    from mmfm.data.digits import export_digits
    from mmfm.data.encode import encode_folder
    from mmfm.encoders import load_tokenizer
    from mmfm.gmm.fit import fit_cls_gmm
    from mmfm.gmm.spatial import spatial_reduce, spatial_stats
    from mmfm.sample import sample_run
    from mmfm.train.loop import train

    work = tmp_path_factory.mktemp("plan-demo")
    configfile = work / "tiny.yaml"
    configfile.write_text(yaml.safe_dump(tiny_config(), sort_keys=False))
    before = os.getcwd()
    os.chdir(work)
    try:
        from mmfm.plan.load import read_configfile, validate

        cfg, _ = validate(read_configfile(configfile), work)
        export_digits("results/digits")
        sh, g, sp = cfg["shards"], cfg["gmm"], cfg["spatial"]
        tok = load_tokenizer(**mc.tokenizer_kwargs(cfg["encoder"]))
        shards = [f"results/shards/shard-{s:04d}.parquet" for s in range(sh["num_shards"])]
        for s, out in enumerate(shards):
            encode_folder("results/digits", out, tok, shard=s, num_shards=sh["num_shards"], flip=sh["flip"],
                          dtype=sh["dtype"], batch_size=sh["batch_size"], row_group_rows=sh["row_group_rows"],
                          on_bad_image=sh["on_bad_image"], min_side=sh["min_side"], progress=False)
        fit_cls_gmm(shards, g["k"], "results/gmm/cls.safetensors", init=g["init"], max_iter=g["max_iter"],
                    tol=g["tol"], seed=g["seed"], rows=g["rows"], progress=False)
        for i, group in enumerate(mc.spatial_groups(cfg)):
            spatial_stats([shards[j] for j in group], "results/gmm/cls.safetensors",
                          f"results/gmm/partials/group-{i:04d}.safetensors", flip=sp["flip"],
                          covariance=sp["covariance"], rows=sp["rows"], rows_from=sp["rows_from"])
        spatial_reduce(sorted(Path("results/gmm/partials").glob("*.safetensors")), "results/gmm/spatial.safetensors",
                       weights=sp["weights"], min_variance=sp["min_variance"])
        settings = mc.with_gmm_files(mc.train_settings(cfg, RUN), "results/gmm/spatial.safetensors",
                                     "results/gmm/cls.safetensors")
        train(settings, shards, f"results/runs/{RUN}", progress=False, device="cpu")
        s = mc.sample_settings(cfg, RUN)
        sample_run(f"results/runs/{RUN}/ema.safetensors", f"results/samples/{RUN}/nfe-2.npz", tok,
                   source="results/gmm/spatial.safetensors", n=s["n"], seed=s["seed"], steps=2,
                   batch_size=s["batch_size"], grid=f"results/samples/{RUN}/nfe-2.png", progress=False)
    finally:
        os.chdir(before)
    return work, configfile, cfg


@pytest.fixture(scope="module")
def plan(demo):
    work, configfile, _ = demo
    return build_plan(configfile, gpu=GPUS["a100-80gb"], root=work, cache=None)


def files(plan, rule: str) -> dict[str, art.File]:
    return {f.path: f for f in plan.rules[rule].files}


def test_export_digits_bytes_are_the_pngs(plan, demo):
    work = demo[0]
    assert plan.rules["export_digits"].bytes_written == sum(sizes(work / "results/digits", "*/*.png"))


def test_shard_bytes_equal_the_real_shards(plan, demo):
    """Every shard within the few bytes of the digits of its recorded encoding seconds."""
    work = demo[0]
    real = sizes(work / "results/shards", "*.parquet")
    planned = sorted(n for f in plan.rules["encode"].files for n in [f.nbytes] * f.count)
    assert len(real) == len(planned) == 3
    for a, b in zip(real, planned):
        assert abs(a - b) <= 8, (real, planned)
    assert abs(plan.rules["encode"].bytes_written - sum(real)) <= 24


def test_a_large_shard_is_extrapolated_exactly(demo, monkeypatch):
    """Above MEASURE_LIMIT a shard is measured on its first two write calls and its last; the result is the
    real file's size but for the compressed paths of the calls in between."""
    work, _, cfg = demo
    from mmfm.plan import geometry as geom

    monkeypatch.setattr(art, "MEASURE_LIMIT", 1000)
    geo, data = geom.tokenizer_geometry(cfg["encoder"]), geom.dataset(cfg, work)
    calls = art.write_calls(599, 64, True, 100)  # shard 0: 1797 // 3 images
    assert len(calls) > 3  # so the extrapolation is what is tested
    nbytes, how = art.shard_bytes(cfg, geo, data, 0)
    real = (work / "results/shards/shard-0000.parquet").stat().st_size
    assert how == "extrapolated" and abs(nbytes - real) <= 1e-4 * real  # the paths compress a little differently


def test_gmm_files_equal_the_real_ones(plan, demo):
    work = demo[0]
    got = files(plan, "fit_cls_gmm")
    assert got["results/gmm/cls.safetensors"].nbytes == (work / "results/gmm/cls.safetensors").stat().st_size
    assert got["results/gmm/cls.json"].nbytes >= (work / "results/gmm/cls.json").stat().st_size  # a bound
    png = (work / "results/gmm/cls_weights.png").stat().st_size
    assert 0.7 * png <= got["results/gmm/cls_weights.png"].nbytes <= 1.3 * png  # drawn for stand-in weights


def test_spatial_partials_and_reduce_equal_the_real_files(plan, demo):
    from mmfm import io

    work = demo[0]
    partials = sorted((work / "results/gmm/partials").glob("*.safetensors"))
    for p in partials:  # K = 4: every group touches every mode, so the bound min(K, rows) is exact
        assert io.read_header(p)[1]["modes_touched"] == 4
    assert plan.rules["spatial_stats"].jobs == len(partials) == 2
    assert plan.rules["spatial_stats"].bytes_written == sum(p.stat().st_size for p in partials)
    got = files(plan, "spatial_gmm")
    for name in ("spatial.safetensors", "spatial.json"):
        real = (work / "results/gmm" / name).stat().st_size
        assert abs(got[f"results/gmm/{name}"].nbytes - real) <= 4, name  # counts of empty/floored modes: 1 digit


def test_training_files_equal_the_real_checkpoint_and_export(plan, demo):
    work = demo[0]
    run_dir = work / "results/runs" / RUN
    got = files(plan, "train")
    (ckpt,) = [p for p in run_dir.glob("step-*") if p.is_dir()]  # keep_last 1
    for name in ("model.safetensors", "ema.safetensors", "state.safetensors"):
        assert got[f"results/runs/{RUN}/step-XXXXXXX/{name}"].nbytes == (ckpt / name).stat().st_size, name
    state = (ckpt / "state.json").stat().st_size
    assert 0.8 * state <= got[f"results/runs/{RUN}/step-XXXXXXX/state.json"].nbytes <= 1.25 * state
    for name in ("ema.safetensors", "ema.json"):
        assert got[f"results/runs/{RUN}/{name}"].nbytes == (run_dir / name).stat().st_size, name


def test_sample_npz_is_exact_and_the_grid_bounded(plan, demo):
    work = demo[0]
    got = files(plan, "sample")
    npz = work / f"results/samples/{RUN}/nfe-2.npz"
    assert got[f"results/samples/{RUN}/nfe-2.npz"].nbytes == npz.stat().st_size
    png = (work / f"results/samples/{RUN}/nfe-2.png").stat().st_size
    assert png <= got[f"results/samples/{RUN}/nfe-2.png"].nbytes


def test_totals_add_up(plan):
    assert plan.total_bytes == sum(r.bytes_written for r in plan.rules.values())
    d = plan.as_dict()
    assert d["total_bytes"] == plan.total_bytes
    assert d["rules"]["encode"]["bytes_written"] == plan.rules["encode"].bytes_written
