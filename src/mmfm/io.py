"""Artifact files: atomic writes, safetensors tensors with a JSON sidecar, memory-mapped reads.

Every artifact is written to a temporary name in its folder and renamed into place only when it is
complete, so a killed job never leaves a file that looks finished. Tensors are safetensors (the
format's 8-byte header length, a JSON header, then the raw little-endian buffer); metadata that is
read by people (settings, log-likelihood curves, fingerprints) goes in a sidecar ``<name>.json``
beside ``<name>.safetensors``. Nothing here uses pickle.

A file that cannot be read as what it claims to be (truncated, a damaged header, offsets that disagree
with its size) raises :class:`mmfm.recover.CorruptArtifact`, which names it and ends with the command that
rebuilds it. A full disk (``ENOSPC``, ``EDQUOT``) raises :class:`DiskFull`, naming the file, the bytes it
needs and the bytes free; the temporary file is removed and a previous complete file is left as it was.
Memory-mapped outputs are allocated (``posix_fallocate``) before they are mapped, so a full disk is this
error and not a ``SIGBUS`` halfway through the write.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from mmfm.recover import CorruptArtifact, locate

__all__ = ["CorruptArtifact", "DiskFull", "TensorFile", "atomic_path", "disk_full_error", "file_fingerprint",
           "load_samples",
           "on_disk_full", "open_tensors", "read_header", "read_sidecar", "save_tensors", "sidecar_first",
           "sidecar_path", "tensor_metadata", "write_json"]

#: The errors of a full disk or an exhausted quota.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

# safetensors dtype codes <-> numpy
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}
# bytes per value of every safetensors dtype (numpy maps those of _DTYPES)
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
             "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n} bytes)"
    return f"{n} bytes"


def _free_bytes(path: Path) -> int | None:
    for d in [path, *path.parents]:
        if d.exists():
            try:
                return shutil.disk_usage(d).free
            except OSError:
                return None
    return None


class DiskFull(OSError):
    """``ENOSPC`` / ``EDQUOT`` while writing ``filename``; ``needed`` and ``free`` in bytes (``free`` None when
    unknown). Its message names the file and both sizes (:func:`disk_full_error`)."""

    def __init__(self, code: int, message: str, filename: str | None = None, needed: int | None = None,
                 free: int | None = None):
        super().__init__(code, message, filename)
        self.message, self.needed, self.free = message, needed, free

    def __str__(self) -> str:
        return self.message


def disk_full_error(path: str | os.PathLike, needed: int | None, err: OSError | None = None, *,
                    at_least: bool = False) -> DiskFull:
    """The error to raise when writing ``path`` (``needed`` bytes; ``at_least``: more than that) hit a full disk
    (``err``: the original ``ENOSPC`` / ``EDQUOT``, default ``ENOSPC``). The free bytes are those of
    ``shutil.disk_usage`` on the file's folder (under a quota the disk may show more than the quota leaves)."""
    path = Path(path)
    code = err.errno if err is not None and err.errno in DISK_FULL else errno.ENOSPC
    free = _free_bytes(path.parent)
    what = "disk quota exceeded" if code == errno.EDQUOT else "no space left on the device"
    need = "unknown" if needed is None else ("more than " if at_least else "") + _size(int(needed))
    have = "unknown" if free is None else _size(free)
    message = (f"{path}: {what} (needs {need}, {have} free on {path.parent}); nothing was left half-written: "
               "free some space (or move the results) and run again")
    return DiskFull(code, message, str(path), needed, free)


@contextlib.contextmanager
def on_disk_full(path: str | os.PathLike, needed: int | None = None, *, at_least: bool = False) -> Iterator[None]:
    """Turn an ``ENOSPC`` / ``EDQUOT`` raised inside into :func:`disk_full_error` for ``path`` (a
    :class:`DiskFull` passes as it is)."""
    try:
        yield
    except DiskFull:
        raise
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        raise disk_full_error(path, needed, err, at_least=at_least) from err


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, nbytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success, delete it on error.

    A full disk inside becomes :class:`DiskFull` naming ``path`` and ``nbytes`` (the size it will have, if
    known; else the bytes written so far, as a lower bound)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except DiskFull:
        raise
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)  # before the free bytes are counted
        raise disk_full_error(path, nbytes if nbytes is not None else written, err,
                              at_least=nbytes is None) from err
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


