"""Fréchet distance of a velocity model's samples to the data, in the latent space (docs/design.md §7).

The offline demo has no Inception network, so its distance is measured where the model works: the
flattened token grids ``(N D,)`` of samples against those of the training shards, with pytorch-fid's
``calculate_frechet_distance`` (:mod:`mmfm.metrics.frechet`). The same samples are decoded for FID
when an Inception network is at hand (``mmfm fid``).

Samples are drawn with :func:`mmfm.sample.sample_latents` (per-sample seeds, a fixed ``seed``), so the
curve over training steps compares the same noise at every step, and evaluation draws nothing from
the training generators: a resumed run's weights do not depend on when it was evaluated.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from mmfm.data.stream import ShardStream
from mmfm.metrics.frechet import FeatureStats, frechet_distance
from mmfm.sample import noise_source, sample_latents

FD_COLUMNS = ("step", "nfe", "fd")


def reference_stats(shards, rows: int = 4096) -> FeatureStats:
    """Mean and covariance of the first ``rows`` flattened token grids of ``shards`` (file order)."""
    stream = ShardStream(shards, min(rows, 1024), columns=("tokens",), shuffle=False, rank=0, world_size=1)
    stats = None
    for batch in stream:
        tok = batch["tokens"].reshape(len(batch["tokens"]), -1)
        if stats is None:
            stats = FeatureStats(tok.shape[1])
        stats.update(tok[: rows - stats.n])
        if stats.n >= rows:
            break
    if stats is None or stats.n < 2:
        raise ValueError(f"shards: need at least 2 rows for reference statistics, got {0 if stats is None else stats.n}")
    return stats


def fd_of_model(velocity, source, reference: FeatureStats, *, n: int = 512, seed: int = 0, conditioning: str = "none",
                num_classes: int = 0, steps: int = 20, shift: float = 1.0, method: str = "euler",
                batch_size: int = 256, device="cpu", dfm: dict | None = None) -> tuple[float, int]:
    """``(Fréchet distance of n samples to the reference, NFE per sample)``; ``dfm``: a DFM network's stages and
    source (:func:`mmfm.sample.sample_latents`; ``method`` is then ``dfm-euler``)."""
    got = sample_latents(velocity, source, n, seed=seed, conditioning=conditioning, num_classes=num_classes,
                         steps=steps, method=method, shift=shift, batch_size=batch_size, device=device, dfm=dfm)
    stats = FeatureStats(reference.dim).update(got.latents.reshape(n, -1).double())
    batches = -(-n // batch_size)
    return frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma), got.nfe // batches


def fd_of_images(images, tokenizer, reference: FeatureStats, *, norm=None, batch_size: int = 512,
                 device="cpu") -> tuple[float, int]:
    """``(Fréchet distance, n)`` of decoded samples re-encoded into the latent space of the shards.

    ``images``: ``(n, H, W, 3)`` uint8 (an ADM ``.npz``'s ``arr_0``) or the ``.npz`` path. Each batch goes
    through ``tokenizer.encode`` (pixels in [0, 1]) and, when the shards were normalized, ``norm``; the
    flattened token grids ``(n, N D)`` are compared with ``reference`` (:func:`reference_stats` of the
    shards). Closes the loop decode → encode, so it measures what the images hold, not the raw ODE output.
    """
    import numpy as np

    if not hasattr(images, "shape"):
        from mmfm.io import load_samples

        images = load_samples(images)  # a damaged file: named, with the command that rebuilds it
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images: expected (n, H, W, 3) uint8, got {images.shape} {images.dtype}")
    stats = FeatureStats(reference.dim)
    for lo in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[lo:lo + batch_size])).permute(0, 3, 1, 2)
        with torch.no_grad():
            _, tokens = tokenizer.encode(x.float().div(255).to(device))
        tokens = tokens.float() if norm is None else norm.normalize(tokens.float())
        stats.update(tokens.reshape(len(x), -1).double().cpu().numpy())
    return frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma), stats.n


class FDLog:
    """``fd.csv`` rows ``(step, nfe, fd)``; on resume, rows after ``start`` (left by a killed run) are dropped."""

    def __init__(self, path: Path, start: int = 0):
        self.path = Path(path)
        rows = []
        if self.path.is_file() and start > 0:
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= start]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, FD_COLUMNS)
            w.writeheader()
            w.writerows(rows)

    def write(self, step: int, nfe: int, fd: float) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, FD_COLUMNS).writerow({"step": step, "nfe": nfe, "fd": f"{fd:.6g}"})


def read_fd(path) -> list[dict]:
    """The rows of an ``fd.csv`` as ``{"step": int, "nfe": int, "fd": float}``."""
    with open(path, newline="") as f:
        return [{"step": int(r["step"]), "nfe": int(r["nfe"]), "fd": float(r["fd"])} for r in csv.DictReader(f)]


@torch.no_grad()
def nfe_curve(model_path, shards, out_csv, *, source="gaussian", nfes=(1, 2, 4, 8, 16, 32), n: int = 512,
              seed: int = 0, shift: float = 1.0, rows: int = 4096, device="cpu") -> list[dict]:
    """The Fréchet distance of an exported model's samples at each number of Euler steps."""
    from mmfm.models.velocity import load_velocity_model, read_metadata

    meta = read_metadata(model_path)
    velocity = load_velocity_model(model_path, device)
    shape = (meta["num_tokens"], meta["in_channels"])
    src = noise_source(source, shape)
    ref = reference_stats(shards, rows)
    log = FDLog(out_csv)
    out = []
    for steps in nfes:
        fd, nfe = fd_of_model(velocity, src, ref, n=n, seed=seed, conditioning=meta["conditioning"],
                              num_classes=meta["num_classes"], steps=steps, shift=shift, device=device)
        log.write(int(meta.get("step", 0)), nfe, fd)
        out.append({"nfe": nfe, "fd": fd})
    return out
