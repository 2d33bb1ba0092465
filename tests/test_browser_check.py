"""ci/browser_check.py: the results page opened from disk in headless Debian Chromium (Playwright), on
small hand-written pages: a good one passes, and each fault a reader would see is named.

The checks share one browser (the module's ``browser`` fixture; each check opens its page in a fresh
context of its own, as check_page does with a browser of its own); the command line launches its own."""

import http.server
import importlib.util
import json
import threading
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)

_spec = importlib.util.spec_from_file_location("browser_check", Path(__file__).parents[1] / "ci" / "browser_check.py")
bc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bc)

SUMMARY = {
    "baseline": "base",
    "runs": {
        "base": {"metric": "fd", "final": 6.60412, "steps": 400, "steps_ratio": None, "nfe_ratio": 1.0,
                 "samples": "samples/base", "fd_over_nfe": {"euler": [[1, 13.4], [2, 7.55], [16, 6.6]]}},
        "gmm-mode": {"metric": "fd", "final": 3.18333, "steps": 400, "steps_ratio": 2.5, "nfe_ratio": 4.0,
                     "samples": "samples/gmm-mode", "fd_over_nfe": {"euler": [[1, 5.25], [2, 4.1], [16, 0.000123456]]}},
    },
}
# what the page shows for each run: (data-key, text)
CELLS = {
    "base": [("metric", "fd"), ("final", "6.604"), ("steps", "400"), ("steps_ratio", "—"), ("nfe_ratio", "1×"),
             ("fd_over_nfe/euler/16", "6.6"), ("fd_over_nfe/euler/1", "13.4")],
    "gmm-mode": [("metric", "fd"), ("final", "3.183"), ("steps", "400"), ("steps_ratio", "2.5×"),
                 ("nfe_ratio", "4×"), ("fd_over_nfe/euler/16", "0.0001235"), ("fd_over_nfe/euler/1", "5.25")],
}


