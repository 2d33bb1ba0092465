"""Exponential moving average of a model's weights (docs/method.md §2.4).

After every optimizer update ``step`` (0 for the first), with ``d = decay(step)``::

    ema ← d · ema + (1 − d) · θ

over every floating-point parameter of the model's ``state_dict`` (frozen ones included, as in the
release: pitfall 19, their average stays equal to them), computed in fp32 as
``torch._foreach_mul_(ema, d)`` then ``torch._foreach_add_(ema, θ, alpha=1 − d)``: the release's
per-tensor ``ema.mul_(d).add_(θ, alpha=1 − d)`` batched over tensors (the same kernels, hence the same
bits, on the CPU; the add may fuse ``ema + (1 − d)·θ`` into one rounding, so do not expect
``ema*d + θ*(1 − d)`` written out in two roundings to agree to the bit).
Buffers (and non-float parameters) are copied from the model at each update, not averaged.
The EMA starts as a copy of the model (the release's ``update_ema(ema, model, decay=0)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module under ``DistributedDataParallel`` / ``DataParallel`` (``.module``) and ``torch.compile``
    (``._orig_mod``) wrappers, in any nesting, so that names carry no ``module.`` / ``_orig_mod.`` prefix."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


class EMA:
    """fp32 shadow of a model's ``state_dict``: averaged parameters, copied buffers.

    ``decay`` is a number or a function of the step, e.g. :class:`mmfm.train.schedule.EMASchedule`.
    The shadow tensors live on the device of the model's tensors at construction.
    """

    def __init__(self, model: nn.Module, decay: float | Callable[[int], float] = 0.9995):
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}
        averaged, copied = [], []
        with torch.no_grad():
            for name, t in unwrap(model).state_dict(keep_vars=True).items():
                if isinstance(t, nn.Parameter) and t.is_floating_point():
                    self.shadow[name] = t.detach().to(torch.float32, copy=True)
                    averaged.append(name)
                else:
                    self.shadow[name] = t.detach().clone()
                    copied.append(name)
        self.averaged, self.copied = tuple(averaged), tuple(copied)

    def decay_at(self, step: int | None) -> float:
        if callable(self.decay):
            if step is None:
                raise ValueError("this EMA's decay depends on the step: call update(model, step)")
            return float(self.decay(step))
        return float(self.decay)

    def _source(self, model: nn.Module) -> dict[str, torch.Tensor]:
        src = unwrap(model).state_dict(keep_vars=True)
        missing = [n for n in self.shadow if n not in src]
        if missing:
            raise ValueError(f"the model lacks EMA tensor(s) {missing[:5]}{' …' if len(missing) > 5 else ''}")
        return src

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> float:
        """``ema ← d·ema + (1 − d)·θ`` with ``d = decay(step)``; buffers copied. Returns ``d``."""
        d = self.decay_at(step)
        src = self._source(model)
        ema = [self.shadow[n] for n in self.averaged]
        new = [src[n].detach().to(torch.float32) for n in self.averaged]
        if ema:
            torch._foreach_mul_(ema, d)
            torch._foreach_add_(ema, new, alpha=1.0 - d)
        for name in self.copied:
            self.shadow[name].copy_(src[name])
        return d

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights (and buffers) into ``model`` (cast to its dtypes), e.g. for sampling."""
        src = self._source(model)
        for name, t in self.shadow.items():
            src[name].copy_(t)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``name -> tensor`` with the model's ``state_dict`` names (live tensors; clone to keep)."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy ``state`` into the shadow; a ``ValueError`` names missing, unexpected or misshapen keys."""
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(f"EMA state: missing keys {missing}, unexpected keys {unexpected}")
        for name, t in self.shadow.items():
            if tuple(state[name].shape) != tuple(t.shape):
                raise ValueError(f"EMA state: {name!r} has shape {tuple(state[name].shape)}, "
                                 f"the EMA {tuple(t.shape)}")
        for name, t in self.shadow.items():
            t.copy_(state[name])
