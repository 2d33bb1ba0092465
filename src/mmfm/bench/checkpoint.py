"""``mmfm bench checkpoint``: how long the stop-signal checkpoint of a DiTDH preset takes to write and read.

Sizes SLURM's ``--signal=TERM@<lead>``: on the signal the loop finishes its step and rank 0 calls
:func:`mmfm.train.checkpoint.save_checkpoint`; the lead time must cover that write.

What is measured, all in one call and on one file system:

1. The training state the loop holds (:func:`build_training_state`): the preset's model built as
   :func:`mmfm.train.loop.build_model` builds it (after ``torch.manual_seed(seed)``, on the CPU), AdamW with
   the :class:`~mmfm.train.config.TrainConfig` defaults, ``LambdaLR`` with its LR schedule, the
   :class:`~mmfm.train.ema.EMA`, the loop's ``"train"`` generator. AdamW gets its state without a forward
   pass: every trainable parameter gets a random gradient (``N(0, 1e-6)``, so that the moments are not
   zeros that a compressing file system would shrink) and one ``optimizer.step()``, one group of
   parameters at a time so that no more than ~256 MB of gradients exist at once; then ``scheduler.step()``
   and ``ema.update(model, 0)``, as after the loop's first step. The checkpoint then holds exactly the
   tensors a real one holds (frozen parameters have no AdamW state, as in the loop).
2. ``checkpoint_write_s``: the loop's ``checkpoint()`` on one rank: :func:`get_rng_state` of the generators,
   then ``save_checkpoint(run_dir, step=1, model, ema, optimizer, scheduler, extra, config, rng)`` (the
   ``extra`` a stand-in for the stream's small JSON state), then ``keep_last`` (nothing to delete here).
   This includes everything ``save_checkpoint`` does: the memory-mapped safetensors writes, the fsync of
   every file and directory, the renames and the ``latest`` pointer. ``checkpoint_bytes``: the sum of the
   sizes of every file it wrote (``files``: per file, with its tensor count).
3. The anchor, ``raw_write_s``: the same number of bytes written as one plain file, ``os.write`` of a
   preallocated 64 MiB random buffer over and over, then one ``fsync``. ``write_over_raw =
   checkpoint_write_s / raw_write_s``. Before each write the page cache of the other's files is dropped
   (``posix_fadvise(DONTNEED)``), so neither starts with the other's dirty pages.
4. ``checkpoint_read_s``: ``load_checkpoint`` into fresh objects (model, EMA, AdamW, LambdaLR built as a
   resume builds them, not timed), the page cache of the checkpoint dropped first (a cold read, as on a
   fresh node; a host-side cache below a virtual machine is out of reach). The originals are freed first
   (the XL state does not fit twice in 24 GiB); ``read_back_identical`` compares CRC-32s of every model,
   EMA and optimizer tensor taken before the save with those after the load.
5. ``lead_seconds_recommended = ceil(2 * checkpoint_write_s + 60)``: twice the measured write, for a
   slower or busier shared file system, plus a minute for the step in flight when the signal comes.
6. ``checkpoint_delete_s``: removing the checkpoint (what ``keep_last`` pays for the oldest one in a
   real run, where it deletes one on every save); ``None`` with ``keep``.

Everything goes into a fresh ``mmfm-bench-checkpoint-*`` folder made under ``out_dir`` (default: the
current directory, usually the file system the runs write to; ``TMPDIR`` is avoided because it is often
a RAM disk on compute nodes), removed at the end unless ``keep``. Sizes are in decimal GB (1e9 bytes).

Memory: ``peak_rss_gb`` is the process's lifetime peak (``ru_maxrss``); it counts the pages of the memory
maps the safetensors files are written and read through, which the kernel can drop.
``peak_anon_gb`` (sampled every 20 ms from ``/proc/self/status``, Linux) is the memory that cannot be
dropped: about 16 bytes per parameter (model, EMA, two moments) plus a model's worth while loading.

On a GPU the loop's save also copies each tensor to the host (``.cpu()``, one at a time); this CPU
measurement leaves that copy out (a few GB/s or more, small beside the write).
"""

