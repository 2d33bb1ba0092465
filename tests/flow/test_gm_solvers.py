"""GM-ODE / GM-SDE (mmfm.flow.solvers.solve_gm) and probabilistic guidance, in float64 on CPU.

The "network" is the exact posterior of per-cell mixture data (docs/gmflow.md §8 T3): ``x1 ~ sum_i pi_i
N(a_i, S I_c)`` in every cell, with the Gaussian source or one component ``(m, var0)`` of a spherical GMM
source given per row. Its velocity mixture is exact, so GM-ODE's Bayes-moved sub-steps equal fresh network
calls (T3(b)), GM-ODE with one sub-step is Euler on the mean velocity (T3(c)), the second-order correction
vanishes (T3(d)) and GM-SDE draws the data law at any step count (T3(e)). T9 trains a tiny GM-MLP.
"""

import math

import pytest
import torch
from torch import nn

from mmfm.flow import ProbabilisticGuidance, gm, gm_substeps, solve_gm, solve_ode, time_grid
from mmfm.flow.solvers import GM_SOLVERS

#: small tensors on a busy machine: one intra-op thread is about ten times faster
pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
N, D, G, COMPS, S = 2, 4, 2, 3, 0.15


def gen(seed):
    return torch.Generator().manual_seed(seed)


def data_law(seed=0, shift=0.0):
    r = gen(seed)
    a = 1.5 * torch.randn(COMPS, N, D, generator=r, dtype=F64) + shift
    logpi = torch.log_softmax(torch.randn(COMPS, N, G, generator=r, dtype=F64), dim=0)
    return a, logpi


def posterior(x, t, a, logpi, s, m=None, var0=None):
    """The exact ``p(x1 | x_t = x)`` as a :class:`CellMixture` (docs/gmflow.md §8 T3)."""
    b = x.shape[0]
    var0 = torch.ones(b, dtype=x.dtype) if var0 is None else var0
    y = x if m is None else x - (1 - t)[:, None, None] * m
    r2 = (1 - t) ** 2 * var0
    v = 1.0 / (1.0 / s + t**2 / r2)
    e = lambda z: z[:, None, None, None, None]  # noqa: E731
    yc, ac = gm.cells(y, G).unsqueeze(1), gm.cells(a, G).unsqueeze(0)
    mu = e(v) * (ac / s + e(t / r2) * yc)
    quad = (yc - e(t) * ac).pow(2).sum(-1) / (2 * (t**2 * s + r2))[:, None, None, None]
    return gm.CellMixture(mu, torch.log_softmax(logpi.unsqueeze(0) - quad, dim=1), v)


def as_output(mix, x, t):
    """The :class:`GMOutput` whose x1-mixture at ``(x, t)`` is ``mix``: ``mu_v = (mu_x1 - x) / (1 - t)``,
    ``log s = log(sqrt(v) / (1 - t))``."""
    r = (1 - t)[:, None, None, None, None]
    means = gm.uncells((mix.means - gm.cells(x, G).unsqueeze(1)) / r)
    return gm.GMOutput(means, mix.logw, 0.5 * torch.log(mix.var) - torch.log(1 - t))


class Exact:
    """The exact GM "network" of the data law for the source ``(m, var0)``, counting its calls."""

    def __init__(self, a, logpi, s=S, m=None, var0=None):
        self.a, self.logpi, self.s, self.m, self.var0, self.calls = a, logpi, s, m, var0, 0

    def __call__(self, x, t):
        self.calls += 1
        return as_output(posterior(x, t, self.a, self.logpi, self.s, self.m, self.var0), x, t)

    def posterior_mean(self, x, t):
        return posterior(x, t, self.a, self.logpi, self.s, self.m, self.var0).mean()

    def velocity(self, x, t):
        return (self.posterior_mean(x, t) - x) / (1 - t)[:, None, None]


