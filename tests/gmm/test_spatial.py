import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from mmfm import io
from mmfm.data import shards
from mmfm.gmm import files
from mmfm.gmm.em import DiagonalGMM
from mmfm.config import shard_groups
from mmfm.gmm.spatial import METADATA_ALLOWANCE, partial_bytes, spatial_reduce, spatial_stats

H, W, D, DC, K = 2, 3, 4, 5, 9


def write_shards(folder, n_rows=(40, 25, 35), seed=0, encoder="pixels", grid=(H, W)):
    rng = np.random.default_rng(seed)
    paths, cls_all, tok_all = [], [], []
    for i, n in enumerate(n_rows):
        cls = (rng.standard_normal((n, DC)) + rng.integers(0, 3, (n, 1)) * 4).astype(np.float32)
        tok = rng.standard_normal((n, grid[0] * grid[1], D)).astype(np.float32) + 2.0
        p = folder / f"shard-{i:03d}.parquet"
        shards.write_shard(p, {"image_id": np.arange(n) + 1000 * i, "cls": cls, "tokens": tok},
                           {"encoder": encoder, "revision": "r1", "grid": list(grid), "token_dim": D, "cls_dim": DC},
                           row_group_rows=16)
        paths.append(p)
        cls_all.append(cls)
        tok_all.append(tok)
    return paths, np.concatenate(cls_all), np.concatenate(tok_all)


@pytest.fixture()
def setup(tmp_path):
    paths, cls, tok = write_shards(tmp_path)
    sk = GaussianMixture(K, covariance_type="diag", random_state=0).fit(cls)
    gmm_path = tmp_path / "cls.safetensors"
    files.save_cls_gmm(gmm_path, DiagonalGMM(sk.weights_, sk.means_, sk.covariances_), {})
    return tmp_path, paths, cls, tok, sk, gmm_path


def direct(tok, labels, flip, cov):
    """Float64 per-mode statistics of the concatenated data."""
    x = tok.astype(np.float64)
    if flip:
        mirror = x.reshape(-1, H, W, D)[:, :, ::-1].reshape(x.shape)
        x, labels = np.concatenate([x, mirror]), np.concatenate([labels, labels])
    counts = np.bincount(labels, minlength=K)
    means = np.zeros((K, H * W, D))
    var = np.zeros((K, H * W, D)) if cov == "diag" else np.zeros(K)
    for k in range(K):
        if counts[k]:
            xs = x[labels == k]
            means[k] = xs.mean(0)
            var[k] = xs.var(0) if cov == "diag" else xs.var(0).mean()
    gm = x.mean(0)
    empty = counts == 0
    means[empty] = gm
    var[empty] = x.var(0) if cov == "diag" else x.var(0).mean()
    return counts, means, var


def run(tmp, groups, gmm_path, order=None, flip=False, cov="spherical", tag="a", **kw):
    parts = []
    for i, g in enumerate(groups):
        out = tmp / f"{tag}-part{i}.safetensors"
        spatial_stats(g, gmm_path, out, flip=flip, covariance=cov, rows=7)
        parts.append(out)
    if order is not None:
        parts = [parts[i] for i in order]
    out = tmp / f"{tag}-spatial.safetensors"
    side = spatial_reduce(parts, out, **kw)
    t, meta = io.open_tensors(out)
    return {k: np.array(v) for k, v in t.items()}, side


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("cov", ["spherical", "diag"])
def test_map_reduce_equals_direct_float64(setup, flip, cov):
    tmp, paths, cls, tok, sk, gmm_path = setup
    counts, means, var = direct(tok, sk.predict(cls), flip, cov)
    got, side = run(tmp, [[p] for p in paths], gmm_path, flip=flip, cov=cov, tag=f"{flip}{cov}")
    assert np.array_equal(got["counts"], counts)
    np.testing.assert_allclose(got["means"], means, rtol=1e-6)   # stored float32
    np.testing.assert_allclose(got["variances"], var, rtol=1e-6)
    np.testing.assert_allclose(got["weights"], sk.weights_ / sk.weights_.sum(), rtol=1e-6)
    assert side["empty_modes"] == int((counts == 0).sum()) and side["samples"] == counts.sum()
    assert got["means"].shape == (K, H * W, D)


