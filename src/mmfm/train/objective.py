"""What a training step regresses: the objective of a run's ``method`` (behind :class:`~mmfm.train.step.TrainStep`).

An objective turns one coupled batch into the network's inputs and its per-row loss:

- :meth:`~Objective.draw` ``(n, generator, device) -> {name: (n,)}``: per-row numbers of its own drawn for the
  whole global batch from the shared generator (DMF's ``(t, r)`` pairs; none for the others);
- :meth:`~Objective.prepare` ``(x0, x1, t, modes, step_noise, **drawn) -> batch``: a dict of per-row tensors
  (first dimension ``B``), among them ``"x"`` and ``"t"``, what the network is called on; the step slices it
  per micro-batch;
- :meth:`~Objective.forward_loss` ``(model, inner, batch, cond) -> (loss (B,), plain (B,))``: the network's
  call(s) and the per-row loss that is averaged (and weighted per mode), and the plain squared error of the
  (mean) velocity that feeds the adaptive per-mode weighting (docs/method.md §3.7), which needs positive
  losses. ``model`` is what the step calls (maybe compiled, maybe DDP), ``inner`` the module under them; by
  default one call of ``model`` and :meth:`~Objective.loss` ``(out, batch)``.

:class:`VelocityObjective` (``method: fm``): ``x_t = (1 - t) x0 + t x1``, ``loss = plain = mean_d (v - u)^2``.

:class:`GMFlowObjective` (``method: gmflow``, docs/gmflow.md §3): the network returns a
:class:`~mmfm.flow.gm.GMOutput`. With ``gm_trans_ratio = 1`` the loss is the velocity NLL at ``(x_t, t)``;
below 1 it is the transition loss: ``t_a`` from the time sampler, ``t_b = 1 - (1 - lambda)(1 - t_a)``,
``x_b`` on the coupled path at ``t_b``, ``x_a`` from it by the forward kernel with fresh noise, the network at
``(x_a, t_a)``, the NLL of ``x_b`` under the mixture pushed through the reverse kernel. The row's source
component ``(m, sigma^2)`` is its GMM mode's mean and variance (spherical GMM) or ``(0, 1)``. The plain
error is that of the mixture's mean against ``u_a = (x1 - x_a) / (1 - t_a)``.

:class:`FlowMapObjective` (``method: dmf``, docs/dmf.md §3): the flow map ``U(x, t, r)`` learns flow matching
on the diagonal (``r = t``, the coupled ``x_t``) and the MeanFlow identity ``U = v + (r - t) dU/dt`` at the
proposal pairs ``t <= r``, on a fresh source draw (of the row's own mode) for the same data; each branch's
robust log loss ``log(e^-l mean_d (U - target)^2 + c) + l``, averaged: ``(L_fm + L_mf) / 2``. The total
derivative comes from one forward-mode JVP of ``inner`` (or a central difference), the diagonal branch goes
through ``model``; one backward. The plain error is the mean of both branches' squared errors.
:class:`StagewiseObjective` (``method: dfm``, docs/dfm.md §3): the data and the source sample are split into the
Laplacian stages of the token grid; the current stage and every stage's time come from
:class:`~mmfm.flow.dfm.DFMTimes`, each stage interpolates on its own path, stages after the current one are zeroed,
and the loss is :func:`~mmfm.flow.dfm.dfm_loss`. The network sees the packed stages ``(B, M, D)`` and ``(B, S)``
times. With one stage it is :class:`VelocityObjective`, bit for bit (the step's times, no draws of its own).
"""

from __future__ import annotations

import torch

from mmfm.flow.dfm import DFMTimes, dfm_loss, source_stages
from mmfm.flow.loss import forward_transition, gm_nll_loss, gm_transition_loss, transition_times, velocity_loss
from mmfm.flow.path import LinearPath
from mmfm.flow.time import TimeSampler


class Objective:
    """What every objective shares: no draws of its own, one network call per micro-batch."""

    needs_noise = False

    def draw(self, n: int, generator: torch.Generator, device) -> dict:
        return {}

    def forward_loss(self, model, inner, batch: dict, cond: dict):
        return self.loss(model(batch["x"], batch["t"], **cond), batch)


