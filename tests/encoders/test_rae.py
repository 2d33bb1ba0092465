import pytest
import torch
from safetensors.torch import save_file

from mmfm.encoders.rae import RAEDecoder, load_rae_decoder, sincos_pos_embed

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TINY = dict(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24, patch_size=4)

# Names and shapes of RAE's released ViT-XL decoder, read in RAE's src/stage1/decoders/decoder.py
# (GeneralDecoder over transformers 4.x ViTMAELayer) and loaded there with load_state_dict(strict=True).
RELEASED = {
    "decoder_embed.weight": (1152, 768), "decoder_embed.bias": (1152,),
    "decoder_pos_embed": (1, 257, 1152), "trainable_cls_token": (1, 1, 1152),
    "decoder_layers.0.attention.attention.query.weight": (1152, 1152),
    "decoder_layers.0.attention.attention.key.bias": (1152,),
    "decoder_layers.13.attention.attention.value.weight": (1152, 1152),
    "decoder_layers.27.attention.output.dense.weight": (1152, 1152),
    "decoder_layers.27.intermediate.dense.weight": (4096, 1152), "decoder_layers.27.intermediate.dense.bias": (4096,),
    "decoder_layers.27.output.dense.weight": (1152, 4096), "decoder_layers.27.output.dense.bias": (1152,),
    "decoder_layers.0.layernorm_before.weight": (1152,), "decoder_layers.0.layernorm_after.bias": (1152,),
    "decoder_norm.weight": (1152,), "decoder_norm.bias": (1152,),
    "decoder_pred.weight": (768, 1152), "decoder_pred.bias": (768,),
}
LAYER_KEYS = {f"{m}.{p}" for m in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                                   "attention.output.dense", "intermediate.dense", "output.dense",
                                   "layernorm_before", "layernorm_after") for p in ("weight", "bias")}


def _vit_xl_on_meta() -> RAEDecoder:
    with torch.device("meta"):
        return RAEDecoder(pixel_mean=MEAN, pixel_std=STD)


def _tiny(grid=4, token_dim=8) -> RAEDecoder:
    dec = RAEDecoder(pixel_mean=MEAN, pixel_std=STD, token_dim=token_dim, grid=grid, **TINY)
    with torch.no_grad():
        for p in dec.parameters():  # everything non-trivial, the zero-init CLS included
            p.normal_(0, 0.3)
    return dec.eval()


def test_vit_xl_parameter_count():
    d, h, layers, inter, out, n = 768, 1152, 28, 4096, 16 * 16 * 3, 256
    per_layer = 4 * (h * h + h) + (h * inter + inter) + (inter * h + h) + 2 * (2 * h)
    expected = (d * h + h) + (1 + n) * h + h + layers * per_layer + 2 * h + (h * out + out)
    count = sum(p.numel() for p in _vit_xl_on_meta().parameters())
    assert count == expected == 415_352_704
    assert abs(count / 1e6 - 415) < 1


def test_vit_xl_state_dict_has_the_released_names():
    state = _vit_xl_on_meta().state_dict()
    for key, shape in RELEASED.items():
        assert tuple(state[key].shape) == shape, key
    layer_keys = {k.split(".", 2)[2] for k in state if k.startswith("decoder_layers.")}
    assert layer_keys == LAYER_KEYS
    assert {int(k.split(".")[1]) for k in state if k.startswith("decoder_layers.")} == set(range(28))
    assert len(state) == 28 * 16 + 8  # no pixel statistics in the state dict


def test_position_embedding_and_layer_match_transformers_vit_mae():
    from transformers import ViTMAEConfig
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAEDecoder, ViTMAELayer
    config = ViTMAEConfig(hidden_size=8, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                          decoder_num_attention_heads=2, decoder_intermediate_size=24, image_size=16, patch_size=4,
                          layer_norm_eps=1e-12)
    reference = ViTMAEDecoder(config, num_patches=16).decoder_pos_embed[0]
    assert torch.equal(sincos_pos_embed(16, 4), reference)
    # token 5 = row 1, column 1 on the 4 x 4 grid: [sin(w) cos(w) | sin(w) cos(w)] with w_t = 10000^(-t/4)
    w = 10000.0 ** -(torch.arange(4, dtype=torch.float64) / 4)
    assert torch.allclose(sincos_pos_embed(16, 4)[1 + 5].double(), torch.cat([w.sin(), w.cos()] * 2), atol=1e-7)

    ours = _tiny().decoder_layers[0]
    config.hidden_size, config.num_attention_heads, config.intermediate_size = 16, 2, 24
    theirs = ViTMAELayer(config).eval()
    state = ours.state_dict()
    if set(theirs.state_dict()) != set(state):  # transformers 5 renamed the ViT-MAE layer's parameters
        renames = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
                   "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj",
                   "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
        state = {next((k.replace(a, b, 1) for a, b in renames.items() if k.startswith(a)), k): v
                 for k, v in state.items()}
    theirs.load_state_dict(state, strict=True)
    h = torch.randn(2, 17, 16)
    out = theirs(h)
    out = out[0] if isinstance(out, tuple) else out
    assert torch.allclose(ours(h), out, atol=1e-5)


