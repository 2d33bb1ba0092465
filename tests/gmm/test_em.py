import warnings

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from mmfm.gmm import data as gdata
from mmfm.gmm import em
from mmfm.gmm.em import DiagonalGMM, fit_em, mean_log_likelihood
from mmfm.gmm.init import initialize


class GivenStart(GaussianMixture):
    """scikit-learn's EM started exactly from weights_init / means_init / precisions_init."""

    def _initialize_parameters(self, X, random_state, xp=None):
        self._initialize(X, None)


def sklearn_em(x, init: DiagonalGMM, iters, reg_covar=1e-6):
    sk = GivenStart(init.k, covariance_type="diag", max_iter=iters, tol=0.0, reg_covar=reg_covar,
                    weights_init=init.weights, means_init=init.means, precisions_init=1.0 / init.variances)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.fit(x)
    return sk


def blobs(seed=0, n=3000, d=6, k=8, offset=20.0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)) * 4 + offset
    scales = rng.uniform(0.3, 2.0, (k, d))
    z = rng.integers(0, k, n)
    return centres[z] + scales[z] * rng.standard_normal((n, d))


def anisotropic(seed=1):
    """Features on scales from 1e-3 to 1e3."""
    x = blobs(seed, n=2500, d=5, k=6, offset=0.0)
    return x * np.logspace(-3, 3, 5)


def degenerate(seed=2):
    """A point mass of 200 identical rows, near-duplicate rows, and a cluster with fewer rows than dims."""
    rng = np.random.default_rng(seed)
    x = blobs(seed, n=1500, d=6, k=4)
    point = np.full((200, 6), 3.0)
    dups = np.repeat(rng.standard_normal((20, 6)) * 5, 10, axis=0) + 1e-9 * rng.standard_normal((200, 6))
    few = rng.standard_normal((4, 6)) * 0.1 - 30
    return np.concatenate([x, point, dups, few])


@pytest.mark.parametrize("make, k", [(blobs, 8), (anisotropic, 6), (degenerate, 10)])
def test_agrees_with_sklearn_after_20_iterations_float64(make, k):
    x = make()
    init = initialize(x, k, "from-data", seed=3, dtype="float64")
    ours = fit_em(x, init, max_iter=20, tol=0.0, dtype="float64", min_count=0.0)
    sk = sklearn_em(x, init, 20)
    assert ours.n_iter == 20
    # the log-likelihood trace and the final mean log-likelihood
    np.testing.assert_allclose(ours.loglik, sk.lower_bounds_, rtol=1e-4)
    ll_sk = sk.score(x)
    assert abs(ours.final_loglik - ll_sk) <= 1e-4 * abs(ll_sk)
    np.testing.assert_allclose(ours.gmm.weights, sk.weights_, rtol=1e-3)
    np.testing.assert_allclose(ours.gmm.variances, sk.covariances_, rtol=1e-3)
    scale = np.abs(sk.means_).max(axis=0)  # relative to each feature's magnitude
    assert (np.abs(ours.gmm.means - sk.means_) <= 1e-3 * scale).all()


def test_float32_path_tracks_float64_on_uncentred_data():
    x = blobs(4, offset=1000.0)  # far from the origin: the expanded quadratic needs the centring
    init = initialize(x, 8, "from-data", seed=0, dtype="float64")
    r64 = fit_em(x, init, max_iter=15, tol=0.0, dtype="float64")
    r32 = fit_em(x.astype(np.float32), init, max_iter=15, tol=0.0, dtype="float32")
    assert abs(r32.final_loglik - r64.final_loglik) <= 1e-5 * abs(r64.final_loglik)
    np.testing.assert_allclose(r32.gmm.weights, r64.gmm.weights, rtol=1e-3)


def test_loglik_never_decreases_and_tol_stops_early():
    x = blobs(5)
    init = initialize(x, 8, "k-means++", seed=0, dtype="float64")
    r = fit_em(x, init, max_iter=200, tol=1e-6, dtype="float64")
    gains = np.diff(r.loglik)
    assert (gains >= -1e-9).all()          # EM monotonicity
    assert r.converged and r.n_iter < 200 and abs(gains[-1]) < 1e-6
    assert abs(gains[-2]) >= 1e-6           # it did not stop one iteration late


@pytest.mark.parametrize("sizes", [[1] * 50 + [2950], [7] * 400 + [200], [1000, 1000, 1000], [2999, 1]])
def test_streaming_chunks_give_the_in_memory_result(sizes):
    x = blobs(6).astype(np.float32)
    init = initialize(x, 8, "from-data", seed=1)
    ref = fit_em(x, init, max_iter=8, tol=0.0, block_rows=512)
    bounds = np.cumsum([0, *sizes])
    chunks = lambda: (x[a:b] for a, b in zip(bounds[:-1], bounds[1:]))  # noqa: E731
    got = fit_em(chunks, init, max_iter=8, tol=0.0, block_rows=512)
    # the same blocks whatever the chunking: the same bits
    np.testing.assert_array_equal(got.gmm.means, ref.gmm.means)
    np.testing.assert_array_equal(got.gmm.variances, ref.gmm.variances)
    assert got.loglik == ref.loglik


def test_block_size_changes_only_rounding():
    x = blobs(7).astype(np.float32)
    init = initialize(x, 8, "from-data", seed=1)
    a = fit_em(x, init, max_iter=8, tol=0.0, block_rows=100)
    b = fit_em(x, init, max_iter=8, tol=0.0, block_rows=3000)
    np.testing.assert_allclose(a.gmm.means, b.gmm.means, rtol=1e-5, atol=1e-5)
    assert abs(a.final_loglik - b.final_loglik) < 1e-5 * abs(b.final_loglik)


