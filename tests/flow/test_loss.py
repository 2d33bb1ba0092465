import pytest
import torch

from mmfm.flow import velocity_loss


def test_loss_is_per_sample_mean_then_weighted_batch_mean():
    v, u = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    per = ((v - u) ** 2).mean((1, 2))
    assert torch.allclose(velocity_loss(v, u), per.mean())
    w = torch.tensor([0.5, 2.0, 1.0, 0.0])
    assert torch.allclose(velocity_loss(v, u, w), (w * per).mean())
    assert torch.allclose(velocity_loss(v, u, w, reduction="none"), w * per)
    assert float(velocity_loss(u, u)) == 0.0


def test_loss_is_float32_for_bf16_predictions():
    v = torch.randn(2, 8).bfloat16()
    assert velocity_loss(v, torch.zeros(2, 8)).dtype == torch.float32


def test_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="v_pred and target"):
        velocity_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="weights"):
        velocity_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="reduction"):
        velocity_loss(torch.zeros(2, 3), torch.zeros(2, 3), reduction="sum")


# ------------------------------------------------------------------------------------------------ GMFlow losses
# docs/gmflow.md §3 and the checks T1, T2, T6, T7 of docs/gmflow.md §8.

import math  # noqa: E402

from mmfm.flow.gm import GMOutput, reverse_coefficients  # noqa: E402
from mmfm.flow.loss import (  # noqa: E402
    forward_transition,
    gm_nll_loss,
    gm_transition_loss,
    transition_times,
)


