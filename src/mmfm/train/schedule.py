"""Learning-rate and EMA-decay phases of the release, and the batch arithmetic (docs/method.md §2.4).

Steps are counted the release's way: ``step`` is the number of optimizer updates already taken, so
the first update is step 0. That is the index ``torch.optim.lr_scheduler.LambdaLR`` passes to its
lambda when ``scheduler.step()`` follows ``optimizer.step()`` (as in the release's ``train.py``), and
the EMA update after optimizer step ``step`` uses ``EMASchedule(step)``.

MM-FM XL with the GMM source [fork], in epochs of ``STEPS_PER_EPOCH`` = 1251 optimizer steps:

=================  ==============  ===========  =====================================
phase              epochs          lr           EMA decay
=================  ==============  ===========  =====================================
initial            [0, 20)         4e-4         0.999
constant           [20, 40)        2e-4         0.9995
linear decay       [40, 800)       2e-4 → 2e-5  0.9995
final              800 and later   2e-5         0.9995
=================  ==============  ===========  =====================================

Other configurations of §2.4, as arguments:

- RAE: no initial phase — ``LRSchedule(initial_lr=2e-4, initial_steps=0)`` and ``EMASchedule(initial_steps=0)``;
- the Gaussian baseline: ``initial_lr=2e-4`` and ``EMASchedule(initial_decay=0.995)``;
- the DiTDH-S guides: ``LRSchedule.constant(2e-4)`` and ``EMASchedule.constant(0.9995)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

STEPS_PER_EPOCH = 1251
"""Optimizer steps per ImageNet epoch at global batch 1024 on 8 ranks (docs/method.md §2.4 [computed]):
``steps_per_epoch(1_281_167, 8, micro, accumulation)`` for every micro-batch of the release."""


def _check_step(step: int) -> int:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return step


@dataclass(frozen=True)
class LRSchedule:
    """Piecewise learning rate of the release (docs/method.md §2.4; ``build_scheduler`` "linear" [fork]).

    With ``s`` the step, ``s_i = initial_steps``, ``s_d = decay_start``, ``s_e = decay_end``::

        factor(s) = initial_lr / base_lr                                   s < s_i
                  = 1                                                      s_i <= s < s_d
                  = 1 - (1 - final_lr / base_lr) * (s - s_d) / (s_e - s_d)  s_d <= s < s_e
                  = final_lr / base_lr                                     s >= s_e
        lr(s)     = base_lr * factor(s)

    written as the release writes it, so ``lr(s)`` is bit-identical to what ``LambdaLR`` with
    :meth:`factor` sets (``base_lr * factor``). The defaults are the MM-FM XL configs: 20 epochs
    at 4e-4, then 2e-4 until epoch 40, then linear toward 2e-5 at epoch 800; each boundary is
    ``int(epochs * STEPS_PER_EPOCH)`` steps (25,020, 50,040, 1,000,800). lr(100,000) ≈ 1.905e-4.
    """

    base_lr: float = 2e-4
    final_lr: float = 2e-5
    initial_lr: float = 4e-4
    initial_steps: int = 20 * STEPS_PER_EPOCH
    decay_start: int = 40 * STEPS_PER_EPOCH
    decay_end: int = 800 * STEPS_PER_EPOCH

    def __post_init__(self):
        if not self.base_lr > 0 or self.final_lr < 0 or self.initial_lr < 0:
            raise ValueError(f"learning rates must be base > 0, final >= 0, initial >= 0; got {self}")
        if not 0 <= self.initial_steps <= self.decay_start <= self.decay_end:
            raise ValueError("phases must satisfy 0 <= initial_steps <= decay_start <= decay_end; got "
                             f"{self.initial_steps}, {self.decay_start}, {self.decay_end}")

    @classmethod
    def from_epochs(cls, steps_per_epoch: int, *, base_lr: float = 2e-4, final_lr: float = 2e-5,
                    initial_lr: float = 4e-4, initial_epochs: float = 20, decay_start_epoch: float = 40,
                    decay_end_epoch: float = 800) -> "LRSchedule":
        """The release's config keys (``initial_phase_epochs``, ``decay_start_epoch``, ``decay_end_epoch``);
        each boundary is ``int(epochs * steps_per_epoch)`` as in ``build_scheduler``."""
        return cls(base_lr, final_lr, initial_lr, int(initial_epochs * steps_per_epoch),
                   int(decay_start_epoch * steps_per_epoch), int(decay_end_epoch * steps_per_epoch))

    @classmethod
    def constant(cls, lr: float) -> "LRSchedule":
        """``lr`` at every step (the DiTDH-S guides)."""
        return cls(lr, lr, lr, 0, 0, 0)

    def factor(self, step: int) -> float:
        """``lr(step) / base_lr``, the multiplier for ``LambdaLR(optimizer, schedule.factor)``."""
        _check_step(step)
        if step < self.initial_steps:
            return self.initial_lr / self.base_lr
        if step < self.decay_start:
            return 1.0
        if step >= self.decay_end:
            return self.final_lr / self.base_lr
        progress = (step - self.decay_start) / (self.decay_end - self.decay_start)
        return 1.0 - (1.0 - self.final_lr / self.base_lr) * progress

    def __call__(self, step: int) -> float:
        """The learning rate of optimizer update ``step`` (0 for the first)."""
        return self.base_lr * self.factor(step)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every parameter group's ``lr`` to ``self(step)`` (call before ``optimizer.step()``); returns it."""
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr


