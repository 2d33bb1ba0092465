"""Image folders and ADM preprocessing (docs/method.md §1.2).

- :func:`to_rgb`: any PIL image as 8-bit RGB. Grayscale, palette, RGBA (alpha dropped, as
  torchvision's loader does), CMYK, and 16/32-bit integer images (rescaled to 8 bits, where PIL's
  own ``convert`` would clip them to white).
- :func:`center_crop_arr`: ADM's crop. While the short side is at least ``2S``, halve with a BOX
  filter; resize bicubically so the short side is ``S`` (each side rounded); take the centre ``S x S``
  with floor offsets.
- :func:`list_images`: a torchvision-style class folder (one subfolder per class, sorted names give
  labels ``0..C-1``), files sorted within each class: a deterministic order, and
  :func:`shard_range` a deterministic split of it.

**Supported images** (:data:`EXTENSIONS`): every format the installed Pillow decodes, chosen by the
file's extension, case-insensitive. The list is Pillow's registered extensions
(``PIL.Image.registered_extensions()``) of the formats it can open, less those it only names without
decoding them (:data:`NOT_DECODED`: BUFR, GRIB, HDF5 and WMF stubs, EPS/PS, which needs Ghostscript,
MPEG). With Pillow 11-13 that is JPEG (``.jpg .jpeg .jpe .jfif``), PNG/APNG, GIF, WebP, TIFF, BMP/DIB,
AVIF, JPEG 2000, PPM/PGM/PBM/PNM/PFM, TGA, ICO/CUR, ICNS, PSD, PCX, QOI, SGI, DDS, FITS, XBM, XPM and
a few rarer ones (``python -c "import mmfm.data.images as m; print(*m.EXTENSIONS)"`` prints them).
Animations (GIF, APNG, WebP, multi-page TIFF) give their first frame; every mode becomes RGB
(:func:`to_rgb`). A file in a class folder without a supported extension is listed all the same and
counted as a bad image with its path (``mmfm encode``'s ``on_bad_image``): no file is left out
silently. Hidden files (a leading ``.``) are ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

#: Formats Pillow registers an opener for but does not decode (stubs, or an external program needed).
NOT_DECODED = frozenset({"BUFR", "GRIB", "HDF5", "WMF", "EPS", "MPEG"})
#: The extensions of the images read (lower case, sorted; module doc, "Supported images").
EXTENSIONS = tuple(sorted(ext.lower() for ext, fmt in Image.registered_extensions().items()
                          if fmt in Image.OPEN and fmt not in NOT_DECODED))


def supported(path: str | os.PathLike) -> bool:
    """Whether ``path`` has an image extension of :data:`EXTENSIONS` (case-insensitive)."""
    return Path(path).suffix.lower() in EXTENSIONS


def unsupported_reason(path: str | os.PathLike) -> str:
    """Why a listed file is not read (the bad-image reason)."""
    suffix = Path(path).suffix
    return (f"unsupported extension {suffix!r}" if suffix else "no file extension") + \
        " (not an image format Pillow decodes; see mmfm.data.images.EXTENSIONS)"


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

    Classes are the sorted subfolder names; files are sorted within each class; hidden files are
    ignored. Files without a supported extension (:func:`supported`) are listed too, in their place, so
    that ``mmfm encode`` counts them as bad images rather than leaving them out silently. A class folder
    without a supported image is an error naming it.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: expected one subfolder per class, found none")
    items: list[ImageItem] = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.is_file() and not p.name.startswith("."))
        if not any(supported(p) for p in files):
            raise ValueError(f"{root / name}: class folder holds no images ({len(files)} other file(s); images are "
                             "the files Pillow decodes: .jpg, .png, .gif, .webp, .tiff, .bmp, ..., see "
                             "mmfm.data.images.EXTENSIONS)")
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
