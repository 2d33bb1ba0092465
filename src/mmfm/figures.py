"""The figures of the results page (:mod:`mmfm.page`; issue 15): curves, the GMM fit, decoded grids.

Every ``*_figure`` builder makes a :class:`matplotlib.figure.Figure` (the object API: no pyplot state, so
figures of several threads or a test never share a current figure) and every public function writes one
file, PNG or SVG by the suffix of ``out``, at :data:`DPI` through :func:`mmfm.io.atomic_path`, and
returns its path. A run keeps its colour in every figure: pass the same ``colors`` (:func:`run_colors`
of the runs in the page's order) to each function.

The two image helpers (:func:`mode_means_images`, :func:`data_images`) return uint8 images for
:func:`mmfm.sample.save_grid`; both decode through :func:`mmfm.sample.decode_latents`, the decoder the
samples pass, so the three grids of the page are comparable.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatterSciNotation, NullLocator

from mmfm import io

DPI = 130
#: Font sizes for a figure shown on a projector (applied while a figure is built and saved).
STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "xtick.labelsize": 10,
         "ytick.labelsize": 10, "legend.fontsize": 9.5, "figure.titlesize": 13, "axes.grid": False}
FORMATS = ("png", "svg")
SMOOTH_ABOVE = 50  # more logged points than this: raw values faint, a trailing mean on top
SMOOTH_FRACTION = 0.02  # the trailing mean's window, as a fraction of the run's points
FLOOR_STYLE = {"ls": "--", "color": "0.35", "lw": 1.2}
TARGET_STYLE = {"ls": ":", "color": "k", "lw": 1.4}


# ------------------------------------------------------------------------------------------------ helpers

def run_colors(names: Iterable[str]) -> dict[str, str]:
    """``{name: hex colour}``: matplotlib's tab10 in the order of ``names`` (cycling after ten)."""
    palette = [matplotlib.colors.to_hex(c) for c in matplotlib.colormaps["tab10"].colors]
    return {name: palette[i % len(palette)] for i, name in enumerate(dict.fromkeys(names))}


def _colors(names: Sequence[str], colors: Mapping[str, str] | None) -> dict[str, str]:
    """``colors`` for the names it has; the others get tab10 colours ``colors`` does not use, in order."""
    given = dict(colors or {})
    free = [c for c in run_colors(f"#{i}" for i in range(10)).values() if c not in given.values()]
    free = free or list(run_colors(f"#{i}" for i in range(10)).values())
    out, j = {}, 0
    for name in names:
        if name in given:
            out[name] = given[name]
        else:
            out[name], j = free[j % len(free)], j + 1
    return out


@contextlib.contextmanager
def _style():
    with matplotlib.rc_context(STYLE):
        yield


def _save(fig: Figure, out) -> Path:
    """Write ``fig`` to ``out`` (PNG or SVG by its suffix) atomically; returns the path."""
    out = Path(out)
    fmt = out.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ValueError(f"{out}: expected a .png or .svg path")
    with io.atomic_path(out) as tmp:
        fig.savefig(tmp, format=fmt, dpi=DPI)
    return out


def _smooth(y: np.ndarray, w: int) -> np.ndarray:
    """The trailing mean of ``y`` over ``w`` points (fewer at the start)."""
    c = np.concatenate([[0.0], np.cumsum(y, dtype=np.float64)])
    i = np.arange(1, len(y) + 1)
    k = np.minimum(i, w)
    return (c[i] - c[i - k]) / k


