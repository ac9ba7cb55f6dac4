"""Gaussian-mixture data, its exact reverse process and the moment-matched bound (pyrodiff.theory.mixture).

Every closed form is held to an independent derivation in float64 numpy: Bayes' rule on a fine grid (1-D and
2-D), explicit (B, K, D) sums, the marginal variance by its recursion P_t = alpha_t P_{t-1} + beta_t, the
conditioning of the joint Gaussian of (x_{t-1}, x_t); every estimator to its exact or quadrature value within
4.5 standard errors (seeded).
"""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.special import logsumexp

from pyrodiff import NoiseSchedule
from pyrodiff.chain.forward import q_posterior
from pyrodiff.chain.gaussian import normal_log_prob
from pyrodiff.data import GAUSSIANS8_ENTROPY
from pyrodiff.testing import schedules
from pyrodiff.theory import mixture as mixture_module
from pyrodiff.theory.mixture import IsotropicGaussianMixture, moment_matched_bound, reverse_coefficients

Z = 4.5  # standard errors allowed to a seeded Monte Carlo estimate


# ---------------------------------------------------------------------- independent derivations (numpy, float64)
def _chain(schedule, t):
    """(alpha_t, beta_t, abar_t, abar_{t-1}) by an explicit product over the betas."""
    beta = schedule.betas.numpy()
    abar_prev = float(np.prod(1 - beta[: t - 1]))
    return 1 - beta[t - 1], beta[t - 1], abar_prev * (1 - beta[t - 1]), abar_prev


def _marginal_variances(schedule, s2):
    """P_0 = s^2 and the recursion P_t = alpha_t P_{t-1} + beta_t (the variance of x_t within a component)."""
    P = [s2]
    for b in schedule.betas.numpy():
        P.append((1 - b) * P[-1] + b)
    return np.array(P)


def _log_normal(x, m, v):
    return -0.5 * ((x - m) ** 2 / v + np.log(2 * np.pi * v))


def _log_mixture_1d(y, means, s2_at, scale, weights):
    """log sum_j pi_j N(y; scale mu_j, s2_at) for a grid y (1-D data)."""
    comp = _log_normal(y[:, None], scale * means[None, :], s2_at) + np.log(weights)[None, :]
    mx = comp.max(1, keepdims=True)
    return (mx + np.log(np.exp(comp - mx).sum(1, keepdims=True)))[:, 0]


def _bayes_grid_1d(schedule, t, means, s2, weights, x_t, num=6001):
    """q(x_{t-1} | x_t) on a grid, by Bayes: q(x_t | x_{t-1}) q(x_{t-1}) normalised numerically (trapezoid)."""
    alpha, beta, abar, abar_prev = _chain(schedule, t)
    P_prev = _marginal_variances(schedule, s2)[t - 1]
    # the grid covers every component's posterior (a Gaussian product) by 12 of its standard deviations
    prec = alpha / beta + 1 / P_prev
    centres = (np.sqrt(alpha) * x_t / beta + np.sqrt(abar_prev) * means / P_prev) / prec
    sd = 1 / np.sqrt(prec)
    y = np.linspace(centres.min() - 12 * sd, centres.max() + 12 * sd, num)
    log_joint = _log_normal(x_t, np.sqrt(alpha) * y, beta) + _log_mixture_1d(
        y, means, P_prev, np.sqrt(abar_prev), weights
    )
    density = np.exp(log_joint - log_joint.max())
    log_z = np.log(np.trapezoid(density, y)) + log_joint.max()
    return y, log_joint - log_z


def _law(means, s2=0.0, weights=None):
    w = None if weights is None else torch.as_tensor(np.asarray(weights), dtype=torch.float64)
    return IsotropicGaussianMixture(torch.as_tensor(np.asarray(means), dtype=torch.float64), s2, w)


def _gaussians8(dtype=torch.float64):
    angles = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
    return IsotropicGaussianMixture(2 * torch.stack([angles.cos(), angles.sin()], 1).to(dtype), 0.01)


mixtures_1d = st.tuples(
    arrays(np.float64, st.integers(1, 4), elements=st.floats(-2, 2)),
    st.floats(0.01, 1.0),
    st.floats(-2.5, 2.5),
)


