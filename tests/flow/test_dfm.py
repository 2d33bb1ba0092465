"""Decomposable Flow Matching's pieces (spec T2-T4): the stage schedule (the peer's at 2 stages, continuous and
monotone at 3), the step split, the laws of the stage and time draws, the loss (per-stage means; masked stages get
no gradient; one stage is flow matching), the sources' stages (each GMM mode's mean and variance per stage), and the
stage-wise sampler on Gaussian data with exact stage velocities: the data's covariance, with no Monte Carlo."""

import math

import pytest
import torch

from mmfm.flow.dfm import (DFMTimes, check_starts, dfm_loss, dfm_schedule, solve_dfm, source_stages, split_steps,
                           stage_shifts)
from mmfm.flow.pyramid import LaplacianPyramid
from mmfm.flow.sources import GaussianMixtureSource
from mmfm.flow.time import TimeSampler
from mmfm.train.objective import StagewiseObjective, VelocityObjective


def test_two_stages_are_the_peers_schedule():
    sched = dfm_schedule([40, 10], [0.9])
    assert sched.shape == (51, 2)
    q = torch.arange(41, dtype=torch.float64)
    torch.testing.assert_close(sched[:41, 0], 0.9 * q / 40, rtol=0, atol=1e-15)
    assert torch.equal(sched[:41, 1], torch.zeros(41))
    torch.testing.assert_close(sched[40:, 1], torch.arange(11, dtype=torch.float64) / 10, rtol=0, atol=1e-15)
    torch.testing.assert_close(1 - sched[40:, 0], 0.1 * (1 - sched[40:, 1]), rtol=0, atol=1e-15)


@pytest.mark.parametrize("steps, starts", [([8, 4, 2], [0.8, 0.9]), ([5, 5, 5, 5], [0.5, 0.5, 0.7])])
def test_more_stages_are_continuous_and_monotone(steps, starts):
    sched = dfm_schedule(steps, starts)
    assert sched.shape == (sum(steps) + 1, len(steps))  # NFE = sum of the steps
    assert torch.equal(sched[0], torch.zeros(len(steps), dtype=torch.float64)) and torch.allclose(sched[-1], torch.ones(len(steps), dtype=torch.float64))
    assert (sched.diff(dim=0) >= 0).all()  # no stage ever moves back toward noise
    assert float(sched.diff(dim=0).max()) <= max(1 / n for n in steps) + 1e-12  # no jump at a chunk boundary
    ends = torch.tensor(steps).cumsum(0)[:-1]
    for i, e in enumerate(ends.tolist()):  # stage i reached its threshold when stage i + 1 starts
        assert math.isclose(float(sched[e, i]), starts[i]) and float(sched[e, i + 1]) == 0.0


def test_split_steps_and_starts():
    assert split_steps(50, 2) == [40, 10] and split_steps(16, 2) == [13, 3] and split_steps(8, 2) == [6, 2]
    assert split_steps(2, 2) == [1, 1] and split_steps(21, 3) == [16, 4, 1] and split_steps(3, 3) == [1, 1, 1]
    assert split_steps(7, 1) == [7] and split_steps(10, 2, ratio=1.0) == [5, 5]
    with pytest.raises(ValueError, match="nfe: 3 stages need at least 3 network calls"):
        split_steps(2, 3)
    with pytest.raises(ValueError, match="dfm_starts: thresholds out of order"):
        check_starts([0.9, 0.5], 3)
    with pytest.raises(ValueError, match=r"dfm_starts: expected 1 thresholds in \(0, 1\)"):
        check_starts([1.2], 2)


def _times(weights, draw="batch", mu=2.0, shifts=None):
    shifts = shifts or [1.0] * len(weights)
    cur = [TimeSampler("logit_normal", interval=(1e-3, 1.0), shift=s) for s in shifts]
    early = [TimeSampler("logit_normal", mu=mu, interval=(1e-3, 1.0), shift=s) for s in shifts]
    return DFMTimes(weights, cur, early, draw)


