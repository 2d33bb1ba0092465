"""Diagonal-covariance EM for the CLS Gaussian mixture (docs/method.md §3.2), written once over an array
module: numpy on CPU, CuPy on GPU.

Model: ``p(x) = sum_k pi_k N(x; mu_k, diag(sigma_k^2))`` over ``x in R^D``.

**E-step as matrix products.** With ``P_k = 1 / sigma_k^2`` and data centred on the global mean
``c`` (``x' = x - c``, ``mu'_k = mu_k - c``), every log-joint of a block of rows is one GEMM::

    log pi_k + log N(x; mu_k, sigma_k^2) = [x'^2, x', 1] @ [-P_k / 2, mu'_k P_k, a_k]^T
    a_k = log pi_k - (D log 2 pi + sum_d log sigma_kd^2 + sum_d mu'_kd^2 P_kd) / 2

so a block of ``b`` rows costs a ``K x (2D+1) x b`` product, then a max, ``exp`` and a sum over
the components (log-sum-exp; the block is laid out ``K x b`` so these reductions vectorize). The
sufficient statistics ``(sum_i r_ik x'^2, sum_i r_ik x', sum_i r_ik)`` are a
second product ``R^T @ [x'^2, x', 1]``; the rows of ``F = [x'^2, x', 1]`` are divided by the row
sums first, so the ``b x K`` responsibilities are never normalized in place. An ``N x K`` matrix is
never held: memory is one block.

**Numerics.** Products run in the compute dtype (float32 by default, float64 on request); each
block's statistics are added to float64 accumulators, and the M-step runs in float64. Centring on
the global mean (computed in float64 by a checking pass) keeps the expanded quadratic and the
``E[x^2] - mu^2`` variance accurate in float32 for uncentred features such as CLS tokens. The
M-step is scikit-learn's: ``n_k = sum_i r_ik + 10 eps``, ``mu_k = sum_i r_ik x_i / n_k``,
``sigma_k^2 = sum_i r_ik x_i^2 / n_k - mu_k^2 + reg_covar`` (the difference clipped at 0 before
``reg_covar`` is added: the floor for collapsing components), ``pi_k = n_k / sum n``.

**Speed.** The log-sum-exp runs in base 2 (``W`` scaled by ``log2 e``; ``exp2`` is the faster
kernel), and exponents are clamped at ``-100``: a responsibility below ``2^-100 ~ 8e-31`` of the
row's largest is rounded up to it, far below float32 resolution, which keeps ``exp2`` and the
second product off the CPU's subnormal path (30x slower, and most entries of a sharp posterior
land there). Blocks run on threads with one BLAS thread each; scratch arrays are reused per thread.

**On the GPU** (CuPy, one block at a time) the rows reach the device in one of three layouts. An
in-memory array whose features ``F`` fit 40 % of free device memory is uploaded block by block on
the first pass, and its ``F`` stays on the device for every later pass; an array whose ``F`` does
not fit but which itself does is uploaded once; otherwise (streamed Parquet, or too large) every
pass uploads its row blocks. Besides the rows, a pass uploads the ``(K, 2D+1)`` weights ``W`` and
downloads one float64 array: the statistics and the total log-likelihood (and, in a re-seeding
pass, the per-row log-likelihoods). So an EM iteration costs one upload and one download, plus one
upload per block when nothing is held on the device. Initialization and scoring are one pass each:
they cache nothing and stream their blocks.

**Empty components** (``sum_i r_ik < min_count``) are re-seeded at the rows the mixture explains
worst (one more pass; the rows are read from the host source), with the data's global variance,
and counted. **Convergence**: the mean log-likelihood of each E-step (before its M-step, as
scikit-learn reports it) changing by less than ``tol``.

**Determinism.** Blocks have a fixed size whatever the input chunking (``data.blocks``) and their
statistics are added in block order, so CPU threads, chunk sizes and a rerun give the same bits.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from mmfm.gmm import data as gdata

LOG_2PI = math.log(2.0 * math.pi)
LOG2_E, LN_2 = 1.0 / math.log(2.0), math.log(2.0)
FLOOR_LOG2 = 100.0  # responsibilities are floored at 2^-100 of a row's largest


# --------------------------------------------------------------------------------------------------
# the model
@dataclass(frozen=True)
class DiagonalGMM:
    """Mixture parameters, float64 on the host: ``weights (K,)``, ``means (K, D)``, ``variances (K, D)``."""

    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray

    def __post_init__(self):
        w, m, v = (np.asarray(a, dtype=np.float64) for a in (self.weights, self.means, self.variances))
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "means", m)
        object.__setattr__(self, "variances", v)
        if w.ndim != 1 or m.ndim != 2 or m.shape[0] != w.shape[0]:
            raise ValueError(f"means: expected shape (K, D) with K = {w.shape[0]} (weights), got {m.shape}")
        if v.shape != m.shape:
            raise ValueError(f"variances: expected shape {m.shape} like means (diagonal), got {v.shape}")
        for name, a in (("weights", w), ("means", m), ("variances", v)):
            if not np.isfinite(a).all():
                raise ValueError(f"{name}: expected finite values")
        if (w < 0).any() or abs(w.sum() - 1.0) > 1e-6:
            raise ValueError(f"weights: expected non-negative values summing to 1, sum is {w.sum():.8g}")
        if (v <= 0).any():
            raise ValueError(f"variances: expected positive values, min is {v.min():.3g}")

    @property
    def k(self) -> int:
        return self.weights.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def to_source(self, device=None, dtype=None):
        """The same mixture as a torch :class:`~mmfm.flow.sources.GaussianMixtureSource`."""
        import torch

        from mmfm.flow.sources import GaussianMixtureSource

        dtype = dtype or torch.float64
        t = lambda a: torch.as_tensor(a, dtype=dtype, device=device)  # noqa: E731
        return GaussianMixtureSource(torch.as_tensor(self.weights, device=device), t(self.means), t(self.variances))


@dataclass
class EMResult:
    """A fitted mixture and how the fit went."""

    gmm: DiagonalGMM
    loglik: list[float]                 # mean log-likelihood at each E-step (before its M-step)
    n_iter: int
    converged: bool
    final_loglik: float | None = None   # mean log-likelihood under the returned parameters
    reseeded: list[dict] = field(default_factory=list)  # [{"iteration": i, "components": [...]}]
    collapsed: int = 0                  # components whose variance sits at the reg_covar floor
    backend: str = "numpy"
    dtype: str = "float32"
    block_rows: int = 0
    seconds: float = 0.0
    seconds_per_iter: float = 0.0

    def report(self) -> dict:
        return {
            "n_iter": self.n_iter, "converged": self.converged, "loglik": self.loglik,
            "final_loglik": self.final_loglik, "reseeded": self.reseeded,
            "reseeded_total": sum(len(r["components"]) for r in self.reseeded), "collapsed": self.collapsed,
            "backend": self.backend, "dtype": self.dtype, "block_rows": self.block_rows,
            "seconds": self.seconds, "seconds_per_iter": self.seconds_per_iter,
        }


# --------------------------------------------------------------------------------------------------
# array module
class Backend:
    """numpy on the CPU (blocks spread over threads, BLAS one thread each) or CuPy on a CUDA device."""

    def __init__(self, device: str = "cpu"):
        device = str(device)
        if device == "auto":
            device = "cuda" if _cuda_available() else "cpu"
        if device == "cpu":
            self.xp, self.name = np, "numpy"
            self.workers = max(1, min(len(os.sched_getaffinity(0)), 16))
        elif device.startswith("cuda"):
            try:
                import cupy
            except ImportError:
                raise ValueError(f"device: {device!r} needs CuPy (pip install 'mmfm[gpu]'); "
                                 "or use --device cpu") from None
            if not _cuda_available():
                raise ValueError(f"device: {device!r} asked for, but CuPy sees no CUDA device")
            if ":" in device:
                index, count = device.split(":")[1], cupy.cuda.runtime.getDeviceCount()
                if not (index.isdigit() and int(index) < count):
                    raise ValueError(f"device: {device!r}, but CuPy sees {count} CUDA device(s): cuda:0 to "
                                     f"cuda:{count - 1}")
                cupy.cuda.Device(int(index)).use()
            self.xp, self.name, self.workers = cupy, "cupy", 1
        else:
            raise ValueError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
        self.device = device

    @property
    def gpu(self) -> bool:
        return self.name == "cupy"

    def asarray(self, a, dtype=None):
        return self.xp.asarray(a, dtype=dtype)

    def host(self, a) -> np.ndarray:
        return a.get() if self.gpu else np.asarray(a)

    def map_blocks(self, fn, items) -> Iterator:
        """``fn`` over ``items`` in order; on the CPU, several blocks at a time on threads."""
        if self.workers <= 1:
            yield from map(fn, items)
            return
        pool = _thread_pool(self.workers)
        with _blas_controller().limit(limits=1, user_api="blas"):
            pending: deque = deque()
            for it in items:
                pending.append(pool.submit(fn, it))
                if len(pending) >= 2 * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()


@functools.cache
def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """One pool per size for the process: its threads, and their scratch arrays, outlive a pass."""
    return ThreadPoolExecutor(workers, thread_name_prefix="mmfm-em")


@functools.cache
def _blas_controller():
    """threadpoolctl's view of the loaded BLAS libraries, built once: ``threadpool_limits()`` scans
    every loaded library on each call (3-4 ms with torch loaded, a tenth of an iteration)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _cuda_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, or a CUDA runtime error without a driver
        return False


