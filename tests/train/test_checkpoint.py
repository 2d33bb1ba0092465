import json
import math
import random
import re

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from torch import nn

from mmfm import io
from mmfm.train import checkpoint as ckpt
from mmfm.train.checkpoint import (export_ema, get_rng_state, keep_last, latest_checkpoint, load_checkpoint,
                                   save_checkpoint, set_rng_state)
from mmfm.train.ema import EMA
from mmfm.train.schedule import EMASchedule, LRSchedule

LR = LRSchedule(base_lr=1e-2, final_lr=1e-3, initial_lr=2e-2, initial_steps=3, decay_start=5, decay_end=10)


def net(hidden=16):
    return nn.Sequential(nn.Linear(4, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.3),
                         nn.Linear(hidden, 2))


class Run:
    """A tiny training run whose every step draws from Python, numpy (global and a Generator), torch
    (global and a Generator) and dropout, so that a resume is exact only if every state comes back."""

    def __init__(self, seed, hidden=16):
        torch.manual_seed(seed)
        self.model = net(hidden)
        self.ema = EMA(self.model, EMASchedule(decay=0.8, initial_decay=0.5, initial_steps=4))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR.base_lr, betas=(0.9, 0.95), weight_decay=0.01)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, LR.factor)
        self.gens = {"noise": torch.Generator().manual_seed(seed + 1),
                     "modes": np.random.Generator(np.random.PCG64(seed + 2))}
        self.step = 0

    def train(self, until):
        while self.step < until:
            x = torch.randn(8, 4) + torch.from_numpy(np.random.standard_normal((8, 4))).float() * random.random()
            y = torch.randn(8, 2, generator=self.gens["noise"]) + float(self.gens["modes"].integers(0, 5))
            loss = nn.functional.mse_loss(self.model(x), y)
            self.opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.sched.step()
            self.ema.update(self.model, self.step)
            self.step += 1

    def save(self, run_dir, **kw):
        return save_checkpoint(run_dir, step=self.step, model=self.model, ema=self.ema, optimizer=self.opt,
                               scheduler=self.sched, generators=self.gens, **kw)

    def load(self, path):
        info = load_checkpoint(path, model=self.model, ema=self.ema, optimizer=self.opt, scheduler=self.sched,
                               generators=self.gens)
        self.step = info["step"]
        return info

    def draws(self):
        return (torch.rand(5), np.random.rand(5), random.random(), torch.rand(3, generator=self.gens["noise"]),
                self.gens["modes"].random(3))


def snapshot(run):
    opt = run.opt.state_dict()
    return ({k: v.clone() for k, v in run.model.state_dict().items()},
            {k: v.clone() for k, v in run.ema.state_dict().items()},
            {i: {k: v.clone() for k, v in s.items()} for i, s in opt["state"].items()},
            run.sched.state_dict())


def same(x, y):
    """Exact equality of nested dicts / tuples of tensors, arrays and numbers."""
    if torch.is_tensor(x) or isinstance(x, np.ndarray):
        return type(x) is type(y) and (torch.equal(x, y) if torch.is_tensor(x) else np.array_equal(x, y))
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(same(a, b) for a, b in zip(x, y))
    return x == y


def scramble():
    torch.manual_seed(999)
    np.random.seed(999)
    random.seed(999)


def test_resume_is_bit_identical(tmp_path):
    stream = {"epoch": 0, "batches": 5, "shards": ["a", "b"]}
    a = Run(seed=0)
    a.train(6)   # crosses the EMA switch (4) and the lr phases (3, 5)
    path = a.save(tmp_path, extra={"stream": stream}, config={"lr": 0.01, "name": "tiny"})
    at_save = snapshot(a)
    a.train(13)
    final, after = snapshot(a), a.draws()

    scramble()
    b = Run(seed=7)      # other weights, other generator states
    b.train(2)           # and non-empty optimizer / scheduler / EMA states
    scramble()
    info = b.load(path)
    assert info["step"] == 6 and info["path"] == path
    assert info["extra"] == {"stream": stream} and info["config"] == {"lr": 0.01, "name": "tiny"}
    # model, EMA, AdamW (step count, exp_avg, exp_avg_sq per parameter) and scheduler, exactly
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in at_save[2].values())
    assert same(snapshot(b), at_save)
    assert [g["lr"] for g in b.opt.param_groups] == [LR(6)]

    b.train(13)
    assert same(snapshot(b), final)
    assert same(b.draws(), after)


