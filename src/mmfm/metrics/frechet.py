"""Fréchet distances between feature sets, and reference statistics files (docs/method.md §2.7).

- :class:`FeatureStats`: the running mean ``mu (D,)`` and unbiased covariance ``sigma (D, D)`` of
  feature rows, accumulated in float64 batch by batch (and mergeable exactly across workers).
- :func:`frechet_distance`: the Fréchet distance of two Gaussians,

      FD = |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2}),

  computed as pytorch-fid's ``calculate_frechet_distance`` does (scipy ``sqrtm``; :func:`_pytorch_fid_distance`,
  its code, so that a job that only needs the distance does not import pytorch-fid, which imports torchvision
  and with it ``torch._dynamo``: seconds of start-up in every evaluate, train and report job), after shape checks.
- :func:`save_stats` / :func:`load_stats`: ``.npz`` files with ``mu`` and ``sigma``, the format of
  pytorch-fid and of ADM's reference batches (``VIRTUAL_imagenet256_labeled.npz`` also holds the
  images ``arr_0`` and spatial statistics ``mu_s``/``sigma_s``; extra keys are ignored). Files are
  read with ``allow_pickle=False``: an object array is refused, never unpickled.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from scipy import linalg

from mmfm.io import atomic_path


def _rows(name: str, x, dim: int | None = None) -> np.ndarray:
    """``x`` (numpy or torch) as a finite float64 array ``(n, dim)``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        want = f"(n, {dim})" if dim is not None else "(n, D)"
        raise ValueError(f"{name}: expected shape {want}, got {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name}: expected a numeric array, got dtype {x.dtype}")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: expected finite values, found {int((~np.isfinite(x)).sum())} non-finite")
    return x


