#!/usr/bin/env python
r"""Planted changes (mutation testing) of pyrodiff's formula modules against the test suite.

A tool, not a test (it lives in ``tools/``, outside pytest's ``testpaths``).  For one module at a time it copies the repository's
``pyrodiff/``, ``tests/``, ``analysis/``, ``pyproject.toml`` (and so ``tests/conftest.py``) into a temporary
folder, enumerates small changes of the module's code with :mod:`ast`, writes each one into the copy, runs

    python -m pytest -x -q -p no:cacheprovider <test files>

in the copy (``-m 'not slow'`` comes from the pyproject's addopts) with a timeout, restores the module
and records whether the change was caught (``killed``: some test failed or errored), ``survived`` or
``timeout``.  The working tree is never written to.

Changes planted (each alone; code only: docstrings, other strings, f-strings, ``raise`` statements and
``warn`` calls (messages), annotations, ``__all__`` and ``TYPE_CHECKING`` blocks, and keyword arguments that only
set how a result looks (:data:`PRESENTATION_KEYWORDS`: a figure's size and resolution, marker sizes, a JSON file's
indent, a progress bar's refresh interval) are left alone; function
bodies, default arguments and module- or class-level constants are all code, e.g. the cosine schedule's
``s = 0.008``):

- arithmetic operators ``+``/``-``, ``*``/``/``, ``//`` -> ``/``, ``**`` -> ``*`` (also in ``x += y``);
- comparisons ``<``/``<=``, ``>``/``>=``, ``==``/``!=``;
- numeric constants: an int ``n`` -> ``n + 1``, a float ``c`` -> ``2 c`` and ``c + 1``;
- integer slice bounds and indices shifted by one both ways (``[1:]`` -> ``[2:]`` and ``[0:]``,
  ``[:-1]`` -> ``[:-2]`` and ``[:0]``, ``[0]`` -> ``[1]``);
- a unary minus dropped, a ``not`` dropped;
- the 2nd and 3rd arguments of ``where(cond, a, b)`` exchanged;
- ``.sqrt()``, ``.log()``, ``.exp()``, ``.log1p()``, ``.expm1()``, ``.rsqrt()`` (and ``torch.sqrt(x)``,
  ``math.log(x)`` ...) dropped;
- ``min=``/``max=`` exchanged in ``clamp`` calls; ``minimum``/``maximum`` exchanged.

``--operators extended`` adds every arithmetic operator to the others, reversed comparisons, ints to
``n - 1`` and ``0``, floats to ``c / 2``, ``-c`` and ``0``.

Mutants whose code is the same as the original's or an earlier mutant's (compared as ASTs) are dropped.
Known equivalent changes (:data:`EQUIVALENT`, keyed by the changed line's text, so that an edit of the
line brings the change back for review) are reported as such, with the reason.

Runs are fast because a server process imports torch, pyro, numpy, scipy and pytest once and forks one
child per mutant, which runs ``pytest.main`` in the copy (``--runner subprocess`` runs
``python -m pytest`` instead); the fork runner also skips Hypothesis's shrinking of a failing example
(a failure is all that is needed).  Each run gets its own Hypothesis seed (``--hypothesis-seed``,
reproducible from ``--seed``) and no example database (``.hypothesis`` is removed before each run).
Before planting anything the script checks that the copy's package is the one imported
(``pyrodiff.__file__``, with ``PYTHONPATH`` set to the copy and the copy as working directory), that a
planted syntax error is caught, and that the unchanged copy passes.  The exit status is 1 if any change
survived (equivalent ones excepted).

Examples::

    python tools/planted_changes.py --module pyrodiff/chain/parameterization.py
    python tools/planted_changes.py --module pyrodiff/chain/schedule.py --list
    python tools/planted_changes.py --module pyrodiff/chain/gaussian.py --only 3,7 --tests tests/test_gaussian.py
    python tools/planted_changes.py --module all --out /tmp/planted

Writes ``<out>/<module>.json`` (every mutant) and ``<out>/<module>.md`` (summary, survivors, equivalents).
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: the formula modules, in the order they are checked with ``--module all``
FORMULA_MODULES = (
    "pyrodiff/chain/parameterization.py",
    "pyrodiff/chain/schedule.py",
    "pyrodiff/chain/gaussian.py",
    "pyrodiff/chain/forward.py",
    "pyrodiff/chain/decoders.py",
    "pyrodiff/chain/objectives.py",
    "pyrodiff/chain/timesteps.py",
    "pyrodiff/chain/importance.py",
    "pyrodiff/chain/samplers.py",
    "pyrodiff/chain/reverse.py",
    "pyrodiff/chain/kl.py",
    "pyrodiff/chain/traces.py",
    "pyrodiff/chain/path.py",
    "pyrodiff/chain/log_snr.py",
    "pyrodiff/chain/continuous.py",
    "pyrodiff/theory/exact.py",
    "pyrodiff/evaluation/likelihood.py",
    "pyrodiff/theory/mixture.py",
    "pyrodiff/theory/empirical.py",
    "pyrodiff/theory/vae.py",
)

#: the fast test files that guard each module, those most likely to catch a change first (``-x`` stops
#: at the first failure); files missing from the copy are skipped
DEFAULT_TESTS = {
    "pyrodiff/theory/exact.py": ["tests/test_exact.py", "tests/test_continuous.py"],
    "pyrodiff/chain/log_snr.py": ["tests/test_log_snr.py", "tests/test_continuous.py"],
    "pyrodiff/chain/continuous.py": ["tests/test_continuous.py", "tests/test_log_snr.py"],
    "pyrodiff/evaluation/likelihood.py": ["tests/test_likelihood.py"],
    "pyrodiff/theory/mixture.py": ["tests/test_mixture.py", "tests/test_empirical.py"],
    "pyrodiff/theory/empirical.py": ["tests/test_empirical.py"],
    "pyrodiff/theory/vae.py": ["tests/test_vae.py"],
    "pyrodiff/chain/parameterization.py": [
        "tests/test_parameterization.py",
        "tests/test_reverse.py",
        "tests/test_objectives.py",
        "tests/test_reference_agreement.py",
        "tests/test_elbo_statistics.py",
    ],
    "pyrodiff/chain/schedule.py": [
        "tests/test_schedule.py",
        "tests/test_parameterization.py",
        "tests/test_forward.py",
        "tests/test_objectives.py",
        "tests/test_reference_agreement.py",
    ],
    "pyrodiff/chain/gaussian.py": [
        "tests/test_gaussian.py",
        "tests/test_forward.py",
        "tests/test_reverse.py",
        "tests/test_reference_agreement.py",
        "tests/test_elbo_statistics.py",
    ],
    "pyrodiff/chain/forward.py": [
        "tests/test_forward.py",
        "tests/test_loop.py",
        "tests/test_reverse.py",
        "tests/test_kl.py",
        "tests/test_elbo_statistics.py",
    ],
    "pyrodiff/chain/decoders.py": [
        "tests/test_decoders.py",
        "tests/test_reference_agreement.py",
        "tests/test_reverse.py",
        "tests/test_samplers.py",
        "tests/test_elbo_statistics.py",
    ],
    "pyrodiff/chain/objectives.py": ["tests/test_objectives.py", "tests/test_train.py"],
    "pyrodiff/chain/timesteps.py": [
        "tests/test_timesteps.py",
        "tests/test_objectives.py",
        "tests/test_importance.py",
        "tests/test_elbo_statistics.py",
    ],
    "pyrodiff/chain/importance.py": ["tests/test_importance.py"],
    "pyrodiff/chain/samplers.py": ["tests/test_samplers.py", "tests/test_reverse.py", "tests/test_loop.py"],
    "pyrodiff/chain/reverse.py": [
        "tests/test_reverse.py",
        "tests/test_loop.py",
        "tests/test_samplers.py",
        "tests/test_kl.py",
        "tests/test_reference_agreement.py",
        "tests/test_elbo_statistics.py",
    ],
    "pyrodiff/chain/kl.py": ["tests/test_kl.py", "tests/test_reverse.py", "tests/test_elbo_statistics.py"],
    "pyrodiff/chain/traces.py": ["tests/test_traces.py", "tests/test_bound.py", "tests/test_importance.py"],
    "pyrodiff/chain/path.py": [
        "tests/test_path.py",
        "tests/test_forward.py",
        "tests/test_loop.py",
        "tests/test_reverse.py",
        "tests/test_kl.py",
    ],
    "pyrodiff/evaluation/bound.py": [
        "tests/test_bound.py",
        "tests/test_reference_agreement.py",
        "tests/test_elbo_statistics.py",
    ],
    "pyrodiff/evaluation/report.py": ["tests/test_report.py", "tests/test_bound.py"],
}

#: changes that cannot alter behaviour: module -> [(the changed line, stripped; the change; why)].  Keyed by
#: the line's text, not its number, so an edit of the line brings the change back for review.
_SIGMOID_SCALE = (
    "the betas depend on the target alpha_bar(u) only through the ratios alpha_bar(t/T) / alpha_bar((t-1)/T), "
    "so a constant factor of it (here its normaliser sigma(b/tau) - sigma(a/tau)) cancels"
)
_ONE_COLUMN = (
    "the standard errors of one column (the total, K = 1) form a 1-element tensor: [0] and [-1] are its one entry"
)
_XLIM_MARGIN = (
    "the margins of the terms plot's x-range around k = 0 .. T (test_plots checks that every term is in view)"
)
EQUIVALENT: dict[str, list[tuple[str, str, str]]] = {
    "pyrodiff/theory/exact.py": [
        (
            "check_points: int = 3,",
            "`3` -> `4`",
            "one more probe point of the affinity check: the same maps are read",
        ),
        (
            "def continuous_elbo_terms(model: ContinuousDiffusionModel, x0: torch.Tensor, nodes: int = 256) -> torch.Tensor:",
            "`256` -> `257`",
            "one more Gauss-Legendre node: the integral of a smooth integrand is already exact to rounding",
        ),
        (
            "model: ContinuousDiffusionModel, mean: torch.Tensor, cov: torch.Tensor, nodes: int = 256",
            "`256` -> `257`",
            "one more Gauss-Legendre node: the integral of a smooth integrand is already exact to rounding",
        ),
        (
            "model: ContinuousDiffusionModel, x0: torch.Tensor, nodes: int = 512",
            "`512` -> `513`",
            "one more Gauss-Legendre node: the integral of a smooth integrand is already exact to rounding",
        ),
        (
            "return _continuous_terms(model, m[None], S, None if model.data_shape else tuple(mean.shape), nodes)[0]",
            "index `0` -> `-1` in `_continuous_terms(model, m[None], S, None if model.data_shape else tuple(mean.shape), nodes)[0]`",
            "the terms have one row (the law's mean): row 0 is row -1",
        ),
        (
            "D = A.shape[-1]",
            "index `-1` -> `-2` in `A.shape[-1]`",
            "A is (G, D, D): its last two sizes are both D",
        ),
        (
            "D = A.shape[-1]",
            "`-` dropped in `-1`",
            "A is (G, D, D): its last two sizes are both D",
        ),
        (
            "trace = C.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None]",
            "`-` dropped in `-1`",
            "the tensor is 2-D: dim 1 is dim -1",
        ),
        (
            "square = means.pow(2).sum(-1).to(device) + (0 if cov is None else cov.diagonal().sum().to(device))",
            "`-` dropped in `-1`",
            "the tensor is 2-D: dim 1 is dim -1",
        ),
        (
            "return torch.stack([prior, decoder, diffusion], dim=-1)",
            "`-` dropped in `-1`",
            "the stacked terms are 1-D (N,): dim=1 is dim=-1 of the result",
        ),
        (
            "probes = torch.randn(check_points, D, generator=torch.Generator().manual_seed(0), dtype=_F64).to(device)",
            "`0` -> `1`",
            "other random probe points of the affinity check: the same maps are read",
        ),
        (
            "bad = ~(error <= 1e-8 * (1 + values.abs().amax((1, 2))))",
            "`<=` -> `<` in `error <= 1e-08 * (1 + values.abs().amax((1, 2)))`",
            "differs only when the error equals the tolerance exactly",
        ),
        (
            "return weights, offsets, None, 0.0",
            "`0.0` -> `1.0`",
            "the error is read only when a map is not affine (first is not None)",
        ),
    ],
    "pyrodiff/chain/continuous.py": [
        (
            'pyro.sample("x_0", self.decoder_law(alpha_0 * x0 + sigma_0 * eps_0), obs=x0)',
            "`+` -> `-` in `alpha_0 * x0 + sigma_0 * eps_0`",
            "eps_0 is standard normal in guide and model alike: -eps_0 has its law, so z_0 and the decoder term too",
        ),
    ],
    "pyrodiff/chain/log_snr.py": [
        (
            "RATE_CHECK_POINTS = 1025",
            "`1025` -> `1026`",
            "a grid one point finer: the check refuses the same schedules unless a dip is narrower than 1/1024",
        ),
        (
            "ends, _ = self._g(torch.arange(2, dtype=torch.float64, device=t.device))  # t = 0, 1 made on the device",
            "`2` -> `3`",
            "g is also evaluated at t = 2, which is never read (only ends[0] and ends[1] are)",
        ),
    ],
    "pyrodiff/chain/decoders.py": [
        (
            "flip = lower > 0",
            "`>` -> `>=` in `lower > 0`",
            "at lower = 0 both forms are accurate and equal: log(Phi(u) - 1/2) = log(1/2 - Phi(-u))",
        ),
        (
            "index = (x + 1) * (levels - 1) / 2",
            "`+` -> `-` in `x + 1`",
            "shifts the index by the integer levels - 1, which leaves its distance to the nearest integer unchanged",
        ),
        (
            "if off > 1e-3:",
            "`>` -> `>=` in `off > 0.001`",
            "off = |i - round(i)| of a float64 (or float32) index cannot equal the double 0.001 exactly "
            "(its low bits are finer than the index's grid; none found in a search near the threshold)",
        ),
        (
            'upper = ((value + h - self.loc) / self.scale).masked_fill(value > 1 - h, float("inf"))',
            "`>` -> `>=` in `value > 1 - h`",
            "1 - h is the midpoint between the two top levels: no value on the grid (the decoder's support) equals it",
        ),
        (
            'lower = ((value - h - self.loc) / self.scale).masked_fill(value < -1 + h, float("-inf"))',
            "`<` -> `<=` in `value < -1 + h`",
            "-1 + h is the midpoint between the two bottom levels: no value on the grid equals it",
        ),
        (
            "return round_to_grid(self.loc.expand(shape) + self.scale.expand(shape) * noise, self.levels)",
            "`+` -> `-` in `self.loc.expand(shape) + self.scale.expand(shape) * noise`",
            "the noise is drawn inside sample() and is symmetric: loc - scale z has the law of loc + scale z",
        ),
    ],
    "pyrodiff/evaluation/bound.py": [
        (
            "return float(_stderr_over_examples(self.total.unsqueeze(-1))[0])",
            "index `0` -> `-1` in `_stderr_over_examples(self.total.unsqueeze(-1))[0]`",
            _ONE_COLUMN,
        ),
        (
            "return excess.mean().item(), float(_stderr_over_examples(excess.unsqueeze(-1))[0])",
            "index `0` -> `-1` in `_stderr_over_examples(excess.unsqueeze(-1))[0]`",
            _ONE_COLUMN,
        ),
        (
            'return values.double().std(0)[0] / math.sqrt(s) if s > 1 else torch.full(values.shape[2:], float("nan"))',
            "index `0` -> `-1` in `values.double().std(0)[0]`",
            "this branch has n < 2 examples: with one, the examples axis has length 1 and [0] is [-1]; with none, "
            "both raise the same IndexError",
        ),
        (
            'bar = tqdm(total=num_samples * T, desc="bound", unit="step", disable=not progress, mininterval=1.0, leave=False)',
            "`*` -> `/` in `num_samples * T`",
            "the progress bar's length (how full it is drawn, on stderr); nothing computed reads it",
        ),
        (
            'bar = tqdm(total=num_samples * T, desc="bound", unit="step", disable=not progress, mininterval=1.0, leave=False)',
            "`not` dropped in `not progress`",
            "shows or hides the progress bar only (on stderr); the terms are the same",
        ),
        (
            "xt = loc + var.sqrt() * _normal(x0k, generator)",
            "`+` -> `-` in `loc + var.sqrt() * _normal(x0k, generator)`",
            "the standard normal noise is drawn here and used nowhere else: loc - sd z has the law of loc + sd z",
        ),
        (
            "chunk_size = chunk_size or max(1, 4096 // N)",
            "`4096` -> `4097`",
            "a memory heuristic ('about 4096 inputs per call'): 4097 // N differs from 4096 // N only for N = 17, 241 "
            "or 4097, by one timestep per call, and every chunking gives the same law of the terms "
            "(test_reconstruction_errors_and_terms_are_exact_in_mean_for_any_chunking)",
        ),
        (
            "if kl.start < kl.stop:",
            "`<` -> `<=` in `kl.start < kl.stop`",
            "equal bounds only in a first chunk holding t = 1 alone: the body then reads and writes empty ranges",
        ),
        (
            "return BoundTerms(nats, sq_error, int(x0[0].numel()), model.decoder, model.describe())",
            "index `0` -> `-1` in `x0[0]`",
            "every example has the data's shape: the last one has as many dimensions as the first",
        ),
    ],
    "pyrodiff/evaluation/report.py": [
        (
            'rows.append((f"L_{T} (prior)", slice(T, T + 1)))',
            "`1` -> `2`",
            "the terms array has T + 1 entries: slice(T, T + 2) selects the same last one",
        ),
        (
            "ax.set_xlim(-0.3, terms.num_steps * 1.15)",
            "`0.3` -> `0.6`",
            _XLIM_MARGIN,
        ),
        (
            "ax.set_xlim(-0.3, terms.num_steps * 1.15)",
            "`0.3` -> `1.3`",
            _XLIM_MARGIN,
        ),
        (
            "ax.set_xlim(-0.3, terms.num_steps * 1.15)",
            "`1.15` -> `2.3`",
            _XLIM_MARGIN,
        ),
        (
            "ax.set_xlim(-0.3, terms.num_steps * 1.15)",
            "`1.15` -> `2.15`",
            _XLIM_MARGIN,
        ),
    ],
    "pyrodiff/chain/reverse.py": [
        (
            "if self._sampled is not None and path is self._sampled[0]:",
            "index `0` -> `-1` in `self._sampled[0]`",
            "the cache is then never hit and predictions(path) recomputes the same mu(x_1, 1), sigma_1^2 "
            "(one more network call, same values)",
        ),
        (
            "if self._sampled is not None and path is self._sampled[0]:",
            "index `0` -> `1` in `self._sampled[0]`",
            "as above: the cache is never hit and the same values are recomputed",
        ),
        (
            'range(chain.schedule.num_steps, 1, -1), desc="sample", disable=not progress, mininterval=1.0, leave=False',
            "`not` dropped in `not progress`",
            "shows or hides the progress bar only (on stderr); the draws are the same",
        ),
    ],
    "pyrodiff/chain/traces.py": [
        (
            "return torch.cat([decoder.unsqueeze(-1), chain.T], dim=-1)",
            "`-` dropped in `-1`",
            "decoder is 1-D (N,) and the result 2-D (N, T + 1): unsqueeze(1) = unsqueeze(-1) and dim=1 = dim=-1",
        ),
    ],
    "pyrodiff/chain/path.py": [
        (
            "return torch.arange(1, T + 1, device=device).unsqueeze(-1).expand(batch_shape)",
            "`-` dropped in `-1`",
            "arange is 1-D, so unsqueeze(1) = unsqueeze(-1)",
        ),
    ],
    "pyrodiff/chain/schedule.py": [
        (
            "v_start, v_end = torch.sigmoid(torch.tensor([start / tau, end / tau], dtype=torch.float64))",
            "`/` -> `*` in `start / tau`",
            "v_start enters only the normaliser: " + _SIGMOID_SCALE,
        ),
        (
            "abar = (v_end - torch.sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)",
            "`/` -> `*` in `(v_end - torch.sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)`",
            _SIGMOID_SCALE,
        ),
        (
            "abar = (v_end - torch.sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)",
            "`-` -> `+` in `v_end - v_start`",
            _SIGMOID_SCALE,
        ),
    ],
}


# ---------------------------------------------------------------------- enumerating changes
BINOP_SWAPS = {
    ast.Add: [ast.Sub],
    ast.Sub: [ast.Add],
    ast.Mult: [ast.Div],
    ast.Div: [ast.Mult],
    ast.FloorDiv: [ast.Div],
    ast.Pow: [ast.Mult],
}
CMP_SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq}
#: ``--operators extended``: every arithmetic operator to the others, comparisons reversed too, more constants
EXTENDED_BINOP_SWAPS = {
    ast.Add: [ast.Sub, ast.Mult, ast.Div],
    ast.Sub: [ast.Add, ast.Mult, ast.Div],
    ast.Mult: [ast.Div, ast.Add, ast.Sub, ast.Pow],
    ast.Div: [ast.Mult, ast.Add, ast.Sub, ast.FloorDiv],
    ast.FloorDiv: [ast.Div, ast.Mult],
    ast.Pow: [ast.Mult, ast.Add, ast.Div],
    ast.Mod: [ast.FloorDiv, ast.Mult],
}
EXTENDED_CMP_SWAPS = {
    ast.Lt: [ast.LtE, ast.Gt, ast.GtE],
    ast.LtE: [ast.Lt, ast.GtE, ast.Gt],
    ast.Gt: [ast.GtE, ast.Lt, ast.LtE],
    ast.GtE: [ast.Gt, ast.LtE, ast.Lt],
    ast.Eq: [ast.NotEq],
    ast.NotEq: [ast.Eq],
}
EXTENDED = False
OP_SYMBOLS = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Pow: "**",
    ast.Mod: "%",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.Eq: "==",
    ast.NotEq: "!=",
}
DROPPED_FUNCTIONS = ("sqrt", "log", "exp", "log1p", "expm1", "rsqrt")
FUNCTION_MODULES = ("torch", "math", "np", "numpy")


@dataclass
class Mutant:
    id: int
    module: str
    line: int
    col: int
    kind: str
    change: str
    source_line: str
    function: str
    status: str = "pending"
    seconds: float = 0.0
    failed: str = ""
    equivalent: str = ""
    text: str = field(default="", repr=False)


#: keyword arguments that set only how a figure, a file or a progress bar looks, never a number it shows
PRESENTATION_KEYWORDS = frozenset(
    {"figsize", "dpi", "ms", "markersize", "markerscale", "elinewidth", "capsize", "linewidth", "linthresh"}
    | {"fontsize", "indent", "mininterval"}
)


def _skip_children(node: ast.AST) -> bool:
    """Nodes whose whole subtree is not code to mutate."""
    if isinstance(node, (ast.JoinedStr, ast.Raise, ast.Import, ast.ImportFrom, ast.Global, ast.Nonlocal)):
        return True
    if isinstance(node, ast.keyword) and node.arg in PRESENTATION_KEYWORDS:
        return True
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            return True
    if isinstance(node, ast.If):
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            return True
    # warnings.warn(...) and similar messages
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "warn":
        return True
    return False


def _fields_to_walk(node: ast.AST):
    """(field, value) pairs of ``node``, leaving out annotations."""
    for name, value in ast.iter_fields(node):
        if name in ("annotation", "returns", "type_comment"):
            continue
        if isinstance(node, ast.arguments) and name in ("args", "posonlyargs", "kwonlyargs", "vararg", "kwarg"):
            continue  # the arguments themselves (their annotations); defaults are walked
        yield name, value


def _walk(node: ast.AST, path=(), function="<module>"):
    """Yield (node, path, enclosing function) for every node that may be mutated, in source order."""
    yield node, path, function
    if _skip_children(node):
        return
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        inner = node.name if function == "<module>" else f"{function}.{node.name}"
    elif isinstance(node, ast.ClassDef):
        inner = node.name if function == "<module>" else f"{function}.{node.name}"
    else:
        inner = function
    for name, value in _fields_to_walk(node):
        if isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, ast.AST):
                    # a docstring is an expression statement holding a string: strings are never mutated
                    yield from _walk(item, path + ((name, i),), inner if name != "decorator_list" else function)
        elif isinstance(value, ast.AST):
            yield from _walk(value, path + ((name, None),), inner)


def _resolve(tree: ast.AST, path):
    node = tree
    for name, index in path:
        node = getattr(node, name) if index is None else getattr(node, name)[index]
    return node


def _replace(tree: ast.AST, path, new: ast.AST) -> None:
    parent = _resolve(tree, path[:-1])
    name, index = path[-1]
    if index is None:
        setattr(parent, name, new)
    else:
        getattr(parent, name)[index] = new


def _call_name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _is_number(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Constant)
        and isinstance(node.value, (int, float))
        and not isinstance(node.value, bool)
        and not isinstance(node.value, complex)
    )


def _int_value(node: ast.AST) -> int | None:
    """The value of an integer literal, possibly negated (``-1``)."""
    if _is_number(node) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and _is_number(node.operand):
        if isinstance(node.operand.value, int):
            return -node.operand.value
    return None


def _int_literal(value: int) -> ast.AST:
    return ast.Constant(value) if value >= 0 else ast.UnaryOp(ast.USub(), ast.Constant(-value))


def _changes(node: ast.AST):
    """(kind, description, replacement node) for each change of ``node`` itself."""
    seg = ast.unparse(node)
    binops = EXTENDED_BINOP_SWAPS if EXTENDED else BINOP_SWAPS
    if isinstance(node, ast.BinOp) and type(node.op) in binops:
        for new_op in binops[type(node.op)]:
            new = copy.deepcopy(node)
            new.op = new_op()
            yield "operator", f"`{OP_SYMBOLS[type(node.op)]}` -> `{OP_SYMBOLS[new_op]}` in `{seg}`", new
    elif isinstance(node, ast.AugAssign) and type(node.op) in binops:
        for new_op in binops[type(node.op)]:
            new = copy.deepcopy(node)
            new.op = new_op()
            yield "operator", f"`{OP_SYMBOLS[type(node.op)]}=` -> `{OP_SYMBOLS[new_op]}=` in `{seg}`", new
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            swaps = (
                EXTENDED_CMP_SWAPS.get(type(op), [])
                if EXTENDED
                else [CMP_SWAPS[type(op)]]
                if type(op) in CMP_SWAPS
                else []
            )
            for new_op in swaps:
                new = copy.deepcopy(node)
                new.ops[i] = new_op()
                yield "comparison", f"`{OP_SYMBOLS[type(op)]}` -> `{OP_SYMBOLS[new_op]}` in `{seg}`", new
    elif _is_number(node):
        value = node.value
        options = [value + 1] if isinstance(value, int) else [2 * value, value + 1]
        if EXTENDED:
            options += [value - 1, 0] if isinstance(value, int) else [value / 2, -value, 0.0]
        for v in options:
            yield "constant", f"`{value!r}` -> `{v!r}`", ast.Constant(v)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        yield "unary", f"`-` dropped in `{seg}`", node.operand
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        yield "unary", f"`not` dropped in `{seg}`", node.operand
    elif isinstance(node, ast.Subscript):
        yield from _slice_changes(node, seg)
    elif isinstance(node, ast.Call):
        name = _call_name(node)
        if name == "where" and len(node.args) == 3 and not node.keywords:
            new = copy.deepcopy(node)
            new.args[1], new.args[2] = new.args[2], new.args[1]
            yield "where", f"branches of `where` exchanged in `{seg}`", new
        if name in DROPPED_FUNCTIONS and isinstance(node.func, ast.Attribute):
            receiver = node.func.value
            if not node.args and not node.keywords:  # x.sqrt()
                yield "call", f"`.{name}()` dropped in `{seg}`", receiver
            elif (
                len(node.args) == 1
                and not node.keywords
                and isinstance(receiver, ast.Name)
                and receiver.id in FUNCTION_MODULES
            ):  # torch.sqrt(x)
                yield "call", f"`{receiver.id}.{name}` dropped in `{seg}`", node.args[0]
        if name == "clamp" and any(k.arg in ("min", "max") for k in node.keywords):
            new = copy.deepcopy(node)
            for k in new.keywords:
                if k.arg in ("min", "max"):
                    k.arg = "max" if k.arg == "min" else "min"
            yield "clamp", f"`min`/`max` exchanged in `{seg}`", new
        if name in ("minimum", "maximum", "min", "max") and not node.keywords and len(node.args) >= 2:
            new = copy.deepcopy(node)
            swapped = {"minimum": "maximum", "maximum": "minimum", "min": "max", "max": "min"}[name]
            if isinstance(new.func, ast.Attribute):
                new.func.attr = swapped
            else:
                new.func.id = swapped
            yield "clamp", f"`{name}` -> `{swapped}` in `{seg}`", new


def _slice_changes(node: ast.Subscript, seg: str):
    """Integer slice bounds and indices shifted by -1 (the +1 shift is the constant change ``n -> n + 1``,
    or ``-n -> -(n + 1)`` for negative ones, so both directions are covered)."""
    sl = node.slice
    bounds = []
    if isinstance(sl, ast.Slice):
        bounds = [("lower", sl.lower), ("upper", sl.upper)]
    elif _int_value(sl) is not None:
        bounds = [("index", sl)]
    for which, bound in bounds:
        value = None if bound is None else _int_value(bound)
        if value is None:
            continue
        for shifted in (value - 1, value + 1):
            new = copy.deepcopy(node)
            if which == "index":
                new.slice = _int_literal(shifted)
            else:
                setattr(new.slice, which, _int_literal(shifted))
            yield "slice", f"{which} `{value}` -> `{shifted}` in `{seg}`", new


def _dump(tree: ast.AST) -> str:
    return ast.dump(tree, include_attributes=False)


def _splice(source: str, node: ast.AST, replacement: str) -> str:
    """``source`` with ``node``'s text replaced by ``replacement`` (column offsets are UTF-8 bytes)."""
    lines = source.splitlines(keepends=True)
    start = sum(len(s.encode()) for s in lines[: node.lineno - 1]) + node.col_offset
    end = sum(len(s.encode()) for s in lines[: node.end_lineno - 1]) + node.end_col_offset
    data = source.encode()
    return (data[:start] + replacement.encode() + data[end:]).decode()


