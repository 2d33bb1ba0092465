"""GPU memory and FLOPs of the jobs that run networks without training them: sample, evaluate, encode.

Each is traced the way :mod:`mmfm.plan.train_memory` traces a training step: the job's real networks and the
real code that runs them, on fake tensors (:func:`mmfm.plan.memory.fake_device`), with a
:class:`~mmfm.plan.memory.MemoryTracker` in CUDA's 512-byte blocks, and ``FlopCounterMode`` counting the
FLOPs. Networks are built from their architectures (presets, known encoders, RAE's decoder, pytorch-fid's
Inception skeleton) on the ``meta`` device and then given one fake storage per tensor, as a checkpoint
loaded and moved to the GPU tensor by tensor leaves them (:func:`materialize`); no weights are read.

**sample** (one rank of ``mmfm sample``, :func:`mmfm.sample.sample_run`): on the GPU are the exported
velocity network (fp32), the autoguide when ``guide`` is set and ``guidance_scale != 1`` (a second network;
``cfg_scale != 1`` doubles the batch instead), and the tokenizer: a transformers tokenizer loads its encoder
and the RAE ViT-XL decoder (the ``pixels`` tokenizer decodes on the CPU). The GMM source stays on the host
(noise is drawn per sample on the CPU). Then the two phases of a batch of ``sample.batch_size`` rows:

- one step of the ODE solver, as :func:`mmfm.flow.solvers.solve_ode` takes it (Euler: ``x + h v(x, t)``;
  Heun / midpoint: two evaluations), with float32 state and noise, under ``torch.no_grad``, each network
  wrapped as :class:`mmfm.sample.NetworkPrecision` wraps it (bf16 autocast when ``sample.precision`` is
  ``bf16``; fp32 when the key is absent);
- decoding the batch: :meth:`mmfm.encoders.hf.HFTokenizer.decode` itself (in the encoder's precision) and
  the uint8 conversion of :func:`mmfm.sample.to_uint8`.

**evaluate** (``eval.metric``): ``fid`` runs pytorch-fid's Inception (pool-3) on ``eval.batch_size`` images
(uint8 -> float, resized to 299 inside the network); ``fd`` runs the tokenizer's ``encode`` (the encoder) on
them. The decoder is not part of evaluation: samples are decoded by the sample jobs.

**encode**: the tokenizer's ``encode`` on ``shards.batch_size`` images (twice that with stored flips), with
the latent normalization applied on the device.

FLOPs are split into convolutions and the rest (matrix products, attention), because fp32 convolutions run
as TF32 on tensor cores and fp32 matrix products do not (:mod:`mmfm.plan.gpus`).
"""

from __future__ import annotations

import torch
from torch import nn

from mmfm import config as mc
from mmfm.plan import memory
from mmfm.plan.geometry import DECODER, Geometry

CONV_OPS = ("convolution", "_convolution", "convolution_backward", "cudnn_convolution")


def materialize(module: nn.Module) -> nn.Module:
    """Give every parameter and buffer of a ``meta`` module its own fresh tensor of the same shape and dtype
    (fake under :func:`~mmfm.plan.memory.fake_device`): the module as a strict load and ``.to(device)`` leave it.
    Tied tensors stay tied."""
    seen: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name, t in list(table.items()):
                if t is None:
                    continue
                if id(t) not in seen:
                    new = torch.empty(t.shape, dtype=t.dtype)
                    seen[id(t)] = nn.Parameter(new, requires_grad=False) if isinstance(t, nn.Parameter) else new
                table[name] = seen[id(t)]
    return module


def split_flops(counter) -> dict[str, int]:
    """``{"conv": ..., "matmul": ...}`` of a ``FlopCounterMode`` (convolutions vs everything else)."""
    out = {"conv": 0, "matmul": 0}
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        name = str(op).split(".")[1] if str(op).startswith("aten.") else str(op)
        out["conv" if name in CONV_OPS else "matmul"] += int(n)
    return out


# ------------------------------------------------------------------------------------------------ networks


def velocity_network(config: dict, run: str, geo: Geometry, num_modes: int) -> nn.Module:
    """The exported network of ``run`` (:func:`mmfm.models.velocity.network_from_metadata` of the metadata
    :func:`mmfm.train.loop.export_meta` writes), on the ``meta`` device, in eval mode without gradients."""
    from mmfm.models.velocity import network_from_metadata
    from mmfm.train.config import TrainConfig
    from mmfm.train.loop import export_meta

    settings = mc.with_gmm_files(mc.train_settings(config, run), "results/gmm/spatial.safetensors",
                                 "results/gmm/cls.safetensors")
    cfg = TrainConfig.from_dict(settings)
    labels = {"none": 0, "class": cfg.num_classes, "mode": num_modes}[cfg.conditioning]
    meta = export_meta(cfg, geo.num_tokens, geo.token_dim, labels, cfg.steps)
    with torch.device("meta"):
        net = network_from_metadata(meta)
    return net.eval().requires_grad_(False)


