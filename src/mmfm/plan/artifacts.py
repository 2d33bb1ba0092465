"""The bytes each job writes, from the artifact formats themselves.

Each function returns a list of :class:`File` (a path pattern, its bytes, how many such files, and how the
figure was obtained, ``how``):

- ``exact``: the writer's own layout: safetensors files through :class:`mmfm.io.TensorFile` (the 8-byte
  length, the JSON header padded to 8 bytes, the buffer) with the tensor names, shapes, dtypes and metadata
  the stage writes (metadata values whose digits depend on the data, such as a count of empty modes, are
  taken at a typical length: a few bytes either way); ADM ``.npz`` files through numpy's own ``.npy`` header
  and ``zipfile``'s records; the digits demo's PNGs encoded by PIL as ``export_digits`` encodes them;
- ``measured``: Parquet shards written by the real writer (the schema, compression, dictionary, statistics
  and row-group cuts of :func:`mmfm.data.encode.encode_folder`, replayed batch by batch) into a byte counter,
  with zero-valued tokens (stored plain and uncompressed, so their values do not change the size) and the
  images' real paths (or stand-in names, :mod:`mmfm.plan.geometry`); a shard above
  :data:`MEASURE_LIMIT` bytes is measured on its first two write calls and its last one, and the calls in
  between are counted from the difference (``extrapolated``: their compressed ``path`` columns differ by a few
  bytes, 1e-4 of the shard at most; 114 bytes of an ImageNet shard's 3.97 GB); the weights plot of ``fit_cls_gmm`` is drawn by
  :func:`mmfm.gmm.files.plot_weights` for stand-in weights;
- ``bound``: an upper bound (the modes a spatial partial touches, at most ``min(K, rows)``; a PNG grid, at most
  its raw pixels; a GMM sidecar with every EM iteration of ``max_iter``);
- ``estimate``: small text files (CSV, JSON sidecars, TensorBoard events) from their format and row count.

Logs (``results/logs``) and benchmark files are not counted (a few kB per job; a training log with a tqdm
bar grows by ~1 kB per minute).
"""

from __future__ import annotations

import io as _io
import json
import math
import tempfile
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmfm import config as mc
from mmfm import io
from mmfm.plan.geometry import Dataset, Geometry

#: A shard up to this size is measured whole; a larger one from its first two write calls and its last.
MEASURE_LIMIT = 64 << 20
#: Typical float repr (``str(float)``): 17 significant digits.
_FLOAT = 0.12345678901234567
_SECONDS = 1234.5678901234567
_HEX16, _HEX32 = "0" * 16, "0" * 32


@dataclass
class File:
    """``count`` files matching ``path``, ``nbytes`` each (``how``: exact | measured | bound | estimate).
    ``transient``: the file exists only while the job runs (peak disk, not what the job leaves)."""

    path: str
    nbytes: int
    count: int = 1
    how: str = "exact"
    transient: bool = False

    @property
    def total(self) -> int:
        return self.nbytes * self.count

    def as_dict(self) -> dict:
        return {"path": self.path, "bytes": self.nbytes, "count": self.count, "how": self.how,
                **({"transient": True} if self.transient else {})}


def tensor_file_bytes(specs: dict, meta: dict | None) -> int:
    """Bytes of the safetensors file :class:`mmfm.io.TensorFile` writes for ``specs`` and ``meta``."""
    return io.TensorFile("-", specs, meta).nbytes


def json_bytes(payload, indent: int | None = 2) -> int:
    """Bytes of :func:`mmfm.io.write_json` (``indent=2`` and a newline)."""
    return len(json.dumps(payload, indent=indent, default=io._jsonable).encode()) + 1


# ------------------------------------------------------------------------------------------------ images


