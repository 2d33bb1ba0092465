"""The plan's GPU memory of a training step against the same step measured on the CPU."""

import pytest

from mmfm.plan import memory, train_memory

SETTINGS = {
    "gaussian": dict(model="ditdh-tiny", global_batch=16, micro_batch_max=4),
    "mode": dict(model="ditdh-tiny", global_batch=16, micro_batch_max=4, source="gmm", coupling="mode-soft",
                 conditioning="mode", adaptive_weighting=True, source_precision="fp16"),
    "class": dict(model="ditdh-tiny", global_batch=16, micro_batch_max=8, conditioning="class", num_classes=7,
                  class_dropout_prob=0.1),
}
SHAPE = dict(num_tokens=16, token_dim=8, cls_dim=12, num_modes=5)


@pytest.mark.parametrize(("setting", "world"), [("gaussian", 1), ("mode", 1), ("mode", 2), ("class", 2)])
def test_plan_equals_a_measured_cpu_step(one_thread, setting, world):
    """The fake trace of one optimizer step (model, fused AdamW, EMA, DDP buckets over a fake group of
    ``world`` ranks, GMM source, adaptive weighting) against the CPU allocator's peak of the same code
    on real tensors: within 5 % (it is exact in practice)."""
    planned = train_memory._trace(SETTINGS[setting], world_size=world, fake=True, round_to=1, **SHAPE)
    measured, real = memory.cpu_allocator_peak(train_memory._trace, SETTINGS[setting], world_size=world,
                                               fake=False, round_to=1, **SHAPE)
    assert abs(planned["peak_bytes"] - measured) <= 0.05 * measured
    assert real["peak_bytes"] == measured  # the tracker on real tensors sees what the allocator sees
    assert sum(planned["parts"].values()) == planned["peak_bytes"]
    assert (planned["parts"]["ddp_buckets"] > 0) == (world > 1)
    assert (planned["parts"]["gmm_source"] > 0) == (setting == "mode")


def test_parts_have_the_sizes_of_what_they_hold():
    s = SETTINGS["mode"]
    r = train_memory.train_rank_memory(s, world_size=2, **SHAPE)
    from mmfm.models.ditdh import build_ditdh, count_parameters

    n = count_parameters(build_ditdh("ditdh-tiny", in_channels=8, num_tokens=16, conditioning="mode", num_classes=5))
    trainable = sum(p.numel() for p in build_ditdh("ditdh-tiny", in_channels=8, num_tokens=16, conditioning="mode",
                                                   num_classes=5).parameters() if p.requires_grad)
    parts = r["parts"]
    blocks = lambda b: -(-b // 512) * 512  # noqa: E731
    tensors = 512 * 200  # block rounding of each tensor, at most 512 bytes for each of fewer than 200
    assert 4 * n <= parts["parameters"] <= 4 * n + tensors  # (and the RoPE tables)
    assert 4 * n <= parts["ema"] <= 4 * n + tensors  # every floating parameter, frozen ones too
    assert 8 * trainable <= parts["optimizer_state"] <= 8 * trainable + 3 * tensors  # two fp32 moments each
    assert parts["gmm_source"] == blocks(5 * 8) + blocks(5 * 16 * 8 * 2) + blocks(5 * 4)  # weights, fp16 means, var
    assert r["micro_batch"] * r["accumulation"] * 2 == 16
    assert r["need_bytes"] == memory.gpu_need(r["peak_bytes"])
    assert r["flops_per_step"] == pytest.approx(r["flops_per_sample"] * 8)
