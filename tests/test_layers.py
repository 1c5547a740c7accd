"""The layers run one way (docs/architecture.md, "Layers").

Every module of the project's packages is parsed with ``ast`` (module-level and function-level
imports alike, relative imports resolved) into an import graph; the test fails on a cycle
between top-level packages and on a core module importing anything of ours outside the core
(in particular an application: cli, demo, probe, pipeline).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mlcd_core", "clustering", "mlcd_train", "tools", "bench")
CORE = "mlcd_core"
APPLICATIONS = ("mlcd_train.cli", "mlcd_train.demo", "mlcd_train.probe", "mlcd_train.pipeline")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(root: Path, path: Path) -> set[str]:
    """Every module name ``path`` imports, at any depth of the file (functions, ifs, try)."""
    mod = module_name(root, path)
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".")
                base = base if is_pkg else base[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{alias.name}" if target else alias.name  # `from pkg import module`
                       for alias in node.names)
    return out


def import_graph(root: Path, packages) -> dict[str, set[str]]:
    """module -> the modules of ``packages`` it imports (names that are not modules dropped)."""
    files = {module_name(root, p): p for pkg in packages if (root / pkg).is_dir()
             for p in sorted((root / pkg).rglob("*.py"))}
    return {mod: {name for name in imports_of(root, path) if name in files and name != mod}
            for mod, path in files.items()}


def package_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles between top-level packages (strongly connected groups of two or more), each with
    the module imports that make it."""
    top = lambda m: m.split(".")[0]  # noqa: E731
    edges: dict[str, set[str]] = {}
    for mod, targets in graph.items():
        for t in targets:
            if top(t) != top(mod):
                edges.setdefault(top(mod), set()).add(top(t))
    nodes = sorted({top(m) for m in graph})
    reach = {n: set() for n in nodes}
    for n in nodes:  # transitive closure: a handful of packages
        todo = list(edges.get(n, ()))
        while todo:
            x = todo.pop()
            if x not in reach[n]:
                reach[n].add(x)
                todo.extend(edges.get(x, ()))
    groups, seen = [], set()
    for n in nodes:
        if n in seen or n not in reach[n]:
            continue
        group = sorted([n] + [m for m in reach[n] if n in reach[m] and m != n])
        seen.update(group)
        groups.append(group + [f"{a} -> {b}" for a, ts in sorted(graph.items()) for b in sorted(ts)
                               if top(a) in group and top(b) in group and top(a) != top(b)])
    return groups


def core_violations(graph: dict[str, set[str]], core: str = CORE) -> list[str]:
    return [f"{a} -> {b}" for a, ts in sorted(graph.items()) if a.split(".")[0] == core
            for b in sorted(ts) if b.split(".")[0] != core]


def test_no_cycle_between_top_level_packages():
    graph = import_graph(ROOT, PACKAGES)
    assert len(graph) > 50 and "clustering.kmeans" in graph and "mlcd_core.io" in graph
    assert package_cycles(graph) == []


def test_core_imports_only_the_core():
    graph = import_graph(ROOT, PACKAGES)
    assert core_violations(graph) == []
    assert not any(b in APPLICATIONS for a, ts in graph.items() if a.startswith(CORE) for b in ts)


def test_clustering_stays_below_mlcd_train():
    graph = import_graph(ROOT, PACKAGES)
    up = [f"{a} -> {b}" for a, ts in graph.items() if a.startswith("clustering") for b in ts
          if b.startswith("mlcd_train")]
    assert up == []
    # and the direction that is allowed is really used: the applications call clustering
    assert any(b.startswith("clustering") for b in graph["mlcd_train.probe"] | graph["mlcd_train.demo"])


def _write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


@pytest.mark.parametrize("where", ["top", "function"])
def test_checker_finds_a_cycle_and_a_core_import(tmp_path, where):
    """The checker itself can fail: a tree with a cycle, at module level or hidden in a function."""
    _write(tmp_path, "core/__init__.py", "")
    _write(tmp_path, "core/io.py", "import os\n")
    _write(tmp_path, "lib/__init__.py", "")
    _write(tmp_path, "lib/sub/__init__.py", "")
    _write(tmp_path, "lib/sub/b.py", "from core import io\n")
    _write(tmp_path, "app/__init__.py", "")
    _write(tmp_path, "app/cli.py", "from lib.sub import b\n")
    graph = import_graph(tmp_path, ("core", "lib", "app"))
    assert graph["app.cli"] == {"lib.sub", "lib.sub.b"} and graph["lib.sub.b"] == {"core", "core.io"}
    assert package_cycles(graph) == [] and core_violations(graph, "core") == []
    back = {"top": "import app.cli\n", "function": "def f():\n    if True:\n        from app import cli\n"}[where]
    _write(tmp_path, "lib/sub/b.py", "from core import io\n" + back)
    graph = import_graph(tmp_path, ("core", "lib", "app"))
    cycles = package_cycles(graph)
    assert len(cycles) == 1 and cycles[0][:2] == ["app", "lib"]
    assert "lib.sub.b -> app.cli" in cycles[0]
    _write(tmp_path, "core/io.py", "def g():\n    from app.cli import x\n")
    assert core_violations(import_graph(tmp_path, ("core", "lib", "app")), "core") == ["core.io -> app.cli"]


def test_relative_imports_resolve(tmp_path):
    _write(tmp_path, "lib/__init__.py", "from .sub import b\nfrom . import c\n")
    _write(tmp_path, "lib/c.py", "")
    _write(tmp_path, "lib/sub/__init__.py", "")
    _write(tmp_path, "lib/sub/b.py", "from ..c import x\nfrom .. import c\n")
    graph = import_graph(tmp_path, ("lib",))
    assert graph["lib"] == {"lib.sub", "lib.sub.b", "lib.c"}
    assert graph["lib.sub.b"] == {"lib.c", "lib"}
