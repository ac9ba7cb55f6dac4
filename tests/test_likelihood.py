r"""The importance-weighted bound (pyrodiff.evaluation.likelihood) against exact likelihoods.

The oracle: for a model whose reverse chain is linear-Gaussian, :math:`x_{t-1} = c_t x_t + d_t + \sigma_t z`
with :math:`x_T \sim N(0, 1)` (per dimension; the dimensions are independent), :math:`x_{0:T}` is jointly
Gaussian.  Its mean and covariance are built here explicitly, by inverting the linear system
:math:`(I - A) x = b + S z`, and so are the forward chain's :math:`q(x_{1:T} \mid x_0)` and the model's posterior
:math:`\pi = p(x_{1:T} \mid x_0)` (Gaussian conditioning).  From them, in float64 numpy:

- :math:`\log p(x_0)` (a marginal of the joint);
- :math:`\mathrm{ELBO} = \log p(x_0) - \mathrm{KL}(q \,\|\, \pi)` (checked against ``linear_elbo_terms``, which sums
  per-term KLs: an independent derivation);
- the relative variance of the weights :math:`v = \mathrm{Var}_q(w)/E_q[w]^2 = \int \pi^2 / q - 1` (finite only if
  :math:`2\Sigma_\pi^{-1} - \Sigma_q^{-1}` is positive definite; asserted).  With it,
  :math:`E[\mathrm{IWAE}_K] = \log p - v/(2K) + O(K^{-2})` and :math:`\mathrm{Var}(\mathrm{IWAE}_K) = v/K + O(K^{-2})`.
"""

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.stats
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pyro.infer import RenyiELBO

from pyrodiff import DiffusionGuide, DiffusionModel, NoiseSchedule
from pyrodiff.evaluation.likelihood import (
    KHAT_FINITE_VARIANCE,
    KHAT_UNRELIABLE,
    MIN_PARTICLES_FOR_KHAT,
    LikelihoodBound,
    default_chunk_size,
    khat_threshold,
    log_likelihood_bound,
    pareto_khat,
)
from pyrodiff.testing import LinearDenoiser, linear_case, linear_reverse_coefficients

T = 4
SCHEDULE = NoiseSchedule.linear(T, 0.05, 0.5)
Z = 4.5  # standard errors allowed


# ---------------------------------------------------------------- the Gaussian oracle (numpy, float64)
def _reverse_joint(c, d, sigma2):
    """Mean and covariance of (x_0, .., x_T) for one dimension: x_T ~ N(0, 1), x_{t-1} = c_t x_t + d_t + sigma_t z."""
    n = len(c) + 1
    A = np.zeros((n, n))
    A[np.arange(n - 1), np.arange(1, n)] = c
    M = np.linalg.inv(np.eye(n) - A)
    return M @ np.append(d, 0.0), M @ np.diag(np.append(sigma2, 1.0)) @ M.T


def _forward_joint(schedule, x0):
    """Mean and covariance of q(x_{1:T} | x_0) for one dimension: x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) eps_t."""
    beta = schedule.betas.numpy()
    n = len(beta)
    F = np.zeros((n, n))
    F[np.arange(1, n), np.arange(n - 1)] = np.sqrt(1 - beta[1:])
    M = np.linalg.inv(np.eye(n) - F)
    f = np.zeros(n)
    f[0] = math.sqrt(1 - beta[0]) * x0
    return M @ f, M @ np.diag(beta) @ M.T


def _gauss_logpdf(x, m, S):
    P = np.linalg.inv(S)
    return -0.5 * ((x - m) @ P @ (x - m) + np.linalg.slogdet(2 * np.pi * S)[1])


