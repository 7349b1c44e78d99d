"""The package reads top-down: lower layers never import higher ones, and no subpackages import each other.

Imports are read with :mod:`ast` (every ``import``, at module level or inside a function, including those
under ``TYPE_CHECKING``), so the rules hold for lazy imports too. ARCHITECTURE.md describes the layers.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "specabund"

#: Layer of each top-level module or subpackage of ``specabund``, lowest first. A unit may import units of
#: its own layer or lower ones only. A new module must be placed here (and in ARCHITECTURE.md).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "foundation",
        (
            "errors",
            "utils",
            "elements",
            "lines",
            "spectrum",
            "metrics",
            "plotting",
            "tracking",
            "runs",
            "io",
            "catalog",
            "config",
            "workspace",
        ),
    ),
    ("dataset", ("dataset",)),
    ("processing", ("preprocess", "simulate")),
    ("models", ("models",)),
    ("training", ("training",)),
    ("evaluation", ("evaluation",)),
    ("predict", ("predict",)),
    ("baselines", ("baselines",)),
    ("tuning", ("tuning",)),
    ("analysis", ("analysis",)),
    ("api", ("api",)),
    ("cli", ("cli", "__main__")),
)

RANK: dict[str, int] = {unit: rank for rank, (_, units) in enumerate(LAYERS) for unit in units}
LAYER_NAME: dict[str, str] = {unit: name for name, units in LAYERS for unit in units}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _exists(module: str) -> bool:
    path = PACKAGE.parent / Path(*module.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _imports() -> dict[str, set[str]]:
    """``{module: modules of specabund it imports}`` (``from specabund import __version__`` excluded)."""
    out: dict[str, set[str]] = defaultdict(set)
    for path in sorted(PACKAGE.rglob("*.py")):
        mod = _module_name(path)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                out[mod].update(a.name for a in node.names if a.name.split(".")[0] == "specabund")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                if target.split(".")[0] != "specabund":
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if _exists(sub):  # ``from . import plots`` imports the module plots
                        out[mod].add(sub)
                    elif not (target == "specabund" and alias.name == "__version__"):
                        out[mod].add(target)
    return out


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "specabund"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


IMPORTS = _imports()


def test_every_unit_has_a_layer() -> None:
    units = {_unit(m) for m in IMPORTS} | {_unit(_module_name(p)) for p in PACKAGE.rglob("*.py")}
    missing = sorted(units - set(RANK) - {"specabund"})
    assert not missing, f"place {missing} in a layer of tests/test_layers.py (and in ARCHITECTURE.md)"


def test_lower_layers_never_import_higher_ones() -> None:
    wrong = []
    for mod, targets in sorted(IMPORTS.items()):
        src = _unit(mod)
        if src not in RANK:
            continue
        for target in sorted(targets):
            dst = _unit(target)
            if dst == "specabund":
                wrong.append(f"{mod} imports the package root {target} (import from its module instead)")
            elif dst in RANK and RANK[dst] > RANK[src]:
                wrong.append(f"{mod} ({LAYER_NAME[src]}) imports {target} ({LAYER_NAME[dst]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_between_subpackages() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for mod, targets in IMPORTS.items():
        for target in targets:
            if _unit(mod) != _unit(target):
                graph[_unit(mod)].add(_unit(target))
    assert not _cycles(graph), _cycles(graph)


@pytest.mark.parametrize("unit", sorted({_unit(m) for m in IMPORTS if m.count(".") > 1}))
def test_no_import_cycles_between_modules_of_a_subpackage(unit: str) -> None:
    # a package's __init__ re-exports its modules, so edges into a package __init__ are left out
    inits = {_module_name(p) for p in PACKAGE.rglob("__init__.py")}
    graph = {
        m: {t for t in ts if _unit(t) == unit and t not in inits and t != m}
        for m, ts in IMPORTS.items()
        if _unit(m) == unit and m not in inits
    }
    assert not _cycles(graph), _cycles(graph)
