"""Every ELBO estimator against the exact ELBO of a model whose network is linear in x_t.

The exact value comes from :func:`pyrodiff.testing.linear_elbo_terms` (Gaussian moments, derived
independently of the Pyro program).  Each Monte Carlo mean must lie within 4 standard errors of it;
the draws are seeded, so the tests are deterministic.
"""

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyrodiff import DiffusionGuide, NoiseSchedule
from pyrodiff.testing import linear_case
from pyrodiff.theory.unrolled import loop_guide, loop_model

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
    """The oracle against brute force written here in numpy: forward paths drawn by the recursion
    x_t = sqrt(alpha_t) x_(t-1) + sqrt(beta_t) z, scored by Gaussian densities, log p(x_(0:T)) - log q(x_(1:T) | x_0),
    with the reverse means and variances from the model's network call."""
    model, x0, exact = _setup("x0", "large")
    beta = SCHEDULE.betas.numpy()
    rng = np.random.default_rng(15)
    x = x0.numpy()
    n_paths = 100_000

    def log_normal(v, m, var):
        return (-0.5 * ((v - m) ** 2 / var + np.log(2 * np.pi * var))).sum(-1)

    path, log_q = [np.repeat(x[None], n_paths, 0)], 0.0
    for t in range(1, T + 1):  # q(x_t | x_(t-1))
        mean = np.sqrt(1 - beta[t - 1]) * path[-1]
        path.append(mean + np.sqrt(beta[t - 1]) * rng.standard_normal(mean.shape))
        log_q = log_q + log_normal(path[-1], mean, beta[t - 1])
    log_p = log_normal(path[T], 0.0, 1.0)  # p(x_T)
    for t in range(T, 0, -1):  # p(x_(t-1) | x_t), the decoder at t = 1
        xt = torch.from_numpy(path[t].reshape(-1, x.shape[-1]))
        mean, var, _ = model.predict(xt, torch.full((xt.shape[0],), t))
        mean, var = (v.expand_as(xt).detach().numpy().reshape(path[t].shape) for v in (mean, var))
        log_p = log_p + log_normal(path[t - 1], mean, var)
    elbo = (log_p - log_q).sum(-1)  # summed over the 3 examples
    stderr = elbo.std(ddof=1) / np.sqrt(n_paths)
    assert abs(-elbo.mean() - exact) < 4 * stderr, (-elbo.mean(), exact, stderr)
