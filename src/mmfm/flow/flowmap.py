"""Decoupled MeanFlow (DMF): the flow map, its training pieces and its samplers (docs/dmf.md).

Convention (docs/dmf.md): ``t = 0`` is the source, ``t = 1`` data, ``x_t = (1 - t) x0 + t x1`` and
``u = x1 - x0``. A **flow map** network predicts the average velocity ``U(x, t, r)``, ``r >= t``, so that

    Phi(x, t, r) = x + (r - t) U(x, t, r)

jumps from time ``t`` to time ``r`` along the flow of ``v``; at ``r = t``, ``U = v``. Since
``(r - t) U(x_t, t, r) = int_t^r v(x_tau, tau) dtau``, differentiating in ``t`` gives the MeanFlow identity

    U(x_t, t, r) = v(x_t, t) + (r - t) dU/dt,   dU/dt = d_t U + v . grad_x U      (docs/dmf.md §1)

which the MeanFlow branch turns into the target ``U_tgt = stopgrad(v + (r - t) dU/dt)``.

A "network" here is a callable ``net(x, t, r=r, return_logvar=True, **cond) -> (U, logvar)`` with ``x``
``(B, ...)``, ``t`` and ``r`` ``(B,)``, ``U`` like ``x`` and ``logvar`` ``(B,)`` (the DMF-DiTDH; ``cond``
such as ``y=labels`` or ``y=modes`` passes through). Called without ``return_logvar`` it returns ``U``.

Pieces: :class:`FlowMapTimes` (the proposals), :func:`robust_log_loss`, :func:`time_derivative` (JVP or
central difference), :func:`mean_flow_target`, :func:`guided_velocity` (the training-time guidance
transform ``G(v)``) and :func:`solve_flowmap` (``flowmap`` Euler and ``flowmap-restart`` sampling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmfm import _checks
from mmfm.flow.solvers import ODEResult
from mmfm.flow.time import shift_time

#: Training times stay in ``[TIME_EPS, 1 - TIME_EPS]``, so ``1 - t`` is never 0 (in float32 too).
TIME_EPS = 1e-5
DMF_DERIVATIVES = ("jvp", "fd")
DMF_GUIDANCE = ("none", "mg", "ag-mg", "ag-distill")
#: The ``sample.method`` names of the flow-map samplers, and the ``mode`` of :func:`solve_flowmap` for each.
FLOWMAP_SOLVERS = ("flowmap", "flowmap-restart")
FLOWMAP_MODES = {"flowmap": "euler", "flowmap-restart": "restart"}
#: The largest time a finite-difference pass evaluates at (docs/dmf.md §3: ``t +- eps`` in ``[0, 1)``).
FD_TIME_MAX = 1.0 - 1e-6


def _rows(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` -> ``(B, 1, ..., 1)`` broadcasting against ``like`` ``(B, ...)``."""
    return a.reshape(-1, *([1] * (like.ndim - 1)))


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _first(out):
    """``U`` from a network's output ``U`` or ``(U, logvar)``."""
    return out[0] if isinstance(out, (tuple, list)) else out


