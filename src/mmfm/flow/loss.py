"""Velocity regression loss of flow matching, and the GMFlow losses (docs/gmflow.md §3).

- :func:`velocity_loss`: ``mean_d (v - u)^2`` per row.
- :func:`gm_nll_loss`: the NLL of the velocity ``u`` under a GM network's mixture per ``D_tot = N D``
  elements (transition ratio 1).
- :func:`gm_transition_loss`: the NLL of ``x_b`` at a later time ``t_b`` given ``x_a`` at ``t_a``, with the
  mixture pushed through the Gaussian reverse kernel (ratio ``lambda < 1``; lower-bounds the predicted
  variance). :func:`transition_times` and :func:`forward_transition` make its ``(t_a, t_b)`` and ``x_a``.

The GM losses are per row, with :func:`velocity_loss`'s ``weights`` / ``reduction``, and computed in float32
(float64 stays float64). Source component of a row: ``m`` ``(B, N, D)`` (None: 0) and ``var0`` ``(B,)``
(None: 1), as in :mod:`mmfm.flow.gm`.
"""

from __future__ import annotations

import math

import torch

from mmfm import _checks
from mmfm.flow import gm as gmm
from mmfm.flow.gm import GMOutput

#: t_a is kept at most 1 - TIME_EPS and t_b at least t_a + TIME_EPS (the peer's 1e-4 on its 1000-scaled time)
TIME_EPS = 1e-4


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