def _log_int_square_ratio(m1, S1, m2, S2, power=2):
    r""":math:`\log \int N(x; m_1, S_1)^a / N(x; m_2, S_2)^{a-1} dx` (a = ``power``), by completing the square;
    infinite unless the precision :math:`a S_1^{-1} - (a - 1) S_2^{-1}` is positive definite."""
    P1, P2 = np.linalg.inv(S1), np.linalg.inv(S2)
    lam = power * P1 - (power - 1) * P2
    if np.linalg.eigvalsh(lam).min() <= 0:
        return math.inf
    h = power * P1 @ m1 - (power - 1) * P2 @ m2
    const = power * (-0.5 * m1 @ P1 @ m1 - 0.5 * np.linalg.slogdet(2 * np.pi * S1)[1])
    const -= (power - 1) * (-0.5 * m2 @ P2 @ m2 - 0.5 * np.linalg.slogdet(2 * np.pi * S2)[1])
    return const + 0.5 * h @ np.linalg.solve(lam, h) + 0.5 * np.linalg.slogdet(2 * np.pi * np.linalg.inv(lam))[1]


def gaussian_oracle(schedule, c, d, sigma2, x0, finite_fourth_moment=False):
    """Per example (rows of ``x0``, shape (N, D)): exact log p(x0), the ELBO and the relative variance of the
    weights v = Var(w) / E[w]^2 (inf if infinite), from the explicit joint Gaussians (dimensions independent).
    With ``finite_fourth_moment``, assert that E[w^4] is finite (the regime where the delta method and the
    central limit theorem hold for the tests' replicates)."""
    mu, Sigma = _reverse_joint(c, d, sigma2)
    log_p, elbo, log1p_v = (np.zeros(x0.shape[0]) for _ in range(3))
    for n, row in enumerate(np.asarray(x0, np.float64)):
        for x in row:
            log_p[n] += -0.5 * ((x - mu[0]) ** 2 / Sigma[0, 0] + math.log(2 * math.pi * Sigma[0, 0]))
            m_post = mu[1:] + Sigma[1:, 0] / Sigma[0, 0] * (x - mu[0])
            S_post = Sigma[1:, 1:] - np.outer(Sigma[1:, 0], Sigma[0, 1:]) / Sigma[0, 0]
            m_q, S_q = _forward_joint(schedule, x)
            P_post = np.linalg.inv(S_post)
            kl = 0.5 * (
                np.trace(P_post @ S_q)
                + (m_post - m_q) @ P_post @ (m_post - m_q)
                - len(m_q)
                + np.linalg.slogdet(S_post)[1]
                - np.linalg.slogdet(S_q)[1]
            )
            elbo[n] += -0.5 * ((x - mu[0]) ** 2 / Sigma[0, 0] + math.log(2 * math.pi * Sigma[0, 0])) - kl
            log1p_v[n] += _log_int_square_ratio(m_post, S_post, m_q, S_q)
            if finite_fourth_moment:
                assert math.isfinite(_log_int_square_ratio(m_post, S_post, m_q, S_q, power=4))
    return log_p, elbo, np.expm1(log1p_v)


def linear_oracle(model, x0, finite_fourth_moment=True):
    a, b = model.network.a.detach().numpy(), model.network.b.detach().numpy()
    c, d = linear_reverse_coefficients(model.schedule, a, b, model.prediction.name)
    sigma2 = model.variance.table(model.schedule).numpy()
    return gaussian_oracle(model.schedule, c, d, sigma2, x0.numpy(), finite_fourth_moment)


def _case():
    r"""A linear model and three examples far apart (so that mixing examples up shows).  The network is the
    exact reverse of data N(0, 1) (:func:`_true_reverse_of_standard_normal`) with every coefficient perturbed
    by up to 30% and the "small" variance: the ELBO falls 1.0 to 2.1 nats short of log p, and the weights
    have moderate relative variance (0.8 to 1.7) and a finite 4th moment."""
    g = torch.Generator().manual_seed(0)
    a = (1 - SCHEDULE.alphas_cumprod).sqrt() * (1 + 0.3 * (2 * torch.rand(T, generator=g, dtype=torch.float64) - 1))
    b = 0.15 * (2 * torch.rand(T, generator=g, dtype=torch.float64) - 1)
    model = DiffusionModel(LinearDenoiser(T, a, b), SCHEDULE, "epsilon", "small", "gaussian")
    x0 = torch.tensor([[-1.5], [0.2], [1.8]], dtype=torch.float64)
    return model, x0


