"""Adaptive per-mode loss weighting (docs/method.md §3.7, the release's ``AdaptiveClassWeighter``).

Each source mode ``k`` keeps an exponential moving average ``L_k`` of the per-sample flow-matching loss
of the samples whose noise came from mode ``k``. After a warm-up, sample ``i`` (mode ``k_i``) weighs

    r_k = (L_k / mean_l L_l) ** gamma,   w_k = clamp(r_k / mean_l r_l, lo, hi),   loss = mean_i w_{k_i} l_i

so the modes the network fits worst get more of the gradient ("focal", ``gamma = 2``).

Warm-up: the first ``warmup_steps`` updates only add up per-mode sums and counts; at its end
``L_k`` starts at each mode's average (the average over all samples for a mode never seen). After it,
each update moves the modes present in the batch: ``L_k <- decay L_k + (1 - decay) mean_{i: k_i = k} l_i``.

One deliberate difference from the release: there, each rank updates its own table once per
micro-batch (2,500 warm-up calls, about 78 optimizer steps at accumulation 32), unsynchronized. Here
the per-mode sums of the whole global batch are all-reduced and the table is updated once per optimizer
step, so every rank holds the same weights and they do not depend on the number of ranks or on the
accumulation split. The warm-up is therefore counted in optimizer steps; the default is 78.

**The release's warm-up in optimizer steps.** ``warmup_steps: 2500`` (:data:`RELEASE_WARMUP_MICRO_BATCHES`)
per-rank micro-batches at the release's accumulation ``A`` (micro-batches per optimizer step) last::

    warmup_steps = floor(2500 / A)          (:func:`warmup_steps_from_micro_batches`)

optimizer steps, i.e. ``floor(2500 / A) x 1024`` images at global batch 1024, whatever the number of
ranks. The release's weighting starts within the next step (at its 2,500th micro-batch; exactly at a
step boundary when ``A`` divides 2500). ``A`` is the *release's* accumulation of that run (32 for the
DINOv2 mode-conditional XL: 78; 8: 312; 2 for the DiTDH-S guides: 1250), not the accumulation a
reproduction runs at: this implementation's table does not depend on how the global batch is split,
so a run on fewer GPUs keeps the release's warm-up in images seen by keeping its step count.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

#: The release's ``adaptive_weighting.warmup_steps`` of every GMM config: ``update`` calls, one per micro-batch of a rank.
RELEASE_WARMUP_MICRO_BATCHES = 2500


def warmup_steps_from_micro_batches(micro_batches: int, accumulation: int) -> int:
    """``floor(micro_batches / accumulation)``: the optimizer steps a warm-up of ``micro_batches`` per-rank
    micro-batches lasts at ``accumulation`` micro-batches per optimizer step (module doc). The accumulation
    of a run is ``mmfm.train.schedule.derive_batch(global_batch, world, micro_batch_max)[1]``."""
    for key, value, lo in (("micro_batches", micro_batches, 0), ("accumulation", accumulation, 1)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= lo):
            raise ValueError(f"{key}: expected an integer >= {lo}, got {value!r}")
    return micro_batches // accumulation


def mode_sums(modes: torch.Tensor, losses: torch.Tensor, num_modes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-mode ``(sum of losses, count)``, both ``(K,)`` float64, from ``modes (B,)`` and ``losses (B,)``
    (scatter-adds: unlike ``bincount`` they read nothing back from a GPU)."""
    modes = modes.reshape(-1).long().to(losses.device)
    sums = torch.zeros(num_modes, dtype=torch.float64, device=losses.device)
    sums.index_add_(0, modes, losses.detach().reshape(-1).double())
    counts = torch.zeros(num_modes, dtype=torch.float64, device=losses.device)
    counts.index_add_(0, modes, torch.ones_like(sums[:1]).expand(modes.shape[0]))
    return sums, counts


