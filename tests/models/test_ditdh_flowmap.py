"""The DMF flow-map DiTDH (``dmf_depth``): at ``r = t`` it is the velocity DiTDH of the same weights to the bit for
every split, the first ``d`` blocks never see ``r``, the log-variance head is the formula and starts at zero, the
JVP through the real network agrees with a float64 central difference, and the RAE adapter carries ``r``."""

import pytest
import torch

from mmfm.flow.flowmap import time_derivative
from mmfm.flow.path import RAEConvention
from mmfm.models.ditdh import LogVarHead, build_ditdh, load_flowmap_init

KW = dict(in_channels=8, num_tokens=4, conditioning="mode", num_classes=3)


def _trained_velocity(seed=0, dtype=torch.float32):
    """A velocity DiTDH with every weight moved off its (often zero) init, so no zero hides a wrong wire."""
    torch.manual_seed(seed)
    net = build_ditdh("ditdh-tiny", **KW)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    return net.to(dtype).eval()


def _flowmap(base, d, dtype=torch.float32):
    net = build_ditdh("ditdh-tiny", **KW, dmf_depth=d)
    load_flowmap_init(net, base.state_dict(), "base.safetensors")
    return net.to(dtype).eval()


def _inputs(b=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, 4, 8, generator=g, dtype=dtype), torch.rand(b, generator=g, dtype=dtype) * 0.6,
            torch.tensor([0, 1, 2, 0, 1][:b]))


@pytest.mark.parametrize("d", [1, 2])
def test_at_r_equal_t_it_is_the_velocity_network_to_the_bit(d):
    base = _trained_velocity()
    net = _flowmap(base, d)
    x, t, y = _inputs()
    with torch.no_grad():
        v = base(x, t, y)
        assert torch.equal(net(x, t, y), v) and torch.equal(net(x, t, y, r=t), v)
        u, logvar = net(x, t, y, r=t, return_logvar=True)
        assert torch.equal(u, v) and torch.equal(logvar, torch.zeros(5))  # the new head starts at zero
        assert float((net(x, t, y, r=t + 0.3) - v).abs().max()) > 1e-3  # r is wired in


def test_the_first_blocks_see_t_and_the_others_r():
    """With ``d = 1`` of 2 encoder blocks: changing only ``r`` leaves block 0's conditioning and output unchanged and
    changes block 1's conditioning; the head's conditioning ``s`` changes too (it reads ``r_emb``)."""
    base = _trained_velocity()
    net = _flowmap(base, 1)
    x, t, y = _inputs()
    seen = {}

    def hook(name):
        return lambda module, args, out: seen.setdefault(name, []).append((args[1].clone(), out.clone()))

    for i in range(3):  # 2 encoder blocks and 1 head block
        net.blocks[i].register_forward_hook(hook(i))
    with torch.no_grad():
        net(x, t, y, r=t + 0.1)
        net(x, t, y, r=t + 0.4)
    (c0a, o0a), (c0b, o0b) = seen[0]
    (c1a, _), (c1b, _) = seen[1]
    (s_a, _), (s_b, _) = seen[2]
    assert torch.equal(c0a, c0b) and torch.equal(o0a, o0b)
    assert not torch.equal(c1a, c1b) and not torch.equal(s_a, s_b)


def test_log_variance_head_is_the_formula_and_learns():
    head = LogVarHead()
    t, r = torch.tensor([0.0, 0.25, 0.9]), torch.tensor([0.5, 0.25, 1.0])
    w = torch.tensor([10000.0 ** (-i / 64) for i in range(64)])
    want = torch.cat([torch.cos(t[:, None] * w), torch.sin(t[:, None] * w), torch.cos(r[:, None] * w),
                      torch.sin(r[:, None] * w)], dim=1)
    torch.testing.assert_close(head.features(t, r), want)
    assert head.features(t, r).shape == (3, 256) and torch.equal(head(t, r), torch.zeros(3))
    head(t, r).sum().backward()
    torch.testing.assert_close(head.linear.weight.grad[0], want.sum(0))
    assert sum(p.numel() for p in head.parameters()) == 257 and not list(head.buffers())


