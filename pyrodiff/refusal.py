"""How the analysis and benchmark scripts report a refused input, as the ``pyrodiff`` command does: one line,
``PROG: error: ...``, on standard error with exit status 2 (130 after Ctrl-C), never a traceback.

A refused input is any :data:`REFUSED` error raised while the script works: a bad argument found after parsing,
a checkpoint that cannot be read (``CheckpointError`` is a ``RuntimeError``), a specification that does not
validate (``SpecError`` is a ``ValueError``), a result that would be overwritten (``FileExistsError``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["REFUSED", "one_line", "run_refusing"]

#: the errors that mean "this input is refused"; anything else is a bug and keeps its traceback
REFUSED = (ValueError, OSError, RuntimeError, ArithmeticError)


def one_line(error: BaseException) -> str:
    """An error's message on one line (its lines joined with spaces)."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def run_refusing(prog: str, work: Callable[[], int | None]) -> int:
    """Run ``work()`` and return its exit status (``None`` is 0); a :data:`REFUSED` error prints
    ``PROG: error: MESSAGE`` and returns 2, Ctrl-C prints ``PROG: interrupted`` and returns 130."""
    try:
        return work() or 0
    except REFUSED as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
