import pytest
import torch

from mmfm.flow import Autoguidance, ClassifierFreeGuidance, solve_ode, time_grid
from mmfm.models import build_ditdh


def tiny(conditioning="mode", num_classes=5, seed=0, **kw):
    torch.manual_seed(seed)
    m = build_ditdh("ditdh-tiny", in_channels=6, num_tokens=16, conditioning=conditioning,
                    num_classes=num_classes, **kw)
    for p in m.parameters():  # leave the zero-initialized output layers: give every weight a value
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    return m.eval()


class Recorder(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x, t, **cond):
        self.seen.append(cond)
        return self.net(x, t, **cond)


def test_autoguidance_formula_interval_and_w1():
    main, guide = tiny(seed=1), tiny(seed=2)
    x, t, y = torch.randn(4, 16, 6), torch.tensor([0.1, 0.4, 0.6, 0.95]), torch.tensor([0, 1, 4, 2])
    v_m, v_g = main(x, t, y=y), guide(x, t, y=y)
    assert not torch.allclose(v_m, v_g)
    assert torch.equal(Autoguidance(main, guide, 1.0)(x, t, y=y), v_m)  # w = 1 is exactly the main model
    assert torch.allclose(Autoguidance(main, guide, 0.0)(x, t, y=y), v_g)
    assert torch.allclose(Autoguidance(main, guide, 1.5)(x, t, y=y), v_g + 1.5 * (v_m - v_g), atol=1e-6)
    inside = Autoguidance(main, guide, 1.5, interval=(0.3, 0.7))(x, t, y=y)
    assert torch.equal(inside[[0, 3]], v_m[[0, 3]])
    assert torch.allclose(inside[[1, 2]], (v_g + 1.5 * (v_m - v_g))[[1, 2]], atol=1e-6)


def test_autoguidance_passes_the_same_mode_to_main_and_guide():
    main, guide = Recorder(tiny(seed=1)), Recorder(tiny(seed=2))
    y = torch.tensor([3, 1])
    ag = Autoguidance(main, guide, 1.5)
    solve_ode(lambda x, t: ag(x, t, y=y), torch.randn(2, 16, 6), time_grid(3), "euler")
    assert len(main.seen) == len(guide.seen) == 3
    assert all(torch.equal(c["y"], y) for c in main.seen + guide.seen)


def test_classifier_free_guidance_equals_separate_calls():
    model = tiny("class", num_classes=7, class_dropout_prob=0.1)
    assert model.null_label == 7
    x, t, y = torch.randn(3, 16, 6), torch.tensor([0.2, 0.5, 0.9]), torch.tensor([1, 6, 0])
    v_c, v_u = model(x, t, y=y), model(x, t, y=torch.full_like(y, 7))
    cfg = ClassifierFreeGuidance(model, 2.0, null_label=model.null_label)
    assert torch.allclose(cfg(x, t, y), v_u + 2.0 * (v_c - v_u), atol=1e-5)
    assert torch.allclose(ClassifierFreeGuidance(model, 1.0, 7)(x, t, y), v_c, atol=1e-6)
    out = ClassifierFreeGuidance(model, 2.0, 7, interval=(0.0, 0.3))(x, t, y)
    assert torch.allclose(out[1:], v_c[1:], atol=1e-6)


def test_guidance_rejects_bad_arguments():
    m = tiny()
    with pytest.raises(ValueError, match="interval"):
        Autoguidance(m, m, 1.5, interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="null_label"):
        ClassifierFreeGuidance(m, 1.5, null_label=-1)
    with pytest.raises(ValueError, match="y"):
        ClassifierFreeGuidance(m, 1.5, null_label=5)(torch.randn(2, 16, 6), torch.rand(2), torch.tensor([1]))
