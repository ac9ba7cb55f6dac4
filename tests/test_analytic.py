"""Analytic-DPM's variances: with the optimal mean they are the true reverse conditional's variances."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import minimize_scalar

from pyrodiff import DiffusionModel, NoiseSchedule, bound_terms
from pyrodiff.chain.analytic import analytic_variance, expected_eps_norm, optimal_variances
from pyrodiff.chain.parameterization import TableVariance
from pyrodiff.testing import LinearDenoiser, linear_reverse_coefficients, schedules
from pyrodiff.theory.exact import true_reverse


def _optimal_model(schedule, s2):
    """For data N(0, s2) in 1-D, E[eps | x_t] = sqrt(1 - abar) x_t / (abar s2 + 1 - abar): a linear epsilon network."""
    abar = schedule.alphas_cumprod
    a = (1 - abar).sqrt() / (abar * s2 + 1 - abar)
    return DiffusionModel(LinearDenoiser(schedule.num_steps, a, torch.zeros_like(a)), schedule, data_shape=(1,))


def test_with_the_optimal_mean_the_variance_is_the_true_reverse_variance(float64):
    schedule, s2, n = NoiseSchedule.linear(12, 1e-3, 0.3), 0.3, 40000
    model = _optimal_model(schedule, s2)
    data = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * math.sqrt(s2)
    analytic = analytic_variance(model, data, generator=torch.Generator().manual_seed(1))
    sigma2 = torch.tensor(analytic.variance.values)
    truth = true_reverse(schedule, torch.zeros(1), torch.full((1, 1), s2)).covariances[:, 0, 0]
    gamma = expected_eps_norm(model, data, generator=torch.Generator().manual_seed(1))
    abar, alpha, tilde = schedule.alphas_cumprod, schedule.alphas, schedule.posterior_variance
    gap2 = schedule.betas**2 / (alpha * (1 - abar))
    se = gap2 * gamma * math.sqrt(2 / n)  # eps_hat^2 / Gamma is chi-square(1): variance 2 Gamma^2
    assert torch.all((sigma2[1:] - truth[1:]).abs() <= 4.5 * se[1:] + 1e-12)
    assert torch.all(sigma2[1:] >= tilde[1:]) and torch.all(sigma2[1:] <= schedule.betas[1:] / alpha[1:] + 1e-15)
    assert sigma2[0] == tilde[1]  # the decoder keeps the model's convention


@given(schedules(min_steps=3, max_steps=12), st.floats(0.05, 2.0), st.data())
def test_the_closed_form_maximises_the_step_term_found_numerically(schedule, s2, data):
    """For data N(0, s2) and the optimal epsilon network, the expected term L_{t-1} as a function of sigma^2,
    0.5 [log(sigma^2 / beta_tilde) + (beta_tilde + M) / sigma^2 - 1] with M = E(mu_tilde - mu)^2 from the exact
    moments, is minimised numerically (scipy, over log sigma^2): optimal_variances with the exact Gamma_t is that
    minimiser, it lies in [beta_tilde, beta / alpha] (Bao et al., Theorem 2), and its term is no larger than with
    either fixed variance."""
    t = data.draw(st.integers(2, schedule.num_steps))
    beta = schedule.betas.numpy()
    abar = np.cumprod(1 - beta)
    prev = np.concatenate([[1.0], abar[:-1]])
    tilde = beta * (1 - prev) / (1 - abar)
    a = np.sqrt(1 - abar) / (abar * s2 + 1 - abar)  # E[eps | x_t] = a x_t
    gamma = a**2 * (abar * s2 + 1 - abar)  # E[eps_hat^2]
    c, d = linear_reverse_coefficients(schedule, a, np.zeros_like(a), "epsilon")
    A, B = np.sqrt(prev) * beta / (1 - abar), np.sqrt(1 - beta) * (1 - prev) / (1 - abar)  # Ho et al., eq. 7
    i = t - 1
    m = np.sqrt(abar[i])
    M = (A[i] + (B[i] - c[i]) * m) ** 2 * s2 + (B[i] - c[i]) ** 2 * (1 - abar[i]) + d[i] ** 2

    def term(sigma2):
        return 0.5 * (np.log(sigma2 / tilde[i]) + (tilde[i] + M) / sigma2 - 1)

    lo, hi = np.log(tilde[i]) - 3, np.log(beta[i]) + 3
    best = np.exp(
        minimize_scalar(lambda u: term(np.exp(u)), bounds=(lo, hi), method="bounded", options={"xatol": 1e-10}).x
    )
    sigma2 = optimal_variances(schedule, torch.from_numpy(gamma)).numpy()[i]
    assert sigma2 == pytest.approx(best, rel=1e-6)
    assert tilde[i] * (1 - 1e-12) <= sigma2 <= beta[i] / (1 - beta[i]) * (1 + 1e-12)
    assert term(sigma2) <= min(term(tilde[i]), term(beta[i])) + 1e-12


def test_the_analytic_variance_does_not_lower_the_bound(float64):
    """Optimal variances for the optimal mean: the bound is at least as tight as with either fixed choice."""
    schedule, s2 = NoiseSchedule.linear(12, 1e-3, 0.3), 0.3
    model = _optimal_model(schedule, s2)
    data = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * math.sqrt(s2)
    analytic = analytic_variance(model, data, generator=torch.Generator().manual_seed(1))
    x0 = data[:4000]
    totals = {}
    for name, m in (
        ("analytic", analytic),
        ("small", model),
        ("large", DiffusionModel(model.network, schedule, variance="large", data_shape=(1,))),
    ):
        torch.manual_seed(0)
        totals[name] = bound_terms(m, x0).total.mean().item()
    assert totals["analytic"] < totals["small"] and totals["analytic"] < totals["large"]


def test_bad_tables():
    with pytest.raises(ValueError, match="positive"):
        TableVariance((0.1, -1.0))
    with pytest.raises(ValueError, match="before .ddim"):
        analytic_variance(_optimal_model(NoiseSchedule.linear(4), 0.3).ddim(0.5), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="steps"):
        DiffusionModel(LinearDenoiser(3), NoiseSchedule.linear(3), variance=TableVariance((0.1, 0.2))).predict(
            torch.zeros(2, 1), torch.ones(2, dtype=torch.long)
        )
