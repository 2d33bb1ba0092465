"""The results page: ``results/index.html``, one static page over ``summary.json`` (docs/design.md §4).

It opens from disk (no server, no network, no script): the figures are PNG files it writes under
``results/report/``, the sample grids and artifacts are linked where the pipeline wrote them. Sections:

- **runs**: one row per run of ``summary.json`` (name, description, method, source, coupling,
  conditioning, model, steps, the distance at each NFE per sampler, steps and NFE to the baseline's
  targets and their ratios, wall time), the paper's table beside it;
- **curves**: the loss per (method, source) (losses of different sources are not comparable), the
  distance over training with its floor, the distance over NFE;
- **samples**: for each NFE in numeric order, every run's grid side by side (a run's further samplers' grids
  beside it, captioned ``run (sampler)``) beside a real-data grid;
- **GMM**: EM log-likelihood per iteration, sorted weights and per-mode counts, decoded mode means,
  empty / collapsed / re-seeded counts;
- **R^10**: ours beside the paper's, the plot, the settings that produced it;
- **data**, **jobs** (every benchmarked job, grouped by rule) and **files** (a link to every artifact).

The runs table is machine-checked (``ci/browser_check.py``): each body row is ``<tr data-run="NAME">``,
each value cell ``<td data-key="PATH">`` where PATH is a ``/``-path into ``summary["runs"][NAME]`` (a
component applied to a list of ``[x, y]`` pairs selects the pair with that ``x``); numbers print with 4
significant digits, ``—`` for null. Anything that is missing (a run still training, a failed job) is said
on the page; with ``strict=False`` nothing that is missing or unreadable stops the page from rendering.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import os
import re
from pathlib import Path

from mmfm import io

PAGE = "index.html"
INLINE = "report/page.html"  # the same page with its images inlined, for `snakemake --report`
FIGURES = {"loss": "report/loss.png", "fd_training": "report/fd_training.png", "fd_nfe": "report/fd_nfe.png",
           "em": "report/gmm_loglik.png", "weights": "report/gmm_weights.png"}
GALLERY = {"data": "report/data.png", "mode_means": "report/mode_means.png"}  # rule gallery (decoded grids)
TOY_PLOT = "toy_r10/r10.png"

e = html.escape


def fmt(value, suffix: str = "") -> str:
    """What a cell shows: ``—`` for ``None``, 4 significant digits for a float, ints and strings as they are."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}{suffix}"
    return f"{value}{suffix}"


def _cell(run: dict, key: str, suffix: str = "", best: bool = False) -> str:
    value = lookup(run, key)
    cls = ' class="t"' if isinstance(value, str) else ' class="best"' if best else ""
    return f'<td data-key="{e(key)}"{cls}>{e(fmt(value, suffix))}</td>'


def lookup(run: dict, key: str):
    """The value at ``key`` (``a/b/c``) of a run's summary; a number applied to ``[[x, y], ...]`` picks y."""
    node = run
    for part in key.split("/"):
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list):
            node = next((y for x, y in node if _same(x, part)), None)
        if node is None:
            return None
    return node


def _same(x, part: str) -> bool:
    try:
        return float(x) == float(part)
    except (TypeError, ValueError):
        return str(x) == part


# ------------------------------------------------------------------------------------------------ sections

def _nfe_columns(summary: dict) -> list[tuple[str, int]]:
    """``(sampler, NFE)`` of every distance over NFE: samplers in the order the runs list them (the first run's
    headline sampler first), NFEs in numeric order."""
    samplers = list(dict.fromkeys(s for r in summary["runs"].values() for s in (r.get("fd_over_nfe") or {})))
    cols = {(s, int(n)) for r in summary["runs"].values() for s, pts in (r.get("fd_over_nfe") or {}).items()
            for n, _ in pts}
    return sorted(cols, key=lambda c: (samplers.index(c[0]), c[1]))