def test_any_split_and_order(setup):
    tmp, paths, cls, tok, sk, gmm_path = setup
    one, _ = run(tmp, [paths], gmm_path, tag="one", cov="diag")
    three, _ = run(tmp, [[p] for p in paths], gmm_path, tag="three", cov="diag")
    mixed, _ = run(tmp, [[paths[2], paths[0]], [paths[1]]], gmm_path, tag="mixed", cov="diag")
    rev, _ = run(tmp, [[p] for p in paths], gmm_path, order=[2, 0, 1], tag="rev", cov="diag")
    for other in (three, mixed):
        np.testing.assert_allclose(other["means"], one["means"], rtol=1e-6)
        np.testing.assert_allclose(other["variances"], one["variances"], rtol=1e-5)
        assert np.array_equal(other["counts"], one["counts"])
    for key in three:  # the order partials are given in changes no bit
        assert np.array_equal(rev[key], three[key])


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("cov", ["spherical", "diag"])
def test_partial_bytes_is_the_file_size(setup, flip, cov):
    tmp, paths, cls, tok, sk, gmm_path = setup
    groupings = [[[p] for p in paths], [paths], [[paths[0], paths[1]], [paths[2]]],
                 [[paths[i] for i in r] for r in shard_groups(len(paths), 2)]]
    for j, groups in enumerate(groupings):
        for i, g in enumerate(groups):
            out = tmp / f"size-{flip}-{cov}-{j}-{i}.safetensors"
            meta = spatial_stats(g, gmm_path, out, flip=flip, covariance=cov, rows=7)
            size = out.stat().st_size
            _, on_disk, _ = io.read_header(out)
            m = meta["modes_touched"]
            assert partial_bytes(m, H * W, D, cov, k=K, meta=on_disk) == size
            assert partial_bytes(m, H * W, D, cov, k=K, meta=meta) == size
            bound = partial_bytes(m, H * W, D, cov, k=K)  # no metadata given: an allowance for it
            assert size < bound <= size + METADATA_ALLOWANCE + 8
            data = 8 * (2 * m + K) + 8 * m * H * W * D * (2 if cov == "diag" else 1) + (0 if cov == "diag" else 8 * m)
            assert 0 < size - data < 4096  # the header


def test_groups_order_and_double_counting(setup):
    tmp, paths, cls, tok, sk, gmm_path = setup
    a, b = tmp / "ga.safetensors", tmp / "gb.safetensors"
    spatial_stats([paths[2], paths[0], paths[1]], gmm_path, a, flip=True, covariance="diag", rows=7)
    spatial_stats(tmp, gmm_path, b, flip=True, covariance="diag", rows=7)  # the folder: sorted by name
    assert a.read_bytes() == b.read_bytes()  # the order a group's shards are given in changes no bit
    groups = [[paths[i] for i in r] for r in shard_groups(len(paths), 2)]
    fwd, _ = run(tmp, groups, gmm_path, cov="diag", tag="g2")
    rev, side = run(tmp, groups, gmm_path, cov="diag", order=[1, 0], tag="g2rev")
    for key in fwd:
        assert np.array_equal(rev[key], fwd[key])
    assert side["partials"] == ["g2rev-part0.safetensors", "g2rev-part1.safetensors"]
    assert side["shards"] == [p.name for p in paths]
    one, _ = run(tmp, [[p] for p in paths], gmm_path, cov="diag", tag="g1")
    np.testing.assert_allclose(fwd["means"], one["means"], rtol=1e-6)
    np.testing.assert_allclose(fwd["variances"], one["variances"], rtol=1e-5)
    assert np.array_equal(fwd["counts"], one["counts"])
    c = tmp / "gc.safetensors"
    spatial_stats([paths[0], paths[1]], gmm_path, c, flip=False, covariance="diag", rows=7)
    with pytest.raises(ValueError, match="shard shard-001.parquet was already counted in .*g2-part1"):
        spatial_reduce([tmp / "g2-part1.safetensors", c], tmp / "out.safetensors")  # groups (0), (1, 2)
    assert not (tmp / "out.safetensors").exists()


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("cov", ["spherical", "diag"])
def test_accumulator_blocks_change_no_bit(setup, monkeypatch, flip, cov):
    from mmfm.gmm import spatial

    tmp, paths, cls, tok, sk, gmm_path = setup
    files_ = []
    for modes_per_block in (None, 2, 1):  # one block; blocks of 2 modes; of 1
        if modes_per_block:
            monkeypatch.setattr(spatial, "_BLOCK_BYTES", 8 * H * W * D * modes_per_block)
        out = tmp / f"blocks-{modes_per_block}.safetensors"
        spatial_stats(paths, gmm_path, out, flip=flip, covariance=cov, rows=7)
        files_.append(out.read_bytes())
    assert files_[1] == files_[0] and files_[2] == files_[0]


