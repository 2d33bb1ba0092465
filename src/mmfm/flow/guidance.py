"""Guidance: autoguidance with a weaker guide model and classifier-free guidance.

Both return velocity fields ``v(x, t, **cond)`` in the paper's convention, to be bound and passed to
:func:`mmfm.flow.solvers.solve_ode`. Guidance applies only where ``lo <= t <= hi`` (the interval of
RAE's ``t_min``/``t_max``, given here in the paper's convention: RAE's ``[a, b]`` is ``[1 - b, 1 - a]``);
elsewhere the main (conditional) velocity is used.

The combination is written ``w v_m + (1 - w) v_g``, which equals ``v_g + w (v_m - v_g)`` and is exactly
``v_m`` at ``w = 1``.
"""

from __future__ import annotations

import torch
from torch import nn

from mmfm import _checks


def _inside(t: torch.Tensor, interval: tuple[float, float], like: torch.Tensor) -> torch.Tensor:
    lo, hi = interval
    return ((t >= lo) & (t <= hi)).reshape(-1, *([1] * (like.ndim - 1)))


def _check_interval(interval) -> tuple[float, float]:
    lo, hi = (float(a) for a in interval)
    _checks.interval("interval", lo, hi)
    return lo, hi


class Autoguidance(nn.Module):
    """``v = v_g + w (v_m - v_g)`` (Karras et al. 2024): ``v_m`` the main model, ``v_g`` a smaller or
    less-trained guide evaluated on the same ``(x, t, **cond)`` (MM-FM: DiTDH-S, ``w = 1.5``; a
    mode-conditional main model gets a mode-conditional guide and the same mode)."""

    def __init__(self, main: nn.Module, guide: nn.Module, scale: float, interval=(0.0, 1.0)):
        super().__init__()
        self.main, self.guide, self.scale = main, guide, float(scale)
        self.interval = _check_interval(interval)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        v_m = self.main(x, t, **cond)
        v_g = self.guide(x, t, **cond)
        w = self.scale
        return torch.where(_inside(t, self.interval, v_m), w * v_m + (1.0 - w) * v_g, v_m)


class ClassifierFreeGuidance(nn.Module):
    """``v = v_u + w (v_c - v_u)`` with ``v_u`` the model at the null label (one doubled batch).

    The model must have been trained with label dropout (its table has the null row, index
    ``num_classes``). MM-FM has no CFG (no null row for modes); RAE's class-conditional runs do.
    """

    def __init__(self, model: nn.Module, scale: float, null_label: int, interval=(0.0, 1.0)):
        super().__init__()
        _checks.integer("null_label", null_label, minimum=0)
        self.model, self.scale, self.null_label = model, float(scale), null_label
        self.interval = _check_interval(interval)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **cond) -> torch.Tensor:
        b = x.shape[0]
        if y is None or y.shape != (b,):
            raise ValueError(f"y: classifier-free guidance needs labels of shape ({b},)")
        null = torch.full_like(y, self.null_label)
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null]), **cond)
        v_c, v_u = out[:b], out[b:]
        w = self.scale
        return torch.where(_inside(t, self.interval, v_c), w * v_c + (1.0 - w) * v_u, v_c)
