"""Velocity networks: DiTDH (RAE's DiT with DDT head) and a small MLP for vector data."""

from mmfm.models.ditdh import PRESETS, DiTDH, build_ditdh, count_parameters, grid_to_tokens, tokens_to_grid
from mmfm.models.mlp import VelocityMLP

__all__ = ["PRESETS", "DiTDH", "VelocityMLP", "build_ditdh", "count_parameters", "grid_to_tokens", "tokens_to_grid"]