def runs_section(summary: dict) -> str:
    runs, nfe_cols = summary["runs"], _nfe_columns(summary)
    fe = summary.get("fd_eval") or {}
    final = fe.get("final") or {}
    metric = "FID" if fe.get("metric") == "fid" else "Fréchet distance"
    samplers = {s for s, _ in nfe_cols}
    nfe_head = "".join(f"<th>{n}{'' if len(samplers) == 1 else f' ({e(s)})'}</th>" for s, n in nfe_cols)
    head1 = ('<tr><th rowspan="2">run</th><th rowspan="2">description</th><th rowspan="2">method</th>'
             '<th rowspan="2">source</th><th rowspan="2">coupling</th><th rowspan="2">conditioning</th>'
             '<th rowspan="2">model</th><th rowspan="2">steps</th>'
             + (f'<th colspan="{len(nfe_cols)}">{metric} ↓ at NFE ({e(fmt(final.get("samples")))} samples)</th>'
                if nfe_cols else "")
             + '<th colspan="2" title="training steps to the baseline\'s final distance">steps to target</th>'
               '<th colspan="2" title="sampling steps to the baseline\'s target">NFE to target</th>'
               '<th rowspan="2">wall time (s)</th></tr>')
    head2 = f"<tr>{nfe_head}<th>step</th><th>ratio</th><th>NFE</th><th>ratio</th></tr>"
    best = {}  # the lowest distance of each NFE column, shown in bold
    for s, n in nfe_cols:
        vals = [v for r in runs.values() if (v := lookup(r, f"fd_over_nfe/{s}/{n}")) is not None]
        best[(s, n)] = min(vals) if vals else None
    body = []
    for name, r in runs.items():
        missing = "" if r.get("status") == "complete" else ' data-missing="no NFE curve yet"'
        cells = [f'<th scope="row">{e(name)}</th>'] + [_cell(r, k) for k in
                                                        ("description", "method", "source", "coupling",
                                                         "conditioning", "model", "steps")]
        cells += [_cell(r, f"fd_over_nfe/{s}/{n}", best=lookup(r, f"fd_over_nfe/{s}/{n}") == best[(s, n)])
                  for s, n in nfe_cols]
        cells += [_cell(r, "steps_to_baseline_final"), _cell(r, "steps_ratio", "×"), _cell(r, "nfe_for_target"),
                  _cell(r, "nfe_ratio", "×"), _cell(r, "wall_s")]
        body.append(f'<tr data-run="{e(name)}"{missing}>' + "".join(cells) + "</tr>")
    tr = (fe.get("training") or {})
    notes = [f"Baseline <b>{e(summary['baseline'])}</b>. Steps: the first evaluated training step whose distance "
             f"({e(fmt(tr.get('samples')))} EMA samples, {e(fmt(tr.get('nfe')))} Euler steps) is at or below the "
             f"baseline's final one ({e(fmt(summary.get('steps_target')))}); ratio = the baseline's step / the run's.",
             f"NFE: the fewest sampling steps whose distance ({e(fmt(final.get('samples')))} samples) is at or below "
             f"{e(fmt(summary.get('nfe_target')))} (the baseline's distance at its largest NFE unless "
             "<code>report.nfe_target</code> says otherwise); ratio = the baseline's NFE / the run's. "
             "Targets are read on the evaluated grid, never interpolated; — = not reached or not measured."]
    floor = summary.get("fd_floor") or {}
    if floor:
        notes.append("The distance's floor (two disjoint random sets of real rows: what a perfect model would score): "
                     + ", ".join(f"{e(fmt(v))} at {e(n)} samples" for n, v in sorted(floor.items(), key=lambda kv: int(kv[0])))
                     + ".")
    return (f'<section id="results"><h2>Runs</h2><div class="side"><div class="wide">'
            f'<table id="runs"><thead>{head1}{head2}</thead><tbody>{"".join(body)}</tbody></table>'
            + "".join(f'<p class="note">{n}</p>' for n in notes) + "</div>" + paper_table(summary) + "</div></section>")


def _matches(paper_row: dict, run: dict) -> bool:
    """Whether a run is the paper row's setting: same source and conditioning, a coupling of the same kind
    (``mode`` stands for mode-soft and mode-hard)."""
    return (run.get("source") == paper_row["source"] and (run.get("conditioning") or "none") == paper_row["conditioning"]
            and str(run.get("coupling") or "").startswith(paper_row["coupling"]) and run.get("method", "fm") == "fm")


