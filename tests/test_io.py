"""mmfm.io: damaged safetensors files are named with the command that rebuilds them; a full disk is an error
naming the file and the sizes, and leaves nothing half-written."""

import errno
import json
import os
import shutil
import struct
from collections import namedtuple

import numpy as np
import pytest

from mmfm import io
from mmfm.recover import CorruptArtifact

Usage = namedtuple("Usage", "total used free")


def tensors(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": rng.random(5), "m": rng.standard_normal((5, 3)).astype(np.float32), "c": np.arange(5)}


@pytest.fixture
def results(tmp_path, monkeypatch):
    """A results folder in the current directory (where snakemake would run)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results" / "gmm").mkdir(parents=True)
    return tmp_path / "results"


def test_truncated_file_is_named_with_the_rebuild_command(results):
    path = results / "gmm" / "spatial.safetensors"
    io.save_tensors(path, tensors(), {"kind": "x"})
    size = path.stat().st_size
    os.truncate(path, size - 1)
    with pytest.raises(CorruptArtifact) as e:
        io.read_header(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: not a complete safetensors file (truncated")
    assert f"the file has {size - 1}" in msg
    assert msg.endswith("snakemake --cores all --forcerun results/gmm/spatial.safetensors")
    with pytest.raises(CorruptArtifact, match="truncated"):
        io.open_tensors(path)  # every reader goes through the header check


def test_appended_bytes_garbled_header_and_bad_offsets_are_found(tmp_path):
    path = tmp_path / "x.safetensors"
    io.save_tensors(path, tensors())
    good = path.read_bytes()
    path.write_bytes(good + b"\0" * 8)
    with pytest.raises(CorruptArtifact, match="bytes after the last tensor"):
        io.read_header(path)
    bad = bytearray(good)
    bad[9] ^= 0xFF  # inside the JSON header
    path.write_bytes(bytes(bad))
    with pytest.raises(CorruptArtifact, match="JSON header does not parse"):
        io.read_header(path)
    # offsets that overlap, in a file of the right total size
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 12)
    with pytest.raises(CorruptArtifact, match="'b' starts at byte 4 of the buffer, the previous one ends at 8"):
        io.read_header(path)
    header["b"] = {"dtype": "F32", "shape": [3], "data_offsets": [8, 12]}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 12)
    with pytest.raises(CorruptArtifact, match=r"'b' \(F32 \[3\]\) spans 4 bytes, not 12"):
        io.read_header(path)


def test_file_outside_a_results_folder_gets_no_snakemake_command(tmp_path):
    path = tmp_path / "mine.safetensors"
    path.write_bytes(b"\1\2")
    with pytest.raises(CorruptArtifact, match="no output of the workflow") as e:
        io.read_header(path)
    assert "snakemake" not in str(e.value)
    with pytest.raises(ValueError, match="nope.safetensors: no such file$"):
        io.read_header(tmp_path / "nope.safetensors")


def test_missing_workflow_file_names_the_command(results):
    with pytest.raises(CorruptArtifact, match=r"no such file; .*--forcerun results/gmm/cls.safetensors$"):
        io.open_tensors(results / "gmm" / "cls.safetensors")


def test_tensor_file_is_allocated_before_it_is_mapped(tmp_path):
    path = tmp_path / "big.safetensors"
    with io.TensorFile(path, {"a": ((1 << 18,), np.float32)}) as f:
        tmp = next(tmp_path.glob(".big.safetensors.tmp*"))
        assert os.stat(tmp).st_blocks * 512 >= f.nbytes  # reserved, not a sparse file
        f["a"][:] = 1
        f.commit()
    assert path.stat().st_size == f.nbytes


def full_disk_at_allocate(monkeypatch, code=errno.ENOSPC):
    def fallocate(fd, offset, length):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 4096, 4096))


def test_full_disk_in_tensor_file_names_file_and_sizes_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "g.safetensors"
    io.save_tensors(path, tensors(0))
    before = path.read_bytes()
    full_disk_at_allocate(monkeypatch)
    f = io.TensorFile(path, {k: (v.shape, v.dtype) for k, v in tensors(1).items()})
    with pytest.raises(io.DiskFull) as e:
        with f:
            pytest.fail("the body must not run on a full disk")
    err = e.value
    assert err.errno == errno.ENOSPC and err.filename == str(path) and err.needed == f.nbytes and err.free == 4096
    assert str(err).startswith(f"{path}: no space left on the device (needs {f.nbytes} bytes, 4.1 kB (4096 bytes) free")
    assert isinstance(err, OSError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.safetensors"]  # no temporary file
    assert path.read_bytes() == before


def test_quota_is_named_as_such(tmp_path, monkeypatch):
    full_disk_at_allocate(monkeypatch, errno.EDQUOT)
    with pytest.raises(io.DiskFull, match="disk quota exceeded") as e:
        io.save_tensors(tmp_path / "q.safetensors", tensors())
    assert e.value.errno == errno.EDQUOT
    assert list(tmp_path.iterdir()) == []


def test_file_system_without_fallocate_falls_back(tmp_path, monkeypatch):
    def fallocate(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")
    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    path = tmp_path / "f.safetensors"
    io.save_tensors(path, tensors())
    back, _ = io.open_tensors(path)
    assert all(np.array_equal(back[k], v) for k, v in tensors().items())


def test_full_disk_in_atomic_writes_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "s.json"
    io.write_json(path, {"a": 1})

    def write_then_fail(self, text):
        with open(self, "w") as f:
            f.write(text[:3])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(type(path), "write_text", write_then_fail)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(100, 100, 0))
    with pytest.raises(io.DiskFull, match=r"s.json: no space left on the device \(needs more than 3 bytes, 0 bytes free"):
        io.write_json(path, {"a": 2, "b": "x" * 100})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"] and json.loads(path.read_text()) == {"a": 1}


def test_sidecar_first_restores_the_old_sidecar_when_the_tensors_fail(tmp_path, monkeypatch):
    path = tmp_path / "e.safetensors"
    with io.sidecar_first(path, {"v": 1}):
        io.save_tensors(path, tensors(), {"v": 1})
    full_disk_at_allocate(monkeypatch)
    with pytest.raises(io.DiskFull):
        with io.sidecar_first(path, {"v": 2}):
            io.save_tensors(path, tensors(), {"v": 2})
    assert io.read_sidecar(path, io.read_header(path)[1]) == {"v": 1}


def test_read_sidecar_checks_it_against_the_header(tmp_path):
    path = tmp_path / "c.safetensors"
    io.save_tensors(path, tensors(), {"k": 5, "x": float("nan")})
    meta = io.read_header(path)[1]
    assert io.read_sidecar(path, meta) == {}
    io.write_json(io.sidecar_path(path), {"k": 5, "x": float("nan"), "more": 1})
    assert io.read_sidecar(path, meta)["more"] == 1
    io.write_json(io.sidecar_path(path), {"k": 4, "x": float("nan")})
    with pytest.raises(CorruptArtifact, match=r"c.json: 'k' is 4 but c.safetensors records 5"):
        io.read_sidecar(path, meta)
    io.sidecar_path(path).write_text('{"k": 5')
    with pytest.raises(CorruptArtifact, match="c.json: not readable JSON"):
        io.read_sidecar(path, meta)


def test_load_samples(tmp_path):
    path = tmp_path / "nfe-2.npz"
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.savez(path, arr_0=images)
    assert np.array_equal(io.load_samples(path), images)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptArtifact, match="nfe-2.npz: not a readable .npz file"):
        io.load_samples(path)
    bad = bytearray(raw)
    bad[len(raw) // 2] ^= 0xFF  # inside arr_0's data
    path.write_bytes(bytes(bad))
    with pytest.raises(CorruptArtifact, match="CRC"):
        io.load_samples(path)
    np.savez(path, arr_0=np.array([{"x": 1}], dtype=object))
    with pytest.raises(CorruptArtifact, match="not a readable .npz"):
        io.load_samples(path)  # never unpickled
    np.savez(path, arr_0=images.astype(np.float32))
    with pytest.raises(CorruptArtifact, match=r"'arr_0' is float32 \(4, 8, 8, 3\), expected uint8"):
        io.load_samples(path)
