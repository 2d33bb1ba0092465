import pytest
import torch

from mmfm.flow import LinearPath, RAEConvention, solve_ode, time_grid
from mmfm.flow.time import rae_time_grid


def test_interpolant_endpoints_and_velocity():
    path = LinearPath()
    x0, x1 = torch.randn(5, 3, 4), torch.randn(5, 3, 4)
    assert torch.equal(path.interpolate(x0, x1, torch.zeros(5)), x0)
    assert torch.equal(path.interpolate(x0, x1, torch.ones(5)), x1)
    t = torch.rand(5, dtype=torch.float64)
    h = 1e-6
    xt, u = path.sample(x0.double(), x1.double(), t)
    finite_diff = (path.interpolate(x0.double(), x1.double(), t + h) - xt) / h
    assert torch.allclose(finite_diff, u, atol=1e-6)
    assert torch.equal(u, x1.double() - x0.double())


def test_path_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="x0 and x1"):
        LinearPath.interpolate(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="t:"):
        LinearPath.interpolate(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3))


class RAEGaussianField(torch.nn.Module):
    """The exact velocity of RAE's path x_t = (1 - t) x1 + t x0 between x0 ~ N(0, I) and x1 ~ N(m, s^2 I),
    in RAE's convention (t = 0 data, target x0 - x1): what a perfectly trained released model computes."""

    def __init__(self, m, s):
        super().__init__()
        self.m, self.s = m, s

    def forward(self, x, t_rae):
        t = t_rae[:, None]
        mean = (1 - t) * self.m
        var = (1 - t) ** 2 * self.s**2 + t**2
        cov = t - (1 - t) * self.s**2  # Cov(x0 - x1, x_t)
        return -self.m + cov / var * (x - mean)


def test_rae_adapter_runs_a_rae_convention_model_in_the_paper_convention():
    m, s = torch.tensor([2.0, -1.0], dtype=torch.float64), 0.5
    net = RAEGaussianField(m, s)
    x0 = torch.randn(64, 2, dtype=torch.float64)
    # RAE samples by integrating its own field from t_rae = 1 to t_rae ~ 0 on its grid
    rae_grid = 1 - rae_time_grid()
    ref = solve_ode(net, x0, rae_grid, "heun").x
    ours = solve_ode(RAEConvention(net), x0, rae_time_grid(), "heun").x
    assert torch.allclose(ours, ref, atol=1e-12)
    # and the exact transport of N(0, I) to N(m, s^2 I) is x -> m + s x
    exact = solve_ode(RAEConvention(net), x0, time_grid(400), "heun").x
    assert torch.allclose(exact, m + s * x0, atol=1e-4)


def test_rae_adapter_flips_time_and_sign():
    net = lambda x, t, **kw: x * t[:, None] + kw["y"][:, None]  # noqa: E731
    x, t, y = torch.randn(3, 2), torch.tensor([0.0, 0.3, 1.0]), torch.tensor([1.0, 2.0, 3.0])
    assert torch.allclose(RAEConvention(net)(x, t, y=y), -(x * (1 - t)[:, None] + y[:, None]))
