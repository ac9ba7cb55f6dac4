"""The probability-flow ODE, its sampler and its exact likelihood against closed forms (float64).

- the exact score of Gaussian data: the ODE is linear and its marginal is known in closed form
  (``probability_flow_marginal``); run over a wide log-SNR range it is N(m, S) itself;
- an affine network that is not optimal: the ODE is linear, its marginal N(c, Phi Phi^T) is integrated here with scipy
  (``solve_ivp``, DOP853), independently of the library's solver and of its continuous extension;
- the exact score of a Gaussian mixture: the flow's density is the mixture's marginal;
- Hutchinson's divergence against the exact one, within its standard error;
- the sampler: the closed-form law within standard errors, and a deterministic map.
Tolerances follow the solver's: a global error of 100 x rtol."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from scipy.special import expit
from torch.distributions import MultivariateNormal

from pyrodiff import DiffusionModel, MLPDenoiser, NoiseSchedule, UNet, samplers
from pyrodiff.chain.continuous import ContinuousDiffusionModel
from pyrodiff.chain.log_snr import LinearLogSNR, NoiseLevelInput
from pyrodiff.chain.probability_flow import ProbabilityFlow, continuous_log_snr, continuous_timestep
from pyrodiff.evaluation.ode_likelihood import ode_log_likelihood
from pyrodiff.theory.exact import (
    AffineDenoiser,
    GaussianScore,
    best_affine,
    probability_flow_marginal,
    reverse_chain,
)
from pyrodiff.theory.mixture import IsotropicGaussianMixture

F64 = torch.float64
RTOL = 1e-8
TOL = 100 * RTOL


def _law(D: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D, D, generator=g, dtype=F64)
    return torch.randn(D, generator=g, dtype=F64), A @ A.T / D + 0.1 * torch.eye(D, dtype=F64)


def _schedule() -> NoiseSchedule:
    return NoiseSchedule.linear(50, 1e-3, 0.3)


def _ends(schedule: NoiseSchedule) -> tuple[float, float]:
    log_snr = schedule.tables().log_snr
    return log_snr[0].item(), log_snr[-1].item()


def test_exact_gaussian_score_likelihood_is_the_closed_form():
    schedule, (m, S) = _schedule(), _law(3, 0)
    model = DiffusionModel(GaussianScore(schedule, m, S), schedule, data_shape=(3,))
    x = MultivariateNormal(m, S).sample((4,))
    result = ode_log_likelihood(model, x, rtol=RTOL, atol=RTOL)
    mean, cov = probability_flow_marginal(m, S, *_ends(schedule))
    expected = MultivariateNormal(mean, cov).log_prob(x)
    assert (result.log_likelihood - expected).abs().max() < TOL
    assert result.divergence == "exact" and result.nfe > 0 and result.rtol == RTOL
    # the flow starts at the first step's noise level: the closed form differs from N(m, S) by more than the tolerance
    assert (expected - MultivariateNormal(m, S).log_prob(x)).abs().max() > 100 * TOL


def test_exact_gaussian_score_over_a_wide_range_recovers_the_data_law():
    """From log-SNR 14 down to -30 the start is nearly noiseless and the prior nearly q(x_T): log p = log N(m, S)."""
    m, S = _law(2, 1)
    score = GaussianScore(_schedule(), m, S)
    flow = ProbabilityFlow(lambda tau: tau, score.noise, 14.0, -30.0)
    x = MultivariateNormal(m, S).sample((4,))
    result = ode_log_likelihood(flow, x, rtol=RTOL, atol=RTOL)
    # sigma^2 = sigmoid(-14) ~ 8e-7 at the start and alpha = sigmoid(-30)^(1/2) ~ 3e-7 at the end: each moves log p
    # by ~1e-6
    assert (result.log_likelihood - MultivariateNormal(m, S).log_prob(x)).abs().max() < 1e-5


def test_continuous_time_model_likelihood_is_the_closed_form():
    """A continuous-time model whose network is the exact noise prediction at its noise level c(gamma): the flow runs
    from -gamma_0 to -gamma_1 and its density is the closed form, whatever the schedule's interior."""
    m, S = _law(2, 10)
    score = GaussianScore(_schedule(), m, S)
    level = NoiseLevelInput()

    class Exact(torch.nn.Module):
        def forward(self, z, c):
            return score.noise(z, -level.gamma(c))

    schedule = LinearLogSNR(10, gamma_min=-8.0, gamma_max=6.0)
    model = ContinuousDiffusionModel(Exact(), schedule, decoder="gaussian", data_shape=(2,))
    x = MultivariateNormal(m, S).sample((4,))
    result = ode_log_likelihood(model, x, rtol=RTOL, atol=RTOL)
    assert (result.start, result.end) == (8.0, -6.0)
    mean, cov = probability_flow_marginal(m, S, 8.0, -6.0)
    assert (result.log_likelihood - MultivariateNormal(mean, cov).log_prob(x)).abs().max() < TOL


