"""DiT with the DDT head ("DiTDH", RAE; docs/method.md §2.1), in token layout.

Input and output are token sequences ``(B, N, C)`` over a square ``sqrt(N) x sqrt(N)`` grid (row-major);
``t`` is ``(B,)`` and ``y`` ``(B,)`` integers for class / mode conditioning. Two streams:

- encoder ("s"): patch embed -> + fixed sin-cos positions -> ``depth`` blocks of width ``hidden_size``
  conditioned on ``c = SiLU(t_emb [+ y_emb])`` -> ``s = SiLU(t_emb + s)`` -> Linear to the head width;
- head ("x"): patch embed of the *noisy input* -> ``head_depth`` wide blocks conditioned per token
  on ``s`` -> final layer (per-token adaLN) -> unpatchify.

Module and parameter names and shapes equal the released RAE / MM-FM checkpoints, so their ``ema``
state dicts load with ``load_state_dict(strict=True)``; such a network computes RAE's velocity in RAE's
time convention and is run here through :class:`mmfm.flow.path.RAEConvention`. Their ``(B, C, H, W)``
layout is converted with :func:`grid_to_tokens` / :func:`tokens_to_grid` at the edge.

With ``head="gm"`` (GMFlow, docs/gmflow.md §2; :mod:`mmfm.models.gm_head`) the final layer's ``linear`` is a
:class:`~mmfm.models.gm_head.GMHead` (``final_layer.linear.means`` / ``.logits``) and a
:class:`~mmfm.models.gm_head.LogStdMLP` (``logstd_mlp``) reads the conditioning embedding
``e = t_emb [+ y_emb]`` before its SiLU; ``forward`` then returns a :class:`mmfm.flow.gm.GMOutput`. Every
other name and shape is the velocity network's.

With ``dmf_depth = d`` (Decoupled MeanFlow, docs/dmf.md §2) the network is a flow map ``U(x, t, r)``, the average
velocity from ``t`` to ``r >= t``: the first ``d`` encoder blocks are conditioned on ``c_t = SiLU(t_emb [+ y_emb])``,
the others on ``c_r = SiLU(r_emb [+ y_emb])`` (one shared ``t_embedder``), and the head reads
``s = s_projector(SiLU(r_emb + s))``. A :class:`LogVarHead` (``logvar_head``) gives the robust loss's ``l(t, r)``.
With ``r`` left out (``r = t``) the output is the velocity network's of the same weights, bit for bit.

With ``dfm_stages = S > 1`` (Decomposable Flow Matching, docs/dfm.md §2; patch size 1, velocity head) the input is
the packed Laplacian stages ``(B, M, C)`` of :class:`~mmfm.flow.pyramid.LaplacianPyramid` and ``t`` is ``(B, S)``,
one time per stage. Each stage is nearest-upsampled to the full grid and embedded by its own ``s`` and ``x``
embedders (summed); its own time embedder's outputs are summed into ``t_emb``; its own final layer's output is
average-pooled back to the stage's grid, and the result is packed ``(B, M, C)``. The finest stage uses the base
modules (``s_embedder``, ``x_embedder``, ``t_embedder``, ``final_layer``); the coarse stages' are
``dfm_s_embedders``, ``dfm_x_embedders``, ``dfm_t_embedders`` and ``dfm_final_layers`` (coarse first). With one
stage the network is the DiTDH.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmfm import _checks
from mmfm.flow.gm import GMOutput
from mmfm.flow.pyramid import LaplacianPyramid
from mmfm.models.gm_head import HEADS, GMHead, LogStdMLP
from mmfm.models.layers import (
    DDTBlock,
    DDTFinalLayer,
    GaussianFourierEmbedding,
    LabelEmbedder,
    Rope2D,
    sincos_pos_embed_2d,
)

CONDITIONINGS = ("none", "class", "mode")

#: Encoder widths / depths / heads of DiT-S/B/L/XL; every preset has the 2048-wide, 2-block, 16-head
#: DDT head of RAE. ``-demo`` and ``-tiny`` are small models for the offline demo and the tests.
PRESETS: dict[str, dict] = {
    "ditdh-s": dict(hidden_size=384, depth=12, num_heads=6),
    "ditdh-b": dict(hidden_size=768, depth=12, num_heads=12),
    "ditdh-l": dict(hidden_size=1024, depth=24, num_heads=16),
    "ditdh-xl": dict(hidden_size=1152, depth=28, num_heads=16),
    "ditdh-demo": dict(hidden_size=128, depth=4, num_heads=4, head_hidden_size=256, head_depth=1, head_num_heads=4),
    "ditdh-tiny": dict(hidden_size=32, depth=2, num_heads=2, head_hidden_size=64, head_depth=1, head_num_heads=2),
}


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H*W, C)`` (row-major tokens)."""
    _checks.shape("x", x, (None, None, None, None))
    return x.flatten(2).transpose(1, 2)


