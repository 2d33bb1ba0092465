"""Import a released RAE / MM-FM DiTDH checkpoint into our format (loaded by :mod:`mmfm.models.velocity`).

A released stage-2 checkpoint (docs/method.md §2.8) is a ``torch.save`` dict — RAE: ``{step, epoch, model, ema,
optimizer, scheduler}``; MM-FM: ``{model, ema, opt, scheduler, train_steps, epoch, config_path, training_cfg,
cli_overrides, ...}`` — or sometimes a bare state dict. Its network is a ``DiTwDDTHead`` whose parameter
names equal :class:`mmfm.models.DiTDH`'s, trained in RAE's time convention (``t = 0`` data, ``t = 1`` noise,
velocity ``x0 - x1``).

:func:`import_released_checkpoint` reads the file with ``torch.load(weights_only=True)`` (never unpickling
code: any other global the file names, e.g. a config object, is read as an inert placeholder), takes the
``ema`` entry, strips the ``module.`` (DDP) / ``_orig_mod.`` (``torch.compile``) prefixes, infers the
architecture from the tensor shapes, loads it strictly into :func:`mmfm.models.build_ditdh` and writes the
weights as float32 ``.safetensors`` plus a JSON sidecar. :func:`mmfm.models.velocity.load_velocity_model`
rebuilds the network from that pair and returns it in the paper's convention (``t = 0`` source, ``t = 1``
data, ``x_t = (1 - t) x0 + t x1``, target ``x1 - x0``) through the one adapter :class:`mmfm.flow.RAEConvention`.
DiTDH already works on tokens ``(B, N, C)``; the release's ``(B, C, H, W)`` layout only shows in the 1x1-conv
patch-embedding weights, which load unchanged, so no layout adapter is needed.

What the shapes tell (``D_e`` encoder width, ``D_d`` head width, ``p`` patch, ``C`` latent channels):

- ``s_embedder.proj.weight (D_e, C, p, p)``, ``x_embedder.proj.weight (D_d, C, p, p)``: widths, ``C``, ``p``;
- ``pos_embed (1, N / p^2, D_e)``: the number of tokens ``N``;
- ``enc_feat_rope.freqs_cos (N / p^2, D_e / heads)`` and ``dec_feat_rope...``: the head counts;
- ``blocks.{i}.norm1.weight``: the leading ``D_e``-wide blocks are the encoder, the ``D_d``-wide rest the head;
- ``y_embedder.embedding_table.weight (R, D_e)``: a label table of ``R`` rows, or no conditioning at all.

These must match one of :data:`mmfm.models.PRESETS`. The table's *use* is not in the weights: an MM-FM
unconditional network carries an unused 8192-row table exactly like a mode-conditional one. The conditioning
comes from, in order: the caller's ``conditioning``; the checkpoint's own config (``use_y_conditioning``,
``class_dropout_prob``); the file name (the published ``uncond-gmm-*.pt`` / ``mode-gmm-*.pt``); no table
(unconditional); a 1001-row table (RAE's class-conditional ImageNet release, 1000 classes + the null label).
Anything else is a ``ValueError`` asking for ``conditioning=``.
"""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
from pathlib import Path

import torch

from mmfm import io
from mmfm.models.ditdh import CONDITIONINGS, PRESETS, count_parameters
from mmfm.models.velocity import check_state_dict, describe_network, network_from_metadata

#: ``kind`` recorded in the sidecar of an imported velocity network.
KIND = "velocity-ditdh"
#: Wrapper prefixes stripped from state-dict keys: DDP's ``module.`` and ``torch.compile``'s ``_orig_mod.``.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: Head defaults of the presets that do not name them (RAE's 2048-wide, 2-block, 16-head DDT head).
_HEAD_DEFAULTS = dict(head_hidden_size=2048, head_depth=2, head_num_heads=16)
_ARCH_KEYS = ("hidden_size", "depth", "num_heads", "head_hidden_size", "head_depth", "head_num_heads")
#: RAE's class-conditional ImageNet table: 1000 classes + the CFG null label; its label dropout.
_RAE_CLASS_ROWS, _RAE_CLASS_DROPOUT = 1001, 0.1
_MAX_OPAQUE_GLOBALS = 64


# --------------------------------------------------------------------------------------------------- reading


class _Opaque:
    """Inert stand-in for a global a checkpoint names that is not a tensor type (e.g. a config class).

    It records the arguments and state the pickle hands it and runs nothing, so the ``weights_only``
    unpickler can read past such objects without importing or calling anything from the file.
    """

    __opaque_name__ = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<opaque {self.__opaque_name__}>"