def test_threads_do_not_change_bits(monkeypatch):
    """Also with the default block size, which depends on the shapes only."""
    x = blobs(8).astype(np.float32)
    init = initialize(x, 8, "from-data", seed=2)
    runs = []
    for workers in (1, 3):
        orig = em.Backend.__init__

        def patched(self, device="cpu", _w=workers, _orig=orig):
            _orig(self, device)
            self.workers = _w

        monkeypatch.setattr(em.Backend, "__init__", patched)
        runs.append(fit_em(x, init, max_iter=5, tol=0.0))
        monkeypatch.setattr(em.Backend, "__init__", orig)
    assert runs[0].block_rows == runs[1].block_rows < len(x)
    np.testing.assert_array_equal(runs[0].gmm.means, runs[1].gmm.means)
    assert runs[0].loglik == runs[1].loglik


def test_empty_component_is_reseeded_at_the_worst_explained_row():
    x = blobs(9, k=4)
    x[17] = 60.0  # one outlier row, far from every blob
    init = initialize(x, 4, "from-data", seed=0, dtype="float64")
    far = DiagonalGMM(np.r_[init.weights * 0.99, 0.01], np.vstack([init.means, np.full(x.shape[1], -1e4)]),
                      np.vstack([init.variances, np.ones(x.shape[1])]))
    r = fit_em(x, far, max_iter=3, tol=0.0, dtype="float64")
    assert r.reseeded[0] == {"iteration": 1, "components": [4]}
    assert r.report()["reseeded_total"] == 1
    # after re-seeding, component 4 captures the outlier
    np.testing.assert_allclose(r.gmm.means[4], x[17], atol=1e-6)


def test_collapsed_components_are_floored_and_counted():
    x = degenerate()
    init = initialize(x, 10, "k-means++", seed=0, dtype="float64")
    r = fit_em(x, init, max_iter=10, tol=0.0, dtype="float64", reg_covar=1e-6)
    assert r.gmm.variances.min() >= 1e-6   # floor
    assert r.collapsed >= 1                 # the 200 identical rows


def test_mean_log_likelihood_matches_sklearn_score():
    x = blobs(10)
    init = initialize(x, 8, "from-data", seed=0, dtype="float64")
    sk = sklearn_em(x, init, 5)
    gmm = DiagonalGMM(sk.weights_, sk.means_, sk.covariances_)
    assert mean_log_likelihood(gmm, x) == pytest.approx(sk.score(x), rel=1e-12)


def test_bad_input_is_named():
    x = blobs(11, n=100)
    init = initialize(x, 4, "from-data", seed=0)
    with pytest.raises(ValueError, match="k: 101 components but the data has only 100 rows"):
        initialize(x, 101, "from-data")
    bad = x.copy()
    bad[42, 3] = np.nan
    with pytest.raises(ValueError, match=r"data rows 0\.\.99: 1 row\(s\) hold NaN or Inf"):
        fit_em(bad, init)
    bad = x.copy()
    bad[:, 2] = 5.0
    with pytest.raises(ValueError, match="constant over all 100 rows.*feature 2"):
        fit_em(bad, init)
    with pytest.raises(ValueError, match="init: the mixture has 6 features but the data has 5"):
        fit_em(x[:, :5], init)
    with pytest.raises(ValueError, match="max_iter"):
        fit_em(x, init, max_iter=0)
    with pytest.raises(ValueError, match="device"):
        fit_em(x, init, device="tpu")


def test_summary_is_float64_exact_and_fingerprints_the_bytes():
    x = blobs(12).astype(np.float32)
    s = gdata.summarize(gdata.ArrayRows(x))
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(s.mean, x64.mean(0), rtol=1e-14)
    np.testing.assert_allclose(s.variance, x64.var(0), rtol=1e-7)
    chunks = lambda: (x[i:i + 333] for i in range(0, len(x), 333))  # noqa: E731
    assert gdata.summarize(gdata.IterableRows(chunks)).fingerprint == s.fingerprint
    y = x.copy()
    y[5, 1] = np.nextafter(y[5, 1], np.float32(np.inf))
    assert gdata.summarize(gdata.ArrayRows(y)).fingerprint != s.fingerprint


@pytest.mark.gpu
def test_cupy_path_agrees_with_sklearn():
    pytest.importorskip("cupy")
    x = blobs(13)
    init = initialize(x, 8, "from-data", seed=3, dtype="float64")
    ours = fit_em(x, init, max_iter=20, tol=0.0, dtype="float64", device="cuda", min_count=0.0)
    sk = sklearn_em(x, init, 20)
    assert ours.backend == "cupy"
    assert abs(ours.final_loglik - sk.score(x)) <= 1e-4 * abs(sk.score(x))
    np.testing.assert_allclose(ours.gmm.weights, sk.weights_, rtol=1e-3)
    np.testing.assert_allclose(ours.gmm.variances, sk.covariances_, rtol=1e-3)
    r32 = fit_em(x.astype(np.float32), init, max_iter=20, tol=0.0, device="cuda")
    cpu32 = fit_em(x.astype(np.float32), init, max_iter=20, tol=0.0, device="cpu")
    assert abs(r32.final_loglik - cpu32.final_loglik) <= 1e-5 * abs(cpu32.final_loglik)
