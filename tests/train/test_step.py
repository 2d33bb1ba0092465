"""The loop's optimizer step: no host sync, a non-finite step never applied, rank-invariant noise."""

import numpy as np
import pytest
import torch

from mmfm import _checks
from mmfm.bench.train import HostSyncCounter, _bench_step
from mmfm.flow.sources import GaussianMixtureSource, GaussianSource, row_noise
from mmfm.train import objective as objective_module  # where the step's loss is computed
from mmfm.train.step import noise_seeds


@pytest.mark.parametrize("conditioning", ["none", "class", "mode"])
def test_a_step_reads_nothing_back(one_thread, conditioning):
    """Counted, as a GPU step would run (value checks skipped as on an accelerator): no item(), no
    data-dependent shape, no copy to the host; with accumulation, label dropout and the adaptive weighting."""
    step, inputs, _ = _bench_step("ditdh-tiny", 4, 2, 8, 16, torch.device("cpu"), False, conditioning, 5, 0)
    step(inputs["x1"], inputs["cls"], inputs["label"], step=0)
    counter = HostSyncCounter()
    with _checks.as_on_accelerator(), counter:
        for at in (1, 2):
            out = step(inputs["x1"], inputs["cls"], inputs["label"], step=at)
    assert counter.count == 0, counter.ops
    assert bool(out["finite"]) and out["loss"].ndim == 0


def test_the_counter_counts_reads():
    counter = HostSyncCounter()
    x = torch.arange(5.0)
    with counter:
        float(x.sum())
        torch.nonzero(x > 2)
        bool(x.any())
    assert counter.count == 3 and counter.ops == {"_local_scalar_dense": 2, "nonzero": 1}


def test_a_non_finite_step_is_not_applied(one_thread, monkeypatch):
    step, inputs, model = _bench_step("ditdh-tiny", 4, 1, 8, 16, torch.device("cpu"), False, "mode", 5, 0)
    step(inputs["x1"], inputs["cls"], inputs["label"], step=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {id(p): s["exp_avg"].clone() for p, s in step.optimizer.state.items()}
    counts = {id(p): s["step"].clone() for p, s in step.optimizer.state.items()}
    table = step.weighting.ema.clone()
    real = objective_module.velocity_loss
    monkeypatch.setattr(objective_module, "velocity_loss", lambda v, u, **kw: real(v, u, **kw) * float("nan"))
    out = step(inputs["x1"], inputs["cls"], inputs["label"], step=1)
    assert not bool(out["finite"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, s in step.optimizer.state.items():
        assert torch.equal(s["exp_avg"], moments[id(p)]) and torch.equal(s["step"], counts[id(p)])
    assert torch.equal(step.weighting.ema, table)
    monkeypatch.setattr(objective_module, "velocity_loss", real)
    out = step(inputs["x1"], inputs["cls"], inputs["label"], step=2)
    assert bool(out["finite"]) and any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_row_noise_depends_on_the_row_only():
    seeds = noise_seeds(7, 3, 6)
    assert seeds.dtype == np.uint64 and len(set(seeds.tolist())) == 6
    assert np.array_equal(seeds, noise_seeds(7, 3, 6)) and not np.array_equal(seeds, noise_seeds(7, 4, 6))
    whole = row_noise(seeds, (4, 16))
    assert torch.equal(torch.cat([row_noise(seeds[:2], (4, 16)), row_noise(seeds[2:], (4, 16))]), whole)
    x = whole.flatten()
    assert abs(float(x.mean())) < 0.15 and abs(float(x.std()) - 1) < 0.1


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_draws_its_rows_of_one_global_noise(world):
    """share=(rank, world) with per-row seeds: the ranks' rows put together are the 1-rank draw."""
    g = torch.Generator().manual_seed(0)
    mix = GaussianMixtureSource(torch.full((3,), 1 / 3, dtype=torch.float64), torch.randn(3, 4, 2, generator=g),
                                torch.rand(3, generator=g) + 0.5)
    seeds = noise_seeds(1, 0, 6)
    for source in (GaussianSource((4, 2)), mix):
        one, _ = source.sample(6, generator=torch.Generator().manual_seed(5), noise=seeds)
        parts = [source.sample(6 // world, generator=torch.Generator().manual_seed(5), share=(r, world),
                               noise=seeds)[0] for r in range(world)]
        assert torch.equal(torch.cat(parts), one)
    with pytest.raises(ValueError, match="noise: expected 6 per-row seeds"):
        GaussianSource((4, 2)).sample(3, share=(0, 2), noise=seeds[:4])


def test_a_state_of_a_non_fused_adamw_still_steps_fused(one_thread):
    """Checkpoints written before the step used the fused AdamW load into it and keep it fused."""
    step, inputs, model = _bench_step("ditdh-tiny", 4, 1, 8, 16, torch.device("cpu"), False, "none", 5, 0)
    old = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step.optimizer.load_state_dict(old.state_dict())
    assert step.optimizer.param_groups[0]["fused"] is None
    from mmfm.train.step import TrainStep

    again = TrainStep(model=model, raw=model, optimizer=step.optimizer, scheduler=step.scheduler, ema=step.ema,
                      coupling=step.coupling, times=step.times, path=step.path, generator=step.generator,
                      global_batch=4, micro=4, accumulation=1)
    assert again.optimizer.param_groups[0]["fused"] is True
    assert bool(again(inputs["x1"], step=0)["finite"])