class VelocityObjective(Objective):
    """Flow matching's velocity regression (the module docstring)."""

    def prepare(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, modes, step_noise=None) -> dict:
        xt, u = LinearPath().sample(x0, x1, t)
        return {"x": xt, "t": t, "u": u}

    def loss(self, out: torch.Tensor, batch: dict):
        plain = velocity_loss(out, batch["u"], reduction="none")
        return plain, plain


class GMFlowObjective(Objective):
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
        return self.source.component(modes, like.device)

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


class FlowMapObjective(Objective):
    """Decoupled MeanFlow's two branches (the module docstring).

    Args:
        source: the run's source (the MeanFlow branch's fresh draw, from the row's own mode for a GMM).
        times: the proposals (:class:`~mmfm.flow.flowmap.FlowMapTimes`; its ``pair`` gives ``t <= r``).
        derivative: ``jvp`` or ``fd`` (``fd_eps``); c: the robust loss's constant.
        guidance: ``none``, ``ag-mg`` or ``ag-distill`` with ``guide`` (a velocity network) and ``main`` (the
            frozen init network, ``ag-distill``) at ``scale`` over ``interval``
            (:func:`~mmfm.flow.flowmap.guided_velocity`).
    """

    needs_noise = True  # the MeanFlow branch's fresh source draw

    def __init__(self, source, times, *, derivative: str = "jvp", fd_eps: float = 1e-3, c: float = 0.01,
                 guidance: str = "none", guide=None, main=None, scale: float = 1.5, interval=(0.3, 1.0)):
        self.source, self.times, self.derivative, self.fd_eps, self.c = source, times, derivative, fd_eps, c
        self.guidance, self.guide, self.main, self.scale, self.interval = guidance, guide, main, scale, interval

    def draw(self, n: int, generator: torch.Generator, device) -> dict:
        t, r = self.times.pair(n, generator=generator, device=device)
        return {"t_mf": t, "r_mf": r}

    def prepare(self, x0, x1, t, modes, step_noise=None, t_mf=None, r_mf=None) -> dict:
        if step_noise is None or t_mf is None:
            raise ValueError("step_noise: the MeanFlow branch needs its fresh source noise and its (t, r) pairs")
        xt, u = LinearPath().sample(x0, x1, t)
        x0_mf = step_noise if modes is None or not hasattr(self.source, "means") else \
            self.source.from_noise(step_noise, modes)
        x_mf, u_mf = LinearPath().sample(x0_mf, x1, t_mf)
        return {"x": xt, "t": t, "u": u, "x_mf": x_mf, "t_mf": t_mf, "r_mf": r_mf, "u_mf": u_mf}

    def _target(self, inner, v, x, t, cond):
        from mmfm.flow.flowmap import guided_velocity

        return guided_velocity(self.guidance, v, x, t, online=inner, guide=self.guide, main=self.main,
                               scale=self.scale, interval=self.interval, cond=cond)

    def forward_loss(self, model, inner, batch: dict, cond: dict):
        from mmfm.flow.flowmap import mean_flow_target, robust_log_loss, time_derivative

        u_fm, logvar = model(batch["x"], batch["t"], return_logvar=True, **cond)  # the diagonal, r = t
        loss_fm, plain_fm = robust_log_loss(u_fm, self._target(inner, batch["u"], batch["x"], batch["t"], cond),
                                            logvar, self.c)
        x, t, r = batch["x_mf"], batch["t_mf"], batch["r_mf"]
        v = self._target(inner, batch["u_mf"], x, t, cond)
        u_mf, logvar_mf, du = time_derivative(inner, x, t, r, v, cond=cond, method=self.derivative, eps=self.fd_eps)
        loss_mf, plain_mf = robust_log_loss(u_mf, mean_flow_target(v, t, r, du), logvar_mf, self.c)
        return 0.5 * (loss_fm + loss_mf), 0.5 * (plain_fm + plain_mf)


