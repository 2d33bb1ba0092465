import numpy as np
import ot
import pytest
import torch
from scipy import stats
from scipy.optimize import linear_sum_assignment

from mmfm.flow import (
    GaussianMixtureSource,
    GaussianSource,
    IndependentCoupling,
    MinibatchOTCoupling,
    ModeCoupling,
    make_coupling,
)


def expected(p, n):
    """Expected counts for a chi-square test (normalized in float64 so they sum to n exactly)."""
    p = p.double().numpy()
    return p / p.sum() * n


def separated_mixture(k=4, d=3, spread=10.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    w = torch.rand(k, generator=g) + 0.3
    return GaussianMixtureSource((w / w.sum()).to(dtype), spread * torch.randn(k, d, generator=g).to(dtype),
                                 (0.5 + torch.rand(k, generator=g)).to(dtype))


def test_independent_coupling_draws_modes_from_the_weights_regardless_of_data():
    src = separated_mixture()
    x1 = torch.zeros(200_000, 3)  # every data point identical: modes must still follow the weights
    x0, x1_out, modes = IndependentCoupling(src)(x1, generator=torch.Generator().manual_seed(0))
    assert x1_out is x1 and x0.shape == x1.shape
    counts = torch.bincount(modes, minlength=4).numpy()
    assert stats.chisquare(counts, expected(src.weights, len(x1))).pvalue > 1e-3


def test_independent_gaussian_coupling_is_uncorrelated_with_data():
    x1 = torch.randn(50_000, 2) * 3 + 1
    x0, _, modes = IndependentCoupling(GaussianSource((2,)))(x1, generator=torch.Generator().manual_seed(1))
    assert modes is None
    corr = np.corrcoef(x0[:, 0].numpy(), x1[:, 0].numpy())[0, 1]
    assert abs(corr) < 0.02


@pytest.mark.parametrize("assignment", ["soft", "hard"])
def test_mode_coupling_pairs_each_point_with_its_own_mode(assignment):
    src = separated_mixture()
    g = torch.Generator().manual_seed(2)
    x1, true_modes = src.sample(5000, generator=g)
    x0, _, modes = ModeCoupling(src, assignment=assignment)(x1, generator=g)
    assert (modes == true_modes).float().mean() > 0.999  # well separated: posterior ~ one-hot
    for k in range(4):
        sel = modes == k
        assert torch.allclose(x0[sel].mean(0), src.means[k], atol=0.15)
    # mode coupling moves mass locally: pairs are far closer than under independence
    x0_ind, _, _ = IndependentCoupling(src)(x1, generator=g)
    assert (x1 - x0).norm(dim=1).mean() < 0.3 * (x1 - x0_ind).norm(dim=1).mean()


def test_soft_mode_coupling_samples_the_posterior_and_hard_takes_its_argmax():
    src = GaussianMixtureSource(torch.tensor([0.3, 0.7]), torch.tensor([[0.0], [1.0]]), torch.tensor([1.0, 1.0]))
    x1 = torch.full((100_000, 1), 0.2)
    r = src.posterior(x1[:1].double())[0]
    _, _, soft = ModeCoupling(src, assignment="soft")(x1, generator=torch.Generator().manual_seed(0))
    assert stats.chisquare(torch.bincount(soft, minlength=2).numpy(), expected(r, len(x1))).pvalue > 1e-3
    _, _, hard = ModeCoupling(src, assignment="hard")(x1)
    assert bool((hard == int(r.argmax())).all())


def test_mode_coupling_with_a_descriptor_mixture():
    # the spatial source has (K, N, D) means; the mode comes from a separate CLS mixture on descriptors
    spatial = GaussianMixtureSource(torch.tensor([0.5, 0.5]), torch.stack([torch.full((4, 2), -5.0),
                                                                          torch.full((4, 2), 5.0)]),
                                    torch.tensor([0.01, 0.01]))
    cls = GaussianMixtureSource(torch.tensor([0.5, 0.5]), torch.tensor([[10.0, 0.0], [-10.0, 0.0]]),
                                torch.ones(2, 2))
    coupling = ModeCoupling(spatial, assigner=cls, assignment="hard")
    x1 = torch.zeros(3, 4, 2)
    descriptor = torch.tensor([[9.0, 0.0], [-11.0, 1.0], [10.0, 0.0]])
    x0, _, modes = coupling(x1, descriptor)
    assert modes.tolist() == [0, 1, 0]
    assert bool((x0[0] < -4).all()) and bool((x0[1] > 4).all())
    with pytest.raises(ValueError, match="descriptor"):
        coupling(x1)
    with pytest.raises(ValueError, match="descriptor"):
        coupling(x1, descriptor[:2])
    with pytest.raises(ValueError, match="assigner"):
        ModeCoupling(spatial, assigner=GaussianMixtureSource(torch.ones(3) / 3, torch.zeros(3, 2), torch.ones(3)))


def test_ot_coupling_equals_pots_plan():
    src = GaussianSource((5,))
    x1 = torch.randn(64, 5) * 2 + 3
    g = torch.Generator().manual_seed(4)
    x0, x1_out, modes = MinibatchOTCoupling(src)(x1, generator=g)
    assert x1_out is x1 and modes is None
    # redraw the same x0 and solve with POT directly
    x0_raw, _ = src.sample(64, generator=torch.Generator().manual_seed(4))
    cost = torch.cdist(x0_raw.double(), x1.double()).pow(2).numpy()
    plan = ot.emd(np.full(64, 1 / 64), np.full(64, 1 / 64), cost)
    perm = torch.from_numpy(plan.argmax(0))
    ours = np.zeros((64, 64))
    ours[perm.numpy(), np.arange(64)] = 1 / 64
    assert np.allclose(ours, plan)
    assert torch.equal(x0, x0_raw[perm])
    # it is a permutation of the drawn x0 and reaches the optimal cost
    assert sorted(perm.tolist()) == list(range(64))
    paired = float(((x0.double() - x1.double()) ** 2).sum(1).mean())
    assert paired == pytest.approx(ot.emd2(np.full(64, 1 / 64), np.full(64, 1 / 64), cost), rel=1e-10)
    rows, cols = linear_sum_assignment(cost)
    assert paired == pytest.approx(cost[rows, cols].mean(), rel=1e-10)


def test_ot_coupling_keeps_modes_with_their_samples():
    src = separated_mixture()
    x1, _ = src.sample(32, generator=torch.Generator().manual_seed(5))
    x0, _, modes = MinibatchOTCoupling(src)(x1, generator=torch.Generator().manual_seed(6))
    # every x0 is near the mean of the mode reported for it
    assert bool(((x0 - src.means[modes]).norm(dim=1) < 6).all())


def test_couplings_reject_bad_input():
    src = separated_mixture()
    for c in (IndependentCoupling(src), ModeCoupling(src), MinibatchOTCoupling(src)):
        with pytest.raises(ValueError, match="x1"):
            c(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="assignment"):
        ModeCoupling(src, assignment="maybe")
    with pytest.raises(ValueError, match="source"):
        ModeCoupling(GaussianSource((3,)))
    with pytest.raises(ValueError, match="coupling"):
        make_coupling("sinkhorn", src)
    assert isinstance(make_coupling("mode", src, assignment="hard"), ModeCoupling)


def test_mode_coupling_assigns_in_float64_whatever_the_inputs_dtype():
    """Uncentred 768-wide float32 descriptors far from two modes and a hair either side of the boundary
    between them: float32 arithmetic gets some wrong; the coupling's assignment is the float64 one for
    every row (a TF32 or float32 product cannot round it)."""
    g = torch.Generator().manual_seed(0)
    mu = (torch.randn(2, 768, generator=g, dtype=torch.float64) + 30.0).float()  # like CLS tokens
    cls = GaussianMixtureSource(torch.tensor([0.5, 0.5], dtype=torch.float64), mu, torch.ones(2, 768))
    u = (mu[1] - mu[0]).double() / (mu[1] - mu[0]).double().norm()
    away = torch.randn(400, 768, generator=g, dtype=torch.float64)
    away = away - (away @ u)[:, None] * u  # orthogonal to the modes' difference: equal distance to both
    away = 100 * away / away.norm(dim=1, keepdim=True)
    eta = (torch.rand(400, generator=g, dtype=torch.float64) * 2 - 1) * 1e-4
    descriptor = ((mu[0].double() + mu[1].double()) / 2 + eta[:, None] * u + away).float()  # as shards hold them
    exact = GaussianMixtureSource(cls.weights, mu.double(), torch.ones(2, 768, dtype=torch.float64))
    truth = exact.log_joint(descriptor.double()).argmax(1)
    assert 0.2 < truth.float().mean() < 0.8
    in_float32 = cls.log_joint(descriptor).argmax(1)
    assert (in_float32 != truth).float().mean() > 0.02  # the test has teeth
    spatial = GaussianMixtureSource(torch.tensor([0.5, 0.5]), torch.zeros(2, 4, 2), torch.ones(2))
    _, _, modes = ModeCoupling(spatial, assigner=cls, assignment="hard")(torch.zeros(400, 4, 2), descriptor)
    assert torch.equal(modes, truth)