def paper_table(summary: dict) -> str:
    paper, runs = summary.get("paper") or {}, summary["runs"]
    metric = "FID" if (summary.get("fd_eval") or {}).get("metric") == "fid" else "distance"
    rows = []
    for p in paper.get("imagenet_fid", []):
        ours = [(n, r) for n, r in runs.items() if _matches(p, r)]
        mine = "<br>".join(f"{e(n)}: {e(fmt(r.get('final')))}" for n, r in ours) or "—"
        rows.append(f"<tr><td class=t>{e(p['label'])}</td><td class=t>{e(p['paper_label'])}</td>"
                    f"<td>{fmt(p['fid'])}</td><td>{fmt(p['fid_autoguidance'])}</td><td class=t>{mine}</td></tr>")
    return ('<div class="paper"><table id="paper"><caption>The paper: DiTDH-XL, unconditional ImageNet-256, '
            '80 epochs, 50-step ODE, FID-50K ↓, beside our runs of the same setting</caption><thead><tr>'
            '<th>setting</th><th>the paper\'s row</th><th>FID</th><th>with autoguidance</th>'
            f'<th>ours: run: {metric}</th></tr></thead><tbody>{"".join(rows)}</tbody></table><p class="note">The paper also claims '
            f'{fmt(paper.get("steps_ratio"))}× fewer training steps to the baseline\'s quality and '
            f'{fmt(paper.get("nfe_ratio"))}× fewer sampling steps (compare the ratio columns). Its table labels the '
            'two MM-FM rows "GMM / Indep." and "GMM / Mode"; its project page describes them as a mode-coupled GMM '
            'run with an unconditional network and one with a mode-conditional network, the settings named here.</p></div>')


def _img(src: str, alt: str, cls: str = "") -> str:
    return f'<img src="{e(src)}" alt="{e(alt)}"{f" class={chr(34)}{cls}{chr(34)}" if cls else ""}>'


def _figure(root: Path, rel: str | None, alt: str, caption: str, notes: dict) -> str:
    if rel is None or not (root / rel).is_file():
        why = notes.get(alt, "not there: its inputs are missing")
        return f'<figure class="missing"><p>{e(alt)}: {e(why)}</p><figcaption>{caption}</figcaption></figure>'
    return f'<figure><a href="{e(rel)}">{_img(rel, alt)}</a><figcaption>{caption}</figcaption></figure>'


def curves_section(root: Path, summary: dict, figs: dict, notes: dict) -> str:
    fe = summary.get("fd_eval") or {}
    tr, fin = fe.get("training") or {}, fe.get("final") or {}
    floor = summary.get("fd_floor") or {}
    return ('<section id="curves"><h2>Curves</h2><div class="figs">'
            + _figure(root, figs.get("loss"), "training loss",
                      "Flow-matching loss per training step, one panel per method and source: the regression target "
                      "x1 − x0 depends on the source, so losses of different sources are not comparable.", notes)
            + _figure(root, figs.get("fd_training"), "distance over training",
                      f"Distance of {e(fmt(tr.get('samples')))} EMA samples at {e(fmt(tr.get('nfe')))} Euler steps "
                      f"to the data, every <code>eval_every</code> steps (fd.csv); dashed: the floor of "
                      f"{e(fmt(tr.get('samples')))} real samples ({e(fmt(floor.get(str(tr.get('samples')))))}).", notes)
            + _figure(root, figs.get("fd_nfe"), "distance over NFE",
                      f"Distance of {e(fmt(fin.get('samples')))} samples of the final EMA network against the number of "
                      f"{e(fmt(fin.get('sampler')))} steps, or of the sampler a line names, <i>run (sampler)</i> (a run's "
                      "further samplers: dashed, in the run's colour); grey dashed: the floor at "
                      f"{e(fmt(fin.get('samples')))} samples ({e(fmt(floor.get(str(fin.get('samples')))))}); dotted: the "
                      "baseline's target.", notes)
            + "</div></section>")


