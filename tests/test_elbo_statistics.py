"""Every ELBO estimator against the exact ELBO of a model whose network is linear in x_t.

The exact value comes from :func:`pyrodiff.testing.linear_elbo_terms` (Gaussian moments, derived
independently of the Pyro program).  Each Monte Carlo mean must lie within 4 standard errors of it;
the draws are seeded, so the tests are deterministic.
"""

import numpy as np
import pyro
import pytest
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyrodiff import DiffusionGuide, NoiseSchedule
from pyrodiff.loop import loop_guide, loop_model
from pyrodiff.testing import linear_case

T = 6
NUM_DRAWS = 300
SCHEDULE = NoiseSchedule.linear(T, 0.05, 0.4)


def _setup(prediction, variance, decoder="gaussian"):
    model, x0, exact = linear_case(SCHEDULE, prediction, variance, decoder, shape=(3, 2), seed=7)
    return model, x0, exact.sum()


def _assert_agrees(losses, exact):
    losses = np.asarray(losses)
    stderr = losses.std(ddof=1) / np.sqrt(len(losses))
    assert abs(losses.mean() - exact) < 4 * stderr, (losses.mean(), exact, stderr)


CASES = [(p, v) for p in ("epsilon", "x0", "v") for v in ("small", "large")] + [
    ("epsilon", "learned"),
    ("v", "learned"),
]


@pytest.mark.parametrize("prediction, variance", CASES)
@pytest.mark.parametrize("estimator", [Trace_ELBO, TraceMeanField_ELBO])
@pytest.mark.parametrize("subsample_steps", [None, 1, 4])
def test_estimators_are_unbiased(prediction, variance, estimator, subsample_steps, float64):
    model, x0, exact = _setup(prediction, variance)
    guide = DiffusionGuide(SCHEDULE)
    pyro.set_rng_seed(11)
    elbo = estimator()
    _assert_agrees([elbo.loss(model, guide, x0, subsample_steps) for _ in range(NUM_DRAWS)], exact)


@pytest.mark.parametrize("estimator", [Trace_ELBO, TraceMeanField_ELBO])
@pytest.mark.parametrize("subsample_steps", [None, 2])
def test_discretized_decoder(estimator, subsample_steps, float64):
    model, x0, exact = _setup("epsilon", "small", "discretized")
    pyro.set_rng_seed(12)
    guide = DiffusionGuide(SCHEDULE)
    _assert_agrees([estimator().loss(model, guide, x0, subsample_steps) for _ in range(NUM_DRAWS)], exact)


@pytest.mark.parametrize("subsample_steps", [None, 2])
def test_forward_order_with_trace_elbo(subsample_steps, float64):
    model, x0, exact = _setup("v", "small")
    pyro.set_rng_seed(13)
    guide = DiffusionGuide(SCHEDULE, order="forward")
    _assert_agrees([Trace_ELBO().loss(model, guide, x0, subsample_steps) for _ in range(NUM_DRAWS)], exact)


@pytest.mark.parametrize("order, variance", [("posterior", "large"), ("forward", "learned")])
def test_loop_version_is_unbiased(order, variance, float64):
    model, x0, exact = _setup("epsilon", variance)
    guide = DiffusionGuide(SCHEDULE, order=order)
    pyro.set_rng_seed(14)
    losses = [
        Trace_ELBO().loss(lambda x: loop_model(model, x), lambda x: loop_guide(guide, x), x0) for _ in range(NUM_DRAWS)
    ]
    _assert_agrees(losses, exact)


def test_exact_elbo_oracle_is_itself_right(float64):
    """The oracle against brute force: the per-step analytic KLs along many forward paths."""
    model, x0, exact = _setup("x0", "large")
    guide = DiffusionGuide(SCHEDULE)
    pyro.set_rng_seed(15)
    x0_many = x0.repeat(20, 1)
    _assert_agrees([TraceMeanField_ELBO().loss(model, guide, x0_many) / 20 for _ in range(100)], exact)
