"""``method: dmf`` in the training loop and the sampler: the keys' rules, the fine-tune from a velocity run (at the
start, the flow map at ``r = t`` is that run's network, to the bit), training and bit-identical resume with the JVP
and with the central difference, two gloo ranks = one process (the JVP on the module under DDP, one backward),
and the flow-map samplers through ``sample_latents`` (``flowmap`` of a non-DMF export refused)."""

import pytest
import torch

from toyrun import (assert_close_weights, config, metric_steps, one_batch_shard, train_cut_and_resume,
                    train_two_gloo_ranks, weights)

from mmfm.gmm.files import load_source
from mmfm.models.velocity import load_flowmap_model, load_velocity_model, read_metadata
from mmfm.sample import sample_latents
from mmfm.train.config import TrainConfig
from mmfm.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")
DMF = dict(method="dmf", model="ditdh-tiny", lr=1e-3)


@pytest.mark.parametrize("change, message", [
    (dict(dmf_depth=0), r"dmf_depth: expected an integer in \[1, 2\]"),
    (dict(dmf_depth=3), r"dmf_depth: expected an integer in \[1, 2\]"),
    (dict(model="mlp", conditioning="none"), "model: method 'dmf' needs a DiTDH preset"),
    (dict(dmf_derivative="autograd"), r"dmf_derivative: expected one of \['jvp', 'fd'\]"),
    (dict(dmf_guidance="mg"), r"dmf_guidance: expected one of \['none', 'ag-mg', 'ag-distill'\]"),
    (dict(dmf_time_t=[0.0, 0.0]), r"dmf_time_t: expected \[mean, std\] of logit\(t\) with std > 0"),
    (dict(dmf_guidance_interval=[0.5, 0.2]), "dmf_guidance_interval: expected 0 <= lo < hi <= 1"),
    (dict(dmf_guidance="ag-distill", dmf_guide="g.safetensors"), "dmf_init: dmf_guidance 'ag-distill' distils"),
])
def test_keys(toy, change, message):
    root, _ = toy
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict({**config(root, "mode", **DMF), **change})
    cfg = TrainConfig.from_dict(config(root, "mode", **DMF))
    assert cfg.dmf_depth_of() == 1 and TrainConfig(method="dmf", model="ditdh-xl").dmf_depth_of() == 20
    assert cfg.proposal_shift(4 * 2) == 1.0 and TrainConfig(method="dmf", dmf_proposal_shift=2.0).proposal_shift(8) == 2


def _fm_run(root, tmp_path, setting="mode", steps=6):
    return train(config(root, setting, steps=steps, model="ditdh-tiny"), root / "shards", tmp_path / "fm",
                 progress=False, device="cpu")


def test_the_flow_map_starts_as_the_velocity_run(toy, tmp_path):
    """``dmf_init`` at step 0: the DMF export at ``r = t`` (its velocity view and its flow map) is the velocity run's
    network to the bit, its log-variance head zero; ``r != t`` is another output. Another shape is refused."""
    root, _ = toy
    fm = _fm_run(root, tmp_path)
    dmf = train(config(root, "mode", steps=0, dmf_init=str(fm["ema"]), **DMF), root / "shards", tmp_path / "dmf",
                progress=False, device="cpu")
    meta = read_metadata(dmf["ema"])
    assert (meta["method"], meta["dmf_depth"], meta["time_convention"]) == ("dmf", 1, "paper")
    v, u, flow = load_velocity_model(fm["ema"]), load_velocity_model(dmf["ema"]), load_flowmap_model(dmf["ema"])
    x, t, y = torch.randn(6, 4, 2), torch.rand(6) * 0.5, torch.tensor([0, 1, 0, 1, 1, 0])
    assert float(v(x, t, y=y).abs().max()) > 1e-3  # the velocity run learned something: the test has teeth
    assert torch.equal(v(x, t, y=y), u(x, t, y=y))
    assert torch.equal(v(x, t, y=y), flow(x, t, r=t, y=y))
    out, logvar = flow(x, t, r=t + 0.4, y=y, return_logvar=True)
    assert torch.equal(logvar, torch.zeros(6)) and not torch.equal(out, v(x, t, y=y))
    with pytest.raises(ValueError, match="dmf_init: .* is a ditdh-tiny over .* this run is a ditdh-demo"):
        train(config(root, "mode", steps=0, dmf_init=str(fm["ema"]), **{**DMF, "model": "ditdh-demo"}),
              root / "shards", tmp_path / "bad", progress=False, device="cpu")
    with pytest.raises(ValueError, match=r"not a DMF flow map .*method 'fm'.*sample this one with euler"):
        load_flowmap_model(fm["ema"])