from __future__ import annotations

import gc
import math
import os
import resource
import shutil
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from mmfm import io
from mmfm.models.ditdh import build_ditdh, count_parameters
from mmfm.train.checkpoint import get_rng_state, keep_last, load_checkpoint, save_checkpoint, set_rng_state
from mmfm.train.config import TrainConfig
from mmfm.train.ema import EMA

GB = 1e9
LEAD_FORMULA = "ceil(2 * checkpoint_write_s + 60)"
RAW_CHUNK = 64 << 20
GRAD_CHUNK = 64 << 20  # elements (256 MB of fp32) of gradients alive at once
STEP = 1


# ------------------------------------------------------------------------------------------------ state


def build_training_state(preset: str = "ditdh-xl", in_channels: int = 768, num_tokens: int = 256,
                         seed: int = 0, *, step: bool = True) -> dict:
    """The objects the training loop checkpoints: ``{"config" (TrainConfig), "model", "ema", "optimizer",
    "scheduler", "generators"}``, built as :func:`mmfm.train.loop.train` builds them (unconditional; the
    label table of a conditioned run adds ``num_labels * hidden_size`` parameters, < 0.2 % at XL).

    ``step``: give AdamW its state (random gradients, one ``optimizer.step()``, ``scheduler.step()``,
    ``ema.update``); false: fresh objects, as a resume builds them before ``load_checkpoint``.
    Deterministic in ``seed``.
    """
    from mmfm.train.loop import build_model, derived_seed
    from mmfm.train.step import make_optimizer

    cfg = TrainConfig(model=preset, seed=seed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, num_tokens, in_channels, 0)
    model.train()
    optimizer = make_optimizer(model.parameters(), cfg)  # the loop's (fused) AdamW
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.lr_schedule().factor)
    ema = EMA(model, cfg.ema_schedule())
    generators = {"train": torch.Generator().manual_seed(derived_seed(cfg.seed))}
    if step:
        g = torch.Generator().manual_seed(derived_seed(cfg.seed, 1))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer.zero_grad(set_to_none=True)
        i = 0
        while i < len(params):  # AdamW steps only the parameters that have a gradient: a chunk at a time
            group, n = [], 0
            while i < len(params) and (not group or n + params[i].numel() <= GRAD_CHUNK):
                group.append(params[i])
                n += params[i].numel()
                i += 1
            for p in group:
                p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype).mul_(1e-3)
            optimizer.step()
            for p in group:
                p.grad = None
        scheduler.step()
        ema.update(model, 0)
    return {"config": cfg, "model": model, "ema": ema, "optimizer": optimizer, "scheduler": scheduler,
            "generators": generators}


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _fingerprint(state: dict) -> dict:
    """CRC-32 of every model, EMA and optimizer-state tensor, and the scheduler's state, by name."""
    out = {f"model.{k}": _crc(v) for k, v in state["model"].state_dict().items()}
    out.update({f"ema.{k}": _crc(v) for k, v in state["ema"].state_dict().items()})
    opt = state["optimizer"].state_dict()
    for i, entry in opt["state"].items():
        for k, v in entry.items():
            out[f"optimizer.{i}.{k}"] = _crc(v) if isinstance(v, torch.Tensor) else v
    out["optimizer.param_groups"] = repr([{k: v for k, v in g.items()} for g in opt["param_groups"]])
    out["scheduler"] = repr({k: v for k, v in state["scheduler"].state_dict().items() if k != "lr_lambdas"})
    return out


# ------------------------------------------------------------------------------------------------ system


