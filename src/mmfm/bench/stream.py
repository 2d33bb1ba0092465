"""``mmfm bench stream``: how fast one rank's shuffled shard stream delivers rows, beside what its GPU eats.

The stream is the training loop's: :class:`~mmfm.data.stream.ShardStream` with ``shuffle`` (row groups
permuted, rows drawn through the ``buffer_rows`` buffer) read by :class:`~mmfm.data.prefetch.Prefetch`
(host checks, pinning on CUDA machines), ``tokens`` and ``cls`` columns as mode coupling reads them.
Without ``--shards`` it writes synthetic shards of the preset's geometry with the real shard writer
(float16 tokens ``N x D``, ``row_group_rows`` rows per row group) into a temporary folder first.

``need_rows_per_s`` is the rate one GPU consumes at ``mfu`` of its dense bf16 peak: ``mfu * peak /
flops_per_sample``, the FLOPs of one training sample (forward + backward of the DiTDH preset, counted
by ``FlopCounterMode`` on fake tensors). ``headroom = rows_per_s / need_rows_per_s`` must stay well above
1 for the GPU never to wait (the reader runs in its own thread, beside the step).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np


def sample_flops(preset: str, num_tokens: int, token_dim: int) -> float:
    """Forward + backward FLOPs of one training sample of ``preset`` (fake tensors: nothing computed)."""
    import torch

    from mmfm.bench.train import count_flops
    from mmfm.models.ditdh import build_ditdh
    from mmfm.plan.memory import fake_device

    with fake_device():
        model = build_ditdh(preset, in_channels=token_dim, num_tokens=num_tokens)
        x = torch.empty(2, num_tokens, token_dim)
        return count_flops(model, (x, torch.empty(2), x)) / 2


def write_synthetic(folder: Path, rows: int, side: int, token_dim: int, cls_dim: int, row_group_rows: int,
                    shards: int = 4, seed: int = 0) -> list[Path]:
    """``shards`` shard files of ``rows`` rows in all: random float16 tokens and CLS, the real writer."""
    from mmfm.data.shards import write_shard

    rng = np.random.default_rng(seed)
    meta = {"encoder": "bench", "revision": "0", "grid": [side, side], "token_dim": token_dim, "cls_dim": cls_dim}
    paths = []
    for i, part in enumerate(np.array_split(np.arange(rows), shards)):
        n = len(part)
        cols = {"image_id": part.astype(np.int64),
                "cls": rng.standard_normal((n, cls_dim), dtype=np.float32).astype(np.float16),
                "tokens": rng.standard_normal((n, side * side, token_dim), dtype=np.float32).astype(np.float16)}
        path = folder / f"shard-{i:05d}.parquet"
        write_shard(path, cols, meta, row_group_rows=row_group_rows)
        paths.append(path)
    return paths


def bench_stream(shards=None, *, rows: int = 4096, side: int = 16, token_dim: int = 768, cls_dim: int = 768,
                 batch: int = 128, buffer_rows: int = 4096, row_group_rows: int = 256, batches: int = 16,
                 preset: str = "ditdh-xl", gpu: str = "h100-80gb", mfu: float = 0.4, seed: int = 0) -> dict:
    """Run the measurement; returns the JSON object ``mmfm bench stream`` prints."""
    from mmfm.data.prefetch import Prefetch
    from mmfm.data.stream import ShardStream
    from mmfm.plan.gpus import gpu as gpu_kind

    kind = gpu_kind(gpu)
    for key, value in (("rows", rows), ("batch", batch), ("batches", batches)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{key}: expected a positive integer, got {value!r}")
    with tempfile.TemporaryDirectory(prefix="mmfm-bench-stream-") as tmp:
        if shards is None:
            t0 = time.perf_counter()
            spec = write_synthetic(Path(tmp), rows, side, token_dim, cls_dim, row_group_rows, seed=seed)
            written = time.perf_counter() - t0
        else:
            spec, written = shards, None
        stream = ShardStream(spec, batch, columns=["tokens", "cls"], rank=0, world_size=1, shuffle=True,
                             buffer_rows=buffer_rows, seed=seed, drop_last=True, as_torch=True)
        meta = stream.meta
        n_tokens, width = int(np.prod(meta["grid"])), int(meta["token_dim"])
        reader = Prefetch(stream, depth=2)
        try:
            next(reader)  # the buffer's first fill is not the steady rate
            t0 = time.perf_counter()
            for _ in range(batches):
                next(reader)
            seconds = time.perf_counter() - t0
        finally:
            reader.close()
    flops = sample_flops(preset, n_tokens, width)
    need = mfu * kind.bf16 / flops
    rate = batches * batch / seconds
    return {"shards": "synthetic" if shards is None else str(shards), "rows": stream.rows,
            "latent": [n_tokens, width], "batch": batch, "buffer_rows": buffer_rows, "batches": batches,
            "rows_per_s": rate, "mb_per_s": rate * n_tokens * width * 2 / 1e6, "preset": preset, "gpu": kind.key,
            "mfu": mfu, "flops_per_sample": flops, "need_rows_per_s": need, "headroom": rate / need,
            "synthetic_write_s": written}