def _opaque(name: str) -> type:
    return type(f"Opaque[{name}]", (_Opaque,), {"__opaque_name__": name})


def _empty_dict(*args) -> dict:
    """Stand-in for ``collections.defaultdict(factory)``: a plain dict the pickle then fills."""
    return {}


#: Containers read as their plain equivalent (the unpickler fills only plain dicts).
_CONTAINERS = {"collections.defaultdict": _empty_dict}
_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL (\S+) was not an allowed global")


def _reason(exc: BaseException) -> str:
    """The informative line of a ``torch.load`` error (torch wraps the unpickler's in advice)."""
    advice = ("Weights only load failed", "Check the documentation", "(1)", "(2)", "Please file an issue")
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(advice)]
    line = (useful or lines or [type(exc).__name__])[0]
    return line.split("WeightsUnpickler error:", 1)[-1].strip()


def _torch_load(path: Path):
    """``torch.load(weights_only=True)``; other globals become :class:`_Opaque` placeholders (never run)."""
    mmap = zipfile.is_zipfile(path)  # the zip format can be memory-mapped: a 3 GB entry costs no copy
    opaque: list[tuple[object, str]] = []
    while True:
        try:
            with torch.serialization.safe_globals(opaque):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure of the reader becomes one named ValueError
            msg = str(exc)
            m = _UNSUPPORTED.search(msg)
            if m and len(opaque) < _MAX_OPAQUE_GLOBALS:
                name = m.group(1)
                full = name if "." in name else f"builtins.{name}"  # torch strips "builtins." from the message
                if full not in {n for _, n in opaque}:
                    opaque.append((_CONTAINERS.get(full) or _opaque(full), full))
                    continue
            raise ValueError(f"{path}: not a checkpoint readable with torch.load(weights_only=True): "
                             f"{_reason(exc)}") from None


def _plain(value, depth: int = 0):
    """A JSON-able view of small non-tensor entries (step counters, paths)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, dict) and depth < 2 and len(value) <= 32:
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    return None


def _unwrap(value):
    """An OmegaConf-style value node read as a placeholder (``state["_val"]``) -> its value."""
    if isinstance(value, _Opaque) and isinstance(value.state, dict) and "_val" in value.state:
        return value.state["_val"]
    return value


def _find_key(obj, key: str, depth: int = 0):
    """First value under ``key`` in nested dicts / lists / placeholders (a config saved as an object)."""
    if depth > 12:
        return None
    if isinstance(obj, _Opaque):
        obj = [obj.state, list(obj.args)]
    if isinstance(obj, dict):
        if key in obj:
            return _unwrap(obj[key])
        items = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        items = list(obj)
    else:
        return None
    for v in items:
        if isinstance(v, (dict, list, tuple, _Opaque)):
            found = _find_key(v, key, depth + 1)
            if found is not None:
                return found
    return None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _select_entry(obj, entry: str | None, path: Path) -> tuple[dict, str | None, dict]:
    """``(state dict, entry used or None for a bare state dict, the rest of the payload)``."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict (a checkpoint with an 'ema' entry, or a state dict), "
                         f"got {type(obj).__name__}")
    if _is_state_dict(obj):
        return obj, None, {}
    keys = sorted(map(str, obj))
    if entry not in obj:
        if entry == "ema" and "model" in obj:
            raise ValueError(f"{path}: has no 'ema' entry (it holds {keys}). MM-FM / RAE networks are sampled from "
                             "their EMA weights; pass entry='model' to import the raw training weights explicitly")
        raise ValueError(f"{path}: has no {entry!r} entry; it holds {keys}")
    state = obj[entry]
    if not _is_state_dict(state):
        raise ValueError(f"{path}: entry {entry!r} is not a state dict of tensors (got {type(state).__name__})")
    rest = {k: v for k, v in obj.items()  # what may hold a config: not weights, not optimizer state
            if k not in ("opt", "optimizer", "scheduler") and not _is_state_dict(v)}
    return state, entry, rest


