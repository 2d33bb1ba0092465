"""Velocity networks: DiTDH (RAE's DiT with DDT head, velocity or GMFlow head) and a small MLP for vector data."""

from mmfm.models.ditdh import PRESETS, DiTDH, build_ditdh, count_parameters, grid_to_tokens, tokens_to_grid
from mmfm.models.gm_head import GMHead, GMMeanVelocity, GMRAEConvention, LogStdMLP, replicate_velocity_head
from mmfm.models.mlp import VelocityMLP

__all__ = ["GMHead", "GMMeanVelocity", "GMRAEConvention", "LogStdMLP", "PRESETS", "DiTDH", "VelocityMLP",
           "build_ditdh", "count_parameters", "grid_to_tokens", "replicate_velocity_head", "tokens_to_grid"]
