"""FID with pytorch-fid's Inception network (docs/method.md §2.7), never downloading anything.

The network is pytorch-fid's ``InceptionV3`` with the pool-3 block (2048 features): its
``FIDInceptionA/C/E_1/E_2`` modules and its ``forward`` (bilinear resize to 299 x 299, ``2x - 1`` to
[-1, 1]). Its weights are the port of TF ``inception-2015-12-05``, the file
``pt_inception-2015-12-05-6726825d.pth`` that pytorch-fid fetches with
``torch.hub.load_state_dict_from_url``; here it is read from an explicit path or from the same cache,
``torch.hub.get_dir()/checkpoints/`` (``$TORCH_HOME/hub/checkpoints/``), and its absence is an error
saying where to put it.

Images are uint8 ``(N, H, W, 3)`` (ADM's sample ``.npz`` layout, ``arr_0``) or float
``(N, 3, H, W)`` in [0, 1]; uint8 becomes ``x / 255`` as pytorch-fid's ``ToTensor``. Features are
float32 from the network, returned and accumulated as float64.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pytorch_fid import inception as pfi
from torch import nn

from mmfm.data.images import EXTENSIONS, center_crop_arr
from mmfm.metrics.frechet import FeatureStats, frechet_distance, load_stats, save_stats

FID_WEIGHTS_URL = pfi.FID_WEIGHTS_URL
FID_WEIGHTS_FILE = os.path.basename(urlparse(FID_WEIGHTS_URL).path)  # pt_inception-2015-12-05-6726825d.pth
DIMS = 2048


def default_weights_path() -> Path:
    """Where ``torch.hub`` caches pytorch-fid's weights: ``torch.hub.get_dir()/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


def fid_inception_skeleton() -> nn.Module:
    """pytorch-fid's ``fid_inception_v3()`` network with untrained weights, and without its download.

    torchvision's Inception v3 (1008 classes, no aux head) with pytorch-fid's patched blocks; its
    ``state_dict()`` has exactly the keys and shapes of the FID weights file.
    """
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return net


def _pool3_model(net: nn.Module) -> pfi.InceptionV3:
    """pytorch-fid's ``InceptionV3([3])`` around ``net``: the blocks its ``__init__`` assembles."""
    model = pfi.InceptionV3.__new__(pfi.InceptionV3)
    nn.Module.__init__(model)
    model.resize_input = model.normalize_input = True
    model.output_blocks, model.last_needed_block = [3], 3
    model.blocks = nn.ModuleList([
        nn.Sequential(net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, nn.MaxPool2d(kernel_size=3, stride=2)),
        nn.Sequential(net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, nn.MaxPool2d(kernel_size=3, stride=2)),
        nn.Sequential(net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a,
                      net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e),
        nn.Sequential(net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, nn.AdaptiveAvgPool2d(output_size=(1, 1))),
    ])
    return model.requires_grad_(False).eval()


def _read_state_dict(path: Path) -> dict:
    """``torch.load(weights_only=True)``; also the single-member zip that ``torch.hub`` accepts."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
            if len(members) == 1 and not members[0].is_dir():  # torch.hub's "legacy zip format"
                return torch.load(io.BytesIO(zf.read(members[0])), map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_inception(weights: str | os.PathLike | None = None, device="cpu") -> pfi.InceptionV3:
    """pytorch-fid's FID Inception (pool-3, 2048 features), in eval mode on ``device``.

    ``weights``: the ``.pth`` state dict; default :func:`default_weights_path`. Never downloads: a
    missing file is a ``ValueError`` giving the expected path and the URL to fetch it from.
    """
    path = Path(weights) if weights is not None else default_weights_path()
    if not path.is_file():
        raise ValueError(
            f"{path}: FID Inception weights not found. Download {FID_WEIGHTS_URL} to "
            f"{default_weights_path()} (the torch hub cache, $TORCH_HOME/hub/checkpoints) or pass weights=<path>")
    try:
        state = _read_state_dict(path)
    except Exception as e:  # torch raises several types for a bad or pickled-object file
        raise ValueError(f"{path}: cannot read a state dict with torch.load(weights_only=True): {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    net = fid_inception_skeleton()
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: not pytorch-fid's FID Inception state dict: {e}") from e
    return _pool3_model(net).to(device)


def _as_images(images):
    """``images`` as an indexable array/tensor and whether it is uint8 NHWC; checks the layout."""
    if isinstance(images, torch.Tensor):
        images = images.detach()
    elif not isinstance(images, np.ndarray):
        images = np.asarray(images)
    shape, dtype = tuple(images.shape), images.dtype
    if isinstance(images, torch.Tensor):
        is_uint8, is_float = dtype == torch.uint8, images.is_floating_point()
    else:
        is_uint8, is_float = dtype == np.uint8, np.issubdtype(dtype, np.floating)
    if len(shape) == 4 and is_uint8 and shape[3] == 3:
        return images, True
    if len(shape) == 4 and is_float and shape[1] == 3:
        return images, False
    raise ValueError(f"images: expected uint8 (N, H, W, 3) or float (N, 3, H, W) in [0, 1], got {dtype} {shape}")


def _to_input(chunk, nhwc_uint8: bool) -> torch.Tensor:
    """One batch as float32 ``(B, 3, H, W)`` in [0, 1], as pytorch-fid's ``ToTensor`` makes it."""
    x = chunk if isinstance(chunk, torch.Tensor) else torch.from_numpy(np.array(chunk))  # a writable copy
    if nhwc_uint8:
        return x.permute(0, 3, 1, 2).contiguous().float().div(255)
    x = x.float().contiguous()  # a channels-last layout would change the conv arithmetic
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1 or math.isnan(lo + hi):
        raise ValueError(f"images: expected float values in [0, 1], found range [{lo}, {hi}]")
    return x


