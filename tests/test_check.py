"""`mmfm check`: a small results folder written by the project's own writers, damaged one file at a time;
the check names exactly that file and prints the snakemake command that rebuilds it and what follows.
The command itself, run on the demo, is exercised by the workflow fault suite (tests/workflow)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mmfm import io, recover
from mmfm.check import check
from mmfm.cli import main
from mmfm.data import shards
from mmfm.gmm import files
from mmfm.gmm.em import DiagonalGMM
from mmfm.gmm.spatial import spatial_reduce, spatial_stats
from mmfm.models.velocity import build_velocity_network
from mmfm.sample import save_npz
from mmfm.train.checkpoint import export_ema, save_checkpoint
from mmfm.train.ema import EMA

N, D, DC, K = 6, 4, 5, 3
META = {"kind": "mmfm-velocity", "preset": "mlp", "in_channels": D, "num_tokens": N, "conditioning": "none",
        "num_classes": 0, "time_convention": "paper", "model_overrides": {"hidden": 8, "depth": 1}}


def write_results(root):
    """shards, CLS + spatial GMMs with a partial, an export, a checkpoint, samples and a summary."""
    rng = np.random.default_rng(0)
    for s in range(2):
        n = 40
        cols = {"image_id": np.arange(n), "label": rng.integers(0, 3, n).astype(np.int32),
                "path": [f"img/{s}-{i}.png" for i in range(n)], "flip": np.zeros(n, bool),
                "cls": rng.standard_normal((n, DC)).astype(np.float32),
                "tokens": rng.standard_normal((n, N, D)).astype(np.float16)}
        meta = {"encoder": "pixels", "revision": "1", "grid": [2, 3], "token_dim": D, "cls_dim": DC, "rows": n}
        shards.write_shard(root / f"shards/shard-{s:04d}.parquet", cols, meta, row_group_rows=16)
    gmm = DiagonalGMM(np.full(K, 1 / K), rng.standard_normal((K, DC)), rng.uniform(0.5, 2, (K, DC)))
    files.save_cls_gmm(root / "gmm/cls.safetensors", gmm, {"note": "test"})
    for s in range(2):
        spatial_stats(root / f"shards/shard-{s:04d}.parquet", root / "gmm/cls.safetensors",
                      root / f"gmm/partials/group-{s:04d}.safetensors")
    spatial_reduce(sorted((root / "gmm/partials").glob("*.safetensors")), root / "gmm/spatial.safetensors")
    torch.manual_seed(0)
    net = build_velocity_network("mlp", in_channels=D, num_tokens=N, hidden=8, depth=1)
    ema = EMA(net)
    export_ema(root / "runs/r/ema.safetensors", ema, META)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(2, N, D), torch.rand(2)).square().mean().backward()
    opt.step()
    save_checkpoint(root / "runs/r", step=1, model=net, ema=ema, optimizer=opt)
    save_npz(root / "samples/r/nfe-2.npz", rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    io.write_json(root / "summary.json", {"runs": ["r"]})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("built") / "results"
    write_results(root)
    return root


@pytest.fixture
def results(built, tmp_path, monkeypatch):
    """A fresh copy of the folder, in the current directory (where snakemake would run)."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(built, tmp_path / "results")
    return tmp_path / "results"


def run_check(capsys, *args):
    code = main(["check", "results", *args])
    return code, capsys.readouterr().out


def test_clean_folder(results, capsys):
    code, out = run_check(capsys)
    assert code == 0 and out.strip() == "results: all 10 artifacts are good"
    code, out = run_check(capsys, "--json")
    got = json.loads(out.strip().splitlines()[-1])
    assert got["ok"] and got["bad"] == [] and got["command"] is None and got["checked"] == 10


