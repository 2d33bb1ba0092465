"""The CLS-GMM stage: read the descriptors, check them, initialize, run EM, write the files.

``fit_cls_gmm("results/shards", k=8192, out="results/gmm/cls.safetensors")`` writes

- ``cls.safetensors`` (weights, means, variances; float64) and ``cls.json`` (settings, the
  log-likelihood per iteration, backend, timings, data fingerprint),
- ``cls_weights.png``: the sorted weights and their histogram.

Nothing is written unless the fit succeeds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from mmfm.data import shards
from mmfm.gmm import data as gdata
from mmfm.gmm import files
from mmfm.gmm.em import EMResult, fit_em
from mmfm.gmm.init import METHODS, initialize


def open_input(spec, column: str = "cls", stream: bool = False, rows: str = "all"):
    """A ``.npy`` array (memory-mapped) or the ``column`` of Parquet shards (file, folder or glob).

    Parquet input is loaded into memory unless ``stream``; a ``.npy`` is read through its memory map.
    ``rows="originals"`` takes only the shards' rows whose ``flip`` is false (not the stored mirrors);
    a ``.npy`` has no such column and is refused then.
    """
    if rows not in shards.ROW_SETS:
        raise ValueError(f"rows: expected one of {list(shards.ROW_SETS)}, got {rows!r} (gmm.rows in the workflow)")
    p = Path(str(spec))
    if p.suffix == ".npy":
        if rows != "all":
            raise ValueError(f"rows: {rows!r} needs Parquet shards (their 'flip' column tells the stored mirrors "
                             f"from the originals); {p} is a .npy array: give it the rows to fit and rows 'all'")
        if not p.is_file():
            raise ValueError(f"input: {p}: no such file")
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"input: {p}: {err}") from None
        return gdata.ArrayRows(arr, name=str(p))
    source = gdata.ParquetRows(spec, column=column, rows=rows)
    if stream:
        return source
    chunks = [x for _, x in source.chunks(checked=True)]  # a NaN named by shard and row
    if not chunks:
        raise ValueError(f"input: {spec}: the shards hold no {'original ' if rows == 'originals' else ''}rows")
    return gdata.ArrayRows(np.concatenate(chunks) if len(chunks) > 1 else chunks[0], name=str(spec))


def fit_cls_gmm(
    input,
    k: int,
    out,
    *,
    init: str = "k-means++",
    max_iter: int = 100,
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    init_sample: int | None = None,
    kmeans_iter: int = 10,
    column: str = "cls",
    rows: str = "all",
    stream: bool = False,
    plot: bool = True,
    progress: bool = True,
) -> tuple[EMResult, dict]:
    """Fit the diagonal CLS mixture and write it (see the module doc). Returns the result and sidecar.

    ``rows``: ``"all"`` rows of the shards, or ``"originals"`` only, leaving out the horizontal mirrors
    that ``shards.flip`` stores (``flip`` column true): the release fitted on the images alone, with no
    flip (docs/method.md §3.2). With stored mirrors, ``"all"`` fits on 2N rows of which N are mirrors."""
    if init not in METHODS:
        raise ValueError(f"init: expected one of {list(METHODS)}, got {init!r}")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"out: expected a .safetensors path, got {out}")
    source = open_input(input, column=column, stream=stream, rows=rows)
    t0 = time.perf_counter()
    summary = gdata.summarize(source, progress=progress)
    t_check = time.perf_counter() - t0
    start = initialize(source, k, init, seed=seed, reg_covar=reg_covar, init_sample=init_sample,
                       kmeans_iter=kmeans_iter, dtype=dtype, device=device, summary=summary, progress=progress)
    t_init = time.perf_counter() - t0 - t_check
    result = fit_em(source, start, max_iter=max_iter, tol=tol, reg_covar=reg_covar, dtype=dtype, device=device,
                    summary=summary, progress=progress)
    sidecar = {
        "settings": {"k": k, "init": init, "max_iter": max_iter, "tol": tol, "reg_covar": reg_covar, "seed": seed,
                     "device": device, "dtype": dtype, "init_sample": init_sample, "kmeans_iter": kmeans_iter,
                     "column": column, "rows": rows, "stream": stream},
        "input": str(input),
        "data": summary.as_dict(),
        "fit": result.report(),
        "seconds": {"check": t_check, "init": t_init, "em": result.seconds,
                    "score": time.perf_counter() - t0 - t_check - t_init - result.seconds},
        "weights_plot": _plot_path(out).name if plot else None,
        "host": os.uname().nodename,
    }
    if plot:
        files.plot_weights(result.gmm.weights, _plot_path(out), title=f"CLS GMM {out.stem}")
    files.save_cls_gmm(out, result.gmm, sidecar)
    return result, sidecar


def _plot_path(out: Path) -> Path:
    return out.with_name(out.stem + "_weights.png")
