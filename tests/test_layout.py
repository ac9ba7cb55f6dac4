"""The package's plan holds: every module imports only from its own stage or an earlier one, never from a
sibling wing, and no two modules import each other (directly or around a cycle), counting imports inside
functions too.  The stages are those of docs/API.md, "The layout"."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pyrodiff

PACKAGE = Path(pyrodiff.__file__).parent

#: stage of every top-level module or subpackage; equal stages with different names are sibling wings
STAGES = {
    "checks": 0,
    "cuda_graph": 0,
    "networks": 0,
    "data": 0,
    "refusal": 0,
    "chain": 1,
    "evaluation": 2,
    "training": 3,
    "adapters": 3,
    "theory": 4,
    "testing": 5,
    "cli": 5,
    "__main__": 6,
    "__init__": 6,
}


def _modules() -> dict[str, Path]:
    """Dotted names (without ``pyrodiff.``) of every module of the package, with their files."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in its file (``TYPE_CHECKING`` blocks included)."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    if name == "__init__":
        here = []
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else list(here)
                stem = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "pyrodiff":
                stem = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:
                candidate = ".".join(stem + [alias.name])
                targets.add(candidate if candidate in modules else ".".join(stem))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "pyrodiff":
                    targets.add(".".join(alias.name.split(".")[1:]))
    return {t for t in targets if t in modules and t != name and t != ""}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _wing(name: str) -> str:
    return name.split(".")[0]


def test_every_module_has_a_stage():
    missing = sorted({_wing(m) for m in _modules()} - set(STAGES))
    assert not missing, f"modules without a stage in STAGES (and docs/API.md): {missing}"


def _wrong_imports(graph: dict[str, set[str]], name: str) -> list[str]:
    """What ``name`` imports from a later stage, or from a sibling wing of the same stage."""
    mine = STAGES[_wing(name)]
    return [
        target
        for target in sorted(graph[name])
        if STAGES[_wing(target)] > mine or (STAGES[_wing(target)] == mine and _wing(target) != _wing(name) and mine > 0)
    ]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (depth-first search), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.mark.parametrize("name", sorted(_modules()))
def test_no_import_from_a_later_stage_or_a_sibling_wing(name):
    wrong = _wrong_imports(_graph(), name)
    assert not wrong, f"pyrodiff.{name} (stage {STAGES[_wing(name)]}) imports {wrong}"


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_see_a_planted_upward_import_a_sibling_import_and_a_cycle():
    """The checks above can fail: the real graph with one upward import, one import across sibling wings and one
    cycle planted is refused on each."""
    graph = _graph()
    assert "chain.forward" in graph["chain.reverse"] and "evaluation.bound" in graph
    planted = {**graph, "chain.schedule": graph["chain.schedule"] | {"evaluation.bound"}}
    assert _wrong_imports(planted, "chain.schedule") == ["evaluation.bound"]
    planted = {**graph, "adapters.external": graph["adapters.external"] | {"training.checkpoint"}}
    assert _wrong_imports(planted, "adapters.external") == ["training.checkpoint"]
    planted = {**graph, "chain.forward": graph["chain.forward"] | {"chain.reverse"}}
    cycle = _cycle(planted)
    assert cycle is not None and {"chain.forward", "chain.reverse"} <= set(cycle)