def test_partials_are_exact_float64_sums(setup):
    tmp, paths, cls, tok, sk, gmm_path = setup
    out = tmp / "p.safetensors"
    spatial_stats(paths[0], gmm_path, out)
    t, meta = io.open_tensors(out)
    lab = sk.predict(cls[:40])
    x = tok[:40].astype(np.float64)
    assert list(t["modes"]) == sorted(set(lab))
    for j, k in enumerate(t["modes"]):
        np.testing.assert_allclose(t["sum"][j], x[lab == k].sum(0), rtol=1e-13)
        np.testing.assert_allclose(t["sumsq"][j], (x[lab == k] ** 2).sum(), rtol=1e-13)
    assert t["sum"].dtype == np.float64 and meta["rows"] == 40 and meta["encoder"] == "pixels"


def test_flip_gives_exactly_mirror_symmetric_means(setup):
    tmp, paths, cls, tok, sk, gmm_path = setup
    got, _ = run(tmp, [[p] for p in paths], gmm_path, flip=True, cov="diag", tag="flip")
    grid = got["means"].reshape(K, H, W, D)
    assert np.array_equal(grid, grid[:, :, ::-1])
    vgrid = got["variances"].reshape(K, H, W, D)
    assert np.array_equal(vgrid, vgrid[:, :, ::-1])


def test_counts_weights_and_sidecar(setup):
    tmp, paths, cls, tok, sk, gmm_path = setup
    got, side = run(tmp, [paths], gmm_path, tag="cw", weights="counts")
    np.testing.assert_allclose(got["weights"], got["counts"] / got["counts"].sum())
    on_disk = json.loads((tmp / "cw-spatial.json").read_text())
    assert on_disk["weights_from"] == "counts" and on_disk["k"] == K and on_disk["grid"] == [H, W]
    src = files.load_source(tmp / "cw-spatial.safetensors")
    assert src.event_shape == (H * W, D) and src.covariance == "spherical"


def test_reduce_refuses_mixed_partials(setup):
    tmp, paths, cls, tok, sk, gmm_path = setup
    a = tmp / "a.safetensors"
    spatial_stats(paths[0], gmm_path, a)
    # another CLS mixture (different K)
    sk2 = GaussianMixture(K - 1, covariance_type="diag", random_state=0).fit(cls)
    other = tmp / "cls2.safetensors"
    files.save_cls_gmm(other, DiagonalGMM(sk2.weights_, sk2.means_, sk2.covariances_), {})
    b = tmp / "b.safetensors"
    spatial_stats(paths[1], other, b)
    with pytest.raises(ValueError, match=r"b\.safetensors: k is 8 but .*a\.safetensors has 9"):
        spatial_reduce([a, b], tmp / "out.safetensors")
    # another encoder
    enc = tmp / "enc"
    enc.mkdir()
    p_enc, _, _ = write_shards(enc, n_rows=(10,), encoder="dinov2")
    c = tmp / "c.safetensors"
    spatial_stats(p_enc, gmm_path, c)
    with pytest.raises(ValueError, match="encoder is 'dinov2' but"):
        spatial_reduce([a, c], tmp / "out.safetensors")
    # the same shard counted twice
    d = tmp / "d.safetensors"
    spatial_stats(paths[0], gmm_path, d)
    with pytest.raises(ValueError, match="shard shard-000.parquet was already counted"):
        spatial_reduce([a, d], tmp / "out.safetensors")
    assert not (tmp / "out.safetensors").exists()