# --------------------------------------------------------------------------------------------------
# time proposals (docs/dmf.md §3)
def _check_proposal(key: str, value) -> tuple[float, float]:
    try:
        mu, sigma = (float(a) for a in value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: expected a pair [mu, sigma] of numbers, got {value!r}") from None
    if not math.isfinite(mu):
        raise ValueError(f"{key}: expected a finite logit mean mu, got {mu}")
    if not (math.isfinite(sigma) and sigma > 0.0):
        raise ValueError(f"{key}: expected a finite sigma > 0, got {sigma}")
    return mu, sigma


@dataclass(frozen=True)
class FlowMapTimes:
    """DMF's time proposals in mmfm's sign: logit-normal draws, each pushed through ``shift_time``.

    ``fm``, ``t``, ``r``: ``(mu, sigma)`` of ``logit(.) ~ N(mu, sigma^2)`` for the flow-matching branch's
    diagonal time ``t_f`` and for the MeanFlow branch's two draws ``a`` and ``b``. The peer's
    ``P_mean`` 0 / 0.4 / -1.2 on its noise level ``sigma = 1 - t`` are the logit means 0 / -0.4 / +1.2
    here (``logit(1 - t) = -logit(t)``). ``shift``: mmfm's ``shift_time`` factor (the peer's sigma-shift
    is the same map). Every time is clamped into ``[TIME_EPS, 1 - TIME_EPS]`` and returned as float32.
    """

    fm: tuple[float, float] = (0.0, 1.0)
    t: tuple[float, float] = (-0.4, 1.0)
    r: tuple[float, float] = (1.2, 1.0)
    shift: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "fm", _check_proposal("dmf_time_fm", self.fm))
        object.__setattr__(self, "t", _check_proposal("dmf_time_t", self.t))
        object.__setattr__(self, "r", _check_proposal("dmf_time_r", self.r))
        s = self.shift
        if isinstance(s, bool) or not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0):
            raise ValueError(f"dmf_proposal_shift: expected a finite number > 0, got {s!r}")
        object.__setattr__(self, "shift", float(s))

    def _draw(self, n: int, proposal: tuple[float, float], generator, device) -> torch.Tensor:
        _checks.integer("n", n, minimum=0)
        if device is None and generator is not None:
            device = generator.device
        mu, sigma = proposal
        z = torch.randn(n, generator=generator, device=device, dtype=torch.float64)
        t = shift_time(torch.sigmoid(mu + sigma * z), self.shift)
        return t.to(torch.float32).clamp(TIME_EPS, 1.0 - TIME_EPS)

    def diagonal(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """``(n,)`` the flow-matching branch's times ``t_f`` (``r = t_f``)."""
        return self._draw(n, self.fm, generator, device)

    def pair(self, n: int, generator: torch.Generator | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t, r)``, each ``(n,)``: ``a`` and ``b`` drawn independently (``a`` first) from the ``t`` and
        ``r`` proposals, ``t = min(a, b)``, ``r = max(a, b)``, so ``t <= r`` always."""
        a = self._draw(n, self.t, generator, device)
        b = self._draw(n, self.r, generator, device)
        return torch.minimum(a, b), torch.maximum(a, b)


# --------------------------------------------------------------------------------------------------
# loss (docs/dmf.md §3)
def robust_log_loss(U: torch.Tensor, target: torch.Tensor, logvar: torch.Tensor,
                    c: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """DMF's adaptive log loss per row: ``(loss (B,), plain (B,))``.

    ``plain = mean_d (U - target)^2`` over the non-batch dims and, with ``l = logvar`` ``(B,)``,

        loss = log(exp(-l) plain + c) + l = log(plain + c exp(l)),

    evaluated in the second form (stable as ``l`` drifts down, docs/dmf.md §3). The gradient flows through
    ``U`` and ``l``: ``dloss/dU = (2 / D) (U - target) / (plain + c e^l)`` and
    ``dloss/dl = c e^l / (plain + c e^l) > 0``. ``target`` is detached. Computed in float32 (float64 if
    ``U`` is float64). ``plain`` is returned detached: it is the number to log and to feed the adaptive
    per-mode weighting (``loss`` can be negative).
    """
    U = _checks.tensor("U", U, min_ndim=1)
    target = _checks.tensor("target", target)
    _checks.same_shape("U", U, "target", target)
    logvar = _checks.tensor("logvar", logvar, ndim=1)
    _checks.shape("logvar", logvar, (U.shape[0],))
    c = float(c)
    if not (math.isfinite(c) and c > 0.0):
        raise ValueError(f"dmf_loss_c: expected a finite c > 0, got {c}")
    dtype = _work_dtype(U)
    err = U.to(dtype) - target.detach().to(dtype)
    plain = err.pow(2).reshape(err.shape[0], -1).mean(1)
    loss = torch.log(plain + c * torch.exp(logvar.to(dtype)))
    return loss, plain.detach()


def mean_flow_target(v: torch.Tensor, t: torch.Tensor, r: torch.Tensor, dU: torch.Tensor) -> torch.Tensor:
    """``U_tgt = stopgrad(v + (r - t) dU)`` (docs/dmf.md §1); ``v``, ``dU`` ``(B, ...)``, ``t``, ``r`` ``(B,)``."""
    _checks.same_shape("v", v, "dU", dU)
    b = v.shape[0]
    _checks.shape("t", t, (b,))
    _checks.shape("r", r, (b,))
    return (v + _rows(r - t, v) * dU).detach()


# --------------------------------------------------------------------------------------------------
# the total time derivative (docs/dmf.md §3, "The derivative")
def _is_forward_ad_error(err: BaseException) -> bool:
    msg = str(err).lower()
    return "forward ad" in msg or "forward-mode" in msg or "forward mode" in msg or "jvp" in msg


def time_derivative(net, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, v: torch.Tensor, *,
                    cond: dict | None = None, method: str = "jvp", eps: float = 1e-3,
                    attention=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, logvar, dU)`` at ``(x, t, r)`` with ``dU = d/dt U(x_t, t, r)`` along the tangent ``(v, 1, 0)``.

    ``x``, ``v`` ``(B, ...)``, ``t``, ``r`` ``(B,)``; ``cond`` (e.g. ``{"y": modes}``) goes to the network.
    ``U`` ``(B, ...)`` and ``logvar`` ``(B,)`` carry the ordinary autograd graph (a loss on them
    backpropagates into the network); ``dU`` is detached.

    - ``method="jvp"`` (``dmf_derivative: jvp``): one forward-mode pass with dual tensors
      ``x + v dx``, ``t + 1 dt`` (:mod:`torch.autograd.forward_ad`), so it runs on a plain ``nn.Module``
      (e.g. DDP's unwrapped ``.module``) whose parameters require grad. It runs inside
      ``sdpa_kernel(attention or [SDPBackend.MATH])``: torch's fused attention kernels have no forward-mode
      AD. A forward-AD failure inside is re-raised as a ``ValueError`` naming ``dmf_derivative``.
    - ``method="fd"`` (``dmf_derivative: fd``): ``U``, ``logvar`` from one ordinary forward, then, under
      ``no_grad`` with autocast off, in float32 (float64 if ``x`` is float64),
      ``dU = [U(x + (t+ - t) v, t+, r) - U(x - (t - t-) v, t-, r)] / (t+ - t-)`` with
      ``t+ = min(t + eps, max(t, FD_TIME_MAX))`` and ``t- = max(t - eps, 0)``: a central difference, and
      one-sided at the ends of ``[0, 1)``.
    """
    _checks.choice("dmf_derivative", method, DMF_DERIVATIVES)
    x = _checks.tensor("x", x, min_ndim=1)
    v = _checks.tensor("v", v)
    _checks.same_shape("v", v, "x", x)
    b = x.shape[0]
    t = _checks.tensor("t", t, ndim=1)
    r = _checks.tensor("r", r, ndim=1)
    _checks.shape("t", t, (b,))
    _checks.shape("r", r, (b,))
    cond = {} if cond is None else dict(cond)
    if method == "jvp":
        backends = [SDPBackend.MATH] if attention is None else attention
        try:
            with sdpa_kernel(backends), fwAD.dual_level():
                x_dual = fwAD.make_dual(x, v.detach().to(x.dtype))
                t_dual = fwAD.make_dual(t, torch.ones_like(t))
                U_dual, logvar_dual = net(x_dual, t_dual, r=r, return_logvar=True, **cond)
                U, dU = fwAD.unpack_dual(U_dual)
                logvar = fwAD.unpack_dual(logvar_dual).primal
        except (NotImplementedError, RuntimeError) as err:
            if not _is_forward_ad_error(err):
                raise
            raise ValueError(
                "dmf_derivative: the JVP (forward-mode AD) failed inside the network; a fused attention kernel "
                "has no forward-mode AD. Use the math attention backend (attention=None, i.e. "
                f"[SDPBackend.MATH]) or `dmf_derivative: fd`. ({type(err).__name__}: {str(err).splitlines()[0]})"
            ) from err
        dU = torch.zeros_like(U) if dU is None else dU.detach()
        return U, logvar, dU
    eps = float(eps)
    if not (math.isfinite(eps) and 0.0 < eps < 0.5):
        raise ValueError(f"dmf_fd_eps: expected a number in (0, 0.5), got {eps}")
    U, logvar = net(x, t, r=r, return_logvar=True, **cond)
    dtype = _work_dtype(x)
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        xw, vw, tw, rw = x.detach().to(dtype), v.detach().to(dtype), t.detach().to(dtype), r.detach().to(dtype)
        hi = torch.minimum(tw + eps, tw.clamp_min(FD_TIME_MAX))
        lo = (tw - eps).clamp_min(0.0)
        U_hi = _first(net(xw + _rows(hi - tw, xw) * vw, hi, r=rw, return_logvar=True, **cond)).to(dtype)
        U_lo = _first(net(xw - _rows(tw - lo, xw) * vw, lo, r=rw, return_logvar=True, **cond)).to(dtype)
        dU = (U_hi - U_lo) / _rows(hi - lo, xw)
    return U, logvar, dU


# --------------------------------------------------------------------------------------------------
# training-time guidance G(v) (docs/dmf.md §5)
def guidance_omega(scale: float) -> float:
    """``omega = 1 - 1 / scale``: the ``mg`` / ``ag-mg`` weight whose fixed point is guidance at ``scale``
    (the peer's ``omega = 0.6`` is ``scale = 2.5``; MM-FM's autoguidance ``1.5`` is ``omega = 1/3``)."""
    return 1.0 - 1.0 / scale


def guided_velocity(kind: str, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor, *, online=None, guide=None,
                    main=None, scale: float = 1.5, interval=(0.0, 1.0), cond: dict | None = None,
                    null_label: int | None = None) -> torch.Tensor:
    """The guided regression target ``v^ = G(v)`` ``(B, ...)``, computed under ``no_grad``.

    ``v`` ``(B, ...)`` the per-sample velocity ``x1 - x0`` at ``x = x_t`` ``(B, ...)``, ``t`` ``(B,)``.
    Guidance acts on the rows with ``lo <= t <= hi`` (``interval``, mmfm's convention: the peer's
    ``sigma``-interval ``[a, b]`` is ``[1 - b, 1 - a]``); elsewhere ``G(v) = v`` (``main(x, t)`` for
    ``ag-distill``). With ``omega = 1 - 1 / scale``:

    - ``"none"``: ``v``.
    - ``"ag-mg"``: ``v + omega (U_online(x, t, t) - v_guide(x, t))``. ``online`` is the flow-map network
      being trained (called as ``online(x, t, r=t, **cond)``), ``guide`` a velocity network
      ``guide(x, t, **cond)`` (MM-FM's autoguide). At the fixed point ``U = G(v)``,
      ``U = guide + scale (v - guide)``: autoguidance at ``scale``.
    - ``"ag-distill"``: ``guide(x, t) + scale (main(x, t) - guide(x, t))`` with ``main`` the frozen
      velocity network (``dmf_init``); the per-sample ``v`` is discarded.
    - ``"mg"`` (class-conditional networks trained with label dropout; ``cond["y"]`` the labels,
      ``null_label`` the null index): ``v + omega (U(x, t, t, y) - U(x, t, t, null))`` on one doubled
      batch; rows whose label is null stay unguided. At the fixed point ``U_c - U_u = (v_c - v_u) / (1 - omega)``.

    A mode-conditional model passes ``cond = {"y": modes}``, which every network receives.
    """
    _checks.choice("dmf_guidance", kind, DMF_GUIDANCE)
    v = _checks.tensor("v", v, min_ndim=1)
    x = _checks.tensor("x", x)
    _checks.same_shape("v", v, "x", x)
    t = _checks.tensor("t", t, ndim=1)
    _checks.shape("t", t, (x.shape[0],))
    if kind == "none":
        return v.detach()
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0.0):
        raise ValueError(f"dmf_guidance_scale: expected a finite scale > 0, got {scale}")
    lo, hi = (float(a) for a in interval)
    _checks.interval("dmf_guidance_interval", lo, hi)
    cond = {} if cond is None else dict(cond)
    omega = guidance_omega(scale)
    inside = _rows((t >= lo) & (t <= hi), v)
    with torch.no_grad():
        if kind == "ag-mg":
            if online is None:
                raise ValueError("online: dmf_guidance 'ag-mg' needs the flow-map network being trained")
            if guide is None:
                raise ValueError("dmf_guide: dmf_guidance 'ag-mg' needs a guide velocity network (dmf_guide)")
            U = _first(online(x, t, r=t, **cond)).to(v.dtype)
            g = _first(guide(x, t, **cond)).to(v.dtype)
            out = torch.where(inside, v + omega * (U - g), v)
        elif kind == "ag-distill":
            if main is None:
                raise ValueError("main: dmf_guidance 'ag-distill' needs the frozen main velocity network "
                                 "(dmf_init)")
            if guide is None:
                raise ValueError("dmf_guide: dmf_guidance 'ag-distill' needs a guide velocity network (dmf_guide)")
            m = _first(main(x, t, **cond)).to(v.dtype)
            g = _first(guide(x, t, **cond)).to(v.dtype)
            out = torch.where(inside, g + scale * (m - g), m)
        else:  # mg
            if online is None:
                raise ValueError("online: dmf_guidance 'mg' needs the flow-map network being trained")
            y = cond.pop("y", None)
            if y is None or null_label is None:
                raise ValueError("dmf_guidance: 'mg' needs class labels cond['y'] and the null_label of a "
                                 "network trained with label dropout (use ag-mg for unconditional runs)")
            b = x.shape[0]
            null = torch.full_like(y, null_label)
            tt = torch.cat([t, t])
            both = _first(online(torch.cat([x, x]), tt, r=tt, y=torch.cat([y, null]), **cond)).to(v.dtype)
            guided = inside & _rows(y != null_label, v)
            out = torch.where(guided, v + omega * (both[:b] - both[b:]), v)
    if out.shape != v.shape:
        raise ValueError(f"dmf_guidance: expected networks returning shape {tuple(v.shape)}, got {tuple(out.shape)}")
    return out.detach()