def _replicated(x0, R):
    """R copies of each example along the batch: row r * N + n is example n (replicates of one estimator)."""
    return x0.repeat(R, 1)


def _per_example(values, R, N):
    """(R * N,) -> (R, N)."""
    return values.reshape(R, N)


def test_the_oracle_reproduces_the_closed_form_elbo(float64):
    """The brute-force joint Gaussians against the per-term closed forms of pyrodiff.testing: the same ELBO."""
    for variance in ("small", "large"):
        for prediction in ("epsilon", "x0", "v"):
            model, x0, exact = linear_case(SCHEDULE, prediction, variance, shape=(3, 2), seed=4)
            _, elbo, _ = linear_oracle(model, x0, finite_fourth_moment=False)
            assert np.allclose(elbo, -exact.sum(1), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- exact weights
def _true_reverse_of_standard_normal(schedule):
    r"""For data :math:`x_0 \sim N(0, I)` the forward chain keeps every marginal N(0, I), and its reverse is
    :math:`x_{t-1} \mid x_t \sim N(\sqrt{\alpha_t} x_t, \beta_t)` (Bayes with unit marginals).  The epsilon network
    :math:`\hat\epsilon = \sqrt{1 - \bar\alpha_t}\, x_t` gives that mean, and the learned variance at v = 1 gives
    :math:`\beta_t` (also at t = 1), so :math:`p_\theta(x_{0:T}) = N(x_0; 0, I)\, q(x_{1:T} \mid x_0)` exactly."""
    n = schedule.num_steps
    a = (1 - schedule.alphas_cumprod).sqrt()
    network = LinearDenoiser(n, a, torch.zeros(n, dtype=a.dtype), torch.ones(n, dtype=a.dtype))
    return DiffusionModel(network, schedule, "epsilon", "learned", "gaussian")


def test_weights_of_the_exact_reverse_chain_are_the_likelihood(float64):
    """Every weight is p(x_0) = N(x_0; 0, I) exactly: signs, every term, and which example is which."""
    model = _true_reverse_of_standard_normal(SCHEDULE)
    x0 = torch.tensor([[0.3, -1.2], [2.0, 0.1], [-0.7, -2.2]])
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(x0).sum(1)
    result = log_likelihood_bound(model, x0, 30, chunk_size=7)
    assert result.log_weights.shape == (3, 30)
    assert torch.allclose(result.log_weights, log_p[:, None].expand(3, 30), atol=1e-10, rtol=0)
    assert torch.allclose(result.estimate, log_p, atol=1e-10, rtol=0)
    assert torch.allclose(result.elbo, log_p, atol=1e-10, rtol=0)
    assert (result.stderr < 1e-6).all() and (result.elbo_stderr < 1e-10).all()
    assert result.num_particles == 30 and result.dims == 2


# ---------------------------------------------------------------- K = 1 and the law of the weights
def test_one_particle_is_the_elbo_in_mean(float64):
    model, x0 = _case()
    R, N = 2000, x0.shape[0]
    _, exact_elbo, _ = linear_oracle(model, x0)
    pyro.set_rng_seed(1)
    result = log_likelihood_bound(model, _replicated(x0, R), 1)
    assert torch.equal(result.estimate, result.elbo)  # log of one weight
    assert torch.isnan(result.stderr).all() and torch.isnan(result.elbo_stderr).all() and torch.isnan(result.khat).all()
    est = _per_example(result.estimate, R, N).numpy()
    z = np.abs(est.mean(0) - exact_elbo) / (est.std(0, ddof=1) / math.sqrt(R))
    assert z.max() < Z, (est.mean(0), exact_elbo, z)


@pytest.mark.parametrize("chunk_size", [1, 13, 200])
def test_the_log_weights_have_the_right_law_for_any_chunking(chunk_size, float64):
    """Chunks are not bit-identical, so test the law: the mean log weight of each example is its exact ELBO
    within the reported standard error (examples far apart: a chunk that mixed them up would fail)."""
    model, x0 = _case()
    _, exact_elbo, _ = linear_oracle(model, x0)
    pyro.set_rng_seed(2)
    result = log_likelihood_bound(model, x0, 200, chunk_size=chunk_size)
    z = np.abs(result.elbo.numpy() - exact_elbo) / result.elbo_stderr.numpy()
    assert z.max() < Z, z
    assert np.allclose(result.elbo_stderr.numpy(), result.log_weights.numpy().std(1, ddof=1) / math.sqrt(200))


# ---------------------------------------------------------------- large K, monotonicity in K
def test_many_particles_reach_the_exact_likelihood_and_increase_with_k(float64):
    r"""R replicates of K = 1000 draws per example.  For k dividing K, :math:`E[\mathrm{IWAE}_k]` is estimated
    within each replicate by the mean of :math:`\mathrm{IWAE}_k` over its K/k disjoint blocks of k draws (far less
    noisy than one block), and its standard error from the spread of that mean over the replicates.

    Bias: :math:`E[\log \bar w] = \log p - v/(2K) + (\mu_3/3 - 3v^2/4)/K^2 + \dots` with :math:`v` the exact
    relative variance of the weights (finite 4th moment asserted).  The correction :math:`v/(2K)` is applied;
    at K = 1000 the remainder is of order :math:`v^2/K^2 \approx 10^{-5}`, far below the standard error of the
    mean over replicates (about :math:`\sqrt{v/(KR)} \approx 0.01`).  At k = 1 the expectation is the ELBO exactly."""
    model, x0 = _case()
    R, N, K = 24, x0.shape[0], 1000
    log_p, elbo, v = linear_oracle(model, x0)
    assert (log_p - elbo > 1).all() and 0.3 < v.min() and v.max() < 10  # far from tight, moderate variance
    pyro.set_rng_seed(3)
    result = log_likelihood_bound(model, _replicated(x0, R), K)
    assert torch.equal(result.at(K).estimate, result.estimate)
    blocks = {}
    for k in (1, 10, 100, K):
        lw = result.log_weights.reshape(R * N, K // k, k)
        blocks[k] = _per_example((torch.logsumexp(lw, -1) - math.log(k)).mean(-1), R, N).numpy()  # (R, N)
        mean, se = blocks[k].mean(0), blocks[k].std(0, ddof=1) / math.sqrt(R)
        assert (mean <= log_p + Z * se).all(), k  # a lower bound in expectation
        if k == 1:
            assert (np.abs(mean - elbo) < Z * se).all(), (mean, elbo, se)
    # K = 1000: unbiased after the first-order correction
    est = _per_example(result.estimate, R, N).numpy()
    z = np.abs(est.mean(0) + v / (2 * K) - log_p) / (est.std(0, ddof=1) / math.sqrt(R))
    assert z.max() < Z, (est.mean(0), log_p, z)
    # increasing in K by more than the noise: paired differences within each replicate
    for small, large in ((1, 10), (10, 100), (100, K)):
        diff = blocks[large] - blocks[small]
        assert (diff.mean(0) > Z * diff.std(0, ddof=1) / math.sqrt(R)).all(), (small, large, diff.mean(0))
    # bits/dim of the same numbers
    assert torch.allclose(result.bits_per_dim, -result.estimate / math.log(2))


def test_the_standard_error_is_the_spread_over_replicates(float64):
    r"""The reported standard error against the truth, K = 100, R = 400 replicates per example.

    - Against the exact first-order variance: :math:`E[\mathrm{se}^2] = v/K + O(K^{-2})` (the delta method).
    - Against the empirical spread, paired per replicate: :math:`d_r = \mathrm{se}_r^2 - \frac{R}{R-1}(\mathrm{IWAE}_r -
      \overline{\mathrm{IWAE}})^2` has mean :math:`E[\mathrm{se}^2] - \mathrm{Var}(\mathrm{IWAE}_K) = O(K^{-2})`.

    The :math:`O(K^{-2})` terms are about 1% of :math:`v/K` here, well under the standard errors (3% to 5%)."""
    model, x0 = _case()
    R, N, K = 400, x0.shape[0], 100
    _, _, v = linear_oracle(model, x0)
    pyro.set_rng_seed(4)
    result = log_likelihood_bound(model, _replicated(x0, R), K)
    est = _per_example(result.estimate, R, N).numpy()
    se2 = _per_example(result.stderr, R, N).numpy() ** 2
    z = np.abs(se2.mean(0) - v / K) / (se2.std(0, ddof=1) / math.sqrt(R))
    assert z.max() < Z, (se2.mean(0), v / K, z)
    d = se2 - R / (R - 1) * (est - est.mean(0)) ** 2
    z = np.abs(d.mean(0)) / (d.std(0, ddof=1) / math.sqrt(R))
    assert z.max() < Z, (se2.mean(0), est.var(0, ddof=1), z)


# ---------------------------------------------------------------- any reverse-chain Pyro model
class GaussianChainPath(dist.TorchDistribution):
    r"""The law of a path :math:`x_{1:T}` (batch shape (T, N), event (D,)) written here independently of
    pyrodiff: :math:`x_T \sim N(0, I)`, :math:`x_{k} \mid x_{k+1} \sim N(c_{k+1} x_{k+1} + d_{k+1}, \sigma_{k+1}^2 I)`."""

    arg_constraints = {}
    support = dist.constraints.independent(dist.constraints.real, 1)

    def __init__(self, c, d, sigma2, batch_shape, event_shape):
        self.c, self.d, self.sigma2 = c, d, sigma2
        super().__init__(batch_shape, event_shape)

    def log_prob(self, value):
        following = value[1:]  # row k holds x_{k+1}, k = 1..T-1
        loc = torch.cat([self.c[1:, None, None] * following + self.d[1:, None, None], torch.zeros_like(value[:1])])
        var = torch.cat([self.sigma2[1:], self.sigma2.new_ones(1)])[:, None, None]
        return torch.distributions.Normal(loc, var.sqrt()).log_prob(value).sum(-1)


class GaussianChainModel:
    r"""Not a DiffusionModel (no network, no pyrodiff code): a Pyro model with its sites and call signature,
    the path :class:`GaussianChainPath` and the decoder :math:`x_0 \mid x_1 \sim N(c_1 x_1 + d_1, \sigma_1^2 I)`."""

    def __init__(self, schedule, c, d, sigma2):
        self.schedule = schedule
        self.c, self.d, self.sigma2 = (torch.as_tensor(v, dtype=torch.float64) for v in (c, d, sigma2))

    def __call__(self, x0):
        N, T = x0.shape[0], self.schedule.num_steps
        with pyro.plate("data", N, dim=-1):
            with pyro.plate("time", T, dim=-2):
                path = pyro.sample("x_{1:T}", GaussianChainPath(self.c, self.d, self.sigma2, (T, N), x0.shape[1:]))
            decoder = dist.Normal(self.c[0] * path[0] + self.d[0], self.sigma2[0].sqrt()).to_event(1)
            return pyro.sample("x_0", decoder, obs=x0)


def test_any_pyro_model_with_the_sites(float64):
    """A reverse chain written as an independent Pyro program: the bound reaches its exact log p."""
    c, d, sigma2 = 0.9 * SCHEDULE.alphas.sqrt().numpy(), np.full(T, 0.1), 0.8 * SCHEDULE.betas.numpy()
    model = GaussianChainModel(SCHEDULE, c, d, sigma2)
    x0 = torch.tensor([[-1.0, 0.5], [1.5, 0.0]])
    R, N, K = 16, 2, 500
    log_p, elbo, v = gaussian_oracle(SCHEDULE, c, d, sigma2, x0.numpy(), finite_fourth_moment=True)
    assert (log_p - elbo > 0.1).all()  # a bound that is not tight at K = 1
    pyro.set_rng_seed(5)
    result = log_likelihood_bound(model, _replicated(x0, R), K)
    est = _per_example(result.estimate, R, N).numpy()
    z = np.abs(est.mean(0) + v / (2 * K) - log_p) / (est.std(0, ddof=1) / math.sqrt(R))
    assert z.max() < Z, (est.mean(0), log_p, z)
    elbo_est = _per_example(result.elbo, R, N).numpy()  # and the mean log weight is the ELBO
    z = np.abs(elbo_est.mean(0) - elbo) / (elbo_est.std(0, ddof=1) / math.sqrt(R))
    assert z.max() < Z, (elbo_est.mean(0), elbo, z)


# ---------------------------------------------------------------- agreement with Pyro's RenyiELBO(alpha=0)
def test_agrees_with_pyro_renyi_elbo_on_the_same_random_stream(float64):
    """One example, one particle per trace: the same draws in the same order as RenyiELBO's particles."""
    model, x0 = _case()
    x = x0[1:2]
    pyro.set_rng_seed(6)
    loss = RenyiELBO(alpha=0, num_particles=9, vectorize_particles=False).loss(model, DiffusionGuide(SCHEDULE), x)
    pyro.set_rng_seed(6)
    ours = log_likelihood_bound(model, x, 9, chunk_size=1)
    assert abs(-loss - ours.estimate.item()) < 1e-10


def test_agrees_with_pyro_renyi_elbo_in_mean(float64):
    model, x0 = _case()
    x, K, R = x0[2:3], 5, 150
    guide = DiffusionGuide(SCHEDULE)
    renyi = RenyiELBO(alpha=0, num_particles=K, vectorize_particles=False)
    pyro.set_rng_seed(7)
    theirs = -np.array([renyi.loss(model, guide, x) for _ in range(R)])
    ours = log_likelihood_bound(model, _replicated(x, R), K).estimate.numpy()
    se = math.sqrt(theirs.var(ddof=1) / R + ours.var(ddof=1) / R)
    assert abs(theirs.mean() - ours.mean()) < Z * se, (theirs.mean(), ours.mean(), se)


# ---------------------------------------------------------------- closed forms of the estimator
@given(
    arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(2, 20)), elements=st.floats(-30, 30)),
    st.integers(1, 5),
)
def test_statistics_from_log_weights_by_brute_force(lw, dims):
    """IWAE_K = log mean w; stderr^2 = sample variance of w / (K mean(w)^2) (the delta method, written
    with normalised weights in the code); ELBO = mean log w with sd / sqrt(K).  Checked on weights scaled
    by their row maximum (the same statistics: all are invariant to a common factor except IWAE, shifted)."""
    result = LikelihoodBound.from_log_weights(torch.tensor(lw), dims)
    K = lw.shape[1]
    shift = lw.max(1, keepdims=True)
    w = np.exp(lw - shift)
    assert np.allclose(result.estimate.numpy(), np.log(w.mean(1)) + shift[:, 0], rtol=1e-12, atol=1e-12)
    relvar = w.var(1, ddof=1) / w.mean(1) ** 2
    assert np.allclose(result.stderr.numpy() ** 2, relvar / K, rtol=1e-9, atol=1e-12)
    assert np.allclose(result.elbo.numpy(), lw.mean(1), rtol=1e-12, atol=1e-12)
    assert np.allclose(result.elbo_stderr.numpy(), lw.std(1, ddof=1) / math.sqrt(K), rtol=1e-12, atol=1e-12)
    assert torch.isnan(result.khat).all()  # K < 21
    assert np.allclose(result.bits_per_dim.numpy(), -result.estimate.numpy() / (dims * math.log(2)))
    assert np.allclose(result.stderr_bits_per_dim.numpy(), result.stderr.numpy() / (dims * math.log(2)))


