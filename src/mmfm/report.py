"""The report of a pipeline run: ``summary.json``, tables and figures (design.md §4, §7; method.md §4, §7).

Inputs (all read with a clear error naming the file when it is missing or malformed):

- a training folder: ``metrics.csv`` (``step,loss,lr,grad_norm,samples_per_s``) and ``fd.csv``
  (``step,nfe,fd``: the Fréchet distance of EMA samples to the data during training);
- an NFE curve: CSV ``step,nfe,fd`` (:func:`mmfm.train.evaluate.nfe_curve`); when it holds several
  ``step`` values only the rows of the largest are used;
- optionally a final-metric JSON (``mmfm fid --out``: ``{"fid": 3.2, "n": ...}``; the key is the run's
  metric, ``"value"``, ``"fd"`` or ``"fid"``, or the file is a bare number);
- Snakemake benchmark TSVs under ``results/benchmarks/`` (``<rule>/<wildcards>.tsv`` or ``<rule>.tsv``);
  ``s`` in seconds, ``max_rss`` in MB, ``-`` / ``NA`` for values Snakemake could not measure;
- the toy's ``r10.json`` (:func:`mmfm.toy.r10.write_outputs`: ``{"rows": [...], "claims": ..., "config": ...}``);
- the latent shards' Parquet metadata (:func:`read_images`): the images encoded and the bad images left out.

Targets are reached on the evaluated grid, never interpolated: the step (NFE) reported is the first
evaluated one whose distance is at or below the target. Tables are CSV when the output ends ``.csv``,
else HTML; figures are PNG or SVG by suffix. Every output is written to a temporary name and renamed.
"""

from __future__ import annotations

import csv
import html
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from mmfm import io

METRICS, FD_LOG = "metrics.csv", "fd.csv"  # the names mmfm.train.loop writes
BAD_EXAMPLES = 10  # bad images named in summary.json (all of them are in the shards' metadata)
NA = {"", "-", "na", "nan", "none", "n/a"}

PAPER = {  # the R^10 table is mmfm.toy.r10.PAPER (method.md §4), imported where used (POT, sklearn are slow)
    # method.md §7 "Paper main table": DiTDH-XL, unconditional ImageNet-256, 80 epochs, FID without guidance
    "imagenet_fid": {"gaussian/independent": 9.33, "gmm/independent": 3.82, "gmm/mode": 3.18},
    # method.md §7 "Other claims": 30x faster convergence, 1/5 of the sampling steps
    "steps_ratio": 30.0,
    "nfe_ratio": 5.0,
}


# ------------------------------------------------------------------------------------------------ reading