# ---------------------------------------------------------------------- the coefficients
@given(schedules(), st.floats(0.0, 2.0))
def test_reverse_coefficients_are_the_conditioning_of_the_joint_gaussian(schedule, s2):
    """Within a component, Var x_{t-1} = P_{t-1}, Var x_t = P_t (recursion), Cov = sqrt(alpha_t) P_{t-1}: regression
    gives b_t = Cov / P_t, v_t = P_{t-1} - Cov^2 / P_t and a_t = sqrt(abar_{t-1}) - b_t sqrt(abar_t)."""
    c = reverse_coefficients(schedule, s2)
    P = _marginal_variances(schedule, s2)
    alpha = 1 - schedule.betas.numpy()
    abar = np.cumprod(alpha)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    cov = np.sqrt(alpha) * P[:-1]
    b = cov / P[1:]
    assert np.allclose(c.marginal_variance.numpy(), P[1:], rtol=1e-12, atol=0)
    assert np.allclose(c.sqrt_alphas_cumprod.numpy(), np.sqrt(abar), rtol=1e-12, atol=0)
    assert np.allclose(c.coef_xt.numpy(), b, rtol=1e-9, atol=1e-15)
    assert np.allclose(c.coef_mu.numpy(), np.sqrt(abar_prev) - b * np.sqrt(abar), rtol=1e-8, atol=1e-13)
    assert np.allclose(c.variance.numpy(), P[:-1] - cov**2 / P[1:], rtol=1e-8, atol=1e-14)
    # x_0 given x_t within a component: regression of x_0 (variance s^2) on x_t (covariance sqrt(abar_t) s^2)
    slope = np.sqrt(abar) * s2 / P[1:]
    assert np.allclose(c.x0_coef_xt.numpy(), slope, rtol=1e-10, atol=1e-15)
    assert np.allclose(c.x0_coef_mu.numpy(), 1 - slope * np.sqrt(abar), rtol=1e-9, atol=1e-13)
    assert np.allclose(c.x0_variance.numpy(), s2 - slope**2 * P[1:], rtol=1e-8, atol=1e-13)


@given(schedules())
def test_points_have_the_forward_posterior_coefficients_exactly(schedule):
    c = reverse_coefficients(schedule, 0.0)
    assert torch.equal(c.coef_mu, schedule.posterior_mean_coef_x0)
    assert torch.equal(c.coef_xt, schedule.posterior_mean_coef_xt)
    assert torch.equal(c.variance, schedule.posterior_variance)
    assert c.variance[0] == 0


# ---------------------------------------------------------------------- the law
@given(
    st.integers(1, 5),
    st.sampled_from([(2,), (1, 2, 2)]),
    st.floats(0.01, 2.0),
    st.integers(0, 2**31 - 1),
)
def test_log_prob_is_the_explicit_sum_over_components(K, shape, s2, seed):
    g = np.random.default_rng(seed)
    means = g.normal(size=(K,) + shape) * 2
    weights = g.uniform(0.1, 1, K)
    x = g.normal(size=(6,) + shape) * 2
    law = _law(means, s2, weights)
    pi = weights / weights.sum()
    sq = ((x[:, None] - means[None]) ** 2).reshape(6, K, -1).sum(-1)
    D = int(np.prod(shape))
    comp = np.log(pi) - sq / (2 * s2) - 0.5 * D * np.log(2 * np.pi * s2)
    expected = logsumexp(comp, 1)
    got = law.log_prob(torch.tensor(x))
    assert got.dtype == torch.float64 and got.shape == (6,)
    assert np.allclose(got.numpy(), expected, rtol=1e-10, atol=1e-9)