def test_nested_estimates_use_the_first_draws():
    lw = torch.tensor([[0.0, 2.0, -1.0, 5.0], [1.0, 1.0, 3.0, -2.0]], dtype=torch.float64)
    result = LikelihoodBound.from_log_weights(lw, 3)
    for k in range(1, 5):
        sub = result.at(k)
        assert sub.num_particles == k and sub.dims == 3
        assert torch.allclose(sub.estimate, torch.logsumexp(lw[:, :k], 1) - math.log(k))
    with pytest.raises(ValueError, match=r"^k must be an integer in 1\.\.K = 1\.\.4, got 5$"):
        result.at(5)
    with pytest.raises(ValueError, match=r"^k must be an integer in 1\.\.K = 1\.\.4, got 0$"):
        result.expected_at(0)
    with pytest.raises(TypeError, match="integer"):
        result.at(2.0)


# ---------------------------------------------------------------- Pareto k-hat
def test_khat_recovers_the_tail_shape_of_generalized_pareto_weights():
    r"""Rows of weights drawn from a generalized Pareto with shape :math:`\xi`: their k-hat is near :math:`\xi`.
    Tolerance: 4.5 standard errors of the mean over the replicate rows (their empirical spread, about
    :math:`(1 + \xi)/\sqrt M` each with :math:`M = 3\sqrt K` tail draws), plus the bias of ArviZ's weak prior
    (10 pseudo-draws at 0.5), at most :math:`10|\xi - 0.5|/(M + 10)`."""
    rng = np.random.default_rng(0)
    K, R = 4000, 10
    xis = np.array([0.0, 0.3, 0.6, 0.9])
    w = np.stack([scipy.stats.genpareto.rvs(xi, size=K, random_state=rng) for xi in np.repeat(xis, R)])
    khat = pareto_khat(torch.tensor(np.log(w))).numpy().reshape(len(xis), R)
    M = math.ceil(min(K / 5, 3 * math.sqrt(K)))
    tolerance = Z * khat.std(1, ddof=1) / math.sqrt(R) + 10 * np.abs(xis - 0.5) / (M + 10)
    assert (np.abs(khat.mean(1) - xis) < tolerance).all(), (khat.mean(1), tolerance)
    # a shift of the log weights (a common factor of the weights) does not change the shape
    shifted = pareto_khat(torch.tensor(np.log(w[:3]) + 7.0)).numpy()
    assert np.allclose(shifted, khat.reshape(-1)[:3])


