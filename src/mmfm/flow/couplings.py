"""Couplings: how a batch of data ``x1`` is paired with source samples ``x0``.

Every coupling is called as ``coupling(x1, descriptor=None, generator=None, share=None, noise=None) ->
(x0, x1, modes)``:
``x0`` has ``x1``'s shape (float32), ``modes`` is ``(B,)`` int64 (the source mode of each ``x0``) or
``None`` for a Gaussian source. ``x1`` is returned in its own order so labels and descriptors that
travel with it stay aligned. ``share=(rank, world)`` draws the rank's rows of one global draw (see
:mod:`mmfm.flow.sources`), so the independent and mode couplings give row ``j`` of a global batch the same
noise however many ranks share it; minibatch OT solves within each rank's rows. ``noise``: per-row seeds of
the Gaussian noise (:func:`mmfm.flow.sources.row_noise`), so a rank draws only its own rows' noise.

- :class:`IndependentCoupling` -- ``x0 ~ p`` ignoring ``x1`` (for a mixture, ``k ~ pi``).
- :class:`ModeCoupling` -- MM-FM (docs/method.md §3.4): ``k ~ r(. | c(x1))`` from the posterior of a
  per-sample descriptor ``c`` (the CLS token) under a descriptor mixture, or its argmax; then
  ``x0 ~ N(mu_k, Sigma_k)``. The coupling is ``pi(x0 | x1) = sum_k r_k(c(x1)) N(x0; mu_k, Sigma_k)``.
- :class:`MinibatchOTCoupling` -- exact optimal assignment within the batch (POT), the peer baseline.
"""

from __future__ import annotations

import numpy as np
import torch

from mmfm import _checks
from mmfm.flow.sources import GaussianMixtureSource, GaussianSource

Source = GaussianSource | GaussianMixtureSource


def _check_x1(x1: torch.Tensor, source: Source) -> torch.Tensor:
    x1 = _checks.tensor("x1", x1, min_ndim=2)
    _checks.event("x1", x1, source.event_shape)
    return x1


class IndependentCoupling:
    """``(x0, x1) ~ p x q``: the source sample ignores the data (standard flow matching)."""

    def __init__(self, source: Source):
        self.source = source

    def __call__(self, x1, descriptor=None, generator=None, share=None, noise=None):
        x1 = _check_x1(x1, self.source)
        x0, modes = self.source.sample(x1.shape[0], generator=generator, device=x1.device, share=share, noise=noise)
        return x0, x1, modes


class ModeCoupling:
    """MM-FM's mode coupling: each data point gets noise from its own mode.

    Args:
        source: the mixture the noise comes from (the spatial GMM, ``(K, N, D)`` means).
        assigner: the mixture whose posterior picks the mode, over descriptors (the CLS GMM,
            ``(K, Dc)``); ``None`` uses ``source`` itself on ``x1`` (the R^10 toy, which has no CLS).
        assignment: ``"soft"`` samples ``k ~ r(. | c)`` (the release's default), ``"hard"`` takes the argmax.
    """

    def __init__(self, source: GaussianMixtureSource, assigner: GaussianMixtureSource | None = None,
                 assignment: str = "soft"):
        if not isinstance(source, GaussianMixtureSource):
            raise ValueError(f"source: mode coupling needs a GaussianMixtureSource, got {type(source).__name__}")
        self.assignment = _checks.choice("assignment", assignment, ("soft", "hard"))
        if assigner is not None and assigner.num_modes != source.num_modes:
            raise ValueError(
                f"assigner: expected {source.num_modes} modes like the source, got {assigner.num_modes}"
            )
        self.source, self.assigner = source, assigner

    def modes(self, x1: torch.Tensor, descriptor: torch.Tensor | None = None, generator=None,
              share=None) -> torch.Tensor:
        """The mode of each row of the batch, ``(B,)``."""
        if self.assigner is None:
            if descriptor is not None:
                raise ValueError("descriptor: this coupling assigns modes from x1 itself (assigner=None)")
            c, mixture = x1, self.source
        else:
            if descriptor is None:
                raise ValueError("descriptor: mode coupling with an assigner needs the per-sample descriptor (CLS)")
            c, mixture = _checks.tensor("descriptor", descriptor), self.assigner
            if c.shape[0] != x1.shape[0]:
                raise ValueError(f"descriptor: expected {x1.shape[0]} rows like x1, got {c.shape[0]}")
        # float64: at K = 8192 this is ~3 GFLOP a step, and no TF32 setting can round it
        return mixture.assign(c.to(torch.float64), soft=self.assignment == "soft", generator=generator, share=share)

    def __call__(self, x1, descriptor=None, generator=None, share=None, noise=None):
        x1 = _check_x1(x1, self.source)
        k = self.modes(x1, descriptor, generator, share)
        x0, k = self.source.sample(x1.shape[0], modes=k, generator=generator, device=x1.device, share=share,
                                   noise=noise)
        return x0, x1, k


class MinibatchOTCoupling:
    """Exact minibatch OT (Tong et al., Pooladian et al.): pair ``x0`` and ``x1`` by the optimal plan.

    ``x0`` is drawn independently from the source, then permuted by the solution of the assignment
    problem with cost ``||x0_i - x1_j||^2`` (POT's exact network simplex, ``ot.emd``). With uniform
    weights and equal batch sizes the optimal plan is a permutation matrix scaled by ``1/B``.
    """

    def __init__(self, source: Source):
        self.source = source

    @staticmethod
    def plan(x0: torch.Tensor, x1: torch.Tensor) -> np.ndarray:
        """POT's exact plan between the two batches, ``(B, B)`` float64, rows = ``x0``."""
        import ot  # POT imports scikit-learn: a few seconds every job that never solves OT would pay

        a = x0.detach().reshape(x0.shape[0], -1).double().cpu()
        b = x1.detach().reshape(x1.shape[0], -1).double().cpu()
        cost = torch.cdist(a, b).pow(2).numpy()
        n = cost.shape[0]
        w = np.full(n, 1.0 / n)
        return ot.emd(w, w, cost, numItermax=max(100_000, 50 * n * n))

    def __call__(self, x1, descriptor=None, generator=None, share=None, noise=None):
        x1 = _check_x1(x1, self.source)
        x0, modes = self.source.sample(x1.shape[0], generator=generator, device=x1.device, share=share, noise=noise)
        if x1.shape[0] < 2:
            return x0, x1, modes
        src = torch.from_numpy(self.plan(x0, x1).argmax(axis=0)).to(x0.device)  # x0 row for each x1
        return x0[src], x1, (modes[src] if modes is not None else None)


COUPLINGS = {"independent": IndependentCoupling, "mode": ModeCoupling, "ot": MinibatchOTCoupling}


def make_coupling(name: str, source: Source, **kwargs):
    """Build a coupling by its config name: ``independent``, ``mode`` or ``ot``."""
    _checks.choice("coupling", name, tuple(COUPLINGS))
    return COUPLINGS[name](source, **kwargs)