@given(st.integers(1, 6), st.integers(1, 3), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_moments_are_the_explicit_sums(K, D, s2, seed):
    g = np.random.default_rng(seed)
    means, weights = g.normal(size=(K, D)), g.uniform(0, 1, K) + 1e-3
    law = _law(means, s2, weights)
    pi = weights / weights.sum()
    m = sum(pi[j] * means[j] for j in range(K))
    cov = s2 * np.eye(D) + sum(pi[j] * np.outer(means[j], means[j]) for j in range(K)) - np.outer(m, m)
    assert np.allclose(law.mean().numpy(), m, atol=1e-12)
    assert np.allclose(law.covariance().numpy(), cov, atol=1e-12)
    assert np.allclose(law.weights.numpy(), pi, atol=1e-15)


def test_a_component_of_weight_zero_is_allowed_and_absent():
    law = _law([[0.0, 0.0], [5.0, 5.0]], 0.2, [0.0, 2.0])
    alone = _law([[5.0, 5.0]], 0.2)
    x = torch.tensor([[4.0, 5.5], [0.1, 0.0]], dtype=torch.float64)
    assert torch.allclose(law.log_prob(x), alone.log_prob(x), rtol=1e-12)
    assert torch.equal(law.weights, torch.tensor([0.0, 1.0], dtype=torch.float64))
    n = 2000
    draws = law.sample(n, torch.Generator().manual_seed(0)).numpy()
    # no draw from the weightless component at (0, 0): every one is nearer (5, 5) (7.9 sd of a component apart)
    assert np.all(np.linalg.norm(draws - [5.0, 5.0], axis=1) < np.linalg.norm(draws, axis=1))
    assert np.all(np.abs(draws.mean(0) - [5.0, 5.0]) < Z * math.sqrt(0.2 / n))
    schedule = NoiseSchedule.from_betas([0.1, 0.2])
    assert torch.allclose(law.reverse(schedule, x, 2).mean, alone.reverse(schedule, x, 2).mean, rtol=1e-12)


def test_draws_follow_the_moments_and_the_weights():
    law = _law([[0.0, 0.0], [3.0, 1.0], [-2.0, 4.0]], 0.3, [0.2, 0.5, 0.3])
    n = 40000
    x = law.sample(n, torch.Generator().manual_seed(0)).numpy()
    m, cov = law.mean().numpy(), law.covariance().numpy()
    assert np.all(np.abs(x.mean(0) - m) < Z * x.std(0) / math.sqrt(n))
    products = (x - m)[:, :, None] * (x - m)[:, None, :]
    assert np.all(np.abs(products.mean(0) - cov) < Z * products.std(0) / math.sqrt(n))
    near_second = (np.linalg.norm(x - [3.0, 1.0], axis=1) < 1.8).mean()  # the second mode's basin (> 5 sd apart)
    assert abs(near_second - 0.5) < Z * math.sqrt(0.25 / n)


@given(mixtures_1d, st.integers(1, 6))
@settings(max_examples=20)
def test_marginal_is_the_numerical_convolution_with_the_forward_kernel(mixture, t):
    """q(x_t) = int q(x_t | x_0) q(x_0) dx_0, the integral on a grid."""
    means, s2, x = mixture
    schedule = NoiseSchedule.from_betas([0.05, 0.1, 0.2, 0.3, 0.4, 0.5])
    law = _law(means[:, None], s2)
    abar = float(np.prod(1 - schedule.betas.numpy()[:t]))
    y = np.linspace(means.min() - 12 * math.sqrt(s2), means.max() + 12 * math.sqrt(s2), 8001)
    q0 = np.exp(_log_mixture_1d(y, means, s2, 1.0, np.full(len(means), 1 / len(means))))
    xs = np.array([x, x + 0.3, -x])
    conv = np.trapezoid(np.exp(_log_normal(xs[:, None], math.sqrt(abar) * y[None], 1 - abar)) * q0, y, axis=1)
    marginal = law.marginal(schedule, t)
    assert np.allclose(marginal.log_prob(torch.tensor(xs[:, None])).numpy(), np.log(conv), rtol=1e-7, atol=1e-7)
    assert law.marginal(schedule, 0) is law


def test_points_have_marginals_but_no_density():
    law = _law([[0.0], [1.0]])
    with pytest.raises(ValueError, match="no density"):
        law.log_prob(torch.zeros(3, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="no differential entropy"):
        law.entropy_estimate(10)
    schedule = NoiseSchedule.from_betas([0.1, 0.2])
    x = torch.tensor([[0.3]], dtype=torch.float64)
    # q(x_2) = (N(x; 0, 1 - abar) + N(x; sqrt(abar), 1 - abar)) / 2
    abar = 0.9 * 0.8
    expected = math.log(0.5 * sum(math.exp(_log_normal(0.3, m, 1 - abar)) for m in (0.0, math.sqrt(abar))))
    assert law.marginal(schedule, 2).log_prob(x).item() == pytest.approx(expected, rel=1e-12)


def test_entropy_estimate_is_exact_for_one_component_and_matches_quadrature_for_two():
    law = _law([[0.5, -1.0, 2.0]], 0.2)
    h, se = law.entropy_estimate(100)
    assert h == pytest.approx(1.5 * math.log(2 * math.pi * math.e * 0.2), abs=1e-12) and se < 1e-12
    two = _law([[-1.0], [1.5]], 0.4, [0.3, 0.7])
    y = np.linspace(-8, 9, 20001)
    log_q = _log_mixture_1d(y, np.array([-1.0, 1.5]), 0.4, 1.0, np.array([0.3, 0.7]))
    exact = -np.trapezoid(np.exp(log_q) * log_q, y)
    h, se = two.entropy_estimate(20000, torch.Generator().manual_seed(1))
    assert abs(h - exact) < Z * se and se < 0.01


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"means": [[0.0, 1.0]]}, TypeError, "tensor"),
        ({"means": torch.zeros(3, 2, dtype=torch.long)}, TypeError, "floating"),
        ({"means": torch.zeros(3)}, ValueError, r"\(K, \*data_shape\)"),
        ({"means": torch.zeros(0, 2)}, ValueError, "K >= 1"),
        ({"means": torch.tensor([[0.0, float("nan")]])}, ValueError, "NaN"),
        ({"means": torch.zeros(2, 2), "variance": -0.1}, ValueError, "variance"),
        ({"means": torch.zeros(2, 2), "variance": float("inf")}, ValueError, "variance"),
        ({"means": torch.zeros(2, 2), "variance": "1"}, TypeError, "variance"),
        ({"means": torch.zeros(2, 2), "weights": [0.5, 0.5]}, TypeError, "weights"),
        ({"means": torch.zeros(2, 2), "weights": torch.ones(3)}, ValueError, r"shape \(2,\)"),
        ({"means": torch.zeros(2, 2), "weights": torch.tensor([1.0, -1.0])}, ValueError, "non-negative"),
        ({"means": torch.zeros(2, 2), "weights": torch.zeros(2)}, ValueError, "not all zero"),
    ],
)
def test_bad_laws_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        IsotropicGaussianMixture(**kwargs)