def source(kind, b, seed):
    """``(x0, m, var0)``: the Gaussian source, or a 3-mode spherical GMM with the rows' modes drawn."""
    r = gen(seed)
    if kind == "gaussian":
        return torch.randn(b, N, D, generator=r, dtype=F64), None, None
    means = 2.0 * torch.randn(3, N, D, generator=r, dtype=F64)
    variances = torch.tensor([0.3, 0.6, 1.2], dtype=F64)
    k = torch.randint(0, 3, (b,), generator=r)
    m, var0 = means[k], variances[k]
    return m + var0.sqrt()[:, None, None] * torch.randn(b, N, D, generator=r, dtype=F64), m, var0


def data_moments(a, logpi):
    """Mean ``(N D,)`` and covariance ``(N D, N D)`` of the data law (cells independent)."""
    ac, w = gm.cells(a, G), logpi.exp()  # (I, N, G, c), (I, N, G)
    mean = (w[..., None] * ac).sum(0)
    c = D // G
    cov = torch.zeros(N * D, N * D, dtype=F64)
    for n in range(N):
        for g in range(G):
            sec = (w[:, n, g, None, None] * ac[:, n, g, :, None] * ac[:, n, g, None, :]).sum(0)
            blk = sec - mean[n, g, :, None] * mean[n, g, None, :] + S * torch.eye(c, dtype=F64)
            i = n * D + g * c
            cov[i:i + c, i:i + c] = blk
    return mean.flatten(), cov


def data_mixture(a, logpi, b):
    ac = gm.cells(a, G).unsqueeze(0).expand(b, -1, -1, -1, -1)
    return gm.CellMixture(ac, logpi.unsqueeze(0).expand(b, -1, -1, -1), torch.full((b,), S, dtype=F64))


def exact_ode(exact, x0, end=1 - 1e-7):
    """The exact flow: dopri5 on the exact mean velocity to ``end``, then the last (tiny) Euler step."""
    x = solve_ode(exact.velocity, x0, torch.tensor([0.0, end], dtype=F64), "dopri5", atol=1e-11, rtol=1e-11).x
    return x + (1 - end) * exact.velocity(x, torch.full((x.shape[0],), end, dtype=F64))


def maxdiff(a, b):
    return float((a - b).abs().max())


def median_row_gap(a, b):
    """The median over rows of the largest difference in a row (robust to the few rows that sit near a
    split of the flow, where any perturbation sends them to another component)."""
    return float((a - b).abs().flatten(1).max(1)[0].median())


# --- the sub-step rule and the argument checks -------------------------------------------------------------

def test_gm_substeps_rule():
    assert GM_SOLVERS == ("gm-ode", "gm-sde")
    assert [gm_substeps(k) for k in (1, 2, 4, 6, 8, 16, 32, 100, 128, 256)] == [128, 64, 8, 8, 16, 8, 4, 2, 2, 2]
    assert gm_substeps(5) == 26 and gm_substeps(3) == 43
    with pytest.raises(ValueError, match="nfe"):
        gm_substeps(0)


def test_bad_arguments_name_the_key():
    a, logpi = data_law()
    x0 = torch.randn(3, N, D, dtype=F64)
    net, grid = Exact(a, logpi), time_grid(4)
    cases = [
        (dict(order=3), "gm_order"), (dict(order=0), "gm_order"), (dict(mode="euler"), "mode"),
        (dict(mode="sde", substeps=2), "gm_substeps"), (dict(substeps=3), "gm_substeps"),
        (dict(substeps=0), "gm_substeps"), (dict(m=torch.zeros(3, N, D + 1, dtype=F64)), "m"),
        (dict(var0=torch.ones(4, dtype=F64)), "var0"), (dict(var0=-torch.ones(3, dtype=F64)), "var0"),
        (dict(guidance=object()), "guidance"), (dict(gm2_coefs=(-1.0, 1.0)), "gm2_coefs"),
    ]
    for kw, key in cases:
        with pytest.raises(ValueError, match=f"^{key}"):
            solve_gm(net, x0, grid, **kw)
    for bad in (torch.tensor([0.0, 0.5, 0.4, 1.0], dtype=F64), torch.tensor([0.0, 0.5, 1.2], dtype=F64),
                torch.tensor([-0.1, 0.5, 1.0], dtype=F64), torch.tensor([0.3], dtype=F64)):
        with pytest.raises(ValueError, match="^grid"):
            solve_gm(net, x0, bad)
    with pytest.raises(ValueError, match="^x0"):
        solve_gm(net, x0[:, 0], grid)
    with pytest.raises(ValueError, match="^model"):
        solve_gm(lambda x, t: x, x0, grid)
    for scale in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ValueError, match="^gm_guidance_scale"):
            ProbabilisticGuidance(net.velocity, scale)
    with pytest.raises(ValueError, match="^gm_guidance_interval"):
        ProbabilisticGuidance(net.velocity, 0.3, interval=(0.6, 0.2))
    with pytest.raises(ValueError, match="^gm_orthogonal"):
        ProbabilisticGuidance(net.velocity, 0.3, orthogonal=2.0)


