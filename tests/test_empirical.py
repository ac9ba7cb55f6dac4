"""EmpiricalReverse: the exact reverse process of a finite data set, on data sets where the answer is known."""

import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine

from pyrodiff import DiffusionGuide, NoiseSchedule, bound_terms, samplers
from pyrodiff.chain.forward import q_marginal
from pyrodiff.chain.gaussian import normal_log_prob
from pyrodiff.chain.traces import trace_terms
from pyrodiff.theory.empirical import EmpiricalReverse


def _steep_schedule(T: int = 8) -> NoiseSchedule:
    """A short schedule whose last variable has forgotten the data (abar_T ~ 1e-12), so that the prior
    N(0, I) is the true q(x_T) to about 1e-6 and the exact reverse process reproduces the data."""
    betas = torch.cat([torch.tensor([1e-3, 1e-2, 0.1]), torch.full((T - 3,), 0.99)]).double()
    return NoiseSchedule.from_betas(betas)


def _grid_points(n: int, d: int, levels: int, seed: int) -> torch.Tensor:
    """n distinct points of dimension d on the grid of ``levels`` values in [-1, 1]."""
    rng = np.random.default_rng(seed)
    idx = set()
    while len(idx) < n:
        idx.add(tuple(rng.integers(0, levels, d)))
    return torch.tensor(sorted(idx), dtype=torch.float64) * 2 / (levels - 1) - 1


def test_one_training_point_is_returned_exactly(float64):
    point = torch.tensor([[0.25, -0.5, 1.0]])
    model = EmpiricalReverse(point, _steep_schedule(), "discretized", levels=9)
    g = torch.Generator().manual_seed(0)
    x = samplers.ancestral(model, 200, generator=g, last="sample")
    assert torch.equal(x, point.expand(200, -1))
    mean = samplers.ancestral(model, 5, generator=g, last="mean")
    assert torch.allclose(mean, point.expand(5, -1), atol=1e-12, rtol=0)


