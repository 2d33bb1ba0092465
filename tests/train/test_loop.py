"""The training loop on a 2-mode toy: learning, the three settings, accumulation, bit-identical resume
(in-process, after SIGKILL, after SIGTERM) and the non-finite-loss stop."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from toyrun import (META, assert_close_weights, assert_identical, config, metric_steps, one_batch_shard,
                    train_two_gloo_ranks, weights)

from mmfm.data import shards
from mmfm.train import loop
from mmfm.train import objective as objective_module  # where the step's loss is computed
from mmfm.train.config import TrainConfig
from mmfm.train.evaluate import read_fd
from mmfm.train.loop import NonFiniteLoss, TrainingInterrupted, train

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ config


def test_config_rejects_unknown_and_bad_keys(toy):
    with pytest.raises(ValueError, match="unknown key.*'lerning_rate'"):
        TrainConfig.from_dict({"lerning_rate": 1e-3})
    with pytest.raises(ValueError, match="global_batch"):
        TrainConfig.from_dict({"global_batch": 0})
    with pytest.raises(ValueError, match="coupling"):
        TrainConfig.from_dict({"coupling": "mode"})
    with pytest.raises(ValueError, match="gmm"):
        TrainConfig.from_dict({"source": "gmm"})
    with pytest.raises(ValueError, match="cls_gmm"):
        TrainConfig.from_dict({"source": "gmm", "gmm": "x", "coupling": "mode-hard"})
    with pytest.raises(ValueError, match="precision"):
        TrainConfig.from_dict({"precision": "fp16"})
    cfg = TrainConfig.from_dict(config(toy[0], "mode"))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig().shift(256 * 768) == pytest.approx(48 ** 0.5)
    assert TrainConfig().shift(8) == 1.0
    s = TrainConfig(lr=2e-4, initial_lr=4e-4, initial_steps=5, decay_start=10, decay_end=20, final_lr=2e-5)
    assert [s.lr_schedule()(i) for i in (0, 5, 20)] == pytest.approx([4e-4, 2e-4, 2e-5])


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("setting", ["gaussian", "gmm", "mode"])
def test_settings_run_and_export(toy, tmp_path, setting):
    root, _ = toy
    res = train(config(root, setting, steps=12), root / "shards", tmp_path, progress=False)
    assert res["done"] and res["step"] == 12 and (res["micro_batch"], res["accumulation"]) == (8, 2)
    assert all(np.isfinite(res["losses"])) and len(res["losses"]) == 12
    assert metric_steps(tmp_path) == list(range(1, 13))
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert next(csv.reader(f)) == ["step", "loss", "lr", "grad_norm", "samples_per_s", "mfu"]
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000010", "step-0000012"]
    from mmfm.models.velocity import load_velocity_model

    net = load_velocity_model(tmp_path / "ema.safetensors")
    assert net.conditioning == ("mode" if setting == "mode" else "none")
    x, t = torch.zeros(3, 4, 2), torch.full((3,), 0.5)
    y = {"y": torch.tensor([0, 1, 0])} if setting == "mode" else {}
    assert net(x, t, **y).shape == (3, 4, 2)


@pytest.mark.parametrize("model, overrides", [("mlp", {"hidden": 32, "depth": 2}), ("ditdh-tiny", {"depth": 1})])
def test_exports_of_the_mlp_and_of_overridden_presets_load_and_match_the_ema(toy, tmp_path, model, overrides):
    from mmfm.models.velocity import load_velocity_model

    root, _ = toy
    cfg = TrainConfig.from_dict(config(root, model=model, model_overrides=overrides, steps=3))
    train(cfg, root / "shards", tmp_path, progress=False)
    net = load_velocity_model(tmp_path / "ema.safetensors")
    ref = loop.build_model(cfg, 4, 2, 0)
    ref.load_state_dict({k.removeprefix("ema."): v for k, v in weights(tmp_path / "step-0000003").items()
                         if k.startswith("ema.")})
    x, t = torch.randn(3, 4, 2), torch.rand(3)
    assert torch.equal(net(x, t), ref.eval()(x, t))  # the export is the last checkpoint's EMA


def test_learns_the_toy(toy, tmp_path):
    """A few hundred steps lower the loss and bring EMA samples closer to the data (Fréchet distance)."""
    from mmfm.flow.sources import GaussianSource
    from mmfm.metrics.frechet import frechet_distance_of
    from mmfm.sample import sample_latents
    from mmfm.models.velocity import load_velocity_model

    root, tok = toy
    res = train(config(root, steps=300, lr=2e-3, checkpoint_every=300, log_every=50), root / "shards", tmp_path,
                progress=False)
    losses = np.array(res["losses"])
    assert losses[-20:].mean() < 0.6 * losses[:20].mean()
    net = load_velocity_model(tmp_path / "ema.safetensors")
    src = GaussianSource((4, 2))
    data = tok.reshape(len(tok), -1)
    samples = sample_latents(net, src, 256, seed=1, steps=20, batch_size=256).latents.reshape(256, -1)
    noise = src.sample(256, generator=torch.Generator().manual_seed(1))[0].reshape(256, -1)
    fd_trained, fd_noise = frechet_distance_of(samples.numpy(), data), frechet_distance_of(noise.numpy(), data)
    assert fd_trained < 0.25 * fd_noise, (fd_trained, fd_noise)


def test_accumulation_does_not_change_the_step(toy, tmp_path):
    """Global batch 8 as one micro-batch of 8 or four of 2: the same rows and draws, the same weights.

    Adam's ``g / (sqrt(v) + eps)`` turns rounding noise of near-zero gradients into +-lr steps; a large
    ``eps`` makes the update proportional to the gradient, so the comparison is tight."""
    root, _ = toy
    runs, losses = {}, {}
    for micro in (8, 2):
        out = tmp_path / f"micro{micro}"
        res = train(config(root, "mode", global_batch=8, micro_batch_max=micro, steps=5, checkpoint_every=5,
                           lr=1e-2, eps=1.0), root / "shards", out, progress=False)
        assert (res["micro_batch"], res["accumulation"]) == (micro, 8 // micro)
        runs[micro], losses[micro] = weights(res["checkpoint"]), res["losses"]
    np.testing.assert_allclose(losses[2], losses[8], rtol=1e-6)
    for k, v in runs[8].items():
        torch.testing.assert_close(runs[2][k], v, rtol=1e-5, atol=1e-7, msg=k)
    first = train(config(root, "mode", global_batch=8, steps=0), root / "shards", tmp_path / "init", progress=False)
    init = weights(first["checkpoint"])
    assert sum(not torch.equal(init[k], runs[8][k]) for k in init) > 10  # the weights did move


def test_resume_in_process_is_bit_identical(toy, tmp_path):
    root, _ = toy
    cfg = config(root, "mode", steps=24, checkpoint_every=8)
    ref = train(cfg, root / "shards", tmp_path / "ref", progress=False)
    part = train(cfg, root / "shards", tmp_path / "cut", progress=False, max_steps=11)
    assert not part["done"] and part["step"] == 11 and part["ema"] is None
    rest = train(cfg, root / "shards", tmp_path / "cut", progress=False)
    assert rest["resumed_from"].name == "step-0000011" and rest["step"] == 24
    assert_identical(weights(ref["checkpoint"]), weights(rest["checkpoint"]))
    assert metric_steps(tmp_path / "cut") == list(range(1, 25))


def test_adaptive_weighting_trains_and_resumes_bit_identically(toy, tmp_path):
    """docs/method.md §3.7 in the loop: ones during warm-up, then a different objective; the table is in the
    checkpoint, so a resumed run is bit-identical."""
    root, _ = toy
    cfg = config(root, "mode", steps=12, checkpoint_every=4, adaptive_weighting=True, adaptive_warmup_steps=3,
                 adaptive_decay=0.5)
    ref = train(cfg, root / "shards", tmp_path / "ref", progress=False)
    train(cfg, root / "shards", tmp_path / "cut", progress=False, max_steps=7)
    rest = train(cfg, root / "shards", tmp_path / "cut", progress=False)
    assert_identical(weights(ref["checkpoint"]), weights(rest["checkpoint"]))
    state = json.loads((ref["checkpoint"] / "state.json").read_text())["extra"]["adaptive_weighting"]
    assert state["updates"] == 12 and len(state["ema"]) == 2
    plain = train({**cfg, "adaptive_weighting": False}, root / "shards", tmp_path / "plain", progress=False)
    assert plain["losses"][:3] == ref["losses"][:3]      # warm-up: weights are one
    assert plain["losses"][3:] != ref["losses"][3:]      # then the weighting changes the objective
    with pytest.raises(ValueError, match="adaptive_weighting"):
        train(config(root, adaptive_weighting=True), root / "shards", tmp_path / "g", progress=False)


def test_resume_refuses_other_settings(toy, tmp_path):
    root, _ = toy
    train(config(root, steps=4, checkpoint_every=4), root / "shards", tmp_path, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train(config(root, steps=8, lr=5e-3), root / "shards", tmp_path, progress=False)
    res = train(config(root, steps=6), root / "shards", tmp_path, progress=False)  # more steps: allowed
    assert res["resumed_from"].name == "step-0000004" and res["step"] == 6


# ------------------------------------------------------------------------------------------------ kills

SCRIPT = """
import json, sys, time, torch
from mmfm.train import loop, objective as step  # the objective computes the step's loss
torch.set_num_threads(1)
slow = step.velocity_loss
def velocity_loss(*a, **k):  # slow the steps down so that the parent can kill mid-run
    time.sleep({sleep})
    return slow(*a, **k)