# --------------------------------------------------------------------------------------------------
# samplers (docs/dmf.md §4)
def solve_flowmap(model, x0: torch.Tensor, grid: torch.Tensor, *, mode: str = "euler", cond: dict | None = None,
                  source=None, modes: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> ODEResult:
    """Sample a flow map ``model(x, t, r=r, **cond) -> U`` from ``x0`` ``(B, ...)`` over ``grid``.

    ``grid``: ``n + 1`` strictly increasing times ``tau_0 < ... < tau_n`` in ``[0, 1]``, e.g.
    ``time_grid(n, shift)`` (``tau_n = 1`` is fine: ``U(x, t, 1)`` is a jump to data).

    - ``mode="euler"`` (``flowmap``): ``x <- x + (tau_{i+1} - tau_i) U(x, tau_i, tau_{i+1})``.
    - ``mode="restart"`` (``flowmap-restart``): ``x1^ = x + (1 - tau_i) U(x, tau_i, 1)``; unless it is the
      last step, ``x <- (1 - tau_{i+1}) x0'' + tau_{i+1} x1^`` with ``x0''`` a fresh draw
      ``source.sample(B, modes=modes, generator=generator)`` (a :class:`~mmfm.flow.sources.GaussianSource`
      or :class:`~mmfm.flow.sources.GaussianMixtureSource`; pass each row's ``modes`` for a GMM source
      under mode coupling, so it re-noises from the row's own mode). The sample is the last ``x1^``.

    The state is float32 (float64 if ``x0`` is float64). Returns an :class:`ODEResult` with
    ``nfe = n`` (one network call per step) and no trajectory or path length.
    """
    if mode not in ("euler", "restart"):
        raise ValueError(f"mode: expected one of ['euler', 'restart'], got {mode!r}")
    x0 = _checks.tensor("x0", x0, min_ndim=1)
    grid = _checks.tensor("grid", grid, ndim=1)
    times = [float(a) for a in grid.tolist()]
    if len(times) < 2:
        raise ValueError(f"grid: expected at least 2 times, got {len(times)}")
    if any(b <= a for a, b in zip(times, times[1:])) or times[0] < 0.0 or times[-1] > 1.0:
        raise ValueError(f"grid: expected strictly increasing times in [0, 1], got {times}")
    if mode == "restart" and source is None:
        raise ValueError("source: flowmap-restart re-noises from the source; pass source=")
    cond = {} if cond is None else dict(cond)
    dtype = _work_dtype(x0)
    batch, device = x0.shape[0], x0.device

    def full(a: float) -> torch.Tensor:
        return torch.full((batch,), a, dtype=dtype, device=device)

    def call(x: torch.Tensor, a: float, b: float) -> torch.Tensor:
        U = model(x, full(a), r=full(b), **cond)
        if not isinstance(U, torch.Tensor) or U.shape != x.shape:
            got = tuple(U.shape) if isinstance(U, torch.Tensor) else type(U).__name__
            raise ValueError(f"model: expected U of shape {tuple(x.shape)} (call it without return_logvar), "
                             f"got {got}")
        return U.to(dtype)

    x = x0.to(dtype)
    steps = len(times) - 1
    for i in range(steps):
        a, b = times[i], times[i + 1]
        if mode == "euler":
            x = x + (b - a) * call(x, a, b)
            continue
        x1 = x + (1.0 - a) * call(x, a, 1.0)
        if i == steps - 1:
            x = x1
            continue
        fresh, _ = source.sample(batch, modes=modes, generator=generator, device=device)
        if fresh.shape != x.shape:
            raise ValueError(f"source: expected draws of shape {tuple(x.shape)}, got {tuple(fresh.shape)}")
        x = (1.0 - b) * fresh.to(dtype) + b * x1
    if x.shape != x0.shape:
        raise ValueError(f"model: the sample has shape {tuple(x.shape)}, expected {tuple(x0.shape)}")
    return ODEResult(x, None, None, steps)
