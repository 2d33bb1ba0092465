"""GPU memory per rank of a training run: one real optimizer step, traced on fake tensors.

:func:`train_rank_memory` builds what :func:`mmfm.train.loop.train` builds on each rank, with the same
functions, inside :func:`mmfm.plan.memory.fake_device`: the spatial GMM source (means in the run's
``source_precision``) and the CLS GMM of mode coupling (float64), the velocity network, the fused AdamW,
the EMA, DDP with ``gradient_as_bucket_view`` over a fake process group of the run's world size, the
adaptive weighting, AdamW's moments as its first step creates them; then one optimizer step of
:class:`mmfm.train.step.TrainStep` on a batch of this rank's rows (float16 tokens converted to float32,
as the loop receives them), under bf16 autocast when the run asks for it. Of the step's micro-batches
the first and the last run (:class:`_TracedStep`; the others repeat the first's memory exactly).
``peak_bytes`` is the :class:`~mmfm.plan.memory.MemoryTracker` peak with CUDA's 512-byte blocks, and the
parts add up to it. The FLOPs are the network's, forward and backward, counted by ``FlopCounterMode`` in
a pass of their own (the counter holds references that would raise the traced peak); the coupling's
posterior adds less than 0.01 % to a step.

``_trace(..., fake=False)`` runs the same code on real CPU tensors: the tests compare it with the CPU
allocator's own peak (``cpu_allocator_peak``).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from mmfm.plan import memory
from mmfm.train.step import TrainStep

#: The parts reported, in the order they are created (bytes alive after each minus before).
PARTS = ("gmm_source", "cls_gmm", "parameters", "optimizer_state", "ema", "ddp_buckets", "gradients_and_caches",
         "batch_activations_transients")


def _config(settings: dict):
    from mmfm.train.config import TrainConfig

    s = {k: v for k, v in settings.items() if k in {f for f in TrainConfig.__dataclass_fields__}}
    if s.get("source") == "gmm":
        s.setdefault("gmm", "plan:spatial-gmm")  # no file is read; the paths only satisfy the checks
    if str(s.get("coupling", "")).startswith("mode"):
        s.setdefault("cls_gmm", "plan:cls-gmm")
    return TrainConfig.from_dict(s)


class _TracedStep(TrainStep):
    """The loop's step, running the first and the last micro-batch only: the ones between hold exactly
    the memory of the first (same shapes, gradients accumulating in place), and the last is the one that
    differs (DDP's all-reduce). The step-level tensors (``x_t``, ``u``, noise) keep all of the rank's rows."""

    def micro_batches(self):
        return (0, self.accumulation - 1) if self.accumulation > 1 else (0,)


def _initialize_state(optimizer) -> None:
    """AdamW's moments and step counts as its first step creates them (zero gradients, then none), so that
    the traced step is a step of the run, not its first."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _network_flops(cfg, labels: int, micro: int, num_tokens: int, token_dim: int) -> int:
    """Forward + backward FLOPs of one micro-batch through the run's network, counted by ``FlopCounterMode``
    on a fresh fake copy: a pass of its own, as the counter holds references that would raise the
    memory trace's peak."""
    from mmfm.bench.train import count_flops
    from mmfm.train.loop import build_model

    with memory.fake_device():
        net = build_model(cfg, num_tokens, token_dim, labels)
        x = torch.empty(micro, num_tokens, token_dim)
        y = None if cfg.conditioning == "none" else torch.zeros(micro, dtype=torch.long)
        if cfg.method == "dmf":  # both branches, the JVP's tangents (or the difference's passes), the guidance
            return _dmf_flops(cfg, net, x, y)
        t = torch.empty(micro)
        if getattr(net, "pyramid", None) is not None:  # DFM: the packed stages, a time per stage
            x, t = torch.empty(micro, net.pyramid.packed_tokens, token_dim), torch.empty(micro, net.dfm_stages)
        return count_flops(net, (x, t, x), y)


def _dmf_flops(cfg, net, x: torch.Tensor, y) -> int:
    """FLOPs of DMF's objective (:class:`~mmfm.train.objective.FlowMapObjective`) and its backward on ``x``'s rows,
    the online network standing in for the guide and the init network."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmfm.flow.sources import GaussianSource
    from mmfm.train.objective import make_objective

    stand_in = net if cfg.dmf_guidance != "none" else None
    objective = make_objective(cfg, GaussianSource(x.shape[1:]), guide=stand_in, main=stand_in)
    t = torch.full((x.shape[0],), 0.5)
    batch = {"x": x, "t": t, "u": x, "x_mf": x, "t_mf": t, "r_mf": t + 0.25, "u_mf": x}
    with FlopCounterMode(display=False) as counter:
        per_row, _ = objective.forward_loss(net, net, batch, {} if y is None else {"y": y})
        per_row.mean().backward()
    return int(counter.get_total_flops())


def _tensor(shape, dtype, fake: bool, fill: float = 0.0) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype) if fake else torch.full(shape, fill, dtype=dtype)


def _trace(settings: dict, *, num_tokens: int, token_dim: int, cls_dim: int, num_modes: int, world_size: int,
           num_classes: int = 1000, fake: bool = True, round_to: int = memory.CUDA_BLOCK_BYTES) -> dict:
    from mmfm.data.prefetch import to_device
    from mmfm.flow.couplings import make_coupling
    from mmfm.flow.path import LinearPath
    from mmfm.flow.sources import GaussianMixtureSource, GaussianSource
    from mmfm.flow.time import TimeSampler
    from mmfm.train.ema import EMA
    from mmfm.train.loop import SOURCE_DTYPES, build_model
    from mmfm.train.objective import make_objective
    from mmfm.train.schedule import derive_batch
    from mmfm.train.step import make_optimizer
    from mmfm.train.weighting import AdaptiveModeWeighting

    cfg = _config(settings)
    micro, accum = derive_batch(cfg.global_batch, world_size, cfg.micro_batch_max)
    per_rank = micro * accum
    k = num_modes
    tracker = memory.MemoryTracker(round_to=round_to)
    group = memory.fake_process_group(world_size) if world_size > 1 else contextlib.nullcontext()
    device_mode = memory.fake_device() if fake else contextlib.nullcontext()
    with group, device_mode, tracker:
        marks = [tracker.mark("start")]
        if cfg.source == "gmm":
            weights = _tensor((k,), torch.float64, fake, 1.0 / k)
            source = GaussianMixtureSource(weights, _tensor((k, num_tokens, token_dim),
                                                            SOURCE_DTYPES[cfg.source_precision], fake),
                                           _tensor((k,), torch.float32, fake, 1.0))
        else:
            source = GaussianSource((num_tokens, token_dim))
        marks.append(tracker.mark("gmm_source"))
        if cfg.coupling.startswith("mode"):
            assigner = GaussianMixtureSource(_tensor((k,), torch.float64, fake, 1.0 / k),
                                             _tensor((k, cls_dim), torch.float64, fake),
                                             _tensor((k, cls_dim), torch.float64, fake, 1.0))
            coupling = make_coupling("mode", source, assigner=assigner, assignment=cfg.coupling.removeprefix("mode-"))
        else:
            coupling = make_coupling(cfg.coupling, source)
        marks.append(tracker.mark("cls_gmm"))
        labels = {"none": 0, "class": cfg.num_classes or num_classes, "mode": k}[cfg.conditioning]
        raw = build_model(cfg, num_tokens, token_dim, labels)
        raw.train()
        marks.append(tracker.mark("parameters"))
        optimizer = make_optimizer(raw.parameters(), cfg)
        _initialize_state(optimizer)
        marks.append(tracker.mark("optimizer_state"))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.lr_schedule().factor)
        ema = EMA(raw, cfg.ema_schedule())
        marks.append(tracker.mark("ema"))
        model = memory.ddp(raw, gradient_as_bucket_view=True) if world_size > 1 else raw
        marks.append(tracker.mark("ddp_buckets"))
        weighting = (AdaptiveModeWeighting(k, cfg.adaptive_decay, cfg.adaptive_warmup_steps, cfg.adaptive_gamma,
                                           cfg.adaptive_clamp) if cfg.adaptive_weighting else None)
        autocast = functools.partial(memory.autocast, torch.bfloat16) if cfg.precision == "bf16" \
            else contextlib.nullcontext
        times = TimeSampler(cfg.time_dist, mu=cfg.time_mu, sigma=cfg.time_sigma, interval=tuple(cfg.time_interval),
                            shift=cfg.shift(num_tokens * token_dim))
        # DMF's training-time guidance: the online network stands in for the guide and the init network (their
        # no-grad passes are traced; their weights, a DiTDH-S guide and a frozen copy for ag-distill, are not)
        stand_in = raw if cfg.method == "dmf" and cfg.dmf_guidance != "none" else None
        objective = make_objective(cfg, source, dim=num_tokens * token_dim, guide=stand_in, main=stand_in,
                                   num_tokens=num_tokens)
        step = _TracedStep(model=model, raw=raw, optimizer=optimizer, scheduler=scheduler, ema=ema,
                           coupling=coupling, times=times, path=LinearPath(),
                           generator=torch.Generator().manual_seed(cfg.seed), global_batch=cfg.global_batch,
                           micro=micro, accumulation=accum, rank=0, world=world_size, conditioning=cfg.conditioning,
                           class_dropout_prob=cfg.class_dropout_prob, weighting=weighting, autocast=autocast,
                           grad_clip=cfg.grad_clip, seed=cfg.seed, objective=objective)
        x1 = to_device(_tensor((per_rank, num_tokens, token_dim), torch.float16, fake), "cpu", torch.float32)
        cls = (to_device(_tensor((per_rank, cls_dim), torch.float16, fake), "cpu", torch.float32)
               if cfg.coupling.startswith("mode") else None)
        label = torch.zeros(per_rank, dtype=torch.long) if cfg.conditioning == "class" else None
        out = step(x1, cls, label, step=1)
        del x1, cls, label, out
        marks.append(tracker.mark("gradients_and_caches"))
        step_peak = tracker.peaks["gradients_and_caches"]
    parts = {name: marks[i + 1] - marks[i] for i, name in enumerate(PARTS[:-1])}
    parts["batch_activations_transients"] = step_peak - marks[-1]  # the parts add up to the peak
    per_sample = _network_flops(cfg, labels, micro, num_tokens, token_dim) / micro
    return {"peak_bytes": int(tracker.peak), "need_bytes": memory.gpu_need(tracker.peak), "parts": parts,
            "flops_per_step": int(per_sample * per_rank), "flops_per_sample": per_sample,
            "micro_batch": micro, "accumulation": accum,
            "world_size": world_size, "precision": cfg.precision, "source_precision": cfg.source_precision}


def train_rank_memory(settings: dict, *, num_tokens: int, token_dim: int, cls_dim: int, num_modes: int,
                      world_size: int, num_classes: int = 1000) -> dict:
    """GPU memory and FLOPs of one rank of a run (module docstring).

    Args:
        settings: the run's effective training settings (:func:`mmfm.config.train_settings`); GMM file paths
            are not needed.
        num_tokens, token_dim, cls_dim: the latent's ``N``, ``D`` and the CLS width.
        num_modes: ``K`` of the GMMs. world_size: ranks of the run. num_classes: labels of class conditioning
            when the settings do not say.

    Returns ``{"peak_bytes", "need_bytes" (peak + fragmentation + context, :func:`memory.gpu_need`), "parts"
    (bytes per :data:`PARTS`), "flops_per_step" (one optimizer step of this rank, forward + backward),
    "flops_per_sample", "micro_batch", "accumulation", "world_size", "precision", "source_precision"}``.
    """
    return _trace(settings, num_tokens=num_tokens, token_dim=token_dim, cls_dim=cls_dim, num_modes=num_modes,
                  world_size=world_size, num_classes=num_classes)