def _grids(spec: dict) -> dict[str, dict]:
    """``{sampler: {nfe: png}}`` of a run of :func:`mmfm.report.collect` (headline sampler first)."""
    return spec.get("sampler_grids") or {spec.get("sampler") or "euler": spec.get("grids", {})}


def samples_section(root: Path, files: dict, summary: dict) -> str:
    nfes = sorted({int(n) for spec in files["runs"].values() for g in _grids(spec).values() for n in g})
    fin = (summary.get("fd_eval") or {}).get("final") or {}
    data = GALLERY["data"]
    data_cell = (f'<figure>{_img(data, "data")}<figcaption>data (encoded and decoded)</figcaption></figure>'
                 if (root / data).is_file() else '<figure class="missing"><p>data grid: not there</p></figure>')
    rows = []
    for n in nfes:
        cells = [data_cell]
        for name, spec in files["runs"].items():
            grids = _grids(spec)
            for sampler, by_nfe in grids.items():
                if n not in by_nfe:
                    continue
                label = name if len(grids) == 1 and sampler == fin.get("sampler") else f"{name} ({sampler})"
                rel = _rel(by_nfe[n], root)
                if rel and (root / rel).is_file():
                    cells.append(f'<figure><a href="{e(rel)}">{_img(rel, f"{label} at NFE {n}", "grid")}</a>'
                                 f'<figcaption>{e(label)}</figcaption></figure>')
                else:
                    cells.append(f'<figure class="missing"><p>{e(label)} at NFE {n}: not there</p></figure>')
        rows.append(f'<h3 id="nfe-{n}">NFE {n}</h3><div class="grids">{"".join(cells)}</div>')
    return ('<section id="samples"><h2>Samples</h2><p class="note">The first 64 of each run\'s '
            f'{e(fmt(fin.get("samples")))} samples (the same noise for every run of a source), by the number of '
            f'{e(fmt(fin.get("sampler")))} steps (of the sampler in brackets where one is named); small images are '
            'enlarged with nearest-neighbour pixels.</p>'
            + "".join(rows) + "</section>")


def gmm_section(root: Path, summary: dict, figs: dict, notes: dict) -> str:
    g = summary.get("gmm")
    if not g:
        return ('<section id="gmm"><h2>GMM source</h2><p>No run draws from a GMM, or the GMM stages have not '
                'finished.</p></section>')
    facts = [("modes K", g.get("k")), ("rows fitted", g.get("rows")), ("EM iterations", g.get("n_iter")),
             ("converged", g.get("converged")), ("final mean log-likelihood", g.get("final_loglik")),
             ("re-seeded (empty during EM)", g.get("reseeded_total")), ("collapsed variances", g.get("collapsed")),
             ("empty spatial modes", g.get("empty_modes")), ("floored spatial variances", g.get("floored_variances"))]
    table = ('<table id="gmm-facts"><tbody>' + "".join(f"<tr><th>{e(k)}</th><td>{e(fmt(v))}</td></tr>" for k, v in facts)
             + "</tbody></table>")
    means = GALLERY["mode_means"]
    return ('<section id="gmm"><h2>GMM source</h2><div class="figs">' + table
            + _figure(root, figs.get("em"), "EM log-likelihood",
                      "Mean log-likelihood of the CLS descriptors per EM iteration (markers: iterations that re-seeded "
                      "empty components).", notes)
            + _figure(root, figs.get("weights"), "weights and counts",
                      "Left: the mixture weights, largest first (dashed: uniform 1/K). Right: the rows per mode in the "
                      "spatial stage, sorted.", notes)
            + _figure(root, means if (root / means).is_file() else None, "mode means",
                      "The spatial means of the heaviest modes (up to 64), decoded, largest weight first.", notes)
            + "</div></section>")


