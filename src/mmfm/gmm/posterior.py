"""CLS posterior and mode assignment on torch tensors, for any batch size.

The log-joint is the GEMM form of :class:`~mmfm.flow.sources.GaussianMixtureSource` (centred on
``sum_k pi_k mu_k``, float32-safe); here it is applied in row blocks so that a batch of any size
costs one ``rows x K`` block of memory. Training draws modes with ``source.assign(c, soft=True)``
(docs/method.md §3.4); the spatial stage uses :func:`hard_labels`, the argmax that scikit-learn's
``predict`` returns.
"""

from __future__ import annotations

import numpy as np
import torch

from mmfm.flow.sources import GaussianMixtureSource


def _as_tensor(x, source: GaussianMixtureSource, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.require(x, requirements="W"))  # Arrow buffers are read-only: copy those
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        raise ValueError(f"{what}: expected a (rows, features) array, got {getattr(x, 'shape', type(x).__name__)}")
    if x.shape[1] != source.dim:
        raise ValueError(f"{what}: rows have {x.shape[1]} features but the mixture has {source.dim}")
    return x


def hard_labels(source: GaussianMixtureSource, x, rows: int = 4096, what: str = "x") -> torch.Tensor:
    """``argmax_k p(k | x_i)`` for every row, ``(B,)`` int64, in the mixture's dtype and device."""
    x = _as_tensor(x, source, what)
    dev, dt = source.means.device, source.means.dtype
    out = [source.log_joint(x[i:i + rows].to(device=dev, dtype=dt)).argmax(1).cpu() for i in range(0, len(x), rows)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def responsibilities(source: GaussianMixtureSource, x, rows: int = 4096, what: str = "x") -> torch.Tensor:
    """``p(k | x_i)``, ``(B, K)`` rows summing to one, computed block by block."""
    x = _as_tensor(x, source, what)
    dev, dt = source.means.device, source.means.dtype
    out = [source.posterior(x[i:i + rows].to(device=dev, dtype=dt)) for i in range(0, len(x), rows)]
    return torch.cat(out) if out else torch.zeros(0, source.num_modes, dtype=dt, device=dev)
