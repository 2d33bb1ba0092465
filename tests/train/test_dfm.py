"""``method: dfm`` in the training loop and the sampler: the keys' rules (each error names its key), one stage is
flow matching to the bit (the same weights after training), two stages train and resume bit-identically with each
source, the export records what ``dfm-euler`` needs, and the sampler's NFE and per-sample seeds."""

import pytest
import torch

from toyrun import assert_identical, config, metric_steps, train_cut_and_resume, weights

from mmfm.gmm.files import load_source
from mmfm.models.velocity import load_dfm_model, load_velocity_model, read_metadata
from mmfm.sample import sample_latents
from mmfm.train.config import TrainConfig
from mmfm.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")
DFM = dict(method="dfm", model="ditdh-tiny", lr=1e-3)


@pytest.mark.parametrize("change, message", [
    (dict(dfm_stages=0), "dfm_stages: expected an integer >= 1"),
    (dict(dfm_stage_weights=[0.5, 0.4]), r"dfm_stage_weights: the probabilities must sum to 1"),
    (dict(dfm_stage_weights=[1.0]), r"dfm_stage_weights: expected 2 probabilities"),
    (dict(dfm_stages=3), r"dfm_stage_weights: 3 stages need their probabilities"),
    (dict(dfm_source="independent"), "dfm_source: 'independent' is the peer's N"),
    (dict(dfm_source="white"), r"dfm_source: expected one of \['decompose', 'bands', 'independent'\]"),
    (dict(dfm_stage_draw="step"), r"dfm_stage_draw: expected one of \['batch', 'sample'\]"),
    (dict(model="mlp", conditioning="none"), "model: method 'dfm' needs a DiTDH preset"),
    (dict(model_overrides={"patch_size": 2}), "model_overrides.patch_size: method 'dfm' needs patch size 1"),
    (dict(eval_every=5, eval_steps=1), "eval_steps: dfm-euler gives each of the 2 stages at least one step"),
    (dict(dfm_stage_shift=0), "dfm_stage_shift: expected 'auto' or a positive number"),
])
def test_keys(toy, change, message):
    root, _ = toy
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict({**config(root, "mode", **DFM), **change})
    cfg = TrainConfig.from_dict(config(root, "mode", **DFM))
    assert cfg.dfm_weights() == [0.9, 0.1] and cfg.dfm_stage_shifts(256, 768) == pytest.approx([12 ** 0.5, 48 ** 0.5])
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_more_stages_than_the_grid_allows_stop_before_training(toy, tmp_path):
    """The toy's 2 x 2 grid allows 2 stages; 3 is an error naming ``dfm_stages`` and nothing is written."""
    root, _ = toy
    with pytest.raises(ValueError, match=r"dfm_stages: 3 stages need a grid side divisible by 2\^2 = 4; the 2 x 2"):
        train(config(root, "mode", steps=2, dfm_stages=3, dfm_stage_weights=[0.2, 0.3, 0.5], **DFM),
              root / "shards", tmp_path / "run", progress=False, device="cpu")
    assert not (tmp_path / "run" / "ema.safetensors").exists()


def test_one_stage_is_flow_matching_to_the_bit(toy, tmp_path):
    """``dfm_stages: 1`` trains the DiTDH on the same times, noise and losses as ``method: fm``: the same weights."""
    root, _ = toy
    fm = train(config(root, "mode", steps=5, model="ditdh-tiny"), root / "shards", tmp_path / "fm", progress=False,
               device="cpu")
    one = train(config(root, "mode", steps=5, dfm_stages=1, **DFM), root / "shards", tmp_path / "dfm",
                progress=False, device="cpu")
    assert fm["losses"] == one["losses"]
    a, b = weights(fm["checkpoint"]), weights(one["checkpoint"])
    assert a.keys() == b.keys()
    assert_identical(a, b)


def test_one_stage_samples_as_euler(toy, tmp_path):
    """``dfm-euler`` on a one-stage network is Euler on the linear grid (``shift = 1``): the same samples."""
    root, _ = toy
    one = train(config(root, "mode", steps=3, dfm_stages=1, **DFM), root / "shards", tmp_path / "dfm",
                progress=False, device="cpu")
    net, _ = load_dfm_model(one["ema"])
    src = load_source(root / "spatial.safetensors")
    a = sample_latents(net, src, 16, seed=2, conditioning="mode", steps=6, method="dfm-euler", batch_size=8,
                       dfm={"stages": 1, "source": "decompose"})
    b = sample_latents(net, src, 16, seed=2, conditioning="mode", steps=6, method="euler", batch_size=8)
    assert a.nfe == b.nfe == 12 and torch.equal(a.modes, b.modes)
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=1e-6)


@pytest.mark.parametrize("source", ["bands", "decompose"])
def test_trains_resumes_and_samples(toy, tmp_path, source):
    root, _ = toy
    cfg = config(root, "mode", steps=8, checkpoint_every=4, dfm_source=source, dfm_stage_weights=[0.5, 0.5],
                 dfm_stage_draw="sample", eval_every=4, eval_samples=16, eval_steps=3, **DFM)
    ref = train_cut_and_resume(cfg, root, tmp_path)
    assert metric_steps(tmp_path / "cut") == list(range(1, 9))
    w = weights(ref["checkpoint"])
    assert float(w["model.dfm_final_layers.0.linear.weight"].abs().max()) > 0  # the coarse stage's head learned
    meta = read_metadata(ref["ema"])
    assert (meta["method"], meta["dfm_stages"], meta["dfm_source"]) == ("dfm", 2, source)
    with pytest.raises(ValueError, match="a DFM network .*sample it with dfm-euler"):
        load_velocity_model(ref["ema"])

    net, meta = load_dfm_model(ref["ema"])
    src = load_source(root / "spatial.safetensors")
    dfm = {"stages": 2, "source": source}
    got = sample_latents(net, src, 24, seed=1, conditioning="mode", steps=5, method="dfm-euler", batch_size=8,
                         dfm=dfm)
    assert got.nfe == 15 and got.latents.shape == (24, 4, 2) and torch.isfinite(got.latents).all()
    # per-sample seeds: another batching gives the same set
    again = sample_latents(net, src, 24, seed=1, conditioning="mode", steps=5, method="dfm-euler", batch_size=24,
                           dfm=dfm)
    torch.testing.assert_close(got.latents, again.latents, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="nfe: 2 stages need at least 2 network calls"):
        sample_latents(net, src, 4, steps=1, method="dfm-euler", conditioning="mode", dfm=dfm)
    with pytest.raises(ValueError, match="not a DFM network .*method 'fm'"):
        fm = train(config(root, "mode", steps=1, model="ditdh-tiny"), root / "shards", tmp_path / "fm",
                   progress=False, device="cpu")
        load_dfm_model(fm["ema"])
