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

Two byte-identical sets of files have the same fingerprint wherever they lie (the shards' names, not paths,
count). :func:`file_fingerprint` is also what an export records of its GMM source.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable

from mmfm.io import file_fingerprint

__all__ = ["file_fingerprint", "inputs_fingerprint"]  # file_fingerprint lives in mmfm.io (models read it too)


def inputs_fingerprint(shards: Iterable[str | os.PathLike], *others: str | os.PathLike | None) -> str:
    """16 hex digits over the shards (in sorted name order) and the other files (GMMs; ``None`` skipped)."""
    from mmfm.data.shards import resolve

    h = hashlib.sha256()
    spec = shards if isinstance(shards, (str, os.PathLike, list, tuple)) else list(shards)
    for path in sorted(resolve(spec), key=lambda p: p.name):
        h.update(f"{path.name}\0{file_fingerprint(path)}".encode())
    h.update(b"|")
    for path in others:
        if path is not None:
            h.update(file_fingerprint(path).encode())
    return h.hexdigest()[:16]