def _affine_marginal(model: DiffusionModel, weight: np.ndarray, bias: np.ndarray, prediction: str):
    """Mean and covariance of x(lambda_1) for the linear ODE dx/dlam = 1/2 (sigma^2 x - sigma eps(x, u(lam))), started
    from N(0, I) at lambda_T: Phi and c integrated with scipy over each interval between knots, where the affine
    network's weights (interpolated linearly in u) and u(lam) are smooth."""
    abar = model.schedule.tables().alphas_cumprod.numpy()
    knots = np.log(abar) - np.log1p(-abar)
    T, D = weight.shape[0], weight.shape[1]
    eye = np.eye(D)

    def rhs(lam, y, i):  # between knots i and i + 1 (1-based), lambda_{i+1} <= lam <= lambda_i
        u = i + (knots[i - 1] - lam) / (knots[i - 1] - knots[i])
        W = weight[i - 1] + (u - i) * (weight[i] - weight[i - 1])
        b = bias[i - 1] + (u - i) * (bias[i] - bias[i - 1])
        a2, s2 = expit(lam), expit(-lam)
        a, s = np.sqrt(a2), np.sqrt(s2)
        if prediction == "epsilon":  # eps = E x + e
            E, e = W, b
        else:  # v: eps = sigma x + alpha v
            E, e = s * eye + a * W, a * b
        A = 0.5 * (s2 * eye - s * E)
        Phi, c = y[: D * D].reshape(D, D), y[D * D :]
        return np.concatenate([(A @ Phi).ravel(), A @ c - 0.5 * s * e])

    y = np.concatenate([eye.ravel(), np.zeros(D)])
    for i in range(T - 1, 0, -1):
        y = solve_ivp(rhs, (knots[i], knots[i - 1]), y, args=(i,), method="DOP853", rtol=1e-12, atol=1e-12).y[:, -1]
    Phi, c = y[: D * D].reshape(D, D), y[D * D :]
    return torch.from_numpy(c), torch.from_numpy(Phi @ Phi.T)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_affine_model_likelihood_is_its_linear_odes_gaussian(prediction):
    T, D = 6, 2
    schedule = NoiseSchedule.from_betas([0.05, 0.1, 0.2, 0.35, 0.5, 0.7])
    g = torch.Generator().manual_seed(2)
    weight = 0.5 * torch.randn(T, D, D, generator=g, dtype=F64) + torch.eye(D, dtype=F64)
    bias = 0.3 * torch.randn(T, D, generator=g, dtype=F64)
    model = DiffusionModel(AffineDenoiser(T, D, weight, bias), schedule, prediction=prediction, data_shape=(D,))
    x = torch.randn(5, D, generator=g, dtype=F64)
    result = ode_log_likelihood(model, x, rtol=RTOL, atol=RTOL)
    mean, cov = _affine_marginal(model, weight.numpy(), bias.numpy(), prediction)
    assert (result.log_likelihood - MultivariateNormal(mean, cov).log_prob(x)).abs().max() < TOL


def test_exact_mixture_score_likelihood_is_the_mixtures_density():
    """The flow of the exact score transports q(x_T) to q(x_start): over a wide range, log p = the mixture's log q."""
    law = IsotropicGaussianMixture(torch.tensor([[1.0, 0.0], [-0.5, 0.8], [0.0, -1.0]], dtype=F64), 0.04)
    flow = ProbabilityFlow(lambda tau: tau, law.noise, 12.0, -30.0)
    x = law.sample(4, torch.Generator().manual_seed(3))
    result = ode_log_likelihood(flow, x, rtol=RTOL, atol=RTOL)
    start = torch.sigmoid(torch.tensor(12.0, dtype=F64))
    noisy = IsotropicGaussianMixture(start.sqrt() * law.means, (start * 0.04 + 1 - start).item())
    assert (result.log_likelihood - noisy.log_prob(x)).abs().max() < 1e-5


def _mlp_flow() -> ProbabilityFlow:
    torch.manual_seed(0)
    return ProbabilityFlow.of(DiffusionModel(MLPDenoiser(3, hidden=16, depth=1).to(F64), NoiseSchedule.linear(20)))


