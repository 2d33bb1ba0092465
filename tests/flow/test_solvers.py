import math

import pytest
import torch

from mmfm.flow import solve_ode, time_grid

M0, S0 = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64), torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
M1, S1 = torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64), torch.tensor([0.3, 1.5, 1.0], dtype=torch.float64)


def gaussian_velocity(x, t):
    """Exact marginal velocity of the linear path between independent N(m0, s0^2) and N(m1, s1^2):
    v = (m1 - m0) + (t s1^2 - (1 - t) s0^2) / ((1 - t)^2 s0^2 + t^2 s1^2) (x - m_t)."""
    t = t[:, None]
    mean = (1 - t) * M0 + t * M1
    var = (1 - t) ** 2 * S0**2 + t**2 * S1**2
    return (M1 - M0) + (t * S1**2 - (1 - t) * S0**2) / var * (x - mean)


def exact_map(x0):
    return M1 + S1 / S0 * (x0 - M0)


@pytest.fixture
def x0():
    return M0 + S0 * torch.randn(256, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method, order", [("euler", 1), ("heun", 2), ("midpoint", 2)])
def test_fixed_step_error_shrinks_at_the_expected_order(x0, method, order):
    errors = [float((solve_ode(gaussian_velocity, x0, time_grid(n), method).x - exact_map(x0)).abs().max())
              for n in (40, 80, 160)]
    for coarse, fine in zip(errors, errors[1:]):  # midpoint superconverges on this linear field
        assert math.log2(coarse / fine) >= order - 0.15


@pytest.mark.parametrize("method, order", [("euler", 1), ("heun", 2), ("midpoint", 2)])
def test_nominal_order_on_a_nonlinear_field(method, order):
    # dx/dt = x^2 from x0: x(t) = x0 / (1 - x0 t)
    x0 = torch.tensor([[0.5], [-1.0], [0.2]], dtype=torch.float64)
    exact = x0 / (1 - x0)
    errors = [float((solve_ode(lambda x, t: x * x, x0, time_grid(n), method).x - exact).abs().max())
              for n in (50, 100, 200)]
    for coarse, fine in zip(errors, errors[1:]):
        assert math.log2(coarse / fine) == pytest.approx(order, abs=0.1)


def test_dopri5_matches_the_exact_flow(x0):
    out = solve_ode(gaussian_velocity, x0, time_grid(1), "dopri5", atol=1e-8, rtol=1e-8)
    assert float((out.x - exact_map(x0)).abs().max()) < 1e-4
    assert out.nfe > 0


def test_trajectory_and_nfe(x0):
    grid = time_grid(10)
    for method, per_step in (("euler", 1), ("heun", 2), ("midpoint", 2)):
        out = solve_ode(gaussian_velocity, x0, grid, method, trajectory=True)
        assert out.trajectory.shape == (11, 256, 3)
        assert torch.equal(out.trajectory[0], x0) and torch.equal(out.trajectory[-1], out.x)
        assert out.nfe == 10 * per_step
    out = solve_ode(gaussian_velocity, x0, grid, "dopri5", trajectory=True)
    assert out.trajectory.shape == (11, 256, 3)
    assert torch.allclose(out.trajectory[-1], exact_map(x0), atol=1e-3)


def test_path_length_of_a_rotation_is_the_arc_length():
    # dx/dt = omega J x moves on a circle of radius r: length = omega r T exactly
    omega, radius = 2.0, torch.tensor([1.0, 2.5], dtype=torch.float64)
    x0 = torch.stack([radius, torch.zeros(2, dtype=torch.float64)], 1)
    rot = lambda x, t: omega * torch.stack([-x[:, 1], x[:, 0]], 1)  # noqa: E731
    exact = omega * radius
    for method, tol in (("midpoint", 1e-4), ("heun", 1e-4), ("dopri5", 1e-6)):
        out = solve_ode(rot, x0, time_grid(400), method, path_length=True, atol=1e-9, rtol=1e-9)
        assert torch.allclose(out.path_length.double(), exact, rtol=tol)
    # Euler's polygon spirals out: step j has length h omega r q^j with q = sqrt(1 + (omega h)^2)
    n, h = 100, 0.01
    q = math.sqrt(1 + (omega * h) ** 2)
    euler = solve_ode(rot, x0, time_grid(n), "euler", path_length=True)
    assert torch.allclose(euler.path_length.double(), h * omega * radius * (q**n - 1) / (q - 1), rtol=1e-5)


def test_state_keeps_x0_dtype_even_if_the_model_returns_bf16():
    out = solve_ode(lambda x, t: x.bfloat16(), torch.ones(2, 3), time_grid(4), "heun")
    assert out.x.dtype == torch.float32


def test_solver_rejects_bad_input(x0):
    with pytest.raises(ValueError, match="method"):
        solve_ode(gaussian_velocity, x0, time_grid(4), "rk45")
    with pytest.raises(ValueError, match="grid"):
        solve_ode(gaussian_velocity, x0, torch.tensor([0.0, 0.5, 0.3], dtype=torch.float64))
    with pytest.raises(ValueError, match="grid"):
        solve_ode(gaussian_velocity, x0, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="velocity"):
        solve_ode(lambda x, t: x[:, :2], x0, time_grid(2))
    with pytest.raises(ValueError, match="x0"):
        solve_ode(gaussian_velocity, torch.full((2, 3), float("nan")), time_grid(2))
