import pytest
import torch

from mmfm.models import build_ditdh, count_parameters, grid_to_tokens, tokens_to_grid
from mmfm.models.layers import Rope2D, sincos_pos_embed_2d


def meta(preset, **kw):
    with torch.device("meta"):
        return build_ditdh(preset, **kw)


@pytest.mark.parametrize("preset, with_classes, with_modes", [
    # docs/method.md §2.1: (1000 classes + null) / (8192 modes, no null)
    ("ditdh-s", 196_46, 199_22), ("ditdh-b", 294_30, 299_82), ("ditdh-l", 621_74, 629_11),
    ("ditdh-xl", 838_68, 846_96),
])
def test_parameter_counts_equal_method_md(preset, with_classes, with_modes):
    classes = meta(preset, conditioning="class", num_classes=1000, class_dropout_prob=0.1)
    modes = meta(preset, conditioning="mode", num_classes=8192)
    assert round(count_parameters(classes) / 1e4) == with_classes
    assert round(count_parameters(modes) / 1e4) == with_modes


def test_exact_xl_counts_and_head_size():
    xl = meta("ditdh-xl", conditioning="class", num_classes=1000, class_dropout_prob=0.1)
    assert count_parameters(xl) == 838_675_796
    assert count_parameters(meta("ditdh-xl", conditioning="mode", num_classes=8192)) == 846_959_828
    assert sum(p.numel() for p in xl.blocks[28:].parameters()) == 151_065_940  # "two head blocks: 151.1M"
    # the frozen pos-embed and Fourier W are Parameters (counted, in the state dict, not trained)
    assert not xl.pos_embed.requires_grad and not xl.t_embedder.W.requires_grad


def release_state_dict_shapes(d_e=1152, depth=28, heads=16, d_d=2048, head_depth=2, head_heads=16,
                              c=768, n=256, table_rows=1001):
    """The released DiTwDDTHead state dict (names and shapes), written out from the recorded facts."""
    shapes = {
        "pos_embed": (1, n, d_e),
        "x_embedder.proj.weight": (d_d, c, 1, 1), "x_embedder.proj.bias": (d_d,),
        "s_embedder.proj.weight": (d_e, c, 1, 1), "s_embedder.proj.bias": (d_e,),
        "s_projector.weight": (d_d, d_e), "s_projector.bias": (d_d,),
        "t_embedder.W": (256,),
        "t_embedder.mlp.0.weight": (d_e, 512), "t_embedder.mlp.0.bias": (d_e,),
        "t_embedder.mlp.2.weight": (d_e, d_e), "t_embedder.mlp.2.bias": (d_e,),
        "y_embedder.embedding_table.weight": (table_rows, d_e),
        "final_layer.norm_final.weight": (d_d,),
        "final_layer.linear.weight": (c, d_d), "final_layer.linear.bias": (c,),
        "final_layer.adaLN_modulation.1.weight": (2 * d_d, d_d), "final_layer.adaLN_modulation.1.bias": (2 * d_d,),
        "enc_feat_rope.freqs_cos": (n, d_e // heads), "enc_feat_rope.freqs_sin": (n, d_e // heads),
        "dec_feat_rope.freqs_cos": (n, d_d // head_heads), "dec_feat_rope.freqs_sin": (n, d_d // head_heads),
    }
    for i in range(depth + head_depth):
        d = d_e if i < depth else d_d
        hidden = int(2 / 3 * 4 * d)
        shapes.update({
            f"blocks.{i}.norm1.weight": (d,), f"blocks.{i}.norm2.weight": (d,),
            f"blocks.{i}.attn.qkv.weight": (3 * d, d), f"blocks.{i}.attn.qkv.bias": (3 * d,),
            f"blocks.{i}.attn.proj.weight": (d, d), f"blocks.{i}.attn.proj.bias": (d,),
            f"blocks.{i}.mlp.w12.weight": (2 * hidden, d), f"blocks.{i}.mlp.w12.bias": (2 * hidden,),
            f"blocks.{i}.mlp.w3.weight": (d, hidden), f"blocks.{i}.mlp.w3.bias": (d,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6 * d, d), f"blocks.{i}.adaLN_modulation.1.bias": (6 * d,),
        })
    return shapes


def test_state_dict_names_and_shapes_match_the_release():
    for model, rows in ((meta("ditdh-xl", conditioning="class", num_classes=1000, class_dropout_prob=0.1), 1001),
                        (meta("ditdh-xl", conditioning="mode", num_classes=8192), 8192),
                        (meta("ditdh-xl", conditioning="none", num_classes=8192), 8192)):
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert ours == release_state_dict_shapes(table_rows=rows)
    s = meta("ditdh-s", conditioning="mode", num_classes=8192)
    assert {k: tuple(v.shape) for k, v in s.state_dict().items()} == release_state_dict_shapes(
        d_e=384, depth=12, heads=6, table_rows=8192)
    assert int(2 / 3 * 4 * 1152) == 3072  # SwiGLU width of XL (docs/method.md)


def test_state_dict_round_trip_is_strict_and_exact():
    a = build_ditdh("ditdh-tiny", in_channels=8, num_tokens=16, conditioning="mode", num_classes=3)
    b = build_ditdh("ditdh-tiny", in_channels=8, num_tokens=16, conditioning="mode", num_classes=3)
    for p in a.parameters():
        p.data.normal_()
    b.load_state_dict(a.state_dict(), strict=True)
    x, t, y = torch.randn(2, 16, 8), torch.rand(2), torch.tensor([0, 2])
    assert torch.equal(a(x, t, y=y), b(x, t, y=y))


def test_rope_rotates_each_channel_pair_by_position_times_frequency():
    head_dim, side = 16, 4
    rope = Rope2D(head_dim, side)
    x = torch.randn(2, 3, side * side, head_dim, dtype=torch.float64)
    got = rope(x)
    quarter = head_dim // 4  # frequencies per axis
    freqs = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) * 2 / (head_dim // 2))
    for token in range(side * side):
        row, col = divmod(token, side)
        angles = torch.cat([row * freqs, col * freqs])  # pair j < quarter: row; then column
        z = torch.view_as_complex(x[:, :, token].reshape(2, 3, -1, 2).contiguous())
        rotated = torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)).reshape(2, 3, head_dim)
        assert torch.allclose(got[:, :, token], rotated, atol=1e-6)


