"""The package's import graph: no import circles, and the layering of docs/architecture.md.

Every ``import`` statement counts, also those inside functions (a lazy import hides a circle at import time
but not from the reader); imports under ``if TYPE_CHECKING:`` do not. Layers, bottom to top: io/provenance,
data, backbones, the maths and evaluation packages, modules, callbacks, and the commands on top. A module may
import from its own layer and the ones below it only; in particular nothing below modules/ imports callbacks/.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rgsd_lightning"
LAYERS = (
    ("", "io", "provenance", "assets"),
    ("data",),
    ("backbones",),
    ("diffusion", "rewards", "rl", "selection", "evaluation"),
    ("modules",),
    ("callbacks",),
    ("cli", "pipeline", "report", "commands", "demo", "__main__"),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["rgsd_lightning", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _target(name: str) -> str:
    """The module an imported dotted name lives in (a name inside a module resolves to the module)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    hidden = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            hidden |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return hidden


def imports_of(module: str) -> set[str]:
    """The package modules that ``module`` imports anywhere in its file (TYPE_CHECKING blocks aside)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    hidden = _type_checking_nodes(tree)
    out = set()
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.Import):
            out |= {_target(a.name) for a in node.names if a.name.startswith("rgsd_lightning")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("rgsd_lightning"):
                out |= {_target(f"{node.module}.{a.name}") for a in node.names}
    out.discard(module)
    return out


GRAPH = {module: imports_of(module) for module in MODULES}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checks_see_a_circle_and_a_layer_violation():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert imports_of("rgsd_lightning.callbacks.writer") >= {"rgsd_lightning.data.synthetic_set"}
    assert "rgsd_lightning.evaluation.privacy" in imports_of("rgsd_lightning.callbacks.writer")  # a lazy one


def test_no_import_circles():
    assert _cycles(GRAPH) == []


def test_every_module_belongs_to_a_layer():
    assert {_layer(m) for m in MODULES} <= set(RANK), "add new top-level modules to LAYERS (and the docs)"


def test_modules_import_only_their_layer_and_below():
    upward = [
        f"{module} -> {target}"
        for module, targets in sorted(GRAPH.items())
        for target in sorted(targets)
        if RANK[_layer(target)] > RANK[_layer(module)]
    ]
    assert upward == []


def test_callbacks_holds_only_lightning_callbacks():
    from lightning.pytorch.callbacks import Callback

    for module in (m for m in MODULES if _layer(m) == "callbacks" and m != "rgsd_lightning.callbacks"):
        mod = importlib.import_module(module)
        public = [getattr(mod, n) for n in dir(mod) if not n.startswith("_")]
        defined = [obj for obj in public if getattr(obj, "__module__", None) == module]
        assert defined and all(isinstance(obj, type) and issubclass(obj, Callback) for obj in defined), module


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module):
    importlib.import_module(module)
