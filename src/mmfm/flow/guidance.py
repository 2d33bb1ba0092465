"""Guidance: autoguidance with a weaker guide model and classifier-free guidance.

Both return velocity fields ``v(x, t, **cond)`` in the paper's convention, to be bound and passed to
:func:`mmfm.flow.solvers.solve_ode`. Guidance applies only where ``lo <= t <= hi`` (the interval of
RAE's ``t_min``/``t_max``, given here in the paper's convention: RAE's ``[a, b]`` is ``[1 - b, 1 - a]``);
elsewhere the main (conditional) velocity is used.

The combination is written ``w v_m + (1 - w) v_g``, which equals ``v_g + w (v_m - v_g)`` and is exactly
``v_m`` at ``w = 1``.

:class:`ProbabilisticGuidance` is GMFlow's guidance, for :func:`mmfm.flow.solvers.solve_gm`: it reweights
the predicted denoising mixture instead of extrapolating a velocity.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmfm import _checks
from mmfm.flow import gm


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


class ProbabilisticGuidance(nn.Module):
    """GMFlow's probabilistic guidance, for :func:`mmfm.flow.solvers.solve_gm`'s ``guidance=``.

    At ``(x, t)`` the conditional (main) network's ``x1``-mixture ``C`` has the surrogate ``N(m_c, vbar)``
    (:func:`~mmfm.flow.gm.surrogate`). The "unconditional" ``x1``-mean ``m_u`` comes from ``guide(x, t)``:

    - a velocity tensor ``(B, N, D)`` (an ordinary velocity network, e.g. MM-FM's autoguide, conditioning
      bound by a closure): ``m_u = x + (1 - t) v_guide`` -- probabilistic *auto*guidance;
    - a :class:`~mmfm.flow.gm.GMOutput` (a GM network, e.g. at the null label): ``m_u`` = the mean of its
      ``x1``-mixture.

    The bias (:func:`~mmfm.flow.gm.guidance_bias`) is ``b = m_c - m_u`` minus ``orthogonal`` times its
    projection on ``m_c``, scaled to RMS ``scale sqrt(vbar)``; the guided mixture is
    ``tilt_toward(C, b)``, which is exactly ``N(m_c + b, (1 - scale^2) vbar)`` for a Gaussian ``C``.
    Guidance acts on the rows with ``lo <= t <= hi`` (``interval``, paper convention; the peer's
    ``sigma``-interval ``[a, b]`` is ``[1 - b, 1 - a]``); elsewhere ``b = 0`` and the row's scale is 0.
    ``0 < scale < 1``; a scale of 0 means no guidance: pass ``guidance=None``.
    """

    def __init__(self, guide, scale: float, interval=(0.0, 1.0), orthogonal: float = 1.0):
        super().__init__()
        if not callable(guide):
            raise ValueError(f"guide: expected a callable guide(x, t), got {type(guide).__name__}")
        scale = float(scale)
        if not (0.0 < scale < 1.0):
            raise ValueError(f"gm_guidance_scale: expected 0 < scale < 1 (0 is off: pass guidance=None), "
                             f"got {scale}")
        orthogonal = float(orthogonal)
        if not (math.isfinite(orthogonal) and 0.0 <= orthogonal <= 1.0):
            raise ValueError(f"gm_orthogonal: expected a number in [0, 1], got {orthogonal}")
        lo, hi = (float(a) for a in interval)
        _checks.interval("gm_guidance_interval", lo, hi)
        self.guide, self.scale, self.orthogonal, self.interval = guide, scale, orthogonal, (lo, hi)

    def inside(self, t: torch.Tensor) -> torch.Tensor:
        """``(B,)`` bool: the rows whose time is in the guidance interval."""
        lo, hi = self.interval
        return (t >= lo) & (t <= hi)

    def scales(self, t: torch.Tensor) -> torch.Tensor:
        """``(B,)`` the guidance scale of each row at time ``t`` ``(B,)``: ``scale`` inside the interval,
        0 outside (the ``w~`` of the second-order damping)."""
        return self.inside(t).to(t.dtype) * self.scale

    def unconditional_mean(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` ``m_u`` from the guide at ``(x, t)``: ``x + (1 - t) v_guide`` or the mean of a GM
        guide's ``x1``-mixture."""
        out = self.guide(x, t)
        if isinstance(out, gm.GMOutput):
            return gm.x1_mixture(out, x, t).mean()
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise ValueError(f"guide: expected a GMOutput or a velocity of shape {tuple(x.shape)}, got "
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        return x + (1.0 - t).reshape(-1, *([1] * (x.ndim - 1))) * out.to(x.dtype)

    def bias(self, cond: gm.CellMixture, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` the guidance bias ``b`` for the conditional ``x1``-mixture ``cond`` at ``(x, t)``;
        0 on the rows outside the interval (the guide is not called when no row is inside)."""
        inside = self.inside(t)
        if not bool(inside.any()):
            return torch.zeros_like(gm.uncells(cond.means[:, 0]))
        m_c, vbar = gm.surrogate(cond)
        b = gm.guidance_bias(m_c, vbar, self.unconditional_mean(x, t), self.scale, self.orthogonal)
        return torch.where(inside.reshape(-1, 1, 1), b, torch.zeros_like(b))

    def forward(self, cond: gm.CellMixture, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """:meth:`bias`."""
        return self.bias(cond, x, t)