def test_bad_inputs_are_refused():
    law = _law([[0.0, 1.0], [1.0, 0.0]], 0.1)
    schedule = NoiseSchedule.from_betas([0.1, 0.2, 0.3])
    x = torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        law.log_prob(torch.zeros(4, 3))
    with pytest.raises(TypeError, match="floating"):
        law.reverse(schedule, torch.zeros(4, 2, dtype=torch.long), 1)
    with pytest.raises(ValueError, match=r"1\.\.T = 1\.\.3"):
        law.reverse(schedule, x, 4)
    with pytest.raises(ValueError, match=r"1\.\.T = 1\.\.3"):
        law.reverse(schedule, x, torch.tensor([1, 2, 0, 3]))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        law.reverse(schedule, x, torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="integer tensor"):
        law.reverse(schedule, x, torch.ones(4))
    with pytest.raises(ValueError, match=r"0\.\.T = 0\.\.3"):
        law.marginal(schedule, 4)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
            law.sample(bad)
    assert law.sample(1).shape == (1, 2)
    with pytest.raises(ValueError, match=r"B >= 1"):
        law.log_prob(torch.zeros(0, 2))
    with pytest.raises(ValueError, match=r"B >= 1"):
        law.reverse(schedule, torch.zeros(0, 2), 1)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 2"):
        law.entropy_estimate(1)
    rev = law.reverse(schedule, x, 2)
    with pytest.raises(ValueError, match="shape of x_t"):
        rev.log_prob(torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape of x_t"):
        rev.sample(noise=torch.zeros(4, 3))
    points = _law([[0.0, 1.0], [1.0, 0.0]]).reverse(schedule, x, torch.tensor([2, 1, 2, 2]))
    with pytest.raises(ValueError, match="positive variance"):
        points.log_prob(x)


# ---------------------------------------------------------------------- the reverse conditional
@given(mixtures_1d, st.integers(1, 4), st.integers(0, 2**31 - 1))
@settings(max_examples=25)
def test_reverse_log_prob_is_bayes_rule_on_a_grid(mixture, t, seed):
    means, s2, x_t = mixture
    weights = np.random.default_rng(seed).uniform(0.05, 1, len(means))
    schedule = NoiseSchedule.from_betas([0.02, 0.1, 0.3, 0.6])
    y, log_q = _bayes_grid_1d(schedule, t, means, s2, weights / weights.sum(), x_t)
    rev = _law(means[:, None], s2, weights).reverse(schedule, torch.full((len(y), 1), x_t, dtype=torch.float64), t)
    got = rev.log_prob(torch.tensor(y[:, None])).numpy()
    mass = log_q > log_q.max() - 30
    assert np.allclose(got[mass], log_q[mass], rtol=0, atol=1e-6)
    # the mean and variance, by integration on the grid
    q = np.exp(log_q)
    m = np.trapezoid(q * y, y)
    assert rev.mean[0, 0].item() == pytest.approx(m, abs=1e-7)
    assert rev.covariance()[0, 0, 0].item() == pytest.approx(np.trapezoid(q * (y - m) ** 2, y), rel=1e-6, abs=1e-10)


@given(mixtures_1d, st.integers(1, 4))
@settings(max_examples=25)
def test_denoised_mean_is_the_posterior_mean_of_x0_on_a_grid(mixture, t):
    """E[x_0 | x_t] with q(x_0 | x_t) proportional to q(x_t | x_0) q(x_0), integrated on a grid."""
    means, s2, x_t = mixture
    schedule = NoiseSchedule.from_betas([0.02, 0.1, 0.3, 0.6])
    abar = float(np.prod(1 - schedule.betas.numpy()[:t]))
    prec = abar / (1 - abar) + 1 / s2  # each component's posterior (a Gaussian product), for the grid's range
    centres = (math.sqrt(abar) * x_t / (1 - abar) + means / s2) / prec
    y = np.linspace(centres.min() - 12 / math.sqrt(prec), centres.max() + 12 / math.sqrt(prec), 20001)
    log_post = _log_normal(x_t, math.sqrt(abar) * y, 1 - abar) + _log_mixture_1d(
        y, means, s2, 1.0, np.full(len(means), 1 / len(means))
    )
    post = np.exp(log_post - log_post.max())
    expected = np.trapezoid(post * y, y) / np.trapezoid(post, y)
    rev = _law(means[:, None], s2).reverse(schedule, torch.tensor([[x_t]], dtype=torch.float64), t)
    assert rev.x0_mean.item() == pytest.approx(expected, abs=1e-8)


@pytest.mark.parametrize("t", [1, 2, 3])
def test_mean_and_covariance_in_two_dimensions_by_integration(t):
    """Off-diagonal covariance too: Bayes' rule on a 2-D grid."""
    schedule = NoiseSchedule.from_betas([0.05, 0.2, 0.4])
    means, s2, pi = np.array([[0.0, 0.0], [1.0, 0.6], [-0.4, 1.2]]), 0.05, np.array([0.5, 0.3, 0.2])
    x_t = np.array([0.4, 0.5])
    alpha, beta, abar, abar_prev = _chain(schedule, t)
    P_prev = _marginal_variances(schedule, s2)[t - 1]
    u = np.linspace(-5.0, 5.5, 1201)  # every conditional within 10 of its standard deviations
    Y = np.stack(np.meshgrid(u, u, indexing="ij"), -1).reshape(-1, 2)
    comp = np.stack(
        [np.log(pi[j]) + _log_normal(Y, math.sqrt(abar_prev) * means[j], P_prev).sum(1) for j in range(3)], 1
    )
    log_joint = np.log(np.exp(comp).sum(1)) + _log_normal(x_t, math.sqrt(alpha) * Y, beta).sum(1)
    q = np.exp(log_joint - log_joint.max())
    q /= q.sum()
    m = q @ Y
    cov = (Y - m).T @ ((Y - m) * q[:, None])
    rev = _law(means, s2, pi).reverse(schedule, torch.tensor(x_t[None]), t)
    assert np.allclose(rev.mean[0].numpy(), m, atol=1e-8)
    assert np.allclose(rev.covariance()[0].numpy(), cov, atol=1e-8)
    assert abs(cov[0, 1]) > 1e-3  # the check covers a real correlation


@given(
    st.integers(1, 5),
    st.sampled_from([(2,), (1, 2, 2)]),
    st.sampled_from([0.0, 0.05, 0.5]),
    st.integers(0, 2**31 - 1),
)
def test_weights_and_denoised_mean_are_the_explicit_softmax(K, shape, s2, seed):
    """w_j(x_t) = softmax_j(log pi_j + log N(x_t; sqrt(abar_t) mu_j, P_t I)) by an explicit (B, K, D) sum, each row
    at its own t; for points E[x_0 | x_t] = w @ mu."""
    g = np.random.default_rng(seed)
    schedule = NoiseSchedule.from_betas([0.05, 0.1, 0.2, 0.4])
    means, weights = g.normal(size=(K,) + shape), g.uniform(0.1, 1, K)
    B = 5
    t = g.integers(1, 5, B)
    x_t = g.normal(size=(B,) + shape)
    P = _marginal_variances(schedule, s2)[t]
    abar = np.array([_chain(schedule, int(s))[2] for s in t])
    D = int(np.prod(shape))
    diff = x_t.reshape(B, 1, D) - np.sqrt(abar)[:, None, None] * means.reshape(1, K, D)
    logits = np.log(weights)[None] - (diff**2).sum(-1) / (2 * P[:, None])
    w = np.exp(logits - logits.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    rev = _law(means, s2, weights).reverse(schedule, torch.tensor(x_t), torch.tensor(t))
    assert rev.log_weights.shape == (B, K) and rev.mean.shape == (B,) + shape
    assert np.allclose(rev.log_weights.exp().numpy(), w, atol=1e-10)
    if s2 == 0:
        assert np.allclose(rev.x0_mean.numpy().reshape(B, D), w @ means.reshape(K, D), atol=1e-10)


def test_one_point_gives_the_forward_posterior_and_one_gaussian_its_conditional():
    schedule = NoiseSchedule.from_betas([0.05, 0.2, 0.4])
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([[0.7, -0.3]], dtype=torch.float64)
    x_t = torch.randn(6, 2, generator=g, dtype=torch.float64)
    y = torch.randn(6, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([2, 3, 2, 3, 2, 3])
    rev = IsotropicGaussianMixture(mu).reverse(schedule, x_t, t)
    loc, var = q_posterior(schedule, mu.expand(6, 2), x_t, t)
    assert torch.allclose(rev.log_prob(y), normal_log_prob(y, loc, var, 1), rtol=1e-12)
    assert torch.allclose(rev.mean, loc, rtol=1e-12) and torch.equal(rev.log_weights, torch.zeros(6, 1).double())
    # one Gaussian component: the conditional of the joint Gaussian (x_{t-1}, x_t), by hand
    s2 = 0.3
    rev = IsotropicGaussianMixture(mu, s2).reverse(schedule, x_t, t)
    P = _marginal_variances(schedule, s2)
    for i in range(6):
        alpha, beta, abar, abar_prev = _chain(schedule, int(t[i]))
        P_prev, P_t = P[t[i] - 1], P[t[i]]
        gain = math.sqrt(alpha) * P_prev / P_t
        m = math.sqrt(abar_prev) * mu[0].numpy() + gain * (x_t[i].numpy() - math.sqrt(abar) * mu[0].numpy())
        v = P_prev - gain**2 * P_t
        assert rev.log_prob(y)[i].item() == pytest.approx(_log_normal(y[i].numpy(), m, v).sum(), rel=1e-10)
        assert np.allclose(rev.covariance()[i].numpy(), v * np.eye(2), atol=1e-14)


def test_points_at_t1_are_the_points_themselves():
    schedule = NoiseSchedule.from_betas([0.01, 0.2])
    means = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]], dtype=torch.float64)
    rev = IsotropicGaussianMixture(means).reverse(schedule, torch.tensor([[0.95, 0.05], [1.9, 2.1]]).double(), 1)
    draws = rev.sample(torch.Generator().manual_seed(0))
    assert torch.equal(rev.variance, torch.zeros(2).double())
    assert torch.allclose(draws, torch.tensor([[1.0, 0.0], [2.0, 2.0]]).double(), atol=1e-15)


