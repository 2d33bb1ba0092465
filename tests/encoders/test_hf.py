import json

import pytest
import torch
import torch.nn.functional as F

from mmfm.encoders.hf import load_hf_tokenizer
from mmfm.encoders.rae import RAEDecoder

MEAN, STD = (0.3, 0.5, 0.7), (0.2, 0.4, 0.8)  # not any model's defaults: proves they are read
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _randomize_final_norm(norm):
    torch.manual_seed(0)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.normal_(0, 1)


def _save(model, processor_cls, directory):
    model.save_pretrained(directory)
    processor_cls(image_mean=list(MEAN), image_std=list(STD)).save_pretrained(directory)
    return directory


def _normalize(images, size):
    x = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False) if images.shape[-1] != size \
        else images
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _standardize(h, eps):
    return F.layer_norm(h, h.shape[-1:], eps=eps)


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    from transformers import BitImageProcessor, Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**SMALL, image_size=28, patch_size=7,
                                                               num_register_tokens=4))
    _randomize_final_norm(model.layernorm)
    return _save(model, BitImageProcessor, tmp_path_factory.mktemp("dinov2"))


@pytest.fixture(scope="module")
def mae_dir(tmp_path_factory):
    from transformers import ViTImageProcessor, ViTMAEConfig, ViTMAEForPreTraining
    model = ViTMAEForPreTraining(ViTMAEConfig(**SMALL, image_size=32, patch_size=8, decoder_hidden_size=16,
                                              decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                              decoder_intermediate_size=32))
    _randomize_final_norm(model.vit.layernorm)
    return _save(model, ViTImageProcessor, tmp_path_factory.mktemp("mae"))


def _siglip(tower_only: bool):
    from transformers import SiglipConfig, SiglipModel, SiglipVisionModel
    config = SiglipConfig(vision_config=dict(**SMALL, image_size=32, patch_size=8),
                          text_config=dict(**SMALL, vocab_size=64, max_position_embeddings=8))
    model = SiglipVisionModel(config.vision_config) if tower_only else SiglipModel(config)
    vision = model if tower_only else model.vision_model
    _randomize_final_norm(getattr(vision, "vision_model", vision).post_layernorm)
    return model


@pytest.fixture(scope="module", params=["SiglipModel", "SiglipVisionModel"])
def siglip_dir(request, tmp_path_factory):
    from transformers import SiglipImageProcessor
    return _save(_siglip(request.param == "SiglipVisionModel"), SiglipImageProcessor, tmp_path_factory.mktemp("siglip"))


def _check_standardized(*tensors):
    for t in tensors:
        assert torch.allclose(t.mean(-1), torch.zeros(()), atol=1e-5)
        # v / (v + eps) for a token of variance v: 1 to within 1e-2 for these random models, while the
        # saved affine (weights in [0.5, 2], random biases) would put it far off
        assert torch.allclose(t.var(-1, unbiased=False), torch.ones(()), atol=1e-2)


def test_dinov2_drops_cls_and_registers_without_the_final_affine(dinov2_dir):
    from transformers import Dinov2WithRegistersModel
    tok = load_hf_tokenizer("dinov2", dinov2_dir, image_size=32, input_size=28)
    assert (tok.grid, tok.num_tokens, tok.token_dim, tok.cls_dim, tok.patch_size) == ((4, 4), 16, 32, 32, 7)
    assert (tok.pixel_mean, tok.pixel_std) == (MEAN, STD)
    assert not tok.model.training and not any(p.requires_grad for p in tok.model.parameters())
    images = torch.rand(3, 3, 32, 32)
    cls, tokens = tok.encode(images)
    assert cls.shape == (3, 32) and tokens.shape == (3, 16, 32) and tokens.dtype == torch.float32

    raw = Dinov2WithRegistersModel.from_pretrained(dinov2_dir, local_files_only=True).eval()
    with torch.no_grad():
        out = raw(_normalize(images, 28), output_hidden_states=True)
    reference = _standardize(out.hidden_states[-1], raw.config.layer_norm_eps)  # 1 CLS + 4 registers + 16 patches
    assert reference.shape == (3, 21, 32)
    assert torch.allclose(tokens, reference[:, 5:], atol=1e-5) and torch.allclose(cls, reference[:, 0], atol=1e-5)
    assert not torch.allclose(tokens, out.last_hidden_state[:, 5:], atol=1e-2)  # the saved affine is not applied
    _check_standardized(tokens, cls)
    c2, t2 = tok.encode(images)
    assert torch.equal(c2, cls) and torch.equal(t2, tokens)


