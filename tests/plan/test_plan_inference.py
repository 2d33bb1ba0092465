"""The sample, evaluate and encode traces against the real code on real CPU tensors: the same weights, the same
solver step, the same FLOPs (tiny networks; the presets' architectures are built the same way)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from mmfm import config as mc
from mmfm.plan import geometry as geom
from mmfm.plan import inference
from mmfm.plan.load import validate
from mmfm.plan.memory import MemoryTracker

ROOT = Path(__file__).resolve().parents[2]


def blocks(module, round_to: int = 512) -> int:
    """Bytes of a module's tensors on the GPU, one allocation each, in CUDA blocks."""
    seen = {id(t): t for t in module.state_dict(keep_vars=True).values()}
    return sum(-(-t.untyped_storage().nbytes() // round_to) * round_to for t in seen.values())


def demo_config(**sample) -> dict:
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["runs"]["guide"] = {**cfg["runs"]["gmm-mode"], "evaluate": False, "model": "ditdh-tiny"}
    cfg["runs"]["gmm-mode"]["sample"] = {"guide": "guide", "guidance_scale": 1.5, **sample}
    cfg, _ = validate(cfg)
    return cfg


def real_network(cfg: dict, run: str, geo) -> torch.nn.Module:
    from mmfm.models.velocity import build_velocity_network
    from mmfm.train.config import TrainConfig

    tc = TrainConfig.from_dict(mc.with_gmm_files(mc.train_settings(cfg, run), "g", "c"))
    return build_velocity_network(tc.model, in_channels=geo.token_dim, num_tokens=geo.num_tokens,
                                  conditioning=tc.conditioning, num_classes=0).eval().requires_grad_(False)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_sample_step_matches_the_real_solver(method):
    """The traced solver step holds what a real ``solve_ode`` step holds, and the FLOPs are the network's."""
    from mmfm.flow.guidance import Autoguidance
    from mmfm.flow.solvers import solve_ode
    from mmfm.flow.time import time_grid

    cfg = demo_config(method=method, batch_size=64)
    geo = geom.tokenizer_geometry(cfg["encoder"])
    got = inference.sample_rank_memory(cfg, "gmm-mode", geo, 32, nfe=1, round_to=1)
    tracker = MemoryTracker()  # real CPU tensors, everything made inside the tracker (as it requires)
    with tracker, torch.no_grad():
        main, guide = real_network(cfg, "gmm-mode", geo), real_network(cfg, "guide", geo)
        velocity = Autoguidance(main, guide, 1.5, (0.0, 1.0))
        weights = tracker.mark("weights")
        x0 = torch.randn(64, geo.num_tokens, geo.token_dim)
        grid = time_grid(1, dtype=torch.float32)
        res = solve_ode(lambda x, t: velocity(x, t), x0, grid, method)
        del res, x0, grid
        tracker.mark("step")
    assert got["parts"]["weights"] == weights == blocks(main, 1) + blocks(guide, 1)
    assert got["parts"]["ode_step"] == pytest.approx(tracker.peaks["step"] - weights, rel=0.01)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        velocity(torch.zeros(64, geo.num_tokens, geo.token_dim), torch.full((64,), 0.5))
    evals = 2 if method == "heun" else 1
    assert sum(got["flops_split"]["velocity_per_step"].values()) * 64 == evals * counter.get_total_flops()


def test_sample_weights_in_cuda_blocks_and_flops_scale_with_nfe():
    cfg = demo_config()
    geo = geom.tokenizer_geometry(cfg["encoder"])
    one = inference.sample_rank_memory(cfg, "gmm-mode", geo, 32, nfe=1)
    eight = inference.sample_rank_memory(cfg, "gmm-mode", geo, 32, nfe=8)
    main, guide = real_network(cfg, "gmm-mode", geo), real_network(cfg, "guide", geo)
    assert one["parts"]["weights"] == blocks(main) + blocks(guide)
    assert one["peak_bytes"] == eight["peak_bytes"]  # memory does not grow with the steps
    assert sum(eight["flops_per_sample"].values()) == pytest.approx(8 * sum(one["flops_per_sample"].values()))


def test_fid_evaluation_traces_pytorch_fids_inception():
    from mmfm.metrics.inception import _pool3_model, fid_inception_skeleton

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["eval"].update(metric="fid", reference="no/such/ref.npz", batch_size=2)
    cfg, notes = validate(cfg)  # the missing reference is a note
    assert notes and notes[0].startswith("eval.reference: no/such/ref.npz does not exist yet")
    geo = geom.tokenizer_geometry(cfg["encoder"])
    got = inference.evaluate_memory(cfg, geo)
    net = _pool3_model(fid_inception_skeleton())
    assert got["parts"]["weights"] == blocks(net)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.rand(2, 3, geo.image_size, geo.image_size))
    assert sum(got["flops_per_sample"].values()) == pytest.approx(counter.get_total_flops() / 2)
    assert got["flops_per_sample"]["matmul"] == 0  # all convolutions: TF32 in fp32 (mmfm.plan.gpus)


def fresh(module: torch.nn.Module) -> None:
    """Replace every parameter and buffer by a copy made now."""
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name, t in table.items():
                if t is not None:
                    table[name] = torch.nn.Parameter(t.clone(), requires_grad=False) \
                        if isinstance(t, torch.nn.Parameter) else t.clone()


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    """A small DINOv2-with-registers checkpoint folder (as tests/encoders builds them): patch 7, 16 x 16 grid."""
    from transformers import (
        BitImageProcessor,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    folder = tmp_path_factory.mktemp("dinov2")
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28,
        patch_size=7, num_register_tokens=4))
    model.save_pretrained(folder)
    BitImageProcessor(image_mean=[0.3, 0.5, 0.7], image_std=[0.2, 0.4, 0.8]).save_pretrained(folder)
    return folder