def test_draws_follow_the_mean_the_covariance_and_the_density():
    """Many rows with one x_t (a bimodal conditional): draws' mean and covariance within SE of the exact ones; in
    1-D, the share of draws in each of 10 bins within SE of the integral of exp(log_prob) over the bin."""
    schedule = NoiseSchedule.from_betas([0.05, 0.3, 0.5])
    law = _law([[-1.0, 0.0], [1.0, 0.5], [0.2, 1.5]], 0.02, [0.3, 0.3, 0.4])
    n = 30000
    rev = law.reverse(schedule, torch.tensor([[0.1, 0.4]], dtype=torch.float64).expand(n, 2), 2)
    y = rev.sample(torch.Generator().manual_seed(0)).numpy()
    m, cov = rev.mean[0].numpy(), rev.covariance()[0].numpy()
    assert np.all(np.abs(y.mean(0) - m) < Z * y.std(0) / math.sqrt(n))
    products = (y - m)[:, :, None] * (y - m)[:, None, :]
    assert np.all(np.abs(products.mean(0) - cov) < Z * products.std(0) / math.sqrt(n))
    weights = rev.log_weights[0].exp()
    assert weights.min() > 0.05  # several components contribute

    one_d = _law([[-1.0], [1.0]], 0.05, [0.4, 0.6])
    rev = one_d.reverse(schedule, torch.full((n, 1), 0.1, dtype=torch.float64), 2)
    y = rev.sample(torch.Generator().manual_seed(1))[:, 0].numpy()
    grid = np.linspace(-4, 4, 16001)
    on_grid = one_d.reverse(schedule, torch.full((len(grid), 1), 0.1, dtype=torch.float64), 2)
    density = on_grid.log_prob(torch.tensor(grid[:, None])).exp().numpy()
    assert np.trapezoid(density, grid) == pytest.approx(1, abs=1e-9)
    edges = np.linspace(-2, 2, 11)
    edges[0], edges[-1] = -4, 4
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (grid >= lo) & (grid <= hi)
        p = np.trapezoid(density[inside], grid[inside])
        share = ((y >= lo) & (y < hi)).mean()
        assert abs(share - p) < Z * math.sqrt(p * (1 - p) / n) + 1e-9, (lo, hi, share, p)