def test_dinov2_defaults_to_rae_input_size_and_metadata(dinov2_dir):
    tok = load_hf_tokenizer("dinov2", dinov2_dir)
    assert (tok.image_size, tok.input_size, tok.grid) == (256, 16 * 7, (16, 16))
    meta = tok.metadata()
    assert json.loads(json.dumps(meta)) == meta
    assert meta["encoder"] == "dinov2" and meta["num_registers"] == 4 and meta["final_layernorm_affine"] is False
    assert meta["pixel_mean"] == list(MEAN) and meta["grid"] == [16, 16] and meta["input_size"] == 112
    assert meta["revision"].startswith("sha256:") and load_hf_tokenizer("dinov2", dinov2_dir).metadata() == meta
    with pytest.raises(ValueError, match=r"images: expected shape \(B, 3, 256, 256\)"):
        tok.encode(torch.rand(1, 3, 224, 224))


def test_siglip2_tokens_and_pooled_descriptor_from_affine_free_tokens(siglip_dir):
    from transformers import SiglipVisionModel
    tok = load_hf_tokenizer("siglip2", siglip_dir, image_size=32, input_size=32)
    assert (tok.grid, tok.num_tokens, tok.token_dim, tok.cls_dim) == ((4, 4), 16, 32, 32)
    assert (tok.pixel_mean, tok.pixel_std) == (MEAN, STD)
    images = torch.rand(2, 3, 32, 32)
    cls, tokens = tok.encode(images)
    assert cls.shape == (2, 32) and tokens.shape == (2, 16, 32)

    raw = SiglipVisionModel.from_pretrained(siglip_dir, local_files_only=True).eval()
    tower = getattr(raw, "vision_model", raw)
    with torch.no_grad():
        out = tower(_normalize(images, 32), output_hidden_states=True)
        reference = _standardize(out.hidden_states[-1], raw.config.layer_norm_eps)  # all 16 tokens, no CLS
        pooled = tower.head(reference)
    assert torch.allclose(tokens, reference, atol=1e-5) and torch.allclose(cls, pooled, atol=1e-5)
    assert not torch.allclose(cls, out.pooler_output, atol=1e-2)  # the original pooled output saw the affine
    _check_standardized(tokens)
    assert torch.equal(tok.encode(images)[0], cls)


def test_mae_keeps_every_token_in_identity_order(mae_dir):
    from transformers import ViTMAEModel
    tok = load_hf_tokenizer("mae", mae_dir, image_size=32, input_size=32)
    assert (tok.grid, tok.num_tokens, tok.pixel_mean, tok.pixel_std) == ((4, 4), 16, MEAN, STD)
    images = torch.rand(2, 3, 32, 32)
    cls, tokens = tok.encode(images)
    assert cls.shape == (2, 32) and tokens.shape == (2, 16, 32)

    # manual forward: patch embeddings + fixed position embeddings in raster order, CLS first, no masking
    raw = ViTMAEModel.from_pretrained(mae_dir, local_files_only=True).eval()
    emb = raw.embeddings
    with torch.no_grad():
        patches = emb.patch_embeddings.projection(_normalize(images, 32)).flatten(2).transpose(1, 2)
        h = torch.cat([(emb.cls_token + emb.position_embeddings[:, :1]).expand(2, -1, -1),
                       patches + emb.position_embeddings[:, 1:]], dim=1)
        for layer in getattr(raw, "layers", None) or raw.encoder.layer:
            h = layer(h)
            h = h[0] if isinstance(h, tuple) else h
    reference = _standardize(h, raw.config.layer_norm_eps)
    assert torch.allclose(tokens, reference[:, 1:], atol=1e-5) and torch.allclose(cls, reference[:, 0], atol=1e-5)
    _check_standardized(tokens, cls)
    assert torch.equal(tok.encode(images)[1], tokens)


