"""Every ```python block of README.md and docs/*.md runs against the demo's results (slow: the tiny DAG).

Each block runs as its own ``python -c`` (this interpreter, a fresh process, so a block cannot lean on
another's imports) with the working directory of the session's tiny demo (conftest.py: ``demo``), where
``results/`` is what ``snakemake --cores all`` leaves. The tiny demo has fewer runs and NFEs than the full
one (runs gauss-indep and gmm-mode, NFE 1 and 2), so a snippet names only files that both have, or finds
them the way the README says (``summary.json``'s ``runs[...]["samples"]``). A block only reads: it must not
change the demo's files, which other tests share.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from test_docs import fenced_blocks  # tests/ is on the path (pyproject: pythonpath)

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(doc, line, code) for doc in DOCS for lang, line, code in fenced_blocks(doc) if lang == "python"]


def _first_line(code: str) -> str:
    return next((ln for ln in code.splitlines() if ln.strip() and not ln.lstrip().startswith("#")), "")


def test_the_readme_has_python_snippets():
    assert any(doc.name == "README.md" for doc, _, _ in BLOCKS)


@pytest.mark.parametrize("doc, line, code", BLOCKS,
                         ids=[f"{d.relative_to(ROOT)}:{n}" for d, n, _ in BLOCKS])
def test_python_block_runs_on_the_demo_results(demo, doc, line, code):
    workdir, _ = demo
    res = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        pytest.fail(f"{doc.relative_to(ROOT)}:{line}: the block starting {_first_line(code)!r} failed "
                    f"(exit {res.returncode}) in {workdir}:\n{res.stderr[-4000:]}", pytrace=False)
