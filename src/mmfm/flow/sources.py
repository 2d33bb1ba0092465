"""Source distributions: the standard Gaussian and MM-FM's Gaussian mixture.

A source has an event shape (``(D,)`` for vectors, ``(N, D)`` for token latents, any shape in general)
and ``sample(n, modes=None, generator=None) -> (x0, modes)``. Samples are drawn in float32 whatever
the dtype of the stored parameters (docs/design.md §2: the source noise and the ODE state are fp32).

``share=(i, m)`` (training under ``torch.distributed``): draw as if for ``m * n`` rows and keep rows
``[i n, (i + 1) n)``. Every rank then holds its part of one global draw, so what row ``j`` of the global
batch receives does not depend on how many ranks share the batch.

``noise=seeds`` (``(m * n,)`` unsigned 64-bit integers, one per row of the global batch, the same on
every rank): the Gaussian noise ``eps`` of global row ``j`` is drawn from its own generator seeded with
``seeds[j]`` (:func:`row_noise`), and a rank materializes only its own ``n`` rows (for ImageNet latents
the global batch's noise would be 0.75 GiB on every rank). Modes and other per-row numbers still come
from ``generator`` through ``share``. Without ``noise``, ``eps`` is drawn like them, ``m * n`` rows.
"""

from __future__ import annotations

import math

import torch

from mmfm import _checks

LOG_2PI = math.log(2.0 * math.pi)


def _share(share: tuple[int, int] | None) -> tuple[int, int]:
    i, m = (0, 1) if share is None else (int(share[0]), int(share[1]))
    if not (m >= 1 and 0 <= i < m):
        raise ValueError(f"share: expected (index, count) with 0 <= index < count, got {share!r}")
    return i, m


def draw(fn, n: int, share: tuple[int, int] | None, *args, **kw) -> torch.Tensor:
    """``fn((m * n, *args), **kw)[i n : (i + 1) n]`` for ``share = (i, m)``: this rank's rows of a global draw."""
    i, m = _share(share)
    out = fn((m * n, *args), **kw)
    return out if m == 1 else out[i * n:(i + 1) * n]


def row_noise(seeds, event_shape: tuple[int, ...], device=None) -> torch.Tensor:
    """``(len(seeds), *event_shape)`` float32 standard normals, row ``i`` from a generator seeded with
    ``seeds[i]`` alone, so a row's noise does not depend on the batch it is in, nor on which rank draws it.
    ``seeds``: a sequence or numpy array of integers in ``[0, 2**64)``, on the host (no device read)."""
    out = torch.empty(len(seeds), *event_shape, device=device)
    gen = torch.Generator(device=out.device)
    for i, s in enumerate(seeds):
        gen.manual_seed(int(s))
        torch.randn(event_shape, generator=gen, device=out.device, out=out[i])
    return out


def _noise(noise, n: int, share, event_shape, generator, device) -> torch.Tensor:
    """``eps`` for this rank's ``n`` rows: from the per-row ``noise`` seeds, else a share of one global draw."""
    if noise is None:
        return draw(torch.randn, n, share, *event_shape, generator=generator, device=device)
    i, m = _share(share)
    if len(noise) != m * n:
        raise ValueError(f"noise: expected {m * n} per-row seeds (the global batch), got {len(noise)}")
    return row_noise(noise[i * n:(i + 1) * n], event_shape, device)


def _device_of(generator: torch.Generator | None, device) -> torch.device | str | None:
    if device is not None:
        return device
    return generator.device if generator is not None else None


