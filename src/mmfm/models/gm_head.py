"""The GMFlow output head of DiTDH (docs/gmflow.md §2) and the views that make a GM network a velocity field.

A DiTDH built with ``head="gm"`` (:func:`mmfm.models.build_ditdh`) predicts, at every ``(x_t, t)``, a Gaussian
mixture over the random velocity ``u = x1 - x0`` per **cell** (token ``n``, channel group ``g`` of
``c = D / G`` contiguous channels)::

    q(u_ng | x_t) = sum_{j=1..J} A_ngj N(u_ng; mu_ngj, s^2 I_c),   A = softmax_j(logits),

and returns it as a :class:`mmfm.flow.gm.GMOutput` (means ``(B, J, N, D)``, logits ``(B, J, N, G)``,
``log s`` ``(B,)``).

- :class:`GMHead` takes the place of the final layer's ``linear`` (after its RMSNorm and per-token adaLN):
  ``means`` Linear(H, J D) and ``logits`` Linear(H, J G). Its state-dict names are
  ``final_layer.linear.means.{weight,bias}`` (rows ordered ``(j, d)``: component ``j``'s velocity head is the
  row block ``j D : (j + 1) D``) and ``final_layer.linear.logits.{weight,bias}`` (rows ordered ``(j, g)``).
- :class:`LogStdMLP` predicts ``log s = MLP(stopgrad(e))`` from the conditioning embedding before its SiLU,
  ``e = t_emb [+ y_emb]``: SiLU -> Linear(H_enc, hidden) -> SiLU -> ... -> Linear(hidden, 1). Its names are
  ``logstd_mlp.net.{1,3,...}.{weight,bias}``.
- Initialization: logits zero (uniform ``A``); ``log s`` zero (``s = 1``; the last Linear is zero, the others
  Xavier-uniform with zero bias); the means zero like DiTDH's final layer **plus** symmetry breaking: ``N(0,
  noise^2)`` on the means' bias per (component, channel) (with equal heads the responsibilities and
  gradients of the ``J`` components stay equal forever). The noise comes from torch's default generator, so
  ``torch.manual_seed`` makes it reproducible.
- :func:`replicate_velocity_head`: a GM DiTDH initialized from a trained velocity DiTDH (every shared tensor
  copied, ``final_layer.linear`` replicated into the ``J`` mean heads).
- :class:`GMMeanVelocity`: the mean velocity ``sum_j A_j mu_j`` of a GM network, so every ODE solver,
  guidance and evaluator of the package runs on it unchanged. :class:`GMRAEConvention`: a GM network in RAE's
  convention (``t_rae = 1 - t``, ``v_rae = -v``) seen in the paper's: ``1 - t`` fed, the means (only) negated.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mmfm import _checks
from mmfm.flow.gm import GMOutput

HEADS = ("velocity", "gm")
#: the GM-only parameters of a GM DiTDH (absent from a velocity DiTDH's state dict)
GM_PREFIXES = ("final_layer.linear.means.", "final_layer.linear.logits.", "logstd_mlp.")


class GMHead(nn.Module):
    """Per-token projection to the mixture's means and logits.

    Args:
        dim: input width ``H`` (the DDT head's width).
        out_channels: token width ``D``.
        components: ``J`` mixture components.
        groups: ``G`` channel groups per token (cells), dividing ``D``.

    ``forward(h (B, N, H)) -> (means (B, J, N, D), logits (B, J, N, G))``. Component ``j``'s means are
    ``F.linear(h, W[jD:(j+1)D], b[jD:(j+1)D])``, one product per component with the shapes of a velocity
    final layer, so a head replicated from one (:func:`replicate_velocity_head`) reproduces its velocity bit
    for bit on any backend.
    """

    def __init__(self, dim: int, out_channels: int, components: int, groups: int):
        super().__init__()
        _checks.integer("gm_components", components)
        _checks.integer("gm_groups", groups)
        if out_channels % groups:
            raise ValueError(f"gm_groups: {groups} does not divide the token width {out_channels}")
        self.out_channels, self.components, self.groups = out_channels, components, groups
        self.means = nn.Linear(dim, components * out_channels)
        self.logits = nn.Linear(dim, components * groups)

    @torch.no_grad()
    def reset_parameters(self, noise: float = 0.1) -> None:
        """Zero weights and logits; the means' bias ``~ N(0, noise^2)`` per (component, channel), drawn from
        torch's default CPU generator (reproducible under ``torch.manual_seed``)."""
        for layer in (self.means, self.logits):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        add_mean_noise(self, noise)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d, j = self.out_channels, self.components
        w, b = self.means.weight, self.means.bias
        means = torch.stack([F.linear(h, w[i * d:(i + 1) * d], b[i * d:(i + 1) * d]) for i in range(j)], dim=1)
        logits = self.logits(h).unflatten(-1, (j, self.groups)).movedim(-2, 1)
        return means, logits


@torch.no_grad()
def add_mean_noise(head: GMHead, noise: float, generator: torch.Generator | None = None) -> None:
    """Symmetry breaking: add ``noise * N(0, 1)`` to the means' bias, one draw per (component, channel),
    from ``generator`` (a CPU generator; default: torch's default one)."""
    if noise < 0:
        raise ValueError(f"gm_mean_init_noise: expected a value >= 0, got {noise}")
    if noise == 0:
        return
    bias = head.means.bias
    draw = torch.randn(bias.shape, generator=generator, dtype=torch.float32) * noise
    bias.add_(draw.to(device=bias.device, dtype=bias.dtype))


class LogStdMLP(nn.Module):
    """``log s = MLP(stopgrad(e))``, ``e`` ``(B, dim)`` the conditioning embedding before its SiLU.

    ``layers`` counts the Linear layers: SiLU -> Linear(dim, hidden) -> [SiLU -> Linear(hidden, hidden)] x
    (layers - 2) -> SiLU -> Linear(hidden, 1) (``layers = 1``: SiLU -> Linear(dim, 1)). Xavier-uniform weights
    and zero biases, the last layer zero (``s = 1`` at init). ``forward(e) -> (B,)``; the input is detached
    here, so no gradient reaches the trunk through ``log s``.
    """

    def __init__(self, dim: int, hidden: int = 1024, layers: int = 2):
        super().__init__()
        _checks.integer("gm_logstd_hidden", hidden)
        _checks.integer("gm_logstd_layers", layers)
        widths = [dim] + [hidden] * (layers - 1) + [1]
        mods: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            mods += [nn.SiLU(), nn.Linear(a, b)]
        self.net = nn.Sequential(*mods)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        for layer in linears[:-1]:
            nn.init.xavier_uniform_(layer.weight, generator=generator)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(linears[-1].weight)
        nn.init.zeros_(linears[-1].bias)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.net(e.detach()).squeeze(-1)


class GMMeanVelocity(nn.Module):
    """The mean velocity of a GM network: ``v(x, t, **cond) = net(x, t, **cond).mean()`` ``(B, N, D)``
    (``sum_j A_j mu_j``, float32). Euler, Heun, dopri5, autoguidance and the evaluators run on it as on any
    velocity network; GM-ODE with one sub-step is Euler on it. The GM network is ``.net``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return self.net(x, t, **cond).mean()


class GMRAEConvention(nn.Module):
    """A GM network trained in RAE's convention (``t_rae = 1 - t``, ``v_rae = -v``; e.g. a head replicated
    from a released RAE checkpoint) as a GM network in the paper's convention: it is fed ``1 - t`` and the
    velocity means are negated; the logits and ``log s`` are unchanged (negating ``u`` maps
    ``N(u; mu, s^2)`` to ``N(u; -mu, s^2)`` with the same weights). The GM counterpart of
    :class:`mmfm.flow.path.RAEConvention`; the network is ``.net``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> GMOutput:
        out = self.net(x, 1.0 - t, **cond)
        return GMOutput(-out.means, out.logits, out.logstd)


