"""The continuous-time bound (pyrodiff/chain/continuous.py) in the exactly solvable Gaussian case: data N(m, S) in
D = 2 and a noise predictor affine in z at each noise level, eps_hat(z, gamma) = A(gamma) z + b(gamma).

The closed forms (pyrodiff.theory.exact: continuous_elbo_terms, expected_continuous_elbo_terms,
diffusion_estimator_moments) are checked against independent derivations: Gauss-Hermite quadrature over eps of the
network itself and scipy's adaptive quadrature over gamma or t; for the optimal predictor E[eps | z], the
I-MMSE integral in closed form and the chain rule H(q) + KL(q(z_1) || N(0, I)) + E KL(q(x | z_0) || p(x | z_0)).
The Pyro program's estimates agree with them within their standard errors; the discrete bounds of the chain at K
steps decrease toward them; two interiors with the same endpoints have the same mean and different variances;
gradients in the schedule's parameters are checked against finite differences with common random numbers and, in
expectation, against the closed form; interior="variance" gives the interior the gradient of sum L_diff^2."""

import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from scipy import integrate
from torch import nn
from torch.distributions import MultivariateNormal, kl_divergence

from pyrodiff import ContinuousDiffusionModel, ContinuousGuide, DiffusionModel
from pyrodiff.chain.log_snr import LearnedSchedule, LinearLogSNR, NoiseLevelInput
from pyrodiff.chain.reverse import _RespacedNetwork
from pyrodiff.theory import exact as E

F64 = torch.float64
MEAN = torch.tensor([0.5, -0.3], dtype=F64)
_L = torch.tensor([[0.8, 0.0], [0.3, 0.5]], dtype=F64)
COV = _L @ _L.T
GAMMA_MIN, GAMMA_MAX = -8.0, 4.0
LEVEL = NoiseLevelInput()


class AffineNoise(nn.Module):
    r"""eps_hat(z, c) = (gain A(gamma) + skew cos(gamma) J) z + b(gamma), gamma = NoiseLevelInput.gamma(c), with
    A(gamma) = sigma (alpha^2 S' + sigma^2 I)^{-1}, J = [[0, 1], [-1, 0]] (so that the matrix need not be symmetric)
    and b(gamma) = -alpha A m' + shift (sin gamma, cos gamma): with (m', S') the data's law, shift = skew = 0 and
    gain = 1 it is E[eps | z_gamma] (the optimal predictor)."""

    def __init__(self, mean=MEAN, cov=COV, shift: float = 0.0, gain: float = 1.0, skew: float = 0.0) -> None:
        super().__init__()
        self.mean, self.cov, self.shift, self.skew = mean, cov, shift, skew
        self.gain = nn.Parameter(torch.tensor(gain, dtype=F64))
        self.data_shape = (mean.numel(),)

    def coefficients(self, gamma):
        a2, s2 = torch.sigmoid(-gamma)[:, None, None], torch.sigmoid(gamma)[:, None, None]
        A = s2.sqrt() * torch.linalg.inv(a2 * self.cov + s2 * torch.eye(self.mean.numel(), dtype=F64))
        b = -a2[..., 0].sqrt() * (A @ self.mean) + self.shift * torch.stack([gamma.sin(), gamma.cos()], -1)
        J = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=F64)
        return self.gain * A + self.skew * gamma.cos()[:, None, None] * J, b

    def forward(self, z, c):
        A, b = self.coefficients(LEVEL.gamma(c))
        return torch.einsum("bij,bj->bi", A, z) + b


#: a predictor that is not the optimal one: another law and an offset that turns with gamma
def _suboptimal(gain: float = 1.0) -> AffineNoise:
    return AffineNoise(
        torch.tensor([0.1, 0.2], dtype=F64), torch.diag(torch.tensor([0.3, 1.5])).double(), 0.3, gain, 0.4
    )


