"""Per-mode spatial statistics as map-reduce (docs/method.md §3.3).

**Map** (:func:`spatial_stats`, one job per *group* of shards): ``spatial.groups`` contiguous ranges
of the shards (:func:`mmfm.config.shard_groups`; the default, one group per shard, is one job per shard). Every
row's mode is the hard CLS assignment ``k_i = argmax_k p(k | cls_i)``; the row's token grid ``x_i``
(``N x D``) is added to float64 sums of the modes its group touches::

    n_k = #{i : k_i = k},   S_k = sum_{i: k_i = k} x_i  (N, D),   Q_k = sum ||x_i||^2  or  sum x_i^2 (N, D)

A group's shards are read in the order of their names and rows in file order, so a partial does not
depend on the order its shards are given in; shard names must be distinct (the reduce tells shards
apart by name). With ``flip``, each row also contributes its latent grid mirrored along the width
(the released ``_flip``: the latent is flipped, the image is not re-encoded); ``x_i + flip(x_i)`` is
formed first, which is exactly mirror-symmetric, so every mean is too.

**Which rows** (``rows_from``): ``"all"`` counts every row of the shards, so with stored mirrors
(``shards.flip``) each mirror row is one more sample, in the mode of *its own* CLS descriptor.
``"originals"`` skips the stored mirrors (``flip`` column true; :func:`mmfm.data.shards.iter_columns`
filters on that column) and, with ``flip``, adds each original's latent flip into the original's
mode: the release's statistics (docs/method.md §3.3), which encoded the images without mirrors. For
original rows ``i`` with hard assignment ``r_ik`` (1 if ``k_i = k``, else 0) and ``flip``::

    n_k = 2 sum_i r_ik,   S_k = sum_i r_ik (x_i + flip(x_i)),   Q_k = sum_i r_ik (||x_i||^2 + ||flip(x_i)||^2)

A partial file stores only
touched modes: ``modes (M)``, ``counts (M)``, ``sum (M, N, D)``, ``sumsq (M)`` or ``(M, N, D)``, plus
the CLS weights ``(K)``, all 8-byte (float64 / int64).

**Size of a partial** (:func:`partial_bytes`), ``M`` modes touched, ``[diag]`` = 1 for diagonal
covariances, else 0::

    bytes = 8 + H + 8 (2 M + K) + 8 M N D (1 + [diag]) + 8 M (1 - [diag])

``H`` is the safetensors JSON header padded to 8 bytes: the tensor table (~0.4 kB) and the metadata
(~0.4 kB plus ~24 bytes per shard name). A group of many shards touches nearly every mode (``M ~ K``),
so the partials of G groups total ``~ G * 8 K N D (1 + [diag])`` bytes: that, not the number of
shards, is what the temporary files cost. The ImageNet presets (K = 8192, 16 x 16 x 768 tokens,
spherical, G = 8 groups of 32 shards) write 8 x 12.89 GB = 103 GB; one partial per shard (256 shards
of ~10k rows, ~5.8k modes each) would be 2.3 TB.

**Memory of a map job** (:func:`map_memory_bytes`): one partial's accumulators, ``8 M N D (1 + [diag])``
bytes, held in blocks of modes that are written out and freed one by one (the file never doubles
them), plus a batch of ``rows`` shard rows: their token grids in the shard's dtype and ``R`` of them in
float64 (3 copies, 4 with ``flip``, 5 with ``flip`` and ``diag``), ``R = rows``, or with
``rows_from="originals"`` on shards that store mirrors ``R = ceil(rows / 2)`` plus the filtered copy
of those ``R`` in the shard's dtype; and ~1 GB of interpreter and CLS mixture. For the presets above
(``rows_from="originals"``, ``flip``, float16 shards of mirrors) that is 14.8 GB (15.2 GB counting
every row without ``flip``); set their ``resources.spatial_stats.mem_mb`` from it. The estimate is
within 3% of the peak RSS measured. The rows a group holds (originals or all) change only which modes
are touched, so :func:`partial_bytes` is the same formula in ``M``.

**Reduce** (:func:`spatial_reduce`): partials are summed in a canonical order (sorted by the shards
they cover, so the order they are given in does not change a bit), in blocks of modes so memory is
bounded by the block accumulators, straight into the memory-mapped output::

    mu_k = S_k / n_k,   sigma_k^2 = (Q_k / n_k - ||mu_k||^2) / (N D)   (spherical, population, as released)
                        sigma_k^2 = Q_k / n_k - mu_k^2                  (diag)

**Non-finite values** are refused where they would enter a sum: a shard row whose CLS descriptor or token
grid holds NaN or Inf stops the map job with the shard file and the row's index in it
(:func:`mmfm.data.stream.refuse_non_finite`), and a partial whose sums are not finite stops the reduce with
the partial file and the mode, so no NaN mean is ever written.

A shard counted in two partials is refused, and so are partials of different encoders, ``K``, grids,
``flip``, ``rows_from``, covariances or CLS mixtures (:data:`_MUST_MATCH`; a partial written before
``rows_from`` existed counted every row). Modes no row was assigned to get the global mean and
variance and are counted in the metadata; variances are floored at ``min_variance`` (a mode holding
one unflipped row has none), also counted. The weights are the CLS mixture's EM weights (as released)
or the empirical counts. Accumulation runs on the CPU in float64 (deterministic order); only the CLS
assignment may use a GPU. Different groupings of the same shards agree to float64 rounding, not bit
for bit (the sums associate differently).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from mmfm import io
from mmfm.data import shards
from mmfm.data.stream import all_finite, refuse_non_finite
from mmfm.gmm import files
from mmfm.gmm.posterior import hard_labels
from mmfm.progress import progress as progress_bar

PARTIAL_KIND = "spatial-partial"
COVARIANCES = ("spherical", "diag")
# partials must agree on these to be summed
_MUST_MATCH = ("encoder", "revision", "k", "grid", "token_dim", "flip", "rows_from", "covariance", "cls_gmm")
#: What a key of :data:`_MUST_MATCH` means when a partial lacks it (written before the key existed).
_MISSING = {"rows_from": "all"}
ROWS_FROM = shards.ROW_SETS
#: Bytes :func:`partial_bytes` allows for the metadata when it is not given (a group of ~300 shards).
METADATA_ALLOWANCE = 8192
_LABEL_ROWS = 4096  # rows of one CLS posterior block (pass 1)
#: The interpreter with torch and pyarrow (~0.6 GB) and the CLS mixture (~0.4 GB at K = 8192, 768 wide).
BASE_BYTES = 10**9
_BLOCK_BYTES = 2**28  # bytes of one block of a map job's accumulators (256 MiB)


def _partial_specs(modes: int, num_tokens: int, token_dim: int, covariance: str, k: int) -> dict:
    """The tensors of a partial, in file order: ``name -> (shape, dtype)``."""
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance: expected one of {list(COVARIANCES)}, got {covariance!r}")
    m = int(modes)
    grid = (m, int(num_tokens), int(token_dim))
    return {"modes": ((m,), np.int64), "counts": ((m,), np.int64), "sum": (grid, np.float64),
            "sumsq": (grid if covariance == "diag" else (m,), np.float64), "cls_weights": ((int(k),), np.float64)}


def partial_bytes(modes: int, num_tokens: int, token_dim: int, covariance: str, *, k: int,
                  meta: Mapping | None = None) -> int:
    """Bytes of one partial file touching ``modes`` of ``k`` modes (module doc, "Size of a partial").

    Exact when ``meta`` is the partial's metadata (as :func:`spatial_stats` writes it); without it the
    header counts :data:`METADATA_ALLOWANCE` bytes for the metadata, an upper bound for groups of up
    to ~300 shards (the data, all but ~1-2 kB, is exact either way)."""
    layout = io.TensorFile("-", _partial_specs(modes, num_tokens, token_dim, covariance, k), meta)  # not opened
    return layout.nbytes + (METADATA_ALLOWANCE if meta is None else 0)


def map_memory_bytes(modes: int, num_tokens: int, token_dim: int, covariance: str, *, k: int,
                     rows: int = 256, flip: bool = False, shard_itemsize: int = 2, rows_from: str = "all") -> int:
    """A map job's peak memory (module doc, "Memory of a map job"): the partial's float64 accumulators,
    one batch of ``rows`` shard rows (``shard_itemsize`` bytes a value) of which ``R`` are held as float64
    grids (3 copies, 4 with ``flip``, 5 with ``flip`` and ``diag``) or, in the first pass, a ``4096 x k``
    CLS posterior block, and :data:`BASE_BYTES`::

        batch = N D (rows * shard_itemsize + R * 8 * copies)                        rows_from = "all", R = rows
        batch = N D (rows * shard_itemsize + R * (8 * copies + shard_itemsize))     "originals", R = ceil(rows / 2)

    ``"originals"`` assumes shards that store a mirror after every image (``shards.flip``): half of each
    batch is kept, in a filtered copy. Within 3% of the peak RSS measured on 967 modes of 16 x 16 x 768
    tokens (``"all"``); the ``"originals"`` batch term within 2% of the anonymous memory measured on float16
    shards of 16 x 16 x 768 tokens with mirrors."""
    if rows_from not in ROWS_FROM:
        raise ValueError(f"rows_from: expected one of {list(ROWS_FROM)}, got {rows_from!r}")
    m, nd = int(modes), int(num_tokens) * int(token_dim)
    diag = covariance == "diag"
    acc = 8 * m * nd * (2 if diag else 1) + (0 if diag else 8 * m)
    copies = 3 + (1 + diag if flip else 0)
    if rows_from == "all":
        batch = nd * (rows * shard_itemsize + rows * 8 * copies)
    else:
        kept = -(-int(rows) // 2)
        batch = nd * (rows * shard_itemsize + kept * (8 * copies + shard_itemsize))
    posterior = 3 * 8 * _LABEL_ROWS * int(k)
    return BASE_BYTES + acc + max(batch, posterior)


def _shard_layout(paths: list[Path]) -> dict:
    """Encoder, grid and widths shared by the shards (an error names the first shard that differs)."""
    first = None
    for p in paths:
        meta = shards.read_metadata(p)
        missing = [k for k in ("grid", "token_dim") if k not in meta]
        if missing:
            raise ValueError(f"{p}: shard metadata lacks {missing}; spatial statistics need the token grid")
        layout = {k: meta.get(k) for k in ("encoder", "revision", "grid", "token_dim")}
        layout["grid"] = [int(g) for g in layout["grid"]]
        if first is None:
            first = (p, layout)
        elif layout != first[1]:
            diff = {k: (first[1][k], layout[k]) for k in layout if layout[k] != first[1][k]}
            raise ValueError(f"{p}: shard layout differs from {first[0]}: {diff}")
    return first[1]


def spatial_stats(
    shard_spec,
    cls_gmm_path,
    out,
    *,
    flip: bool = False,
    covariance: str = "spherical",
    rows: int = 256,
    rows_from: str = "all",
    device: str = "cpu",
    progress: bool = False,
) -> dict:
    """Write the partial sums of the shards ``shard_spec`` (file, folder, glob or list: one group) to ``out``.

    The shards are read in the order of their names, whatever order they are given in, ``rows`` shard
    rows at a time. ``rows_from``: ``"all"`` rows, or ``"originals"`` only (the stored mirrors, ``flip``
    column true, are skipped; with ``flip`` each original also adds its latent flip into its own mode,
    as released). See the module doc."""
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance: expected one of {list(COVARIANCES)}, got {covariance!r}")
    if rows_from not in ROWS_FROM:
        raise ValueError(f"rows_from: expected one of {list(ROWS_FROM)}, got {rows_from!r} "
                         "(spatial.rows_from in the workflow)")
    originals = rows_from == "originals"
    paths = sorted(shards.resolve(shard_spec), key=lambda p: (p.name, str(p)))
    for a, b in itertools.pairwise(paths):
        if a.name == b.name:
            raise ValueError(f"{b}: a shard named {a.name} is already in this group ({a}); partials tell "
                             "shards apart by name")
    layout = _shard_layout(paths)
    h, w = layout["grid"]
    d = layout["token_dim"]
    nd = h * w * d
    source = files.load_source(cls_gmm_path, device=device, dtype=torch.float64)

    # pass 1: hard CLS assignment of every row counted (all, or the originals)
    labels = []
    for p in paths:
        at = 0  # rows of p read so far (of the originals, with rows_from "originals")
        for batch in shards.iter_columns(p, ["cls"], rows=_LABEL_ROWS, originals=originals):
            refuse_non_finite(p, "cls", batch["cls"], at, originals=originals)
            labels.append(hard_labels(source, batch["cls"], rows=_LABEL_ROWS, what=f"{p}: column 'cls'"))
            at += len(batch["cls"])
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    modes, pos = torch.unique(labels, sorted=True, return_inverse=True)
    m = len(modes)
    diag = covariance == "diag"
    # the accumulators, in blocks of modes: each is written out and freed in turn, so the file never
    # doubles the memory (row order within a mode is kept: the sums are those of one (M, N D) array)
    step = max(1, _BLOCK_BYTES // (8 * nd))
    spans = [(lo, min(m, lo + step)) for lo in range(0, m, step)]
    acc = [torch.zeros((hi - lo, nd), dtype=torch.float64) for lo, hi in spans]
    acc_sq = ([torch.zeros((hi - lo, nd), dtype=torch.float64) for lo, hi in spans] if diag
              else torch.zeros(m, dtype=torch.float64))
    per_row = 2 if flip else 1

    # pass 2: token sums, in row order (the same rows as pass 1)
    start = 0
    shard_rows = sum(shards.num_rows(p) for p in paths)
    bar = progress_bar(total=len(labels), desc="spatial stats", unit="row", disable=not progress)
    for p in paths:
        at = 0
        for batch in shards.iter_columns(p, ["tokens"], rows=rows, originals=originals):
            tokens = batch["tokens"]
            if tokens.shape[1] != nd:
                raise ValueError(f"{p}: tokens have {tokens.shape[1]} values per row, expected {h}x{w}x{d} = {nd}")
            refuse_non_finite(p, "tokens", tokens, at, originals=originals)
            n_b = len(tokens)
            at += n_b
            x = torch.from_numpy(np.require(tokens, requirements="W")).to(torch.float64)  # exact
            idx = pos[start:start + n_b]
            if flip:
                mirror = x.view(-1, h, w, d).flip(2).reshape(n_b, nd)
                if diag:
                    sq = x * x
                    sq += mirror * mirror
                else:
                    sq = 2.0 * (x * x).sum(1)
                x = x + mirror
                del mirror
            else:
                sq = x * x if diag else (x * x).sum(1)
            if not diag:
                acc_sq.index_add_(0, idx, sq)
            block = idx // step
            for j in torch.unique(block).tolist():
                rows_j = None if len(spans) == 1 else (block == j).nonzero().squeeze(1)
                local = idx - j * step if rows_j is None else idx[rows_j] - j * step
                acc[j].index_add_(0, local, x if rows_j is None else x.index_select(0, rows_j))
                if diag:
                    acc_sq[j].index_add_(0, local, sq if rows_j is None else sq.index_select(0, rows_j))
            del x, sq
            start += n_b
            bar.update(n_b)
    bar.close()
    if start != len(labels):  # the two passes read the same rows
        raise RuntimeError(f"{paths[0]}: pass 2 read {start} rows, pass 1 assigned {len(labels)}")
    counts = torch.bincount(pos, minlength=m).to(torch.int64) * per_row

    meta = {
        "kind": PARTIAL_KIND, **layout, "k": source.num_modes, "flip": flip, "rows_from": rows_from,
        "covariance": covariance, "cls_gmm": files.fingerprint(cls_gmm_path), "shards": [p.name for p in paths],
        "rows": int(start), "skipped_rows": int(shard_rows - start), "modes_touched": m,
    }
    with io.TensorFile(out, _partial_specs(m, h * w, d, covariance, source.num_modes), meta) as f:
        f["modes"][...] = modes.to(torch.int64).numpy()
        f["counts"][...] = counts.numpy()
        f["cls_weights"][...] = source.weights.double().cpu().numpy()
        out_sum = f["sum"].reshape(m, nd)
        out_sq = f["sumsq"].reshape(m, nd) if diag else f["sumsq"]
        if not diag:
            out_sq[...] = acc_sq.numpy()
        for j, (lo, hi) in enumerate(spans):
            out_sum[lo:hi] = acc[j].numpy()
            acc[j] = None
            if diag:
                out_sq[lo:hi] = acc_sq[j].numpy()
                acc_sq[j] = None
        f.commit()
    return meta


def _check_partials(paths: list[Path]) -> list[tuple[Path, dict]]:
    """Read every partial's metadata; refuse mixes of encoders, K, grids, flips, row sets, CLS mixtures."""
    metas = []
    for p in paths:
        _, meta, _ = io.read_header(p)
        if meta.get("kind") != PARTIAL_KIND:
            raise ValueError(f"{p}: not a spatial-statistics partial (kind {meta.get('kind')!r})")
        metas.append((p, meta))
    ref_path, ref = metas[0]
    seen: dict[str, Path] = {}
    for p, meta in metas:
        for key in _MUST_MATCH:
            mine, theirs = meta.get(key, _MISSING.get(key)), ref.get(key, _MISSING.get(key))
            if mine != theirs:
                raise ValueError(f"{p}: {key} is {mine!r} but {ref_path} has {theirs!r}; "
                                 "partials of different runs cannot be summed")
        for s in meta["shards"]:
            if s in seen:
                raise ValueError(f"{p}: shard {s} was already counted in {seen[s]}")
            seen[s] = p
    return sorted(metas, key=lambda pm: (sorted(pm[1]["shards"]), pm[0].name))


