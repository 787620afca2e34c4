"""The package layout: imports run only down the pipeline, and no two modules import each other.

Layers, lowest first (a module may import its own layer or lower ones, at module level or
inside a function):
  0 foundation: errors, progress, version
  1 model/ (load, dtypes, write-back, sessions), samples (the npz contract), imagedata/
    (sample files from image folders)
  2 graph/ (ops, shadow graph, keys, parity)
  3 analysis/ (statistics, attribution, causal effects)
  4 edits/ (edit kinds' mathematics)
  5 rectify/ (objectives, locators, the loop)
  6 gate/ (metrics, verify, diff, reports, summary)
  7 pipelines: patch, demo, api (the library API)
  8 entry points: cli, __main__, the package itself (public API)
"""
from __future__ import annotations

import ast
from pathlib import Path

import patcher

PACKAGE = Path(patcher.__file__).parent
LAYERS = [
    {"patcher.errors", "patcher.progress", "patcher.version", "patcher.allocator"},
    {"patcher.model", "patcher.samples", "patcher.imagedata"},
    {"patcher.graph"},
    {"patcher.analysis"},
    {"patcher.edits"},
    {"patcher.rectify"},
    {"patcher.gate"},
    {"patcher.patch", "patcher.demo", "patcher.api"},
    {"patcher.cli", "patcher.__main__", "patcher"},
]


def module_name(path: Path) -> str:
    parts = ("patcher",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def patcher_imports(path: Path) -> set[str]:
    """Every patcher module ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "patcher" or node.module.startswith("patcher."):
                found.add(node.module)
                for alias in node.names:  # from patcher.model import dtypes
                    candidate = f"{node.module}.{alias.name}"
                    if (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists() or \
                            (PACKAGE.parent / candidate.replace(".", "/")).is_dir():
                        found.add(candidate)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; use absolute patcher.* imports")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("patcher"))
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_imports_run_down_the_pipeline():
    wrong = []
    for name, path in sorted(MODULES.items()):
        for target in patcher_imports(path):
            if layer_of(target) > layer_of(name):
                wrong.append(f"{name} (layer {layer_of(name)}) imports {target} "
                             f"(layer {layer_of(target)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = {name: {t for t in patcher_imports(path) if t in MODULES and t != name}
             for name, path in MODULES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
