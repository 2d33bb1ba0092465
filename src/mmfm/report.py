"""summary.json: every number of a pipeline run in one file (docs/design.md §4, §7; docs/method.md §4, §7).

The results page (:mod:`mmfm.page`) and any script read this one file. Inputs, each read with a clear
error naming the file when it is missing or malformed (or, with ``strict=False``, listed under
``missing`` so that a results folder with runs still training still gets its page):

- a training folder: ``metrics.csv`` (``step,loss,lr,grad_norm,samples_per_s``) and ``fd.csv``
  (``step,nfe,fd``: the Fréchet distance of EMA samples to the data during training);
- an NFE curve: CSV ``step,nfe,fd`` (:func:`mmfm.train.evaluate.nfe_curve`); when it holds several
  ``step`` values only the rows of the largest are used;
- optionally a final-metric JSON (``mmfm fid --out``: ``{"fid": 3.2, "n": ...}``; the key is the run's
  metric, ``"value"``, ``"fd"`` or ``"fid"``, or the file is a bare number);
- Snakemake benchmark TSVs under ``results/benchmarks/`` (``<rule>/<wildcards>.tsv`` or ``<rule>.tsv``);
  ``s`` in seconds, ``max_rss`` in MB, ``-`` / ``NA`` for values Snakemake could not measure;
- the toy's ``r10.json`` (:func:`mmfm.toy.r10.write_outputs`: ``{"rows": [...], "claims": ..., "config": ...}``);
- the GMM sidecars (``cls.json``, ``spatial.json``): iterations, re-seeded, collapsed and empty modes;
- the latent shards' Parquet metadata (:func:`read_images`): the images encoded and the bad images left out.

Targets are reached on the evaluated grid, never interpolated: the step (NFE) reported is the first
evaluated one whose distance is at or below the target. Every output is written to a temporary name
and renamed.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from mmfm import io

METRICS, FD_LOG = "metrics.csv", "fd.csv"  # the names mmfm.train.loop writes
BAD_EXAMPLES = 10  # bad images named in summary.json (all of them are in the shards' metadata)
NA = {"", "-", "na", "nan", "none", "n/a"}

#: The paper's main table (docs/method.md §7: DiTDH-XL, unconditional ImageNet-256, 80 epochs, 50-step ODE)
#: in the words of the README and the presets. The paper labels its rows "Gaussian / Indep.", "GMM / Indep."
#: and "GMM / Mode"; its project page and the release's README read the last two as one mode-coupled GMM
#: run with an unconditional network (3.82) and one with a mode-conditional network (3.18).
PAPER = {
    "imagenet_fid": [
        {"label": "Gaussian baseline", "paper_label": "Gaussian / Indep.", "source": "gaussian",
         "coupling": "independent", "conditioning": "none", "fid": 9.33, "fid_autoguidance": 5.82},
        {"label": "GMM source + mode coupling, unconditional network", "paper_label": "GMM / Indep.", "source": "gmm",
         "coupling": "mode", "conditioning": "none", "fid": 3.82, "fid_autoguidance": 3.23},
        {"label": "+ mode-conditional network", "paper_label": "GMM / Mode", "source": "gmm",
         "coupling": "mode", "conditioning": "mode", "fid": 3.18, "fid_autoguidance": 2.74},
    ],
    "steps_ratio": 30.0,  # "30x faster convergence"
    "nfe_ratio": 5.0,     # "1/5 of the sampling steps"
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
    """``{"rows": [{setting, source, coupling, len, w2, w2_floor, paper_len, paper_w2}], "claims": {...},
    "config": the settings that produced it}``;
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
    return {"rows": rows, "claims": data.get("claims", {}), "config": data.get("config", {})}