def digits_folder() -> list[File]:
    """The demo's PNGs as :func:`mmfm.data.digits.export_digits` writes them (encoded here in memory)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    pixels = np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)
    total = 0
    for img in pixels:
        buf = _io.BytesIO()
        Image.fromarray(img, mode="L").save(buf, format="png")
        total += buf.tell()
    return [File("results/digits/<digit>/<index>.png", total, 1, "exact")]


# ------------------------------------------------------------------------------------------------ shards


class _Counter(_io.RawIOBase):
    """A write-only sink that counts the bytes written to it."""

    def __init__(self):
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        n = memoryview(b).nbytes
        self.n += n
        return n

    def tell(self) -> int:
        return self.n


def write_calls(images: int, batch_size: int, flip: bool, row_group_rows: int) -> list[list[int]]:
    """The ``writer.write_table`` calls of :func:`mmfm.data.encode.encode_folder` for a shard of ``images``
    images (none skipped): each a list of its batches' image counts. A batch adds ``images`` rows (twice
    that with stored flips); pending batches are written once they hold ``row_group_rows`` rows or more,
    and the rest at the end."""
    reps = 2 if flip else 1
    calls, pending, rows = [], [], 0
    for lo in range(0, images, batch_size):
        b = min(batch_size, images - lo)
        pending.append(b)
        rows += b * reps
        if rows >= row_group_rows:
            calls.append(pending)
            pending, rows = [], 0
    if pending:
        calls.append(pending)
    return calls


def shard_meta(config: dict, geo: Geometry, data: Dataset, shard: int, images: int) -> dict:
    """The ``mmfm`` footer metadata :func:`mmfm.data.encode.encode_folder` writes (digests and seconds at their
    typical lengths, no image skipped)."""
    enc, sh = config["encoder"], config["shards"]
    norm = None
    if enc.get("norm_stats"):
        norm = {"kind": "per-position, variance only", "eps": 1e-05, "mean": False, "file": str(enc["norm_stats"]),
                "sha256": _HEX16}
    settings = {
        **geo.metadata,
        "preprocessing": {"crop": "adm_center_crop_arr", "image_size": geo.image_size, "stored_flips": bool(sh["flip"]),
                          "min_side": int(sh["min_side"])},
        "normalization": norm, "dtype": sh["dtype"], "shard": shard, "num_shards": sh["num_shards"],
        "classes": data.classes, "images": {"root": data.root, "count": images, "digest": _HEX16},
    }
    rows = images * (2 if sh["flip"] else 1)
    return {**settings, "settings_digest": _HEX16, "rows": rows,
            "bad_images": {"policy": sh["on_bad_image"], "count": 0, "paths": []}, "seconds": _SECONDS}


def _write(sink, calls, first: int, config: dict, geo: Geometry, data: Dataset, meta: dict) -> None:
    """Replay ``calls`` (image counts per batch) of images ``first, first + 1, ...`` through the real writer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmfm.data import shards
    from mmfm.data.encode import _schema

    sh = config["shards"]
    dtype, flip, rgr = np.dtype(sh["dtype"]), bool(sh["flip"]), int(sh["row_group_rows"])
    reps = 2 if flip else 1
    width = geo.num_tokens * geo.token_dim
    schema = _schema(geo.cls_dim, width, sh["dtype"])
    most = max(b for call in calls for b in call) * reps
    tokens = np.zeros((most, width), dtype)
    cls = np.zeros(most * geo.cls_dim, np.float32)
    writer = pq.ParquetWriter(sink, schema, **shards.WRITE_OPTIONS)
    i = first
    try:
        for call in calls:
            pending = []
            for b in call:
                sel = [(i + j, *data.item(i + j)) for j in range(b)]
                i += b
                n = b * reps
                pending.append(pa.RecordBatch.from_arrays([
                    pa.array(np.repeat([s[0] for s in sel], reps), pa.int64()),
                    pa.array(np.repeat([s[1] for s in sel], reps), pa.int32()),
                    pa.array([s[2] for s in sel for _ in range(reps)], pa.string()),
                    pa.array(np.tile([False, True], b) if flip else np.zeros(b, bool)),
                    pa.FixedSizeListArray.from_arrays(pa.array(cls[:n * geo.cls_dim]), geo.cls_dim),
                    shards.tokens_array(tokens[:n]),
                ], schema=schema))
            writer.write_table(pa.Table.from_batches(pending, schema), row_group_size=rgr)
        writer.add_key_value_metadata({shards.META_KEY.decode(): json.dumps(meta)})
    finally:
        writer.close()