class FeatureStats:
    """Running mean and covariance of feature rows ``x_i in R^D``, in float64.

    Keeps ``n``, the mean ``m`` and the scatter ``M = sum_i (x_i - m)(x_i - m)^T``. A batch (or
    another ``FeatureStats``) ``b`` joins ``a`` by the pairwise formula of Chan et al.::

        n = n_a + n_b,   d = m_b - m_a,   m = m_a + (n_b / n) d,   M = M_a + M_b + (n_a n_b / n) d d^T

    which is exact (no ``E[x x^T] - m m^T`` cancellation), so batch splits and merge order change
    only rounding. ``sigma = M / (n - 1)`` is ``np.cov(x, rowvar=False)`` of all rows seen.
    """

    def __init__(self, dim: int):
        if not (isinstance(dim, int) and dim >= 1):
            raise ValueError(f"dim: expected a positive integer, got {dim!r}")
        self.dim = dim
        self.n = 0
        self._mean = np.zeros(dim)
        self._scatter = np.zeros((dim, dim))

    def update(self, x) -> FeatureStats:
        """Add the rows of ``x`` ``(B, D)`` (numpy or torch, any real dtype; cast to float64)."""
        x = _rows("x", x, self.dim)
        if len(x):
            mean = x.mean(axis=0)
            centred = x - mean
            self._join(len(x), mean, centred.T @ centred)
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add the rows summarized by ``other`` (e.g. another worker's), in place."""
        if not isinstance(other, FeatureStats) or other.dim != self.dim:
            raise ValueError(f"other: expected FeatureStats of dim {self.dim}, got {other!r}")
        if other.n:
            self._join(other.n, other._mean, other._scatter)
        return self

    def _join(self, n_b: int, mean_b: np.ndarray, scatter_b: np.ndarray) -> None:
        n = self.n + n_b
        d = mean_b - self._mean
        self._scatter = self._scatter + scatter_b + np.outer(d, d) * (self.n * n_b / n)
        self._mean = self._mean + d * (n_b / n)
        self.n = n

    @property
    def mu(self) -> np.ndarray:
        """Mean ``(D,)``."""
        if self.n < 1:
            raise ValueError("FeatureStats: no rows yet, the mean is undefined")
        return self._mean.copy()

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance ``(D, D)``, ``M / (n - 1)``."""
        if self.n < 2:
            raise ValueError(f"FeatureStats: the covariance needs at least 2 rows, have {self.n}")
        return self._scatter / (self.n - 1)

    def __repr__(self) -> str:
        return f"FeatureStats(dim={self.dim}, n={self.n})"


def _check_gaussian(name: str, mu, sigma) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1:
        raise ValueError(f"mu{name}: expected shape (D,), got {mu.shape}")
    if sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"sigma{name}: expected shape ({len(mu)}, {len(mu)}) to match mu{name}, got {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"mu{name}/sigma{name}: expected finite values")
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))`` as pytorch-fid computes it.

    ``mu (D,)``, ``sigma (D, D)``, both pairs of the same ``D``. pytorch-fid adds ``1e-6 I`` to both
    covariances when the product is too singular for ``sqrtm``, and refuses a square root with a
    large imaginary part (``ValueError``). A 2048-dim ``sqrtm`` takes tens of seconds on a few cores.
    """
    mu1, sigma1 = _check_gaussian("1", mu1, sigma1)
    mu2, sigma2 = _check_gaussian("2", mu2, sigma2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1, mu2: expected the same dimension, got {mu1.shape} and {mu2.shape}")
    if len(mu1) == 1:  # SciPy >= 1.16 returns no (sqrtm, error) pair for a 1x1 matrix: pad with an equal,
        # independent N(0, 1) dimension, which adds 0 + 1 + 1 - 2 = 0
        mu1, mu2 = np.append(mu1, 0.0), np.append(mu2, 0.0)
        sigma1, sigma2 = np.diag([sigma1[0, 0], 1.0]), np.diag([sigma2[0, 0], 1.0])
    with warnings.catch_warnings():
        # pytorch-fid 0.3.0 passes sqrtm(disp=False), deprecated since SciPy 1.16
        warnings.filterwarnings("ignore", message=".*`disp` argument is deprecated", category=DeprecationWarning)
        return float(_pytorch_fid_distance(mu1, sigma1, mu2, sigma2))


def _pytorch_fid_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid 0.3.0's ``calculate_frechet_distance`` (Apache-2.0; Dougal J. Sutherland's stable version),
    line for line: tests/metrics/test_frechet.py checks it against pytorch-fid's own."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)  # the product might be almost singular
    if not np.isfinite(covmean).all():
        print(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):  # numerical error might give a slight imaginary component
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def frechet_distance_of(features_a, features_b) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets ``(n_a, D)`` and ``(n_b, D)``."""
    a = _rows("features_a", features_a)
    b = _rows("features_b", features_b, a.shape[1])
    sa, sb = FeatureStats(a.shape[1]).update(a), FeatureStats(a.shape[1]).update(b)
    return frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)


class Stats(NamedTuple):
    """Reference statistics: ``mu (D,)`` and ``sigma (D, D)`` float64, and our metadata (``{}`` if none)."""

    mu: np.ndarray
    sigma: np.ndarray
    meta: dict


def save_stats(path: str | os.PathLike, mu, sigma, meta: dict | None = None) -> Path:
    """Write ``mu``, ``sigma`` (float64) and ``meta`` (a JSON string, key ``meta``) to an ``.npz``, atomically.

    The file is read by pytorch-fid (``--fid-statistics``-style ``.npz``) and ADM's evaluator alike.
    """
    path = Path(path)
    mu, sigma = _check_gaussian("", mu, sigma)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez adds no suffix
        np.savez(f, mu=mu, sigma=sigma, meta=np.array(json.dumps(meta or {})))
    return path


def load_stats(path: str | os.PathLike) -> Stats:
    """Read ``mu`` and ``sigma`` from an ``.npz`` (ours, pytorch-fid's, ADM's reference batch).

    Other keys are not read. Raises ``ValueError`` naming the file if it is missing or not an
    ``.npz``, lacks ``mu`` or ``sigma``, holds object arrays (never unpickled), or if the shapes are
    not ``(D,)`` and ``(D, D)``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such reference statistics file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not an .npz file (expected arrays 'mu' and 'sigma')")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("mu", "sigma") if k not in npz.files]
            if missing:
                raise ValueError(f"{path}: no {' or '.join(map(repr, missing))} array "
                                 f"(holds {sorted(npz.files)}); expected reference statistics 'mu' and 'sigma'")
            mu, sigma = npz["mu"], npz["sigma"]
            meta = _meta(npz)
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: cannot read reference statistics without unpickling: {e}") from e
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: cannot read reference statistics: {e}") from e
    for key, a in (("mu", mu), ("sigma", sigma)):
        if not np.issubdtype(a.dtype, np.number):
            raise ValueError(f"{path}: '{key}' has dtype {a.dtype}, expected a numeric array")
    try:
        mu, sigma = _check_gaussian("", mu, sigma)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return Stats(mu, sigma, meta)


def _meta(npz) -> dict:
    """Our ``meta`` JSON string; ``{}`` for files of others (whatever their ``meta`` key holds)."""
    if "meta" not in npz.files:
        return {}
    try:
        meta = json.loads(str(npz["meta"][()]))
    except (ValueError, IndexError):  # not a JSON scalar string: not ours
        return {}
    return meta if isinstance(meta, dict) else {}