def _refuse_non_finite_sums(path, modes: np.ndarray, sums: np.ndarray, sumsq: np.ndarray) -> None:
    """Raise naming the partial ``path`` and the first mode whose ``sum (M, N D)`` or ``sumsq`` is not finite."""
    if all_finite(sums) and all_finite(sumsq):
        return
    bad = ~np.isfinite(sums).all(1) | ~np.isfinite(sumsq.reshape(len(sumsq), -1)).all(1)
    first = int(np.flatnonzero(bad)[0])
    from mmfm.recover import rebuild_hint

    raise ValueError(f"{path}: mode {int(modes[first])}: the partial's sums are not finite (NaN/Inf; "
                     f"{int(bad.sum())} mode(s) of this block), summed from a non-finite latent (spatial-stats now "
                     f"refuses one, naming its shard and row); {rebuild_hint([path])}")


def spatial_reduce(
    partial_paths,
    out,
    *,
    weights: str = "cls",
    min_variance: float = 1e-8,
    block_modes: int | None = None,
    progress: bool = False,
) -> dict:
    """Sum partial files into the spatial GMM at ``out`` (+ sidecar); returns the sidecar dict."""
    if weights not in ("cls", "counts"):
        raise ValueError(f"weights: expected 'cls' (the CLS mixture's, as released) or 'counts', got {weights!r}")
    paths = shards.resolve(partial_paths, suffix=".safetensors")
    metas = _check_partials(paths)
    ref = metas[0][1]
    k, (h, w), d, cov = ref["k"], ref["grid"], ref["token_dim"], ref["covariance"]
    n_tok, nd = h * w, h * w * d
    block = block_modes or max(1, min(k, 2**27 // nd))  # <= 1 GB per float64 accumulator

    opened = [io.open_tensors(p)[0] for p, _ in metas]
    modes_of = [np.asarray(t["modes"]) for t in opened]
    counts = np.zeros(k, dtype=np.int64)
    for t, modes in zip(opened, modes_of):
        counts[modes] += np.asarray(t["counts"])
    cls_w = np.asarray(opened[0]["cls_weights"], dtype=np.float64)
    total = int(counts.sum())
    if total == 0:
        raise ValueError(f"{paths[0]}: the partials hold no rows")
    empty = counts == 0

    var_shape = (k, n_tok, d) if cov == "diag" else (k,)
    specs = {"weights": ((k,), np.float64), "means": ((k, n_tok, d), np.float32),
             "variances": (var_shape, np.float32), "counts": ((k,), np.int64)}
    sidecar = {
        "kind": files.SPATIAL_KIND, "k": k, "grid": [h, w], "token_dim": d, "covariance": cov,
        "flip": ref["flip"], "rows_from": ref.get("rows_from", _MISSING["rows_from"]), "encoder": ref["encoder"],
        "revision": ref["revision"], "cls_gmm": ref["cls_gmm"], "weights_from": weights,
        "rows": sum(m["rows"] for _, m in metas), "skipped_rows": sum(m.get("skipped_rows", 0) for _, m in metas),
        "samples": total,
        "empty_modes": int(empty.sum()), "min_variance": min_variance, "partials": [p.name for p, _ in metas],
        "shards": sorted(s for _, m in metas for s in m["shards"]),
    }
    g_sum, floored = np.zeros(nd), 0
    g_sq = np.zeros(nd if cov == "diag" else ())
    with io.TensorFile(out, specs, sidecar) as f:
        f["counts"][:] = counts
        f["weights"][:] = cls_w / cls_w.sum() if weights == "cls" else counts / total
        means = f["means"].reshape(k, nd)
        var = f["variances"].reshape(k, nd) if cov == "diag" else f["variances"]
        for lo in progress_bar(range(0, k, block), desc="spatial reduce", unit="block", disable=not progress):
            hi = min(k, lo + block)
            s = np.zeros((hi - lo, nd))
            q = np.zeros((hi - lo, nd) if cov == "diag" else (hi - lo,))
            for (path, _), t, modes in zip(metas, opened, modes_of):
                a, b = np.searchsorted(modes, [lo, hi])
                if b > a:
                    idx = modes[a:b] - lo  # distinct within a partial
                    part_s = np.asarray(t["sum"][a:b]).reshape(b - a, nd)
                    part_q = np.asarray(t["sumsq"][a:b]).reshape((b - a, nd) if cov == "diag" else (b - a,))
                    _refuse_non_finite_sums(path, modes[a:b], part_s, part_q)
                    s[idx] += part_s
                    q[idx] += part_q
            g_sum += s.sum(0)
            g_sq += q.sum(0)
            n = counts[lo:hi].astype(np.float64)
            full = n > 0
            mu = s[full] / n[full, None]
            means[lo:hi][full] = mu
            if cov == "diag":
                v = q[full] / n[full, None] - mu * mu
            else:
                v = (q[full] / n[full] - (mu * mu).sum(1)) / nd
            floored += int((v < min_variance).sum())
            var[lo:hi][full] = np.maximum(v, min_variance)
        g_mu = g_sum / total
        g_var = (g_sq / total - g_mu * g_mu) if cov == "diag" else float(g_sq / total - (g_mu * g_mu).sum()) / nd
        means[empty] = g_mu
        var[empty] = np.maximum(g_var, min_variance)
        sidecar["floored_variances"] = floored
        f.commit()
    io.write_json(io.sidecar_path(out), sidecar)
    return sidecar