def read_images(shard_paths, examples: int = BAD_EXAMPLES) -> dict:
    """What the shards hold of the image folder, from their metadata (``mmfm encode``'s ``bad_images``):
    ``{"images": images encoded (rows that are not stored mirrors), "bad_images": images left out,
    "bad_examples": the first ``examples`` of them as {"path", "reason"}, in shard order}``. A shard
    that records no bad images (written by another tool) counts none; one that lists paths without
    reasons gives ``reason`` ``None``."""
    from mmfm.data import shards  # here: pyarrow is not needed by the rest of the report

    images, bad, named, labels = 0, 0, [], set()
    for path in shard_paths:
        meta = shards.read_metadata(_need(path))
        images += shards.count_originals(path)[1]
        labels |= _labels(path)
        record = meta.get("bad_images") or {}
        count = record.get("count", 0)
        if not (isinstance(count, int) and count >= 0):
            raise ValueError(f"{path}: shard metadata 'bad_images.count' is {count!r}, expected a count")
        bad += count
        listed = record.get("examples") or [{"path": q, "reason": None} for q in record.get("paths", [])]
        named += [{"path": str(e["path"]), "reason": e.get("reason")} for e in listed[:max(0, examples - len(named))]]
    return {"images": images, "classes": len(labels) if labels else None, "bad_images": bad, "bad_examples": named}


def _labels(path) -> set:
    """The distinct labels of a shard (its ``label`` column; none without one)."""
    from mmfm.data import shards

    pf = shards.open_file(path)
    if "label" not in pf.schema_arrow.names:
        return set()
    with shards.reading(path):
        return set(pf.read(columns=["label"]).column("label").unique().to_pylist())


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


def read_gmm(cls_gmm=None, spatial_gmm=None) -> dict:
    """What the GMM stages say about their fit, from the sidecars (``x.json`` beside ``x.safetensors``):
    ``{"k", "rows", "n_iter", "converged", "final_loglik", "reseeded_total", "collapsed", "empty_modes",
    "floored_variances"}``; a value neither sidecar records is ``None``."""
    from mmfm.gmm.files import read_sidecar  # here: it imports the EM code

    out = dict.fromkeys(("k", "rows", "n_iter", "converged", "final_loglik", "reseeded_total", "collapsed",
                         "empty_modes", "floored_variances"))
    if cls_gmm is not None:
        side = read_sidecar(_need(cls_gmm))
        fit = side.get("fit") or {}
        out.update({k: fit.get(k) for k in ("n_iter", "converged", "final_loglik", "reseeded_total", "collapsed")})
        out["k"], out["rows"] = side.get("k"), (side.get("data") or {}).get("rows")
    if spatial_gmm is not None:
        side = read_sidecar(_need(spatial_gmm))
        out["empty_modes"], out["floored_variances"] = side.get("empty_modes"), side.get("floored_variances")
        out["k"] = out["k"] if out["k"] is not None else side.get("k")
    return out


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


class _Reader:
    """Reads an artifact; ``strict``: a missing or malformed file raises (the workflow's report job), else
    it is recorded in ``missing`` with the reason and the value is ``default`` (``mmfm report`` on a
    results folder with runs still training or failed)."""

    def __init__(self, strict: bool):
        self.strict, self.missing = strict, []

    def __call__(self, fn, path, *args, default=None, **kwargs):
        if path is None:
            return default
        absent = [str(q) for q in (path if isinstance(path, (list, tuple)) else [path]) if not Path(q).exists()]
        if not self.strict and absent:
            self.missing += [{"path": q, "reason": "not there (yet)"} for q in absent]
            return default
        try:
            return fn(path, *args, **kwargs)
        except (OSError, ValueError) as err:
            if self.strict:
                raise
            self.missing.append({"path": str(path if not isinstance(path, (list, tuple)) else path[0]),
                                 "reason": f"unreadable ({err})"})
            return default


DESCRIPTORS = ("description", "method", "source", "coupling", "conditioning", "model")


