"""The import graph of ``src/mmfm``: no circle, and the bottom layers import nothing above them.

Read from the source with ``ast``, not by importing: an import inside a function counts as much as one
at module level (it runs as soon as the function does). ``from mmfm.x import y`` is an edge to
``mmfm.x.y`` when that is a module, else to ``mmfm.x``; ``import mmfm.x.y`` to the deepest module named.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
#: The bottom layers, and what they may import.
BOTTOM = ("mmfm.flow", "mmfm.models")
BOTTOM_MAY_IMPORT = BOTTOM + ("mmfm._checks", "mmfm.io")


def modules() -> dict[str, Path]:
    """``{dotted name: file}`` of every module under ``src/mmfm`` (a package by its ``__init__``)."""
    out = {}
    for path in sorted((SRC / "mmfm").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def imports(name: str, path: Path, known) -> dict[str, int]:
    """The mmfm modules ``name`` imports anywhere in its file, each with the line of its first import."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from package, one level up per extra dot
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # import mmfm.a.b -> the deepest known module
                target = target.rpartition(".")[0]
            if target and target != name:
                out[target] = min(out.get(target, node.lineno), node.lineno)
    return out


def graph() -> dict[str, dict[str, int]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def find_cycle(edges: dict[str, dict[str, int]]) -> list[str] | None:
    """One circle ``[a, b, ..., a]`` of the graph (depth-first, in name order), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(edges):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def describe(cycle: list[str], edges) -> str:
    return " -> ".join(f"{a} (line {edges[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_the_graph_sees_module_and_function_level_imports():
    edges = graph()
    assert "mmfm.data.stream" in edges["mmfm.train.loop"]  # module level
    assert "mmfm.gmm.files" in edges["mmfm.sample"]  # inside noise_source
    assert "mmfm._checks" in edges["mmfm.flow.couplings"]  # from mmfm import _checks: the submodule
    assert "mmfm.models.ditdh" in edges["mmfm.models"]  # a package importing its submodules


def test_find_cycle():
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {}}) is None
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]


def test_no_import_circle():
    edges = graph()
    cycle = find_cycle(edges)
    assert cycle is None, f"import circle in src/mmfm: {describe(cycle, edges)}"


def test_bottom_layers_import_only_bottom_layers():
    bad = [f"{name} (line {line}) imports {target}" for name, targets in graph().items() if _within(name, BOTTOM)
           for target, line in sorted(targets.items()) if not _within(target, BOTTOM_MAY_IMPORT)]
    assert not bad, f"{', '.join(BOTTOM)} may import only {', '.join(BOTTOM_MAY_IMPORT)}: " + "; ".join(bad)