def enumerate_mutants(module: str, source: str) -> list[Mutant]:
    tree = ast.parse(source)
    seen = {_dump(tree)}
    lines = source.splitlines()
    mutants: list[Mutant] = []
    for node, path, function in list(_walk(tree)):
        if not path:
            continue
        for kind, change, replacement in _changes(node):
            mutated_tree = ast.parse(source)
            _replace(mutated_tree, path, copy.deepcopy(replacement))
            key = _dump(mutated_tree)
            if key in seen:
                continue
            seen.add(key)
            if isinstance(node, ast.stmt):
                text = _splice(source, node, ast.unparse(replacement))
            else:
                text = _splice(source, node, "(" + ast.unparse(replacement) + ")")
            try:
                spliced_ok = _dump(ast.parse(text)) == key
            except SyntaxError:
                spliced_ok = False
            if not spliced_ok:  # fall back on the whole module, unparsed (same code, other layout)
                text = ast.unparse(mutated_tree) + "\n"
            if len(change) > 160:
                change = change[:157] + "...`"
            mutants.append(
                Mutant(
                    id=len(mutants) + 1,
                    module=module,
                    line=node.lineno,
                    col=node.col_offset,
                    kind=kind,
                    change=change,
                    source_line=lines[node.lineno - 1].strip(),
                    function=function,
                    text=text,
                )
            )
    for m in mutants:
        for line, change, reason in EQUIVALENT.get(module, []):
            if m.source_line == line and m.change == change:
                m.equivalent = reason
    return mutants