def test_khat_is_nan_below_the_minimum_number_of_particles():
    """ArviZ fits the M = ceil(min(K / 5, 3 sqrt K)) largest weights and needs M >= 5: K >= 21."""
    assert min(k for k in range(1, 100) if math.ceil(min(k / 5, 3 * math.sqrt(k))) >= 5) == 21
    lw = torch.tensor(np.random.default_rng(1).normal(size=(5, 40)))
    assert torch.isnan(pareto_khat(lw[:, :20])).all()
    assert torch.isfinite(pareto_khat(lw[:, :21])).all()
    assert MIN_PARTICLES_FOR_KHAT == 21
    lw[1, 3] = float("nan")
    lw[2, 4] = float("inf")
    lw[3, :5] = -float("inf")  # zero weights are valid weights
    lw[4] = -float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        k = pareto_khat(lw)
    assert torch.isfinite(k[[0, 3]]).all() and torch.isnan(k[[1, 2, 4]]).all()
    tiny = lw[3].clone()
    tiny[:5] = -1e3  # weights of exp(-1000): the same fit as zero weights
    assert torch.allclose(k[3], pareto_khat(tiny[None])[0].to(k))


def test_khat_thresholds_are_vehtari_et_al_s():
    """min(1 - 1/log10 S, 0.7), against values computed by hand: log10 21 = 1.3222193, log10 64 = 1.8061800,
    log10 1000 = 3; it reaches 0.7 between S = 2154 (log10 = 3.3332457) and 2155 (3.3334473)."""
    assert (KHAT_FINITE_VARIANCE, KHAT_UNRELIABLE) == (0.5, 0.7)
    hand = {21: 0.2436958, 64: 0.4463453, 100: 0.5, 1000: 0.6666667, 2154: 0.6999921, 2155: 0.7, 10**6: 0.7}
    for draws, expected in hand.items():
        assert khat_threshold(draws) == pytest.approx(expected, abs=1e-7), draws
    with pytest.raises(ValueError, match="num_draws must be an integer >= 21, got 20"):
        khat_threshold(20)
    with pytest.raises(TypeError, match="num_draws must be an integer"):
        khat_threshold(100.0)