class StagewiseObjective(VelocityObjective):
    """Decomposable Flow Matching's stage-wise regression (the module docstring).

    Args:
        pyramid: the run's :class:`~mmfm.flow.pyramid.LaplacianPyramid`.
        times: the stage and time draws (:class:`~mmfm.flow.dfm.DFMTimes`).
        source: the run's source (each row's component ``(mu_k, sigma_k^2)`` for a GMM, ``dfm_source: bands``).
        kind: ``dfm_source``: ``bands`` / ``independent`` (the coarse stages' fresh normals are the first tokens of
            the step's second noise draw) or ``decompose``.
    """

    def __init__(self, pyramid, times, source, kind: str = "decompose"):
        self.pyramid, self.times, self.source, self.kind = pyramid, times, source, kind
        self.needs_noise = pyramid.stages > 1 and kind != "decompose"

    def draw(self, n: int, generator: torch.Generator, device) -> dict:
        if self.pyramid.stages == 1:
            return {}
        stage, taus = self.times(n, generator=generator, device=device)
        return {"stage": stage, "taus": taus}

    def prepare(self, x0, x1, t, modes, step_noise=None, stage=None, taus=None) -> dict:
        p = self.pyramid
        if p.stages == 1:
            return super().prepare(x0, x1, t, modes)
        mean = var = normals = None
        if self.kind != "decompose":
            if step_noise is None:
                raise ValueError("step_noise: dfm_source bands / independent needs fresh normals for the coarse stages")
            normals = [step_noise[:, o:o + n] for o, n in zip(p.offsets[:-1], p.sizes[:-1])]
            if modes is not None and hasattr(self.source, "means"):
                mean, var = self.source.component(modes, x1.device)
        eps = source_stages(self.kind, p, x0, mean=mean, var=var, normals=normals)
        data = p.decompose(x1)
        active = torch.arange(p.stages, device=x1.device) <= stage[:, None]
        xs, us = [], []
        for s in range(p.stages):
            tau = taus[:, s].reshape(-1, 1, 1).to(x1.dtype)
            on = active[:, s].reshape(-1, 1, 1)
            xs.append(torch.where(on, (1.0 - tau) * eps[s] + tau * data[s], torch.zeros((), dtype=x1.dtype,
                                                                                            device=x1.device)))
            us.append(data[s] - eps[s])
        return {"x": p.pack(xs), "t": taus.to(x1.dtype), "u": p.pack(us), "active": active}

    def loss(self, out: torch.Tensor, batch: dict):
        if self.pyramid.stages == 1:
            return super().loss(out, batch)
        per_row = dfm_loss(out, batch["u"], batch["active"], self.pyramid)
        return per_row, per_row


def make_objective(cfg, source, *, dim: int | None = None, guide=None, main=None, num_tokens: int | None = None):
    """The objective of ``cfg.method`` (a :class:`~mmfm.train.config.TrainConfig`); for DMF, ``dim = N * D``
    (the proposals' shift) and the guidance networks; for DFM, ``num_tokens`` ``N`` (the pyramid) and ``dim``."""
    if cfg.method == "dfm":
        pyramid = cfg.dfm_pyramid(num_tokens)
        shifts = cfg.dfm_stage_shifts(num_tokens, dim // num_tokens)
        current = [TimeSampler(cfg.time_dist, mu=cfg.time_mu, sigma=cfg.time_sigma, interval=cfg.time_interval,
                               shift=s) for s in shifts]
        early = [TimeSampler("logit_normal", mu=cfg.dfm_early_logit_mu, sigma=1.0, interval=cfg.time_interval,
                             shift=s) for s in shifts]
        times = DFMTimes(cfg.dfm_weights(), current, early, cfg.dfm_stage_draw)
        return StagewiseObjective(pyramid, times, source, cfg.dfm_source)
    if cfg.method == "gmflow":
        return GMFlowObjective(source, cfg.gm_trans_ratio, cfg.gm_loss_scale)
    if cfg.method == "dmf":
        from mmfm.flow.flowmap import FlowMapTimes

        if dim is None:
            dim = source.dim
        times = FlowMapTimes(t=cfg.dmf_time_t, r=cfg.dmf_time_r, shift=cfg.proposal_shift(dim))
        return FlowMapObjective(source, times, derivative=cfg.dmf_derivative, fd_eps=cfg.dmf_fd_eps,
                                c=cfg.dmf_loss_c, guidance=cfg.dmf_guidance, guide=guide, main=main,
                                scale=cfg.dmf_guidance_scale, interval=cfg.dmf_guidance_interval)
    return VelocityObjective()


__all__ = ["FlowMapObjective", "GMFlowObjective", "Objective", "StagewiseObjective", "VelocityObjective",
           "make_objective"]