def test_sampling_with_given_noise_and_generator():
    schedule = NoiseSchedule.from_betas([0.05, 0.3, 0.5])
    law = _law([[-1.0, 0.0], [1.0, 0.5]], 0.1)
    rev = law.reverse(schedule, torch.tensor([[0.0, 0.2], [0.5, 0.1], [-0.3, 0.0]], dtype=torch.float64), 3)
    a, b = rev.coef_mu[:, None], rev.coef_xt[:, None]
    component_means = [a * law.means[j] + b * rev.x_t for j in range(2)]
    at_means = rev.sample(torch.Generator().manual_seed(0), noise=torch.zeros(3, 2, dtype=torch.float64))
    hits = [torch.isclose(at_means, cm, atol=1e-12).all(1) for cm in component_means]
    assert (hits[0] | hits[1]).all()
    z = torch.randn(3, 2, dtype=torch.float64)
    shifted = rev.sample(torch.Generator().manual_seed(0), noise=z)
    assert torch.allclose(shifted - at_means, rev.variance.sqrt()[:, None] * z, atol=1e-12)
    first = rev.sample(torch.Generator().manual_seed(5))
    assert torch.equal(first, rev.sample(torch.Generator().manual_seed(5)))


def test_select_gives_the_rows():
    schedule = NoiseSchedule.from_betas([0.05, 0.3, 0.5])
    law = _law([[-1.0, 0.0], [1.0, 0.5], [0.0, 2.0]], 0.1)
    x_t = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([1, 2, 3, 3, 2, 1])
    rev = law.reverse(schedule, x_t, t)
    y = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for index in (slice(1, 4), torch.tensor([True, False, True, False, False, True]), torch.tensor([5, 0, 2]), 4, -1):
        part = rev.select(index)
        rows = torch.arange(6)[index].reshape(-1)
        direct = law.reverse(schedule, x_t[rows], t[rows])
        assert part.batch_size == len(rows)
        for name in ("log_weights", "mean", "x0_mean", "x_t", "t", "coef_mu", "coef_xt", "variance"):
            assert torch.allclose(getattr(part, name), getattr(direct, name), rtol=1e-12, atol=1e-15), name
        assert torch.allclose(part.covariance(), direct.covariance(), rtol=1e-12, atol=1e-15)
        assert torch.allclose(part.log_prob(y[rows]), direct.log_prob(y[rows]), rtol=1e-12)


def test_chunked_computations_equal_the_whole(monkeypatch):
    """With chunks of a few rows and components, every result is the one-chunk result."""
    schedule = NoiseSchedule.from_betas([0.05, 0.1, 0.3, 0.5])
    g = torch.Generator().manual_seed(0)
    law = IsotropicGaussianMixture(torch.randn(7, 3, generator=g, dtype=torch.float64), 0.05)
    x_t = torch.randn(11, 3, generator=g, dtype=torch.float64)
    y = torch.randn(11, 3, generator=g, dtype=torch.float64)
    t = torch.randint(1, 5, (11,), generator=g)
    whole = law.reverse(schedule, x_t, t)
    expected = (whole.log_weights, whole.mean, whole.x0_mean, whole.covariance(), whole.log_prob(y), law.log_prob(y))
    monkeypatch.setattr(mixture_module, "CHUNK_ELEMENTS", 15)  # 2 rows per chunk of (rows, K); 1 component for cov
    chunked = _law(law.means, 0.05).reverse(schedule, x_t, t)
    got = (chunked.log_weights, chunked.mean, chunked.x0_mean, chunked.covariance(), chunked.log_prob(y))
    for e, c in zip(expected, got + (law.log_prob(y),), strict=True):
        assert torch.allclose(e, c, rtol=1e-12, atol=1e-14)