# ---------------------------------------------------------------- chunks and bad input
class CountingModel(GaussianChainModel):
    """Counts the traces (one per particle chunk) and the batch sizes it sees."""

    def __init__(self, *args):
        super().__init__(*args)
        self.batches = []

    def __call__(self, x0):
        self.batches.append(x0.shape[0])
        return super().__call__(x0)


@pytest.mark.parametrize(
    "num_particles, chunk_size, batches",
    [(30, 7, [21, 21, 21, 21, 6]), (30, 100, [90]), (30, None, [90]), (700, None, [1023, 1023, 54])],
)
def test_particles_are_drawn_in_chunks(num_particles, chunk_size, batches, float64):
    """N = 3 examples: chunks of 7 particles (the last of 2), one chunk of all K, or the default chunk of
    4096 // (N T) = 341 particles (capped at K): a batch of 1023, about 4096 network inputs."""
    model = CountingModel(SCHEDULE, np.ones(T), np.zeros(T), np.full(T, 0.5))
    x0 = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    result = log_likelihood_bound(model, x0, num_particles, chunk_size=chunk_size)
    assert model.batches == batches and result.log_weights.shape == (3, num_particles)


def test_default_chunk_keeps_the_network_batch_near_the_budget():
    assert default_chunk_size(4, 1000, 2**15) == 8
    assert default_chunk_size(64, 1000, 2**12) == 1
    assert default_chunk_size(3, 4, 120) == 10


