import itertools

import pytest
import torch

from mmfm.train.schedule import STEPS_PER_EPOCH, EMASchedule, LRSchedule, derive_batch, steps_per_epoch


def linear(base, final, start, end, s):
    """The decay phase written independently of the code: a straight line from (start, base) to (end, final)."""
    return base + (final - base) * (s - start) / (end - start)


def test_release_defaults_are_the_mm_fm_xl_config_of_method_2_4():
    s = LRSchedule()
    # 20 / 40 / 800 epochs of 1251 steps
    assert (s.initial_steps, s.decay_start, s.decay_end) == (25_020, 50_040, 1_000_800)
    assert LRSchedule.from_epochs(1251) == s
    assert (s.base_lr, s.initial_lr, s.final_lr) == (2e-4, 4e-4, 2e-5)
    expected = {
        0: 4e-4, 1: 4e-4, 24_999: 4e-4, 25_019: 4e-4,         # the 25k checkpoint: entirely at 4e-4
        25_020: 2e-4, 50_039: 2e-4, 50_040: 2e-4,            # constant until decay_start_epoch 40
        50_041: 2e-4 - 1.8e-4 / 950_760,                     # one step of decay
        100_000: 2e-4 - 1.8e-4 * 49_960 / 950_760,           # ≈ 1.905e-4 (docs/method.md §2.4)
        525_420: 1.1e-4,                                     # halfway between epochs 40 and 800
        1_000_799: 2e-5 + 1.8e-4 / 950_760,
        1_000_800: 2e-5, 5_000_000: 2e-5,
    }
    for step, lr in expected.items():
        assert s(step) == pytest.approx(lr, rel=1e-12, abs=0), step
    assert s(100_000) == pytest.approx(1.905e-4, rel=1e-3)
    # the constant phases are exact, not approximately so
    assert s(0) == 4e-4 and s(25_020) == 2e-4 and s(50_040) == 2e-4 and s(1_000_800) == 2e-5


def test_interior_steps_follow_the_line_and_decrease():
    s = LRSchedule(base_lr=1.0, final_lr=0.25, initial_lr=3.0, initial_steps=2, decay_start=4, decay_end=8)
    got = [s(k) for k in range(11)]
    hand = [3.0, 3.0, 1.0, 1.0] + [linear(1.0, 0.25, 4, 8, k) for k in range(4, 8)] + [0.25] * 3
    assert got == pytest.approx(hand, rel=1e-15)
    assert hand[4:9] == [1.0, 0.8125, 0.625, 0.4375, 0.25]
    assert all(a >= b for a, b in zip(got[2:], got[3:]))


def test_lambda_lr_sets_exactly_the_schedule_and_apply_sets_every_group():
    s = LRSchedule(base_lr=3e-4, final_lr=1e-5, initial_lr=5e-4, initial_steps=3, decay_start=5, decay_end=12)
    p = torch.nn.Parameter(torch.zeros(2))
    q = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [q]}], lr=s.base_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, s.factor)
    for step in range(16):  # the lr of update `step` is set before it, then scheduler.step() follows
        assert [g["lr"] for g in opt.param_groups] == [s(step)] * 2, step
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([{"params": [p], "lr": 1.0}, {"params": [q], "lr": 2.0}])
    assert s.apply(opt2, 7) == s(7)
    assert [g["lr"] for g in opt2.param_groups] == [s(7), s(7)]


def test_other_configs_of_method_2_4():
    guide = LRSchedule.constant(2e-4)
    assert {guide(k) for k in (0, 1, 25_020, 10**7)} == {2e-4}
    rae = LRSchedule(initial_lr=2e-4, initial_steps=0)      # constant 2e-4 for 40 epochs, then decay
    assert rae(0) == rae(50_039) == 2e-4 and rae(1_000_800) == 2e-5
    with pytest.raises(ValueError, match="0 <= initial_steps <= decay_start"):
        LRSchedule(initial_steps=10, decay_start=5)
    with pytest.raises(ValueError, match="step must be >= 0"):
        LRSchedule()(-1)
    with pytest.raises(ValueError):
        LRSchedule(base_lr=0)


def test_ema_schedule_switches_at_the_initial_phase():
    e = EMASchedule()
    assert (e.initial_decay, e.decay, e.initial_steps) == (0.999, 0.9995, 25_020)
    assert EMASchedule.from_epochs(STEPS_PER_EPOCH) == e
    assert [e(k) for k in (0, 25_019, 25_020, 100_000)] == [0.999, 0.999, 0.9995, 0.9995]
    gaussian = EMASchedule(initial_decay=0.995)
    assert gaussian(0) == 0.995 and gaussian(25_020) == 0.9995
    assert {EMASchedule.constant(0.9995)(k) for k in (0, 5, 10**6)} == {0.9995}
    with pytest.raises(ValueError):
        EMASchedule(decay=1.5)


@pytest.mark.parametrize("global_batch, world, most, expected", [
    (1024, 8, 4, (4, 32)),      # DINOv2 mode-conditional
    (1024, 8, 16, (16, 8)),     # DINOv2 unconditional + GMM, SigLIP2
    (1024, 8, 64, (64, 2)),     # DiTDH-S guides
    (1024, 8, 1000, (128, 1)),
    (1024, 1, 48, (32, 32)),    # 32 is the largest divisor of 1024 that is <= 48
    (96, 4, 10, (8, 3)),        # 24 per rank: 8 divides it, 9 and 10 do not
    (14, 2, 4, (1, 7)),         # 7 per rank, a prime above the maximum
    (1024, 1024, 4, (1, 1)),
])
def test_derive_batch(global_batch, world, most, expected):
    micro, accum = derive_batch(global_batch, world, most)
    assert (micro, accum) == expected
    assert micro * accum * world == global_batch and micro <= most


def test_derive_batch_keeps_the_global_batch_for_every_world_size_or_refuses():
    for g, w, m in itertools.product([1, 12, 96, 1000, 1024], [1, 2, 3, 5, 8, 16], [1, 3, 7, 64]):
        if g % w:
            with pytest.raises(ValueError, match=f"global batch {g} cannot be split evenly over {w} ranks"):
                derive_batch(g, w, m)
        else:
            micro, accum = derive_batch(g, w, m)
            assert micro * accum * w == g and 1 <= micro <= m
            # no larger micro-batch within the limit divides the per-rank batch
            assert not any((g // w) % b == 0 for b in range(micro + 1, min(m, g // w) + 1))
    for bad in [(0, 1, 1), (8, 0, 1), (8, 1, 0)]:
        with pytest.raises(ValueError, match="must be >= 1"):
            derive_batch(*bad)


def test_steps_per_epoch_is_1251_for_the_release_settings():
    for micro, accum in [(4, 32), (16, 8), (64, 2)]:
        assert steps_per_epoch(1_281_167, 8, micro, accum) == STEPS_PER_EPOCH == 1251
    # 10 images on 3 ranks: 4 per rank (padded), 2 micro-batches of 2, 1 step of 2 accumulations
    assert steps_per_epoch(10, 3, 2, 2) == 1
    assert steps_per_epoch(10, 3, 3, 1) == 1   # 4 // 3 = 1 micro-batch, the last one dropped
