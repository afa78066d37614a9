"""The package's shape: no module reaches into another's private names, and the
import graph between pm_em's modules has no circle (issue 17).

Both checks read the source with :mod:`ast`; nothing is imported or compiled.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pm_em"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _modules() -> dict[str, ast.Module]:
    return {
        _module_name(path): ast.parse(path.read_text(), filename=str(path))
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module name an ``ImportFrom`` reads from."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _imports(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Module -> the pm_em modules it imports (at any depth of its code)."""
    packages = {name for name in modules if (PACKAGE.parent / name.replace(".", "/")).is_dir()}
    edges = {name: set() for name in modules}
    for name, tree in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(name, node, name in packages)
                # ``from pm_em.pkg import mod`` imports the submodule ``mod``.
                targets = [
                    f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                    for alias in node.names
                ]
            else:
                continue
            edges[name].update(t for t in targets if t in modules and t != name)
    return edges


def private_imports(modules: dict[str, ast.Module]) -> list[str]:
    """``from pm_em.x import _name`` and ``import pm_em.x._y``, in any pm_em module."""
    packages = {name for name in modules if (PACKAGE.parent / name.replace(".", "/")).is_dir()}
    found = []
    for name, tree in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _absolute(name, node, name in packages)
                if not source.startswith("pm_em"):
                    continue
                parts = source.split(".")
                found += [
                    f"{name}: from {source} import {alias.name}"
                    for alias in node.names
                    if _is_private(alias.name)
                ]
                if any(_is_private(p) for p in parts):
                    found.append(f"{name}: from {source} import ...")
            elif isinstance(node, ast.Import):
                found += [
                    f"{name}: import {alias.name}"
                    for alias in node.names
                    if alias.name.startswith("pm_em")
                    and any(_is_private(p) for p in alias.name.split("."))
                ]
    return found


def _private_definitions(tree: ast.Module) -> set[str]:
    """Private names a module defines: functions, classes, methods, module and class
    assignments, and attributes it sets on ``self``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if _is_private(n)}


def private_attribute_reads(modules: dict[str, ast.Module]) -> list[str]:
    """``obj._name`` where ``_name`` is a private name another pm_em module defines
    and this one does not (so it is that module's object being reached into)."""
    defined = {name: _private_definitions(tree) for name, tree in modules.items()}
    found = []
    for name, tree in modules.items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if node.attr in defined[name]:
                continue
            owners = [other for other, names in defined.items() if node.attr in names]
            if owners:
                found.append(f"{name}:{node.lineno}: .{node.attr} (defined in {owners})")
    return found


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return groups


@pytest.fixture(scope="module")
def modules():
    return _modules()


def test_no_private_imports(modules):
    assert private_imports(modules) == []


def test_no_private_attribute_reads(modules):
    assert private_attribute_reads(modules) == []


def test_no_import_cycles(modules):
    # A package's __init__ importing its own modules is how a package re-exports;
    # only the modules below it count.
    edges = {
        name: {t for t in targets if not name.startswith(t + ".")}
        for name, targets in _imports(modules).items()
    }
    assert import_cycles(edges) == []


def test_the_checks_see_violations():
    """The checks themselves: each finds what it is for on a made-up package."""
    fake = {
        "pm_em.a": ast.parse("from pm_em.b import _hidden\nimport pm_em.b\n"),
        "pm_em.b": ast.parse(
            "def _hidden(): pass\nfrom pm_em import a\nclass C:\n"
            "    def f(self):\n        self._cache = 1\n"
        ),
        "pm_em.c": ast.parse("def g(obj):\n    return obj._cache\n"),
    }
    assert private_imports(fake) == ["pm_em.a: from pm_em.b import _hidden"]
    assert private_attribute_reads(fake) == ["pm_em.c:2: ._cache (defined in ['pm_em.b'])"]
    edges = {"pm_em.a": {"pm_em.b"}, "pm_em.b": {"pm_em.a"}, "pm_em.c": set()}
    assert import_cycles(edges) == [["pm_em.a", "pm_em.b"]]
