"""GMM files (docs/design.md §4): safetensors tensors + a JSON sidecar; no pickle.

- CLS GMM ``x.safetensors``: ``weights (K)``, ``means (K, Dc)``, ``variances (K, Dc)``, float64 (as
  fitted; 50 MB at 8192 x 768); sidecar ``x.json`` with the fit settings, the log-likelihood per
  iteration, the backend and the data fingerprint.
- spatial GMM: ``weights (K)``, ``means (K, N, D)`` float32, ``variances (K)`` (spherical) or
  ``(K, N, D)`` (diag) float32, ``counts (K)`` int64; written by :mod:`mmfm.gmm.spatial`.

Both open memory-mapped (:func:`mmfm.io.open_tensors`) and load as a torch
:class:`~mmfm.flow.sources.GaussianMixtureSource` with :func:`load_source`. A file that is damaged, or
whose tensors disagree with its metadata or sidecar (:func:`verify`), raises
:class:`mmfm.recover.CorruptArtifact`, which names it and ends with the command that rebuilds it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmfm import io
from mmfm.gmm.em import DiagonalGMM
from mmfm.recover import CorruptArtifact

CLS_KIND = "cls-gmm"
SPATIAL_KIND = "spatial-gmm"
PARTIAL_KIND = "spatial-partial"  # mmfm.gmm.spatial's map output


def save_cls_gmm(path, gmm: DiagonalGMM, sidecar: dict) -> None:
    """Write the CLS mixture and its sidecar, each atomically; the tensors last, so their presence
    means the whole fit was written (on an error, a previous pair is left as it was)."""
    meta = {"kind": CLS_KIND, "k": gmm.k, "dim": gmm.dim, "covariance": "diag"}
    with io.sidecar_first(path, {**meta, **sidecar}):
        io.save_tensors(path, {"weights": gmm.weights, "means": gmm.means, "variances": gmm.variances}, meta)


def read_sidecar(path) -> dict:
    """The sidecar of the GMM file ``path`` (``{}`` if none), checked against the file's header metadata."""
    _, meta, _ = io.read_header(path)
    return io.read_sidecar(path, meta)


def expected_shapes(meta: dict) -> dict[str, tuple[int, ...]] | None:
    """The tensor shapes a GMM file's metadata implies (``kind`` cls-gmm, spatial-gmm, spatial-partial);
    None for another kind. CLS: ``weights (K)``, ``means``/``variances (K, Dc)``; spatial: ``weights``,
    ``counts (K)``, ``means (K, N, D)``, ``variances (K)`` spherical or ``(K, N, D)`` diag; a partial:
    ``cls_weights (K)`` (its per-mode tensors have the count of modes it touched, checked by :func:`verify`)."""
    kind = meta.get("kind")
    try:
        if kind == CLS_KIND:
            k, d = int(meta["k"]), int(meta["dim"])
            return {"weights": (k,), "means": (k, d), "variances": (k, d)}
        if kind == SPATIAL_KIND:
            k, n, d = int(meta["k"]), int(np.prod(meta["grid"])), int(meta["token_dim"])
            var = (k, n, d) if meta["covariance"] == "diag" else (k,)
            return {"weights": (k,), "means": (k, n, d), "variances": var, "counts": (k,)}
        if kind == PARTIAL_KIND:
            return {"cls_weights": (int(meta["k"]),)}
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"its {kind} metadata lacks or garbles {err}") from None
    return None


