"""The project's structure rules (DESIGN.md "Layout", the team guide "Structure"), checked
on the source with ``ast``: no import cycles between the project's modules, and the
layering rules that hold today.

The graph. Nodes are the project's modules (``kvtransfer.codec``, ``kvtransfer.codecs``
for a package's ``__init__``, ...). An edge ``a -> b`` is an ``import``/``from ... import``
in ``a`` that names ``b`` (``from pkg import x`` names ``pkg.x`` when that is a module, else
``pkg``); relative imports are resolved; importing ``p.q.r`` also runs ``p`` and ``p.q``, so
those are edges too. Imports inside functions count the same as module-level ones: they
are how today's cycles were hidden (``codec.calibrate`` importing a codec that imports
``codec``), and a cycle that only works because one side imports late breaks as soon as
someone hoists the import. Imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cluster", "engine", "models", "prefill_workers", "decode_workers", "kvtransfer", "placement",
            "benchmarks")


def project_modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, skipping ``if TYPE_CHECKING:`` bodies."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imported_names(module: str, path: Path) -> set[str]:
    """Fully qualified names this module imports (modules or names inside modules)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
            continue
        if node.level:
            base = module.split(".")
            if not is_pkg:
                base = base[:-1]
            base = base[:len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        out.add(prefix)
        out.update(f"{prefix}.{a.name}" for a in node.names if a.name != "*")
    return out


def import_graph() -> dict[str, set[str]]:
    mods = project_modules()
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        edges: set[str] = set()
        for name in imported_names(mod, path):
            # The longest project module the name starts with; then its parent packages.
            parts = name.split(".")
            while parts and ".".join(parts) not in mods:
                parts.pop()
            while parts:
                edges.add(".".join(parts))
                parts.pop()
        edges.discard(mod)
        # A module's own parent packages run before it; they are not its imports.
        graph[mod] = {e for e in edges if not mod.startswith(e + ".")}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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


def external_imports(prefix: str) -> dict[str, set[str]]:
    """Top-level names of everything imported by the modules under prefix, per module."""
    mods = project_modules()
    return {mod: {n.split(".")[0] for n in imported_names(mod, path)}
            for mod, path in mods.items() if mod == prefix or mod.startswith(prefix + ".")}


# --- the graph builder itself -------------------------------------------------------


def test_graph_sees_relative_function_level_and_package_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "kvtransfer"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import leaf\n")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    from ..top import x\n")
    (pkg / "top.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import kvtransfer.other\n"
                                "from kvtransfer.sub import leaf\n")
    (pkg / "other.py").write_text("import kvtransfer.top\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", ("kvtransfer",))
    g = import_graph()
    assert g["kvtransfer.sub"] == {"kvtransfer.sub.leaf"}
    assert g["kvtransfer.sub.leaf"] == {"kvtransfer.top"}  # function-level, relative (level 2)
    assert g["kvtransfer.top"] == {"kvtransfer.sub", "kvtransfer.sub.leaf"}  # TYPE_CHECKING left out
    assert g["kvtransfer.other"] == {"kvtransfer.top"}
    assert find_cycles(g) == [["kvtransfer.sub", "kvtransfer.sub.leaf", "kvtransfer.top"]]


# --- the rules ----------------------------------------------------------------------


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50, f"found only {len(graph)} modules under {ROOT}"
    # The graph sees edges that exist (a module-level and a function-level one).
    assert "kvtransfer.codecs.base" in graph["kvtransfer.codecs.none"]
    assert "kvtransfer.stream" in graph["kvtransfer.connector"]
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (each a group of modules that import each other):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_shared_modules_import_no_sibling():
    """What a package's modules share (errors, handles, bases) sits in one module that
    imports nothing of the project (its own parent packages aside): every ``errors.py``
    and ``base.py``, among them kvtransfer's two."""
    graph = import_graph()
    shared = sorted(m for m in graph if m.rsplit(".", 1)[-1] in ("errors", "base"))
    assert {"kvtransfer.base", "kvtransfer.codecs.base", "cluster.errors"} <= set(shared), shared
    for mod in shared:
        parents = {mod.rsplit(".", i)[0] for i in range(1, mod.count(".") + 1)}
        assert not graph[mod] - parents, f"{mod} imports {sorted(graph[mod] - parents)}"


def module_level_imports(path: Path) -> set[str]:
    """Top-level names imported when the module is imported (not inside functions or
    classes' methods, not under TYPE_CHECKING)."""
    out: set[str] = set()
    stack: list[ast.AST] = [ast.parse(path.read_text(), str(path))]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
        stack.extend(ast.iter_child_nodes(node))
    return out


def test_optional_heavy_dependencies_are_imported_lazily():
    """vLLM, MILP solvers and grammar engines are imported where used (inside functions),
    so importing any module of the project works without them."""
    heavy = {"vllm", "ortools", "highspy", "pyscipopt", "xgrammar", "outlines", "llguidance", "lmformatenforcer"}
    offenders = {m: sorted(module_level_imports(p) & heavy) for m, p in project_modules().items()}
    offenders = {m: names for m, names in offenders.items() if names}
    assert not offenders, f"modules importing optional heavy dependencies at import time: {offenders}"