def tokens_to_grid(x: torch.Tensor, side: int | None = None) -> torch.Tensor:
    """``(B, N, C)`` -> ``(B, C, side, side)`` with ``side = sqrt(N)`` unless given."""
    _checks.shape("x", x, (None, None, None))
    side = side or math.isqrt(x.shape[1])
    if side * side != x.shape[1]:
        raise ValueError(f"x: expected a square number of tokens, got {x.shape[1]}")
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


class PatchEmbed(nn.Module):
    """``p x p`` patches of the token grid -> one token of width ``dim`` (a Conv2d named ``proj``)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.patch_size == 1:  # a 1x1 convolution is a linear map of each token
            return F.linear(x, self.proj.weight.flatten(1), self.proj.bias)
        return grid_to_tokens(self.proj(tokens_to_grid(x)))


class LogVarHead(nn.Module):
    """DMF's log-variance ``l(t, r)`` ``(B,)``: fixed features ``[cos(w t), sin(w t), cos(w r), sin(w r)]`` at the 64
    frequencies ``w_i = 10000^(-i / 64)`` (256 in all) into ``linear``, a zero-initialized ``Linear(256, 1)``."""

    FREQUENCIES = 64

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4 * self.FREQUENCIES, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def features(self, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``(B, 256)`` float32 (float64 for float64 times)."""
        n = self.FREQUENCIES  # (computed, not a buffer: a network built on the meta device loads weights only)
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        w = 10000.0 ** (-torch.arange(n, device=t.device, dtype=dtype) / n)
        at, ar = t.to(dtype)[:, None] * w, r.to(dtype)[:, None] * w
        return torch.cat([at.cos(), at.sin(), ar.cos(), ar.sin()], dim=-1)

    def forward(self, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        out = self.linear(self.features(t, r).to(self.linear.weight.dtype)).squeeze(-1)
        return out if out.dtype == torch.float64 else out.float()


class DiTDH(nn.Module):
    """DiT encoder + wide DDT head velocity network (see the module docstring).

    Args:
        in_channels: token width ``C`` of the latent (768 for DINOv2-B).
        num_tokens: ``N`` tokens of the latent, a perfect square (256 for a 16 x 16 grid).
        hidden_size, depth, num_heads: the encoder stream.
        head_hidden_size, head_depth, head_num_heads: the DDT head.
        patch_size: patch of the token grid (1 in every RAE / MM-FM config).
        conditioning: ``"none"`` (``c = SiLU(t_emb)``), ``"class"`` or ``"mode"`` (``c = SiLU(t_emb + E[y])``).
        num_classes: rows of the label table (classes or GMM modes). With ``conditioning="none"`` a
            table may still be kept (released unconditional checkpoints carry an unused one).
        class_dropout_prob: label dropout for CFG; > 0 adds the null row ``num_classes``.
        head: ``"velocity"`` (the release's network, ``(B, N, C)`` out) or ``"gm"`` (a GMFlow mixture,
            :class:`mmfm.flow.gm.GMOutput` out; patch size 1 only).
        gm_components: ``J`` mixture components (head ``"gm"``).
        gm_groups: ``G`` channel groups per token, dividing ``in_channels`` (required for head ``"gm"``).
        gm_logstd_hidden, gm_logstd_layers: width and Linear count of the log-std MLP.
        gm_mean_init_noise: std of the means' bias noise at init (symmetry breaking; 0 for none).
        dmf_depth: ``None`` (a velocity network) or ``d`` in ``[1, depth]``: a DMF flow map whose first ``d``
            encoder blocks see ``t``, the rest and the head ``r`` (velocity head only).
        dfm_stages: ``None`` / 1 (one time) or ``S``: a DFM network over the packed stages of an ``S``-stage
            pyramid, one time per stage (velocity head, patch size 1).
    """

    def __init__(
        self,
        in_channels: int,
        num_tokens: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        head_hidden_size: int = 2048,
        head_depth: int = 2,
        head_num_heads: int = 16,
        patch_size: int = 1,
        mlp_ratio: float = 4.0,
        conditioning: str = "none",
        num_classes: int = 0,
        class_dropout_prob: float = 0.0,
        head: str = "velocity",
        gm_components: int = 8,
        gm_groups: int | None = None,
        gm_logstd_hidden: int = 1024,
        gm_logstd_layers: int = 2,
        gm_mean_init_noise: float = 0.1,
        dmf_depth: int | None = None,
        dfm_stages: int | None = None,
    ):
        super().__init__()
        if dfm_stages is not None and dfm_stages != 1:
            _checks.integer("dfm_stages", dfm_stages)
            if head != "velocity" or dmf_depth is not None or patch_size != 1:
                raise ValueError("dfm_stages: a DFM network has the velocity head, no dmf_depth and patch_size 1")
        _checks.choice("conditioning", conditioning, CONDITIONINGS)
        _checks.choice("head", head, HEADS)
        if dmf_depth is not None:
            if not (isinstance(dmf_depth, int) and not isinstance(dmf_depth, bool) and 1 <= dmf_depth <= depth):
                raise ValueError(f"dmf_depth: expected an integer in [1, {depth}] (the encoder blocks that see t), "
                                 f"got {dmf_depth!r}")
            if head != "velocity":
                raise ValueError(f"dmf_depth: a DMF flow map has the velocity head, not {head!r}")
        if head == "gm":
            if gm_groups is None:
                raise ValueError("gm_groups: head 'gm' needs the number of channel groups per token (cells)")
            _checks.integer("gm_groups", gm_groups)
            if not isinstance(in_channels, int) or in_channels % gm_groups:
                raise ValueError(f"gm_groups: {gm_groups} does not divide the token width in_channels {in_channels}")
            _checks.integer("gm_components", gm_components)
            if patch_size != 1:
                raise ValueError(f"patch_size: head 'gm' needs patch_size 1 (a mixture per token), got {patch_size}")
            if not gm_mean_init_noise >= 0:
                raise ValueError(f"gm_mean_init_noise: expected a value >= 0, got {gm_mean_init_noise}")
        for name, v in dict(in_channels=in_channels, num_tokens=num_tokens, hidden_size=hidden_size, depth=depth,
                            num_heads=num_heads, head_hidden_size=head_hidden_size, head_depth=head_depth,
                            head_num_heads=head_num_heads, patch_size=patch_size).items():
            _checks.integer(name, v)
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"num_tokens: expected a perfect square (a square token grid), got {num_tokens}")
        if side % patch_size:
            raise ValueError(f"patch_size: {patch_size} does not divide the grid side {side}")
        _checks.integer("num_classes", num_classes, minimum=0)
        if conditioning != "none" and num_classes == 0:
            raise ValueError(f"num_classes: conditioning={conditioning!r} needs num_classes > 0 (classes or modes)")
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob: expected a value in [0, 1), got {class_dropout_prob}")
        if conditioning == "mode" and class_dropout_prob > 0:
            raise ValueError("class_dropout_prob: mode conditioning has no null label (MM-FM uses no CFG)")

        self.in_channels, self.num_tokens, self.patch_size = in_channels, num_tokens, patch_size
        self.conditioning, self.num_classes = conditioning, num_classes
        self.depth = depth
        self.head = head
        self.dmf_depth = dmf_depth
        self.side = side // patch_size
        patch_dim = in_channels * patch_size * patch_size

        self.x_embedder = PatchEmbed(in_channels, head_hidden_size, patch_size)
        self.s_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        self.s_projector = nn.Linear(hidden_size, head_hidden_size) if hidden_size != head_hidden_size else nn.Identity()
        self.t_embedder = GaussianFourierEmbedding(hidden_size)
        if num_classes > 0:
            self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.final_layer = DDTFinalLayer(head_hidden_size, patch_dim)
        if head == "gm":
            self.gm_components, self.gm_groups, self.gm_mean_init_noise = gm_components, gm_groups, gm_mean_init_noise
            self.final_layer.linear = GMHead(head_hidden_size, in_channels, gm_components, gm_groups)
            self.logstd_mlp = LogStdMLP(hidden_size, gm_logstd_hidden, gm_logstd_layers)
        if dmf_depth is not None:
            self.logvar_head = LogVarHead()
        self.dfm_stages = dfm_stages or 1
        self.pyramid = LaplacianPyramid(self.dfm_stages, num_tokens) if self.dfm_stages > 1 else None
        if self.pyramid is not None:  # the coarse stages' own modules (the finest uses the base ones)
            coarse = range(self.dfm_stages - 1)
            self.dfm_s_embedders = nn.ModuleList([PatchEmbed(in_channels, hidden_size, 1) for _ in coarse])
            self.dfm_x_embedders = nn.ModuleList([PatchEmbed(in_channels, head_hidden_size, 1) for _ in coarse])
            self.dfm_t_embedders = nn.ModuleList([GaussianFourierEmbedding(hidden_size) for _ in coarse])
            self.dfm_final_layers = nn.ModuleList([DDTFinalLayer(head_hidden_size, patch_dim) for _ in coarse])
        self.pos_embed = nn.Parameter(torch.zeros(1, self.side**2, hidden_size), requires_grad=False)
        self.enc_feat_rope = Rope2D(hidden_size // num_heads, self.side)
        self.dec_feat_rope = Rope2D(head_hidden_size // head_num_heads, self.side)
        self.blocks = nn.ModuleList(
            [DDTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)]
            + [DDTBlock(head_hidden_size, head_num_heads, mlp_ratio) for _ in range(head_depth)]
        )
        self.initialize_weights()

    @property
    def null_label(self) -> int | None:
        """Index of the null label (CFG), or ``None`` when the table has no null row."""
        emb = getattr(self, "y_embedder", None)
        return emb.num_classes if emb is not None and emb.dropout_prob > 0 else None

    def initialize_weights(self) -> None:
        """The release's initialization (docs/method.md §2.1): Xavier patch embeds with zero bias, N(0, 0.02)
        time-MLP and label table, sin-cos positions, zero adaLN and output layers; other Linear layers
        keep PyTorch's default. Head ``"gm"``: zero means and logits plus ``N(0, gm_mean_init_noise^2)`` on the
        means' bias (torch's default generator), the log-std MLP Xavier with its last layer zero (``s = 1``)."""
        stages = self.dfm_stages - 1
        coarse_emb = [*self.dfm_s_embedders, *self.dfm_x_embedders] if stages else []
        for emb in (self.x_embedder, self.s_embedder, *coarse_emb):
            w = emb.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(emb.proj.bias)
        if hasattr(self, "y_embedder"):
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.side).unsqueeze(0))
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for emb in (self.t_embedder, *(self.dfm_t_embedders if stages else [])):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        if self.head == "gm":
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
            self.final_layer.linear.reset_parameters(self.gm_mean_init_noise)
            self.logstd_mlp.reset_parameters()
            return
        for final in (self.final_layer, *(self.dfm_final_layers if stages else [])):
            for layer in (final.adaLN_modulation[-1], final.linear):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def _stage_modules(self, kind: str) -> list[nn.Module]:
        """A DFM network's per-stage ``s`` / ``x`` embedders, ``t`` embedders or ``final`` layers, coarse first."""
        base = {"s": self.s_embedder, "x": self.x_embedder, "t": self.t_embedder, "final": self.final_layer}[kind]
        coarse = {"s": "dfm_s_embedders", "x": "dfm_x_embedders", "t": "dfm_t_embedders", "final": "dfm_final_layers"}
        return [*getattr(self, coarse[kind]), base]

    def _embed_stages(self, kind: str, stages: list[torch.Tensor]) -> torch.Tensor:
        """The sum of each upsampled stage ``(B, N, C)`` through its own ``s`` or ``x`` embedder."""
        return sum(emb(xs) for emb, xs in zip(self._stage_modules(kind), stages))

    def _unpatchify(self, h: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        if p == 1:
            return h
        b, s, c = h.shape[0], self.side, self.in_channels
        grid = h.reshape(b, s, s, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, s * p, s * p)
        return grid_to_tokens(grid)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                drop: torch.Tensor | None = None, r: torch.Tensor | None = None,
                return_logvar: bool = False):
        """Velocity ``(B, N, C)`` at noisy tokens ``x`` ``(B, N, C)`` and times ``t`` ``(B,)``; with head
        ``"gm"`` a :class:`~mmfm.flow.gm.GMOutput`: means ``(B, J, N, C)``, logits ``(B, J, N, G)``,
        ``log s`` ``(B,)`` (:class:`~mmfm.models.gm_head.GMMeanVelocity` gives its mean velocity).

        ``y``: ``(B,)`` labels (class or mode); ignored by an unconditional network. ``drop``: optional
        ``(B,)`` bool mask forcing the null label (CFG training with an explicit generator).

        A flow map (``dmf_depth``): ``r`` ``(B,)`` the target times (``None``: ``r = t``, the velocity) gives
        ``U(x, t, r)`` ``(B, N, C)``, and ``(U, logvar (B,))`` with ``return_logvar``.

        A DFM network (``dfm_stages > 1``): ``x`` the packed stages ``(B, M, C)``, ``t`` ``(B, S)``; returns every
        stage's velocity, packed ``(B, M, C)``.
        """
        dfm = self.pyramid is not None
        _checks.shape("x", x, (None, self.pyramid.packed_tokens if dfm else self.num_tokens, self.in_channels))
        b = x.shape[0]
        _checks.shape("t", t, (b, self.dfm_stages) if dfm else (b,))
        if self.dmf_depth is None and (r is not None or return_logvar):
            raise ValueError("r: this network is not a flow map (dmf_depth is None); it takes no target time or "
                             "log-variance")
        if r is not None:
            _checks.shape("r", r, (b,))
        if dfm:  # each stage on the full grid (nearest), its own time embedding, summed
            stages = [self.pyramid.upsample(xs, i) for i, xs in enumerate(self.pyramid.unpack(x))]
            t_emb = sum(emb(t[:, i]) for i, emb in enumerate(self._stage_modules("t")))
        else:
            t_emb = self.t_embedder(t)
        r_emb = t_emb if r is None else self.t_embedder(r)
        if self.conditioning == "none":
            e = t_emb
            e_r = r_emb
        else:
            if y is None:
                raise ValueError(f"y: a {self.conditioning}-conditional network needs labels of shape ({b},)")
            rows = self.y_embedder.embedding_table.num_embeddings
            _checks.labels("y", y, rows, batch=b)
            y_emb = self.y_embedder(y, drop)  # one label draw, shared by c, c_r and the log-std MLP
            e = t_emb + y_emb
            e_r = e if r is None else r_emb + y_emb
        c = F.silu(e)
        c_r = c if r is None else F.silu(e_r)
        split = self.depth if self.dmf_depth is None else self.dmf_depth
        s = (self._embed_stages("s", stages) if dfm else self.s_embedder(x)) + self.pos_embed
        for i, block in enumerate(self.blocks[: self.depth]):
            s = block(s, c if i < split else c_r, self.enc_feat_rope)
        s = self.s_projector(F.silu(r_emb.unsqueeze(1) + s))
        h = self._embed_stages("x", stages) if dfm else self.x_embedder(x)
        for block in self.blocks[self.depth:]:
            h = block(h, s, self.dec_feat_rope)
        if dfm:  # each stage's own output layer, pooled back to the stage's grid
            return self.pyramid.pack([self.pyramid.pool(final(h, s), i)
                                      for i, final in enumerate(self._stage_modules("final"))])
        if self.head == "gm":
            means, logits = self.final_layer(h, s)
            return GMOutput(means, logits, self.logstd_mlp(e))
        out = self._unpatchify(self.final_layer(h, s))
        if return_logvar:
            return out, self.logvar_head(t, t if r is None else r)
        return out