def test_ag_guidance_without_a_guide_stops_before_training(toy, tmp_path):
    root, _ = toy
    with pytest.raises(ValueError, match="dmf_guide: dmf_guidance 'ag-mg' needs the autoguide"):
        train(config(root, "mode", steps=2, dmf_guidance="ag-mg", **DMF), root / "shards", tmp_path / "run",
              progress=False, device="cpu")
    assert not (tmp_path / "run" / "ema.safetensors").exists()


@pytest.mark.parametrize("derivative", ["jvp", "fd"])
def test_fine_tunes_and_resumes_bit_identically(toy, tmp_path, derivative):
    root, _ = toy
    fm = _fm_run(root, tmp_path)
    cfg = config(root, "mode", steps=8, checkpoint_every=4, dmf_init=str(fm["ema"]), dmf_derivative=derivative,
                 **DMF)
    ref = train_cut_and_resume(cfg, root, tmp_path)
    assert metric_steps(tmp_path / "cut") == list(range(1, 9))
    assert all(torch.isfinite(torch.tensor(ref["losses"])))
    # fine-tuning moved the log-variance head and the weights away from the init
    w = weights(ref["checkpoint"])
    assert float(w["model.logvar_head.linear.weight"].abs().max()) > 0


@pytest.mark.slow
def test_two_gloo_ranks_give_the_weights_of_one_process(toy, tmp_path):
    """The JVP runs on the module under DDP, the diagonal branch through DDP, one backward: 2 gloo ranks give the
    weights of one process for the same global batch (its (t, r) pairs from the shared generator, its second source
    draw from per-row seeds)."""
    root, _ = toy
    fm = _fm_run(root, tmp_path)
    one = one_batch_shard(root, tmp_path / "one-batch")
    cfg = config(root, "mode", global_batch=16, micro_batch_max=4, steps=4, checkpoint_every=4, shuffle=False,
                 dmf_init=str(fm["ema"]), **DMF)
    a, b = train_two_gloo_ranks(cfg, one, tmp_path / "two", tmp_path)
    assert a["losses"] == b["losses"] and (a["world"], a["micro"], a["accum"]) == (2, 4, 2)
    res = train(cfg, one, tmp_path / "one", progress=False, device="cpu")
    two, single = weights(tmp_path / "two" / "step-0000004"), weights(res["checkpoint"])
    assert_close_weights(two, single)
    moved = float((single["model.logvar_head.linear.weight"]).abs().max())
    assert moved > 1e-4, moved  # the comparison has teeth: the new head moved off its zero init


def test_flowmap_samplers_through_sample_latents(toy, tmp_path):
    """``flowmap`` at n steps calls the network n times per batch; at one step it is the jump ``x0 + U(x0, 0, 1)``;
    ``flowmap-restart`` at one step is the same jump."""
    root, _ = toy
    fm = _fm_run(root, tmp_path)
    run = train(config(root, "mode", steps=4, dmf_init=str(fm["ema"]), **DMF), root / "shards", tmp_path / "dmf",
                progress=False, device="cpu")
    flow = load_flowmap_model(run["ema"])
    src = load_source(root / "spatial.safetensors")
    four = sample_latents(flow, src, 24, seed=1, conditioning="mode", steps=4, method="flowmap", batch_size=8)
    assert four.nfe == 12 and four.latents.shape == (24, 4, 2)  # 3 batches x 4 network calls
    one = sample_latents(flow, src, 24, seed=1, conditioning="mode", steps=1, method="flowmap", batch_size=8)
    restart = sample_latents(flow, src, 24, seed=1, conditioning="mode", steps=1, method="flowmap-restart",
                             batch_size=8)
    assert torch.equal(one.modes, restart.modes)
    torch.testing.assert_close(one.latents, restart.latents)
    # by hand: the starts of seed 1, one jump from 0 to 1
    from mmfm.sample import draw_starts

    x0, k, _ = draw_starts(src, list(range(24)), 1, conditioning="mode")
    with torch.no_grad():
        jump = x0 + flow(x0, torch.zeros(24), r=torch.ones(24), y=k)
    torch.testing.assert_close(one.latents, jump, rtol=1e-5, atol=1e-5)
