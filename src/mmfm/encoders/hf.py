"""Frozen Hugging Face encoders as tokenizers: ``dinov2`` (with registers), ``siglip2``, ``mae`` (docs/method.md §1.1-1.2).

``encode`` follows RAE's ``RAE.encode`` steps 1-3 on images ``(B, 3, S, S)`` in ``[0, 1]``:

    x  = bicubic(images, input_size)    only if S != input_size (align_corners False)
    x' = (x - m_c) / s_c                m, s: the checkpoint's image-processor mean / std
    h  = encoder(x')                    last hidden state; its final LayerNorm has no affine, so every token
                                        is standardized over its D channels: mean 0, variance ~1 (eps)

and returns ``(cls (B, Dc), tokens (B, N, D))``, ``N = (input_size / p)^2`` row-major over the grid:

- ``dinov2``: ``tokens = h[:, 1 + R:]`` (CLS and ``R`` registers dropped), ``cls = h[:, 0]``;
- ``siglip2``: ``tokens = h`` (no CLS), ``cls`` = the MAP attention-pooling head applied to the affine-free ``h``;
- ``mae``: mask ratio 0 and shuffle noise ``arange(N)`` (identity order), ``tokens = h[:, 1:]``, ``cls = h[:, 0]``.

``input_size`` defaults to RAE's: a 16 x 16 token grid, ``16 p`` (224 for DINOv2-B/14, 256 for the patch-16
SigLIP2 and MAE). ``decode`` runs an attached RAE decoder (:mod:`mmfm.encoders.rae`). Checkpoints load from local
files only: a directory, or a hub id already in the local Hugging Face cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmfm.encoders.rae import RELEASE_REPO, RAEDecoder, load_rae_decoder

#: Token grid side RAE uses for every encoder (its decoders expect 16 x 16 tokens).
RAE_GRID = 16
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _download_hint(repo_id: str, target: str) -> str:
    return f"download it with `hf download {repo_id} --local-dir {target}` (or `huggingface-cli download ...`)"


def resolve_checkpoint(path: str | os.PathLike, name: str, repo_id: str) -> Path:
    """The local directory of a checkpoint: ``path`` itself, or a hub id's snapshot in the local HF cache.

    Raises ValueError naming the path and the expected files when something is missing.
    """
    directory = Path(path)
    if not directory.is_dir():
        if not _HUB_ID.match(str(path)):
            raise ValueError(f"{name} encoder checkpoint {path}: no such directory; {_download_hint(repo_id, path)}")
        from huggingface_hub import snapshot_download
        try:
            directory = Path(snapshot_download(str(path), local_files_only=True))
        except Exception as exc:  # LocalEntryNotFoundError and friends: the id is not in the cache
            raise ValueError(f"{name} encoder checkpoint {path}: not a directory and not in the local Hugging Face "
                             f"cache ({type(exc).__name__}); {_download_hint(str(path), '<dir>')} and pass "
                             f"that directory") from None
    missing = [f for f in ("config.json", "preprocessor_config.json") if not (directory / f).is_file()]
    if not any((directory / f).is_file() for f in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise ValueError(f"{name} encoder checkpoint {directory}: missing {', '.join(missing)} (expected config.json, "
                         f"a weights file and preprocessor_config.json); {_download_hint(repo_id, directory)}")
    return directory


def read_pixel_stats(directory: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(image_mean, image_std)`` from the checkpoint's ``preprocessor_config.json``."""
    config = json.loads((directory / "preprocessor_config.json").read_text())
    mean, std = config.get("image_mean"), config.get("image_std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) and min(std) > 0):
        raise ValueError(f"{directory / 'preprocessor_config.json'}: expected lists image_mean and image_std "
                         f"(std positive), got {mean!r} and {std!r}")
    return tuple(map(float, mean)), tuple(map(float, std))


def weights_fingerprint(directory: Path) -> str:
    """``sha256:`` + 16 hex digits of the SHA-256 of the first MiB of the checkpoint's weights file."""
    weights = next(directory / f for f in WEIGHT_FILES if (directory / f).is_file())
    with open(weights, "rb") as f:
        return "sha256:" + hashlib.sha256(f.read(1 << 20)).hexdigest()[:16]


def drop_affine(norm: nn.LayerNorm) -> None:
    """Remove a LayerNorm's affine (RAE): it then returns ``(h - mean(h)) / sqrt(var(h) + eps)`` per token."""
    norm.elementwise_affine = False
    norm.weight = None
    norm.bias = None


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report and progress bar while loading (e.g. the text tower of a SigLIP
    checkpoint is expected to go unused; the missing keys are checked by the caller)."""
    from transformers.utils import logging
    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


class HFTokenizer:
    """A frozen transformers encoder behind the tokenizer interface of :class:`~mmfm.encoders.PixelTokenizer`.

    Subclasses name the checkpoint (``name``, ``repo_id``, ``model_types``) and the model class (``_model_class``),
    remove the affine of its final LayerNorm (``_prepare``) and run it (``_forward``). Outputs stay on ``device``.
    """

    name = ""
    repo_id = ""
    model_types: tuple[str, ...] = ()

    def __init__(self, path: str | os.PathLike | None = None, image_size: int = 256, *, input_size: int | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 decoder: str | os.PathLike | RAEDecoder | None = None):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype: expected torch.float32, bfloat16 or float16, got {dtype}")
        for key, value in (("image_size", image_size), ("input_size", 1 if input_size is None else input_size)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{key}: expected a positive integer, got {value!r}")
        self.path = str(path or self.repo_id)
        directory = resolve_checkpoint(self.path, self.name, self.repo_id)
        model_type = json.loads((directory / "config.json").read_text()).get("model_type")
        if model_type not in self.model_types:
            raise ValueError(f"{self.name} encoder checkpoint {directory}: config.json has model_type {model_type!r}, "
                             f"expected one of {self.model_types}")
        self.device, self.dtype = torch.device(device), dtype
        with _quiet_transformers():
            model, info = self._model_class().from_pretrained(directory, local_files_only=True,
                                                              output_loading_info=True)
        if info["missing_keys"] or info["mismatched_keys"]:
            lacking = sorted(map(str, info["missing_keys"] or info["mismatched_keys"]))
            raise ValueError(f"{self.name} encoder checkpoint {directory}: the weights do not fit "
                             f"{type(model).__name__}, e.g. {lacking[:3]}")
        self.model = model.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
        self.config = model.config
        self._prepare()
        self.revision = weights_fingerprint(directory)
        self.pixel_mean, self.pixel_std = read_pixel_stats(directory)
        self.channels = self.config.num_channels
        if len(self.pixel_mean) != self.channels:
            raise ValueError(f"{directory}: {len(self.pixel_mean)} image_mean values for {self.channels} channels")
        self.patch_size = self.config.patch_size
        self.image_size = image_size
        self.input_size = RAE_GRID * self.patch_size if input_size is None else input_size
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size}: expected a multiple of the patch size {self.patch_size}")
        side = self.input_size // self.patch_size
        self.grid = (side, side)
        self.num_tokens = side * side
        self.token_dim = self.cls_dim = self.config.hidden_size
        self.decoder = self._attach(decoder)

    def _model_class(self) -> type:
        raise NotImplementedError

    def _prepare(self) -> None:
        raise NotImplementedError

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _attach(self, decoder: str | os.PathLike | RAEDecoder | None) -> RAEDecoder | None:
        if decoder is None:
            return None
        if not isinstance(decoder, RAEDecoder):
            return load_rae_decoder(decoder, pixel_mean=self.pixel_mean, pixel_std=self.pixel_std,
                                    token_dim=self.token_dim, grid=self.grid[0], device=self.device)
        if (decoder.token_dim, decoder.grid) != (self.token_dim, self.grid[0]):
            raise ValueError(f"decoder: expects {decoder.grid}x{decoder.grid} tokens of width {decoder.token_dim}, the "
                             f"{self.name} tokenizer gives {self.grid[0]}x{self.grid[1]} of width {self.token_dim}")
        return decoder.to(self.device).eval().requires_grad_(False)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def metadata(self) -> dict:
        return {"encoder": self.name, "model": self.path, "revision": self.revision, "image_size": self.image_size,
                "input_size": self.input_size, "grid": list(self.grid), "patch_size": self.patch_size,
                "token_dim": self.token_dim, "cls_dim": self.cls_dim, "pixel_mean": list(self.pixel_mean),
                "pixel_std": list(self.pixel_std), "final_layernorm_affine": False,
                "precision": {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]}

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images (B, 3, S, S)`` in [0, 1], ``S = image_size`` -> ``(cls (B, Dc), tokens (B, N, D))``, float32."""
        expected = (self.channels, self.image_size, self.image_size)
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images: expected shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(getattr(images, 'shape', ()))}")
        x = images.to(device=self.device, dtype=torch.float32)
        if self.image_size != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        shape = (1, self.channels, 1, 1)
        x = (x - x.new_tensor(self.pixel_mean).view(shape)) / x.new_tensor(self.pixel_std).view(shape)
        with self._autocast():
            cls, tokens = self._forward(x)
        return cls.float(), tokens.float()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens (B, N, D)`` -> images ``(B, 3, H, W)`` through the RAE decoder (de-normalized, not clamped)."""
        if self.decoder is None:
            raise ValueError(f"the {self.name} tokenizer has no decoder: pass decoder=<an RAE ViT-XL decoder "
                             f"checkpoint, .pt or .safetensors> to load_hf_tokenizer (the released ones are in the "
                             f"Hugging Face repo {RELEASE_REPO}, e.g. decoders/dinov2/wReg_base/ViTXL_n08/model.pt "
                             f"for dinov2)")
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3 or tuple(tokens.shape[1:]) != (
                self.num_tokens, self.token_dim):
            raise ValueError(f"tokens: expected shape (B, {self.num_tokens}, {self.token_dim}), "
                             f"got {tuple(getattr(tokens, 'shape', ()))}")
        with self._autocast():
            images = self.decoder(tokens.to(device=self.device, dtype=torch.float32))
        return images.float()


class DINOv2Tokenizer(HFTokenizer):
    """DINOv2 with registers (``Dinov2WithRegistersModel``): drop CLS and registers, CLS is the descriptor."""

    name = "dinov2"
    repo_id = "facebook/dinov2-with-registers-base"
    model_types = ("dinov2_with_registers",)

    def _model_class(self) -> type:
        from transformers import Dinov2WithRegistersModel
        return Dinov2WithRegistersModel

    def _prepare(self) -> None:
        drop_affine(self.model.layernorm)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.model(pixel_values=x).last_hidden_state
        return h[:, 0], h[:, 1 + self.config.num_register_tokens:]

    def metadata(self) -> dict:
        return {**super().metadata(), "num_registers": self.config.num_register_tokens}


class SigLIP2Tokenizer(HFTokenizer):
    """SigLIP2 fixed-resolution vision tower (v1 ``Siglip`` architecture): all tokens; MAP-pooled descriptor.

    The pooling head runs on the output of the (affine-free) ``post_layernorm``, so the descriptor is computed
    from the standardized tokens, as in RAE's wrapper.
    """

    name = "siglip2"
    repo_id = "google/siglip2-base-patch16-256"
    model_types = ("siglip", "siglip_vision_model")

    def _model_class(self) -> type:
        from transformers import SiglipVisionModel  # reads the vision tower of a SiglipModel checkpoint too
        return SiglipVisionModel

    @property
    def _tower(self) -> nn.Module:
        # transformers 4.x wraps the tower in `.vision_model`; 5.x's SiglipVisionModel is the tower itself
        return getattr(self.model, "vision_model", self.model)

    def _prepare(self) -> None:
        if getattr(self._tower, "head", None) is None:
            raise ValueError(f"siglip2 encoder checkpoint {self.path}: no MAP pooling head (vision_use_head false), "
                             f"which the descriptor needs")
        drop_affine(self._tower.post_layernorm)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._tower(pixel_values=x, interpolate_pos_encoding=self.input_size != self.config.image_size)
        return out.pooler_output, out.last_hidden_state


class MAETokenizer(HFTokenizer):
    """MAE ViT encoder (``ViTMAEModel``, also read from a ``ViTMAEForPreTraining`` checkpoint) without masking."""

    name = "mae"
    repo_id = "facebook/vit-mae-base"
    model_types = ("vit_mae",)

    def _model_class(self) -> type:
        from transformers import ViTMAEModel
        return ViTMAEModel

    def _prepare(self) -> None:
        drop_affine(self.model.layernorm)
        self.model.config.mask_ratio = 0.0  # keep all N tokens (the embeddings read this config object)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.arange(self.num_tokens, device=x.device, dtype=torch.float32).expand(x.shape[0], -1)
        h = self.model(pixel_values=x, noise=noise,
                       interpolate_pos_encoding=self.input_size != self.config.image_size).last_hidden_state
        return h[:, 0], h[:, 1:]


TOKENIZERS: dict[str, type[HFTokenizer]] = {t.name: t for t in (DINOv2Tokenizer, SigLIP2Tokenizer, MAETokenizer)}


def load_hf_tokenizer(name: str, path: str | os.PathLike | None = None, image_size: int = 256, *,
                      input_size: int | None = None, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32,
                      decoder: str | os.PathLike | RAEDecoder | None = None) -> HFTokenizer:
    """The ``name`` tokenizer (``dinov2`` | ``siglip2`` | ``mae``) from ``path`` (default: its hub id, from the
    local cache). ``dtype`` other than float32 runs the encoder and decoder under autocast; ``decoder``: an RAE
    decoder checkpoint path or an :class:`RAEDecoder`."""
    if name not in TOKENIZERS:
        raise ValueError(f"encoder: expected one of {sorted(TOKENIZERS)}, got {name!r}")
    return TOKENIZERS[name](path, image_size, input_size=input_size, device=device, dtype=dtype, decoder=decoder)
