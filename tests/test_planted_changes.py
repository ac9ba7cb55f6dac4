"""tools/planted_changes.py's table of known equivalent changes names lines the modules still have: an entry whose
line moved to another module or was rewritten would otherwise stop matching, silently, and its change would be
reported as a surviving one."""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("planted_changes", REPO / "tools" / "planted_changes.py")
planted_changes = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = planted_changes  # its dataclasses look their module up while being made
_spec.loader.exec_module(planted_changes)


@pytest.mark.parametrize("module", sorted(planted_changes.EQUIVALENT))
def test_every_equivalent_entry_names_a_line_of_its_module(module):
    """The tool matches an entry to a planted change by the stripped text of the changed line (``source_line``)."""
    lines = {line.strip() for line in (REPO / module).read_text().splitlines()}
    stale = [line for line, _, _ in planted_changes.EQUIVALENT[module] if line not in lines]
    assert not stale, f"{module}: EQUIVALENT names lines it no longer has (moved or rewritten): {stale}"
