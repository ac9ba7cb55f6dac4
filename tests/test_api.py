"""docs/API.md and the code agree: each module's ``__all__`` is exactly the names API.md's "Modules" table lists for
it, every listed name exists, every module of the package has a row, and ``pyrodiff.__all__`` is API.md's top-level
table."""

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import pyrodiff

API = Path(__file__).resolve().parents[1] / "docs" / "API.md"
#: a name as API.md writes it: a backticked identifier, maybe called (`name(args)`)
NAME = re.compile(r"`([A-Za-z_]\w*)[`(]")
#: a row that lists another module's names (a package re-exporting its module's)
SAME_AS = re.compile(r"^the names of `([\w.]+)`")


def _section(text: str, heading: str) -> list[str]:
    """The table rows (cells split, header and rule dropped) of the first table after ``heading``."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _top_level(text: str) -> list[str]:
    """The names of API.md's top-level table: the backticked names of its first column."""
    return [name for cells in _section(text, "## `pyrodiff` (top level)") for name in NAME.findall(cells[0])]


def _modules(text: str) -> dict[str, list[str]]:
    """Each module of API.md's "Modules" table and the public names it lists."""
    rows = {cells[0].strip("`"): cells[1] for cells in _section(text, "## Modules")}
    listed = {}
    for module, cell in rows.items():
        same = SAME_AS.match(cell)
        listed[module] = NAME.findall(rows[same.group(1)] if same else cell)
    return listed


def _package_modules() -> list[str]:
    """Every module of the package, less the command's ``__main__`` and the subpackages that only hold modules
    (no ``__all__`` of their own)."""
    names = []
    for info in pkgutil.walk_packages(pyrodiff.__path__, "pyrodiff."):
        if info.name.endswith("__main__"):
            continue
        if info.ispkg and not hasattr(importlib.import_module(info.name), "__all__"):
            continue
        names.append(info.name)
    return names


def _mismatch(listed: list[str], exported: list[str]) -> str:
    return (
        f"only in API.md: {sorted(set(listed) - set(exported))}; only in __all__: {sorted(set(exported) - set(listed))}"
    )


def test_top_level_all_is_the_top_level_table():
    listed = _top_level(API.read_text())
    assert len(listed) == len(set(listed)), "a top-level name is listed twice"
    assert sorted(pyrodiff.__all__) == sorted(listed), _mismatch(listed, pyrodiff.__all__)
    for name in listed:
        assert getattr(pyrodiff, name) is not None


def test_every_module_has_a_row():
    assert sorted(_package_modules()) == sorted(_modules(API.read_text()))


@pytest.mark.parametrize("module", sorted(_modules(API.read_text())))
def test_module_all_is_its_row(module):
    listed = _modules(API.read_text())[module]
    assert len(listed) == len(set(listed)), f"{module}: a name is listed twice"
    imported = importlib.import_module(module)
    exported = list(getattr(imported, "__all__", []))
    assert sorted(exported) == sorted(listed), f"{module}: {_mismatch(listed, exported)}"
    missing = [name for name in listed if not hasattr(imported, name)]
    assert not missing, f"{module} lists names it does not define: {missing}"


def test_the_parser_reads_names_not_prose():
    """The row parser takes backticked names (called or not) and nothing else."""
    text = '## Modules\n\n| module | names |\n| --- | --- |\n| `m` | `f(x, y=1)`, `C`, the `"t"` site |\n\nprose\n'
    assert _modules(text) == {"m": ["f", "C"]}


def test_every_export_is_its_object_and_only_adapters_and_samplers_are_modules():
    """`pyrodiff.continuous_bound` is the function (a module of the same name once shadowed it in the lazy exports)."""
    import types

    from pyrodiff.evaluation.continuous import continuous_bound

    for name in pyrodiff.__all__:
        assert isinstance(getattr(pyrodiff, name), types.ModuleType) == (name in ("adapters", "samplers")), name
    assert pyrodiff.continuous_bound is continuous_bound