def _replay(calls, first: int, config, geo, data, meta) -> int:
    sink = _Counter()
    _write(sink, calls, first, config, geo, data, meta)
    return sink.n


def shard_bytes(config: dict, geo: Geometry, data: Dataset, shard: int) -> tuple[int, str]:
    """``(bytes, how)`` of shard ``shard`` (module doc: measured whole, or from its first two write calls
    and its last)."""
    from mmfm.data.images import shard_range

    sh = config["shards"]
    rng = shard_range(data.count, shard, sh["num_shards"])
    images = len(rng)
    if images == 0:
        return 0, "exact"
    meta = shard_meta(config, geo, data, shard, images)
    calls = write_calls(images, int(sh["batch_size"]), bool(sh["flip"]), int(sh["row_group_rows"]))
    row = geo.num_tokens * geo.token_dim * np.dtype(sh["dtype"]).itemsize
    guess = images * (2 if sh["flip"] else 1) * row
    if guess <= MEASURE_LIMIT or len(calls) <= 3:
        return _replay(calls, rng.start, config, geo, data, meta), "measured"
    one = _replay([calls[0]], rng.start, config, geo, data, meta)
    two = _replay([calls[0], calls[1]], rng.start, config, geo, data, meta)
    tail = _replay([calls[0], calls[-1]], rng.start, config, geo, data, meta) - one  # what the last call adds
    return one + (len(calls) - 2) * (two - one) + tail, "extrapolated"


def encode_files(config: dict, geo: Geometry, data: Dataset) -> list[File]:
    """One shard per encode job; shards of the same image count share one measurement."""
    from mmfm.data.images import shard_range

    n, flip = config["shards"]["num_shards"], config["shards"]["flip"]
    row = geo.num_tokens * geo.token_dim * np.dtype(config["shards"]["dtype"]).itemsize
    # small shards: every one measured with its own paths (exact to the metadata's digits)
    small = len(shard_range(data.count, 0, n)) * (2 if flip else 1) * row <= MEASURE_LIMIT
    by_count: dict[int, tuple[int, str]] = {}
    sizes = []
    for s in range(n):
        count = len(shard_range(data.count, s, n))
        if small:
            sizes.append(shard_bytes(config, geo, data, s))
        else:
            if count not in by_count:
                by_count[count] = shard_bytes(config, geo, data, s)
            sizes.append(by_count[count])
    out: dict[int, File] = {}
    for nbytes, how in sizes:
        f = out.setdefault(nbytes, File("results/shards/shard-XXXX.parquet", nbytes, 0, how))
        f.count += 1
    return list(out.values())


# ------------------------------------------------------------------------------------------------ GMM


def rows_per_image(config: dict) -> int:
    return 2 if config["shards"]["flip"] else 1


def counted_rows(config: dict, images: int, which: str) -> int:
    """Rows a stage reads of ``images`` images: ``all`` shard rows or the ``originals``."""
    return images * (rows_per_image(config) if which == "all" else 1)


def cls_gmm_files(config: dict, geo: Geometry, data: Dataset, plot=None) -> list[File]:
    """``cls.safetensors`` (exact), ``cls.json`` (bound: every iteration of ``max_iter``), ``cls_weights.png``
    (``plot(k)`` its bytes; default :func:`weights_plot_bytes`)."""
    g = config["gmm"]
    k, dc = int(g["k"]), geo.cls_dim
    meta = {"kind": "cls-gmm", "k": k, "dim": dc, "covariance": "diag"}
    specs = {"weights": ((k,), np.float64), "means": ((k, dc), np.float64), "variances": ((k, dc), np.float64)}
    shard_list = [f"results/shards/shard-{i:04d}.parquet" for i in range(config["shards"]["num_shards"])]
    rows = counted_rows(config, data.count, g["rows"])
    sidecar = {**meta,
               "settings": {"k": k, "init": g["init"], "max_iter": g["max_iter"], "tol": g["tol"],
                            "reg_covar": g["reg_covar"], "seed": g["seed"], "device": "cuda",
                            "dtype": g["precision"], "init_sample": g["init_sample"], "kmeans_iter": g["kmeans_iter"],
                            "column": "cls", "rows": g["rows"], "stream": g["stream"]},
               "input": str(shard_list),
               "data": {"rows": rows, "dim": dc, "fingerprint": "0" * 64, "mean_of_feature_variances": _FLOAT},
               "fit": {"n_iter": g["max_iter"], "converged": False, "loglik": [-_SECONDS] * int(g["max_iter"]),
                       "final_loglik": -_SECONDS, "reseeded": [], "reseeded_total": 0, "collapsed": [],
                       "backend": "cupy", "dtype": g["precision"], "block_rows": 65536, "seconds": _SECONDS,
                       "seconds_per_iter": _SECONDS},
               "seconds": {"check": _SECONDS, "init": _SECONDS, "em": _SECONDS, "score": _SECONDS},
               "weights_plot": "cls_weights.png", "host": "node0001"}
    out = [File("results/gmm/cls.safetensors", tensor_file_bytes(specs, meta), 1, "exact"),
           File("results/gmm/cls.json", json_bytes(sidecar), 1, "bound")]
    out.append(File("results/gmm/cls_weights.png", (plot or weights_plot_bytes)(k), 1, "measured"))
    return out


