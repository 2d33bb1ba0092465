"""What a training step regresses: the objective of a run's ``method`` (behind :class:`~mmfm.train.step.TrainStep`).

An objective turns one coupled batch into the network's inputs and its per-row loss:

- :meth:`prepare` ``(x0, x1, t, modes, step_noise) -> batch``: a dict of per-row tensors (first dimension
  ``B``), among them ``"x"`` and ``"t"``, what the network is called on; the step slices it per micro-batch;
- :meth:`loss` ``(out, batch) -> (loss (B,), plain (B,))``: the per-row loss that is averaged (and weighted
  per mode), and the plain squared error of the (mean) velocity that feeds the adaptive per-mode weighting
  (docs/method.md §3.7), which needs positive losses.

:class:`VelocityObjective` (``method: fm``): ``x_t = (1 - t) x0 + t x1``, ``loss = plain = mean_d (v - u)^2``.

:class:`GMFlowObjective` (``method: gmflow``, docs/gmflow.md §3): the network returns a
:class:`~mmfm.flow.gm.GMOutput`. With ``gm_trans_ratio = 1`` the loss is the velocity NLL at ``(x_t, t)``;
below 1 it is the transition loss: ``t_a`` from the time sampler, ``t_b = 1 - (1 - lambda)(1 - t_a)``,
``x_b`` on the coupled path at ``t_b``, ``x_a`` from it by the forward kernel with fresh noise, the network at
``(x_a, t_a)``, the NLL of ``x_b`` under the mixture pushed through the reverse kernel. The row's source
component ``(m, sigma^2)`` is its GMM mode's mean and variance (spherical GMM) or ``(0, 1)``. The plain
error is that of the mixture's mean against ``u_a = (x1 - x_a) / (1 - t_a)``.
"""

from __future__ import annotations

import torch

from mmfm.flow.loss import forward_transition, gm_nll_loss, gm_transition_loss, transition_times, velocity_loss
from mmfm.flow.path import LinearPath


class VelocityObjective:
    """Flow matching's velocity regression (the module docstring)."""

    needs_noise = False

    def prepare(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, modes, step_noise=None) -> dict:
        xt, u = LinearPath().sample(x0, x1, t)
        return {"x": xt, "t": t, "u": u}

    def loss(self, out: torch.Tensor, batch: dict):
        plain = velocity_loss(out, batch["u"], reduction="none")
        return plain, plain


class GMFlowObjective:
    """GMFlow's NLL / transition loss (the module docstring).

    Args:
        source: the run's source: a ``GaussianSource`` (``m = 0, sigma = 1``) or a spherical
            ``GaussianMixtureSource`` (``m = means[k]``, ``sigma^2 = variances[k]`` of the row's mode ``k``).
        trans_ratio: ``gm_trans_ratio`` ``lambda`` in (0, 1].
        scale: ``gm_loss_scale``.
    """

    def __init__(self, source, trans_ratio: float = 0.5, scale: float = 2.0):
        if getattr(source, "covariance", "spherical") != "spherical":
            raise ValueError("spatial.covariance: GMFlow needs a spherical spatial GMM (one variance per mode): "
                             "its Bayes moves and transition kernel share one variance per row; this GMM is "
                             f"{source.covariance}")
        self.source, self.trans_ratio, self.scale = source, float(trans_ratio), float(scale)
        self.needs_noise = self.trans_ratio < 1.0

    def component(self, modes, like: torch.Tensor):
        """``(m (B, N, D) or None, var0 (B,) or None)``: the source component of each row."""
        if modes is None or not hasattr(self.source, "means"):
            return None, None
        idx = modes.to(self.source.means.device)
        m = self.source.means[idx].to(device=like.device, dtype=torch.float32)
        return m, self.source.variances[idx].to(device=like.device, dtype=torch.float32)

    def prepare(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, modes, step_noise=None) -> dict:
        m, var0 = self.component(modes, x1)
        batch = {"m": m, "var0": var0}
        if not self.needs_noise:
            xt, u = LinearPath().sample(x0, x1, t)
            batch.update(x=xt, t=t, u=u)
            return batch
        if step_noise is None:
            raise ValueError("step_noise: the transition loss needs the noise of the forward transition")
        t_a, t_b = transition_times(t, self.trans_ratio)
        x_b = LinearPath.interpolate(x0, x1, t_b)
        x_a = forward_transition(x_b, t_a, t_b, step_noise, m=m, var0=var0)
        ta = t_a.reshape(-1, *([1] * (x1.ndim - 1)))
        batch.update(x=x_a, t=t_a, x_b=x_b, t_b=t_b, u=(x1 - x_a) / (1.0 - ta))
        return batch

    def loss(self, out, batch: dict):
        plain = velocity_loss(out.mean(), batch["u"], reduction="none").detach()
        if not self.needs_noise:
            return gm_nll_loss(out, batch["u"], scale=self.scale, reduction="none"), plain
        return gm_transition_loss(out, batch["x"], batch["t"], batch["x_b"], batch["t_b"], m=batch["m"],
                                  var0=batch["var0"], scale=self.scale, reduction="none"), plain


def make_objective(cfg, source):
    """The objective of ``cfg.method`` (a :class:`~mmfm.train.config.TrainConfig`)."""
    if cfg.method == "gmflow":
        return GMFlowObjective(source, cfg.gm_trans_ratio, cfg.gm_loss_scale)
    return VelocityObjective()


__all__ = ["GMFlowObjective", "VelocityObjective", "make_objective"]
