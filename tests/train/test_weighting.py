"""Adaptive per-mode loss weighting (docs/method.md §3.7): warm-up, EMA, focal table, state, and training."""

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


def test_warmup_in_optimizer_steps_from_the_releases_micro_batches():
    from mmfm.train.schedule import derive_batch
    from mmfm.train.weighting import RELEASE_WARMUP_MICRO_BATCHES, warmup_steps_from_micro_batches

    # the release's runs, 8 GPUs at global batch 1024: (micro-batch max) -> accumulation -> warm-up steps
    for micro_max, accumulation, steps in ((4, 32, 78), (8, 16, 156), (16, 8, 312), (32, 4, 625), (64, 2, 1250)):
        micro, accum = derive_batch(1024, 8, micro_max)
        assert (micro, accum) == (micro_max, accumulation)
        assert warmup_steps_from_micro_batches(RELEASE_WARMUP_MICRO_BATCHES, accum) == steps
        # the warm-up ends within the optimizer step holding the release's 2,500th micro-batch
        assert steps * accum <= 2500 < (steps + 1) * accum
    # the guides here run on 4 GPUs: accumulation 4, where the release's guides had 2 (8 GPUs x 64 x 2)
    assert derive_batch(1024, 4, 64) == (64, 4) and warmup_steps_from_micro_batches(2500, 4) == 625
    for bad in ((2500, 0), (-1, 4), (2500.0, 4), (True, 4)):
        with pytest.raises(ValueError, match="micro_batches|accumulation"):
            warmup_steps_from_micro_batches(*bad)


# The release's grad_accum_steps per preset run (the fork's configs/stage2/training/ImageNet256, 8 GPUs, batch
# 1024): XL DINOv2 mode 32, uncond-GMM 8; SigLIP2 8 / 4; MAE 16 / 4; the DiTDH-S guides 2 (DINOv2's, used
# for every encoder here). Runs without adaptive weighting (the Gaussian baselines) are absent.
RELEASE_ACCUMULATION = {
    "imagenet256-dinov2": {"gmm": 8, "mode-gmm": 32, "guide-gmm": 2, "guide-mode-gmm": 2,
                           "gm-mode-gmm": 32,   # GMFlow on mode-gmm: its batch arithmetic
                           "dmf-mode-gmm": 32, "dfm-mode-gmm": 32},  # DMF, DFM on mode-gmm: the same
    "imagenet256-siglip2": {"gmm": 4, "mode-gmm": 8, "guide-gmm": 2, "guide-mode-gmm": 2},
    "imagenet256-mae": {"gmm": 4, "mode-gmm": 16, "guide-gmm": 2, "guide-mode-gmm": 2},
}


@pytest.mark.parametrize("preset", sorted(RELEASE_ACCUMULATION))
def test_presets_warm_up_for_the_releases_optimizer_steps(preset):
    """Each preset run's adaptive_warmup_steps is the release's 2,500 micro-batches at the *release's*
    accumulation, whatever accumulation the preset's own resources give (the guides: 4 GPUs, accumulation 4)."""
    from pathlib import Path

    import yaml

    from mmfm import config as mc
    from mmfm.train.config import TrainConfig
    from mmfm.train.schedule import derive_batch
    from mmfm.train.weighting import warmup_steps_from_micro_batches

    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "workflow" / "presets" / f"{preset}.yaml").read_text())
    weighted = {r for r in mc.run_names(cfg) if mc.train_settings(cfg, r).get("adaptive_weighting")}
    assert weighted == set(RELEASE_ACCUMULATION[preset])
    for run, accumulation in RELEASE_ACCUMULATION[preset].items():
        settings = mc.with_gmm_files(mc.train_settings(cfg, run), "s.safetensors", "c.safetensors")
        tc = TrainConfig.from_dict(settings)
        assert tc.adaptive_warmup_steps == warmup_steps_from_micro_batches(2500, accumulation), run
        world = mc.resources(cfg, "train", run)["gpu"]
        ours = derive_batch(tc.global_batch, world, tc.micro_batch_max)[1]
        if run.startswith("guide"):  # 4 GPUs x 64 x 4: converting at this accumulation would halve the warm-up
            assert (world, ours) == (4, 4) and tc.adaptive_warmup_steps == 1250
        assert tc.global_batch == 1024  # the release's, so equal steps are equal images seen
