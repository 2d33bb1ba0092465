"""``mmfm bench encode``: what encoding an image folder costs beyond the encoder itself.

On a temporary folder of synthetic ImageNet-sized JPEGs (about 500 x 375, smooth content plus
noise, quality 90, so they decode like photographs), ``encode_folder`` runs end to end: DataLoader
decoding, ADM crop, batching, the encoder, float16 tokens into Parquet. The same batches, already
decoded and in memory, are then timed through the encoder alone:

- ``end_to_end_over_forward = end_to_end_s / forward_s`` (a time ratio, >= 1: 1 means decoding,
  cropping, batching and writing are hidden behind the encoder);
- for the ``pixels`` tokenizer, whose forward is nearly free, the share of the end-to-end time spent
  decoding (the loader alone) and writing instead;
- ``read_over_npy``: the shard's tokens read back as a ``(rows, N, D)`` array, in MB/s, over reading
  the same bytes from a raw ``.npy`` (a throughput ratio; both from the page cache, best of 5).

The default encoder is a randomly initialized DINOv2-with-registers ViT-S/14 (the public ViT-S
configuration: 12 layers, width 384, 6 heads, 4 registers) at 224 px, saved with
``save_pretrained`` and loaded through the same code as a downloaded one.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def synthetic_jpegs(root: Path, n: int, size: tuple[int, int] = (500, 375), classes: int = 4, seed: int = 0) -> Path:
    """``n`` JPEGs in ``classes`` class folders: bicubic-upsampled coarse noise plus fine noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (h // 25, w // 25, 3), dtype=np.uint8)).resize(
            (w, h), Image.BICUBIC)
        arr = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 6, (h, w, 3))
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def random_dinov2_small(path: Path, seed: int = 0) -> Path:
    """A randomly initialized DINOv2-with-registers ViT-S/14 and its image processor, saved."""
    from transformers import BitImageProcessor, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(seed)
    config = Dinov2WithRegistersConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                       patch_size=14, image_size=518, num_register_tokens=4)
    Dinov2WithRegistersModel(config).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(path)
    return path


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_encode(encoder: str = "dinov2", encoder_path: str | None = None, n: int = 128, batch_size: int = 32,
                 workers: int = 1, device: str = "cpu", seed: int = 0) -> dict:
    """Run the measurement; returns the JSON object ``mmfm bench encode`` prints."""
    from mmfm.data.encode import encode_folder, image_batches
    from mmfm.data.images import list_images
    from mmfm.data.stream import read_shard
    from mmfm.encoders import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="mmfm-bench-encode-") as tmp:
        tmp = Path(tmp)
        images = synthetic_jpegs(tmp / "images", n, seed=seed)
        if encoder == "pixels":
            tok = load_tokenizer("pixels", image_size=256, patch_size=16, pool=4)
        else:
            if encoder_path is None:
                if encoder != "dinov2":
                    raise ValueError(f"--encoder {encoder} needs --encoder-path (only dinov2 has a built-in "
                                     "random model)")
                encoder_path = str(random_dinov2_small(tmp / "model", seed))
            tok = load_tokenizer(encoder, encoder_path, image_size=256, device=device)
        items, _ = list_images(images)
        batches = [imgs for _, imgs, _ in image_batches(items, tok.image_size, batch_size, 0)]

        def forward():
            for imgs in batches:
                with torch.no_grad():
                    tok.encode(imgs.to(device).permute(0, 3, 1, 2).float().div_(255.0))
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        forward()  # warm-up: first-call allocations and kernels
        out = tmp / "shard.parquet"

        def end_to_end():
            out.unlink(missing_ok=True)
            encode_folder(images, out, tok, batch_size=batch_size, num_workers=workers, device=device,
                          dtype="float16", progress=False)

        repeats = 3 if encoder == "pixels" else 2
        forward_s, e2e_s = float("inf"), float("inf")
        for _ in range(repeats):  # alternate, so a slow spell of the machine hits both
            forward_s = min(forward_s, _best(forward, 1))
            e2e_s = min(e2e_s, _best(end_to_end, 1))
        result = {"encoder": encoder, "device": device, "images": n, "batch_size": batch_size, "workers": workers,
                  "cpus": len(os.sched_getaffinity(0)), "image_size": tok.image_size, "grid": list(tok.grid),
                  "token_dim": tok.token_dim, "end_to_end_images_per_s": n / e2e_s,
                  "forward_images_per_s": n / forward_s, "end_to_end_over_forward": e2e_s / forward_s}
        if encoder == "pixels":
            decode_s = _best(lambda: [b for b in image_batches(items, tok.image_size, batch_size, workers)], 3)
            result.update({"decode_share": decode_s / e2e_s, "encode_share": forward_s / e2e_s,
                           "write_share": max(0.0, 1 - (decode_s + forward_s) / e2e_s)})

        tokens = read_shard(out, ["tokens"])["tokens"]
        npy = tmp / "tokens.npy"
        np.save(npy, tokens)
        mb = tokens.nbytes / 2**20
        parquet_s = _best(lambda: read_shard(out, ["tokens"])["tokens"], 5)
        npy_s = _best(lambda: np.load(npy), 5)
        result.update({"read_mb": mb, "read_mb_per_s": mb / parquet_s, "npy_mb_per_s": mb / npy_s,
                       "read_over_npy": npy_s / parquet_s})
    return result