def random_gm(b=3, j=3, n=4, d=6, g=2, dtype=torch.float64, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    parts = (torch.randn(b, j, n, d, generator=gen, dtype=dtype), torch.randn(b, j, n, g, generator=gen, dtype=dtype),
             0.3 * torch.randn(b, generator=gen, dtype=dtype))
    return GMOutput(*(p.requires_grad_(requires_grad) for p in parts))


def test_t1_single_component_unit_std_is_velocity_loss_plus_log_2pi():
    # scale 2 x (1.2) = 2 (1/2 err^2 + 1/2 log 2 pi) per element: the constant is log(2 pi), not 1/2 log(2 pi)
    torch.manual_seed(0)
    mu = torch.randn(5, 1, 4, 6, requires_grad=True)
    u = torch.randn(5, 4, 6)
    w = torch.tensor([0.5, 2.0, 1.0, 0.0, 3.0])
    gm = GMOutput(mu, torch.randn(5, 1, 4, 3), torch.zeros(5))  # J = 1: the logits do not matter
    for kw in ({}, {"weights": w}, {"weights": w, "reduction": "none"}):
        nll = gm_nll_loss(gm, u, **kw)
        mse = velocity_loss(mu[:, 0], u, **kw)
        const = math.log(2 * math.pi) * (w if "weights" in kw else torch.ones(5))
        const = const if kw.get("reduction") == "none" else const.mean()
        torch.testing.assert_close(nll, mse + const)
    g_nll, = torch.autograd.grad(gm_nll_loss(gm, u), mu)
    g_mse, = torch.autograd.grad(velocity_loss(mu[:, 0], u), mu)
    torch.testing.assert_close(g_nll, g_mse, rtol=1e-6, atol=1e-7)
    # with scale 1 it is the spec's 1/2 mse + 1/2 log 2 pi
    torch.testing.assert_close(gm_nll_loss(gm, u, scale=1.0), 0.5 * velocity_loss(mu[:, 0], u) + 0.5 * math.log(2 * math.pi))


def test_t1_learnable_std_converges_to_the_mean_squared_error():
    torch.manual_seed(1)
    mu, u = torch.randn(4, 1, 3, 4, dtype=torch.float64), torch.randn(4, 3, 4, dtype=torch.float64) * 2
    logstd = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([logstd], lr=1, max_iter=200, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = gm_nll_loss(GMOutput(mu, torch.zeros(4, 1, 3, 2, dtype=torch.float64), logstd), u)
        loss.backward()
        return loss

    opt.step(closure)
    mse = (mu[:, 0] - u).pow(2).mean((1, 2))  # per row, in float64
    torch.testing.assert_close(torch.exp(2 * logstd.detach()), mse, rtol=1e-7, atol=1e-9)


def test_nll_matches_the_per_cell_formula_and_is_float32():
    gm, u = random_gm(), torch.randn(3, 4, 6, dtype=torch.float64)
    c = 3  # D / G
    quad = -(u[:, None] - gm.means).pow(2).unflatten(-1, (2, c)).sum(-1) / (2 * torch.exp(2 * gm.logstd))[:, None, None, None]
    logn = quad - c * gm.logstd[:, None, None, None] - c / 2 * math.log(2 * math.pi)
    ref = -torch.logsumexp(torch.log_softmax(gm.logits, 1) + logn, 1).sum((1, 2)) / 24
    torch.testing.assert_close(gm_nll_loss(gm, u, scale=1.0, reduction="none"), ref)
    bf = GMOutput(*(p.bfloat16() for p in (gm.means, gm.logits, gm.logstd)))
    assert gm_nll_loss(bf, u.bfloat16()).dtype == torch.float32
    assert gm_nll_loss(gm, u).dtype == torch.float64


def test_gm_losses_reject_bad_input():
    gm = random_gm()
    with pytest.raises(ValueError, match="u"):
        gm_nll_loss(gm, torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="reduction"):
        gm_nll_loss(gm, torch.zeros(3, 4, 6), reduction="sum")
    with pytest.raises(ValueError, match="weights"):
        gm_nll_loss(gm, torch.zeros(3, 4, 6), weights=torch.ones(2))
    with pytest.raises(ValueError, match="gm_trans_ratio"):
        transition_times(torch.rand(3), 0.0)
    with pytest.raises(ValueError, match="gm_trans_ratio"):
        transition_times(torch.rand(3), 1.5)


@pytest.mark.parametrize("components", [1, 2, 4])
def test_t2_mean_alignment_on_a_bimodal_sample(components):
    # one row whose N = 2000 one-channel tokens (cells) are the fixed sample, all cells sharing one mixture
    gen = torch.Generator().manual_seed(0)
    n = 2000
    pick = torch.rand(n, generator=gen) < 0.3
    u = torch.where(pick, -2.0 + 0.5 * torch.randn(n, generator=gen), 1.5 + 0.3 * torch.randn(n, generator=gen))
    u = u.double().reshape(1, n, 1)
    means = torch.linspace(-1, 1, components, dtype=torch.float64).requires_grad_(True)
    logits = torch.zeros(components, dtype=torch.float64, requires_grad=True)
    logstd = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([means, logits, logstd], lr=1, max_iter=300, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        gm = GMOutput(means.view(1, -1, 1, 1).expand(1, -1, n, 1), logits.view(1, -1, 1, 1).expand(1, -1, n, 1), logstd)
        loss = gm_nll_loss(gm, u)
        loss.backward()
        return loss

    opt.step(closure)
    mixture_mean = float((torch.softmax(logits, 0) * means).sum().detach())
    assert abs(mixture_mean - float(u.mean())) < 1e-6
    if components > 1:  # the mixture found both modes
        assert float(means.detach().max()) > 1.0 and float(means.detach().min()) < -1.5


def test_transition_times():
    t = torch.tensor([0.0, 0.3, 0.9, 1.0, 1 - 1e-6])
    for ratio in (0.5, 0.9, 1.0):
        t_a, t_b = transition_times(t, ratio)
        assert float(t_a.max()) <= 1 - 1e-4 and torch.equal(t_a[:3], t[:3])
        assert bool((t_b >= t_a + 1e-4 - 1e-7).all()) and bool((t_b <= 1).all())
        if ratio == 1.0:
            assert bool((t_b == 1).all())
    t_a, t_b = transition_times(t[:3].double(), 0.5)
    torch.testing.assert_close(t_b, 1 - 0.5 * (1 - t[:3].double()))
    t_a, t_b = transition_times(torch.tensor([0.5]), 1e-6)  # tiny ratio: the 1e-4 gap
    assert abs(float(t_b - t_a) - 1e-4) < 1e-6


@pytest.mark.parametrize("gmm_component", [False, True])
def test_forward_transition_has_the_kernel_law(gmm_component):
    gen = torch.Generator().manual_seed(0)
    b, n, d = 100_000, 2, 3
    x1 = torch.randn(1, n, d, generator=gen, dtype=torch.float64).expand(b, n, d)
    m = torch.randn(1, n, d, generator=gen, dtype=torch.float64).expand(b, n, d) if gmm_component else None
    var0 = torch.full((b,), 0.4, dtype=torch.float64) if gmm_component else None
    sd = 0.4 ** 0.5 if gmm_component else 1.0
    mm = m if gmm_component else torch.zeros_like(x1)
    t_a, t_b = torch.full((b,), 0.3, dtype=torch.float64), torch.full((b,), 0.75, dtype=torch.float64)
    x_b = (1 - 0.75) * (mm + sd * torch.randn(b, n, d, generator=gen, dtype=torch.float64)) + 0.75 * x1
    x_a = forward_transition(x_b, t_a, t_b, torch.randn(b, n, d, generator=gen, dtype=torch.float64), m, var0)
    var = (1 - 0.3) ** 2 * sd ** 2
    se = (var / b) ** 0.5
    assert float((x_a.mean(0) - (0.3 * x1[0] + 0.7 * mm[0])).abs().max()) < 5 * se
    assert float((x_a.var(0) / var - 1).abs().max()) < 5 * (2 / b) ** 0.5
    assert x_a.dtype == torch.float64
    assert forward_transition(x_b.float(), t_a, t_b, torch.zeros(b, n, d)).dtype == torch.float32


def _u_of(x_a, x_b, t_a):
    return (x_b - x_a) / (1 - t_a).reshape(-1, 1, 1)


@pytest.mark.parametrize("gmm_component", [False, True])
def test_t6_ratio_one_is_the_nll_plus_a_constant(gmm_component):
    gen = torch.Generator().manual_seed(3)
    b, n, d = 3, 4, 6
    t_a, t_b = transition_times(torch.tensor([0.1, 0.5, 0.95], dtype=torch.float64), 1.0)
    x_a, x_b = torch.randn(b, n, d, generator=gen, dtype=torch.float64), torch.randn(b, n, d, generator=gen, dtype=torch.float64)
    m = torch.randn(b, n, d, generator=gen, dtype=torch.float64) if gmm_component else None
    var0 = torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64) if gmm_component else None
    u = _u_of(x_a, x_b, t_a)
    diffs = []
    for seed in (0, 1):
        gm = random_gm(seed=seed)
        trans = gm_transition_loss(gm, x_a, t_a, x_b, t_b, m=m, var0=var0, reduction="none")
        nll = gm_nll_loss(gm, u, reduction="none")
        const = 2.0 * (torch.log(1 - t_a) - 0.5 * (torch.log(var0) if gmm_component else 0))
        torch.testing.assert_close(trans - nll, const)
        diffs.append((trans, nll))
    torch.testing.assert_close(diffs[0][0] - diffs[1][0], diffs[0][1] - diffs[1][1])


def _log_normal(x, mean, var):
    """Sum over the last dim of log N(x; mean, var I)."""
    return (-(x - mean).pow(2) / (2 * var) - 0.5 * torch.log(2 * math.pi * var)).sum(-1)


def _mixture_data(gmm_component, b=4000, n=2, d=4, groups=2, k=3, seed=0):
    """Per-cell mixture data x1 ~ sum_i pi_i N(a_i, S I_c) (T3), its source component and a (t_a, t_b) pair."""
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    c = d // groups
    pi = torch.tensor([0.2, 0.5, 0.3], **f64)
    a = 1.5 * torch.randn(k, n, groups, c, generator=gen, **f64)  # component means per cell
    big_s = 0.2
    pick = torch.multinomial(pi, b * n * groups, replacement=True, generator=gen).reshape(b, n, groups)
    cell_means = a.permute(1, 2, 0, 3)[torch.arange(n)[:, None], torch.arange(groups)[None, :], pick]  # (b,n,G,c)
    x1 = (cell_means + big_s ** 0.5 * torch.randn(b, n, groups, c, generator=gen, **f64)).flatten(-2)
    if gmm_component:
        m = torch.randn(1, n, d, generator=gen, **f64).expand(b, n, d)
        var0 = torch.full((b,), 0.5, **f64)
    else:
        m, var0 = torch.zeros(b, n, d, **f64), torch.ones(b, **f64)
    t_a = 0.05 + 0.85 * torch.rand(b, generator=gen, **f64)
    return gen, pi, a, big_s, x1, m, var0, t_a


def _exact_posterior(pi, a, big_s, x, t, m, var0, groups):
    """The exact p(x1 | x_t = x) (T3) as a GMOutput over the velocity."""
    b = x.shape[0]
    r = (1 - t).reshape(b, 1, 1, 1)
    s2 = var0.reshape(b, 1, 1, 1)
    tt = t.reshape(b, 1, 1, 1)
    y = (x - (1 - t).reshape(b, 1, 1) * m).unflatten(-1, (groups, -1))  # (b, n, G, c)
    v = 1 / (1 / big_s + tt ** 2 / (r ** 2 * s2))  # (b,1,1,1)
    mu = v.unsqueeze(1) * (a.unsqueeze(0) / big_s + (tt * y / (r ** 2 * s2)).unsqueeze(1))  # (b, k, n, G, c)
    logw = torch.log(pi).reshape(1, -1, 1, 1) - (y.unsqueeze(1) - tt.unsqueeze(1) * a.unsqueeze(0)).pow(2).sum(-1) / (
        2 * (tt ** 2 * big_s + r ** 2 * s2))
    x_cells = x.unflatten(-1, (groups, -1)).unsqueeze(1)
    means = ((mu - x_cells) / r.unsqueeze(1)).flatten(-2)
    return GMOutput(means, logw, 0.5 * torch.log(v.reshape(b)) - torch.log(1 - t))


def _true_conditional_nll(pi, a, big_s, y_a, t_a, y_b, t_b, var0, groups):
    """-log p(y_b | y_a) per row from the marginals and the forward transition (no GM machinery)."""
    b = y_a.shape[0]
    sd = var0.sqrt().reshape(b, 1, 1, 1, 1)

    def log_marginal(y, t):  # y_t = t z + (1 - t) eps, z = x1 / sigma ~ sum pi N(a / sigma, S / sigma^2)
        tt = t.reshape(b, 1, 1, 1, 1)
        var = tt ** 2 * big_s / sd ** 2 + (1 - tt) ** 2
        comp = _log_normal(y.unflatten(-1, (groups, -1)).unsqueeze(1), tt * a.unsqueeze(0) / sd, var)
        return torch.logsumexp(torch.log(pi).reshape(1, -1, 1, 1) + comp, 1).sum((1, 2))

    k = (t_a / t_b).reshape(b, 1, 1)
    var_ab = (1 - t_a) ** 2 - (t_a / t_b) ** 2 * (1 - t_b) ** 2
    log_fwd = _log_normal(y_a, k * y_b, var_ab.reshape(b, 1, 1)).sum(-1)
    return -(log_fwd + log_marginal(y_b, t_b) - log_marginal(y_a, t_a))


@pytest.mark.parametrize("gmm_component", [False, True])
def test_t6_expected_transition_loss_minus_true_entropy(gmm_component):
    groups = 2
    gen, pi, a, big_s, x1, m, var0, t_a = _mixture_data(gmm_component, groups=groups)
    b, n, d = x1.shape
    t_a, t_b = transition_times(t_a, 0.5)
    sd = var0.sqrt().reshape(b, 1, 1)
    r = lambda v: v.reshape(b, 1, 1)  # noqa: E731
    x_b = r(1 - t_b) * (m + sd * torch.randn(x1.shape, generator=gen, dtype=x1.dtype)) + r(t_b) * x1
    x_a = forward_transition(x_b, t_a, t_b, torch.randn(x1.shape, generator=gen, dtype=x1.dtype), m, var0)
    y_a, y_b = (x_a - r(1 - t_a) * m) / sd, (x_b - r(1 - t_b) * m) / sd
    truth = _true_conditional_nll(pi, a, big_s, y_a, t_a, y_b, t_b, var0, groups) / (n * d)
    exact = _exact_posterior(pi, a, big_s, x_a, t_a, m, var0, groups)
    loss = gm_transition_loss(exact, x_a, t_a, x_b, t_b, m=m, var0=var0, scale=1.0, reduction="none")
    # at the exact mixture the pushed mixture is p(y_b | y_a) itself: zero row by row, not only on average
    assert float((loss - truth).abs().max()) < 1e-9
    *_, c3 = reverse_coefficients(t_a, t_b)
    assert bool((c3 > 1e-6).all())  # the clamps are inactive here
    perturbed = GMOutput(exact.means + 0.3 * torch.randn(exact.means.shape, generator=gen, dtype=x1.dtype),
                         exact.logits + torch.randn(exact.logits.shape, generator=gen, dtype=x1.dtype),
                         exact.logstd + 0.2)
    gap = gm_transition_loss(perturbed, x_a, t_a, x_b, t_b, m=m, var0=var0, scale=1.0, reduction="none") - truth
    se = float(gap.std()) / b ** 0.5
    assert float(gap.mean()) > 5 * se > 0  # a KL divergence: > 0 well beyond the Monte-Carlo error


@pytest.mark.parametrize("gmm_component", [False, True])
@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_t7_gradcheck_of_both_losses(gmm_component, ratio):
    gen = torch.Generator().manual_seed(5)
    f64 = dict(dtype=torch.float64)
    b, j, n, d, g = 2, 3, 2, 4, 2
    means, logits = torch.randn(b, j, n, d, generator=gen, **f64), torch.randn(b, j, n, g, generator=gen, **f64)
    logstd = 0.3 * torch.randn(b, generator=gen, **f64)
    params = [p.requires_grad_(True) for p in (means, logits, logstd)]
    x_a, x_b = torch.randn(b, n, d, generator=gen, **f64), torch.randn(b, n, d, generator=gen, **f64)
    m = torch.randn(b, n, d, generator=gen, **f64) if gmm_component else None
    var0 = torch.tensor([0.5, 2.0], **f64) if gmm_component else None
    t_a, t_b = transition_times(torch.tensor([0.2, 0.7], **f64), ratio)
    w = torch.tensor([0.5, 2.0], **f64)

    def nll(mu, lg, ls):
        return gm_nll_loss(GMOutput(mu, lg, ls), x_b, weights=w, reduction="none")

    def trans(mu, lg, ls):
        return gm_transition_loss(GMOutput(mu, lg, ls), x_a, t_a, x_b, t_b, m=m, var0=var0, weights=w,
                                  reduction="none")

    assert torch.autograd.gradcheck(nll, params)
    assert torch.autograd.gradcheck(trans, params)
