"""Adaptive per-mode loss weighting (method.md §3.7, the release's ``AdaptiveClassWeighter``).

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
accumulation split. The default warm-up is therefore 78 optimizer steps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def mode_sums(modes: torch.Tensor, losses: torch.Tensor, num_modes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-mode ``(sum of losses, count)``, both ``(K,)`` float64, from ``modes (B,)`` and ``losses (B,)``."""
    modes = modes.reshape(-1).long()
    sums = torch.zeros(num_modes, dtype=torch.float64, device=losses.device)
    sums.index_add_(0, modes.to(losses.device), losses.detach().reshape(-1).double())
    counts = torch.bincount(modes.to(losses.device), minlength=num_modes).double()
    return sums, counts


class AdaptiveModeWeighting:
    """The per-mode weight table; see the module docstring for the formulas.

    Args:
        num_modes: ``K``. decay: EMA decay per update of a mode. warmup_steps: updates before weighting.
        gamma: the focal exponent. clamp: ``(lo, hi)`` bounds of the weights after renormalization.
    """

    def __init__(self, num_modes: int, decay: float = 0.9995, warmup_steps: int = 78, gamma: float = 2.0,
                 clamp: tuple[float, float] = (0.3, 3.0)):
        self.num_modes, self.decay, self.warmup_steps, self.gamma = int(num_modes), float(decay), int(warmup_steps), \
            float(gamma)
        self.clamp = (float(clamp[0]), float(clamp[1]))
        self.updates = 0
        self.sums = torch.zeros(self.num_modes, dtype=torch.float64)
        self.counts = torch.zeros(self.num_modes, dtype=torch.float64)
        self.ema = torch.zeros(self.num_modes, dtype=torch.float64)

    @property
    def warm(self) -> bool:
        return self.updates >= self.warmup_steps

    def table(self) -> torch.Tensor:
        """``w_k``, ``(K,)`` float64: ones during warm-up."""
        if not self.warm:
            return torch.ones(self.num_modes, dtype=torch.float64)
        mean = self.ema.mean()
        if not mean > 0:
            return torch.ones(self.num_modes, dtype=torch.float64)
        r = (self.ema / mean).pow(self.gamma)
        return (r / r.mean()).clamp(*self.clamp)

    def weights(self, modes: torch.Tensor) -> torch.Tensor:
        """``w_{k_i}`` for ``modes (B,)``, float32 on the modes' device."""
        return self.table().to(modes.device)[modes.long()].float()

    def update(self, modes: torch.Tensor, losses: torch.Tensor) -> None:
        """Add one optimizer step's per-sample (unweighted) losses of this rank; under ``torch.distributed``
        every rank must call it (the per-mode sums are all-reduced)."""
        sums, counts = mode_sums(modes, losses, self.num_modes)
        if dist.is_available() and dist.is_initialized():
            both = torch.stack([sums, counts])
            dist.all_reduce(both)
            sums, counts = both[0], both[1]
        sums, counts = sums.cpu(), counts.cpu()
        if not self.warm:
            self.sums += sums
            self.counts += counts
            self.updates += 1
            if self.warm:
                seen = self.counts > 0
                overall = self.sums.sum() / self.counts.sum().clamp_min(1)
                self.ema = torch.where(seen, self.sums / self.counts.clamp_min(1), overall)
            return
        present = counts > 0
        mean = sums / counts.clamp_min(1)
        self.ema = torch.where(present, self.decay * self.ema + (1 - self.decay) * mean, self.ema)
        self.updates += 1

    def state_dict(self) -> dict:
        """Plain JSON (float64 values round-trip exactly through Python's float repr)."""
        return {"updates": self.updates, "sums": self.sums.tolist(), "counts": self.counts.tolist(),
                "ema": self.ema.tolist()}

    def load_state_dict(self, state: dict) -> None:
        sums = torch.tensor(state["sums"], dtype=torch.float64)
        if sums.shape != (self.num_modes,):
            raise ValueError(f"adaptive weighting state has {sums.shape[0]} modes, the source {self.num_modes}")
        self.updates = int(state["updates"])
        self.sums, self.counts = sums, torch.tensor(state["counts"], dtype=torch.float64)
        self.ema = torch.tensor(state["ema"], dtype=torch.float64)
