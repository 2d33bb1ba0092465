"""The Laplacian pyramid of a token grid (Decomposable Flow Matching, docs/dfm.md §1).

Tokens ``(B, N, D)`` are a row-major ``h x h`` grid (``N = h^2``). With ``down`` the 2 x 2 average pooling (what
bilinear x1/2 without antialias computes) and ``up`` the bilinear x2 upsampling (``align_corners=False``), the
``S`` stages, coarse to fine, are

    L_{S-1} = x;  X_s = L_s - up(down(L_s)),  L_{s-1} = down(L_s)  (s = S-1 .. 1);  X_0 = L_0

so stage ``s`` is a grid of side ``h / 2^(S-1-s)`` (``N_s`` tokens). Recomposition
``x = up(... up(up(X_0) + X_1) ...) + X_{S-1}`` telescopes: it inverts the decomposition exactly for any
``down`` / ``up``. On DINOv2's 16 x 16 grid, two stages are 8 x 8 + 16 x 16 and three 4 x 4 + 8 x 8 + 16 x 16; on
the demo's 4 x 4 grid, two are 2 x 2 + 4 x 4. One stage is the identity.

A *packed* tensor ``(B, M, D)``, ``M = sum_s N_s``, holds the stages one after the other (coarse first): the one
tensor the DFM network, its loss and its sampler pass around (:meth:`LaplacianPyramid.pack`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmfm import _checks


def _grid(x: torch.Tensor, side: int) -> torch.Tensor:
    """``(B, side^2, D)`` -> ``(B, D, side, side)``."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


def _tokens(g: torch.Tensor) -> torch.Tensor:
    """``(B, D, h, w)`` -> ``(B, h*w, D)``."""
    return g.flatten(2).transpose(1, 2)


def down(g: torch.Tensor) -> torch.Tensor:
    """2 x 2 average pooling of a grid ``(B, D, h, w)``."""
    return F.avg_pool2d(g, 2)


def up(g: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 upsampling of a grid ``(B, D, h, w)`` (``align_corners=False``, the peer's)."""
    return F.interpolate(g, scale_factor=2, mode="bilinear", align_corners=False)


class LaplacianPyramid:
    """``stages`` Laplacian stages of an ``h x h`` token grid (the module docstring).

    Args:
        stages: ``S >= 1``; the side must be divisible by ``2^(S-1)`` (:meth:`max_stages`).
        num_tokens: ``N = h^2``.
    """

    def __init__(self, stages: int, num_tokens: int):
        _checks.integer("dfm_stages", stages)
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"num_tokens: a pyramid needs a square token grid, got {num_tokens} tokens")
        most = self.max_stages(side)
        if stages > most:
            raise ValueError(f"dfm_stages: {stages} stages need a grid side divisible by 2^{stages - 1} = "
                             f"{2 ** (stages - 1)}; the {side} x {side} grid allows at most {most}")
        self.stages, self.side, self.num_tokens = stages, side, num_tokens
        #: side of each stage's grid, coarse first
        self.sides = [side >> (stages - 1 - s) for s in range(stages)]
        self.sizes = [n * n for n in self.sides]
        self.offsets = [sum(self.sizes[:s]) for s in range(stages)]
        self.packed_tokens = sum(self.sizes)

    @staticmethod
    def max_stages(side: int) -> int:
        """The most stages a grid of side ``side`` allows: one more than the times 2 divides it."""
        n = 1
        while side % 2 == 0 and side > 1:
            side //= 2
            n += 1
        return n

    def __repr__(self) -> str:
        return f"LaplacianPyramid({self.stages} stages: {' + '.join(f'{n}x{n}' for n in self.sides)})"

    # ---------------------------------------------------------------------------------------------- the map
    def decompose(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, N, D)`` tokens -> the stages ``[(B, N_s, D)]``, coarse first."""
        _checks.shape("x", x, (None, self.num_tokens, None))
        level = _grid(x, self.side)
        out = []
        for _ in range(self.stages - 1):
            coarse = down(level)
            out.append(_tokens(level - up(coarse)))
            level = coarse
        out.append(_tokens(level))
        return out[::-1]

    def recompose(self, stages: list[torch.Tensor]) -> torch.Tensor:
        """The stages ``[(B, N_s, D)]`` -> ``(B, N, D)`` tokens (the inverse of :meth:`decompose`)."""
        if len(stages) != self.stages:
            raise ValueError(f"stages: expected {self.stages} stages, got {len(stages)}")
        level = _grid(stages[0], self.sides[0])
        for s in range(1, self.stages):
            level = up(level) + _grid(stages[s], self.sides[s])
        return _tokens(level)

    def pack(self, stages: list[torch.Tensor]) -> torch.Tensor:
        """``[(B, N_s, D)]`` -> ``(B, M, D)``."""
        for s, (x, n) in enumerate(zip(stages, self.sizes, strict=True)):
            _checks.shape(f"stage {s}", x, (None, n, None))
        return torch.cat(stages, dim=1)

    def unpack(self, packed: torch.Tensor) -> list[torch.Tensor]:
        """``(B, M, D)`` -> ``[(B, N_s, D)]`` (views)."""
        _checks.shape("packed", packed, (None, self.packed_tokens, None))
        return list(packed.split(self.sizes, dim=1))

    def matrix(self, dtype=torch.float64) -> torch.Tensor:
        """``A (M, N)``: the decomposition of one channel as a matrix (``packed = A @ x`` per channel)."""
        eye = torch.eye(self.num_tokens, dtype=dtype).unsqueeze(-1)  # N inputs (N, N, 1)
        return self.pack(self.decompose(eye))[..., 0].T

    # ---------------------------------------------------------------------------- the network's resampling
    def upsample(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """Stage ``stage``'s ``(B, N_s, D)`` nearest-upsampled to the full grid ``(B, N, D)``."""
        f = self.side // self.sides[stage]
        if f == 1:
            return x
        g = _grid(x, self.sides[stage])
        return _tokens(g.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3))

    def pool(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """Full-grid ``(B, N, D)`` average-pooled to stage ``stage``'s grid ``(B, N_s, D)``: the left inverse of
        :meth:`upsample` (bit for bit: the mean of equal numbers)."""
        g = _grid(x, self.side)
        while g.shape[-1] > self.sides[stage]:  # pairwise halving: (a + a) / 2 = a exactly, at every level
            g = (g[..., 0::2, :] + g[..., 1::2, :]) * 0.5
            g = (g[..., 0::2] + g[..., 1::2]) * 0.5
        return _tokens(g) if g.shape[-1] != self.side else x


__all__ = ["LaplacianPyramid", "down", "up"]
