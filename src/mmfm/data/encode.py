"""``mmfm encode`` and ``mmfm norm-stats``: an image folder through a tokenizer, once.

Images are read in the folder's deterministic order (:func:`~mmfm.data.images.list_images`), the
shard's contiguous part of it (:func:`~mmfm.data.images.shard_range`) is decoded and ADM-cropped by
DataLoader workers, batched, encoded (in the tokenizer's precision), optionally normalized
(:mod:`mmfm.encoders.normalization`), and streamed into a Parquet shard row group by row group
(docs/design.md §4), under a temporary name renamed into place when complete.

**Bad images** (unreadable, truncated, zero-byte, not an image, a file without a supported extension
(:data:`mmfm.data.images.EXTENSIONS`), short side below ``min_side``, or a latent that is not finite:
NaN or Inf in its CLS descriptor or token grid, or in those of its mirror with ``flip``) follow
``on_bad_image``: ``"skip"`` logs each one with its path and reason on stderr and records them in the
shard metadata (``bad_images``: ``count``, every ``paths``, and, when there are any, the first
:data:`BAD_EXAMPLES` as ``examples``, ``{"path", "reason"}``); ``"fail"`` stops with the path and
reason, and nothing is written. A non-finite latent never reaches a shard.

**Flips.** With ``flip`` each image also gives a row for its horizontal mirror (``flip = true``),
right after the unflipped row, so that later stages can use docs/method.md §3.3's flip without decoding
images again.

**Precision.** The tokenizer runs in its own precision (``encoder.precision``: fp32, or bf16 autocast
for a transformers encoder, recorded in the shard metadata as ``precision``); its float32 outputs are
normalized in float32 and only then rounded to the storage ``dtype``: fp32 encoding stored as float16
is the release's recipe (its training encodes in fp32, docs/method.md §3.4; float16 halves the shards).

**Reruns.** A shard whose file exists and records the same settings (encoder, revision, precision,
crop, normalization, dtype, the shard's images) is not redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from mmfm.data import shards
from mmfm.data.images import ImageItem, center_crop_arr, list_images, shard_range, supported, unsupported_reason
from mmfm.encoders.normalization import LatentNorm, Welford, save_norm_stats
from mmfm.io import atomic_path
from mmfm.progress import progress as progress_bar

BAD_IMAGE_POLICIES = ("skip", "fail")
STORAGE_DTYPES = ("float16", "float32")
#: Bad images recorded with their reason in a shard's metadata (all are in ``paths``).
BAD_EXAMPLES = 20


class CroppedImages(torch.utils.data.Dataset):
    """``items`` as ``(position, (S, S, 3) uint8 tensor or None, reason)``: bad images do not raise,
    so a worker never dies on one and the policy is applied in one place."""

    def __init__(self, items: list[ImageItem], size: int, min_side: int = 0):
        self.items, self.size, self.min_side = items, size, min_side

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path = self.items[i].path
        if not supported(path):
            return i, None, unsupported_reason(path)
        try:
            with Image.open(path) as img:
                img.load()  # decodes fully: a truncated file raises here
                if min(img.size) < self.min_side:
                    raise ValueError(f"{img.size[0]}x{img.size[1]} is smaller than min_side {self.min_side}")
                arr = center_crop_arr(img, self.size)
        except Exception as err:  # noqa: BLE001 - every unreadable image is a bad image
            return i, None, f"{type(err).__name__}: {err}"
        return i, torch.from_numpy(np.array(arr)), ""  # a writable copy


def _collate(batch):
    good = [(i, a) for i, a, _ in batch if a is not None]
    bad = [(i, why) for i, a, why in batch if a is None]
    index = torch.tensor([i for i, _ in good], dtype=torch.long)
    images = torch.stack([a for _, a in good]) if good else None
    return index, images, bad


def image_batches(items: list[ImageItem], size: int, batch_size: int, num_workers: int, min_side: int = 0,
                  pin_memory: bool = False):
    """``(positions, images (B, S, S, 3) uint8 or None, [(position, reason)])`` batches, in order."""
    return torch.utils.data.DataLoader(
        CroppedImages(items, size, min_side), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=_collate, pin_memory=pin_memory, persistent_workers=False,
        prefetch_factor=4 if num_workers else None)


def _to_model(images: torch.Tensor, device: str, flip: bool) -> torch.Tensor:
    """uint8 ``(B, S, S, 3)`` -> float ``(B', 3, S, S)`` in [0, 1]; with ``flip`` each image is
    followed by its mirror."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    if flip:
        x = torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1)
    return x