def default_block_rows(k: int, dim: int, gpu: bool, n: int | None = None) -> int:
    """Rows per block. On the GPU the ``K x rows`` log-joint block is near 256 MB. On the CPU a block
    and its features are near 8 MB (they stay in cache), and, when ``n`` is given, the rows are
    spread over a multiple of eight equal blocks, so 1, 2, 4 or 8 threads get equal shares (an odd
    small last block costs up to a tenth of the time on two cores). The size depends on the shapes
    only, never on the thread count, so the fitted bits do not either."""
    width = k + 2 * dim + 1
    if gpu:
        return int(min(65536, max(1024, 2**26 // width)))
    rows = min(16384, max(128, 2**21 // width))
    if n is not None:
        blocks = -(-n // rows)
        blocks = -(-blocks // 8) * 8
        rows = max(128, -(-n // blocks))
    return int(rows)


# --------------------------------------------------------------------------------------------------
# the passes
def gemm_weights(gmm: DiagonalGMM, centre: np.ndarray) -> np.ndarray:
    """``W^T``, shape ``(2D + 1, K)``, float64: ``[x'^2, x', 1] @ W^T`` is the log-joint (module doc)."""
    prec = 1.0 / gmm.variances
    mc = gmm.means - centre
    with np.errstate(divide="ignore"):
        log_w = np.log(gmm.weights)
    const = log_w - 0.5 * (gmm.dim * LOG_2PI + np.log(gmm.variances).sum(1) + (mc * mc * prec).sum(1))
    return np.concatenate([-0.5 * prec, mc * prec, const[:, None]], axis=1).T


class _Workspace(threading.local):
    """Per-thread scratch arrays, reused across blocks: a fresh multi-MB array per block costs page
    faults that, on a VM, take as long as the arithmetic."""

    def get(self, xp, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        size = math.prod(shape)
        buf = getattr(self, name, None)
        if buf is None or buf.size < size or buf.dtype != dtype or not isinstance(buf, xp.ndarray):
            buf = xp.empty(size, dtype=dtype)
            setattr(self, name, buf)
        return buf[:size].reshape(shape)


def _features(xp, x, centre, dtype, out=None):
    """``F = [x'^2, x', 1]``, shape ``(b, 2D + 1)``, in the compute dtype (into ``out`` if given)."""
    b, d = x.shape
    f = xp.empty((b, 2 * d + 1), dtype=dtype) if out is None else out
    xc = f[:, d:2 * d]
    xp.subtract(xp.asarray(x), centre, out=xc)
    xp.multiply(xc, xc, out=f[:, :d])
    f[:, 2 * d] = 1
    return f


class _Passes:
    """One data pass of EM (soft statistics), hard assignment, or per-row log-likelihoods.

    With ``reuse`` (several passes over the data, as in EM), an in-memory array whose features
    ``F = [x'^2, x', 1]`` fit the cache budget (a quarter of free memory, at most 4 GiB, on the CPU;
    40 % of free GPU memory) has ``F`` built on the first pass, on the backend, and reused by every
    later pass; on the GPU, an array whose ``F`` does not fit but which itself does is uploaded once.
    Otherwise (or for a single pass) each pass builds ``F`` block by block from the rows on the
    host. ``host`` is always the source on the host (re-seeding reads rows from it).
    """

    def __init__(self, source, summary: gdata.DataSummary, backend: Backend, dtype, block_rows: int,
                 reuse: bool = True):
        self.source = self.host = source
        self.summary, self.be = summary, backend
        self.dtype = np.dtype(dtype)
        self.block_rows = block_rows
        self.centre = backend.asarray(summary.mean, dtype=self.dtype)
        self._ws = _Workspace()
        in_memory = reuse and isinstance(source, gdata.ArrayRows)
        need = summary.n * (2 * summary.dim + 1) * self.dtype.itemsize
        self._cache = [] if in_memory and need <= _cache_budget(backend) else None
        if backend.gpu and in_memory and self._cache is None and source.array.nbytes <= _cache_budget(backend):
            # upload an in-memory array once instead of once per pass
            self.source = gdata.ArrayRows(backend.asarray(source.array), source.name)

    def _items(self):
        """``(is_features, block)``: cached ``F`` blocks, or row blocks to build ``F`` from."""
        if self._cache:
            return ((True, f) for f in self._cache)
        if isinstance(self.source, gdata.ArrayRows):  # views, no re-cutting needed
            a = self.source.array
            return ((False, a[i:i + self.block_rows]) for i in range(0, a.shape[0], self.block_rows))
        return ((False, x) for x in gdata.blocks(self.source, self.block_rows))

    def _map(self, fn):
        """``fn(i, F)`` over the blocks, in order; fills the feature cache on the first pass."""
        xp, dt = self.be.xp, self.dtype
        fill = self._cache is not None and not self._cache
        ws = self._ws

        def run(item):
            i, (is_f, b) = item
            if is_f:
                f = b
            else:
                out = None if fill else ws.get(xp, "f", (b.shape[0], 2 * b.shape[1] + 1), dt)
                f = _features(xp, b, self.centre, dt, out)
            return fn(i, f), (f if fill else None)

        for out, f in self.be.map_blocks(run, enumerate(self._items())):
            if fill:
                self._cache.append(f)
            yield out

    def soft(self, wt: np.ndarray, rows_ll: bool = False):
        """``(S (K, 2D+1) float64 = sum_i r_ik [x'^2, x', 1], total log-likelihood, per-row ll (N,) or None)``,
        computed in base 2 (module doc). One upload (``W``) and one download (``S``, the total and the
        per-row values in one array) per pass, besides the rows'."""
        xp, dt = self.be.xp, self.dtype
        w = self.be.asarray(np.ascontiguousarray(wt.T) * LOG2_E, dtype=dt)  # (K, 2D+1)
        ws = self._ws

        def block(i, f):
            lj = xp.matmul(w, f.T, out=ws.get(xp, "lj", (w.shape[0], f.shape[0]), dt))  # (K, b) log2-joint
            m = xp.max(lj, axis=0)                      # reductions down columns vectorize best
            xp.subtract(lj, m, out=lj)
            xp.maximum(lj, -FLOOR_LOG2, out=lj)         # no subnormals: see the module doc
            xp.exp2(lj, out=lj)
            s = xp.sum(lj, axis=0)
            row = xp.log2(s).astype(np.float64) + m     # row log2-likelihood
            fs = xp.divide(f, s[:, None], out=ws.get(xp, "fs", f.shape, dt))  # r_ik = e_ik / s_i into F
            return (lj @ fs).astype(np.float64), row

        size = w.shape[0] * w.shape[1]
        acc = xp.zeros(size + 1, dtype=np.float64)  # [S.ravel(), total log2-likelihood]
        stats, total = acc[:size].reshape(w.shape), acc[size:]
        rows = []
        for st, row in self._map(block):
            stats += st
            total += row.sum()
            if rows_ll:
                rows.append(row)
        out = self.be.host(xp.concatenate([acc, *rows]) if rows_ll else acc)  # the pass's one download
        per_row = out[size + 1:] * LN_2 if rows_ll else None
        return out[:size].reshape(w.shape), float(out[size]) * LN_2, per_row

    def hard(self, centres: np.ndarray):
        """Statistics of the hard assignment to the nearest of ``centres`` (Euclidean)."""
        xp, dt = self.be.xp, self.dtype
        k, d = centres.shape
        unit = DiagonalGMM(np.full(k, 1.0 / k), centres, np.ones((k, d)))
        w = self.be.asarray(np.ascontiguousarray(gemm_weights(unit, self.summary.mean).T), dtype=dt)

        def block(i, f):
            idx = (w @ f.T).argmax(axis=0)
            onehot = xp.zeros((k, f.shape[0]), dtype=dt)
            onehot[idx, xp.arange(f.shape[0])] = 1
            return (onehot @ f).astype(np.float64)

        stats = xp.zeros((k, 2 * d + 1), dtype=np.float64)
        for st in self._map(block):
            stats += st
        return self.be.host(stats)


def _cache_budget(backend: Backend) -> int:
    if backend.gpu:
        free, _ = backend.xp.cuda.runtime.memGetInfo()
        return int(0.4 * free)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        avail = 2**32
    return int(min(2**32, avail // 4))


def _params_from_stats(stats, centre, reg_covar, eps) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """M-step in float64: ``(nk, means, variances, weights)`` from ``[sum r x'^2, sum r x', sum r]``."""
    d = (stats.shape[1] - 1) // 2
    nk = stats[:, 2 * d] + 10 * eps
    mean_c = stats[:, d:2 * d] / nk[:, None]
    var = np.maximum(stats[:, :d] / nk[:, None] - mean_c**2, 0.0) + reg_covar
    return nk, mean_c + centre, var, nk / nk.sum()


# --------------------------------------------------------------------------------------------------
# EM
def fit_em(
    data,
    init: DiagonalGMM,
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
    min_count: float = 1e-3,
    dtype: str = "float32",
    device: str = "cpu",
    block_rows: int | None = None,
    summary: gdata.DataSummary | None = None,
    score: bool = True,
    progress: bool = False,
) -> EMResult:
    """Run EM from ``init`` on ``data`` (an ``(N, D)`` array, :class:`~mmfm.gmm.data.ParquetRows`,
    or a callable returning an iterator of chunks; see :mod:`mmfm.gmm.data`).

    Stops after ``max_iter`` iterations or when the mean log-likelihood changes by less than ``tol``
    (``tol = 0`` runs every iteration). With ``score`` one more pass gives the mean log-likelihood
    under the returned parameters (``final_loglik``).
    """
    from mmfm.progress import progress as tqdm

    _check_settings(max_iter=max_iter, tol=tol, reg_covar=reg_covar, dtype=dtype)
    source = gdata.as_rows(data)
    be = Backend(device)
    if summary is None:
        summary = gdata.summarize(source, progress=progress)
    if init.dim != summary.dim:
        raise ValueError(f"init: the mixture has {init.dim} features but the data has {summary.dim}")
    block_rows = block_rows or default_block_rows(init.k, init.dim, be.gpu, summary.n)
    passes = _Passes(source, summary, be, dtype, block_rows)
    eps = float(np.finfo(np.dtype(dtype)).eps)
    gmm, history, reseeded, converged = init, [], [], False
    t0 = time.perf_counter()
    bar = tqdm(range(1, max_iter + 1), desc="EM", unit="it", disable=not progress)
    for it in bar:
        stats, total, _ = passes.soft(gemm_weights(gmm, summary.mean))
        ll = total / summary.n
        history.append(ll)
        nk, means, var, weights = _params_from_stats(stats, summary.mean, reg_covar, eps)
        empty = np.flatnonzero(nk < min_count)
        if empty.size:
            means, var, weights = _reseed(passes, DiagonalGMM(weights, means, var), empty, nk, summary)
            reseeded.append({"iteration": it, "components": empty.tolist()})
        gmm = DiagonalGMM(weights, means, var)
        bar.set_postfix(loglik=f"{ll:.5f}")
        if len(history) > 1 and abs(history[-1] - history[-2]) < tol:
            converged = True
            break
    seconds = time.perf_counter() - t0
    final = passes.soft(gemm_weights(gmm, summary.mean))[1] / summary.n if score else None
    collapsed = int((np.median(gmm.variances, axis=1) <= 10 * reg_covar).sum())
    if not converged and tol > 0:
        gain = history[-1] - history[-2] if len(history) > 1 else float("nan")
        print(f"mmfm: EM did not converge in {max_iter} iterations (last gain {gain:.3g} >= tol {tol})",
              file=sys.stderr)
    return EMResult(gmm=gmm, loglik=history, n_iter=len(history), converged=converged, final_loglik=final,
                    reseeded=reseeded, collapsed=collapsed, backend=be.name, dtype=str(np.dtype(dtype)),
                    block_rows=block_rows, seconds=seconds, seconds_per_iter=seconds / max(1, len(history)))


def _reseed(passes: _Passes, gmm: DiagonalGMM, empty: np.ndarray, nk: np.ndarray, summary):
    """Move empty components onto the rows with the lowest log-likelihood under the other components."""
    weights = gmm.weights.copy()
    weights[empty] = 0.0
    weights /= weights.sum()
    _, _, per_row = passes.soft(gemm_weights(DiagonalGMM(weights, gmm.means, gmm.variances), summary.mean),
                                rows_ll=True)
    worst = np.argsort(per_row, kind="stable")[: empty.size]
    rows = gdata.gather(passes.host, worst)
    means, var, nk = gmm.means.copy(), gmm.variances.copy(), nk.copy()
    order = np.argsort(worst, kind="stable")  # gather returns rows sorted by index
    means[empty[order]] = rows
    var[empty] = summary.variance
    nk[empty] = 1.0
    return means, var, nk / nk.sum()


def _check_settings(*, max_iter, tol, reg_covar, dtype):
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"max_iter: expected a positive integer, got {max_iter!r}")
    if not (tol >= 0):
        raise ValueError(f"tol: expected a non-negative number, got {tol!r}")
    if not (reg_covar >= 0):
        raise ValueError(f"reg_covar: expected a non-negative number, got {reg_covar!r}")
    if str(np.dtype(dtype)) not in ("float32", "float64"):
        raise ValueError(f"dtype: expected float32 or float64, got {dtype!r}")


def mean_log_likelihood(gmm: DiagonalGMM, data, dtype: str = "float64", device: str = "cpu",
                        summary: gdata.DataSummary | None = None) -> float:
    """``(1/N) sum_i log p(x_i)``, blockwise (float64 by default): the score both fits are judged by."""
    source = gdata.as_rows(data)
    summary = summary or gdata.summarize(source)
    be = Backend(device)
    if gmm.dim != summary.dim:
        raise ValueError(f"gmm: the mixture has {gmm.dim} features but the data has {summary.dim}")
    rows = default_block_rows(gmm.k, gmm.dim, be.gpu, summary.n)
    passes = _Passes(source, summary, be, dtype, rows, reuse=False)
    return passes.soft(gemm_weights(gmm, summary.mean))[1] / summary.n
