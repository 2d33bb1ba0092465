"""The cell algebra of GMFlow (mmfm.flow.gm), in float64: mixture moments, tilts and ratios, the Bayes
move (docs/gmflow.md §8 T3(a)), the reverse transition (T4) and the probabilistic-guidance identity (T5)."""

import math

import pytest
import torch

from mmfm.flow import gm

#: small tensors on a busy machine: one intra-op thread is about ten times faster
pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_mixture(b=3, j=4, n=2, g=3, c=2, seed=0, spread=1.0):
    r = gen(seed)
    means = spread * torch.randn(b, j, n, g, c, generator=r, dtype=F64)
    logw = torch.log_softmax(torch.randn(b, j, n, g, generator=r, dtype=F64), dim=1)
    var = 0.2 + torch.rand(b, generator=r, dtype=F64)
    return gm.CellMixture(means, logw, var)


def row_select(mix, rows):
    return gm.CellMixture(mix.means[rows], mix.logw[rows], mix.var[rows])


def log_normal(x, mean, var):
    """``(B,)`` log N(x; mean, var I) over all elements of a row; ``var`` ``(B,)``."""
    d = x[0].numel()
    quad = (x - mean).pow(2).flatten(1).sum(1)
    return -0.5 * quad / var - 0.5 * d * (math.log(2 * math.pi) + torch.log(var))


def constant_per_row(diff):
    """``diff`` ``(K, B)``: the spread over the K points of each row, relative to its size."""
    return float((diff - diff.mean(0)).abs().max())


# --- exact posterior of per-cell mixture data (docs/gmflow.md §8 T3) ---------------------------------------------

def posterior(x, t, a, logpi, S, groups, m=None, var0=None):
    """The exact ``p(x1 | x_t = x)`` for per-cell data ``x1 ~ sum_i pi_i N(a_i, S I_c)`` and the row's source
    component ``(m, var0)``. ``a`` ``(I, N, D)``, ``logpi`` ``(I, N, G)``, ``S`` a float."""
    b = x.shape[0]
    var0 = torch.ones(b, dtype=x.dtype) if var0 is None else var0
    y = x if m is None else x - (1 - t)[:, None, None] * m
    r2 = (1 - t) ** 2 * var0  # (B,)
    v = 1.0 / (1.0 / S + t**2 / r2)
    yc, ac = gm.cells(y, groups).unsqueeze(1), gm.cells(a, groups).unsqueeze(0)  # (B,1,N,G,c), (1,I,N,G,c)
    mu = v[:, None, None, None, None] * (ac / S + (t / r2)[:, None, None, None, None] * yc)
    quad = (yc - t[:, None, None, None, None] * ac).pow(2).sum(-1) / (2 * (t**2 * S + r2))[:, None, None, None]
    return gm.CellMixture(mu, torch.log_softmax(logpi.unsqueeze(0) - quad, dim=1), v)


def data_law(seed=0, n=2, d=4, groups=2, comps=3):
    r = gen(seed)
    a = 1.5 * torch.randn(comps, n, d, generator=r, dtype=F64)
    logpi = torch.log_softmax(torch.randn(comps, n, groups, generator=r, dtype=F64), dim=0)
    return a, logpi, 0.15


def assert_same_mixture(p, q, atol=1e-12):
    assert torch.allclose(p.means, q.means, atol=atol, rtol=0)
    assert torch.allclose(p.logw.exp(), q.logw.exp(), atol=atol, rtol=0)
    assert torch.allclose(p.var, q.var, atol=atol, rtol=0)


# --- shapes, means, x1-form ------------------------------------------------------------------------------

def test_cells_roundtrip_and_bad_groups():
    x = torch.randn(2, 3, 12, dtype=F64)
    c = gm.cells(x, 3)
    assert c.shape == (2, 3, 3, 4)
    assert torch.equal(c[0, 1, 2], x[0, 1, 8:12])
    assert torch.equal(gm.uncells(c), x)
    with pytest.raises(ValueError, match="gm_groups"):
        gm.cells(x, 5)


