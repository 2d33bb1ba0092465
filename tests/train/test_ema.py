import pytest
import torch
import torch.distributed as dist
from torch import nn

from mmfm.train.ema import EMA, unwrap
from mmfm.train.schedule import EMASchedule


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.norm = nn.BatchNorm1d(2)
        self.frozen = nn.Parameter(torch.randn(4), requires_grad=False)  # like DiTDH's pos-embed (pitfall 19)

    def forward(self, x):
        return self.norm(self.lin(x)) + self.frozen.sum()


def set_params(model, fill):
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(fill(i, p))


def test_starts_as_an_fp32_copy_with_the_model_names():
    model = Tiny().double()
    ema = EMA(model)
    sd = model.state_dict()
    assert list(ema.state_dict()) == list(sd)
    assert set(ema.averaged) == {"lin.weight", "lin.bias", "norm.weight", "norm.bias", "frozen"}
    assert set(ema.copied) == {"norm.running_mean", "norm.running_var", "norm.num_batches_tracked"}
    for name in ema.averaged:
        assert ema.shadow[name].dtype == torch.float32
        assert torch.equal(ema.shadow[name], sd[name].float())
    assert ema.shadow["norm.num_batches_tracked"].dtype == torch.int64


def test_constant_parameters_give_the_closed_form():
    """ema_k = d^k ema_0 + (1 - d^k) p for fixed parameters p."""
    model = Tiny()
    ema = EMA(model, decay=0.9)
    ema0 = {n: ema.shadow[n].double().clone() for n in ema.averaged}
    set_params(model, lambda i, p: torch.full_like(p, 1.5 + i))
    for step in range(7):
        assert ema.update(model, step) == 0.9
    sd = model.state_dict()
    for n in ema.averaged:
        closed = 0.9**7 * ema0[n] + (1 - 0.9**7) * sd[n].double()
        torch.testing.assert_close(ema.shadow[n].double(), closed, rtol=0, atol=1e-6)


def test_a_scheduled_decay_gives_the_product_formula():
    """With d_s from the schedule: ema_k = (prod d_s) ema_0 + (1 - prod d_s) p."""
    model = Tiny()
    ema = EMA(model, EMASchedule(decay=0.5, initial_decay=0.9, initial_steps=3))
    ema0 = {n: ema.shadow[n].double().clone() for n in ema.averaged}
    set_params(model, lambda i, p: torch.full_like(p, -2.0 + i))
    decays = [ema.update(model, step) for step in range(6)]
    assert decays == [0.9, 0.9, 0.9, 0.5, 0.5, 0.5]
    prod = 0.729 * 0.125
    sd = model.state_dict()
    for n in ema.averaged:
        torch.testing.assert_close(ema.shadow[n].double(), prod * ema0[n] + (1 - prod) * sd[n].double(),
                                   rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="depends on the step"):
        ema.update(model)


def test_one_update_is_bit_for_bit_the_release_per_tensor_update():
    model = nn.Sequential(nn.Linear(64, 300), nn.Linear(300, 7))   # enough elements to hit vectorized paths
    ema = EMA(model, decay=0.9995)
    release = {n: t.clone() for n, t in ema.shadow.items()}
    for _ in range(3):
        set_params(model, lambda i, p: torch.randn_like(p))
        ema.update(model)
        for n, p in model.named_parameters():   # the release's update_ema
            release[n].mul_(0.9995).add_(p.data, alpha=1 - 0.9995)
    for n in ema.averaged:
        assert torch.equal(ema.shadow[n], release[n])
    # decay 0 copies, decay 1 keeps: exactly
    model = Tiny()
    ema_copy, ema_keep = EMA(Tiny(), 0.0), EMA(model, 1.0)
    kept = {n: t.clone() for n, t in ema_keep.shadow.items()}
    set_params(model, lambda i, p: torch.randn_like(p))
    ema_copy.update(model)
    ema_keep.update(model)
    for n in ema_copy.averaged:
        assert torch.equal(ema_copy.shadow[n], model.state_dict()[n])
        assert torch.equal(ema_keep.shadow[n], kept[n])


def test_buffers_are_copied_not_averaged():
    model = Tiny()
    ema = EMA(model, decay=0.9)
    model.train()
    model(torch.randn(16, 3) * 5 + 3)   # moves the running statistics
    ema.update(model, 0)
    sd = model.state_dict()
    for n in ema.copied:
        assert torch.equal(ema.shadow[n], sd[n])
    assert ema.shadow["norm.num_batches_tracked"].item() == 1


def test_copy_to_and_state_dict_round_trip():
    model = Tiny()
    ema = EMA(model, decay=0.5)
    set_params(model, lambda i, p: torch.randn_like(p))
    ema.update(model)
    target = Tiny()
    ema.copy_to(target)
    for n, t in ema.state_dict().items():
        assert torch.equal(target.state_dict()[n].to(t.dtype), t)
    other = EMA(Tiny())
    other.load_state_dict({n: t.clone() for n, t in ema.state_dict().items()})
    for n, t in ema.state_dict().items():
        assert torch.equal(other.shadow[n], t)
    bad = {n: t.clone() for n, t in ema.state_dict().items()}
    bad["lin.weight"] = torch.zeros(5, 3)
    with pytest.raises(ValueError, match=r"'lin.weight' has shape \(5, 3\), the EMA \(2, 3\)"):
        other.load_state_dict(bad)
    del bad["lin.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['lin.bias'\]"):
        other.load_state_dict(bad)


def test_ddp_and_compile_wrappers_are_removed(tmp_path):
    model = Tiny()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        for wrapped in (ddp, torch.compile(model), torch.compile(ddp), nn.DataParallel(torch.compile(model))):
            assert unwrap(wrapped) is model
            ema = EMA(wrapped, decay=0.0)
            assert list(ema.state_dict()) == list(model.state_dict())   # no module. / _orig_mod. prefixes
            set_params(model, lambda i, p: torch.randn_like(p))
            ema.update(wrapped)
            assert torch.equal(ema.shadow["lin.weight"], model.lin.weight)
    finally:
        dist.destroy_process_group()


def test_a_child_named_module_is_not_a_wrapper():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(2, 2)
            self.head = nn.Linear(2, 1)

    h = Holder()
    assert unwrap(h) is h
    assert set(EMA(h).state_dict()) == {"module.weight", "module.bias", "head.weight", "head.bias"}
