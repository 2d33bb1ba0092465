"""Distances of decoded samples in the latent space (the workflow's evaluate rule)."""

import numpy as np
import pytest
import torch

from mmfm.encoders import load_tokenizer
from mmfm.metrics.frechet import FeatureStats, frechet_distance
from mmfm.train.evaluate import fd_of_images


def test_fd_of_images_reencodes_the_samples():
    tok = load_tokenizer("pixels", image_size=8, patch_size=2, pool=2)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (300, 8, 8, 3), dtype=np.uint8)
    other = np.clip(data.astype(int) + rng.integers(-40, 41, data.shape), 0, 255).astype(np.uint8)

    def tokens(images):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        return tok.encode(x)[1].reshape(len(images), -1).double().numpy()

    ref = FeatureStats(192).update(tokens(data))
    same, n = fd_of_images(data, tok, ref, batch_size=64)
    assert n == 300 and same == pytest.approx(0.0, abs=1e-6)       # the same set: distance zero
    mine = FeatureStats(192).update(tokens(other))
    got, _ = fd_of_images(other, tok, ref, batch_size=7)          # batching changes nothing
    assert got == pytest.approx(frechet_distance(mine.mu, mine.sigma, ref.mu, ref.sigma), rel=1e-9) and got > 1
    with pytest.raises(ValueError, match="uint8"):
        fd_of_images(data.astype(np.float32), tok, ref)