def read_sidecar(path: str | os.PathLike, embedded: Mapping | None = None) -> dict:
    """The sidecar ``x.json`` of ``x.safetensors`` (``{}`` when there is none), checked: a JSON object that
    agrees on every key with ``embedded``, the metadata in the file's own header (the writers put the same
    settings in both; the sidecar may hold more). A :class:`~mmfm.recover.CorruptArtifact` names the sidecar."""
    side = sidecar_path(path)
    if not side.is_file():
        return {}
    try:
        payload = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptArtifact(side, f"not readable JSON ({err})") from None
    if not isinstance(payload, dict):
        raise CorruptArtifact(side, f"holds a JSON {type(payload).__name__}, expected an object")
    same = lambda v: json.dumps(v, sort_keys=True, default=_jsonable)  # noqa: E731 (NaN == NaN here)
    for key, value in (embedded or {}).items():
        if key not in payload or same(payload[key]) != same(value):
            raise CorruptArtifact(side, f"{key!r} is {payload.get(key, '(missing)')!r} but {Path(path).name} "
                                        f"records {value!r}; the sidecar and the tensors disagree")
    return payload


@contextlib.contextmanager
def sidecar_first(path: str | os.PathLike, payload) -> Iterator[None]:
    """Write ``payload`` as the sidecar of ``path`` before the body writes ``path`` itself (so the tensors'
    presence means the pair is complete); if the body fails, the previous sidecar is put back (or the new one
    removed), so a previous complete pair is left as it was."""
    side = sidecar_path(path)
    old = side.read_bytes() if side.is_file() else None
    write_json(side, payload)
    try:
        yield
    except BaseException:
        if old is None:
            side.unlink(missing_ok=True)
        else:
            with contextlib.suppress(OSError), atomic_path(side) as tmp:
                tmp.write_bytes(old)
        raise


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
        try:
            with on_disk_full(self.path, self.nbytes), open(self._tmp, "wb") as f:
                f.write(struct.pack("<Q", len(self._raw)) + self._raw)
                f.flush()
                _allocate(f.fileno(), self.nbytes)
        except BaseException as err:
            self._cm.__exit__(type(err), err, err.__traceback__)
            raise
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
        with on_disk_full(self.path, self.nbytes):
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