def make_page(root: Path, *, head: str = "", body: str = "", cells=None, script_table: bool = False) -> Path:
    """RESULTS/ with summary.json, report/curve.png, samples/<run>/nfe-16.png and an index.html following
    the page's DOM contract; ``cells`` replaces :data:`CELLS`; ``script_table`` renders the table from
    inline JSON (as a page may), else it is static HTML."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.json").write_text(json.dumps(SUMMARY))
    (root / "report").mkdir(exist_ok=True)
    Image.new("RGB", (64, 32), (200, 30, 30)).save(root / "report" / "curve.png")
    for run in SUMMARY["runs"]:
        (root / "samples" / run).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (30, 30, 200)).save(root / "samples" / run / "nfe-16.png")
    cells = CELLS if cells is None else cells
    if script_table:
        table = ('<table id="runs"><thead><tr><th>run</th></tr></thead><tbody></tbody></table>\n<script>\n'
                 f"const CELLS = {json.dumps(cells)};\n"
                 'const tbody = document.querySelector("#runs tbody");\n'
                 "for (const [run, cs] of Object.entries(CELLS)) {\n"
                 '  const tr = document.createElement("tr"); tr.dataset.run = run;\n'
                 '  for (const [key, text] of cs) { const td = document.createElement("td"); td.dataset.key = key;'
                 " td.textContent = text; tr.append(td); }\n"
                 "  tbody.append(tr);\n}\n</script>")
    else:
        rows = "\n".join(f'<tr data-run="{run}"><th>{run}</th>'
                         + "".join(f'<td data-key="{k}">{t}</td>' for k, t in cs) + "</tr>"
                         for run, cs in cells.items())
        table = f'<table id="runs"><thead><tr><th>run</th></tr></thead><tbody>\n{rows}\n</tbody></table>'
    samples = "".join(f'<a href="samples/{r}/nfe-16.png"><img src="samples/{r}/nfe-16.png" alt="{r}"></a>'
                      for r in SUMMARY["runs"])
    page = root / "index.html"
    page.write_text(f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>results</title>
<link rel="icon" href="data:,">
<style>body{{font-family:sans-serif}} td{{padding:2px 6px}}</style>{head}</head>
<body><h1 id="top-of-page">Results</h1>
<p><a href="#runs">runs</a> · <a href="summary.json">summary.json</a> · <a href="report/">report</a></p>
{table}
<h2 id="curves">Curves</h2><img src="report/curve.png" alt="curve" loading="lazy">
<div style="height:1500px"></div><p>{samples}</p>
{body}
</body></html>
""", encoding="utf-8")
    return page


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module's checks (launching it is most of a check's time)."""
    with bc.open_browser(CHROMIUM) as b:
        yield b


def check(root: Path, browser, **kw) -> dict:
    return bc.check_page(root, chromium=CHROMIUM, browser=browser, **kw)


def only(res: dict, *needles: str) -> str:
    """The one problem of ``res``, asserting it names every needle."""
    assert not res["ok"] and len(res["problems"]) == 1, res["problems"]
    problem = res["problems"][0]
    assert all(n in problem for n in needles), problem
    return problem


@pytest.mark.parametrize("script_table", [False, True], ids=["static", "scripted"])
def test_good_page_passes(tmp_path, script_table, browser):
    root = tmp_path / "results"
    make_page(root, script_table=script_table)
    res = check(root, browser)
    assert res["ok"], res["problems"]
    assert res["runs_checked"] == 2 and res["cells_checked"] == 14 and res["images"] == 3
    png, dom = Path(res["screenshot"]), Path(res["dom"])
    assert png == root / "screenshots" / "index.png" and dom == root / "screenshots" / "index.html"
    from PIL import Image

    with Image.open(png) as im:
        assert im.width == 1400 and im.height > 1500  # the full page, not the 900 px viewport
    assert 'data-run="gmm-mode"' in dom.read_text()  # the rendered DOM, rows made by the script included


def test_cli_json_and_exit_code(tmp_path):
    """The command as CI runs it (a process of its own: it launches its own browser)."""
    import subprocess
    import sys

    root = tmp_path / "results"
    make_page(root, body='<img src="report/nope.png">')
    shot = tmp_path / "shots" / "page.png"
    proc = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "ci" / "browser_check.py"), str(root),
                           "--screenshot", str(shot), "--chromium", CHROMIUM, "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    res = json.loads(lines[-1])
    assert set(res) >= {"ok", "problems", "runs_checked", "cells_checked", "images", "screenshot", "dom"}
    assert res["ok"] is False and res["screenshot"] == str(shot) and res["dom"] == str(tmp_path / "shots" / "page.html")
    assert any(line.startswith("FAIL: ") and "nope.png" in line for line in lines)
    assert shot.is_file() and (tmp_path / "shots" / "page.html").is_file()


def test_missing_image(tmp_path, browser):
    """Chromium fails a missing file:// image as a request (net::ERR_FILE_NOT_FOUND) and the <img> is
    complete with naturalWidth 0; its "Failed to load resource" console error is not reported again."""
    root = tmp_path / "results"
    make_page(root, body='<img id="gone" src="samples/x/nfe-16.png">')
    res = check(root, browser)
    assert len(res["problems"]) == 2, res["problems"]
    failed, img = res["problems"]
    assert failed.startswith("request failed: file://") and "ERR_FILE_NOT_FOUND" in failed
    assert "<img id='gone' src=\"samples/x/nfe-16.png\"> did not load" in img


def test_console_error_and_warning(tmp_path, browser):
    root = tmp_path / "results"
    make_page(root, body='<script>console.error("boom from the page"); console.warn("careful");</script>')
    res = check(root, browser)
    assert len(res["problems"]) == 2, res["problems"]
    assert any(p.startswith("console error at file://") and "boom from the page" in p for p in res["problems"])
    assert any(p.startswith("console warning") and "careful" in p for p in res["problems"])


def test_uncaught_exception(tmp_path, browser):
    root = tmp_path / "results"
    make_page(root, body="<script>function render() { undefinedThing.x = 1; } render();</script>")
    only(check(root, browser), "uncaught exception", "undefinedThing is not defined")


def test_wrong_number_in_a_cell(tmp_path, browser):
    root = tmp_path / "results"
    cells = {k: list(v) for k, v in CELLS.items()}
    cells["gmm-mode"][1] = ("final", "3.19")  # summary: 3.18333 -> "3.183"
    make_page(root, cells=cells)
    only(check(root, browser), "row 'gmm-mode'", "data-key='final'", "'3.19'", "3.183")


def test_number_within_tolerance_and_pair_lookup(tmp_path, browser):
    root = tmp_path / "results"
    cells = {k: list(v) for k, v in CELLS.items()}
    cells["base"][1] = ("final", "6.6041")  # more digits than .4g: within 5e-4 of 6.60412
    cells["gmm-mode"][5] = ("fd_over_nfe/euler/2", "4.1")
    make_page(root, cells=cells)
    assert check(root, browser)["ok"]
    cells["gmm-mode"][5] = ("fd_over_nfe/euler/8", "4.1")  # no NFE 8 in the list
    make_page(root, cells=cells)
    only(check(root, browser), "data-key='fd_over_nfe/euler/8'", "no pair with x = 8")


def test_run_missing_from_the_table_and_an_extra_row(tmp_path, browser):
    root = tmp_path / "results"
    make_page(root, cells={"base": CELLS["base"]})
    only(check(root, browser), "no row", "'gmm-mode'")
    make_page(root, cells={**CELLS, "ghost": [("final", "1")]})
    only(check(root, browser), "'ghost'", "not a run of summary.json")


def test_missing_results_row_may_be_empty(tmp_path, browser):
    root = tmp_path / "results"
    make_page(root)
    page = root / "index.html"
    text = page.read_text().replace('<tr data-run="gmm-mode">', '<tr data-run="gmm-mode" data-missing="no fd.csv">')
    text = text.replace('<td data-key="final">3.183</td>', '<td data-key="final"></td>')
    page.write_text(text)
    assert check(root, browser)["ok"]


def test_broken_relative_link_and_anchor(tmp_path, browser):
    root = tmp_path / "results"
    make_page(root, body='<a href="report/missing.html">gone</a> <a href="#nowhere">x</a> <a href="#curves">ok</a>')
    res = check(root, browser)
    assert len(res["problems"]) == 2, res["problems"]
    assert '<a href="report/missing.html"> ("gone"): report/missing.html does not exist' in res["problems"][0]
    assert "'nowhere'" in res["problems"][1]


def test_network_request_is_flagged_and_never_sent(tmp_path, browser):
    """A request to http://example.invalid is named; requests and a WebSocket to a live local HTTP server
    are too, and the server sees nothing: the browser aborts them before they leave."""
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        local = f"http://127.0.0.1:{server.server_address[1]}"
        root = tmp_path / "results"
        make_page(root, head='<script src="http://example.invalid/lib.js"></script>',
                  body=f'<img src="{local}/pixel.png"><script>fetch("{local}/beacon").catch(() => 0);'
                       f'new WebSocket("ws://127.0.0.1:{server.server_address[1]}/ws");</script>')
        res = check(root, browser)
    finally:
        server.shutdown()
        server.server_close()
    assert hits == []
    network = [p for p in res["problems"] if p.startswith("request to the network")]
    assert any("http://example.invalid/lib.js" in p for p in network), res["problems"]
    assert any(f"{local}/pixel.png" in p for p in network) and any(f"{local}/beacon" in p for p in network)
    assert any(p.startswith("WebSocket to the network") and "/ws" in p for p in res["problems"])
    assert not res["ok"]


def test_no_page(tmp_path):
    res = check(tmp_path, None)
    assert not res["ok"] and "index.html: no such file" in res["problems"][0]


def test_lookup_and_cell_matching():
    run = SUMMARY["runs"]["gmm-mode"]
    assert bc.lookup(run, "fd_over_nfe/euler/16") == 0.000123456
    assert bc.lookup(run, "fd_over_nfe/euler/16.0") == 0.000123456
    with pytest.raises(bc._NotFound, match="no key 'fid'"):
        bc.lookup(run, "fid")
    assert bc.cell_matches(None, "—") and not bc.cell_matches(None, "0") and not bc.cell_matches(1.0, "—")
    assert bc.cell_matches(2.5, "2.5×") and bc.cell_matches(12345.678, "1.235e+04") and bc.cell_matches(7, "7")
    assert bc.cell_matches(0.0, "0") and not bc.cell_matches(1.0, "1.01") and bc.cell_matches("fd", " fd ")
    assert bc.cell_matches(True, "yes") and bc.cell_matches(False, "false") and not bc.cell_matches(True, "no")
    # a column another run has: "—" where this run has no such value, anything else is wrong
    problems, runs, cells = bc.check_table({"count": 1, "rows": [
        {"run": "base", "missing": None, "cells": [{"key": "fd_over_nfe/euler/8", "text": "—"}]},
        {"run": "gmm-mode", "missing": None, "cells": [{"key": "fd_over_nfe/heun/2", "text": "4.1"}]}]}, SUMMARY["runs"])
    assert (runs, cells) == (2, 2) and len(problems) == 1 and "no key 'heun'" in problems[0], problems
