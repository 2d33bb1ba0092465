"""The ``pixels`` tokenizer: the offline default (docs/design.md §7).

An image ``(C, H, W)`` in ``[0, 1]`` is normalized per channel, ``x' = (x - m_c) / s_c``, and cut
into non-overlapping ``p x p`` patches: ``N = (H/p)(W/p)`` tokens, row-major over the grid, each of
width ``D = C p^2`` ordered ``(c, dy, dx)``. The global descriptor (the "CLS") is the normalized
image average-pooled to ``q x q``, flattened: ``Dc = C q^2``. :meth:`decode` is the exact inverse of
:meth:`encode` on the tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class PixelTokenizer:
    """Patches as tokens, a pooled image as the descriptor; ``decode(encode(x)[1]) == x``."""

    name = "pixels"

    def __init__(self, image_size: int = 8, patch_size: int = 2, channels: int = 3, pool: int = 2,
                 pixel_mean: tuple[float, ...] = (0.5, 0.5, 0.5), pixel_std: tuple[float, ...] = (0.5, 0.5, 0.5)):
        for key, value in (("image_size", image_size), ("patch_size", patch_size), ("channels", channels),
                           ("pool", pool)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{key}: expected a positive integer, got {value!r}")
        if image_size % patch_size or image_size % pool:
            raise ValueError(f"patch_size and pool must divide image_size {image_size}, got {patch_size} and {pool}")
        if len(pixel_mean) != channels or len(pixel_std) != channels or min(pixel_std) <= 0:
            raise ValueError(f"pixel_mean / pixel_std: expected {channels} values each, std positive")
        self.image_size, self.patch_size, self.channels, self.pool = image_size, patch_size, channels, pool
        self.pixel_mean, self.pixel_std = tuple(map(float, pixel_mean)), tuple(map(float, pixel_std))
        side = image_size // patch_size
        self.grid = (side, side)
        self.num_tokens = side * side
        self.token_dim = channels * patch_size**2
        self.cls_dim = channels * pool**2

    def metadata(self) -> dict:
        return {"encoder": self.name, "revision": "1", "input_size": self.image_size, "grid": list(self.grid),
                "patch_size": self.patch_size, "token_dim": self.token_dim, "cls_dim": self.cls_dim,
                "pool": self.pool, "pixel_mean": list(self.pixel_mean), "pixel_std": list(self.pixel_std)}

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.channels, 1, 1)
        return (torch.tensor(self.pixel_mean, dtype=x.dtype, device=x.device).view(shape),
                torch.tensor(self.pixel_std, dtype=x.dtype, device=x.device).view(shape))

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images (B, C, H, W)`` in [0, 1] -> ``(cls (B, Dc), tokens (B, N, D))``."""
        expected = (self.channels, self.image_size, self.image_size)
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images: expected shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(getattr(images, 'shape', ()))}")
        mean, std = self._stats(images)
        x = (images - mean) / std
        p = self.patch_size
        tokens = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)  # (B, N, C p p), (c, dy, dx) order
        cls = F.avg_pool2d(x, self.image_size // self.pool).flatten(1)
        return cls, tokens.contiguous()

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens (B, N, D)`` -> images ``(B, C, H, W)`` (not clamped: the exact inverse)."""
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3 or tuple(tokens.shape[1:]) != (
                self.num_tokens, self.token_dim):
            raise ValueError(f"tokens: expected shape (B, {self.num_tokens}, {self.token_dim}), "
                             f"got {tuple(getattr(tokens, 'shape', ()))}")
        p, s = self.patch_size, self.image_size
        x = F.fold(tokens.transpose(1, 2), output_size=(s, s), kernel_size=p, stride=p)
        mean, std = self._stats(x)
        return x * std + mean