def test_bad_input_is_refused(float64):
    model, x0 = _case()
    for k in (0, -3):
        with pytest.raises(ValueError, match="num_particles"):
            log_likelihood_bound(model, x0, k)
    for k in (2.0, True, "3", None):
        with pytest.raises(TypeError, match="num_particles"):
            log_likelihood_bound(model, x0, k)
    with pytest.raises(ValueError, match="chunk_size"):
        log_likelihood_bound(model, x0, 4, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        log_likelihood_bound(model, x0, 4, chunk_size=1.5)
    with pytest.raises(ValueError, match="shape"):
        log_likelihood_bound(model, x0[:, 0], 4)
    with pytest.raises(TypeError, match="floating"):
        log_likelihood_bound(model, x0.long(), 4)
    with pytest.raises(TypeError, match="tensor"):
        log_likelihood_bound(model, x0.numpy(), 4)
    with pytest.raises(TypeError, match="schedule"):
        log_likelihood_bound(lambda x: None, x0, 4)
    with pytest.raises(ValueError, match="dims"):
        LikelihoodBound.from_log_weights(torch.zeros(2, 3), 0)


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_broken_weights_are_refused(float64):
    model, x0 = _case()
    model.network.b.data[1] = float("nan")
    with pytest.raises(FloatingPointError, match="log importance weight"):
        log_likelihood_bound(model, x0, 3)


def test_expected_iwae_averages_disjoint_blocks():
    """expected_at(k): the mean of IWAE_k over the floor(K / k) disjoint blocks, written out with numpy."""
    lw = torch.tensor([[0.0, 2.0, -1.0, 5.0, 0.5], [1.0, 1.0, 3.0, -2.0, 0.0]], dtype=torch.float64)
    result = LikelihoodBound.from_log_weights(lw, 3)
    x = lw.numpy()
    for k, blocks in ((1, [[0], [1], [2], [3], [4]]), (2, [[0, 1], [2, 3]]), (3, [[0, 1, 2]]), (5, [[0, 1, 2, 3, 4]])):
        expected = np.mean([np.log(np.exp(x[:, b]).mean(1)) for b in blocks], axis=0)
        assert np.allclose(result.expected_at(k).numpy(), expected, rtol=1e-12)
    assert torch.allclose(result.expected_at(1), result.elbo)
    with pytest.raises(ValueError, match=r"k must be an integer in 1\.\.K = 1\.\.5, got 6"):
        result.expected_at(6)
