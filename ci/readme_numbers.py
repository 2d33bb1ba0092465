#!/usr/bin/env python3
"""The README's demo numbers against the demo's own ``results/summary.json`` (issue 15: the README, the page
and summary.json agree on every number they share). Run by ``.ci/run`` after the demo DAG.

    python ci/readme_numbers.py [README.md] [results/summary.json]

Checks, each to the README's printed precision (a relative 1 %, for the last digit's rounding):

- the headline table: the demo column of "Gaussian baseline", "GMM source + mode coupling, unconditional
  network" and "+ mode-conditional network" is the ``final`` of gauss-indep, gmm-mode and gmm-mode-cond;
- the NFE tables (``| run | NFE 1 | 2 | ...``, or starting at another NFE): every cell is the run's ``fd_over_nfe`` at that NFE (its headline
  sampler's; a row ``run (sampler)`` is that sampler's curve);
- the training table (``| run | step 25 | 50 | ...``): every cell is the run's ``fd_over_steps`` at that step.

Exit 1, naming each cell that disagrees.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HEADLINE = {"Gaussian baseline": "gauss-indep", "GMM source + mode coupling, unconditional network": "gmm-mode",
            "+ mode-conditional network": "gmm-mode-cond"}


def _tables(lines: list[str], head: re.Pattern) -> list[tuple[list[int], dict[str, list[float]]]]:
    """Every table whose header matches ``head``: ``(the header's numbers, {row label: values})``."""
    out = []
    for i, line in enumerate(lines):
        if head.match(line):
            xs = [int(x) for x in re.findall(r"\d+", line)]
            rows = {}
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cells = [c.strip() for c in row.strip().strip("|").split("|")]
                rows[cells[0]] = [float(c.replace(",", "")) for c in cells[1:]]
            out.append((xs, rows))
    if not out:
        raise SystemExit(f"README: no table whose header matches {head.pattern!r}")
    return out


def check(readme: Path, summary: Path) -> list[str]:
    lines = readme.read_text(encoding="utf-8").splitlines()
    runs = json.loads(summary.read_text())["runs"]
    problems = []

    def same(where: str, printed: float, value) -> None:
        if value is None or abs(printed - value) > 0.01 * abs(value):
            problems.append(f"{where}: the README says {printed:g}, summary.json {value}")

    for label, run in HEADLINE.items():
        row = next((ln for ln in lines if ln.startswith(f"| {label} |")), None)
        if row is None:
            problems.append(f"headline: no row {label!r}")
            continue
        m = re.search(r"([\d.]+)\s*\|\s*$", row)
        same(f"headline {label!r}", float(m.group(1)), runs[run]["final"])
    for head, key in ((re.compile(r"^\| run \| NFE \d+ "), "fd_over_nfe"), (re.compile(r"^\| run \| step \d+ "), "fd_over_steps")):
        for xs, rows in _tables(lines, head):
            for label, values in rows.items():
                run, _, sampler = label.partition(" (")  # "gm-gmm-mode-cond (gm-sde)": that sampler's curve
                pts = runs[run][key]
                if isinstance(pts, dict):
                    pts = pts[sampler.rstrip(")")] if sampler else next(iter(pts.values()))
                pts = dict(pts)
                for x, v in zip(xs, values):
                    same(f"{key} table, {run} at {x}", v, pts.get(x))
    return problems


def main() -> int:
    readme = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    summary = Path(sys.argv[2] if len(sys.argv) > 2 else "results/summary.json")
    problems = check(readme, summary)
    for p in problems:
        print(f"FAIL: {p}")
    print(f"README numbers against {summary}: {'OK' if not problems else f'{len(problems)} disagree'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
