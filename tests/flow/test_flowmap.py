"""Decoupled MeanFlow pieces (mmfm.flow.flowmap) against closed forms (docs/dmf.md §7).

The oracle is the exact flow map of a Gaussian -> Gaussian flow per element (independent coupling),
and its MM-FM version with one such pair per mode k (source N(mu_k, s_k^2), data | k ~ N(a_k, S_k^2),
mode coupling, a mode-conditional "network" told k through y):

    m_t = (1 - t) mu0 + t mu1,   S_t^2 = (1 - t)^2 s0^2 + t^2 s1^2,
    v(x, t) = (mu1 - mu0) + (dS_t / S_t) (x - m_t),   dS_t = (t s1^2 - (1 - t) s0^2) / S_t,
    Phi(x, t, r) = m_r + (S_r / S_t) (x - m_t),   U = (Phi - x) / (r - t)   (U = v at r = t).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import special, stats
from torch import nn
from torch.nn.attention import SDPBackend

from mmfm.flow import flowmap as fmap
from mmfm.flow.flowmap import (
    FLOWMAP_SOLVERS, FlowMapTimes, guided_velocity, mean_flow_target, robust_log_loss, solve_flowmap,
    time_derivative,
)
from mmfm.flow.guidance import Autoguidance
from mmfm.flow.sources import GaussianMixtureSource, GaussianSource
from mmfm.flow.time import time_grid

EVENT = (3, 4)
D64 = torch.float64


class GaussFlowMap(nn.Module):
    """The exact flow map ``(x, t, r[, y]) -> (U, logvar = 0)`` per element; tables ``(K, *EVENT)``, K = 1
    for the plain Gaussian pair (``y`` None) or one pair per mode (``y`` the row's mode)."""

    def __init__(self, mu0, s0, mu1, s1):
        super().__init__()
        self.mu0, self.s0, self.mu1, self.s1 = mu0, s0, mu1, s1

    def _tables(self, y, b):
        idx = torch.zeros(b, dtype=torch.long) if y is None else y
        return self.mu0[idx], self.s0[idx], self.mu1[idx], self.s1[idx]

    @staticmethod
    def _col(a, like):
        return a.reshape(-1, *([1] * (like.ndim - 1)))

    def marginal(self, x, t, y=None):
        """``(m_t, S_t, dS_t)`` per row."""
        mu0, s0, mu1, s1 = self._tables(y, x.shape[0])
        t = self._col(t, x)
        m = (1 - t) * mu0 + t * mu1
        S = ((1 - t) ** 2 * s0**2 + t**2 * s1**2).sqrt()
        return m, S, (t * s1**2 - (1 - t) * s0**2) / S

    def velocity(self, x, t, y=None):
        mu0, _, mu1, _ = self._tables(y, x.shape[0])
        m, S, dS = self.marginal(x, t, y)
        return (mu1 - mu0) + (dS / S) * (x - m)

    def phi(self, x, t, r, y=None):
        m_t, S_t, _ = self.marginal(x, t, y)
        m_r, S_r, _ = self.marginal(x, r, y)
        return m_r + (S_r / S_t) * (x - m_t)

    def forward(self, x, t, r=None, return_logvar=False, y=None):
        r = t if r is None else r
        dt = self._col(r - t, x)
        safe = torch.where(dt == 0, torch.ones_like(dt), dt)
        U = torch.where(dt == 0, self.velocity(x, t, y), (self.phi(x, t, r, y) - x) / safe)
        return (U, torch.zeros(x.shape[0], dtype=x.dtype)) if return_logvar else U


def _pairs(k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    mu0 = torch.randn(k, *EVENT, generator=g, dtype=D64)
    s0 = 0.5 + torch.rand(k, *EVENT, generator=g, dtype=D64)
    mu1 = 2.0 * torch.randn(k, *EVENT, generator=g, dtype=D64)
    s1 = 0.2 + 1.8 * torch.rand(k, *EVENT, generator=g, dtype=D64)
    return mu0, s0, mu1, s1


@pytest.fixture(params=["gaussian", "modes"])
def case(request):
    """``(net, modes_fn)``: the plain pair (modes None) or 3 modes with their own pairs."""
    k = 1 if request.param == "gaussian" else 3
    net = GaussFlowMap(*_pairs(k, seed=1 if k == 1 else 2))

    def modes(n, g):
        return None if k == 1 else torch.randint(0, k, (n,), generator=g)

    return net, modes


def _cond(y):
    return {} if y is None else {"y": y}


def _marginal_draw(net, t, y, g):
    """``x_t`` from the marginal at ``t`` (given the mode)."""
    x0_shape = (t.shape[0], *EVENT)
    mu0, s0, mu1, s1 = net._tables(y, t.shape[0])
    x0 = mu0 + s0 * torch.randn(x0_shape, generator=g, dtype=D64)
    x1 = mu1 + s1 * torch.randn(x0_shape, generator=g, dtype=D64)
    tc = t.reshape(-1, 1, 1)
    return (1 - tc) * x0 + tc * x1, x1 - x0


# --------------------------------------------------------------------------------------------------
# T2 -- closed-form flow map
def test_t2a_U_tends_to_v_as_r_tends_to_t(case):
    net, modes = case
    g = torch.Generator().manual_seed(10)
    n = 64
    y = modes(n, g)
    t = 0.02 + 0.9 * torch.rand(n, generator=g, dtype=D64)
    x = 3.0 * torch.randn(n, *EVENT, generator=g, dtype=D64)
    v = net.velocity(x, t, y)
    U = net(x, t, r=t + 1e-7, y=y)
    assert (U - v).abs().max() < 1e-6 * (1 + v.abs().max())
    # and the map is a flow: Phi(Phi(x, t, s), s, r) = Phi(x, t, r)
    s, r = t + 0.3 * (1 - t), t + 0.7 * (1 - t)
    assert torch.allclose(net.phi(net.phi(x, t, s, y), s, r, y), net.phi(x, t, r, y), atol=1e-12)


def test_t2b_meanflow_identity_through_jvp(case):
    net, modes = case
    g = torch.Generator().manual_seed(11)
    n = 64
    y = modes(n, g)
    t = 0.9 * torch.rand(n, generator=g, dtype=D64)
    r = t + (1 - t) * torch.rand(n, generator=g, dtype=D64)
    x = 3.0 * torch.randn(n, *EVENT, generator=g, dtype=D64)
    v = net.velocity(x, t, y)
    U, logvar, dU = time_derivative(net, x, t, r, v, cond=_cond(y), method="jvp")
    assert torch.equal(U, net(x, t, r=r, y=y)) and torch.equal(logvar, torch.zeros(n, dtype=D64))
    assert (U - (v + (r - t).reshape(-1, 1, 1) * dU)).abs().max() < 1e-12
    # the identity needs the right tangent: with x held fixed (tangent 0) it is off by O(1)
    _, _, d0 = time_derivative(net, x, t, r, torch.zeros_like(v), cond=_cond(y))
    assert (U - (v + (r - t).reshape(-1, 1, 1) * d0)).abs().max() > 1e-2


def test_t2c_central_difference_agrees_with_jvp(case):
    net, modes = case
    g = torch.Generator().manual_seed(12)
    n = 64
    y = modes(n, g)
    t = 0.05 + 0.85 * torch.rand(n, generator=g, dtype=D64)
    r = t + (1 - t) * torch.rand(n, generator=g, dtype=D64)
    x = 3.0 * torch.randn(n, *EVENT, generator=g, dtype=D64)
    v = net.velocity(x, t, y)
    _, _, d_jvp = time_derivative(net, x, t, r, v, cond=_cond(y), method="jvp")
    U, _, d_fd = time_derivative(net, x, t, r, v, cond=_cond(y), method="fd", eps=1e-3)
    assert d_fd.dtype == D64 and not d_fd.requires_grad
    assert torch.equal(U, net(x, t, r=r, y=y))
    assert (d_fd - d_jvp).abs().max() < 1e-5 * (1 + d_jvp.abs().max())


@pytest.mark.parametrize("t0", [0.0, 1.0 - 5e-7])
def test_t2c_difference_is_one_sided_at_the_ends(t0):
    """At t = 0 (and above FD_TIME_MAX) the difference is one-sided, divided by the actual step: first order
    accurate (|error| ~ eps |d2U|), where dividing by 2 eps would be off by a factor 2."""
    net = GaussFlowMap(*_pairs(1, seed=3))
    g = torch.Generator().manual_seed(13)
    n = 32
    t = torch.full((n,), t0, dtype=D64)
    r = torch.ones(n, dtype=D64) if t0 > 0.5 else 0.8 * torch.ones(n, dtype=D64)
    x = torch.randn(n, *EVENT, generator=g, dtype=D64)
    v = net.velocity(x, t)
    _, _, d_jvp = time_derivative(net, x, t, r, v)
    seen = []

    def recording(x, t, **kw):
        seen.append(t)
        return net(x, t, **kw)

    _, _, d_fd = time_derivative(recording, x, t, r, v, method="fd", eps=1e-3)
    rel = ((d_fd - d_jvp).norm() / d_jvp.norm()).item()
    assert rel < 2e-2
    times = torch.cat(seen)
    assert float(times.min()) >= 0.0 and float(times.max()) < 1.0  # t +- eps clamped into [0, 1)
    assert float(times.max() - times.min()) == pytest.approx(1e-3, rel=1e-6)  # one-sided: a step of eps


def test_t2c_fd_runs_in_float32_for_float32_inputs():
    net = GaussFlowMap(*(a.float() for a in _pairs(1, seed=4)))
    x = torch.randn(8, *EVENT)
    t, r = torch.full((8,), 0.3), torch.full((8,), 0.9)
    v = net.velocity(x, t)
    _, _, d_fd = time_derivative(net, x, t, r, v, method="fd")
    _, _, d_jvp = time_derivative(net.double(), x.double(), t.double(), r.double(), v.double())
    assert d_fd.dtype == torch.float32
    assert (d_fd.double() - d_jvp).abs().max() < 2e-2 * (1 + d_jvp.abs().max())


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_t2d_flowmap_euler_is_exact_at_every_step_count(case, steps, shift):
    net, modes = case
    g = torch.Generator().manual_seed(14)
    n = 20000
    y = modes(n, g)
    mu0, s0, mu1, s1 = net._tables(y, n)
    x0 = mu0 + s0 * torch.randn(n, *EVENT, generator=g, dtype=D64)
    out = solve_flowmap(net, x0, time_grid(steps, shift), cond=_cond(y))
    assert out.nfe == steps and out.trajectory is None and out.path_length is None
    exact = net.phi(x0, torch.zeros(n, dtype=D64), torch.ones(n, dtype=D64), y)
    assert (out.x - exact).abs().max() < 1e-10
    z = (out.x - mu1) / s1  # N(0, 1) per element, given the mode
    assert z.mean(0).abs().max() < 5 / math.sqrt(n)
    assert (z.var(0) - 1).abs().max() < 5 * math.sqrt(2 / n)


@pytest.mark.parametrize("steps", [2, 4])
def test_t2d_restart_is_exact_in_law(steps):
    """Restart re-noises from the row's own mode: exact per-mode moments; with the modes shuffled it is not."""
    k = 3
    mu0, s0, mu1, s1 = _pairs(k, seed=5)
    net = GaussFlowMap(mu0, s0, mu1, s1)
    source = GaussianMixtureSource(torch.full((k,), 1 / k), mu0.float(), (s0**2).float())
    g = torch.Generator().manual_seed(15)
    n = 30000
    x0, y = source.sample(n, generator=g)
    x0 = x0.double()
    grid = time_grid(steps, 2.0)
    out = solve_flowmap(net, x0, grid, mode="restart", cond={"y": y}, source=source, modes=y, generator=g)
    assert out.nfe == steps
    euler = solve_flowmap(net, x0, grid, cond={"y": y}).x
    assert (out.x - euler).abs().mean() > 0.1  # it did re-noise
    for kk in range(k):
        rows = y == kk
        z = (out.x[rows] - mu1[kk]) / s1[kk]
        m = int(rows.sum())
        assert z.mean(0).abs().max() < 5 / math.sqrt(m)
        assert (z.var(0) - 1).abs().max() < 5 * math.sqrt(2 / m)
    # negative control: re-noising from another mode breaks the law
    wrong = solve_flowmap(net, x0, grid, mode="restart", cond={"y": y}, source=source, modes=(y + 1) % k,
                          generator=g).x
    z = (wrong[y == 0] - mu1[0]) / s1[0]
    assert z.mean(0).abs().max() > 0.5


def test_t2d_restart_with_a_gaussian_source():
    net = GaussFlowMap(torch.zeros(1, *EVENT, dtype=D64), torch.ones(1, *EVENT, dtype=D64),
                       *_pairs(1, seed=6)[2:])
    source = GaussianSource(EVENT)
    g = torch.Generator().manual_seed(16)
    n = 30000
    x0 = source.sample(n, generator=g)[0].double()
    out = solve_flowmap(net, x0, time_grid(3), mode="restart", source=source, generator=g)
    z = (out.x - net.mu1[0]) / net.s1[0]
    assert z.mean(0).abs().max() < 5 / math.sqrt(n)
    assert (z.var(0) - 1).abs().max() < 5 * math.sqrt(2 / n)


def test_t2e_loss_pieces_on_the_exact_flow_map(case):
    net, modes = case
    g = torch.Generator().manual_seed(17)
    n = 64
    y = modes(n, g)
    c = 0.01
    # MeanFlow branch: the marginal velocity as tangent and target base -> U_tgt = U, loss = log c, grad 0
    t = 0.9 * torch.rand(n, generator=g, dtype=D64)
    r = t + (1 - t) * torch.rand(n, generator=g, dtype=D64)
    x, _ = _marginal_draw(net, t, y, g)
    v = net.velocity(x, t, y)
    U, logvar, dU = time_derivative(net, x.clone(), t, r, v, cond=_cond(y))
    U = U.detach().requires_grad_(True)
    target = mean_flow_target(v, t, r, dU)
    assert not target.requires_grad
    assert (target - U).abs().max() < 1e-12
    loss, plain = robust_log_loss(U, target, logvar, c=c)
    assert (loss - math.log(c)).abs().max() < 1e-12 and plain.max() < 1e-24
    (grad,) = torch.autograd.grad(loss.sum(), U)
    assert grad.abs().max() < 1e-8
    # FM branch at r = t: U = v
    U_fm, lv_fm = net(x, t, r=t, return_logvar=True, y=y)
    assert (robust_log_loss(U_fm, v, lv_fm, c=c)[0] - math.log(c)).abs().max() < 1e-12


# --------------------------------------------------------------------------------------------------
# the robust log loss
def test_robust_log_loss_values_and_gradients():
    g = torch.Generator().manual_seed(20)
    U = torch.randn(6, 3, 5, generator=g, dtype=D64, requires_grad=True)
    target = torch.randn(6, 3, 5, generator=g, dtype=D64)
    lv = torch.randn(6, generator=g, dtype=D64, requires_grad=True)
    loss, plain = robust_log_loss(U, target, lv, c=0.03)
    m = ((U - target) ** 2).mean((1, 2))
    assert torch.allclose(plain, m) and not plain.requires_grad
    assert torch.allclose(loss, torch.log(torch.exp(-lv) * m + 0.03) + lv, atol=1e-13)
    (d_lv,) = torch.autograd.grad(loss.sum(), lv)
    assert torch.allclose(d_lv, 0.03 * lv.exp() / (m + 0.03 * lv.exp())) and bool((d_lv > 0).all())
    def f(a, b):
        return robust_log_loss(a, target, b, c=0.03)[0]

    assert torch.autograd.gradcheck(f, (U, lv))
    assert torch.autograd.gradgradcheck(f, (U, lv))
    # the target is detached
    target.requires_grad_(True)
    robust_log_loss(U, target, lv)[0].sum().backward()
    assert target.grad is None


def test_robust_log_loss_refusals():
    U = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="target"):
        robust_log_loss(U, torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="logvar"):
        robust_log_loss(U, U, torch.zeros(4, 1))
    with pytest.raises(ValueError, match="dmf_loss_c"):
        robust_log_loss(U, U, torch.zeros(4), c=0.0)
    assert robust_log_loss(U.half(), U.half(), torch.zeros(4))[0].dtype == torch.float32


class MLPFlowMap(nn.Module):
    """A small flow map ``(x, t, r) -> (U, logvar)`` on 2-D ``x``, with a log-variance head on ``(t, r)``."""

    def __init__(self, dim=2, hidden=16):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(dim + 2, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.SiLU(),
                               nn.Linear(hidden, dim))
        self.lv = nn.Linear(2, 1)

    def forward(self, x, t, r=None, return_logvar=False, y=None):
        r = t if r is None else r
        U = self.f(torch.cat([x, t[:, None], r[:, None]], 1))
        if y is not None:
            U = U * (1.0 + y[:, None].to(U.dtype))
        return (U, self.lv(torch.stack([t, r * t], 1))[:, 0]) if return_logvar else U


def test_jvp_gradients_wrt_parameters_match_a_reference():
    """One backward through the JVP path's primal U gives the gradient of the loss with the target detached,
    computed independently with torch.func.jvp and an ordinary forward."""
    torch.manual_seed(0)
    net = MLPFlowMap().double()
    g = torch.Generator().manual_seed(21)
    n = 12
    x = torch.randn(n, 2, generator=g, dtype=D64)
    t = 0.8 * torch.rand(n, generator=g, dtype=D64)
    r = t + (1 - t) * torch.rand(n, generator=g, dtype=D64)
    v = torch.randn(n, 2, generator=g, dtype=D64)
    y = torch.randint(0, 3, (n,), generator=g)
    U, lv, dU = time_derivative(net, x, t, r, v, cond={"y": y})
    assert U.requires_grad and lv.requires_grad and not dU.requires_grad
    loss = robust_log_loss(U, mean_flow_target(v, t, r, dU), lv)[0].mean()
    grads = torch.autograd.grad(loss, list(net.parameters()))

    params = {k: p.detach() for k, p in net.named_parameters()}
    _, dU_ref = torch.func.jvp(lambda a, b: torch.func.functional_call(net, params, (a, b), {"r": r, "y": y}),
                               (x, t), (v, torch.ones_like(t)))
    assert (dU - dU_ref).abs().max() < 1e-13
    U_ref, lv_ref = net(x, t, r=r, return_logvar=True, y=y)
    loss_ref = robust_log_loss(U_ref, (v + (r - t)[:, None] * dU_ref).detach(), lv_ref)[0].mean()
    grads_ref = torch.autograd.grad(loss_ref, list(net.parameters()))
    assert torch.allclose(loss, loss_ref, atol=1e-14)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-13)
    assert max(float(a.abs().max()) for a in grads) > 1e-3  # not vacuous
    # and the fd path's U carries the same graph
    U2, _, dU2 = time_derivative(net, x, t, r, v, cond={"y": y}, method="fd", eps=1e-4)
    assert torch.equal(U2, U_ref) and (dU2 - dU_ref).abs().max() < 1e-6
    assert U2.requires_grad and not dU2.requires_grad


