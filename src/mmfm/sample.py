"""Sampling (docs/method.md §2.5, §3.6): source noise through the ODE, then the tokenizer's decoder.

**Per-sample seeds.** Sample ``i`` of a set draws everything it needs (its mode from the mixture
weights, or its class label, then its source noise) from its own CPU generator seeded by
``(seed, i)`` (:func:`sample_seed`). A set of ``n`` samples is therefore the same whichever process
computes which index and however they are batched: ``world_size`` processes take the indices
``rank, rank + world_size, ...`` and :func:`merge_parts` puts them back in index order.

**Conditioning.** ``none``: the network sees ``(x, t)``; ``mode``: it also sees each sample's GMM
mode as ``y`` (the mode the noise was drawn from, MM-FM §3.6); ``class``: labels drawn uniformly (or
given) as ``y``. The ODE state and the source noise are float32 (docs/method.md §6.10); the velocity is
whatever the caller passes (a DiTDH, an :class:`~mmfm.flow.guidance.Autoguidance` of two, a
:class:`~mmfm.flow.guidance.ClassifierFreeGuidance`, a released network behind
:class:`~mmfm.flow.path.RAEConvention`), always in the paper's convention (``t = 0`` source).

Outputs: ADM's ``.npz`` (``arr_0`` uint8 ``(n, H, W, 3)``, ``arr_1`` labels for class-conditional
sets) and a PNG grid of the first images.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmfm.flow.dfm import DFM_SOLVERS, default_starts, dfm_schedule, solve_dfm, source_stages, split_steps
from mmfm.flow.flowmap import FLOWMAP_MODES, FLOWMAP_SOLVERS, solve_flowmap
from mmfm.flow.pyramid import LaplacianPyramid
from mmfm.flow.solvers import GM_SOLVERS, SOLVERS, gm_substeps, solve_gm, solve_ode
from mmfm.flow.sources import GaussianMixtureSource, GaussianSource
from mmfm.flow.time import time_grid
from mmfm.io import atomic_path

CONDITIONINGS = ("none", "class", "mode")


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of the set drawn with ``seed`` (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass
class SampleSet:
    """``latents (n, N, D)`` float32 at the indices ``index (n,)``; ``modes`` / ``labels`` ``(n,)`` or None."""

    index: torch.Tensor
    latents: torch.Tensor
    modes: torch.Tensor | None
    labels: torch.Tensor | None
    nfe: int


def draw_starts(source, indices, seed: int, *, conditioning: str = "none", num_classes: int = 0,
                modes: torch.Tensor | None = None, labels: torch.Tensor | None = None):
    """``(x0 (n, *event) float32, modes or None, labels or None)`` for the given sample indices, each
    from its own generator (module doc); ``modes`` / ``labels`` of the whole set (indexed by sample
    index) fix them instead of drawing."""
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"conditioning: expected one of {CONDITIONINGS}, got {conditioning!r}")
    gmm = isinstance(source, GaussianMixtureSource)
    if conditioning == "mode" and not gmm:
        raise ValueError("conditioning: 'mode' needs a Gaussian-mixture source")
    if conditioning == "class" and num_classes < 1 and labels is None:
        raise ValueError("num_classes: class-conditional sampling needs num_classes > 0 or given labels")
    xs, ks, ys = [], [], []
    for i in indices:
        g = torch.Generator().manual_seed(sample_seed(seed, int(i)))
        if gmm:
            k = modes[i:i + 1] if modes is not None else source.sample_modes(1, g)
            x0, k = source.sample(1, modes=k, generator=g)
            ks.append(k.cpu())
        else:
            if modes is not None:
                raise ValueError("modes: a Gaussian source has no modes")
            x0, _ = source.sample(1, generator=g)
        if conditioning == "class":
            ys.append(labels[i:i + 1].long() if labels is not None else
                      torch.randint(num_classes, (1,), generator=g))
        xs.append(x0.float())
    empty = torch.zeros(0, dtype=torch.long)
    k = torch.cat(ks) if ks else (empty if gmm else None)
    y = (torch.cat(ys) if ys else empty) if conditioning == "class" else None
    return torch.cat(xs) if xs else torch.zeros(0, *source.event_shape), k, y


def source_component(source, modes: torch.Tensor | None, device):
    """``(m (n, N, D), var0 (n,))`` float32 of each row's Gaussian source component, the GMM mode it was drawn
    from (spherical GMM), or ``(None, None)`` for ``N(0, I)`` (GMFlow's solvers, :func:`mmfm.flow.solvers.solve_gm`)."""
    if not isinstance(source, GaussianMixtureSource):
        return None, None
    if source.covariance != "spherical":
        raise ValueError("source: GM-ODE / GM-SDE need a spherical GMM (one variance per mode, shared by the "
                         f"row's cells); this one is {source.covariance}")
    return source.component(modes, device)


def sample_latents(velocity, source, n: int, *, seed: int = 0, conditioning: str = "none", num_classes: int = 0,
                   modes: torch.Tensor | None = None, labels: torch.Tensor | None = None, steps: int = 50,
                   method: str = "euler", shift: float = 1.0, end: float = 1.0, batch_size: int = 64,
                   rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                   progress: bool = False, gm: dict | None = None, dfm: dict | None = None) -> SampleSet:
    """This process's part (indices ``rank::world_size``) of an ``n``-sample set: noise from ``source``
    (a :class:`GaussianSource` or :class:`GaussianMixtureSource`) integrated from ``t = 0`` over
    ``time_grid(steps, shift, end)`` with ``method`` (``euler``, ``heun``, ``midpoint``, ``dopri5``).

    ``gm-ode`` / ``gm-sde`` (GMFlow, :func:`mmfm.flow.solvers.solve_gm`): ``velocity`` is then the GM network
    (it returns a :class:`~mmfm.flow.gm.GMOutput`), ``steps`` its network calls, each row's source component
    its mode's (:func:`source_component`), and ``gm`` holds ``substeps`` (None: ``gm_substeps(steps)``; 1 for
    GM-SDE), ``order`` [2], ``guidance`` (None, or ``{"guide", "scale", "interval", "orthogonal"}``: the guide
    network, called with the batch's conditioning, of a :class:`~mmfm.flow.guidance.ProbabilisticGuidance`) and
    ``gm2_coefs`` [(0.005, 1.0)]. The fine grid is ``time_grid(steps * substeps, shift, end)``. GM-SDE's noise
    comes from a generator seeded by ``(seed, first index of the batch)``: its set depends on how it is batched.

    ``flowmap`` / ``flowmap-restart`` (DMF, :func:`mmfm.flow.flowmap.solve_flowmap`): ``velocity`` is then the flow
    map ``U(x, t, r=...)``, jumped over ``time_grid(steps, shift, end)`` in ``steps`` network calls; the restart
    sampler's fresh source draws (from each row's own mode) come from a generator seeded like GM-SDE's.

    ``dfm-euler`` (DFM, :func:`mmfm.flow.dfm.solve_dfm`): ``velocity`` is then the DFM network (packed stages and
    ``(B, S)`` times), ``steps`` its network calls split over the stages by ``dfm["ratio"]`` [4]
    (:func:`~mmfm.flow.dfm.split_steps`) with the start thresholds ``dfm["starts"]`` [0.9 each]; ``dfm["stages"]``
    and ``dfm["source"]`` (``bands``, ``independent`` or ``decompose``) are the network's. The coarse stages'
    fresh normals of sample ``i`` come from its own generator, seeded by ``(seed + 2, i)``: the set is the same
    however it is batched. ``shift`` and ``end`` do not apply (the stage schedule is linear in the step index)."""
    from mmfm.progress import progress as tqdm

    if not isinstance(source, (GaussianSource, GaussianMixtureSource)):
        raise ValueError(f"source: expected a GaussianSource or GaussianMixtureSource, got {type(source).__name__}")
    methods = SOLVERS + GM_SOLVERS + FLOWMAP_SOLVERS + DFM_SOLVERS
    if method not in methods:
        raise ValueError(f"method: expected one of {methods}, got {method!r}")
    for key, value in (("n", n), ("batch_size", batch_size), ("world_size", world_size)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{key}: expected a positive integer, got {value!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size = {world_size}, got {rank}")
    for name, given in (("modes", modes), ("labels", labels)):
        if given is not None and tuple(given.shape) != (n,):
            raise ValueError(f"{name}: expected shape ({n},) (one per sample of the set), got {tuple(given.shape)}")
    gm = dict(gm or {})
    sub = 1
    if method in GM_SOLVERS:
        sub = 1 if method == "gm-sde" else (gm.get("substeps") or gm_substeps(steps))
    grid = time_grid(steps * sub, shift=shift, end=end, device=device, dtype=torch.float32)
    if method in DFM_SOLVERS:
        if not dfm or not dfm.get("stages"):
            raise ValueError("dfm: dfm-euler needs the DFM network's stages and source (dfm={'stages', 'source'})")
        pyramid = LaplacianPyramid(int(dfm["stages"]), source.event_shape[0])
        starts = dfm.get("starts") or default_starts(pyramid.stages)
        schedule = dfm_schedule(split_steps(steps, pyramid.stages, dfm.get("ratio") or 4.0), list(starts))
    mine = torch.arange(rank, n, world_size)
    out, ks, ys, nfe = [], [], [], 0
    for lo in tqdm(range(0, len(mine), batch_size), desc="sample", unit="batch", disable=not progress):
        idx = mine[lo:lo + batch_size]
        x0, k, y = draw_starts(source, idx.tolist(), seed, conditioning=conditioning, num_classes=num_classes,
                               modes=modes, labels=labels)
        cond = {"mode": k, "class": y}.get(conditioning)
        kw = {} if cond is None else {"y": cond.to(device)}
        with torch.no_grad():
            if method in GM_SOLVERS:
                m, var0 = source_component(source, k, device)
                gen = torch.Generator(device=device).manual_seed(sample_seed(seed + 1, int(idx[0])))
                guidance = None
                if gm.get("guidance"):  # the guide gets the batch's conditioning too (a mode-conditional guide)
                    from mmfm.flow.guidance import ProbabilisticGuidance

                    g = gm["guidance"]
                    guidance = ProbabilisticGuidance(lambda x, t, net=g["guide"]: net(x, t, **kw), g["scale"],
                                                     g.get("interval", (0.0, 1.0)), g.get("orthogonal", 1.0))
                res = solve_gm(lambda x, t: velocity(x, t, **kw), x0.to(device), grid, substeps=sub,
                               order=int(gm.get("order", 2)), mode=method.removeprefix("gm-"), m=m, var0=var0,
                               guidance=guidance, generator=gen,
                               gm2_coefs=tuple(gm.get("gm2_coefs") or (0.005, 1.0)))
            elif method in FLOWMAP_SOLVERS:
                gen = torch.Generator(device=device).manual_seed(sample_seed(seed + 1, int(idx[0])))
                res = solve_flowmap(velocity, x0.to(device), grid, mode=FLOWMAP_MODES[method], cond=kw,
                                    source=source, modes=None if k is None else k.to(device), generator=gen)
            elif method in DFM_SOLVERS:  # (one stage: the DiTDH itself, on one time per row)
                call = (lambda x, t: velocity(x, t[:, 0], **kw)) if pyramid.stages == 1 else \
                    (lambda x, t: velocity(x, t, **kw))
                res = solve_dfm(call, stage_starts(source, pyramid, dfm["source"], x0, k, idx, seed, device),
                                schedule, pyramid)
            else:
                res = solve_ode(lambda x, t: velocity(x, t, **kw), x0.to(device), grid, method)
        out.append(res.x.float().cpu())
        nfe += res.nfe
        if k is not None:
            ks.append(k)
        if y is not None:
            ys.append(y)
    cat = (lambda parts: torch.cat(parts) if parts else None)  # noqa: E731
    return SampleSet(mine, cat(out) if out else torch.zeros(0, *source.event_shape), cat(ks), cat(ys), nfe)


def stage_starts(source, pyramid: LaplacianPyramid, kind: str, x0: torch.Tensor, modes, indices, seed: int,
                 device) -> list[torch.Tensor]:
    """The source's stages of a batch (:func:`mmfm.flow.dfm.source_stages`) on ``device``: its full-resolution
    draw ``x0``, each row's mode component, and the coarse stages' normals of sample ``i`` from its own generator
    (``(seed + 2, i)``)."""
    x0 = x0.to(device)
    if kind == "decompose" or pyramid.stages == 1:
        return source_stages(kind, pyramid, x0)
    coarse = sum(pyramid.sizes[:-1])
    gens = [torch.Generator().manual_seed(sample_seed(seed + 2, i)) for i in map(int, indices)]
    z = torch.stack([torch.randn(coarse, x0.shape[2], generator=g) for g in gens]).to(device)
    normals = list(z.split(pyramid.sizes[:-1], dim=1))
    mean = var = None
    if modes is not None and hasattr(source, "means"):
        mean, var = source.component(modes, device)
    return source_stages(kind, pyramid, x0, mean=mean, var=var, normals=normals)


def merge_parts(parts: list[SampleSet]) -> SampleSet:
    """The parts of several processes as one set in sample-index order (each index exactly once)."""
    index = torch.cat([p.index for p in parts])
    order = torch.argsort(index)
    if not torch.equal(index[order], torch.arange(len(index))):
        raise ValueError("parts: expected every sample index 0 .. n-1 exactly once")
    pick = (lambda name: None if getattr(parts[0], name) is None else  # noqa: E731
            torch.cat([getattr(p, name) for p in parts])[order])
    return SampleSet(index[order], pick("latents"), pick("modes"), pick("labels"), sum(p.nfe for p in parts))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images ``(B, 3, H, W)`` in [0, 1] (clamped here, at save time) -> uint8 ``(B, H, W, 3)``, rounded."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def decode_latents(tokenizer, latents: torch.Tensor, norm=None, batch_size: int = 64) -> np.ndarray:
    """Latents ``(n, N, D)`` -> uint8 images ``(n, H, W, 3)``: undo the latent normalization (if the
    shards were normalized), then the tokenizer's decoder."""
    out = []
    for lo in range(0, len(latents), batch_size):
        z = latents[lo:lo + batch_size]
        if norm is not None:
            z = norm.denormalize(z)
        with torch.no_grad():
            out.append(to_uint8(tokenizer.decode(z)))
    return np.concatenate(out) if out else np.zeros((0, 1, 1, 3), np.uint8)


def save_npz(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None = None,
             meta: dict | None = None) -> Path:
    """ADM's sample file: ``arr_0`` uint8 ``(n, H, W, 3)`` and, for class-conditional sets, ``arr_1``; with
    ``meta``, a ``meta`` entry holding it as a JSON string (``json.loads(str(np.load(path)["meta"]))``; ADM's
    evaluator and pytorch-fid read ``arr_0`` only)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected uint8 (n, H, W, 3), got {images.dtype} {images.shape}")
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            extra = {} if labels is None else {"arr_1": np.asarray(labels)}
            if meta is not None:
                extra["meta"] = np.array(json.dumps(meta, sort_keys=True))
            np.savez(f, arr_0=images, **extra)
    return path


def save_grid(path: str | os.PathLike, images: np.ndarray, max_images: int = 64, min_cell: int = 64) -> Path:
    """The first ``max_images`` of uint8 ``(n, H, W, 3)`` as a square-ish PNG grid with 2-px white gutters.

    Images smaller than ``min_cell`` px are enlarged by the integer nearest-neighbour factor
    ``f = ceil(min_cell / max(H, W))`` (8 x 8 digits -> 64 x 64 cells), the gutters with them (``2 f`` px);
    larger images are tiled as they are."""
    from PIL import Image

    imgs = images[:max_images]
    if not len(imgs):
        raise ValueError("images: nothing to put in a grid")
    h, w = imgs.shape[1:3]
    f = math.ceil(min_cell / max(h, w)) if max(h, w) < min_cell else 1
    if f > 1:
        imgs = imgs.repeat(f, axis=1).repeat(f, axis=2)
    cols = int(np.ceil(np.sqrt(len(imgs))))
    rows = -(-len(imgs) // cols)
    h, w, g = h * f, w * f, 2 * f
    canvas = np.full((rows * (h + g) + g, cols * (w + g) + g, 3), 255, np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        canvas[g + r * (h + g):g + r * (h + g) + h, g + c * (w + g):g + c * (w + g) + w] = im
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
    return path


#: ``sample.precision``: how the velocity networks run (the ODE state, the noise and the guidance
#: combination stay float32).
PRECISIONS = ("fp32", "bf16")


class NetworkPrecision(torch.nn.Module):
    """``network(x, t, **cond)`` under bf16 autocast on ``x``'s device, its output cast back to float32
    (``precision="bf16"``), or as is (``"fp32"``). Each network (main, guide) is wrapped on its own, so
    the guidance combination ``v_g + w (v_m - v_g)`` is formed in float32."""

    def __init__(self, network: torch.nn.Module, precision: str = "fp32"):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {list(PRECISIONS)}, got {precision!r}")
        self.network, self.precision = network, precision

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        if self.precision == "fp32":
            return self.network(x, t, **cond)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = self.network(x, t, **cond)
        if isinstance(out, torch.Tensor):
            return out.float()
        from mmfm.flow.gm import GMOutput  # a GMFlow network's mixture, in float32

        return GMOutput(out.means.float(), out.logits.float(), out.logstd.float())


def noise_source(source: str | os.PathLike, shape: tuple[int, int]):
    """``"gaussian"`` -> ``N(0, I)`` over ``shape``; else a GMM file, whose latents must have ``shape``."""
    from mmfm.gmm.files import load_source

    src = GaussianSource(shape) if str(source) == "gaussian" else load_source(source)
    if tuple(src.event_shape) != tuple(shape):
        raise ValueError(f"{source}: the source's latents are {tuple(src.event_shape)}, the model's {tuple(shape)}")
    return src


# ------------------------------------------------------------------------------------------------ the export's record

#: The keys of :func:`mmfm.encoders.load_tokenizer` a sampling command may give (``None``: not given).
TOKENIZER_KEYS = ("name", "path", "image_size", "patch_size", "pool", "precision", "decoder")
#: What must agree between the tokenizer an export records and the one it is decoded with.
AGREEING_KEYS = ("name", "revision", "grid", "token_dim", "patch_size")


def _describe(name, patch_size=None, path=None) -> str:
    """``pixels (patch 4)``, ``dinov2 (path)``: a tokenizer, for messages."""
    if name == "pixels":
        return f"pixels (patch {patch_size})"
    return f"{name} ({path})" if path else str(name)


def _model_shape(meta: dict) -> tuple[int, int]:
    return int(meta["num_tokens"]), int(meta["in_channels"])


def tokenizer_spec(model, meta: dict, encoder: dict | None = None) -> dict:
    """Keyword arguments of :func:`mmfm.encoders.load_tokenizer` (but ``device``) that decode ``model``'s samples:
    the tokenizer its export records (``meta["tokenizer"]``, :func:`mmfm.models.velocity.tokenizer_record`), each
    key of ``encoder`` (:data:`TOKENIZER_KEYS`; None: not given) overriding it; another ``name`` than the
    recorded one replaces the record. An export without the record (older, or imported) needs
    ``encoder["name"]``; a transformers tokenizer needs its RAE ``decoder``."""
    given = {k: v for k, v in (encoder or {}).items() if v is not None}
    unknown = sorted(set(given) - set(TOKENIZER_KEYS))
    if unknown:
        raise ValueError(f"encoder: unknown keys {unknown}; expected some of {list(TOKENIZER_KEYS)}")
    rec = meta.get("tokenizer")
    if rec is None or given.get("name", rec["name"]) != rec["name"]:
        if "name" not in given:
            raise ValueError(f"{model}: the export does not record its tokenizer (an older or imported export); "
                             "pass --encoder and its settings (--patch-size, --image-size, --encoder-path, --decoder, "
                             "--norm-stats) as the model was trained")
        kw = given
    else:
        kw = {**{k: rec.get(k) for k in TOKENIZER_KEYS}, **given}
    name = kw["name"]
    spec = {"name": name, "path": kw.get("path"), "image_size": kw.get("image_size"),
            "precision": kw.get("precision") or "fp32"}
    if name == "pixels":
        spec.update({k: kw[k] for k in ("patch_size", "pool") if kw.get(k) is not None})
        if kw.get("decoder") not in (None, "exact"):
            spec["decoder"] = kw["decoder"]  # refused by load_tokenizer, with its reason
    elif not kw.get("decoder"):
        raise ValueError(f"{model}: the {name} tokenizer needs its RAE decoder to turn samples into images; pass "
                         "--decoder (the config's decoder.path)")
    else:
        spec["decoder"] = kw["decoder"]
    return spec


def check_tokenizer(model, meta: dict, tokenizer, norm=None) -> None:
    """Before any network is loaded: ``tokenizer`` gives the model's tokens ``(num_tokens, in_channels)``, agrees
    with the tokenizer the export records on :data:`AGREEING_KEYS` (its ``metadata()``), and decodes one zero
    latent (through ``norm``'s inverse). Errors name ``model`` and both sides."""
    want, rec = _model_shape(meta), meta.get("tokenizer")
    got = (int(tokenizer.num_tokens), int(tokenizer.token_dim))
    mine = tokenizer.metadata()
    desc = _describe(mine.get("encoder"), mine.get("patch_size"), mine.get("model"))
    if got != want:
        advice = "pass --encoder (and --patch-size / --image-size / --encoder-path) of the tokenizer it was trained on"
        if rec is not None:
            recorded = _describe(rec["name"], rec.get("patch_size"), rec.get("path"))
            advice = f"it records {recorded}: drop the tokenizer flags"
        raise ValueError(f"{model}: the model takes {want} tokens, the tokenizer {desc} gives {got}; {advice}, or "
                         "retrain")
    if rec is not None:
        ours = {**mine, "name": mine.get("encoder"), "grid": list(mine.get("grid", ()))}
        differ = [f"{k} {rec.get(k)!r} (recorded) vs {ours.get(k)!r}" for k in AGREEING_KEYS
                  if rec.get(k) != ours.get(k)]
        if differ:
            raise ValueError(f"{model}: trained on {_describe(rec['name'], rec.get('patch_size'), rec.get('path'))} "
                             f"tokens, decoded with {desc}: {'; '.join(differ)}; drop the encoder flags (the export "
                             "records its tokenizer) or pass matching ones")
    try:
        decode_latents(tokenizer, torch.zeros(1, *want), norm, 1)
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"{model}: the tokenizer {desc} cannot decode the model's {want} tokens: {err}") from None


def resolve_norm(model, meta: dict, norm=None):
    """The latent normalization to undo before decoding ``model``'s samples: ``norm`` (a
    :class:`~mmfm.encoders.normalization.LatentNorm` or a statistics file) or the one its export records; a given
    one must be the recorded one (its statistics' SHA-256), and its shape the model's tokens'."""
    from mmfm.encoders.normalization import load_norm_stats

    if isinstance(norm, (str, os.PathLike)):
        norm = load_norm_stats(norm)
    rec = meta.get("tokenizer")
    recorded = None if rec is None else rec.get("normalization")
    if rec is not None and recorded is None and norm is not None:
        raise ValueError(f"{model}: trained on tokens without normalization, but normalization statistics "
                         f"{norm.source} were given; drop --norm-stats")
    if recorded is not None:
        if norm is None:
            try:
                norm = load_norm_stats(recorded.get("file"))
            except (ValueError, OSError, TypeError) as err:
                raise ValueError(f"{model}: its tokens were normalized with {recorded.get('file')} (sha256 "
                                 f"{recorded.get('sha256')}), which cannot be read ({err}); pass --norm-stats with "
                                 "those statistics") from None
        if recorded.get("sha256") and norm.digest() != recorded["sha256"]:
            raise ValueError(f"{norm.source}: normalization statistics {norm.digest()}, but {model} was trained on "
                             f"tokens normalized with {recorded.get('file')} ({recorded['sha256']}); pass those as "
                             "--norm-stats")
    if norm is not None and tuple(norm.shape) != _model_shape(meta):
        raise ValueError(f"{norm.source}: normalization statistics of shape {tuple(norm.shape)}, the model {model} "
                         f"takes {_model_shape(meta)} tokens")
    return norm


def resolve_source(model, meta: dict, source: str | os.PathLike | None = None) -> str:
    """The noise of ``model``'s samples, checked by the GMM file's header before anything is loaded: ``source``
    (``"gaussian"`` or a GMM ``.safetensors``) or the one its export records (none recorded: ``gaussian``). A GMM's
    means ``(K, N, D)`` must fit the model's ``(num_tokens, in_channels)`` and, for a mode-conditional model,
    ``K`` its modes; another source than the recorded one (kind or fingerprint) is warned about."""
    import warnings

    from mmfm.models.velocity import recorded_source, source_fingerprint

    rec, cond, want = recorded_source(meta) or {}, meta["conditioning"], _model_shape(meta)
    if source is None:
        if rec.get("kind", "gaussian") == "gaussian":
            source = "gaussian"
        elif rec.get("file"):
            source = rec["file"]
        else:
            raise ValueError(f"{model}: trained with a GMM source, but the export does not name the file; pass "
                             "--source with its spatial GMM .safetensors")
    source = str(source)
    if source == "gaussian":
        if cond == "mode":
            raise ValueError(f"{model}: a mode-conditional model needs a Gaussian-mixture source, not 'gaussian'")
        if rec.get("kind") == "gmm":
            warnings.warn(f"{model}: trained with noise from the GMM {rec.get('file')}, sampled from N(0, I)",
                          stacklevel=2)
        return source
    try:
        fp = source_fingerprint(source)
    except ValueError as err:
        named = " (the source the export records; pass --source)" if source == rec.get("file") else ""
        raise ValueError(f"{err}{named}") from None
    k, *event = fp["shape"]
    if tuple(event) != want:
        raise ValueError(f"{source}: the GMM's means are (K, N, D) = {tuple(fp['shape'])}, the model {model} takes "
                         f"{want} tokens; pass --source with the spatial GMM it was trained with, or retrain")
    if cond == "mode" and k != meta["num_classes"]:
        raise ValueError(f"{source}: {k} modes, the mode-conditional model {model} has {meta['num_classes']}")
    if rec.get("kind") == "gaussian":
        warnings.warn(f"{model}: trained with N(0, I) noise, sampled from the GMM {source}", stacklevel=2)
    elif rec.get("sha256") and (rec["sha256"], rec.get("shape")) != (fp["sha256"], fp["shape"]):
        warnings.warn(f"{source}: not the GMM {model} was trained with ({rec.get('file')}, sha256 {rec['sha256']}; "
                      f"this one {fp['sha256']})", stacklevel=2)
    return source


def check_guide(model, meta: dict, guide, gmeta: dict) -> None:
    """The guide takes the main model's inputs (conditioning, tokens ``(N, D)``, labels) and, when both record
    their tokenizer, the same tokens (:data:`AGREEING_KEYS` and the normalization statistics)."""
    def inputs(m):
        return (m["conditioning"], _model_shape(m)) + ((m["num_classes"],) if m["conditioning"] != "none" else ())

    if inputs(gmeta) != inputs(meta):
        raise ValueError(f"{guide}: the guide must take the inputs of {model} {inputs(meta)} (conditioning, tokens"
                         f"{', labels' if meta['conditioning'] != 'none' else ''}), it takes {inputs(gmeta)}")
    a, b = meta.get("tokenizer"), gmeta.get("tokenizer")
    if a is not None and b is not None:
        digest = lambda r: (r.get("normalization") or {}).get("sha256")  # noqa: E731
        differ = [f"{k} {b.get(k)!r} vs {a.get(k)!r}" for k in AGREEING_KEYS if a.get(k) != b.get(k)]
        differ += [f"normalization {digest(b)} vs {digest(a)}"] if digest(a) != digest(b) else []
        if differ:
            raise ValueError(f"{guide}: the guide was trained on other tokens than {model}: {'; '.join(differ)}")


def sample_run(model: str | os.PathLike, out: str | os.PathLike, tokenizer=None, *, encoder: dict | None = None,
               source: str | os.PathLike | None = None, n: int = 64, seed: int = 0, steps: int = 50,
               method: str = "euler", shift: float = 1.0, end: float = 1.0, guide: str | os.PathLike | None = None,
               guidance_scale: float = 1.0, guidance_interval=(0.0, 1.0), cfg_scale: float = 1.0, norm=None,
               batch_size: int = 64, device: str = "cpu", grid: str | os.PathLike | None = None,
               progress: bool = True, precision: str = "fp32", gm_substeps: int | None = None, gm_order: int = 2,
               gm_guidance_scale: float = 0.0, gm_orthogonal: float = 1.0, gm_guidance_interval=(0.0, 1.0),
               gm2_coefs=(0.005, 1.0), dfm_ratio: float = 4.0, dfm_starts=None) -> dict:
    """The sampling stage: an exported velocity network (``mmfm.models.velocity.load_velocity_model``;
    its metadata gives the conditioning and the latent shape), noise from ``source`` (``"gaussian"`` or
    a GMM ``.safetensors``), autoguidance with ``guide`` at ``guidance_scale`` (a mode-conditional main
    model gets the same modes in its guide) or classifier-free guidance at ``cfg_scale`` for a
    class-conditional model trained with label dropout, decoded by ``tokenizer`` into ADM's ``.npz``
    (and a PNG ``grid``). ``precision``: ``bf16`` runs each network under bf16 autocast
    (:class:`NetworkPrecision`), as the release sampled; the ODE state and noise stay float32. The ``.npz``
    also holds ``meta``, a JSON string of the settings (precision, steps, NFE, seed, model, guide, source).
    Returns what it wrote and the NFE per sample.

    ``method`` ``gm-ode`` / ``gm-sde`` samples a GMFlow export's mixture (:func:`sample_latents`; the other
    methods sample any export, a GMFlow one by its mean velocity): ``gm_substeps``, ``gm_order``, ``gm2_coefs``,
    and probabilistic autoguidance by ``guide`` (a velocity or GMFlow export) at ``gm_guidance_scale`` in
    ``[0, 1)`` (0: off) over ``gm_guidance_interval``, with ``gm_orthogonal``; ``guidance_scale`` and
    ``cfg_scale`` apply to the velocity samplers only.

    ``method`` ``dfm-euler`` samples a DFM export (``method: dfm``; only it, and no other sampler does):
    ``dfm_ratio`` splits the steps over its stages, ``dfm_starts`` are the stage thresholds
    (:func:`sample_latents`); no guidance.

    An export of ``mmfm train`` records its tokenizer and source (:func:`mmfm.train.loop.export_meta`), so the
    model alone suffices: ``tokenizer`` (a loaded one) or ``encoder`` (:func:`tokenizer_spec`'s overrides),
    ``norm`` (:func:`resolve_norm`) and ``source`` (:func:`resolve_source`) override the record; an export
    without it needs them. Every shape is checked before any network is loaded or any ODE step taken: the
    source's, the guide's (:func:`check_guide`), the tokenizer's and normalization's (:func:`check_tokenizer`).

    Under ``torch.distributed`` (``mmfm sample --nproc N``) every rank samples and decodes its share
    (indices ``rank::world``) and writes it to ``out.partR-of-W.npz``; rank 0 merges the parts in index
    order into ``out`` and removes them. Per-sample seeds make the set the same for any ``N``."""
    import torch.distributed as dist

    from mmfm.encoders import load_tokenizer
    from mmfm.flow.guidance import Autoguidance, ClassifierFreeGuidance
    from mmfm.models.velocity import load_velocity_model, read_metadata

    meta = read_metadata(model)
    cond, shape = meta["conditioning"], _model_shape(meta)
    gm_sampler = method in GM_SOLVERS
    flowmap = method in FLOWMAP_SOLVERS
    dfm_sampler = method in DFM_SOLVERS
    if dfm_sampler != (meta.get("method") == "dfm"):
        raise ValueError(f"sample.method: {method} on {model}, a method {meta.get('method', 'fm')!r} export: "
                         + ("dfm-euler samples a DFM network (method dfm) only; sample this one with euler, heun, "
                            "midpoint or dopri5" if dfm_sampler else "a DFM network is sampled with dfm-euler"))
    if dfm_sampler and (guide is not None or cfg_scale != 1.0):
        raise ValueError("sample.guide: dfm-euler takes no guidance here (no guide, cfg_scale 1)")
    if flowmap and guide is not None and guidance_scale != 1.0:
        raise ValueError(f"guidance_scale: {method} jumps with the flow map alone; DMF bakes autoguidance in at "
                         "training (train.dmf_guidance), so leave guidance_scale at 1 for this sampler")
    if gm_sampler and meta.get("head", "velocity") != "gm":
        raise ValueError(f"sample.method: {method} samples a GMFlow network's mixture; {model} is a velocity "
                         "network (method fm): sample it with euler, heun, midpoint or dopri5")
    if gm_sampler and not 0.0 <= gm_guidance_scale < 1.0:
        raise ValueError(f"gm_guidance_scale: expected a value in [0, 1) (0: off), got {gm_guidance_scale}")
    if gm_sampler and gm_guidance_scale > 0 and guide is None:
        raise ValueError("gm_guidance_scale: probabilistic guidance needs a guide (sample.guide / --guide)")
    guided = guide is not None and (gm_guidance_scale > 0 if gm_sampler else guidance_scale != 1.0)
    if guided:
        check_guide(model, meta, guide, read_metadata(guide))
    if gm_sampler and cfg_scale != 1.0:
        raise ValueError(f"cfg_scale: {method} takes probabilistic guidance (gm_guidance_scale), not CFG")
    if cfg_scale != 1.0 and (cond != "class" or meta.get("null_label") is None):
        raise ValueError(f"{model}: classifier-free guidance needs a class-conditional model with a null label")
    source = resolve_source(model, meta, source)
    norm = resolve_norm(model, meta, norm)
    if tokenizer is None:
        spec = tokenizer_spec(model, meta, encoder)
        try:
            tokenizer = load_tokenizer(**spec, device=device)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{model}: cannot load the tokenizer {spec['name']} to decode its samples: "
                             f"{err}") from None
    check_tokenizer(model, meta, tokenizer, norm)

    gm = dfm = None
    if gm_sampler:
        from mmfm.models.velocity import load_gm_model

        velocity = NetworkPrecision(load_gm_model(model, device), precision)
        probabilistic = None
        if guided:  # a GMFlow guide gives its mixture; any other its velocity (MM-FM's autoguide)
            gnet = NetworkPrecision((load_gm_model if read_metadata(guide).get("head") == "gm" else
                                     load_velocity_model)(guide, device), precision)
            probabilistic = {"guide": gnet, "scale": gm_guidance_scale, "interval": tuple(gm_guidance_interval),
                             "orthogonal": gm_orthogonal}
        gm = {"substeps": gm_substeps, "order": gm_order, "guidance": probabilistic, "gm2_coefs": gm2_coefs}
    elif dfm_sampler:
        from mmfm.flow.dfm import check_starts
        from mmfm.models.velocity import load_dfm_model

        net, _ = load_dfm_model(model, device)
        velocity = NetworkPrecision(net, precision)
        stages = int(meta.get("dfm_stages") or 1)
        dfm = {"stages": stages, "source": meta.get("dfm_source", "decompose"), "ratio": dfm_ratio,
               "starts": None if dfm_starts is None else check_starts(list(dfm_starts), stages)}
    elif flowmap:
        from mmfm.models.velocity import load_flowmap_model

        velocity = NetworkPrecision(load_flowmap_model(model, device), precision)
    else:
        velocity = NetworkPrecision(load_velocity_model(model, device), precision)
    if guided and not gm_sampler:
        velocity = Autoguidance(velocity, NetworkPrecision(load_velocity_model(guide, device), precision),
                                guidance_scale, guidance_interval)
    if cfg_scale != 1.0:
        velocity = ClassifierFreeGuidance(velocity, cfg_scale, meta["null_label"], guidance_interval)
    src = noise_source(source, shape)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
        else (0, 1)
    got = sample_latents(velocity, src, n, seed=seed, conditioning=cond, num_classes=meta["num_classes"],
                         steps=steps, method=method, shift=shift, end=end, batch_size=batch_size, rank=rank,
                         world_size=world, device=device, progress=progress and rank == 0, gm=gm, dfm=dfm)
    images = decode_latents(tokenizer, got.latents, norm, batch_size)
    labels = None if got.labels is None else got.labels.numpy()
    nfe_per_sample = got.nfe / max(1, -(-len(got.index) // batch_size))
    if world > 1:
        images, labels = _gather_parts(Path(out), rank, world, got.index.numpy(), images, labels)
    settings = {"model": str(model), "guide": None if guide is None else str(guide), "source": str(source),
                "n": n, "seed": seed, "steps": steps, "method": method, "shift": shift, "end": end,
                "guidance_scale": guidance_scale, "cfg_scale": cfg_scale, "precision": precision,
                "nfe_per_sample": nfe_per_sample, "conditioning": cond}
    if gm_sampler:
        settings.update(gm_substeps=gm_substeps, gm_order=gm_order, gm_guidance_scale=gm_guidance_scale,
                        gm_orthogonal=gm_orthogonal, gm_guidance_interval=list(gm_guidance_interval),
                        gm2_coefs=list(gm2_coefs))
    if dfm_sampler:
        settings.update(dfm_ratio=dfm_ratio, dfm_starts=dfm["starts"], dfm_stages=dfm["stages"],
                        dfm_source=dfm["source"])
    if rank == 0:
        save_npz(out, images, labels, meta=settings)
        if grid is not None:
            save_grid(grid, images)
    if world > 1:
        dist.barrier()
    return {"out": str(out), "n": n, "conditioning": cond, "nfe_per_sample": nfe_per_sample,
            "image_shape": list(images.shape[1:]), "world_size": world, "precision": precision}


def _gather_parts(out: Path, rank: int, world: int, index: np.ndarray, images: np.ndarray, labels):
    """Every rank's decoded share through ``out.partR-of-W.npz`` files; rank 0 returns the whole set in index
    order (other ranks get their own share back). The parts are removed once read."""
    import torch.distributed as dist

    part = lambda r: out.with_name(f"{out.name}.part{r}-of-{world}.npz")  # noqa: E731
    extra = {} if labels is None else {"labels": labels}
    with atomic_path(part(rank)) as p:
        with open(p, "wb") as f:
            np.savez(f, index=index, images=images, **extra)
    dist.barrier()
    if rank != 0:
        return images, labels
    idx, imgs, labs = [], [], []
    for r in range(world):
        with np.load(part(r)) as z:
            idx.append(z["index"])
            imgs.append(z["images"])
            if "labels" in z:
                labs.append(z["labels"])
        part(r).unlink()
    order = np.argsort(np.concatenate(idx), kind="stable")
    return np.concatenate(imgs)[order], (np.concatenate(labs)[order] if labs else None)