def tokenizer_skeleton(geo: Geometry, precision: str = "fp32", decoder: bool = False):
    """The config's tokenizer as :func:`mmfm.encoders.load_tokenizer` builds it, from its architecture
    (:class:`~mmfm.plan.geometry.Geometry`), networks on the ``meta`` device; ``None`` for ``pixels``."""
    if geo.name == "pixels":
        return None
    from mmfm.encoders.hf import TOKENIZERS
    from mmfm.encoders.rae import RAEDecoder

    a = geo.arch
    common = {k: a[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                "patch_size", "image_size")}
    with torch.device("meta"):
        if geo.name == "dinov2":
            from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

            model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
                **common, num_register_tokens=a["num_register_tokens"]))
        elif geo.name == "siglip2":
            from transformers import SiglipVisionConfig, SiglipVisionModel

            model = SiglipVisionModel(SiglipVisionConfig(**common))
        else:
            from transformers import ViTMAEConfig, ViTMAEModel

            model = ViTMAEModel(ViTMAEConfig(**common))
        dec = (RAEDecoder(pixel_mean=tuple(a["pixel_mean"]), pixel_std=tuple(a["pixel_std"]), token_dim=geo.token_dim,
                          grid=geo.grid[0], hidden_size=DECODER["hidden_size"], num_layers=DECODER["num_layers"],
                          num_heads=DECODER["num_heads"], intermediate_size=DECODER["intermediate_size"],
                          patch_size=DECODER["patch_size"]) if decoder else None)
    tok = object.__new__(TOKENIZERS[geo.name])  # the attributes HFTokenizer.__init__ sets, without a checkpoint
    tok.path, tok.device = "plan", torch.device("cpu")
    tok.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    tok.model = model.eval().requires_grad_(False)
    tok.config = model.config
    tok._prepare()
    tok.revision = geo.metadata.get("revision")
    tok.pixel_mean, tok.pixel_std = tuple(a["pixel_mean"]), tuple(a["pixel_std"])
    tok.channels = 3
    tok.patch_size = a["patch_size"]
    tok.image_size = geo.image_size
    tok.input_size = geo.grid[0] * a["patch_size"]
    tok.grid = tuple(geo.grid)
    tok.num_tokens = geo.num_tokens
    tok.token_dim = tok.cls_dim = geo.token_dim
    tok.decoder = dec.eval().requires_grad_(False) if dec is not None else None
    return tok


def _materialize_tokenizer(tok) -> None:
    materialize(tok.model)
    if tok.decoder is not None:
        materialize(tok.decoder)


def encoder_of(config: dict, geo: Geometry, tok):
    """``images (B, 3, S, S) -> (cls, tokens)`` as the job's tokenizer encodes them (``tok``, or ``pixels``)."""
    if tok is not None:
        return tok.encode
    from mmfm.encoders.pixels import PixelTokenizer

    e = config["encoder"]
    return PixelTokenizer(image_size=geo.image_size, patch_size=e.get("patch_size") or 2, pool=e.get("pool") or 2).encode


def inception_skeleton() -> nn.Module:
    """pytorch-fid's pool-3 InceptionV3 (:func:`mmfm.metrics.inception.load_inception` without its weights)."""
    from mmfm.metrics.inception import _pool3_model, fid_inception_skeleton

    with torch.device("meta"):
        return _pool3_model(fid_inception_skeleton())


# ------------------------------------------------------------------------------------------------ traces


def _trace(build, phases, round_to: int) -> tuple[memory.MemoryTracker, dict[str, dict[str, int]]]:
    """``build()`` the networks on the ``meta`` device (outside the fake mode), then run ``phases`` (``[(name,
    fn(state))]``: the first materializes the weights into ``state``, each later one is a phase that frees
    what it made) on fake tensors: once under a :class:`~mmfm.plan.memory.MemoryTracker` with a mark after
    each, then (on a fresh build) each phase again under ``FlopCounterMode`` alone: it decomposes composite
    operators, so it runs apart from the memory count. Returns the tracker and the FLOPs (conv / matmul) of
    each phase but the first."""
    from torch.utils.flop_counter import FlopCounterMode

    tracker = memory.MemoryTracker(round_to=round_to)
    state = {"built": build()}
    with memory.fake_device(), tracker:
        for name, fn in phases:
            fn(state)
            tracker.mark(name)
    flops = {}
    state = {"built": build()}
    with memory.fake_device():
        phases[0][1](state)
        for name, fn in phases[1:]:
            with FlopCounterMode(display=False) as counter:
                fn(state)
            flops[name] = split_flops(counter)
    return tracker, flops


