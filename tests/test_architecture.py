"""The layer picture of docs/development.md holds: imports in lib_seg go one way and nothing cycles.

Read from the source with ``ast`` (imports inside functions count, ``TYPE_CHECKING`` ones too): the ground floor
``core`` imports nothing above it, ``unet`` and ``dit`` only ``core`` (never each other), ``targets`` and ``step``
only those, the host adapters nothing of the WebUI layer, and no module or package import cycle exists.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lib_seg"

# What each part may import (besides itself); a part is a lib_seg subpackage or top-level module.
ALLOWED = {
    "core": set(),
    "unet": {"core"},
    "dit": {"core"},
    "targets": {"core", "unet", "dit"},
    "step": {"core", "unet", "dit", "targets"},
    "a1111": {"core", "unet", "dit", "targets", "step"},
    "forge": {"core", "unet", "dit", "targets", "step"},
    "comfy": {"core", "unet", "dit", "targets", "step", "forge"},
    "webui": {"core", "unet", "dit", "targets", "step", "a1111", "forge"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The lib_seg modules ``path`` imports, absolute and relative, anywhere in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {module for module in found if module == "lib_seg" or module.startswith("lib_seg.")}


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}
GRAPH = {name: {m for m in imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


@pytest.mark.parametrize("module", sorted(m for m in MODULES if part(m) in ALLOWED))
def test_imports_go_one_way(module):
    here = part(module)
    wrong = {m for m in GRAPH[module] if part(m) not in (here, None) and part(m) not in ALLOWED[here]}
    assert not wrong, f"{module} ({here}) imports {sorted(wrong)}; {here} may import {sorted(ALLOWED[here])}"


def test_every_part_is_in_the_layer_picture():
    assert {part(m) for m in MODULES} - {None} == set(ALLOWED)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_cycle():
    modules = {m: {n for n in deps if not m.startswith(n + ".")} for m, deps in GRAPH.items()}  # a package's own
    assert _cycle(modules) is None, " -> ".join(_cycle(modules) or [])


def test_no_package_cycle():
    packages: dict[str, set[str]] = {}
    for module, deps in GRAPH.items():
        packages.setdefault(part(module) or "lib_seg", set()).update(part(d) or "lib_seg" for d in deps)
    packages = {p: deps - {p, "lib_seg"} for p, deps in packages.items()}
    assert _cycle(packages) is None, " -> ".join(_cycle(packages) or [])
