#!/usr/bin/env python3
"""The results page in a real browser (issue 15): open ``RESULTS/index.html`` from disk (file://) in
headless Debian Chromium, driven by Playwright's Python API, and fail on anything a reader would see
go wrong.

    python ci/browser_check.py RESULTS [--screenshot PNG] [--chromium /usr/bin/chromium] [--json]

Problems (one line each; exit 1 when there is any):

- a console message of type error / warning / assert, an uncaught exception (``pageerror``), a crash;
- a failed request (a missing file under file:// is one: Chromium fails it with
  ``net::ERR_FILE_NOT_FOUND`` and logs "Failed to load resource", which is then not reported twice),
  a response with status >= 400, a file: request outside RESULTS (the page would break when the folder
  is copied), and any request or WebSocket to a scheme other than file: / data: / about: / blob: --
  those are aborted by the browser before they leave it (a Playwright route, and every host name
  resolves to nothing), so the page never touches the network;
- an ``<img>`` that is not ``complete && naturalWidth > 0`` once the page has loaded (lazy images
  are made eager first, and the check waits for every image to settle);
- a relative ``<a href>`` whose target does not exist on disk (resolved against the page's folder), or
  an ``#id`` anchor with no such id in the page;
- the rendered runs table (the DOM after the page's scripts ran, what ``chromium --dump-dom`` shows)
  disagreeing with ``RESULTS/summary.json``: ``<table id="runs">`` has one ``<tr data-run="NAME">`` per
  run of ``summary["runs"]`` and no other; each ``<td data-key="a/b/16">`` shows the value at that path
  of ``summary["runs"][NAME]`` (a component applied to a list of ``[x, y]`` pairs picks the pair whose
  x equals it as a number and yields y): "—" for null (or for a path the run does not have), numbers as
  ``format(v, ".4g")`` (ints plainly; a trailing "×" is ignored; any text within a relative 5e-4 of the
  value passes), booleans as true/false or yes/no, strings as they are. A row with ``data-missing``
  (results missing) may leave cells empty.

It also writes a full-page screenshot (default ``RESULTS/screenshots/index.png``) and the rendered DOM
beside it (``<stem>.html``), and prints their paths; ``--json`` adds one JSON line
``{"ok", "problems", "runs_checked", "cells_checked", "images", "screenshot", "dom", "seconds"}``.
:func:`check_page` returns that dict (the tests use it). Never downloads a browser: ``--chromium``
(default ``$CHROMIUM``, else ``/usr/bin/chromium``) must be installed (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

DEFAULT_CHROMIUM = "/usr/bin/chromium"
ALLOWED_SCHEMES = ("file", "data", "about", "blob")
VIEWPORT = {"width": 1400, "height": 900}
TIMEOUT_MS = 30_000
REL_TOL = 5e-4
DASH = "—"
# Chromium flags beside Playwright's own (which already turn off background networking, component updates,
# extensions and /dev/shm use): root needs --no-sandbox; every host name (IP literals too) fails to resolve
# and every proxied request goes to a closed local port, so even a request the route in check_page missed
# could not leave the machine.
CHROMIUM_ARGS = ["--no-sandbox", "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9",
                 "--disable-sync", "--no-first-run", "--force-color-profile=srgb"]

_IMAGES_SETTLED = """async (timeoutMs) => {
  const imgs = [...document.images];
  for (const img of imgs) if (img.loading === "lazy") img.loading = "eager";
  const settle = img => img.complete ? Promise.resolve() : new Promise(done => {
    img.addEventListener("load", done, {once: true});
    img.addEventListener("error", done, {once: true});
  });
  await Promise.race([Promise.all(imgs.map(settle)), new Promise(done => setTimeout(done, timeoutMs))]);
  return imgs.map((img, i) => ({index: i, src: img.getAttribute("src"), url: img.currentSrc || img.src,
    id: img.id, complete: img.complete, naturalWidth: img.naturalWidth}));
}"""

_LINKS = """() => [...document.querySelectorAll("a[href]")].map(a => ({href: a.getAttribute("href"), url: a.href,
  text: (a.textContent || "").trim().slice(0, 40)}))"""

_HAS_ANCHOR = """(name) => !!(document.getElementById(name) || document.getElementsByName(name).length)"""

_TABLE = """() => {
  const tables = document.querySelectorAll("table#runs");
  if (!tables.length) return null;
  const norm = s => (s || "").replace(/\\s+/g, " ").trim();
  return {count: tables.length, rows: [...tables[0].querySelectorAll("tr[data-run]")].map(tr => ({
    run: tr.getAttribute("data-run"), missing: tr.getAttribute("data-missing"),
    cells: [...tr.querySelectorAll("td[data-key]")].map(td => ({key: td.getAttribute("data-key"),
                                                                 text: norm(td.textContent)}))}))};
}"""


class _NotFound(Exception):
    pass


# ------------------------------------------------------------------------------------------------ the table

def lookup(record, path: str):
    """The value at ``path`` ("a/b/16") in ``record``: dict keys; on a list of ``[x, y]`` pairs the y of the
    pair whose x equals the component as a number; on another list an integer index. :class:`_NotFound`
    (with a message naming where) when there is none."""
    value, where = record, []
    for part in path.split("/"):
        if isinstance(value, dict):
            if part not in value:
                raise _NotFound(f"no key {part!r} at {'/'.join(where) or 'the run'} (keys: {', '.join(map(str, value))})")
            value = value[part]
        elif isinstance(value, list):
            pairs = all(isinstance(p, list) and len(p) == 2 for p in value)
            try:
                x = float(part)
            except ValueError:
                raise _NotFound(f"{part!r} is not a number, but {'/'.join(where)} is a list") from None
            if pairs and value:
                hits = [p[1] for p in value if isinstance(p[0], (int, float)) and not isinstance(p[0], bool)
                        and p[0] == x]
                if not hits:
                    xs = ", ".join(_fmt(p[0]) for p in value)
                    raise _NotFound(f"no pair with x = {part} in {'/'.join(where)} (x: {xs})")
                value = hits[0]
            elif x.is_integer() and -len(value) <= int(x) < len(value):
                value = value[int(x)]
            else:
                raise _NotFound(f"no item {part} in {'/'.join(where)} (a list of {len(value)})")
        else:
            raise _NotFound(f"{'/'.join(where)} is {_fmt(value)!r}, not a dict or list")
        where.append(part)
    return value


def _fmt(v) -> str:
    if v is None:
        return DASH
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return format(v, ".4g")
    return str(v)


def cell_matches(value, text: str) -> bool:
    """Whether a cell's ``text`` shows the summary's ``value`` (see the module docstring)."""
    text = " ".join(text.split())
    if value is None:
        return text == DASH
    if isinstance(value, bool):
        return text.lower() in (("true", "yes") if value else ("false", "no"))
    if isinstance(value, (int, float)):
        shown = text.removesuffix("×").strip()
        if shown == _fmt(value):
            return True
        try:
            got = float(shown.replace("−", "-"))
        except ValueError:
            return False
        return math.isclose(got, value, rel_tol=REL_TOL, abs_tol=0.0) or (value == 0 and got == 0)
    if isinstance(value, str):
        return text == " ".join(value.split())
    return False


def check_table(table, runs: dict) -> tuple[list[str], int, int]:
    """Problems of the rendered runs table against ``summary["runs"]``, runs checked, cells checked."""
    if table is None:
        return ['no <table id="runs"> in the rendered page'], 0, 0
    problems = []
    if table["count"] > 1:
        problems.append(f'{table["count"]} <table id="runs"> elements in the page (ids must be unique)')
    rows, seen = table["rows"], {}
    for row in rows:
        if row["run"] in seen:
            problems.append(f"table#runs: run {row['run']!r} has {1 + seen[row['run']]} rows")
        seen[row["run"]] = seen.get(row["run"], 0) + 1
    for name in runs:
        if name not in seen:
            problems.append(f"table#runs: no row <tr data-run={name!r}> for run {name!r} of summary.json")
    cells = 0
    for row in rows:
        name = row["run"]
        if name not in runs:
            problems.append(f"table#runs: row <tr data-run={name!r}> is not a run of summary.json "
                            f"(runs: {', '.join(runs) or 'none'})")
            continue
        if seen.get(name, 0) > 1 and row is not next(r for r in rows if r["run"] == name):
            continue  # the duplicate is reported above; compare the first row only
        missing = row["missing"] is not None
        for cell in row["cells"]:
            cells += 1
            key, text = cell["key"], cell["text"]
            where = f"table#runs row {name!r}, cell data-key={key!r}"
            if missing and text in ("", DASH):
                continue
            try:
                value = lookup(runs[name], key)
            except _NotFound as err:
                if text != DASH:  # "—" for a value summary.json lacks (a column another run has) is right
                    problems.append(f"{where}: shows {text!r}, but summary.json has no such value ({err})")
                continue
            if isinstance(value, (dict, list)):
                problems.append(f"{where}: the path names a {type(value).__name__} in summary.json, not a value")
            elif not cell_matches(value, text):
                problems.append(f"{where}: shows {text!r}, summary.json has {value!r} (expected {_fmt(value)!r})")
    if runs and not cells:
        problems.append('table#runs: no <td data-key="..."> cells to compare with summary.json')
    return problems, len({r["run"] for r in rows} & set(runs)), cells


# ------------------------------------------------------------------------------------------------ the page

def _scheme(url: str) -> str:
    return urlsplit(url).scheme.lower()


def _file_path(url: str) -> Path:
    return Path(url2pathname(unquote(urlsplit(url).path)))


def _short(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


def _check_links(page, page_path: Path, root: Path) -> list[str]:
    problems = []
    for link in page.evaluate(_LINKS):
        href, url = link["href"], link["url"]
        scheme = _scheme(url)
        if href.startswith("#"):
            name = unquote(href[1:])
            if name and name.lower() != "top" and not page.evaluate(_HAS_ANCHOR, name):
                problems.append(f'<a href="{href}">: no element with id (or name) {name!r} in the page')
            continue
        if scheme != "file" or _scheme(href) not in ("", "file"):
            continue  # http(s):, mailto:, javascript: ...: not a file of the results
        target = _file_path(url)
        if target.resolve() == page_path.resolve():
            frag = unquote(urlsplit(url).fragment)
            if frag and not page.evaluate(_HAS_ANCHOR, frag):
                problems.append(f'<a href="{href}">: no element with id (or name) {frag!r} in the page')
            continue
        if not target.exists():
            problems.append(f'<a href="{href}"> ("{link["text"]}"): {_short(target, root)} does not exist '
                            f"(resolved against {_short(page_path.parent, root) or '.'}/)")
    return problems


@contextlib.contextmanager
def open_browser(chromium=None):
    """Headless Chromium (Playwright's :class:`Browser`) with this check's flags, closed on exit: several
    :func:`check_page` calls may share it (``browser=``), each in a fresh browser context of its own."""
    from playwright.sync_api import sync_playwright

    chromium = chromium or os.environ.get("CHROMIUM") or DEFAULT_CHROMIUM
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS,
                                    timeout=TIMEOUT_MS)
        try:
            yield browser
        finally:
            browser.close()


def check_page(results_dir, screenshot=None, chromium=None, browser=None) -> dict:
    """Open ``results_dir/index.html`` in headless Chromium and check it (see the module docstring).
    ``browser``: a browser of :func:`open_browser` to open the page in (a new context: no cache, storage or
    route of an earlier check), else one is launched for this check and closed after it.

    Returns ``{"ok", "problems" (list of one-line messages), "runs_checked", "cells_checked", "images",
    "screenshot", "dom" (paths written, or None), "seconds"}``."""
    started = time.monotonic()
    root = Path(results_dir).resolve()
    page_path = root / "index.html"
    screenshot = Path(screenshot) if screenshot else root / "screenshots" / "index.png"
    dom_path = screenshot.with_suffix(".html")
    chromium = chromium or os.environ.get("CHROMIUM") or DEFAULT_CHROMIUM
    out = {"ok": False, "problems": [], "runs_checked": 0, "cells_checked": 0, "images": 0,
           "screenshot": None, "dom": None}
    problems = out["problems"]

    def done():
        out["ok"] = not problems
        out["seconds"] = round(time.monotonic() - started, 2)
        return out

    if not page_path.is_file():
        problems.append(f"{page_path}: no such file")
        return done()
    try:
        summary = json.loads((root / "summary.json").read_text())
        runs = summary["runs"]
        if not isinstance(runs, dict):
            raise TypeError(f"'runs' is a {type(runs).__name__}, expected an object")
    except FileNotFoundError:
        problems.append(f"{root / 'summary.json'}: no such file (the table is checked against it)")
        runs = None
    except (ValueError, KeyError, TypeError) as err:
        problems.append(f"{root / 'summary.json'}: not a summary ({type(err).__name__}: {err})")
        runs = None
    if not Path(chromium).exists():
        problems.append(f"{chromium}: no such browser (Debian: apt-get install chromium)")
        return done()

    try:
        from playwright.sync_api import Error as PlaywrightError
    except ImportError:
        problems.append("playwright is not installed (pip install playwright; its browser download is not needed)")
        return done()

    failed_urls = set()

    def allowed(url: str) -> bool:
        return _scheme(url) in ALLOWED_SCHEMES

    consoles = []  # (type, url, text, where): filtered once the failed requests are known

    def on_console(msg):
        if msg.type in ("error", "warning", "assert"):
            loc = msg.location or {}
            url = loc.get("url") or ""
            at = f" at {url}:{loc.get('lineNumber', 0) + 1}:{loc.get('columnNumber', 0) + 1}" if url else ""
            consoles.append((msg.type, url, msg.text, at))

    def on_pageerror(err):
        lines = [x.strip() for x in (err.stack or str(err) or repr(err)).strip().splitlines()]
        frame = next((x for x in lines[1:] if x.startswith("at ")), "")
        problems.append(f"uncaught exception: {lines[0]}" + (f" ({frame})" if frame else ""))

    def on_request(request):
        url = request.url
        if not allowed(url):
            problems.append(f"request to the network ({_scheme(url) or 'no'} scheme; blocked): {url} "
                            f"({request.resource_type})")
        elif _scheme(url) == "file":
            path = _file_path(url).resolve()
            if path != root and root not in path.parents:
                problems.append(f"request outside {root}: {url} ({request.resource_type})")

    def on_failed(request):
        failed_urls.add(request.url)
        if allowed(request.url):
            problems.append(f"request failed: {request.url} ({request.resource_type}: {request.failure})")

    def on_response(response):
        if response.status >= 400:
            problems.append(f"HTTP {response.status} for {response.url}")

    def on_websocket(ws):  # a routed WebSocket: never connected to a server
        problems.append(f"WebSocket to the network (blocked): {ws.url}")
        ws.close()

    try:
        with contextlib.ExitStack() as stack:
            if browser is None:
                browser = stack.enter_context(open_browser(chromium))
            context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1, service_workers="block")
            stack.callback(context.close)
            # the network is not reached: every non-file request is aborted in the browser
            context.route(lambda url: not allowed(url), lambda route: route.abort("blockedbyclient"))
            context.route_web_socket(lambda url: True, on_websocket)
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.on("console", on_console)
            page.on("pageerror", on_pageerror)
            page.on("crash", lambda _: problems.append("the page crashed"))
            page.on("request", on_request)
            page.on("requestfailed", on_failed)
            page.on("response", on_response)

            page.goto(page_path.as_uri(), wait_until="load")
            try:
                page.wait_for_load_state("networkidle", timeout=5_000)
            except PlaywrightError:
                problems.append("the page kept loading for 5 s after its load event (requests never finished)")
            images = page.evaluate(_IMAGES_SETTLED, 10_000)
            out["images"] = len(images)
            for img in images:
                if not (img["complete"] and img["naturalWidth"] > 0):
                    name = f'<img{" id=" + repr(img["id"]) if img["id"] else ""} src="{img["src"]}">'
                    state = "still loading" if not img["complete"] else "broken or empty (naturalWidth 0)"
                    problems.append(f"{name} did not load: {state}; {img['url'] or 'no src'}")
            problems.extend(_check_links(page, page_path, root))
            if runs is not None:
                table_problems, out["runs_checked"], out["cells_checked"] = check_table(page.evaluate(_TABLE), runs)
                problems.extend(table_problems)

            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
            out["screenshot"] = str(screenshot)
            dom_path.write_text(page.content(), encoding="utf-8")
            out["dom"] = str(dom_path)
            page.wait_for_timeout(100)  # late console messages / errors of the settled page
    except PlaywrightError as err:
        problems.append(f"the browser failed: {str(err).strip().splitlines()[0]}")
    for kind, url, text, at in consoles:
        if not (text.startswith("Failed to load resource") and url in failed_urls):  # reported as a request
            problems.append(f"console {kind}{at}: {text}")
    return done()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="the results folder (holds index.html and summary.json)")
    ap.add_argument("--screenshot", type=Path, help="full-page PNG (default RESULTS/screenshots/index.png); "
                    "the rendered DOM goes beside it as <stem>.html")
    ap.add_argument("--chromium", help=f"the Chromium binary (default $CHROMIUM, else {DEFAULT_CHROMIUM})")
    ap.add_argument("--json", action="store_true", help="print a JSON summary line last")
    args = ap.parse_args(argv)
    res = check_page(args.results, screenshot=args.screenshot, chromium=args.chromium)
    for problem in res["problems"]:
        print(f"FAIL: {problem}")
    for key in ("screenshot", "dom"):
        if res[key]:
            print(f"{key}: {res[key]}")
    print(f"browser check of {Path(args.results) / 'index.html'}: {'OK' if res['ok'] else 'FAILED'} "
          f"({len(res['problems'])} problem(s); {res['runs_checked']} runs, {res['cells_checked']} cells, "
          f"{res['images']} images; {res['seconds']} s)")
    if args.json:
        print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