class _MemorySampler:
    """Peak ``VmRSS`` and ``RssAnon`` of this process (``/proc/self/status``, every 20 ms) while running."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_rss, self.peak_anon = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.available = os.path.exists("/proc/self/status")

    def _sample(self) -> None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(("VmRSS:", "RssAnon:")):
                        kb = int(line.split()[1]) * 1024
                        if line.startswith("VmRSS:"):
                            self.peak_rss = max(self.peak_rss, kb)
                        else:
                            self.peak_anon = max(self.peak_anon, kb)
        except OSError:
            self.available = False

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "_MemorySampler":
        if self.available:
            self._sample()
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.available:
            self._stop.set()
            self._thread.join()
            self._sample()


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def filesystem_of(path) -> dict:
    """``{"path", "mount", "type", "device"}`` of the file system holding ``path`` (``/proc/mounts``)."""
    path = Path(path).resolve()
    mount, fstype, device = None, None, None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, typ = line.split()[:3]
                mnt = mnt.replace("\\040", " ")
                if (path == Path(mnt) or Path(mnt) in path.parents) and (mount is None or len(mnt) >= len(mount)):
                    mount, fstype, device = mnt, typ, dev
    except OSError:
        pass
    return {"path": str(path), "mount": mount, "type": fstype, "device": device}


def _drop_cache(path: Path) -> bool:
    """Ask the kernel to drop ``path``'s clean pages from the page cache; False where it cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def raw_write(path, nbytes: int, seed: int = 0, chunk: int = RAW_CHUNK) -> float:
    """Write ``nbytes`` to a new file ``path`` as ``os.write`` calls of one preallocated random buffer, then
    ``fsync``; returns the seconds (open to close)."""
    buf = memoryview(np.random.default_rng(seed).bytes(min(chunk, max(nbytes, 1))))
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left:
            left -= os.write(fd, buf[:min(left, len(buf))])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ the bench