def summarize(runs: dict[str, dict], *, baseline: str, out: Path | None, toy_r10: Path | None = None,
              benchmarks: Path | None = None, nfe_target: float | None = None, shards=None,
              gmm: dict | None = None, fd_eval: dict | None = None, fd_floor: dict | None = None,
              strict: bool = True, absent=()) -> dict:
    """Write ``out`` (summary.json, atomically; nothing when ``None``) and return it.

    ``runs[name] = {"run_dir", "metric" ("fd" | "fid"), "nfe_curve", "samples", "final" (optional JSON),
    "sampler" (default "euler"), "nfe_curves" (optional: ``{sampler: NFE curve}`` of every sampler, the headline
    ``sampler``'s being ``nfe_curve``), "final_nfe", "final_samples", and the descriptors "description", "method",
    "source", "coupling", "conditioning", "model"}``.

    Per run: the descriptors, ``status`` ("complete": its NFE curve is there; else "missing"), ``final``
    (the distance at ``final_nfe`` with ``final_samples`` samples), ``fd_over_steps`` ``[[step, fd], ...]``
    (fd.csv), ``fd_over_nfe`` ``{sampler: [[nfe, fd], ...]}`` (each sampler's NFE curve at its last step, the
    headline sampler first; the targets and ratios are the headline sampler's),
    ``steps_to_baseline_final`` (first evaluated step with fd <= the baseline's last fd.csv value,
    ``steps_target``), ``steps_ratio`` (the baseline's own such step / this run's), ``nfe_for_target``
    (smallest NFE of the curve with fd <= ``nfe_target``, default the baseline's fd at its largest NFE),
    ``nfe_ratio``, ``final_loss``, ``steps`` (last step of metrics.csv), ``wall_s`` (benchmarked seconds of
    jobs whose wildcards name the run). Top level: ``runs``, ``baseline``, ``steps_target``, ``nfe_target``,
    ``fd_eval`` (how the distances were measured), ``fd_floor`` (``{n: distance of n real rows}``),
    ``toy_r10``, ``gmm`` (:func:`read_gmm` of ``gmm = {"cls": path, "spatial": path}``), ``data``
    (:func:`read_images` of ``shards``), ``stages``, ``jobs`` (every benchmarked job), ``paper`` and
    ``missing`` (``[{"path", "reason"}]``: what ``strict=False`` found absent or unreadable).
    """
    if baseline not in runs:
        raise ValueError(f"baseline {baseline!r} is not one of the runs {sorted(runs)}")
    read = _Reader(strict)
    read.missing += [{"path": str(p), "reason": "not there (yet)"} for p in absent]
    data, curves = {}, {}
    for name, spec in runs.items():
        if not {"run_dir", "metric"} <= set(spec):
            raise ValueError(f"runs[{name!r}]: needs 'run_dir' and 'metric', got {sorted(spec)}")
        run_dir = Path(spec["run_dir"])
        nfe = _last_step(read(read_curve, spec.get("nfe_curve"), default=[]))
        data[name] = (read(read_curve, run_dir / FD_LOG, default=[]) if spec.get("fd_log", True) else [],
                      read(read_metrics, run_dir / METRICS, default=[]), nfe)
        headline = spec.get("sampler") or "euler"
        curves[name] = {headline: nfe}
        for sampler, path in (spec.get("nfe_curves") or {}).items():
            if sampler != headline:
                curves[name][sampler] = _last_step(read(read_curve, path, default=[]))
    base_fd, _, base_nfe = data[baseline]
    steps_target = base_fd[-1]["fd"] if base_fd else None
    if nfe_target is None and base_nfe:
        nfe_target = base_nfe[-1]["fd"]
    base_step = first_reaching([(r["step"], r["fd"]) for r in base_fd], steps_target)
    base_n = first_reaching([(r["nfe"], r["fd"]) for r in base_nfe], nfe_target)
    records = read(read_benchmarks, benchmarks, default=[])
    ratio = lambda a, b: a / b if a is not None and b else None  # noqa: E731

    summary_runs = {}
    for name, spec in runs.items():
        fd, metrics, nfe = data[name]
        step = first_reaching([(r["step"], r["fd"]) for r in fd], steps_target)
        n = first_reaching([(r["nfe"], r["fd"]) for r in nfe], nfe_target)
        losses = [r["loss"] for r in metrics if r["loss"] is not None]
        walls = [r["s"] for r in records if r["s"] is not None and name in r["wildcards"].replace("=", "/").split("/")]
        final = read(lambda _: _final(spec, fd), spec["final"]) if spec.get("final") else _final(spec, fd)
        summary_runs[name] = {
            **{k: spec.get(k) for k in DESCRIPTORS}, "status": "complete" if nfe else "missing",
            "samples": str(spec["samples"]) if spec.get("samples") else None, "metric": spec["metric"],
            "final": final, "final_nfe": spec.get("final_nfe"), "final_samples": spec.get("final_samples"),
            "fd_over_steps": [[r["step"], r["fd"]] for r in fd],
            "fd_over_nfe": {s: [[r["nfe"], r["fd"]] for r in rows] for s, rows in curves[name].items()},
            "steps_to_baseline_final": step, "steps_ratio": ratio(base_step, step),
            "nfe_for_target": n, "nfe_ratio": ratio(base_n, n),
            "final_loss": losses[-1] if losses else None, "steps": metrics[-1]["step"] if metrics else None,
            "wall_s": sum(walls) if walls else None,
        }
    gmm = gmm or {}
    summary = _clean({
        "runs": summary_runs, "baseline": baseline, "steps_target": steps_target, "nfe_target": nfe_target,
        "fd_eval": fd_eval, "fd_floor": fd_floor,
        "toy_r10": read(read_r10, toy_r10), "gmm": read(lambda _: read_gmm(gmm.get("cls"), gmm.get("spatial")),
                                                          gmm.get("cls") or gmm.get("spatial")),
        "data": read(read_images, shards) if shards is not None else None,
        "stages": stages(records), "jobs": [{k: r[k] for k in ("rule", "wildcards", "s", "max_rss")} for r in records],
        "paper": PAPER, "missing": read.missing,
    })
    if out is not None:
        io.write_json(out, summary)
    return summary


