"""The RAE ViT-XL pixel decoder ("GeneralDecoder", docs/method.md §1.4).

Tokens ``z (B, N, D)``, ``N = g^2`` on a ``g x g`` grid, become an image ``(B, C, g p, g p)``:

    h_0 = [c ; z W_e + b_e] + P              c: learnable CLS (zero-init), P: fixed 2-D sin-cos, (B, 1 + N, H)
    h_l = h' + W_2 GELU(W_1 LN_2(h') + b_1) + b_2,   h' = h_{l-1} + Attn(LN_1(h_{l-1}))     (pre-LN ViT-MAE layer)
    y   = (LN(h_L) W_p + b_p)[:, 1:]          (B, N, p p C), each token ordered (dy, dx, c)
    x   = unpatchify(y) * s + m               de-normalized with the encoder's pixel mean m / std s (not clamped)

The released configuration (``configs/decoder/ViTXL/config.json`` of RAE) is ``H = 1152``, 28 layers, 16 heads,
MLP width 4096, LayerNorm eps 1e-12, patch ``p = 16``: about 415M parameters, 256 tokens -> 256 x 256 pixels.
Module and parameter names are those of RAE's ``GeneralDecoder`` (built on transformers' ViT-MAE layer), so the
released state dicts (a bare ``state_dict`` saved with ``torch.save``) load with ``strict=True``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: Where the released decoders live (Hugging Face model repo), e.g. ``decoders/dinov2/wReg_base/ViTXL_n08/model.pt``.
RELEASE_REPO = "nyu-visionx/RAE-collections"


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding with a zero CLS row: ``(1 + grid^2, dim)``, float32.

    Token ``k = i grid + j`` (row ``i``, column ``j``) gets ``[sin(j w), cos(j w), sin(i w), cos(i w)]`` with
    ``w_t = 10000^(-t / (dim/4))``, ``t = 0 .. dim/4 - 1``: the column half comes first, as in MAE and RAE.
    """
    if dim % 4:
        raise ValueError(f"dim: expected a multiple of 4, got {dim}")
    omega = 10000.0 ** -(torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    angles = [axis.reshape(-1, 1) * omega for axis in (cols, rows)]
    table = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)
    return torch.cat([table.new_zeros(1, dim), table]).float()


class _Linear(nn.Module):
    """A container named like transformers' ViT blocks: one ``dense`` Linear."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class _SelfAttention(nn.Module):
    """Multi-head scaled dot-product attention, ``softmax(Q K^T / sqrt(d_h)) V`` (no output projection)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (f(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for f in (self.query, self.key, self.value))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)


