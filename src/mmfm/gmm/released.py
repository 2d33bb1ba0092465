"""Import the released scikit-learn pickles (docs/method.md §3.2-3.3) into our safetensors files.

This is the one place that unpickles, and only when asked: unpickling runs code from the file, so
:func:`import_released` refuses without ``allow_pickle=True`` and says so when it proceeds. Even
then the unpickler resolves only the globals such a file needs (numpy, scipy and scikit-learn
names, plain builtins), so a file naming ``os.system`` or the like is refused, not run.

- ``gmm_n8192_diag_k-means++.pkl`` (CLS): ``model.weights_``, ``means_`` and ``covariances_`` (diag).
- ``spatial_gmm_from_cls_n8192_diag_k-means++_flip.pkl`` (spatial, spherical): ``means`` flattened
  channels-first ``(K, C*H*W)`` are permuted to our token layout ``(K, H*W, C)``; ``variances (K)``;
  ``weights`` (the CLS EM weights); ``cluster_counts`` when present.
"""

from __future__ import annotations

import math
import pickle
import sys
from pathlib import Path

import numpy as np

from mmfm import io
from mmfm.gmm import files
from mmfm.gmm.em import DiagonalGMM


_SAFE_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes",
                  "bytearray", "bool", "slice", "range", "object"}
_SAFE_MODULES = ("numpy", "scipy", "sklearn")


class _ReleasedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals a released GMM pickle needs."""

    def find_class(self, module: str, name: str):
        top = module.split(".")[0]
        ok = (top in _SAFE_MODULES
              or (module == "builtins" and name in _SAFE_BUILTINS)
              or (module, name) in {("collections", "OrderedDict"), ("copyreg", "_reconstructor"),
                                    ("datetime", "datetime"), ("datetime", "date"), ("datetime", "timedelta")})
        if not ok:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: not part of a GMM pickle")
        return super().find_class(module, name)


def _get(obj, model, key, attr):
    if isinstance(obj, dict) and key in obj and obj[key] is not None:
        return np.asarray(obj[key])
    if model is not None and hasattr(model, attr):
        return np.asarray(getattr(model, attr))
    return None


def _plain_data(value, depth: int = 0):
    """The plain-data part of the pickle's config/metadata (numbers, strings, lists, dicts)."""
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict) and depth < 4:
        return {str(k): _plain_data(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and depth < 4 and len(value) < 1000:
        return [_plain_data(v, depth + 1) for v in value]
    return repr(value)[:200]


def import_released(path, out, *, allow_pickle: bool = False, channels: int = 768) -> dict:
    """Convert a released GMM pickle at ``path`` to ``out`` (+ sidecar); returns the sidecar."""
    path, out = Path(path), Path(out)
    if not allow_pickle:
        raise ValueError(f"{path}: reading a pickle executes code stored in the file; pass --allow-pickle "
                         "(allow_pickle=True) only for files you trust")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    print(f"mmfm import-gmm: unpickling {path} (this executes code from the file)", file=sys.stderr)
    with open(path, "rb") as f:
        try:
            obj = _ReleasedUnpickler(f).load()  # explicit opt-in above; globals restricted
        except pickle.UnpicklingError as err:
            raise ValueError(f"{path}: {err}") from None
    model = obj.get("model") if isinstance(obj, dict) else obj
    config = obj.get("config", {}) if isinstance(obj, dict) else {}
    config = config if isinstance(config, dict) else {}
    cov_type = config.get("covariance_type") or getattr(model, "covariance_type", None)
    weights = _get(obj, model, "weights", "weights_")
    means = _get(obj, model, "means", "means_")
    variances = _get(obj, model, "variances", "covariances_")
    if weights is None or means is None or variances is None:
        raise ValueError(f"{path}: expected a GaussianMixture or a dict with model/means/variances/weights")
    sidecar = {"imported_from": str(path), "config": _plain_data(config),
               "metadata": _plain_data(obj.get("metadata", {}) if isinstance(obj, dict) else {})}
    weights = weights.astype(np.float64) / weights.sum()

    if variances.ndim == 2:  # CLS mixture, diagonal
        if cov_type not in (None, "diag"):
            raise ValueError(f"{path}: covariance_type {cov_type!r} with 2-D variances; only 'diag' is supported")
        files.save_cls_gmm(out, DiagonalGMM(weights, means, variances), sidecar)
        return {"kind": files.CLS_KIND, "k": len(weights), "dim": means.shape[1], **sidecar}

    # spatial mixture, spherical, channels-first flattened means
    k, flat = means.shape
    hw = flat // channels
    side = math.isqrt(hw)
    if hw * channels != flat or side * side != hw:
        raise ValueError(f"{path}: means have {flat} values per mode, not channels x H x W with "
                         f"channels = {channels} and H = W; pass the encoder width with --channels")
    counts = _get(obj, model, "cluster_counts", "cluster_counts_")
    meta = {"kind": files.SPATIAL_KIND, "k": k, "grid": [side, side], "token_dim": channels,
            "covariance": "spherical", "flip": bool(config.get("flip_augmentation", False)),
            "weights_from": "cls", **sidecar}
    specs = {"weights": ((k,), np.float64), "means": ((k, hw, channels), np.float32),
             "variances": ((k,), np.float32), "counts": ((k,), np.int64)}
    with io.TensorFile(out, specs, meta) as f:
        f["weights"][:] = weights
        f["variances"][:] = variances
        f["counts"][:] = counts if counts is not None else 0
        for lo in range(0, k, 256):  # permute (C, H*W) -> (H*W, C) a block of modes at a time
            f["means"][lo:lo + 256] = means[lo:lo + 256].reshape(-1, channels, hw).transpose(0, 2, 1)
        f.commit()
    io.write_json(io.sidecar_path(out), meta)
    return meta
