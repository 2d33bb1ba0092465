"""Parquet latent shards (design.md §4): one file per shard, read back zero-copy in row-group order.

Columns: ``image_id`` int64, ``label`` int32, ``path`` string, ``flip`` bool, ``cls`` fixed-size list
of float (``Dc``), ``tokens`` fixed-size list of float16/float32 (``N * D``, token-major: token ``i``
of a ``h x w`` grid is row ``i // w``, column ``i % w``). The schema metadata key ``mmfm`` holds a
JSON object; the fields every stage relies on are

- ``encoder`` (name) and ``revision``,
- ``grid`` ``[h, w]`` with ``N = h * w``, ``token_dim`` ``D``, ``cls_dim`` ``Dc``.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmfm.io import atomic_path

META_KEY = b"mmfm"


def resolve(spec: str | os.PathLike | list, suffix: str = ".parquet") -> list[Path]:
    """Shard files named by a file, a folder (its ``*.parquet``, sorted) or a glob; a list of those."""
    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    out: list[Path] = []
    for s in specs:
        p = Path(s)
        if p.is_dir():
            found = sorted(p.glob(f"*{suffix}"))
            if not found:
                raise ValueError(f"{p}: folder holds no {suffix} files")
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(f) for f in glob.glob(str(s)) if Path(f).is_file())
            if not found:
                raise ValueError(f"{s}: no such file, folder or matching files")
        out.extend(found)
    if len(set(out)) != len(out):
        raise ValueError(f"{spec}: the same shard is named twice")
    return out


def read_metadata(path: str | os.PathLike) -> dict:
    """The ``mmfm`` JSON of a shard's schema metadata (``{}`` if it has none)."""
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise ValueError(f"{path}: not a readable Parquet file ({err})") from None
    raw = (schema.metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else {}


def num_rows(path: str | os.PathLike) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def _to_numpy(col: pa.Array, name: str, path) -> np.ndarray:
    """A fixed-size-list column as ``(rows, width)`` (zero-copy), a plain column as ``(rows,)``."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if col.null_count:
        raise ValueError(f"{path}: column {name!r} has {col.null_count} null rows")
    if pa.types.is_fixed_size_list(col.type):
        width = col.type.list_size
        flat = col.flatten()  # respects slicing; no copy
        return flat.to_numpy(zero_copy_only=True).reshape(len(col), width)
    return col.to_numpy(zero_copy_only=False)


def iter_columns(path: str | os.PathLike, columns: list[str], rows: int = 1024) -> Iterator[dict[str, np.ndarray]]:
    """Batches of at most ``rows`` rows of ``columns``, in file order, as numpy arrays."""
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise ValueError(f"{path}: not a readable Parquet file ({err})") from None
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; it has {pf.schema_arrow.names}")
    for batch in pf.iter_batches(batch_size=rows, columns=columns):
        yield {c: _to_numpy(batch.column(c), c, path) for c in columns}


def write_shard(
    path: str | os.PathLike,
    columns: Mapping[str, np.ndarray | list],
    meta: Mapping,
    row_group_rows: int = 256,
) -> None:
    """Write one shard atomically. 2-D arrays become fixed-size-list columns of their row width."""
    arrays, n = {}, None
    for name, values in columns.items():
        if isinstance(values, np.ndarray) and values.ndim >= 2:
            flat = np.ascontiguousarray(values.reshape(len(values), -1))
            arr = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
        else:
            arr = pa.array(values)
        if n is not None and len(arr) != n:
            raise ValueError(f"{name}: expected {n} rows like the other columns, got {len(arr)}")
        n = len(arr)
        arrays[name] = arr
    table = pa.table(arrays).replace_schema_metadata({META_KEY: json.dumps(dict(meta))})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_rows)
