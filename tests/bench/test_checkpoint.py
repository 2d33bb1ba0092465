"""``mmfm bench checkpoint`` on ditdh-tiny: what it reports is what save_checkpoint wrote, the checkpoint is the
one the training loop writes and loads back to the same state, the derived figures follow from the measured
ones, and nothing is left behind."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from toyrun import config, make_toy

from mmfm import io
from mmfm.bench import checkpoint as bench
from mmfm.bench.checkpoint import bench_checkpoint, build_training_state, raw_write
from mmfm.models.ditdh import build_ditdh, count_parameters
from mmfm.train.checkpoint import load_checkpoint

C, N = 6, 9  # tiny latent: 9 tokens of 6 channels
TENSOR_FILES = ("model.safetensors", "ema.safetensors", "state.safetensors")


def sizes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def header(path: Path) -> dict:
    return {k: (h["dtype"], tuple(h["shape"])) for k, h in io.read_header(path)[0].items()}


def skeleton(obj):
    """The structure of a JSON value: keys and list lengths kept, leaves replaced by their type."""
    if isinstance(obj, dict):
        return {k: skeleton(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [skeleton(v) for v in obj]
    return type(obj).__name__


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    """One run with ``keep=True``: ``(result, out_dir)``."""
    out = tmp_path_factory.mktemp("kept")
    return bench_checkpoint("ditdh-tiny", out_dir=out, in_channels=C, num_tokens=N, seed=3, keep=True), out


def test_reported_bytes_are_the_files_save_checkpoint_wrote(kept):
    r, out = kept
    run, ckpt = Path(r["run_dir"]), Path(r["checkpoint_dir"])
    assert Path(r["work_dir"]).parent == out and run.parent == Path(r["work_dir"]) and ckpt.parent == run
    on_disk = sizes(run)
    assert set(on_disk) == {"latest", "step-0000001/state.json"} | {f"step-0000001/{f}" for f in TENSOR_FILES}
    assert r["checkpoint_bytes"] == sum(on_disk.values())
    assert {k: v["bytes"] for k, v in r["files"].items()} == on_disk
    assert (run / "latest").read_text().strip() == ckpt.name
    recorded = json.loads((ckpt / "state.json").read_text())["files"]
    assert recorded == {f: on_disk[f"step-0000001/{f}"] for f in TENSOR_FILES}
    counts = {f: len(header(ckpt / f)) for f in TENSOR_FILES}
    assert {f: r["files"][f"step-0000001/{f}"]["tensors"] for f in TENSOR_FILES} == counts
    assert r["checkpoint_tensors"] == sum(counts.values())
    # the anchor wrote the same number of bytes, as one file
    assert Path(r["raw_file"]).stat().st_size == r["raw_write_bytes"] == r["checkpoint_bytes"]
    assert r["kept"] is True and r["checkpoint_delete_s"] is None


def test_checkpoint_loads_back_to_the_state_it_was_written_from(kept):
    r, _ = kept
    assert r["read_back_identical"] is True
    original = build_training_state("ditdh-tiny", C, N, seed=3)  # deterministic in the seed
    fresh = build_training_state("ditdh-tiny", C, N, seed=11, step=False)
    info = load_checkpoint(r["checkpoint_dir"], model=fresh["model"], ema=fresh["ema"],
                           optimizer=fresh["optimizer"], scheduler=fresh["scheduler"],
                           generators=fresh["generators"], rank=0)
    assert info["step"] == r["step"] == 1 and info["config"]["model"] == "ditdh-tiny"
    for a, b in ((original["model"].state_dict(), fresh["model"].state_dict()),
                 (original["ema"].state_dict(), fresh["ema"].state_dict())):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    params = list(original["model"].parameters())
    trainable = [i for i, p in enumerate(params) if p.requires_grad]
    saved, loaded = original["optimizer"].state_dict(), fresh["optimizer"].state_dict()
    assert sorted(saved["state"]) == sorted(loaded["state"]) == trainable  # frozen parameters have no state
    for i in trainable:
        assert set(loaded["state"][i]) == {"step", "exp_avg", "exp_avg_sq"}
        for k, v in saved["state"][i].items():
            assert torch.equal(v, loaded["state"][i][k]), (i, k)
        assert float(loaded["state"][i]["step"]) == 1.0 and loaded["state"][i]["exp_avg_sq"].abs().sum() > 0
    assert loaded["param_groups"] == saved["param_groups"]
    assert fresh["scheduler"].last_epoch == original["scheduler"].last_epoch == 1
    assert torch.equal(fresh["generators"]["train"].get_state(), original["generators"]["train"].get_state())
    assert r["parameters"] == count_parameters(build_ditdh("ditdh-tiny", in_channels=C, num_tokens=N))
    assert r["trainable_parameters"] == sum(params[i].numel() for i in trainable)


def test_checkpoint_has_the_tensors_of_a_training_checkpoint(tmp_path):
    """The loop's own checkpoint after one step (toy shards: 4 tokens of 2 channels, ditdh-tiny) holds the
    same tensors, names, dtypes and shapes, and the same JSON structure, as the bench's."""
    from mmfm.train.loop import train

    root, _ = make_toy(tmp_path)
    res = train(config(root, steps=1, checkpoint_every=1, tensorboard=False), root / "shards", tmp_path / "run",
                progress=False)
    real = Path(res["checkpoint"])
    r = bench_checkpoint("ditdh-tiny", out_dir=tmp_path / "bench", in_channels=2, num_tokens=4, keep=True)
    mine = Path(r["checkpoint_dir"])
    assert real.name == mine.name and sorted(p.name for p in real.iterdir()) == sorted(p.name for p in mine.iterdir())
    for f in TENSOR_FILES:
        assert header(mine / f) == header(real / f), f
        assert (mine / f).stat().st_size == (real / f).stat().st_size, f
    a, b = (json.loads((p / "state.json").read_text()) for p in (real, mine))
    assert a.keys() == b.keys()
    for key in ("optimizer", "scheduler", "rng", "files"):
        assert skeleton(a[key]) == skeleton(b[key]), key
    assert a["config"].keys() == b["config"].keys() and a["extra"].keys() == b["extra"].keys()
    assert a["extra"]["stream"].keys() == b["extra"]["stream"].keys()