def _learned(gamma_min=GAMMA_MIN, gamma_max=GAMMA_MAX, seed=2, hidden=4) -> LearnedSchedule:
    """A learned schedule with a far-from-linear interior (fixed random parameters)."""
    schedule = LearnedSchedule(10, gamma_min, gamma_max, hidden=hidden)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        schedule.w1.fill_(0.5)
        schedule.b1.fill_(-0.2)
        schedule.w2.copy_(torch.randn(hidden, generator=g, dtype=F64) * 8)
        schedule.b2.copy_(torch.randn(hidden, generator=g, dtype=F64) * 2)
        schedule.w3.copy_(torch.rand(hidden, generator=g, dtype=F64) * 2)
    return schedule.check()


def _model(network=None, schedule=None, interior="bound"):
    schedule = LinearLogSNR(10, GAMMA_MIN, GAMMA_MAX) if schedule is None else schedule
    network = _suboptimal() if network is None else network
    return ContinuousDiffusionModel(network, schedule, decoder="gaussian", interior=interior)


def _data(n: int, seed: int = 1) -> torch.Tensor:
    return MultivariateNormal(MEAN, COV).sample((n,)) if seed is None else _draw(n, seed)


def _draw(n, seed):
    g = torch.Generator().manual_seed(seed)
    return MEAN + torch.randn(n, 2, generator=g, dtype=F64) @ _L.T


# ---------------------------------------------------------------------- independent derivations (numpy, scipy)
#: probabilists' Gauss-Hermite nodes and weights in D = 2: exact for E f(eps), eps ~ N(0, I), f of degree <= 5 in each
_GH = np.array([-math.sqrt(3), 0.0, math.sqrt(3)]), np.array([1 / 6, 2 / 3, 1 / 6])
EPS = torch.tensor([[a, b] for a in _GH[0] for b in _GH[0]], dtype=F64)
EPS_W = torch.tensor([wa * wb for wa in _GH[1] for wb in _GH[1]], dtype=F64)


def _residual_powers(network, x, gamma):
    """E||eps - eps_hat(alpha x + sigma eps, gamma)||^2 and its fourth moment, by Gauss-Hermite over eps."""
    alpha, sigma = math.sqrt(1 / (1 + math.exp(gamma))), math.sqrt(1 / (1 + math.exp(-gamma)))
    z = alpha * x + sigma * EPS
    with torch.no_grad():
        r2 = (EPS - network(z, LEVEL(torch.full((len(EPS),), gamma, dtype=F64)))).pow(2).sum(-1)
    return float(EPS_W @ r2), float(EPS_W @ r2.pow(2))


def _quad(f, low, high):
    value, error = integrate.quad(f, low, high, epsabs=1e-13, epsrel=1e-13, limit=400)
    assert error < 1e-9
    return value


def _optimal_expected_bound(gamma_0, gamma_1, m=MEAN, S=COV):
    """For the optimal predictor, E_q[-ELBO] = H(q(x)) + KL(q(z_1) || N(0, I)) + E_{z_0} KL(q(x | z_0) || p(x | z_0)):
    the diffusion part of the joint KL vanishes in continuous time (the reverse steps are q's).  All Gaussian."""
    D, eye = m.numel(), torch.eye(m.numel(), dtype=F64)
    entropy = 0.5 * torch.logdet(2 * math.pi * math.e * S)
    a1, s1 = (torch.sigmoid(torch.tensor(v, dtype=F64)) for v in (-gamma_1, gamma_1))
    prior = kl_divergence(MultivariateNormal(a1.sqrt() * m, a1 * S + s1 * eye), MultivariateNormal(0 * m, eye))
    a0, s0 = (torch.sigmoid(torch.tensor(v, dtype=F64)) for v in (-gamma_0, gamma_0))
    post = torch.linalg.inv(torch.linalg.inv(S) + a0 / s0 * eye)  # Cov(x | z_0)
    v = math.exp(gamma_0)  # the decoder's variance sigma_0^2 / alpha_0^2
    c, G = post @ torch.linalg.solve(S, m), post * a0.sqrt() / s0 - eye / a0.sqrt()  # E[x | z_0] - z_0/alpha_0
    V0 = a0 * S + s0 * eye
    mismatch = (c + G @ (a0.sqrt() * m)).pow(2).sum() + torch.trace(G @ V0 @ G.T)
    decoder = 0.5 * (torch.trace(post) / v + mismatch / v - D + D * math.log(v) - torch.logdet(post))
    return (entropy + prior + decoder).item()