def _array_batches(images, batch_size: int) -> tuple[int, Iterator[torch.Tensor]]:
    images, nhwc = _as_images(images)
    n = len(images)
    return n, (_to_input(images[i:i + batch_size], nhwc) for i in range(0, n, batch_size))


@contextlib.contextmanager
def _npz_batches(path: Path, key: str, batch_size: int):
    """Stream array ``key`` of an ``.npz`` in batches without loading it whole (as ADM's evaluator).

    Yields ``(n, iterator of input batches)``. Object arrays and Fortran order are refused.
    """
    from mmfm.recover import CorruptArtifact

    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise CorruptArtifact(path, f"not a readable .npz file ({e})") from e
    with zf:
        if f"{key}.npy" not in zf.namelist():
            names = sorted(n.removesuffix(".npy") for n in zf.namelist())
            raise ValueError(f"{path}: no array {key!r} (holds {names})")
        with zf.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            if dtype.hasobject or fortran:
                raise ValueError(f"{path}: array {key!r} is an object or Fortran-order array; expected plain images")
            _as_images(np.empty((0, *shape[1:]), dtype))  # layout check, with the usual message
            row_bytes = dtype.itemsize * math.prod(shape[1:])

            def batches():
                for i in range(0, shape[0], batch_size):
                    rows = min(batch_size, shape[0] - i)
                    buf = f.read(rows * row_bytes)
                    if len(buf) != rows * row_bytes:
                        raise ValueError(f"{path}: array {key!r} is truncated")
                    yield _to_input(np.frombuffer(buf, dtype).reshape(rows, *shape[1:]), dtype == np.uint8)

            yield shape[0], batches()


@torch.no_grad()
def _features(batches, n: int, model: nn.Module, device, batch_size: int, progress: bool) -> Iterator[np.ndarray]:
    """Pool-3 features ``(B, 2048)`` float64 of each input batch, as pytorch-fid's ``get_activations``."""
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    from mmfm.progress import progress as bar

    for x in bar(batches, total=math.ceil(n / batch_size), desc="inception", unit="batch", disable=not progress):
        pred = model(x.to(device))[0]
        yield pred.squeeze(3).squeeze(2).cpu().numpy().astype(np.float64)


def _model(model, weights, device):
    return model if model is not None else load_inception(weights, device=device or "cpu")


def inception_features(images, model: nn.Module | None = None, batch_size: int = 50, device=None,
                       *, weights=None, progress: bool = True) -> np.ndarray:
    """Pool-3 features ``(N, 2048)`` float64 of ``images`` (uint8 ``(N, H, W, 3)`` or float ``(N, 3, H, W)`` in [0, 1]).

    ``model``: from :func:`load_inception` (default: loaded from ``weights`` / the hub cache);
    ``device``: where batches go (default: the model's device).
    """
    model = _model(model, weights, device)
    n, batches = _array_batches(images, batch_size)
    feats = list(_features(batches, n, model, device, batch_size, progress))
    return np.concatenate(feats) if feats else np.zeros((0, DIMS))


