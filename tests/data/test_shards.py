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