def test_sincos_pos_embed_closed_form():
    dim, side = 16, 5
    pe = sincos_pos_embed_2d(dim, side)
    assert pe.shape == (25, 16)
    omega = 1 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    for token in (0, 7, 24):
        row, col = divmod(token, side)
        expect = torch.cat([torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega),
                            torch.cos(row * omega)])
        assert torch.allclose(pe[token].double(), expect, atol=1e-6)


def test_forward_shapes_zero_init_and_conditioning():
    model = build_ditdh("ditdh-tiny", in_channels=6, num_tokens=16, conditioning="mode", num_classes=4)
    x, t = torch.randn(3, 16, 6), torch.rand(3)
    out = model(x, t, y=torch.tensor([0, 1, 3]))
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))  # adaLN-Zero output layer
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    a = model(x, t, y=torch.tensor([0, 1, 3]))
    b = model(x, t, y=torch.tensor([2, 1, 3]))
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1:], b[1:])
    uncond = build_ditdh("ditdh-tiny", in_channels=6, num_tokens=16, conditioning="none", num_classes=4)
    for p in uncond.parameters():
        p.data.normal_(0, 0.1)
    assert torch.equal(uncond(x, t, y=torch.tensor([0, 1, 3])), uncond(x, t))  # the table is unused
    loss = uncond(x, t).square().mean()
    loss.backward()
    assert uncond.y_embedder.embedding_table.weight.grad is None  # why DDP needs find_unused_parameters
    assert uncond.blocks[0].attn.qkv.weight.grad is not None


def test_label_dropout_uses_the_null_row():
    model = build_ditdh("ditdh-tiny", in_channels=6, num_tokens=16, conditioning="class", num_classes=4,
                        class_dropout_prob=0.5)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    x, t, y = torch.randn(2, 16, 6), torch.rand(2), torch.tensor([1, 2])
    forced = model(x, t, y=y, drop=torch.tensor([True, False]))
    assert torch.allclose(forced[0], model(x[:1], t[:1], y=torch.tensor([4]))[0], atol=1e-6)
    assert torch.allclose(forced[1], model(x[1:], t[1:], y=y[1:])[0], atol=1e-6)


def test_patch_size_two_round_trip():
    model = build_ditdh("ditdh-tiny", in_channels=3, num_tokens=64, patch_size=2)
    c, p = 3, 2
    w = torch.zeros(c * p * p, c, p, p)
    for pi in range(p):
        for qi in range(p):
            for ci in range(c):
                w[(pi * p + qi) * c + ci, ci, pi, qi] = 1.0  # patch channel order (p, q, C), as unpatchified
    embed = torch.nn.Conv2d(c, c * p * p, p, stride=p, bias=False)
    embed.weight.data = w
    x = torch.randn(2, 64, 3)
    patches = grid_to_tokens(embed(tokens_to_grid(x)))
    assert torch.equal(model._unpatchify(patches), x)
    assert model(x, torch.rand(2)).shape == x.shape


@torch.no_grad()
def test_bf16_autocast_forward_is_close_to_fp32():
    model = build_ditdh("ditdh-tiny", in_channels=8, num_tokens=16)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x, t = torch.randn(2, 16, 8), torch.rand(2)
    ref = model(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, t)
    assert low.dtype == torch.bfloat16
    assert float((low.float() - ref).abs().max()) < 0.05 * float(ref.abs().max()) + 1e-3


def test_grid_token_layout_helpers():
    g = torch.arange(2 * 3 * 4 * 4).reshape(2, 3, 4, 4).float()
    tok = grid_to_tokens(g)
    assert tok.shape == (2, 16, 3) and torch.equal(tok[0, 5], g[0, :, 1, 1])
    assert torch.equal(tokens_to_grid(tok), g)


@pytest.mark.parametrize("kwargs, name", [
    (dict(preset="ditdh-xxl"), "preset"),
    (dict(num_tokens=15), "num_tokens"),
    (dict(conditioning="text"), "conditioning"),
    (dict(conditioning="mode"), "num_classes"),
    (dict(conditioning="mode", num_classes=4, class_dropout_prob=0.1), "class_dropout_prob"),
    (dict(patch_size=3), "patch_size"),
])
def test_bad_construction_arguments(kwargs, name):
    args = dict(preset="ditdh-tiny", in_channels=4, num_tokens=16)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        build_ditdh(args.pop("preset"), **args)


def test_bad_forward_arguments():
    model = build_ditdh("ditdh-tiny", in_channels=4, num_tokens=16, conditioning="mode", num_classes=3)
    x, t = torch.randn(2, 16, 4), torch.rand(2)
    with pytest.raises(ValueError, match="x:"):
        model(torch.randn(2, 16, 5), t, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="t:"):
        model(x, torch.rand(3), y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="y"):
        model(x, t)
    with pytest.raises(ValueError, match="y"):
        model(x, t, y=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="y"):
        model(x, t, y=torch.tensor([0.0, 1.0]))