def test_exact_divergence_is_the_trace_of_the_jacobian():
    flow = _mlp_flow()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(11), dtype=F64)
    tau = torch.tensor(0.3, dtype=F64)
    drift, divergence = flow.drift_and_divergence(tau, x)
    assert torch.allclose(drift, flow.drift(tau, x), rtol=0, atol=1e-14)
    for n in range(4):
        jacobian = torch.autograd.functional.jacobian(lambda y: flow.drift(tau, y[None])[0], x[n])
        assert torch.allclose(divergence[0, n], torch.trace(jacobian), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_divergence_is_unbiased_at_a_point(probe):
    """4000 probes at one (x, tau): their mean within 4 standard errors of the exact divergence, and the library's
    probes (drawn by ode_log_likelihood) have mean 0 and covariance I within theirs."""
    flow = _mlp_flow()
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(12), dtype=F64)
    tau = torch.tensor(-1.0, dtype=F64)
    g = torch.Generator().manual_seed(13)
    K = 4000
    probes = torch.randn(K, 3, 3, generator=g, dtype=F64)
    probes = probes if probe == "gaussian" else torch.sign(probes)
    _, exact = flow.drift_and_divergence(tau, x)
    _, estimates = flow.drift_and_divergence(tau, x, probes)
    se = estimates.std(0) / math.sqrt(K)
    assert ((estimates.mean(0) - exact[0]).abs() < 4 * se).all()
    assert (se > 0).all()


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_for_the_exact_divergence(probe):
    schedule = NoiseSchedule.linear(20, 1e-3, 0.4)
    torch.manual_seed(0)
    network = MLPDenoiser(3, hidden=16, depth=1).to(F64)
    model = DiffusionModel(network, schedule)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    # the network embeds t in float32, so its drift is rough below ~1e-6: solve at 1e-5, far below the probes' error
    exact = ode_log_likelihood(model, x, rtol=1e-5, atol=1e-5)
    estimate = ode_log_likelihood(
        model,
        x,
        rtol=1e-5,
        atol=1e-5,
        divergence="hutchinson",
        num_probes=12,
        probe=probe,
        generator=torch.Generator().manual_seed(5),
    )
    assert estimate.divergence == "hutchinson" and estimate.probes.shape == (8, 12)
    # pooled over examples: the mean difference within 4 standard errors, and the spread of z-scores near 1
    diff = estimate.log_likelihood - exact.log_likelihood
    assert diff.mean().abs() < 4 * (estimate.stderr**2).sum().sqrt() / len(diff)
    z = diff / estimate.stderr
    assert 0.4 < z.std() < 1.8
    assert (estimate.stderr > 0).all()


def test_ode_sampler_draws_the_closed_form_law_and_is_deterministic():
    schedule, (m, S) = _schedule(), _law(2, 6)
    model = DiffusionModel(GaussianScore(schedule, m, S), schedule, data_shape=(2,))
    n = 4000
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    x, info = samplers.ode(model, x_T, rtol=1e-6, atol=1e-6, return_info=True)
    mean, cov = probability_flow_marginal(m, S, *_ends(schedule))
    se_mean = (torch.diagonal(cov) / n).sqrt()
    assert ((x.mean(0) - mean).abs() < 4 * se_mean).all()
    se_cov = ((torch.diagonal(cov)[:, None] * torch.diagonal(cov)[None] + cov**2) / n).sqrt()
    assert ((torch.cov(x.T) - cov).abs() < 4 * se_cov).all()
    assert info["nfe"] > 0 and info["method"] == "dopri5"
    again = samplers.ode(model, x_T[:10], rtol=1e-6, atol=1e-6)
    assert torch.allclose(again, x[:10], rtol=0, atol=1e-5)
    other = samplers.ode(model, x_T[10:20], rtol=1e-6, atol=1e-6)
    assert (other - x[:10]).abs().max() > 0.1
    # the map is the linear one of the closed form: x = alpha_1 m + R (x_T - alpha_T m)
    eigenvalues, U = torch.linalg.eigh(cov)
    R = U @ torch.diag(eigenvalues.sqrt()) @ U.T
    assert torch.allclose(x[:10], mean + x_T[:10] @ R.T, atol=1e-4)


