"""Parquet latent shards (docs/design.md §4): one file per shard, read back zero-copy in row-group order.

Columns: ``image_id`` int64, ``label`` int32, ``path`` string, ``flip`` bool, ``cls`` fixed-size list
of float32 (``Dc``), and ``tokens``: ``N * D`` float16/float32 values per row, token-major (token
``i`` of a ``h x w`` grid is row ``i // w``, column ``i % w``), stored as one fixed-size binary
value whose field metadata names the dtype (:func:`tokens_field`). In pandas a row's grid is
``np.frombuffer(df.tokens[i], np.float16).reshape(N, D)``; :func:`column_array` and
``mmfm.data.stream`` do this for whole batches without a copy. The footer's key-value metadata key
``mmfm`` holds a JSON object; the fields every stage relies on are

- ``encoder`` (name) and ``revision``,
- ``grid`` ``[h, w]`` with ``N = h * w``, ``token_dim`` ``D``, ``cls_dim`` ``Dc``.

``flip`` marks a stored mirror: with ``shards.flip`` every image's row (``flip = false``) is followed
by the row of its horizontal mirror (``flip = true``, the same ``image_id``). A stage that wants the
images as encoded only (``gmm.rows`` / ``spatial.rows_from: originals``) reads
``iter_columns(..., originals=True)``, which filters on that column alone.

Shards are written with Parquet page checksums (CRC-32 of every page, :data:`WRITE_OPTIONS`) and read with
their verification on (:func:`open_file`): a flipped bit, a truncated file, a footer that does not parse
or a missing column raise :class:`mmfm.recover.CorruptArtifact`, which names the shard and ends with the
command that rebuilds it and everything after it. :func:`verify_shard` reads every page of a shard.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmfm.io import atomic_path
from mmfm.recover import CorruptArtifact, locate

META_KEY = b"mmfm"
#: The column that marks a stored mirror (``True``) of the image in the row before it (``False``).
MIRROR_COLUMN = "flip"
#: Which rows a stage reads: every row, or the originals only (``flip`` false).
ROW_SETS = ("all", "originals")
# path strings compress; token and descriptor floats barely do and are read most: stored plain
COMPRESSION = {"path": "snappy", "image_id": "none", "label": "none", "flip": "none", "cls": "none",
               "tokens": "none"}
STATISTICS = ["image_id", "label", "flip"]  # min/max of a 200 KB binary value helps nobody
#: ``pq.ParquetWriter`` options of every shard writer (``mmfm encode`` too): per-column compression and
#: statistics, and a CRC-32 checksum in every page header, which the readers verify.
WRITE_OPTIONS = {"compression": COMPRESSION, "use_dictionary": ["path"], "write_statistics": STATISTICS,
                 "write_page_checksum": True}
#: The columns every stage reads, and the ``mmfm`` metadata fields it relies on.
REQUIRED_COLUMNS = ("label", "cls", "tokens")
REQUIRED_META = ("encoder", "grid", "token_dim", "cls_dim")
_READ_ERRORS = (OSError, pa.ArrowException, EOFError)


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
    """The ``mmfm`` JSON of a shard's footer key-value metadata (``{}`` if it has none).

    It is read from the footer (``pq.read_metadata(path).metadata``, DuckDB's
    ``parquet_kv_metadata``), not from the Arrow schema: ``mmfm encode`` adds it when it closes the
    file, once the count of skipped images is known.
    """
    if not Path(path).is_file():
        raise _missing(path)
    try:
        kv = pq.read_metadata(path).metadata or {}
    except _READ_ERRORS as err:
        raise CorruptArtifact(path, f"not a readable Parquet file ({err})") from None
    raw = kv.get(META_KEY)
    try:
        meta = json.loads(raw) if raw else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptArtifact(path, f"its {META_KEY.decode()!r} footer metadata does not parse ({err})") from None
    if not isinstance(meta, dict):
        raise CorruptArtifact(path, f"its {META_KEY.decode()!r} footer metadata is not a JSON object")
    return meta


def num_rows(path: str | os.PathLike) -> int:
    return open_file(path).metadata.num_rows


def _missing(path) -> ValueError:
    return CorruptArtifact(path, "no such file") if locate(path) else ValueError(f"{path}: no such file")


@contextlib.contextmanager
def reading(path: str | os.PathLike) -> Iterator[None]:
    """Turn a read error inside (a page whose checksum fails, a truncated column chunk) into
    :class:`~mmfm.recover.CorruptArtifact` naming the shard ``path``."""
    try:
        yield
    except CorruptArtifact:
        raise
    except _READ_ERRORS as err:
        raise CorruptArtifact(path, f"damaged Parquet data ({type(err).__name__}: {err})") from None


def tokens_field(width: int, dtype) -> pa.Field:
    """The ``tokens`` column: ``width = N * D`` values of ``dtype`` per row, stored as one fixed-size
    binary value (raw little-endian, token-major). Parquet decodes such a column with no per-value
    levels, and from a memory-mapped file without a copy: 10x the read speed of a list column."""
    dtype = np.dtype(dtype)
    return pa.field("tokens", pa.binary(width * dtype.itemsize), nullable=False,
                    metadata={"dtype": dtype.name, "values": str(width)})


def tokens_array(values: np.ndarray) -> pa.Array:
    """``(rows, N * D)`` float16/float32 -> the ``tokens`` column (no copy of a contiguous array)."""
    values = np.ascontiguousarray(values.reshape(len(values), -1))
    if values.dtype.byteorder == ">":
        raise ValueError("tokens: expected little-endian values")
    width = values.shape[1] * values.dtype.itemsize
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(values), [None, pa.py_buffer(values)])


def describe(field: pa.Field) -> str:
    """A column's type for messages: ``float16[96]`` for tokens, Arrow's name otherwise."""
    width = value_width(field)
    if pa.types.is_fixed_size_binary(field.type) and width is not None:
        return f"{field.metadata[b'dtype'].decode()}[{width}]"
    return str(field.type)


def value_width(field: pa.Field) -> int | None:
    """Values per row of a fixed-size list or a ``tokens`` binary column (``None`` otherwise)."""
    if pa.types.is_fixed_size_list(field.type):
        return field.type.list_size
    if pa.types.is_fixed_size_binary(field.type) and field.metadata and b"dtype" in field.metadata:
        return field.type.byte_width // np.dtype(field.metadata[b"dtype"].decode()).itemsize
    return None


def column_array(col: pa.Array | pa.ChunkedArray, field: pa.Field, path) -> np.ndarray:
    """A ``tokens`` or fixed-size-list column as ``(rows, width)``, a plain column as ``(rows,)``.

    The first two are views of Arrow's memory (no copy; of the file itself when it is memory-mapped).
    """
    if isinstance(col, pa.ChunkedArray):  # one chunk: take it (combine_chunks copies even then)
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    if col.null_count:
        raise CorruptArtifact(path, f"column {field.name!r} has {col.null_count} null rows")
    if pa.types.is_fixed_size_list(col.type):
        flat = col.flatten()  # respects slicing; no copy
        return flat.to_numpy(zero_copy_only=True).reshape(len(col), col.type.list_size)
    if pa.types.is_fixed_size_binary(col.type):
        width = value_width(field)
        if width is None:
            raise CorruptArtifact(path, f"binary column {field.name!r} carries no dtype in its field metadata")
        dtype = np.dtype(field.metadata[b"dtype"].decode())
        out = np.frombuffer(col.buffers()[1], dtype=dtype, count=len(col) * width,
                            offset=col.offset * col.type.byte_width).reshape(len(col), width)
        out.flags.writeable = False  # it may be the memory-mapped file itself
        return out
    return col.to_numpy(zero_copy_only=False)


def open_file(path: str | os.PathLike, metadata: pq.FileMetaData | None = None) -> pq.ParquetFile:
    """A shard, memory-mapped (so fixed-width columns are read without a copy), its page checksums verified
    on every read. ``metadata``: its footer, when read before. Errors of the reads themselves are named by
    wrapping them in :func:`reading`."""
    if not Path(path).is_file():
        raise _missing(path)
    try:
        return pq.ParquetFile(path, memory_map=True, metadata=metadata, page_checksum_verification=True)
    except _READ_ERRORS as err:
        raise CorruptArtifact(path, f"not a readable Parquet file ({err})") from None


def iter_columns(path: str | os.PathLike, columns: list[str], rows: int = 1024, *,
                 originals: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Batches of at most ``rows`` rows of ``columns``, in file order, as numpy arrays.

    With ``originals``, only the rows whose ``flip`` is false: the images as encoded, not the
    mirrors ``mmfm encode`` stores after them (``shards.flip``). The ``flip`` column is read
    beside ``columns`` and each Arrow batch is filtered before it becomes numpy (:func:`original_mask`),
    so no column is read for the sake of the filter and the mirrors' values are copied nowhere;
    a batch left empty is not yielded. Rows keep their file order."""
    pf = open_file(path)
    names = pf.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise CorruptArtifact(path, f"no column(s) {missing}; it has {names}")
    if originals and MIRROR_COLUMN not in names:
        raise ValueError(f"{path}: no {MIRROR_COLUMN!r} column to tell the stored mirrors from the originals "
                         f"(it has {names}); 'originals' needs shards written by mmfm encode")
    read = list(columns) + ([MIRROR_COLUMN] if originals and MIRROR_COLUMN not in columns else [])
    batches = pf.iter_batches(batch_size=rows, columns=read)
    while True:
        with reading(path):
            batch = next(batches, None)
        if batch is None:
            return
        if originals:
            keep = original_mask(batch.column(MIRROR_COLUMN), path)
            if keep is not None:
                batch = batch.filter(keep)
                if not batch.num_rows:
                    continue
        yield {c: column_array(batch.column(c), batch.schema.field(c), path) for c in columns}


