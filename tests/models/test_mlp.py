import pytest
import torch

from mmfm.models import VelocityMLP


def test_mlp_shapes_and_time_dependence():
    model = VelocityMLP(10, hidden=32, depth=2)
    x = torch.randn(5, 10)
    a, b = model(x, torch.zeros(5)), model(x, torch.full((5,), 0.5))
    assert a.shape == (5, 10) and not torch.allclose(a, b)


def test_mlp_bad_input():
    with pytest.raises(ValueError, match="dim"):
        VelocityMLP(0)
    with pytest.raises(ValueError, match="x:"):
        VelocityMLP(10)(torch.randn(5, 9), torch.zeros(5))
    with pytest.raises(ValueError, match="t:"):
        VelocityMLP(10)(torch.randn(5, 10), torch.zeros(4))