def test_without_the_rng_states_the_run_diverges(tmp_path):
    """The check above is not vacuous: the same load without the random states gives other weights."""
    a = Run(seed=0)
    a.train(4)
    path = a.save(tmp_path)
    a.train(8)
    b = Run(seed=0)
    load_checkpoint(path, model=b.model, ema=b.ema, optimizer=b.opt, scheduler=b.sched, restore_rng=False)
    b.step = 4
    scramble()
    b.train(8)
    assert not torch.equal(a.model[0].weight, b.model[0].weight)


def test_layout_is_safetensors_and_json(tmp_path):
    a = Run(seed=0)
    a.train(2)
    path = a.save(tmp_path, extra={"k": 1})
    assert path == tmp_path / "step-0000002"
    assert (tmp_path / "latest").read_text() == "step-0000002\n"
    assert sorted(p.name for p in path.iterdir()) == ["ema.safetensors", "model.safetensors", "state.json",
                                                       "state.safetensors"]
    model = load_file(path / "model.safetensors")   # ordinary tools read it
    assert set(model) == set(a.model.state_dict())
    assert np.array_equal(model["0.weight"], a.model[0].weight.detach().numpy())
    state = json.loads((path / "state.json").read_text())
    assert state["step"] == 2 and state["format"] == "mmfm-checkpoint"
    assert state["files"] == {f: (path / f).stat().st_size for f in ("model.safetensors", "ema.safetensors",
                                                                    "state.safetensors")}
    opt_tensors = load_file(path / "state.safetensors")
    assert np.array_equal(opt_tensors["optimizer.state.0.exp_avg"], a.opt.state[a.model[0].weight]["exp_avg"])
    assert opt_tensors["optimizer.state.0.step"].shape == () and float(opt_tensors["optimizer.state.0.step"]) == 2