class _Attention(nn.Module):
    """``attention`` (Q, K, V) then ``output.dense`` (the output projection)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.attention = _SelfAttention(hidden, heads)
        self.output = _Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.dense(self.attention(x))


class DecoderLayer(nn.Module):
    """One pre-LN ViT-MAE layer: ``h += Attn(LN_1 h)``, then ``h += W_2 GELU(W_1 LN_2 h)`` (exact GELU)."""

    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float):
        super().__init__()
        self.attention = _Attention(hidden, heads)
        self.intermediate = _Linear(hidden, intermediate)
        self.output = _Linear(intermediate, hidden)
        self.layernorm_before = nn.LayerNorm(hidden, eps=eps)
        self.layernorm_after = nn.LayerNorm(hidden, eps=eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attention(self.layernorm_before(h))
        return h + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(h))))


class RAEDecoder(nn.Module):
    """RAE's ViT decoder: tokens ``(B, g^2, D)`` -> pixels ``(B, C, g p, g p)`` (see the module docstring).

    The defaults are the released ViT-XL. ``pixel_mean`` / ``pixel_std`` are the encoder's image statistics
    (non-persistent buffers: not part of the state dict, exactly like the release).
    """

    def __init__(self, *, pixel_mean: tuple[float, ...], pixel_std: tuple[float, ...], token_dim: int = 768,
                 grid: int = 16, hidden_size: int = 1152, num_layers: int = 28, num_heads: int = 16,
                 intermediate_size: int = 4096, patch_size: int = 16, channels: int = 3, layer_norm_eps: float = 1e-12):
        super().__init__()
        if hidden_size % num_heads or hidden_size % 4:
            raise ValueError(f"hidden_size {hidden_size}: expected a multiple of num_heads ({num_heads}) and of 4")
        if len(pixel_mean) != channels or len(pixel_std) != channels or min(pixel_std) <= 0:
            raise ValueError(f"pixel_mean / pixel_std: expected {channels} values each, std positive")
        self.token_dim, self.grid, self.patch_size, self.channels = token_dim, grid, patch_size, channels
        self.decoder_embed = nn.Linear(token_dim, hidden_size)
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(hidden_size, grid).unsqueeze(0), requires_grad=False)
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(hidden_size, num_heads, intermediate_size, layer_norm_eps) for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.decoder_pred = nn.Linear(hidden_size, patch_size**2 * channels)
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        shape = (1, channels, 1, 1)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(shape), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(shape), persistent=False)

    @property
    def image_size(self) -> int:
        """Side of the decoded image, ``grid * patch_size``."""
        return self.grid * self.patch_size

    def unpatchify(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, g^2, p p C)``, each token ordered ``(dy, dx, c)`` -> ``(B, C, g p, g p)``."""
        b, g, p, c = y.shape[0], self.grid, self.patch_size, self.channels
        return y.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens (B, g^2, D)`` -> de-normalized pixels ``(B, C, g p, g p)``."""
        expected = (self.grid**2, self.token_dim)
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != expected:
            raise ValueError(f"tokens: expected shape (B, {expected[0]}, {expected[1]}), got {tuple(tokens.shape)}")
        h = self.decoder_embed(tokens)
        h = torch.cat([self.trainable_cls_token.expand(h.shape[0], -1, -1).to(h.dtype), h], dim=1)
        h = h + self.decoder_pos_embed
        for layer in self.decoder_layers:
            h = layer(h)
        y = self.decoder_pred(self.decoder_norm(h))[:, 1:]
        return self.unpatchify(y) * self.pixel_std + self.pixel_mean


def _decoder_state(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The decoder's state dict from a loaded file: the release's bare dict, or an RAE stage-1 training
    checkpoint (``{"ema": ..., "model": ...}`` holding the whole RAE, decoder keys under ``decoder.``)."""
    if isinstance(obj, dict):
        for entry in ("ema", "model"):
            if isinstance(obj.get(entry), dict):
                obj = obj[entry]
                break
    if not (isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())):
        raise ValueError(f"{path}: expected a state dict of tensors (or an 'ema' / 'model' entry holding one)")
    if not any(k.startswith("decoder_") for k in obj) and any(k.startswith("decoder.") for k in obj):
        obj = {k.removeprefix("decoder."): v for k, v in obj.items() if k.startswith("decoder.")}
    return obj


def load_rae_decoder(path: str | os.PathLike, *, pixel_mean: tuple[float, ...], pixel_std: tuple[float, ...],
                     token_dim: int = 768, grid: int = 16, device: str | torch.device = "cpu",
                     **sizes) -> RAEDecoder:
    """Build an :class:`RAEDecoder` (``sizes``: its other keyword arguments) and load ``path`` strictly.

    ``path``: ``.safetensors``, or ``.pt`` / ``.pth`` / ``.bin`` read with ``torch.load(weights_only=True)``.
    Returns the decoder in eval mode, frozen, on ``device``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"RAE decoder checkpoint {path}: no such file. The released decoders are in the Hugging Face "
                         f"repo {RELEASE_REPO}, e.g. `hf download {RELEASE_REPO} "
                         f"decoders/dinov2/wReg_base/ViTXL_n08/model.pt --local-dir <dir>`")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(path)
    elif path.suffix in (".pt", ".pth", ".bin"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError) as exc:
            raise ValueError(f"RAE decoder checkpoint {path}: not readable with torch.load(weights_only=True): "
                             f"{str(exc).splitlines()[0]}") from None
    else:
        raise ValueError(f"RAE decoder checkpoint {path}: expected a .safetensors, .pt, .pth or .bin file")
    decoder = RAEDecoder(pixel_mean=pixel_mean, pixel_std=pixel_std, token_dim=token_dim, grid=grid, **sizes)
    state = _decoder_state(state, path)
    expected = decoder.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"RAE decoder checkpoint {path} does not match the decoder (token_dim {token_dim}, grid "
                         f"{grid}, {sizes or 'ViT-XL'}): {len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} "
                         f"unexpected, e.g. {unexpected[:3]}; {len(wrong)} of the wrong shape, e.g. {wrong[:3]}")
    decoder.load_state_dict(state, strict=True)
    return decoder.to(device).eval().requires_grad_(False)
