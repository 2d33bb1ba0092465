"""``mmfm bench gmm``: our EM against scikit-learn's ``GaussianMixture(covariance_type="diag")``.

Both get the same float32 data, the same initial parameters and the same number of iterations
(``tol = 0``), and ours does not re-seed empty components (``min_count = 0``), which scikit-learn
never does: the two run the same algorithm. scikit-learn's own initialization pass is skipped (a
subclass hands it our initial parameters directly), so its time is its EM iterations and its final
E-step; ours includes the data-checking pass. Both final mixtures are scored by the same float64
log-likelihood. ``gemm_bound_s`` is the time of the two bare matrix products one of our iterations
needs (``W @ [x^2, x, 1]^T`` and ``R @ F``,
float32), measured on the same machine in the same run, so the distance to the limit is visible.
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np

from mmfm.gmm import data as gdata
from mmfm.gmm.em import Backend, DiagonalGMM, default_block_rows, fit_em, mean_log_likelihood
from mmfm.gmm.init import initialize


def synthetic(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    """``(n, d)`` float32 rows of a ``k``-blob mixture with per-blob scales, offset from the origin."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d), dtype=np.float32) * 3.0 + 5.0
    scales = rng.uniform(0.5, 1.5, size=(k, d)).astype(np.float32)
    z = rng.integers(0, k, size=n)
    x = rng.standard_normal((n, d), dtype=np.float32)
    for lo in range(0, n, 65536):  # in place, a block at a time
        zz = z[lo:lo + 65536]
        x[lo:lo + 65536] *= scales[zz]
        x[lo:lo + 65536] += centres[zz]
    return x


def gemm_bound(n: int, d: int, k: int, backend: Backend, block_rows: int, repeats: int = 3) -> float:
    """Seconds for one iteration's bare products in our layout: ``W @ F^T`` and ``R @ F`` over
    ``n / block_rows`` blocks on the same threads (float32)."""
    xp = backend.xp
    f = xp.asarray(np.random.default_rng(1).standard_normal((min(n, block_rows), 2 * d + 1), dtype=np.float32))
    w = xp.asarray(np.random.default_rng(2).standard_normal((k, 2 * d + 1), dtype=np.float32))
    blocks = -(-n // len(f))

    def one(_):
        lj = w @ f.T
        return lj @ f

    best = float("inf")
    for _ in range(repeats):
        if backend.gpu:
            xp.cuda.Device().synchronize()
        t = time.perf_counter()
        for _ in backend.map_blocks(one, range(blocks)):
            pass
        if backend.gpu:
            xp.cuda.Device().synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def bench_gmm(n: int = 50000, d: int = 64, k: int = 256, iters: int = 10, seed: int = 0, device: str = "cpu",
              sklearn: bool = True, repeats: int = 3) -> dict:
    """Run the comparison; returns the JSON object ``mmfm bench gmm`` prints.

    Each side is timed ``repeats`` times, alternating, and its fastest run is reported (the usual
    best-of-N: on a shared machine the slower runs measure the neighbours, not the code).
    """
    x = synthetic(n, d, k, seed)
    init = initialize(x, k, "from-data", seed=seed, dtype="float32", device=device)
    be = Backend(device)
    block_rows = default_block_rows(k, d, be.gpu, n)

    def run_ours():
        t = time.perf_counter()
        r = fit_em(x, init, max_iter=iters, tol=0.0, min_count=0.0, device=device, score=False)
        return time.perf_counter() - t, r

    runs = [run_ours() for _ in range(1 if sklearn else repeats)]
    ours_s, ours = min(runs, key=lambda r: r[0])
    out = {
        "n": n, "d": d, "k": k, "iters": iters, "device": device, "backend": be.name,
        "threads": be.workers, "cpus": len(os.sched_getaffinity(0)), "block_rows": block_rows,
        "repeats": repeats, "ours_s": ours_s, "ours_per_iter_s": ours.seconds_per_iter,
        "gemm_bound_s": gemm_bound(n, d, k, be, block_rows),
    }
    out["per_iter_over_gemm_bound"] = out["ours_per_iter_s"] / out["gemm_bound_s"]
    if not sklearn:
        return out

    from sklearn.mixture import GaussianMixture

    class _GivenStart(GaussianMixture):
        """scikit-learn's EM, started from the given parameters without its initialization pass."""

        def _initialize_parameters(self, X, random_state, xp=None):
            self._initialize(X, None)

    def run_sklearn():
        sk = _GivenStart(k, covariance_type="diag", max_iter=iters, tol=0.0, reg_covar=1e-6,
                         weights_init=init.weights.astype(np.float32), means_init=init.means.astype(np.float32),
                         precisions_init=(1.0 / init.variances).astype(np.float32))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning: tol = 0 on purpose
            t = time.perf_counter()
            sk.fit(x)
            return time.perf_counter() - t, sk

    sk_runs = []
    for i in range(repeats):  # alternate, so a slow spell of the machine hits both sides
        sk_runs.append(run_sklearn())
        if i:
            runs.append(run_ours())
    sklearn_s, sk = min(sk_runs, key=lambda r: r[0])
    ours_s, ours = min(runs, key=lambda r: r[0])
    out.update({"ours_s": ours_s, "ours_per_iter_s": ours.seconds_per_iter,
                "per_iter_over_gemm_bound": ours.seconds_per_iter / out["gemm_bound_s"]})
    sk_gmm = DiagonalGMM(sk.weights_ / sk.weights_.sum(), sk.means_, sk.covariances_)
    src = gdata.ArrayRows(x)
    summary = gdata.summarize(src)
    ll_ours = mean_log_likelihood(ours.gmm, src, summary=summary)
    ll_sk = mean_log_likelihood(sk_gmm, src, summary=summary)
    out.update({
        "sklearn_s": sklearn_s, "sklearn_per_iter_s": sklearn_s / iters,
        "speedup_vs_sklearn": sklearn_s / ours_s,
        "loglik_ours": ll_ours, "loglik_sklearn": ll_sk,
        "loglik_rel_diff": abs(ll_ours - ll_sk) / abs(ll_sk),
    })
    return out
