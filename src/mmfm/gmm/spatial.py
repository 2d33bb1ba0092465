"""Per-mode spatial statistics as map-reduce (method.md §3.3, with its 2 TB of temporary files gone).

**Map** (:func:`spatial_stats`, one job per shard or group of shards): every row's mode is the hard
CLS assignment ``k_i = argmax_k p(k | cls_i)``; the row's token grid ``x_i`` (``N x D``) is added to
float64 sums of the modes the shards touch::

    n_k = #{i : k_i = k},   S_k = sum_{i: k_i = k} x_i  (N, D),   Q_k = sum ||x_i||^2  or  sum x_i^2 (N, D)

With ``flip``, each row also contributes its latent grid mirrored along the width (the released
``_flip``: the latent is flipped, the image is not re-encoded); ``x_i + flip(x_i)`` is formed first,
which is exactly mirror-symmetric, so every mean is too. A partial file stores only touched modes:
``modes (M)``, ``counts (M)``, ``sum (M, N, D)``, ``sumsq (M)`` or ``(M, N, D)``, plus the CLS weights.

**Reduce** (:func:`spatial_reduce`): partials are summed in a canonical order (sorted by the shards
they cover, so the command-line order does not change a bit), in blocks of modes so memory is
bounded by the block accumulators, straight into the memory-mapped output::

    mu_k = S_k / n_k,   sigma_k^2 = (Q_k / n_k - ||mu_k||^2) / (N D)   (spherical, population, as released)
                        sigma_k^2 = Q_k / n_k - mu_k^2                  (diag)

Modes no row was assigned to get the global mean and variance and are counted in the metadata;
variances are floored at ``min_variance`` (a mode holding one unflipped row has none), also counted. The
weights are the CLS mixture's EM weights (as released) or the empirical counts.
Accumulation runs on the CPU in float64 (deterministic order); only the CLS assignment may use a GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmfm import io
from mmfm.data import shards
from mmfm.gmm import files
from mmfm.gmm.posterior import hard_labels

PARTIAL_KIND = "spatial-partial"
COVARIANCES = ("spherical", "diag")
# partials must agree on these to be summed
_MUST_MATCH = ("encoder", "revision", "k", "grid", "token_dim", "flip", "covariance", "cls_gmm")


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
    device: str = "cpu",
    progress: bool = False,
) -> dict:
    """Write the partial sums of the shards ``shard_spec`` (file, folder, glob or list) to ``out``."""
    from tqdm.auto import tqdm

    if covariance not in COVARIANCES:
        raise ValueError(f"covariance: expected one of {list(COVARIANCES)}, got {covariance!r}")
    paths = shards.resolve(shard_spec)
    layout = _shard_layout(paths)
    h, w = layout["grid"]
    d = layout["token_dim"]
    nd = h * w * d
    source = files.load_source(cls_gmm_path, device=device, dtype=torch.float64)

    # pass 1: hard CLS assignment of every row
    labels = []
    for p in paths:
        for batch in shards.iter_columns(p, ["cls"], rows=4096):
            labels.append(hard_labels(source, batch["cls"], what=f"{p}: column 'cls'"))
    labels = torch.cat(labels)
    modes, pos = torch.unique(labels, sorted=True, return_inverse=True)
    m = len(modes)
    acc = torch.zeros((m, nd), dtype=torch.float64)
    acc_sq = torch.zeros((m, nd) if covariance == "diag" else (m,), dtype=torch.float64)
    per_row = 2 if flip else 1

    # pass 2: token sums, in row order
    start = 0
    total = sum(shards.num_rows(p) for p in paths)
    bar = tqdm(total=total, desc="spatial stats", unit="row", disable=not progress)
    for p in paths:
        for batch in shards.iter_columns(p, ["tokens"], rows=rows):
            tokens = batch["tokens"]
            if tokens.shape[1] != nd:
                raise ValueError(f"{p}: tokens have {tokens.shape[1]} values per row, expected {h}x{w}x{d} = {nd}")
            x = torch.from_numpy(tokens.astype(np.float64))
            idx = pos[start:start + len(x)]
            if flip:
                mirror = x.view(-1, h, w, d).flip(2).reshape(len(x), nd)
                acc.index_add_(0, idx, x + mirror)
                if covariance == "diag":
                    acc_sq.index_add_(0, idx, x * x + mirror * mirror)
                else:
                    acc_sq.index_add_(0, idx, 2.0 * (x * x).sum(1))
            else:
                acc.index_add_(0, idx, x)
                acc_sq.index_add_(0, idx, x * x if covariance == "diag" else (x * x).sum(1))
            start += len(x)
            bar.update(len(x))
    bar.close()
    counts = torch.bincount(pos, minlength=m).to(torch.int64) * per_row

    meta = {
        "kind": PARTIAL_KIND, **layout, "k": source.num_modes, "flip": flip, "covariance": covariance,
        "cls_gmm": files.fingerprint(cls_gmm_path), "shards": [p.name for p in paths], "rows": int(start),
        "modes_touched": m,
    }
    io.save_tensors(out, {
        "modes": modes.numpy(), "counts": counts.numpy(),
        "sum": acc.view(m, h * w, d).numpy(),
        "sumsq": (acc_sq.view(m, h * w, d) if covariance == "diag" else acc_sq).numpy(),
        "cls_weights": source.weights.double().cpu().numpy(),
    }, meta)
    return meta


def _check_partials(paths: list[Path]) -> list[tuple[Path, dict]]:
    """Read every partial's metadata; refuse mixes of encoders, K, grids, flips, CLS mixtures."""
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
            if meta.get(key) != ref.get(key):
                raise ValueError(f"{p}: {key} is {meta.get(key)!r} but {ref_path} has {ref.get(key)!r}; "
                                 "partials of different runs cannot be summed")
        for s in meta["shards"]:
            if s in seen:
                raise ValueError(f"{p}: shard {s} was already counted in {seen[s]}")
            seen[s] = p
    return sorted(metas, key=lambda pm: (sorted(pm[1]["shards"]), pm[0].name))


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
    from tqdm.auto import tqdm

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
        "flip": ref["flip"], "encoder": ref["encoder"], "revision": ref["revision"], "cls_gmm": ref["cls_gmm"],
        "weights_from": weights, "rows": sum(m["rows"] for _, m in metas), "samples": total,
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
        for lo in tqdm(range(0, k, block), desc="spatial reduce", unit="block", disable=not progress):
            hi = min(k, lo + block)
            s = np.zeros((hi - lo, nd))
            q = np.zeros((hi - lo, nd) if cov == "diag" else (hi - lo,))
            for t, modes in zip(opened, modes_of):
                a, b = np.searchsorted(modes, [lo, hi])
                if b > a:
                    idx = modes[a:b] - lo  # distinct within a partial
                    s[idx] += np.asarray(t["sum"][a:b]).reshape(b - a, nd)
                    q[idx] += np.asarray(t["sumsq"][a:b]).reshape((b - a, nd) if cov == "diag" else (b - a,))
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