def weights_plot_bytes(k: int, seed: int = 0) -> int:
    """Bytes of :func:`mmfm.gmm.files.plot_weights` for ``k`` stand-in weights (Dirichlet(1), seeded)."""
    from mmfm.gmm.files import plot_weights

    w = np.random.default_rng(seed).dirichlet(np.ones(k))
    with tempfile.TemporaryDirectory(prefix="mmfm-plan-") as tmp:
        p = plot_weights(w, Path(tmp) / "w.png", title="CLS GMM cls")
        return p.stat().st_size


def spatial_layout(geo: Geometry) -> dict:
    return {"encoder": geo.metadata.get("encoder", geo.name), "revision": geo.metadata.get("revision", "1"),
            "grid": list(geo.grid), "token_dim": geo.token_dim}


def group_rows(config: dict, data: Dataset, group: range) -> tuple[int, int]:
    """``(rows counted, shard rows skipped)`` of a spatial_stats group."""
    from mmfm.data.images import shard_range

    n = config["shards"]["num_shards"]
    images = sum(len(shard_range(data.count, s, n)) for s in group)
    shard_rows = images * rows_per_image(config)
    counted = counted_rows(config, images, config["spatial"]["rows_from"])
    return counted, shard_rows - counted


def partial_files(config: dict, geo: Geometry, data: Dataset) -> list[File]:
    """One partial per spatial_stats group: :func:`mmfm.gmm.spatial.partial_bytes` at ``M = min(K, rows)``
    modes touched (a bound; every mode once a group holds many more rows than K) with its real metadata."""
    from mmfm.gmm.spatial import PARTIAL_KIND, partial_bytes

    sp, k = config["spatial"], int(config["gmm"]["k"])
    out: dict[int, File] = {}
    for group in mc.spatial_groups(config):
        counted, skipped = group_rows(config, data, group)
        m = min(k, counted)
        meta = {"kind": PARTIAL_KIND, **spatial_layout(geo), "k": k, "flip": sp["flip"], "rows_from": sp["rows_from"],
                "covariance": sp["covariance"], "cls_gmm": _HEX32,
                "shards": [f"shard-{i:04d}.parquet" for i in group], "rows": counted, "skipped_rows": skipped,
                "modes_touched": m}
        nbytes = partial_bytes(m, geo.num_tokens, geo.token_dim, sp["covariance"], k=k, meta=meta)
        f = out.setdefault(nbytes, File("results/gmm/partials/group-XXXX.safetensors", nbytes, 0,
                                        "exact" if m == k else "bound"))
        f.count += 1
    return list(out.values())


