"""The Laplacian pyramid of the token grid (spec T1): exact reconstruction in float64 for 1, 2 and 3 stages, linearity,
``down`` = bilinear x1/2 = 2 x 2 average pooling, the stage shapes, the identity at one stage, the stage limit of a
grid, the matrix form, and nearest-upsampling's left inverse (bit for bit)."""

import pytest
import torch
import torch.nn.functional as F

from mmfm.flow.pyramid import LaplacianPyramid, down


@pytest.mark.parametrize("stages, tokens", [(1, 16), (2, 16), (3, 16), (2, 256), (3, 256), (5, 256)])
def test_recompose_inverts_decompose(stages, tokens):
    gen = torch.Generator().manual_seed(stages)
    x = torch.randn(3, tokens, 5, generator=gen, dtype=torch.float64)
    p = LaplacianPyramid(stages, tokens)
    parts = p.decompose(x)
    side = int(tokens ** 0.5)
    assert [t.shape for t in parts] == [(3, (side >> (stages - 1 - s)) ** 2, 5) for s in range(stages)]
    assert float((p.recompose(parts) - x).abs().max()) <= 1e-12
    assert torch.equal(p.unpack(p.pack(parts))[0], parts[0]) and p.pack(parts).shape == (3, p.packed_tokens, 5)
    if stages == 1:
        assert torch.equal(parts[0], x)
    y = torch.randn(3, tokens, 5, generator=gen, dtype=torch.float64)  # linear
    both = p.decompose(2.0 * x - 3.0 * y)
    for a, b, c in zip(both, parts, p.decompose(y)):
        torch.testing.assert_close(a, 2.0 * b - 3.0 * c, rtol=0, atol=1e-12)


def test_stage_layouts_and_limits():
    assert LaplacianPyramid(2, 256).sides == [8, 16] and LaplacianPyramid(3, 256).sides == [4, 8, 16]
    assert LaplacianPyramid(2, 16).sides == [2, 4]
    assert [LaplacianPyramid.max_stages(s) for s in (1, 2, 4, 6, 12, 16)] == [1, 2, 3, 2, 3, 5]
    with pytest.raises(ValueError, match=r"dfm_stages: 4 stages need a grid side divisible by 2\^3 = 8; the 4 x 4"):
        LaplacianPyramid(4, 16)
    with pytest.raises(ValueError, match=r"dfm_stages: 3 stages need a grid side divisible by 2\^2 = 4; the 6 x 6 grid allows at most 2"):
        LaplacianPyramid(3, 36)
    with pytest.raises(ValueError, match="num_tokens: a pyramid needs a square token grid"):
        LaplacianPyramid(2, 12)


def test_down_is_bilinear_half_and_average_pooling():
    g = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    bilinear = F.interpolate(g, scale_factor=0.5, mode="bilinear", align_corners=False, antialias=False)
    manual = (g[..., ::2, ::2] + g[..., 1::2, ::2] + g[..., ::2, 1::2] + g[..., 1::2, 1::2]) / 4
    torch.testing.assert_close(down(g), bilinear, rtol=0, atol=1e-14)
    torch.testing.assert_close(down(g), manual, rtol=0, atol=1e-14)


def test_matrix_and_upsample_pool():
    p = LaplacianPyramid(3, 16)
    a = p.matrix()
    assert a.shape == (21, 16) and torch.linalg.matrix_rank(a) == 16
    x = torch.randn(4, 16, 1, dtype=torch.float64)
    torch.testing.assert_close(p.pack(p.decompose(x))[..., 0], x[..., 0] @ a.T, rtol=0, atol=1e-12)
    for s, n in enumerate(p.sizes):
        z = torch.randn(2, n, 3)
        up = p.upsample(z, s)
        assert up.shape == (2, 16, 3) and torch.equal(p.pool(up, s), z)
        torch.testing.assert_close(p.pool(x.expand(-1, -1, 3).float()[:2], s),  # the mean over each block
                                   F.avg_pool2d(x[:2, :, 0].float().reshape(2, 1, 4, 4), 4 // p.sides[s])
                                   .flatten(2).transpose(1, 2).expand(-1, -1, 3))