def build_ditdh(preset: str, *, in_channels: int = 768, num_tokens: int = 256, conditioning: str = "none",
                num_classes: int = 0, class_dropout_prob: float = 0.0, head: str = "velocity",
                gm_components: int = 8, gm_groups: int | None = None, gm_logstd_hidden: int = 1024,
                gm_logstd_layers: int = 2, gm_mean_init_noise: float = 0.1, **overrides) -> DiTDH:
    """A DiTDH from a preset name (``ditdh-s``, ``-b``, ``-l``, ``-xl``, ``-demo``, ``-tiny``).

    ``head="gm"`` builds the GMFlow network (``gm_groups`` required; see :class:`DiTDH`); the ``gm_*``
    arguments are ignored for the velocity head. ``dmf_depth=d`` (an override) builds a DMF flow map."""
    if preset not in PRESETS:
        raise ValueError(f"preset: unknown DiTDH preset {preset!r}; expected one of {sorted(PRESETS)}")
    kw = {**PRESETS[preset], **overrides}
    if head == "gm":
        kw.update(gm_components=gm_components, gm_groups=gm_groups, gm_logstd_hidden=gm_logstd_hidden,
                  gm_logstd_layers=gm_logstd_layers, gm_mean_init_noise=gm_mean_init_noise)
    return DiTDH(in_channels, num_tokens, conditioning=conditioning, num_classes=num_classes,
                 class_dropout_prob=class_dropout_prob, head=head, **kw)


def load_flowmap_init(net: DiTDH, state: dict[str, torch.Tensor], path) -> None:
    """Load a velocity DiTDH's state dict (an ``fm`` export of ``path``) into the flow map ``net`` of the same shapes:
    strict, except that the ``logvar_head`` keys may be absent (they keep their zero init). Raises ``ValueError``
    naming ``dmf_init``, ``path`` and the first missing / unexpected / mis-shaped keys."""
    if getattr(net, "dmf_depth", None) is None:
        raise ValueError("dmf_init: the network to initialize is not a flow map (build it with dmf_depth)")
    expected = net.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith("logvar_head.")]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = [f"{len(lst)} {name}, first {lst[:3]}" for name, lst in
                 (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", wrong)) if lst]
        raise ValueError(f"dmf_init: {path} does not load into this flow map: " + "; ".join(parts))
    net.load_state_dict({**{k: v for k, v in expected.items() if k.startswith("logvar_head.")}, **state})


def count_parameters(model: nn.Module) -> int:
    """All parameters, frozen ones included (the sin-cos positions and Fourier ``W``), as ``train.py`` counts."""
    return sum(p.numel() for p in model.parameters())