def spatial_gmm_files(config: dict, geo: Geometry, data: Dataset) -> list[File]:
    """``spatial.safetensors`` and ``spatial.json`` as :func:`mmfm.gmm.spatial.spatial_reduce` writes them."""
    from mmfm.gmm.files import SPATIAL_KIND

    sp, k = config["spatial"], int(config["gmm"]["k"])
    n, d = geo.num_tokens, geo.token_dim
    groups = mc.spatial_groups(config)
    rows = sum(group_rows(config, data, g)[0] for g in groups)
    skipped = sum(group_rows(config, data, g)[1] for g in groups)
    var_shape = (k, n, d) if sp["covariance"] == "diag" else (k,)
    specs = {"weights": ((k,), np.float64), "means": ((k, n, d), np.float32), "variances": (var_shape, np.float32),
             "counts": ((k,), np.int64)}
    sidecar = {"kind": SPATIAL_KIND, "k": k, "grid": list(geo.grid), "token_dim": d, "covariance": sp["covariance"],
               "flip": sp["flip"], "rows_from": sp["rows_from"], "encoder": spatial_layout(geo)["encoder"],
               "revision": spatial_layout(geo)["revision"], "cls_gmm": _HEX32, "weights_from": sp["weights"],
               "rows": rows, "skipped_rows": skipped, "samples": rows * (2 if sp["flip"] else 1), "empty_modes": 0,
               "min_variance": sp["min_variance"], "partials": [f"group-{i:04d}.safetensors" for i in range(len(groups))],
               "shards": [f"shard-{i:04d}.parquet" for i in range(config["shards"]["num_shards"])]}
    tensors = tensor_file_bytes(specs, sidecar)
    return [File("results/gmm/spatial.safetensors", tensors, 1, "exact"),
            File("results/gmm/spatial.json", json_bytes({**sidecar, "floored_variances": 0}), 1, "exact")]


# ------------------------------------------------------------------------------------------------ training


def _num_labels(settings: dict, k: int) -> int:
    cond = settings.get("conditioning", "none")
    return {"none": 0, "class": int(settings.get("num_classes", 0))}.get(cond, k if cond == "mode" else 0)


def training_state_specs(settings: dict, geo: Geometry, k: int, world: int):
    """The tensors of one checkpoint, as :func:`mmfm.train.checkpoint.save_checkpoint` writes them, built on the
    ``meta`` device: ``(model specs, ema specs, state specs, state.json payload)``."""
    import torch

    from mmfm.train import checkpoint as ck
    from mmfm.train.config import TrainConfig
    from mmfm.train.ema import EMA
    from mmfm.train.loop import build_model

    cfg = TrainConfig.from_dict(mc.with_gmm_files(settings, "results/gmm/spatial.safetensors",
                                                  "results/gmm/cls.safetensors"))
    labels = _num_labels(cfg.to_dict(), k)
    with torch.device("meta"):
        model = build_model(cfg, geo.num_tokens, geo.token_dim, labels)
        ema = EMA(model, cfg.ema_schedule())
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)
    for p in model.parameters():  # AdamW's state after a step (frozen parameters have none)
        if p.requires_grad:
            optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.empty_like(p),
                                  "exp_avg_sq": torch.empty_like(p)}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.lr_schedule().factor)

    def specs(tensors):  # as _write_tensors declares them (bfloat16 stored as int16)
        return {n: (tuple(t.shape), torch.empty(0, dtype=ck._stored_dtype(t.dtype)[0]).numpy().dtype)
                for n, t in tensors.items()}

    tensors: dict = {}
    step = cfg.steps
    weighting = None
    if cfg.adaptive_weighting:
        weighting = {"updates": step, "sums": [_FLOAT] * k, "counts": [float(step)] * k, "ema": [_FLOAT] * k}
    rng = ck.get_rng_state({"train": torch.Generator()})
    state = {"format": ck.FORMAT, "version": ck.VERSION, "step": step,
             "optimizer": ck._encode(optimizer.state_dict(), "optimizer", tensors),
             "scheduler": ck._encode(scheduler.state_dict(), "scheduler", tensors),
             "rng": [rng] * world,
             "extra": {"stream": {"epoch": 100, "batches": 1000, "seed": cfg.seed, "world_size": world,
                                  "batch_size": 128, "shuffle": cfg.shuffle, "buffer_rows": cfg.buffer_rows,
                                  "drop_last": True, "shards": _HEX16},
                       **({"adaptive_weighting": weighting} if weighting else {})},
             "config": cfg.to_dict(),
             "files": {ck.MODEL: 10**10, ck.EMA_FILE: 10**10, ck.TENSORS: 10**10}}
    return specs(model.state_dict()), specs(ema.state_dict()), specs(tensors), state, cfg, labels


