"""The CLS-GMM stage's rows (gmm.rows): all rows of the shards, or the originals only (stored mirrors left out)."""

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.mixture import GaussianMixture

from mmfm.data import shards
from mmfm.gmm import data as gdata
from mmfm.gmm import files
from mmfm.gmm.fit import fit_cls_gmm, open_input

DC, NTOK = 4, 6


def write_mirrored(folder, n_images=(23, 17), seed=0):
    """Shards as ``mmfm encode`` writes them with ``shards.flip``: image rows (flip false), each followed by its
    mirror (flip true) whose descriptor is far from every original (so a fit that saw them would differ)."""
    rng = np.random.default_rng(seed)
    paths, originals, every = [], [], []
    for i, n in enumerate(n_images):
        cls = (rng.standard_normal((n, DC)) + rng.integers(0, 3, (n, 1)) * 6).astype(np.float32)
        mirror = (rng.standard_normal((n, DC)) * 0.3 - 40).astype(np.float32)
        inter = np.stack([cls, mirror], 1).reshape(2 * n, DC)
        p = folder / f"shard-{i:04d}.parquet"
        shards.write_shard(p, {"image_id": np.repeat(np.arange(n), 2), "flip": np.tile([False, True], n),
                               "cls": inter, "tokens": rng.standard_normal((2 * n, NTOK)).astype(np.float16)},
                           {"encoder": "pixels", "grid": [1, NTOK], "token_dim": 1, "cls_dim": DC}, row_group_rows=8)
        paths.append(p)
        originals.append(cls)
        every.append(inter)
    return paths, np.concatenate(originals), np.concatenate(every)


@pytest.mark.parametrize("chunk", [3, 8, 1000])
def test_originals_are_exactly_the_unflipped_rows_in_order(tmp_path, chunk):
    paths, originals, every = write_mirrored(tmp_path)
    got = [x for _, x in gdata.ParquetRows(paths, rows="originals").chunks(chunk)]
    assert np.array_equal(np.concatenate(got), originals)
    assert all(0 < len(x) <= chunk for x in got)  # a batch left empty (a lone mirror) is not yielded
    assert np.array_equal(np.concatenate([x for _, x in gdata.ParquetRows(paths).chunks(chunk)]), every)
    where = [str(w) for w, _ in gdata.ParquetRows(paths, rows="originals").chunks(1000)]
    assert where == [f"{paths[0]} original rows 0..22", f"{paths[1]} original rows 0..16"]
    assert [shards.count_originals(p) for p in paths] == [(46, 23), (34, 17)]


def test_the_filter_reads_the_descriptor_and_flip_columns_only(tmp_path, monkeypatch):
    paths, originals, _ = write_mirrored(tmp_path)
    asked = []
    iter_batches = pq.ParquetFile.iter_batches

    def spy(self, *args, **kw):
        asked.append(tuple(kw.get("columns") or ()))
        return iter_batches(self, *args, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    assert len(np.concatenate([x for _, x in gdata.ParquetRows(paths, rows="originals").chunks()])) == len(originals)
    assert asked == [("cls", "flip")] * len(paths)  # never the tokens


def test_fit_on_originals_is_the_fit_on_the_original_rows(tmp_path):
    paths, originals, every = write_mirrored(tmp_path)
    npy = tmp_path / "originals.npy"
    np.save(npy, originals)
    kw = {"init": "kmeans", "max_iter": 30, "tol": 0.0, "seed": 1, "dtype": "float64", "plot": False,
          "progress": False}
    _, side = fit_cls_gmm(paths, 3, tmp_path / "o.safetensors", rows="originals", **kw)
    _, ref_side = fit_cls_gmm(npy, 3, tmp_path / "ref.safetensors", **kw)
    a, b = files.load_cls_gmm(tmp_path / "o.safetensors"), files.load_cls_gmm(tmp_path / "ref.safetensors")
    for key in ("weights", "means", "variances"):
        assert np.array_equal(getattr(a, key), getattr(b, key)), key   # bit for bit
    assert side["data"] == ref_side["data"] and side["data"]["rows"] == len(originals)  # the same rows, same digest
    assert side["settings"]["rows"] == "originals" and ref_side["settings"]["rows"] == "all"
    assert files.read_sidecar(tmp_path / "o.safetensors")["settings"]["rows"] == "originals"
    # against scikit-learn's fit of the originals (3 well-separated blobs): the same mixture
    sk = GaussianMixture(3, covariance_type="diag", random_state=0, n_init=3).fit(originals.astype(np.float64))
    order_a, order_sk = np.argsort(a.means[:, 0]), np.argsort(sk.means_[:, 0])
    np.testing.assert_allclose(a.weights[order_a], sk.weights_[order_sk], atol=1e-6)
    np.testing.assert_allclose(a.means[order_a], sk.means_[order_sk], rtol=1e-5, atol=1e-5)
    # all rows: twice as many, and the mirrors' far cluster takes a mode
    _, side_all = fit_cls_gmm(paths, 3, tmp_path / "all.safetensors", stream=True, **kw)
    assert side_all["data"]["rows"] == len(every) == 2 * len(originals)
    assert files.load_cls_gmm(tmp_path / "all.safetensors").means[:, 0].min() < -30 < a.means[:, 0].min()


def test_originals_need_shards_with_a_flip_column(tmp_path):
    paths, originals, _ = write_mirrored(tmp_path)
    npy = tmp_path / "x.npy"
    np.save(npy, originals)
    with pytest.raises(ValueError, match=r"rows: 'originals' needs Parquet shards .*/x\.npy is a \.npy array"):
        open_input(npy, rows="originals")
    bare = tmp_path / "bare.parquet"
    shards.write_shard(bare, {"cls": originals}, {"encoder": "pixels"})
    with pytest.raises(ValueError, match=r"bare\.parquet: no 'flip' column to tell the stored mirrors"):
        fit_cls_gmm(bare, 2, tmp_path / "b.safetensors", rows="originals", plot=False, progress=False)
    assert not (tmp_path / "b.safetensors").exists()
    with pytest.raises(ValueError, match=r"rows: expected one of \['all', 'originals'\], got 'mirrors'"):
        open_input(paths, rows="mirrors")


@pytest.mark.parametrize("rows", ["all", "originals"])
def test_a_non_finite_descriptor_is_named_by_shard_and_row(tmp_path, rows):
    """The fit's checking pass names the shard and the row's index in the file (not in the chunk, nor among
    the originals), whichever rows are fitted and however they are chunked."""
    from mmfm.data.stream import read_shard

    paths, _, _ = write_mirrored(tmp_path)
    p = paths[1]
    cols = {k: np.array(v) for k, v in read_shard(p, ("image_id", "flip", "cls", "tokens")).items()}
    cols["cls"][12, 3] = np.nan  # an original row (even): the 7th original of the file
    shards.write_shard(p, cols, shards.read_metadata(p), row_group_rows=8)
    with pytest.raises(ValueError, match=r"shard-0001\.parquet row 12: cls has 1 non-finite values \(NaN/Inf\)"):
        gdata.summarize(gdata.ParquetRows(paths, rows=rows), rows=5)
    with pytest.raises(ValueError, match=r"shard-0001\.parquet row 12: cls has 1 non-finite"):
        fit_cls_gmm(paths, 2, tmp_path / "cls.safetensors", rows=rows, max_iter=2, plot=False, progress=False)
    assert not (tmp_path / "cls.safetensors").exists()
