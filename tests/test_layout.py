"""The house rules a newcomer relies on, held by a test: the package's import graph has no circles
and no upward arrows, no module shadows a package it imports, no module grows past 600 lines, and
every op is found by its name (kernel, reference, test, benchmark)."""
import ast
import os
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PKG = os.path.join(_ROOT, "colm_kernels")
MAX_LINES = 600
# Floors, bottom up: a module may import its own floor and the ones below it, never one above.
FLOORS = [
    ("colm_kernels._tables", "colm_kernels._triton", "colm_kernels.chains", "colm_kernels._cuda",
     "colm_kernels.backends"),
    ("colm_kernels.ops",),
    ("colm_kernels.nn",),
    ("colm_kernels.models", "colm_kernels.reference"),
    ("colm_kernels.integrations", "colm_kernels.bench", "colm_kernels.demo", "colm_kernels.info"),
]
OPS = ["chain_linear", "chain_swiglu", "chain_rmsnorm", "chain_attention", "chain_attention_decode",
       "multi_chain_cross_entropy"]


def _modules():
    out = {}
    for folder, _, files in os.walk(_PKG):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                mod = os.path.relpath(path, _ROOT)[:-3].replace(os.sep, ".")
                out[mod[: -len(".__init__")] if mod.endswith(".__init__") else mod] = path
    return out


def _imports(mod, path, modules):
    """The package modules ``mod`` imports (at any depth of its code: lazy imports count too)."""
    package = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names]
            if any(t not in modules for t in targets):  # names bound from the package itself
                targets.append(base)
        else:
            continue
        for t in targets:
            while t and t not in modules and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in modules and t != mod:
                found.add(t)
    return found


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return modules, {m: _imports(m, p, modules) for m, p in modules.items()}


def test_import_graph_has_no_circles(graph):
    _, edges = graph
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
                cycles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


def _floor(mod):
    for level, prefixes in enumerate(FLOORS):
        if any(mod == p or mod.startswith(p + ".") for p in prefixes):
            return level
    return None


def test_no_import_runs_upward(graph):
    _, edges = graph
    upward = [(m, t) for m, targets in edges.items() for t in targets
              if _floor(m) is not None and _floor(t) is not None and _floor(t) > _floor(m)]
    assert not upward, "imports from a floor above: " + ", ".join(f"{m} -> {t}" for m, t in sorted(upward))
    reference_ops = [t for t in edges.get("colm_kernels.reference.model", ()) if t.startswith("colm_kernels.ops")]
    assert not reference_ops, f"the reference model imports ops: {reference_ops}"


def test_no_module_shadows_a_package_it_imports():
    shadows = {"triton", "torch", "numpy", "cuda", "typing", "math", "functools"}
    named = [os.path.relpath(os.path.join(folder, f), _ROOT) for folder, _, files in os.walk(_PKG)
             for f in files if f.endswith(".py") and f[:-3] in shadows]
    assert not named, f"modules named after a package they (or their siblings) import: {named}"


def test_no_module_over_600_lines(graph):
    modules, _ = graph
    long = {m: n for m, p in modules.items() if (n := sum(1 for _ in open(p))) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("op", OPS)
def test_every_op_is_found_by_its_name(op):
    folder = os.path.join(_PKG, "ops", op)
    for name in ("api.py", "reference.py", "triton_backend.py"):
        assert os.path.exists(os.path.join(folder, name)), f"ops/{op}/{name}"
    assert any(f.startswith("triton_kernels") for f in os.listdir(folder)), f"ops/{op}: no triton kernels"
    tests = os.listdir(os.path.join(_ROOT, "tests", "ops"))
    assert any(t.startswith(f"test_{op}") for t in tests), f"no tests/ops/test_{op}*.py"
    assert os.path.exists(os.path.join(_ROOT, "benchmarks", f"bench_{op}.py")), f"no benchmarks/bench_{op}.py"
