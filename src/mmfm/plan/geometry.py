"""What the data will look like, without the data or any weights: the token grid and the image count.

**Tokenizer** (:func:`tokenizer_geometry`). ``pixels`` is built as is (it has no weights). A transformers
encoder's grid, widths, patch and pixel statistics are those of the checkpoint RAE uses for it
(:data:`KNOWN_ENCODERS`, the architecture configs of ``facebook/dinov2-with-registers-base``,
``google/siglip2-base-patch16-256`` and ``facebook/vit-mae-base``); when ``encoder.path`` already holds a
``config.json`` (and ``preprocessor_config.json``), their ``hidden_size``, ``patch_size``, register count and
pixel statistics are read from it instead. The grid is RAE's: ``16 x 16`` tokens (``input_size = 16 p``), as
:class:`mmfm.encoders.hf.HFTokenizer` sets it.

**Images** (:func:`dataset`). The digits demo has scikit-learn's 1,797 images (names as
:func:`mmfm.data.digits.export_digits` writes them). An image folder is listed with
:func:`mmfm.data.images.list_images`, the code ``mmfm encode`` reads it with. Where the folder is missing,
cannot be listed, or holds fewer images than ``data.num_images``, the plan counts ``data.num_images`` images
instead (and says so), spread evenly over :data:`STANDIN_CLASSES` classes with ImageNet-shaped file names
(``n00000000/n00000000_00000.JPEG``, 30 characters), which only the shards' ``path`` column sees.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

#: RAE's token grid side for every transformers encoder (``mmfm.encoders.hf.RAE_GRID``).
RAE_GRID = 16
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: The checkpoints RAE uses (their ``config.json`` / ``preprocessor_config.json`` values), by encoder name.
KNOWN_ENCODERS = {
    "dinov2": {"model_type": "dinov2_with_registers", "hidden_size": 768, "num_hidden_layers": 12,
               "num_attention_heads": 12, "intermediate_size": 3072, "patch_size": 14, "image_size": 518,
               "num_register_tokens": 4, "pixel_mean": IMAGENET_MEAN, "pixel_std": IMAGENET_STD},
    "siglip2": {"model_type": "siglip_vision_model", "hidden_size": 768, "num_hidden_layers": 12,
                "num_attention_heads": 12, "intermediate_size": 3072, "patch_size": 16, "image_size": 256,
                "num_register_tokens": 0, "pixel_mean": (0.5, 0.5, 0.5), "pixel_std": (0.5, 0.5, 0.5)},
    "mae": {"model_type": "vit_mae", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
            "intermediate_size": 3072, "patch_size": 16, "image_size": 224, "num_register_tokens": 0,
            "pixel_mean": IMAGENET_MEAN, "pixel_std": IMAGENET_STD},
}
#: RAE's ViT-XL decoder (``mmfm.encoders.rae.RAEDecoder``'s defaults).
DECODER = {"hidden_size": 1152, "num_layers": 28, "num_heads": 16, "intermediate_size": 4096, "patch_size": 16}
#: Classes of a stand-in image list (ImageNet-1k's).
STANDIN_CLASSES = 1000
DIGITS_IMAGES = 1797


@dataclass
class Geometry:
    """The tokenizer's shapes: ``grid (h, w)``, ``token_dim`` D, ``cls_dim`` Dc, the crop ``image_size``, and
    what a shard records about the tokenizer (``metadata``, as its ``metadata()`` returns it)."""

    name: str
    grid: tuple[int, int]
    token_dim: int
    cls_dim: int
    image_size: int
    metadata: dict
    arch: dict = field(default_factory=dict)  # transformers encoders: hidden_size, patch_size, layers, ...
    source: str = ""  # where the shapes come from

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


def tokenizer_geometry(encoder: dict, root: str | Path = ".") -> Geometry:
    """The :class:`Geometry` of the config's ``encoder`` section (module doc)."""
    name = encoder["name"]
    if name == "pixels":
        from mmfm.encoders.pixels import PixelTokenizer

        tok = PixelTokenizer(image_size=encoder.get("image_size") or 8, patch_size=encoder.get("patch_size") or 2,
                             pool=encoder.get("pool") or 2)
        return Geometry(name, tuple(tok.grid), tok.token_dim, tok.cls_dim, tok.image_size, tok.metadata(),
                        source="the pixels tokenizer")
    arch = dict(KNOWN_ENCODERS[name])
    source = f"the {name} architecture RAE uses"
    folder = Path(encoder["path"]) if encoder.get("path") else None
    if folder is not None and not folder.is_absolute():
        folder = Path(root) / folder
    if folder is not None and (folder / "config.json").is_file():
        try:
            cfg = json.loads((folder / "config.json").read_text())
            vision = cfg.get("vision_config", cfg)  # a full SigLIP checkpoint nests the tower's config
            for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                        "patch_size", "image_size", "num_register_tokens"):
                if key in vision:
                    arch[key] = vision[key]
            source = f"{folder / 'config.json'}"
            pre = folder / "preprocessor_config.json"
            if pre.is_file():
                p = json.loads(pre.read_text())
                arch["pixel_mean"], arch["pixel_std"] = tuple(p["image_mean"]), tuple(p["image_std"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an unreadable config: the known architecture
    patch, hidden = int(arch["patch_size"]), int(arch["hidden_size"])
    image_size = encoder.get("image_size") or 256
    precision = encoder.get("precision", "fp32")
    meta = {"encoder": name, "model": str(encoder.get("path") or ""), "revision": "sha256:" + "0" * 16,
            "image_size": image_size, "input_size": RAE_GRID * patch, "grid": [RAE_GRID, RAE_GRID],
            "patch_size": patch, "token_dim": hidden, "cls_dim": hidden, "pixel_mean": list(arch["pixel_mean"]),
            "pixel_std": list(arch["pixel_std"]), "final_layernorm_affine": False, "precision": precision}
    if name == "dinov2":
        meta["num_registers"] = int(arch["num_register_tokens"])
    return Geometry(name, (RAE_GRID, RAE_GRID), hidden, hidden, image_size, meta, arch, source)


@dataclass
class Dataset:
    """The images the encode jobs read: ``count``, ``classes``, ``labels`` and ``paths`` (relative to the
    folder, as the shards' ``path`` column holds them), ``root`` (as the encode rule passes it) and where
    the count comes from (``how``; ``note`` says why the folder itself was not counted)."""

    count: int
    classes: int
    root: str
    how: str
    note: str | None = None
    _items: list | None = None  # (label, path) of a listed folder

    def item(self, i: int) -> tuple[int, str]:
        """``(label, relative path)`` of image ``i`` in the folder's order."""
        if self._items is not None:
            return self._items[i]
        per = -(-self.count // self.classes)
        label, j = divmod(i, per)
        return label, f"n{label:08d}/n{label:08d}_{j:05d}.JPEG"


def dataset(config: dict, root: str | Path = ".") -> Dataset:
    """The :class:`Dataset` the encode jobs will read (module doc)."""
    want = (config.get("data") or {}).get("num_images")
    if config["data"]["source"] == "digits":
        from sklearn.datasets import load_digits

        labels = [int(y) for y in load_digits().target]
        # the folder's order (mmfm.data.images.list_images): classes by name, files by name within each
        items = sorted(((y, f"{y}/{i:04d}.png") for i, y in enumerate(labels)), key=lambda it: (str(it[0]), it[1]))
        return Dataset(len(items), 10, "results/digits", "scikit-learn's digits", None, items)
    folder = config["data"]["images"]
    path = Path(folder) if Path(folder).is_absolute() else Path(root) / folder
    why = None
    try:
        from mmfm.data.images import list_images

        listed, classes = list_images(path)
        if want is None or len(listed) >= int(want):
            items = [(it.label, str(it.path.relative_to(path))) for it in listed]
            return Dataset(len(items), len(classes), str(Path(folder)), f"the {len(items):,} images in {folder}",
                           None, items)
        why = f"{folder} holds {len(listed):,} images, fewer than data.num_images"
    except (ValueError, OSError) as err:
        why = f"{folder} cannot be listed ({err})"
    if want is None:
        raise ValueError(f"data.images: {why}, and data.num_images is not set; set data.num_images to the number "
                         "of images the folder will hold (1281167 for ImageNet-1k train)")
    return Dataset(int(want), STANDIN_CLASSES, str(Path(folder)), f"data.num_images = {int(want):,}",
                   f"{why}: the plan counts data.num_images = {int(want):,} images")