def train_files(config: dict, run: str, geo: Geometry, world: int, data: Dataset) -> list[File]:
    """A run folder at the end of training: ``keep_last`` checkpoints (one more while a save is in progress),
    ``ema.safetensors`` + ``ema.json``, ``metrics.csv``, ``fd.csv``, TensorBoard events, ``train.yaml``."""
    import yaml

    from mmfm.train.loop import export_meta

    k = int(config["gmm"]["k"])
    settings = mc.train_settings(config, run)
    model_specs, ema_specs, state_specs, state, cfg, labels = training_state_specs(settings, geo, k, world)
    step = cfg.steps
    parts = {"model.safetensors": (tensor_file_bytes(model_specs, {"kind": "model", "step": step}), "exact"),
             "ema.safetensors": (tensor_file_bytes(ema_specs, {"kind": "ema", "step": step}), "exact"),
             "state.safetensors": (tensor_file_bytes(state_specs, {"kind": "state", "step": step}), "exact"),
             "state.json": (len((json.dumps(state, indent=1, allow_nan=False) + "\n").encode()), "estimate")}
    enc = config["encoder"]
    norm = None if not enc.get("norm_stats") else {"kind": "per-position, variance only", "eps": 1e-05,
                                                   "mean": False, "file": str(enc["norm_stats"]), "sha256": _HEX16}
    source = {"kind": cfg.source}  # the export's record of its source (mmfm.models.velocity.source_record)
    if cfg.source == "gmm":
        source.update(file=cfg.gmm, shape=[k, geo.num_tokens, geo.token_dim], sha256=_HEX16,
                      bytes=spatial_gmm_files(config, geo, data)[0].nbytes)
    meta = export_meta(cfg, geo.num_tokens, geo.token_dim, labels, step,
                       shards_meta={**geo.metadata, "normalization": norm}, source=source)
    cfg = dataclasses.replace(cfg, data_fingerprint=_HEX16)  # mmfm train records the data's (16 hex digits)
    folder = f"results/runs/{run}"
    out = [File(f"{folder}/step-XXXXXXX/{name}", nbytes, cfg.keep_last, how) for name, (nbytes, how) in parts.items()]
    out += [File(f"{folder}/step-XXXXXXX/ (one more checkpoint while it is saved, before the oldest is deleted)",
                 sum(b for b, _ in parts.values()), 1, "exact", transient=True),
            File(f"{folder}/ema.safetensors", tensor_file_bytes(ema_specs, meta), 1, "exact"),
            File(f"{folder}/ema.json", json_bytes(meta), 1, "exact"),
            File(f"{folder}/train.yaml", len(yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode()), 1, "exact")]
    logged = -(-step // cfg.log_every)
    row = f"{step},{_FLOAT:.6g},{cfg.lr * _FLOAT:.6g},{_FLOAT:.6g},{1234.5678:.4g},{_FLOAT:.4g}\r\n"
    out.append(File(f"{folder}/metrics.csv", len("step,loss,lr,grad_norm,samples_per_s,mfu\r\n") + logged * len(row),
                    1, "estimate"))
    if cfg.tensorboard:
        out.append(File(f"{folder}/events.out.tfevents.*", logged * 5 * tensorboard_event_bytes(), 1, "estimate"))
    if cfg.eval_every:
        evals = step // cfg.eval_every + (1 if step % cfg.eval_every else 0)
        out.append(File(f"{folder}/fd.csv", len("step,nfe,fd\r\n") + evals * len(f"{step},{cfg.eval_steps},"
                                                                                  f"{_FLOAT * 100:.6g}\r\n"),
                        1, "estimate"))
    return out


_EVENT_BYTES: list[int] = []


def tensorboard_event_bytes() -> int:
    """Bytes of one scalar event as TensorBoard's writer stores it (measured once with the real writer when
    tensorboard is installed; else 60, its typical size)."""
    if not _EVENT_BYTES:
        try:
            from torch.utils.tensorboard import SummaryWriter

            with tempfile.TemporaryDirectory(prefix="mmfm-plan-") as tmp:
                w = SummaryWriter(tmp)
                w.flush()
                start = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
                for i in range(100):
                    w.add_scalar("train/grad_norm", _FLOAT, 100000 + i)
                w.close()
                end = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
            _EVENT_BYTES.append(max(1, (end - start) // 100))
        except Exception:  # noqa: BLE001 - no tensorboard: the typical size
            _EVENT_BYTES.append(60)
    return _EVENT_BYTES[0]


# ------------------------------------------------------------------------------------------------ samples


def npy_bytes(shape: tuple[int, ...], dtype) -> int:
    """Bytes of ``np.save`` of an array: its ``.npy`` header and data."""
    dtype = np.dtype(dtype)
    buf = _io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(buf, header)  # np.save's version for headers under 64 kB
    return buf.tell() + math.prod(shape) * dtype.itemsize


def npz_bytes(arrays: dict[str, tuple[tuple[int, ...], object]]) -> int:
    """Bytes of ``np.savez`` (uncompressed, zip64 records) of arrays ``name -> (shape, dtype)``: the zip
    records measured on one-element arrays of the same names, plus each member's ``.npy`` bytes."""
    small = {name: np.zeros((1,) * len(shape), dtype) for name, (shape, dtype) in arrays.items()}
    buf = _io.BytesIO()
    np.savez(buf, **small)
    records = buf.tell() - sum(npy_bytes(a.shape, a.dtype) for a in small.values())
    return records + sum(npy_bytes(shape, dtype) for shape, dtype in arrays.values())


#: Velocity evaluations per step of each sampler (dopri5: an adaptive solver, counted at 6 a step).
EVALUATIONS_PER_STEP = {"euler": 1, "heun": 2, "midpoint": 2, "dopri5": 6}


def sample_files(config: dict, run: str, nfe: int, geo: Geometry, world: int,
                 sampler: str | None = None) -> list[File]:
    """The set of ``sampler`` (default: the run's headline sampler) at ``nfe``: ``nfe-N.npz`` (``arr_0`` uint8
    ``(n, H, W, 3)``, ``arr_1`` labels of a class-conditional run, ``meta`` the settings as JSON) and the PNG grid
    of the first 64 (bound: its raw pixels), under ``samples/<run>/`` (another sampler than the headline one:
    ``samples/<run>/<sampler>/``); with several ranks, the part files rank 0 merges."""
    s = mc.sample_settings(config, run)
    sampler = mc.samplers(config, run)[0] if sampler is None else sampler
    n = int(s["n"])
    side = image_side(config, geo)
    arrays = {"arr_0": ((n, side, side, 3), np.uint8)}
    if config["runs"][run]["conditioning"] == "class":
        arrays["arr_1"] = ((n,), np.int64)
    # the settings sample_run records (a JSON string, numpy's '<U' array of 4 bytes a character)
    guide = s.get("guide")
    guide = None if guide is None or float(s.get("guidance_scale", 1.0)) == 1.0 else \
        (f"results/runs/{guide}/ema.safetensors" if guide in config["runs"] else guide)
    evals = EVALUATIONS_PER_STEP.get(sampler, 1)  # (the GMFlow / DFM samplers: one network call a step)
    settings = {"model": f"results/runs/{run}/ema.safetensors", "guide": guide,
                "source": "results/gmm/spatial.safetensors" if mc.uses_gmm(config, run) else "gaussian",
                "n": n, "seed": s["seed"], "steps": nfe, "method": sampler, "shift": s["shift"], "end": s["end"],
                "guidance_scale": s["guidance_scale"], "cfg_scale": s["cfg_scale"],
                "precision": s.get("precision", "fp32"), "nfe_per_sample": float(evals * nfe),
                "conditioning": config["runs"][run]["conditioning"]}
    arrays["meta"] = ((), f"<U{len(json.dumps(settings, sort_keys=True))}")
    folder = f"results/samples/{run}/{mc.sampler_dir(config, run, sampler)}".rstrip("/")
    out = [File(f"{folder}/nfe-{nfe}.npz", npz_bytes(arrays), 1, "exact"),
           File(f"{folder}/nfe-{nfe}.png", grid_bytes(min(64, n), side), 1, "bound")]
    if world > 1:
        share = -(-n // world)
        out.append(File(f"{folder}/nfe-{nfe}.npz.partR-of-{world}.npz",
                        npz_bytes({"index": ((share,), np.int64), "images": ((share, side, side, 3), np.uint8)}),
                        world, "exact", transient=True))
    return out


def grid_bytes(count: int, side: int, min_cell: int = 64) -> int:
    """The raw pixels of :func:`mmfm.sample.save_grid`'s PNG of ``count`` images of ``side`` px (a bound of the
    file): images below ``min_cell`` px are enlarged by ``ceil(min_cell / side)``, gutters of 2 px with them."""
    f = math.ceil(min_cell / side) if side < min_cell else 1
    cols = math.ceil(math.sqrt(count))
    rows = -(-count // cols)
    return (rows * (side + 2) * f + 2 * f) * (cols * (side + 2) * f + 2 * f) * 3


def image_side(config: dict, geo: Geometry) -> int:
    """Side of a decoded sample: the pixels tokenizer's crop, or the RAE decoder's ``grid x patch``."""
    if geo.name == "pixels":
        return geo.image_size
    from mmfm.plan.geometry import DECODER

    return geo.grid[0] * DECODER["patch_size"]


def evaluate_files(config: dict, run: str) -> list[File]:
    """One NFE curve per sampler of the run (``eval/<run>/nfe_curve.csv`` for the headline one,
    ``eval/<run>/<sampler>/nfe_curve.csv`` for the others) and ``final.json``."""
    ev = config["eval"]
    curve = len("step,nfe,fd\r\n") + len(ev["nfe"]) * len(f"100000,49,{_FLOAT * 10:.6g}\r\n")
    final = json_bytes({"metric": ev["metric"], ev["metric"]: _FLOAT * 10, "nfe": mc.final_nfe(config),
                        "n": int(mc.sample_settings(config, run)["n"]), "step": 100000})
    return [*(File(path, curve, 1, "estimate") for path in mc.nfe_curve_files(config, run, results="results").values()),
            File(f"results/eval/{run}/final.json", final, 1, "estimate")]


#: Allowances for the report and the toy (figures and tables of a few hundred kB; not sized from data).
REPORT_ALLOWANCE = {"summary.json": 50_000, "index.html": 200_000, "loss.png": 150_000, "fd_nfe.png": 100_000,
                    "fd_training.png": 150_000, "gmm_loglik.png": 100_000, "gmm_weights.png": 150_000}
TOY_ALLOWANCE = {"r10.json": 10_000, "r10.csv": 2_000, "r10.png": 150_000}


def report_files(config: dict, geo: Geometry) -> list[File]:
    """summary.json, the results page and its figures (allowances); the decoded data and mode-mean grids (bound:
    raw pixels, :func:`grid_bytes`), and ``report/page.html``, the page with every image inlined (base64: 4/3 of
    the figures, the grids and every run's sample grid)."""
    names = ["summary.json", "index.html", "loss.png", "fd_nfe.png"]
    if any(mc.train_settings(config, r).get("eval_every") for r in mc.evaluated_runs(config)):
        names.append("fd_training.png")
    grids = ["data.png"]
    if mc.any_gmm(config):
        names += ["gmm_loglik.png", "gmm_weights.png"]
        grids.append("mode_means.png")
    side = image_side(config, geo)
    out = [File(f"results/{'report/' if n not in ('summary.json', 'index.html') else ''}{n}", REPORT_ALLOWANCE[n], 1,
                "estimate") for n in names]
    out += [File(f"results/report/{g}", grid_bytes(64, side), 1, "bound") for g in grids]
    samples = sum(grid_bytes(min(64, int(mc.sample_settings(config, r)["n"])), side)
                  for r in mc.evaluated_runs(config) for _ in mc.sample_sets(config, r))
    inlined = sum(f.total for f in out if f.path != "results/summary.json") + samples
    out.append(File("results/report/page.html", inlined * 4 // 3, 1, "bound"))
    return out


def toy_files() -> list[File]:
    return [File(f"results/toy_r10/{n}", b, 1, "estimate") for n, b in TOY_ALLOWANCE.items()]
