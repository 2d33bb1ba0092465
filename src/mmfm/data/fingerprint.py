"""What a run trains on, as one short hash: changed data must not resume a run trained on other data.

A run folder's checkpoints record :func:`inputs_fingerprint` of the shards and GMM files the run was
started with (``data_fingerprint`` of :class:`~mmfm.train.config.TrainConfig`); ``mmfm train
--fresh-if-changed`` starts a run afresh when it differs, instead of failing on every rerun.

The fingerprint reads little, so it costs nothing beside a job that reads terabytes:

- a Parquet shard: its file name, size and footer (the schema, the key-value metadata the encoder wrote,
  and each column chunk's offsets, sizes and statistics) -- new or re-encoded images change the row counts
  or the compressed sizes, and so the footer;
- a safetensors file (a GMM): its size, header (names, shapes, dtypes, metadata) and the first MiB of its
  data (a new fit has other means from the first mode on).

Two byte-identical sets of files have the same fingerprint wherever they lie (names, not paths, count).
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Iterable

__all__ = ["file_fingerprint", "inputs_fingerprint"]

_DATA_BYTES = 1 << 20


def _parquet_footer(f, size: int, path: Path) -> bytes:
    if size < 12:
        raise ValueError(f"{path}: {size} bytes, too short for a Parquet file")
    f.seek(size - 8)
    tail = f.read(8)
    (length,) = struct.unpack("<I", tail[:4])
    if tail[4:] != b"PAR1" or length + 12 > size:
        raise ValueError(f"{path}: not a complete Parquet file (no footer at its end); rebuild it")
    f.seek(size - 8 - length)
    return f.read(length)


def _safetensors_head(f, size: int, path: Path) -> bytes:
    head = f.read(8)
    if len(head) < 8:
        raise ValueError(f"{path}: {size} bytes, too short for a safetensors file")
    (length,) = struct.unpack("<Q", head)
    if length + 8 > size:
        raise ValueError(f"{path}: header of {length} bytes in a file of {size}; the file is truncated")
    return f.read(length) + f.read(_DATA_BYTES)


def file_fingerprint(path: str | os.PathLike) -> str:
    """sha256 (hex) of one shard's or tensor file's name, size and the parts listed in the module docstring."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        h.update(_parquet_footer(f, size, path) if path.suffix == ".parquet" else _safetensors_head(f, size, path))
    return h.hexdigest()


def inputs_fingerprint(shards: Iterable[str | os.PathLike], *others: str | os.PathLike | None) -> str:
    """16 hex digits over the shards (in sorted name order) and the other files (GMMs; ``None`` skipped)."""
    from mmfm.data.shards import resolve

    h = hashlib.sha256()
    spec = shards if isinstance(shards, (str, os.PathLike, list, tuple)) else list(shards)
    for path in sorted(resolve(spec), key=lambda p: p.name):
        h.update(file_fingerprint(path).encode())
    h.update(b"|")
    for path in others:
        if path is not None:
            h.update(file_fingerprint(path).encode())
    return h.hexdigest()[:16]
