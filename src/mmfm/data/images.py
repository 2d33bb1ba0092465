"""Image folders and ADM preprocessing (method.md §1.2).

- :func:`to_rgb`: any PIL image as 8-bit RGB. Grayscale, palette, RGBA (alpha dropped, as
  torchvision's loader does), CMYK, and 16/32-bit integer images (rescaled to 8 bits, where PIL's
  own ``convert`` would clip them to white).
- :func:`center_crop_arr`: ADM's crop. While the short side is at least ``2S``, halve with a BOX
  filter; resize bicubically so the short side is ``S`` (each side rounded); take the centre ``S x S``
  with floor offsets.
- :func:`list_images`: a torchvision-style class folder (one subfolder per class, sorted names give
  labels ``0..C-1``), files sorted within each class: a deterministic order, and
  :func:`shard_range` a deterministic split of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB, whatever the mode."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = a * 255.0 if a.max() <= 1.0 else a  # float images in [0, 1] or [0, 255]
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def center_crop_arr(img: Image.Image, size: int) -> np.ndarray:
    """ADM ``center_crop_arr``: ``(size, size, 3)`` uint8 from any PIL image."""
    if not (isinstance(size, int) and size > 0):
        raise ValueError(f"size: expected a positive integer, got {size!r}")
    img = to_rgb(img)
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


@dataclass(frozen=True)
class ImageItem:
    """One image of a class folder: its index in the folder's order, class label and path."""

    index: int
    label: int
    path: Path


def list_images(root: str | os.PathLike) -> tuple[list[ImageItem], list[str]]:
    """``(items, class names)`` of a class folder, in a deterministic order.

    Classes are the sorted subfolder names; files are sorted within each class; hidden files and
    files without an image extension are ignored. An empty class folder is an error naming it.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: expected one subfolder per class, found none")
    items: list[ImageItem] = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in EXTENSIONS)
        if not files:
            raise ValueError(f"{root / name}: class folder holds no images ({', '.join(EXTENSIONS)})")
        start = len(items)
        items.extend(ImageItem(start + i, label, p) for i, p in enumerate(files))
    return items, classes


def shard_range(n: int, shard: int, num_shards: int) -> range:
    """Rows of shard ``shard`` of ``num_shards``: contiguous, sizes differing by at most one."""
    if not (isinstance(num_shards, int) and num_shards >= 1):
        raise ValueError(f"num_shards: expected a positive integer, got {num_shards!r}")
    if not (isinstance(shard, int) and 0 <= shard < num_shards):
        raise ValueError(f"shard: expected an integer in [0, {num_shards}), got {shard!r}")
    return range(shard * n // num_shards, (shard + 1) * n // num_shards)