# ---------------------------------------------------------------------- the closed forms
def test_the_optimal_predictors_bound_is_the_chain_rule_and_its_diffusion_term_the_immse_integral():
    """Diffusion term of E[eps | z]: 1/2 int F dgamma with F = sum_i lambda_i / (lambda_i + e^gamma) (lambda_i the
    eigenvalues of S), = 1/2 sum_i [gamma - log(lambda_i + e^gamma)] between the endpoints."""
    terms = E.expected_continuous_elbo_terms(_model(AffineNoise()), MEAN, COV)
    lam = torch.linalg.eigvalsh(COV)

    def antiderivative(g):
        return (g - torch.log(lam + math.exp(g))).sum().item()

    assert terms[2].item() == pytest.approx(0.5 * (antiderivative(GAMMA_MAX) - antiderivative(GAMMA_MIN)), rel=1e-12)
    assert terms.sum().item() == pytest.approx(_optimal_expected_bound(GAMMA_MIN, GAMMA_MAX), rel=1e-12)


@pytest.mark.parametrize("gamma_min", [-8.0, -3.0])
def test_the_terms_of_each_example_by_quadrature_of_the_network(gamma_min):
    """Prior against torch's KL; decoder against Gauss-Hermite of -log N(x; z_0/alpha_0, e^gamma_0 I) over eps;
    diffusion against scipy's quad over gamma of Gauss-Hermite over eps of the network's own output."""
    model = _model(schedule=LinearLogSNR(10, gamma_min, GAMMA_MAX))
    x = _draw(3, 2)
    terms = E.continuous_elbo_terms(model, x)
    a1, s1 = 1 / (1 + math.exp(GAMMA_MAX)), 1 / (1 + math.exp(-GAMMA_MAX))
    a0, s0 = 1 / (1 + math.exp(gamma_min)), 1 / (1 + math.exp(-gamma_min))
    for i in range(len(x)):
        eye = torch.eye(2, dtype=F64)
        prior = kl_divergence(MultivariateNormal(math.sqrt(a1) * x[i], s1 * eye), MultivariateNormal(0 * x[i], eye))
        z0 = math.sqrt(a0) * x[i] + math.sqrt(s0) * EPS
        decoder = -EPS_W @ torch.distributions.Normal(z0 / math.sqrt(a0), math.exp(gamma_min / 2)).log_prob(x[i]).sum(
            -1
        )
        diffusion = 0.5 * _quad(lambda g, xi=x[i]: _residual_powers(model.network, xi, g)[0], gamma_min, GAMMA_MAX)
        assert terms[i].tolist() == pytest.approx([prior.item(), decoder.item(), diffusion], rel=1e-9)
    assert terms[:, 1].tolist() == pytest.approx([math.log(2 * math.pi) + gamma_min + 1] * 3, rel=1e-14)  # D/2 (...)


def test_the_expected_terms_are_the_mean_over_the_data_law():
    """Every term is quadratic in x: Gauss-Hermite over x ~ N(m, S) (9 nodes) gives the expectation exactly."""
    model = _model(schedule=_learned())
    nodes = MEAN + EPS @ _L.T
    mean_of_points = EPS_W @ E.continuous_elbo_terms(model, nodes)
    assert E.expected_continuous_elbo_terms(model, MEAN, COV).tolist() == pytest.approx(
        mean_of_points.tolist(), rel=1e-12
    )