# --- T3(b), T3(c): GM-ODE on the exact posterior ---------------------------------------------------------

@pytest.mark.parametrize("kind", ["gaussian", "gmm"])
def test_gm_ode_substeps_are_network_calls_and_converge_to_the_exact_flow(kind):
    a, logpi = data_law(seed=1)
    x0, m, var0 = source(kind, 64, seed=2)
    ref = exact_ode(Exact(a, logpi, m=m, var0=var0), x0)
    errors = []
    for n in (16, 64, 256, 1024):
        grid = time_grid(n, shift=2.0)
        one = Exact(a, logpi, m=m, var0=var0)
        coarse = solve_gm(one, x0, grid, substeps=n, order=1, m=m, var0=var0)
        assert coarse.nfe == 1 and one.calls == 1
        errors.append(float((coarse.x - ref).pow(2).mean().sqrt()))  # RMS: rows near a split are sensitive
        if n > 256:
            continue
        many = Exact(a, logpi, m=m, var0=var0)
        fine = solve_gm(many, x0, grid, substeps=n // 4, order=1, m=m, var0=var0)
        assert fine.nfe == 4 and many.calls == 4
        every = solve_gm(Exact(a, logpi, m=m, var0=var0), x0, grid, substeps=1, order=1, m=m, var0=var0)
        assert every.nfe == n
        # (M x n) == (1 x M n) == (M n x 1): a Bayes move of the exact posterior is a network call
        assert maxdiff(coarse.x, fine.x) < 1e-10 and maxdiff(coarse.x, every.x) < 1e-10
    # first order in the step: each 4x refinement cuts the error about 3-4x; small at 1024 fine steps
    for coarse_err, fine_err in zip(errors, errors[1:]):
        assert coarse_err > 2.5 * fine_err, errors
    assert errors[-1] < 4e-3 and maxdiff(coarse.x, ref) < 0.05, errors


@pytest.mark.parametrize("kind", ["gaussian", "gmm"])
def test_gm_ode_one_substep_is_euler_on_the_mean_velocity(kind):
    a, logpi = data_law(seed=3)
    x0, m, var0 = source(kind, 32, seed=4)
    net = Exact(a, logpi, m=m, var0=var0)
    grid = time_grid(8, shift=1.5)
    euler = solve_ode(net.velocity, x0, grid, "euler", trajectory=True)
    for order in (1, 2):
        out = solve_gm(net, x0, grid, order=order, m=m, var0=var0, trajectory=True)
        assert out.nfe == 8 and out.x.dtype == F64 and out.trajectory.shape == (9, 32, N, D)
        assert maxdiff(out.trajectory, euler.trajectory) < 1e-11


# --- T3(d): the second-order step vanishes on the exact posterior -------------------------------------------

@pytest.mark.parametrize("kind", ["gaussian", "gmm"])
def test_order_two_equals_order_one_on_the_exact_posterior(kind):
    a, logpi = data_law(seed=5)
    x0, m, var0 = source(kind, 64, seed=6)
    net = Exact(a, logpi, m=m, var0=var0)
    grid = time_grid(24, shift=2.0)
    o1 = solve_gm(net, x0, grid, substeps=4, order=1, m=m, var0=var0)
    o2 = solve_gm(net, x0, grid, substeps=4, order=2, m=m, var0=var0)
    assert maxdiff(o1.x, o2.x) < 1e-10
    grid = time_grid(6, shift=2.0)
    s1 = solve_gm(net, x0, grid, mode="sde", order=1, m=m, var0=var0, generator=gen(7))
    s2 = solve_gm(net, x0, grid, mode="sde", order=2, m=m, var0=var0, generator=gen(7))
    assert maxdiff(s1.x, s2.x) < 1e-10


def test_order_two_corrects_a_biased_network():
    # a network whose mean lags in time: the second-order step must change the result
    a, logpi = data_law(seed=5)
    x0, _, _ = source("gaussian", 16, seed=6)
    exact = Exact(a, logpi)
    lag = lambda x, t: exact(x, (0.9 * t).clamp_min(0))  # noqa: E731
    grid = time_grid(6)
    o1, o2 = solve_gm(lag, x0, grid, order=1), solve_gm(lag, x0, grid, order=2)
    assert maxdiff(o1.x, o2.x) > 1e-3 and torch.isfinite(o2.x).all()


def reference_order_two(net, x, times, guidance, coefs):
    """GM-ODE 2 with one sub-step, written out from docs/gmflow.md §4 (second order) and §5, step by step.
    Returns the final state and whether the bias clip was active at some step."""
    b = x.shape[0]
    prev, clipped = None, False
    for t_i, t_next in zip(times[:-1], times[1:]):
        tt = torch.full((b,), t_i, dtype=F64)
        cond = gm.x1_mixture(net(x, tt), x, tt)
        m_c, vbar = gm.surrogate(cond)
        inside = guidance.interval[0] <= t_i <= guidance.interval[1]
        w = guidance.scale if inside else 0.0
        if inside:
            m_u = x + (1 - t_i) * guidance.guide(x, tt)
            b_guid = gm.guidance_bias(m_c, vbar, m_u, w, guidance.orthogonal)
        else:
            b_guid = torch.zeros_like(x)
        guided = gm.tilt_toward(cond, b_guid)
        step_mix = guided
        if prev is not None:
            g_prev, x_prev, t_prev = prev
            moved = gm.bayes_move(g_prev, x_prev, torch.full((b,), t_prev, dtype=F64), x, tt).mean()
            h, h_prev = t_next - t_i, t_i - t_prev
            delta = torch.sqrt(torch.clamp(1 - vbar * (w**2 * coefs[1] ** 2 + coefs[0]) / h_prev**2, min=0))
            bias = (h / (2 * h_prev)) * (guided.mean() - moved) * delta[:, None, None] + b_guid
            rms2 = bias.pow(2).mean((1, 2))
            clipped = clipped or bool((rms2 > vbar).any())
            bias = bias * torch.clamp(vbar / rms2, max=1).sqrt()[:, None, None]
            step_mix = gm.tilt_toward(cond, bias)
        prev = (guided, x, t_i)
        x = x + (t_next - t_i) / (1 - t_i) * (step_mix.mean() - x)
    return x, clipped


@pytest.mark.parametrize("drift, coefs, clips", [(1.0, (0.005, 1.0), False), (6.0, (0.0, 0.0), True)])
def test_order_two_step_with_guidance_follows_the_spec(drift, coefs, clips):
    a, logpi = data_law(seed=5)
    x0, _, _ = source("gaussian", 16, seed=6)
    exact = Exact(a, logpi)

    def net(x, t):  # an inconsistent network (its velocity means grow in time): the correction acts
        out = exact(x, t)
        return gm.GMOutput(out.means * (1 + drift * t)[:, None, None, None], out.logits, out.logstd)

    guidance = ProbabilisticGuidance(_guides()["velocity"], 0.3, interval=(0.2, 1.0))
    times = [0.0, 0.3, 0.55, 0.8]
    want, clipped = reference_order_two(net, x0, times, guidance, coefs)
    got = solve_gm(net, x0, torch.tensor(times, dtype=F64), order=2, guidance=guidance, gm2_coefs=coefs)
    assert maxdiff(got.x, want) < 1e-12
    assert clipped == clips  # the fast-drifting net, undamped, hits the bias clip
    assert maxdiff(got.x, solve_gm(net, x0, torch.tensor(times, dtype=F64), order=1, guidance=guidance).x) > 1e-2


# --- T3(e): GM-SDE draws the data law -------------------------------------------------------------------

def _z_scores(x, mean, cov):
    """Max |error| / (Monte-Carlo standard error) of the sample mean and covariance."""
    flat = x.flatten(1)
    k = flat.shape[0]
    c = flat - mean
    z_mean = ((flat.mean(0) - mean) / (cov.diagonal() / k).sqrt()).abs().max()
    prod = c[:, :, None] * c[:, None, :]
    se = prod.std(0) / math.sqrt(k)
    z_cov = ((prod.mean(0) - cov) / se).abs().max()
    return float(z_mean), float(z_cov), float((prod.mean(0) - cov).abs().max())


@pytest.mark.parametrize("kind", ["gaussian", "gmm"])
@pytest.mark.parametrize("steps, order", [(1, 1), (2, 2), (5, 1)])
def test_gm_sde_draws_the_data_law(kind, steps, order):
    a, logpi = data_law(seed=8)
    k = 100_000
    x0, m, var0 = source(kind, k, seed=9 + steps)
    net = Exact(a, logpi, m=m, var0=var0)
    out = solve_gm(net, x0, time_grid(steps, shift=1.5), mode="sde", order=order, m=m, var0=var0,
                   generator=gen(20 + steps))
    assert out.nfe == steps and net.calls == steps
    mean, cov = data_moments(a, logpi)
    z_mean, z_cov, err = _z_scores(out.x, mean, cov)
    assert z_mean < 4.5 and z_cov < 4.5, (z_mean, z_cov, err)
    if steps == 1:  # one step from an independent source is an exact draw: the same likelihood as data
        law = data_mixture(a, logpi, k)
        ll = gm.log_prob(law, out.x)
        ll_data = gm.log_prob(law, gm.sample(law, gen(30)))
        se = math.sqrt(float(ll.var() + ll_data.var()) / k)
        assert abs(float(ll.mean() - ll_data.mean())) < 4 * se


def test_gm_sde_last_step_lands_on_the_draw_and_float32_state():
    a, logpi = data_law(seed=8)
    x0 = torch.randn(5, N, D, dtype=F64)
    net = Exact(a, logpi)
    out = solve_gm(net, x0, time_grid(3), mode="sde", generator=gen(1), trajectory=True)
    assert out.trajectory.shape == (4, 5, N, D) and torch.equal(out.trajectory[-1], out.x)
    # a step to t = 1 is the draw itself (c1 = c3 = 0, c2 = 1): one step from 0 is one draw of p(x1 | x0)
    one = solve_gm(net, x0, time_grid(1), mode="sde", generator=gen(2))
    draw = gm.sample(posterior(x0, torch.zeros(5, dtype=F64), a, logpi, S), gen(2))
    assert maxdiff(one.x, draw) < 1e-14
    # float32 input: a float32 state whatever the network returns
    f32 = solve_gm(net, x0.float(), time_grid(3), mode="sde", generator=gen(1))
    assert f32.x.dtype == torch.float32 and torch.isfinite(f32.x).all()
    f32 = solve_gm(net, x0.float(), time_grid(6), substeps=2)
    assert f32.x.dtype == torch.float32 and f32.nfe == 3


# --- probabilistic guidance -------------------------------------------------------------------------------

def _guides():
    """A velocity autoguide (the exact mean velocity of a shifted data law) and a GM guide (its posterior)."""
    a2, logpi2 = data_law(seed=11, shift=0.7)
    other = Exact(a2, logpi2, s=0.4)
    return {"velocity": other.velocity, "gm": other}


def test_guidance_object_scales_bias_and_interval():
    a, logpi = data_law(seed=12)
    guides = _guides()
    x = torch.randn(4, N, D, dtype=F64)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=F64)
    cond = posterior(x, t, a, logpi, S)
    pv = ProbabilisticGuidance(guides["velocity"], 0.3, interval=(0.2, 0.7))
    pg = ProbabilisticGuidance(guides["gm"], 0.3, interval=(0.2, 0.7))
    assert torch.equal(pv.scales(t), torch.tensor([0.0, 0.3, 0.3, 0.0], dtype=F64))
    bv, bg = pv.bias(cond, x, t), pg.bias(cond, x, t)
    # a velocity guide and a GM guide with that mean velocity give the same m_u, hence the same bias
    assert maxdiff(bv, bg) < 1e-12
    assert torch.equal(bv[[0, 3]], torch.zeros_like(bv[[0, 3]]))
    m_c, vbar = gm.surrogate(cond)
    m_u = x + (1 - t)[:, None, None] * guides["velocity"](x, t)
    assert maxdiff(pv.unconditional_mean(x, t), m_u) < 1e-14
    assert maxdiff(pg.unconditional_mean(x, t), guides["gm"].posterior_mean(x, t)) < 1e-14
    want = gm.guidance_bias(m_c, vbar, m_u, 0.3)
    assert maxdiff(bv[[1, 2]], want[[1, 2]]) < 1e-14
    # without the projection too (with it, a rescaled m_u would give the same b)
    pv0 = ProbabilisticGuidance(guides["velocity"], 0.3, orthogonal=0.0)
    pg0 = ProbabilisticGuidance(guides["gm"], 0.3, orthogonal=0.0)
    assert maxdiff(pv0.bias(cond, x, t), pg0.bias(cond, x, t)) < 1e-12
    assert maxdiff(pv0.bias(cond, x, t), gm.guidance_bias(m_c, vbar, m_u, 0.3, orthogonal=0.0)) < 1e-14
    rms = bv.pow(2).flatten(1).mean(1).sqrt()
    assert torch.allclose(rms[[1, 2]], 0.3 * vbar[[1, 2]].sqrt(), rtol=1e-12)
    # outside the interval the guide is not even called
    calls = []
    lazy = ProbabilisticGuidance(lambda x, t: calls.append(1) or guides["velocity"](x, t), 0.3, (0.95, 1.0))
    assert torch.equal(lazy.bias(cond, x, t), torch.zeros_like(x)) and not calls