def original_mask(flip: pa.Array | pa.ChunkedArray, path) -> pa.Array | None:
    """The mask of the rows of a ``flip`` column that are not mirrors; ``None`` when no row is a mirror
    (nothing to filter)."""
    if not pa.types.is_boolean(flip.type):
        raise CorruptArtifact(path, f"column {MIRROR_COLUMN!r} is {flip.type}, expected bool")
    if flip.null_count:
        raise CorruptArtifact(path, f"column {MIRROR_COLUMN!r} has {flip.null_count} null rows")
    if not pc.any(flip).as_py():
        return None
    return pc.invert(flip)


def count_originals(path: str | os.PathLike) -> tuple[int, int]:
    """``(rows, original rows)`` of a shard, from its ``flip`` column alone (all rows without one)."""
    pf = open_file(path)
    n = pf.metadata.num_rows
    if MIRROR_COLUMN not in pf.schema_arrow.names:
        return n, n
    with reading(path):
        flip = pf.read(columns=[MIRROR_COLUMN]).column(MIRROR_COLUMN)
    original_mask(flip, path)  # the checks
    return n, n - int(pc.sum(flip).as_py() or 0)


def write_shard(
    path: str | os.PathLike,
    columns: Mapping[str, np.ndarray | list],
    meta: Mapping,
    row_group_rows: int = 256,
) -> None:
    """Write one shard atomically. ``tokens`` ``(rows, N, D)`` become the binary ``tokens`` column
    (:func:`tokens_field`); other 2-D arrays fixed-size-list columns of their row width."""
    arrays, fields, n = {}, [], None
    for name, values in columns.items():
        if name == "tokens" and isinstance(values, np.ndarray):
            arr = tokens_array(values)
            fields.append(tokens_field(len(values) and values[0].size, values.dtype))
        elif isinstance(values, np.ndarray) and values.ndim >= 2:
            flat = np.ascontiguousarray(values.reshape(len(values), -1))
            arr = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
        else:
            arr = pa.array(values)
        if name != "tokens" or not isinstance(values, np.ndarray):
            fields.append(pa.field(name, arr.type))
        if n is not None and len(arr) != n:
            raise ValueError(f"{name}: expected {n} rows like the other columns, got {len(arr)}")
        n = len(arr)
        arrays[name] = arr
    schema = pa.schema(fields, metadata={META_KEY: json.dumps(dict(meta))})
    table = pa.table(arrays, schema=schema)
    options = {**WRITE_OPTIONS, "use_dictionary": ["path"] if "path" in arrays else False,
               "compression": {c: COMPRESSION.get(c, "snappy") for c in arrays},
               "write_statistics": [c for c in STATISTICS if c in arrays]}
    with atomic_path(path, table.nbytes) as tmp:  # a full disk: DiskFull naming the shard and its size
        pq.write_table(table, tmp, row_group_size=row_group_rows, **options)