def test_the_estimators_moments_by_quadrature_in_t():
    """E L and E L^2 of L = 1/2 gamma'(t) ||eps - eps_hat||^2 (t uniform, eps normal) against scipy's quad over t of
    Gauss-Hermite over eps (exact for the fourth power) through a learned interior."""
    model = _model(schedule=_learned())
    x = _draw(1, 3)
    first, second = E.diffusion_estimator_moments(model, x)
    for i in range(len(x)):

        def moment(t, power, xi=x[i]):
            at = model.schedule.at(torch.tensor([t], dtype=F64))
            rate = at.rate.item()
            return (0.5 * rate) ** power * _residual_powers(model.network, xi, at.gamma.item())[power - 1]

        assert first[i].item() == pytest.approx(_quad(lambda t: moment(t, 1), 0.0, 1.0), rel=1e-9)
        assert second[i].item() == pytest.approx(_quad(lambda t: moment(t, 2), 0.0, 1.0), rel=1e-9)


# ---------------------------------------------------------------------- two interiors with the same endpoints
def test_two_interiors_have_the_same_mean_and_different_variances():
    linear, learned = _model(), _model(schedule=_learned())
    x = _draw(8, 4)
    bound = E.continuous_elbo_terms(linear, x)[:, 2]
    assert torch.equal(bound, E.continuous_elbo_terms(learned, x)[:, 2])  # the gamma integral sees only the endpoints
    (m1, s1), (m2, s2) = E.diffusion_estimator_moments(linear, x), E.diffusion_estimator_moments(learned, x)
    assert m1.tolist() == pytest.approx(bound.tolist(), rel=1e-9)
    assert m2.tolist() == pytest.approx(bound.tolist(), rel=1e-9)
    ratio = (s2 - m2**2) / (s1 - m1**2)
    assert (ratio > 1.5).all() or (ratio < 1 / 1.5).all()


@pytest.mark.parametrize("learned", [False, True])
def test_the_estimators_sample_mean_and_variance_agree_with_the_closed_form(learned):
    """n = 20000 independent (t, eps) draws for one example: the sample mean within 4 standard errors of E L, the
    sample variance within 4 standard errors (sqrt((m4 - s^4)/n), from the sample) of E L^2 - (E L)^2."""
    model = _model(schedule=_learned() if learned else None)
    x = _draw(1, 5)
    first, second = E.diffusion_estimator_moments(model, x)
    n = 20000
    g = torch.Generator().manual_seed(6)
    t, eps = torch.rand(n, generator=g, dtype=F64), torch.randn(n, 2, generator=g, dtype=F64)
    with torch.no_grad():
        loss = model.diffusion_loss(x.expand(n, 2), t, eps)
    variance = (second - first**2).item()
    assert abs(loss.mean().item() - first.item()) < 4 * loss.std().item() / math.sqrt(n)
    centred = loss - loss.mean()
    se = math.sqrt(((centred**4).mean() - centred.var() ** 2).item() / n)
    assert abs(centred.var().item() - variance) < 4 * se


# ---------------------------------------------------------------------- the Pyro program
@pytest.mark.parametrize("estimator", [Trace_ELBO, TraceMeanField_ELBO])
def test_the_programs_elbo_agrees_with_the_closed_form_within_its_standard_error(estimator):
    model = _model(schedule=_learned())
    guide = ContinuousGuide(model.schedule)
    x = _draw(64, 7)
    exact = E.continuous_elbo_terms(model, x).sum().item()
    elbo = estimator()
    losses = torch.tensor([elbo.loss(model, guide, x) for _ in range(300)])
    se = losses.std().item() / math.sqrt(len(losses))
    assert abs(losses.mean().item() - exact) < 4 * se, (losses.mean().item(), exact, se)
    assert 4 * se < 0.1 * exact  # the test sees a term wrong by a tenth of the bound


