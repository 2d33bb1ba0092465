"""Adaptive per-mode loss weighting (method.md §3.7): warm-up, EMA, focal table, state, and training."""

import json

import numpy as np
import pytest
import torch

from mmfm.train.weighting import AdaptiveModeWeighting, mode_sums


def test_mode_sums_are_per_mode_sums_and_counts():
    sums, counts = mode_sums(torch.tensor([2, 0, 2, 2]), torch.tensor([1.0, 4.0, 2.0, 3.0]), 4)
    assert sums.tolist() == [4.0, 0.0, 6.0, 0.0] and counts.tolist() == [1.0, 0.0, 3.0, 0.0]


def test_warmup_ema_and_table_match_hand_computed_values():
    w = AdaptiveModeWeighting(4, decay=0.9, warmup_steps=2, gamma=2.0, clamp=(0.3, 3.0))
    modes = torch.tensor([0, 1, 1, 2])
    assert torch.equal(w.weights(modes), torch.ones(4))                 # warm-up: plain mean
    w.update(torch.tensor([0, 1, 1]), torch.tensor([1.0, 2.0, 4.0]))
    assert torch.equal(w.weights(modes), torch.ones(4))
    w.update(torch.tensor([0, 2]), torch.tensor([3.0, 20.0]))
    # end of warm-up: per-mode averages, mode 3 (never seen) gets the average of all 5 samples
    np.testing.assert_allclose(w.ema.numpy(), [2.0, 3.0, 20.0, 30.0 / 5])
    w.update(torch.tensor([1, 1, 3]), torch.tensor([5.0, 7.0, 1.0]))
    ema = np.array([2.0, 0.9 * 3 + 0.1 * 6, 20.0, 0.9 * 6 + 0.1 * 1])  # absent modes keep their value
    np.testing.assert_allclose(w.ema.numpy(), ema)
    r = (ema / ema.mean()) ** 2
    table = np.clip(r / r.mean(), 0.3, 3.0)
    assert table.min() == 0.3 and table.max() == 3.0  # both bounds bite here
    np.testing.assert_allclose(w.table().numpy(), table)
    np.testing.assert_allclose(w.weights(modes).numpy(), table[[0, 1, 1, 2]], rtol=1e-6)


def test_state_round_trips_exactly_through_json():
    a = AdaptiveModeWeighting(5, decay=0.99, warmup_steps=1)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        a.update(torch.randint(0, 5, (16,), generator=g), torch.rand(16, generator=g, dtype=torch.float64))
    b = AdaptiveModeWeighting(5, decay=0.99, warmup_steps=1)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.updates == a.updates and torch.equal(b.ema, a.ema) and torch.equal(b.table(), a.table())
    with pytest.raises(ValueError, match="modes"):
        AdaptiveModeWeighting(6).load_state_dict(a.state_dict())
