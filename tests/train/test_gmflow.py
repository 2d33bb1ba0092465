"""``method: gmflow`` in the training loop and the sampler: GMFlow's combination rules, training and export on the
2-mode toy (the mean view equals the mixture's mean), bit-identical resume, two gloo ranks = one process,
``gm_init`` replicating a velocity run (bit-exact mean at the start), and GM-ODE / GM-SDE through
``sample_latents`` (one sub-step of order 1 is Euler on the mean)."""

import pytest
import torch

from toyrun import (assert_close_weights, config, metric_steps, one_batch_shard, train_cut_and_resume,
                    train_two_gloo_ranks, weights)

from mmfm.gmm.files import load_source
from mmfm.models.velocity import load_gm_model, load_velocity_model, read_metadata
from mmfm.sample import sample_latents
from mmfm.train.config import TrainConfig
from mmfm.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")
GM = dict(method="gmflow", model="ditdh-tiny", gm_components=4, gm_groups=2, gm_logstd_hidden=16)


@pytest.mark.parametrize("change, message", [
    (dict(coupling="ot", conditioning="none", source="gaussian", gmm=None, cls_gmm=None),
     "coupling: 'ot' cannot be used with method 'gmflow': minibatch OT pairs"),
    (dict(conditioning="none"), "gm_allow_approx: a GMM source with conditioning 'none' is approximate"),
    (dict(gm_trans_ratio=0.0), "gm_trans_ratio: expected a value in (0, 1]"),
    (dict(model="mlp", conditioning="none", gm_allow_approx=True), "model: method 'gmflow' needs a DiTDH preset"),
    (dict(gm_groups=0), "gm_groups: expected a positive integer"),
    (dict(method="gm"), "method: expected one of ['fm', 'gmflow', 'dmf', 'dfm']"),
])
def test_combination_rules(toy, change, message):
    root, _ = toy
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        TrainConfig.from_dict({**config(root, "mode", **GM), **change})
    # the approximate combination runs when asked for, the exact ones always
    TrainConfig.from_dict({**config(root, "mode", **GM), "conditioning": "none", "gm_allow_approx": True})
    TrainConfig.from_dict(config(root, "gaussian", **GM))


def test_gm_groups_default_and_check():
    cfg = TrainConfig(method="gmflow", model="ditdh-tiny")
    assert (cfg.gm_groups_for(768), cfg.gm_groups_for(12), cfg.gm_groups_for(2)) == (48, 3, 2)
    with pytest.raises(ValueError, match="gm_groups: 5 does not divide the token width 12"):
        TrainConfig(method="gmflow", model="ditdh-tiny", gm_groups=5).gm_groups_for(12)


@pytest.mark.parametrize("setting, ratio", [("mode", 0.5), ("gaussian", 1.0)])
def test_trains_exports_and_resumes_bit_identically(toy, tmp_path, setting, ratio):
    root, _ = toy
    cfg = config(root, setting, steps=12, checkpoint_every=4, gm_trans_ratio=ratio, **GM)
    ref = train_cut_and_resume(cfg, root, tmp_path)
    assert metric_steps(tmp_path / "cut") == list(range(1, 13))
    assert all(torch.isfinite(torch.tensor(ref["losses"])))
    meta = read_metadata(ref["ema"])
    assert {k: meta[k] for k in ("method", "head", "gm_components", "gm_groups", "time_convention")} == \
        {"method": "gmflow", "head": "gm", "gm_components": 4, "gm_groups": 2, "time_convention": "paper"}
    mean_view, gm_net = load_velocity_model(ref["ema"]), load_gm_model(ref["ema"])
    x, t = torch.randn(5, 4, 2), torch.rand(5)
    cond = {"y": torch.tensor([0, 1, 1, 0, 1])} if setting == "mode" else {}
    out = gm_net(x, t, **cond)
    assert out.means.shape == (5, 4, 4, 2) and out.logits.shape == (5, 4, 4, 2) and out.logstd.shape == (5,)
    assert torch.equal(mean_view(x, t, **cond), out.mean())


def test_the_mean_of_a_replicated_head_is_the_velocity_run(toy, tmp_path):
    """``gm_init`` with no noise: the GMFlow export at step 0 is the velocity run's network (its mean, to the bit:
    J = 4 equal heads with weights 1/4 each)."""
    root, _ = toy
    fm = train(config(root, "mode", steps=6, model="ditdh-tiny"), root / "shards", tmp_path / "fm", progress=False,
               device="cpu")
    gm = train(config(root, "mode", steps=0, gm_init=str(fm["ema"]), gm_mean_init_noise=0.0, **GM), root / "shards",
               tmp_path / "gm", progress=False, device="cpu")
    v, m = load_velocity_model(fm["ema"]), load_velocity_model(gm["ema"])
    x, t, y = torch.randn(6, 4, 2), torch.rand(6), torch.tensor([0, 1, 0, 1, 1, 0])
    assert float(v(x, t, y=y).abs().max()) > 1e-3  # the velocity run learned something: the test has teeth
    assert torch.equal(v(x, t, y=y), m(x, t, y=y))
    out = load_gm_model(gm["ema"])(x, t, y=y)
    assert torch.equal(out.logits, torch.zeros_like(out.logits)) and torch.equal(out.logstd, torch.zeros(6))
    # another network shape is refused, naming the key
    with pytest.raises(ValueError, match="gm_init: .* is a ditdh-tiny over .* this run is a ditdh-demo"):
        train(config(root, "mode", steps=0, gm_init=str(fm["ema"]), **{**GM, "model": "ditdh-demo"}),
              root / "shards", tmp_path / "bad", progress=False, device="cpu")


@pytest.mark.slow
def test_two_gloo_ranks_give_the_weights_of_one_process(toy, tmp_path):
    """The transition loss under DDP (its forward-transition noise from per-row seeds): 2 gloo ranks give the
    weights of one process for the same global batch."""
    root, _ = toy
    one = one_batch_shard(root, tmp_path / "one-batch")
    cfg = config(root, "mode", global_batch=16, micro_batch_max=4, steps=4, checkpoint_every=4, shuffle=False,
                 **GM)
    train_two_gloo_ranks(cfg, one, tmp_path / "two", tmp_path)
    res = train(cfg, one, tmp_path / "one", progress=False, device="cpu")
    assert_close_weights(weights(tmp_path / "two" / "step-0000004"), weights(res["checkpoint"]))


def test_gm_samplers_through_sample_latents(toy, tmp_path):
    root, _ = toy
    run = train(config(root, "mode", steps=8, **GM), root / "shards", tmp_path / "run", progress=False, device="cpu")
    net, mean = load_gm_model(run["ema"]), load_velocity_model(run["ema"])
    src = load_source(root / "spatial.safetensors")
    euler = sample_latents(mean, src, 24, seed=1, conditioning="mode", steps=4, batch_size=8)
    one = sample_latents(net, src, 24, seed=1, conditioning="mode", steps=4, method="gm-ode", batch_size=8,
                         gm={"substeps": 1, "order": 1})
    torch.testing.assert_close(one.latents, euler.latents, rtol=1e-5, atol=1e-5)
    assert torch.equal(one.modes, euler.modes) and one.nfe == euler.nfe == 12  # 3 batches x 4 network calls
    for method in ("gm-ode", "gm-sde"):
        got = sample_latents(net, src, 24, seed=1, conditioning="mode", steps=4, method=method, batch_size=8)
        assert got.nfe == 12 and torch.isfinite(got.latents).all()
        assert float((got.latents - euler.latents).abs().max()) > 1e-4  # sub-steps / noise change the samples