def test_stats_refuses_bad_shards(setup, tmp_path_factory):
    tmp, paths, cls, tok, sk, gmm_path = setup
    other = tmp_path_factory.mktemp("g")
    (p,), _, _ = write_shards(other, n_rows=(5,), grid=(3, 2))
    with pytest.raises(ValueError, match="shard-000.parquet is already in this group"):
        spatial_stats([paths[0], p], gmm_path, tmp / "x.safetensors")  # partials tell shards apart by name
    p = p.rename(other / "odd.parquet")
    with pytest.raises(ValueError, match="shard layout differs"):
        spatial_stats([paths[0], p], gmm_path, tmp / "x.safetensors")
    wide = tmp_path_factory.mktemp("w") / "wide.parquet"
    shards.write_shard(wide, {"cls": np.zeros((3, DC + 1), np.float32), "tokens": np.zeros((3, H * W * D), np.float32)},
                       {"encoder": "pixels", "grid": [H, W], "token_dim": D})
    with pytest.raises(ValueError, match="wide.parquet: column 'cls': rows have 6 features but the mixture has 5"):
        spatial_stats(wide, gmm_path, tmp / "x.safetensors")
    assert not (tmp / "x.safetensors").exists()


def test_empty_modes_get_the_global_mean_and_variance(setup):
    tmp, paths, cls, tok, sk, gmm_path = setup
    far = DiagonalGMM(np.r_[sk.weights_ * 0.9, 0.1], np.vstack([sk.means_, np.full(DC, 1e3)]),
                      np.vstack([sk.covariances_, np.ones(DC)]))
    path = tmp / "far.safetensors"
    files.save_cls_gmm(path, far, {})
    got, side = run(tmp, [paths], path, tag="far")
    assert side["empty_modes"] >= 1 and got["counts"][K] == 0
    x = tok.astype(np.float64)
    np.testing.assert_allclose(got["means"][K], x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(got["variances"][K], x.var(0).mean(), rtol=1e-6)


def test_cli_map_and_reduce(setup, capsys):
    from mmfm.cli import main

    tmp, paths, cls, tok, sk, gmm_path = setup
    for i, p in enumerate(paths):
        assert main(["spatial-stats", "--shards", str(p), "--gmm", str(gmm_path), "--flip",
                     "--out", str(tmp / "parts" / f"{i}.safetensors"), "--json"]) == 0
    capsys.readouterr()
    out = tmp / "spatial.safetensors"
    assert main(["spatial-reduce", "--partials", str(tmp / "parts"), "--out", str(out), "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["samples"] == 2 * len(tok) and line["k"] == K
    assert main(["spatial-reduce", "--partials", str(tmp / "nothing"), "--out", str(tmp / "x.safetensors")]) == 2
    assert "nothing" in capsys.readouterr().err


# ------------------------------------------------------------------ stored mirrors: rows_from "all" / "originals"


def flip_grid(x):
    """The latent grid of ``x (n, H W, D)`` mirrored along its width, as ``spatial_stats`` flips it."""
    return x.reshape(-1, H, W, D)[:, :, ::-1].reshape(x.shape)


def interleave(a, b):
    """``a_0, b_0, a_1, b_1, ...`` along the rows."""
    return np.stack([a, b], 1).reshape(2 * len(a), *a.shape[1:])


def write_mirrored_shards(folder, n_images=(30, 21), seed=5):
    """Shards as ``mmfm encode`` writes them with ``shards.flip``: each image's row (flip false) followed by
    its mirror's row (flip true, same image_id). The mirror rows hold *another* CLS descriptor (another
    image's, so usually another mode) and tokens that are not the latent flip, so any use of them shows."""
    rng = np.random.default_rng(seed)
    paths, originals = [], []
    for i, n in enumerate(n_images):
        cls = (rng.standard_normal((n, DC)) + rng.integers(0, 3, (n, 1)) * 4).astype(np.float32)
        tok = (rng.standard_normal((n, H * W, D)) + 2.0).astype(np.float32)
        m_cls = cls[rng.permutation(n)] + np.float32(0.5)
        m_tok = (flip_grid(tok) + rng.standard_normal(tok.shape) * 3).astype(np.float32)
        p = folder / f"mirrored-{i:03d}.parquet"
        shards.write_shard(p, {"image_id": np.repeat(np.arange(n) + 1000 * i, 2), "flip": np.tile([False, True], n),
                               "cls": interleave(cls, m_cls), "tokens": interleave(tok, m_tok)},
                           {"encoder": "pixels", "revision": "r1", "grid": [H, W], "token_dim": D, "cls_dim": DC},
                           row_group_rows=16)
        paths.append(p)
        originals.append((cls, tok, m_cls, m_tok))
    cat = [np.concatenate([o[j] for o in originals]) for j in range(4)]
    return paths, cat


@pytest.fixture()
def mirrored(setup, tmp_path_factory):
    _, _, _, _, sk, gmm_path = setup
    folder = tmp_path_factory.mktemp("mirrored")
    paths, (cls, tok, m_cls, m_tok) = write_mirrored_shards(folder)
    return folder, paths, cls, tok, m_cls, m_tok, sk, gmm_path


@pytest.mark.parametrize("cov", ["spherical", "diag"])
def test_originals_with_flip_equal_direct_float64(mirrored, cov):
    """The release's statistics: per mode k, over the original rows i only (hard r_ik from their own CLS),

        n_k = 2 sum_i r_ik,  mu_k = sum_i r_ik (x_i + flip x_i) / n_k,
        var_k = sum_i r_ik ((x_i - mu_k)^2 + (flip x_i - mu_k)^2) / n_k   (diag; spherical: its mean over N D)

    computed here in numpy float64 (two-pass, centred), and the partial's sums against the module's formulas."""
    folder, paths, cls, tok, _, _, sk, gmm_path = mirrored
    x = tok.astype(np.float64).reshape(len(tok), -1)
    fx = flip_grid(tok.astype(np.float64)).reshape(len(tok), -1)
    r = np.eye(K)[sk.predict(cls)]                       # (n, K) hard responsibilities of the originals
    n_k = 2 * r.sum(0)
    full = n_k > 0
    mu = (r.T @ (x + fx))[full] / n_k[full, None]
    dev2 = np.stack([(r[:, k, None] * ((x - mu[j]) ** 2 + (fx - mu[j]) ** 2)).sum(0) for j, k in
                     enumerate(np.flatnonzero(full))]) / n_k[full, None]
    var = np.maximum(dev2 if cov == "diag" else dev2.mean(1), 1e-8)  # min_variance: a one-image mode's middle

    parts = []
    for i, p in enumerate(paths):
        out = folder / f"orig-{cov}-{i}.safetensors"
        meta = spatial_stats(p, gmm_path, out, flip=True, rows_from="originals", covariance=cov, rows=7)
        n_rows, n_orig = shards.count_originals(p)
        assert n_rows == 2 * n_orig == shards.num_rows(p)
        assert meta["rows_from"] == "originals" and meta["rows"] == n_orig and meta["skipped_rows"] == n_orig
        parts.append(out)
    # the partial sums, against the module's definitions (S_k, Q_k of x_i and flip x_i in the original's mode)
    t, _ = io.open_tensors(parts[0])
    n0 = shards.count_originals(paths[0])[1]
    lab0 = sk.predict(cls[:n0])
    assert list(t["modes"]) == sorted(set(lab0))
    for j, k in enumerate(t["modes"]):
        sel = lab0 == k
        assert t["counts"][j] == 2 * sel.sum()
        np.testing.assert_allclose(t["sum"][j].reshape(-1), (x[:n0][sel] + fx[:n0][sel]).sum(0), rtol=1e-13)
        sq = x[:n0][sel] ** 2 + fx[:n0][sel] ** 2
        np.testing.assert_allclose(np.asarray(t["sumsq"][j]).reshape(-1) if cov == "diag" else t["sumsq"][j],
                                   sq.sum(0) if cov == "diag" else sq.sum(), rtol=1e-13)
    out = folder / f"orig-{cov}.safetensors"
    side = spatial_reduce(parts, out)
    got, _ = io.open_tensors(out)
    assert np.array_equal(got["counts"], n_k.astype(np.int64))
    means = np.asarray(got["means"]).reshape(K, -1)
    np.testing.assert_allclose(means[full], mu, rtol=1e-6, atol=1e-6)              # stored float32
    variances = np.asarray(got["variances"]).reshape(K, -1) if cov == "diag" else np.asarray(got["variances"])
    np.testing.assert_allclose(variances[full], var, rtol=1e-5)
    grid = np.asarray(got["means"]).reshape(K, H, W, D)
    assert np.array_equal(grid, grid[:, :, ::-1])                                   # exactly mirror-symmetric
    assert side["rows_from"] == "originals" and side["rows"] == len(tok) and side["skipped_rows"] == len(tok)
    assert side["samples"] == 2 * len(tok)


def test_originals_never_read_the_stored_mirrors(mirrored, tmp_path):
    """rows_from 'originals' on shards with mirrors == rows_from 'all' on the same shards without them, bit for
    bit (the mirrors hold other descriptors and tokens, so any use of them would change the sums)."""
    _, paths, cls, tok, _, _, _, gmm_path = mirrored
    bare = []
    start = 0
    for p in paths:
        n = shards.count_originals(p)[1]
        q = tmp_path / p.name
        shards.write_shard(q, {"image_id": np.arange(n), "cls": cls[start:start + n], "tokens": tok[start:start + n]},
                           shards.read_metadata(p), row_group_rows=5)
        bare.append(q)
        start += n
    for flip in (False, True):
        a, b = tmp_path / f"a{flip}.safetensors", tmp_path / f"b{flip}.safetensors"
        spatial_stats(paths, gmm_path, a, flip=flip, rows_from="originals", covariance="diag", rows=7)
        spatial_stats(bare, gmm_path, b, flip=flip, rows_from="all", covariance="diag", rows=4)
        ta, ma = io.open_tensors(a)
        tb, mb = io.open_tensors(b)
        for key in ("modes", "counts", "sum", "sumsq", "cls_weights"):
            assert np.array_equal(ta[key], tb[key]), key
        assert ma["rows"] == mb["rows"] == len(tok) and ma["skipped_rows"] == len(tok) and mb["skipped_rows"] == 0


def test_all_rows_put_each_stored_mirror_in_its_own_mode(mirrored):
    folder, paths, cls, tok, m_cls, _, sk, gmm_path = mirrored
    out = folder / "all.safetensors"
    spatial_stats(paths, gmm_path, out, rows_from="all", rows=7)
    t, meta = io.open_tensors(out)
    every_cls, every_tok = [], []
    for p in paths:
        cols = next(shards.iter_columns(p, ["cls", "tokens"], rows=10**6))
        every_cls.append(cols["cls"])
        every_tok.append(cols["tokens"])
    lab = sk.predict(np.concatenate(every_cls))
    x = np.concatenate(every_tok).astype(np.float64)
    assert meta["rows"] == 2 * len(tok) and meta["skipped_rows"] == 0 and meta["rows_from"] == "all"
    assert list(t["modes"]) == sorted(set(lab))
    for j, k in enumerate(t["modes"]):
        assert t["counts"][j] == (lab == k).sum()
        np.testing.assert_allclose(t["sum"][j].reshape(-1), x[lab == k].sum(0), rtol=1e-13)
    assert (sk.predict(m_cls) != sk.predict(cls)).any()  # the mirrors' modes are their own, not the originals'


def test_rows_from_is_recorded_and_mixes_are_refused(mirrored, monkeypatch):
    from mmfm.gmm import spatial

    folder, paths, _, _, _, _, _, gmm_path = mirrored
    a, b = folder / "ra.safetensors", folder / "rb.safetensors"
    spatial_stats(paths[0], gmm_path, a, rows_from="originals")
    spatial_stats(paths[1], gmm_path, b, rows_from="all")
    with pytest.raises(ValueError, match=r"rows_from is 'all' but .*ra\.safetensors has 'originals'"):
        spatial_reduce([a, b], folder / "x.safetensors")
    assert not (folder / "x.safetensors").exists()
    # a partial written before rows_from existed counted every row: it sums with 'all', not with 'originals'
    read = io.read_header

    def legacy(path):  # rc.safetensors as written before the key
        header, meta, start = read(path)
        if Path(path).name == "rc.safetensors":
            meta = {k: v for k, v in meta.items() if k not in ("rows_from", "skipped_rows")}
        return header, meta, start

    monkeypatch.setattr(spatial.io, "read_header", legacy)
    c = folder / "rc.safetensors"
    spatial_stats(paths[0], gmm_path, c, rows_from="all")
    assert "rows_from" not in spatial.io.read_header(c)[1] and read(c)[1]["rows_from"] == "all"
    assert spatial_reduce([b, c], folder / "y.safetensors")["rows_from"] == "all"
    with pytest.raises(ValueError, match=r"rc\.safetensors: rows_from is 'all' but .*ra\.safetensors has 'orig"):
        spatial_reduce([a, c], folder / "z.safetensors")
    with pytest.raises(ValueError, match=r"rows_from: expected one of \['all', 'originals'\], got 'mirrors'"):
        spatial_stats(paths[0], gmm_path, folder / "w.safetensors", rows_from="mirrors")


def test_originals_need_the_flip_column(setup):
    tmp, paths, _, _, _, gmm_path = setup  # written without a flip column
    with pytest.raises(ValueError, match=r"shard-000\.parquet: no 'flip' column to tell the stored mirrors"):
        spatial_stats(paths[0], gmm_path, tmp / "x.safetensors", rows_from="originals")
    assert not (tmp / "x.safetensors").exists()


@pytest.mark.parametrize("cov", ["spherical", "diag"])
def test_partial_bytes_is_the_file_size_with_originals(mirrored, cov):
    folder, paths, _, _, _, _, _, gmm_path = mirrored
    for flip in (False, True):
        out = folder / f"osize-{cov}-{flip}.safetensors"
        meta = spatial_stats(paths, gmm_path, out, flip=flip, rows_from="originals", covariance=cov, rows=7)
        size = out.stat().st_size
        assert partial_bytes(meta["modes_touched"], H * W, D, cov, k=K, meta=meta) == size
        assert size < partial_bytes(meta["modes_touched"], H * W, D, cov, k=K) <= size + METADATA_ALLOWANCE + 8


def test_map_memory_of_originals_holds_half_the_batch_in_float64():
    """With stored mirrors, 'originals' keeps ceil(rows / 2) grids of a batch: reading 2R rows costs what
    reading R rows of every row costs, plus the 2R rows' extra shard-dtype bytes (the batch and the filtered
    copy); the accumulators do not change."""
    from mmfm.gmm.spatial import BASE_BYTES, map_memory_bytes

    n, d, m, k = 256, 768, 8192, 8192
    for cov in ("spherical", "diag"):
        for flip in (False, True):
            kw = {"k": k, "flip": flip, "shard_itemsize": 2}
            for r in (256, 512, 1024):  # batches above the 4096 x K posterior block
                orig = map_memory_bytes(m, n, d, cov, rows=2 * r, rows_from="originals", **kw)
                every = map_memory_bytes(m, n, d, cov, rows=r, rows_from="all", **kw)
                assert orig - every == n * d * 2 * (2 * r)
            acc = 8 * m * n * d * (2 if cov == "diag" else 1) + (0 if cov == "diag" else 8 * m)
            assert map_memory_bytes(m, n, d, cov, rows=1, rows_from="originals", **kw) == \
                BASE_BYTES + acc + 3 * 8 * 4096 * k  # one row's grids are below the posterior block
    # the presets: 8192 modes of 16 x 16 x 768, spherical, flip, 256 float16 rows a batch
    assert map_memory_bytes(m, n, d, "spherical", k=k, rows=256, flip=True, rows_from="originals") == \
        BASE_BYTES + 8 * m * n * d + 8 * m + n * d * (256 * 2 + 128 * (8 * 4 + 2))
    with pytest.raises(ValueError, match="rows_from: expected one of"):
        map_memory_bytes(m, n, d, "spherical", k=k, rows_from="some")


def _spoil(path, column, row, value=np.nan, dtype=np.float32):
    """Rewrite shard ``path`` with one value of ``column`` at ``row`` set to ``value`` (NaN by default)."""
    from mmfm.data.stream import read_shard

    meta = shards.read_metadata(path)
    names = [c for c in ("image_id", "flip", "cls", "tokens") if c in shards.open_file(path).schema_arrow.names]
    cols = {c: np.array(v) for c, v in read_shard(path, names).items()}
    cols[column].reshape(len(cols[column]), -1)[row, 1] = value
    cols["path"] = [f"c/{i}.png" for i in cols["image_id"]]
    shards.write_shard(path, cols, meta, row_group_rows=16)


@pytest.mark.parametrize("column", ["tokens", "cls"])
def test_stats_refuse_a_non_finite_row_naming_shard_and_row(setup, column):
    tmp, paths, cls, tok, sk, gmm_path = setup
    _spoil(paths[1], column, 19, np.inf if column == "cls" else np.nan)
    out = tmp / "x.safetensors"
    with pytest.raises(ValueError, match=rf"shard-001\.parquet row 19 \(image c/1019\.png\): {column} has 1 "
                                         r"non-finite values \(NaN/Inf\)\. mmfm encode leaves such an image out"):
        spatial_stats(paths, gmm_path, out, rows=7)
    assert not out.exists()


def test_stats_name_the_row_in_the_file_with_originals(mirrored, tmp_path):
    folder, paths, *_, gmm_path = mirrored
    _spoil(paths[1], "tokens", 2 * 13)  # the 14th original of the second shard, row 26 of its file
    with pytest.raises(ValueError, match=r"mirrored-001\.parquet row 26 \(image c/1013\.png\): tokens has 1 "):
        spatial_stats(paths, gmm_path, tmp_path / "x.safetensors", rows_from="originals", flip=True, rows=5)
    _spoil(paths[1], "tokens", 2 * 13, 1.0)  # repaired: the stored mirror's row is never read with originals
    _spoil(paths[1], "tokens", 2 * 13 + 1)
    spatial_stats(paths, gmm_path, tmp_path / "x.safetensors", rows_from="originals", flip=True, rows=5)


def test_reduce_refuses_a_partial_with_non_finite_sums_naming_it_and_the_mode(setup):
    tmp, paths, cls, tok, sk, gmm_path = setup
    parts = []
    for i, p in enumerate(paths):
        parts.append(tmp / f"p{i}.safetensors")
        spatial_stats(p, gmm_path, parts[-1])
    tensors, meta = io.open_tensors(parts[2])
    spoilt = {k: np.array(v) for k, v in tensors.items()}
    spoilt["sum"][1, 0, 2] = np.nan
    io.save_tensors(parts[2], spoilt, meta)
    out = tmp / "spatial.safetensors"
    with pytest.raises(ValueError, match=rf"p2\.safetensors: mode {int(spoilt['modes'][1])}: the partial's sums are "
                                         "not finite"):
        spatial_reduce(parts, out, block_modes=4)
    assert not out.exists() and not io.sidecar_path(out).exists()