def test_tensors_follow_the_data():
    schedule = NoiseSchedule.from_betas([0.05, 0.3])
    law32 = _gaussians8(torch.float32)
    rev = law32.reverse(schedule, torch.zeros(3, 2), 2)
    assert rev.mean.dtype == rev.log_weights.dtype == torch.float32 and rev.covariance().dtype == torch.float32
    assert law32.sample(4).dtype == torch.float32
    law64 = _gaussians8()
    assert law64.log_prob(torch.zeros(3, 2)).dtype == torch.float64  # promoted, as the float64 law's data density
    assert torch.allclose(rev.mean.double(), law64.reverse(schedule, torch.zeros(3, 2).double(), 2).mean, atol=1e-6)
    assert law64.to(dtype=torch.float32).means.dtype == torch.float32


def test_a_large_training_set_as_points():
    """K = 20000 points of dimension 64 (digits' 1x8x8) and a batch of 256: weights normalised, E[x_0 | x_t] = w @ mu
    against the explicit softmax on a few rows, in float32."""
    g = torch.Generator().manual_seed(0)
    means = torch.rand(20000, 1, 8, 8, generator=g) * 2 - 1
    law = IsotropicGaussianMixture(means)
    schedule = NoiseSchedule.linear(1000)
    x_t = torch.randn(256, 1, 8, 8, generator=g)
    rev = law.reverse(schedule, x_t, 300)
    assert rev.log_weights.shape == (256, 20000) and rev.log_weights.dtype == torch.float32
    assert torch.allclose(rev.log_weights.logsumexp(1), torch.zeros(256), atol=1e-5)
    abar = schedule.alphas_cumprod[299].item()
    rows = x_t[:4].flatten(1).double()
    sq = ((rows[:, None] - math.sqrt(abar) * means.flatten(1).double()[None]) ** 2).sum(-1)
    w = torch.softmax(-sq / (2 * (1 - abar)), 1)
    assert torch.allclose(rev.x0_mean[:4].flatten(1).double(), w @ means.flatten(1).double(), atol=1e-4)
    draws = rev.sample(g)
    assert draws.shape == x_t.shape


# ---------------------------------------------------------------------- the moment-matched bound
def test_one_gaussian_has_no_step_kl_and_an_exact_bound():
    """The true reverse of one Gaussian is Gaussian: every D_t = 0, the prior KL and the entropy are closed forms."""
    mu, s2 = np.array([0.5, -1.0]), 0.3
    law = _law(mu[None], s2)
    schedule = NoiseSchedule.from_betas([0.1, 0.3, 0.5, 0.2])
    b = moment_matched_bound(law, schedule, 200, torch.Generator().manual_seed(0))
    assert torch.allclose(b.step_kls, torch.zeros(4, dtype=torch.float64), atol=1e-12)
    abar = float(np.prod(1 - schedule.betas.numpy()))
    P_T = _marginal_variances(schedule, s2)[-1]
    prior = 0.5 * (2 * (P_T - 1 - math.log(P_T)) + abar * (mu**2).sum())  # KL(N(sqrt(abar) mu, P_T I) || N(0, I))
    entropy = math.log(2 * math.pi * math.e * s2)
    assert b.prior_kl == pytest.approx(prior, rel=1e-9) and b.entropy == pytest.approx(entropy, rel=1e-12)
    assert b.bound == pytest.approx(entropy + prior, rel=1e-12) and b.bound_stderr < 1e-10


