import math

import numpy as np
import pytest
import torch
from scipy import stats

from mmfm.flow.time import (
    TimeSampler,
    rae_time_grid,
    shift_factor,
    shift_time,
    shift_time_rae,
    time_grid,
)

S48 = math.sqrt(48)


def test_shift_factor_is_sqrt_of_dimension_ratio():
    assert shift_factor(768 * 16 * 16) == pytest.approx(S48, rel=1e-15)
    assert shift_factor(4096) == 1.0


@pytest.mark.parametrize("t, expected", [(0.1, 0.435), (0.25, 0.698), (0.5, 0.87387), (0.75, 0.954),
                                         (0.9, 0.984), (0.999, 0.99986)])
def test_shift_values_in_rae_convention(t, expected):
    # docs/method.md §2.3 / §8: 0.5 -> 0.87387 for s = sqrt(48), and the other tabulated values
    got = float(shift_time_rae(torch.tensor(t, dtype=torch.float64), S48))
    assert got == pytest.approx(expected, abs=10 ** -(len(str(expected)) - 2) / 2)


def test_shift_in_paper_convention_is_the_mirrored_rae_shift():
    tau = torch.linspace(0, 1, 1001, dtype=torch.float64)
    for s in (1.0, 2.5, S48):
        assert torch.allclose(shift_time(tau, s), 1 - shift_time_rae(1 - tau, s), atol=1e-15)
    assert float(shift_time(torch.tensor(0.0), S48)) == 0.0 and float(shift_time(torch.tensor(1.0), S48)) == 1.0
    assert torch.equal(shift_time(tau, 1.0), tau)


def test_rae_grid_reproduces_the_release():
    grid = rae_time_grid()
    assert grid.shape == (50,)  # 50 points = 49 Euler steps
    rae = 1 - grid  # back to RAE's time
    assert rae[:3].tolist() == pytest.approx([1.0, 0.99701, 0.99390], abs=5e-6)
    assert float(rae[-1]) == pytest.approx(0.006887, abs=5e-7)
    # the release: t = 1 - torch.linspace(0, 0.999, 50) (float32), then t' = s t / (1 + (s - 1) t)
    t = 1 - torch.linspace(0, 0.999, 50)
    release = S48 * t / (1 + (S48 - 1) * t)
    assert torch.allclose(rae.float(), release, atol=2e-7)
    steps = torch.diff(grid)
    assert float(steps[0]) == pytest.approx(0.003, abs=2e-4) and float(steps[-1]) == pytest.approx(0.125, abs=1e-3)


def test_time_grid_endpoints_and_monotone():
    g = time_grid(10, shift=3.0)
    assert g.shape == (11,) and float(g[0]) == 0.0 and float(g[-1]) == 1.0
    assert bool((torch.diff(g) > 0).all())
    assert torch.allclose(time_grid(4), torch.tensor([0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))


def test_rae_sampler_quantiles_match_method_md():
    # docs/method.md §2.3: shifted logit-normal quantiles in RAE's convention 5/25/50/75/95 %
    # -> 0.572, 0.779, 0.874, 0.932, 0.973; ours is the mirror image
    sampler = TimeSampler.rae(768 * 256)
    q = sampler.quantile(torch.tensor([0.95, 0.75, 0.5, 0.25, 0.05]))
    assert (1 - q).tolist() == pytest.approx([0.572, 0.779, 0.874, 0.932, 0.973], abs=6e-4)


@pytest.mark.parametrize("sampler", [
    TimeSampler.rae(768 * 256),
    TimeSampler("logit_normal", mu=0.7, sigma=1.3, interval=(0.05, 0.9), shift=2.0),
    TimeSampler("uniform", interval=(0.1, 0.6), shift=1.0),
])
def test_samples_follow_the_closed_form_quantiles(sampler):
    g = torch.Generator().manual_seed(1)
    t = sampler(200_000, generator=g)
    assert t.dtype == torch.float32
    probs = torch.tensor([0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99])
    emp = torch.quantile(t.double(), probs.double())
    assert torch.allclose(emp, sampler.quantile(probs), atol=4e-3)
    lo, hi = sampler.interval
    assert float(t.min()) >= float(shift_time(torch.tensor(lo), sampler.shift)) - 1e-7
    assert float(t.max()) <= float(shift_time(torch.tensor(hi), sampler.shift)) + 1e-7


def test_inverse_cdf_equals_rejection_sampling_of_the_truncated_logit_normal():
    sampler = TimeSampler("logit_normal", mu=-0.4, sigma=0.8, interval=(0.2, 0.95), shift=1.0)
    ours = sampler(20_000, generator=torch.Generator().manual_seed(3)).numpy()
    rng = np.random.default_rng(3)
    z = 1 / (1 + np.exp(-rng.normal(-0.4, 0.8, 200_000)))
    rejected = z[(z >= 0.2) & (z <= 0.95)][:20_000]
    assert stats.ks_2samp(ours, rejected).pvalue > 1e-3


def test_samples_are_reproducible_from_the_generator():
    s = TimeSampler.rae(4096 * 4)
    a = s(100, generator=torch.Generator().manual_seed(5))
    b = s(100, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, name", [
    (dict(kind="beta"), "kind"), (dict(sigma=0.0), "sigma"), (dict(interval=(0.5, 0.2)), "interval"),
    (dict(shift=-1.0), "shift"), (dict(mu=float("nan")), "mu"),
])
def test_bad_sampler_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TimeSampler(**kwargs)


def test_bad_grid_and_dim_arguments():
    with pytest.raises(ValueError, match="steps"):
        time_grid(0)
    with pytest.raises(ValueError, match="end"):
        time_grid(4, end=1.5)
    with pytest.raises(ValueError, match="dim"):
        shift_factor(0)
    with pytest.raises(ValueError, match="n:"):
        TimeSampler()(-1)