def verify(path) -> dict:
    """Check a GMM file (or a spatial partial): its header against its size (:func:`mmfm.io.read_header`),
    its sidecar against its header's metadata, and the tensor shapes against that metadata (the sidecar's
    values, where it has one). Returns the metadata; raises :class:`~mmfm.recover.CorruptArtifact`."""
    header, meta, _ = io.read_header(path)
    side = io.read_sidecar(path, meta)
    shapes = {k: tuple(h["shape"]) for k, h in header.items()}
    try:
        want = expected_shapes({**meta, **side})
    except ValueError as err:
        raise CorruptArtifact(io.sidecar_path(path) if side else path, str(err)) from None
    if want is None:
        raise CorruptArtifact(path, f"not a GMM file (kind {meta.get('kind')!r})")
    if meta["kind"] == PARTIAL_KIND and "modes" in shapes:
        m = shapes["modes"][0]
        n, d = int(np.prod(meta["grid"])), int(meta["token_dim"])
        want.update(modes=(m,), counts=(m,), sum=(m, n, d), sumsq=(m, n, d) if meta["covariance"] == "diag" else (m,))
    missing = sorted(set(want) - set(shapes))
    if missing:
        raise CorruptArtifact(path, f"missing tensor(s) {missing}; it holds {sorted(shapes)}")
    for name, shape in want.items():
        if shapes[name] != shape:
            where = f"{io.sidecar_path(path).name} and its header" if side else "its metadata"
            raise CorruptArtifact(io.sidecar_path(path) if side else path,
                                  f"tensor {name!r} has shape {shapes[name]}, {where} imply {shape}")
    return {**meta, **side}


def load_cls_gmm(path) -> DiagonalGMM:
    """The CLS mixture of ``path`` (its tensors copied to float64)."""
    tensors, meta = io.open_tensors(path)
    missing = {"weights", "means", "variances"} - set(tensors)
    if missing:
        raise CorruptArtifact(path, f"not a GMM file, missing {sorted(missing)}")
    if tensors["variances"].shape != tensors["means"].shape or tensors["means"].ndim != 2:
        raise CorruptArtifact(path, f"not a CLS (diagonal, 2-D) GMM: means {tensors['means'].shape}, "
                                    f"variances {tensors['variances'].shape}")
    try:
        return DiagonalGMM(np.array(tensors["weights"]), np.array(tensors["means"]), np.array(tensors["variances"]))
    except ValueError as err:
        raise CorruptArtifact(path, str(err)) from None


def fingerprint(path) -> str:
    """A digest of a GMM file's tensors (what a spatial partial records about the CLS mixture)."""
    import hashlib

    tensors, _ = io.open_tensors(path)
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(np.ascontiguousarray(tensors[name]).tobytes())
    return h.hexdigest()


def load_source(path, device=None, dtype=None):
    """Any GMM file (CLS or spatial) as a torch ``GaussianMixtureSource`` (float32 by default)."""
    import torch

    from mmfm.flow.sources import GaussianMixtureSource

    tensors, _ = io.open_tensors(path, ["weights", "means", "variances"])
    dtype = dtype or torch.float32
    as_t = lambda a, dt: torch.from_numpy(np.array(a)).to(device=device, dtype=dt)  # noqa: E731
    w = as_t(tensors["weights"], torch.float64)
    try:
        return GaussianMixtureSource(w / w.sum(), as_t(tensors["means"], dtype), as_t(tensors["variances"], dtype))
    except ValueError as err:
        raise CorruptArtifact(path, str(err)) from None


def plot_weights(weights: np.ndarray, path, title: str = "mixture weights") -> Path:
    """Sorted weights as bars and their histogram (the release's ``_weights.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = np.sort(np.asarray(weights, dtype=np.float64))[::-1]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    a.bar(np.arange(len(w)), w, width=1.0, color="tab:blue")
    a.axhline(1.0 / len(w), color="k", lw=0.8, ls="--", label="uniform 1/K")
    a.set(xlabel="component (sorted)", ylabel="weight", title=f"{title}: K = {len(w)}")
    a.legend()
    b.hist(w, bins=min(100, max(10, len(w) // 20)), color="tab:blue")
    b.set(xlabel="weight", ylabel="components", title=f"min {w[-1]:.2e}, max {w[0]:.2e}")
    fig.tight_layout()
    path = Path(path)
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path
