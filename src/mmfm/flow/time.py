"""Time in the paper's convention, its training distributions, the dimension shift and sampling grids.

Convention (docs/design.md §2): ``t = 0`` is the source (noise / GMM), ``t = 1`` is data. The RAE / MM-FM
release uses ``t_rae = 1 - t``; everything here is in the paper's convention and the functions named
``*_rae`` exist only to state the correspondence (and to test it).

Shift (docs/method.md §2.3, §6.2). With ``s = sqrt(dim / base)`` (``sqrt(196608 / 4096) = sqrt(48)`` for
DINOv2-B latents), RAE maps its times by ``t' = s t / (1 + (s - 1) t)``, pushing them toward noise.
In the paper's convention (``tau = 1 - t``) the same map is ``tau' = tau / (s - (s - 1) tau)``.
It is applied to the training times *and* to the sampling grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmfm import _checks

#: The SD-VAE latent size 32 * 32 * 4 that RAE's shift is relative to.
SHIFT_BASE_DIM = 4096
#: RAE trains on ``t_rae`` in ``[0, 1 - 1/1000]``, i.e. ``t`` in ``[0.001, 1]`` here (docs/method.md §6.3).
RAE_TIME_INTERVAL = (1e-3, 1.0)


def shift_factor(dim: int, base: int = SHIFT_BASE_DIM) -> float:
    """``s = sqrt(dim / base)``; ``dim`` is the number of scalars in one latent (e.g. 256 * 768)."""
    _checks.integer("dim", dim)
    _checks.integer("base", base)
    return math.sqrt(dim / base)


def _check_shift(s: float) -> float:
    if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0):
        raise ValueError(f"shift: expected a finite positive number, got {s!r}")
    return float(s)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Paper convention: ``t' = t / (s - (s - 1) t)``; maps 0 -> 0 and 1 -> 1, toward 0 for s > 1."""
    s = _check_shift(shift)
    return t / (s - (s - 1.0) * t)


def shift_time_rae(t_rae: torch.Tensor, shift: float) -> torch.Tensor:
    """RAE convention: ``t' = s t / (1 + (s - 1) t)``; equals ``1 - shift_time(1 - t_rae)``."""
    s = _check_shift(shift)
    return s * t_rae / (1.0 + (s - 1.0) * t_rae)


@dataclass(frozen=True)
class TimeSampler:
    """Training-time distribution, in the paper's convention.

    ``kind="uniform"``: ``t ~ U(lo, hi)``. ``kind="logit_normal"``: ``logit(t) ~ N(mu, sigma^2)``
    truncated to ``[lo, hi]``, drawn by inverse CDF. The result is then shifted with ``shift_time``.

    A RAE config ``logit-normal_mu_sigma`` with RAE's interval corresponds to
    ``TimeSampler("logit_normal", mu=-mu, sigma=sigma, interval=(0.001, 1.0))``
    (``logit(1 - t) = -logit(t)``); see :meth:`rae`.
    """

    kind: str = "logit_normal"
    mu: float = 0.0
    sigma: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)
    shift: float = 1.0

    def __post_init__(self):
        _checks.choice("kind", self.kind, ("uniform", "logit_normal"))
        lo, hi = self.interval
        _checks.interval("interval", lo, hi)
        _check_shift(self.shift)
        if not math.isfinite(self.mu):
            raise ValueError(f"mu: expected a finite number, got {self.mu}")
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma: expected a finite positive number, got {self.sigma}")

    @classmethod
    def rae(cls, dim: int, base: int = SHIFT_BASE_DIM, mu: float = 0.0, sigma: float = 1.0) -> "TimeSampler":
        """RAE / MM-FM training times: RAE's ``logit-normal_{mu}_{sigma}``, its interval, shift sqrt(dim/base)."""
        return cls("logit_normal", mu=-mu, sigma=sigma, interval=RAE_TIME_INTERVAL, shift=shift_factor(dim, base))

    def quantile(self, u: torch.Tensor) -> torch.Tensor:
        """Inverse CDF of the (shifted) distribution at probabilities ``u`` in [0, 1], in float64."""
        u = u.double()
        lo, hi = self.interval
        if self.kind == "uniform":
            t = lo + (hi - lo) * u
        else:
            a = torch.special.ndtr(torch.tensor((_logit(lo) - self.mu) / self.sigma, dtype=torch.float64))
            b = torch.special.ndtr(torch.tensor((_logit(hi) - self.mu) / self.sigma, dtype=torch.float64))
            z = self.mu + self.sigma * torch.special.ndtri(a + (b - a) * u)
            t = torch.sigmoid(z).clamp(lo, hi)
        return shift_time(t, self.shift)

    def __call__(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Draw ``n`` times, shape ``(n,)``."""
        _checks.integer("n", n, minimum=0)
        if device is None and generator is not None:
            device = generator.device
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return self.quantile(u).to(dtype)


def _logit(p: float) -> float:
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p / (1.0 - p))


def time_grid(
    steps: int,
    shift: float = 1.0,
    end: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Sampling grid of ``steps + 1`` increasing times from 0 to ``shift_time(end)``.

    ``linspace(0, end, steps + 1)`` mapped through the shift, so the steps are small near the source
    when ``shift > 1`` (where RAE's large shift puts them).
    """
    _checks.integer("steps", steps)
    if not (0.0 < end <= 1.0):
        raise ValueError(f"end: expected 0 < end <= 1, got {end}")
    base = torch.linspace(0.0, end, steps + 1, dtype=torch.float64, device=device)
    return shift_time(base, shift).to(dtype)


def rae_time_grid(num_points: int = 50, dim: int = 768 * 256, base: int = SHIFT_BASE_DIM, **kw) -> torch.Tensor:
    """RAE's ODE grid (docs/method.md §2.5) in the paper's convention.

    RAE integrates ``torchdiffeq.odeint`` over ``shift_rae(1 - linspace(0, 0.999, num_points))``: with
    50 points, 49 Euler steps from ``t_rae = 1`` to ``0.006887``. Here that is
    ``shift_time(linspace(0, 0.999, num_points))``, from 0 to ``0.993113``; the sample is the state at
    the last point, so about 0.7 % of the source remains in it, as in the release.
    """
    return time_grid(num_points - 1, shift=shift_factor(dim, base), end=1.0 - 1e-3, **kw)
