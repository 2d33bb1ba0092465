"""The launcher (mmfm.launch) through ``mmfm train`` / ``mmfm sample``: stop signals end to end, several
agents on localhost against one process, one trainer per run folder, and bad launch settings."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from toyrun import (assert_close_weights, assert_identical, config, metric_steps, one_batch_shard, tiny_sampler,
                    weights)

from mmfm import launch
from mmfm.cli import main
from mmfm.train.loop import train

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def write_config(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def mmfm(*args, env=None, **kw):
    """``python -m mmfm.cli ARGS`` as a child process (its own session, like a job's launcher)."""
    return subprocess.Popen([sys.executable, "-m", "mmfm.cli", *map(str, args)], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def descendants(pid):
    """PIDs of every live descendant of ``pid`` (from /proc)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parent[int(d)] = int(fields[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for_rows(proc, out, rows, timeout=120):
    deadline = time.monotonic() + timeout
    while not ((out / "metrics.csv").is_file() and len(metric_steps(out)) >= rows):
        if proc.poll() is not None:
            raise AssertionError(proc.communicate()[1][-3000:])
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------ stop signals


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_to_the_launcher_checkpoints_and_stops_every_process(toy, tmp_path, signum):
    """The signal reaches both workers through the agent; they finish the step, rank 0 writes the
    checkpoint, the launcher exits 128 + signum, no process is left, and resuming gives the bits of a run
    that was never stopped."""
    root, _ = toy
    cfg = config(root, "mode", steps=400, checkpoint_every=1000, micro_batch_max=4)
    args = ["train", "--nproc", 2, "--device", "cpu", "--shards", root / "shards", "--json"]
    out = tmp_path / "run"
    proc = mmfm(*args, "--config", write_config(tmp_path / "run.yaml", cfg), "--out", out, env=ONE_THREAD)
    wait_for_rows(proc, out, 3)
    workers = descendants(proc.pid)
    assert len(workers) >= 2
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signum, err[-3000:]
    assert f"{signal.Signals(signum).name} received" in err and "interrupted by" in err
    assert not [p for p in workers if alive(p)]
    ckpts = sorted(out.glob("step-*"))
    assert len(ckpts) == 1
    stopped = int(ckpts[0].name[5:])
    assert 3 <= stopped < 400 and metric_steps(out) == list(range(1, stopped + 1))
    more = {**cfg, "steps": stopped + 3}
    resumed = mmfm(*args, "--config", write_config(tmp_path / "more.yaml", more), "--out", out, env=ONE_THREAD)
    ref = mmfm(*args, "--config", write_config(tmp_path / "more.yaml", more), "--out", tmp_path / "ref",
               env=ONE_THREAD)
    for p in (resumed, ref):
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    end = f"step-{stopped + 3:07d}"
    assert_identical(weights(out / end), weights(tmp_path / "ref" / end))
    assert metric_steps(out) == list(range(1, stopped + 4))


@pytest.mark.slow
def test_workers_of_a_killed_launcher_checkpoint_and_stop(toy, tmp_path):
    """SIGKILL of the launcher cannot be caught; its workers get SIGTERM from the kernel (parent death),
    checkpoint and stop, so no orphan trains on and the run folder is free again."""
    root, _ = toy
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", config(root, "gmm", steps=400, checkpoint_every=1000))
    proc = mmfm("train", "--nproc", 2, "--device", "cpu", "--config", cfg, "--shards", root / "shards", "--out", out,
                env=ONE_THREAD)
    wait_for_rows(proc, out, 3)
    workers = descendants(proc.pid)
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 120
    while [p for p in workers if alive(p)]:
        assert time.monotonic() < deadline, "the workers kept running without their launcher"
        time.sleep(0.1)
    assert len(list(out.glob("step-*"))) == 1  # the workers' own SIGTERM checkpoint
    from mmfm.train.lock import RunLock

    with RunLock(out):  # free
        pass


# ------------------------------------------------------------------------------------------------ nodes


@pytest.mark.slow
@pytest.mark.parametrize("nproc,rendezvous", [(1, "static"), (2, "c10d")])
def test_two_agents_on_localhost_give_the_weights_of_one_process(toy, tmp_path, nproc, rendezvous):
    """2 nodes x ``nproc`` processes (two agents on this machine, gloo) against one process: the same
    global batch (one shard of one batch, no shuffling), the same weights after 6 steps."""
    root, _ = toy
    one = one_batch_shard(root, tmp_path / "one-batch")
    cfg = config(root, "mode", global_batch=16, micro_batch_max=4, steps=6, checkpoint_every=6, shuffle=False,
                 grad_clip=0.5)
    path = write_config(tmp_path / "run.yaml", cfg)
    endpoint = f"127.0.0.1:{launch.free_port()}"
    agents = [mmfm("train", "--config", path, "--shards", one, "--out", tmp_path / "nodes", "--device", "cpu",
                   "--nnodes", 2, "--nproc", nproc, "--rdzv-endpoint", endpoint, "--json",
                   *(["--node-rank", rank] if rendezvous == "static" else ["--rdzv-id", "test"]), env=ONE_THREAD)
              for rank in range(2)]
    lines = []
    for a in agents:
        stdout, err = a.communicate(timeout=300)
        assert a.returncode == 0, err[-3000:]
        lines += [json.loads(x) for x in stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 2 * nproc and {x["world_size"] for x in lines} == {2 * nproc}
    res = train(cfg, one, tmp_path / "one", progress=False, device="cpu")
    assert res["world_size"] == 1
    assert_close_weights(weights(tmp_path / "nodes" / "step-0000006"), weights(res["checkpoint"]))
    first = weights(tmp_path / "one" / "step-0000006")
    torch.manual_seed(cfg["seed"])
    from mmfm.train import loop
    from mmfm.train.config import TrainConfig

    init = loop.build_model(TrainConfig.from_dict(cfg), 4, 2, 2).state_dict()
    assert max(float((first[f"model.{k}"] - v).abs().max()) for k, v in init.items()) > 1e-3  # it moved


@pytest.mark.slow
def test_sampling_over_two_agents_writes_the_set_of_one_process(tmp_path):
    model, source = tiny_sampler(tmp_path)
    args = ["sample", "--model", model, "--source", source, "--num-samples", 7,
            "--steps", 3, "--batch-size", 2, "--encoder", "pixels", "--image-size", 8, "--json"]
    assert main([str(a) for a in args] + ["--out", str(tmp_path / "one.npz")]) == 0
    endpoint = f"127.0.0.1:{launch.free_port()}"
    agents = [mmfm(*args, "--out", tmp_path / "two.npz", "--nnodes", 2, "--nproc", 1, "--rdzv-endpoint", endpoint,
                   "--rdzv-id", "sample-test", env=ONE_THREAD) for _ in range(2)]
    for a in agents:
        _, err = a.communicate(timeout=300)
        assert a.returncode == 0, err[-3000:]
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "two.npz") as two:
        assert one["arr_0"].shape == (7, 8, 8, 3) and np.array_equal(one["arr_0"], two["arr_0"])
    assert sorted(p.name for p in tmp_path.glob("two.npz*")) == ["two.npz"]


# ------------------------------------------------------------------------------------------------ the run folder


@pytest.mark.slow
def test_one_trainer_per_run_folder_even_after_its_shell_is_killed(toy, tmp_path):
    """A trainer whose parent shell was killed (as after ``kill -9`` of Snakemake) keeps the folder: a second
    ``mmfm train`` is refused with the holder named; once the first ends, a rerun resumes, and the steps of
    metrics.csv only increase."""
    root, _ = toy
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", config(root, "gmm", steps=300, checkpoint_every=50))
    cmd = [sys.executable, "-m", "mmfm.cli", "train", "--config", cfg, "--shards", str(root / "shards"),
           "--out", str(out), "--device", "cpu"]
    shell = subprocess.Popen(["bash", "-c", f"{' '.join(cmd)} > {tmp_path / 'first.log'} 2>&1 & echo $!; wait"],
                             stdout=subprocess.PIPE, text=True, env={**os.environ, **ONE_THREAD})
    trainer = int(shell.stdout.readline())
    wait_for_rows(shell, out, 2)
    shell.kill()
    shell.wait(30)
    assert alive(trainer)
    second = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ONE_THREAD}, timeout=120)
    assert second.returncode == 2
    assert f"in use by another trainer: PID {trainer} on host {socket.gethostname()}" in second.stderr
    deadline = time.monotonic() + 180
    while alive(trainer):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    longer = write_config(tmp_path / "longer.yaml", config(root, "gmm", steps=310, checkpoint_every=50))
    cmd[cmd.index(cfg)] = longer
    rerun = subprocess.run(cmd + ["--json"], capture_output=True, text=True, env={**os.environ, **ONE_THREAD},
                           timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout.splitlines()[-1])["resumed_from"].endswith("step-0000300")
    assert metric_steps(out) == list(range(1, 311))


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("flags,message", [
    (["--nnodes", "2"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "127.0.0.1:29500"],
     "--node-rank 2: out of range for --nnodes 2 (expected 0 .. 1)"),
    (["--nnodes", "2", "--rdzv-endpoint", "nohostport"], "--rdzv-endpoint: expected HOST:PORT"),
    (["--nproc", "0"], "--nproc: expected an integer >= 1"),
    (["--nnodes", "2", "--srun"], "--srun: not inside a SLURM allocation"),
])
def test_bad_launch_settings_are_named_and_write_nothing(toy, tmp_path, capsys, monkeypatch, flags, message):
    root, _ = toy
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", config(root, steps=2))
    assert main(["train", "--config", cfg, "--shards", str(root / "shards"), "--out", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("rendezvous", ["c10d", "static"])
def test_nodes_that_do_not_meet_name_the_endpoint_and_write_nothing(toy, tmp_path, rendezvous):
    """One agent of two: c10d waits for the other node, the static rendezvous of node 1 for node 0's store;
    both give up after --rdzv-timeout with the endpoint named."""
    root, _ = toy
    out = tmp_path / "run"
    endpoint = f"127.0.0.1:{launch.free_port()}"
    extra = ["--node-rank", "1"] if rendezvous == "static" else []
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "mmfm.cli", "train", "--config",
                           write_config(tmp_path / "run.yaml", config(root, steps=2)), "--shards",
                           str(root / "shards"), "--out", str(out), "--device", "cpu", "--nnodes", "2",
                           "--rdzv-endpoint", endpoint, "--rdzv-timeout", "4", *extra],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"mmfm train: error: --rdzv-endpoint {endpoint}: the 2 nodes did not meet within "
                           "--rdzv-timeout 4 s"), last
    assert time.monotonic() - t0 < 120 and not out.exists()


def test_the_srun_line_starts_one_agent_per_node_at_this_host(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    spec = launch.Launch(nproc=8, nnodes=4, threads=64, srun=True)
    argv = ["train", "--config", "c.yaml", "--nnodes", "4", "--nproc", "8", "--srun", "--threads", "64"]
    cmd = launch.srun_command(spec, argv, gpus=True, host="node001", port=29411)
    assert cmd[:cmd.index(sys.executable)] == ["srun", "--ntasks=4", "--kill-on-bad-exit=1",
                                                "--job-name=mmfm-agents-4242", "--cpus-per-task=64", "--gres=gpu:8"]
    agent = cmd[cmd.index(sys.executable) + 3:]
    assert "--srun" not in agent and agent[:len(argv) - 1] == [a for a in argv if a != "--srun"]
    assert agent[-4:] == ["--rdzv-endpoint", "node001:29411", "--rdzv-id", "mmfm-4242"]
    assert "--gres" not in " ".join(launch.srun_command(spec, argv, gpus=False))