def test_bad_splits_and_inits_are_refused():
    for d in (0, 3, True):
        with pytest.raises(ValueError, match=r"dmf_depth: expected an integer in \[1, 2\]"):
            build_ditdh("ditdh-tiny", **KW, dmf_depth=d)
    with pytest.raises(ValueError, match="dmf_depth: a DMF flow map has the velocity head"):
        build_ditdh("ditdh-tiny", **KW, dmf_depth=1, head="gm", gm_groups=2)
    plain = build_ditdh("ditdh-tiny", **KW)
    x, t, y = _inputs()
    with pytest.raises(ValueError, match="r: this network is not a flow map"):
        plain(x, t, y, r=t)
    net = build_ditdh("ditdh-tiny", **KW, dmf_depth=1)
    state = plain.state_dict()
    with pytest.raises(ValueError, match=r"dmf_init: w\.safetensors does not load into this flow map: 1 unexpected"):
        load_flowmap_init(net, {**state, "extra.weight": torch.zeros(1)}, "w.safetensors")
    bad = {**state, "final_layer.linear.bias": torch.zeros(3)}
    with pytest.raises(ValueError, match="of the wrong shape, first \\['final_layer.linear.bias"):
        load_flowmap_init(net, bad, "w.safetensors")
    missing = {k: v for k, v in state.items() if k != "pos_embed"}
    with pytest.raises(ValueError, match="1 missing, first \\['pos_embed'\\]"):
        load_flowmap_init(net, missing, "w.safetensors")
    with pytest.raises(ValueError, match="dmf_init: the network to initialize is not a flow map"):
        load_flowmap_init(plain, state, "w.safetensors")
    load_flowmap_init(net, net.state_dict(), "own.safetensors")  # a flow map's own weights load too


def test_jvp_through_the_ditdh_agrees_with_a_float64_central_difference():
    """T5: the total derivative of ``U(x_t, t, r)`` along ``(v, 1, 0)`` by one forward-mode pass (math attention)
    against ``[U(x + e v, t + e, r) - U(x - e v, t - e, r)] / 2e`` in float64 (the network in float64 throughout:
    its time embeddings and RMSNorm keep float64)."""
    base = _trained_velocity(dtype=torch.float64)
    net = _flowmap(base, 1, torch.float64)
    x, t, y = _inputs(dtype=torch.float64)
    r = torch.clamp(t + 0.3, max=1.0)
    v = torch.randn_like(x)
    u, logvar, du = time_derivative(net, x, t, r, v, cond={"y": y}, method="jvp")
    with torch.no_grad():
        torch.testing.assert_close(u, net(x, t, y, r=r), rtol=0, atol=1e-12)
        e = 1e-7  # (the moved weights make it strongly curved: the difference's error is ~0.6 e^2)
        fd = (net(x + e * v, t + e, y, r=r) - net(x - e * v, t - e, y, r=r)) / (2 * e)
    assert float(du.abs().max()) > 1e-2  # the derivative is not trivially zero
    err = float((du - fd).abs().max() / fd.abs().max())
    assert err < 1e-6, err
    assert u.requires_grad and not du.requires_grad and logvar.shape == (5,)


def test_jvp_on_an_attention_kernel_without_forward_ad_is_refused_clearly():
    from torch.nn.attention import SDPBackend

    net = _flowmap(_trained_velocity(), 1)
    x, t, y = _inputs()
    with pytest.raises(ValueError, match="dmf_derivative: the JVP .* Use the math attention backend .*dmf_derivative: fd"):
        time_derivative(net, x, t, t + 0.2, torch.randn_like(x), cond={"y": y}, method="jvp",
                        attention=[SDPBackend.FLASH_ATTENTION])


def test_rae_convention_carries_the_target_time():
    base = _trained_velocity()
    net = _flowmap(base, 1)
    x, t, y = _inputs()
    r = t + 0.2
    rae = RAEConvention(net)
    with torch.no_grad():
        assert torch.equal(rae(x, t, r=r, y=y), -net(x, 1 - t, y, r=1 - r))
        u, logvar = rae(x, t, r=r, y=y, return_logvar=True)
        want_u, want_l = net(x, 1 - t, y, r=1 - r, return_logvar=True)
        assert torch.equal(u, -want_u) and torch.equal(logvar, want_l)
        assert torch.equal(rae(x, t, y=y), -base(x, 1 - t, y))  # a plain call is the velocity adapter's