class _BadImages:
    def __init__(self, policy: str, items: list[ImageItem]):
        if policy not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image: expected one of {BAD_IMAGE_POLICIES}, got {policy!r}")
        self.policy, self.items, self.paths, self.examples = policy, items, [], []

    def __call__(self, bad):
        for i, why in bad:
            path = self.items[i].path
            if self.policy == "fail":
                raise ValueError(f"{path}: bad image ({why}); on_bad_image is 'fail' (use 'skip' to leave it out)")
            print(f"mmfm encode: skipped {path}: {why}", file=sys.stderr, flush=True)
            self.paths.append(str(path))
            if len(self.examples) < BAD_EXAMPLES:
                self.examples.append({"path": str(path), "reason": why})

    def metadata(self) -> dict:
        """``{"policy", "count", "paths"}``, and ``examples`` when there are bad images (so a clean shard's
        footer is the one :mod:`mmfm.plan.artifacts` sizes)."""
        return {"policy": self.policy, "count": len(self.paths), "paths": self.paths,
                **({"examples": self.examples} if self.examples else {})}


def _non_finite(cls: torch.Tensor, tokens: torch.Tensor, flip: bool) -> list[tuple[int, str]]:
    """``[(image, reason)]`` for the images of a batch whose latent holds NaN or Inf.

    ``cls (B', Dc)`` and ``tokens (B', N, D)`` as the tokenizer (and normalization) gave them, ``B' = 2 B``
    with ``flip`` (each image followed by its mirror); ``image`` indexes the ``B`` images."""
    reps = 2 if flip else 1
    bad_cls = (~torch.isfinite(cls.reshape(len(cls), -1))).sum(1).reshape(-1, reps)
    bad_tok = (~torch.isfinite(tokens.reshape(len(tokens), -1))).sum(1).reshape(-1, reps)
    out = []
    for i in torch.nonzero((bad_cls + bad_tok).sum(1)).flatten().tolist():
        what = []
        for r, name in enumerate(("", " of its mirror")[:reps]):
            for col, counts, width in (("cls", bad_cls, cls[0].numel()), ("tokens", bad_tok, tokens[0].numel())):
                if counts[i, r]:
                    what.append(f"{col}{name}: {int(counts[i, r])} of {width} values NaN/Inf")
        out.append((i, f"non-finite latent ({'; '.join(what)})"))
    return out


def _drop_images(index: torch.Tensor, rows: list[torch.Tensor], bad: list[tuple[int, str]], reps: int):
    """``index (B,)`` and the per-row tensors ``(B * reps, ...)`` without the images ``bad`` names."""
    keep = torch.ones(len(index), dtype=torch.bool)
    keep[[i for i, _ in bad]] = False
    per_row = keep.repeat_interleave(reps)
    return index[keep], [r[per_row.to(r.device)] for r in rows]


def _schema(cls_dim: int, tokens_width: int, dtype) -> pa.Schema:
    return pa.schema([("image_id", pa.int64()), ("label", pa.int32()), ("path", pa.string()),
                      ("flip", pa.bool_()), ("cls", pa.list_(pa.float32(), cls_dim)),
                      shards.tokens_field(tokens_width, dtype)])


def _items_digest(items: list[ImageItem], root: Path) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.index}\t{it.label}\t{it.path.relative_to(root)}\n".encode())
    return h.hexdigest()[:16]


