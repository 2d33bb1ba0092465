import importlib.abc
import importlib.util
import sys
import types

import numpy as np
import pytest
from sklearn.cluster import KMeans, kmeans_plusplus

from mmfm.gmm.em import Backend
from mmfm.gmm.init import initialize, kmeans_centres


def data(seed=0, n=2000, d=5, k=6):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((k, d)) * 5 + 3
    return c[rng.integers(0, k, n)] + rng.standard_normal((n, d))


def hard_params(x, centres, reg):
    """Direct float64 weights/means/variances of the nearest-centre partition."""
    lab = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
    k = len(centres)
    w = np.bincount(lab, minlength=k) / len(x)
    mu = np.stack([x[lab == j].mean(0) for j in range(k)])
    var = np.stack([x[lab == j].var(0) for j in range(k)]) + reg
    return w, mu, var


@pytest.mark.parametrize("method", ["k-means++", "kmeans", "from-data"])
def test_seeded_inits_are_the_nearest_centre_partition_of_their_centres(method):
    x = data(1)
    centres = kmeans_centres(x, 6, method, seed=4, backend=Backend("cpu"), kmeans_iter=5)
    g = initialize(x, 6, method, seed=4, kmeans_iter=5, dtype="float64", reg_covar=1e-6)
    w, mu, var = hard_params(x, centres, 1e-6)
    np.testing.assert_allclose(g.weights, w, rtol=1e-12)
    np.testing.assert_allclose(g.means, mu, rtol=1e-9)
    np.testing.assert_allclose(g.variances, var, rtol=1e-7)


def test_centres_are_sklearns():
    x = data(2)
    ours = kmeans_centres(x, 6, "k-means++", seed=7, backend=Backend("cpu"))
    ref, _ = kmeans_plusplus(x, 6, random_state=7)
    np.testing.assert_array_equal(ours, ref)
    ours = kmeans_centres(x, 6, "kmeans", seed=7, backend=Backend("cpu"), kmeans_iter=20)
    ref = KMeans(6, init="k-means++", n_init=1, max_iter=20, random_state=7).fit(x).cluster_centers_
    np.testing.assert_allclose(ours, ref)


def test_seeded_and_reproducible():
    x = data(3)
    for method in ("k-means++", "from-data", "random"):
        a = initialize(x, 6, method, seed=1)
        b = initialize(x, 6, method, seed=1)
        c = initialize(x, 6, method, seed=2)
        np.testing.assert_array_equal(a.means, b.means)
        assert not np.array_equal(a.means, c.means)


def test_random_init_uses_data_moments():
    x = data(4, n=5000)
    g = initialize(x, 400, "random", seed=0)
    np.testing.assert_allclose(g.variances[0], x.var(0), rtol=1e-10)
    assert (np.abs(g.means.mean(0) - x.mean(0)) <= 4 * np.sqrt(x.var(0) / 400)).all()
    np.testing.assert_allclose(g.weights, 1 / 400)


def test_init_sample_and_errors():
    x = data(5)
    g = initialize(x, 6, "k-means++", seed=0, init_sample=300)
    assert g.k == 6 and np.isclose(g.weights.sum(), 1)
    with pytest.raises(ValueError, match="init_sample: 3 rows cannot seed 6"):
        initialize(x, 6, "k-means++", init_sample=3)
    with pytest.raises(ValueError, match="init: expected one of"):
        initialize(x, 6, "kmeans+++")


def test_duplicate_seeds_leave_no_empty_component():
    x = np.repeat(data(6, n=50), 3, axis=0)  # every row three times
    g = initialize(x, 40, "from-data", seed=0)
    assert (g.weights > 0).all() and np.isfinite(g.means).all()


def test_missing_cuml_falls_back_to_sklearn_with_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cuml", None)  # import cuml raises ImportError
    monkeypatch.setitem(sys.modules, "cuml.cluster", None)
    gpu_like = types.SimpleNamespace(gpu=True, asarray=np.asarray)
    x = data(7)
    got = kmeans_centres(x, 6, "k-means++", seed=3, backend=gpu_like)
    ref, _ = kmeans_plusplus(x, 6, random_state=3)
    np.testing.assert_array_equal(got, ref)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mmfm: cuML unavailable (ModuleNotFoundError: import of cuml.cluster halted; None in "
                   "sys.modules); k-means on the CPU with scikit-learn"]


class BrokenImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``cuml`` (and its submodules); executing it raises ``error``, as a CUDA library mismatch
    does while cuML imports."""

    def __init__(self, error: Exception):
        self.error = error

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name.split(".")[0] == "cuml" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise self.error


@pytest.mark.parametrize("error, line", [
    (RuntimeError("CUDA driver version is insufficient for CUDA runtime version\n  (more detail)"),
     "RuntimeError: CUDA driver version is insufficient for CUDA runtime version"),
    (OSError("libcudart.so.13: cannot open shared object file"),
     "OSError: libcudart.so.13: cannot open shared object file"),
])
def test_cuml_failing_to_import_for_any_reason_falls_back_with_one_line(error, line, monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "cuml", raising=False)
    monkeypatch.delitem(sys.modules, "cuml.cluster", raising=False)
    monkeypatch.setattr(sys, "meta_path", [BrokenImport(error), *sys.meta_path])
    with pytest.raises(type(error)):
        import cuml.cluster  # noqa: F401  (the finder is in place)
    gpu_like = types.SimpleNamespace(gpu=True, asarray=np.asarray)
    x = data(8)
    got = kmeans_centres(x, 6, "kmeans", seed=3, backend=gpu_like, kmeans_iter=20)
    ref = KMeans(6, init="k-means++", n_init=1, max_iter=20, random_state=3).fit(x).cluster_centers_
    np.testing.assert_array_equal(got, ref)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mmfm: cuML unavailable ({line}); k-means on the CPU with scikit-learn"]
