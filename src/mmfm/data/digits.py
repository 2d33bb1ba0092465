"""The embedded demo data: scikit-learn's bundled handwritten digits as a PNG class folder.

1,797 grayscale 8x8 images in ten classes (``0`` .. ``9``), values 0..16 scaled to 0..255
(``round(v * 255 / 16)``), written as ``<out>/<digit>/<index:04d>.png``. Read back by the same
class-folder code that reads ImageNet (:mod:`mmfm.data.images`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def export_digits(out: str | Path) -> dict:
    """Write the digits folder (complete, or not at all: built beside ``out`` and renamed)."""
    import shutil

    from sklearn.datasets import load_digits

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not empty; remove it or choose another --out")
    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for d in range(10):
            (tmp / str(d)).mkdir(parents=True)
        for i, (img, label) in enumerate(zip(pixels, digits.target)):
            Image.fromarray(img, mode="L").save(tmp / str(int(label)) / f"{i:04d}.png")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "images": int(len(pixels)), "classes": 10, "size": 8}
