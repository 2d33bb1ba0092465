"""ODE solvers for ``dx/dt = v(x, t)`` from the source (t = 0) toward data (t = 1).

Fixed-grid Euler (order 1), Heun and midpoint (order 2); adaptive Dormand-Prince (``dopri5``) through
torchdiffeq. The velocity is any callable ``v(x, t)`` with ``x`` of shape ``(B, ...)`` and ``t`` of
shape ``(B,)`` (bind conditioning with a closure or use :mod:`mmfm.flow.guidance`). The state keeps
``x0``'s dtype -- pass float32 (docs/design.md §2) -- and each velocity is cast to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torchdiffeq import odeint

from mmfm import _checks

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