step.velocity_loss = velocity_loss
try:
    loop.train(json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], progress=False)
except loop.TrainingInterrupted as exc:
    print(exc, file=sys.stderr)
    sys.exit(exc.exit_code)
"""


def start(tmp_path, cfg, shards_dir, out, sleep=0.02):
    import json

    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT).replace("{sleep}", str(sleep)))
    return subprocess.Popen([sys.executable, str(script), json.dumps(cfg), str(shards_dir), str(out)],
                            stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(proc, out, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "latest").is_file():
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no checkpoint appeared")


def test_sigkill_then_resume_is_bit_identical(toy, tmp_path):
    root, _ = toy
    cfg = config(root, "mode", steps=60, checkpoint_every=10)
    ref = train(cfg, root / "shards", tmp_path / "ref", progress=False)
    out = tmp_path / "killed"
    proc = start(tmp_path, cfg, root / "shards", out)
    wait_for_checkpoint(proc, out)
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    res = train(cfg, root / "shards", out, progress=False)
    assert res["resumed_from"] is not None and 0 < int(res["resumed_from"].name[5:]) < 60
    assert_identical(weights(ref["checkpoint"]), weights(res["checkpoint"]))
    assert metric_steps(out) == list(range(1, 61))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_stop_signal_checkpoints_and_exits(toy, tmp_path, signum):
    root, _ = toy
    cfg = config(root, "gmm", steps=400, checkpoint_every=1000)  # only the signal and the end checkpoint
    out = tmp_path / "run"
    proc = start(tmp_path, cfg, root / "shards", out)
    deadline = time.monotonic() + 60
    while not ((out / "metrics.csv").is_file() and len(metric_steps(out)) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert "interrupted by" in err and "resume" in err
    ckpts = list(out.glob("step-*"))
    assert len(ckpts) == 1
    stopped = int(ckpts[0].name[5:])
    assert 3 <= stopped < 400 and metric_steps(out)[-1] == stopped
    res = train({**cfg, "steps": stopped + 2}, root / "shards", out, progress=False)
    assert res["resumed_from"] == ckpts[0] and res["step"] == stopped + 2 and res["done"]


def test_nonfinite_loss_stops_and_keeps_the_checkpoint(toy, tmp_path, monkeypatch):
    root, _ = toy
    calls = {"n": 0}
    real = objective_module.velocity_loss

    def poisoned(v, u, **kw):  # micro-batch 8 x 2: step 13 (0-based) holds calls 26 and 27
        calls["n"] += 1
        loss = real(v, u, **kw)
        return loss * float("nan") if calls["n"] == 27 else loss

    monkeypatch.setattr(objective_module, "velocity_loss", poisoned)
    cfg = config(root, steps=20, checkpoint_every=10, log_every=4)  # read back at steps 12 and 16
    with pytest.raises(NonFiniteLoss, match="at step 13") as info:
        train(cfg, root / "shards", tmp_path, progress=False)
    assert info.value.checkpoint.name == "step-0000010"
    assert [p.name for p in tmp_path.glob("step-*")] == ["step-0000010"]
    assert not (tmp_path / "ema.safetensors").exists()
    # the checkpoint is intact: resuming without the poison reaches the end like an uninterrupted run
    monkeypatch.setattr(objective_module, "velocity_loss", real)
    ref = train(cfg, root / "shards", tmp_path / "ref", progress=False)
    res = train(cfg, root / "shards", tmp_path, progress=False)
    assert res["resumed_from"].name == "step-0000010"
    assert_identical(weights(ref["checkpoint"]), weights(res["checkpoint"]))


def test_interrupted_exception_exit_code():
    exc = TrainingInterrupted(5, signal.SIGTERM, None)
    assert exc.exit_code == 143 and "SIGTERM" in str(exc)



@pytest.mark.slow
def test_two_gloo_ranks_train_and_checkpoint(toy, tmp_path):
    """Two CPU processes under torch.distributed (gloo): the batch splits over ranks (the global batch
    stays), both ranks see the same averaged loss, rank 0 writes the checkpoint and the export; a
    second launch resumes from it."""
    root, _ = toy

    def launch(cfg):
        return train_two_gloo_ranks(cfg, root / "shards", tmp_path / "out", tmp_path)

    cfg = config(root, "mode", global_batch=16, micro_batch_max=4, steps=6, checkpoint_every=3)
    a, b = launch(cfg)
    assert (a["world"], a["micro"], a["accum"]) == (2, 4, 2)
    assert a["losses"] == b["losses"] and len(a["losses"]) == 6
    assert (tmp_path / "out" / "ema.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "out").glob("step-*")) == ["step-0000003", "step-0000006"]
    a, b = launch({**cfg, "steps": 8})
    assert len(a["losses"]) == 2 and a["losses"] == b["losses"]


@pytest.mark.slow
def test_two_gloo_ranks_give_the_weights_of_one_process(toy, tmp_path):
    """The same global batch on 2 gloo ranks (micro 4 x accumulation 2 each) and on 1 process (micro 4 x
    accumulation 4): the same weights to float tolerance after 6 AdamW steps with clipping and EMA. One
    shard of exactly one global batch without shuffling, so both see the same rows each step; the noise,
    modes and times of each row come from one global draw (``share``), whatever the number of ranks."""
    root, _ = toy
    one = one_batch_shard(root, tmp_path / "one-batch")
    cfg = config(root, "mode", global_batch=16, micro_batch_max=4, steps=6, checkpoint_every=6, shuffle=False,
                 grad_clip=0.5)
    train_two_gloo_ranks(cfg, one, tmp_path / "two", tmp_path)
    res = train(cfg, one, tmp_path / "one", progress=False, device="cpu")
    assert (res["micro_batch"], res["accumulation"]) == (4, 4)
    a, b = weights(tmp_path / "two" / "step-0000006"), weights(res["checkpoint"])
    assert_close_weights(a, b)
    # the comparison has teeth: 6 steps moved the weights far more than the tolerance
    torch.manual_seed(cfg["seed"])  # as train() does before building the model
    init = loop.build_model(TrainConfig.from_dict(cfg), 4, 2, 2).state_dict()
    moved = max(float((b[f"model.{k}"] - v).abs().max()) for k, v in init.items())
    assert moved > 1e-3, moved


def test_train_command_runs_resumes_and_reports(toy, tmp_path, capsys):
    import json

    import yaml

    from mmfm.cli import main

    root, _ = toy
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"train": config(root, steps=6, checkpoint_every=3)}))
    args = ["train", "--config", str(cfg), "--shards", str(root / "shards"), "--out", str(tmp_path / "run"), "--json"]
    assert main(args + ["--max-steps", "3"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["step"] == 3 and not first["done"] and first["ema"] is None
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["step"] == 6 and second["done"] and second["resumed_from"].endswith("step-0000003")
    assert (tmp_path / "run" / "ema.safetensors").is_file()
    assert yaml.safe_load((tmp_path / "run" / "train.yaml").read_text())["steps"] == 6  # what the run was given
    cfg.write_text(yaml.safe_dump({"train": {**config(root), "nope": 1}}))
    assert main(args) == 2 and "nope" in capsys.readouterr().err
    # other settings: an error naming them, or with --fresh-if-changed (the workflow) a fresh start
    cfg.write_text(yaml.safe_dump({"train": config(root, steps=6, checkpoint_every=3, lr=5e-4)}))
    assert main(args) == 2 and "lr: 0.001 -> 0.0005" in capsys.readouterr().err
    assert main(args + ["--fresh-if-changed"]) == 0
    out = capsys.readouterr()
    third = json.loads(out.out.strip().splitlines()[-1])
    assert "trained with other settings (lr): starting afresh" in out.err
    assert third["resumed_from"] is None and third["step"] == 6
    assert sorted(p.name for p in (tmp_path / "run").glob("step-*")) == ["step-0000003", "step-0000006"]
    assert (tmp_path / "run" / ".lock").is_file()  # the lock file stays while the folder is emptied
    (aside,) = tmp_path.glob("run.prev-*")  # the earlier run, kept aside (and named in the log)
    assert str(aside) in out.err and not (aside / ".lock").exists()
    assert sorted(p.name for p in aside.glob("step-*")) == ["step-0000003", "step-0000006"]
    assert yaml.safe_load((aside / "train.yaml").read_text())["lr"] == 1e-3 and (aside / "ema.safetensors").is_file()


def test_changed_data_starts_the_run_afresh_and_dropped_evaluation_leaves_no_curve(toy, tmp_path, capsys):
    """The shards' fingerprint is a setting of the run: other data is not resumed (with --fresh-if-changed, a
    fresh start; without, an error naming it), unchanged data is; a resume with eval_every 0 removes fd.csv."""
    import json

    import yaml

    from mmfm.cli import main
    from mmfm.data.fingerprint import inputs_fingerprint

    root, _ = toy
    data = tmp_path / "data"
    shutil.copytree(root / "shards", data)
    cfg = tmp_path / "run.yaml"
    settings = config(root, steps=6, checkpoint_every=3, eval_every=3, eval_samples=8, eval_steps=2, eval_rows=32)
    cfg.write_text(yaml.safe_dump({"train": settings}))
    args = ["train", "--config", str(cfg), "--shards", str(data), "--out", str(tmp_path / "run"), "--json",
            "--fresh-if-changed"]
    assert main(args + ["--max-steps", "3"]) == 0
    assert [r["step"] for r in read_fd(tmp_path / "run" / "fd.csv")] == [3]
    before = inputs_fingerprint(data)
    assert yaml.safe_load((tmp_path / "run" / "train.yaml").read_text())["data_fingerprint"] == before
    capsys.readouterr()
    shutil.copy2(data / "shard-0.parquet", tmp_path / "same.parquet")  # byte-identical data: resumed
    shutil.copy2(tmp_path / "same.parquet", data / "shard-0.parquet")
    cfg.write_text(yaml.safe_dump({"train": {**settings, "eval_every": 0, "steps": 4}}))
    assert main(args + ["--max-steps", "1"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out.strip().splitlines()[-1])["resumed_from"].endswith("step-0000003")
    assert not (tmp_path / "run" / "fd.csv").exists() and "eval_every is 0: removed" in out.err
    # other images: one shard loses its last rows
    from mmfm.data.stream import read_shard

    got = read_shard(data / "shard-1.parquet", ("image_id", "label", "cls", "tokens"))
    shards.write_shard(data / "shard-1.parquet", {k: np.asarray(v)[:-8] for k, v in got.items()}, META,
                       row_group_rows=32)
    assert inputs_fingerprint(data) != before
    cfg.write_text(yaml.safe_dump({"train": {**settings, "steps": 4}}))
    plain = [a for a in args if a != "--fresh-if-changed"]
    assert main(plain) == 2 and f"data_fingerprint: '{before}' -> " in capsys.readouterr().err
    assert main(args) == 0
    out = capsys.readouterr()
    assert "trained with other settings (data_fingerprint): starting afresh" in out.err
    assert json.loads(out.out.strip().splitlines()[-1])["resumed_from"] is None
    assert len(list(tmp_path.glob("run.prev-*"))) == 1


@pytest.mark.slow
def test_train_command_nproc_2_through_torchrun(toy, tmp_path):
    import json

    import yaml

    root, _ = toy
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(config(root, steps=4, checkpoint_every=2)))
    env = {**os.environ, "OMP_NUM_THREADS": "4"}  # as Snakemake sets it for a rule of 4 threads
    proc = subprocess.run([sys.executable, "-m", "mmfm.cli", "train", "--nproc", "2", "--config", str(cfg),
                           "--shards", str(root / "shards"), "--out", str(tmp_path / "run"), "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 2 and all(x["world_size"] == 2 and x["step"] == 4 for x in lines)
    assert [x["threads"] for x in lines] == [2, 2]  # the job's 4 threads shared, not 4 per process
    assert (tmp_path / "run" / "ema.safetensors").is_file()


def test_fd_over_training_is_logged_and_does_not_change_the_weights(toy, tmp_path):
    from mmfm.train.evaluate import read_fd

    root, _ = toy
    a = train(config(root, steps=20, checkpoint_every=10), root / "shards", tmp_path / "a", progress=False)
    b = train(config(root, steps=20, checkpoint_every=10, eval_every=5, eval_samples=64, eval_steps=4,
                     eval_rows=128), root / "shards", tmp_path / "b", progress=False)
    assert a["losses"] == b["losses"]  # evaluation draws nothing from the training generators
    for x, y in zip(weights(a["checkpoint"]).values(), weights(b["checkpoint"]).values()):
        assert torch.equal(x, y)
    rows = read_fd(tmp_path / "b" / "fd.csv")
    assert [r["step"] for r in rows] == [5, 10, 15, 20] and all(r["nfe"] == 4 and r["fd"] > 0 for r in rows)
    assert rows[-1]["fd"] < rows[0]["fd"]
    # the same curves in TensorBoard, read back with its own event reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list((tmp_path / "b").glob("events.out.tfevents.*"))  # in the run folder: TensorBoard names the run "b"
    events = EventAccumulator(str(tmp_path / "b"))
    events.Reload()
    fd = [(e.step, e.value) for e in events.Scalars("eval/frechet_distance")]
    assert fd == [(r["step"], pytest.approx(r["fd"], rel=1e-5)) for r in rows]  # csv: 6 digits
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 21))
    assert [pytest.approx(e.value, rel=1e-5) for e in events.Scalars("train/loss")] == b["losses"]
    assert "train/mfu" not in events.Tags()["scalars"]  # MFU is logged on CUDA only


def test_nfe_curve_command(toy, tmp_path, capsys):
    import json

    from mmfm.cli import main

    root, _ = toy
    train(config(root, steps=10, checkpoint_every=10), root / "shards", tmp_path / "run", progress=False)
    out = tmp_path / "nfe.csv"
    assert main(["nfe-curve", "--model", str(tmp_path / "run" / "ema.safetensors"), "--shards", str(root / "shards"),
                 "--out", str(out), "--nfe", "1", "4", "--n", "64", "--rows", "128", "--json"]) == 0
    curve = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["curve"]
    assert [r["nfe"] for r in curve] == [1, 4] and all(r["fd"] > 0 for r in curve)
    assert out.read_text().splitlines()[0] == "step,nfe,fd" and len(out.read_text().splitlines()) == 3


def test_the_export_records_the_shards_tokenizer_and_the_gmm_it_was_trained_with(toy, tmp_path):
    """``ema.safetensors`` says what its tokens are (the shards' tokenizer metadata) and which noise it was
    trained from (the spatial GMM file, its shape and fingerprint): ``mmfm sample --model`` needs nothing else."""
    from mmfm import io
    from mmfm.models.velocity import read_metadata, source_fingerprint

    root, _ = toy
    train(config(root, "gmm", steps=2, checkpoint_every=2), root / "shards", tmp_path / "gmm", progress=False)
    meta = read_metadata(tmp_path / "gmm" / "ema.safetensors")
    sh = shards.read_metadata(root / "shards" / "shard-0.parquet")
    assert sh == META
    assert meta["tokenizer"] == {"name": "toy", "path": None, "revision": "0", "image_size": None, "grid": [2, 2],
                                 "token_dim": 2, "patch_size": None, "pool": None, "precision": "fp32",
                                 "normalization": None, "decoder": None}
    gmm_file = root / "spatial.safetensors"
    assert meta["source"] == {"kind": "gmm", "file": str(gmm_file), "shape": [2, 4, 2],
                              "bytes": gmm_file.stat().st_size, "sha256": source_fingerprint(gmm_file)["sha256"]}
    assert json.loads((tmp_path / "gmm" / "ema.json").read_text()) == meta  # the sidecar says the same
    # the fingerprint tells two fits of one shape apart (their weights), and follows the header
    tensors, _ = io.open_tensors(gmm_file)
    refit = {k: np.array(v) for k, v in tensors.items()}
    refit["weights"] = np.array([0.4, 0.6])
    io.save_tensors(tmp_path / "refit.safetensors", refit, {"kind": "spatial-gmm"})
    assert source_fingerprint(tmp_path / "refit.safetensors")["sha256"] != meta["source"]["sha256"]
    train(config(root, steps=2, checkpoint_every=2), root / "shards", tmp_path / "gauss", progress=False)
    assert read_metadata(tmp_path / "gauss" / "ema.safetensors")["source"] == {"kind": "gaussian"}
