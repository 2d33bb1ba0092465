"""Initial parameters for EM: k-means++ seeds, k-means centres, random rows, or random draws.

The seed-based methods (``k-means++``, ``kmeans``, ``from-data``) choose ``K`` centres, then one
pass assigns every row to its nearest centre and takes each cluster's weight, mean and diagonal
variance (+ ``reg_covar``). scikit-learn's ``init_params="k-means++"`` starts from the seed points
with variance ``reg_covar`` and weight ``1/N``; its first E-step is then exactly this nearest-seed
assignment, so our start equals scikit-learn's after one iteration, without the degenerate step.

Centres come from scikit-learn on the CPU and cuML on the GPU, with the same parameters:

- ``k-means++``: ``sklearn.cluster.kmeans_plusplus`` / ``cuml.KMeans(init="k-means++",
  max_iter=1)`` (cuML has no seeding-only call; its one Lloyd step is the difference);
- ``kmeans``: ``KMeans(init="k-means++", n_init=1, max_iter=kmeans_iter)`` in both;
- ``from-data``: ``K`` distinct rows drawn uniformly;
- ``random``: no centres: means ``~ N(mean, diag(var))`` of the data, variances the data's, equal weights.

If cuML fails to import, for whatever reason (not installed, or a CUDA library mismatch raising
while it loads), one line on stderr names the error and k-means runs on the CPU with scikit-learn.

k-means runs on ``init_sample`` rows drawn uniformly without replacement (all rows by default):
at ImageNet scale, k-means++ over 1.28 M rows for 8192 centres is the slow part of the released fit.
"""

from __future__ import annotations

import sys

import numpy as np

from mmfm.gmm import data as gdata
from mmfm.gmm.em import Backend, DiagonalGMM, _params_from_stats, _Passes, default_block_rows

METHODS = ("k-means++", "kmeans", "from-data", "random")


def kmeans_centres(x: np.ndarray, k: int, method: str, seed: int, backend: Backend,
                   kmeans_iter: int = 10) -> np.ndarray:
    """``(K, D)`` float64 centres of ``x`` (host array) by ``method``, on the backend's library."""
    if method == "from-data":
        rng = np.random.default_rng(seed)
        return np.asarray(x[np.sort(rng.choice(len(x), size=k, replace=False))], dtype=np.float64)
    max_iter = 1 if method == "k-means++" else kmeans_iter
    if backend.gpu:
        try:
            from cuml.cluster import KMeans as CuKMeans
        except Exception as err:  # not installed, or a CUDA library mismatch raised while importing
            why = (str(err).strip().splitlines() or [""])[0]
            print(f"mmfm: cuML unavailable ({type(err).__name__}: {why}); k-means on the CPU with scikit-learn",
                  file=sys.stderr)
        else:
            km = CuKMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=max_iter, random_state=seed,
                          output_type="numpy")
            km.fit(backend.asarray(x, dtype=np.float32))
            return np.asarray(km.cluster_centers_, dtype=np.float64)
    if method == "k-means++":
        from sklearn.cluster import kmeans_plusplus

        centres, _ = kmeans_plusplus(np.asarray(x), k, random_state=seed)
        return centres.astype(np.float64)
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=kmeans_iter, random_state=seed).fit(np.asarray(x))
    return km.cluster_centers_.astype(np.float64)


def initialize(
    data,
    k: int,
    method: str = "k-means++",
    *,
    seed: int = 0,
    reg_covar: float = 1e-6,
    init_sample: int | None = None,
    kmeans_iter: int = 10,
    dtype: str = "float32",
    device: str = "cpu",
    summary: gdata.DataSummary | None = None,
    progress: bool = False,
) -> DiagonalGMM:
    """Initial :class:`DiagonalGMM` for ``k`` components (see the module doc for the methods)."""
    if method not in METHODS:
        raise ValueError(f"init: expected one of {list(METHODS)}, got {method!r}")
    source = gdata.as_rows(data)
    summary = summary or gdata.summarize(source, progress=progress)
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k: expected a positive integer, got {k!r}")
    if k > summary.n:
        raise ValueError(f"k: {k} components but the data has only {summary.n} rows")
    rng = np.random.default_rng(seed)
    if method == "random":
        means = summary.mean + np.sqrt(summary.variance) * rng.standard_normal((k, summary.dim))
        return DiagonalGMM(np.full(k, 1.0 / k), means, np.tile(summary.variance, (k, 1)))

    if init_sample is None or init_sample >= summary.n:
        sample = source.array if isinstance(source, gdata.ArrayRows) else gdata.gather(source, np.arange(summary.n))
    else:
        if init_sample < k:
            raise ValueError(f"init_sample: {init_sample} rows cannot seed {k} components")
        sample = gdata.gather(source, rng.choice(summary.n, size=init_sample, replace=False))
    backend = Backend(device)
    centres = kmeans_centres(sample, k, method, seed, backend, kmeans_iter)

    rows = default_block_rows(k, summary.dim, backend.gpu, summary.n)
    passes = _Passes(source, summary, backend, dtype, rows, reuse=False)
    stats = passes.hard(centres)
    d = summary.dim
    counts = stats[:, 2 * d].copy()
    empty = counts < 0.5  # ties or duplicate rows can leave a centre with no row
    stats[empty, 2 * d] = 1.0
    stats[empty, d:2 * d] = centres[empty] - summary.mean
    stats[empty, :d] = summary.variance + (centres[empty] - summary.mean) ** 2
    _, means, var, weights = _params_from_stats(stats, summary.mean, reg_covar, eps=0.0)
    return DiagonalGMM(weights, means, var)
