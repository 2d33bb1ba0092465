"""The linear probability path and the one adapter to RAE's time convention.

Paper convention: ``x_t = (1 - t) x0 + t x1`` with ``x0`` from the source and ``x1`` data, and the
regression target ``u = dx_t/dt = x1 - x0``. The RAE / MM-FM release writes ``x_t = (1 - t) x1 + t x0``
with target ``x0 - x1``: ``t_rae = 1 - t`` and ``v_rae = -v``.
"""

from __future__ import annotations

import torch
from torch import nn

from mmfm import _checks


def _expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(B,)`` times -> ``(B, 1, ..., 1)`` broadcastable against ``x`` of shape ``(B, ...)``."""
    _checks.shape("t", t, (x.shape[0],))
    return t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class LinearPath:
    """Linear interpolant with velocity target (rectified flow / conditional OT path)."""

    @staticmethod
    def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = (1 - t) x0 + t x1``; ``x0, x1``: ``(B, ...)``, ``t``: ``(B,)``."""
        _checks.same_shape("x0", x0, "x1", x1)
        tt = _expand(t, x1)
        return (1.0 - tt) * x0 + tt * x1

    @staticmethod
    def velocity(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """Target velocity ``u = x1 - x0`` (independent of t for this path)."""
        _checks.same_shape("x0", x0, "x1", x1)
        return x1 - x0

    def sample(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x_t, u)`` for a batch of coupled pairs at times ``t``."""
        return self.interpolate(x0, x1, t), self.velocity(x0, x1)


class RAEConvention(nn.Module):
    """Run a network trained in RAE's convention as a velocity field in the paper's convention.

    ``v(x, t, **cond) = -net(x, 1 - t, **cond)``. Wrap a released RAE / MM-FM checkpoint with this once;
    nothing else in the package flips signs or times. A DMF flow map copied from one: ``U(x, t, r) =
    -net(x, 1 - t, r=1 - r)`` (its log-variance, with ``return_logvar``, is not negated).
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor | None = None, return_logvar: bool = False,
                **cond):
        if r is None and not return_logvar:
            return -self.net(x, 1.0 - t, **cond)
        out = self.net(x, 1.0 - t, r=None if r is None else 1.0 - r, return_logvar=return_logvar, **cond)
        return (-out[0], out[1]) if return_logvar else -out