@contextlib.contextmanager
def _sample_batches(samples, key: str, batch_size: int):
    """``(n, input batches)`` of an ``.npz`` (streamed), an ``.npy`` (memory-mapped) or an array."""
    if isinstance(samples, (str, os.PathLike)):
        path = Path(samples)
        if not path.is_file():
            raise ValueError(f"{path}: no such samples file")
        if path.suffix != ".npy":
            with _npz_batches(path, key, batch_size) as out:
                yield out
            return
        try:
            samples = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{path}: cannot read samples: {e}") from e
    yield _array_batches(samples, batch_size)


def _stats(n: int, batches, model, device, batch_size: int, progress: bool) -> FeatureStats:
    stats = FeatureStats(DIMS)
    for f in _features(batches, n, model, device, batch_size, progress):
        stats.update(f)
    return stats


def fid_from_samples(samples, reference_stats: str | os.PathLike, *, model: nn.Module | None = None,
                     weights=None, batch_size: int = 50, device=None, key: str = "arr_0",
                     progress: bool = True) -> dict:
    """FID of ``samples`` against the ``mu``/``sigma`` of ``reference_stats`` (see :func:`load_stats`).

    ``samples``: an ADM sample ``.npz`` (array ``key``, default ``arr_0``, streamed in batches), an
    ``.npy`` (memory-mapped), or an array/tensor as in :func:`inception_features`. Features are
    accumulated in float64 by :class:`FeatureStats`. Returns ``{"fid", "n", "mu" (2048,),
    "sigma" (2048, 2048)}``.
    """
    ref = load_stats(reference_stats)
    if ref.mu.shape != (DIMS,):
        raise ValueError(f"{reference_stats}: expected Inception pool-3 statistics, mu of shape ({DIMS},), "
                         f"got {ref.mu.shape}")
    model = _model(model, weights, device)
    with _sample_batches(samples, key, batch_size) as (n, batches):
        stats = _stats(n, batches, model, device, batch_size, progress)
    if stats.n < 2:
        raise ValueError(f"samples: FID needs at least 2 images, got {stats.n}")
    fid = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
    return {"fid": fid, "n": stats.n, "mu": stats.mu, "sigma": stats.sigma}


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder``, recursively, sorted by relative path; hidden entries skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder")
    files = sorted(
        (p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file()
         and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
        key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise ValueError(f"{folder}: holds no images ({', '.join(EXTENSIONS)})")
    return files


class _CroppedImages(torch.utils.data.Dataset):
    """ADM ``center_crop_arr`` of each file, uint8 ``(size, size, 3)``."""

    def __init__(self, files: list[Path], size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        try:
            with Image.open(self.files[i]) as img:
                return np.array(center_crop_arr(img, self.size))  # a writable copy for the collate
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{self.files[i]}: unreadable image: {e}") from e


def ref_stats_from_folder(image_folder: str | os.PathLike, out_npz: str | os.PathLike, *, size: int = 256,
                          model: nn.Module | None = None, weights=None, batch_size: int = 50, device=None,
                          num_workers: int = 0, progress: bool = True) -> dict:
    """Reference ``mu``/``sigma`` of every image under ``image_folder``, written to ``out_npz``.

    Each image is ADM-cropped to ``size x size`` (:func:`mmfm.data.images.center_crop_arr`), then
    fed as uint8 to the Inception network. Returns ``{"n", "mu", "sigma", "path"}``.
    """
    files = list_image_files(image_folder)
    model = _model(model, weights, device)
    loader = torch.utils.data.DataLoader(_CroppedImages(files, size), batch_size=batch_size,
                                         num_workers=num_workers, shuffle=False, drop_last=False)
    batches = (_to_input(b, True) for b in loader)
    stats = _stats(len(files), batches, model, device, batch_size, progress)
    if stats.n < 2:
        raise ValueError(f"{image_folder}: reference statistics need at least 2 images, found {stats.n}")
    meta = {"n": stats.n, "size": size, "folder": str(image_folder), "features": "pytorch-fid InceptionV3 pool3",
            "weights": FID_WEIGHTS_FILE}
    path = save_stats(out_npz, stats.mu, stats.sigma, meta)
    return {"n": stats.n, "mu": stats.mu, "sigma": stats.sigma, "path": path}
