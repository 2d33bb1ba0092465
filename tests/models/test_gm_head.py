"""The GMFlow head of DiTDH (docs/gmflow.md §2, §7) and check T8 of docs/gmflow.md §8."""

import pytest
import torch

from mmfm.flow.gm import GMOutput
from mmfm.flow.path import RAEConvention
from mmfm.models import (
    GMMeanVelocity,
    GMRAEConvention,
    build_ditdh,
    count_parameters,
    replicate_velocity_head,
)
from mmfm.models.velocity import describe_network, load_gm_model, load_velocity_model, read_metadata
from mmfm.train.checkpoint import export_ema

TINY = dict(in_channels=12, num_tokens=16)


def gm_tiny(**kw):
    args = dict(TINY, head="gm", gm_groups=3, gm_components=4, gm_logstd_hidden=64)
    return build_ditdh("ditdh-tiny", **{**args, **kw})


def trained_like(net, seed=0, std=0.05):
    """Every parameter perturbed, so that no output is trivially zero (zero-initialized layers)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=gen))
    return net


def inputs(b=3, seed=1, labels=None):
    gen = torch.Generator().manual_seed(seed)
    x, t = torch.randn(b, 16, 12, generator=gen), torch.rand(b, generator=gen)
    return (x, t) if labels is None else (x, t, torch.randint(0, labels, (b,), generator=gen))


def test_build_refuses_bad_gm_settings():
    with pytest.raises(ValueError, match="gm_groups"):
        build_ditdh("ditdh-tiny", **TINY, head="gm")
    with pytest.raises(ValueError, match="gm_groups.*in_channels 12"):
        build_ditdh("ditdh-tiny", **TINY, head="gm", gm_groups=5)
    with pytest.raises(ValueError, match="gm_components"):
        build_ditdh("ditdh-tiny", **TINY, head="gm", gm_groups=3, gm_components=0)
    with pytest.raises(ValueError, match="patch_size"):
        build_ditdh("ditdh-tiny", **TINY, head="gm", gm_groups=3, patch_size=2)
    with pytest.raises(ValueError, match="head"):
        build_ditdh("ditdh-tiny", **TINY, head="mixture")
    with pytest.raises(ValueError, match="gm_logstd_layers"):
        build_ditdh("ditdh-tiny", **TINY, head="gm", gm_groups=3, gm_logstd_layers=0)


def test_velocity_head_is_unchanged():
    torch.manual_seed(0)
    a = build_ditdh("ditdh-tiny", **TINY, conditioning="mode", num_classes=3)
    torch.manual_seed(0)
    b = build_ditdh("ditdh-tiny", **TINY, conditioning="mode", num_classes=3, head="velocity", gm_groups=5)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any(k.startswith("logstd_mlp") for k in sa)
    x, t, y = inputs(labels=3)
    out = trained_like(a)(x, t, y=y)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 16, 12)


def test_gm_forward_state_dict_and_init():
    torch.manual_seed(0)
    net = gm_tiny(conditioning="mode", num_classes=3)
    names = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert names["final_layer.linear.means.weight"] == (4 * 12, 64)
    assert names["final_layer.linear.means.bias"] == (4 * 12,)
    assert names["final_layer.linear.logits.weight"] == (4 * 3, 64)
    assert names["final_layer.linear.logits.bias"] == (4 * 3,)
    assert names["logstd_mlp.net.1.weight"] == (64, 32) and names["logstd_mlp.net.3.weight"] == (1, 64)
    assert "final_layer.linear.weight" not in names
    velocity = build_ditdh("ditdh-tiny", **TINY, conditioning="mode", num_classes=3).state_dict()
    shared = {k for k in names if not k.startswith(("final_layer.linear.", "logstd_mlp."))}
    assert shared == {k for k in velocity if k not in ("final_layer.linear.weight", "final_layer.linear.bias")}

    x, t, y = inputs(labels=3)
    out = net(x, t, y=y)
    assert isinstance(out, GMOutput)
    assert out.means.shape == (3, 4, 16, 12) and out.logits.shape == (3, 4, 16, 3) and out.logstd.shape == (3,)
    assert bool((out.logits == 0).all()) and bool((out.logstd == 0).all())  # uniform A, s = 1
    bias = net.final_layer.linear.means.bias.detach().view(4, 12)
    # zero weights: each component's means are its bias, per (component, channel); the components differ
    torch.testing.assert_close(out.means, bias[None, :, None, :].expand(3, 4, 16, 12), rtol=0, atol=0)
    assert 0.03 < float(bias.std()) < 0.3 and float((bias[0] - bias[1]).abs().min()) > 0
    assert not bool((net.final_layer.linear.means.weight != 0).any())
    torch.manual_seed(0)
    again = gm_tiny(conditioning="mode", num_classes=3)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in net.state_dict().items())  # reproducible
    quiet = gm_tiny(gm_mean_init_noise=0.0)
    assert not bool(quiet.final_layer.linear.means.bias.any())
    assert GMMeanVelocity(net)(x, t, y=y).shape == (3, 16, 12)


def test_logstd_mlp_reads_the_detached_embedding_before_its_silu():
    net = trained_like(gm_tiny(conditioning="class", num_classes=5, class_dropout_prob=0.1, gm_logstd_layers=3))
    mlp = net.logstd_mlp
    linears = [m for m in mlp.net if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and isinstance(mlp.net[0], torch.nn.SiLU)
    x, t, y = inputs(labels=5)
    drop = torch.tensor([False, True, False])
    out = net(x, t, y=y, drop=drop)
    e = net.t_embedder(t) + net.y_embedder(y, drop)  # the null label in row 1
    torch.testing.assert_close(out.logstd, mlp.net(e).squeeze(-1))
    out.logstd.sum().backward()
    assert net.t_embedder.mlp[0].weight.grad is None and net.y_embedder.embedding_table.weight.grad is None
    assert linears[0].weight.grad is not None and bool(linears[0].weight.grad.any())
    fresh = gm_tiny(gm_logstd_layers=1)
    assert [type(m).__name__ for m in fresh.logstd_mlp.net] == ["SiLU", "Linear"]


def test_gm_mean_velocity_and_rae_convention():
    net = trained_like(gm_tiny())
    x, t = inputs()
    out = net(x, t)
    torch.testing.assert_close(GMMeanVelocity(net)(x, t), out.mean(), rtol=0, atol=0)
    rae = GMRAEConvention(net)(x, t)
    flipped = net(x, 1 - t)
    assert torch.equal(rae.means, -flipped.means)  # only the means are negated
    assert torch.equal(rae.logits, flipped.logits) and torch.equal(rae.logstd, flipped.logstd)
    torch.testing.assert_close(GMMeanVelocity(GMRAEConvention(net))(x, t), -flipped.mean(), rtol=0, atol=0)


@pytest.mark.parametrize("components", [2, 4])
def test_t8_replicated_head_has_the_base_velocity_bit_for_bit(components):
    # J a power of two (<= 4): A = 1/J exactly and sum_j v / J is exact; each mean head is computed by a
    # product with the velocity layer's shapes, so mu_j equals the base velocity bit for bit.
    base = trained_like(build_ditdh("ditdh-tiny", **TINY, conditioning="mode", num_classes=3)).eval()
    gm = gm_tiny(conditioning="mode", num_classes=3, gm_components=components)
    trained_like(gm, seed=7)  # whatever it held before is overwritten
    model = replicate_velocity_head(gm, base.state_dict(), noise=0.0)
    assert model is gm
    x, t, y = inputs(labels=3)
    with torch.no_grad():
        out, v = gm.eval()(x, t, y=y), base(x, t, y=y)
    assert all(torch.equal(out.means[:, j], v) for j in range(components))
    assert torch.equal(out.mean(), v)
    assert torch.equal(torch.softmax(out.logits, 1), torch.full_like(out.logits, 1 / components))
    assert torch.equal(out.logstd, torch.zeros(3))


def test_t8_replication_with_eight_components_noise_and_rae():
    base = trained_like(build_ditdh("ditdh-tiny", **TINY)).eval()
    gm = gm_tiny(gm_components=8)
    replicate_velocity_head(gm, base.state_dict(), noise=0.0)
    x, t = inputs()
    with torch.no_grad():
        out, v = gm.eval()(x, t), base(x, t)
    assert all(torch.equal(out.means[:, j], v) for j in range(8))
    torch.testing.assert_close(out.mean(), v, rtol=1e-6, atol=1e-7)  # the 8-term sum can round
    # noise: reproducible under a generator, per (component, channel), on the means' bias only
    a, b = gm_tiny(), gm_tiny()
    replicate_velocity_head(a, base.state_dict(), noise=0.1, generator=torch.Generator().manual_seed(3))
    replicate_velocity_head(b, base.state_dict(), noise=0.1, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    delta = a.final_layer.linear.means.bias.detach().view(4, 12) - base.final_layer.linear.bias.detach()
    assert 0.03 < float(delta.std()) < 0.3
    torch.testing.assert_close(a.final_layer.linear.means.weight.detach(), base.final_layer.linear.weight.detach().repeat(4, 1))
    # a checkpoint in RAE's convention: the paper view feeds 1 - t and negates the means
    c = gm_tiny()
    view = replicate_velocity_head(c, base.state_dict(), noise=0.0, convention="rae")
    assert isinstance(view, GMRAEConvention) and view.net is c
    with torch.no_grad():
        torch.testing.assert_close(GMMeanVelocity(view)(x, t), RAEConvention(base)(x, t), rtol=0, atol=0)


def test_replication_refuses_other_shapes():
    gm = gm_tiny()
    other = build_ditdh("ditdh-tiny", in_channels=8, num_tokens=16)
    with pytest.raises(ValueError, match=r"gm_init.*s_embedder\.proj\.weight \(32, 8, 1, 1\)"):
        replicate_velocity_head(gm, other.state_dict())
    cond = build_ditdh("ditdh-tiny", **TINY, conditioning="mode", num_classes=3)
    with pytest.raises(ValueError, match="gm_init.*unexpected.*y_embedder"):
        replicate_velocity_head(gm, cond.state_dict())
    with pytest.raises(ValueError, match="gm_init"):
        replicate_velocity_head(build_ditdh("ditdh-tiny", **TINY), cond.state_dict())


def export(tmp_path, net, convention="paper", **extra):
    meta = {"kind": "mmfm-velocity", "preset": "ditdh-tiny", "in_channels": 12, "num_tokens": 16, "patch_size": 1,
            "conditioning": "mode", "num_classes": 3, "class_dropout_prob": 0.0, "time_convention": convention,
            "layout": "tokens", "method": "gmflow", "head": "gm", "gm_components": 4, "gm_groups": 3,
            "gm_logstd_hidden": 64, "gm_logstd_layers": 2, **extra}
    path = tmp_path / f"{convention}.safetensors"
    export_ema(path, net.state_dict(), meta)
    return path


@pytest.mark.parametrize("convention", ["paper", "rae"])
def test_gm_export_loads_as_a_mean_velocity_and_as_a_mixture(tmp_path, convention):
    net = trained_like(gm_tiny(conditioning="mode", num_classes=3)).eval()
    path = export(tmp_path, net, convention)
    x, t, y = inputs(labels=3)
    gm = load_gm_model(path)
    velocity = load_velocity_model(path)
    assert isinstance(velocity, GMMeanVelocity) and not gm.training
    out = gm(x, t, y=y)
    assert isinstance(out, GMOutput) and not out.means.requires_grad
    with torch.no_grad():
        ref = net(x, t, y=y) if convention == "paper" else GMRAEConvention(net)(x, t, y=y)
    assert torch.equal(out.means, ref.means) and torch.equal(out.logits, ref.logits)
    assert torch.equal(out.logstd, ref.logstd)
    torch.testing.assert_close(velocity(x, t, y=y), out.mean(), rtol=0, atol=0)
    assert "head 'gm' (4 components, 3 groups)" in describe_network(read_metadata(path))


def test_velocity_export_is_not_a_gm_export(tmp_path):
    net = build_ditdh("ditdh-tiny", **TINY, conditioning="mode", num_classes=3)
    meta = {"preset": "ditdh-tiny", "in_channels": 12, "num_tokens": 16, "conditioning": "mode", "num_classes": 3,
            "time_convention": "paper"}
    path = tmp_path / "v.safetensors"
    export_ema(path, net.state_dict(), meta)
    with pytest.raises(ValueError, match=r"v\.safetensors: not a GMFlow \(gm head\) export; sample it with "
                                         r"euler/heun/midpoint/dopri5"):
        load_gm_model(path)
    x, t, y = inputs(labels=3)
    assert isinstance(load_velocity_model(path)(x, t, y=y), torch.Tensor)
    assert "head 'velocity'" in describe_network(meta)
    # a gm export whose tensors are a velocity network's: the strict precheck names the GM keys
    bad = export(tmp_path, net)
    with pytest.raises(ValueError, match="does not load strictly.*final_layer.linear.means"):
        load_velocity_model(bad)


def test_xl_parameter_counts():
    with torch.device("meta"):
        v = build_ditdh("ditdh-xl", in_channels=768, num_tokens=256)
        g = build_ditdh("ditdh-xl", in_channels=768, num_tokens=256, head="gm", gm_components=8, gm_groups=48)
    extra = count_parameters(g) - count_parameters(v)
    head = 2048 * 8 * (768 + 48) + 8 * (768 + 48) - (2048 * 768 + 768)  # means + logits, minus the velocity linear
    logstd = (1152 * 1024 + 1024) + (1024 + 1)
    assert extra == head + logstd


def test_gm_network_and_losses_compile_without_graph_breaks():
    from mmfm.bench.train import graph_breaks
    from mmfm.flow.loss import forward_transition, gm_nll_loss, gm_transition_loss, transition_times

    net = gm_tiny(conditioning="class", num_classes=10, class_dropout_prob=0.1)
    x, t = inputs()
    y, drop = torch.tensor([0, 2, 9]), torch.tensor([True, False, False])
    assert graph_breaks(net, x, t, y, drop=drop) == 0

    def step(x1, x0, eps, m, var0, w):
        t_a, t_b = transition_times(t, 0.5)
        x_b = (1 - t_b).view(-1, 1, 1) * (m + var0.sqrt().view(-1, 1, 1) * x0) + t_b.view(-1, 1, 1) * x1
        x_a = forward_transition(x_b, t_a, t_b, eps, m, var0)
        out = net(x_a, t_a, y)
        return gm_transition_loss(out, x_a, t_a, x_b, t_b, m=m, var0=var0, weights=w) + gm_nll_loss(out, x1 - x0)

    args = [torch.randn(3, 16, 12) for _ in range(4)] + [torch.rand(3) + 0.5, torch.ones(3)]
    assert graph_breaks(step, *args) == 0
