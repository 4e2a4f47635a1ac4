"""The package's shape (docs/architecture.md), checked by reading the source: layers import only
downward, no import cycles (function-local and `if TYPE_CHECKING:` imports count), no module over
600 lines, and one home for config reading and strict loading."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast  # oracle-free and quick: part of `pytest -m fast`

PACKAGE = Path(__file__).resolve().parents[1] / "dora_primespeech_mlx"
NAME = PACKAGE.name
MAX_LINES = 600

# lowest first; a module may import its own layer and the ones below, never one above
LAYERS: list[tuple[str, ...]] = [
    ("constants", "options"),  # values and plain types, no imports from the package
    ("weights",),  # checkpoint files in, numpy state dicts out
    ("models",),  # graphs, their configs and sanitize; loading via models.base
    ("text", "audio", "voices", "coreml", "convert"),  # the engine's parts
    ("engine", "batch_synthesis", "engine_scheduler", "smoke"),  # one pass from text to audio chunks
    ("node_config", "node_payload", "node_service", "node", "cli", "download", "server", "bench_report", ""),  # adapters ("" is the package's own __init__)
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(module: str) -> set[str]:
    """Every package module `module` imports, wherever the import statement is."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import spec` imports a module, `from .x import f` a name
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
    return {m for m in found if m in MODULES and m != module}


GRAPH = {m: imports_of(m) for m in MODULES}


def layer_of(module: str) -> int:
    top = module[len(NAME) + 1:].split(".")[0] if module != NAME else ""
    for level, names in enumerate(LAYERS):
        if top in names:
            return level
    raise AssertionError(f"{module} is in no layer: add its top-level name to LAYERS and docs/architecture.md")


def test_every_module_is_in_a_layer():
    for module in MODULES:
        layer_of(module)


def test_imports_never_run_up_a_layer():
    upward = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
              for m, deps in GRAPH.items() for d in deps if layer_of(d) > layer_of(m)]
    assert upward == []


def test_no_import_cycles():
    # Tarjan's strongly connected components: any component of more than one module is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for d in GRAPH[m]:
            if d not in index:
                visit(d)
                low[m] = min(low[m], low[d])
            elif d in on_stack:
                low[m] = min(low[m], index[d])
        if low[m] == index[m]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == m:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for m in sorted(GRAPH):
        if m not in index:
            visit(m)
    # a package's __init__ importing its own submodules is how packages re-export; anything else is a cycle
    real = [c for c in cycles if not all(x == c[0] or x.startswith(c[0] + ".") for x in c)]
    assert real == []


def test_the_checker_sees_function_local_and_type_checking_imports(tmp_path, monkeypatch):
    """The walk reaches imports inside functions and `if TYPE_CHECKING:` (a circle hid there once)."""
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .engine import Engine\n"
              "def f():\n    from .node import main\n    from .models import t2s\n")
    (tmp_path / "options.py").write_text(source)
    monkeypatch.setitem(MODULES, f"{NAME}.options", tmp_path / "options.py")
    assert imports_of(f"{NAME}.options") == {f"{NAME}.engine", f"{NAME}.node", f"{NAME}.models.t2s"}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_over_600_lines(module):
    n = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{module} has {n} lines; split it by job (docs/architecture.md)"


def _defining(pattern: str) -> list[str]:
    return sorted(m for m, p in MODULES.items() if pattern in p.read_text(encoding="utf-8"))


def test_one_home_for_config_reading_and_strict_loading():
    assert _defining("def from_dict(") == [f"{NAME}.models.base"]
    assert _defining("strict=True") == [f"{NAME}.models.base"]
    assert _defining("def load_cached(") == [f"{NAME}.weights.cache"]