def _allocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes for the file ``fd`` so that writes through a memory map cannot hit a full disk
    (``SIGBUS``): ``posix_fallocate`` raises ``ENOSPC`` now instead. Where the platform or file system has no
    fallocate (glibc emulates it where it can), the file is extended sparse, as before."""
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as err:
            if err.errno in DISK_FULL:
                raise
    os.ftruncate(fd, size)


def save_tensors(path, tensors: Mapping[str, np.ndarray], meta: Mapping | None = None) -> None:
    """Write numpy arrays as one safetensors file, atomically (metadata nested as JSON)."""
    specs = {k: (tuple(np.shape(v)), np.asarray(v).dtype) for k, v in tensors.items()}
    with TensorFile(path, specs, meta) as f:
        for k, v in tensors.items():
            f[k][...] = v
        f.commit()


def _missing(path: Path, what: str = "file") -> ValueError:
    """A missing file: with the command that rebuilds it when it is a workflow artifact."""
    return CorruptArtifact(path, f"no such {what}") if locate(path) else ValueError(f"{path}: no such {what}")


def read_header(path) -> tuple[dict, dict, int]:
    """``(tensor headers, our metadata, buffer start)`` of a safetensors file, without reading data.

    The header is checked against the file: every tensor's ``data_offsets`` span ``prod(shape) x itemsize``
    bytes, the tensors tile the buffer without gaps or overlaps, and the buffer ends where the file ends;
    so a truncated file (or one with bytes appended) is found here, before a read past its end.
    A :class:`~mmfm.recover.CorruptArtifact` names what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    size = path.stat().st_size
    bad = lambda why: CorruptArtifact(path, f"not a complete safetensors file ({why})")  # noqa: E731
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(100_000_000, size - 8):
            raise bad(f"a header of {n} bytes in a file of {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise bad(f"its JSON header does not parse: {err}") from None
    if not isinstance(header, dict):
        raise bad("its JSON header is not an object")
    md = header.pop("__metadata__", None) or {}
    spans = []
    for name, h in header.items():
        try:
            shape, (b, e) = [int(v) for v in h["shape"]], h["data_offsets"]
            width = _ITEMSIZE[h["dtype"]]
            if not (isinstance(b, int) and isinstance(e, int) and 0 <= b <= e) or min(shape, default=0) < 0:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has a malformed entry {h!r}") from None
        if e - b != math.prod(shape) * width:
            raise bad(f"tensor {name!r} ({h['dtype']} {shape}) spans {e - b} bytes, not {math.prod(shape) * width}")
        spans.append((b, e, name))
    end = 0
    for b, e, name in sorted(spans):
        if b != end:
            raise bad(f"tensor {name!r} starts at byte {b} of the buffer, the previous one ends at {end}")
        end = e
    if 8 + n + end != size:
        why = "truncated" if 8 + n + end > size else "bytes after the last tensor"
        raise bad(f"{why}: the header describes {8 + n + end} bytes, the file has {size}")
    try:
        meta = json.loads(md["mmfm"]) if "mmfm" in md else {}
    except (TypeError, json.JSONDecodeError) as err:
        raise bad(f"its 'mmfm' metadata does not parse: {err}") from None
    return header, meta, 8 + n


def open_tensors(path, names: list[str] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Memory-map the tensors of a safetensors file (read-only ``np.memmap``s) and return our metadata.

    Nothing is read until it is used, so a 6 GB spatial-means tensor costs no memory to open. The header
    is checked against the file first (:func:`read_header`).
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
        try:
            out[name] = (np.memmap(path, dtype=dtype, mode="r", offset=start + b, shape=shape)
                         if e > b else np.zeros(shape, dtype))
        except (OSError, ValueError) as err:
            raise CorruptArtifact(path, f"tensor {name!r} cannot be mapped ({err})") from None
    if names is not None:
        missing = sorted(set(names) - set(out))
        if missing:
            raise ValueError(f"{path}: missing tensor(s) {missing}; it holds {sorted(header)}")
    return out, meta


def load_samples(path: str | os.PathLike) -> np.ndarray:
    """The images ``arr_0`` uint8 ``(n, H, W, C)`` of a sample ``.npz`` (ADM's layout; ``C`` 1 or 3), read
    whole with ``allow_pickle=False`` (the zip's CRC is checked on the way). A damaged or truncated file, an
    object array or another layout raise :class:`~mmfm.recover.CorruptArtifact` naming the file."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if "arr_0" not in z.files:
                raise CorruptArtifact(path, f"no array 'arr_0' (it holds {sorted(z.files)})")
            images = z["arr_0"]
    except CorruptArtifact:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CorruptArtifact(path, f"not a readable .npz file ({type(err).__name__}: {err})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise CorruptArtifact(path, f"'arr_0' is {images.dtype} {images.shape}, expected uint8 (n, H, W, 3)")
    return images


# ------------------------------------------------------------------------------------------------ fingerprints

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
    """sha256 (hex) of a file, reading little: its size and, for a Parquet shard, its footer (schema, key-value
    metadata, each column chunk's offsets, sizes and statistics), else its safetensors header and first MiB of
    data. Not its name: a renamed copy has the same fingerprint (:mod:`mmfm.data.fingerprint`)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(f"{size}\0".encode())
    with open(path, "rb") as f:
        h.update(_parquet_footer(f, size, path) if path.suffix == ".parquet" else _safetensors_head(f, size, path))
    return h.hexdigest()