def verify_shard(path: str | os.PathLike, *, required: bool = True) -> dict:
    """Read every page of the shard ``path`` with its checksum verified, and check its footer: the ``mmfm``
    metadata (with ``required``: the fields and columns every stage relies on, :data:`REQUIRED_META`,
    :data:`REQUIRED_COLUMNS`), the ``tokens`` width ``N * D`` against ``grid`` and ``token_dim``, the ``cls``
    width against ``cls_dim``, the recorded ``rows`` against the row groups. Returns the metadata; raises
    :class:`~mmfm.recover.CorruptArtifact` naming the shard and what is wrong. Reads one row group at a time."""
    meta = read_metadata(path)
    pf = open_file(path)
    md, names = pf.metadata, pf.schema_arrow.names
    if required:
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing:
            raise CorruptArtifact(path, f"its {META_KEY.decode()!r} metadata lacks {missing}")
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise CorruptArtifact(path, f"no column(s) {missing}; it has {names}")
    schema = pf.schema_arrow
    try:
        widths = {"tokens": math.prod(meta["grid"]) * int(meta["token_dim"]), "cls": int(meta["cls_dim"])}
    except (KeyError, TypeError, ValueError):
        widths = {}
    for column, want in widths.items():
        if column in names and (got := value_width(schema.field(column))) != want:
            raise CorruptArtifact(path, f"column {column!r} holds {got} values per row, its metadata says {want}")
    rows = sum(md.row_group(g).num_rows for g in range(md.num_row_groups))
    if rows != md.num_rows or ("rows" in meta and meta["rows"] != rows):
        raise CorruptArtifact(path, f"{rows} rows in its row groups, {md.num_rows} in its footer, "
                                    f"{meta.get('rows')} in its metadata")
    for g in range(md.num_row_groups):
        with reading(path):
            got = pf.read_row_group(g).num_rows
        if got != md.row_group(g).num_rows:
            raise CorruptArtifact(path, f"row group {g} holds {got} rows, its footer says {md.row_group(g).num_rows}")
    return meta
