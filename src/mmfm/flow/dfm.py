"""Decomposable Flow Matching (DFM): stage-wise flows on the Laplacian pyramid of the latent (docs/dfm.md).

Convention: ``t = 0`` is the source, ``t = 1`` data. The data ``x1`` and a source sample are split into the
``S`` stages of :class:`~mmfm.flow.pyramid.LaplacianPyramid`, ``X_s`` and ``eps_s``; every stage has its own time
``tau_s`` and its own linear path

    x_s = (1 - tau_s) eps_s + tau_s X_s,     u_s = X_s - eps_s.

One network reads all stages at their times (packed, ``(B, M, D)`` and ``(B, S)``) and predicts every stage's
velocity. **Training** (:class:`DFMTimes`, :func:`dfm_loss`): a current stage ``k ~ Categorical(weights)`` (once
per batch, the peer's, or per sample); stages before ``k`` at low noise, ``logit(tau) ~ N(early_mu, 1)``; stage
``k`` from the run's time distribution; later stages at ``tau = 0`` with their input zeroed; the loss sums each
active stage's mean squared error. **Sampling** (:func:`dfm_schedule`, :func:`solve_dfm`): stage ``i`` runs from 0
to its start threshold in ``n_i`` Euler steps while every earlier stage ``j`` follows
``1 - tau_j = (1 - tau_j^start)(1 - tau_i)``; the last stage ends at 1; NFE = ``sum n_i``.

**Sources** (:func:`source_stages`; ``m``, ``sigma^2`` the row's source component, ``(0, 1)`` for N(0, I)):

- ``decompose`` (the default): ``eps_s = X_s(x0)``, the pyramid of the run's source sample: recomposed at
  ``tau = 0`` it is the sample itself, so mode coupling and mode conditioning carry over unchanged. The stages'
  noises are correlated (the coarse one is the pooled noise); the stage-wise sampler is then not exact on Gaussian
  data (docs/dfm.md §4), yet on the demo it trains better than ``bands``.
- ``bands``: ``eps_s = X_s(m) + sigma n_s`` with ``n_s`` independent standard normals at each stage's resolution:
  each stage keeps the mode's mean and variance, and stages are independent, the assumption under which the
  stage-wise sampler is exact. With a Gaussian source this is the peer's ``independent`` (accepted as a name for
  it, Gaussian source only).
"""

from __future__ import annotations

import math

import torch

from mmfm import _checks
from mmfm.flow.pyramid import LaplacianPyramid
from mmfm.flow.solvers import ODEResult
from mmfm.flow.time import TimeSampler, shift_factor

DFM_SOLVERS = ("dfm-euler",)
DFM_SOURCES = ("decompose", "bands", "independent")
STAGE_DRAWS = ("batch", "sample")


def stage_shifts(pyramid: LaplacianPyramid, token_dim: int, shift: float | str = "auto") -> list[float]:
    """Each stage's time shift: ``auto`` gives ``max(1, sqrt(N_s D / 4096))`` (sqrt(12) and sqrt(48) for DINOv2-B's
    8 x 8 and 16 x 16 stages; 1 for the demo), a number the same for every stage."""
    if shift == "auto":
        return [max(1.0, shift_factor(n * token_dim)) for n in pyramid.sizes]
    return [float(shift)] * pyramid.stages


def default_weights(stages: int) -> list[float] | None:
    """The peer's stage-draw probabilities ``[0.9, 0.1]`` for two stages; ``[1]`` for one; none for more."""
    return {1: [1.0], 2: [0.9, 0.1]}.get(stages)


def default_starts(stages: int) -> list[float]:
    """Start thresholds: each stage runs to ``tau = 0.9`` before the next one starts (the peer's ``[0.9]``)."""
    return [0.9] * (stages - 1)


def check_weights(weights, stages: int) -> list[float]:
    """``dfm_stage_weights``: ``S`` probabilities summing to 1 (ValueError naming the key)."""
    if not (isinstance(weights, (list, tuple)) and len(weights) == stages
            and all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights)):
        raise ValueError(f"dfm_stage_weights: expected {stages} probabilities >= 0 (one per stage), got {weights!r}")
    if abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"dfm_stage_weights: the probabilities must sum to 1, got {list(weights)} "
                         f"(sum {sum(weights):g})")
    return [float(w) for w in weights]


