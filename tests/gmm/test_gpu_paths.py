"""Every GPU path of EM, initialization and scoring, through the strict CuPy stand-in
(cupy_standin.py): the same result as the numpy fit, and exactly the transfers em.py's docstring
promises (per EM iteration one weight upload, one download, and the rows only when the device
holds nothing)."""

import json
from collections import Counter

import numpy as np
import pytest
from sklearn.cluster import KMeans

from mmfm.cli import main
from mmfm.data import shards
from mmfm.gmm import data as gdata
from mmfm.gmm import em, files
from mmfm.gmm.em import DiagonalGMM, fit_em, mean_log_likelihood
from mmfm.gmm.init import initialize

N, D, K, BLOCK = 3000, 6, 8, 500
BLOCKS = -(-N // BLOCK)


def blobs(seed=0, n=N, d=D, k=K, offset=20.0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)) * 4 + offset
    scales = rng.uniform(0.3, 2.0, (k, d))
    z = rng.integers(0, k, n)
    return centres[z] + scales[z] * rng.standard_normal((n, d))


def with_far_component(init: DiagonalGMM, d=D) -> DiagonalGMM:
    """``init`` plus a component at -1e4, which no row reaches: it empties in the first E-step."""
    return DiagonalGMM(np.r_[init.weights * 0.99, 0.01], np.vstack([init.means, np.full(d, -1e4)]),
                       np.vstack([init.variances, np.ones(d)]))


def write_shards(folder, x, parts=3):
    for i, part in enumerate(np.array_split(x, parts)):
        shards.write_shard(folder / f"s{i}.parquet", {"cls": part}, {"encoder": "test"})
    return folder


def assert_same_fit(got, ref, rtol=1e-9):
    assert got.n_iter == ref.n_iter and got.reseeded == ref.reseeded
    np.testing.assert_allclose(got.gmm.means, ref.gmm.means, rtol=rtol)
    np.testing.assert_allclose(got.gmm.weights, ref.gmm.weights, rtol=rtol)
    np.testing.assert_allclose(got.gmm.variances, ref.gmm.variances, rtol=rtol)
    np.testing.assert_allclose(got.loglik, ref.loglik, rtol=rtol)
    assert got.final_loglik == pytest.approx(ref.final_loglik, rel=rtol)


def caller(t) -> str:
    """The function that moved the data: the call site, past ``Backend.asarray`` / ``Backend.host``."""
    return next(fn for file, _, fn in t.frames() if not (file == em.__file__ and fn in ("asarray", "host")))


def kinds(transfers) -> Counter:
    """``(direction, caller)`` counts: ``soft``'s are the weights and the statistics, ``_features``'s
    the row blocks, ``__init__``'s those of the pass set-up."""
    return Counter((t.direction, caller(t)) for t in transfers)


def pass_(blocks=0):
    """The transfers of one soft pass: the weights up, one array down, ``blocks`` row blocks up."""
    rows = {("upload", "_features"): blocks} if blocks else {}
    return Counter({("upload", "soft"): 1, ("download", "soft"): 1, **rows})


def iterations(cp, monkeypatch):
    """Positions in ``cp.transfers`` at each M-step: the transfers of iteration ``i`` (1-based,
    ``i >= 2``) are ``transfers[marks[i - 2]:marks[i - 1]]``."""
    marks = []
    m_step = em._params_from_stats

    def marked(*args, **kwargs):
        marks.append(len(cp.transfers))
        return m_step(*args, **kwargs)

    monkeypatch.setattr(em, "_params_from_stats", marked)
    return marks


# layout: (free device memory for N x D float64 rows, whether the features are cached, whether the
# array is uploaded once); features need N (2D + 1) 8 bytes, the array N D 8 (a budget is 40 % of free)
LAYOUTS = {
    "cache": (2**36, True, False),
    "upload": (int(1.25 * N * D * 8 / 0.4), False, True),  # the array fits, its features do not
    "blocks": (1000, False, False),                         # neither: host blocks uploaded per block
    "parquet": (2**36, False, False),                       # streamed shards: blocks per pass
}


