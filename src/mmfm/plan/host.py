"""Peak host memory of each job (per node, what ``mem_mb`` is compared with), from what the job's code holds.

The GPU side of a job is traced (:mod:`mmfm.plan.train_memory`, :mod:`mmfm.plan.inference`); the host side is
summed from the arrays the stage's code keeps alive at its peak, named below per stage, plus
:data:`PROCESS_BYTES` per process (the interpreter with torch, numpy and pyarrow imported) and
:data:`CUDA_HOST_BYTES` more for a process that uses a GPU (the CUDA runtime's host side). Where a formula of
the stage itself exists, it is used: :func:`mmfm.gmm.spatial.map_memory_bytes` for spatial_stats (within 3 %
of the peak RSS measured). Page cache of memory-mapped files is not counted (the kernel drops it).

- encode: the DataLoader's prefetched crops (``workers x 4`` batches of ``S x S x 3`` uint8, or one batch
  without workers) and a pinned copy of one, ``workers x`` :data:`WORKER_BYTES`, the encoder's weights as
  ``from_pretrained`` loads them (fp32, before the move to the GPU), one batch of tokens as float32 and in the
  storage dtype, and the rows pending for the next row group (``row_group_rows`` + one batch);
- fit_cls_gmm: the CLS rows as float32 (twice while the chunks are concatenated; once with ``gmm.stream``) and
  the mixture's float64 statistics;
- spatial_gmm: four float64 blocks of ``block_modes x N D`` (the sums, the selected rows, the means and their
  square);
- train, per rank on the node: the largest of its start-up copies (the spatial GMM means as read from the file,
  before they move to the GPU; the model built in fp32 before it moves; on a resumed attempt, the checkpoint's
  optimizer state and model tensors read back), plus the shard stream's buffer (``buffer_rows + batch + one row
  group`` rows in the shards' dtype);
- sample, per rank: the GMM source (float32 means, drawn from on the host), the network, guide, encoder and
  decoder weights as read before the move (the largest of them), the rank's latents (twice while concatenated)
  and its decoded images (twice); rank 0 also merges every rank's images (three copies of the whole set: the
  parts, their concatenation, the reordering);
- evaluate: ``fid``: the Inception weights, a batch, the 2048-wide float64 statistics (scatter and the
  reference's, a few copies while the distance is computed); ``fd``: the same statistics over ``N D`` features,
  ``8 (N D)^2`` bytes each: a few of them at once.
"""

from __future__ import annotations

import math

import numpy as np

from mmfm import config as mc
from mmfm.plan.geometry import DECODER, Geometry

PROCESS_BYTES = 10**9
CUDA_HOST_BYTES = 10**9
WORKER_BYTES = 5 * 10**8
#: Copies of a D x D float64 matrix alive while a Fréchet distance is computed (scatters of both sides, the
#: update's product and outer terms, sqrtm's work arrays).
FRECHET_COPIES = 6


def _gpu_process(gpus: int) -> int:
    return PROCESS_BYTES + (CUDA_HOST_BYTES if gpus > 0 else 0)


def parameter_counts(geo: Geometry) -> dict[str, int]:
    """Parameters of the encoder, the RAE decoder and pytorch-fid's Inception, counted on their ``meta``-device
    skeletons (:mod:`mmfm.plan.inference`); 0 where the tokenizer has none (``pixels``)."""
    from mmfm.plan.inference import inception_skeleton, tokenizer_skeleton

    tok = tokenizer_skeleton(geo, decoder=True)
    count = lambda m: sum(t.numel() for t in m.state_dict().values())
    return {"encoder": count(tok.model) if tok is not None else 0,
            "decoder": count(tok.decoder) if tok is not None else 0,
            "inception": count(inception_skeleton())}


def encode(config: dict, geo: Geometry, gpus: int, params: dict) -> int:
    sh = config["shards"]
    b, workers = int(sh["batch_size"]), int(sh["workers"])
    reps = 2 if sh["flip"] else 1
    crop = geo.image_size ** 2 * 3
    prefetch = (workers * 4 if workers else 1) * b * crop + (b * crop if gpus else 0)
    row = geo.num_tokens * geo.token_dim
    itemsize = np.dtype(sh["dtype"]).itemsize
    batch = b * reps * row * (4 + itemsize)
    pending = (int(sh["row_group_rows"]) + b * reps) * row * itemsize
    return _gpu_process(gpus) + workers * WORKER_BYTES + prefetch + 4 * params["encoder"] + batch + pending