def check_starts(starts, stages: int) -> list[float]:
    """``dfm_starts``: ``S - 1`` thresholds in (0, 1), non-decreasing (ValueError naming the key)."""
    if not (isinstance(starts, (list, tuple)) and len(starts) == stages - 1
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1 for v in starts)):
        raise ValueError(f"dfm_starts: expected {stages - 1} thresholds in (0, 1) (the time stage s reaches before "
                         f"stage s + 1 starts), got {starts!r}")
    if any(b < a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"dfm_starts: thresholds out of order {list(starts)}: a finer stage's start must not "
                         "come before a coarser one's (non-decreasing)")
    return [float(v) for v in starts]


def split_steps(nfe: int, stages: int, ratio: float = 4.0) -> list[int]:
    """``nfe`` Euler steps over the stages in the proportion ``ratio^(S-1-s)`` (coarse first; the peer's 40 + 10
    at 50 and ``ratio`` 4), each at least 1: 16 -> [13, 3], 8 -> [6, 2], 2 -> [1, 1]."""
    _checks.integer("nfe", nfe)
    if nfe < stages:
        raise ValueError(f"nfe: {stages} stages need at least {stages} network calls (one step each), got {nfe}")
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"dfm_ratio: expected a positive number, got {ratio!r}")
    w = [ratio ** (stages - 1 - s) for s in range(stages)]
    steps = [0] + [max(1, round(nfe * v / sum(w))) for v in w[1:]]
    while nfe - sum(steps) < 1:  # the coarse stage keeps at least one step
        i = max(range(1, stages), key=lambda s: steps[s])
        steps[i] -= 1
    steps[0] = nfe - sum(steps)
    return steps


def dfm_schedule(steps: list[int], starts: list[float]) -> torch.Tensor:
    """``(K + 1, S)`` float64 stage times, ``K = sum(steps)``: in chunk ``i`` stage ``i`` goes linearly in the step
    index from 0 to ``starts[i]`` (1 for the last stage), earlier stages follow ``1 - tau_j = (1 - tau_j^start)
    (1 - tau_i)`` (continuous, monotone, all at 1 at the end), later stages stay at 0."""
    stages = len(steps)
    if len(starts) != stages - 1:
        raise ValueError(f"dfm_starts: expected {stages - 1} thresholds for {stages} stages, got {len(starts)}")
    for n in steps:
        _checks.integer("steps", n)
    rows = [torch.zeros(stages, dtype=torch.float64)]
    for i, n in enumerate(steps):
        end = 1.0 if i == stages - 1 else float(starts[i])
        begin = rows[-1].clone()
        for q in range(1, n + 1):
            row = begin.clone()
            row[i] = end * q / n
            row[:i] = 1.0 - (1.0 - begin[:i]) * (1.0 - row[i])
            rows.append(row)
    return torch.stack(rows)


class DFMTimes:
    """The stage and time draws of training (the module docstring).

    Args:
        weights: the current stage's probabilities ``(S,)``.
        current: ``S`` time samplers of the current stage (the run's distribution at each stage's shift).
        early: ``S`` time samplers of the stages before it (``logit(tau) ~ N(early_mu, 1)``, shifted alike).
        draw: ``batch`` (one current stage for the whole batch, the peer's) or ``sample`` (one per row).
    """

    def __init__(self, weights, current: list[TimeSampler], early: list[TimeSampler], draw: str = "batch"):
        self.stages = len(weights)
        self.weights = torch.tensor(check_weights(list(weights), self.stages), dtype=torch.float64)
        self.current, self.early = current, early
        self.draw = _checks.choice("dfm_stage_draw", draw, STAGE_DRAWS)

    def __call__(self, n: int, generator: torch.Generator | None = None, device=None) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
        """``(stage (n,) int64, taus (n, S) float32)``: each row's current stage and its stages' times."""
        k = torch.multinomial(self.weights.to(device), 1 if self.draw == "batch" else n, replacement=True,
                              generator=generator)
        stage = k.expand(n) if self.draw == "batch" else k
        cur = torch.stack([s(n, generator=generator, device=device) for s in self.current], dim=1)
        early = torch.stack([s(n, generator=generator, device=device) for s in self.early], dim=1)
        index = torch.arange(self.stages, device=stage.device)
        taus = torch.where(index < stage[:, None], early, torch.where(index == stage[:, None], cur, 0.0))
        return stage, taus


