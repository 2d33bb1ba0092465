"""Tokenizers: images -> (global descriptor, token grid) and back."""

from mmfm.encoders.pixels import PixelTokenizer

__all__ = ["PixelTokenizer"]
