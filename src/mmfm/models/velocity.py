"""Exported velocity networks: build one from its metadata and load it as a velocity field.

A velocity network is saved as float32 ``.safetensors`` whose metadata (in the header, else a ``.json``
sidecar) names the architecture: ``preset`` (a DiTDH preset of :data:`mmfm.models.PRESETS`, or ``"mlp"``
for :class:`TokenMLP`), ``in_channels``, ``num_tokens``, ``patch_size``, ``conditioning``, ``num_classes``,
``class_dropout_prob``, ``model_overrides`` and ``time_convention``. ``mmfm train`` exports its EMA this
way (``ema.safetensors``, :func:`mmfm.train.loop.export_meta`, the paper's convention) and
:func:`mmfm.train.released.import_released_checkpoint` a released RAE / MM-FM network (RAE's convention).
:func:`load_velocity_model` rebuilds either and returns it in the paper's convention.

An export of ``mmfm train`` also records what its tokens are (so ``mmfm sample --model`` needs nothing else):
``tokenizer`` (:func:`tokenizer_record` of the shards' metadata: name, weights path and revision, grid, token
width, normalization, decoder) and ``source`` (:func:`source_record`: ``gaussian``, or the spatial GMM file with
its shape and fingerprint). Older and imported exports have neither (``source`` may be the bare kind, a
string); :func:`recorded_source` reads both forms.

**GMFlow exports** (docs/gmflow.md §7) carry, at the top level of the metadata, ``method`` (``"fm"`` when
absent, or ``"gmflow"``), ``head`` (``"velocity"`` when absent, or ``"gm"``; a ``"gmflow"`` export without it
is ``"gm"``) and, for head ``"gm"``, ``gm_components``, ``gm_groups``, ``gm_logstd_hidden`` [1024] and
``gm_logstd_layers`` [2]. :func:`load_velocity_model` still returns a mean velocity
(:class:`~mmfm.models.gm_head.GMMeanVelocity`), so every ODE sampler and evaluator works unchanged;
:func:`load_gm_model` returns the mixture network itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmfm import io
from mmfm.flow.path import RAEConvention
from mmfm.models.ditdh import build_ditdh
from mmfm.models.gm_head import HEADS, GMMeanVelocity, GMRAEConvention
from mmfm.models.mlp import VelocityMLP


class TokenMLP(nn.Module):
    """:class:`~mmfm.models.mlp.VelocityMLP` on flattened tokens: ``(B, N, D) -> (B, N, D)``."""

    def __init__(self, num_tokens: int, token_dim: int, **kw):
        super().__init__()
        self.shape = (num_tokens, token_dim)
        self.net = VelocityMLP(num_tokens * token_dim, **kw)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], -1), t).reshape(x.shape[0], *self.shape)


def build_velocity_network(preset: str, *, in_channels: int, num_tokens: int, conditioning: str = "none",
                           num_classes: int = 0, class_dropout_prob: float = 0.0, **overrides) -> nn.Module:
    """An untrained velocity network over ``(B, N, C)`` tokens: a :class:`TokenMLP` for ``preset="mlp"``
    (unconditional), else :func:`mmfm.models.build_ditdh`. ``overrides``: keyword arguments of the preset."""
    if preset == "mlp":
        if conditioning != "none":
            raise ValueError("conditioning: the 'mlp' velocity is unconditional; use a DiTDH preset for conditioning")
        return TokenMLP(num_tokens, in_channels, **overrides)
    return build_ditdh(preset, in_channels=in_channels, num_tokens=num_tokens, conditioning=conditioning,
                       num_classes=num_classes, class_dropout_prob=class_dropout_prob, **overrides)


def network_head(meta: dict) -> str:
    """The output head an export's metadata records: ``head``, else ``"gm"`` for ``method: gmflow``, else
    ``"velocity"``."""
    head = meta.get("head") or ("gm" if meta.get("method") == "gmflow" else "velocity")
    if head not in HEADS:
        raise ValueError(f"head: unknown network head {head!r}; expected one of {list(HEADS)}")
    return head


def network_from_metadata(meta: dict) -> nn.Module:
    """The untrained network the metadata of an export describes (``patch_size`` [1], ``class_dropout_prob``
    [0.0] and ``model_overrides`` [{}] may be left out). A ``head: gm`` export gives the GM DiTDH of its
    ``gm_components``, ``gm_groups``, ``gm_logstd_hidden`` [1024] and ``gm_logstd_layers`` [2] (no init noise:
    its weights are loaded next)."""
    gm_keys = ("head", "gm_components", "gm_groups", "gm_logstd_hidden", "gm_logstd_layers", "gm_mean_init_noise")
    overrides = {k: v for k, v in (meta.get("model_overrides") or {}).items() if k != "patch_size" and k not in gm_keys}
    if meta["preset"] != "mlp":
        overrides["patch_size"] = meta.get("patch_size", 1)
    if meta.get("dmf_depth") is not None:  # a DMF flow map (at r = t, the velocity)
        overrides["dmf_depth"] = int(meta["dmf_depth"])
    if meta.get("dfm_stages") is not None:  # a DFM network (packed stages, one time per stage)
        overrides["dfm_stages"] = int(meta["dfm_stages"])
    if network_head(meta) == "gm":
        if meta["preset"] == "mlp":
            raise ValueError("head: the 'mlp' network has no GM head; use a DiTDH preset")
        overrides.update(head="gm", gm_components=meta["gm_components"], gm_groups=meta["gm_groups"],
                         gm_logstd_hidden=meta.get("gm_logstd_hidden", 1024),
                         gm_logstd_layers=meta.get("gm_logstd_layers", 2), gm_mean_init_noise=0.0)
    return build_velocity_network(meta["preset"], in_channels=meta["in_channels"], num_tokens=meta["num_tokens"],
                                  conditioning=meta["conditioning"], num_classes=meta["num_classes"],
                                  class_dropout_prob=meta.get("class_dropout_prob", 0.0), **overrides)


def describe_network(meta: dict) -> str:
    """``preset (in_channels, num_tokens, conditioning, num_classes, head)`` of the metadata, for messages;
    a GM head with its components and groups."""
    try:
        head = network_head(meta)
    except ValueError:
        head = meta.get("head")
    what = (f"head 'gm' ({meta.get('gm_components')} components, {meta.get('gm_groups')} groups)"
            if head == "gm" else f"head {head!r}")
    return (f"{meta['preset']} (in_channels {meta['in_channels']}, num_tokens {meta['num_tokens']}, "
            f"conditioning {meta['conditioning']!r}, num_classes {meta['num_classes']}, {what})")


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], path, what: str) -> None:
    """Strict-load precheck with a message naming the first missing / unexpected / mis-shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = [f"{len(lst)} {name}, first {lst[:3]}" for name, lst in
                 (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", wrong)) if lst]
        raise ValueError(f"{path}: does not load strictly into {what}: " + "; ".join(parts))


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of an exported network: the one stored in the ``.safetensors`` header, else its sidecar."""
    path = Path(path)
    _, meta, _ = io.read_header(path)
    if not meta and io.sidecar_path(path).is_file():
        meta = json.loads(io.sidecar_path(path).read_text())
    required = ("preset", "in_channels", "num_tokens", "conditioning", "num_classes", "time_convention")
    missing = [k for k in required if k not in meta]
    if missing:
        raise ValueError(f"{path}: not an imported DiTDH velocity network (metadata lacks {missing}); create one "
                         "with import_released_checkpoint / `mmfm import-checkpoint`")
    return meta


def tokenizer_record(shards_meta: dict, decoder: str | None = None) -> dict:
    """What an export records about the tokenizer of its tokens, from the shards' ``mmfm`` metadata
    (:func:`mmfm.data.shards.read_metadata`, written by :func:`mmfm.data.encode.encode_folder`):

    ``name`` (the encoder), ``path`` (its weights: a folder or hub id; None for ``pixels``), ``revision``
    (``pixels``: the format's; transformers: ``sha256:`` of the weights), ``image_size`` (the ADM crop),
    ``grid`` ``[h, w]``, ``token_dim`` (``N = h w`` tokens of width ``token_dim``), ``patch_size``, ``pool``
    (``pixels``), ``precision`` (the encoder's autocast), ``normalization`` (None: raw tokens; else the shards'
    record of the statistics: ``file``, ``sha256``, ``kind``, ``eps``, ``mean``) and ``decoder`` (``"exact"``
    for ``pixels``; else the RAE decoder checkpoint when known, or None: given when sampling)."""
    name = shards_meta.get("encoder")
    return {"name": name, "path": shards_meta.get("model"), "revision": shards_meta.get("revision"),
            "image_size": shards_meta.get("image_size", shards_meta.get("input_size")),
            "grid": [int(v) for v in shards_meta["grid"]], "token_dim": int(shards_meta["token_dim"]),
            "patch_size": shards_meta.get("patch_size"), "pool": shards_meta.get("pool"),
            "precision": shards_meta.get("precision", "fp32"), "normalization": shards_meta.get("normalization"),
            "decoder": "exact" if name == "pixels" else (None if decoder is None else str(decoder))}


def source_fingerprint(path: str | os.PathLike) -> dict:
    """``{"shape": [K, N, D], "bytes", "sha256"}`` of a GMM file: the shape of its ``means``, its size and 16 hex
    digits of :func:`mmfm.io.file_fingerprint` (its header and first MiB of data: the weights and
    the first means, so two fits of one shape differ)."""
    from mmfm.io import file_fingerprint

    path = Path(path)
    header, _, _ = io.read_header(path)
    if "means" not in header:
        raise ValueError(f"{path}: not a GMM file (no 'means' tensor; it has {sorted(header)})")
    return {"shape": [int(v) for v in header["means"]["shape"]], "bytes": path.stat().st_size,
            "sha256": file_fingerprint(path)[:16]}


def source_record(kind: str, gmm: str | os.PathLike | None = None) -> dict:
    """What an export records about its noise: ``{"kind": "gaussian"}``, or ``{"kind": "gmm", "file": gmm,
    **source_fingerprint(gmm)}`` (the spatial GMM file read by its header and weights only)."""
    if kind != "gmm":
        return {"kind": kind}
    return {"kind": "gmm", "file": str(gmm), **source_fingerprint(gmm)}


def recorded_source(meta: dict) -> dict | None:
    """The ``source`` record of an export's metadata as a dict (an older export's bare ``"gaussian"`` / ``"gmm"``
    becomes ``{"kind": ...}``); None when it records none (an imported release)."""
    source = meta.get("source")
    if isinstance(source, str):
        return {"kind": source}
    return source if isinstance(source, dict) else None


def _load_network(path: Path, device) -> tuple[nn.Module, dict]:
    """The network of an export with its weights, in its own time convention (eval, no grad), and its metadata."""
    meta = read_metadata(path)
    convention = meta["time_convention"]
    if convention not in ("rae", "paper"):
        raise ValueError(f"{path}: unknown time_convention {convention!r}; expected 'rae' or 'paper'")
    try:
        with torch.device("meta"):
            net = network_from_metadata(meta)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: its metadata does not describe a velocity network: {exc}") from None
    arrays, _ = io.open_tensors(path)
    state = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
    check_state_dict(net, state, path, describe_network(meta))
    net.load_state_dict(state, strict=True, assign=True)
    return net.to(device).eval().requires_grad_(False), meta


def load_velocity_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The network of an export as a velocity field in the paper's convention.

    ``v(x, t, y=None)``: ``x`` ``(B, N, C)`` tokens, ``t`` ``(B,)`` with ``t = 0`` the source and ``t = 1``
    data, ``y`` ``(B,)`` class / mode labels for a conditional network; returns ``(B, N, C)`` approximating
    ``x1 - x0``. A network recorded with ``time_convention: "rae"`` (an imported release) is wrapped once in
    :class:`mmfm.flow.RAEConvention` (``v = -net(x, 1 - t)``); one recorded as ``"paper"`` (``mmfm train``)
    is returned as is. DiTDH takes tokens, so no layout adapter is involved. The module is in eval mode with
    gradients off; the network itself is ``.net`` of the wrapper.

    A DMF export (``dmf_depth`` recorded) is its flow map ``U(x, t, r)``, whose ``r = None`` is ``r = t``: the
    velocity; :func:`load_flowmap_model` says it is one. A GMFlow export (``head: gm``) is returned as its mean
    velocity ``sum_j A_j mu_j``:
    :class:`~mmfm.models.gm_head.GMMeanVelocity` around the network (around
    :class:`~mmfm.models.gm_head.GMRAEConvention` of it for ``"rae"``); :func:`load_gm_model` gives the mixture.
    """
    path = Path(path)
    if int(read_metadata(path).get("dfm_stages") or 1) > 1:
        raise ValueError(f"{path}: a DFM network (method dfm) takes the packed Laplacian stages and one time per "
                         "stage, not a velocity's (x, t); sample it with dfm-euler")
    net, meta = _load_network(path, device)
    rae = meta["time_convention"] == "rae"
    if network_head(meta) == "gm":
        model = GMMeanVelocity(GMRAEConvention(net) if rae else net)
    else:
        model = RAEConvention(net) if rae else net
    return model.eval()


def load_gm_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The GM network of a GMFlow export (``head: gm``) in the paper's convention, returning
    :class:`mmfm.flow.gm.GMOutput` (means ``(B, J, N, C)``, logits ``(B, J, N, G)``, ``log s`` ``(B,)``) at
    ``(x, t, y=None)``: the network itself for ``time_convention: "paper"``, wrapped once in
    :class:`~mmfm.models.gm_head.GMRAEConvention` for ``"rae"``. Eval mode, gradients off.

    Raises ``ValueError`` naming the file for a velocity export (sample that with an ODE solver).
    """
    path = Path(path)
    if network_head(read_metadata(path)) != "gm":
        raise ValueError(f"{path}: not a GMFlow (gm head) export; sample it with euler/heun/midpoint/dopri5")
    net, meta = _load_network(path, device)
    model = GMRAEConvention(net) if meta["time_convention"] == "rae" else net
    return model.eval()


def load_flowmap_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The flow map ``U(x, t, r=..., y=None)`` of a DMF export (``method: dmf``, ``dmf_depth`` recorded) in the paper's
    convention (wrapped once in :class:`mmfm.flow.RAEConvention` for ``"rae"``), eval mode, gradients off.

    Raises ``ValueError`` naming the file for any other export (sample that with an ODE solver)."""
    path = Path(path)
    meta = read_metadata(path)
    if meta.get("dmf_depth") is None:
        raise ValueError(f"{path}: not a DMF flow map (a method {meta.get('method', 'fm')!r} export without "
                         "dmf_depth); flowmap samplers need a run of method dmf; sample this one with euler, heun, "
                         "midpoint or dopri5")
    net, meta = _load_network(path, device)
    return (RAEConvention(net) if meta["time_convention"] == "rae" else net).eval()


def load_dfm_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """``(network, metadata)`` of a DFM export (``method: dfm``, ``dfm_stages`` recorded): the network takes the
    packed stages ``(B, M, C)`` and times ``(B, S)`` (paper convention), eval mode, gradients off.

    Raises ``ValueError`` naming the file for any other export (sample that with an ODE solver)."""
    path = Path(path)
    method = read_metadata(path).get("method", "fm")
    if method != "dfm":
        raise ValueError(f"{path}: not a DFM network (a method {method!r} export); "
                         "dfm-euler samples a run of method dfm; sample this one with euler, heun, midpoint or dopri5")
    return _load_network(path, device)


__all__ = ["TokenMLP", "build_velocity_network", "check_state_dict", "describe_network", "load_dfm_model",
           "load_flowmap_model", "load_gm_model", "load_velocity_model", "network_from_metadata", "network_head",
           "read_metadata", "recorded_source", "source_fingerprint", "source_record", "tokenizer_record"]
