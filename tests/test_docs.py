"""The documentation stands on its own: a user has the repository and nothing else.

- every relative link and image of README.md and docs/*.md resolves to a file of the repository, and every
  ``#anchor`` to a heading of its target (GitHub's slugs);
- no file of the repository names a ``*.md`` document the repository does not have, nor a folder outside it
  that only the developers have;
- the ``mmfm ...`` commands of the README's and docs' bash blocks name subcommands and options that exist.

The README's Python snippets run against the demo's results in tests/workflow/test_readme.py.
"""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Paths outside the repository that must never be named (built so that this file does not name them itself).
FORBIDDEN = ("../" + "shared", "shared" + "/docs", "../" + "seeds")

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# A mention of a markdown file: a path of word characters, dots, dashes and slashes ending in ".md".
MD_MENTION = re.compile(r"(?<![\w.-])((?:[\w.-]+/)*[\w-][\w.-]*\.md)(?![\w-])")
URL_BEFORE = re.compile(r"[a-z][a-z0-9+.-]*://\S*$", re.I)


def _prose_lines(path: Path):
    """``(line number, line)`` outside fenced code blocks."""
    fenced = None
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE.match(line.lstrip())
        if m:
            fenced = None if fenced == m.group(1) else fenced or m.group(1)
            continue
        if fenced is None:
            yield n, line


def fenced_blocks(path: Path):
    """``(language, first line number, code)`` of every fenced block of a markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^(```|~~~)\s*([\w+-]*)", lines[i].lstrip())
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i + 1
        j = start
        while j < len(lines) and not lines[j].lstrip().startswith(fence):
            j += 1
        out.append((lang, start + 1, "\n".join(lines[start:j]) + "\n"))
        i = j + 1
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text lower-cased, punctuation other than ``-`` and ``_``
    dropped, spaces to ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """Every heading anchor of a markdown file (repeated headings get ``-1``, ``-2``, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose_lines(path):
        m = HEADING.match(line)
        if not m:
            continue
        s = slug(m.group(2))
        if s in seen:
            seen[s] += 1
            s = f"{s}-{seen[s]}"
        else:
            seen[s] = 0
        out.add(s)
    return frozenset(out)


def links(path: Path):
    """``(line number, target)`` of every markdown link and image outside code."""
    for n, line in _prose_lines(path):
        for m in LINK.finditer(INLINE_CODE.sub("", line)):
            yield n, m.group(1)


def link_problems(path: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with the relative links of the markdown file ``path`` of the tree ``root`` (empty: nothing)."""
    problems = []
    for n, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{n}: {target}"
        if root not in dest.parents and dest != root:
            problems.append(f"{where}: points outside the repository")
            continue
        if not dest.exists():
            problems.append(f"{where}: no such file {dest.relative_to(root)}")
            continue
        if anchor:
            if dest.suffix != ".md":
                problems.append(f"{where}: an anchor into a file that is not markdown")
            elif anchor not in anchors(dest):
                problems.append(f"{where}: {dest.relative_to(root)} has no heading #{anchor}")
    return problems


def repo_files() -> list[Path]:
    """The repository's files: tracked, and untracked ones that git does not ignore."""
    res = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"not a git checkout: {res.stderr.strip()}")
    return sorted({ROOT / p for p in res.stdout.split("\0") if p and (ROOT / p).is_file()})


def _text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def mention_problems(path: Path, text: str) -> list[str]:
    """Mentions of ``*.md`` files that are no file of the repository, and of the forbidden folders."""
    problems = []
    rel = path.relative_to(ROOT)
    for n, line in enumerate(text.splitlines(), 1):
        bad = next((b for b in FORBIDDEN if b in line), None)
        if bad:
            problems.append(f"{rel}:{n}: names {bad!r}, which is not part of the repository")
        for m in MD_MENTION.finditer(line):
            name = m.group(1)
            if URL_BEFORE.search(line[: m.start()]):  # part of a URL
                continue
            candidates = [path.parent / name, ROOT / name]
            if not any(c.resolve().is_file() and ROOT in c.resolve().parents for c in candidates):
                problems.append(f"{rel}:{n}: names {name}, which is no file of the repository "
                                f"(write it as a path from the repository root, e.g. docs/design.md)")
    return problems


# ---------------------------------------------------------------------------------------------------- tests


def test_slugs_follow_githubs_rules():
    assert slug("4. Data and artifact formats") == "4-data-and-artifact-formats"
    assert slug("6.10 Dtypes") == "610-dtypes"
    assert slug("The demo (`config.yaml`)") == "the-demo-configyaml"
    assert slug("`allow_cpu_fallback`") == "allow_cpu_fallback"
    assert slug("summary.json") == "summaryjson"
    assert slug("Budgets before you run: `mmfm plan`") == "budgets-before-you-run-mmfm-plan"
    assert slug("The R^10 toy experiment") == "the-r10-toy-experiment"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(doc):
    problems = link_problems(doc)
    assert not problems, "broken links:\n  " + "\n  ".join(problems)


def test_the_link_check_finds_a_broken_link_and_a_broken_anchor(tmp_path):
    """The check itself: a file that does not exist, an anchor that is no heading, a path outside the tree."""
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "design.md").write_text("# Design\n\n## 4. Data and artifact formats\n")
    probe = root / "docs" / "probe.md"
    probe.write_text("# Probe\n\n[a](no-such-file.md) [b](design.md#no-such-heading) "
                     "[c](design.md#4-data-and-artifact-formats) [d](#probe) [e](#nope) "
                     "![img](missing.png) [f](../../outside.md) [g](https://example.org/x.md)\n\n"
                     "```\n[h](ignored-in-code.md)\n```\n")
    problems = link_problems(probe, root)
    text = "\n".join(problems)
    assert "no-such-file.md" in text and "#no-such-heading" in text and "#nope" in text
    assert "missing.png" in text and "outside the repository" in text
    assert "4-data-and-artifact-formats" not in text and "#probe" not in text and "ignored-in-code" not in text
    assert len(problems) == 5, problems