def test_step_kls_match_quadrature_in_one_dimension():
    """D_t = int q(x_t) KL(q(. | x_t) || N(m(x_t), c(x_t))) dx_t by Bayes' rule on a (x_t, x_{t-1}) grid, and the prior
    KL and the entropy by quadrature, against the Monte Carlo estimates."""
    means, s2, pi = np.array([-1.0, 1.2]), 0.05, np.array([0.35, 0.65])
    schedule = NoiseSchedule.from_betas([0.1, 0.3, 0.6])
    law = _law(means[:, None], s2, pi)
    b = moment_matched_bound(law, schedule, 20000, torch.Generator().manual_seed(0))
    P = _marginal_variances(schedule, s2)
    for t in (1, 2, 3):
        abar = _chain(schedule, t)[2]
        xs = np.linspace(-1.3 * math.sqrt(abar) - 7 * math.sqrt(P[t]), 1.5 * math.sqrt(abar) + 7 * math.sqrt(P[t]), 601)
        log_qt = _log_mixture_1d(xs, means, P[t], math.sqrt(abar), pi)
        kls = []
        for x in xs:
            y, log_q = _bayes_grid_1d(schedule, t, means, s2, pi, x, num=2001)
            q = np.exp(log_q)
            m = np.trapezoid(q * y, y)
            c = np.trapezoid(q * (y - m) ** 2, y)
            kls.append(np.trapezoid(q * (log_q - _log_normal(y, m, c)), y))
        exact = np.trapezoid(np.exp(log_qt) * np.array(kls), xs)
        est, se = b.step_kls[t - 1].item(), b.step_kls_stderr[t - 1].item()
        assert exact > 1e-3 and abs(est - exact) < Z * se, (t, est, se, exact)
    # prior: KL(q(x_T) || N(0, 1)), and the entropy
    abar_T = _chain(schedule, 3)[2]
    xs = np.linspace(-8, 8, 20001)
    log_qT = _log_mixture_1d(xs, means, P[3], math.sqrt(abar_T), pi)
    prior = np.trapezoid(np.exp(log_qT) * (log_qT - _log_normal(xs, 0.0, 1.0)), xs)
    assert abs(b.prior_kl - prior) < Z * b.prior_kl_stderr and b.prior_kl_stderr < 1e-2
    log_q0 = _log_mixture_1d(xs, means, s2, 1.0, pi)
    entropy = -np.trapezoid(np.exp(log_q0) * log_q0, xs)
    assert abs(b.entropy - entropy) < Z * b.entropy_stderr
    assert b.bound == pytest.approx(b.entropy + b.prior_kl + b.step_kls.sum().item(), rel=1e-12)
    se = math.sqrt(b.entropy_stderr**2 + b.prior_kl_stderr**2 + (b.step_kls_stderr**2).sum().item())
    assert b.bound_stderr == pytest.approx(se, rel=1e-12)
    assert b.gap == pytest.approx(b.bound - b.entropy, rel=1e-12)
    plain = json.loads(json.dumps(b.to_dict()))
    assert plain["bound"] == b.bound and plain["step_kls"] == b.step_kls.tolist() and plain["num_samples"] == 20000
    assert plain["bound_stderr"] == b.bound_stderr and plain["gap_stderr"] == b.gap_stderr


def test_standard_errors_are_the_spread_of_independent_estimates():
    """Over 100 seeded replicates, the spread of each estimate agrees with the root mean square of its reported
    standard errors (the ratio within [0.75, 1.33]; its own sampling error is about 7-10%)."""
    law = _law([[-1.0], [1.2]], 0.05, [0.35, 0.65])
    schedule = NoiseSchedule.from_betas([0.1, 0.3, 0.6])
    runs = [moment_matched_bound(law, schedule, 300, torch.Generator().manual_seed(r)) for r in range(100)]
    for values, errors in (
        (torch.stack([b.step_kls for b in runs]), torch.stack([b.step_kls_stderr for b in runs])),
        (torch.tensor([[b.prior_kl] for b in runs]), torch.tensor([[b.prior_kl_stderr] for b in runs])),
        (torch.tensor([[b.entropy] for b in runs]), torch.tensor([[b.entropy_stderr] for b in runs])),
    ):
        ratio = values.std(0) / errors.pow(2).mean(0).sqrt()
        assert ((ratio > 0.75) & (ratio < 1.33)).all(), ratio


def test_gaussians8_step_kls_are_non_negative_and_the_bound_falls_to_the_entropy():
    """D_t >= 0 within SE at every step; the best bound falls with T (1, 10, 100 evenly spaced steps of the linear
    T = 1000 schedule) towards the entropy 0.312 nats."""
    law, base = _gaussians8(), NoiseSchedule.linear(1000)
    g = torch.Generator().manual_seed(0)
    bounds = []
    for T in (1, 10, 100):
        b = moment_matched_bound(
            law, base.respace(base.evenly_spaced_timesteps(T)), 1000, g, entropy=GAUSSIANS8_ENTROPY
        )
        assert (b.step_kls > -Z * b.step_kls_stderr).all()
        bounds.append(b)
    for coarse, fine in zip(bounds[:-1], bounds[1:], strict=True):
        assert coarse.bound - fine.bound > Z * math.hypot(coarse.bound_stderr, fine.bound_stderr)
        assert coarse.step_kls.max() > fine.step_kls.max()
    assert bounds[0].bound > 3.0 and bounds[-1].bound - GAUSSIANS8_ENTROPY < 0.03


def test_the_bound_refuses_points_and_bad_counts():
    schedule = NoiseSchedule.from_betas([0.1, 0.2])
    with pytest.raises(ValueError, match="variance 0"):
        moment_matched_bound(_law([[0.0], [1.0]]), schedule, 10)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 2"):
        moment_matched_bound(_law([[0.0], [1.0]], 0.1), schedule, 1)
    two = moment_matched_bound(_law([[0.0], [1.0]], 0.1), schedule, 2, torch.Generator().manual_seed(0))
    assert (
        torch.isfinite(two.step_kls_stderr).all()
        and two.step_kls_stderr.shape == (2,)
        and math.isfinite(two.bound_stderr)
    )
    with pytest.raises(TypeError, match="IsotropicGaussianMixture"):
        moment_matched_bound(_law([[0.0], [1.0]], 0.1).means, schedule, 10)
