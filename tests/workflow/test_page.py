"""The results page of the tiny demo DAG (mmfm.page): its runs table says what summary.json says, every image and
link it has resolves on disk, and a results folder with a run missing still gets a page that says so."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

from mmfm.page import fmt, lookup

from tests.workflow.conftest import TINY_RUNS, smk


class _Page(HTMLParser):
    """The runs table's cells ``{run: {key: text}}``, the rows' attributes, and every ``src`` / ``href``."""

    def __init__(self):
        super().__init__()
        self.cells, self.rows, self.refs, self.ids = {}, {}, [], set()
        self._run = self._key = None
        self._in_runs = False
        self._text = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "table" and a.get("id") == "runs":
            self._in_runs = True
        if self._in_runs and tag == "tr" and "data-run" in a:
            self._run = a["data-run"]
            self.rows[self._run] = a
            self.cells[self._run] = {}
        if self._in_runs and tag == "td" and "data-key" in a:
            self._key, self._text = a["data-key"], []
        for k in ("src", "href"):
            if a.get(k):
                self.refs.append(a[k])

    def handle_endtag(self, tag):
        if tag == "td" and self._key is not None:
            self.cells[self._run][self._key] = "".join(self._text)
            self._key = None
        if tag == "table":
            self._in_runs = False

    def handle_data(self, data):
        if self._key is not None:
            self._text.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _check_refs(page: _Page, root: Path) -> None:
    for ref in page.refs:
        assert ":" not in ref.split("/")[0], f"{ref}: the page must not leave the disk"
        if ref.startswith("#"):
            assert ref[1:] in page.ids, f"{ref}: no such anchor"
        else:
            assert (root / ref).is_file(), f"{ref}: linked from the page, not on disk"


def test_the_page_shows_summary_json(demo):
    workdir, _ = demo
    root = workdir / "results"
    summary = json.loads((root / "summary.json").read_text())
    page = _parse(root / "index.html")
    assert list(page.cells) == list(summary["runs"]) == list(TINY_RUNS)
    for run, cells in page.cells.items():
        r = summary["runs"][run]
        assert "fd_over_nfe/euler/1" in cells and "fd_over_nfe/euler/2" in cells and "steps_ratio" in cells
        for key, text in cells.items():
            suffix = "×" if key.endswith("_ratio") and lookup(r, key) is not None else ""
            assert text == fmt(lookup(r, key), suffix), (run, key, text)
        assert "data-missing" not in page.rows[run]
    assert [lookup(summary["runs"]["gmm-mode"], f"fd_over_nfe/euler/{n}") for n in (1, 2)] == \
        [v for _, v in summary["runs"]["gmm-mode"]["fd_over_nfe"]["euler"]]
    _check_refs(page, root)
    text = (root / "index.html").read_text()
    for section in ("results", "curves", "samples", "gmm", "toy", "data", "jobs", "files"):
        assert f'<section id="{section}">' in text
    # every NFE's grids in numeric order, the data grid, the decoded mode means, the figures
    assert text.index('id="nfe-1"') < text.index('id="nfe-2"')
    for fig in ("report/data.png", "report/mode_means.png", "report/loss.png", "report/fd_training.png",
                "report/fd_nfe.png", "report/gmm_loglik.png", "report/gmm_weights.png", "toy_r10/r10.png",
                "samples/gmm-mode/nfe-2.png"):
        assert f'src="{fig}"' in text, fig
    assert summary["missing"] == [] and summary["gmm"]["k"] == 4 and summary["data"]["classes"] == 10
    # the copy for `snakemake --report`: one file, every image inlined
    inline = (root / "report" / "page.html").read_text()
    assert 'src="report/' not in inline and inline.count('src="data:image/png;base64,') == text.count("<img ")


def test_a_missing_run_is_said_not_fatal(demo, tmp_path):
    workdir, configfile = demo
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy, symlinks=True)
    shutil.rmtree(copy / "results" / "eval" / "gmm-mode")  # as if its evaluation failed
    shutil.rmtree(copy / "results" / "samples" / "gmm-mode")
    for name in ("index.html", "summary.json"):  # as if the report had never run
        (copy / "results" / name).unlink()
    res = subprocess.run([sys.executable, "-m", "mmfm.cli", "report",
                          "--configfile", configfile, "--directory", str(copy)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert "expected file(s) missing or unreadable" in res.stdout
    root = copy / "results"
    assert not (root / "summary.json").exists()  # the workflow's target: only a complete folder writes it
    summary = json.loads((root / "summary.partial.json").read_text())
    assert summary["runs"]["gmm-mode"]["status"] == "missing"
    assert summary["runs"]["gauss-indep"]["status"] == "complete"
    assert any(m["path"].endswith("eval/gmm-mode/nfe_curve.csv") for m in summary["missing"])
    page = _parse(root / "index.html")
    assert "data-missing" in page.rows["gmm-mode"] and "data-missing" not in page.rows["gauss-indep"]
    text = (root / "index.html").read_text()
    assert 'id="missing"' in text and "gmm-mode at NFE 2: not there" in text
    _check_refs(page, root)
    # and Snakemake takes it from there: the missing run's jobs and the report are still to do
    jobs = smk(copy, "-n", "--cores", "1", "--configfile", configfile).stdout
    assert "rule sample:" in jobs and "rule evaluate:" in jobs and "rule report:" in jobs