def test_weights_and_prediction_are_bayes_rule(float64):
    """w_i(x_t) = q(x_0^i | x_t) and x0_hat = sum_i w_i x_0^i, from Gaussian densities written out here."""
    schedule = NoiseSchedule.linear(20, 1e-3, 0.2)
    data = torch.tensor([[0.0, 1.0], [1.0, -1.0], [-0.5, 0.5]])
    model = EmpiricalReverse(data, schedule)
    g = torch.Generator().manual_seed(1)
    xt = torch.randn(6, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, 5, 10, 19, 20])
    abar = schedule.alphas_cumprod[t - 1].numpy()[:, None, None]
    x, d = xt.numpy()[:, None, :], data.numpy()[None]
    log_lik = -((x - np.sqrt(abar) * d) ** 2).sum(-1) / (2 * (1 - abar[..., 0]))
    w = np.exp(log_lik - log_lik.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    step = model.predict(xt, t)
    np.testing.assert_allclose(step.x0.numpy(), w @ data.numpy(), rtol=1e-10, atol=1e-12)
    # the step's mean is the posterior mean at each point, averaged with the same weights
    P = schedule.posterior_mean_coef_x0[t - 1].numpy()[:, None]
    Q = schedule.posterior_mean_coef_xt[t - 1].numpy()[:, None]
    expected = P * (w @ data.numpy()) + Q * xt.numpy()
    np.testing.assert_allclose(step.mean.numpy()[1:], expected[1:], rtol=1e-10, atol=1e-12)


def test_samples_are_training_points_in_equal_shares(float64):
    data = _grid_points(5, 2, levels=9, seed=0)
    model = EmpiricalReverse(data, _steep_schedule(), "discretized", levels=9)
    n = 4000
    x = samplers.ancestral(model, n, generator=torch.Generator().manual_seed(2), last="sample")
    match = (x[:, None, :] == data[None]).all(-1)
    assert match.any(1).all(), "every sample is a training point"
    share = match.double().mean(0)
    # multinomial counts: each share has standard error sqrt(p (1 - p) / n)
    se = math.sqrt(0.2 * 0.8 / n)
    assert (share - 0.2).abs().max() < 4.5 * se


def test_bound_on_training_points_is_log_n(float64):
    """With p(x_T) = q(x_T), the exact reverse process gives p(x_0^i) = 1/N and p(x_{1:T} | x_0^i) =
    q(x_{1:T} | x_0^i), so -ELBO(x_0^i) = log N exactly (up to the decoder's mass outside the bin, < 1e-15
    here, and the prior's mismatch, ~1e-6): the Monte Carlo KL terms must average to it."""
    data = _grid_points(6, 3, levels=9, seed=3)
    model = EmpiricalReverse(data, _steep_schedule(), "discretized", levels=9)
    torch.manual_seed(0)
    terms = bound_terms(model, data, num_samples=400)
    total = terms.total.mean().item()
    se = terms.total.std().item() / math.sqrt(terms.total.numel())
    assert abs(total - math.log(6)) < 4.5 * se + 1e-4, (total, se)
    assert se < 0.05  # the test has power: a misweighted mixture moves the total by more than this


def test_a_new_point_gets_an_enormous_bound(float64):
    """A grid point outside the data: its decoder term is at least -log of the largest bin mass any training
    point's decoder gives it (the mixture's mass is a weighted average of those)."""
    levels = 9
    data = _grid_points(6, 3, levels, seed=4)
    new = torch.tensor([[1.0, 1.0, 1.0]])
    assert not (data == new).all(1).any()
    model = EmpiricalReverse(data, _steep_schedule(), "discretized", levels=levels)
    terms = bound_terms(model, new, num_samples=20)
    sigma = model.decoder_variance_at_one().sqrt()
    half = 1 / (levels - 1)
    distance = (data - new).abs()
    # a bin |delta| away from the point's level has mass <= Phi(-(|delta| - half) / sigma); its own bin <= 1
    log_mass = torch.where(distance > 0, torch.special.log_ndtr(-(distance - half) / sigma), 0.0).sum(-1)
    assert terms.nats[..., 0].min() >= -log_mass.max() - 1e-9
    assert terms.total.mean() > 100


def test_the_pyro_program_scores_the_same_bound(float64):
    """Trace_ELBO on (EmpiricalReverse, DiffusionGuide) and bound_terms estimate the same expectation."""
    data = _grid_points(4, 2, levels=9, seed=5)
    model = EmpiricalReverse(data, _steep_schedule(), "discretized", levels=9)
    guide = DiffusionGuide(model.schedule)
    x = data.repeat(100, 1)
    pyro.set_rng_seed(0)
    tr_g = poutine.trace(guide).get_trace(x)
    tr_m = poutine.trace(poutine.replay(model, tr_g)).get_trace(x)
    per_example = trace_terms(tr_m, tr_g).sum(-1)
    se = per_example.std().item() / math.sqrt(per_example.numel())
    assert abs(per_example.mean().item() - math.log(4)) < 4.5 * se + 1e-4
    # TraceMeanField_ELBO falls back to the log-density ratio (the steps have no closed-form KL)
    loss = pyro.infer.TraceMeanField_ELBO().loss(model, guide, data)
    assert math.isfinite(loss)


def test_continuous_decoder_density_around_each_point(float64):
    """At t = 1 the decoder is sum_i w_i(x_1) N(x_0; x_0^i, sigma_1^2): checked against the formula."""
    data = torch.tensor([[0.0, 0.5], [0.3, -0.2]])
    model = EmpiricalReverse(data, NoiseSchedule.linear(10, 1e-3, 0.2))
    x1 = torch.tensor([[0.1, 0.35], [0.2, 0.0]])  # nearer the first point, then the second
    x0 = torch.tensor([[0.31, -0.18], [0.02, 0.48]])  # each near the other point: its weight matters
    step = model.predict(x1, torch.ones(2, dtype=torch.long))
    lp = step.decoder(model.decoder, 1).log_prob(x0)
    var = model.decoder_variance_at_one()
    m, v = q_marginal(model.schedule, data, torch.ones(2, dtype=torch.long))
    log_w = normal_log_prob(x1[:, None], m[None], v[None], 1)
    log_w = log_w - log_w.logsumexp(1, keepdim=True)
    expected = (log_w + normal_log_prob(x0[:, None], data[None], var, 1)).logsumexp(1)
    assert torch.allclose(lp, expected, rtol=1e-12)


def test_bad_input():
    schedule = NoiseSchedule.linear(10)
    with pytest.raises(ValueError, match="non-empty"):
        EmpiricalReverse(torch.zeros(0, 2), schedule)
    with pytest.raises(TypeError, match="tensor"):
        EmpiricalReverse([[0.0, 1.0]], schedule)
    with pytest.raises(TypeError, match="floating"):
        EmpiricalReverse(torch.zeros(3, 2, dtype=torch.long), schedule)
    with pytest.raises(ValueError, match="grid"):
        EmpiricalReverse(torch.tensor([[0.1, 0.2]]), schedule, "discretized", levels=9)
    with pytest.raises(ValueError, match="NaN"):
        EmpiricalReverse(torch.tensor([[float("nan"), 0.2]]), schedule)
    model = EmpiricalReverse(torch.zeros(3, 2), schedule)
    with pytest.raises(ValueError, match="data shape"):
        bound_terms(model, torch.zeros(2, 3))


def test_marginal_log_prob_counts_the_training_points(float64):
    """Grid data: p(x_0) is the fraction of training points equal to x_0 (a duplicate counts twice); continuous
    data: a kernel density estimate of bandwidth sigma_1, written out here with scipy."""
    from scipy.stats import multivariate_normal

    points = _grid_points(5, 3, levels=9, seed=6)
    data = torch.cat([points, points[:1]])  # six points, the first twice
    model = EmpiricalReverse(data, _steep_schedule(), "discretized", levels=9)
    lp = model.marginal_log_prob(points)
    assert torch.allclose(lp, torch.tensor([math.log(2 / 6)] + [math.log(1 / 6)] * 4, dtype=torch.float64), atol=1e-3)
    # exactly: (1/N) sum_j prod_d [Phi((x_d + h - x^j_d) / s) - Phi((x_d - h - x^j_d) / s)], open at -1 and 1
    from scipy.stats import norm

    s, h = math.sqrt(model.decoder_variance_at_one().item()), 1 / 8
    x, d = points.numpy()[:, None, :], data.numpy()[None]
    upper = np.where(x > 1 - h / 2, 1.0, norm.cdf((x + h - d) / s))
    lower = np.where(x < -1 + h / 2, 0.0, norm.cdf((x - h - d) / s))
    assert np.allclose(lp.numpy(), np.log((upper - lower).prod(-1).mean(1)), rtol=1e-9)

    data = torch.tensor([[0.0, 0.5], [0.3, -0.2], [0.31, -0.19]])
    model = EmpiricalReverse(data, NoiseSchedule.linear(10, 1e-3, 0.2))
    x0 = torch.tensor([[0.3, -0.2], [0.0, 0.49], [1.0, 1.0]])
    var = model.decoder_variance_at_one().item()
    kde = [np.mean([multivariate_normal(d, var * np.eye(2)).pdf(x) for d in data.numpy()]) for x in x0.numpy()]
    assert np.allclose(model.marginal_log_prob(x0).numpy(), np.log(kde), rtol=1e-10)