@pytest.mark.parametrize("guide", ["velocity", "gm"])
@pytest.mark.parametrize("mode", ["ode", "sde"])
def test_guided_sampling_runs_and_vanishes_with_the_scale(guide, mode):
    a, logpi = data_law(seed=13)
    x0, m, var0 = source("gmm", 48, seed=14)
    net = Exact(a, logpi, m=m, var0=var0)
    g = _guides()[guide]
    substeps = 4 if mode == "ode" else 1
    grid = time_grid(5 * substeps, shift=1.5)

    def run(guidance, order=2):
        return solve_gm(net, x0, grid, substeps=substeps, order=order, mode=mode, m=m, var0=var0,
                        guidance=guidance, generator=gen(15))

    base = run(None).x
    gaps = []
    for scale in (0.3, 1e-2, 1e-3):
        out = run(ProbabilisticGuidance(g, scale))
        assert out.nfe == 5 and torch.isfinite(out.x).all()
        gaps.append(median_row_gap(out.x, base))
    assert gaps[0] > 0.1
    # the effect is linear in a small scale (the second order's damping and bias clip are smooth there)
    assert 6.0 < gaps[1] / gaps[2] < 15.0 and gaps[2] < 5e-3, gaps
    # order 1 guided differs from unguided too; an interval that holds no step is no guidance at all
    assert median_row_gap(run(ProbabilisticGuidance(g, 0.3), order=1).x, run(None, order=1).x) > 0.1
    assert maxdiff(run(ProbabilisticGuidance(g, 0.3, interval=(0.9, 1.0))).x, base) < 1e-12