def test_gmoutput_mean_is_the_weighted_sum():
    r = gen(1)
    b, j, n, d, g = 2, 3, 4, 6, 2
    out = gm.GMOutput(torch.randn(b, j, n, d, generator=r, dtype=F64), torch.randn(b, j, n, g, generator=r,
                      dtype=F64), torch.randn(b, generator=r, dtype=F64))
    assert out.components == j and out.groups == g
    hand = torch.zeros(b, n, d, dtype=F64)
    for bi in range(b):
        for ni in range(n):
            for di in range(d):
                w = torch.softmax(out.logits[bi, :, ni, di // (d // g)], 0)
                hand[bi, ni, di] = (w * out.means[bi, :, ni, di]).sum()
    assert torch.allclose(out.mean(), hand, atol=1e-14)
    mix = out.velocity_mixture()
    assert torch.allclose(mix.var, torch.exp(2 * out.logstd))
    assert torch.allclose(mix.weights().sum(1), torch.ones(b, n, g, dtype=F64))


def test_x1_mixture_is_x_plus_one_minus_t_times_u():
    r = gen(2)
    out = gm.GMOutput(torch.randn(2, 3, 4, 6, generator=r, dtype=F64), torch.randn(2, 3, 4, 2, generator=r,
                      dtype=F64), torch.randn(2, generator=r, dtype=F64))
    x, t = torch.randn(2, 4, 6, generator=r, dtype=F64), torch.tensor([0.2, 0.7], dtype=F64)
    mix = gm.x1_mixture(out, x, t)
    assert torch.allclose(mix.mean(), x + (1 - t)[:, None, None] * out.mean(), atol=1e-14)
    assert torch.allclose(mix.var, (1 - t) ** 2 * torch.exp(2 * out.logstd), atol=1e-14)
    assert torch.equal(mix.logw, out.log_weights())


# --- log-prob, sampling, surrogate --------------------------------------------------------------------------

def test_log_prob_matches_torch_distributions():
    D = torch.distributions
    mix = random_mixture(seed=3)
    b, j, n, g, c = mix.means.shape
    x = torch.randn(b, n, g * c, generator=gen(4), dtype=F64)
    comp = D.Independent(D.Normal(mix.means.permute(0, 2, 3, 1, 4),
                                  mix.var.sqrt()[:, None, None, None, None].expand(b, n, g, j, c)), 1)
    ref = D.MixtureSameFamily(D.Categorical(logits=mix.logw.permute(0, 2, 3, 1)), comp)
    want = ref.log_prob(gm.cells(x, g)).flatten(1).sum(1)
    assert torch.allclose(gm.log_prob(mix, x), want, atol=1e-11, rtol=0)


def test_sample_law_mean_variance_and_component_frequencies():
    # well-separated components, so each draw's component can be read off the nearest mean
    base = random_mixture(b=1, j=3, n=2, g=2, c=2, seed=5, spread=1.0)
    means = base.means + 12.0 * torch.arange(3, dtype=F64)[None, :, None, None, None]
    one = gm.CellMixture(means, base.logw, torch.tensor([0.3], dtype=F64))
    k = 200_000
    big = gm.CellMixture(one.means.expand(k, -1, -1, -1, -1), one.logw.expand(k, -1, -1, -1), one.var.expand(k))
    x = gm.sample(big, gen(6))
    assert x.shape == (k, 2, 4) and x.dtype == F64
    xc = gm.cells(x, 2)
    nearest = (xc.unsqueeze(1) - means).pow(2).sum(-1).argmin(1)  # (k, N, G)
    freq = torch.stack([(nearest == jj).double().mean(0) for jj in range(3)])  # (J, N, G)
    w = one.weights()[0]
    assert float((freq - w).abs().max()) < 5 * math.sqrt(0.25 / k)
    # within a component: mean mu_j, variance v per channel
    for jj in range(3):
        sel = nearest == jj
        for ni in range(2):
            for gi in range(2):
                pts = xc[:, ni, gi][sel[:, ni, gi]]
                if len(pts) < 1000:
                    continue
                se = math.sqrt(0.3 / len(pts))
                assert float((pts.mean(0) - means[0, jj, ni, gi]).abs().max()) < 5 * se
                assert float((pts.var(0) - 0.3).abs().max()) < 5 * 0.3 * math.sqrt(2 / len(pts))
    # the surrogate: the exact mean, and vbar = the mean over cells of trace(Cov) / c
    m, vbar = gm.surrogate(one)
    assert float((x.mean(0) - m[0]).abs().max()) < 5 * math.sqrt(float(x.var(0).max()) / k)
    mc_vbar = x.var(0).mean()
    assert abs(float(mc_vbar - vbar[0])) < 0.02 * float(vbar[0])


def test_surrogate_exact_moments():
    mix = random_mixture(seed=7)
    m, vbar = gm.surrogate(mix)
    b, j, n, g, c = mix.means.shape
    w = mix.weights()
    for bi in range(b):
        total = 0.0
        for ni in range(n):
            for gi in range(g):
                mu = mix.means[bi, :, ni, gi]  # (J, c)
                mean = (w[bi, :, ni, gi, None] * mu).sum(0)
                second = (w[bi, :, ni, gi, None, None] * mu[:, :, None] * mu[:, None, :]).sum(0)
                cov = second - mean[:, None] * mean[None, :] + mix.var[bi] * torch.eye(c, dtype=F64)
                assert torch.allclose(gm.cells(m, g)[bi, ni, gi], mean, atol=1e-14)
                total += float(torch.trace(cov)) / c
        assert vbar[bi].item() == pytest.approx(total / (n * g), abs=1e-13)


# --- tilt and ratio ----------------------------------------------------------------------------------------

def test_tilt_is_the_renormalized_product():
    mix = random_mixture(seed=8)
    b, j, n, g, c = mix.means.shape
    r = gen(9)
    center = torch.randn(b, n, g * c, generator=r, dtype=F64)
    gamma = 0.3 + torch.rand(b, generator=r, dtype=F64)
    tilted = gm.tilt(mix, center, gamma)
    pts = torch.randn(50, b, n, g * c, generator=r, dtype=F64) * 2
    diff = torch.stack([gm.log_prob(tilted, p) - gm.log_prob(mix, p) - log_normal(p, center, gamma) for p in pts])
    assert constant_per_row(diff) < 1e-11
    # and the normalizer is the closed form: log prod_cells sum_j A_j N(mu_j; g, (v + gamma) I)
    cells_g = gm.cells(center, g).unsqueeze(1)
    tot = (mix.var + gamma)[:, None, None, None]
    lz = torch.logsumexp(mix.logw - (mix.means - cells_g).pow(2).sum(-1) / (2 * tot) - 0.5 * c * torch.log(
        2 * math.pi * tot), dim=1).flatten(1).sum(1)
    assert torch.allclose(diff.mean(0), -lz, atol=1e-10)


def test_gaussian_ratio_is_proportional_to_the_returned_gaussian():
    r = gen(10)
    a, b0 = torch.randn(3, 2, 5, generator=r, dtype=F64), torch.randn(3, 2, 5, generator=r, dtype=F64)
    alpha = torch.tensor([0.2, 0.5, 1.0], dtype=F64)
    beta = torch.tensor([0.7, 0.9, 3.0], dtype=F64)
    g, gamma = gm.gaussian_ratio(a, alpha, b0, beta)
    assert torch.allclose(gamma, alpha * beta / (beta - alpha))
    pts = torch.randn(40, 3, 2, 5, generator=r, dtype=F64) * 2
    diff = torch.stack([log_normal(p, a, alpha) - log_normal(p, b0, beta) - log_normal(p, g, gamma) for p in pts])
    assert constant_per_row(diff) < 1e-11


def test_natural_tilt_and_tilt_toward_zero_bias_are_the_identity():
    mix = random_mixture(seed=11)
    b, j, n, g, c = mix.means.shape
    r = gen(12)
    nu, lam = torch.randn(b, n, g * c, generator=r, dtype=F64), torch.rand(b, generator=r, dtype=F64)
    tilted = gm.natural_tilt(mix, nu, lam)
    pts = torch.randn(30, b, n, g * c, generator=r, dtype=F64)
    diff = torch.stack([gm.log_prob(tilted, p) - gm.log_prob(mix, p) - (nu * p).flatten(1).sum(1)
                        + 0.5 * lam * p.pow(2).flatten(1).sum(1) for p in pts])
    assert constant_per_row(diff) < 1e-11
    # tiny vbar: no absolute clamp leaks in
    small = gm.CellMixture(mix.means * 1e-3, mix.logw, mix.var * 1e-8)
    same = gm.tilt_toward(small, torch.zeros(b, n, g * c, dtype=F64))
    assert_same_mixture(same, small, atol=1e-15)


# --- Bayes move (T3(a)) --------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["gaussian", "gmm"])
def test_bayes_move_of_the_exact_posterior_is_the_posterior_there(source):
    a, logpi, S = data_law(seed=13)
    b, n, d, groups = 4, 2, 4, 2
    r = gen(14)
    m = var0 = None
    if source == "gmm":
        m, var0 = 2.0 * torch.randn(b, n, d, generator=r, dtype=F64), 0.3 + torch.rand(b, generator=r, dtype=F64)
    t_a = torch.tensor([0.0, 0.1, 0.4, 0.7], dtype=F64)
    t = torch.tensor([0.3, 0.5, 0.45, 0.97], dtype=F64)
    x_a, x = torch.randn(b, n, d, generator=r, dtype=F64), torch.randn(b, n, d, generator=r, dtype=F64)
    p_a = posterior(x_a, t_a, a, logpi, S, groups, m, var0)
    moved = gm.bayes_move(p_a, x_a, t_a, x, t, m, var0)
    assert_same_mixture(moved, posterior(x, t, a, logpi, S, groups, m, var0), atol=1e-12)
    # no move is the identity
    assert_same_mixture(gm.bayes_move(p_a, x_a, t_a, x_a, t_a, m, var0), p_a, atol=1e-14)


def test_posterior_helper_at_t0_is_the_data_law():
    a, logpi, S = data_law(seed=13)
    x = torch.randn(2, 2, 4, dtype=F64)
    p = posterior(x, torch.zeros(2, dtype=F64), a, logpi, S, 2)
    assert torch.allclose(p.means, gm.cells(a, 2).unsqueeze(0).expand_as(p.means))
    assert torch.allclose(p.logw, logpi.unsqueeze(0).expand_as(p.logw))
    assert torch.allclose(p.var, torch.full((2,), S, dtype=F64))


# --- reverse transition (T4) ---------------------------------------------------------------------------------

@pytest.mark.parametrize("t_a, t_b", [(0.2, 0.5), (0.6, 0.95), (0.0, 0.3)])
def test_reverse_coefficients(t_a, t_b):
    c1, c2, c3 = gm.reverse_coefficients(t_a, t_b)
    # the closed form: E[y_b | y_a, z] = c1 y_a + c2 z and Var = c3 for the standard kernel
    cov_ab = (t_a / t_b) * (1 - t_b) ** 2  # Cov(y_b, y_a | z)
    assert c1 == pytest.approx(cov_ab / (1 - t_a) ** 2, abs=1e-15)
    assert c2 == pytest.approx(t_b - c1 * t_a, abs=1e-15)
    assert c3 == pytest.approx((1 - t_b) ** 2 - c1**2 * (1 - t_a) ** 2, abs=1e-15)
    # Monte Carlo as docs/gmflow.md §3: z non-Gaussian (a two-bump law), y_b, then y_a forward from y_b
    k = 400_000
    r = gen(15)
    z = torch.where(torch.rand(k, generator=r, dtype=F64) < 0.3, -2.0, 1.5) + 0.4 * torch.randn(k, generator=r,
                                                                                                dtype=F64)
    y_b = t_b * z + (1 - t_b) * torch.randn(k, generator=r, dtype=F64)
    y_a = (t_a / t_b) * y_b + math.sqrt((1 - t_a) ** 2 - (t_a / t_b) ** 2 * (1 - t_b) ** 2) * torch.randn(
        k, generator=r, dtype=F64)
    res = y_b - c1 * y_a - c2 * z
    design = torch.stack([torch.ones(k, dtype=F64), y_a, z], 1)
    coef = torch.linalg.lstsq(design, res[:, None]).solution[:, 0]
    assert float(coef.abs().max()) < 5 * math.sqrt(c3 / k) * 3
    assert float(res.var()) == pytest.approx(c3, rel=5 * math.sqrt(2 / k))
    assert float(y_a.var()) == pytest.approx(t_a**2 * float(z.var()) + (1 - t_a) ** 2, rel=0.01)


def test_reverse_coefficients_at_the_data_end_and_on_tensors():
    assert gm.reverse_coefficients(0.4, 1.0) == (0.0, 1.0, 0.0)
    t_a, t_b = torch.tensor([0.1, 0.5], dtype=F64), torch.tensor([0.3, 1.0], dtype=F64)
    c1, c2, c3 = gm.reverse_coefficients(t_a, t_b)
    assert torch.allclose(torch.stack([c1, c2, c3])[:, 1], torch.tensor([0.0, 1.0, 0.0], dtype=F64))
    assert c1[0].item() == pytest.approx(gm.reverse_coefficients(0.1, 0.3)[0], abs=1e-15)


# --- probabilistic guidance (T5) ----------------------------------------------------------------------------

@pytest.mark.parametrize("w", [0.04, 0.45, 0.9])
def test_guidance_identity_for_a_gaussian_conditional(w):
    b, n, g, c = 3, 4, 3, 2
    r = gen(16)
    means = torch.randn(b, 1, n, g, c, generator=r, dtype=F64)
    base = gm.CellMixture(means, torch.zeros(b, 1, n, g, dtype=F64), 0.1 + torch.rand(b, generator=r, dtype=F64))
    m_c, vbar = gm.surrogate(base)
    assert torch.allclose(vbar, base.var)
    m_u = m_c + 0.5 * torch.randn(b, n, g * c, generator=r, dtype=F64)
    bias = gm.guidance_bias(m_c, vbar, m_u, w, orthogonal=1.0)
    assert torch.allclose(bias.pow(2).flatten(1).mean(1).sqrt(), w * vbar.sqrt(), rtol=1e-12)
    assert float((bias * m_c).flatten(1).mean(1).abs().max()) < 1e-14
    guided = gm.tilt_toward(base, bias)
    assert torch.allclose(guided.mean(), m_c + bias, atol=1e-12)
    assert torch.allclose(guided.var, (1 - w**2) * vbar, rtol=1e-12)
    # the same through the peer's ratio form: tilt by N(m_c + b / w^2, vbar (1 - w^2) / w^2)
    g_, gamma = gm.gaussian_ratio(m_c + bias, (1 - w**2) * vbar, m_c, vbar)
    assert torch.allclose(g_, m_c + bias / w**2, atol=1e-10)
    assert torch.allclose(gamma, vbar * (1 - w**2) / w**2, rtol=1e-10)
    ratio = gm.tilt(base, g_, gamma)
    assert torch.allclose(ratio.means, guided.means, atol=1e-10)
    # the guided law keeps the conditional's energy: E||x - m_c||^2 / (N D) = vbar
    energy = (guided.mean() - m_c).pow(2).flatten(1).mean(1) + guided.var
    assert torch.allclose(energy, vbar, rtol=1e-12)


def test_guidance_bias_direction_without_projection():
    r = gen(17)
    m_c, m_u = torch.randn(2, 3, 4, generator=r, dtype=F64), torch.randn(2, 3, 4, generator=r, dtype=F64)
    vbar = torch.tensor([0.5, 2.0], dtype=F64)
    bias = gm.guidance_bias(m_c, vbar, m_u, 0.3, orthogonal=0.0)
    diff = m_c - m_u
    unit = diff / diff.pow(2).flatten(1).mean(1).sqrt()[:, None, None]
    assert torch.allclose(bias, 0.3 * vbar.sqrt()[:, None, None] * unit, atol=1e-14)
