"""The training loop (docs/method.md §2.3-2.4, §3.4-3.5; docs/design.md §2, §6).

One optimizer step, per rank (``B = global_batch / world_size`` rows, ``B = micro * accumulation``):

1. the next ``B`` rows of the :class:`~mmfm.data.stream.ShardStream`: ``x1 = tokens (B, N, D)``, and the
   CLS descriptors ``cls (B, Dc)`` (mode coupling) or the labels ``label (B,)`` (class conditioning);
2. coupling ``(x0, x1, modes) = coupling(x1, cls)``, times ``t ~ TimeSampler (B,)`` (shifted),
   ``x_t = (1 - t) x0 + t x1``, target ``u = x1 - x0`` (paper convention, t = 0 is the source). Every
   rank draws modes, times and label dropout from one ``torch.Generator`` seeded by ``seed`` alone, as if
   for the whole global batch, and keeps its own rows (``share=(rank, world)``); the Gaussian noise of
   global row ``j`` comes from its own seed (:func:`mmfm.train.step.noise_seeds`), so a rank draws only
   its rows' noise. Row ``j`` of a global batch gets the same noise, mode and time on 1 or on 8 ranks,
   and the accumulation split changes no draw, only how the batch is cut. (Which data rows form a
   global batch does depend on the number of ranks: each rank streams its own contiguous part of the
   epoch, :mod:`mmfm.data.stream`, reading 1/world of the data.)
3. ``accumulation`` micro-steps of ``micro`` rows: forward (bf16 autocast on CUDA when asked), loss
   ``velocity_loss * micro / B`` (the per-rank mean), backward (DDP ``no_sync`` on all but the last);
   With ``adaptive_weighting`` the per-sample losses are weighted by their mode's
   :class:`~mmfm.train.weighting.AdaptiveModeWeighting` (docs/method.md §3.7), updated after the step;
4. clip the gradient norm, fused AdamW step (skipped on the device when the loss or the norm is not
   finite), LR scheduler step (``LambdaLR`` with :meth:`~mmfm.train.schedule.LRSchedule.factor`), EMA
   update with the decay of this step.

Steps 2-4 are :class:`~mmfm.train.step.TrainStep`. The GPU never waits for the host: the next batches
are read, shuffled, checked (finite tokens, labels in range) and pinned by a background thread
(:class:`~mmfm.data.prefetch.Prefetch`), tokens cross as float16 with ``non_blocking`` and are converted
on the device, and nothing is read back from the device between log steps: the losses, gradient norms
and finiteness flags of the steps since the last read are fetched together (one host sync) at each log
step, evaluation, checkpoint and stop. The stop-signal vote runs over a gloo group on host tensors.

The velocity network sees ``y = modes`` (mode conditioning), ``y = label`` (class conditioning, with a
dropout mask drawn from the same generator for CFG) or nothing.

Resume: every ``checkpoint_every`` steps (and at the end) the model, EMA, AdamW, scheduler, step, the
stream's position, every rank's generators and the config go to ``out_dir/step-XXXXXXX`` through
:func:`~mmfm.train.checkpoint.save_checkpoint`; ``train(..., resume=True)`` continues from the latest one,
bit for bit on the CPU. SIGTERM / SIGUSR1 / SIGINT finish the step, checkpoint and raise
:class:`TrainingInterrupted` (``exit_code = 128 + signum``). A non-finite loss or gradient norm is never
applied (the fused AdamW skips it on the device); it raises :class:`NonFiniteLoss`, naming that step, at
the next read-back (at most ``log_every`` steps later), always before a checkpoint could be written, so
the last checkpoint is the last good state.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import functools
import logging
import math
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mmfm import io
from mmfm.data.prefetch import Prefetch, to_device
from mmfm.data.stream import ShardStream
from mmfm.flow.couplings import make_coupling
from mmfm.flow.path import LinearPath, RAEConvention
from mmfm.flow.sources import GaussianMixtureSource, GaussianSource
from mmfm.flow.time import TimeSampler
from mmfm.models.velocity import build_velocity_network, source_record, tokenizer_record
from mmfm.train.checkpoint import (export_ema, get_rng_state, keep_last, latest_checkpoint, load_checkpoint,
                                   save_checkpoint)
from mmfm.train.config import TrainConfig
from mmfm.train.ema import EMA
from mmfm.train.objective import make_objective
from mmfm.train.evaluate import FDLog, fd_of_model, reference_stats
from mmfm.train.schedule import derive_batch
from mmfm.train.step import TrainStep, make_optimizer
from mmfm.train.weighting import AdaptiveModeWeighting

log = logging.getLogger(__name__)

METRICS = "metrics.csv"
METRIC_COLUMNS = ("step", "loss", "lr", "grad_norm", "samples_per_s", "mfu")
EMA_EXPORT = "ema.safetensors"
FD_LOG = "fd.csv"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # SIGINT: Ctrl-C (a second one stops at once)


class TrainingInterrupted(RuntimeError):
    """A stop signal was handled: the step finished and a checkpoint was written. Exit with ``exit_code``."""

    def __init__(self, step: int, signum: int, checkpoint: Path | None):
        name = signal.Signals(signum).name
        super().__init__(f"training interrupted by {name} after step {step}; checkpoint {checkpoint} written, "
                         "rerun the same command to resume from it")
        self.step, self.signum, self.checkpoint = step, signum, checkpoint
        self.exit_code = 128 + int(signum)


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm of a step was not finite; the update was not applied."""

    def __init__(self, step: int, loss: float, grad_norm: float, checkpoint: Path | None):
        super().__init__(f"non-finite loss {loss} (gradient norm {grad_norm}) at step {step} (0-based); the update "
                         f"was not applied and the last good checkpoint {checkpoint} is kept; lower the learning "
                         "rate, check the data, or use fp32")
        self.step, self.loss, self.grad_norm, self.checkpoint = step, loss, grad_norm, checkpoint