def _strip_prefixes(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove wrapper prefixes carried by *every* key (``module._orig_mod.blocks.0...`` -> ``blocks.0...``)."""
    stripped = []
    while True:
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped.append(prefix)
                break
        else:
            return state, stripped


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- inference


def _shape(state, key) -> tuple[int, ...]:
    return tuple(state[key].shape)


def infer_architecture(state: dict[str, torch.Tensor], path: str | os.PathLike = "state dict") -> dict:
    """Read the DiTDH sizes from a (prefix-free) state dict's shapes.

    Returns ``in_channels``, ``num_tokens``, ``patch_size``, the encoder / head sizes (``hidden_size``,
    ``depth``, ``num_heads``, ``head_hidden_size``, ``head_depth``, ``head_num_heads``), ``label_rows`` (rows
    of ``y_embedder.embedding_table``, 0 without a table) and ``preset``, the matching name in
    :data:`mmfm.models.PRESETS` or ``None``. Raises ``ValueError`` when a key DiTDH needs is missing or the
    shapes do not fit together.
    """
    need = ["s_embedder.proj.weight", "x_embedder.proj.weight", "pos_embed", "enc_feat_rope.freqs_cos",
            "dec_feat_rope.freqs_cos", "blocks.0.norm1.weight"]
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"{path}: not a DiTDH (DiTwDDTHead) state dict: missing {missing[:3]}; its first keys are "
                         f"{sorted(state)[:5]}")
    sw, xw, pe = _shape(state, "s_embedder.proj.weight"), _shape(state, "x_embedder.proj.weight"), _shape(state, "pos_embed")
    if len(sw) != 4 or len(xw) != 4 or sw[2] != sw[3] or sw[1:] != xw[1:] or len(pe) != 3 or pe[0] != 1 or pe[2] != sw[0]:
        raise ValueError(f"{path}: not a DiTDH state dict: s_embedder.proj.weight {sw}, x_embedder.proj.weight {xw}, "
                         f"pos_embed {pe} do not fit together")
    d_e, c, p, _ = sw
    d_d = xw[0]
    enc_hd, dec_hd = _shape(state, "enc_feat_rope.freqs_cos")[-1], _shape(state, "dec_feat_rope.freqs_cos")[-1]
    if d_e % enc_hd or d_d % dec_hd:
        raise ValueError(f"{path}: RoPE head widths {enc_hd} / {dec_hd} do not divide the widths {d_e} / {d_d}")
    widths = {}
    for k, v in state.items():
        m = re.fullmatch(r"blocks\.(\d+)\.norm1\.weight", k)
        if m:
            widths[int(m.group(1))] = v.shape[0]
    n_blocks = max(widths) + 1
    if sorted(widths) != list(range(n_blocks)):
        raise ValueError(f"{path}: blocks are not numbered 0..{n_blocks - 1}: missing "
                         f"{sorted(set(range(n_blocks)) - set(widths))[:3]}")
    depth = next((i for i in range(n_blocks) if widths[i] != d_e), n_blocks)
    odd = [f"blocks.{i}.norm1.weight ({widths[i]},)" for i in range(depth, n_blocks) if widths[i] != d_d]
    if odd:
        raise ValueError(f"{path}: block widths are neither the encoder's {d_e} nor the head's {d_d}: {odd[:3]}")
    table = state.get("y_embedder.embedding_table.weight")
    arch = dict(in_channels=c, num_tokens=pe[1] * p * p, patch_size=p, hidden_size=d_e, depth=depth,
                num_heads=d_e // enc_hd, head_hidden_size=d_d, head_depth=n_blocks - depth,
                head_num_heads=d_d // dec_hd, label_rows=0 if table is None else int(table.shape[0]))
    sizes = {k: arch[k] for k in _ARCH_KEYS}
    arch["preset"] = next((name for name in PRESETS if _preset_sizes(name) == sizes), None)
    return arch


def _preset_sizes(name: str) -> dict:
    return {k: {**_HEAD_DEFAULTS, **PRESETS[name]}[k] for k in _ARCH_KEYS}


def _match_preset(arch: dict, preset: str | None, path: Path) -> str:
    sizes = {k: arch[k] for k in _ARCH_KEYS}
    found = [name for name in PRESETS if _preset_sizes(name) == sizes]
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset: unknown DiTDH preset {preset!r}; expected one of {sorted(PRESETS)}")
        if preset not in found:
            want = _preset_sizes(preset)
            diff = [f"{k} {sizes[k]} (preset {want[k]})" for k in _ARCH_KEYS if sizes[k] != want[k]]
            raise ValueError(f"{path}: the checkpoint is not a {preset}: {', '.join(diff)}")
        return preset
    if not found:
        desc = ", ".join(f"{k}={v}" for k, v in sizes.items())
        raise ValueError(f"{path}: the checkpoint's architecture ({desc}) is none of the DiTDH presets "
                         f"{sorted(PRESETS)}")
    return found[0]


def _conditioning_from_name(path: Path) -> str | None:
    words = set(re.split(r"[^a-z0-9]+", path.name.lower()))
    uncond, mode = bool(words & {"uncond", "unconditional"}), "mode" in words
    return "none" if uncond and not mode else "mode" if mode and not uncond else None


def _resolve_conditioning(rows: int, conditioning: str | None, num_classes: int | None, rest: dict,
                          path: Path) -> dict:
    """``conditioning``, ``num_classes`` (without the null row), ``class_dropout_prob``, ``conditioning_from``."""
    if conditioning is not None and conditioning not in CONDITIONINGS:
        raise ValueError(f"conditioning: expected one of {CONDITIONINGS}, got {conditioning!r}")
    if num_classes is not None and not (isinstance(num_classes, int) and not isinstance(num_classes, bool)
                                        and num_classes >= 0):
        raise ValueError(f"num_classes: expected a non-negative integer, got {num_classes!r}")
    use_y = _find_key(rest, "use_y_conditioning")
    dropout = _find_key(rest, "class_dropout_prob")
    dropout = float(dropout) if isinstance(dropout, (int, float)) and not isinstance(dropout, bool) else None
    source = "argument"
    if conditioning is None:
        if isinstance(use_y, bool):
            conditioning, source = ("class" if dropout else "mode") if use_y else "none", "checkpoint config"
        elif dropout:
            conditioning, source = "class", "checkpoint config"
        elif rows and _conditioning_from_name(path):
            conditioning, source = _conditioning_from_name(path), "file name"
        elif rows == 0:
            conditioning, source = "none", "no label table"
        elif num_classes is not None and rows == num_classes + 1:
            conditioning, source = "class", "table rows (num_classes + null label)"
        elif rows == _RAE_CLASS_ROWS:
            conditioning, source = "class", "table rows (RAE: 1000 classes + null label)"
            dropout = dropout or _RAE_CLASS_DROPOUT
        else:
            raise ValueError(f"{path}: cannot tell how its {rows}-row label table is used (an MM-FM unconditional "
                             "network carries an unused table, a mode-conditional one the same table); pass "
                             "conditioning='none', 'mode' or 'class'")
    if rows == 0:
        if conditioning != "none":
            raise ValueError(f"{path}: conditioning {conditioning!r} needs a label table, but the checkpoint has "
                             "no y_embedder.embedding_table.weight")
        if num_classes:
            raise ValueError(f"{path}: num_classes {num_classes} asserted, but the checkpoint has no label table")
        return dict(conditioning="none", num_classes=0, class_dropout_prob=0.0, conditioning_from=source)
    # the table has `rows` rows: K labels, plus the CFG null label when there is one
    if num_classes is not None:
        if rows == num_classes:
            null = False
        elif rows == num_classes + 1 and conditioning != "mode":
            null = True
        else:
            what = "modes K" if conditioning == "mode" else "num_classes"
            raise ValueError(f"{path}: {what} {num_classes} asserted, but y_embedder.embedding_table.weight has "
                             f"{rows} rows" + ("" if conditioning == "mode" else
                                              f" (expected {num_classes} or {num_classes + 1} with the null label)"))
    elif conditioning == "class":
        null = dropout is None or dropout > 0  # RAE's class-conditional tables end in the null label
    else:
        null = False
    k = rows - int(null)
    if k < 1:
        raise ValueError(f"{path}: a {rows}-row label table leaves no label besides the null label")
    drop = (dropout if dropout else _RAE_CLASS_DROPOUT) if null else 0.0
    return dict(conditioning=conditioning, num_classes=k, class_dropout_prob=drop, conditioning_from=source)


# ------------------------------------------------------------------------------------------------ public API


def import_released_checkpoint(path: str | os.PathLike, out: str | os.PathLike, *, preset: str | None = None,
                               entry: str = "ema", num_classes: int | None = None,
                               conditioning: str | None = None) -> dict:
    """Convert a released RAE / MM-FM DiTDH checkpoint ``path`` (``.pt``) to ``out`` (``.safetensors`` + sidecar).

    Args:
        path: a ``torch.save`` dict with an ``ema`` (and ``model``, optimizer, ...) entry, or a bare state dict.
            Read with ``torch.load(weights_only=True)``; nothing from the file is executed.
        out: the ``.safetensors`` file to write (float32 weights, DiTDH names); the sidecar is ``out`` with
            ``.json``. Both are written atomically, and neither is left behind on an error.
        preset: assert the architecture (``ditdh-xl`` ...); by default it is inferred from the shapes.
        entry: which weights to take. ``"ema"`` (default) is what RAE / MM-FM sample from; a file without
            it is refused unless ``entry="model"`` is given explicitly. Ignored for a bare state dict.
        num_classes: assert the number of classes / GMM modes ``K`` (without the null label).
        conditioning: ``"none"``, ``"class"`` or ``"mode"``; by default read from the checkpoint's config,
            its file name, or the table (see the module docstring).

    Returns the sidecar: ``kind``, ``preset``, ``in_channels``, ``num_tokens`` (``N`` of the ``(B, N, C)``
    tokens), ``patch_size``, ``conditioning``, ``num_classes``, ``null_label`` (index or ``None``),
    ``class_dropout_prob``, ``label_rows``, ``time_convention: "rae"``, ``layout: "tokens"``,
    ``source_file``, ``source_sha256``, ``entry`` (``None`` for a bare state dict), ``stripped_prefixes``,
    ``conditioning_from``, ``num_parameters`` and the release's step counters when present.

    Raises ``ValueError`` naming the file for an unreadable file, a missing entry, another architecture,
    a mismatch with ``preset`` / ``num_classes`` / ``conditioning``, or unknown / missing / mis-shaped keys.
    """
    path, out = Path(path), Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"out: expected a .safetensors path (the sidecar goes beside it as .json), got {out}")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if out.resolve() == path.resolve() or io.sidecar_path(out).resolve() == path.resolve():
        raise ValueError(f"out: {out} would overwrite the checkpoint being imported")
    if not isinstance(entry, str) or not entry:
        raise ValueError(f"entry: expected an entry name such as 'ema' or 'model', got {entry!r}")

    payload = _torch_load(path)
    state, used, rest = _select_entry(payload, entry, path)
    state, stripped = _strip_prefixes(state)
    arch = infer_architecture(state, path)
    name = _match_preset(arch, preset, path)
    cond = _resolve_conditioning(arch["label_rows"], conditioning, num_classes, rest, path)
    meta = {
        "kind": KIND, "preset": name, "in_channels": arch["in_channels"], "num_tokens": arch["num_tokens"],
        "patch_size": arch["patch_size"], "conditioning": cond["conditioning"], "num_classes": cond["num_classes"],
        "null_label": cond["num_classes"] if cond["class_dropout_prob"] > 0 else None,
        "class_dropout_prob": cond["class_dropout_prob"], "label_rows": arch["label_rows"],
        "time_convention": "rae", "layout": "tokens",
        "source_file": path.name, "source_sha256": None, "entry": used, "stripped_prefixes": stripped,
        "conditioning_from": cond["conditioning_from"],
    }
    try:
        with torch.device("meta"):
            model = network_from_metadata(meta)
    except ValueError as exc:
        raise ValueError(f"{path}: the inferred {describe_network(meta)} cannot be built: {exc}") from None
    check_state_dict(model, state, path, describe_network(meta))
    bad = [k for k, v in state.items() if not v.is_floating_point()]
    if bad:
        raise ValueError(f"{path}: expected floating-point weights, got {state[bad[0]].dtype} for {bad[:3]}")
    state = {k: v.detach().to(torch.float32) for k, v in state.items()}
    nonfinite = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise ValueError(f"{path}: non-finite values in {nonfinite[:3]}")
    model.load_state_dict(state, strict=True, assign=True)
    meta["num_parameters"] = count_parameters(model)
    for key in ("train_steps", "step", "epoch"):
        if isinstance(rest.get(key), int) and not isinstance(rest.get(key), bool):
            meta[key] = rest[key]
    if isinstance(rest.get("config_path"), str):
        meta["config_path"] = rest["config_path"]
    if isinstance(_plain(rest.get("cli_overrides")), dict):
        meta["cli_overrides"] = _plain(rest["cli_overrides"])
    meta["source_sha256"] = _sha256(path)

    tensors = {k: v.contiguous().numpy() for k, v in model.state_dict().items()}
    sidecar = io.sidecar_path(out)
    try:
        io.save_tensors(out, tensors, meta)
        io.write_json(sidecar, meta)
    except BaseException:
        out.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)
        raise
    return meta


__all__ = ["KIND", "WRAPPER_PREFIXES", "import_released_checkpoint", "infer_architecture"]
