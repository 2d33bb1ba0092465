import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture

from mmfm.gmm.em import DiagonalGMM
from mmfm.gmm.posterior import hard_labels, responsibilities


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    c = rng.standard_normal((12, 16)) * 2 + 50.0  # uncentred, like raw CLS tokens
    x = c[rng.integers(0, 12, 4000)] + rng.standard_normal((4000, 16)) * rng.uniform(0.5, 1.5, 16)
    sk = GaussianMixture(12, covariance_type="diag", random_state=0, max_iter=50).fit(x)
    return x, sk, DiagonalGMM(sk.weights_, sk.means_, sk.covariances_)


def test_hard_labels_are_sklearn_predict_for_any_block_size(fitted):
    x, sk, gmm = fitted
    src = gmm.to_source(dtype=torch.float64)
    ref = sk.predict(x)
    for rows in (1, 37, 4096):
        assert np.array_equal(hard_labels(src, x, rows=rows).numpy(), ref)


def test_posterior_matches_predict_proba_float64_and_float32(fitted):
    x, sk, gmm = fitted
    ref = sk.predict_proba(x)
    p64 = responsibilities(gmm.to_source(dtype=torch.float64), x, rows=500).numpy()
    np.testing.assert_allclose(p64, ref, atol=1e-10)
    p32 = responsibilities(gmm.to_source(dtype=torch.float32), torch.from_numpy(x).float(), rows=777).numpy()
    np.testing.assert_allclose(p32, ref, atol=1e-3)
    assert (p32.argmax(1) == ref.argmax(1)).mean() > 0.999


def test_dimension_mismatch_is_named(fitted):
    _, _, gmm = fitted
    with pytest.raises(ValueError, match="cls: rows have 15 features but the mixture has 16"):
        hard_labels(gmm.to_source(), np.zeros((3, 15)), what="cls")
