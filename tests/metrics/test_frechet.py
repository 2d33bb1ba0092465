import os
import zipfile

import numpy as np
import pytest
import torch
from pytorch_fid.fid_score import calculate_frechet_distance

from mmfm.metrics.frechet import FeatureStats, frechet_distance, frechet_distance_of, load_stats, save_stats


def features(seed=0, n=600, d=7, offset=1e4):
    """Correlated rows far from the origin (a naive E[xx^T] - mm^T would lose digits)."""
    rng = np.random.default_rng(seed)
    return offset + rng.standard_normal((n, d)) @ rng.standard_normal((d, d))


@pytest.mark.parametrize("sizes", [[600], [1] * 600, [0, 2, 598], [299, 0, 301], [7, 93, 250, 250]])
def test_feature_stats_in_batches_equal_numpy_on_the_concatenation(sizes):
    x = features()
    stats = FeatureStats(x.shape[1])
    for part in np.split(x, np.cumsum(sizes)[:-1]):
        stats.update(part)
    assert stats.n == len(x)
    np.testing.assert_allclose(stats.mu, x.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)


def test_feature_stats_merge_of_workers_equals_one_pass_and_accepts_float32_tensors():
    x = features(1)
    whole = FeatureStats(7).update(x)
    a = FeatureStats(7).update(torch.from_numpy(x[:100]))
    b = FeatureStats(7).update(x[100:350]).update(x[350:])
    merged = a.merge(b).merge(FeatureStats(7))
    assert merged.n == whole.n == 600
    np.testing.assert_allclose(merged.mu, whole.mu, rtol=1e-13)
    np.testing.assert_allclose(merged.sigma, whole.sigma, rtol=1e-9)
    x32 = x[:50].astype(np.float32)  # accumulated in float64 from float32 rows
    np.testing.assert_allclose(FeatureStats(7).update(torch.from_numpy(x32)).sigma,
                               np.cov(x32.astype(np.float64), rowvar=False), rtol=1e-9)


def test_feature_stats_errors():
    stats = FeatureStats(3)
    with pytest.raises(ValueError, match="no rows"):
        stats.mu
    stats.update(np.ones((1, 3)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        stats.sigma
    with pytest.raises(ValueError, match=r"x: expected shape \(n, 3\)"):
        stats.update(np.ones((4, 2)))
    with pytest.raises(ValueError, match="finite"):
        stats.update(np.full((2, 3), np.nan))
    with pytest.raises(ValueError, match="FeatureStats of dim 3"):
        stats.merge(FeatureStats(4))


def test_distance_of_a_set_to_itself_is_zero_and_to_a_shift_is_the_squared_shift():
    x = features(2, n=500, d=16, offset=3.0)
    assert abs(frechet_distance_of(x, x)) < 1e-6
    shift = np.linspace(-1, 2, 16)
    # equal covariances: only |mu1 - mu2|^2 remains
    assert frechet_distance_of(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-8)
    assert frechet_distance_of(x, x[::-1]) == pytest.approx(0.0, abs=1e-6)  # order-free


@pytest.mark.filterwarnings("ignore:.*disp.*:DeprecationWarning")  # pytorch-fid called directly
def test_equals_pytorch_fid_on_a_known_pair():
    a, b = features(3, n=400, d=5, offset=0.0), 0.5 + 2.0 * features(4, n=300, d=5, offset=0.0)
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    expected = calculate_frechet_distance(mu1, s1, mu2, s2)
    assert expected > 1.0
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance_of(a, b) == pytest.approx(expected, rel=1e-9)


def test_equals_the_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(5)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    v1, v2 = rng.uniform(0.1, 3.0, 12), rng.uniform(0.1, 3.0, 12)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(closed, rel=1e-9)
    # by hand in one dimension: N(0, 1) vs N(3, 4): 9 + 1 + 4 - 2 * 2 = 10
    assert frechet_distance([0.0], [[1.0]], [3.0], [[4.0]]) == pytest.approx(10.0, rel=1e-12)


def test_frechet_distance_shape_errors():
    eye = np.eye(3)
    with pytest.raises(ValueError, match=r"sigma1: expected shape \(3, 3\)"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), eye)
    with pytest.raises(ValueError, match="mu1, mu2: expected the same dimension"):
        frechet_distance(np.zeros(3), eye, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"mu2: expected shape \(D,\)"):
        frechet_distance(np.zeros(3), eye, np.zeros((3, 1)), eye)
    with pytest.raises(ValueError, match=r"features_b: expected shape \(n, 3\)"):
        frechet_distance_of(np.zeros((5, 3)), np.zeros((5, 4)))


def test_stats_file_round_trip_is_exact_and_readable_as_a_plain_npz(tmp_path):
    x = features(6, n=50, d=4)
    stats = FeatureStats(4).update(x)
    path = tmp_path / "sub" / "ref"  # no .npz suffix: written to exactly this name
    assert save_stats(path, stats.mu, stats.sigma, {"n": 50, "source": "test"}) == path
    assert sorted(os.listdir(path.parent)) == ["ref"]  # no temporary file left behind
    loaded = load_stats(path)
    assert np.array_equal(loaded.mu, stats.mu) and np.array_equal(loaded.sigma, stats.sigma)
    assert loaded.meta == {"n": 50, "source": "test"}
    with np.load(path, allow_pickle=False) as npz:  # what pytorch-fid and ADM's evaluator read
        assert np.array_equal(npz["mu"], stats.mu) and npz["sigma"].dtype == np.float64


def test_adm_reference_batch_with_extra_keys_loads(tmp_path):
    rng = np.random.default_rng(7)
    mu, a = rng.standard_normal(6), rng.standard_normal((6, 6))
    sigma = a @ a.T
    path = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(path, arr_0=rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8), mu=mu.astype(np.float64),
             sigma=sigma, mu_s=np.zeros(3), sigma_s=np.eye(3))
    loaded = load_stats(path)
    assert np.array_equal(loaded.mu, mu) and np.array_equal(loaded.sigma, sigma) and loaded.meta == {}


