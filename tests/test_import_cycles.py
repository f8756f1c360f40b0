"""The package has no import cycle: every import of every module (at the top, inside a
function, under TYPE_CHECKING) read from the source, and the graph searched for a circle.

A cycle that only works because one side imports late (inside a function, or for type
checking only) is still a cycle: the two modules cannot be understood, tested or moved apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

import haproxy_forwarder

PACKAGE = Path(haproxy_forwarder.__file__).parent


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(root: Path, path: Path, modules: set[str]) -> set[str]:
    """The package's modules `path` imports, by full name (a package is its __init__)."""
    name = module_name(root, path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            # `from . import x` / `from .pkg import mod`: a submodule, if there is one; the
            # package itself unless every name is one of its submodules.
            subs = {f"{target}.{a.name}" for a in node.names} & modules
            found.update(subs)
            if len(subs) < len(node.names) or node.module:
                found.add(target)
    return {m for m in found if m in modules and m != name}


def import_graph(root: Path) -> dict[str, set[str]]:
    files = {module_name(root, p): p for p in root.rglob("*.py")}
    # Compiled modules (Cython) are modules too, with no import of the package's.
    modules = set(files) | {module_name(root, p) for p in root.rglob("*.pyx")}
    graph = {name: imports_of(root, path, modules) for name, path in files.items()}
    return {**{name: set() for name in modules - set(files)}, **graph}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph(PACKAGE)
    assert len(graph) > 40  # the walk found the package's modules
    assert "haproxy_forwarder.sources.tcp" in graph["haproxy_forwarder.sources.listeners"]
    assert cycles(graph) == []


def test_the_walk_sees_a_cycle_made_of_late_and_type_checking_imports(tmp_path: Path) -> None:
    """The check can fail: a package whose modules import each other only inside a function
    and under TYPE_CHECKING is reported, and so is a package and its submodule."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n    return g\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from .a import f\ng = 1\n")
    (pkg / "sub" / "__init__.py").write_text("from .c import x\n")
    (pkg / "sub" / "c.py").write_text("from ..sub import y\nx = 1\n")
    (pkg / "d.py").write_text("import pkg.a\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.b"], ["pkg.sub", "pkg.sub.c"]]