def test_the_programs_sites_are_the_bounds_terms():
    """One trace: the model's "diffusion" factor is minus diffusion_loss at the guide's (t, eps_t); "x_0" is scored
    by VDM's decoder at z_0 = alpha_0 x + sigma_0 eps_0; the guide's z_1 is q(z_1 | x)."""
    model = _model(schedule=_learned())
    guide = ContinuousGuide(model.schedule)
    x = _draw(5, 8)
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, guide_trace)).get_trace(x)
    t, eps_t, eps_0 = (guide_trace.nodes[n]["value"] for n in ("t", "eps_t", "eps_0"))
    at = model.schedule.at(t)
    alpha, sigma = torch.sigmoid(-at.gamma).sqrt()[:, None], torch.sigmoid(at.gamma).sqrt()[:, None]
    with torch.no_grad():
        residual = eps_t - model.network(alpha * x + sigma * eps_t, LEVEL(at.gamma))
    diffusion = model_trace.nodes["diffusion"]
    factor = diffusion["fn"].log_prob(diffusion["value"])
    assert factor.tolist() == pytest.approx((-0.5 * at.rate * residual.pow(2).sum(-1)).tolist(), rel=1e-12)
    a0, s0 = 1 / (1 + math.exp(GAMMA_MIN)), 1 / (1 + math.exp(-GAMMA_MIN))
    z0 = math.sqrt(a0) * x + math.sqrt(s0) * eps_0
    decoder = torch.distributions.Normal(z0 / math.sqrt(a0), math.exp(GAMMA_MIN / 2)).log_prob(x).sum(-1)
    assert model_trace.nodes["x_0"]["fn"].log_prob(x).tolist() == pytest.approx(decoder.tolist(), rel=1e-12)
    a1, s1 = 1 / (1 + math.exp(GAMMA_MAX)), 1 / (1 + math.exp(-GAMMA_MAX))
    z1 = guide_trace.nodes["z_1"]["fn"]
    assert z1.mean.reshape(-1).tolist() == pytest.approx((math.sqrt(a1) * x).reshape(-1).tolist(), rel=1e-12)
    assert z1.variance.reshape(-1).tolist() == pytest.approx([s1] * 10, rel=1e-12)
    assert ((t >= 0) & (t < 1)).all() and torch.sort(t).values.diff().tolist() == pytest.approx([1 / 5] * 4)


# ---------------------------------------------------------------------- the discrete bounds
def _discrete_closed_form(model, K):
    """E_q[-ELBO] of the chain at K steps written out: prior and decoder as in continuous time, and for k = 2..K
    KL(q(x_{k-1} | x_k, x_0) || p(x_{k-1} | x_k)) = 1/2 (SNR_{k-1} - SNR_k) E||x - x_hat||^2
    = 1/2 (e^{gamma_k - gamma_{k-1}} - 1) E||eps - eps_hat(x_k, gamma_k)||^2 (Kingma et al. 2021, eq. 13)."""
    gamma = model.schedule.gamma(torch.linspace(0, 1, K, dtype=F64)).detach()
    terms = E.expected_continuous_elbo_terms(model, MEAN, COV)
    total = terms[0].item() + terms[1].item()
    for k in range(1, K):
        g = gamma[k].item()
        nodes = MEAN + EPS @ _L.T  # Gauss-Hermite over x too: the squared residual is quadratic in (x, eps)
        F = sum(w * _residual_powers(model.network, node, g)[0] for w, node in zip(EPS_W.tolist(), nodes, strict=True))
        total += 0.5 * math.expm1(g - gamma[k - 1].item()) * F
    return total


def test_the_discrete_bound_is_the_sum_of_its_steps_kls():
    model = _model(schedule=_learned())
    chain = model.discretised(10)
    assert E.expected_elbo(chain, MEAN, COV).neg().item() == pytest.approx(_discrete_closed_form(model, 10), rel=1e-10)


def test_the_discrete_bounds_decrease_toward_the_continuous_one():
    """At K = 10, 100, 1000, 10000 steps (exact, pyrodiff.theory.exact on the chain model.discretised(K)): strictly
    decreasing, above the continuous bound, and the gap shrinks as 1/K."""
    model = _model(schedule=_learned())
    continuous = E.expected_continuous_elbo_terms(model, MEAN, COV).sum().item()
    bounds = [E.expected_elbo(model.discretised(K), MEAN, COV).neg().item() for K in (10, 100, 1000, 10000)]
    gaps = [b - continuous for b in bounds]
    assert all(a > b for a, b in zip(gaps, gaps[1:], strict=False)) and gaps[-1] > 0
    assert gaps[-1] < 1e-2 * abs(continuous)
    assert 9 < gaps[-2] / gaps[-1] < 11  # O(1/K): the continuous closed form is the limit, not just below