def source_stages(kind: str, pyramid: LaplacianPyramid, x0: torch.Tensor, *, mean: torch.Tensor | None = None,
                  var: torch.Tensor | None = None, normals: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The source's stages ``eps_s`` (the module docstring) for a full-resolution source sample ``x0 (B, N, D)``:
    ``decompose`` gives ``X_s(x0)``; ``bands`` / ``independent`` give ``X_s(m) + sigma n_s`` with ``n_s`` the given
    standard ``normals`` ``[(B, N_s, D)]`` of the coarse stages (``S - 1``) and, for the finest stage,
    ``x0 - m = sigma n`` itself: ``eps_{S-1} = x0 - m + X_{S-1}(m)``. ``mean (B, N, D)`` and ``var (B,)`` are each
    row's component (None: ``(0, 1)``, the Gaussian source)."""
    _checks.choice("dfm_source", kind, DFM_SOURCES)
    if kind == "decompose" or pyramid.stages == 1:
        return pyramid.decompose(x0)
    if normals is None or len(normals) != pyramid.stages - 1:
        raise ValueError(f"normals: dfm_source {kind!r} needs the standard normals of the {pyramid.stages - 1} "
                         "coarse stages")
    if var is not None and var.ndim != 1:
        raise ValueError(f"spatial.covariance: dfm_source {kind!r} needs one variance per mode (a spherical spatial "
                         "GMM); use dfm_source: decompose with a diagonal one")
    std = 1.0 if var is None else var.sqrt().reshape(-1, 1, 1)
    m = pyramid.decompose(mean) if mean is not None else [0.0] * pyramid.stages
    out = [m[s] + std * normals[s] for s in range(pyramid.stages - 1)]
    out.append(x0 if mean is None else x0 - mean + m[-1])
    return out


def dfm_loss(pred: torch.Tensor, target: torch.Tensor, active: torch.Tensor, pyramid: LaplacianPyramid,
             reduction: str = "none") -> torch.Tensor:
    """``sum_s active_s mean_{N_s, D} (pred_s - target_s)^2``: packed ``pred``, ``target`` ``(B, M, D)``, ``active``
    ``(B, S)`` bool. Per row ``(B,)`` (``reduction="none"``) or its mean. Each stage weighs by its mean, so the 4x
    smaller coarse stage counts as much as the fine one; inactive stages contribute nothing (no gradient)."""
    _checks.same_shape("pred", pred, "target", target)
    _checks.shape("active", active, (pred.shape[0], pyramid.stages))
    err = (pred.float() - target.float()).square() if pred.dtype != torch.float64 else (pred - target).square()
    per = torch.stack([e.mean(dim=(1, 2)) for e in pyramid.unpack(err)], dim=1)
    loss = torch.where(active, per, torch.zeros((), dtype=per.dtype, device=per.device)).sum(dim=1)
    return loss if reduction == "none" else loss.mean()


def solve_dfm(velocity, start: list[torch.Tensor], schedule: torch.Tensor, pyramid: LaplacianPyramid, *,
              cond: dict | None = None, return_stages: bool = False) -> ODEResult:
    """Stage-wise Euler along ``schedule`` (:func:`dfm_schedule`) from the source's stages ``start``
    ``[(B, N_s, D)]``: each step one call ``velocity(packed x (B, M, D), taus (B, S), **cond)`` with the stages
    that wait (no increment yet) zeroed and at ``tau = 0``, then Euler on the moving stages. Returns the recomposed
    ``(B, N, D)`` (the packed stages with ``return_stages``) and NFE = the steps."""
    if schedule.ndim != 2 or schedule.shape[1] != pyramid.stages:
        raise ValueError(f"schedule: expected (K + 1, {pyramid.stages}) stage times, got {tuple(schedule.shape)}")
    cond = cond or {}
    x = [s.float().clone() for s in start]
    b, device = x[0].shape[0], x[0].device
    sched = schedule.to(device=device, dtype=torch.float32)
    moves = (schedule.diff(dim=0) > 0).tolist()  # from the host copy: no device read per step
    for k, moving in enumerate(moves):
        dt = sched[k + 1] - sched[k]
        inputs = pyramid.pack([xs if on else torch.zeros_like(xs) for xs, on in zip(x, moving)])
        v = pyramid.unpack(velocity(inputs, sched[k].expand(b, -1), **cond).float())
        x = [xs + dt[s] * v[s] if moving[s] else xs for s, xs in enumerate(x)]
    out = pyramid.pack(x) if return_stages else pyramid.recompose(x)
    return ODEResult(out, None, None, schedule.shape[0] - 1)


__all__ = ["DFMTimes", "DFM_SOLVERS", "DFM_SOURCES", "STAGE_DRAWS", "check_starts", "check_weights",
           "default_starts", "default_weights", "dfm_loss", "dfm_schedule", "solve_dfm", "source_stages",
           "split_steps", "stage_shifts"]