def test_stage_and_time_draws_have_their_laws():
    gen = torch.Generator().manual_seed(0)
    n = 20000
    stage, taus = _times([0.2, 0.3, 0.5], draw="sample")(n, generator=gen)
    freq = torch.bincount(stage, minlength=3).double() / n
    assert torch.allclose(freq, torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64), atol=4 * (0.25 / n) ** 0.5)
    index = torch.arange(3)
    assert torch.equal(taus[index > stage[:, None]], torch.zeros(int((index > stage[:, None]).sum())))
    early = torch.logit(taus[index < stage[:, None]].double())
    cur = torch.logit(taus[index == stage[:, None]].double())
    assert abs(float(early.mean()) - 2.0) < 0.05 and abs(float(early.std()) - 1.0) < 0.05  # logit-normal(2, 1)
    assert abs(float(cur.mean())) < 0.05 and abs(float(cur.std()) - 1.0) < 0.05  # the base: logit-normal(0, 1)
    batch, _ = _times([0.5, 0.5])(64, generator=gen)  # once per batch: one stage for every row
    assert len(set(batch.tolist())) == 1
    draws = {int(_times([0.5, 0.5])(4, generator=gen)[0][0]) for _ in range(40)}
    assert draws == {0, 1}
    assert stage_shifts(LaplacianPyramid(2, 256), 768) == pytest.approx([12 ** 0.5, 48 ** 0.5])
    assert stage_shifts(LaplacianPyramid(2, 16), 12) == [1.0, 1.0] and stage_shifts(LaplacianPyramid(2, 16), 12, 2) == [2.0, 2.0]


def test_loss_is_per_stage_means_and_masks():
    p = LaplacianPyramid(2, 16)
    pred = torch.randn(3, 20, 2, requires_grad=True)
    target = torch.randn(3, 20, 2)
    active = torch.tensor([[True, False], [True, True], [True, True]])
    loss = dfm_loss(pred, target, active, p)
    e = (pred - target).square()
    manual = e[:, :4].mean(dim=(1, 2)) + active[:, 1] * e[:, 4:].mean(dim=(1, 2))
    torch.testing.assert_close(loss, manual)
    loss.sum().backward()
    assert torch.equal(pred.grad[0, 4:], torch.zeros(16, 2)) and (pred.grad[0, :4] != 0).all()  # masked: no gradient


def test_one_stage_objective_is_flow_matching():
    p = LaplacianPyramid(1, 16)
    obj = StagewiseObjective(p, _times([1.0]), None, "bands")
    x0, x1, t = torch.randn(5, 16, 3), torch.randn(5, 16, 3), torch.rand(5)
    assert obj.draw(5, torch.Generator(), "cpu") == {} and not obj.needs_noise
    a, b = obj.prepare(x0, x1, t, None), VelocityObjective().prepare(x0, x1, t, None)
    assert all(torch.equal(a[k], b[k]) for k in ("x", "t", "u"))
    out = torch.randn(5, 16, 3)
    assert torch.equal(obj.loss(out, a)[0], VelocityObjective().loss(out, b)[0])


def test_objective_zeroes_later_stages_and_interpolates_each_stage():
    p = LaplacianPyramid(2, 16)
    obj = StagewiseObjective(p, _times([0.5, 0.5], draw="sample"), None, "bands")
    gen = torch.Generator().manual_seed(1)
    drawn = obj.draw(6, gen, "cpu")
    x0, x1, noise = torch.randn(6, 16, 2), torch.randn(6, 16, 2), torch.randn(6, 16, 2)
    batch = obj.prepare(x0, x1, torch.rand(6), None, noise, **drawn)
    eps = [noise[:, :4], x0]  # bands with N(0, I): fresh coarse normals, the source sample as the finest stage
    data = p.decompose(x1)
    for s in range(2):
        tau = drawn["taus"][:, s].reshape(-1, 1, 1)
        want = torch.where((drawn["stage"] >= s).reshape(-1, 1, 1), (1 - tau) * eps[s] + tau * data[s], 0.0)
        torch.testing.assert_close(p.unpack(batch["x"])[s], want)
        torch.testing.assert_close(p.unpack(batch["u"])[s], data[s] - eps[s])
    assert torch.equal(batch["active"][:, 1], drawn["stage"] == 1) and batch["active"][:, 0].all()


