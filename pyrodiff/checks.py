"""Argument checks: the one home of the package's checks of integers, numbers and choices.

Every check takes the argument's name and its value, returns the value (a number as a float) when it is
acceptable, and otherwise raises :class:`CheckError`, whose one-line message names the argument, what was
expected and what was given: ``num_samples must be an integer >= 1, got 0``.  A value of the wrong type
(a bool, a float or a string for an integer) raises :class:`CheckTypeError`, which is both a ``TypeError``,
as Python's convention asks, and a :class:`CheckError`, so a caller that reports bad input by catching
``ValueError`` reports it too.

A bool is never an integer nor a number here (``True`` is an ``int`` to Python, but ``batch_size = true``
is a mistake), nor is a float with an integer value.

The exception keeps ``name``, ``expected`` and ``value`` apart, so a caller whose user typed the value
elsewhere says it in that place's terms: the specification (:mod:`pyrodiff.training.spec`) names the file,
the ``table.key`` and the value as TOML spells it; the command line (:mod:`pyrodiff.cli`) the option and the
text as typed.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

__all__ = [
    "CheckError",
    "CheckTypeError",
    "integer",
    "positive_int",
    "int_in",
    "number",
    "probability",
    "one_of",
    "is_integer",
    "is_number",
]

T = TypeVar("T")

_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 60


def _shown(value: Any) -> str:
    """``repr(value)`` on one line and at most about 60 characters (a tensor given for an integer stays readable)."""
    return " ".join(_SHOW.repr(value).split())


class CheckError(ValueError):
    """An argument that is refused: ``name`` must be ``expected`` (a phrase: "an integer >= 1"), got ``value``.

    Made by :meth:`refuse`.  ``CheckError(message)`` alone, as Pyro rebuilds an error raised inside a model
    (adding the trace's shapes to the message), leaves the three parts None."""

    def __init__(self, message: str, name: str | None = None, expected: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.name, self.expected, self.value = name, expected, value

    @classmethod
    def refuse(cls, name: str, expected: str, value: Any) -> CheckError:
        """The error "``name`` must be ``expected``, got ``value``"."""
        return cls(f"{name} must be {expected}, got {_shown(value)}", name, expected, value)


class CheckTypeError(CheckError, TypeError):
    """An argument of the wrong type (a bool, a float or a string where an integer belongs)."""


def is_integer(value: Any) -> bool:
    """Whether ``value`` is a Python ``int`` and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """Whether ``value`` is a Python ``int`` or ``float`` (NumPy's float64 included) and not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def integer(name: str, value: Any, minimum: int | None = None) -> int:
    """``value``, an integer >= ``minimum`` (any integer if ``minimum`` is None)."""
    expected = "an integer" if minimum is None else f"an integer >= {minimum}"
    if not is_integer(value):
        raise CheckTypeError.refuse(name, expected, value)
    if minimum is not None and value < minimum:
        raise CheckError.refuse(name, expected, value)
    return value


def positive_int(name: str, value: Any) -> int:
    """``value``, an integer >= 1 (a count: samples, examples, steps)."""
    return integer(name, value, 1)


def int_in(name: str, value: Any, lo: int, hi: int, hi_name: str | None = None) -> int:
    """``value``, an integer in ``lo..hi`` (both included); ``hi_name`` names the upper end in the message
    (``"T"``: "an integer in 1..T = 1..1000")."""
    span = f"{lo}..{hi}" if hi_name is None else f"{lo}..{hi_name} = {lo}..{hi}"
    expected = f"an integer in {span}"
    if not is_integer(value):
        raise CheckTypeError.refuse(name, expected, value)
    if not lo <= value <= hi:
        raise CheckError.refuse(name, expected, value)
    return value


def number(
    name: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    finite: bool = True,
) -> float:
    """``value`` as a float: a number, at least ``lo`` (above it if ``lo_open``) and at most ``hi`` (below it if
    ``hi_open``) where those are given.  NaN is always refused, the infinities unless ``finite`` is False (a time
    budget may be unlimited)."""
    if lo is not None and hi is not None:
        expected = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    else:
        bounds = [f"{'>' if lo_open else '>='} {lo:g}"] if lo is not None else []
        bounds += [f"{'<' if hi_open else '<='} {hi:g}"] if hi is not None else []
        expected = " ".join(["a finite number" if finite else "a number", *bounds])
    if not is_number(value):
        raise CheckTypeError.refuse(name, expected, value)
    ok = math.isfinite(value) if finite else not math.isnan(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        raise CheckError.refuse(name, expected, value)
    return float(value)


def probability(name: str, value: Any) -> float:
    """``value`` as a float in [0, 1]."""
    return number(name, value, 0, 1)


def one_of(name: str, value: T, options: Iterable[Any], show: Callable[[Any], str] = repr) -> T:
    """``value``, one of ``options``, compared with its type too (``False`` does not pass for ``0``, nor ``1``
    for ``True``); ``show`` writes the options in the message (the specification writes them as TOML does)."""
    options = tuple(options)
    if not any(type(value) is type(o) and value == o for o in options):
        raise CheckError.refuse(name, f"one of {', '.join(map(show, options))}", value)
    return value