def flip_page_byte(path):
    md = pq.read_metadata(path)
    names = [md.row_group(1).column(i).path_in_schema for i in range(md.num_columns)]
    chunk = md.row_group(1).column(names.index("tokens"))
    raw = bytearray(path.read_bytes())
    raw[chunk.data_page_offset + chunk.total_compressed_size // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def truncate(path, keep=0.5):
    os.truncate(path, int(path.stat().st_size * keep))


def sidecar_k(results):
    side = io.sidecar_path(results / "gmm/cls.safetensors")
    io.write_json(side, {**json.loads(side.read_text()), "k": K + 1})


def export_other_width(results):
    arrays, meta = io.open_tensors(results / "runs/r/ema.safetensors")
    export_ema(results / "runs/r/ema.safetensors", {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()},
               {**meta, "in_channels": D + 1})


def spatial_sidecar_grid(results):
    side = io.sidecar_path(results / "gmm/spatial.safetensors")
    io.write_json(side, {**json.loads(side.read_text()), "token_dim": D + 1})


DAMAGE = {
    "truncated shard": (lambda r: truncate(r / "shards/shard-0001.parquet"), "shards/shard-0001.parquet",
                        "magic bytes", "--forcerun results/shards/shard-0001.parquet"),
    "flipped byte in a shard page": (lambda r: flip_page_byte(r / "shards/shard-0000.parquet"),
                                     "shards/shard-0000.parquet", "CRC", "--forcerun results/shards/shard-0000.parquet"),
    "truncated safetensors": (lambda r: truncate(r / "gmm/spatial.safetensors", 0.9), "gmm/spatial.safetensors",
                              "truncated", "--forcerun results/gmm/spatial.safetensors"),
    "truncated partial": (lambda r: truncate(r / "gmm/partials/group-0001.safetensors", 0.9),
                          "gmm/partials/group-0001.safetensors", "truncated",
                          "--forcerun results/gmm/partials/group-0001.safetensors"),
    "sidecar disagrees": (sidecar_k, "gmm/cls.json", "'k' is 4 but cls.safetensors records 3",
                          "--forcerun results/gmm/cls.safetensors"),
    "spatial sidecar disagrees with the tensors": (spatial_sidecar_grid, "gmm/spatial.json", "'token_dim' is 5",
                                                   "--forcerun results/gmm/spatial.safetensors"),
    "export disagrees with its metadata": (export_other_width, "runs/r/ema.safetensors", "tensors disagree with its "
                                           "metadata", "--forcerun results/runs/r/ema.safetensors"),
    "truncated samples": (lambda r: truncate(r / "samples/r/nfe-2.npz"), "samples/r/nfe-2.npz", "not a readable .npz",
                          "--forcerun results/samples/r/nfe-2.npz"),
    "damaged checkpoint": (lambda r: truncate(r / "runs/r/step-0000001/state.safetensors"),
                           "runs/r/step-0000001/state.safetensors", "state.json records",
                           "rm -r results/runs/r/step-0000001 && snakemake --cores all"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_is_named_with_the_command(results, capsys, case):
    damage, bad, reason, command = DAMAGE[case]
    damage(results)
    code, out = run_check(capsys)
    lines = out.strip().splitlines()
    assert code == 1
    named = [line for line in lines if line.startswith("results/") and ": " in line]
    assert len(named) == 1 and named[0].startswith(f"results/{bad}: ") and reason in named[0], out
    assert lines[-2].startswith("1 bad of 10; to recreate them and everything after them, run (with the --configfile")
    assert lines[-1].strip().startswith("rm -r" if command.startswith("rm") else "snakemake --cores all")
    assert lines[-1].strip().endswith(command)
    report = check("results")
    assert [str(p) for p, _ in report.bad] == [f"results/{bad}"] and report.command == lines[-1].strip()


def test_several_bad_files_one_command_and_json(results, capsys):
    truncate(results / "shards/shard-0001.parquet")
    sidecar_k(results)
    truncate(results / "runs/r/step-0000001/state.safetensors")
    code, out = run_check(capsys, "--json", "--configfile", "mine.yaml")
    got = json.loads(out.strip().splitlines()[-1])
    assert code == 1 and not got["ok"]
    assert [b["path"] for b in got["bad"]] == ["results/gmm/cls.json", "results/runs/r/step-0000001/state.safetensors",
                                                "results/shards/shard-0001.parquet"]
    assert got["command"] == ("rm -r results/runs/r/step-0000001 && snakemake --cores all --configfile mine.yaml "
                              "--forcerun results/gmm/cls.safetensors results/shards/shard-0001.parquet")
    assert "(with the --configfile" not in out


def test_quick_reads_no_pages(results, capsys):
    flip_page_byte(results / "shards/shard-0000.parquet")
    truncate(results / "shards/shard-0001.parquet")
    code, out = run_check(capsys, "--quick")
    assert code == 1 and "shard-0001.parquet: not a readable Parquet file" in out and "shard-0000" not in out


def test_leftovers_are_listed_not_errors(results, capsys):
    (results / "gmm/.spatial.safetensors.tmp4242").write_bytes(b"partial")
    (results / "runs/r/step-0000002.tmp99").mkdir()
    (results / "runs/r/step-0000002.tmp99/model.safetensors").write_bytes(b"partial")
    (results / "runs/r/step-0000003").mkdir()  # renamed without state.json: never a checkpoint
    (results / "samples/r/nfe-2.npz.part0-of-2.npz").write_bytes(b"partial")
    code, out = run_check(capsys)
    assert code == 0 and "4 leftover(s) of killed writes" in out
    for name in (".spatial.safetensors.tmp4242", "step-0000002.tmp99", "step-0000003", "part0-of-2"):
        assert name in out


def test_missing_folder_is_an_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["check", "nothing"]) == 2
    assert "nothing: no such results folder" in capsys.readouterr().err


def test_rebuild_command_maps_files_to_their_job_and_runs_where_snakemake_ran(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cmd = recover.rebuild_command
    assert cmd(["results/gmm/cls_weights.png", "results/gmm/cls.json"]) == \
        "snakemake --cores all --forcerun results/gmm/cls.safetensors"
    assert cmd(["out/mine/samples/r/nfe-8.png"]) == "snakemake --cores all --forcerun out/mine/samples/r/nfe-8.npz"
    assert cmd(["results/runs/a b/metrics.csv"]) == "snakemake --cores all --forcerun 'results/runs/a b/ema.safetensors'"
    assert cmd(["results/runs/r/step-0000010/state.json"]) == "rm -r results/runs/r/step-0000010 && snakemake --cores all"
    assert cmd([tmp_path / "results/eval/r/final.json"]) == "snakemake --cores all --forcerun results/eval/r/nfe_curve.csv"
    # a further sampler's set and curve (samples/<run>/<sampler>/, eval/<run>/<sampler>/)
    assert cmd(["results/samples/r/heun/nfe-2.png"]) == "snakemake --cores all --forcerun results/samples/r/heun/nfe-2.npz"
    assert cmd(["results/eval/r/gm-sde/nfe_curve.csv"]) == \
        "snakemake --cores all --forcerun results/eval/r/gm-sde/nfe_curve.csv"
    assert cmd(["/elsewhere/data.bin"]) is None
    # snakemake ran in work/ (its .snakemake/ is there); the command is written from there
    (tmp_path / "work/.snakemake").mkdir(parents=True)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert cmd([tmp_path / "work/results/shards/shard-0002.parquet"]) == \
        f"cd {tmp_path / 'work'} && snakemake --cores all --forcerun results/shards/shard-0002.parquet"
    monkeypatch.chdir(tmp_path / "work")
    assert cmd(["results/shards/shard-0002.parquet"]) == "snakemake --cores all --forcerun results/shards/shard-0002.parquet"


def test_fatal_signals_leave_a_traceback(tmp_path):
    """`mmfm.cli.main` turns on faulthandler: a SIGSEGV (or the SIGBUS of a memory-mapped write) prints the stack."""
    code = "import faulthandler, sys; from mmfm.cli import main; main(['check', sys.argv[1]]); faulthandler._sigsegv()"
    (tmp_path / "results").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "results")], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode != 0 and "Fatal Python error: Segmentation fault" in res.stderr
    assert "Current thread" in res.stderr or "Thread 0x" in res.stderr