@dataclass(frozen=True)
class EMASchedule:
    """EMA decay per step (docs/method.md §2.4): ``initial_decay`` for ``step < initial_steps``, then ``decay``.

    The release switches on the epoch (``epoch < initial_phase_epochs``), which at a whole number of
    steps per epoch is ``step < initial_phase_epochs * steps_per_epoch``. Defaults: MM-FM XL with the
    GMM source, 0.999 for 20 epochs (25,020 steps), then 0.9995 (half-lives ≈ 693 and 1386 steps).
    There is no ramp-up: the EMA starts as a copy of the model (:class:`mmfm.train.ema.EMA`).
    """

    decay: float = 0.9995
    initial_decay: float = 0.999
    initial_steps: int = 20 * STEPS_PER_EPOCH

    def __post_init__(self):
        if not (0 <= self.decay <= 1 and 0 <= self.initial_decay <= 1):
            raise ValueError(f"EMA decays must lie in [0, 1]; got {self.initial_decay}, {self.decay}")
        if self.initial_steps < 0:
            raise ValueError(f"initial_steps must be >= 0, got {self.initial_steps}")

    @classmethod
    def from_epochs(cls, steps_per_epoch: int, *, decay: float = 0.9995, initial_decay: float = 0.999,
                    initial_epochs: float = 20) -> "EMASchedule":
        return cls(decay, initial_decay, int(initial_epochs * steps_per_epoch))

    @classmethod
    def constant(cls, decay: float) -> "EMASchedule":
        return cls(decay, decay, 0)

    def __call__(self, step: int) -> float:
        """The decay ``d`` of the EMA update after optimizer update ``step``."""
        return self.initial_decay if _check_step(step) < self.initial_steps else self.decay


def derive_batch(global_batch: int, world_size: int, micro_batch_max: int) -> tuple[int, int]:
    """``(micro_batch, accumulation)`` per rank with ``micro_batch * accumulation * world_size == global_batch``.

    The global batch is the config's; it never changes with the number of GPUs. The micro-batch is
    the largest divisor of ``global_batch / world_size`` that is at most ``micro_batch_max`` (so the
    fewest accumulation steps that fit in memory): 1024 on 8 ranks with at most 4, 16 or 64 gives
    (4, 32), (16, 8), (64, 2), the release's settings. A ``ValueError`` when ``world_size`` does
    not divide ``global_batch``.
    """
    if global_batch < 1 or world_size < 1 or micro_batch_max < 1:
        raise ValueError(f"global_batch, world_size and micro_batch_max must be >= 1; "
                         f"got {global_batch}, {world_size}, {micro_batch_max}")
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} cannot be split evenly over {world_size} ranks; "
                         f"use a number of ranks that divides it (the global batch is fixed by the config)")
    per_rank = global_batch // world_size
    micro = max(m for m in range(1, min(per_rank, micro_batch_max) + 1) if per_rank % m == 0)
    return micro, per_rank // micro


def steps_per_epoch(num_images: int, world_size: int, micro_batch: int, accumulation: int) -> int:
    """Optimizer steps per epoch of the release's loader (docs/method.md §2.4 [computed])::

        floor(floor(ceil(num_images / world_size) / micro_batch) / accumulation)

    (``DistributedSampler`` pads every rank to the ceiling, the loader drops the last incomplete
    micro-batch, an incomplete accumulation at the end of an epoch is dropped).
    ImageNet (1,281,167 images) on 8 ranks: 1251 for (4, 32), (16, 8) and (64, 2).
    """
    per_rank = math.ceil(num_images / world_size)
    return per_rank // micro_batch // accumulation