def _reduce(per_row: torch.Tensor, weights: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if weights is not None:
        _checks.shape("weights", weights, (per_row.shape[0],))
        _checks.finite("weights", weights)
        per_row = per_row * weights.to(per_row.dtype)
    return per_row.mean() if reduction == "mean" else per_row


def _check_gm(gm: GMOutput, x: torch.Tensor, name: str) -> None:
    b, _, n, d = gm.means.shape
    _checks.shape(name, x, (b, n, d))
    _checks.shape("gm.logits", gm.logits, (b, gm.components, n, None))
    _checks.shape("gm.logstd", gm.logstd, (b,))


def gm_nll_loss(gm: GMOutput, u: torch.Tensor, *, scale: float = 2.0, weights: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
    """GMFlow's velocity NLL, docs/gmflow.md §3, per row times ``scale`` (``gm_loss_scale``)::

        l_i = -(scale / D_tot) sum_{n,g} log sum_j A_ngj N(u_ng; mu_ngj, s^2 I_c),   D_tot = N D,

    then ``mean_i(w_i l_i)`` (or the ``(B,)`` weighted rows for ``reduction="none"``).

    With ``J = 1``, ``log s = 0`` and ``scale = 2`` this is ``velocity_loss(mu, u) + log(2 pi)``, with the same
    gradient in ``mu``; with a learnable ``s`` its optimum is ``s^2 = `` the mean squared error.

    Args:
        gm: the network's :class:`~mmfm.flow.gm.GMOutput` at ``(x_t, t)``.
        u: ``(B, N, D)`` the target velocity ``x1 - x0``.
    """
    _checks.choice("reduction", reduction, ("mean", "none"))
    _check_gm(gm, u, "u")
    logq = gmm.log_prob(gm.velocity_mixture(), u)
    return _reduce(-scale * logq / u[0].numel(), weights, reduction)


def transition_times(t_a: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t_a, t_b)`` of the transition loss from sampled times ``t_a`` ``(B,)`` and the transition ratio
    ``ratio`` (``gm_trans_ratio``, in ``(0, 1]``): ``t_a`` clamped to ``<= 1 - 1e-4``,
    ``t_b = 1 - (1 - ratio)(1 - t_a)`` (``ratio = 1``: ``t_b = 1``), then ``t_b >= t_a + 1e-4`` (at most 1).
    (The peer's ``sigma_b = (1 - ratio) sigma_a`` after ``sigma = 1 - t``.)"""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"gm_trans_ratio: expected a value in (0, 1], got {ratio}")
    t_a = t_a.clamp(max=1.0 - TIME_EPS)
    t_b = 1.0 - (1.0 - ratio) * (1.0 - t_a)
    t_b = torch.maximum(t_b, t_a + TIME_EPS).clamp(max=1.0)
    return t_a, t_b


def _whiten(x: torch.Tensor, t: torch.Tensor, m: torch.Tensor | None, sd: torch.Tensor) -> torch.Tensor:
    """``y = (x - (1 - t) m) / sigma``; ``t``, ``sd`` ``(B,)``."""
    r = lambda v: v.reshape(-1, *([1] * (x.ndim - 1)))  # noqa: E731
    if m is not None:
        x = x - r(1.0 - t) * m.to(x.dtype)
    return x / r(sd)


def _source(x: torch.Tensor, m: torch.Tensor | None, var0: torch.Tensor | None):
    """The float32 / float64 view of ``x`` and the row's source ``(m, sigma (B,))``."""
    x = gmm._float(x)
    if m is not None:
        _checks.shape("m", m, tuple(x.shape))
        m = gmm._float(m).to(x.dtype)
    if var0 is not None:
        _checks.shape("var0", var0, (x.shape[0],))
    return x, m, gmm._var0(var0, x).sqrt()


def forward_transition(x_b: torch.Tensor, t_a: torch.Tensor, t_b: torch.Tensor, eps: torch.Tensor,
                       m: torch.Tensor | None = None, var0: torch.Tensor | None = None) -> torch.Tensor:
    """``x_a`` at the earlier time ``t_a`` from ``x_b`` at ``t_b`` (docs/gmflow.md §3 step 3), in the row's
    whitened coordinates ``y = (x - (1 - t) m) / sigma``::

        y_a = (t_a / t_b) y_b + sqrt((1 - t_a)^2 - (t_a / t_b)^2 (1 - t_b)^2) eps,   x_a = sigma y_a + (1 - t_a) m.

    If ``x_b ~ N(t_b x1 + (1 - t_b) m, (1 - t_b)^2 sigma^2 I)`` (the kernel (0.1) given ``x1``), then ``x_a``
    given ``x1`` is ``N(t_a x1 + (1 - t_a) m, (1 - t_a)^2 sigma^2 I)``: the same kernel at ``t_a``.

    Args:
        x_b: ``(B, N, D)`` at times ``t_b`` ``(B,)``; ``t_a`` ``(B,)`` with ``0 <= t_a < t_b``.
        eps: ``(B, N, D)`` standard normal noise.
        m, var0: the row's source component (None: ``m = 0``, ``var0 = 1``).
    """
    x_b, m, sd = _source(x_b, m, var0)
    _checks.same_shape("x_b", x_b, "eps", eps)
    dt = x_b.dtype
    t_a, t_b = gmm._float(t_a).to(dt), gmm._float(t_b).to(dt)
    _checks.shape("t_a", t_a, (x_b.shape[0],))
    _checks.shape("t_b", t_b, (x_b.shape[0],))
    y_b = _whiten(x_b, t_b, m, sd)
    k = t_a / t_b
    noise = ((1.0 - t_a).pow(2) - (k * (1.0 - t_b)).pow(2)).clamp_min(0.0).sqrt()
    r = lambda v: v.reshape(-1, 1, 1)  # noqa: E731
    y_a = r(k) * y_b + r(noise) * gmm._float(eps).to(dt)
    x_a = r(sd) * y_a
    return x_a if m is None else x_a + r(1.0 - t_a) * m


def gm_transition_loss(gm: GMOutput, x_a: torch.Tensor, t_a: torch.Tensor, x_b: torch.Tensor, t_b: torch.Tensor, *,
                       m: torch.Tensor | None = None, var0: torch.Tensor | None = None, scale: float = 2.0,
                       weights: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """GMFlow's transition loss (docs/gmflow.md §3 steps 4-7), per row times ``scale``.

    ``gm`` is the network at ``(x_a, t_a)``. Its x1-mixture (means ``x_a + (1 - t_a) mu_j``, std
    ``(1 - t_a) s``), whitened (``z = x1 / sigma``: means ``mu^z_j``, std ``s_z = (1 - t_a) s / sigma``), is
    pushed through the reverse kernel ``q(y_b | y_a, z) = N(c1 y_a + c2 z, c3 I)``
    (:func:`mmfm.flow.gm.reverse_coefficients`), which gives per cell

        q(y_b | y_a) = sum_j A_j N(y_b; c1 y_a + c2 mu^z_j, S^2 I_c),
        log S = 1/2 logaddexp(2 log(c2 s_z), log c3),

    with ``c2`` clamped at ``>= 1e-6`` inside its log and a positive ``c3`` at ``>= 1e-6`` (``c3 = 0``, i.e.
    ``t_b = 1``, adds nothing: the loss is then exactly the NLL of ``z``). The row's loss is
    ``l_i = -(scale / D_tot) log q(y_b | y_a)``, then weighted and reduced as in :func:`gm_nll_loss`. With
    ``t_b = 1`` (ratio 1) it equals :func:`gm_nll_loss` of ``u = (x_b - x_a) / (1 - t_a)`` plus
    ``scale (log(1 - t_a) - log(sigma))``, independent of the network. Working in x-space instead of ``y``
    would only add ``scale log sigma``.

    Args:
        gm: the :class:`~mmfm.flow.gm.GMOutput` at ``(x_a, t_a)``.
        x_a, x_b: ``(B, N, D)`` at times ``t_a < t_b <= 1`` ``(B,)`` (:func:`transition_times`,
            :func:`forward_transition`).
        m, var0: the row's source component (None: ``m = 0``, ``var0 = 1``).
    """
    _checks.choice("reduction", reduction, ("mean", "none"))
    _check_gm(gm, x_a, "x_a")
    _checks.same_shape("x_a", x_a, "x_b", x_b)
    mix = gm.velocity_mixture()
    dt = mix.means.dtype
    x_a, m, sd = _source(x_a.to(dt), m, var0)
    x_b = gmm._float(x_b).to(dt)
    t_a, t_b = gmm._float(t_a).to(dt), gmm._float(t_b).to(dt)
    _checks.shape("t_a", t_a, (x_a.shape[0],))
    _checks.shape("t_b", t_b, (x_a.shape[0],))
    y_a, y_b = _whiten(x_a, t_a, m, sd), _whiten(x_b, t_b, m, sd)
    c1, c2, c3 = gmm.reverse_coefficients(t_a, t_b)
    r5 = lambda v: v.reshape(-1, 1, 1, 1, 1)  # noqa: E731
    # x1-mixture whitened, pushed through the kernel: c1 y_a + c2 (x_a + (1 - t_a) mu_j) / sigma
    base = gmm.cells(c1.reshape(-1, 1, 1) * y_a + c2.reshape(-1, 1, 1) * x_a / sd.reshape(-1, 1, 1), gm.groups)
    means = base.unsqueeze(1) + r5(c2 * (1.0 - t_a) / sd) * mix.means
    log_c2sz = torch.log(c2.clamp_min(gmm.EPS)) + torch.log(1.0 - t_a) + gmm._float(gm.logstd).to(dt) - torch.log(sd)
    log_c3 = torch.where(c3 > 0, torch.log(c3.clamp_min(gmm.EPS)), torch.full_like(c3, -math.inf))
    log_std = 0.5 * torch.logaddexp(2.0 * log_c2sz, log_c3)
    logq = gmm.log_prob(gmm.CellMixture(means, mix.logw, torch.exp(2.0 * log_std)), y_b)
    return _reduce(-scale * logq / x_a[0].numel(), weights, reduction)
