"""Latent normalization (docs/method.md §1.3): per-position, per-channel statistics of the token grid.

``z' = (z - mean) / sqrt(var + eps)`` and back ``z = z' sqrt(var + eps) + mean``, with ``mean`` and
``var`` of shape ``(N, D)`` (token ``i``, channel ``d``; RAE stores them ``(D, H, W)``) and
``eps = 1e-5`` inside the square root. When ``mean`` is absent the normalization is variance-only,
``z / sqrt(var + eps)``, as RAE's released DINOv2-B ``stat.pt`` (``mean = None``) makes it; ``var``
is still the variance about the mean, not the second moment. The CLS is never normalized.

:func:`compute_norm_stats` estimates them in float64 with Welford's update, batch by batch (Chan's
merge of exact batch moments), over a sample of images, and divides by ``n - 1`` as MM-FM's script
does. Files: safetensors ``var`` and, when kept, ``mean`` (float32), with metadata; RAE's
``stat.pt`` is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from mmfm import io

EPS = 1e-5


class LatentNorm:
    """``normalize`` / ``denormalize`` token grids ``(..., N, D)`` with per-position statistics."""

    def __init__(self, var, mean=None, eps: float = EPS, source: str = ""):
        var = torch.as_tensor(np.asarray(var), dtype=torch.float32)
        if var.ndim != 2:
            raise ValueError(f"var: expected shape (N, D), got {tuple(var.shape)}")
        if not bool((var >= 0).all()) or not bool(torch.isfinite(var).all()):
            raise ValueError("var: expected finite non-negative values")
        if mean is not None:
            mean = torch.as_tensor(np.asarray(mean), dtype=torch.float32)
            if mean.shape != var.shape:
                raise ValueError(f"mean: expected shape {tuple(var.shape)} like var, got {tuple(mean.shape)}")
        self.var, self.mean, self.eps, self.source = var, mean, float(eps), source
        self.scale = torch.sqrt(var.double() + self.eps).float()  # sqrt(var + eps), (N, D)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.var.shape)

    def _check(self, z: torch.Tensor, name: str):
        if tuple(z.shape[-2:]) != self.shape:
            raise ValueError(f"{name}: expected token grids (..., {self.shape[0]}, {self.shape[1]}) "
                             f"like the normalization statistics{' of ' + self.source if self.source else ''}, "
                             f"got {tuple(z.shape)}")

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """``(z - mean) / sqrt(var + eps)``; ``z / sqrt(var + eps)`` without a mean."""
        self._check(z, "tokens")
        scale = self.scale.to(z.device, z.dtype)
        return (z - self.mean.to(z.device, z.dtype)) / scale if self.mean is not None else z / scale

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """``z sqrt(var + eps) + mean``: the inverse of :meth:`normalize`."""
        self._check(z, "tokens")
        out = z * self.scale.to(z.device, z.dtype)
        return out + self.mean.to(z.device, z.dtype) if self.mean is not None else out

    def metadata(self) -> dict:
        """What a shard records about how its tokens were normalized."""
        return {"kind": "per-position" if self.mean is not None else "per-position, variance only",
                "eps": self.eps, "mean": self.mean is not None, "file": self.source,
                "sha256": self.digest()}

    def digest(self) -> str:
        h = hashlib.sha256(self.var.numpy().tobytes())
        if self.mean is not None:
            h.update(self.mean.numpy().tobytes())
        return h.hexdigest()[:16]


def save_norm_stats(path, var: np.ndarray, mean: np.ndarray | None, meta: dict) -> None:
    """safetensors ``var`` (and ``mean``) ``(N, D)`` float32, atomically, with ``meta``."""
    tensors = {"var": np.asarray(var, np.float32)}
    if mean is not None:
        tensors["mean"] = np.asarray(mean, np.float32)
    io.save_tensors(path, tensors, {**meta, "eps": EPS})


def load_norm_stats(path: str | os.PathLike) -> LatentNorm:
    """Our safetensors file, or RAE's ``stat.pt`` (``{'mean': (D, H, W) | None, 'var': (D, H, W)}``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such normalization-statistics file (make one with `mmfm norm-stats`)")
    if path.suffix == ".safetensors":
        tensors, meta = io.open_tensors(path)
        if "var" not in tensors:
            raise ValueError(f"{path}: expected a 'var' tensor, found {sorted(tensors)}")
        return LatentNorm(np.array(tensors["var"]), None if "mean" not in tensors else np.array(tensors["mean"]),
                          meta.get("eps", EPS), str(path))
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"{path}: not a readable torch statistics file ({err})") from None
    if not isinstance(raw, dict) or raw.get("var") is None:
        raise ValueError(f"{path}: expected a dict with 'var' (and 'mean' or None), as RAE's stat.pt")

    def tokens(t):  # (D, H, W) -> (H W, D)
        if t.ndim != 3:
            raise ValueError(f"{path}: expected (D, H, W) statistics, got {tuple(t.shape)}")
        return t.float().flatten(1).T.contiguous().numpy()

    mean = raw.get("mean")
    return LatentNorm(tokens(raw["var"]), None if mean is None else tokens(mean), EPS, str(path))


class Welford:
    """Running float64 mean and sum of squared deviations of ``(N, D)`` grids: Chan's exact merge of
    batch moments (:func:`mmfm.gmm.data.merge_moments`, the one the GMM stage's checking pass uses)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def update(self, z: torch.Tensor) -> None:
        """Add a batch ``z (B, N, D)``."""
        from mmfm.gmm.data import merge_moments

        z = z.detach().to("cpu", torch.float64)
        if z.shape[0] == 0:
            return
        if self.mean is None:
            self.mean, self.m2 = torch.zeros(z.shape[1:], dtype=torch.float64), torch.zeros(z.shape[1:],
                                                                                             dtype=torch.float64)
        if z.shape[1:] != self.mean.shape:
            raise ValueError(f"tokens: expected grids {tuple(self.mean.shape)} like the earlier batches, "
                             f"got {tuple(z.shape[1:])}")
        n, mean, m2 = merge_moments(self.n, self.mean.numpy().ravel(), self.m2.numpy().ravel(),
                                    z.reshape(len(z), -1).numpy())
        self.n, self.mean, self.m2 = n, torch.from_numpy(mean).view_as(self.mean), torch.from_numpy(m2).view_as(self.m2)

    def variance(self, ddof: int = 1) -> torch.Tensor:
        if self.n <= ddof:
            raise ValueError(f"normalization statistics need more than {ddof} token grid(s), got {self.n}")
        return self.m2 / (self.n - ddof)