def fit_cls_gmm(config: dict, geo: Geometry, rows: int, gpus: int) -> int:
    g = config["gmm"]
    k, d = int(g["k"]), geo.cls_dim
    data = rows * d * 4 * (1 if g["stream"] else 2)
    stats = 8 * k * (2 * d + 1) * 4
    return _gpu_process(gpus) + data + stats


def spatial_stats(config: dict, geo: Geometry, counted_rows: int) -> int:
    from mmfm.gmm.spatial import map_memory_bytes

    sp, k = config["spatial"], int(config["gmm"]["k"])
    m = min(k, counted_rows)
    return map_memory_bytes(m, geo.num_tokens, geo.token_dim, sp["covariance"], k=k, rows=int(sp["rows"]),
                            flip=bool(sp["flip"]), shard_itemsize=np.dtype(config["shards"]["dtype"]).itemsize,
                            rows_from=sp["rows_from"])


def spatial_gmm(config: dict, geo: Geometry) -> int:
    k = int(config["gmm"]["k"])
    nd = geo.num_tokens * geo.token_dim
    block = config["spatial"]["block_modes"] or max(1, min(k, 2**27 // nd))
    diag = config["spatial"]["covariance"] == "diag"
    return PROCESS_BYTES + (4 + 2 * diag) * min(block, k) * nd * 8 + 5 * 8 * k


def train(config: dict, run: str, geo: Geometry, *, params: int, micro: int, accumulation: int) -> int:
    """One node of a train job: every rank's share (module doc)."""
    res = mc.resources(config, "train", run)
    ranks = max(1, res["gpus_per_node"])
    s = mc.train_settings(config, run)
    k = int(config["gmm"]["k"])
    source = k * geo.num_tokens * geo.token_dim * 4 if s.get("source") == "gmm" else 0
    cls = 3 * k * geo.cls_dim * 8 if str(s.get("coupling", "")).startswith("mode") else 0
    resume = 12 * params  # AdamW's two moments (read back whole), then the model's and the EMA's tensors
    startup = max(source, 4 * params, resume) + cls
    row = geo.num_tokens * geo.token_dim * np.dtype(config["shards"]["dtype"]).itemsize
    per_rank = micro * accumulation
    buffer = (int(s.get("buffer_rows", 4096)) + per_rank + int(config["shards"]["row_group_rows"])) * row
    return ranks * (_gpu_process(res["gpu"]) + startup + buffer)


def sample(config: dict, run: str, geo: Geometry, *, velocity_params: int, guide_params: int, params: dict) -> int:
    """One node of a sample job (module doc); rank 0's merge counted on the first node."""
    res = mc.resources(config, "sample", run)
    ranks, world = max(1, res["gpus_per_node"]), max(1, res["gpu"])
    s = mc.sample_settings(config, run)
    n = int(s["n"])
    k = int(config["gmm"]["k"])
    source = k * geo.num_tokens * geo.token_dim * 4 if mc.uses_gmm(config, run) else 0
    loads = 4 * max(velocity_params, guide_params, params["encoder"], params["decoder"])
    share = math.ceil(n / world)
    side = geo.image_size if geo.name == "pixels" else geo.grid[0] * DECODER["patch_size"]
    latents = share * geo.num_tokens * geo.token_dim * 4
    images = share * side * side * 3
    per_rank = _gpu_process(res["gpu"]) + source + max(loads, 2 * latents, latents + 2 * images)
    merge = 3 * n * side * side * 3 if world > 1 else 0
    return ranks * per_rank + merge


def evaluate(config: dict, geo: Geometry, gpus: int, params: dict) -> int:
    ev = config["eval"]
    b = int(ev["batch_size"])
    side = geo.image_size if geo.name == "pixels" else geo.grid[0] * DECODER["patch_size"]
    batch = b * side * side * 3 * 5  # uint8 read + float32 copy
    if ev["metric"] == "fid":
        dim, weights = 2048, 4 * params["inception"]
    else:
        dim, weights = geo.num_tokens * geo.token_dim, 4 * params["encoder"]
        batch += min(int(ev["rows"]), 1024) * dim * 8  # reference rows, float64
    return _gpu_process(gpus) + weights + batch + FRECHET_COPIES * dim * dim * 8


def small(rule: str) -> int:
    """export_digits, toy_r10, report: one process and small arrays."""
    return PROCESS_BYTES