def test_time_derivative_refusals():
    net = MLPFlowMap().double()
    x, t = torch.zeros(3, 2, dtype=D64), torch.full((3,), 0.5, dtype=D64)
    with pytest.raises(ValueError, match="dmf_derivative"):
        time_derivative(net, x, t, t, x, method="vjp")
    with pytest.raises(ValueError, match="dmf_fd_eps"):
        time_derivative(net, x, t, t, x, method="fd", eps=0.0)
    with pytest.raises(ValueError, match="^r:"):
        time_derivative(net, x, t, t[:2], x)
    with pytest.raises(ValueError, match="^v and x"):
        time_derivative(net, x, t, t, x[:, :1])

    def broken(x, t, r=None, return_logvar=False):
        raise RuntimeError("shape mismatch somewhere")

    with pytest.raises(RuntimeError, match="shape mismatch"):  # unrelated errors pass through unchanged
        time_derivative(broken, x, t, t, x)


class AttentionFlowMap(nn.Module):
    """A one-layer self-attention flow map on ``(B, N, D)`` tokens that calls ``F.scaled_dot_product_attention``."""

    def __init__(self, dim=8):
        super().__init__()
        self.qkv = nn.Linear(dim + 2, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, t, r=None, return_logvar=False):
        r = t if r is None else r
        b, n, _ = x.shape
        h = torch.cat([x, t[:, None, None].expand(b, n, 1), r[:, None, None].expand(b, n, 1)], -1)
        q, k, v = self.qkv(h).reshape(b, n, 3, 2, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        U = self.out(a)
        return (U, t * 0) if return_logvar else U


def test_jvp_forces_math_attention_and_refuses_a_fused_kernel():
    """Forward AD through SDPA: the default (math backend) works and matches a central difference; forcing the
    flash kernel (torch 2.14 CPU: NotImplementedError "Trying to use forward AD with
    _scaled_dot_product_flash_attention_for_cpu ...") is refused naming dmf_derivative."""
    torch.manual_seed(1)
    net = AttentionFlowMap()
    g = torch.Generator().manual_seed(22)
    x, v = torch.randn(2, 2, 5, 8, generator=g)
    t, r = torch.tensor([0.2, 0.5]), torch.tensor([0.7, 0.9])
    with pytest.raises(ValueError, match="dmf_derivative") as err:
        time_derivative(net, x, t, r, v, attention=[SDPBackend.FLASH_ATTENTION])
    assert isinstance(err.value.__cause__, NotImplementedError)
    assert "math" in str(err.value) and "dmf_derivative: fd" in str(err.value)
    net64 = net.double()
    _, _, d_jvp = time_derivative(net64, x.double(), t.double(), r.double(), v.double())
    _, _, d_fd = time_derivative(net64, x.double(), t.double(), r.double(), v.double(), method="fd", eps=1e-4)
    assert (d_jvp - d_fd).abs().max() < 1e-6 and d_jvp.abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# T3 -- time proposals
def _logit_normal_cdf(q, mu, sigma, shift):
    """CDF of ``shift_time(sigmoid(mu + sigma z), shift)`` at ``q`` in (0, 1)."""
    base = shift * q / (1 + (shift - 1) * q)  # the inverse of shift_time
    return special.ndtr((special.logit(base) - mu) / sigma)


def _peer_pair(n, shift, rng):
    """The peer's proposals in its own convention (sigma = noise level, its sigma-shift), flipped by t = 1 - sigma."""
    sig_t = special.expit(0.4 + rng.standard_normal(n))
    sig_r = special.expit(-1.2 + rng.standard_normal(n))
    sig_t, sig_r = (shift * s / (1 + (shift - 1) * s) for s in (sig_t, sig_r))
    return 1 - np.maximum(sig_t, sig_r), 1 - np.minimum(sig_t, sig_r)


@pytest.mark.parametrize("shift", [1.0, 2.5])
def test_t3_pair_law_is_the_peers_pushed_forward(shift):
    times = FlowMapTimes(shift=shift)
    g = torch.Generator().manual_seed(30)
    t, r = times.pair(20000, generator=g)
    assert t.dtype == torch.float32 and t.shape == r.shape == (20000,)
    assert bool((t <= r).all())
    t, r = t.double().numpy(), r.double().numpy()

    def cdf_min(q):
        return 1 - (1 - _logit_normal_cdf(q, -0.4, 1, shift)) * (1 - _logit_normal_cdf(q, 1.2, 1, shift))

    def cdf_max(q):
        return _logit_normal_cdf(q, -0.4, 1, shift) * _logit_normal_cdf(q, 1.2, 1, shift)

    assert stats.kstest(t, cdf_min).pvalue > 1e-3
    assert stats.kstest(r, cdf_max).pvalue > 1e-3
    pt, pr = _peer_pair(20000, shift, np.random.default_rng(0))
    assert stats.ks_2samp(t, pt).pvalue > 1e-3
    assert stats.ks_2samp(r, pr).pvalue > 1e-3
    # negative control: the peer's means taken without the sign flip are rejected
    def wrong(q):
        return 1 - (1 - _logit_normal_cdf(q, 0.4, 1, shift)) * (1 - _logit_normal_cdf(q, -1.2, 1, shift))

    assert stats.kstest(t, wrong).pvalue < 1e-10


def test_t3_diagonal_law_clamp_and_determinism():
    times = FlowMapTimes(fm=(0.5, 0.7), shift=2.0)
    tf = times.diagonal(20000, generator=torch.Generator().manual_seed(31))
    assert tf.dtype == torch.float32 and tf.shape == (20000,)
    assert stats.kstest(tf.double().numpy(), lambda q: _logit_normal_cdf(q, 0.5, 0.7, 2.0)).pvalue > 1e-3
    assert stats.kstest(tf.double().numpy(), lambda q: _logit_normal_cdf(q, 0.5, 0.7, 1.0)).pvalue < 1e-10
    assert torch.equal(tf, times.diagonal(20000, generator=torch.Generator().manual_seed(31)))
    wide = FlowMapTimes(fm=(0.0, 40.0), t=(0.0, 40.0), r=(0.0, 40.0))
    g = torch.Generator().manual_seed(32)
    for a in (wide.diagonal(5000, generator=g), *wide.pair(5000, generator=g)):
        assert float(a.min()) == pytest.approx(fmap.TIME_EPS) and float(a.max()) == pytest.approx(1 - fmap.TIME_EPS)
        assert bool(((1 - a) > 0).all()) and bool((a > 0).all())


@pytest.mark.parametrize("kw, key", [
    ({"fm": (0.0,)}, "dmf_time_fm"), ({"t": (0.0, -1.0)}, "dmf_time_t"), ({"r": "ab"}, "dmf_time_r"),
    ({"r": (math.nan, 1.0)}, "dmf_time_r"), ({"shift": 0.0}, "dmf_proposal_shift"),
    ({"shift": True}, "dmf_proposal_shift"),
])
def test_t3_proposal_refusals(kw, key):
    with pytest.raises(ValueError, match=key):
        FlowMapTimes(**kw)


# --------------------------------------------------------------------------------------------------
# T4 -- guidance transforms
class Table:
    """A "network" returning a fixed value per label (or per row), recording the conditioning it got."""

    def __init__(self, value):
        self.value, self.calls = value, []

    def __call__(self, x, t, r=None, y=None, **kw):
        self.calls.append({"r": r, "y": y, **kw})
        return self.value(y) if callable(self.value) else self.value.clone()


@pytest.mark.parametrize("scale", [1.5, 3.0])
def test_t4_ag_mg_fixed_point_is_autoguidance(scale):
    g = torch.Generator().manual_seed(40)
    x = torch.randn(5, 3, 4, generator=g, dtype=D64)
    t = torch.full((5,), 0.5, dtype=D64)
    v, gv = torch.randn(2, 5, 3, 4, generator=g, dtype=D64)
    online, guide = Table(torch.zeros_like(v)), Table(gv)
    for _ in range(200):
        online.value = guided_velocity("ag-mg", v, x, t, online=online, guide=guide, scale=scale)
    ag = Autoguidance(main=lambda x, t: v, guide=lambda x, t: gv, scale=scale)(x, t)
    assert torch.allclose(online.value, gv + scale * (v - gv), atol=1e-12)
    assert torch.allclose(online.value, ag, atol=1e-12)
    assert torch.equal(online.calls[-1]["r"], t)  # U evaluated on the diagonal r = t


def test_t4_mg_fixed_point_for_class_conditional_nets():
    """At the fixed point of mg, U_c - U_u = (v_c - v_u) / (1 - omega); null rows stay unguided."""
    null, scale = 7, 2.5
    omega = 1 - 1 / scale
    g = torch.Generator().manual_seed(41)
    x = torch.randn(2, 6, generator=g, dtype=D64)
    t = torch.full((2,), 0.6, dtype=D64)
    v = torch.randn(2, 6, generator=g, dtype=D64)  # row 0 class 3, row 1 null
    y = torch.tensor([3, null])
    table = {3: torch.zeros(6, dtype=D64), null: torch.zeros(6, dtype=D64)}
    online = Table(lambda labels: torch.stack([table[int(a)] for a in labels]))
    for _ in range(300):
        out = guided_velocity("mg", v, x, t, online=online, cond={"y": y}, null_label=null, scale=scale)
        table[3], table[null] = out[0], out[1]
    assert torch.equal(table[null], v[1])
    assert torch.allclose(table[3] - table[null], (v[0] - v[1]) / (1 - omega), atol=1e-12)
    assert torch.equal(online.calls[-1]["y"], torch.tensor([3, null, null, null]))  # one doubled batch
    with pytest.raises(ValueError, match="dmf_guidance"):
        guided_velocity("mg", v, x, t, online=online, cond={"y": y}, scale=scale)


def test_t4_interval_distill_and_conditioning():
    g = torch.Generator().manual_seed(42)
    x = torch.randn(4, 3, generator=g)
    t = torch.tensor([0.1, 0.35, 0.8, 1.0])
    v, u, gv, mv = torch.randn(4, 4, 3, generator=g)
    modes = torch.tensor([0, 1, 2, 1])
    online, guide, main = Table(u), Table(gv), Table(mv)
    out = guided_velocity("ag-mg", v, x, t, online=online, guide=guide, scale=1.5, interval=(0.3, 0.9),
                          cond={"y": modes})
    w = 1 - 1 / 1.5
    inside = torch.tensor([False, True, True, False])
    assert torch.allclose(out[inside], (v + w * (u - gv))[inside]) and torch.equal(out[~inside], v[~inside])
    d = guided_velocity("ag-distill", v, x, t, guide=guide, main=main, scale=2.0, interval=(0.3, 0.9),
                        cond={"y": modes})
    assert torch.allclose(d[inside], (gv + 2.0 * (mv - gv))[inside]) and torch.equal(d[~inside], mv[~inside])
    assert torch.equal(d, guided_velocity("ag-distill", 5 * v, x, t, guide=guide, main=main, scale=2.0,
                                          interval=(0.3, 0.9), cond={"y": modes}))  # per-sample v discarded
    for net in (online, guide, main):
        assert all(torch.equal(c["y"], modes) for c in net.calls)
    assert torch.equal(guided_velocity("none", v, x, t), v)


def test_t4_guidance_is_no_grad_and_refusals():
    net = MLPFlowMap()
    x, t = torch.randn(3, 2), torch.full((3,), 0.5)
    v = torch.randn(3, 2, requires_grad=True)
    out = guided_velocity("ag-mg", v, x, t, online=net, guide=lambda x, t: net(x, t))
    assert not out.requires_grad
    with pytest.raises(ValueError, match="dmf_guidance"):
        guided_velocity("cfg", v, x, t)
    with pytest.raises(ValueError, match="dmf_guide"):
        guided_velocity("ag-mg", v, x, t, online=net)
    with pytest.raises(ValueError, match="dmf_guide"):
        guided_velocity("ag-distill", v, x, t, main=net)
    with pytest.raises(ValueError, match="main"):
        guided_velocity("ag-distill", v, x, t, guide=net)
    with pytest.raises(ValueError, match="dmf_guidance_interval"):
        guided_velocity("ag-mg", v, x, t, online=net, guide=net, interval=(0.9, 0.1))


# --------------------------------------------------------------------------------------------------
# solver refusals
def test_solve_flowmap_refusals():
    net = GaussFlowMap(*_pairs(1, seed=7))
    x0 = torch.zeros(4, *EVENT, dtype=D64)
    assert FLOWMAP_SOLVERS == ("flowmap", "flowmap-restart")
    with pytest.raises(ValueError, match="grid"):
        solve_flowmap(net, x0, torch.tensor([0.0, 0.6, 0.5, 1.0]))
    with pytest.raises(ValueError, match="grid"):
        solve_flowmap(net, x0, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="source"):
        solve_flowmap(net, x0, time_grid(2), mode="restart")
    with pytest.raises(ValueError, match="mode"):
        solve_flowmap(net, x0, time_grid(2), mode="heun")
    with pytest.raises(ValueError, match="model"):
        solve_flowmap(lambda x, t, r: (x, t), x0, time_grid(2))
    with pytest.raises(ValueError, match="modes"):  # a Gaussian source has no modes
        solve_flowmap(net, x0, time_grid(2), mode="restart", source=GaussianSource(EVENT),
                      modes=torch.zeros(4, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# T6 -- tiny DMF fine-tune of a 2-D flow-matching MLP
HIDDEN = 64


def _body():
    return nn.Sequential(nn.SiLU(), nn.Linear(HIDDEN, HIDDEN), nn.SiLU(), nn.Linear(HIDDEN, HIDDEN), nn.SiLU(),
                         nn.Linear(HIDDEN, 2))


class VelocityMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.body = nn.Linear(3, HIDDEN), _body()

    def forward(self, x, t):
        return self.body(self.inp(torch.cat([x, t[:, None]], 1)))


class FlowMapMLP(nn.Module):
    """``[x, t, r - t]`` in; initialized from a :class:`VelocityMLP` with zero weights on ``r - t``, so it equals
    the velocity MLP at ``r = t`` (and everywhere at init); a zero-initialized log-variance head on ``(t, r)``."""

    def __init__(self, fm: VelocityMLP):
        super().__init__()
        self.inp, self.body, self.lv = nn.Linear(4, HIDDEN), _body(), nn.Linear(2, 1)
        with torch.no_grad():
            self.inp.weight.zero_()
            self.inp.weight[:, :3] = fm.inp.weight
            self.inp.bias.copy_(fm.inp.bias)
            self.body.load_state_dict(fm.body.state_dict())
            self.lv.weight.zero_()
            self.lv.bias.zero_()

    def forward(self, x, t, r=None, return_logvar=False):
        r = t if r is None else r
        U = self.body(self.inp(torch.cat([x, t[:, None], (r - t)[:, None]], 1)))
        return (U, self.lv(torch.stack([t, r], 1))[:, 0]) if return_logvar else U


def _energy_distance(a, b):
    def d(p, q):
        return torch.cdist(p, q).mean()

    return float(2 * d(a, b) - d(a, a) - d(b, b))


def test_t6_tiny_dmf_finetune_beats_one_step_euler():
    """N(0, I) -> 1/2 N((-2, 0), 0.3^2 I) + 1/2 N((2, 0), 0.3^2 I). One Euler step of the FM MLP lands on
    E[x1] (v(x, 0) = E[x1] - x under independent coupling), a collapse; the DMF flow map splits the modes.
    Measured (seeded, torch 2.14 CPU): energy distance to fresh data 0.033 for 1-step flow map vs 1.37 for
    1-step Euler (about 40x), x-variance 3.86 vs 0.10 (data 4.09); about 7 s on 2 cores."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    means, sd, batch = torch.tensor([[-2.0, 0.0], [2.0, 0.0]]), 0.3, 256

    def data(n):
        return means[torch.randint(0, 2, (n,), generator=g)] + sd * torch.randn(n, 2, generator=g)

    fm = VelocityMLP()
    opt = torch.optim.Adam(fm.parameters(), 2e-3)
    for _ in range(400):
        x1, x0, t = data(batch), torch.randn(batch, 2, generator=g), torch.rand(batch, generator=g)
        x = (1 - t[:, None]) * x0 + t[:, None] * x1
        loss = ((fm(x, t) - (x1 - x0)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    net = FlowMapMLP(fm)
    probe_x, probe_t = torch.randn(16, 2), torch.rand(16)
    assert torch.equal(net(probe_x, probe_t), fm(probe_x, probe_t))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    times = FlowMapTimes()
    for _ in range(400):
        x1, x0, tf = data(batch), torch.randn(batch, 2, generator=g), times.diagonal(batch, generator=g)
        x = (1 - tf[:, None]) * x0 + tf[:, None] * x1
        U, lv = net(x, tf, r=tf, return_logvar=True)
        l_fm, _ = robust_log_loss(U, x1 - x0, lv)
        t, r = times.pair(batch, generator=g)
        x0 = torch.randn(batch, 2, generator=g)  # a fresh source draw for the same x1
        v = x1 - x0
        x = (1 - t[:, None]) * x0 + t[:, None] * x1
        U, lv, dU = time_derivative(net, x, t, r, v)
        l_mf, _ = robust_log_loss(U, mean_flow_target(v, t, r, dU), lv)
        loss = 0.5 * (l_fm + l_mf).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    n = 2000
    with torch.no_grad():
        z, ref = torch.randn(n, 2, generator=g), data(n)
        one = solve_flowmap(net, z, time_grid(1)).x
        euler = z + fm(z, torch.zeros(n))
    e_map, e_euler = _energy_distance(one, ref), _energy_distance(euler, ref)
    assert e_map < 0.1 and e_euler > 1.0 and e_map < 0.1 * e_euler
    assert abs(float(one[:, 0].var()) - 4.09) < 0.6 and float(euler[:, 0].var()) < 0.5
    assert float(one.mean(0).abs().max()) < 0.2