def test_guidance_keeps_the_energy_of_a_gaussian_step():
    # J = 1 data and a step from t = 0: the guided draw has mean m_c + b and variance (1 - w^2) vbar
    a, logpi = data_law(seed=16)
    a, logpi = a[:1], logpi[:1]
    k, w = 100_000, 0.6
    x0 = torch.randn(k, N, D, dtype=F64)
    guide = _guides()["velocity"]
    out = solve_gm(Exact(a, logpi), x0, time_grid(1), mode="sde", guidance=ProbabilisticGuidance(guide, w),
                   generator=gen(17))
    t0 = torch.zeros(k, dtype=F64)
    cond = posterior(x0, t0, a, logpi, S)
    m_c, vbar = gm.surrogate(cond)
    b = gm.guidance_bias(m_c, vbar, x0 + guide(x0, t0), w)
    resid = out.x - m_c - b
    assert float(resid.mean(0).abs().max()) < 5 * math.sqrt(S / k)
    assert float(resid.var(0).mean()) == pytest.approx((1 - w**2) * S, rel=0.01)


# --- T9: a tiny trained GM-MLP ----------------------------------------------------------------------------

def checkerboard(k, g):
    """A 4 x 4 checkerboard on [-2, 2]^2 (8 filled unit squares), as ``(k, 1, 2)``."""
    i = torch.randint(0, 4, (k,), generator=g)
    j = 2 * torch.randint(0, 2, (k,), generator=g) + i % 2
    return (torch.stack([i, j], 1).float() + torch.rand(k, 2, generator=g) - 2.0)[:, None, :]