def test_continuous_extension_agrees_with_the_discrete_network_at_the_steps():
    schedule = NoiseSchedule.linear(30)
    table = schedule.tables().log_snr
    t = torch.arange(1, 31)
    assert torch.equal(torch.stack([continuous_timestep(table, lam) for lam in table]), t.to(F64))
    u = torch.tensor([1.0, 2.5, 17.25, 30.0], dtype=F64)
    lam = continuous_log_snr(table, u)
    assert torch.allclose(torch.stack([continuous_timestep(table, v) for v in lam]), u, rtol=0, atol=1e-12)
    torch.manual_seed(0)
    for network, x in (
        (MLPDenoiser(2, hidden=16, depth=1), torch.randn(30, 2)),
        (UNet(1, channels=8, channel_mult=(1,), num_res_blocks=1, attention_levels=()), torch.randn(30, 1, 4, 4)),
    ):
        assert torch.equal(network(x, t.to(F64)), network(x, t))


@pytest.mark.parametrize(("prediction", "variance"), [("epsilon", "learned"), ("v", "small"), ("x0", "large")])
def test_the_flows_noise_at_each_knot_is_the_discrete_models(prediction, variance):
    torch.manual_seed(0)
    channels = 4 if variance == "learned" else 2
    network = _TwoHeads(MLPDenoiser(2, hidden=8, depth=1), channels).to(F64)
    model = DiffusionModel(network, NoiseSchedule.linear(30), prediction, variance, data_shape=(2,))
    flow = ProbabilityFlow.of(model)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(14), dtype=F64)
    for t, lam in zip((1, 13, 30), model.schedule.tables().log_snr[[0, 12, 29]], strict=True):
        # equal up to the rounding of abar = sigmoid(lambda_t) against the table (amplified by 1 / sigma_1 for x0)
        assert torch.allclose(flow.noise(x, lam), model.predicted_noise(x, torch.full((5,), t)), rtol=1e-9, atol=1e-12)


class _TwoHeads(torch.nn.Module):
    """An MLP denoiser with ``channels`` outputs (4: the prediction and learned-variance channels)."""

    def __init__(self, body: MLPDenoiser, channels: int) -> None:
        super().__init__()
        self.body, self.head = body, torch.nn.Linear(2, channels)

    def forward(self, x, t):
        return self.head(self.body(x, t))


def test_exact_gaussian_score_is_the_optimal_affine_chain_at_the_steps():
    schedule, (m, S) = _schedule(), _law(2, 8)
    model = DiffusionModel(GaussianScore(schedule, m, S), schedule, data_shape=(2,))
    chain, best = reverse_chain(model), best_affine(schedule, m, S)
    assert torch.allclose(chain.weights, best.weights, rtol=0, atol=1e-9)
    assert torch.allclose(chain.offsets, best.offsets, rtol=0, atol=1e-9)


def test_dequantised_likelihood_adds_the_bin_volume():
    schedule = NoiseSchedule.linear(20, 1e-3, 0.4)
    torch.manual_seed(0)
    model = DiffusionModel(MLPDenoiser(2, hidden=8, depth=1).to(F64), schedule, decoder="discretized", levels=5)
    x = torch.tensor([[-1.0, 0.5], [0.0, 1.0]], dtype=F64)
    result = ode_log_likelihood(model, x, rtol=1e-5, atol=1e-5, generator=torch.Generator().manual_seed(9))
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    moved = x + (u - 0.5) * 0.5
    continuous = ode_log_likelihood(ProbabilityFlow.of(model), moved, rtol=1e-5, atol=1e-5)
    assert result.levels == 5 and continuous.levels is None
    assert torch.allclose(result.log_likelihood, continuous.log_likelihood + 2 * np.log(0.5), rtol=0, atol=1e-12)
    assert result.summary()["quantity"].startswith("upper bound on -log P(x) of the 5-level data")


def test_refusals():
    schedule = NoiseSchedule.linear(10)
    model = DiffusionModel(MLPDenoiser(2, hidden=8, depth=1).to(F64), schedule)
    x = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="respaced"):
        ode_log_likelihood(model.respaced(5), x)
    with pytest.raises(ValueError, match="divergence"):
        ode_log_likelihood(model, x, divergence="trace")
    with pytest.raises(ValueError, match="method"):
        samplers.ode(model, x, method="euler")
    with pytest.raises(ValueError, match="rtol"):
        samplers.ode(model, x, rtol=0)
    with pytest.raises(ValueError, match="finite"):
        ode_log_likelihood(model, torch.full((2, 2), float("nan"), dtype=F64))
    with pytest.raises(ValueError, match="off the grid"):
        ode_log_likelihood(model, torch.full((2, 2), 0.3, dtype=F64), levels=3)
    with pytest.raises(TypeError, match="or a ProbabilityFlow"):
        ProbabilityFlow.of(object())