@pytest.mark.parametrize("layout", ["safetensors", "pt", "rae-training-checkpoint"])
def test_roundtrip_save_load_is_strict_and_exact(tmp_path, layout):
    dec = _tiny()
    state = dec.state_dict()
    if layout == "safetensors":
        path = tmp_path / "decoder.safetensors"
        save_file(state, path)
    else:
        path = tmp_path / "model.pt"
        if layout == "rae-training-checkpoint":
            whole = {**{f"decoder.{k}": v for k, v in state.items()}, "encoder.layernorm.weight": torch.ones(3)}
            state = {"step": 7, "model": {k: torch.zeros_like(v) for k, v in whole.items()}, "ema": whole}
        torch.save(state, path)
    loaded = load_rae_decoder(path, pixel_mean=MEAN, pixel_std=STD, token_dim=8, grid=4, **TINY)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    z = torch.randn(3, 16, 8)
    with torch.no_grad():
        assert torch.equal(loaded(z), dec(z))


def test_load_errors_name_the_file_and_keys(tmp_path):
    with pytest.raises(ValueError, match=r"missing\.pt: no such file.*RAE-collections"):
        load_rae_decoder(tmp_path / "missing.pt", pixel_mean=MEAN, pixel_std=STD)
    state = _tiny().state_dict()
    state.pop("decoder_norm.bias")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"bad\.safetensors.*1 missing.*decoder_norm\.bias.*"
                                         r"1 unexpected.*extra\.weight"):
        load_rae_decoder(tmp_path / "bad.safetensors", pixel_mean=MEAN, pixel_std=STD, token_dim=8, grid=4, **TINY)
    save_file(_tiny().state_dict(), tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match=r"decoder_embed\.weight \(16, 8\) \(expected \(16, 12\)\)"):
        load_rae_decoder(tmp_path / "wide.safetensors", pixel_mean=MEAN, pixel_std=STD, token_dim=12, grid=4, **TINY)
    torch.save(_tiny(), tmp_path / "pickled.pt")  # a whole module, not a state dict: refused, no pickle
    with pytest.raises(ValueError, match=r"pickled\.pt: not readable with torch\.load\(weights_only=True\)"):
        load_rae_decoder(tmp_path / "pickled.pt", pixel_mean=MEAN, pixel_std=STD, token_dim=8, grid=4, **TINY)


def test_output_shape_for_a_16x16_grid():
    dec = RAEDecoder(pixel_mean=MEAN, pixel_std=STD, token_dim=8, grid=16, hidden_size=16, num_layers=1, num_heads=2,
                     intermediate_size=16, patch_size=16).eval()
    with torch.no_grad():
        assert dec(torch.randn(2, 256, 8)).shape == (2, 3, 256, 256)
    assert dec.image_size == 256
    with pytest.raises(ValueError, match=r"tokens: expected shape \(B, 256, 8\)"):
        dec(torch.randn(2, 255, 8))


def test_unpatchify_order_and_denormalization():
    mean, std = (0.1, -0.2, 0.3), (0.5, 2.0, 0.25)
    dec = RAEDecoder(pixel_mean=mean, pixel_std=std, token_dim=8, grid=4, **TINY).eval()
    p, c = 4, 3
    pattern = torch.randn(p * p * c)
    with torch.no_grad():
        dec.decoder_pred.weight.zero_()
        dec.decoder_pred.bias.copy_(pattern)  # every token predicts the same (dy, dx, c)-ordered patch
        x = dec(torch.randn(2, 16, 8))
    patch = pattern.view(p, p, c)
    for ch in range(c):
        expected = (patch[..., ch] * std[ch] + mean[ch]).repeat(4, 4)  # tiled over the 4 x 4 grid
        assert torch.allclose(x[1, ch], expected, atol=1e-6)
