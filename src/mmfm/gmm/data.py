"""Row sources for the mixture fit: an in-memory array, Parquet shards, or any re-iterable of chunks.

EM passes over the data once per iteration, so a source must be iterable many times. Each pass
yields ``(where, chunk)`` pairs: ``chunk`` is a ``(rows, D)`` array, ``where`` names the file and
rows for error messages. :func:`blocks` re-cuts any source into blocks of exactly ``rows`` rows
(the last one shorter), so the EM arithmetic and its result do not depend on how the input was
chunked: a fit over shards equals the in-memory fit bit for bit.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from mmfm.data import shards
from mmfm.data.stream import refuse_non_finite

_PIECE = 8192


class ArrayRows:
    """An in-memory ``(N, D)`` array (numpy, or CuPy once EM has uploaded it); chunks are views."""

    def __init__(self, array: np.ndarray, name: str = "data"):
        is_array = isinstance(array, np.ndarray) or hasattr(array, "__cuda_array_interface__")
        if not is_array or array.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D array (rows, features), got "
                             f"{getattr(array, 'shape', type(array).__name__)}")
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{name}: expected floating-point values, got dtype {array.dtype}")
        self.array, self.name = array, name

    def chunks(self, rows: int = 65536) -> Iterator[tuple[str, np.ndarray]]:
        for i in range(0, len(self.array), rows):
            yield f"{self.name} rows {i}..{min(i + rows, len(self.array)) - 1}", self.array[i:i + rows]


@dataclass(frozen=True)
class ShardRows:
    """The ``where`` of a :class:`ParquetRows` chunk: rows ``start .. stop - 1`` of those read from the
    shard ``path`` (every row, or with ``originals`` those whose ``flip`` is false); reads as
    ``"<path> rows a..b"``. It lets an error name a row by its index in the file."""

    path: os.PathLike
    column: str
    start: int
    stop: int
    originals: bool = False

    def __str__(self) -> str:
        return f"{self.path} {'original rows' if self.originals else 'rows'} {self.start}..{self.stop - 1}"


class ParquetRows:
    """A fixed-size-list column (``cls`` by default) of one or more Parquet shards, streamed.

    ``rows="originals"`` keeps only the rows whose ``flip`` column is false, i.e. leaves out the
    mirrors that ``shards.flip`` stores after each image (the release fitted its CLS mixture on
    the images alone, docs/method.md §3.2); the filter reads ``flip`` beside the column, never the tokens.
    """

    def __init__(self, spec, column: str = "cls", rows: str = "all"):
        if rows not in shards.ROW_SETS:
            raise ValueError(f"rows: expected one of {list(shards.ROW_SETS)}, got {rows!r}")
        self.paths = shards.resolve(spec)
        self.column, self.rows = column, rows

    def chunks(self, rows: int = 65536, checked: bool = False) -> Iterator[tuple[ShardRows, np.ndarray]]:
        """``(where, (rows, D) array)`` in file order; with ``checked`` a non-finite row is an error naming
        the shard and the row's index in it (:func:`~mmfm.data.stream.refuse_non_finite`), as the data is
        loaded into memory (:func:`summarize` then sees an array without its files)."""
        originals = self.rows == "originals"
        for path in self.paths:
            start = 0
            for batch in shards.iter_columns(path, [self.column], rows=rows, originals=originals):
                x = batch[self.column]
                if x.ndim != 2:
                    raise ValueError(f"{path}: column {self.column!r} is not a fixed-size list of floats")
                if checked:
                    refuse_non_finite(path, self.column, x, start, originals=originals)
                yield ShardRows(path, self.column, start, start + len(x), originals), x
                start += len(x)


class IterableRows:
    """Chunks from a callable returning a fresh iterator of ``(rows, D)`` arrays on every call."""

    def __init__(self, make: Callable[[], Iterable[np.ndarray]], name: str = "chunks"):
        self.make, self.name = make, name

    def chunks(self, rows: int = 65536) -> Iterator[tuple[str, np.ndarray]]:
        for i, x in enumerate(self.make()):
            x = np.asarray(x)
            if x.ndim != 2:
                raise ValueError(f"{self.name} chunk {i}: expected a 2-D array, got shape {x.shape}")
            yield f"{self.name} chunk {i}", x


def as_rows(data) -> ArrayRows | ParquetRows | IterableRows:
    """Accept an array, a rows object, or a callable returning an iterator of chunks."""
    if isinstance(data, (ArrayRows, ParquetRows, IterableRows)):
        return data
    if isinstance(data, np.ndarray):
        return ArrayRows(data)
    if callable(data):
        return IterableRows(data)
    raise ValueError(f"data: expected an array, ParquetRows, or a callable returning chunks; got {type(data).__name__}")


def blocks(source, rows: int) -> Iterator[np.ndarray]:
    """Consecutive blocks of exactly ``rows`` rows (the last may be shorter), whatever the chunking."""
    pending: list[np.ndarray] = []
    have = 0
    for _, x in source.chunks(rows):
        while len(x):
            take = min(rows - have, len(x))
            pending.append(x[:take])
            have += take
            x = x[take:]
            if have == rows:
                yield pending[0] if len(pending) == 1 else np.concatenate(pending)
                pending, have = [], 0
    if have:
        yield pending[0] if len(pending) == 1 else np.concatenate(pending)


@dataclass(frozen=True)
class DataSummary:
    """What one checking pass learns: size, per-feature mean and variance (float64), a fingerprint."""

    n: int
    dim: int
    mean: np.ndarray
    variance: np.ndarray
    fingerprint: str

    def as_dict(self) -> dict:
        return {"rows": self.n, "dim": self.dim, "fingerprint": self.fingerprint,
                "mean_of_feature_variances": float(self.variance.mean())}


def summarize(source, rows: int = 65536, progress: bool = False) -> DataSummary:
    """One pass: reject NaN/Inf rows (a shard's by file and row index) and zero-variance features; float64
    mean/variance (Chan merge).

    The fingerprint is a SHA-256 digest of the rows' bytes and dtype, in order: two fits with the
    same fingerprint saw the same data.
    """
    from mmfm.progress import progress as tqdm

    digest = hashlib.sha256()
    n, mean, m2, dim = 0, None, None, None
    pending: list[np.ndarray] = []
    have, last_dtype = 0, None
    for where, x in tqdm(source.chunks(rows), desc="check data", unit="chunk", disable=not progress, leave=False):
        if dim is None:
            dim = x.shape[1]
            mean, m2 = np.zeros(dim), np.zeros(dim)
        elif x.shape[1] != dim:
            raise ValueError(f"{where}: expected {dim} features like the earlier rows, got {x.shape[1]}")
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{where}: expected floating-point values, got dtype {x.dtype}")
        if not np.isfinite(x).all():
            if isinstance(where, ShardRows):  # names the shard, the row's index in it and its image
                refuse_non_finite(where.path, where.column, x, where.start, originals=where.originals)
            bad = ~np.isfinite(x).all(axis=1)
            first = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{where}: {int(bad.sum())} row(s) hold NaN or Inf (first at offset {first} of the chunk)")
        if x.dtype != last_dtype:  # hashed once per run of one dtype: chunking does not matter
            digest.update(str(x.dtype).encode())
            last_dtype = x.dtype
        digest.update(memoryview(np.ascontiguousarray(x)).cast("B"))
        # merge fixed 8192-row pieces, so the result does not depend on the chunking
        pending.append(x)
        have += len(x)
        if have >= _PIECE:
            x = np.concatenate(pending) if len(pending) > 1 else pending[0]
            cut = have - have % _PIECE
            for lo in range(0, cut, _PIECE):
                n, mean, m2 = merge_moments(n, mean, m2, x[lo:lo + _PIECE])
            pending, have = ([x[cut:]] if cut < have else []), have - cut
    if have:
        n, mean, m2 = merge_moments(n, mean, m2, np.concatenate(pending))
    if not n:
        raise ValueError("data: no rows")
    var = m2 / n
    zero = np.flatnonzero(var == 0)
    if zero.size:
        raise ValueError(f"data: {zero.size} feature(s) are constant over all {n} rows (first: feature "
                         f"{int(zero[0])}); a diagonal mixture cannot fit a zero-variance feature")
    return DataSummary(n=n, dim=dim, mean=mean, variance=var, fingerprint=digest.hexdigest())


def merge_moments(n, mean, m2, x):
    """Chan's update of ``(count, mean, sum of squared deviations)`` with the (finite) rows ``x``.

    Deviations from the piece's mean are taken in float32 (or the rows' wider dtype) and summed in
    float64.
    """
    b = len(x)
    ct = np.promote_types(x.dtype, np.float32)
    bm = x.mean(0, dtype=np.float64)
    dev = x.astype(ct, copy=False) - bm.astype(ct)
    bm2 = np.einsum("ij,ij->j", dev, dev, dtype=np.float64)
    bm2 = bm2 - b * (bm - bm.astype(ct).astype(np.float64)) ** 2  # deviations were from the rounded mean
    delta = bm - mean
    tot = n + b
    return tot, mean + delta * (b / tot), m2 + bm2 + delta**2 * (n * b / tot)


def gather(source, indices: np.ndarray, rows: int = 65536) -> np.ndarray:
    """The rows at sorted ``indices`` (a subsample for initialization), in one streaming pass, as a
    host array (from CuPy chunks too: their rows are downloaded)."""
    indices = np.sort(np.asarray(indices))
    out, start, j = [], 0, 0
    for _, x in source.chunks(rows):
        end = start + len(x)
        k = np.searchsorted(indices, end)
        if k > j:
            picked = x[indices[j:k] - start]
            out.append(picked.get() if hasattr(picked, "__cuda_array_interface__") else np.array(picked))
            j = k
        start = end
    return np.concatenate(out) if out else np.zeros((0, 0))
