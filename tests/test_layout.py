"""The house stays easy to see into: no import cycles (lazy imports count) between modules or
between the package's parts, small modules, and recipes that name tiny builds that exist."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "qconvert"
KERNEL_FILES = {"loaders/hopper.py"}  # the Triton kernel file may be long
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            skip |= {id(n) for sub in node.body for n in ast.walk(sub)}
    return skip


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _is_ancestor(a: str, b: str) -> bool:
    return b.startswith(a + ".")


def test_no_import_cycle_between_modules() -> None:
    graph = {
        m: {d for d in deps if not _is_ancestor(d, m)}  # a package's own __init__ runs first
        for m, deps in _graph().items()
    }
    assert _cycles(graph) == []


def test_no_import_cycle_between_parts() -> None:
    def part(module: str) -> str:
        return ".".join(module.split(".")[:2])

    parts: dict[str, set[str]] = {}
    for module, deps in _graph().items():
        parts.setdefault(part(module), set()).update(
            part(d) for d in deps if part(d) != part(module)
        )
    assert _cycles(parts) == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_formats_is_a_leaf_and_nothing_imports_cli() -> None:
    graph = _graph()
    for module, deps in graph.items():
        if module.startswith("qconvert.formats"):
            outside = {d for d in deps if not d.startswith(("qconvert.formats", "qconvert.errors"))}
            assert not outside, f"{module} imports {outside}"
        if not module.startswith(("qconvert.cli", "qconvert.__main__")):
            assert not any(d.startswith("qconvert.cli") for d in deps), module


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_are_small(path: Path) -> None:
    if path.relative_to(ROOT).as_posix() in KERNEL_FILES:
        return
    assert len(path.read_text(encoding="utf-8").splitlines()) <= MAX_LINES


def test_every_recipe_names_a_tiny_build_that_exists() -> None:
    from qconvert import tiny
    from qconvert.convert.recipes import families

    for name, recipe in families().items():
        assert recipe.tiny, name
        assert callable(tiny.module(recipe.tiny).build)
    with pytest.raises(KeyError, match="no tiny build"):
        tiny.module("nope")