class GMMLP(nn.Module):
    """``(x (B, 1, 2), t (B,)) -> GMOutput`` with J components, one cell (G = 1), a log-std MLP on t."""

    def __init__(self, components=8, hidden=64):
        super().__init__()
        self.j = components
        self.register_buffer("freq", math.pi * torch.arange(1, 9, dtype=torch.float32))
        self.net = nn.Sequential(nn.Linear(18, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 3 * components))
        self.logstd = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 1))
        nn.init.zeros_(self.logstd[-1].weight)
        nn.init.zeros_(self.logstd[-1].bias)

    def forward(self, x, t):
        e = t.float()[:, None] * self.freq
        e = torch.cat([e.sin(), e.cos()], 1)
        h = self.net(torch.cat([x[:, 0].float(), e], 1))
        b = x.shape[0]
        return gm.GMOutput(h[:, :2 * self.j].reshape(b, self.j, 1, 2), h[:, 2 * self.j:].reshape(b, self.j, 1, 1),
                           self.logstd(e)[:, 0])


def sliced_w2(p, q, g, projections=128):
    """Sliced Wasserstein-2 between two equal-size samples ``(k, ...)``: the RMS over random directions of
    the 1-D W2 of the sorted projections."""
    d = torch.randn(projections, p[0].numel(), generator=g)
    d = d / d.norm(dim=1, keepdim=True)
    a, b = (d @ p.flatten(1).T).sort(-1)[0], (d @ q.flatten(1).T).sort(-1)[0]
    return float((a - b).pow(2).mean().sqrt())


@pytest.mark.slow
def test_trained_gm_mlp_gm_sde2_beats_euler_at_four_steps(one_thread):
    torch.manual_seed(0)
    g = gen(1)
    net = GMMLP()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(400):
        x1, x0, t = checkerboard(256, g), torch.randn(256, 1, 2, generator=g), torch.rand(256, generator=g)
        xt = (1 - t)[:, None, None] * x0 + t[:, None, None] * x1
        loss = -gm.log_prob(net(xt, t).velocity_mixture(), x1 - x0).mean() / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        k = 10_000
        x0, ref = torch.randn(k, 1, 2, generator=g), checkerboard(k, g)
        sde = solve_gm(net, x0, time_grid(4), mode="sde", order=2, generator=g)
        euler = solve_ode(lambda x, t: net(x, t).mean(), x0, time_grid(4))
        assert sde.nfe == euler.nfe == 4 and sde.x.dtype == torch.float32
        w_sde, w_euler = sliced_w2(sde.x, ref, g), sliced_w2(euler.x, ref, g)
    assert w_sde < 0.7 * w_euler, (w_sde, w_euler)