# ------------------------------------------------------------------------------------------------ from a config

def collect(config: dict, root=".") -> dict:
    """Every file the report reads for a validated ``config`` (the workflow's layout under ``results_dir``,
    relative to ``root``) and what each run is: ``{"results", "runs" (the ``runs`` argument of
    :func:`summarize`, with ``nfe_curves``: ``{sampler: csv}``, ``grids``: ``{nfe: png}`` of the headline
    sampler and ``sampler_grids``: ``{sampler: {nfe: png}}`` of every sampler, headline first), "baseline",
    "nfe_target", "shards", "gmm", "toy_r10", "benchmarks", "fd_eval", "floor_sizes", "floor_rows"}``. Both the report job and ``mmfm report`` use it, so they read the same files."""
    import mmfm.config as mc

    root = Path(root)
    res = root / mc.results_dir(config)
    final_nfe = mc.final_nfe(config)
    runs, train_eval = {}, []
    for name in mc.evaluated_runs(config):
        spec, train, sample = config["runs"][name], mc.train_settings(config, name), mc.sample_settings(config, name)
        if train.get("eval_every"):
            train_eval.append((int(train.get("eval_samples", 0)), int(train.get("eval_steps", 0))))
        samplers, sets = mc.samplers(config, name), mc.sample_sets(config, name, results="")
        sampler_grids = {s: {n: Path(f"{res}{stem}.png") for s_, n, stem in sets if s_ == s} for s in samplers}
        runs[name] = {
            "run_dir": res / "runs" / name, "metric": config["eval"]["metric"],
            "nfe_curve": res / "eval" / name / "nfe_curve.csv", "final": res / "eval" / name / "final.json",
            "nfe_curves": {s: Path(f"{res}{p}") for s, p in mc.nfe_curve_files(config, name, results="").items()},
            "samples": res / "samples" / name / f"nfe-{final_nfe}.npz",
            "grids": sampler_grids[samplers[0]], "sampler_grids": sampler_grids,
            "sampler": samplers[0], "final_nfe": final_nfe, "final_samples": int(sample["n"]),
            "fd_log": bool(train.get("eval_every")),
            "description": spec.get("description"), "method": spec.get("method", "fm"), "source": spec["source"],
            "coupling": spec["coupling"], "conditioning": spec.get("conditioning", "none"),
            "model": train.get("model"),
        }
    uses_gmm = mc.any_gmm(config)
    first = next(iter(runs.values()), {})
    fd_eval = {"metric": config["eval"]["metric"],
               "training": ({"samples": train_eval[0][0], "nfe": train_eval[0][1], "sampler": "euler"}
                            if train_eval and len(set(train_eval)) == 1 else None),
               "final": {"samples": first.get("final_samples"), "nfe": final_nfe, "sampler": first.get("sampler")}}
    sizes = sorted({n for n, _ in train_eval} | {r["final_samples"] for r in runs.values()})
    return {
        "results": res, "runs": runs, "baseline": mc.baseline(config),
        "nfe_target": (config.get("report") or {}).get("nfe_target"),
        "shards": [res / "shards" / f"shard-{i:04d}.parquet" for i in range(config["shards"]["num_shards"])],
        "gmm": {"cls": res / "gmm" / "cls.safetensors", "spatial": res / "gmm" / "spatial.safetensors"} if uses_gmm else {},
        "toy_r10": res / "toy_r10" / "r10.json" if config["toy_r10"]["enabled"] else None,
        "benchmarks": res / "benchmarks", "fd_eval": fd_eval,
        "floor_sizes": sizes if config["eval"]["metric"] == "fd" else [],
        "floor_rows": int(config["eval"]["rows"]),
    }


