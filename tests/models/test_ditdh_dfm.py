"""The DFM DiTDH (spec T5): one stage is the DiTDH (same parameters, same output, bit for bit); more stages add the
coarse stages' embedders, time embedders and output layers only; each stage's output is its own layer's, pooled to
its grid; a masked stage's output layer gets no gradient; bad combinations are refused naming ``dfm_stages``."""

import pytest
import torch

from mmfm.flow.dfm import dfm_loss
from mmfm.models.ditdh import build_ditdh, count_parameters


def _net(stages, **kw):
    torch.manual_seed(0)
    return build_ditdh("ditdh-tiny", in_channels=6, num_tokens=16, dfm_stages=stages, **kw)


def test_one_stage_is_the_ditdh():
    torch.manual_seed(0)
    base = build_ditdh("ditdh-tiny", in_channels=6, num_tokens=16, conditioning="mode", num_classes=3)
    one = _net(1, conditioning="mode", num_classes=3)
    assert base.state_dict().keys() == one.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), one.state_dict().values()))
    x, t, y = torch.randn(4, 16, 6), torch.rand(4), torch.tensor([0, 2, 1, 0])
    assert torch.equal(base(x, t, y=y), one(x, t, y=y))


def test_stages_add_their_own_modules_and_outputs():
    two, one = _net(2), _net(1)
    extra = set(two.state_dict()) - set(one.state_dict())
    assert extra and all(k.startswith(("dfm_s_embedders.0.", "dfm_x_embedders.0.", "dfm_t_embedders.0.",
                                       "dfm_final_layers.0.")) for k in extra)
    assert count_parameters(two) > count_parameters(one)
    for p in two.parameters():  # the zero-initialized output layers would hide everything
        p.data.normal_(0, 0.2)
    x, t = torch.randn(3, 20, 6), torch.rand(3, 2)
    out = two(x, t)
    assert out.shape == (3, 20, 6)
    with pytest.raises(ValueError, match="x: expected"):
        two(torch.randn(3, 16, 6), t)
    with pytest.raises(ValueError, match="t: expected"):
        two(x, torch.rand(3))
    # the coarse stage's output is made by its own output layer only
    out[:, :4].sum().backward()
    assert two.final_layer.linear.weight.grad.abs().max() == 0  # the fine layer did not make the coarse output
    two.zero_grad()
    loss = dfm_loss(two(x, t), torch.randn(3, 20, 6), torch.tensor([[True, False]] * 3), two.pyramid)
    loss.mean().backward()
    assert two.final_layer.linear.weight.grad.abs().max() == 0  # a masked stage: no gradient into its layer
    assert two.dfm_final_layers[0].linear.weight.grad.abs().max() > 0


def test_refused_combinations():
    for kw in (dict(head="gm", gm_groups=2), dict(dmf_depth=1), dict(patch_size=2)):
        with pytest.raises(ValueError, match="dfm_stages: a DFM network has the velocity head"):
            _net(2, **kw)
    with pytest.raises(ValueError, match="dfm_stages: 4 stages need a grid side divisible by 2"):
        _net(4)