@torch.no_grad()
def replicate_velocity_head(gm_net: nn.Module, velocity_state_dict: Mapping[str, torch.Tensor], *,
                            noise: float = 0.1, generator: torch.Generator | None = None,
                            convention: str = "paper") -> nn.Module:
    """Initialize the GM DiTDH ``gm_net`` in place from a trained velocity DiTDH's state dict (same preset,
    token width and conditioning; docs/gmflow.md §2).

    Every tensor the two share is copied; ``final_layer.linear`` (weight ``(D, H)``, bias ``(D,)``) is
    replicated into the ``J`` mean heads; the logits projection is zeroed (uniform ``A``); the log-std MLP is
    re-initialized (``s = 1``); then ``noise * N(0, 1)`` is added to the means' bias per (component, channel),
    from ``generator`` (a CPU generator; default: torch's). With ``noise = 0`` the mixture mean is the base
    velocity (bit for bit when ``J`` is a power of two of at most 4, through :meth:`GMOutput.mean`'s sum).

    ``convention``: that of the velocity checkpoint. The copied weights keep it (the trunk's time embedding
    cannot be flipped by a weight change), so the returned model, the view to train and sample in the
    paper's convention, is ``gm_net`` for ``"paper"`` and :class:`GMRAEConvention` ``(gm_net)`` for ``"rae"``
    (it feeds ``1 - t`` and negates the means).

    Raises ``ValueError`` naming ``gm_init`` when the state dict is not a velocity DiTDH of ``gm_net``'s shapes.
    """
    _checks.choice("convention", convention, ("paper", "rae"))
    if getattr(gm_net, "head", None) != "gm":
        raise ValueError("gm_init: the network to initialize is not a GM DiTDH (build it with head='gm')")
    target = gm_net.state_dict()
    shared = {k: v for k, v in target.items() if not k.startswith(GM_PREFIXES)}
    lin = ("final_layer.linear.weight", "final_layer.linear.bias")
    head = gm_net.final_layer.linear
    d, j = head.out_channels, head.components
    expected = {k: tuple(v.shape) for k, v in shared.items()}
    expected[lin[0]] = (d, head.means.weight.shape[1])
    expected[lin[1]] = (d,)
    got = {k: tuple(v.shape) for k, v in velocity_state_dict.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = [f"{k} {got[k]} (expected {expected[k]})" for k in expected if k in got and got[k] != expected[k]]
    if missing or unexpected or wrong:
        parts = [f"{len(lst)} {name}, first {lst[:3]}" for name, lst in
                 (("missing", missing), ("unexpected", unexpected), ("of a different shape", wrong)) if lst]
        raise ValueError("gm_init: the velocity checkpoint does not match the GM network's shapes: " + "; ".join(parts))
    for k, v in shared.items():
        v.copy_(velocity_state_dict[k])
    w, b = velocity_state_dict[lin[0]], velocity_state_dict[lin[1]]
    head.means.weight.copy_(w.repeat(j, 1))
    head.means.bias.copy_(b.repeat(j))
    nn.init.zeros_(head.logits.weight)
    nn.init.zeros_(head.logits.bias)
    gm_net.logstd_mlp.reset_parameters(generator)
    add_mean_noise(head, noise, generator)
    return GMRAEConvention(gm_net) if convention == "rae" else gm_net


__all__ = ["GMHead", "GMMeanVelocity", "GMRAEConvention", "HEADS", "LogStdMLP", "add_mean_noise",
           "replicate_velocity_head"]