def test_missing_mu_and_mismatched_shapes_are_named_errors(tmp_path):
    path = tmp_path / "nomu.npz"
    np.savez(path, sigma=np.eye(3), arr_0=np.zeros(2))
    with pytest.raises(ValueError, match=r"nomu\.npz: no 'mu' array .*'arr_0', 'sigma'"):
        load_stats(path)
    path = tmp_path / "shapes.npz"
    np.savez(path, mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match=r"shapes\.npz: sigma: expected shape \(3, 3\)"):
        load_stats(path)
    path = tmp_path / "plain.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(ValueError, match=r"plain\.npy: not an \.npz"):
        load_stats(path)
    with pytest.raises(ValueError, match=r"absent\.npz: no such"):
        load_stats(tmp_path / "absent.npz")


class _Trap:
    """Unpickling this calls os.mkdir(path): proof that something was unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_loading_never_unpickles(tmp_path):
    trap = tmp_path / "unpickled"
    mu = np.empty(2, dtype=object)
    mu[:] = [_Trap(str(trap)), 0.0]
    path = tmp_path / "evil.npz"
    np.savez(path, mu=mu, sigma=np.eye(2))
    with zipfile.ZipFile(path) as zf:
        assert b"mkdir" in zf.read("mu.npy")  # the file really holds a pickle
    with pytest.raises(ValueError, match=r"evil\.npz: cannot read reference statistics without unpickling"):
        load_stats(path)
    assert not trap.exists()


@pytest.mark.filterwarnings("ignore:.*disp.*:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_equals_pytorch_fid_with_constant_features():
    """Rank-deficient covariances (the demo's constant border pixels): the same number as pytorch-fid's."""
    a, b = features(5, n=300, d=6, offset=0.0), 1.5 * features(6, n=200, d=6, offset=0.3)
    a[:, 2], b[:, 2] = 0.0, 0.0  # a constant feature: singular covariances
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    assert frechet_distance(mu1, s1, mu2, s2) == float(calculate_frechet_distance(mu1, s1, mu2, s2))


def test_the_distance_needs_neither_pytorch_fid_nor_torchvision():
    """Jobs that only compute distances (evaluate, train's fd.csv, report) do not pay pytorch-fid's import of
    torchvision (and torch._dynamo): seconds of every job's start-up."""
    import subprocess
    import sys

    code = ("import sys, mmfm.train.evaluate, mmfm.report; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'pytorch_fid', 'torchvision'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
