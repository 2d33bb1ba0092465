import math

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.mixture import GaussianMixture

from mmfm.flow import GaussianMixtureSource, GaussianSource


def expected(p, n):
    """Expected counts for a chi-square test (normalized in float64 so they sum to n exactly)."""
    p = p.double().numpy()
    return p / p.sum() * n


def random_mixture(k=4, event=(3,), covariance="diag", dtype=torch.float64, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(k, generator=g, dtype=dtype) + 0.2
    w = w / w.sum()
    means = 3 * torch.randn(k, *event, generator=g, dtype=dtype) + offset
    var_shape = (k,) if covariance == "spherical" else (k, *event)
    var = 0.2 + torch.rand(var_shape, generator=g, dtype=dtype)
    return GaussianMixtureSource(w, means, var)


def sklearn_twin(src: GaussianMixtureSource) -> GaussianMixture:
    """An sklearn GaussianMixture holding exactly our parameters (flattened event)."""
    k = src.num_modes
    gm = GaussianMixture(k, covariance_type=src.covariance)
    gm.weights_ = src.weights.double().numpy()
    gm.means_ = src.means.reshape(k, -1).double().numpy()
    var = src.variances.reshape(k, -1).double().numpy()
    gm.covariances_ = var[:, 0] if src.covariance == "spherical" else var
    gm.precisions_cholesky_ = 1 / np.sqrt(gm.covariances_)
    return gm


def test_gaussian_source_statistics_and_density():
    src = GaussianSource((4, 2))
    x, modes = src.sample(100_000, generator=torch.Generator().manual_seed(0))
    assert modes is None and x.shape == (100_000, 4, 2) and x.dtype == torch.float32
    assert float(x.mean().abs()) < 0.01 and float(x.var()) == pytest.approx(1.0, abs=0.01)
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(x[:10].double()).sum((1, 2))
    assert torch.allclose(src.log_prob(x[:10].double()), ref)
    with pytest.raises(ValueError, match="modes"):
        src.sample(2, modes=torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("covariance", ["spherical", "diag"])
@pytest.mark.parametrize("event", [(3,), (4, 2)])
def test_mixture_sampling_statistics(covariance, event):
    src = random_mixture(k=3, event=event, covariance=covariance, dtype=torch.float32)
    n = 300_000
    x, modes = src.sample(n, generator=torch.Generator().manual_seed(1))
    assert x.shape == (n, *event) and x.dtype == torch.float32 and modes.shape == (n,)
    counts = torch.bincount(modes, minlength=3).numpy()
    assert stats.chisquare(counts, expected(src.weights, n)).pvalue > 1e-3
    for k in range(3):
        xs = x[modes == k].double()
        var = src.variances[k] if covariance == "diag" else src.variances[k].expand(event)
        se = (var / len(xs)).sqrt()
        assert bool(((xs.mean(0) - src.means[k]).abs() < 5 * se).all())
        assert torch.allclose(xs.var(0), var.double(), rtol=0.03)


def test_given_modes_are_used_and_sampling_is_reproducible():
    src = random_mixture(k=5)
    modes = torch.tensor([4, 4, 0, 2])
    x, m = src.sample(4, modes=modes, generator=torch.Generator().manual_seed(2))
    assert torch.equal(m, modes)
    x2, _ = src.sample(4, modes=modes, generator=torch.Generator().manual_seed(2))
    assert torch.equal(x, x2)
    far = random_mixture(k=2, covariance="spherical")
    far = GaussianMixtureSource(far.weights, torch.tensor([[100.0] * 3, [-100.0] * 3], dtype=torch.float64),
                                far.variances)
    xs, _ = far.sample(6, modes=torch.tensor([0, 1, 0, 1, 0, 1]))
    assert bool((xs[::2] > 50).all()) and bool((xs[1::2] < -50).all())


@pytest.mark.parametrize("covariance", ["spherical", "diag"])
def test_posterior_and_density_equal_sklearn_in_float64(covariance):
    src = random_mixture(k=6, event=(5, 2), covariance=covariance)
    x = src.sample(2000, generator=torch.Generator().manual_seed(3))[0].double()
    gm = sklearn_twin(src)
    flat = x.reshape(len(x), -1).numpy()
    assert np.abs(src.posterior(x).numpy() - gm.predict_proba(flat)).max() < 1e-5
    assert np.allclose(src.log_prob(x).numpy(), gm.score_samples(flat), rtol=1e-10, atol=1e-9)
    assert torch.equal(src.assign(x, soft=False), torch.from_numpy(gm.predict(flat)))


def test_log_joint_equals_the_direct_difference_form():
    src = random_mixture(k=3, event=(4,), covariance="diag")
    x = torch.randn(7, 4, dtype=torch.float64)
    diff = x[:, None, :] - src.means[None]
    direct = (src.weights.log() - 0.5 * (4 * math.log(2 * math.pi) + src.variances.log().sum(1))
              - 0.5 * (diff**2 / src.variances[None]).sum(2))
    assert torch.allclose(src.log_joint(x), direct, atol=1e-10)


def test_float32_posterior_is_accurate_far_from_the_origin():
    # CLS tokens are not centred; the GEMM expansion must not cancel catastrophically in float32
    src = random_mixture(k=16, event=(64,), covariance="diag", offset=200.0, seed=4)
    x = src.sample(512, generator=torch.Generator().manual_seed(4))[0]
    ref = src.posterior(x.double())
    got = src.to(dtype=torch.float32).posterior(x.float())
    assert got.dtype == torch.float32
    assert float((got.double() - ref).abs().max()) < 1e-3


def test_posterior_never_materializes_batch_by_modes_by_dim():
    # B x K x D = 1024 x 8192 x 2048 floats would be 69 GB; the matrix-product form needs ~0.2 GB
    k, d, b = 8192, 2048, 1024
    g = torch.Generator().manual_seed(0)
    src = GaussianMixtureSource(torch.full((k,), 1.0 / k), torch.randn(k, d, generator=g),
                                0.5 + torch.rand(k, d, generator=g))
    post = src.posterior(torch.randn(b, d, generator=g))
    assert post.shape == (b, k)
    assert torch.allclose(post.sum(1), torch.ones(b), atol=1e-4)


def test_soft_assignment_samples_the_posterior():
    src = GaussianMixtureSource(torch.tensor([0.5, 0.5], dtype=torch.float64),
                                torch.tensor([[0.0], [1.0]], dtype=torch.float64),
                                torch.tensor([1.0, 1.0], dtype=torch.float64))
    x = torch.full((100_000, 1), 0.3, dtype=torch.float64)
    r = src.posterior(x[:1])[0]
    modes = src.assign(x, soft=True, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(modes, minlength=2).numpy()
    assert stats.chisquare(counts, expected(r, len(x))).pvalue > 1e-3


def test_soft_assignment_over_many_modes_follows_each_rows_posterior():
    src = random_mixture(k=6, event=(2,), seed=4)
    x = torch.tensor([[0.5, -1.0]], dtype=torch.float64).expand(60_000, 2)
    modes = src.assign(x, soft=True, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(modes, minlength=6).numpy()
    assert stats.chisquare(counts, expected(src.posterior(x[:1])[0], len(x))).pvalue > 1e-3


@pytest.mark.parametrize("make", [lambda: GaussianSource((3, 2)), lambda: random_mixture(k=5, event=(3, 2))])
def test_shares_of_a_draw_are_the_rows_of_one_global_draw(make):
    """``share=(i, m)``: the m ranks' parts, stacked, are the draw of one process for m * n rows (noise,
    modes from the weights, and posterior assignments)."""
    src, n, m = make(), 4, 3

    def draw(share, rows):
        g = torch.Generator().manual_seed(7)
        x0, modes = src.sample(rows, generator=g, share=share)
        return x0, modes

    whole, whole_modes = draw(None, n * m)
    parts = [draw((i, m), n) for i in range(m)]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole)
    if whole_modes is not None:
        assert torch.equal(torch.cat([p[1] for p in parts]), whole_modes)
        x = torch.randn(n * m, 3, 2, dtype=torch.float64)
        full = src.assign(x, generator=torch.Generator().manual_seed(2))
        split = [src.assign(x[i * n:(i + 1) * n], generator=torch.Generator().manual_seed(2), share=(i, m))
                 for i in range(m)]
        assert torch.equal(torch.cat(split), full)
    with pytest.raises(ValueError, match="share"):
        src.sample(2, share=(3, 3))


@pytest.mark.parametrize("kwargs, name", [
    (dict(weights=torch.tensor([0.5, 0.6])), "weights"),
    (dict(weights=torch.tensor([1.5, -0.5])), "weights"),
    (dict(means=torch.zeros(3, 2)), "means"),
    (dict(variances=torch.tensor([1.0, -1.0])), "variances"),
    (dict(variances=torch.ones(2, 3)), "variances"),
    (dict(means=torch.tensor([[0.0, float("nan")], [1.0, 1.0]])), "means"),
    (dict(variances=torch.tensor([1.0, float("inf")])), "variances"),
])
def test_bad_mixture_parameters_name_the_argument(kwargs, name):
    args = dict(weights=torch.tensor([0.5, 0.5]), means=torch.zeros(2, 2), variances=torch.ones(2))
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        GaussianMixtureSource(**args)


def test_bad_inputs_to_a_mixture():
    src = random_mixture(k=3, event=(4,))
    with pytest.raises(ValueError, match="x:"):
        src.posterior(torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="modes"):
        src.sample(2, modes=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="modes"):
        src.sample(2, modes=torch.tensor([0]))
    with pytest.raises(ValueError, match="x:"):
        src.log_prob(torch.full((2, 4), float("nan"), dtype=torch.float64))
