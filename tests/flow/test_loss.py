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