def _result(tracker: memory.MemoryTracker, phases: list[str]) -> dict:
    w = tracker.marks[next(iter(tracker.marks))]
    peak = max([w] + [tracker.peaks[p] for p in phases])
    parts = {"weights": w, **{p: tracker.peaks[p] - w for p in phases}}
    return {"peak_bytes": int(peak), "need_bytes": memory.gpu_need(peak), "parts": parts}


def _precision_wrapper(precision: str):
    """Each network as :class:`mmfm.sample.NetworkPrecision` wraps it (bf16 autocast on the tensors' device, the
    fake CPU here, standing for CUDA's), or under :func:`mmfm.plan.memory.autocast` where sample.py has no
    wrapper."""
    from mmfm import sample

    if hasattr(sample, "NetworkPrecision"):
        return lambda net: sample.NetworkPrecision(net, precision)
    if precision == "fp32":
        return lambda net: net

    class _Autocast(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, t, **cond):
            with memory.autocast(torch.bfloat16):
                return self.net(x, t, **cond).float()

    return _Autocast


def sample_rank_memory(config: dict, run: str, geo: Geometry, num_modes: int, *, nfe: int,
                       method: str | None = None, round_to: int = memory.CUDA_BLOCK_BYTES) -> dict:
    """GPU memory of one rank of ``run``'s sample job at ``nfe`` steps of ``method`` (default: the run's headline
    sampler; the GMFlow / DFM samplers are traced as one network call a step, as Euler) and its FLOPs per sample
    (module doc).

    Returns ``{"peak_bytes", "need_bytes", "parts" {weights, ode_step, decode}, "flops_per_sample" {conv,
    matmul} (all ``nfe`` steps and the decoding of one sample), "flops_split" {"velocity_per_step",
    "decoder"} (per sample; dopri5 counted at 6 evaluations a step), "precision" {velocity, decoder},
    "evaluations_per_step"}``."""
    from mmfm.flow.guidance import Autoguidance, ClassifierFreeGuidance

    s = mc.sample_settings(config, run)
    b = int(s["batch_size"])
    precision = s.get("precision", "fp32")
    cond = config["runs"][run]["conditioning"]
    guided = s.get("guide") is not None and float(s.get("guidance_scale", 1.0)) != 1.0
    cfg_scale = float(s.get("cfg_scale", 1.0))
    guide_run = mc.guide_run(config, run)
    wrap = _precision_wrapper(precision)
    from mmfm.plan.artifacts import EVALUATIONS_PER_STEP

    method = mc.samplers(config, run)[0] if method is None else method
    evals = EVALUATIONS_PER_STEP.get(method, 1)

    def build():  # a guide file: its architecture is in the file; the run's own is assumed
        return {"main": velocity_network(config, run, geo, num_modes),
                "guide": velocity_network(config, guide_run or run, geo, num_modes) if guided else None,
                "tok": tokenizer_skeleton(geo, config["encoder"].get("precision", "fp32"), decoder=True)}

    def weights(st):  # the networks as sample_run holds them on the device
        main, guide, st["tok"] = st["built"]["main"], st["built"]["guide"], st["built"]["tok"]
        velocity = wrap(materialize(main))
        if getattr(main, "head", "velocity") == "gm":  # a GMFlow network: traced through its mixture's mean
            from mmfm.models.gm_head import GMMeanVelocity

            velocity = GMMeanVelocity(velocity)
        if guide is not None:
            velocity = Autoguidance(velocity, wrap(materialize(guide)), float(s["guidance_scale"]),
                                    tuple(s["guidance_interval"]))
        if cfg_scale != 1.0 and cond == "class":
            velocity = ClassifierFreeGuidance(velocity, cfg_scale, main.num_classes, tuple(s["guidance_interval"]))
        st["velocity"] = velocity
        if st["tok"] is not None:
            _materialize_tokenizer(st["tok"])

    def ode_step(st):  # one step of solve_ode: state and noise float32, the time grid on the device
        grid = torch.empty(nfe + 1, dtype=torch.float32)  # noqa: F841 (held through the step)
        pyramid = getattr(st["built"]["main"], "pyramid", None)  # DFM: the packed stages, a time per stage
        tokens, times = (geo.num_tokens, (b,)) if pyramid is None else (pyramid.packed_tokens, (b, pyramid.stages))
        x = torch.empty(b, tokens, geo.token_dim, dtype=torch.float32)
        kw = {"y": torch.zeros(b, dtype=torch.long)} if cond != "none" else {}

        def v(state):
            t = torch.full(times, 0.5, dtype=torch.float32)
            return st["velocity"](state, t, **kw).to(torch.float32)

        with torch.no_grad():
            h = 0.01
            k1 = v(x)
            if method == "heun":
                k2 = v(x + h * k1)
                x_next = x + 0.5 * h * (k1 + k2)
            elif method == "midpoint":
                k2 = v(x + 0.5 * h * k1)
                x_next = x + h * k2
            else:  # euler, dopri5 (its evaluations counted below), the one-call-a-step samplers
                x_next = x + h * k1
        del x_next

    def decode(st):  # decode_latents -> HFTokenizer.decode -> to_uint8 (the pixels tokenizer: on the CPU)
        if st["tok"] is not None:
            z = torch.empty(b, geo.num_tokens, geo.token_dim, dtype=torch.float32)
            images = st["tok"].decode(z)
            u8 = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
            del z, images, u8

    tracker, flops = _trace(build, [("weights", weights), ("ode_step", ode_step), ("decode", decode)], round_to)
    per_step = evals if method == "dopri5" else 1  # the traced step holds Heun's / midpoint's 2 evaluations
    step, dec = flops["ode_step"], flops["decode"]
    out = _result(tracker, ["ode_step", "decode"])
    out["flops_per_sample"] = {k: (step[k] * nfe * per_step + dec[k]) / b for k in step}
    out["precision"] = {"velocity": precision, "decoder": config["encoder"].get("precision", "fp32")}
    out["flops_split"] = {"velocity_per_step": {k: step[k] * per_step / b for k in step},
                          "decoder": {k: dec[k] / b for k in dec}}
    out["evaluations_per_step"] = evals
    return out


