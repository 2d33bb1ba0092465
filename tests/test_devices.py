"""The device policy (mmfm.devices): binding through a mocked CUDA, the reasons CUDA is refused, the CPU
fallback, no more processes than devices, threads shared by the processes of a node."""

import argparse
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import yaml
from toyrun import config

import mmfm.config as mc
from mmfm import cli, devices
from mmfm.cli import main


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA that says it has 4 devices; ``calls`` records set_device and init_process_group."""
    calls = {"set_device": [], "init": []}
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: calls.get("count", 4))
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls["set_device"].append(i))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return calls


def train_args(root, out, *extra):
    cfg = out.parent / "run.yaml"
    cfg.write_text(yaml.safe_dump(config(root, steps=2, checkpoint_every=2)))
    return ["train", "--config", str(cfg), "--shards", str(root / "shards"), "--out", str(out), *extra]


def test_each_rank_binds_its_own_device_and_collectives_run_there(fake_cuda, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("RANK", "7")
    monkeypatch.setenv("WORLD_SIZE", "8")
    joined = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(joined))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: joined.update(backend=backend, **kw))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: joined.update(left=True))
    args = argparse.Namespace(device=None, allow_cpu_fallback=False, threads=None)
    kind = cli._device_type(args)
    device = cli._bind(args, kind)
    assert kind == "cuda" and device == torch.device("cuda", 3)
    assert fake_cuda["set_device"] == [3]  # barrier() / all_gather_object use the current device
    with devices.process_group(device):
        assert joined["backend"] == "nccl" and joined["device_id"] == torch.device("cuda", 3)
        assert joined["timeout"] == devices.COLLECTIVE_TIMEOUT
    assert joined.get("left")
    monkeypatch.setenv("LOCAL_RANK", "4")  # a rank beyond the node's devices
    with pytest.raises(devices.DeviceError, match="LOCAL_RANK 4: this node shows only 4 CUDA device"):
        devices.bind("cuda")


def test_one_process_may_pick_its_device(fake_cuda, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert devices.bind("cuda", "cuda:2") == torch.device("cuda", 2) and fake_cuda["set_device"] == [2]
    assert devices.bind("cpu") == torch.device("cpu")


def test_nproc_above_the_visible_devices_is_refused_naming_both(fake_cuda, toy, tmp_path, capsys, monkeypatch):
    root, _ = toy
    fake_cuda["count"] = 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    out = tmp_path / "run"
    assert main(train_args(root, out, "--nproc", "4", "--device", "cuda")) == 2
    err = capsys.readouterr().err
    assert "--nproc 4: only 2 CUDA device(s) are visible" in err and "CUDA_VISIBLE_DEVICES=0,1" in err
    assert not out.exists()
    with pytest.raises(devices.DeviceError, match="--nproc: expected a positive integer"):
        devices.check_nproc(0, "cuda")
    devices.check_nproc(8, "cpu")  # gloo processes on the CPU: any number


def test_gpus_asked_without_cuda_are_refused_with_the_reason(toy, tmp_path, capsys, monkeypatch):
    root, _ = toy
    out = tmp_path / "run"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(train_args(root, out, "--device", "cuda")) == 2
    err = capsys.readouterr().err
    assert "--device cuda: CUDA is unusable here" in err and "allow_cpu_fallback" in err
    assert not out.exists()
    with pytest.raises(devices.DeviceError, match=r"resources gpu: 2: CUDA is unusable"):
        mc.device(2)
    assert mc.device(0) == "cpu"  # asked for none: no check
    assert devices.resolve(None) == "cpu"  # auto: the CPU, quietly


def test_the_reason_names_the_build_the_visible_devices_or_the_driver(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "has no CUDA support" in devices.cuda_problem()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert devices.cuda_problem() == "CUDA_VISIBLE_DEVICES='' hides every device"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")

    def old_driver():  # what torch says when the driver is older than its CUDA
        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old (found version 12020). "
                      "Please update your GPU driver", UserWarning, stacklevel=1)
        return False

    monkeypatch.setattr(torch.cuda, "is_available", old_driver)
    why = devices.cuda_problem()
    assert "driver on your system is too old (found version 12020)" in why and "built for CUDA 13.0" in why
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "NVIDIA_DRIVER", "/nonexistent/nvidia/version")
    assert "no NVIDIA driver is loaded" in devices.cuda_problem()


def test_allow_cpu_fallback_warns_and_trains_on_the_cpu(toy, tmp_path, capsys, monkeypatch):
    import json

    root, _ = toy
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="running on the CPU because allow_cpu_fallback is set"):
        assert mc.device(1, allow_cpu_fallback=True) == "cpu"
    with pytest.warns(UserWarning, match="allow_cpu_fallback"):
        assert main(train_args(root, tmp_path / "run", "--device", "cuda", "--allow-cpu-fallback", "--json")) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["device"] == "cpu" and line["done"]


def test_threads_are_shared_by_the_processes_of_a_node(monkeypatch):
    assert devices.threads_per_process(64, 8) == 8 and devices.threads_per_process(3, 8) == 1
    env = devices.thread_env(64, 8)
    assert set(env) == set(devices.THREAD_VARS) and set(env.values()) == {"8"}
    assert devices.threads_per_process(None, 1) == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "64")  # what Snakemake sets for a rule of 64 threads
    assert devices.job_threads() == 64
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert devices.job_threads() is None


def test_workflow_jobs_get_their_flags_from_their_own_resources():
    one = mc.launch_flags({"gpu": 8, "mem_mb": 1}, 64)
    assert one == ["--device", "cuda", "--threads", "64", "--nproc", "8"]
    assert mc.launch_flags({"gpu": 0}, 2) == ["--device", "cpu", "--threads", "2", "--nproc", "1"]
    nodes = mc.launch_flags({"tasks": 4, "gres": "gpu:8", "gpu": 0, "mpi": "srun"}, 64, allow_cpu_fallback=True)
    assert nodes == ["--device", "cuda", "--threads", "64", "--allow-cpu-fallback", "--nnodes", "4", "--nproc", "8",
                     "--srun"]