# ---------------------------------------------------------------------- the copy and the runs
def make_copy(dest: Path) -> None:
    for name in ("pyrodiff", "tests", "analysis"):
        if (REPO / name).exists():
            shutil.copytree(
                REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")
            )
    shutil.copy2(REPO / "pyproject.toml", dest / "pyproject.toml")
    if (REPO / "conftest.py").exists():
        shutil.copy2(REPO / "conftest.py", dest / "conftest.py")


def _env(copy_dir: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy_dir) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env["MPLBACKEND"] = "Agg"
    return env


class Runner:
    """Runs pytest in the copy: ``run(args, timeout) -> (returncode or None on timeout, output)``."""

    def __init__(self, copy_dir: Path, mode: str) -> None:
        self.copy_dir, self.mode = copy_dir, mode
        self._server: subprocess.Popen | None = None

    def start(self) -> None:
        if self.mode == "fork":
            self._server = subprocess.Popen(
                [sys.executable, "-u", "-c", _SERVER],
                cwd=self.copy_dir,
                env=_env(self.copy_dir),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            ready = self._server.stdout.readline().strip()
            if ready != "ready":
                raise RuntimeError(f"the fork server did not start: {ready!r}")

    def stop(self) -> None:
        """Ends the fork server, and the run in progress if any."""
        if self._server is not None:
            self._server.terminate()
            self._server.wait(timeout=30)
            self._server = None

    def run(self, args: list[str], timeout: float) -> tuple[int | None, str]:
        shutil.rmtree(self.copy_dir / ".hypothesis", ignore_errors=True)  # no examples carried between runs
        log = self.copy_dir / ".planted-output.txt"
        if self.mode == "fork":
            self._server.stdin.write(json.dumps({"args": args, "timeout": timeout, "log": str(log)}) + "\n")
            self._server.stdin.flush()
            reply = json.loads(self._server.stdout.readline())
            return reply["rc"], log.read_text(errors="replace")
        cmd = [sys.executable, "-m", "pytest", *args]
        proc = subprocess.Popen(
            cmd,
            cwd=self.copy_dir,
            env=_env(self.copy_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
            return proc.returncode, out
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            return None, out or ""


#: the fork server: imports the heavy libraries once (never pyrodiff), then per request forks a child that
#: runs pytest.main in the copy, in its own session so that a timeout kills everything it started
_SERVER = r"""
import json, os, random, signal, sys, time
sys.path.insert(0, os.getcwd())
import numpy, scipy.special, scipy.stats, torch, pyro, pyro.distributions, pyro.infer, pyro.poutine, tqdm, pytest
assert not any(m == "pyrodiff" or m.startswith("pyrodiff.") for m in sys.modules)
current = None


def _stop(signum, frame):
    if current is not None:
        try:
            os.killpg(current, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(1)


signal.signal(signal.SIGTERM, _stop)
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.setsid()
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        random.seed()
        numpy.random.seed(int.from_bytes(os.urandom(4), "little"))
        class NoShrink:  # a failing example ends the run: shrinking it only costs time
            @staticmethod
            def pytest_sessionstart(session):
                from hypothesis import Phase, settings
                settings.register_profile("planted", parent=settings.default, phases=[Phase.explicit, Phase.generate])
                settings.load_profile("planted")
        try:
            rc = int(pytest.main(req["args"], plugins=[NoShrink()]))
        except BaseException as e:
            print(f"planted_changes: pytest.main raised {e!r}", flush=True)
            rc = 99
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    current = pid
    deadline = time.monotonic() + req["timeout"]
    rc = None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            break
        time.sleep(0.02)
    current = None
    print(json.dumps({"rc": rc}), flush=True)
"""


def _first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" - ")[0][:200]
    for line in output.splitlines():
        if "Error" in line and ("pyrodiff" in line or line.startswith("E ")):
            return line.strip()[:200]
    return ""


def pytest_args(test_files: list[str], hypothesis_seed: int | None) -> list[str]:
    args = ["-x", "-q", "-p", "no:cacheprovider", "--no-header", "-rfE", "--tb=line"]
    if hypothesis_seed is not None:
        args.append(f"--hypothesis-seed={hypothesis_seed}")
    return args + test_files


def check_copy(runner: Runner, copy_dir: Path, module: str, test_files: list[str]) -> float:
    """The copy's package is imported, a planted syntax error is caught, and the unchanged copy passes.
    Returns the unchanged run's duration in seconds."""
    probe = subprocess.run(
        [sys.executable, "-c", "import pyrodiff; print(pyrodiff.__file__)"],
        cwd=copy_dir,
        env=_env(copy_dir),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if Path(probe).resolve() != (copy_dir / "pyrodiff" / "__init__.py").resolve():
        raise RuntimeError(f"the copy does not shadow the installed package: pyrodiff is {probe}")
    target = copy_dir / module
    original = target.read_text()
    try:
        target.write_text(original + "\n)planted syntax error(\n")
        rc, out = runner.run(pytest_args(test_files[:1], 0), timeout=300)
        if rc in (0, None) or str(copy_dir) not in out:
            raise RuntimeError(
                f"a planted syntax error in the copy's {module} was not caught (rc {rc}):\n{out[-3000:]}"
            )
    finally:
        target.write_text(original)
    start = time.monotonic()
    rc, out = runner.run(pytest_args(test_files, None), timeout=1800)
    seconds = time.monotonic() - start
    if rc != 0:
        raise RuntimeError(f"the unchanged copy fails its tests (rc {rc}):\n{out[-5000:]}")
    return seconds


def run_module(module: str, args) -> dict:
    tests = args.tests if args.tests else DEFAULT_TESTS.get(module, [])
    with tempfile.TemporaryDirectory(prefix="planted-") as tmp:
        copy_dir = Path(tmp)
        make_copy(copy_dir)
        if tests == ["all"]:
            tests = ["tests"]
        missing = [t for t in tests if not (copy_dir / t.split("::")[0]).exists()]
        tests = [t for t in tests if (copy_dir / t.split("::")[0]).exists()]
        if missing:
            print(f"[{module}] not in the copy, skipped: {', '.join(missing)}", flush=True)
        if not tests:
            raise SystemExit(f"no test files for {module}: pass --tests")
        source = (copy_dir / module).read_text()
        mutants = enumerate_mutants(module, source)
        if args.only:
            wanted = {int(i) for i in args.only.split(",")}
            mutants = [m for m in mutants if m.id in wanted]
        if args.limit:
            mutants = mutants[: args.limit]
        if args.list:
            for m in mutants:
                print(f"{m.id:4d} L{m.line:<4d} {m.kind:10s} {m.change}")
            return {"module": module, "mutants": [_public(m) for m in mutants]}
        runner = Runner(copy_dir, args.runner)
        runner.start()
        started = time.monotonic()
        try:
            baseline = check_copy(runner, copy_dir, module, tests)
            timeout = args.timeout or max(60.0, 3 * baseline + 30)
            print(
                f"[{module}] {len(mutants)} mutants; tests {' '.join(tests)}; unchanged run {baseline:.1f}s, "
                f"timeout {timeout:.0f}s",
                flush=True,
            )
            target = copy_dir / module
            rng = random.Random(args.seed)
            for m in mutants:
                seed = None if args.hypothesis_seed == "random" else rng.randrange(2**31)
                if args.hypothesis_seed not in ("random", "per-mutant"):
                    seed = int(args.hypothesis_seed)
                target.write_text(m.text)
                t0 = time.monotonic()
                try:
                    rc, out = runner.run(pytest_args(tests, seed), timeout)
                finally:
                    target.write_text(source)
                m.seconds = round(time.monotonic() - t0, 2)
                m.status = "timeout" if rc is None else "survived" if rc == 0 else "killed"
                if rc == 5:
                    m.status = "error"  # no tests ran
                m.failed = _first_failure(out) if rc else ""
                if m.status == "survived" and m.equivalent:
                    m.status = "equivalent"
                flag = {"killed": ".", "timeout": "T", "survived": "S", "equivalent": "e", "error": "E"}[m.status]
                print(
                    f"  {flag} #{m.id:<4d} L{m.line:<4d} {m.kind:10s} {m.change[:90]}  ({m.seconds:.1f}s)",
                    flush=True,
                )
                if m.status == "error":
                    print(out[-2000:], flush=True)
        finally:
            runner.stop()
        total = time.monotonic() - started
    return {
        "module": module,
        "tests": tests,
        "seconds": round(total, 1),
        "baseline_seconds": round(baseline, 1),
        "mutants": [_public(m) for m in mutants],
    }


def _public(m: Mutant) -> dict:
    d = asdict(m)
    d.pop("text")
    return d


def markdown(result: dict) -> str:
    ms = result["mutants"]
    count = lambda s: sum(m["status"] == s for m in ms)  # noqa: E731
    lines = [
        f"# Planted changes in `{result['module']}`",
        "",
        f"Tests: {', '.join(f'`{t}`' for t in result.get('tests', []))}; harness time {result.get('seconds', 0)} s.",
        "",
        "| mutants | killed | timeout | equivalent | survived | error |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {len(ms)} | {count('killed')} | {count('timeout')} | {count('equivalent')} | {count('survived')} "
        f"| {count('error')} |",
        "",
    ]
    survivors = [m for m in ms if m["status"] in ("survived", "error")]
    if survivors:
        lines += ["## Survivors", "", "| id | line | function | change | code |", "| --- | --- | --- | --- | --- |"]
        lines += [
            f"| {m['id']} | {m['line']} | `{m['function']}` | {m['change']} | `{m['source_line'][:100]}` |"
            for m in survivors
        ]
        lines.append("")
    equivalents = [m for m in ms if m["status"] == "equivalent"]
    if equivalents:
        lines += ["## Equivalent", "", "| id | line | change | why |", "| --- | --- | --- | --- |"]
        lines += [f"| {m['id']} | {m['line']} | {m['change']} | {m['equivalent']} |" for m in equivalents]
        lines.append("")
    return "\n".join(lines)


def _terminate(signum, frame):
    raise KeyboardInterrupt  # runs the clean-ups: the module restored, the copy removed, the server ended


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--module",
        action="append",
        required=True,
        help="e.g. pyrodiff/chain/schedule.py; repeat, or 'all' (formula modules)",
    )
    p.add_argument(
        "--tests",
        nargs="+",
        help="test files or pytest node ids (FILE::TEST), run in the order given, fast ones first (the run stops at\n"
        "the first failure); default: the module's mapping; 'all' for tests/",
    )
    p.add_argument("--limit", type=int, help="plant at most this many changes")
    p.add_argument("--only", help="comma-separated mutant ids (from --list) to plant")
    p.add_argument("--list", action="store_true", help="only list the changes")
    p.add_argument("--jobs", type=int, default=1, help="parallel runs (only 1 is supported: the machine is shared)")
    p.add_argument("--timeout", type=float, help="seconds per mutant (default: 3 x the unchanged run + 30)")
    p.add_argument("--runner", choices=("fork", "subprocess"), default="fork")
    p.add_argument(
        "--operators",
        choices=("basic", "extended"),
        default="basic",
        help="basic: the changes listed above; extended: every arithmetic operator to the others, comparisons\n"
        "reversed, ints also to n - 1 and 0, floats also to c / 2, -c and 0",
    )
    p.add_argument(
        "--hypothesis-seed",
        default="per-mutant",
        help="'per-mutant' (reproducible, derived from --seed), 'random', or an integer",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the per-mutant hypothesis seeds")
    p.add_argument(
        "--out",
        default=str(Path(tempfile.gettempdir()) / "pyrodiff-planted-changes"),
        help="folder for <module>.json and <module>.md (default: %(default)s)",
    )
    args = p.parse_args(argv)
    global EXTENDED
    EXTENDED = args.operators == "extended"
    if args.jobs != 1:
        p.error("--jobs: only 1 is supported")
    modules = [m for spec in args.module for m in (FORMULA_MODULES if spec == "all" else [spec])]
    out = Path(args.out)
    survived = 0
    for module in modules:
        result = run_module(module, args)
        if args.list:
            continue
        out.mkdir(parents=True, exist_ok=True)
        stem = Path(module).stem
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        report = markdown(result)
        (out / f"{stem}.md").write_text(report)
        print(report, flush=True)
        survived += sum(m["status"] in ("survived", "error") for m in result["mutants"])
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
