"""Training checkpoints for bit-identical resume: atomic, safetensors + JSON, no pickle (docs/design.md §4).

Layout of a run directory::

    run_dir/
      latest                 one line: the newest complete checkpoint's name, e.g. "step-0000123"
      step-0000123/
        model.safetensors    the model's state_dict (DDP / torch.compile wrappers removed)
        ema.safetensors      the EMA's fp32 shadow, under the same names
        state.safetensors    optimizer and scheduler state tensors ("optimizer.state.0.exp_avg", ...)
        state.json           everything else, written last (below)
      step-0000456.tmp4242/  a save in progress, or killed; never read

``state.json`` holds ``format``, ``version``, ``step``; ``optimizer`` and ``scheduler``, their
``state_dict()`` with every tensor replaced by ``{"__tensor__": key}`` into ``state.safetensors``
(tuples, non-string keys, numpy arrays and non-finite floats are marked so that they come back as
they were: AdamW's integer parameter ids stay integers); ``rng``, one entry per rank (see
:func:`get_rng_state`; byte states as base64); ``extra`` (the data stream's state and whatever
else the loop needs; plain JSON); ``config``; and ``files``, the byte size of each tensor file.

A save writes everything into ``step-XXXXXXX.tmp<pid>/``, fsyncs it, renames it to
``step-XXXXXXX/`` (one ``os.replace``) and only then rewrites ``latest`` (atomically, through
:func:`mmfm.io.atomic_path`). An error or a kill at any point leaves the previous checkpoint and
``latest`` as they were; :func:`latest_checkpoint` never returns a ``.tmp`` directory nor one whose
``state.json`` is missing or whose files do not have the recorded sizes.

A full disk (``ENOSPC`` / ``EDQUOT``) during a save raises :class:`mmfm.io.DiskFull` naming the checkpoint,
the bytes it needs and the bytes free; the save folder is removed and the previous checkpoint is untouched.
A checkpoint that is damaged in a way the sizes do not show (a header, a missing tensor) raises
:class:`mmfm.recover.CorruptArtifact` naming the file and how to go on: remove that checkpoint, and the run
resumes from the previous complete one (or starts afresh). :func:`verify_checkpoint` checks one whole.

Unlike the release (docs/method.md §2.8), the optimizer state is restored before the first step, so the
first step after a resume uses the saved Adam moments and the run continues bit for bit.
Tensors whose dtype numpy lacks (bfloat16, float8) are stored as same-width integers, their torch
dtype noted in the file's metadata (``torch_dtypes``).
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
import re
import shutil
from collections.abc import Mapping, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmfm import io
from mmfm.recover import CorruptArtifact, rebuild_command
from mmfm.train.ema import EMA, unwrap

FORMAT, VERSION = "mmfm-checkpoint", 1
LATEST, STATE = "latest", "state.json"
MODEL, EMA_FILE, TENSORS = "model.safetensors", "ema.safetensors", "state.safetensors"
_NAME = re.compile(r"step-(\d+)")
_LEFTOVER = re.compile(r"step-(\d+)\.(tmp|old)\d+")
_REQUIRED = ("format", "version", "step", "optimizer", "scheduler", "rng", "extra", "config", "files")

Generator = torch.Generator | np.random.Generator


# ---------------------------------------------------------------------------------------------
# tensors <-> safetensors (through mmfm.io), state_dicts <-> JSON


def _stored_dtype(dtype: torch.dtype) -> tuple[torch.dtype, str | None]:
    """The dtype a tensor is written as, and the torch dtype name to restore when they differ."""
    try:
        torch.empty(0, dtype=dtype).numpy()
        return dtype, None
    except TypeError:  # bfloat16, float8: numpy has no such dtype
        return {1: torch.uint8, 2: torch.int16}[dtype.itemsize], str(dtype).removeprefix("torch.")


def _write_tensors(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
    """Write ``tensors`` as one safetensors file, atomically, one tensor at a time (one CPU copy each)."""
    stored, restore = {}, {}
    for name, t in tensors.items():
        stored[name], restore_as = _stored_dtype(t.dtype)
        if restore_as:
            restore[name] = restore_as
    specs = {n: (tuple(t.shape), torch.empty(0, dtype=stored[n]).numpy().dtype) for n, t in tensors.items()}
    meta = {**meta, "torch_dtypes": restore} if restore else dict(meta)
    with io.TensorFile(path, specs, meta) as f:
        for name, t in tensors.items():
            f[name][...] = t.detach().cpu().view(stored[name]).numpy()
        f.commit()


def _bad(path: Path, reason: str) -> CorruptArtifact:
    """A damaged checkpoint file or folder: the message says to remove the checkpoint (its folder)."""
    ckpt = path if _NAME.fullmatch(path.name) else path.parent
    cmd = rebuild_command([ckpt]) or f"rm -r {ckpt}"
    return CorruptArtifact(path, reason, hint=f"remove the checkpoint and the run resumes from the previous complete "
                                              f"one, or starts afresh: {cmd}")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        arrays, meta = io.open_tensors(path)
    except CorruptArtifact as err:
        raise _bad(path, err.reason) from None
    restore = meta.get("torch_dtypes", {})
    out = {}
    for name, a in arrays.items():
        t = torch.from_numpy(np.array(a))  # a copy out of the memory map
        out[name] = t.view(getattr(torch, restore[name])) if name in restore else t
    return out


_MARKERS = {"__tensor__", "__tuple__", "__items__", "__ndarray__", "__float__"}


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON form of a ``state_dict``: each tensor goes to ``tensors[key]`` (``key`` is its path, e.g.
    ``optimizer.state.0.exp_avg``); tuples, non-string keys, arrays and inf/nan are marked."""
    if isinstance(obj, torch.Tensor):
        if key in tensors:
            raise ValueError(f"two tensors would be stored as {key!r}")
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        data = base64.b64encode(np.ascontiguousarray(obj).tobytes()).decode()
        return {"__ndarray__": data, "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj) and not _MARKERS & set(obj):
            return {k: _encode(v, f"{key}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, key, {}), _encode(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    raise TypeError(f"{key}: cannot store a {type(obj).__name__} in a checkpoint")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`_encode`; a missing tensor raises ``KeyError``."""
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    if "__ndarray__" in obj:
        raw = base64.b64decode(obj["__ndarray__"])
        return np.frombuffer(raw, dtype=obj["dtype"]).reshape(obj["shape"]).copy()
    if "__float__" in obj:
        return float(obj["__float__"])
    return {k: _decode(v, tensors) for k, v in obj.items()}


# ---------------------------------------------------------------------------------------------
# random states


def get_rng_state(generators: Mapping[str, Generator] | None = None) -> dict:
    """This process's random state as JSON: Python ``random``, numpy's global ``RandomState``, torch's CPU
    generator, every CUDA device's generator (when CUDA is available) and each named ``torch.Generator``
    or ``numpy.random.Generator``. In DDP every rank has its own: gather them for :func:`save_checkpoint`."""
    version, words, gauss_next = random.getstate()
    gens = {}
    for name, g in (generators or {}).items():
        if isinstance(g, torch.Generator):
            gens[name] = {"kind": "torch", "state": g.get_state().numpy()}
        elif isinstance(g, np.random.Generator):
            gens[name] = {"kind": "numpy", "state": g.bit_generator.state}
        else:
            raise TypeError(f"generator {name!r}: expected torch.Generator or numpy.random.Generator, "
                            f"got {type(g).__name__}")
    cuda = [s.numpy() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    state = {"python": (version, np.array(words, np.uint32), gauss_next), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state().numpy(), "cuda": cuda, "generators": gens}
    return _encode(state, "rng", {})


def _check_generators(state: Mapping, generators: Mapping[str, Generator] | None, where) -> None:
    saved = state.get("generators", {})
    for name, g in (generators or {}).items():
        kind = "torch" if isinstance(g, torch.Generator) else "numpy"
        if name not in saved:
            raise ValueError(f"{where}: no state for generator {name!r}; it holds {sorted(saved)}")
        if saved[name]["kind"] != kind:
            raise ValueError(f"{where}: generator {name!r} was saved as a {saved[name]['kind']} generator, "
                             f"not a {kind} one")


def set_rng_state(state: Mapping, generators: Mapping[str, Generator] | None = None) -> None:
    """Restore a state from :func:`get_rng_state`, and each named generator from its saved entry.

    CUDA devices present both in the state and here are restored; a state saved without CUDA leaves
    the CUDA generators alone.
    """
    _check_generators(state, generators, "random state")
    s = _decode(state, {})
    version, words, gauss_next = s["python"]
    random.setstate((version, tuple(int(w) for w in words), gauss_next))
    np.random.set_state(s["numpy"])
    torch.set_rng_state(torch.from_numpy(s["torch"]))
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(s["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.from_numpy(cuda_state), i)
    for name, g in (generators or {}).items():
        saved = s["generators"][name]["state"]
        if isinstance(g, torch.Generator):
            g.set_state(torch.from_numpy(saved))
        else:
            g.bit_generator.state = saved


# ---------------------------------------------------------------------------------------------
# save / load


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not fsync directories
        pass
    finally:
        os.close(fd)


def _json_checked(what: str, value):
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be plain JSON (dicts with string keys, lists, numbers, strings): {err}") from None
    return value


def save_checkpoint(run_dir, *, step: int, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer,
                    scheduler=None, extra: Mapping | None = None, config: Mapping | None = None,
                    generators: Mapping[str, Generator] | None = None, rng: Sequence[Mapping] | None = None) -> Path:
    """Write ``run_dir/step-{step:07d}/`` (layout in the module doc) and point ``run_dir/latest`` at it.

    ``step``: optimizer updates taken. ``extra``: JSON (e.g. ``{"stream": stream.state_dict()}``).
    ``rng``: every rank's :func:`get_rng_state`, in rank order (DDP: gather them; only rank 0 saves);
    default: this process's, with ``generators``. An existing checkpoint of the same step is replaced.
    Returns the checkpoint's path.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    run_dir = Path(run_dir)
    tensors: dict[str, torch.Tensor] = {}
    state = {"format": FORMAT, "version": VERSION, "step": int(step),
             "optimizer": _encode(optimizer.state_dict(), "optimizer", tensors),
             "scheduler": None if scheduler is None else _encode(scheduler.state_dict(), "scheduler", tensors),
             "rng": _json_checked("rng", list(rng) if rng is not None else [get_rng_state(generators)]),
             "extra": _json_checked("extra", dict(extra or {})),
             "config": _json_checked("config", dict(config or {}))}
    name = f"step-{step:07d}"
    final, tmp, old = run_dir / name, run_dir / f"{name}.tmp{os.getpid()}", run_dir / f"{name}.old{os.getpid()}"
    files = {MODEL: unwrap(model).state_dict(), EMA_FILE: ema.state_dict(), TENSORS: tensors}
    needed = sum(t.numel() * t.element_size() for ts in files.values() for t in ts.values()) + len(json.dumps(state))
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
        for fname, ts in files.items():
            _write_tensors(tmp / fname, ts, {"kind": fname.removesuffix(".safetensors"), "step": int(step)})
        state["files"] = {fname: (tmp / fname).stat().st_size for fname in files}
        (tmp / STATE).write_text(json.dumps(state, indent=1, allow_nan=False) + "\n")
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        replaced = final.exists()
        if replaced:
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.errno in io.DISK_FULL:
            raise io.disk_full_error(final, needed, err) from err
        raise
    if replaced:
        shutil.rmtree(old, ignore_errors=True)
    _fsync(run_dir)
    with io.atomic_path(run_dir / LATEST) as p:
        p.write_text(name + "\n")
        _fsync(p)
    _fsync(run_dir)
    return final


def _read_state(path: Path) -> dict:
    """``state.json`` of a complete checkpoint; a ``ValueError`` naming the file otherwise."""
    if not path.is_dir():
        raise ValueError(f"{path}: no such checkpoint directory")
    f = path / STATE
    if not f.is_file():
        raise ValueError(f"{path}: incomplete checkpoint (no {STATE})")
    try:
        state = json.loads(f.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _bad(f, f"corrupt ({err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise _bad(f, f"not an {FORMAT} file")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise _bad(f, f"missing key(s) {missing}")
    for fname, size in state["files"].items():
        p = path / fname
        if not p.is_file():
            raise _bad(p, "missing; the checkpoint is incomplete")
        if p.stat().st_size != size:
            raise _bad(p, f"{p.stat().st_size} bytes where {STATE} records {size}; the file is damaged")
    return state


def checkpoint_config(path) -> dict:
    """The training config a complete checkpoint was written with (its ``state.json``)."""
    return _read_state(Path(path))["config"]


def _header(file: Path) -> dict:
    try:
        return io.read_header(file)[0]
    except CorruptArtifact as err:
        raise _bad(file, err.reason) from None


def verify_checkpoint(path) -> int:
    """Check a complete checkpoint folder whole, reading no tensor: ``state.json`` and the recorded sizes
    (:func:`_read_state`), every tensor file's header against its size, the EMA's names and shapes against
    the model's, and every tensor ``state.json`` refers to present in ``state.safetensors``. Returns its step;
    raises :class:`~mmfm.recover.CorruptArtifact` naming the file."""
    path = Path(path)
    state = _read_state(path)
    headers = {fname: _header(path / fname) for fname in state["files"]}
    model, ema = headers.get(MODEL, {}), headers.get(EMA_FILE, {})
    if {k: h["shape"] for k, h in model.items()} != {k: h["shape"] for k, h in ema.items()}:
        raise _bad(path / EMA_FILE, f"its tensors' names or shapes differ from those of {MODEL}")
    refs: list[str] = []
    _refs(state["optimizer"], refs)
    _refs(state["scheduler"], refs)
    missing = sorted(set(refs) - set(headers.get(TENSORS, {})))
    if missing:
        raise _bad(path / TENSORS, f"missing tensor(s) {missing[:5]} that {STATE} refers to")
    return int(state["step"])


def _refs(obj, out: list[str]) -> None:
    """The ``__tensor__`` keys of an encoded state (:func:`_encode`)."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            out.append(obj["__tensor__"])
        for v in obj.values():
            _refs(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _refs(v, out)


def _check_shapes(file: Path, expected: Mapping[str, torch.Tensor], what: str) -> None:
    header = _header(file)
    saved = {k: tuple(h["shape"]) for k, h in header.items()}
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{file}: does not match the {what} (missing keys {missing[:5]}, unexpected keys "
                         f"{unexpected[:5]}); is it a checkpoint of another architecture?")
    for k, t in expected.items():
        if saved[k] != tuple(t.shape):
            raise ValueError(f"{file}: {k!r} has shape {saved[k]} in the checkpoint, {tuple(t.shape)} in the "
                             f"{what}; is it a checkpoint of another architecture?")


def _check_optimizer(file: Path, saved: Mapping, optimizer: torch.optim.Optimizer) -> None:
    sizes = [len(g["params"]) for g in saved["param_groups"]]
    mine = [len(g["params"]) for g in optimizer.param_groups]
    if sizes != mine:
        raise ValueError(f"{file}: the optimizer state has parameter groups of sizes {sizes}, this optimizer {mine}")
    params = dict(zip(chain(*(g["params"] for g in saved["param_groups"])),
                      chain(*(g["params"] for g in optimizer.param_groups))))
    for i, entry in saved["state"].items():
        if i not in params:
            raise ValueError(f"{file}: optimizer state for unknown parameter id {i!r}")
        for name, v in entry.items():
            if isinstance(v, torch.Tensor) and v.ndim and v.shape != params[i].shape:
                raise ValueError(f"{file}: optimizer state {name!r} of parameter {i} has shape {tuple(v.shape)}, "
                                 f"the parameter {tuple(params[i].shape)}")


def load_checkpoint(path, *, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer, scheduler=None,
                    generators: Mapping[str, Generator] | None = None, rank: int | None = None,
                    restore_rng: bool = True) -> dict:
    """Restore model, EMA, optimizer, scheduler and (unless ``restore_rng`` is false) this rank's random
    state, with ``generators`` by name, from a checkpoint directory or a run directory's latest.

    Everything is checked before anything is changed: a ``ValueError`` names the file and the key
    on a missing key, a shape mismatch or an incomplete or damaged checkpoint. ``rank``: whose random
    state to restore (default: ``torch.distributed``'s rank, or 0). Returns ``{"step", "extra",
    "config", "path"}``.
    """
    path = Path(path)
    if not (path / STATE).exists() and (latest := latest_checkpoint(path)) is not None:
        path = latest
    state = _read_state(path)
    model = unwrap(model)
    _check_shapes(path / MODEL, model.state_dict(), "model")
    _check_shapes(path / EMA_FILE, ema.state_dict(), "EMA")
    tensors = _read_tensors(path / TENSORS)
    try:
        opt_state = _decode(state["optimizer"], tensors)
        sched_state = None if state["scheduler"] is None else _decode(state["scheduler"], tensors)
    except KeyError as err:
        raise _bad(path / TENSORS, f"missing tensor {err}") from None
    _check_optimizer(path / TENSORS, opt_state, optimizer)
    if scheduler is not None and sched_state is None:
        raise ValueError(f"{path / STATE}: holds no scheduler state")
    if restore_rng:
        if rank is None:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if not 0 <= rank < len(state["rng"]):
            raise ValueError(f"{path / STATE}: holds random states of {len(state['rng'])} rank(s), not of rank {rank}")
        _check_generators(state["rng"][rank], generators, path / STATE)

    model.load_state_dict(_read_tensors(path / MODEL))
    ema.load_state_dict(_read_tensors(path / EMA_FILE))
    optimizer.load_state_dict(opt_state)
    if scheduler is not None:
        scheduler.load_state_dict(sched_state)
    if restore_rng:
        set_rng_state(state["rng"][rank], generators)
    return {"step": state["step"], "extra": state["extra"], "config": state["config"], "path": path}


# ---------------------------------------------------------------------------------------------
# run directories


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step-N`` directory, by step."""
    if not run_dir.is_dir():
        return []
    found = [(int(m[1]), p) for p in run_dir.iterdir() if (m := _NAME.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def _complete(path: Path) -> bool:
    try:
        _read_state(path)
        return True
    except ValueError:
        return False


def latest_checkpoint(run_dir) -> Path | None:
    """The checkpoint ``latest`` names if it is complete, else the complete one of the highest step, else None."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        if _NAME.fullmatch(name) and _complete(run_dir / name):
            return run_dir / name
    for _, p in reversed(_checkpoints(run_dir)):
        if _complete(p):
            return p
    return None


def keep_last(run_dir, n: int) -> list[Path]:
    """Delete all checkpoints but the ``n`` of the highest steps and the latest one (never deleted), and
    the leftovers of killed saves older than the latest. Returns what was deleted."""
    if n < 1:
        raise ValueError(f"keep_last needs n >= 1, got {n}")
    run_dir = Path(run_dir)
    latest = latest_checkpoint(run_dir)
    ckpts = _checkpoints(run_dir)
    keep = {p for _, p in ckpts[-n:]} | {latest}
    removed = [p for _, p in ckpts if p not in keep]
    if latest is not None:
        latest_step = int(_NAME.fullmatch(latest.name)[1])
        removed += [p for p in run_dir.iterdir()
                    if (m := _LEFTOVER.fullmatch(p.name)) and int(m[1]) < latest_step and p.is_dir()]
    for p in removed:
        shutil.rmtree(p)
    return removed


def export_ema(path, ema: EMA | Mapping[str, torch.Tensor], meta: Mapping | None = None) -> Path:
    """Write the EMA weights alone (the model's ``state_dict`` names) as ``path`` (.safetensors) with
    ``meta`` in its JSON sidecar and in the file's metadata (:mod:`mmfm.io`), for sampling.
    The sidecar is written first, the tensors last, so the ``.safetensors`` means the pair is complete."""
    path = Path(path)
    tensors = ema.state_dict() if isinstance(ema, EMA) else ema
    meta = dict(meta or {})
    with io.sidecar_first(path, meta):  # an error leaves a previous pair as it was
        _write_tensors(path, tensors, meta)
    return path