class AdaptiveModeWeighting:
    """The per-mode weight table; see the module docstring for the formulas.

    Args:
        num_modes: ``K``. decay: EMA decay per update of a mode. warmup_steps: updates before weighting.
        gamma: the focal exponent. clamp: ``(lo, hi)`` bounds of the weights after renormalization.
    """

    def __init__(self, num_modes: int, decay: float = 0.9995, warmup_steps: int = 78, gamma: float = 2.0,
                 clamp: tuple[float, float] = (0.3, 3.0), device=None):
        self.num_modes, self.decay, self.warmup_steps, self.gamma = int(num_modes), float(decay), int(warmup_steps), \
            float(gamma)
        self.clamp = (float(clamp[0]), float(clamp[1]))
        self.device = torch.device(device or "cpu")
        self.updates = 0
        zeros = lambda: torch.zeros(self.num_modes, dtype=torch.float64, device=self.device)  # noqa: E731
        self.sums, self.counts, self.ema = zeros(), zeros(), zeros()

    @property
    def warm(self) -> bool:
        return self.updates >= self.warmup_steps

    def table(self) -> torch.Tensor:
        """``w_k``, ``(K,)`` float64 on the table's device: ones during warm-up (and while every ``L_k`` is 0)."""
        ones = torch.ones(self.num_modes, dtype=torch.float64, device=self.device)
        if not self.warm:
            return ones
        mean = self.ema.mean()
        r = (self.ema / mean).pow(self.gamma)
        return torch.where(mean > 0, (r / r.mean()).clamp(*self.clamp), ones)

    def weights(self, modes: torch.Tensor) -> torch.Tensor:
        """``w_{k_i}`` for ``modes (B,)``, float32 on the modes' device."""
        return self.table().to(modes.device)[modes.long()].float()

    def update(self, modes: torch.Tensor, losses: torch.Tensor, finite: torch.Tensor | None = None) -> None:
        """Add one optimizer step's per-sample (unweighted) losses of this rank; under ``torch.distributed``
        every rank must call it (the per-mode sums are all-reduced). ``finite``: a boolean device scalar;
        when false (a step the optimizer skips) the table is left as it is. Nothing is read back from the
        device (the warm-up counts steps on the host)."""
        sums, counts = mode_sums(modes, losses, self.num_modes)
        if dist.is_available() and dist.is_initialized():
            both = torch.stack([sums, counts])
            dist.all_reduce(both)
            sums, counts = both[0], both[1]
        sums, counts = sums.to(self.device), counts.to(self.device)
        keep = torch.ones((), dtype=torch.bool, device=self.device) if finite is None else finite.to(self.device)
        if not self.warm:
            self.sums = torch.where(keep, self.sums + sums, self.sums)
            self.counts = torch.where(keep, self.counts + counts, self.counts)
            self.updates += 1
            if self.warm:
                seen = self.counts > 0
                overall = self.sums.sum() / self.counts.sum().clamp_min(1)
                self.ema = torch.where(seen, self.sums / self.counts.clamp_min(1), overall)
            return
        present = (counts > 0) & keep
        mean = sums / counts.clamp_min(1)
        self.ema = torch.where(present, self.decay * self.ema + (1 - self.decay) * mean, self.ema)
        self.updates += 1

    def state_dict(self) -> dict:
        """Plain JSON (float64 values round-trip exactly through Python's float repr)."""
        return {"updates": self.updates, "sums": self.sums.cpu().tolist(), "counts": self.counts.cpu().tolist(),
                "ema": self.ema.cpu().tolist()}

    def load_state_dict(self, state: dict) -> None:
        as_t = lambda key: torch.tensor(state[key], dtype=torch.float64, device=self.device)  # noqa: E731
        sums = as_t("sums")
        if sums.shape != (self.num_modes,):
            raise ValueError(f"adaptive weighting state has {sums.shape[0]} modes, the source {self.num_modes}")
        self.updates = int(state["updates"])
        self.sums, self.counts, self.ema = sums, as_t("counts"), as_t("ema")
