"""ODE solvers for ``dx/dt = v(x, t)`` from the source (t = 0) toward data (t = 1).

Fixed-grid Euler (order 1), Heun and midpoint (order 2); adaptive Dormand-Prince (``dopri5``) through
torchdiffeq. The velocity is any callable ``v(x, t)`` with ``x`` of shape ``(B, ...)`` and ``t`` of
shape ``(B,)`` (bind conditioning with a closure or use :mod:`mmfm.flow.guidance`). The state keeps
``x0``'s dtype -- pass float32 (docs/design.md §2) -- and each velocity is cast to it.

:func:`solve_gm` samples a GMFlow network (one that returns a :class:`~mmfm.flow.gm.GMOutput`): GM-ODE
(Euler on the mixture mean, with network-free sub-steps by Bayes moves) and GM-SDE (draws through the
exact reverse transition), each of order 1 or 2, with optional probabilistic guidance
(:class:`~mmfm.flow.guidance.ProbabilisticGuidance`). A GM network's mean velocity
(:meth:`~mmfm.flow.gm.GMOutput.mean`) also runs through :func:`solve_ode` unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torchdiffeq import odeint

from mmfm import _checks
from mmfm.flow import gm

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
FIXED = ("euler", "heun", "midpoint")
SOLVERS = FIXED + ("dopri5",)


@dataclass
class ODEResult:
    """``x``: the state at the last grid time. ``trajectory``: ``(T, B, ...)`` states at every grid time
    (``None`` unless asked). ``path_length``: ``(B,)`` length of each path (``None`` unless asked).
    ``nfe``: velocity evaluations made (for dopri5, counted as the solver called the field)."""

    x: torch.Tensor
    trajectory: torch.Tensor | None
    path_length: torch.Tensor | None
    nfe: int


def _norm(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).float().norm(dim=1)


def solve_ode(
    velocity: Velocity,
    x0: torch.Tensor,
    grid: torch.Tensor,
    method: str = "euler",
    *,
    trajectory: bool = False,
    path_length: bool = False,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> ODEResult:
    """Integrate ``dx/dt = velocity(x, t)`` from ``x0`` at ``grid[0]`` through every time of ``grid``.

    Path length: for fixed-grid methods, the polygonal length ``sum_j ||x_{j+1} - x_j||`` of the
    solution (for Euler, ``sum_j dt_j ||v(x_j, t_j)||``); for dopri5, the integral
    ``int ||v(x_t, t)|| dt`` solved as an extra state component, to the same tolerance.
    """
    _checks.choice("method", method, SOLVERS)
    x0 = _checks.tensor("x0", x0, min_ndim=1)
    grid = _checks.tensor("grid", grid, ndim=1)
    if grid.numel() < 2:
        raise ValueError(f"grid: expected at least 2 times, got {grid.numel()}")
    d = grid[1:] - grid[:-1]
    if not (bool((d > 0).all()) or bool((d < 0).all())):
        raise ValueError("grid: expected strictly monotone times")
    batch, dtype, device = x0.shape[0], x0.dtype, x0.device
    count = [0]

    def v(x, t):
        count[0] += 1
        out = velocity(x, torch.full((batch,), float(t), device=device, dtype=dtype))
        if out.shape != x.shape:
            raise ValueError(f"velocity: expected output shape {tuple(x.shape)}, got {tuple(out.shape)}")
        return out.to(dtype)

    if method == "dopri5":
        return _solve_dopri5(v, x0, grid, trajectory, path_length, atol, rtol, count)

    times = grid.tolist()
    x = x0
    states = [x0] if trajectory else None
    length = torch.zeros(batch, device=device) if path_length else None
    for t, t_next in zip(times[:-1], times[1:]):
        h = t_next - t
        k1 = v(x, t)
        if method == "euler":
            x_next = x + h * k1
        elif method == "heun":
            k2 = v(x + h * k1, t_next)
            x_next = x + 0.5 * h * (k1 + k2)
        else:  # midpoint
            k2 = v(x + 0.5 * h * k1, t + 0.5 * h)
            x_next = x + h * k2
        if path_length:
            length = length + _norm(x_next - x)
        x = x_next
        if trajectory:
            states.append(x)
    return ODEResult(x, torch.stack(states) if trajectory else None, length, count[0])


def _solve_dopri5(v, x0, grid, trajectory, path_length, atol, rtol, count) -> ODEResult:
    t = grid.to(device=x0.device, dtype=torch.float64 if x0.dtype == torch.float64 else torch.float32)
    if path_length:
        def rhs(tt, state):
            x, _ = state
            vx = v(x, tt)
            return vx, _norm(vx).to(x.dtype)

        y0 = (x0, torch.zeros(x0.shape[0], device=x0.device, dtype=x0.dtype))
        xs, ls = odeint(rhs, y0, t, method="dopri5", atol=atol, rtol=rtol)
        length = ls[-1]
    else:
        xs = odeint(lambda tt, x: v(x, tt), x0, t, method="dopri5", atol=atol, rtol=rtol)
        length = None
    return ODEResult(xs[-1], xs if trajectory else None, length, count[0])


# --- GMFlow: GM-ODE and GM-SDE -------------------------------------------------------------------------

#: The sampler names of a GMFlow model (``sample.method``); ``solve_gm``'s ``mode`` is ``"ode"`` / ``"sde"``.
GM_SOLVERS = ("gm-ode", "gm-sde")
GM_MODES = ("ode", "sde")
#: ``(c_a, c_b)`` of the second-order step's damping (the peer's ``gm2_coefs``).
GM2_COEFS = (0.005, 1.0)
GMModel = Callable[[torch.Tensor, torch.Tensor], gm.GMOutput]


def gm_substeps(nfe: int) -> int:
    """GM-ODE sub-steps per network call for a budget of ``nfe`` calls (the peer's rule):
    ``max(2, ceil(128 / nfe))``, but 8 at ``nfe`` 4 and 6. So 128 / 8 -> 16, 32 -> 4, 16 -> 8."""
    _checks.integer("nfe", nfe)
    return 8 if nfe in (4, 6) else max(2, math.ceil(128 / nfe))


def _check_gm_output(out, x: torch.Tensor) -> None:
    if not isinstance(out, gm.GMOutput):
        raise ValueError(f"model: expected a GMOutput, got {type(out).__name__}")
    b, n, d = x.shape
    _checks.shape("model means", out.means, (b, None, n, d))
    _checks.shape("model logits", out.logits, (b, out.means.shape[1], n, None))
    _checks.shape("model logstd", out.logstd, (b,))


def solve_gm(
    model: GMModel,
    x0: torch.Tensor,
    grid: torch.Tensor,
    *,
    substeps: int = 1,
    order: int = 2,
    mode: str = "ode",
    m: torch.Tensor | None = None,
    var0: torch.Tensor | None = None,
    guidance=None,
    generator: torch.Generator | None = None,
    trajectory: bool = False,
    gm2_coefs: tuple[float, float] = GM2_COEFS,
) -> ODEResult:
    """Sample a GMFlow network from ``x0`` at ``grid[0]`` to ``grid[-1]`` (which may be exactly 1).

    ``model(x, t) -> GMOutput`` with ``x`` ``(B, N, D)`` and ``t`` ``(B,)`` (bind conditioning with a
    closure). ``grid``: the fine grid, ``M * substeps + 1`` increasing times in ``[0, 1]``; the coarse times
    ``t_i = grid[i * substeps]`` are where the network is called, ``M`` times (the result's ``nfe``).
    ``m`` ``(B, N, D)`` (None: 0) and ``var0`` ``(B,)`` (None: 1) are each row's source component
    ``N(m, var0 I)`` (the Gaussian source: None / None; MM-FM's spherical GMM: the row's mode mean and
    variance; the network must then know the mode). At coarse step ``i`` with ``x1``-mixture ``C_i`` of the
    network at ``(x_i, t_i)`` (:func:`~mmfm.flow.gm.x1_mixture`):

    1. Guidance (``guidance``, a :class:`~mmfm.flow.guidance.ProbabilisticGuidance`, or None): the bias
       ``b_g = guidance.bias(C_i, x_i, t_i)`` and ``G_i = tilt_toward(C_i, b_g)``; without it ``G_i = C_i``.
    2. Order 2, at ``i >= 1``: ``mu~`` the mean of ``G_{i-1}`` Bayes-moved from ``(x_{i-1}, t_{i-1})`` to
       ``(x_i, t_i)``; with ``(m_B, vbar) = surrogate(C_i)``, ``h = t_{i+1} - t_i``, ``h' = t_i - t_{i-1}``,
       ``w`` the row's guidance scale (0 without guidance or outside its interval) and
       ``(c_a, c_b) = gm2_coefs``: ``delta = sqrt(max(0, 1 - vbar (w^2 c_b^2 + c_a) / h'^2))``,
       ``b = h / (2 h') (mean(G_i) - mu~) delta + b_g``, clipped to RMS ``<= sqrt(vbar)``, and the step's
       mixture is ``tilt_toward(C_i, b)`` (extrapolation and guidance fused in one tilt). Otherwise it is
       ``G_i``.
    3. ``mode="ode"`` (GM-ODE): for each fine interval ``[tau, tau']`` of the coarse step,
       ``x1hat`` = the mean of the step's mixture Bayes-moved from ``(x_i, t_i)`` to ``(x, tau)`` (no move at
       ``tau = t_i``; no network call), then ``x <- x + (tau' - tau) (x1hat - x) / (1 - tau)``. With
       ``substeps=1`` this is Euler on the mean velocity.
       ``mode="sde"`` (GM-SDE, ``substeps=1``): ``x1hat`` drawn from the mixture per cell (``generator``),
       then the exact reverse transition in whitened coordinates,
       ``x' = c1 (x - (1 - t_i) m) + c2 x1hat + (1 - t_{i+1}) m + sqrt(var0 c3) xi`` with
       ``(c1, c2, c3) = reverse_coefficients(t_i, t_{i+1})``. A last step to ``t = 1`` lands on ``x1hat``.

    The state is float32 (float64 if ``x0`` is float64). ``trajectory``: the states at every fine grid
    time, ``(M * substeps + 1, B, N, D)``. Returns an :class:`ODEResult` (``path_length`` None).
    """
    _checks.choice("mode", mode, GM_MODES)
    if order not in (1, 2) or isinstance(order, bool):
        raise ValueError(f"gm_order: expected 1 or 2, got {order!r}")
    _checks.integer("gm_substeps", substeps)
    if mode == "sde" and substeps != 1:
        raise ValueError(f"gm_substeps: GM-SDE takes no sub-steps (expected 1, got {substeps}); "
                         "sub-steps are GM-ODE's")
    x0 = _checks.tensor("x0", x0, ndim=3)
    grid = _checks.tensor("grid", grid, ndim=1)
    times = [float(v) for v in grid.tolist()]
    if len(times) < 2:
        raise ValueError(f"grid: expected at least 2 times, got {len(times)}")
    if any(b <= a for a, b in zip(times, times[1:])) or times[0] < 0.0 or times[-1] > 1.0:
        raise ValueError(f"grid: expected strictly increasing times in [0, 1], got {times[0]} .. {times[-1]}")
    if (len(times) - 1) % substeps:
        raise ValueError(f"gm_substeps: {substeps} does not divide the {len(times) - 1} intervals of grid")
    ca, cb = (float(c) for c in gm2_coefs)
    if not (math.isfinite(ca) and math.isfinite(cb) and ca >= 0.0 and cb >= 0.0):
        raise ValueError(f"gm2_coefs: expected two finite non-negative numbers, got {gm2_coefs!r}")
    dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    batch, device = x0.shape[0], x0.device
    if m is not None:
        m = _checks.tensor("m", m).to(dtype)
        _checks.same_shape("m", m, "x0", x0)
    if var0 is not None:
        var0 = _checks.tensor("var0", var0).to(dtype)
        _checks.shape("var0", var0, (batch,))
        _checks.positive("var0", var0)
    if guidance is not None and not (callable(getattr(guidance, "bias", None))
                                     and callable(getattr(guidance, "scales", None))):
        raise ValueError(f"guidance: expected a ProbabilisticGuidance or None, got {type(guidance).__name__}")

    def full(t: float) -> torch.Tensor:
        return torch.full((batch,), t, dtype=dtype, device=device)

    x = x0.to(dtype)
    states = [x] if trajectory else None
    sigma = None if var0 is None else var0.sqrt().reshape(batch, 1, 1)
    prev = None  # (G_{i-1}, x_{i-1}, t_{i-1}) for the second order
    steps = (len(times) - 1) // substeps
    for i in range(steps):
        t_i, t_next = times[i * substeps], times[(i + 1) * substeps]
        tt = full(t_i)
        out = model(x, tt)
        _check_gm_output(out, x)
        out = gm.GMOutput(out.means.to(dtype), out.logits.to(dtype), out.logstd.to(dtype))
        cond = gm.x1_mixture(out, x, tt)
        b_guid = None if guidance is None else guidance.bias(cond, x, tt).to(dtype)
        guided = cond if b_guid is None else gm.tilt_toward(cond, b_guid)
        mix = guided
        if order == 2 and prev is not None:
            p_mix, p_x, p_t = prev
            mu_prev = gm.bayes_move(p_mix, p_x, full(p_t), x, tt, m, var0).mean()
            _, vbar = gm.surrogate(cond)
            w = torch.zeros_like(vbar) if guidance is None else guidance.scales(tt).to(dtype)
            h, h_prev = t_next - t_i, t_i - p_t
            damp = (1.0 - vbar * ((w * cb) ** 2 + ca) / h_prev**2).clamp_min(0.0).sqrt()
            bias = (h / (2.0 * h_prev)) * damp.reshape(batch, 1, 1) * (guided.mean() - mu_prev)
            if b_guid is not None:
                bias = bias + b_guid
            power = bias.pow(2).flatten(1).mean(1).clamp_min(torch.finfo(dtype).tiny)
            bias = bias * (vbar / power).clamp(max=1.0).sqrt().reshape(batch, 1, 1)
            mix = gm.tilt_toward(cond, bias)
        prev = (guided, x, t_i)
        if mode == "ode":
            x_base = x
            for q in range(i * substeps, (i + 1) * substeps):
                tau, tau_next = times[q], times[q + 1]
                here = mix if q == i * substeps else gm.bayes_move(mix, x_base, tt, x, full(tau), m, var0)
                x = x + ((tau_next - tau) / (1.0 - tau)) * (here.mean() - x)
                if trajectory:
                    states.append(x)
        else:
            x1hat = gm.sample(mix, generator)
            c1, c2, c3 = gm.reverse_coefficients(t_i, t_next)
            y = x if m is None else x - (1.0 - t_i) * m
            x_new = c1 * y + c2 * x1hat
            if m is not None:
                x_new = x_new + (1.0 - t_next) * m
            if c3 > 0.0:
                xi = torch.randn(x.shape, generator=generator, device=device, dtype=dtype)
                scale = math.sqrt(c3) if sigma is None else math.sqrt(c3) * sigma
                x_new = x_new + scale * xi
            x = x_new
            if trajectory:
                states.append(x)
    return ODEResult(x, torch.stack(states) if trajectory else None, None, steps)
