"""Velocity regression loss of flow matching."""

from __future__ import annotations

import torch

from mmfm import _checks


def velocity_loss(
    v_pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """``l_i = mean_d (v_theta(x_t, t)_i - u_i)^2``, per sample, then ``mean_i(w_i l_i)``.

    Args:
        v_pred: ``(B, ...)`` predicted velocity.
        target: ``(B, ...)`` target velocity, ``x1 - x0`` for the linear path.
        weights: optional ``(B,)`` per-sample weights (e.g. the per-mode adaptive weights of the
            release, docs/method.md §3.7); the batch loss is ``mean_i(w_i l_i)``, not renormalized.
        reduction: ``"mean"`` (a scalar) or ``"none"`` (the ``(B,)`` weighted per-sample losses).

    The squared error is computed in float32 even when ``v_pred`` comes out of bf16 autocast.
    """
    _checks.choice("reduction", reduction, ("mean", "none"))
    _checks.same_shape("v_pred", v_pred, "target", target)
    if v_pred.ndim < 1 or v_pred.shape[0] == 0:
        raise ValueError(f"v_pred: expected a non-empty batch, got shape {tuple(v_pred.shape)}")
    err = (v_pred.float() - target.float()).pow(2)
    per_sample = err.reshape(err.shape[0], -1).mean(1)
    if weights is not None:
        _checks.shape("weights", weights, (v_pred.shape[0],))
        _checks.finite("weights", weights)
        per_sample = per_sample * weights.to(per_sample.dtype)
    return per_sample.mean() if reduction == "mean" else per_sample