def evaluate_memory(config: dict, geo: Geometry, round_to: int = memory.CUDA_BLOCK_BYTES) -> dict:
    """GPU memory of the evaluate job and its FLOPs per sample image (module doc)."""
    ev = config["eval"]
    b = int(ev["batch_size"])
    side = geo.image_size if geo.name == "pixels" else geo.grid[0] * DECODER["patch_size"]
    fid = ev["metric"] == "fid"
    precision = "fp32" if fid else config["encoder"].get("precision", "fp32")

    def build():
        return inception_skeleton() if fid else tokenizer_skeleton(geo, precision)

    def weights(st):
        if fid:
            st["net"] = materialize(st["built"])
        else:
            if st["built"] is not None:
                _materialize_tokenizer(st["built"])
            st["encode"] = encoder_of(config, geo, st["built"])

    def batch(st):
        with torch.no_grad():
            if fid:  # inception._to_input, then the network and the features' squeeze
                x = torch.empty(b, side, side, 3, dtype=torch.uint8).permute(0, 3, 1, 2).contiguous().float().div(255)
                feats = st["net"](x)[0].squeeze(3).squeeze(2)
            else:  # train.evaluate.fd_of_images
                x = torch.empty(b, side, side, 3, dtype=torch.uint8).permute(0, 3, 1, 2).float().div(255)
                _, tokens = st["encode"](x)
                feats = tokens.float().reshape(b, -1).double()
            del x, feats

    tracker, flops = _trace(build, [("weights", weights), ("batch", batch)], round_to)
    out = _result(tracker, ["batch"])
    out["flops_per_sample"] = {k: v / b for k, v in flops["batch"].items()}
    out["precision"] = precision
    return out


def encode_memory(config: dict, geo: Geometry, round_to: int = memory.CUDA_BLOCK_BYTES) -> dict:
    """GPU memory of an encode job and its FLOPs per image (both rows of a stored flip) (module doc)."""
    sh = config["shards"]
    b = int(sh["batch_size"])
    reps = 2 if sh["flip"] else 1
    precision = config["encoder"].get("precision", "fp32")

    def build():
        return tokenizer_skeleton(geo, precision)

    def weights(st):
        if st["built"] is not None:
            _materialize_tokenizer(st["built"])
        st["encode"] = encoder_of(config, geo, st["built"])
        st["scale"] = torch.empty(geo.num_tokens, geo.token_dim) if config["encoder"].get("norm_stats") else None

    def batch(st):
        with torch.no_grad():
            imgs = torch.empty(b, geo.image_size, geo.image_size, 3, dtype=torch.uint8)
            x = imgs.permute(0, 3, 1, 2).float().div_(255.0)  # mmfm.data.encode._to_model
            if reps == 2:
                x = torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1)
            cls, tokens = st["encode"](x)
            tokens = tokens.float()
            if st["scale"] is not None:  # LatentNorm.normalize on the device
                tokens = tokens / st["scale"]
            del cls, tokens, x, imgs

    tracker, flops = _trace(build, [("weights", weights), ("batch", batch)], round_to)
    out = _result(tracker, ["batch"])
    out["flops_per_sample"] = {k: v / b for k, v in flops["batch"].items()}
    out["precision"] = precision
    return out