def test_mae_interpolates_position_embeddings_for_a_larger_input(mae_dir):
    tok = load_hf_tokenizer("mae", mae_dir, image_size=40, input_size=48)
    cls, tokens = tok.encode(torch.rand(2, 3, 40, 40))
    assert tok.grid == (6, 6) and tokens.shape == (2, 36, 32) and cls.shape == (2, 32)
    _check_standardized(tokens, cls)


def test_decode_through_an_attached_rae_decoder(mae_dir):
    tok = load_hf_tokenizer("mae", mae_dir, image_size=32, input_size=32)
    with pytest.raises(ValueError, match=r"mae tokenizer has no decoder: pass decoder="):
        tok.decode(torch.zeros(1, 16, 32))
    decoder = RAEDecoder(pixel_mean=MEAN, pixel_std=STD, token_dim=32, grid=4, hidden_size=16, num_layers=1,
                         num_heads=2, intermediate_size=16, patch_size=8)
    tok = load_hf_tokenizer("mae", mae_dir, image_size=32, input_size=32, decoder=decoder)
    _, tokens = tok.encode(torch.rand(2, 3, 32, 32))
    images = tok.decode(tokens)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(images, decoder(tokens))
    with pytest.raises(ValueError, match=r"tokens: expected shape \(B, 16, 32\)"):
        tok.decode(tokens[:, :15])
    with pytest.raises(ValueError, match=r"decoder: expects 4x4 tokens of width 32, the mae tokenizer gives 6x6"):
        load_hf_tokenizer("mae", mae_dir, image_size=32, input_size=48, decoder=decoder)


def test_bfloat16_autocast_returns_float32_close_to_float32(dinov2_dir):
    images = torch.rand(2, 3, 28, 28)
    _, exact = load_hf_tokenizer("dinov2", dinov2_dir, image_size=28, input_size=28).encode(images)
    _, fast = load_hf_tokenizer("dinov2", dinov2_dir, image_size=28, input_size=28, dtype=torch.bfloat16).encode(images)
    assert fast.dtype == torch.float32 and (fast - exact).abs().mean() < 0.05


def test_missing_files_are_named_errors(tmp_path, dinov2_dir, mae_dir):
    with pytest.raises(ValueError, match=r"dinov2 encoder checkpoint .*nowhere: no such directory.*hf download "
                                         r"facebook/dinov2-with-registers-base --local-dir"):
        load_hf_tokenizer("dinov2", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (tmp_path / "empty" / name).write_text((dinov2_dir / name).read_text())
    with pytest.raises(ValueError, match=r"empty: missing model\.safetensors or .*pytorch_model\.bin.*hf download"):
        load_hf_tokenizer("dinov2", tmp_path / "empty")
    with pytest.raises(ValueError, match=r"config\.json has model_type 'vit_mae', expected one of"):
        load_hf_tokenizer("dinov2", mae_dir)
    with pytest.raises(ValueError, match=r"encoder: expected one of \['dinov2', 'mae', 'siglip2'\]"):
        load_hf_tokenizer("clip", mae_dir)


def test_hub_id_resolves_from_the_local_cache_only(tmp_path, monkeypatch, mae_dir):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=r"someone/tiny-mae: not a directory and not in the local Hugging Face cache"):
        load_hf_tokenizer("mae", "someone/tiny-mae")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--tiny-mae"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in mae_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    tok = load_hf_tokenizer("mae", "someone/tiny-mae", image_size=32, input_size=32)
    assert tok.metadata()["model"] == "someone/tiny-mae"
    direct = load_hf_tokenizer("mae", mae_dir, image_size=32, input_size=32)
    assert tok.revision == direct.revision
    images = torch.rand(1, 3, 32, 32)
    assert torch.equal(tok.encode(images)[1], direct.encode(images)[1])