def test_the_chains_decoder_term_is_the_continuous_models_at_every_k():
    """VDM's decoder at t = 1 (mean x_1 / sqrt(abar_1), variance 1/SNR_1) makes L_0 the continuous decoder term."""
    model = _model(schedule=_learned())
    decoder = E.expected_continuous_elbo_terms(model, MEAN, COV)[1].item()
    for K in (2, 10, 300):
        assert E.expected_elbo_terms(model.discretised(K), MEAN, COV)[0].item() == pytest.approx(decoder, rel=1e-10)


# ---------------------------------------------------------------------- gradients
def _params(schedule):
    return dict(schedule.named_parameters())


def _loss(model, guide, x, seed):
    pyro.set_rng_seed(seed)
    return Trace_ELBO().differentiable_loss(model, guide, x)


def test_the_elbos_gradient_in_the_schedule_is_its_finite_difference_with_common_random_numbers():
    model = _model(schedule=_learned())
    guide = ContinuousGuide(model.schedule)
    x = _draw(6, 9)
    params = _params(model.schedule)
    grads = torch.autograd.grad(_loss(model, guide, x, 10), list(params.values()))
    h = 1e-6
    for (name, p), grad in zip(params.items(), grads, strict=True):
        for i in range(min(p.numel(), 3)):
            with torch.no_grad():
                p.view(-1)[i] += h
                up = _loss(model, guide, x, 10).item()
                p.view(-1)[i] -= 2 * h
                down = _loss(model, guide, x, 10).item()
                p.view(-1)[i] += h
            assert grad.view(-1)[i].item() == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-6), (name, i)


def test_the_expected_gradient_is_the_closed_forms_endpoints_only():
    """Over 200 draws, the mean Trace_ELBO gradient in gamma_0 and gamma_1 is within 4.5 standard errors of the
    derivative of the closed-form bound (through the prior, the decoder and the diffusion integral's limits), and in
    the interior's parameters of 0 (the bound does not depend on the interior)."""
    model = _model(schedule=_learned())
    guide = ContinuousGuide(model.schedule)
    x = _draw(64, 11)
    params = _params(model.schedule)
    draws = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(_loss(model, guide, x, s), list(params.values()))])
            for s in range(200)
        ]
    )
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    expected = torch.zeros_like(mean)
    h = 1e-5
    for j, name in enumerate(params):
        if name in ("gamma_0", "gamma_1"):
            p = params[name]
            with torch.no_grad():
                p += h
                up = E.continuous_elbo_terms(model, x).sum().item()
                p -= 2 * h
                down = E.continuous_elbo_terms(model, x).sum().item()
                p += h
            expected[j] = (up - down) / (2 * h)
    assert list(params)[:2] == ["gamma_0", "gamma_1"]  # the first two entries of the flat gradient
    assert ((mean - expected).abs() < 4.5 * se).all(), ((mean - expected) / se).tolist()


# ---------------------------------------------------------------------- interior="variance"
def _grads(model, x, seed):
    guide = ContinuousGuide(model.schedule)
    loss = _loss(model, guide, x, seed)
    params = {**{f"schedule.{k}": v for k, v in _params(model.schedule).items()}, "network.gain": model.network.gain}
    return dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))


def _draws(model, x, seed):
    pyro.set_rng_seed(seed)
    trace = poutine.trace(ContinuousGuide(model.schedule)).get_trace(x)
    return trace.nodes["t"]["value"], trace.nodes["eps_t"]["value"]


