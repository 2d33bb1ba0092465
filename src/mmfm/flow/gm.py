"""Gaussian mixtures over the flow velocity (GMFlow, docs/gmflow.md): the cell algebra.

A GMFlow network predicts, at every ``(x_t, t)``, a mixture over the random velocity ``u = x1 - x0``
instead of its mean. It is factorized into **cells**: token ``n`` and channel group ``g`` (``G`` contiguous
groups of ``c = D / G`` channels). In each cell

    q(u_ng | x_t) = sum_j A_ngj N(u_ng; mu_ngj, s^2 I_c),

with ``J`` components, weights ``A = softmax_j(logits)`` and one std ``s`` per row, shared by every cell
and component. Shapes: ``B`` rows, ``J`` components, ``N`` tokens, ``D`` channels.

- :class:`GMOutput`: what a GM network returns (velocity means ``(B, J, N, D)``, logits ``(B, J, N, G)``,
  ``log s`` ``(B,)``); its :meth:`~GMOutput.mean` is the mean velocity every ODE solver can use.
- :class:`CellMixture`: a mixture per cell with one variance per row, ``means (B, J, N, G, c)``,
  normalized ``logw (B, J, N, G)``, ``var (B,)``; in x1-form (:func:`x1_mixture`) it is the predicted
  denoising distribution ``p(x1 | x_t)``.
- The moves of the solvers and of guidance, all closed forms on a :class:`CellMixture`: :func:`surrogate`
  (moment matching), :func:`tilt` (product with an isotropic Gaussian), :func:`natural_tilt` (product with
  ``exp(nu . x - lam ||x||^2 / 2)``), :func:`gaussian_ratio`,
  :func:`bayes_move` (the denoising distribution at another ``(x, t)`` without calling the network),
  :func:`reverse_coefficients` (the Gaussian posterior ``q(y_b | y_a, z)``), :func:`guidance_bias` and
  :func:`tilt_toward` (probabilistic guidance and the second-order step), :func:`sample`, :func:`log_prob`.

**The source component of a row.** The forward kernel given the data and the row's source component
``N(m, sigma^2 I)`` (``m = 0, sigma = 1`` for the Gaussian source; ``m = mu_k, sigma^2 = sigma_k^2`` of the
row's mode for MM-FM's spherical GMM) is ``q(x_t | x1) = N(t x1 + (1 - t) m, (1 - t)^2 sigma^2 I)``. In
whitened coordinates ``y = (x - (1 - t) m) / sigma``, ``z = x1 / sigma`` it is the standard kernel
``N(t z, (1 - t)^2 I)``. Functions that need it take ``m`` (``(B, N, D)`` or None for 0) and ``var0``
(``(B,)`` or None for 1). These identities are exact given the mode; with minibatch-OT coupling they do not
hold (x0 depends on x1).

Everything is computed in float32 (float64 inputs stay float64), with logsumexp for the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG_2PI = math.log(2.0 * math.pi)
#: the clamps of the peer: a variance difference, a squared norm and a guidance target's variance ratio
EPS = 1e-6


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _row(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """``(B,)`` -> ``(B, 1, ..., 1)`` with ``ndim`` dimensions."""
    return v.reshape(v.shape[0], *([1] * (ndim - 1)))


def cells(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(..., N, D)`` -> ``(..., N, G, c)`` with ``c = D / G`` (contiguous channel groups)."""
    d = x.shape[-1]
    if groups < 1 or d % groups:
        raise ValueError(f"gm_groups: {groups} does not divide the token width {d}")
    return x.unflatten(-1, (groups, d // groups))


def uncells(x: torch.Tensor) -> torch.Tensor:
    """``(..., N, G, c)`` -> ``(..., N, D)``."""
    return x.flatten(-2)


@dataclass
class GMOutput:
    """A GM network's prediction at ``(x_t, t)``.

    ``means``: ``(B, J, N, D)`` velocity means; ``logits``: ``(B, J, N, G)`` component logits (softmax over
    ``J``); ``logstd``: ``(B,)`` ``log s``, shared by every cell and component.
    """

    means: torch.Tensor
    logits: torch.Tensor
    logstd: torch.Tensor

    @property
    def components(self) -> int:
        return self.means.shape[1]

    @property
    def groups(self) -> int:
        return self.logits.shape[-1]

    def log_weights(self) -> torch.Tensor:
        """``(B, J, N, G)`` normalized ``log A``."""
        return torch.log_softmax(_float(self.logits), dim=1)

    def velocity_mixture(self) -> "CellMixture":
        """The mixture over ``u`` per cell: means ``mu``, weights ``A``, variance ``s^2``."""
        return CellMixture(cells(_float(self.means), self.groups), self.log_weights(),
                           torch.exp(2.0 * _float(self.logstd)))

    def mean(self) -> torch.Tensor:
        """``(B, N, D)`` mean velocity ``sum_j A_j mu_j`` (the flow-matching velocity of the mixture)."""
        return self.velocity_mixture().mean()


@dataclass
class CellMixture:
    """A Gaussian mixture per cell with one isotropic variance per row.

    ``means``: ``(B, J, N, G, c)``; ``logw``: ``(B, J, N, G)`` normalized log-weights; ``var``: ``(B,)``.
    """

    means: torch.Tensor
    logw: torch.Tensor
    var: torch.Tensor

    @property
    def channels(self) -> int:
        return self.means.shape[-1]

    def weights(self) -> torch.Tensor:
        return self.logw.exp()

    def mean_cells(self) -> torch.Tensor:
        """``(B, N, G, c)`` the mixture mean ``sum_j A_j mu_j`` per cell."""
        return (self.weights().unsqueeze(-1) * self.means).sum(1)

    def mean(self) -> torch.Tensor:
        """``(B, N, D)`` the mixture mean."""
        return uncells(self.mean_cells())


def x1_mixture(gm: GMOutput, x: torch.Tensor, t: torch.Tensor) -> CellMixture:
    """The denoising distribution ``p(x1 | x_t = x)``: since ``x1 = x + (1 - t) u``, means ``x + (1 - t) mu_j``,
    variance ``((1 - t) s)^2``, the same weights. ``x`` ``(B, N, D)``, ``t`` ``(B,)``."""
    mix = gm.velocity_mixture()
    x, t = _float(x), _float(t).to(mix.means.dtype)
    r = 1.0 - t
    means = cells(x, gm.groups).unsqueeze(1) + _row(r, 5) * mix.means
    return CellMixture(means, mix.logw, r * r * mix.var)


def surrogate(mix: CellMixture) -> tuple[torch.Tensor, torch.Tensor]:
    """Moment matching: ``(mean (B, N, D), vbar (B,))`` with the per-row scalar
    ``vbar = mean over cells of (1/c) sum_j A_j ||mu_j - mean||^2 + var``."""
    m = mix.mean_cells()
    spread = (mix.weights() * (mix.means - m.unsqueeze(1)).pow(2).sum(-1)).sum(1) / mix.channels  # (B, N, G)
    return uncells(m), spread.flatten(1).mean(1) + mix.var


def tilt(mix: CellMixture, g: torch.Tensor, gamma: torch.Tensor) -> CellMixture:
    """The product ``mix x N(g, gamma I)``, renormalized: ``mu'_j = (gamma mu_j + v g) / (gamma + v)``,
    ``v' = v gamma / (gamma + v)``, ``log A'_j = log A_j - ||mu_j - g||^2 / (2 (gamma + v))``.
    ``g`` ``(B, N, D)``, ``gamma`` ``(B,)``."""
    gc = cells(_float(g), mix.means.shape[-2]).unsqueeze(1)
    v, gamma = mix.var, gamma.to(mix.var.dtype)
    tot = gamma + v
    means = (_row(gamma, 5) * mix.means + _row(v, 5) * gc) / _row(tot, 5)
    logw = mix.logw - (mix.means - gc).pow(2).sum(-1) / (2.0 * _row(tot, 4))
    return CellMixture(means, torch.log_softmax(logw, dim=1), v * gamma / tot)


def gaussian_ratio(a: torch.Tensor, alpha: torch.Tensor, b: torch.Tensor, beta: torch.Tensor):
    """``N(a, alpha I) / N(b, beta I)`` with ``alpha < beta`` is proportional to ``N(g, gamma I)``:
    ``gamma = alpha beta / (beta - alpha)``, ``g = (beta a - alpha b) / (beta - alpha)`` (``beta - alpha``
    clamped at 1e-6). ``a``, ``b`` ``(B, ...)``; ``alpha``, ``beta`` ``(B,)``. Returns ``(g, gamma)``."""
    diff = (beta - alpha).clamp_min(EPS)
    r = lambda v: _row(v, a.ndim)  # noqa: E731
    return (r(beta) * a - r(alpha) * b) / r(diff), alpha * beta / diff


def _var0(var0, like: torch.Tensor) -> torch.Tensor:
    if var0 is None:
        return torch.ones(like.shape[0], dtype=like.dtype, device=like.device)
    return _float(var0).to(like.dtype)


def bayes_move(mix: CellMixture, x_a: torch.Tensor, t_a: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
               m: torch.Tensor | None = None, var0: torch.Tensor | None = None) -> CellMixture:
    """The denoising mixture ``mix`` at ``(x_a, t_a)`` moved to ``(x, t)``, ``t_a <= t < 1``, by Bayes' rule:
    multiplied by the kernel ratio ``q(x | x1) / q(x_a | x1) ~ exp(nu . x1 - lambda ||x1||^2 / 2)`` with

        lambda = [t^2 / (1 - t)^2 - t_a^2 / (1 - t_a)^2] / sigma^2,
        nu     = [t (x - (1 - t) m) / (1 - t)^2 - t_a (x_a - (1 - t_a) m) / (1 - t_a)^2] / sigma^2,

    that is ``mu'_j = (mu_j + v nu) / (1 + v lambda)``, ``v' = v / (1 + v lambda)``,
    ``log A'_j = log A_j + mu_j . (nu - lambda mu_j / 2) / (1 + v lambda)``. Exact when ``mix`` is the true
    posterior of the row's source component ``(m, var0)`` (module docstring). ``x_a``, ``x``, ``m``
    ``(B, N, D)``; ``t_a``, ``t``, ``var0`` ``(B,)``."""
    dt = mix.means.dtype
    t_a, t = _float(t_a).to(dt), _float(t).to(dt)
    s2 = _var0(var0, mix.var)
    ya, y = _float(x_a).to(dt), _float(x).to(dt)
    if m is not None:
        mm = _float(m).to(dt)
        ya = ya - _row(1.0 - t_a, 3) * mm
        y = y - _row(1.0 - t, 3) * mm
    snr = lambda s: s / (1.0 - s).pow(2)  # noqa: E731  (t / (1 - t)^2)
    lam = (t * snr(t) - t_a * snr(t_a)) / s2
    nu = (_row(snr(t), 3) * y - _row(snr(t_a), 3) * ya) / _row(s2, 3)
    return natural_tilt(mix, nu, lam)


def natural_tilt(mix: CellMixture, nu: torch.Tensor, lam: torch.Tensor) -> CellMixture:
    """``mix`` multiplied by ``exp(nu . x - lam ||x||^2 / 2)`` per cell and renormalized (a tilt in natural
    parameters, ``lam >= 0``): ``mu'_j = (mu_j + v nu) / (1 + v lam)``, ``v' = v / (1 + v lam)``,
    ``log A'_j = log A_j + mu_j . (nu - lam mu_j / 2) / (1 + v lam)``. ``nu`` ``(B, N, D)``, ``lam`` ``(B,)``.
    ``nu = 0, lam = 0`` is the identity (up to the rounding of the renormalization)."""
    dt = mix.means.dtype
    nuc = cells(_float(nu).to(dt), mix.means.shape[-2]).unsqueeze(1)
    lam = _float(lam).to(dt)
    v = mix.var
    den = 1.0 + v * lam
    means = (mix.means + _row(v, 5) * nuc) / _row(den, 5)
    logw = mix.logw + (mix.means * (nuc - 0.5 * _row(lam, 5) * mix.means)).sum(-1) / _row(den, 4)
    return CellMixture(means, torch.log_softmax(logw, dim=1), v / den)


def reverse_coefficients(t_a: torch.Tensor, t_b: torch.Tensor):
    """``(c1, c2, c3)`` of the Gaussian posterior ``q(y_b | y_a, z) = N(c1 y_a + c2 z, c3 I)`` of the standard
    kernel ``y_t = t z + (1 - t) eps`` for ``t_a < t_b <= 1``:
    ``rho = (1 - t_b) t_a / ((1 - t_a) t_b)``, ``beta = 1 - rho^2``, ``c1 = rho (1 - t_b) / (1 - t_a)``,
    ``c2 = beta t_b``, ``c3 = beta (1 - t_b)^2``. At ``t_b = 1``: ``(0, 1, 0)``. Tensors or floats."""
    rho = (1.0 - t_b) * t_a / ((1.0 - t_a) * t_b)
    beta = 1.0 - rho * rho
    return rho * (1.0 - t_b) / (1.0 - t_a), beta * t_b, beta * (1.0 - t_b) ** 2


def guidance_bias(m_c: torch.Tensor, vbar: torch.Tensor, m_u: torch.Tensor, scale: float,
                  orthogonal: float = 1.0) -> torch.Tensor:
    """Probabilistic guidance's bias ``b`` ``(B, N, D)``: ``b = m_c - m_u``, minus ``orthogonal`` times its
    projection on ``m_c`` (``<a, b>`` the mean over the ``N D`` elements), then scaled to RMS
    ``scale sqrt(vbar)``. ``m_c``, ``m_u``: conditional / unconditional x1-means; ``vbar`` ``(B,)`` the
    conditional surrogate variance; ``0 < scale < 1``."""
    m_c, m_u = _float(m_c), _float(m_u).to(_float(m_c).dtype)
    b = m_c - m_u
    dims = tuple(range(1, b.ndim))
    if orthogonal:
        proj = (b * m_c).mean(dims, keepdim=True) / (m_c * m_c).mean(dims, keepdim=True).clamp_min(EPS)
        b = b - orthogonal * proj * m_c
    rms2 = b.pow(2).mean(dims, keepdim=True).clamp_min(EPS)
    return scale * (_row(vbar.to(b.dtype), b.ndim) / rms2).sqrt() * b


def tilt_toward(base: CellMixture, bias: torch.Tensor) -> CellMixture:
    """``base`` tilted so that its surrogate ``N(m_B, vbar)`` becomes ``N(m_B + b, vbar max(1e-6,
    1 - mean(b^2) / vbar))``: the tilt by the ratio target / ``N(m_B, vbar)``. With ``b`` the guidance bias
    this is probabilistic guidance (the result is exactly the target for a Gaussian ``base``); with the
    second-order extrapolation added it is GM-ODE / GM-SDE 2's step. ``bias`` ``(B, N, D)``; its RMS must
    not exceed ``sqrt(vbar)`` (the solvers clip it) -- beyond, the target variance is clamped at
    ``1e-6 vbar``. The ratio is applied in natural parameters (:func:`natural_tilt`), so ``b = 0`` leaves
    ``base`` exactly unchanged."""
    m_b, vbar = surrogate(base)
    b = _float(bias).to(m_b.dtype)
    target = vbar * (1.0 - b.pow(2).flatten(1).mean(1) / vbar).clamp_min(EPS)
    # the ratio N(m_B + b, target) / N(m_B, vbar) in natural parameters: precision lam = 1/target - 1/vbar,
    # linear term lam m_B + b / target. Unlike gaussian_ratio's (g, gamma) form, whose clamp
    # vbar - target >= 1e-6 is absolute, this is exactly the identity at b = 0 at any scale of vbar.
    lam = 1.0 / target - 1.0 / vbar
    nu = _row(lam, 3) * m_b + b / _row(target, 3)
    return natural_tilt(base, nu, lam)


def sample(mix: CellMixture, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(B, N, D)``: per cell a component ``j ~ A``, then ``mu_j + sqrt(v) xi``."""
    b, j, n, g, c = mix.means.shape
    w = mix.weights().permute(0, 2, 3, 1).reshape(-1, j)
    pick = torch.multinomial(w.float(), 1, generator=generator).reshape(b, n, g)
    idx = pick[:, None, :, :, None].expand(b, 1, n, g, c)
    mean = mix.means.gather(1, idx).squeeze(1)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return uncells(mean + _row(mix.var.sqrt(), 4) * noise)


def log_prob(mix: CellMixture, x: torch.Tensor) -> torch.Tensor:
    """``(B,)`` ``log q(x)`` of ``x`` ``(B, N, D)``, summed over cells:
    ``sum_cells logsumexp_j [log A_j - ||x - mu_j||^2 / (2 v)] - (N D / 2) log(2 pi v)``."""
    xc = cells(_float(x).to(mix.means.dtype), mix.means.shape[-2]).unsqueeze(1)
    v = mix.var
    quad = (xc - mix.means).pow(2).sum(-1) / (2.0 * _row(v, 4))
    per_cell = torch.logsumexp(mix.logw - quad, dim=1)  # (B, N, G)
    numel = x[0].numel()
    return per_cell.flatten(1).sum(1) - 0.5 * numel * (LOG_2PI + torch.log(v))


__all__ = ["CellMixture", "GMOutput", "bayes_move", "cells", "gaussian_ratio", "guidance_bias", "log_prob",
           "natural_tilt", "reverse_coefficients", "sample", "surrogate", "tilt", "tilt_toward", "uncells",
           "x1_mixture"]