def test_encode_traces_the_real_tokenizer(tiny_dinov2):
    """The tokenizer skeleton (architecture from encoder.path/config.json, no weights) holds what the real
    tokenizer loaded from the folder holds, and its encode allocates what the real encode allocates."""
    from mmfm.data.encode import _to_model
    from mmfm.encoders import load_tokenizer

    enc = {"name": "dinov2", "path": str(tiny_dinov2), "image_size": 112, "precision": "fp32"}
    geo = geom.tokenizer_geometry(enc)
    assert geo.source.endswith("config.json") and geo.token_dim == 32 and geo.arch["patch_size"] == 7
    cfg = {"encoder": enc, "shards": {"batch_size": 4, "flip": True}}
    got = inference.encode_memory(cfg, geo, round_to=1)
    tok = load_tokenizer("dinov2", str(tiny_dinov2), image_size=112)
    tracker = MemoryTracker()
    with tracker, torch.no_grad():
        fresh(tok.model)  # every tensor made inside the tracker (its storages are what it counts)
        weights = tracker.mark("weights")
        imgs = torch.zeros(4, 112, 112, 3, dtype=torch.uint8)
        x = _to_model(imgs, "cpu", True)
        cls, tokens = tok.encode(x)
        del imgs, x, cls, tokens
        tracker.mark("batch")
    assert got["parts"]["weights"] == weights == blocks(tok.model, 1)
    assert got["parts"]["batch"] == pytest.approx(tracker.peaks["batch"] - weights, rel=0.02)
    with FlopCounterMode(display=False) as counter:
        tok.encode(torch.zeros(8, 3, 112, 112))
    assert sum(got["flops_per_sample"].values()) * 4 == counter.get_total_flops()  # per image: both flips


def test_geometry_of_the_presets_is_raes():
    for name, patch in (("dinov2", 14), ("siglip2", 16), ("mae", 16)):
        geo = geom.tokenizer_geometry({"name": name, "path": "no/such/folder", "image_size": 256})
        assert (geo.grid, geo.token_dim, geo.cls_dim, geo.arch["patch_size"]) == ((16, 16), 768, 768, patch)
        assert json.dumps(geo.metadata)  # what a shard records
