"""Layers of DiTDH (docs/method.md §2.1), with the module and parameter names of the RAE release.

Recorded facts about the release (read in the public RAE / MM-FM code; no code copied):

- ``RMSNorm``: a ``weight`` of ones, eps 1e-6, normalized in float32 and cast back before scaling.
- ``SwiGLUFFN``: ``w12`` Linear(D, 2H) whose output halves are (gate, value), ``w3`` Linear(H, D);
  ``H = int(2/3 * mlp_ratio * D)``.
- ``NormAttention``: ``qkv`` Linear(D, 3D, bias) viewed as (3, heads, head_dim), ``proj`` Linear(D, D);
  no QK-norm; scaled-dot-product attention.
- 2-D RoPE (EVA ``VisionRotaryEmbeddingFast``): persistent buffers ``freqs_cos`` / ``freqs_sin`` of
  shape ``(N, head_dim)``; the first half of the head channels rotates with the row index, the second
  half with the column index; frequencies ``theta^(-2i/(head_dim/2))``, each repeated for an adjacent
  channel pair, pairs rotated as ``(a, b) -> (-b, a)``.
- ``GaussianFourierEmbedding``: frozen Parameter ``W`` (256,) ~ N(0, 1); features
  ``[sin(2 pi t W), cos(2 pi t W)]`` -> ``mlp`` = Linear(512, D), SiLU, Linear(D, D).
- ``LabelEmbedder``: ``embedding_table`` with ``num_classes + 1`` rows iff label dropout > 0 (the last
  row is the null label).
- Fixed 2-D sin-cos position embedding (MAE's): the first half of the channels encodes the column,
  the second half the row; each half is ``[sin(p w), cos(p w)]`` with ``w_i = 10000^(-i/(D/4))``.
- Patch embeddings are ``proj`` Conv2d layers (timm ``PatchEmbed``); the final layer's output channels
  are ordered ``(p, q, C)`` when unpatchified.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * weight``, computed in float32 (in float64 for float64 inputs)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x if x.dtype == torch.float64 else x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class SwiGLUFFN(nn.Module):
    """``w3(silu(a) * b)`` with ``(a, b) = w12(x)`` split in halves."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class Rope2D(nn.Module):
    """2-D axial rotary embedding over a ``side x side`` token grid (row-major tokens).

    Buffers ``freqs_cos`` / ``freqs_sin``: ``(side^2, head_dim)``. Applied to ``(B, heads, N, head_dim)``.
    """

    def __init__(self, head_dim: int, side: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"head_dim: 2-D RoPE needs a multiple of 4, got {head_dim}")
        half = head_dim // 2  # channels per axis
        freqs = theta ** (-torch.arange(0, half, 2, dtype=torch.float32)[: half // 2] / half)  # (half/2,)
        pos = torch.arange(side, dtype=torch.float32)
        ang = (pos[:, None] * freqs[None, :]).repeat_interleave(2, dim=1)  # (side, half): pairs share angle
        rows = ang[:, None, :].expand(side, side, half)  # row index drives the first half
        cols = ang[None, :, :].expand(side, side, half)  # column index drives the second half
        full = torch.cat([rows, cols], dim=-1).reshape(side * side, head_dim)
        self.register_buffer("freqs_cos", full.cos())
        self.register_buffer("freqs_sin", full.sin())

    @staticmethod
    def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
        """``(..., 2i, 2i+1) -> (..., -x[2i+1], x[2i])``."""
        a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((-b, a), dim=-1).flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] != self.freqs_cos.shape[0]:
            raise ValueError(f"x: expected {self.freqs_cos.shape[0]} tokens for RoPE, got {x.shape[-2]}")
        return x * self.freqs_cos + self.rotate_pairs(x) * self.freqs_sin


class Attention(nn.Module):
    """Multi-head self-attention with QKV bias and optional RoPE on queries and keys."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: {num_heads} does not divide the width {dim}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Rope2D | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:  # RoPE's fp32 buffers would promote bf16 q/k: cast back before SDPA
            q, k = rope(q).to(v.dtype), rope(k).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x (1 + scale) + shift``; shift/scale ``(B, 1, D)`` (global) or ``(B, N, D)`` (per token)."""
    return x * (1 + scale) + shift


class DDTBlock(nn.Module):
    """Transformer block with RMSNorm, RoPE attention, SwiGLU and adaLN-Zero (6 modulation vectors).

    The condition ``c`` is ``(B, D)`` (one per sample, encoder stream) or ``(B, N, D)`` (per token, the
    DDT head conditioned on the encoder's output).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLUFFN(dim, int(2 / 3 * mlp_ratio * dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: Rope2D | None = None) -> torch.Tensor:
        if c.ndim == 2:
            c = c.unsqueeze(1)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DDTFinalLayer(nn.Module):
    """RMSNorm, per-token adaLN shift/scale (no gate), Linear to ``out_dim``; zero-initialized."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = RMSNorm(dim)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if c.ndim == 2:
            c = c.unsqueeze(1)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class GaussianFourierEmbedding(nn.Module):
    """``t -> MLP([sin(2 pi t W), cos(2 pi t W)])`` with ``W`` a frozen Parameter ~ N(0, scale^2)."""

    def __init__(self, hidden: int, num_frequencies: int = 256, scale: float = 1.0):
        super().__init__()
        self.W = nn.Parameter(torch.randn(num_frequencies) * scale, requires_grad=False)
        self.mlp = nn.Sequential(nn.Linear(2 * num_frequencies, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t = t if t.dtype == torch.float64 else t.float()  # (a float64 network keeps float64 times)
        arg = 2 * math.pi * t[:, None] * self.W.detach()[None, :]
        return self.mlp(torch.cat([arg.sin(), arg.cos()], dim=-1).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class or mode embedding; with ``dropout_prob > 0`` a null row (index ``num_classes``) is added
    and, in training, each label is replaced by it with that probability (for CFG)."""

    def __init__(self, num_classes: int, hidden: int, dropout_prob: float = 0.0):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden)

    def forward(self, y: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """``drop``: optional ``(B,)`` bool mask of labels to replace by the null label."""
        if drop is None and self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
        if drop is not None:
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


def sincos_pos_embed_2d(dim: int, side: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding, ``(side^2, dim)`` float32, row-major tokens (MAE layout)."""
    if dim % 4:
        raise ValueError(f"dim: the 2-D sin-cos embedding needs a multiple of 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64), indexing="ij")

    def emb(pos):
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([emb(cols), emb(rows)], axis=1)).float()