def test_no_file_names_a_document_the_repository_lacks():
    problems = []
    for path in repo_files():
        if path == Path(__file__).resolve():  # its own examples name files that do not exist, on purpose
            continue
        text = _text(path)
        if text is not None:
            problems += mention_problems(path, text)
    assert not problems, "mentions of files that are not in the repository:\n  " + "\n  ".join(problems)


def test_the_mention_check_finds_a_missing_document():
    here = ROOT / "src" / "mmfm" / "flow" / "time.py"
    text = ("see design.md §2 and docs/method.md §2.3; https://example.org/x/notes.md is a URL\n"
            "README.md is at the top; " + FORBIDDEN[0] + "/docs is private\n")
    problems = mention_problems(here, text)
    assert len(problems) == 2, problems
    assert "names design.md" in problems[0] and FORBIDDEN[0] in problems[1]


SECTION_CITE = re.compile(r"\b(docs/[\w-]+\.md)\s+(§\s?\d+(?:\.\d+)?(?:\s*(?:-|–|,|/|and)\s*§?\s?\d+(?:\.\d+)?)*)")
NUMBERED = re.compile(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s")


@cache
def section_numbers(path: Path) -> frozenset[str]:
    """The numbers of a document's numbered headings: ``## 3. ...`` gives "3", ``### 3.4 ...`` "3.4"."""
    return frozenset(m.group(1) for _, line in _prose_lines(path) if (m := NUMBERED.match(line)))


def citation_problems(path: Path, text: str) -> list[str]:
    """Citations "docs/X.md §N" in ``text`` whose section N is no numbered heading of docs/X.md."""
    problems = []
    for n, line in enumerate(text.splitlines(), 1):
        for m in SECTION_CITE.finditer(line):
            doc = ROOT / m.group(1)
            if not doc.is_file():
                continue  # named by test_no_file_names_a_document_the_repository_lacks
            for number in re.findall(r"\d+(?:\.\d+)?", m.group(2)):
                if number not in section_numbers(doc):
                    problems.append(f"{path.relative_to(ROOT)}:{n}: {m.group(0)}: {m.group(1)} has no section {number}")
    return problems


def test_every_cited_section_exists():
    """Docstrings and comments cite "docs/method.md §3.4": each such section is a heading of that document."""
    problems = []
    for path in repo_files():
        text = _text(path)
        if text is not None and path != Path(__file__).resolve():
            problems += citation_problems(path, text)
    assert not problems, "citations of sections that do not exist:\n  " + "\n  ".join(problems)


def test_the_citation_check_finds_a_missing_section():
    here = ROOT / "src" / "mmfm" / "train" / "loop.py"
    text = "(docs/method.md §2.3-2.4, §3.4; docs/design.md §2, §6)\n(docs/method.md §6.99; docs/design.md §12)\n"
    problems = citation_problems(here, text)
    assert [p.rsplit(" ", 1)[-1] for p in problems] == ["6.99", "12"], problems


# The mmfm commands of the bash blocks -------------------------------------------------------------------


@cache
def _parser():
    from mmfm.cli import build_parser

    return build_parser()


def _subparsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return None


def _options(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def command_problems(doc: Path) -> list[str]:
    problems = []
    for lang, first, code in fenced_blocks(doc):
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        for k, line in enumerate(code.splitlines()):
            cmd = line.split(" #")[0].strip()
            if not cmd.startswith("mmfm "):
                continue
            where = f"{doc.relative_to(ROOT)}:{first + k}: {cmd}"
            words = cmd.split()[1:]
            parser, path = _parser(), ["mmfm"]
            while (choices := _subparsers(parser)) is not None and words and not words[0].startswith("-"):
                if words[0] not in choices:
                    problems.append(f"{where}: {' '.join(path)} has no subcommand {words[0]!r} "
                                    f"(it has {', '.join(sorted(choices))})")
                    parser = None
                    break
                parser, path, words = choices[words[0]], [*path, words[0]], words[1:]
            if parser is None:
                continue
            if _subparsers(parser) is not None:
                problems.append(f"{where}: {' '.join(path)} needs a subcommand")
                continue
            known = _options(parser)
            for word in words:
                opt = word.strip("[]()").split("=")[0]
                if re.fullmatch(r"--[a-z][\w-]*", opt) and opt not in known:
                    problems.append(f"{where}: {' '.join(path)} has no option {opt}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_mmfm_commands_in_bash_blocks_exist(doc):
    problems = command_problems(doc)
    assert not problems, "unknown commands:\n  " + "\n  ".join(problems)
