import os

import numpy as np
import pandas as pd
import pytest

from mmfm.data import shards


def make(tmp_path, name="a.parquet", n=50, seed=0):
    rng = np.random.default_rng(seed)
    cols = {"image_id": np.arange(n), "label": rng.integers(0, 3, n).astype(np.int32),
            "cls": rng.standard_normal((n, 5)).astype(np.float32),
            "tokens": rng.standard_normal((n, 6, 4)).astype(np.float16)}
    path = tmp_path / name
    shards.write_shard(path, cols, {"encoder": "pixels", "grid": [2, 3], "token_dim": 4}, row_group_rows=16)
    return path, cols


def test_roundtrip_row_group_order_and_zero_copy(tmp_path):
    path, cols = make(tmp_path)
    assert shards.read_metadata(path)["grid"] == [2, 3] and shards.num_rows(path) == 50
    got = list(shards.iter_columns(path, ["cls", "tokens", "label"], rows=16))
    assert [len(b["cls"]) for b in got] == [16, 16, 16, 2]
    cls = np.concatenate([b["cls"] for b in got])
    tok = np.concatenate([b["tokens"] for b in got])
    assert np.array_equal(cls, cols["cls"]) and tok.dtype == np.float16
    assert np.array_equal(tok.reshape(50, 6, 4), cols["tokens"])
    assert not got[0]["cls"].flags.owndata and not got[0]["cls"].flags.writeable  # a view of Arrow memory
    df = pd.read_parquet(path)  # ordinary tools read it
    assert list(df.columns) == ["image_id", "label", "cls", "tokens"] and len(df) == 50


def test_resolve_file_folder_glob_and_errors(tmp_path):
    a, _ = make(tmp_path, "a.parquet")
    b, _ = make(tmp_path, "b.parquet")
    assert shards.resolve(a) == [a]
    assert shards.resolve(tmp_path) == [a, b]
    assert shards.resolve(str(tmp_path / "*.parquet")) == [a, b]
    with pytest.raises(ValueError, match="no such file"):
        shards.resolve(tmp_path / "none*.parquet")
    with pytest.raises(ValueError, match="named twice"):
        shards.resolve([a, tmp_path])
    with pytest.raises(ValueError, match=r"no column\(s\) \['x'\]"):
        next(shards.iter_columns(a, ["x"]))
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="junk.parquet: not a readable Parquet file"):
        shards.read_metadata(tmp_path / "junk.parquet")


def test_write_is_atomic(tmp_path):
    with pytest.raises(ValueError, match="expected 3 rows"):
        shards.write_shard(tmp_path / "x.parquet", {"a": np.zeros(3), "b": np.zeros(4)}, {})
    assert list(tmp_path.iterdir()) == []


def flip_byte_in_page(path, column="tokens", group=1):
    """Flip one byte in the middle of a data page of ``column`` in row group ``group``."""
    import pyarrow.parquet as pq

    md = pq.read_metadata(path)
    names = [md.row_group(group).column(i).path_in_schema for i in range(md.num_columns)]
    chunk = md.row_group(group).column(names.index(column))
    at = chunk.data_page_offset + chunk.total_compressed_size // 2
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


def in_results(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results" / "shards").mkdir(parents=True)
    return make(tmp_path / "results" / "shards", "shard-0003.parquet")


def test_a_flipped_byte_in_a_page_is_caught_by_its_checksum(tmp_path, monkeypatch):
    path, _ = in_results(tmp_path, monkeypatch)
    flip_byte_in_page(path)
    cmd = "snakemake --cores all --forcerun results/shards/shard-0003.parquet"
    with pytest.raises(shards.CorruptArtifact, match="CRC checksum verification failed") as e:
        for _ in shards.iter_columns(path, ["cls", "tokens", "label"], rows=16):
            pass
    assert str(e.value).startswith(f"{path}: damaged Parquet data") and str(e.value).endswith(cmd)
    with pytest.raises(shards.CorruptArtifact, match="CRC"):
        shards.verify_shard(path, required=False)
    shards.count_originals(path)  # other columns still read


def test_truncated_shard_is_named_with_the_rebuild_command(tmp_path, monkeypatch):
    path, _ = in_results(tmp_path, monkeypatch)
    os.truncate(path, path.stat().st_size // 2)
    for read in (shards.read_metadata, shards.open_file, shards.num_rows, shards.count_originals,
                 lambda p: next(shards.iter_columns(p, ["cls"]))):
        with pytest.raises(shards.CorruptArtifact, match="magic bytes") as e:
            read(path)
        assert str(e.value).startswith(f"{path}: not a readable Parquet file")
        assert str(e.value).endswith("--forcerun results/shards/shard-0003.parquet")
    path.unlink()
    with pytest.raises(shards.CorruptArtifact, match="no such file; .*--forcerun results/shards/shard-0003.parquet"):
        shards.open_file(path)


def test_verify_shard_checks_metadata_columns_and_rows(tmp_path):
    path, cols = make(tmp_path)
    with pytest.raises(shards.CorruptArtifact, match=r"metadata lacks \['cls_dim'\]"):
        shards.verify_shard(path)
    assert shards.verify_shard(path, required=False)["grid"] == [2, 3]
    meta = {"encoder": "pixels", "grid": [2, 3], "token_dim": 4, "cls_dim": 5}
    shards.write_shard(path, cols, meta, row_group_rows=16)
    assert shards.verify_shard(path) == meta
    shards.write_shard(path, cols, {**meta, "token_dim": 3})
    with pytest.raises(shards.CorruptArtifact, match="column 'tokens' holds 24 values per row, its metadata says 18"):
        shards.verify_shard(path)
    shards.write_shard(path, cols, {**meta, "rows": 49})
    with pytest.raises(shards.CorruptArtifact, match="50 rows in its row groups, 50 in its footer, 49 in its metadata"):
        shards.verify_shard(path)
    shards.write_shard(path, {k: v for k, v in cols.items() if k != "label"}, meta)
    with pytest.raises(shards.CorruptArtifact, match=r"no column\(s\) \['label'\]"):
        shards.verify_shard(path)


def test_full_disk_names_the_shard_and_keeps_the_previous_one(tmp_path, monkeypatch):
    import collections
    import errno
    import shutil

    import pyarrow.parquet as pq

    from mmfm.io import DiskFull

    path, cols = make(tmp_path)
    before = path.read_bytes()

    def write_part(table, where, **kw):
        with open(where, "wb") as f:
            f.write(b"PAR1" + b"\0" * 100)
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
    monkeypatch.setattr(pq, "write_table", write_part)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 77))
    with pytest.raises(DiskFull) as e:
        make(tmp_path, seed=1)
    assert str(e.value).startswith(f"{path}: no space left on the device (needs ")
    assert "77 bytes free" in str(e.value) and e.value.needed > 50 * 6 * 4 * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet"] and path.read_bytes() == before
