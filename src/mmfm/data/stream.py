"""Batches of latent shards for training and the GMM stage: row groups split over ranks, rows shuffled
through a buffer, exact resume.

An epoch of :class:`ShardStream`, seen from one rank:

1. The unit of work is one Parquet row group. All row groups of all shards, in file order, are permuted
   by a generator seeded from ``(seed, epoch)`` (``shuffle=True``), or kept in file order.
2. Their rows, concatenated in that order (``T`` rows in all), are cut into ``world_size`` contiguous
   ranges of ``L`` rows, one per rank. Every rank therefore yields the same number of batches, and batch
   ``k`` has the same size on every rank (DDP ranks never disagree on the number of steps):

   - ``drop_last=False``: ``L = ceil(T / world_size)``. The sequence is padded by wrapping around to its
     own start, so the last ``world_size * L - T < world_size`` rows of the last rank repeat the first
     rows of the epoch, as ``DistributedSampler`` does. Batches are full but the last one, which has
     ``L - (len - 1) * batch_size`` rows on every rank.
   - ``drop_last=True``: ``L = floor(T / (world_size * batch_size)) * batch_size``. Every batch is full;
     the last ``T - world_size * L < world_size * batch_size`` rows of the epoch are dropped (other rows
     each epoch when shuffled).

3. A rank reads the row groups overlapping its range (a row group cut by a range boundary is read by both
   ranks, each keeping its part). With ``shuffle`` its rows pass through a buffer: row groups enter in
   turn, and while the buffer holds ``buffer_rows + batch_size`` rows or more, a batch is drawn from it
   uniformly without replacement; once all have entered, the rest leaves in random order. The draws use a
   generator seeded from ``(seed, epoch, rank)``. Without ``shuffle`` rows come in file order, and a batch
   inside one row group is a view of the decoded Arrow memory (no copy at all).

Every floating column a row group brings (``tokens``, ``cls``) is checked finite as it is read, on the host
(:func:`refuse_non_finite`): a NaN or Inf is an error naming the shard file, the row and its image, before
a batch holding it is yielded.

The schedule depends only on row-group sizes and the seeds, never on the data, so resuming at batch ``k``
rebuilds it, refills the buffer with exactly the rows it held before batch ``k`` and skips the row groups
already spent without decoding them.

Epochs: iterating the stream once yields the rest of the current epoch and the next iteration starts the
next epoch, so ``for epoch in range(E): for batch in stream: ...`` needs nothing else. ``set_epoch`` also
works as with ``DistributedSampler``; a resumed stream keeps its place when told its own epoch::

    stream = ShardStream("results/shards", batch_size=32)   # rank, world_size from torch.distributed
    if ckpt: stream.load_state_dict(ckpt["stream"])        # identical on every rank
    for epoch in range(stream.epoch, epochs):
        stream.set_epoch(epoch)
        for batch in stream:                                 # batch["tokens"]: (32, N, D)
            ...                                              # save stream.state_dict() with the model

Loops that count steps instead use ``stream.forever()``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmfm.data import shards

DEFAULT_COLUMNS = ("cls", "tokens", "label")
SHARED_META = ("encoder", "grid", "token_dim", "cls_dim")  # every shard of a stream agrees on these
# the settings that fix the schedule; a state is only loaded into a stream that has the same
_SETTINGS = ("world_size", "batch_size", "shuffle", "buffer_rows", "drop_last", "shards")
_ORDER, _BUFFER = 0, 1  # seed-sequence tags: row-group order, shuffle buffer


def read_shard(path: str | os.PathLike, columns: Sequence[str] = DEFAULT_COLUMNS) -> dict[str, np.ndarray]:
    """All rows of ``columns`` of one shard: ``tokens (rows, N, D)``, ``cls (rows, Dc)``, others ``(rows,)``.

    The numeric arrays are read-only numpy views of Arrow memory. The only copies are Parquet's decode
    and, when the file holds several row groups, Arrow's concatenation of their chunks into one array per
    column (``bool`` and string columns are converted, as numpy lays them out differently).
    """
    pf = shards.open_file(path)
    meta, _ = _check(path, pf, columns)
    with shards.reading(path):
        table = pf.read(columns=list(columns))
    return {c: _column(table, c, meta, path) for c in columns}


def to_torch(batch: dict[str, np.ndarray]) -> dict:
    """Numeric arrays as tensors sharing their memory (``torch.from_numpy``); strings stay numpy.

    Tensors made from Arrow views must not be written to (torch's warning about this is silenced)."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return {c: a if a.dtype == object else torch.from_numpy(a) for c, a in batch.items()}


_EXPONENT = {np.dtype(np.float16): (np.uint16, 0x7C00), np.dtype(np.float32): (np.uint32, 0x7F800000),
             np.dtype(np.float64): (np.uint64, 0x7FF0000000000000)}


def all_finite(values: np.ndarray, chunk: int = 1 << 24) -> bool:
    """Whether no value is NaN or Inf (true for non-floating arrays). For IEEE floats it tests the exponent
    bits (all ones: NaN or Inf), 3x faster than ``np.isfinite`` on float16, in slices along the first axis
    of about ``chunk`` values (the temporaries stay small next to a 1 GB block of sums)."""
    values = np.asarray(values)
    if values.dtype not in _EXPONENT:
        return not np.issubdtype(values.dtype, np.floating) or bool(np.isfinite(values).all())
    bits, mask = _EXPONENT[values.dtype]
    values = values.reshape(1, -1) if values.ndim == 0 else values
    step = max(1, chunk // max(1, values[0].size))
    return not any(bool(((values[i:i + step].view(bits) & bits(mask)) == mask).any())
                   for i in range(0, len(values), step))


def refuse_non_finite(path, column: str, values: np.ndarray, start: int = 0, *, originals: bool = False) -> None:
    """Raise ``ValueError`` when a row of ``values`` ``(rows, ...)`` of the shard ``path`` holds NaN or Inf.

    ``start`` is the position of ``values[0]`` among the rows read from ``path``: all its rows, or with
    ``originals`` those whose ``flip`` column is false. The message names the file, the row's index in it,
    its image (the ``path`` column, when the shard has one), the column and the count of bad values, and
    the command that encodes the shard again (:func:`mmfm.recover.rebuild_hint`; ``mmfm encode`` refuses
    non-finite latents, so the image is then skipped or named)."""
    if all_finite(values):
        return
    flat = np.asarray(values).reshape(len(values), -1)
    bad = np.flatnonzero(~np.isfinite(flat).all(axis=1))
    row = start + int(bad[0])
    image = ""
    try:
        pf = shards.open_file(path)
        names = pf.schema_arrow.names
        if originals and shards.MIRROR_COLUMN in names:
            flip = pf.read(columns=[shards.MIRROR_COLUMN]).column(0).to_numpy(zero_copy_only=False)
            row = int(np.flatnonzero(~flip)[row])
        if "path" in names:
            image = f" (image {pf.read(columns=['path']).column(0)[row].as_py()})"
    except (ValueError, OSError, IndexError, pa.ArrowException):
        pass  # the message without the image: the row index is still right
    from mmfm.recover import rebuild_hint

    more = f"; {len(bad)} rows of this batch do" if len(bad) > 1 else ""
    raise ValueError(
        f"{path} row {row}{image}: {column} has {int((~np.isfinite(flat[bad[0]])).sum())} non-finite values "
        f"(NaN/Inf){more}. mmfm encode leaves such an image out (or names it, with on_bad_image: fail), so "
        f"encoding the shard again mends it; {rebuild_hint([path])}")


class ShardStream:
    """Batches of ``batch_size`` rows (per rank) of ``columns`` over the shards named by ``spec``.

    ``spec`` is anything :func:`mmfm.data.shards.resolve` takes. A batch is a dict: ``tokens (B, N, D)``,
    ``cls (B, Dc)``, scalar columns ``(B,)``; numpy arrays, or tensors with ``as_torch``. ``rank`` and
    ``world_size`` default to torch.distributed's when it is initialized, else 0 and 1. ``seed`` is a
    non-negative integer. ``buffer_rows`` rows are held for shuffling (memory about
    ``(buffer_rows + batch_size + largest row group)`` rows). See the module docstring for the epoch, the
    split over ranks (padding or dropping) and resume. Iterate one iterator at a time. Floating columns
    are checked finite on the host as row groups are read (:func:`refuse_non_finite`).
    """

    #: Floating columns are checked as they are read (:class:`~mmfm.data.prefetch.Prefetch` need not).
    checks_finite = True

    def __init__(self, spec, batch_size: int, *, columns: Sequence[str] = DEFAULT_COLUMNS,
                 rank: int | None = None, world_size: int | None = None, shuffle: bool = True,
                 buffer_rows: int = 4096, seed: int = 0, drop_last: bool = False, as_torch: bool = False):
        rank, world_size = _dist_defaults(rank, world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0 .. world_size-1 = {world_size - 1}")
        if batch_size < 1 or buffer_rows < 0 or seed < 0:
            raise ValueError(f"need batch_size >= 1, buffer_rows >= 0, seed >= 0; got {batch_size}, "
                             f"{buffer_rows}, {seed}")
        self.paths = shards.resolve(spec)
        self.columns, self.batch_size, self.rank, self.world_size = tuple(columns), batch_size, rank, world_size
        self.shuffle, self.buffer_rows, self.seed, self.drop_last = shuffle, buffer_rows, seed, drop_last
        self.as_torch = as_torch
        self.meta, self._files, self._units = self._scan()
        self._first_row, at = {}, {}  # (file, row group) -> the index of its first row in the file
        for f, g, n in self._units.tolist():
            self._first_row[f, g] = at.get(f, 0)
            at[f] = at.get(f, 0) + n
        self.rows = T = int(self._units[:, 2].sum())
        self._rank_rows = T // (world_size * batch_size) * batch_size if drop_last else -(-T // world_size)
        self._len = -(-self._rank_rows // batch_size)
        shape = json.dumps([[p.name for p in self.paths], self._units.tolist()])  # names, row-group sizes
        self._fingerprint = hashlib.sha256(shape.encode()).hexdigest()[:16]
        self._epoch, self._batches = 0, 0

    def _scan(self):
        """The first shard's metadata, ``(path, FileMetaData)`` per file and the row groups as ``(U, 3)``
        rows of (file, row group, rows); every shard must agree with the first on ``SHARED_META`` and on
        the types of ``columns``."""
        files, units, first = [], [], None
        for i, path in enumerate(self.paths):
            pf = shards.open_file(path)
            meta, types = _check(path, pf, self.columns)
            first = first or (path, meta, types)
            mismatch = [(f"metadata {k!r}", meta.get(k), first[1].get(k)) for k in SHARED_META] + \
                [(f"column {c!r}", types[c], first[2][c]) for c in self.columns]
            for what, mine, theirs in mismatch:
                if mine != theirs:
                    raise ValueError(f"{path}: {what} is {mine!r} but {first[0]} has {theirs!r}")
            md = pf.metadata
            files.append((path, md))
            units += [(i, g, md.row_group(g).num_rows) for g in range(md.num_row_groups)]
        return first[1], files, np.array(units, np.int64).reshape(-1, 3)

    def __len__(self) -> int:
        """Batches per rank per epoch (the same on every rank)."""
        return self._len

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        self._roll()
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` at its first batch; nothing changes if the stream is already in ``epoch``."""
        self._roll()
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, 0

    def state_dict(self) -> dict:
        """The position (epoch, batches yielded in it) and the settings that fix the schedule; JSON-able,
        small, and the same on every rank."""
        self._roll()
        return {"epoch": self._epoch, "batches": self._batches, "seed": self.seed,
                "world_size": self.world_size, "batch_size": self.batch_size, "shuffle": self.shuffle,
                "buffer_rows": self.buffer_rows, "drop_last": self.drop_last, "shards": self._fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``: the rest of its epoch, bit for bit, then the following epochs. The shards
        (file names and row-group sizes) and the schedule's settings must match; the seed is taken over."""
        mine = self.state_dict()
        for key in _SETTINGS:
            if state[key] != mine[key]:
                raise ValueError(f"stream state has {key} {state[key]!r}, this stream {mine[key]!r}")
        if not 0 <= state["batches"] <= len(self):
            raise ValueError(f"stream state has {state['batches']} batches of an epoch of {len(self)}")
        self.seed, self._epoch, self._batches = state["seed"], state["epoch"], state["batches"]

    def __iter__(self) -> Iterator[dict]:
        """The remaining batches of the current epoch; the following iteration starts the next epoch."""
        self._roll()
        epoch, start = self._epoch, self._batches
        segments = self._segments(epoch)
        batches = self._shuffled(segments, epoch, start) if self.shuffle else self._in_order(segments, start)
        for k, batch in enumerate(batches, start):
            self._batches = k + 1
            yield to_torch(batch) if self.as_torch else batch

    def forever(self) -> Iterator[dict]:
        """Batches without end, epoch after epoch (for loops that count steps)."""
        if not len(self):
            raise ValueError("the stream has no batches per epoch")
        while True:
            yield from self

    def _roll(self) -> None:
        if self._batches and self._batches == len(self):  # the epoch is spent: the next one starts
            self._epoch, self._batches = self._epoch + 1, 0

    def _segments(self, epoch: int) -> list[tuple[int, int, int, int]]:
        """This rank's rows as ``(file, row group, lo, hi)`` row ranges, in reading order."""
        units = self._units
        if self.shuffle:
            units = units[np.random.default_rng([self.seed, epoch, _ORDER]).permutation(len(units))]
        ends = np.cumsum(units[:, 2])
        out, pos, stop = [], self.rank * self._rank_rows, (self.rank + 1) * self._rank_rows
        while pos < stop:
            q = pos % self.rows  # padding wraps around to the epoch's first rows
            u = int(np.searchsorted(ends, q, side="right"))
            lo = q - (ends[u] - units[u, 2])
            n = min(ends[u] - q, stop - pos)
            out.append((int(units[u, 0]), int(units[u, 1]), int(lo), int(lo + n)))
            pos += n
        return out

    def _read(self, segment: tuple[int, int, int, int]) -> dict[str, np.ndarray]:
        file, group, lo, hi = segment
        path, md = self._files[file]
        with shards.open_file(path, md) as pf, shards.reading(path):  # page checksums verified
            table = pf.read_row_group(group, columns=list(self.columns)).slice(lo, hi - lo)
        out = {c: _column(table, c, self.meta, path) for c in self.columns}
        for c, v in out.items():
            refuse_non_finite(path, c, v, self._first_row[file, group] + lo)
        return out

    def _in_order(self, segments, start: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches ``start ..`` of rows in reading order; a batch within one row group is a view."""
        bounds = np.cumsum([0] + [hi - lo for _, _, lo, hi in segments])
        held = None, None  # the last row group read: (segment index, arrays)
        for k in range(start, len(self)):
            lo, hi = k * self.batch_size, min((k + 1) * self.batch_size, self._rank_rows)
            parts = []
            for j in range(np.searchsorted(bounds, lo, "right") - 1, np.searchsorted(bounds, hi, "left")):
                held = held if held[0] == j else (j, self._read(segments[j]))
                a, b = max(lo - bounds[j], 0), min(hi, bounds[j + 1]) - bounds[j]
                parts.append({c: v[a:b] for c, v in held[1].items()})
            yield parts[0] if len(parts) == 1 else {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}

    def _shuffled(self, segments, epoch: int, start: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches ``start ..`` of the buffer schedule; rows are copied into the buffer and out of it."""
        sizes = [hi - lo for _, _, lo, hi in segments]
        rng = np.random.default_rng([self.seed, epoch, _BUFFER, self.rank])
        order, entered = _buffer_schedule(sizes, self.buffer_rows, self.batch_size, rng)
        bounds = np.cumsum([0] + sizes)
        spent = np.zeros(self._rank_rows, bool)
        spent[order[: start * self.batch_size]] = True  # rows yielded before ``start``
        slot_of = np.empty(self._rank_rows, np.int64)
        buffer = _SlotBuffer(self.buffer_rows + self.batch_size + max(sizes, default=0))
        n = 0
        for k in range(start, len(self)):
            for j in range(n, entered[k]):  # on resume the first pass refills the buffer
                keep = np.flatnonzero(~spent[bounds[j]:bounds[j + 1]])
                if len(keep):
                    rows = self._read(segments[j])
                    slot_of[bounds[j] + keep] = buffer.put(rows if len(keep) == sizes[j] else
                                                           {c: v[keep] for c, v in rows.items()})
            n = entered[k]
            yield buffer.take(slot_of[order[k * self.batch_size:(k + 1) * self.batch_size]])


def _buffer_schedule(sizes: list[int], buffer_rows: int, batch_size: int, rng) -> tuple[np.ndarray, list]:
    """The shuffle buffer on row positions ``0 .. sum(sizes) - 1``, data-free.

    Segments of ``sizes`` rows enter in turn; while ``buffer_rows + batch_size`` rows or more are held, a
    batch is drawn uniformly without replacement; at the end the rest leaves in random order. Returns the
    positions in yield order ``(sum(sizes),)`` and, per batch, how many segments entered before it."""
    held, out, entered, start = np.empty(0, np.int64), [], [], 0
    for j, n in enumerate(sizes, 1):
        held, start = np.concatenate([held, np.arange(start, start + n)]), start + n
        while len(held) >= buffer_rows + batch_size:
            pick = rng.choice(len(held), batch_size, replace=False)
            out.append(held[pick])
            held = np.delete(held, pick)
            entered.append(j)
    out.append(rng.permutation(held))
    entered += [len(sizes)] * -(-len(held) // batch_size)
    return np.concatenate(out), entered


class _SlotBuffer:
    """Rows parked in fixed slots: ``put`` copies rows in and returns their slots, ``take`` copies the rows
    of some slots out (the batch) and frees them."""

    def __init__(self, capacity: int):
        self.free, self.n_free, self.data = np.arange(capacity), capacity, None

    def put(self, rows: dict[str, np.ndarray]) -> np.ndarray:
        n = len(next(iter(rows.values())))
        slots = self.free[self.n_free - n:self.n_free].copy()
        self.n_free -= n
        if self.data is None:
            self.data = {c: np.empty((len(self.free),) + v.shape[1:], v.dtype) for c, v in rows.items()}
        for c, v in rows.items():
            self.data[c][slots] = v
        return slots

    def take(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        self.free[self.n_free:self.n_free + len(slots)] = slots
        self.n_free += len(slots)
        return {c: v[slots] for c, v in self.data.items()}


def _check(path, pf: pq.ParquetFile, columns: Sequence[str]) -> tuple[dict, dict]:
    """The shard's ``mmfm`` metadata (from the footer, as :func:`shards.read_metadata`) and the types of
    ``columns``; errors for missing columns or a token width that is not ``grid[0] * grid[1] * token_dim``."""
    schema = pf.schema_arrow
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; it has {schema.names}")
    meta = json.loads((pf.metadata.metadata or {}).get(shards.META_KEY, b"{}"))
    if "tokens" in columns:
        if "grid" not in meta or "token_dim" not in meta:
            raise ValueError(f"{path}: the mmfm metadata lacks grid or token_dim, needed to shape tokens")
        (h, w), d = meta["grid"], meta["token_dim"]
        width = shards.value_width(schema.field("tokens"))
        if width != h * w * d:
            raise ValueError(f"{path}: tokens have width {width}, not grid {h}x{w} x token_dim {d}")
    return meta, {c: shards.describe(schema.field(c)) for c in columns}


def _column(table: pa.Table, name: str, meta: dict, path) -> np.ndarray:
    """One column as numpy, a view of Arrow memory where numpy's layout allows; ``tokens (rows, N, D)``."""
    col = table.column(name)
    arr = shards.column_array(col, table.schema.field(name), path)
    if name == "tokens":
        (h, w), d = meta["grid"], meta["token_dim"]
        arr = arr.reshape(len(arr), h * w, d)
    return arr


def _dist_defaults(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``rank`` and ``world_size``, each from torch.distributed when not given and it is initialized."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    return 0 if rank is None else rank, 1 if world_size is None else world_size
