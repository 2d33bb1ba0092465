"""A two-mode toy for training tests (tests/train, tests/test_launch.py): shards, GMM files, settings,
and readers of what a run writes. Imported as ``toyrun`` (pytest's ``pythonpath`` holds tests/)."""

import csv
import sys
from pathlib import Path

import numpy as np
import torch

from mmfm import io
from mmfm.data import shards
from mmfm.gmm import files
from mmfm.gmm.em import DiagonalGMM

N_ROWS = 256
META = {"encoder": "toy", "revision": "0", "grid": [2, 2], "token_dim": 2, "cls_dim": 2}


def make_toy(root):
    """Two shards of tokens ``(n, 4, 2)`` around -2 or +2 (the mode), a 2-D CLS that separates the modes,
    the matching CLS GMM and spatial GMM (2 modes) under ``root``. Returns ``(root, tokens (n, 4, 2))``."""
    rng = np.random.default_rng(0)
    k = rng.integers(0, 2, N_ROWS)
    centre = np.where(k == 1, 2.0, -2.0)
    tok = (centre[:, None, None] + 0.3 * rng.standard_normal((N_ROWS, 4, 2))).astype(np.float32)
    cls = (centre[:, None] + 0.5 * rng.standard_normal((N_ROWS, 2))).astype(np.float32)
    (root / "shards").mkdir()
    for i in range(2):
        sl = slice(i * N_ROWS // 2, (i + 1) * N_ROWS // 2)
        shards.write_shard(root / "shards" / f"shard-{i}.parquet",
                           {"image_id": np.arange(N_ROWS)[sl], "label": k[sl].astype(np.int32), "cls": cls[sl],
                            "tokens": tok[sl]}, META, row_group_rows=32)
    files.save_cls_gmm(root / "cls.safetensors",
                       DiagonalGMM(np.full(2, 0.5), np.array([[-2.0, -2.0], [2.0, 2.0]]), np.full((2, 2), 0.25)), {})
    means = np.stack([np.full((4, 2), -2.0), np.full((4, 2), 2.0)]).astype(np.float32)
    io.save_tensors(root / "spatial.safetensors", {"weights": np.full(2, 0.5), "means": means,
                                                   "variances": np.full(2, 0.09, np.float32),
                                                   "counts": np.array([N_ROWS // 2] * 2)}, {"kind": "spatial-gmm"})
    return root, tok


def one_batch_shard(root, folder, rows=16):
    """A folder with one shard of the toy's first ``rows`` rows (one global batch: every number of ranks
    then trains on the same rows at every step)."""
    from mmfm.data.stream import read_shard

    folder.mkdir()
    got = read_shard(root / "shards" / "shard-0.parquet", ("image_id", "label", "cls", "tokens"))
    shards.write_shard(folder / "shard-0.parquet", {k: np.asarray(v)[:rows] for k, v in got.items()}, META,
                       row_group_rows=8)
    return folder


TWO_RANKS_SCRIPT = """
import json, sys, torch, torch.distributed as dist
from mmfm.train import loop
torch.set_num_threads(1)
dist.init_process_group("gloo")
res = loop.train(json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], progress=False, device="cpu")
print(json.dumps({"rank": dist.get_rank(), "micro": res["micro_batch"], "accum": res["accumulation"],
                  "world": res["world_size"], "losses": res["losses"]}))
dist.destroy_process_group()
"""


def train_two_gloo_ranks(cfg: dict, shards_dir, out, workdir) -> list[dict]:
    """``loop.train(cfg, shards_dir, out)`` on two gloo ranks on localhost (two processes); each rank's last
    line: ``{"rank", "micro", "accum", "world", "losses"}``."""
    import json
    import os
    import socket
    import subprocess

    script = Path(workdir) / "two_ranks.py"
    script.write_text(TWO_RANKS_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(script), json.dumps(cfg), str(shards_dir), str(out)],
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    return [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]


def config(root, setting="gaussian", **kw):
    """Training settings for the toy: ``gaussian``, ``gmm`` (GMM source) or ``mode`` (mode coupling and
    mode conditioning)."""
    base = dict(global_batch=16, micro_batch_max=8, steps=20, lr=1e-3, ema_decay=0.99, checkpoint_every=10,
                log_every=1, buffer_rows=64, time_shift=1.0, seed=3)
    if setting != "gaussian":
        base.update(source="gmm", gmm=str(root / "spatial.safetensors"), cls_gmm=str(root / "cls.safetensors"))
    if setting == "mode":
        base.update(coupling="mode-soft", conditioning="mode")
    return {**base, **kw}


def weights(ckpt):
    """Model and EMA tensors of a checkpoint directory, as torch tensors."""
    out = {}
    for name in ("model", "ema"):
        arrays, _ = io.open_tensors(ckpt / f"{name}.safetensors")
        out.update({f"{name}.{k}": torch.from_numpy(np.array(v)) for k, v in arrays.items()})
    return out


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_close_weights(a, b):
    """The same tensors to ``assert_close(rtol=1e-5, atol=1e-6)`` (1 process against N)."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def train_cut_and_resume(cfg: dict, root, tmp_path, cut_at: int = 5) -> dict:
    """Train ``cfg`` on the toy into ``tmp_path / "ref"``, and into ``tmp_path / "cut"`` stopped after ``cut_at`` steps
    then resumed; the resumed weights must be the uninterrupted run's, bit for bit. Returns the reference run."""
    from mmfm.train.loop import train

    ref = train(cfg, root / "shards", tmp_path / "ref", progress=False, device="cpu")
    part = train(cfg, root / "shards", tmp_path / "cut", progress=False, max_steps=cut_at, device="cpu")
    assert not part["done"]
    rest = train(cfg, root / "shards", tmp_path / "cut", progress=False, device="cpu")
    assert_identical(weights(ref["checkpoint"]), weights(rest["checkpoint"]))
    return ref


def metric_steps(out):
    with open(out / "metrics.csv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def tiny_sampler(folder):
    """A random mode-conditional ``ditdh-tiny`` over 16 tokens of width 12 (the pixels tokenizer's 8 x 8
    images), imported as a released checkpoint is, and a 3-mode spatial GMM for it, in ``folder``.
    Returns ``(model .safetensors, source .safetensors)``."""
    from mmfm.cli import main
    from mmfm.models.ditdh import build_ditdh

    torch.manual_seed(0)
    net = build_ditdh("ditdh-tiny", in_channels=12, num_tokens=16, conditioning="mode", num_classes=3)
    torch.save({"ema": net.state_dict()}, folder / "mode-gmm-1k.pt")
    model, source = folder / "v.safetensors", folder / "spatial.safetensors"
    assert main(["import-checkpoint", "--checkpoint", str(folder / "mode-gmm-1k.pt"), "--out", str(model)]) == 0
    g = torch.Generator().manual_seed(0)
    io.save_tensors(source, {"weights": np.array([0.6, 0.3, 0.1]),
                             "means": 3 * torch.randn(3, 16, 12, generator=g).numpy(),
                             "variances": (torch.rand(3, generator=g) + 0.2).numpy()})
    return model, source


def standin_tree(preset, root):
    """``workflow/scripts/standin_tree.py``'s ``build(preset, root)``: a preset's artifacts as empty stand-ins."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow" / "scripts"))
    try:
        from standin_tree import build
    finally:
        sys.path.pop(0)
    return build(preset, root)