def _need(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return path


def _read_csv(path, columns, delimiter: str = ",") -> list[dict]:
    path = _need(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; it has {reader.fieldnames}")
        return list(reader)


def _num(value, path, line: int, column: str) -> float | None:
    """A number, or ``None`` for a blank / ``-`` / ``NA`` field."""
    if value is None or value.strip().lower() in NA:
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{path}: line {line}, column {column!r}: not a number: {value!r}") from None


def read_curve(path) -> list[dict]:
    """``fd.csv`` or an NFE curve as ``[{"step": int, "nfe": int, "fd": float}, ...]`` (file order)."""
    from mmfm.train.evaluate import FD_COLUMNS, read_fd  # here: it imports torch, pytorch-fid, the samplers

    _read_csv(path, FD_COLUMNS)
    try:
        return read_fd(path)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: malformed row ({err})") from None


def _last_step(rows: list[dict]) -> list[dict]:
    last = max((r["step"] for r in rows), default=None)
    return sorted((r for r in rows if r["step"] == last), key=lambda r: r["nfe"])


def read_metrics(path) -> list[dict]:
    """``metrics.csv`` as ``[{"step": int, "loss": float | None}, ...]``."""
    rows = _read_csv(path, ("step", "loss"))
    out = []
    for i, r in enumerate(rows, start=2):
        step = _num(r["step"], path, i, "step")
        if step is None:
            raise ValueError(f"{path}: line {i}: no step")
        out.append({"step": int(step), "loss": _num(r["loss"], path, i, "loss")})
    return out


def read_benchmarks(folder) -> list[dict]:
    """One dict per Snakemake benchmark TSV under ``folder``.

    ``{"rule", "wildcards" ("" for <rule>.tsv; the path below the rule folder without .tsv otherwise),
    "path", "s" (mean over repeats, seconds), "max_rss" (max over repeats, MB), "repeats"}``; a field
    that is ``-`` / ``NA`` in every row is ``None``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such benchmark folder")
    out = []
    for path in sorted(folder.rglob("*.tsv")):
        parts = path.relative_to(folder).with_suffix("").parts
        rows = _read_csv(path, ("s", "max_rss"), delimiter="\t")
        if not rows:
            raise ValueError(f"{path}: a benchmark file without rows")
        s = [v for i, r in enumerate(rows, 2) if (v := _num(r["s"], path, i, "s")) is not None]
        rss = [v for i, r in enumerate(rows, 2) if (v := _num(r["max_rss"], path, i, "max_rss")) is not None]
        out.append({"rule": parts[0], "wildcards": "/".join(parts[1:]), "path": str(path),
                    "s": sum(s) / len(s) if s else None, "max_rss": max(rss) if rss else None, "repeats": len(rows)})
    return out


def stages(records: list[dict]) -> dict:
    """Per rule: ``{"jobs", "wall_s" (sum), "max_s", "peak_mem_mb" (max of max_rss)}``, ``None`` if unmeasured."""
    by_rule = defaultdict(list)
    for r in records:
        by_rule[r["rule"]].append(r)
    out = {}
    for rule, rs in sorted(by_rule.items()):
        s = [r["s"] for r in rs if r["s"] is not None]
        mem = [r["max_rss"] for r in rs if r["max_rss"] is not None]
        out[rule] = {"jobs": len(rs), "wall_s": sum(s) if s else None, "max_s": max(s) if s else None,
                     "peak_mem_mb": max(mem) if mem else None}
    return out


def read_r10(path) -> dict:
    """``{"rows": [{setting, source, coupling, len, w2, w2_floor, paper_len, paper_w2}], "claims": {...}}``;
    the paper columns come from :data:`mmfm.toy.r10.PAPER`."""
    from mmfm.toy.r10 import PAPER as r10_paper

    path = _need(path)
    try:
        data = json.loads(path.read_text())
        rows = [{k: r.get(k) for k in ("setting", "source", "coupling", "len", "w2", "w2_floor")} for r in data["rows"]]
        for r in rows:
            r["paper_len"], r["paper_w2"] = r10_paper[(r["setting"], r["source"], r["coupling"])]
            float(r["len"]), float(r["w2"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: not an r10.json of mmfm.toy.r10 ({type(err).__name__}: {err})") from None
    return {"rows": rows, "claims": data.get("claims", {})}


def read_images(shard_paths, examples: int = BAD_EXAMPLES) -> dict:
    """What the shards hold of the image folder, from their metadata (``mmfm encode``'s ``bad_images``):
    ``{"images": images encoded (rows that are not stored mirrors), "bad_images": images left out,
    "bad_examples": the first ``examples`` of them as {"path", "reason"}, in shard order}``. A shard
    that records no bad images (written by another tool) counts none; one that lists paths without
    reasons gives ``reason`` ``None``."""
    from mmfm.data import shards  # here: pyarrow is not needed by the rest of the report

    images, bad, named = 0, 0, []
    for path in shard_paths:
        meta = shards.read_metadata(_need(path))
        images += shards.count_originals(path)[1]
        record = meta.get("bad_images") or {}
        count = record.get("count", 0)
        if not (isinstance(count, int) and count >= 0):
            raise ValueError(f"{path}: shard metadata 'bad_images.count' is {count!r}, expected a count")
        bad += count
        listed = record.get("examples") or [{"path": q, "reason": None} for q in record.get("paths", [])]
        named += [{"path": str(e["path"]), "reason": e.get("reason")} for e in listed[:max(0, examples - len(named))]]
    return {"images": images, "bad_images": bad, "bad_examples": named}


def _final(spec: dict, fd_rows: list[dict]) -> float | None:
    if not spec.get("final"):
        return fd_rows[-1]["fd"] if fd_rows else None
    path = _need(spec["final"])
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    if isinstance(data, (int, float)) and not isinstance(data, bool):
        return float(data)
    for key in (spec["metric"], "value", "fd", "fid"):
        if isinstance(data, dict) and isinstance(data.get(key), (int, float)):
            return float(data[key])
    raise ValueError(f"{path}: no numeric {spec['metric']!r} (or 'value') field")


# ------------------------------------------------------------------------------------------------ summary

def first_reaching(points, target: float | None):
    """The first ``x`` of ``[(x, value), ...]`` (in ``x`` order) with ``value <= target``, else ``None``."""
    if target is None:
        return None
    return next((x for x, v in sorted(points) if v <= target), None)


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def summarize(runs: dict[str, dict], *, baseline: str, out: Path, toy_r10: Path | None = None,
              benchmarks: Path | None = None, nfe_target: float | None = None, shards=None) -> dict:
    """Write ``out`` (summary.json, atomically) and return it.

    ``runs[name] = {"run_dir", "samples", "nfe_curve", "metric" ("fd" | "fid"), "final" (optional JSON)}``.
    Per run: ``final``, ``fd_over_steps``, ``steps_to_baseline_final`` (first evaluated step with
    fd <= the baseline's last fd.csv value, ``steps_target``), ``steps_ratio`` (the baseline's own such
    step / this run's), ``nfe_for_target`` (smallest NFE of the curve with fd <= ``nfe_target``, default
    the baseline's fd at its largest NFE), ``nfe_ratio``, ``final_loss``, ``steps`` (last step of
    metrics.csv), ``wall_s`` (benchmarked seconds of jobs whose wildcards name the run). Top level:
    ``runs``, ``baseline``, ``steps_target``, ``nfe_target``, ``toy_r10``, ``stages``, ``paper``, and
    ``data`` (:func:`read_images` of the shard files ``shards``; ``None`` without them).
    """
    if baseline not in runs:
        raise ValueError(f"baseline {baseline!r} is not one of the runs {sorted(runs)}")
    data = {}
    for name, spec in runs.items():
        if not {"run_dir", "metric"} <= set(spec):
            raise ValueError(f"runs[{name!r}]: needs 'run_dir' and 'metric', got {sorted(spec)}")
        run_dir = Path(spec["run_dir"])
        nfe = _last_step(read_curve(spec["nfe_curve"])) if spec.get("nfe_curve") else []
        data[name] = (read_curve(run_dir / FD_LOG), read_metrics(run_dir / METRICS), nfe)
    base_fd, _, base_nfe = data[baseline]
    steps_target = base_fd[-1]["fd"] if base_fd else None
    if nfe_target is None and base_nfe:
        nfe_target = base_nfe[-1]["fd"]
    base_step = first_reaching([(r["step"], r["fd"]) for r in base_fd], steps_target)
    base_n = first_reaching([(r["nfe"], r["fd"]) for r in base_nfe], nfe_target)
    records = read_benchmarks(benchmarks) if benchmarks is not None else []
    ratio = lambda a, b: a / b if a is not None and b else None  # noqa: E731

    summary_runs = {}
    for name, spec in runs.items():
        fd, metrics, nfe = data[name]
        step = first_reaching([(r["step"], r["fd"]) for r in fd], steps_target)
        n = first_reaching([(r["nfe"], r["fd"]) for r in nfe], nfe_target)
        losses = [r["loss"] for r in metrics if r["loss"] is not None]
        walls = [r["s"] for r in records if r["s"] is not None and name in r["wildcards"].replace("=", "/").split("/")]
        summary_runs[name] = {
            "samples": str(spec["samples"]) if spec.get("samples") else None, "metric": spec["metric"],
            "final": _final(spec, fd), "fd_over_steps": [[r["step"], r["fd"]] for r in fd],
            "steps_to_baseline_final": step, "steps_ratio": ratio(base_step, step),
            "nfe_for_target": n, "nfe_ratio": ratio(base_n, n),
            "final_loss": losses[-1] if losses else None, "steps": metrics[-1]["step"] if metrics else None,
            "wall_s": sum(walls) if walls else None,
        }
    summary = _clean({
        "runs": summary_runs, "baseline": baseline, "steps_target": steps_target, "nfe_target": nfe_target,
        "toy_r10": read_r10(toy_r10) if toy_r10 is not None else None, "stages": stages(records),
        "data": read_images(shards) if shards is not None else None,
        "paper": {k: PAPER[k] for k in ("imagenet_fid", "steps_ratio", "nfe_ratio")},
    })
    io.write_json(out, summary)
    return summary


# ------------------------------------------------------------------------------------------------ tables

def _fmt(v) -> str:
    if v is None:
        return "—"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_table(rows: list[dict], out, title: str = "", note: str = "") -> Path:
    """``rows`` (dicts with the same keys) as CSV (``out`` ends .csv) or a small HTML page."""
    out = Path(out)
    columns = list(rows[0]) if rows else []
    with io.atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
        if out.suffix.lower() == ".csv":
            w = csv.DictWriter(f, columns)
            w.writeheader()
            w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
        else:
            e = html.escape
            head = "".join(f"<th>{e(c)}</th>" for c in columns)
            body = "\n".join("<tr>" + "".join(f"<td>{e(_fmt(r[c]))}</td>" for c in columns) + "</tr>" for r in rows)
            f.write(f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{e(title)}</title><style>'
                    "body{font-family:sans-serif}table{border-collapse:collapse}"
                    "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}</style></head>\n"
                    f"<body><h3>{e(title)}</h3>\n<table><tr>{head}</tr>\n{body}\n</table>\n"
                    + (f"<p>{e(note)}</p>\n" if note else "") + "</body></html>\n")
    return out


def benchmark_table(benchmarks: Path, out: Path) -> Path:
    """Per rule: jobs, total / mean / max runtime (s) and peak memory (max_rss, MB)."""
    rows = [{"rule": rule, "jobs": st["jobs"], "wall_s": st["wall_s"],
             "mean_s": st["wall_s"] / st["jobs"] if st["wall_s"] is not None else None,
             "max_s": st["max_s"], "peak_mem_mb": st["peak_mem_mb"]}
            for rule, st in stages(read_benchmarks(benchmarks)).items()]
    return write_table(rows, out, "Runtime and peak memory per rule", "Snakemake benchmark files; — = not measured.")


def r10_table(toy_json: Path, out: Path) -> Path:
    """The R^10 Compact/Spread table, ours beside the paper's (method.md §4)."""
    rows = read_r10(toy_json)["rows"]
    notes = []
    for setting in ("compact", "spread"):
        r = {(x["source"], x["coupling"]): x for x in rows if x["setting"] == setting}
        g, m = r.get(("gaussian", "independent")), r.get(("gmm", "mode"))
        if g and m:
            ours, paper = 1 - m["len"] / g["len"], 1 - m["paper_len"] / g["paper_len"]
            notes.append(f"{setting}: Len of GMM/mode vs Gaussian/independent {-100 * ours:+.1f}% (paper {-100 * paper:+.1f}%)")
    cols = ("setting", "source", "coupling", "len", "paper_len", "w2", "w2_floor", "paper_w2")
    return write_table([{c: r[c] for c in cols} for r in rows], out, "R^10 toy: Len and W2² (ours vs paper)",
                       "; ".join(notes) + ". w2_floor: W2² between two target samples of the same size.")


def summary_table(summary: dict, out: Path) -> Path:
    """One row per run of a :func:`summarize` result."""
    cols = ("metric", "final", "steps", "steps_to_baseline_final", "steps_ratio", "nfe_for_target", "nfe_ratio",
            "final_loss", "wall_s")
    rows = [{"run": name, **{c: r.get(c) for c in cols}} for name, r in summary["runs"].items()]
    paper = summary.get("paper") or PAPER
    note = (f"Baseline {summary['baseline']}; step target fd ≤ {_fmt(summary.get('steps_target'))}, NFE target fd ≤ "
            f"{_fmt(summary.get('nfe_target'))} (first evaluated point reaching it). Paper: "
            f"{_fmt(paper['steps_ratio'])}× fewer training steps, {_fmt(paper['nfe_ratio'])}× fewer NFE.")
    if summary.get("data"):
        note += " " + images_line(summary["data"])
    return write_table(rows, out, "Runs", note)


def images_line(data: dict) -> str:
    """``Images: 1795 encoded, 2 bad left out (a.gif: reason; ...)``, from summary.json's ``data``."""
    named = [f"{e['path']}: {e['reason']}" if e.get("reason") else e["path"] for e in data["bad_examples"]]
    if data["bad_images"] > len(named):
        named.append(f"{data['bad_images'] - len(named)} more in the shards' metadata and the encode logs")
    bad = f", {data['bad_images']} bad left out ({'; '.join(named)})" if data["bad_images"] else ", no bad images"
    return f"Images: {data['images']} encoded{bad}."


# ------------------------------------------------------------------------------------------------ figures

def _save(fig: Figure, out) -> Path:
    out = Path(out)
    with io.atomic_path(out) as tmp:
        fig.savefig(tmp, format=out.suffix.lstrip(".").lower() or "png", dpi=150)
    return out


def _smooth(y: np.ndarray, w: int) -> np.ndarray:
    c = np.concatenate([[0.0], np.cumsum(y)])
    k = np.minimum(np.arange(1, len(y) + 1), w)
    return (c[1:] - c[np.arange(1, len(y) + 1) - k]) / k


def plot_training_curves(run_dirs: dict[str, Path], out: Path) -> Path:
    """Loss (left) and Fréchet distance (right) over training steps, log y, one colour per run."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_loss, ax_fd = fig.subplots(1, 2)
    for i, (name, run_dir) in enumerate(run_dirs.items()):
        metrics = [r for r in read_metrics(Path(run_dir) / METRICS) if r["loss"] is not None and r["loss"] > 0]
        steps, loss = np.array([r["step"] for r in metrics]), np.array([r["loss"] for r in metrics])
        if len(loss) > 50:  # raw steps faint, a trailing mean over 2% of the run on top
            ax_loss.plot(steps, loss, color=f"C{i}", alpha=0.2, lw=0.6)
            loss = _smooth(loss, len(loss) // 50)
        ax_loss.plot(steps, loss, color=f"C{i}", lw=1.4, label=name)
        fd = read_curve(Path(run_dir) / FD_LOG)
        ax_fd.plot([r["step"] for r in fd], [r["fd"] for r in fd], "o-", ms=3, color=f"C{i}", label=name)
    ax_loss.set(yscale="log", xlabel="training step", ylabel="flow-matching loss", title="Training loss")
    ax_fd.set(yscale="log", xlabel="training step", ylabel="Fréchet distance to the data ↓",
              title="Fréchet distance of EMA samples")
    for ax in (ax_loss, ax_fd):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    return _save(fig, out)


def plot_nfe_curves(curves: dict[str, Path], out: Path, target: float | None = None) -> Path:
    """Fréchet distance against the number of function evaluations (log-log), one line per run."""
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    ticks = set()
    for name, path in curves.items():
        rows = _last_step(read_curve(path))
        ticks.update(r["nfe"] for r in rows)
        ax.plot([r["nfe"] for r in rows], [r["fd"] for r in rows], "o-", ms=4, label=name)
    if target is not None:
        ax.axhline(target, ls="--", color="gray", lw=1, label=f"target {target:.4g}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set(xlabel="NFE (Euler steps)", ylabel="Fréchet distance to the data ↓", title="Distance vs sampling steps")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, out)


def plot_gmm_weights(gmm: Path, out: Path) -> Path:
    """The mixture weights of a GMM ``.safetensors`` (tensor ``weights (K)``), largest first."""
    tensors, _ = io.open_tensors(gmm, ["weights"])
    w = np.sort(np.asarray(tensors["weights"], dtype=np.float64).ravel())[::-1]
    if w.size == 0 or not np.all(np.isfinite(w)) or w.min() < 0 or w.sum() <= 0:
        raise ValueError(f"{gmm}: 'weights' must be finite, non-negative and not all zero")
    w = w / w.sum()
    k, nz = w.size, w[w > 0]
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(1, k + 1)
    if k <= 64:
        ax.bar(x, w, width=0.8, color="C0")
    else:
        ax.plot(x, w, color="C0")
        ax.fill_between(x, w, color="C0", alpha=0.3)
    ax.axhline(1 / k, ls="--", color="gray", lw=1, label="uniform 1/K")
    if nz.size == k and w[0] / w[-1] > 10:
        ax.set_yscale("log")
    ax.set(xlabel="component (sorted by weight)", ylabel="mixture weight",
           title=f"{Path(gmm).name}: K = {k}, effective modes exp(H) = {math.exp(-np.sum(nz * np.log(nz))):.1f}")
    ax.legend()
    return _save(fig, out)
