"""The argument checks of :mod:`pyrodiff.checks`: what each accepts, what it refuses, with which exception,
and that the one-line message names the argument, what was expected and what was given."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pyro
import pytest
import torch

from pyrodiff import DiffusionGuide, DiffusionModel, NoiseSchedule, bound_terms, checks, samplers
from pyrodiff.chain.decoders import parse_decoder
from pyrodiff.chain.parameterization import parse_target, parse_variance
from pyrodiff.checks import CheckError, CheckTypeError
from pyrodiff.testing import LinearDenoiser


def _refused(check, *args, **kwargs) -> CheckError:
    with pytest.raises(CheckError) as info:
        check(*args, **kwargs)
    assert "\n" not in str(info.value)
    return info.value


def test_integer_accepts_integers_at_or_above_the_minimum():
    assert checks.integer("n", 3, 3) == 3
    assert checks.integer("n", -7) == -7
    assert checks.positive_int("n", 1) == 1
    assert checks.int_in("t", 0, 0, 5) == 0 and checks.int_in("t", 5, 0, 5) == 5


@pytest.mark.parametrize("value", [True, False, 2.0, 2.5, "2", None, torch.tensor(2), np.float64(2.0)])
def test_integer_checks_refuse_other_types_as_type_errors(value):
    for check, args in [
        (checks.integer, ("n", value)),
        (checks.positive_int, ("n", value)),
        (checks.int_in, ("n", value, 0, 5)),
    ]:
        e = _refused(check, *args)
        assert isinstance(e, TypeError) and isinstance(e, ValueError)
        assert e.value is value


def test_integer_checks_refuse_values_out_of_range_as_value_errors():
    for check, args in [
        (checks.integer, ("n", 2, 3)),
        (checks.positive_int, ("n", 0)),
        (checks.positive_int, ("n", -1)),
        (checks.int_in, ("t", -1, 0, 5)),
        (checks.int_in, ("t", 6, 0, 5)),
    ]:
        e = _refused(check, *args)
        assert not isinstance(e, TypeError)


def test_messages_name_the_argument_what_was_expected_and_what_was_given():
    assert str(_refused(checks.positive_int, "num_samples", 0)) == "num_samples must be an integer >= 1, got 0"
    assert str(_refused(checks.integer, "levels", True, 2)) == "levels must be an integer >= 2, got True"
    assert str(_refused(checks.integer, "seed", "3")) == "seed must be an integer, got '3'"
    e = _refused(checks.int_in, "count", 6, 1, 5, hi_name="T")
    assert str(e) == "count must be an integer in 1..T = 1..5, got 6"
    assert (e.name, e.expected, e.value) == ("count", "an integer in 1..T = 1..5", 6)
    assert str(_refused(checks.int_in, "t", 2.0, 0, 5)) == "t must be an integer in 0..5, got 2.0"


def test_a_long_value_is_shown_on_one_short_line():
    e = _refused(checks.positive_int, "batch_size", torch.zeros(50, 50))
    assert len(str(e)) < 120 and str(e).startswith("batch_size must be an integer >= 1, got tensor(")


def test_number_accepts_finite_numbers_in_its_interval_as_floats():
    assert checks.number("x", 3) == 3.0 and type(checks.number("x", 3)) is float
    assert checks.number("x", np.float64(-2.5)) == -2.5
    assert checks.number("lr", 0.1, lo=0, lo_open=True) == 0.1
    assert checks.number("decay", 0, lo=0, hi=1, hi_open=True) == 0.0
    assert checks.number("x", 1, hi=1) == 1.0
    assert checks.probability("eta", 0) == 0.0 and checks.probability("eta", 1) == 1.0


@pytest.mark.parametrize("value", [True, "0.5", None, torch.tensor(0.5), 1j])
def test_number_refuses_other_types_as_type_errors(value):
    for e in (_refused(checks.number, "x", value), _refused(checks.probability, "x", value)):
        assert isinstance(e, TypeError)


@pytest.mark.parametrize(
    ("kwargs", "value", "message"),
    [
        ({}, math.inf, "x must be a finite number, got inf"),
        ({}, math.nan, "x must be a finite number, got nan"),
        ({"lo": 0, "lo_open": True}, 0, "x must be a finite number > 0, got 0"),
        ({"lo": 0}, -0.5, "x must be a finite number >= 0, got -0.5"),
        ({"hi": 1, "hi_open": True}, 1.0, "x must be a finite number < 1, got 1.0"),
        ({"hi": 1}, 1.5, "x must be a finite number <= 1, got 1.5"),
        ({"lo": 0, "hi": 1, "hi_open": True}, 1, "x must be a number in [0, 1), got 1"),
        ({"lo": 0, "hi": 1, "lo_open": True}, 0, "x must be a number in (0, 1], got 0"),
        ({"lo": 0, "hi": 1}, math.nan, "x must be a number in [0, 1], got nan"),
    ],
)
def test_number_refuses_values_outside_its_interval(kwargs, value, message):
    e = _refused(checks.number, "x", value, **kwargs)
    assert str(e) == message and not isinstance(e, TypeError)


def test_number_may_allow_the_infinities_but_never_nan():
    assert checks.number("seconds", math.inf, 0, lo_open=True, finite=False) == math.inf
    assert checks.number("x", -math.inf, finite=False) == -math.inf
    e = _refused(checks.number, "seconds", math.nan, 0, lo_open=True, finite=False)
    assert str(e) == "seconds must be a number > 0, got nan"
    assert (
        str(_refused(checks.number, "seconds", -math.inf, 0, finite=False)) == "seconds must be a number >= 0, got -inf"
    )
    assert isinstance(_refused(checks.number, "seconds", "60", finite=False), TypeError)
    assert str(_refused(checks.number, "x", math.nan, finite=False)) == "x must be a number, got nan"


def test_probability_is_a_number_in_the_closed_unit_interval():
    assert str(_refused(checks.probability, "eta", 1.5)) == "eta must be a number in [0, 1], got 1.5"
    assert str(_refused(checks.probability, "eta", -1e-9)) == "eta must be a number in [0, 1], got -1e-09"


def test_one_of_compares_types_too():
    assert checks.one_of("amp", "bf16", (False, "bf16")) == "bf16"
    assert checks.one_of("amp", False, (False, "bf16")) is False
    assert str(_refused(checks.one_of, "amp", 0, (False, "bf16"))) == "amp must be one of False, 'bf16', got 0"
    assert str(_refused(checks.one_of, "flag", 1, (True,))) == "flag must be one of True, got 1"
    e = _refused(checks.one_of, "amp", "fp16", (False, "bf16"), show=lambda o: str(o).lower())
    assert e.expected == "one of false, bf16"


def test_the_predicates():
    assert checks.is_integer(0) and checks.is_integer(-3)
    assert not any(map(checks.is_integer, [True, 1.0, "1", torch.tensor(1), None]))
    assert checks.is_number(0) and checks.is_number(0.5) and checks.is_number(np.float64(1))
    assert not any(map(checks.is_number, [False, "1", torch.tensor(1.0), None, 1j]))


def test_a_check_error_survives_pickling():
    """Errors cross process boundaries (the distributed training's workers): they must pickle whole."""
    e = pickle.loads(pickle.dumps(CheckTypeError.refuse("n", "an integer", 2.5)))
    assert type(e) is CheckTypeError and str(e) == "n must be an integer, got 2.5"
    assert (e.name, e.expected, e.value) == ("n", "an integer", 2.5)


def test_a_check_error_raised_inside_a_pyro_model_passes_through_its_trace():
    """Pyro's trace rebuilds a ValueError from its message alone (adding the sites' shapes): it must still be
    the check's error, with the check's message."""

    def model():
        pyro.sample("x", pyro.distributions.Normal(0.0, 1.0))
        checks.positive_int("num_samples", 0)

    with pytest.raises(CheckError, match="^num_samples must be an integer >= 1, got 0\n"):
        pyro.poutine.trace(model).get_trace()


def _tiny_model() -> DiffusionModel:
    return DiffusionModel(LinearDenoiser(4), NoiseSchedule.linear(4, 0.05, 0.3), data_shape=(3,))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: parse_target("eps"), "prediction must be one of 'epsilon', 'x0', 'v', got 'eps'"),
        (lambda: parse_variance(1), "variance must be one of 'small', 'large', 'learned', got 1"),
        (lambda: parse_decoder(None), "decoder must be one of 'gaussian', 'discretized', got None"),
        (
            lambda: DiffusionGuide(NoiseSchedule.linear(4), order="backward"),
            "order must be one of 'posterior', 'forward', got 'backward'",
        ),
        (lambda: samplers.ancestral(_tiny_model(), 2, last="all"), "last must be one of 'sample', 'mean', 'none'"),
        (
            lambda: bound_terms(_tiny_model(), torch.zeros(2, 3), draws="joint"),
            "draws must be one of 'trajectory', 'independent', got 'joint'",
        ),
        (lambda: samplers.ancestral(_tiny_model(), True), "the number of samples must be an integer >= 1, got True"),
    ],
)
def test_the_package_refuses_bad_choices_through_these_checks(call, message):
    """A sample of the package's entry points: each refusal is a CheckError with the checks' wording."""
    with pytest.raises(CheckError) as info:
        call()
    assert str(info.value).startswith(message)
