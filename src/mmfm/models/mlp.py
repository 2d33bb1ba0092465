"""A small MLP velocity field ``v(x, t)`` for vector data (the R^10 toy)."""

from __future__ import annotations

import math

import torch
from torch import nn

from mmfm import _checks


class VelocityMLP(nn.Module):
    """``v(x, t) = MLP([x, sin(2 pi f t), cos(2 pi f t)])`` with SiLU activations.

    ``x``: ``(B, dim)``, ``t``: ``(B,)``. ``f`` are ``time_frequencies`` fixed frequencies 1, 2, 4, ...
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, time_frequencies: int = 8):
        super().__init__()
        for name, v in dict(dim=dim, hidden=hidden, depth=depth).items():
            _checks.integer(name, v)
        self.dim = dim
        self.register_buffer("freqs", 2 * math.pi * 2.0 ** torch.arange(time_frequencies, dtype=torch.float32))
        layers, width = [], dim + 1 + 2 * time_frequencies
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _checks.shape("x", x, (None, self.dim))
        _checks.shape("t", t, (x.shape[0],))
        arg = t[:, None].to(x.dtype) * self.freqs
        return self.net(torch.cat([x, t[:, None].to(x.dtype), arg.sin(), arg.cos()], dim=1))