def test_derived_figures_follow_from_the_measured_ones_and_nothing_is_left(tmp_path):
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(7)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    r = bench_checkpoint("ditdh-tiny", out_dir=tmp_path, in_channels=C, num_tokens=N)
    assert list(tmp_path.iterdir()) == []
    assert not Path(r["work_dir"]).exists() and r["kept"] is False and r["checkpoint_delete_s"] >= 0
    assert torch.equal(torch.get_rng_state(), before[0]) and np.array_equal(np.random.get_state()[1], before[1])
    assert random.getstate() == before[2]  # the caller's random states are put back
    assert r["write_over_raw"] == r["checkpoint_write_s"] / r["raw_write_s"]
    assert r["checkpoint_write_gb_per_s"] == r["checkpoint_bytes"] / 1e9 / r["checkpoint_write_s"]
    assert r["raw_write_gb_per_s"] == r["raw_write_bytes"] / 1e9 / r["raw_write_s"]
    assert r["checkpoint_read_gb_per_s"] == r["checkpoint_bytes"] / 1e9 / r["checkpoint_read_s"]
    assert r["raw_write_bytes"] == r["checkpoint_bytes"] and r["checkpoint_gb"] == r["checkpoint_bytes"] / 1e9
    assert r["lead_formula"] == "ceil(2 * checkpoint_write_s + 60)"
    assert r["lead_seconds_recommended"] == math.ceil(2 * r["checkpoint_write_s"] + 60)
    assert r["read_back_identical"] is True and r["preset"] == "ditdh-tiny" and r["latent"] == [N, C]
    assert r["filesystem"]["path"] == r["work_dir"] and r["peak_rss_gb"] > 0
    assert json.loads(json.dumps(r)) == r


def test_default_folder_is_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = bench_checkpoint("ditdh-tiny", in_channels=C, num_tokens=N)
    assert Path(r["work_dir"]).parent == tmp_path.resolve()
    assert Path(r["work_dir"]).name.startswith("mmfm-bench-checkpoint-") and list(tmp_path.iterdir()) == []


def test_a_failed_save_leaves_nothing_and_too_little_disk_is_refused(tmp_path, monkeypatch):
    def fail(*args, **kw):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(bench, "save_checkpoint", fail)
    with pytest.raises(RuntimeError, match="disk gone"):
        bench_checkpoint("ditdh-tiny", out_dir=tmp_path, in_channels=C, num_tokens=N)
    assert list(tmp_path.iterdir()) == []

    class Usage:
        free = 10

    monkeypatch.setattr(bench.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(OSError, match="GB free"):
        bench_checkpoint("ditdh-tiny", out_dir=tmp_path, in_channels=C, num_tokens=N)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("nbytes", [0, 1, 64, 1000])
def test_raw_write_writes_exactly_the_bytes(tmp_path, nbytes):
    p = tmp_path / "raw.bin"
    assert raw_write(p, nbytes, chunk=64) >= 0
    assert p.stat().st_size == nbytes
    if nbytes > 64:  # the one buffer, over and over
        data = p.read_bytes()
        assert data[:64] == data[64:128] and len(set(data)) > 1