@pytest.mark.parametrize("forbidden", ["ray", "fastapi", "starlette", "uvicorn", "grpc", "yaml", "cluster",
                                       "prefill_workers", "decode_workers", "kvtransfer", "placement",
                                       "benchmarks"])
def test_engine_knows_no_ray_http_manifest_or_pools(forbidden):
    """engine/ knows no Ray, HTTP or manifest (DESIGN.md: plain PyTorch, no Ray)."""
    offenders = sorted(m for m, names in external_imports("engine").items() if forbidden in names)
    assert not offenders, f"engine modules import {forbidden}: {offenders}"


@pytest.mark.parametrize("forbidden", ["ray", "fastapi", "cluster", "prefill_workers", "decode_workers",
                                       "kvtransfer"])
def test_placement_models_the_engine_and_does_not_run_it(forbidden):
    """placement/ models the engine; it does not run workers or move KV. Exceptions that
    the design names: ``placement.groups`` is the one module that creates Ray placement
    groups ("only placement/ decides where things run"), and ``placement.profile`` runs
    the engine in-process to measure it (``splitserve profile``), so ``engine`` itself is
    not forbidden; the engine's runtime pieces (Ray actors, workers) are."""
    allowed = {"ray": {"placement.groups"}}
    offenders = sorted(m for m, names in external_imports("placement").items()
                       if forbidden in names and m not in allowed.get(forbidden, set()))
    assert not offenders, f"placement modules import {forbidden}: {offenders}"


def test_only_placement_groups_creates_placement_groups():
    """One module creates placement groups: ``placement.groups``."""
    mods = project_modules()
    offenders = sorted(m for m, path in mods.items() if m != "placement.groups"
                       and re.search(r"\bplacement_group\(", path.read_text()))
    assert not offenders, f"modules other than placement.groups create placement groups: {offenders}"


def test_only_cluster_knows_http():
    """Only cluster/ knows about HTTP (benchmarks are clients and may speak it)."""
    http = {"fastapi", "starlette", "uvicorn"}
    offenders = sorted(m for pkg in ("engine", "models", "prefill_workers", "decode_workers", "kvtransfer", "placement")
                       for m, names in external_imports(pkg).items() if names & http)
    assert not offenders, f"modules outside cluster/ import an HTTP server framework: {offenders}"


def test_pools_meet_only_through_kvtransfer():
    """Prefill and decode workers do not import each other."""
    for a, b in (("prefill_workers", "decode_workers"), ("decode_workers", "prefill_workers")):
        offenders = sorted(m for m, names in external_imports(a).items() if b in names)
        assert not offenders, f"{a} modules import {b}: {offenders}"


def test_module_level_imports_skip_functions_but_not_class_bodies(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ray\n"
                 "def f():\n    import vllm\nclass A:\n    import highspy\n")
    assert module_level_imports(p) == {"os", "typing", "highspy"}


def closure(start: str) -> set[str]:
    """The project modules importing ``start`` runs (function-level imports included)."""
    graph, seen, todo = import_graph(), set(), [start]
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo.extend(graph.get(mod, ()))
    return seen


@pytest.mark.parametrize("scheduler", ["engine.scheduler", "prefill_workers.scheduler", "decode_workers.scheduler"])
def test_schedulers_are_pure(scheduler):
    """Schedulers are pure and unit-testable without Ray or a model: nothing they import,
    directly or not, imports Ray or torch or loads or runs a model."""
    mods, paths = closure(scheduler), project_modules()
    externals = set().union(*(imported_names(m, paths[m]) for m in mods))
    tops = {n.split(".")[0] for n in externals}
    assert not tops & {"ray", "torch", "numpy", "fastapi", "grpc"}, (scheduler, sorted(tops))
    assert not mods & {"engine.model", "engine.runner", "engine.loader", "engine.engine"}, sorted(mods)


@pytest.mark.parametrize("where", ["cluster.controller:Controller", "cluster.generation:Generator",
                                   "cluster.worker_base:EngineWorker"])
def test_mixins_are_not_shadowed(where):
    """The controller's mixins (autoscaling, rollout), the generator's (admission) and the
    workers' (the engine loop) are called through self: a method of the same name in the
    class silently replaces the mixin's (session 9: a `_snapshot()` of the controller's
    state shadowed the autoscaler's `_snapshot(pool)` and its loop died)."""
    import importlib

    module, name = where.split(":")
    cls = getattr(importlib.import_module(module), name)
    cls = cls.__ray_actor_class__ if hasattr(cls, "__ray_actor_class__") else cls
    assert len(cls.__mro__) > 2, f"{name} has no mixin"
    own = {n for n in vars(cls) if not n.startswith("__")}
    for base in cls.__mro__[1:]:
        if base is object:
            continue
        clash = own & {n for n in vars(base) if not n.startswith("__")}
        assert not clash, f"{name} redefines {sorted(clash)} of {base.__name__}"