def encode_folder(
    images: str | os.PathLike,
    out: str | os.PathLike,
    tokenizer,
    *,
    shard: int = 0,
    num_shards: int = 1,
    flip: bool = False,
    norm: LatentNorm | None = None,
    dtype: str = "float16",
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "cpu",
    on_bad_image: str = "skip",
    min_side: int = 0,
    row_group_rows: int = 256,
    progress: bool = True,
) -> dict:
    """Encode shard ``shard`` of ``num_shards`` of the class folder ``images`` into the Parquet file
    ``out``; returns the shard's metadata (``{"skipped": True, ...}`` if it was already complete).

    ``tokenizer`` follows the protocol of :mod:`mmfm.encoders` (``image_size``, ``grid``,
    ``token_dim``, ``cls_dim``, ``encode``, ``metadata``). Tokens are stored in ``dtype``
    (``float16`` or ``float32``), the descriptor in float32.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype: expected one of {STORAGE_DTYPES}, got {dtype!r}")
    for key, value in (("batch_size", batch_size), ("row_group_rows", row_group_rows)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{key}: expected a positive integer, got {value!r}")
    root, out = Path(images), Path(out)
    all_items, classes = list_images(root)
    items = [all_items[i] for i in shard_range(len(all_items), shard, num_shards)]
    n_tok, d_tok = tokenizer.num_tokens, tokenizer.token_dim
    if norm is not None and norm.shape != (n_tok, d_tok):
        raise ValueError(f"norm: statistics of shape {norm.shape} do not fit the tokenizer's "
                         f"({n_tok}, {d_tok}) token grid ({norm.source})")
    settings = {
        **tokenizer.metadata(),
        "preprocessing": {"crop": "adm_center_crop_arr", "image_size": tokenizer.image_size,
                          "stored_flips": bool(flip), "min_side": int(min_side)},
        "normalization": norm.metadata() if norm is not None else None,
        "dtype": dtype, "shard": shard, "num_shards": num_shards, "classes": len(classes),
        "images": {"root": str(root), "count": len(items), "digest": _items_digest(items, root)},
    }
    settings_digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    if out.is_file():
        try:
            old = shards.read_metadata(out)
        except ValueError:
            old = {}
        if old.get("settings_digest") == settings_digest:
            return {**old, "skipped": True}

    schema = _schema(tokenizer.cls_dim, n_tok * d_tok, dtype)
    bad = _BadImages(on_bad_image, items)
    pending: list[pa.RecordBatch] = []
    rows = 0
    t0 = time.perf_counter()
    gpu = torch.device(device).type == "cuda"
    with atomic_path(out) as tmp:
        writer = pq.ParquetWriter(tmp, schema, **shards.WRITE_OPTIONS)  # with page checksums
        try:
            bar = progress_bar(total=len(items), desc=f"encode {out.name}", unit="img", disable=not progress)
            for index, imgs, bad_here in image_batches(items, tokenizer.image_size, batch_size, num_workers,
                                                       min_side, pin_memory=gpu):
                bad(bad_here)
                bar.update(len(index) + len(bad_here))
                if imgs is None:
                    continue
                x = _to_model(imgs, device, flip)
                with torch.no_grad():
                    cls, tokens = tokenizer.encode(x)
                tokens = tokens.float()
                if norm is not None:
                    tokens = norm.normalize(tokens)
                cls, tokens = cls.to("cpu", torch.float32), tokens.to("cpu", torch.float32)
                reps = 2 if flip else 1
                nonfinite = _non_finite(cls, tokens, flip)
                if nonfinite:  # bad images: skipped (their rows dropped) or the job fails, naming them
                    bad([(int(index[i]), why) for i, why in nonfinite])
                    index, (cls, tokens) = _drop_images(index, [cls, tokens], nonfinite, reps)
                    if not len(index):
                        continue
                tok = tokens.reshape(len(tokens), -1).numpy().astype(dtype)
                if not np.isfinite(tok).all():
                    first = int(np.flatnonzero(~np.isfinite(tok).all(1))[0]) // reps
                    raise ValueError(f"{out}: {items[int(index[first])].path}: token values overflow {dtype}; "
                                     "store float32 (shards.dtype) or normalize the tokens")
                sel = [items[i] for i in index.tolist()]
                pending.append(pa.RecordBatch.from_arrays([
                    pa.array(np.repeat([it.index for it in sel], reps), pa.int64()),
                    pa.array(np.repeat([it.label for it in sel], reps), pa.int32()),
                    pa.array([str(it.path.relative_to(root)) for it in sel for _ in range(reps)], pa.string()),
                    pa.array(np.tile([False, True], len(sel)) if flip else np.zeros(len(sel), bool)),
                    pa.FixedSizeListArray.from_arrays(pa.array(cls.numpy().reshape(-1)), tokenizer.cls_dim),
                    shards.tokens_array(tok),
                ], schema=schema))
                rows += len(tok)
                if sum(len(b) for b in pending) >= row_group_rows:
                    writer.write_table(pa.Table.from_batches(pending, schema), row_group_size=row_group_rows)
                    pending = []
            bar.close()
            if pending:
                writer.write_table(pa.Table.from_batches(pending, schema), row_group_size=row_group_rows)
            meta = {**settings, "settings_digest": settings_digest, "rows": rows,
                    "bad_images": bad.metadata(),
                    "seconds": time.perf_counter() - t0}
            writer.add_key_value_metadata({shards.META_KEY.decode(): json.dumps(meta)})
        finally:
            writer.close()
    return meta


def compute_norm_stats(
    images: str | os.PathLike,
    out: str | os.PathLike,
    tokenizer,
    *,
    num_images: int = 50000,
    seed: int = 0,
    flip: bool = True,
    keep_mean: bool = False,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "cpu",
    on_bad_image: str = "skip",
    progress: bool = True,
) -> LatentNorm:
    """Per-position token statistics over ``num_images`` images drawn without replacement (seeded)
    from the folder, with their mirrors when ``flip`` (RAE's statistics saw flipped images), in
    float64 (:class:`~mmfm.encoders.normalization.Welford`, ``n - 1``). Writes ``var`` (and ``mean``
    with ``keep_mean``; RAE's and MM-FM's default is variance-only) to ``out``. An image whose latent
    is not finite is a bad image (``on_bad_image``), left out of the statistics.
    """
    root = Path(images)
    items, _ = list_images(root)
    if not (isinstance(num_images, int) and num_images >= 2):
        raise ValueError(f"num_images: expected an integer >= 2, got {num_images!r}")
    pick = np.sort(np.random.default_rng(seed).permutation(len(items))[:num_images])
    chosen = [items[i] for i in pick]
    bad = _BadImages(on_bad_image, chosen)
    acc = Welford()
    bar = progress_bar(total=len(chosen), desc="norm-stats", unit="img", disable=not progress)
    for index, imgs, bad_here in image_batches(chosen, tokenizer.image_size, batch_size, num_workers,
                                               pin_memory=torch.device(device).type == "cuda"):
        bad(bad_here)
        bar.update(len(index) + len(bad_here))
        if imgs is None:
            continue
        with torch.no_grad():
            cls, tokens = tokenizer.encode(_to_model(imgs, device, flip))
        tokens = tokens.float()
        nonfinite = _non_finite(cls.float(), tokens, flip)  # on the device: only counts come back
        if nonfinite:
            bad([(int(index[i]), why) for i, why in nonfinite])
            index, (tokens,) = _drop_images(index, [tokens], nonfinite, 2 if flip else 1)
            if not len(index):
                continue
        acc.update(tokens)
    bar.close()
    var = acc.variance(ddof=1).numpy()
    mean = acc.mean.numpy() if keep_mean else None
    meta = {**tokenizer.metadata(), "images": {"root": str(root), "count": len(chosen) - len(bad.paths),
                                                "seed": seed, "flip": flip},
            "grids": acc.n, "ddof": 1, "mean_kept": keep_mean, "skipped_images": bad.paths}
    save_norm_stats(out, var, mean, meta)
    return LatentNorm(var.astype(np.float32), None if mean is None else mean.astype(np.float32), source=str(out))