def test_sources_keep_each_modes_mean_and_variance_per_stage():
    p = LaplacianPyramid(2, 16)
    gen = torch.Generator().manual_seed(2)
    means = torch.randn(2, 16, 3, generator=gen)
    src = GaussianMixtureSource(torch.tensor([0.5, 0.5]), means, torch.tensor([0.25, 4.0]))
    n = 20000
    modes = torch.ones(n, dtype=torch.long)
    x0, _ = src.sample(n, generator=gen, modes=modes)
    mean, var = src.component(modes)
    normals = [torch.randn(n, 4, 3, generator=gen)]
    bands = source_stages("bands", p, x0, mean=mean, var=var, normals=normals)
    decomposed = source_stages("decompose", p, x0)
    mu = p.decompose(means[1:])
    for s in range(2):
        assert float((bands[s].mean(0) - mu[s][0]).abs().max()) < 4 * 2 / n ** 0.5  # the mode's mean, per stage
        assert float((bands[s].var(0) / 4.0 - 1).abs().max()) < 0.06  # its variance sigma_k^2, per stage
        assert float((decomposed[s].mean(0) - mu[s][0]).abs().max()) < 4 * 2 / n ** 0.5
    torch.testing.assert_close(p.recompose(decomposed), x0, rtol=0, atol=1e-5)  # tau = 0 gives the sample back
    # the decomposed coarse stage is the pooled noise: variance sigma_k^2 / 4 = 1, smaller than the fine stage's
    assert abs(float(decomposed[0].var(0).mean()) / (4.0 / 4) - 1) < 0.06


def _gaussian_velocity(p, sigma_x):
    """Exact stage velocities on Gaussian data ``x ~ N(0, Sigma)`` with independent N(0, I) stage noise:
    ``v = C_vy C_yy^-1 y``, ``C_yy = T S T + (I - T)^2``, ``C_vy = S T - (I - T)`` with ``S = A Sigma A^T``."""
    a = p.matrix()
    s_x = a @ sigma_x @ a.T
    sizes = torch.tensor(p.sizes)

    def v(x, taus):
        tau = taus[0].double().repeat_interleave(sizes)
        t, i = torch.diag(tau), torch.eye(len(tau), dtype=torch.float64)
        c_yy = t @ s_x @ t + (i - t) @ (i - t)
        c_vy = s_x @ t - (i - t)
        m = c_vy @ torch.linalg.inv(c_yy)
        return (x[..., 0].double() @ m.T).unsqueeze(-1).float()

    return v


def test_stagewise_sampler_reaches_the_data_covariance():
    """Spec T4 through ``solve_dfm``: the sampler is linear in its start, so the start basis (identity) gives the map;
    the recomposed covariance tends to Sigma as the steps grow (Euler: error ~ 1 / steps)."""
    p = LaplacianPyramid(2, 16)
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 16, generator=gen, dtype=torch.float64)
    sigma_x = w @ w.T / 16 + 0.1 * torch.eye(16, dtype=torch.float64)
    v = _gaussian_velocity(p, sigma_x)
    basis = p.unpack(torch.eye(20).unsqueeze(-1))
    errors = []
    for steps in ([20, 5], [80, 20], [320, 80]):
        res = solve_dfm(v, basis, dfm_schedule(steps, [0.9]), p)
        assert res.nfe == sum(steps)
        phi = res.x[..., 0].double().T  # (16, 20): start -> sample
        errors.append(float(torch.linalg.matrix_norm(phi @ phi.T - sigma_x) / torch.linalg.matrix_norm(sigma_x)))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.03, errors
    assert errors[1] / errors[2] > 3, errors  # first order