class GaussianSource:
    """``N(0, I)`` over an event shape; it has no modes, so ``sample`` returns ``modes=None``."""

    def __init__(self, event_shape: tuple[int, ...] | list[int]):
        event_shape = tuple(int(s) for s in event_shape)
        if not event_shape or any(s <= 0 for s in event_shape):
            raise ValueError(f"event_shape: expected a non-empty tuple of positive sizes, got {event_shape}")
        self.event_shape = event_shape
        self.dim = math.prod(event_shape)

    def sample(
        self,
        n: int,
        modes: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        device=None,
        share: tuple[int, int] | None = None,
        noise=None,
    ) -> tuple[torch.Tensor, None]:
        if modes is not None:
            raise ValueError("modes: a Gaussian source has no modes; pass modes=None")
        _checks.integer("n", n, minimum=0)
        x0 = _noise(noise, n, share, self.event_shape, generator, _device_of(generator, device))
        return x0, None

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log N(x; 0, I)`` summed over the event, shape ``(B,)``."""
        x = _checks.tensor("x", x)
        _checks.event("x", x, self.event_shape)
        flat = x.reshape(x.shape[0], -1)
        return -0.5 * (self.dim * LOG_2PI + (flat * flat).sum(1))


class GaussianMixtureSource:
    """``p(x) = sum_k pi_k N(x; mu_k, Sigma_k)`` with spherical or diagonal ``Sigma_k``.

    Args:
        weights: ``(K,)`` mixing proportions, summing to one.
        means: ``(K, *event_shape)``, e.g. ``(K, D)`` for CLS tokens or ``(K, N, D)`` for token latents.
        variances: ``(K,)`` for spherical ``sigma_k^2 I`` (MM-FM's spatial GMM) or the means' shape for
            diagonal covariances (the CLS GMM).

    The log-density and the posterior never materialize ``B x K x D``: with ``P_k = 1 / sigma_k^2``,
    ``sum_d (x_d - mu_kd)^2 P_kd = x^2 . P_k - 2 x . (mu_k P_k) + mu_k^2 . P_k`` are matrix products.
    Data and means are first centred on ``c = sum_k pi_k mu_k`` (every term is shift-invariant), which
    keeps the expansion accurate in float32 when the mixture sits far from the origin.
    """

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, variances: torch.Tensor):
        weights = _checks.tensor("weights", weights, ndim=1)
        _checks.probability_vector("weights", weights)
        means = _checks.tensor("means", means, min_ndim=2)
        variances = _checks.tensor("variances", variances, min_ndim=1)
        k = weights.shape[0]
        if means.shape[0] != k:
            raise ValueError(f"means: expected {k} modes (the length of weights), got shape {tuple(means.shape)}")
        if variances.shape == (k,):
            self.covariance = "spherical"
        elif variances.shape == means.shape:
            self.covariance = "diag"
        else:
            raise ValueError(
                f"variances: expected shape ({k},) (spherical) or {tuple(means.shape)} (diag, like means), "
                f"got {tuple(variances.shape)}"
            )
        _checks.positive("variances", variances)
        self.weights, self.means, self.variances = weights, means, variances
        self.event_shape = tuple(means.shape[1:])
        self.dim = math.prod(self.event_shape)
        self._gemm = None  # per device/dtype terms of the log-density (see _gemm_terms)

    @property
    def num_modes(self) -> int:
        return self.weights.shape[0]

    def to(self, device=None, dtype: torch.dtype | None = None) -> "GaussianMixtureSource":
        """A copy on another device / dtype (``dtype`` applies to means and variances)."""
        return GaussianMixtureSource(
            self.weights.to(device=device),
            self.means.to(device=device, dtype=dtype),
            self.variances.to(device=device, dtype=dtype),
        )

    # ----------------------------------------------------------------------------------------------
    # sampling
    def sample_modes(self, n: int, generator: torch.Generator | None = None,
                     share: tuple[int, int] | None = None) -> torch.Tensor:
        """``k_i ~ Categorical(pi)``, shape ``(n,)`` int64, on the generator's (or the weights') device."""
        _checks.integer("n", n, minimum=0)
        w = self.weights.to(device=generator.device) if generator is not None else self.weights
        if n == 0:
            return torch.zeros(0, dtype=torch.long, device=w.device)
        return draw(lambda size, **kw: torch.multinomial(w.float(), size[0], replacement=True, **kw), n, share,
                    generator=generator)

    def sample(
        self,
        n: int,
        modes: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        device=None,
        share: tuple[int, int] | None = None,
        noise=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x0 = mu_k + sigma_k * eps`` with ``eps ~ N(0, I)`` in float32; returns ``(x0, modes)``.

        ``modes`` (``(n,)`` integers in ``[0, K)``) fixes each sample's mode (mode coupling, or modes
        chosen by the user); otherwise modes are drawn from the weights. Means stored in float16 /
        bfloat16 (half the memory of the ImageNet presets' 6 GiB) are gathered per row and cast to
        float32. ``noise``: per-row seeds (module docstring).
        """
        _checks.integer("n", n, minimum=0)
        if modes is None:
            modes = self.sample_modes(n, generator, share)
        else:
            _checks.labels("modes", modes, self.num_modes, batch=n)
        dev = _device_of(generator, device) or self.means.device
        eps = _noise(noise, n, share, self.event_shape, generator, dev)
        return self.from_noise(eps, modes), modes.to(dev)

    def component(self, modes: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu_k (n, *event_shape), sigma_k^2)`` float32 of each row's mode ``k = modes`` (``(n,)``), on
        ``device`` (default the means'): the variances ``(n,)`` (spherical) or like the means (diag). Means stored
        in float16 / bfloat16 are gathered per row and cast to float32."""
        device = self.means.device if device is None else device
        idx = modes.to(self.means.device)
        return (self.means[idx].to(device=device, dtype=torch.float32),
                self.variances[idx].to(device=device, dtype=torch.float32))

    def from_noise(self, eps: torch.Tensor, modes: torch.Tensor) -> torch.Tensor:
        """``x0 = mu_k + sigma_k * eps`` for standard normal ``eps`` ``(n, *event_shape)`` and each row's mode."""
        mean, var = self.component(modes, eps.device)
        std = var.sqrt()
        if self.covariance == "spherical":
            std = std.reshape(-1, *([1] * len(self.event_shape)))
        return mean + std * eps

    # ----------------------------------------------------------------------------------------------
    # density
    def _gemm_terms(self, device, dtype):
        """Per device/dtype: centre ``c``, ``P``, ``(mu - c) P``, ``(mu - c)^2 . P`` and ``log pi - log Z``."""
        if self._gemm is not None and self._gemm[0].device == torch.device(device) and self._gemm[0].dtype == dtype:
            return self._gemm
        k = self.num_modes
        w = self.weights.to(device=device, dtype=torch.float64)
        mu = self.means.to(device=device, dtype=torch.float64).reshape(k, -1)
        var = self.variances.to(device=device, dtype=torch.float64).reshape(k, -1)
        centre = w @ mu  # (D,)
        mu_c = mu - centre
        prec = 1.0 / var  # (K, D) or (K, 1)
        if self.covariance == "spherical":
            log_det = self.dim * var[:, 0].log()
            mu_sq = (mu_c * mu_c).sum(1) * prec[:, 0]
        else:
            log_det = var.log().sum(1)
            mu_sq = (mu_c * mu_c * prec).sum(1)
        const = w.log() - 0.5 * (self.dim * LOG_2PI + log_det)  # (K,)
        mu_prec = mu_c * prec  # (K, D)
        self._gemm = tuple(a.to(dtype) for a in (centre, prec, mu_prec, mu_sq, const))
        return self._gemm

    def log_joint(self, x: torch.Tensor) -> torch.Tensor:
        """``log pi_k + log N(x_i; mu_k, Sigma_k)``, shape ``(B, K)``, in ``x``'s dtype."""
        x = _checks.tensor("x", x)
        _checks.event("x", x, self.event_shape)
        centre, prec, mu_prec, mu_sq, const = self._gemm_terms(x.device, x.dtype)
        xc = x.reshape(x.shape[0], -1) - centre
        if self.covariance == "spherical":
            x_sq = (xc * xc).sum(1, keepdim=True) * prec[:, 0]  # (B, K)
        else:
            x_sq = (xc * xc) @ prec.T
        # Mahalanobis term sum_d (x_d - mu_kd)^2 / var_kd >= 0; the expansion can round just below 0
        quad = (x_sq - 2.0 * (xc @ mu_prec.T) + mu_sq).clamp_min(0.0)
        return const - 0.5 * quad

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)``, shape ``(B,)``."""
        return torch.logsumexp(self.log_joint(x), dim=1)

    def posterior(self, x: torch.Tensor) -> torch.Tensor:
        """Responsibilities ``r_k(x) = p(k | x)``, shape ``(B, K)``, rows summing to one."""
        return torch.softmax(self.log_joint(x), dim=1)

    def assign(self, x: torch.Tensor, soft: bool = True, generator: torch.Generator | None = None,
               share: tuple[int, int] | None = None) -> torch.Tensor:
        """Mode of each row: sampled from the posterior (``soft``) or its argmax (hard). ``(B,)`` int64.

        Soft assignment inverts each row's posterior CDF at one uniform ``u_i``:
        ``k_i = #{k : sum_{l <= k} r_l(x_i) <= u_i}`` (one random number per row, so ``share`` applies).
        """
        logits = self.log_joint(x)
        if not soft:
            return logits.argmax(1)
        cdf = torch.softmax(logits.double(), dim=1).cumsum(1)
        dev = generator.device if generator is not None else cdf.device
        u = draw(torch.rand, x.shape[0], share, generator=generator, device=dev, dtype=torch.float64)
        u = u.to(cdf.device) * cdf[:, -1]  # the last CDF entry is 1 up to rounding
        k = torch.searchsorted(cdf, u.unsqueeze(1), right=True).squeeze(1)
        return k.clamp_max(self.num_modes - 1).to(x.device)