def toy_section(root: Path, summary: dict) -> str:
    toy = summary.get("toy_r10")
    if not toy:
        return ""
    head = ("<tr><th>setting</th><th>source</th><th>coupling</th><th>Len</th><th>paper Len</th><th>W2²</th>"
            "<th>W2² floor</th><th>paper W2²</th></tr>")
    body = "".join("<tr>" + "".join(f"<td>{e(fmt(r.get(k)))}</td>" for k in
                                    ("setting", "source", "coupling", "len", "paper_len", "w2", "w2_floor", "paper_w2"))
                   + "</tr>" for r in toy["rows"])
    from mmfm.toy.r10 import R10Config

    cfg = toy.get("config") or {}
    settings = ", ".join(f"{k} {fmt(cfg.get(k))}" for k in ("iters", "batch", "n_eval", "steps", "seed") if k in cfg)
    claims = toy.get("claims") or {}
    claim = "; ".join(
        f"{e(k)}: {'they hold' if v.get('holds') else 'not all hold'} (GMM/mode Len "
        f"{-100 * v.get('len_reduction_vs_gauss_indep', 0):+.0f} % against Gaussian/independent)"
        for k, v in claims.items() if isinstance(v, dict))
    claim = f"The paper's claims (shortest paths and lowest W2² for GMM/mode): {claim}." if claim else ""
    return ('<section id="toy"><h2>R^10 toy: path length and W2²</h2><div class="figs">'
            f'<div><table id="r10"><thead>{head}</thead><tbody>{body}</tbody></table>'
            f'<p class="note">Settings: {e(settings)} (<code>toy_r10</code> in the config; <code>mmfm toy r10</code> '
            f'runs {R10Config().iters:,} iterations by default). W2² floor: the same estimator between two samples of the target. '
            f'{claim}</p></div>'
            + _figure(root, TOY_PLOT, "R^10 plot", "Len and W2² per setting (axes from zero).", {})
            + "</div></section>")


def data_section(summary: dict) -> str:
    d = summary.get("data")
    if not d:
        return '<section id="data"><h2>Data</h2><p>The shards are not there yet.</p></section>'
    bad = "".join(f"<li><code>{e(x['path'])}</code>{': ' + e(x['reason']) if x.get('reason') else ''}</li>"
                  for x in d.get("bad_examples", []))
    more = d["bad_images"] - len(d.get("bad_examples", []))
    return (f'<section id="data"><h2>Data</h2><p>{e(fmt(d["images"]))} images encoded in {e(fmt(d.get("classes")))} '
            f'classes; {e(fmt(d["bad_images"]))} bad images left out.</p>'
            + (f"<ul>{bad}</ul>" if bad else "")
            + (f"<p>{more} more in the shards' metadata and the encode logs.</p>" if more > 0 else "") + "</section>")


def jobs_section(summary: dict) -> str:
    jobs = summary.get("jobs") or []
    if not jobs:
        return '<section id="jobs"><h2>Jobs</h2><p>No benchmark files yet.</p></section>'
    by_rule: dict[str, list] = {}
    for j in jobs:
        by_rule.setdefault(j["rule"], []).append(j)
    st = summary.get("stages") or {}
    parts = []
    for rule, js in by_rule.items():
        s = st.get(rule, {})
        rows = "".join(f"<tr><td>{e(j['wildcards'] or '—')}</td><td>{e(fmt(j['s']))}</td><td>{e(fmt(j['max_rss']))}</td></tr>"
                       for j in sorted(js, key=lambda j: j["wildcards"]))
        parts.append(f'<tr class="rule"><th>{e(rule)}</th><td>{len(js)}</td><td>{e(fmt(s.get("wall_s")))}</td>'
                     f'<td>{e(fmt(s.get("max_s")))}</td><td>{e(fmt(s.get("peak_mem_mb")))}</td>'
                     f'<td><details><summary>every job</summary><table><thead><tr><th>wildcards</th><th>wall (s)</th>'
                     f'<th>peak memory (MB)</th></tr></thead><tbody>{rows}</tbody></table></details></td></tr>')
    return ('<section id="jobs"><h2>Jobs</h2><table id="jobs-table"><thead><tr><th>rule</th><th>jobs</th>'
            '<th>wall time, all jobs (s)</th><th>longest job (s)</th><th>peak memory (MB)</th><th></th></tr></thead>'
            f'<tbody>{"".join(parts)}</tbody></table><p class="note">From Snakemake\'s benchmark files (max RSS); '
            '— = not measured.</p></section>')


