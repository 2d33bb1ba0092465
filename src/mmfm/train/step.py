"""One optimizer step of one rank, without a host sync (the loop's step, also run by ``mmfm bench train``
and traced by ``mmfm plan``).

Given this rank's ``B = micro * accumulation`` rows already on the device (``x1 (B, N, D)`` float32, and
``cls (B, Dc)`` or ``label (B,)``), :meth:`TrainStep.__call__`:

1. couples ``(x0, x1, modes)``: modes and every per-row number are drawn for the whole global batch from
   the shared generator (``share=(rank, world)``), the noise of global row ``j`` from its own seed
   ``noise_seeds(step)[j]`` (:func:`mmfm.flow.sources.row_noise`): each rank materializes only its rows;
2. times ``t ~ TimeSampler``, then the run's objective (:mod:`mmfm.train.objective`) makes the network's
   inputs: ``x_t = (1 - t) x0 + t x1`` and target ``u = x1 - x0`` for flow matching; GMFlow's transition pair
   (its forward-transition noise from per-row seeds, like the source noise); DMF's ``(t, r)`` pairs (from the
   shared generator) and its second source draw (per-row seeds);
3. runs ``accumulation`` micro-batches (autocast, the objective's per-row loss ``* micro / B``, DDP
   ``no_sync`` but on the last), optionally weighted per mode
   (:class:`~mmfm.train.weighting.AdaptiveModeWeighting`, fed the plain squared errors);
4. all-reduces the loss for the log, clips the gradient norm, and steps the fused AdamW with
   ``found_inf = not (loss and norm finite)``: the fused kernel then leaves parameters, moments and its
   step count untouched, so a non-finite step is never applied, and no value is read back to decide it;
5. steps the LR schedule (host arithmetic) and the EMA.

It returns device tensors ``loss``, ``grad_norm`` and ``finite``; the loop reads them at its log steps.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mmfm.flow.sources import row_noise
from mmfm.train.objective import VelocityObjective


def noise_seeds(seed: int, step: int, rows: int, stream: int = 1) -> np.ndarray:
    """``(rows,)`` uint64 seeds of the noise of each row of the global batch at optimizer step ``step``
    (numpy's SeedSequence of ``(seed, stream, step)``): the same on every rank, and after a resume. Stream 1
    is the source noise, 2 the objective's own (GMFlow's forward transition)."""
    return np.random.SeedSequence([int(seed), int(stream), int(step)]).generate_state(int(rows), np.uint64)


class TrainStep:
    """The optimizer step of :mod:`mmfm.train.loop` (see the module docstring).

    Args:
        model: what is called (the network, possibly compiled and/or wrapped in DDP).
        raw: the network itself (its parameters are clipped and averaged into the EMA).
        optimizer: a fused ``AdamW`` (``found_inf`` skips a non-finite step on the device).
        scheduler, ema: stepped after the optimizer (``ema.update(raw, step)``).
        coupling, times, path: the flow (couplings, :class:`~mmfm.flow.time.TimeSampler`, ``LinearPath``).
        generator: the shared generator of modes, times and label dropout (identical on every rank).
        global_batch, micro, accumulation, rank, world: the batch arithmetic.
        conditioning: ``none``, ``class`` or ``mode``; class_dropout_prob: label dropout for CFG.
        weighting: the adaptive per-mode weighting or ``None``.
        autocast: a context-manager factory for the forward pass (``contextlib.nullcontext`` for fp32).
        grad_clip: the norm bound (0: none, the norm is still computed).
        seed: the run's seed (the per-row noise seeds).
        objective: what is regressed (:mod:`mmfm.train.objective`; default flow matching's velocity).
        inner: the module ``model`` compiles or wraps (default ``raw``): DMF's JVP runs on it, outside DDP.
    """

    def __init__(self, *, model: nn.Module, raw: nn.Module, optimizer, scheduler, ema, coupling, times, path,
                 generator: torch.Generator, global_batch: int, micro: int, accumulation: int, rank: int = 0,
                 world: int = 1, conditioning: str = "none", class_dropout_prob: float = 0.0, weighting=None,
                 autocast=contextlib.nullcontext, grad_clip: float = 1.0, seed: int = 0, objective=None,
                 inner: nn.Module | None = None):
        self.model, self.raw, self.optimizer, self.scheduler, self.ema = model, raw, optimizer, scheduler, ema
        self.inner = raw if inner is None else inner
        self.coupling, self.times, self.path, self.generator = coupling, times, path, generator
        self.global_batch, self.micro, self.accumulation = global_batch, micro, accumulation
        self.rank, self.world = rank, world
        self.conditioning, self.class_dropout_prob, self.weighting = conditioning, class_dropout_prob, weighting
        self.autocast, self.grad_clip, self.seed = autocast, grad_clip, seed
        self.objective = objective if objective is not None else VelocityObjective()
        self.distributed = world > 1 or (dist.is_available() and dist.is_initialized())
        self.params = [p for p in raw.parameters() if p.requires_grad]
        for group in optimizer.param_groups:  # a state dict saved by a non-fused AdamW turns fused off on load
            group["fused"], group["foreach"] = True, None
        self.per_rank = micro * accumulation
        self.rows = slice(rank * self.per_rank, (rank + 1) * self.per_rank)

    def micro_batches(self):
        """The micro-batches run, in order: all of them (a memory trace runs the first and the last only,
        :mod:`mmfm.plan.train_memory`)."""
        return range(self.accumulation)

    def draw(self, x1: torch.Tensor, cls: torch.Tensor | None, label: torch.Tensor | None, step: int):
        """``(batch, cond, modes)`` of this rank's rows for optimizer step ``step``: the objective's per-row
        tensors (``batch["x"]``, ``batch["t"]`` are the network's inputs), the conditioning and the modes."""
        gen, rows, device = self.generator, self.rows, x1.device
        seeds = noise_seeds(self.seed, step, self.global_batch)
        x0, x1, modes = self.coupling(x1, descriptor=cls, generator=gen, share=(self.rank, self.world), noise=seeds)
        t = self.times(self.global_batch, generator=gen, device=device)[rows]
        drawn = {k: v[rows] for k, v in self.objective.draw(self.global_batch, gen, device).items()}
        extra = None
        if self.objective.needs_noise:
            extra = row_noise(noise_seeds(self.seed, step, self.global_batch, stream=2)[rows], x1.shape[1:], device)
        batch = self.objective.prepare(x0, x1, t, modes, extra, **drawn)
        cond = {}
        if self.conditioning == "mode":
            cond["y"] = modes
        elif self.conditioning == "class":
            cond["y"] = label
            if self.class_dropout_prob > 0:
                cond["drop"] = torch.rand(self.global_batch, generator=gen, device=device)[rows] < \
                    self.class_dropout_prob
        return batch, cond, modes

    def __call__(self, x1: torch.Tensor, cls: torch.Tensor | None = None, label: torch.Tensor | None = None, *,
                 step: int) -> dict:
        """One optimizer step on this rank's rows; returns ``{"loss", "grad_norm", "finite", "lr"}`` (device
        tensors but ``lr``, the learning rate the step used)."""
        batch, cond, modes = self.draw(x1, cls, label, step)
        micro, per_rank = self.micro, self.per_rank
        mode_weights = self.weighting.weights(modes) if self.weighting is not None else None
        per_sample, per_modes = [], []  # of the micro-batches run (a memory trace runs two)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=x1.device)
        for i in self.micro_batches():
            sl = slice(i * micro, (i + 1) * micro)
            last = i == self.accumulation - 1
            sync = self.model.no_sync() if self.distributed and not last and hasattr(self.model, "no_sync") \
                else contextlib.nullcontext()
            with sync:
                part = {k: (b[sl] if b is not None else None) for k, b in batch.items()}
                with self.autocast():
                    per_row, plain = self.objective.forward_loss(self.model, self.inner, part,
                                                                 {k: c[sl] for k, c in cond.items()})
                if mode_weights is None:
                    loss = per_row.mean() * (micro / per_rank)
                else:
                    per_sample.append(plain.detach())
                    per_modes.append(modes[sl])
                    loss = (per_row * mode_weights[sl]).mean() * (micro / per_rank)
                loss.backward()
            loss_sum += loss.detach()
            del per_row, plain, loss
        if self.distributed:
            dist.all_reduce(loss_sum)
            loss_sum /= self.world
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip if self.grad_clip > 0 else math.inf)
        finite = torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
        if self.weighting is not None:
            self.weighting.update(torch.cat(per_modes), torch.cat(per_sample), finite=finite)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.found_inf = (~finite).float()
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.raw, step)
        return {"loss": loss_sum, "grad_norm": grad_norm, "finite": finite, "lr": lr}


def make_optimizer(params, cfg) -> torch.optim.AdamW:
    """The loop's AdamW: fused (one kernel per step on CUDA, and on the CPU), which is also what lets a
    non-finite step be skipped on the device (``found_inf``)."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=True)