@pytest.mark.parametrize("reseed", [False, True], ids=["plain", "reseed"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_em_through_the_standin_is_the_numpy_fit_with_its_transfers(layout, reseed, cupy_standin, monkeypatch,
                                                                   tmp_path):
    cp = cupy_standin
    free, cached, uploaded = LAYOUTS[layout]
    cp.memory["free"] = free
    x = blobs(1)
    init = initialize(x, K, "from-data", seed=3, dtype="float64")
    if reseed:
        x[17] = 60.0  # an outlier, far from every blob: the re-seeded component's row
        init = with_far_component(init)
    data = gdata.ParquetRows(write_shards(tmp_path, x)) if layout == "parquet" else x
    ref = fit_em(x, init, max_iter=6, tol=0.0, dtype="float64", block_rows=BLOCK)
    marks = iterations(cp, monkeypatch)
    got = fit_em(data, init, max_iter=6, tol=0.0, dtype="float64", block_rows=BLOCK, device="cuda")

    assert got.backend == "cupy" and ref.backend == "numpy"
    assert_same_fit(got, ref)
    if reseed:
        assert got.reseeded == [{"iteration": 1, "components": [K]}]
        np.testing.assert_allclose(got.gmm.means[K], x[17], rtol=1e-9)  # it took the worst-explained row

    t = cp.transfers
    assert len(marks) == 6
    blocks = 0 if cached or uploaded else BLOCKS
    # set-up and iteration 1: the centre (and the array, uploaded once), then a pass (filling the cache)
    setup = Counter({("upload", "__init__"): 2 if uploaded else 1})
    assert kinds(t[:marks[0]]) == setup + pass_(BLOCKS if cached else blocks)
    if uploaded:
        assert [u.nbytes for u in t[:2]] == [D * 8, x.nbytes]
    for i in range(2, 7):  # a re-seed in iteration 1 adds one pass (and no other transfer) before iteration 2's
        extra = pass_(blocks) if reseed and i == 2 else Counter()
        assert kinds(t[marks[i - 2]:marks[i - 1]]) == pass_(blocks) + extra, f"iteration {i}"
    assert kinds(t[marks[-1]:]) == pass_(blocks)  # the final score pass
    # what the soft pass moves: (K, 2D+1) weights up, statistics and total (and per-row values) down
    k = K + reseed
    weights = [u.nbytes for u in t if caller(u) == "soft" and u.direction == "upload"]
    stats = [u.nbytes for u in t if caller(u) == "soft" and u.direction == "download"]
    assert weights == [k * (2 * D + 1) * 8] * (7 + reseed)  # 6 iterations, the score (and the re-seed)
    one = (k * (2 * D + 1) + 1) * 8
    assert Counter(stats) == Counter({one: 7, **({one + N * 8: 1} if reseed else {})})
    assert all(u.file == em.__file__ for u in t)


@pytest.mark.parametrize("layout, free", [("cache", 2**36), ("upload", int(150_000 / 0.4)), ("blocks", 1000)])
def test_float32_products_on_float64_rows_through_the_standin(layout, free, cupy_standin):
    """float64 rows, float32 features (156 kB; the rows 144 kB): the casts happen on the device."""
    cp = cupy_standin
    cp.memory["free"] = free
    x = blobs(5)
    init = initialize(x, K, "from-data", seed=1)
    ref = fit_em(x, init, max_iter=5, tol=0.0, block_rows=BLOCK)
    got = fit_em(x, init, max_iter=5, tol=0.0, block_rows=BLOCK, device="cuda")
    assert got.dtype == "float32"
    assert_same_fit(got, ref, rtol=1e-6)
    whole = [u.nbytes for u in cp.transfers if caller(u) == "__init__"]
    assert whole == [D * 4, *([x.nbytes] if layout == "upload" else [])]  # float32 centre, float64 rows


@pytest.mark.parametrize("method", ["k-means++", "kmeans", "from-data", "random"])
def test_init_methods_on_cuda(method, cupy_standin, capsys):
    cp = cupy_standin
    x = blobs(2, n=2000, d=5, k=6, offset=3.0)
    got = initialize(x, 6, method, seed=4, kmeans_iter=5, dtype="float64", device="cuda")
    if method in ("k-means++", "kmeans"):
        # cuML's KMeans on the float32 rows: one Lloyd step for k-means++, kmeans_iter for kmeans
        centres = KMeans(6, init="k-means++", n_init=1, max_iter=1 if method == "k-means++" else 5,
                         random_state=4).fit(x.astype(np.float32)).cluster_centers_.astype(np.float64)
        lab = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        np.testing.assert_allclose(got.weights, np.bincount(lab, minlength=6) / len(x), rtol=1e-12)
        np.testing.assert_allclose(got.means, [x[lab == j].mean(0) for j in range(6)], rtol=1e-9)
        np.testing.assert_allclose(got.variances, [x[lab == j].var(0) + 1e-6 for j in range(6)], rtol=1e-7)
        assert [(f["dtype"], f["on_device"], f["max_iter"]) for f in cp.kmeans_fits] == [
            (np.float32, True, 1 if method == "k-means++" else 5)]
        assert capsys.readouterr().err == ""  # cuML ran, no fallback
    else:
        ref = initialize(x, 6, method, seed=4, dtype="float64", device="cpu")
        np.testing.assert_allclose(got.means, ref.means, rtol=1e-9)
        np.testing.assert_allclose(got.weights, ref.weights, rtol=1e-9)
        np.testing.assert_allclose(got.variances, ref.variances, rtol=1e-9)
    expected = Counter() if method == "random" else Counter(
        {("upload", "__init__"): 1, ("upload", "hard"): 1, ("download", "hard"): 1, ("upload", "_features"): 1,
         **({("upload", "kmeans_centres"): 1} if method in ("k-means++", "kmeans") else {})})
    assert kinds(cp.transfers) == expected  # the one hard pass streams its single block: nothing cached


def test_mean_log_likelihood_on_cuda(cupy_standin):
    cp = cupy_standin
    x = blobs(3)
    gmm = fit_em(x, initialize(x, K, "from-data", seed=0, dtype="float64"), max_iter=3, tol=0.0, dtype="float64").gmm
    ref = mean_log_likelihood(gmm, x)
    assert mean_log_likelihood(gmm, x, device="cuda") == pytest.approx(ref, rel=1e-12)
    # one pass: nothing cached or uploaded whole; the default GPU block holds all rows
    assert kinds(cp.transfers) == Counter({("upload", "__init__"): 1}) + pass_(1)


@pytest.mark.parametrize("kind", ["npy", "parquet", "parquet-stream"])
def test_fit_gmm_cli_on_cuda_writes_the_cpu_files(kind, cupy_standin, tmp_path, capsys):
    cp = cupy_standin
    x = blobs(4, n=1200, d=4, k=5)
    if kind == "npy":
        np.save(tmp_path / "cls.npy", x)
        inp = [str(tmp_path / "cls.npy")]
    else:
        inp = [str(write_shards(tmp_path / "shards", x)), *(["--stream"] if kind == "parquet-stream" else [])]
    outs, lines = {}, {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.safetensors"
        assert main(["fit-gmm", "--input", *inp, "--k", "5", "--out", str(out), "--device", device, "--init",
                     "from-data", "--precision", "float64", "--seed", "2", "--max-iter", "30", "--json",
                     "--no-plot"]) == 0
        lines[device] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        outs[device] = (files.load_cls_gmm(out), files.read_sidecar(out))
    (cpu, cpu_side), (gpu, gpu_side) = outs["cpu"], outs["cuda"]
    assert lines["cuda"]["backend"] == "cupy" and lines["cpu"]["backend"] == "numpy"
    np.testing.assert_allclose(gpu.means, cpu.means, rtol=1e-9)
    np.testing.assert_allclose(gpu.weights, cpu.weights, rtol=1e-9)
    np.testing.assert_allclose(gpu.variances, cpu.variances, rtol=1e-9)
    assert gpu_side["fit"]["n_iter"] == cpu_side["fit"]["n_iter"] and gpu_side["fit"]["converged"]
    np.testing.assert_allclose(gpu_side["fit"]["loglik"], cpu_side["fit"]["loglik"], rtol=1e-9)
    assert gpu_side["data"] == cpu_side["data"] and gpu_side["settings"]["device"] == "cuda"
    soft = kinds(cp.transfers)[("download", "soft")]
    assert soft == gpu_side["fit"]["n_iter"] + 1 + len(gpu_side["fit"]["reseeded"])  # iterations, score, re-seeds