def test_a_failed_save_leaves_the_last_checkpoint_and_latest(tmp_path, monkeypatch):
    a = Run(seed=0)
    a.train(3)
    good = a.save(tmp_path)
    a.train(6)
    real = ckpt._write_tensors

    def dies_on_ema(path, tensors, meta):
        if path.name == "ema.safetensors":
            raise OSError("disk full")
        real(path, tensors, meta)

    monkeypatch.setattr(ckpt, "_write_tensors", dies_on_ema)
    with pytest.raises(OSError, match="disk full"):
        a.save(tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-0000003"]
    assert (tmp_path / "latest").read_text() == "step-0000003\n"
    assert latest_checkpoint(tmp_path) == good
    assert load_checkpoint(tmp_path, model=net(), ema=EMA(net()), optimizer=Run(1).opt,
                           restore_rng=False)["step"] == 3


def test_killed_saves_and_damaged_checkpoints_are_never_latest(tmp_path):
    a = Run(seed=0)
    a.train(3)
    good = a.save(tmp_path)
    a.train(4)
    newer = a.save(tmp_path)
    # a save killed before its rename, and a directory without state.json (an interrupted copy)
    (tmp_path / "step-0000009.tmp4242").mkdir()
    (tmp_path / "step-0000009.tmp4242" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / "step-0000008").mkdir()
    (tmp_path / "step-0000008" / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == newer
    (tmp_path / "latest").unlink()          # without the pointer: the complete one of the highest step
    assert latest_checkpoint(tmp_path) == newer
    with open(newer / "ema.safetensors", "r+b") as f:   # truncated file
        f.truncate(100)
    assert latest_checkpoint(tmp_path) == good
    kw = dict(model=net(), ema=EMA(net()), optimizer=Run(1).opt)
    with pytest.raises(ValueError, match=r"step-0000004/ema.safetensors: 100 bytes where state.json records"):
        load_checkpoint(newer, **kw)
    with pytest.raises(ValueError, match=r"step-0000008: incomplete checkpoint \(no state.json\)"):
        load_checkpoint(tmp_path / "step-0000008", **kw)
    (good / "state.json").write_text('{"format": "mmfm-checkpoint", "step"')
    with pytest.raises(ValueError, match=r"step-0000003/state.json: corrupt"):
        load_checkpoint(good, **kw)
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_another_architecture_is_a_named_error_and_changes_nothing(tmp_path):
    a = Run(seed=0)
    a.train(2)
    path = a.save(tmp_path)
    wide = Run(seed=1, hidden=32)
    before = snapshot(wide)
    with pytest.raises(ValueError, match=r"model.safetensors: '0.weight' has shape \(16, 4\) in the checkpoint, "
                                         r"\(32, 4\) in the model"):
        wide.load(path)
    assert all(torch.equal(before[0][k], v) for k, v in wide.model.state_dict().items())
    deeper = nn.Sequential(net(), nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"model.safetensors: does not match the model \(missing keys"):
        load_checkpoint(path, model=deeper, ema=EMA(deeper), optimizer=torch.optim.AdamW(deeper.parameters()))
    other_ema = EMA(nn.Sequential(nn.Linear(4, 16)))
    with pytest.raises(ValueError, match=r"ema.safetensors: does not match the EMA"):
        load_checkpoint(path, model=net(), ema=other_ema, optimizer=Run(1).opt)
    with pytest.raises(ValueError, match=r"state.json: no state for generator 'other'"):
        load_checkpoint(path, model=net(), ema=EMA(net()), optimizer=Run(1).opt,
                        generators={"other": torch.Generator()})
    with pytest.raises(ValueError, match=r"holds random states of 1 rank\(s\), not of rank 3"):
        load_checkpoint(path, model=net(), ema=EMA(net()), optimizer=Run(1).opt, rank=3)


def test_per_rank_random_states(tmp_path):
    a = Run(seed=0)
    states = []
    for rank in range(3):
        torch.manual_seed(100 + rank)
        states.append(get_rng_state())
    path = a.save(tmp_path, rng=states)
    torch.manual_seed(102)
    expected = torch.rand(4)
    b = Run(seed=1)
    load_checkpoint(path, model=b.model, ema=b.ema, optimizer=b.opt, rank=2)
    assert torch.equal(torch.rand(4), expected)
    load_checkpoint(path, model=b.model, ema=b.ema, optimizer=b.opt, rank=0)
    assert not torch.equal(torch.rand(4), expected)


def test_saving_the_same_step_again_replaces_it(tmp_path):
    a = Run(seed=0)
    a.train(2)
    a.save(tmp_path)
    with torch.no_grad():
        a.model[0].weight.add_(1.0)
    path = a.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-0000002"]
    b = Run(seed=1)
    b.load(path)
    assert torch.equal(b.model[0].weight, a.model[0].weight)


def test_rng_state_round_trip_and_json():
    gens = {"t": torch.Generator().manual_seed(3), "pcg": np.random.default_rng(4),
            "mt": np.random.Generator(np.random.MT19937(5))}
    random.gauss(0, 1)          # a cached Python gaussian
    np.random.standard_normal()  # and a cached numpy one
    state = get_rng_state(gens)
    json.dumps(state, allow_nan=False)
    first = (random.random(), random.gauss(0, 1), np.random.standard_normal(3), torch.randn(3),
             torch.randn(3, generator=gens["t"]), gens["pcg"].random(2), gens["mt"].random(2))
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    for g in gens.values():
        g.random(5) if isinstance(g, np.random.Generator) else torch.rand(5, generator=g)
    set_rng_state(json.loads(json.dumps(state)), gens)
    again = (random.random(), random.gauss(0, 1), np.random.standard_normal(3), torch.randn(3),
             torch.randn(3, generator=gens["t"]), gens["pcg"].random(2), gens["mt"].random(2))
    for x, y in zip(first, again):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(ValueError, match="'t' was saved as a torch generator, not a numpy one"):
        set_rng_state(state, {"t": np.random.default_rng()})


def test_state_dict_encoding_keeps_types():
    obj = {0: {"a": (1, 2.5), "t": torch.arange(3)}, "x": [float("inf"), float("nan"), None, True],
           "arr": np.arange(4, dtype=np.uint32).reshape(2, 2), "__tensor__": "not a marker"}
    tensors = {}
    enc = ckpt._encode(obj, "k", tensors)
    back = ckpt._decode(json.loads(json.dumps(enc, allow_nan=False)), tensors)
    assert list(tensors) == ["k.0.t"]
    assert set(back) == {0, "x", "arr", "__tensor__"} and back["__tensor__"] == "not a marker"
    assert back[0]["a"] == (1, 2.5) and isinstance(back[0]["a"], tuple) and back[0]["t"] is tensors["k.0.t"]
    assert back["x"][0] == math.inf and math.isnan(back["x"][1]) and back["x"][2:] == [None, True]
    assert back["arr"].dtype == np.uint32 and np.array_equal(back["arr"], obj["arr"])
    with pytest.raises(TypeError, match="k.f: cannot store a function"):
        ckpt._encode({"f": test_state_dict_encoding_keeps_types}, "k", {})
    with pytest.raises(ValueError, match="extra must be plain JSON"):
        save_checkpoint("/nonexistent-never-written", step=1, model=net(), ema=EMA(net()),
                        optimizer=Run(1).opt, extra={"t": torch.zeros(1)})


def test_bfloat16_tensors_round_trip_exactly(tmp_path):
    model = net()
    model.register_buffer("scale", torch.randn(5).bfloat16())
    ema = EMA(model)
    opt = torch.optim.AdamW(model.parameters())
    path = save_checkpoint(tmp_path, step=1, model=model, ema=ema, optimizer=opt)
    other = net()
    other.register_buffer("scale", torch.zeros(5, dtype=torch.bfloat16))
    load_checkpoint(path, model=other, ema=EMA(other), optimizer=torch.optim.AdamW(other.parameters()))
    assert other.scale.dtype == torch.bfloat16 and torch.equal(other.scale, model.scale)


def test_keep_last_never_removes_the_latest(tmp_path):
    a = Run(seed=0)
    for _ in range(5):
        a.train(a.step + 1)
        a.save(tmp_path)
    (tmp_path / "step-0000002.tmp77").mkdir()   # a killed save older than the latest
    (tmp_path / "step-0000009.tmp77").mkdir()   # newer: may be a save in progress
    removed = keep_last(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["step-0000001", "step-0000002", "step-0000002.tmp77",
                                               "step-0000003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-0000004", "step-0000005",
                                                          "step-0000009.tmp77"]
    (tmp_path / "latest").write_text("step-0000004\n")   # e.g. rolled back by hand
    assert keep_last(tmp_path, 1) == []
    assert latest_checkpoint(tmp_path) == tmp_path / "step-0000004"
    with pytest.raises(ValueError, match="n >= 1"):
        keep_last(tmp_path, 0)


def test_export_ema_round_trip(tmp_path):
    model = net()
    ema = EMA(nn.DataParallel(model), decay=0.5)
    with torch.no_grad():
        model[0].weight.mul_(3)
    ema.update(model)
    meta = {"step": 25_020, "model": {"hidden": 16}, "run": "tiny"}
    out = export_ema(tmp_path / "ema-25k.safetensors", ema, meta)
    arrays, got_meta = io.open_tensors(out)
    assert got_meta == meta
    assert json.loads((tmp_path / "ema-25k.json").read_text()) == meta
    assert set(arrays) == set(model.state_dict())
    for name, t in ema.state_dict().items():
        assert arrays[name].dtype == t.numpy().dtype and np.array_equal(arrays[name], t.numpy())
    fresh = net()
    fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
    assert torch.equal(fresh[0].weight, ema.shadow["0.weight"])


def full_disk_after(monkeypatch, calls: int):
    """posix_fallocate succeeds ``calls`` times, then the disk is full (and shows 1234 bytes free)."""
    import collections
    import errno
    import os
    import shutil

    real, count = os.posix_fallocate, [0]

    def fallocate(fd, offset, length):
        count[0] += 1
        if count[0] > calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, offset, length)
    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1234))