# ------------------------------------------------------------------------------------------------ building blocks


def derived_seed(seed: int, *tags: int) -> int:
    """A 63-bit seed for ``(seed, *tags)`` (numpy's SeedSequence), e.g. ``(seed, rank)``."""
    state = np.random.SeedSequence([int(seed), *map(int, tags)]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def head_settings(cfg: TrainConfig, token_dim: int) -> dict:
    """The output head's keyword arguments of ``build_ditdh`` (and the export's metadata): ``{}`` for a velocity
    network; ``head: gm`` with ``gm_components``, ``gm_groups``, ``gm_logstd_hidden``, ``gm_logstd_layers`` for
    ``method: gmflow``."""
    if cfg.method == "dmf":
        return {"dmf_depth": cfg.dmf_depth_of()}
    if cfg.method == "dfm":
        return {"dfm_stages": cfg.dfm_stages}
    if cfg.method != "gmflow":
        return {}
    return {"head": "gm", "gm_components": cfg.gm_components, "gm_groups": cfg.gm_groups_for(token_dim),
            "gm_logstd_hidden": cfg.gm_logstd_hidden, "gm_logstd_layers": cfg.gm_logstd_layers}


def build_model(cfg: TrainConfig, num_tokens: int, token_dim: int, num_labels: int) -> nn.Module:
    """The network of ``cfg.model``: a DiTDH preset over ``(B, N, D)`` tokens or the token MLP
    (:func:`mmfm.models.velocity.build_velocity_network`), with GMFlow's head for ``method: gmflow``.
    ``num_labels``: rows of the label table (classes or modes; 0 when unconditional)."""
    head = head_settings(cfg, token_dim)
    if cfg.method == "gmflow":
        head["gm_mean_init_noise"] = cfg.gm_mean_init_noise
    return build_velocity_network(cfg.model, in_channels=token_dim, num_tokens=num_tokens,
                                  conditioning=cfg.conditioning, num_classes=num_labels,
                                  class_dropout_prob=cfg.class_dropout_prob, **cfg.model_overrides, **head)


def replicate_init(cfg: TrainConfig, raw: nn.Module, num_tokens: int, token_dim: int, num_labels: int) -> str:
    """``gm_init``: copy a trained velocity network (an export: ``ema.safetensors`` of an ``fm`` run, or an
    imported release) into the GMFlow network ``raw``, its last projection replicated into the ``J`` mean heads
    with ``gm_mean_init_noise`` bias noise (:func:`mmfm.models.gm_head.replicate_velocity_head`). Returns the
    time convention of the copy (``rae`` for a release: the network is then trained behind
    :class:`~mmfm.models.gm_head.GMRAEConvention` and exported in RAE's convention)."""
    from mmfm.models.gm_head import replicate_velocity_head
    from mmfm.models.velocity import read_metadata

    meta = read_metadata(cfg.gm_init)
    _check_init("gm_init", cfg.gm_init, meta, cfg, num_tokens, token_dim, num_labels)
    arrays, _ = io.open_tensors(cfg.gm_init)
    state = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
    gen = torch.Generator().manual_seed(derived_seed(cfg.seed, 7))
    replicate_velocity_head(raw, state, noise=cfg.gm_mean_init_noise, generator=gen,
                            convention=meta["time_convention"])
    return meta["time_convention"]


def _check_init(key: str, path: str, meta: dict, cfg: TrainConfig, num_tokens: int, token_dim: int,
                num_labels: int) -> None:
    """``path`` (an export named by ``key``) is a velocity network of this run's preset, shapes and labels."""
    if meta.get("head", "velocity") != "velocity" or meta.get("method", "fm") != "fm":
        raise ValueError(f"{key}: {path} is a {meta.get('method', 'fm')} export (head {meta.get('head')!r}); give "
                         "a velocity network (method fm)")
    mine = (num_tokens, token_dim, cfg.conditioning, num_labels if cfg.conditioning != "none" else 0)
    theirs = (meta["num_tokens"], meta["in_channels"], meta["conditioning"],
              meta["num_classes"] if meta["conditioning"] != "none" else 0)
    if meta["preset"] != cfg.model or mine != theirs:
        raise ValueError(f"{key}: {path} is a {meta['preset']} over {theirs[:2]} tokens with conditioning "
                         f"{theirs[2]!r} ({theirs[3]} labels); this run is a {cfg.model} over {mine[:2]} with "
                         f"{mine[2]!r} ({mine[3]} labels)")


def flowmap_init(cfg: TrainConfig, raw: nn.Module, num_tokens: int, token_dim: int, num_labels: int) -> str:
    """``dmf_init``: load a trained velocity network (an ``fm`` export or an imported release) into the flow map
    ``raw`` (its log-variance head stays zero: at ``r = t`` the flow map is that network,
    :func:`mmfm.models.ditdh.load_flowmap_init`). Returns the copy's time convention (``rae`` for a release: the
    flow map is then trained behind :class:`~mmfm.flow.path.RAEConvention` and exported in RAE's convention)."""
    from mmfm.models.ditdh import load_flowmap_init
    from mmfm.models.velocity import read_metadata

    meta = read_metadata(cfg.dmf_init)
    _check_init("dmf_init", cfg.dmf_init, meta, cfg, num_tokens, token_dim, num_labels)
    arrays, _ = io.open_tensors(cfg.dmf_init)
    load_flowmap_init(raw, {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, cfg.dmf_init)
    return meta["time_convention"]


def dmf_networks(cfg: TrainConfig, device) -> tuple[nn.Module | None, nn.Module | None]:
    """``(guide, main)`` of DMF's training-time guidance: the autoguide ``dmf_guide`` (``ag-mg``, ``ag-distill``)
    and the frozen init network ``dmf_init`` (``ag-distill``), velocity fields in the paper's convention (eval, no
    grad); None where the guidance needs none."""
    from mmfm.models.velocity import load_velocity_model

    if cfg.method != "dmf" or cfg.dmf_guidance == "none":
        return None, None
    if not cfg.dmf_guide:
        raise ValueError(f"dmf_guide: dmf_guidance {cfg.dmf_guidance!r} needs the autoguide (a velocity "
                         "ema.safetensors; in the workflow the init run's sample.guide by default)")
    guide = load_velocity_model(cfg.dmf_guide, device)
    main = load_velocity_model(cfg.dmf_init, device) if cfg.dmf_guidance == "ag-distill" else None
    return guide, main


SOURCE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_source(cfg: TrainConfig, event_shape: tuple[int, int], device) -> GaussianSource | GaussianMixtureSource:
    """``N(0, I)`` or the spatial GMM of ``cfg.gmm`` (means ``(K, N, D)``, held in ``cfg.source_precision``;
    the variances stay float32), checked against the data's shape."""
    if cfg.source == "gaussian":
        return GaussianSource(event_shape)
    from mmfm.gmm.files import load_source

    dtype = SOURCE_DTYPES[cfg.source_precision]
    src = load_source(cfg.gmm, device="cpu")  # checked on the host, then moved (no device read)
    if dtype != torch.float32 and bool((src.means.abs() > torch.finfo(dtype).max).any()):
        raise ValueError(f"source_precision: {cfg.source_precision} cannot hold the means of {cfg.gmm} (largest "
                         f"|mean| {float(src.means.abs().max()):.4g}); use fp32")
    src = GaussianMixtureSource(src.weights.to(device), src.means.to(device=device, dtype=dtype),
                                src.variances.to(device))
    if tuple(src.event_shape) != tuple(event_shape):
        raise ValueError(f"gmm: {cfg.gmm} has means of event shape {src.event_shape}, the shards' tokens "
                         f"{tuple(event_shape)}; is it the spatial GMM of these shards?")
    return src


def build_coupling(cfg: TrainConfig, source, device):
    """``independent``, ``ot``, or ``mode`` with the CLS GMM of ``cfg.cls_gmm`` as the assigner."""
    if not cfg.coupling.startswith("mode"):
        return make_coupling(cfg.coupling, source)
    from mmfm.gmm.files import load_source

    assigner = load_source(cfg.cls_gmm, device=device, dtype=torch.float64)  # posterior in float64 (couplings)
    if assigner.num_modes != source.num_modes:
        raise ValueError(f"cls_gmm: {cfg.cls_gmm} has {assigner.num_modes} modes, the spatial GMM {cfg.gmm} "
                         f"{source.num_modes}; they must come from the same fit")
    return make_coupling("mode", source, assigner=assigner, assignment=cfg.coupling.removeprefix("mode-"))


def export_meta(cfg: TrainConfig, num_tokens: int, token_dim: int, num_labels: int, step: int, *,
                shards_meta: dict | None = None, source: dict | None = None, convention: str = "paper") -> dict:
    """Metadata of ``ema.safetensors``, readable by :func:`mmfm.models.velocity.load_velocity_model`, and what
    ``mmfm sample --model`` needs besides: ``tokenizer``, the :func:`~mmfm.models.velocity.tokenizer_record` of
    the shards' metadata ``shards_meta`` (None when not given), and ``source``, a
    :func:`~mmfm.models.velocity.source_record` (given; else the kind and the GMM file's name, unread).
    ``method`` and, for GMFlow, the head (:func:`head_settings`) say which network it is; ``convention`` is
    ``rae`` only for a GMFlow network replicated from a release (``gm_init``)."""
    if source is None:
        source = {"kind": "gmm", "file": cfg.gmm} if cfg.source == "gmm" else {"kind": cfg.source}
    return {"kind": "mmfm-velocity", "method": cfg.method, **head_settings(cfg, token_dim),
            "time_convention": convention, "preset": cfg.model, "in_channels": token_dim, "num_tokens": num_tokens,
            "patch_size": int(cfg.model_overrides.get("patch_size", 1)), "conditioning": cfg.conditioning,
            "num_classes": num_labels, "class_dropout_prob": cfg.class_dropout_prob,
            "null_label": num_labels if cfg.class_dropout_prob > 0 else None,
            "layout": "tokens", "step": step, "source": source, "coupling": cfg.coupling,
            "model_overrides": dict(cfg.model_overrides),
            "tokenizer": None if shards_meta is None else tokenizer_record(shards_meta),
            **({"dfm_source": cfg.dfm_source} if cfg.method == "dfm" else {})}


# ------------------------------------------------------------------------------------------------ helpers


def _dist() -> tuple[int, int, bool]:
    on = dist.is_available() and dist.is_initialized()
    return (dist.get_rank(), dist.get_world_size(), True) if on else (0, 1, False)


def _default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` (made current) when CUDA is usable, else the CPU (:mod:`mmfm.devices`)."""
    from mmfm import devices

    return devices.bind(devices.resolve(None))


@contextlib.contextmanager
def _stop_signals(flag: dict):
    """Record SIGTERM / SIGUSR1 / SIGINT in ``flag["signum"]`` while the loop runs (main thread only); a
    second SIGINT (Ctrl-C twice) raises ``KeyboardInterrupt`` at once, without the checkpoint."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if signum == signal.SIGINT and flag.get("signum") is not None:
            raise KeyboardInterrupt
        flag["signum"] = signum

    old = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class _Metrics:
    """``metrics.csv`` and TensorBoard events (rank 0): rows after ``start`` (left by a killed run) are
    dropped on resume, and TensorBoard's ``purge_step`` hides its events after ``start``."""

    def __init__(self, path: Path, start: int, enabled: bool, tensorboard: Path | None = None):
        self.path, self.enabled, self.writer = path, enabled, None
        if not enabled:
            return
        if tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tensorboard), purge_step=start if start > 0 else None)
        rows = []
        if path.is_file() and start > 0:
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= start]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, METRIC_COLUMNS)
            w.writeheader()
            w.writerows({k: r.get(k, "") for k in METRIC_COLUMNS} for r in rows)

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, METRIC_COLUMNS).writerow(row)
            if self.writer is not None:
                for key in METRIC_COLUMNS[1:]:
                    if row.get(key) not in (None, ""):
                        self.writer.add_scalar(f"train/{key}", float(row[key]), int(row["step"]))

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _Pending:
    """Device tensors of the steps not yet read back: one host sync per read, at log and checkpoint steps."""

    def __init__(self):
        self.steps: list[int] = []
        self.values: list[torch.Tensor] = []

    def add(self, step: int, out: dict) -> None:
        self.steps.append(step)
        self.values.append(torch.stack([out["loss"].float(), out["grad_norm"].float(), out["finite"].float()]))

    def read(self) -> list[tuple[int, float, float, bool]]:
        """``(step, loss, grad norm, finite)`` of each pending step, in order; empties the list."""
        if not self.values:
            return []
        rows = torch.stack(self.values).cpu().tolist()
        out = [(s, loss, norm, bool(ok)) for s, (loss, norm, ok) in zip(self.steps, rows)]
        self.steps, self.values = [], []
        return out


def _control_group(distributed: bool):
    """The process group of the stop-signal vote: gloo (host tensors) beside an NCCL default group, so the
    vote never waits for the GPU; the default group when it is gloo already; ``None`` on one process."""
    if not distributed:
        return None
    return dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD


def _vote(signum: int | None, group) -> int | None:
    """The largest signal number any rank received (all ranks stop at the same step), or ``None``."""
    if group is None:
        return signum
    s = torch.tensor([signum or 0])
    dist.all_reduce(s, op=dist.ReduceOp.MAX, group=group)
    return int(s) or None


def _flops_per_sample(raw: nn.Module, num_tokens: int, token_dim: int, conditional: bool, device) -> float:
    """Forward + backward FLOPs of one sample, counted by torch's ``FlopCounterMode`` on two rows."""
    from mmfm.bench.train import count_flops

    x = torch.zeros(2, num_tokens, token_dim, device=device)
    y = torch.zeros(2, dtype=torch.long, device=device) if conditional else None
    return count_flops(raw, (x, torch.full((2,), 0.5, device=device), x), y) / 2


# ------------------------------------------------------------------------------------------------ the loop


def train(config: dict | TrainConfig, shards, out_dir, *, resume: bool = True, progress: bool = True,
          max_steps: int | None = None, device: str | torch.device | None = None) -> dict:
    """Train one run on ``shards`` (a folder, file, glob or list of Parquet shards) into ``out_dir``.

    Args:
        config: a :class:`TrainConfig` or the dict it is built from.
        resume: continue from ``latest_checkpoint(out_dir)`` when there is one (else start fresh).
        progress: show progress (rank 0; :func:`mmfm.progress.progress`: a tqdm bar on a terminal, plain lines
            in a log).
        max_steps: take at most this many optimizer steps in this call (a time-boxed job), then
            checkpoint and return with ``done`` false; ``None``: run to ``config.steps``.
        device: default ``cuda:LOCAL_RANK`` when CUDA is usable, else the CPU.

    Returns ``{"step", "done", "checkpoint", "ema" (the export, once done), "losses" (per step of this call),
    "micro_batch", "accumulation", "world_size", "resumed_from", "device", "threads" (CPU threads of this
    process)}``.

    Raises :class:`TrainingInterrupted` after SIGTERM / SIGUSR1 / SIGINT (checkpoint written) and
    :class:`NonFiniteLoss` on a non-finite loss or gradient norm (that update skipped, raised at the next
    log step, no checkpoint after it).
    Under ``torch.distributed`` every rank calls this; rank 0 writes the files.
    """
    from mmfm.progress import progress as tqdm

    cfg = TrainConfig.from_dict(config)
    out_dir = Path(out_dir)
    rank, world, distributed = _dist()
    device = torch.device(device) if device is not None else _default_device()
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)

    # ---- data and batch arithmetic
    micro, accum = derive_batch(cfg.global_batch, world, cfg.micro_batch_max)
    per_rank = micro * accum
    columns = ["tokens"] + (["cls"] if cfg.coupling.startswith("mode") else []) + \
              (["label"] if cfg.conditioning == "class" else [])
    stream = ShardStream(shards, per_rank, columns=columns, rank=rank, world_size=world, shuffle=cfg.shuffle,
                         buffer_rows=cfg.buffer_rows, seed=cfg.seed, drop_last=True, as_torch=True)
    if len(stream) == 0:
        raise ValueError(f"global_batch: the shards' {stream.rows} rows cannot fill one global batch of "
                         f"{cfg.global_batch}; lower train.global_batch or add images")
    (h, w), token_dim = stream.meta["grid"], int(stream.meta["token_dim"])
    num_tokens = int(h) * int(w)
    log.info("global batch %d = %d rank(s) x micro-batch %d x accumulation %d", cfg.global_batch, world, micro,
             accum)

    # ---- flow: source, coupling, times
    source = build_source(cfg, (num_tokens, token_dim), device)
    source_info = source_record(cfg.source, cfg.gmm)  # what the export records: the GMM as trained with
    coupling = build_coupling(cfg, source, device)
    lo, hi = cfg.time_interval
    times = TimeSampler(cfg.time_dist, mu=cfg.time_mu, sigma=cfg.time_sigma, interval=(lo, hi),
                        shift=cfg.shift(num_tokens * token_dim))
    path = LinearPath()
    num_labels = {"none": 0, "class": cfg.num_classes}.get(cfg.conditioning) or \
        (source.num_modes if cfg.conditioning == "mode" else 0)

    # ---- model, optimizer, schedules, EMA
    torch.manual_seed(cfg.seed)  # model initialization (identical on every rank)
    raw = build_model(cfg, num_tokens, token_dim, num_labels)
    convention = "paper"
    if cfg.method == "gmflow" and cfg.gm_init:  # (a resumed run then loads its checkpoint over it)
        convention = replicate_init(cfg, raw, num_tokens, token_dim, num_labels)
    if cfg.method == "dmf" and cfg.dmf_init:
        convention = flowmap_init(cfg, raw, num_tokens, token_dim, num_labels)
    raw = raw.to(device)
    raw.train()
    guide, main = dmf_networks(cfg, device)
    objective = make_objective(cfg, source, dim=num_tokens * token_dim, guide=guide, main=main,
                               num_tokens=num_tokens)
    optimizer = make_optimizer(raw.parameters(), cfg)
    lr_schedule = cfg.lr_schedule()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule.factor)
    ema = EMA(raw, cfg.ema_schedule())
    gen = torch.Generator(device=device).manual_seed(derived_seed(cfg.seed))  # the same on every rank
    generators = {"train": gen}
    weighting = (AdaptiveModeWeighting(source.num_modes, cfg.adaptive_decay, cfg.adaptive_warmup_steps,
                                       cfg.adaptive_gamma, cfg.adaptive_clamp, device=device)
                 if cfg.adaptive_weighting else None)

    # ---- resume
    step, resumed_from = 0, None
    ckpt = latest_checkpoint(out_dir) if resume else None
    if ckpt is not None:
        info = load_checkpoint(ckpt, model=raw, ema=ema, optimizer=optimizer, scheduler=scheduler,
                               generators=generators, rank=rank)
        _check_resumable(info["config"], cfg, ckpt)
        stream.load_state_dict(info["extra"]["stream"])
        if weighting is not None:
            weighting.load_state_dict(info["extra"]["adaptive_weighting"])
        step, resumed_from = int(info["step"]), ckpt
        log.info("resumed from %s at step %d", ckpt, step)
    last_ckpt = ckpt

    called: nn.Module = raw
    if convention == "rae":  # a network copied from a release: RAE's time and sign (a GM head's means only)
        if cfg.method == "gmflow":
            from mmfm.models.gm_head import GMRAEConvention

            called = GMRAEConvention(raw)
        else:
            called = RAEConvention(raw)
    model: nn.Module = torch.compile(called) if cfg.compile else called
    if distributed:
        # gradients as views of DDP's buckets: no second copy of them (2.7 GB for DiTDH-XL)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                    gradient_as_bucket_view=True)
    autocast = contextlib.nullcontext
    if cfg.precision == "bf16":
        if device.type == "cuda":
            autocast = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
        else:
            warnings.warn("precision bf16: autocast is used on CUDA only; training in fp32 on the CPU", stacklevel=2)
    train_step = TrainStep(model=model, raw=raw, optimizer=optimizer, scheduler=scheduler, ema=ema,
                           coupling=coupling, times=times, path=path, generator=gen,
                           global_batch=cfg.global_batch, micro=micro, accumulation=accum, rank=rank, world=world,
                           conditioning=cfg.conditioning, class_dropout_prob=cfg.class_dropout_prob,
                           weighting=weighting, autocast=autocast, grad_clip=cfg.grad_clip, seed=cfg.seed,
                           objective=objective, inner=called)
    control = _control_group(distributed)  # the stop-signal vote: host tensors, no GPU sync

    stream_state = stream.state_dict()  # the position after the last batch consumed

    def extra_state() -> dict:
        extra = {"stream": stream_state}
        if weighting is not None:
            extra["adaptive_weighting"] = weighting.state_dict()
        return extra

    def checkpoint(at: int) -> Path | None:
        rngs = [get_rng_state(generators)]
        if distributed:
            gathered = [None] * world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        saved = None
        if rank == 0:
            saved = save_checkpoint(out_dir, step=at, model=raw, ema=ema, optimizer=optimizer, scheduler=scheduler,
                                    extra=extra_state(), config=cfg.to_dict(), rng=rngs)
            keep_last(out_dir, cfg.keep_last)
        if distributed:
            dist.barrier()
        return saved if rank == 0 else out_dir

    stop = cfg.steps if max_steps is None else min(cfg.steps, step + int(max_steps))
    metrics = _Metrics(out_dir / METRICS, step, enabled=rank == 0,
                       tensorboard=out_dir if cfg.tensorboard else None)  # runs named by their folders
    evaluate = (_evaluator(cfg, shards, raw, ema, source, num_labels, times.shift, device, out_dir / FD_LOG, step,
                           metrics, convention) if cfg.eval_every and rank == 0 else None)  # Fréchet distance, rank 0
    if not cfg.eval_every and rank == 0 and (out_dir / FD_LOG).exists():  # evaluation dropped on resume: the
        (out_dir / FD_LOG).unlink()  # distances of the steps before would pass for this run's curve
        print(f"eval_every is 0: removed {out_dir / FD_LOG}, the distances of the steps before {step}",
              file=sys.stderr)
    peak = None  # MFU = samples/s * FLOPs per sample / (ranks * the device's dense bf16 peak), on CUDA
    if device.type == "cuda" and rank == 0:
        from mmfm.bench.train import device_peak

        peak = device_peak(device)[1]
        flops = _flops_per_sample(raw, num_tokens, token_dim, cfg.conditioning != "none", device) if peak else None
    losses: list[float] = []
    pending = _Pending()  # steps whose loss, norm and finiteness have not been read back yet
    flag: dict = {}
    batches = Prefetch(stream, pin=device.type == "cuda",
                       num_labels=cfg.num_classes if cfg.conditioning == "class" else None)
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=not progress or rank != 0)
    window_t, window_steps = time.perf_counter(), 0
    saved_at = step if ckpt is not None else None

    def settle() -> tuple[float, float]:
        """Read the pending steps back (one host sync); raise NonFiniteLoss at the first non-finite one."""
        values = pending.read()
        for at, loss_value, norm_value, ok in values:
            if not ok:
                raise NonFiniteLoss(at, loss_value, norm_value, last_ckpt)
        losses.extend(v[1] for v in values)
        return (values[-1][1], values[-1][2]) if values else (math.nan, math.nan)

    try:
        with _stop_signals(flag):
            while step < stop:
                batch, state = next(batches)
                x1 = to_device(batch["tokens"], device, torch.float32)
                cls = to_device(batch["cls"], device, torch.float32) if "cls" in batch else None
                label = to_device(batch["label"], device, torch.long) if "label" in batch else None
                out = train_step(x1, cls, label, step=step)
                pending.add(step, out)
                stream_state = state
                lr = out["lr"]
                step += 1
                window_steps += 1
                bar.update(1)

                if step % cfg.log_every == 0 or step == stop:
                    loss_value, norm_value = settle()
                    now = time.perf_counter()
                    rate = window_steps * cfg.global_batch / max(now - window_t, 1e-9)
                    mfu = f"{rate * flops / (world * peak):.4g}" if peak else ""
                    metrics.write({"step": step, "loss": f"{loss_value:.6g}", "lr": f"{lr:.6g}",
                                   "grad_norm": f"{norm_value:.6g}", "samples_per_s": f"{rate:.4g}", "mfu": mfu})
                    bar.set_postfix(loss=f"{loss_value:.4g}", lr=f"{lr:.3g}")
                    window_t, window_steps = now, 0
                if evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                    settle()
                    evaluate(step)
                if step % cfg.checkpoint_every == 0:
                    settle()  # a checkpoint never holds a non-finite step
                    last_ckpt, saved_at = checkpoint(step), step
                signum = _vote(flag.get("signum"), control)
                if signum:
                    settle()
                    if saved_at != step:
                        last_ckpt, saved_at = checkpoint(step), step
                    raise TrainingInterrupted(step, signum, last_ckpt)
            settle()
    finally:
        batches.close()
        bar.close()
        metrics.close()

    if saved_at != step:
        last_ckpt = checkpoint(step)
    done = step >= cfg.steps
    exported = None
    if done and rank == 0:
        exported = export_ema(out_dir / EMA_EXPORT, ema, export_meta(cfg, num_tokens, token_dim, num_labels, step,
                                                                  shards_meta=stream.meta, source=source_info,
                                                                  convention=convention))
    return {"step": step, "done": done, "checkpoint": last_ckpt, "ema": exported, "losses": losses,
            "micro_batch": micro, "accumulation": accum, "world_size": world, "resumed_from": resumed_from,
            "device": str(device), "threads": torch.get_num_threads()}


def _evaluator(cfg: TrainConfig, shards, raw: nn.Module, ema: EMA, source, num_labels: int, shift: float, device,
               path: Path, start: int, metrics: _Metrics, convention: str = "paper"):
    """``evaluate(step)``: the Fréchet distance of EMA samples (fixed seed) to the data, into ``fd.csv``; a
    GMFlow network is sampled by Euler on its mixture's mean velocity, a DMF flow map on its velocity ``U(x, t, t)``
    (the same sampler as every run), a DFM network by ``dfm-euler`` at ``eval_steps`` calls."""
    reference = reference_stats(shards, cfg.eval_rows)
    evaluator, log_ = copy.deepcopy(raw).eval(), FDLog(path, start)
    velocity = evaluator
    if cfg.method == "gmflow":
        from mmfm.models.gm_head import GMMeanVelocity, GMRAEConvention

        velocity = GMMeanVelocity(GMRAEConvention(evaluator) if convention == "rae" else evaluator)
    elif convention == "rae":  # a DMF flow map copied from a release (at r = t, its velocity)
        velocity = RAEConvention(evaluator)

    dfm = {"stages": cfg.dfm_stages, "source": cfg.dfm_source} if cfg.method == "dfm" else None

    def evaluate(step: int) -> None:
        ema.copy_to(evaluator)
        fd, nfe = fd_of_model(velocity, source, reference, n=cfg.eval_samples, seed=cfg.seed,
                              conditioning=cfg.conditioning, num_classes=num_labels, steps=cfg.eval_steps,
                              shift=shift, device=device, method="dfm-euler" if dfm else "euler", dfm=dfm)
        log_.write(step, nfe, fd)
        metrics.scalar("eval/frechet_distance", fd, step)

    return evaluate


def _check_resumable(saved: dict, cfg: TrainConfig, path: Path) -> None:
    """A checkpoint resumes only a run with the same settings (but those in ``RESUMABLE_CHANGES``)."""
    diff = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in cfg.changed_settings(saved).items()]
    if diff:
        raise ValueError(f"{path}: was written with other settings ({'; '.join(diff)}); use another out_dir "
                         "or resume=False")