def _rel(path, root: Path) -> str | None:
    if path is None:
        return None
    try:
        return os.path.relpath(Path(path), root)
    except ValueError:  # another drive
        return None


def files_section(root: Path, files: dict) -> str:
    groups: list[tuple[str, list]] = [("summary", [files.get("summary", root / "summary.json")]), ("shards", files["shards"]),
                                      ("GMM", [p for g in files["gmm"].values() for p in (g, io.sidecar_path(g))])]
    for name, spec in files["runs"].items():
        run = Path(spec["run_dir"])
        curves = list((spec.get("nfe_curves") or {"": spec["nfe_curve"]}).values())
        sets = [Path(p).with_suffix(".npz") for g in _grids(spec).values() for _, p in sorted(g.items())]
        if not spec.get("sampler_grids"):  # (a files dict without the layout: what is there)
            sets = sorted(Path(spec["samples"]).parent.glob("nfe-*.npz"), key=_nfe_key)
        groups.append((name, [run / "ema.safetensors", run / "metrics.csv", run / "fd.csv", run / "train.log",
                              *curves, spec["final"], *sets]))
    if files.get("toy_r10"):
        t = Path(files["toy_r10"])
        groups.append(("R^10 toy", [t, t.with_suffix(".csv"), t.with_suffix(".png")]))
    groups.append(("logs", sorted((root / "logs").rglob("*.log")) if (root / "logs").is_dir() else []))
    items = []
    for label, paths in groups:
        links = []
        for p in paths:
            rel = _rel(p, root)
            if rel and Path(p).is_file():
                links.append(f'<a href="{e(rel)}">{e(rel)}</a>')
            elif rel:
                links.append(f'<span class="absent">{e(rel)} (not there)</span>')
        if links:
            items.append(f"<li><b>{e(label)}</b>: {' · '.join(links)}</li>")
    return ('<section id="files"><h2>Files</h2><p class="note">Everything opens with ordinary tools: Parquet, '
            f'safetensors, CSV, JSON, NumPy .npz.</p><ul class="files">{"".join(items)}</ul></section>')


def _nfe_key(p: Path):
    m = re.search(r"(\d+)", p.stem)
    return int(m.group(1)) if m else 0


CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{background:#20232a;color:#fff;padding:14px 28px}header h1{margin:0;font-size:22px}header p{margin:4px 0 0;color:#cfd3da}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:6px 28px;z-index:2}
nav a{margin-right:16px;color:#0b5cad;text-decoration:none}
main{padding:4px 28px 40px;max-width:1800px}section{margin-top:26px}h2{border-bottom:2px solid #20232a;padding-bottom:3px}
table{border-collapse:collapse;background:#fff;font-variant-numeric:tabular-nums}#runs{font-size:13.5px}#paper td:last-child{white-space:nowrap}#runs td,#runs th{padding:3px 6px}
th,td{border:1px solid #d6d6d6;padding:3px 8px;text-align:right;vertical-align:top}thead th{background:#eef0f3}
td.t{text-align:left}td[data-key=description]{min-width:150px;max-width:230px}thead th{text-align:center}tbody th{text-align:left;white-space:nowrap}
td.best{font-weight:700}
tr[data-missing]{color:#999;background:#fff6f6}.note{color:#555;font-size:13px;max-width:1100px}
.side{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}.wide{overflow-x:auto;max-width:100%}.paper{max-width:560px}caption{text-align:left;font-weight:600;padding:4px 0}
.figs{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}figure{margin:0;max-width:820px}
figure img{max-width:100%;border:1px solid #ddd;background:#fff}figcaption{font-size:13px;color:#444;max-width:760px}
.grids{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:12px}
.grids img{width:100%;image-rendering:pixelated}.grids figcaption{text-align:center;font-weight:600}
.missing{border:1px dashed #c88;padding:8px;color:#a33;background:#fff}.banner{background:#fff3cd;border:1px solid #e0c36c;padding:8px 14px;margin-top:14px}
.absent{color:#a33}ul.files li{margin:3px 0;word-break:break-all}details summary{cursor:pointer;color:#0b5cad}
"""


def render(summary: dict, files: dict, *, notes: dict | None = None, title: str = "mmfm results") -> str:
    """The page's HTML for ``summary`` (:func:`mmfm.report.summarize`) and ``files`` (:func:`mmfm.report.collect`)."""
    root, notes = Path(files["results"]), notes or {}
    figs = {k: v for k, v in FIGURES.items() if (root / v).is_file()}
    missing = summary.get("missing") or []
    not_done = [n for n, r in summary["runs"].items() if r.get("status") != "complete"]
    banner = ""
    if missing or not_done:
        items = "".join(f"<li><code>{e(m['path'])}</code>: {e(m['reason'])}</li>" for m in missing[:40])
        more = f"<li>… {len(missing) - 40} more</li>" if len(missing) > 40 else ""
        banner = ('<div class="banner" id="missing"><b>Incomplete:</b> '
                  + (f"runs without results yet: {e(', '.join(not_done))}. " if not_done else "")
                  + f"{len(missing)} expected file(s) missing or unreadable; the page shows what exists.<ul>{items}{more}</ul></div>")
    d = summary.get("data") or {}
    sub = [f"{len(summary['runs'])} runs", f"baseline {summary['baseline']}"]
    if d:
        sub.append(f"{fmt(d.get('images'))} images")
    if (summary.get("gmm") or {}).get("k"):
        sub.append(f"K = {summary['gmm']['k']} modes")
    sub.append("written " + _dt.datetime.now().strftime("%Y-%m-%d %H:%M"))
    nav = "".join(f'<a href="#{i}">{t}</a>' for i, t in (("results", "Runs"), ("curves", "Curves"), ("samples", "Samples"),
                                                          ("gmm", "GMM"), ("toy", "R^10"), ("data", "Data"),
                                                          ("jobs", "Jobs"), ("files", "Files")))
    body = (runs_section(summary) + curves_section(root, summary, figs, notes) + samples_section(root, files, summary)
            + gmm_section(root, summary, figs, notes) + (toy_section(root, summary) or '<section id="toy"></section>')
            + data_section(summary) + jobs_section(summary) + files_section(root, files))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>\n'
            f'<body><header><h1>{e(title)}</h1><p>{e(" · ".join(sub))}</p></header><nav>{nav}</nav>'
            f'<main>{banner}{body}</main></body></html>\n')


def draw_figures(summary: dict, files: dict, *, strict: bool = True) -> dict[str, str]:
    """The page's figures under ``results/report/`` from what exists; returns ``{figure: why not}`` for those
    it could not draw (``strict``: an error raises)."""
    from mmfm import figures

    root, notes = Path(files["results"]), {}
    runs, fe = summary["runs"], summary.get("fd_eval") or {}
    floor = summary.get("fd_floor") or {}
    colors = figures.run_colors(list(runs))

    def floor_at(section):
        n = (fe.get(section) or {}).get("samples")
        return floor.get(str(n)), n

    def attempt(key, alt, fn):
        out = root / FIGURES[key]
        try:
            fn(out)
        except (OSError, ValueError, KeyError) as err:
            if strict:
                raise
            notes[alt] = f"could not be drawn ({type(err).__name__}: {err})"

    metrics = {n: {"metrics": Path(s["run_dir"]) / "metrics.csv", "source": s.get("source"), "method": s.get("method")}
               for n, s in files["runs"].items() if (Path(s["run_dir"]) / "metrics.csv").is_file()}
    if metrics:
        attempt("loss", "training loss", lambda out: figures.loss_curves(metrics, out, colors=colors))
    fd_curves = {n: r["fd_over_steps"] for n, r in runs.items() if r.get("fd_over_steps")}
    if fd_curves:
        f, n = floor_at("training")
        attempt("fd_training", "distance over training", lambda out: figures.fd_over_training(
            fd_curves, out, floor=f, samples=n, nfe=(fe.get("training") or {}).get("nfe"), colors=colors))
    nfe_curves = {n: r["fd_over_nfe"] for n, r in runs.items() if any((r.get("fd_over_nfe") or {}).values())}
    if nfe_curves:
        f, n = floor_at("final")
        attempt("fd_nfe", "distance over NFE", lambda out: figures.fd_over_nfe(
            nfe_curves, out, floor=f, samples=n, target=summary.get("nfe_target"),
            sampler=(fe.get("final") or {}).get("sampler") or "euler", colors=colors))
    gmm = files.get("gmm") or {}
    if gmm.get("cls") and io.sidecar_path(gmm["cls"]).is_file():
        attempt("em", "EM log-likelihood", lambda out: figures.em_log_likelihood(io.sidecar_path(gmm["cls"]), out))
    if gmm.get("spatial") and Path(gmm["spatial"]).is_file():
        def weights(out):
            t, _ = io.open_tensors(gmm["spatial"], ["weights", "counts"])
            figures.weights_and_counts(t["weights"], t.get("counts"), out,
                                       empty=(summary.get("gmm") or {}).get("empty_modes"))
        attempt("weights", "weights and counts", weights)
    return notes


def draw_gallery(files: dict, config: dict, device: str = "cpu", *, n: int = 64, strict: bool = True) -> dict[str, str]:
    """The decoded grids under ``results/report/``: ``data.png`` (``n`` real rows of the shards, encoded and
    decoded, so they pass the decoder the samples pass) and ``mode_means.png`` (the spatial means of the ``n``
    heaviest modes), with the config's tokenizer; returns ``{grid: why not}`` for those it could not draw."""
    import mmfm.config as mc
    from mmfm import figures
    from mmfm.sample import save_grid

    root, notes = Path(files["results"]), {}
    shards = [p for p in files["shards"] if Path(p).is_file()]
    spatial = (files.get("gmm") or {}).get("spatial")
    if not shards and not (spatial and Path(spatial).is_file()):
        return {"data": "the shards are not there yet"}
    try:
        from mmfm.encoders import load_tokenizer
        from mmfm.encoders.normalization import load_norm_stats

        enc = config["encoder"]
        tokenizer = load_tokenizer(**mc.tokenizer_kwargs(enc, device, config.get("decoder")))
        norm = load_norm_stats(enc["norm_stats"]) if enc.get("norm_stats") else None
        if len(shards) == len(files["shards"]):
            images, _ = figures.data_images(shards, tokenizer, norm, n=n, seed=0)
            save_grid(root / GALLERY["data"], images, max_images=n)
        if spatial and Path(spatial).is_file():
            images, _, _ = figures.mode_means_images(spatial, tokenizer, norm, n=n)
            save_grid(root / GALLERY["mode_means"], images, max_images=n)
    except (OSError, ValueError, RuntimeError) as err:
        if strict:
            raise
        notes["mode means"] = notes["data"] = f"could not be decoded ({type(err).__name__}: {err})"
    return notes


def inline(page: str, root: Path) -> str:
    """``page`` with every local ``<img src>`` replaced by a data URI and links made plain text: one file that
    the Snakemake report can embed."""
    def img(m):
        path = root / html.unescape(m.group(1))
        if not path.is_file():
            return m.group(0)
        kind = "svg+xml" if path.suffix.lower() == ".svg" else path.suffix.lower().lstrip(".")
        return f'src="data:image/{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"'

    page = re.sub(r'src="([^":]+)"', img, page)
    return re.sub(r'<a href="(?!#)[^"]*">', "<a>", page)


def write(summary: dict, files: dict, *, strict: bool = True, inline_copy: bool = True,
          notes: dict | None = None) -> Path:
    """Draw the figures, write ``results/index.html`` (and ``results/report/page.html`` with the images
    inlined), each atomically; returns the page's path."""
    root = Path(files["results"])
    (root / "report").mkdir(parents=True, exist_ok=True)
    notes = {**(notes or {}), **draw_figures(summary, files, strict=strict)}
    page = render(summary, files, notes=notes)
    out = root / PAGE
    with io.atomic_path(out) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    if inline_copy:
        with io.atomic_path(root / INLINE) as tmp:
            Path(tmp).write_text(inline(page, root), encoding="utf-8")
    return out
