"""Artifact files: atomic writes, safetensors tensors with a JSON sidecar, memory-mapped reads.

Every artifact is written to a temporary name in its folder and renamed into place only when it is
complete, so a killed job never leaves a file that looks finished. Tensors are safetensors (the
format's 8-byte header length, a JSON header, then the raw little-endian buffer); metadata that is
read by people (settings, log-likelihood curves, fingerprints) goes in a sidecar ``<name>.json``
beside ``<name>.safetensors``. Nothing here uses pickle.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

# safetensors dtype codes <-> numpy
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success, delete it on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, payload) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def sidecar_path(path: str | os.PathLike) -> Path:
    """``x.safetensors`` -> ``x.json``."""
    return Path(path).with_suffix(".json")


def tensor_metadata(meta: Mapping | None) -> dict[str, str]:
    """safetensors metadata must map strings to strings: nest ours as JSON under one key."""
    return {} if not meta else {"mmfm": json.dumps(meta, default=_jsonable)}


class TensorFile:
    """A safetensors file written in place: declare every tensor, then fill memory-mapped views.

    Used for outputs too large to hold twice in memory (the spatial means, ``K x N x D``): the file
    is pre-allocated at a temporary name, each tensor is a writable ``np.memmap`` into it, and
    :meth:`commit` flushes and renames it into place. Leaving the ``with`` block without commit (an
    error) deletes the temporary file.

    >>> with TensorFile(path, {"w": ((K,), np.float32)}, meta) as f:
    ...     f["w"][:] = weights
    ...     f.commit()
    """

    def __init__(self, path, specs: Mapping[str, tuple[tuple[int, ...], np.dtype]], meta: Mapping | None = None):
        self.path = Path(path)
        header, offset = {}, 0
        for name, (shape, dtype) in specs.items():
            dtype = np.dtype(dtype)
            if dtype not in _CODES:
                raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        md = tensor_metadata(meta)
        if md:
            header["__metadata__"] = md
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the buffer starts 8-byte aligned
        self._start = 8 + len(raw)
        self._header, self._raw, self._size = header, raw, offset
        self._cm = atomic_path(self.path)
        self._tmp: Path | None = None
        self._maps: dict[str, np.memmap] = {}
        self._done = False

    @property
    def nbytes(self) -> int:
        """The size of the file: the 8-byte length, the JSON header padded to 8 bytes, and the data."""
        return self._start + self._size

    def __enter__(self) -> "TensorFile":
        self._tmp = self._cm.__enter__()
        with open(self._tmp, "wb") as f:
            f.write(struct.pack("<Q", len(self._raw)) + self._raw)
            f.truncate(self._start + self._size)
        for name, h in self._header.items():
            if name == "__metadata__":
                continue
            b, e = h["data_offsets"]
            shape = tuple(h["shape"])
            dtype = _DTYPES[h["dtype"]]
            if e > b:
                self._maps[name] = np.memmap(self._tmp, dtype=dtype, mode="r+", offset=self._start + b, shape=shape)
            else:
                self._maps[name] = np.zeros(shape, dtype)
        return self

    def __getitem__(self, name: str) -> np.ndarray:
        return self._maps[name]

    def commit(self) -> None:
        for m in self._maps.values():
            if isinstance(m, np.memmap):
                m.flush()
        self._maps.clear()
        self._done = True

    def __exit__(self, exc_type, exc, tb):
        self._maps.clear()
        if exc_type is None and not self._done:
            err = RuntimeError(f"{self.path}: TensorFile closed without commit(); nothing written")
            self._cm.__exit__(RuntimeError, err, None)
            raise err
        return self._cm.__exit__(exc_type, exc, tb)


def save_tensors(path, tensors: Mapping[str, np.ndarray], meta: Mapping | None = None) -> None:
    """Write numpy arrays as one safetensors file, atomically (metadata nested as JSON)."""
    specs = {k: (tuple(np.shape(v)), np.asarray(v).dtype) for k, v in tensors.items()}
    with TensorFile(path, specs, meta) as f:
        for k, v in tensors.items():
            f[k][...] = v
        f.commit()


def read_header(path) -> tuple[dict, dict, int]:
    """``(tensor headers, our metadata, buffer start)`` of a safetensors file, without reading data."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a safetensors file ({err})") from None
    md = header.pop("__metadata__", None) or {}
    meta = json.loads(md["mmfm"]) if "mmfm" in md else {}
    return header, meta, 8 + n


def open_tensors(path, names: list[str] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Memory-map the tensors of a safetensors file (read-only ``np.memmap``s) and return our metadata.

    Nothing is read until it is used, so a 6 GB spatial-means tensor costs no memory to open.
    """
    header, meta, start = read_header(path)
    out = {}
    for name, h in header.items():
        if names is not None and name not in names:
            continue
        if h["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {h['dtype']}, which numpy cannot map")
        b, e = h["data_offsets"]
        shape = tuple(h["shape"])
        dtype = _DTYPES[h["dtype"]]
        out[name] = (np.memmap(path, dtype=dtype, mode="r", offset=start + b, shape=shape)
                     if e > b else np.zeros(shape, dtype))
    if names is not None:
        missing = sorted(set(names) - set(out))
        if missing:
            raise ValueError(f"{path}: missing tensor(s) {missing}; it holds {sorted(header)}")
    return out, meta
