"""Tokenizers: images -> (global descriptor, token grid) and back.

Every tokenizer has ``name``, ``image_size`` (the ADM crop its images arrive at), ``grid``
``(h, w)``, ``num_tokens = h w``, ``token_dim``, ``cls_dim``, ``pixel_mean`` / ``pixel_std``,
``encode(images (B, 3, S, S) in [0, 1]) -> (cls (B, Dc), tokens (B, N, D))``,
``decode(tokens) -> images`` and ``metadata()`` (what a shard records about it).
"""

from __future__ import annotations

from mmfm.encoders.pixels import PixelTokenizer

TOKENIZERS = ("pixels", "dinov2", "siglip2", "mae")


def load_tokenizer(name: str, path: str | None = None, *, image_size: int | None = None, device: str = "cpu",
                   precision: str = "fp32", decoder: str | None = None, **pixels):
    """The tokenizer ``name``: ``pixels`` (``pixels`` holds ``patch_size``, ``pool``, ``channels``)
    or a transformers encoder loaded from ``path`` (a local folder or a hub id already in the
    Hugging Face cache; by default the checkpoint RAE uses), with the RAE decoder at ``decoder``;
    ``precision="bf16"`` runs it under bf16 autocast (outputs stay float32)."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision: expected 'fp32' or 'bf16', got {precision!r}")
    if name == "pixels":
        if path is not None or decoder is not None or precision != "fp32":
            raise ValueError("encoder: the pixels tokenizer is exact: it takes no weights, decoder or bf16")
        return PixelTokenizer(image_size=image_size or 8, **pixels)
    if name not in TOKENIZERS:
        raise ValueError(f"encoder: expected one of {TOKENIZERS}, got {name!r}")
    if pixels:
        raise ValueError(f"encoder: {sorted(pixels)} apply to the pixels tokenizer only")
    import torch

    from mmfm.encoders.hf import load_hf_tokenizer

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return load_hf_tokenizer(name, path, image_size=image_size or 256, device=device, dtype=dtype, decoder=decoder)


__all__ = ["PixelTokenizer", "TOKENIZERS", "load_tokenizer"]
