import pytest
import torch

from mmfm.encoders import PixelTokenizer


def test_roundtrip_is_exact_and_tokens_are_patches():
    tok = PixelTokenizer(image_size=8, patch_size=2, channels=3, pool=2, pixel_mean=(0.1, 0.2, 0.3),
                         pixel_std=(0.5, 0.25, 2.0))
    x = torch.rand(5, 3, 8, 8, dtype=torch.float64)
    cls, tokens = tok.encode(x)
    assert tokens.shape == (5, 16, 12) and cls.shape == (5, 12)
    assert torch.allclose(tok.decode(tokens), x, atol=1e-12, rtol=0)
    x32 = x.float()
    assert (tok.decode(tok.encode(x32)[1]) - x32).abs().max() < 1e-6
    # token i is the patch at grid row i // 4, column i % 4, values ordered (channel, dy, dx)
    mean = torch.tensor([0.1, 0.2, 0.3], dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor([0.5, 0.25, 2.0], dtype=x.dtype).view(3, 1, 1)
    xn = (x[2] - mean) / std
    r, c = divmod(7, 4)
    assert torch.allclose(tokens[2, 7], xn[:, 2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(-1))
    # the descriptor is the normalized image pooled to 2 x 2
    assert torch.allclose(cls[2].view(3, 2, 2)[:, 1, 0], xn[:, 4:, :4].mean(dim=(1, 2)))


def test_metadata_and_bad_input():
    tok = PixelTokenizer()
    meta = tok.metadata()
    assert meta["grid"] == [4, 4] and meta["token_dim"] == 12 and meta["cls_dim"] == 12
    with pytest.raises(ValueError, match=r"images: expected shape \(B, 3, 8, 8\)"):
        tok.encode(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"tokens: expected shape \(B, 16, 12\)"):
        tok.decode(torch.rand(2, 16, 11))
    with pytest.raises(ValueError, match="patch_size and pool must divide"):
        PixelTokenizer(image_size=8, patch_size=3)