def _points(pairs) -> tuple[np.ndarray, np.ndarray]:
    """``[[x, y], ...]`` -> ``(x, y)`` sorted by ``x``, without pairs whose ``y`` is missing, non-finite or
    not positive (they cannot be drawn on a log axis)."""
    xy = [(float(x), float(y)) for x, y in pairs
          if x is not None and y is not None and math.isfinite(float(y)) and float(y) > 0]
    xy.sort()
    return np.array([p[0] for p in xy]), np.array([p[1] for p in xy])


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def read_losses(path) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, losses)`` of a ``metrics.csv`` (columns ``step``, ``loss``, ...): the rows with a positive,
    finite loss, in file order; empty arrays when the file is missing or has no such row."""
    path = Path(path)
    if not path.is_file():
        return np.zeros(0), np.zeros(0)
    steps, losses = [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            return np.zeros(0), np.zeros(0)
        missing = [c for c in ("step", "loss") if c not in reader.fieldnames]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; it has {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            try:
                step, loss = float(row["step"]), float(row["loss"])
            except (TypeError, ValueError):
                if (row.get("step") or "").strip():
                    continue  # a blank loss (a row written before the first loss): nothing to draw
                raise ValueError(f"{path}: line {line}: no step") from None
            if math.isfinite(loss) and loss > 0:
                steps.append(step)
                losses.append(loss)
    return np.array(steps), np.array(losses)


class _PlainLog(LogFormatterSciNotation):
    """Log-axis tick labels as plain numbers (``0.6``, ``20``, ``1e-05``), on the ticks matplotlib labels."""

    def __call__(self, x, pos=None):
        return f"{x:g}" if super().__call__(x, pos) else ""


def _plain_log_y(ax) -> None:
    ax.yaxis.set_major_formatter(_PlainLog())
    ax.yaxis.set_minor_formatter(_PlainLog(labelOnlyBase=False))


def _legend(ax, **kw) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


# ------------------------------------------------------------------------------------------------ curves

def _group(spec: Mapping) -> tuple[str, str]:
    return str(spec.get("method") or "fm"), str(spec.get("source") or "unknown")


def loss_figure(runs: Mapping[str, Mapping], colors: Mapping[str, str] | None = None) -> Figure:
    """The figure of :func:`loss_curves`: one panel per ``(method, source)`` group, in the order of first
    appearance in ``runs``; runs without losses are left out (a ``ValueError`` when no run has any)."""
    data = {}
    for name, spec in runs.items():
        steps, loss = read_losses(spec["metrics"])
        if len(loss):
            data[name] = (_group(spec), steps, loss)
    if not data:
        raise ValueError(f"no run has losses in its metrics.csv ({', '.join(map(str, runs)) or 'no runs'})")
    groups = list(dict.fromkeys(g for g, _, _ in data.values()))
    cols = _colors(list(runs), colors)
    fig = Figure(figsize=(max(6.5, 5.2 * len(groups)), 4.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(groups), squeeze=False)[0])
    smoothed_any = False
    for ax, group in zip(axes, groups):
        for name, (g, steps, loss) in data.items():
            if g != group:
                continue
            if len(loss) > SMOOTH_ABOVE:
                ax.plot(steps, loss, color=cols[name], alpha=0.22, lw=0.7)
                loss, smoothed_any = _smooth(loss, max(1, round(SMOOTH_FRACTION * len(loss)))), True
            ax.plot(steps, loss, color=cols[name], lw=1.8, label=name)
        method, source = group
        ax.set(yscale="log", xlabel="training step", ylabel="training loss (log scale)",
               title=f"{method}, {source} source")
        _plain_log_y(ax)
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", alpha=0.12)
        _legend(ax)
    head = ("Training loss per logged step (faint: raw; line: trailing mean over 2 % of the run)" if smoothed_any
            else "Training loss per logged step")
    fig.suptitle(head + ("\nOne panel per method and source: their regression targets differ, so panels are not "
                         "comparable" if len(groups) > 1 else ""))
    return fig


def loss_curves(runs: dict[str, dict], out, *, colors: Mapping[str, str] | None = None) -> Path:
    """Training loss over steps, one panel per ``(method, source)`` group, side by side, log y.

    ``runs[name] = {"metrics": path of metrics.csv (columns step, loss, ...), "source": "gaussian" | "gmm",
    "method": "fm" (the default; "gmflow", "dmf", "dfm")}``. Losses of different sources or methods are not
    comparable (the regression target ``x1 - x0`` changes with the source), so each group has its own
    axes, titled "fm, gaussian source". A run with more than 50 logged points is drawn raw and faint, with
    a trailing mean over 2 % of its points on top. A run whose metrics.csv is missing or holds no loss is
    skipped (the page lists it as missing)."""
    with _style():
        return _save(loss_figure(runs, colors), out)


def _training_title(samples, nfe, sampler) -> str:
    parts = ([f"{samples} EMA samples"] if samples else []) + ([f"{nfe} {sampler} steps"] if nfe else [])
    return "Fréchet distance over training" + (": " + ", ".join(parts) if parts else "")


def _floor_label(floor: float, samples) -> str:
    return f"floor: {samples} real samples vs the data ({_fmt(floor)})" if samples else \
        f"floor: real samples vs the data ({_fmt(floor)})"


def _curves_axes(curves: Mapping[str, Sequence], colors, what: str):
    """``(figure, axes, {name: (x, y)} of the runs with points, colours)`` of a distance figure; raises when
    no run has a point."""
    drawn = {name: _points(pts) for name, pts in curves.items()}
    drawn = {name: xy for name, xy in drawn.items() if len(xy[0])}
    if not drawn:
        raise ValueError(f"no run has a distance {what} to draw")
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    return fig, fig.subplots(), drawn, _colors(list(curves), colors)


def fd_training_figure(curves: Mapping[str, Sequence], *, floor: float | None = None, samples: int | None = None,
                       nfe: int | None = None, sampler: str = "euler",
                       colors: Mapping[str, str] | None = None) -> Figure:
    """The figure of :func:`fd_over_training`."""
    fig, ax, drawn, cols = _curves_axes(curves, colors, "over training")
    for name, (x, y) in drawn.items():
        ax.plot(x, y, "o-", ms=4, lw=1.6, color=cols[name], label=name)
    if floor is not None and floor > 0:
        ax.axhline(floor, **FLOOR_STYLE, label=_floor_label(floor, samples))
    ax.set(yscale="log", xlabel="training step (EMA weights at that step)",
           ylabel="Fréchet distance to the data (lower is better)", title=_training_title(samples, nfe, sampler))
    _plain_log_y(ax)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    _legend(ax)
    return fig


def fd_over_training(curves: dict[str, list], out, *, floor: float | None, samples: int | None,
                     nfe: int | None, sampler: str = "euler", colors: Mapping[str, str] | None = None) -> Path:
    """The Fréchet distance of EMA samples to the data at each evaluated training step, one line per run,
    log y. ``curves[name] = [[step, fd], ...]`` (summary.json's ``fd_over_steps``; empty lists are skipped);
    ``floor``: the distance of ``samples`` real rows to the data (a dashed line), ``samples`` / ``nfe`` /
    ``sampler``: how the distances were measured (the title)."""
    with _style():
        return _save(fd_training_figure(curves, floor=floor, samples=samples, nfe=nfe, sampler=sampler,
                                        colors=colors), out)


def _nfe_lines(curves: Mapping[str, object], sampler: str) -> dict[str, tuple[str, bool, Sequence]]:
    """``{label: (run, headline, [[nfe, fd], ...])}``, one line per run and sampler. ``curves[name]`` is a run's
    points, or ``{sampler: points}`` (summary.json's ``fd_over_nfe``, the headline sampler first): a run's only
    sampler is labelled by the run when it is ``sampler`` (the figure's), every other line ``run (sampler)``."""
    out = {}
    for name, pts in curves.items():
        if not isinstance(pts, Mapping):
            out[name] = (name, True, pts)
            continue
        for i, (s, p) in enumerate(pts.items()):
            label = name if len(pts) == 1 and s == sampler else f"{name} ({s})"
            out[label] = (name, i == 0, p)
    return out


def fd_nfe_figure(curves: Mapping[str, object], *, floor: float | None = None, samples: int | None = None,
                  target: float | None = None, sampler: str = "euler",
                  colors: Mapping[str, str] | None = None) -> Figure:
    """The figure of :func:`fd_over_nfe`."""
    lines = _nfe_lines(curves, sampler)
    runs = _colors(list(curves), colors)
    fig, ax, drawn, cols = _curves_axes({label: pts for label, (_, _, pts) in lines.items()},
                                        {label: runs[run] for label, (run, _, _) in lines.items()}, "over NFE")
    ticks = sorted({float(v) for x, _ in drawn.values() for v in x if v > 0})
    for label, (x, y) in drawn.items():
        keep, headline = x > 0, lines[label][1]
        ax.plot(x[keep], y[keep], "o-" if headline else "s--", ms=4.5 if headline else 4, lw=1.6 if headline else 1.3,
                color=cols[label], label=label)
    if floor is not None and floor > 0:
        ax.axhline(floor, **FLOOR_STYLE, label=_floor_label(floor, samples))
    if target is not None and target > 0:
        ax.axhline(target, **TARGET_STYLE, label=f"baseline's target ({_fmt(target)})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    _plain_log_y(ax)
    others = any(label != run for label, (run, _, _) in lines.items() if label in drawn)  # lines naming a sampler
    what = f"{samples} samples per point" if samples else ""
    what = f"{what}, {sampler} sampler" if not others else what
    ax.set(xlabel=f"NFE: network evaluations per sample ({sampler})" if not others else
           f"NFE: sampling steps ({sampler} unless the line names its sampler)",
           ylabel="Fréchet distance to the data (lower is better)",
           title="Fréchet distance over sampling steps" + (f": {what.lstrip(', ')}" if what else ""))
    ax.grid(True, which="major", alpha=0.35)
    _legend(ax)
    return fig


def fd_over_nfe(curves: dict[str, object], out, *, floor: float | None, samples: int | None,
                target: float | None, sampler: str = "euler", colors: Mapping[str, str] | None = None) -> Path:
    """The final Fréchet distance against the number of function evaluations, one line per run and sampler,
    log-log (x in base 2, the evaluated NFEs as its ticks). ``curves[name] = [[nfe, fd], ...]``, or
    ``{sampler: [[nfe, fd], ...]}`` (summary.json's ``fd_over_nfe``): one line per sampler in the run's colour,
    the headline (first) sampler solid, the others dashed and labelled ``run (sampler)``; empty lists are
    skipped. ``sampler``: the sampler of the unlabelled lines; ``floor`` (dashed grey): ``samples`` real rows vs
    the data; ``target`` (dotted): the baseline's distance at its largest NFE, which
    :func:`mmfm.report.summarize` counts NFEs to."""
    with _style():
        return _save(fd_nfe_figure(curves, floor=floor, samples=samples, target=target, sampler=sampler,
                                   colors=colors), out)


# ------------------------------------------------------------------------------------------------ the GMM fit

def read_em_report(sidecar) -> dict:
    """The EM report of a CLS GMM sidecar (``cls.json``): :meth:`mmfm.gmm.em.EMResult.report` as
    :func:`mmfm.gmm.fit.fit_cls_gmm` nests it under ``fit`` (a bare report is read too), with ``k`` and
    ``tol`` from the sidecar's top level or ``settings``."""
    path = Path(sidecar)
    try:
        side = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    if not isinstance(side, dict):
        raise ValueError(f"{path}: expected a JSON object")
    fit = side.get("fit") if isinstance(side.get("fit"), dict) else side
    loglik = fit.get("loglik")
    if not isinstance(loglik, list) or not loglik:
        raise ValueError(f"{path}: no EM log-likelihood ('fit.loglik') to draw")
    settings = side.get("settings") or {}
    collapsed = fit.get("collapsed")
    return {"loglik": [float("nan") if v is None else float(v) for v in loglik],
            "reseeded": list(fit.get("reseeded") or []),
            "reseeded_total": fit.get("reseeded_total"),
            "collapsed": len(collapsed) if isinstance(collapsed, list) else collapsed,
            "converged": fit.get("converged"), "n_iter": fit.get("n_iter", len(loglik)),
            "final_loglik": fit.get("final_loglik"),
            "k": side.get("k", settings.get("k")), "tol": settings.get("tol")}


def em_figure(report: Mapping) -> Figure:
    """The figure of :func:`em_log_likelihood` from :func:`read_em_report`'s dict."""
    ll = np.asarray(report["loglik"], dtype=np.float64)
    it = np.arange(1, len(ll) + 1)
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    ax, gain_ax = fig.subplots(1, 2)
    ax.plot(it, ll, "o-", ms=3 if len(ll) > 40 else 4, lw=1.5, color="C0", label="E-step (before its M-step)")
    final = report.get("final_loglik")
    if final is not None and math.isfinite(final):
        ax.plot([len(ll) + 1], [final], "*", ms=11, color="C2", label=f"returned parameters ({final:.5g})")
    reseeded = [r for r in report["reseeded"] if 1 <= int(r.get("iteration", 0)) <= len(ll)]
    if reseeded:
        at = np.array([int(r["iteration"]) for r in reseeded])
        total = report.get("reseeded_total")
        total = total if total is not None else sum(len(r.get("components", [])) for r in reseeded)
        ax.plot(at, ll[at - 1], "v", ms=9, color="C3", ls="none",
                label=f"re-seeded empty components ({total} in {len(at)} iterations)")
    ax.set(xlabel="EM iteration", ylabel="mean log-likelihood per row", title="Log-likelihood of the CLS rows")
    ax.grid(True, alpha=0.35)
    _legend(ax, loc="lower right")

    gain = np.diff(ll)
    if len(gain):
        x = it[1:]
        up = gain > 0
        gain_ax.plot(x[up], gain[up], "o-", ms=3.5, lw=1.2, color="C0", label="increase")
        if (~up).any():
            gain_ax.plot(x[~up], np.abs(gain[~up]), "v", ms=7, color="C3", ls="none", label="decrease (|change|)")
        tol = report.get("tol")
        if tol:
            gain_ax.axhline(tol, **TARGET_STYLE, label=f"tolerance {tol:g} (stops below)")
        if np.any(np.abs(gain) > 0):
            gain_ax.set_yscale("log")
            _plain_log_y(gain_ax)
    gain_ax.set(xlabel="EM iteration", ylabel="change of the mean log-likelihood",
                title="Change per iteration (convergence)")
    gain_ax.grid(True, which="major", alpha=0.35)
    _legend(gain_ax)

    conv = report.get("converged")
    state = "converged" if conv else ("not converged" if conv is not None else "convergence not recorded")
    k = report.get("k")
    coll = report.get("collapsed")
    fig.suptitle(f"EM of the CLS GMM: K = {k if k is not None else '?'}, {report.get('n_iter', len(ll))} iterations, "
                 f"{state}, {coll if coll is not None else '?'} collapsed components")
    return fig


def em_log_likelihood(sidecar, out) -> Path:
    """The mean log-likelihood per EM iteration of the CLS GMM (left; triangles at the iterations that
    re-seeded empty components, a star for the returned parameters) and its change per iteration against
    the tolerance (right, log y). ``sidecar``: the ``cls.json`` beside ``cls.safetensors``
    (:func:`read_em_report`); the title gives K, the iterations, whether EM converged and the collapsed
    components."""
    with _style():
        return _save(em_figure(read_em_report(sidecar)), out)


def _normalized(weights) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64).ravel()
    if w.size == 0 or not np.all(np.isfinite(w)) or w.min() < 0 or w.sum() <= 0:
        raise ValueError("weights: expected finite, non-negative values, not all zero")
    return w / w.sum()


def _ranked(ax, values: np.ndarray, color: str, log: bool) -> None:
    """Sorted ``values`` (largest first) as bars, or as a filled line when there are more than 64."""
    x = np.arange(1, len(values) + 1)
    if len(values) <= 64:
        ax.bar(x, values, width=0.85, color=color)
    else:
        ax.plot(x, values, color=color, lw=1.4)
        ax.fill_between(x, values, np.nanmin(values) if log else 0, color=color, alpha=0.3)
    ax.set_xlim(0.5 if len(values) <= 64 else 1, len(values) + (0.5 if len(values) <= 64 else 0))


def weights_figure(weights, counts=None, *, empty: int | None = None) -> Figure:
    """The figure of :func:`weights_and_counts`."""
    w = np.sort(_normalized(weights))[::-1]
    k = w.size
    nz = w[w > 0]
    entropy = float(-np.sum(nz * np.log(nz)))
    panels = 1 if counts is None else 2
    fig = Figure(figsize=(6.5 * panels, 4.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, panels, squeeze=False)[0])
    ax = axes[0]
    log = nz[0] / nz[-1] > 10
    _ranked(ax, w if not log else np.where(w > 0, w, np.nan), "C0", log)
    ax.axhline(1 / k, ls="--", color="k", lw=1.1, label=f"uniform 1/K = {_fmt(1 / k)}")
    if log:
        ax.set_yscale("log")
        _plain_log_y(ax)
    zero = int(k - nz.size)
    ax.set(xlabel="mode rank (by weight)", ylabel="mixture weight" + (", log scale" if log else ""),
           title=f"Mixture weights: K = {k}, effective modes exp(H) = {math.exp(entropy):.1f}"
                 + (f", {zero} at zero" if zero else ""))
    ax.grid(True, axis="y", which="major", alpha=0.35)
    _legend(ax)
    if counts is not None:
        c = np.sort(np.asarray(counts, dtype=np.float64).ravel())[::-1]
        if c.size == 0 or not np.all(np.isfinite(c)) or c.min() < 0:
            raise ValueError("counts: expected finite, non-negative row counts")
        n_empty = int((c == 0).sum()) if empty is None else int(empty)
        pos = c[c > 0]
        ax = axes[1]
        clog = pos.size > 0 and pos[0] / pos[-1] > 10
        _ranked(ax, np.where(c > 0, c, np.nan) if clog else c, "C1", clog)
        if pos.size:
            ax.axhline(c.sum() / c.size, ls="--", color="k", lw=1.1, label=f"mean {c.sum() / c.size:.4g} rows per mode")
        if pos.size < c.size:
            ax.axvspan(pos.size + 0.5, c.size + 0.5, color="C3", alpha=0.15, lw=0,
                       label=f"empty modes ({c.size - pos.size})")
        if clog:
            ax.set_yscale("log")
            _plain_log_y(ax)
        ax.set(xlabel="mode rank (by row count)",
               ylabel=f"rows assigned (of {int(c.sum())})" + (", log scale" if clog else ""),
               title=f"Rows per mode (spatial stage): {n_empty} of {c.size} modes empty")
        ax.grid(True, axis="y", which="major", alpha=0.35)
        _legend(ax)
    return fig


def weights_and_counts(weights, counts, out, *, empty: int | None = None) -> Path:
    """Sorted mixture weights (left; largest first, log y when max / min > 10, the uniform 1/K line; the
    title gives K and the effective number of modes exp(H) of the weights) and the spatial stage's row
    count per mode, sorted (right; the tensor ``counts`` of spatial.safetensors, the empty-mode count in the
    title: ``empty`` as the sidecar records it, else the zeros of ``counts``). ``counts=None``: the left
    panel only."""
    with _style():
        return _save(weights_figure(weights, counts, empty=empty), out)


# ------------------------------------------------------------------------------------------------ decoded grids

def mode_means_images(spatial_path, tokenizer, norm=None, n: int = 64, batch_size: int = 64):
    """The ``n`` modes of largest weight of a spatial GMM ``.safetensors`` (``weights (K)``, ``means (K, N, D)``),
    their means decoded: ``(images uint8 (n, H, W, 3), modes (n,) int64, weights (n,) float64)``, heaviest
    first (ties: the lower index first); ``weights`` are normalized over all K. The file is memory-mapped and
    only the ``n`` rows of ``means`` needed are read. The means live where the shards' tokens do, so ``norm``
    (the latent normalization of the shards, if any) is undone before :func:`mmfm.sample.decode_latents`."""
    import torch

    from mmfm.sample import decode_latents

    tensors, _ = io.open_tensors(spatial_path, ["weights", "means"])
    w = _normalized(tensors["weights"])
    means = tensors["means"]
    if means.ndim != 3 or means.shape[0] != w.size:
        raise ValueError(f"{spatial_path}: expected means (K, N, D) with K = {w.size}, got {means.shape}")
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n: expected a positive integer, got {n!r}")
    modes = np.argsort(-w, kind="stable")[:n]
    order = np.sort(modes)  # ascending offsets: each row read once, front to back
    rows = np.asarray(means[order], dtype=np.float32)
    latents = torch.from_numpy(rows[np.searchsorted(order, modes)])
    images = decode_latents(tokenizer, latents, norm, batch_size=batch_size)
    return images, modes.astype(np.int64), w[modes]


def _layout(paths: Sequence[Path]) -> tuple[int, int]:
    """``(N, D)`` of the shards' tokens, from their metadata; every shard must agree."""
    from mmfm.data import shards

    seen = {}
    for p in paths:
        meta = shards.read_metadata(p)
        if "grid" not in meta or "token_dim" not in meta:
            raise ValueError(f"{p}: the shard metadata lacks grid or token_dim, needed to shape the tokens")
        seen[p] = (int(np.prod(meta["grid"])), int(meta["token_dim"]))
    if len(set(seen.values())) > 1:
        raise ValueError(f"the shards disagree on their token grid: {seen}")
    return next(iter(seen.values()))


def _original_rows(path) -> np.ndarray:
    """The indices of a shard's rows that are not stored mirrors (all rows without a ``flip`` column)."""
    from mmfm.data import shards

    pf = shards.open_file(path)
    n = pf.metadata.num_rows
    if shards.MIRROR_COLUMN not in pf.schema_arrow.names:
        return np.arange(n)
    with shards.reading(path):
        flip = pf.read(columns=[shards.MIRROR_COLUMN]).column(shards.MIRROR_COLUMN)
    keep = shards.original_mask(flip, path)
    if keep is None:
        return np.arange(n)
    return np.flatnonzero(keep.to_numpy(zero_copy_only=False))


def _read_rows(path, rows: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens (len(rows), N, D) float32, labels (len(rows),) int64)`` of the shard rows ``rows`` (sorted
    ascending), reading only the row groups that hold them; labels are -1 when the shard has none."""
    from mmfm.data import shards

    pf = shards.open_file(path)
    md = pf.metadata
    starts = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])
    group = np.searchsorted(starts, rows, side="right") - 1
    cols = ["tokens"] + (["label"] if "label" in pf.schema_arrow.names else [])
    tok, lab = [], []
    for g in np.unique(group):
        local = rows[group == g] - starts[g]
        with shards.reading(path):
            table = pf.read_row_group(int(g), columns=cols)
        t = shards.column_array(table.column("tokens"), table.schema.field("tokens"), path)
        if t.shape[1] != shape[0] * shape[1]:
            raise ValueError(f"{path}: tokens hold {t.shape[1]} values per row, the metadata implies "
                             f"{shape[0]} x {shape[1]}")
        tok.append(np.asarray(t[local], dtype=np.float32).reshape(len(local), *shape))
        lab.append(np.asarray(table.column("label").to_numpy(zero_copy_only=False)[local], dtype=np.int64)
                   if "label" in cols else np.full(len(local), -1, np.int64))
    return np.concatenate(tok), np.concatenate(lab)


def data_images(shard_paths, tokenizer, norm=None, n: int = 64, seed: int = 0, batch_size: int = 64):
    """``n`` original rows (not stored mirrors: ``flip`` false) drawn uniformly without replacement across the
    shards by ``np.random.default_rng(seed)``, decoded: ``(images uint8 (n, H, W, 3), labels (n,) int64)``, in
    the order drawn (all original rows, shuffled, when there are fewer than ``n``). "The data, encoded and
    decoded": the shards' tokens pass the samples' decoder (:func:`mmfm.sample.decode_latents`, ``norm``
    undone first). Only the ``flip`` column and the row groups holding the drawn rows are read."""
    import torch

    from mmfm.data import shards
    from mmfm.sample import decode_latents

    paths = shards.resolve(list(shard_paths) if not isinstance(shard_paths, (str, Path)) else shard_paths)
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n: expected a positive integer, got {n!r}")
    shape = _layout(paths)
    originals = [_original_rows(p) for p in paths]
    sizes = np.array([len(o) for o in originals])
    total = int(sizes.sum())
    if total == 0:
        raise ValueError(f"the shards hold no original rows ({', '.join(map(str, paths))})")
    pick = np.random.default_rng(seed).choice(total, size=min(n, total), replace=False)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    shard_of = np.searchsorted(bounds, pick, side="right") - 1
    tokens = np.zeros((len(pick), *shape), np.float32)
    labels = np.zeros(len(pick), np.int64)
    for s in np.unique(shard_of):
        where = np.flatnonzero(shard_of == s)
        rows = originals[s][pick[where] - bounds[s]]
        order = np.argsort(rows)
        t, lab = _read_rows(paths[s], rows[order], shape)
        tokens[where[order]], labels[where[order]] = t, lab
    images = decode_latents(tokenizer, torch.from_numpy(tokens), norm, batch_size=batch_size)
    return images, labels