def test_full_disk_during_a_save_names_the_checkpoint_and_sizes_and_keeps_the_last(tmp_path, monkeypatch):
    a = Run(seed=0)
    a.train(3)
    good = a.save(tmp_path)
    files_before = {p.name: p.read_bytes() for p in good.iterdir()}
    a.train(6)
    full_disk_after(monkeypatch, 1)  # model.safetensors fits, ema.safetensors does not
    with pytest.raises(io.DiskFull) as e:
        a.save(tmp_path)
    msg, err = str(e.value), e.value
    params = sum(t.numel() * t.element_size() for t in a.model.state_dict().values())
    assert msg.startswith(f"{tmp_path / 'step-0000006'}: no space left on the device (needs ")
    assert err.needed > 2 * params and "1.2 kB (1234 bytes) free" in msg and err.free == 1234
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-0000003"]  # no save folder left
    assert (tmp_path / "latest").read_text() == "step-0000003\n"
    assert {p.name: p.read_bytes() for p in good.iterdir()} == files_before
    assert load_checkpoint(tmp_path, model=net(), ema=EMA(net()), optimizer=Run(1).opt,
                           restore_rng=False)["step"] == 3


def test_full_disk_during_an_export_keeps_the_previous_export(tmp_path, monkeypatch):
    out = export_ema(tmp_path / "ema.safetensors", EMA(net()), {"step": 1})
    before = out.read_bytes(), (tmp_path / "ema.json").read_text()
    full_disk_after(monkeypatch, 0)
    with pytest.raises(io.DiskFull, match=r"ema.safetensors: no space left on the device \(needs \d"):
        export_ema(out, EMA(net()), {"step": 2})
    assert (out.read_bytes(), (tmp_path / "ema.json").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.json", "ema.safetensors"]


def test_verify_checkpoint_and_damage_the_sizes_do_not_show(tmp_path, monkeypatch):
    from mmfm.recover import CorruptArtifact

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "results" / "runs" / "r"
    a = Run(seed=0)
    a.train(2)
    path = a.save(run_dir)
    assert ckpt.verify_checkpoint(path) == 2
    model = path / "model.safetensors"
    raw = bytearray(model.read_bytes())
    raw[12] ^= 0xFF  # the JSON header, same size
    model.write_bytes(bytes(raw))
    assert latest_checkpoint(run_dir) == path  # the sizes agree: only reading the header finds it
    cmd = "rm -r results/runs/r/step-0000002 && snakemake --cores all"
    for check in (lambda: ckpt.verify_checkpoint(path),
                  lambda: load_checkpoint(run_dir, model=net(), ema=EMA(net()), optimizer=Run(1).opt)):
        with pytest.raises(CorruptArtifact, match="JSON header does not parse") as e:
            check()
        assert str(e.value).startswith(f"{model}: not a complete safetensors file")
        assert "remove the checkpoint and the run resumes from the previous complete one" in str(e.value)
        assert str(e.value).endswith(cmd)
    # outside a results folder: the folder to remove is named
    b = Run(seed=0)
    b.train(1)
    other = b.save(tmp_path / "mine")
    text = (other / "state.json").read_text()
    first = re.search(r'"__tensor__": "([^"]+)"', text)[1]
    (other / "state.json").write_text(text.replace(f'"{first}"', '"optimizer.state.nothing"', 1))
    with pytest.raises(CorruptArtifact, match=r"missing tensor\(s\) \['optimizer.state.nothing'\].*: rm -r .*mine/step-0000001$"):
        ckpt.verify_checkpoint(other)
