"""The CuPy stand-in is at least as strict as CuPy: what it refuses, what it counts."""

import re
import sys

import numpy as np
import pytest
from sklearn.cluster import KMeans

from mmfm.gmm import data as gdata
from mmfm.gmm.em import Backend

IMPLICIT = re.escape("Implicit conversion to a NumPy array is not allowed. "
                     "Please use `.get()` to construct a NumPy array explicitly.")


def here():
    """``file:line`` of the caller."""
    f = sys._getframe(1)
    return f"{f.f_code.co_filename}:{f.f_lineno}"


def test_implicit_host_conversion_is_refused(cupy_standin):
    cp = cupy_standin
    a = cp.asarray(np.arange(6.0).reshape(2, 3))
    for convert in (np.asarray, np.array, lambda v: v.__array__(), lambda v: np.float64(v), np.ascontiguousarray):
        with pytest.raises(TypeError, match=IMPLICIT):
            convert(a)
    for scalar in (float, int, bool):
        with pytest.raises(TypeError, match=r"\(2, 3\): only a 0-d array"):
            scalar(a)
        with pytest.raises(TypeError, match=r"\(1,\): only a 0-d array"):
            scalar(a[:1, 0])  # CuPy takes size-1 arrays; the stand-in is stricter
    n = len(cp.transfers)
    total = a.sum()
    assert isinstance(total, cp.ndarray) and total.ndim == 0 and len(cp.transfers) == n  # no host scalar
    value = float(total); site = here()  # noqa: E702
    assert value == 15.0 and cp.transfers[-1][:3] == ("download", 8, "float") and cp.transfers[-1].site == site
    assert a[1, 2].item() == 5.0 and a[0].tolist() == [0.0, 1.0, 2.0]
    assert [t.what for t in cp.transfers[-2:]] == ["item", "tolist"]


def test_host_arrays_are_refused_in_functions_ufuncs_and_operators(cupy_standin):
    cp = cupy_standin
    a, h = cp.asarray(np.ones((3, 3))), np.ones((3, 3))
    mixed = [lambda: cp.add(a, h), lambda: a + h, lambda: h + a, lambda: a @ h, lambda: h @ a,
             lambda: cp.matmul(a, h), lambda: np.exp(h, out=a), lambda: cp.concatenate([a, h]),
             lambda: cp.maximum(a, h[0]), lambda: a.__iadd__(h), lambda: cp.sum(h)]
    for call in mixed:
        with pytest.raises(TypeError, match="Unsupported type <class 'numpy.ndarray'>"):
            call()
    with pytest.raises(TypeError, match="Output arguments must be cupy.ndarray"):
        cp.exp(a, out=np.empty((3, 3)))
    with pytest.raises(TypeError, match="Unsupported type <class 'numpy.ndarray'>: assigning a host value"):
        a[0] = h[0]
    with pytest.raises(TypeError, match="no implementation found for 'numpy.median'"):
        np.median(a)  # a numpy function the stand-in does not provide
    # Python and numpy scalars are fine
    b = cp.maximum(a * np.float32(2) - 1, -100.0)
    b[:, 0] = 7
    assert isinstance(b, cp.ndarray) and b.get().tolist() == [[7.0, 1.0, 1.0]] * 3


def test_numpy_calls_run_on_the_standin_and_outputs_are_the_same_arrays(cupy_standin):
    cp = cupy_standin
    a = cp.asarray(np.arange(12.0).reshape(3, 4))
    n = len(cp.transfers)
    for got in (np.exp(a), np.sum(a, axis=0), np.concatenate([a, a]), a.T @ a, a[0, 0], a.max(axis=0)):
        assert isinstance(got, cp.ndarray)
    out = cp.empty((3, 4))
    assert cp.exp2(a, out=out) is out and np.exp2(a, out=out) is out
    view = a[:, 1:3]
    cp.subtract(view, 1.0, out=view)  # writes through to a, as on the device
    assert len(cp.transfers) == n  # nothing above moved data
    np.testing.assert_array_equal(a.get()[:, 1:3], np.arange(12.0).reshape(3, 4)[:, 1:3] - 1)


def test_transfers_are_recorded_with_direction_bytes_and_call_site(cupy_standin):
    cp = cupy_standin
    h = np.arange(10, dtype=np.float32)
    a = cp.asarray(h); up = here()  # noqa: E702
    h[0] = 99  # asarray copied: the device array does not see it
    g = a.get(); down = here()  # noqa: E702
    g[1] = 99  # get copied
    idx = a[np.array([0, 2])]; index = here()  # noqa: E702
    host = cp.asnumpy(a); again = here()  # noqa: E702
    assert host[:2].tolist() == [0.0, 1.0]
    assert cp.asarray(a) is a and cp.asarray(a, dtype=np.float32) is a  # already on the device
    assert [(t.direction, t.nbytes, t.what, t.site) for t in cp.transfers] == [
        ("upload", 40, "asarray", up), ("download", 40, "get", down), ("upload", 16, "index", index),
        ("download", 40, "get", again)]
    assert idx.get().tolist() == [0.0, 2.0]


def test_cuda_runtime_devices_and_memory(cupy_standin, monkeypatch):
    cp = cupy_standin
    cp.memory["free"] = 12345
    assert cp.cuda.runtime.memGetInfo()[0] == 12345
    assert Backend("cuda").gpu and Backend("auto").name == "cupy"
    with pytest.raises(ValueError, match=r"device: 'cuda:1', but CuPy sees 1 CUDA device\(s\): cuda:0 to cuda:0"):
        Backend("cuda:1")
    cp.devices = 2
    Backend("cuda:1")
    assert cp.current_device == 1
    cp.devices = 0
    with pytest.raises(ValueError, match="CuPy sees no CUDA device"):
        Backend("cuda")
    assert Backend("auto").name == "numpy"


def test_cuml_kmeans_standin_is_sklearn_on_the_device_copy(cupy_standin):
    cp = cupy_standin
    from cuml.cluster import KMeans as CuKMeans

    x = np.random.default_rng(0).standard_normal((300, 3)).astype(np.float32)
    dev = cp.asarray(x)
    n = len(cp.transfers)
    km = CuKMeans(n_clusters=4, init="k-means++", n_init=1, max_iter=3, random_state=5, output_type="numpy").fit(dev)
    ref = KMeans(4, init="k-means++", n_init=1, max_iter=3, random_state=5).fit(x).cluster_centers_
    assert isinstance(km.cluster_centers_, np.ndarray)
    np.testing.assert_array_equal(km.cluster_centers_, ref)
    assert len(cp.transfers) == n and cp.kmeans_fits[0]["on_device"]
    with pytest.raises(TypeError):
        CuKMeans(4)  # cuML's arguments are keyword-only


def test_gather_downloads_rows_of_an_uploaded_array(cupy_standin):
    cp = cupy_standin
    x = np.random.default_rng(1).standard_normal((1000, 3))
    src = gdata.ArrayRows(cp.asarray(x))
    n = len(cp.transfers)
    idx = np.array([999, 3, 400, 401])
    got = gdata.gather(src, idx, rows=300)
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, x[np.sort(idx)])
    # per chunk holding rows: its index uploaded, its rows downloaded
    assert [(t.direction, t.nbytes) for t in cp.transfers[n:]] == [
        ("upload", 8), ("download", 24), ("upload", 16), ("download", 48), ("upload", 8), ("download", 24)]
