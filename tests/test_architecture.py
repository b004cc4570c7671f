"""The house rules, checked on the source: no import circle between modules, no import from a lower layer to a
higher one, no module over the size limit without a stated reason. ARCHITECTURE.md draws the same layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "polyculture"

# Lowest first. A module may import its own layer and the layers below; never one above.
LAYERS: list[tuple[str, ...]] = [
    ("polyculture", "polyculture.progress", "polyculture.embedded", "polyculture.index", "polyculture.metrics"),
    ("polyculture.spec",),
    ("polyculture.engines", "polyculture.runs", "polyculture.hub"),
    ("polyculture.methods",),
    ("polyculture.preflight",),
    ("polyculture.stages",),
    ("polyculture.report", "polyculture.tuning"),
    ("polyculture.flows",),
    ("polyculture.compare",),
    ("polyculture.cli",),
]
MAX_LINES = 450
# A module over MAX_LINES says why in its docstring, on a line starting with this.
SIZE_REASON = "Size:"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Every polyculture module `name` imports, wherever the import sits (module level, inside a function, or under
    TYPE_CHECKING): a lazy import is still a dependency."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:  # `from package import module` imports the module
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imported_modules(name, path, known) for name, path in mods.items()}


def layer_of(module: str) -> int:
    best: tuple[int, int] | None = None  # (prefix length, layer): the longest matching prefix decides
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), index)
    if best is None:
        raise AssertionError(f"module {module} is in no layer: add its folder to LAYERS (and to ARCHITECTURE.md)")
    return best[1]


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{src} (layer {layer_of(src)}) imports {dst} (layer {layer_of(dst)})"
        for src, targets in graph.items()
        for dst in targets
        if layer_of(dst) > layer_of(src)
    )


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_no_import_circle():
    assert import_cycles(import_graph()) == []


def test_no_import_runs_up_the_layers():
    assert upward_imports(import_graph()) == []


def test_the_checks_catch_a_circle_and_an_upward_import():
    graph = {"polyculture.stages.a": {"polyculture.flows.b"}, "polyculture.flows.b": {"polyculture.stages.a"}}
    assert import_cycles(graph) == [["polyculture.flows.b", "polyculture.stages.a"]]
    assert upward_imports(graph) == ["polyculture.stages.a (layer 5) imports polyculture.flows.b (layer 7)"]


def test_lazy_and_relative_imports_count(tmp_path):
    package = tmp_path / "polyculture" / "stages"
    package.mkdir(parents=True)
    module = package / "x.py"
    module.write_text("def f():\n    from polyculture.flows import build_dataset\n    from . import y\n")
    known = {"polyculture.flows.build_dataset", "polyculture.stages.y", "polyculture.stages.x"}
    assert imported_modules("polyculture.stages.x", module, known) == {
        "polyculture.flows.build_dataset",
        "polyculture.stages.y",
    }


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_size(name):
    path = modules()[name]
    lines = path.read_text(encoding="utf-8").count("\n")
    if lines <= MAX_LINES:
        return
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    assert any(line.strip().startswith(SIZE_REASON) for line in doc.splitlines()), (
        f"{path.relative_to(SRC)} has {lines} lines (> {MAX_LINES}): split it, or say why not in its docstring "
        f"on a line starting with '{SIZE_REASON}'"
    )