def bench_checkpoint(preset: str = "ditdh-xl", out_dir=None, in_channels: int = 768, num_tokens: int = 256,
                     seed: int = 0, keep: bool = False) -> dict:
    """Run the measurement (module docstring); returns the JSON object ``mmfm bench checkpoint`` prints.

    ``out_dir``: the folder (created if missing) on whose file system to measure; a fresh
    ``mmfm-bench-checkpoint-*`` folder is made in it (default: in the current directory). ``keep``: leave
    the checkpoint (``run_dir``) and the anchor's file (``raw_file``) there instead of removing them.
    The caller's random states (Python, numpy, torch) are put back at the end.
    """
    base = Path(out_dir) if out_dir is not None else Path.cwd()
    base.mkdir(parents=True, exist_ok=True)
    rng_before = get_rng_state()
    with torch.device("meta"):  # parameters without memory, for the checks before anything is allocated
        meta_model = build_ditdh(preset, in_channels=in_channels, num_tokens=num_tokens)
    trainable = sum(p.numel() for p in meta_model.parameters() if p.requires_grad)
    state_nbytes = sum(t.numel() * t.element_size() for t in meta_model.state_dict().values()) * 2 + trainable * 8
    del meta_model
    need_disk = 2 * state_nbytes + (1 << 30)  # checkpoint and anchor side by side, and a margin
    free_disk = shutil.disk_usage(base).free
    if free_disk < need_disk:
        raise OSError(f"{base}: {free_disk / GB:.1f} GB free, the {preset} bench needs about {need_disk / GB:.1f} GB "
                      "(the checkpoint and an anchor file of the same size); choose another out_dir")
    available = _meminfo("MemAvailable")
    need_mem = state_nbytes + state_nbytes // 4 + (1 << 30)  # the state, a model's worth while loading, a margin
    if available is not None and available < need_mem:
        raise MemoryError(f"{preset}: the training state takes about {state_nbytes / GB:.1f} GB and loading it back "
                          f"about {need_mem / GB:.1f} GB in all, {available / GB:.1f} GB are available; "
                          "measure a smaller preset and scale by checkpoint_bytes")

    work = Path(tempfile.mkdtemp(prefix="mmfm-bench-checkpoint-", dir=base))
    run_dir, raw_file = work / "run", work / "raw-write.bin"
    try:
        with _MemorySampler() as memory:
            t0 = time.perf_counter()
            state = build_training_state(preset, in_channels, num_tokens, seed)
            build_s = time.perf_counter() - t0
            cfg = state["config"]
            parameters = count_parameters(state["model"])
            expected = _fingerprint(state)
            gc.collect()

            # ---- the checkpoint, as the loop's checkpoint() on rank 0
            extra = {"stream": {"epoch": 0, "batches": STEP, "seed": cfg.seed, "world_size": 1,
                                "batch_size": cfg.global_batch, "shuffle": cfg.shuffle, "buffer_rows": cfg.buffer_rows,
                                "drop_last": True, "shards": []}}
            t0 = time.perf_counter()
            rngs = [get_rng_state(state["generators"])]
            ckpt = save_checkpoint(run_dir, step=STEP, model=state["model"], ema=state["ema"],
                                   optimizer=state["optimizer"], scheduler=state["scheduler"], extra=extra,
                                   config=cfg.to_dict(), rng=rngs)
            keep_last(run_dir, cfg.keep_last)
            write_s = time.perf_counter() - t0

            written = _files(run_dir)
            files = {}
            for name, p in written.items():
                files[name] = {"bytes": p.stat().st_size}
                if p.suffix == ".safetensors":
                    files[name]["tensors"] = len(io.read_header(p)[0])
            nbytes = sum(f["bytes"] for f in files.values())
            dropped = all([_drop_cache(p) for p in written.values()])

            # ---- the anchor: the same bytes as one plain file
            raw_s = raw_write(raw_file, nbytes, seed)
            raw_bytes = raw_file.stat().st_size
            dropped = _drop_cache(raw_file) and dropped
            if not keep:
                raw_file.unlink()

            # ---- the read back, into fresh objects (the originals freed: the XL state fits once)
            del state
            gc.collect()
            fresh = build_training_state(preset, in_channels, num_tokens, seed + 1, step=False)
            gc.collect()
            t0 = time.perf_counter()
            info = load_checkpoint(ckpt, model=fresh["model"], ema=fresh["ema"], optimizer=fresh["optimizer"],
                                   scheduler=fresh["scheduler"], generators=fresh["generators"], rank=0)
            read_s = time.perf_counter() - t0
            identical = _fingerprint(fresh) == expected and info["step"] == STEP
            del fresh
            gc.collect()

        delete_s = None
        if not keep:
            t0 = time.perf_counter()
            shutil.rmtree(run_dir)
            delete_s = time.perf_counter() - t0
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        set_rng_state(rng_before)

    tensors = sum(f.get("tensors", 0) for f in files.values())
    return {
        "preset": preset, "latent": [num_tokens, in_channels], "parameters": parameters,
        "trainable_parameters": trainable, "seed": seed, "step": STEP,
        "filesystem": filesystem_of(work), "work_dir": str(work), "run_dir": str(run_dir),
        "checkpoint_dir": str(ckpt), "raw_file": str(raw_file), "kept": bool(keep),
        "checkpoint_tensors": tensors, "checkpoint_bytes": nbytes, "checkpoint_gb": nbytes / GB,
        "state_tensor_bytes": state_nbytes, "files": files,
        "build_s": build_s,
        "checkpoint_write_s": write_s, "checkpoint_write_gb_per_s": nbytes / GB / write_s,
        "raw_write_bytes": raw_bytes, "raw_write_s": raw_s, "raw_write_gb_per_s": raw_bytes / GB / raw_s,
        "write_over_raw": write_s / raw_s,
        "checkpoint_read_s": read_s, "checkpoint_read_gb_per_s": nbytes / GB / read_s,
        "read_cold": dropped, "read_back_identical": identical,
        "checkpoint_delete_s": delete_s,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB,
        "peak_rss_sampled_gb": memory.peak_rss / GB if memory.available else None,
        "peak_anon_gb": memory.peak_anon / GB if memory.available else None,
        "memory_total_gb": (_meminfo("MemTotal") or 0) / GB or None,
        "threads": torch.get_num_threads(),
        "lead_seconds_recommended": math.ceil(2 * write_s + 60), "lead_formula": LEAD_FORMULA,
    }