@pytest.mark.parametrize("interior", ["variance", "bound"])
def test_the_interiors_gradient_is_that_of_the_squared_diffusion_loss_with_variance(interior):
    """With fixed draws: the interior's parameters get d/d eta sum_i L_i^2 ("variance") or d/d eta sum_i L_i (the
    bound's: nothing else depends on the interior), while the network and the endpoints get the bound's gradient."""
    schedule = _learned()
    x = _draw(6, 12)
    network = _suboptimal(gain=0.9)
    got = _grads(_model(network, schedule, interior), x, 13)
    bound = _grads(_model(network, schedule, "bound"), x, 13)
    t, eps = _draws(_model(network, schedule), x, 13)
    loss = _model(network, schedule).diffusion_loss(x, t, eps)
    target = (loss.pow(2) if interior == "variance" else loss).sum()
    names = ["w1", "b1", "w2", "b2", "w3"]
    direct = torch.autograd.grad(target, [getattr(schedule, n) for n in names])
    for name, grad in zip(names, direct, strict=True):
        assert got[f"schedule.{name}"].tolist() == pytest.approx(grad.tolist(), rel=1e-10, abs=1e-12), name
        if interior == "variance":
            assert not torch.allclose(got[f"schedule.{name}"], bound[f"schedule.{name}"])
    for name in ("schedule.gamma_0", "schedule.gamma_1", "network.gain"):
        assert got[name].item() == pytest.approx(bound[name].item(), rel=1e-12), name


