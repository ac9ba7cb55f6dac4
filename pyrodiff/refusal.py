"""How the analysis and benchmark scripts report a refused input, as the ``pyrodiff`` command does: one line,
``PROG: error: ...``, on standard error with exit status 2 (130 after Ctrl-C), never a traceback.

A refused input is any :data:`REFUSED` error raised while the script works: a bad argument found after parsing,
a checkpoint that cannot be read (``CheckpointError`` is a ``RuntimeError``), a specification that does not
validate (``SpecError`` is a ``ValueError``), a result that would be overwritten (``FileExistsError``).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["REFUSED", "run_refusing", "one_line", "objects_refused"]

#: the errors that mean "this input is refused"; anything else is a bug and keeps its traceback
REFUSED = (ValueError, OSError, RuntimeError, ArithmeticError)


def one_line(error: BaseException) -> str:
    """An error's message on one line (its lines joined with spaces)."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def objects_refused(path: str | Path, error: BaseException) -> str:
    """What to say of a file that ``torch.load(weights_only=True)`` refused: it holds objects other than tensors and
    plain data (naming the first such global), so it was not loaded.  Torch's own message advises
    ``weights_only=False``, which would run the code the file names; it is not repeated."""
    named = re.search(r"GLOBAL (\S+)", str(error))
    return (
        f"{path} holds objects other than tensors and plain data"
        + (f" ({named.group(1)})" if named else "")
        + "; it was not loaded, because unpickling it could run code from the file"
    )


def run_refusing(prog: str, work: Callable[[], int | None], refused: tuple[type[BaseException], ...] = REFUSED) -> int:
    """Run ``work()`` and return its exit status (``None`` is 0); a ``refused`` error (:data:`REFUSED` unless the
    script names its own) prints ``PROG: error: MESSAGE`` and returns 2, Ctrl-C prints ``PROG: interrupted`` and
    returns 130."""
    try:
        return work() or 0
    except refused as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