def fd_floor(shards, sizes, rows: int = 4096, draws: int = 5, seed: int = 0) -> dict[str, float]:
    """The Fréchet distance a perfect model would score at n samples: ``{str(n): mean over ``draws`` of the
    distance between n of the first ``rows`` shard rows, drawn at random, and the statistics of the other
    rows}`` — two disjoint sets of real data, in the space of the distances of the runs. A size that leaves
    fewer than 2 rows on either side has no floor."""
    from mmfm.data.stream import ShardStream
    from mmfm.metrics.frechet import FeatureStats, frechet_distance

    if not sizes:
        return {}
    stream = ShardStream(list(shards), min(rows, 1024), columns=("tokens",), shuffle=False, rank=0, world_size=1)
    parts, got = [], 0
    for batch in stream:
        tok = np.asarray(batch["tokens"], dtype=np.float64).reshape(len(batch["tokens"]), -1)
        parts.append(tok[: rows - got])
        got += len(parts[-1])
        if got >= rows:
            break
    x = np.concatenate(parts)
    rng, out = np.random.default_rng(seed), {}
    warnings.filterwarnings("ignore", "Matrix is singular", module=r"pytorch_fid|mmfm\.metrics")  # constant border pixels
    for n in sizes:
        if n < 2 or len(x) - n < 2:
            continue
        vals = []
        for _ in range(draws):
            order = rng.permutation(len(x))
            a = FeatureStats(x.shape[1]).update(x[order[:n]])
            b = FeatureStats(x.shape[1]).update(x[order[n:]])
            vals.append(frechet_distance(a.mu, a.sigma, b.mu, b.sigma))
        out[str(n)] = float(np.mean(vals))
    return out


PARTIAL = "summary.partial.json"


def summarize_config(config: dict, root=".", *, strict: bool = True) -> tuple[dict, dict]:
    """:func:`collect` the files of ``config`` and :func:`summarize` them; returns ``(summary, files)`` with
    ``files["summary"]`` the file written: ``results_dir/summary.json``, or, when ``strict=False`` found
    something missing, ``summary.partial.json`` beside it. The workflow's target (summary.json) is never
    written from an incomplete folder: Snakemake would take it as done and never retry the failed jobs."""
    files = collect(config, root)
    floor = None
    if files["floor_sizes"]:
        try:
            floor = fd_floor(files["shards"], files["floor_sizes"], files["floor_rows"])
        except (OSError, ValueError):
            if strict:
                raise
    exists = lambda p: p if p is not None and (strict or Path(p).exists()) else None  # noqa: E731
    gmm = {k: exists(v) for k, v in files["gmm"].items()}
    shards = [p for p in files["shards"] if exists(p)]
    summary = summarize(files["runs"], baseline=files["baseline"], out=None,
                        toy_r10=files["toy_r10"], benchmarks=exists(files["benchmarks"]),
                        nfe_target=files["nfe_target"], shards=shards or None, gmm=gmm,
                        fd_eval=files["fd_eval"], fd_floor=floor, strict=strict,
                        absent=[p for p in [*files["shards"], *files["gmm"].values()] if not exists(p)])
    files["summary"] = files["results"] / ("summary.json" if not summary["missing"] else PARTIAL)
    io.write_json(files["summary"], summary)
    return summary, files


def images_line(data: dict) -> str:
    """``Images: 1795 encoded, 2 bad left out (a.gif: reason; ...)``, from summary.json's ``data``."""
    named = [f"{e['path']}: {e['reason']}" if e.get("reason") else e["path"] for e in data["bad_examples"]]
    if data["bad_images"] > len(named):
        named.append(f"{data['bad_images'] - len(named)} more in the shards' metadata and the encode logs")
    bad = f", {data['bad_images']} bad left out ({'; '.join(named)})" if data["bad_images"] else ", no bad images"
    return f"Images: {data['images']} encoded{bad}."