# ---------------------------------------------------------------------- DiffusionModel(noise_level=)
class _Spy(nn.Module):
    """Returns zeros and records every noise-level input it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros((), dtype=F64))
        self.calls: list[torch.Tensor] = []

    def forward(self, z, c):
        self.calls.append(c.detach().clone())
        return self.weight * z


def test_the_chain_calls_its_network_with_the_noise_level_of_each_step():
    schedule = _learned()
    spy = _Spy()
    chain = ContinuousDiffusionModel(spy, schedule, decoder="gaussian").discretised(7)
    assert isinstance(chain, DiffusionModel) and chain.noise_level == LEVEL
    gamma = schedule.gamma(torch.linspace(0, 1, 7, dtype=F64)).detach()
    t = torch.tensor([1, 4, 7, 2])
    chain.predict(torch.zeros(4, 2, dtype=F64), t)
    assert spy.calls[-1].tolist() == pytest.approx(LEVEL(gamma[t - 1]).tolist(), rel=1e-13)
    respaced = chain.respaced(3)  # steps 1, 4, 7 of the chain
    assert respaced.network is spy and not isinstance(respaced.network, _RespacedNetwork)
    respaced.predict(torch.zeros(3, 2, dtype=F64), torch.tensor([1, 2, 3]))
    assert spy.calls[-1].tolist() == pytest.approx(LEVEL(gamma[[0, 3, 6]]).tolist(), rel=1e-13)


def test_the_chains_decoder_is_vdms():
    """At t = 1: mean x_1 / sqrt(abar_1) and variance (1 - abar_1)/abar_1 = e^gamma_0, whatever the network says."""
    chain = _model(_suboptimal(), _learned()).discretised(5)
    x1 = _draw(3, 14)
    step = chain.predict(x1, torch.ones(3, dtype=torch.long))
    abar = 1 / (1 + math.exp(GAMMA_MIN))
    assert step.mean.reshape(-1).tolist() == pytest.approx((x1 / math.sqrt(abar)).reshape(-1).tolist(), rel=1e-13)
    assert step.variance.reshape(-1).tolist() == pytest.approx([(1 - abar) / abar] * 3, rel=1e-10)
    assert step.variance.reshape(-1)[0].item() == pytest.approx(math.exp(GAMMA_MIN), rel=1e-10)
    float32 = ContinuousDiffusionModel(_Spy().float(), LinearLogSNR(100), decoder="gaussian").discretised()
    step = float32.predict(x1.float(), torch.ones(3, dtype=torch.long))  # 1 - abar_1 = 1.7e-6 cancels in float32
    assert step.variance.reshape(-1).tolist() == pytest.approx([math.exp(-13.3)] * 3, rel=1e-5)
    other = chain.predict(x1, torch.full((3,), 3))  # elsewhere the network's step and the "small" variance
    tables = chain.schedule.tables()
    assert other.variance.reshape(-1).tolist() == pytest.approx([tables.posterior_variance[2].item()] * 3, rel=1e-12)


def test_plain_svi_trains_the_schedule_and_the_network_together():
    """The guide registers the schedule (pyro.module), the model the network: one SVI step moves both, and a step
    lowers the closed-form bound of a model far from its optimum."""
    from pyro.infer import SVI
    from pyro.optim import Adam

    model = _model(_suboptimal(gain=0.5), _learned())
    guide = ContinuousGuide(model.schedule)
    x = _draw(256, 15)
    before = {k: v.detach().clone() for k, v in [*model.schedule.named_parameters(), ("gain", model.network.gain)]}
    bound = E.continuous_elbo_terms(model, x).sum().item()
    svi = SVI(model, guide, Adam({"lr": 0.02}), TraceMeanField_ELBO())
    for _ in range(5):
        svi.step(x)
    store = pyro.get_param_store()
    assert {"schedule$$$gamma_0", "schedule$$$w2", "network$$$gain"} <= set(store.keys())
    after = dict([*model.schedule.named_parameters(), ("gain", model.network.gain)])
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert E.continuous_elbo_terms(model, x).sum().item() < bound


def test_the_data_shape_is_the_networks_or_learnt_from_the_first_batch():
    """A data_shape equal to the network's is accepted, another refused; without either, the first batch scored gives
    it (one example's shape), and later data of another shape is refused; the model then samples."""
    assert _model(AffineNoise()).data_shape == (2,)
    assert ContinuousDiffusionModel(AffineNoise(), LinearLogSNR(10), "gaussian", data_shape=(2,)).data_shape == (2,)
    with pytest.raises(ValueError, match=r"data_shape \(3,\) does not fit the network's data shape \(2,\)"):
        ContinuousDiffusionModel(AffineNoise(), LinearLogSNR(10), "gaussian", data_shape=(3,))
    model = ContinuousDiffusionModel(_Spy(), LinearLogSNR(10), "gaussian")
    with pytest.raises(ValueError, match="does not know the shape of one example"):
        model(None, batch_size=2)
    Trace_ELBO().loss(model, ContinuousGuide(model.schedule), _draw(5, 16))
    assert model.data_shape == (2,)
    with pytest.raises(ValueError, match=r"data of shape \(3,\) does not fit the model's data shape \(2,\)"):
        model(torch.zeros(4, 3, dtype=F64))
    assert model.sample(3).shape == (3, 2)


class _Bent(AffineNoise):
    """Affine in z except at high noise (gamma > 0), where it bends by tanh."""

    def forward(self, z, c):
        out = super().forward(z, c)
        high = (LEVEL.gamma(c) > 0)[:, None]
        return torch.where(high, out + 0.1 * torch.tanh(z), out)


def test_the_exact_account_refuses_what_it_cannot_read():
    nodes = GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * (np.polynomial.legendre.leggauss(256)[0] + 1) / 2
    first = f"{nodes[nodes > 0].min():.6g}"  # the first quadrature node where the network bends is named
    with pytest.raises(ValueError, match=rf"not affine in z at gamma = {first} \(at a test point it is off"):
        E.continuous_elbo_terms(_model(_Bent()), _draw(2, 17))
    E.continuous_elbo_terms(_model(_Bent(), LinearLogSNR(10, GAMMA_MIN, -0.5)), _draw(2, 17))  # affine where used
    with pytest.raises(ValueError, match="needs the Gaussian decoder; the model's decoder is 'discretized'"):
        E.expected_continuous_elbo_terms(
            ContinuousDiffusionModel(AffineNoise(), LinearLogSNR(10), "discretized", levels=17), MEAN, COV
        )
    with pytest.raises(TypeError, match="expected a ContinuousDiffusionModel"):
        E.diffusion_estimator_moments(_model().discretised(10), _draw(2, 17))
