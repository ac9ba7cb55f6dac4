"""The denoiser is a score model, and the training objectives are weighted denoising score matching (float64).

- Tweedie: the exact noise predictions of Gaussian and Gaussian-mixture data (``GaussianScore``,
  ``IsotropicGaussianMixture.noise``) are -sigma times the gradient of log q(x_t), taken here by autograd;
- the score's three forms agree on one network's outputs;
- every per-step term of the bound is ``dsm_weights`` times the DSM loss plus a constant, exactly, for the KL terms
  (t >= 2) and the Gaussian decoder (t = 1), for "small" and "large" variances; L_simple's weight is 1 - abar_t."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from pyrodiff import DiffusionModel, MLPDenoiser, NoiseSchedule
from pyrodiff.chain.objectives import objective_weights
from pyrodiff.chain.parameterization import eps_to_x0
from pyrodiff.chain.score import (
    conditional_score,
    dsm_loss,
    dsm_weights,
    score,
    score_from_noise,
    score_from_v,
    score_from_x0,
)
from pyrodiff.theory.exact import GaussianScore
from pyrodiff.theory.mixture import IsotropicGaussianMixture

F64 = torch.float64


def _model(prediction: str = "epsilon", variance: str = "small", T: int = 20) -> DiffusionModel:
    torch.manual_seed(0)
    return DiffusionModel(
        MLPDenoiser(3, hidden=16, depth=1).to(F64), NoiseSchedule.linear(T, 1e-3, 0.3), prediction, variance
    )


def _draw(n: int = 6, T: int = 20, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 3, generator=g, dtype=F64)
    noise = torch.randn(n, 3, generator=g, dtype=F64)
    t = torch.randint(1, T + 1, (n,), generator=g)
    return x0, noise, t


def test_gaussian_score_is_the_gradient_of_the_noisy_marginal():
    schedule = NoiseSchedule.linear(20, 1e-3, 0.3)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 3, generator=g, dtype=F64)
    m, S = torch.randn(3, generator=g, dtype=F64), A @ A.T / 3 + 0.1 * torch.eye(3, dtype=F64)
    model = DiffusionModel(GaussianScore(schedule, m, S), schedule, data_shape=(3,))
    x = torch.randn(5, 3, generator=g, dtype=F64).requires_grad_()
    for t in (1, 7, 20):
        abar = schedule.tables().alphas_cumprod[t - 1]
        law = MultivariateNormal(abar.sqrt() * m, abar * S + (1 - abar) * torch.eye(3, dtype=F64))
        (grad,) = torch.autograd.grad(law.log_prob(x).sum(), x)
        steps = torch.full((5,), t)
        assert torch.allclose(score(model, x.detach(), steps), grad, rtol=1e-9, atol=1e-9)


def test_mixture_noise_is_minus_sigma_times_the_gradient_of_the_noisy_marginal():
    schedule = NoiseSchedule.linear(20, 1e-3, 0.3)
    law = IsotropicGaussianMixture(torch.tensor([[1.0, 0.0], [-0.5, 0.8], [0.0, -1.0]], dtype=F64), 0.04)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=F64).requires_grad_()
    for t in (1, 5, 20):
        (grad,) = torch.autograd.grad(law.marginal(schedule, t).log_prob(x).sum(), x)
        lam = schedule.tables().log_snr[t - 1]
        sigma = torch.sigmoid(-lam).sqrt()
        assert torch.allclose(law.noise(x.detach(), lam), -sigma * grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_the_scores_three_forms_agree(prediction):
    model = _model(prediction)
    x0, noise, t = _draw()
    abar = model.schedule.tables().alphas_cumprod[t - 1][:, None]
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    out = model.network(xt, t)
    form = {
        "epsilon": score_from_noise(out, abar),
        "x0": score_from_x0(out, xt, abar),
        "v": score_from_v(out, xt, abar),
    }
    s = score(model, xt, t)
    assert torch.allclose(s, form[prediction], rtol=1e-10, atol=1e-10)
    # the same score from the implied x0 (Tweedie's mean form)
    assert torch.allclose(score_from_x0(eps_to_x0(-s * (1 - abar).sqrt(), xt, abar), xt, abar), s, atol=1e-9)
    # the conditional score on the path is -noise / sqrt(1 - abar)
    assert torch.allclose(conditional_score(xt, x0, abar), -noise / (1 - abar).sqrt(), atol=1e-10)


@pytest.mark.parametrize("variance", ["small", "large"])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_elbo_terms_are_weighted_dsm(variance, prediction):
    T = 20
    model = _model(prediction, variance, T)
    x0, noise, _ = _draw(n=2 * T)
    t = torch.arange(1, T + 1).repeat(2)
    c = model.schedule.tables()
    abar = c.alphas_cumprod[t - 1][:, None]
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    step = model.predict(xt, t)
    loc, var = model.posterior(x0, xt, t)
    kl = step.kl_from(loc, var, 1)  # L_{t-1} given x_t, exactly (t >= 2)
    decoder = -torch.distributions.Normal(step.mean, step.variance.sqrt()).log_prob(x0).sum(1)  # L_0 at t = 1
    term = torch.where(t == 1, decoder, kl)
    sigma2 = model.variance.table(model.schedule)[t - 1]
    tilde = c.posterior_variance[t - 1]
    constant = torch.where(
        t == 1,
        1.5 * torch.log(2 * math.pi * sigma2),
        1.5 * (torch.log(sigma2 / tilde) + tilde / sigma2 - 1),
    )
    weights = dsm_weights(model.schedule, "elbo", variance)
    dsm = dsm_loss(model, x0, t, noise)
    assert torch.allclose(term, weights[t - 1] * dsm + constant, rtol=1e-10, atol=1e-10)
    assert torch.allclose(weights, c.betas**2 / (2 * model.variance.table(model.schedule) * c.alphas))
    # L_simple: its weight lambda_t = 1 / w_t turns each term into ||eps - eps_hat||^2 = (1 - abar_t) DSM + constant
    simple = dsm_weights(model.schedule, "simple", variance)
    assert torch.allclose(simple, 1 - c.alphas_cumprod, rtol=1e-12)
    lam = objective_weights(model.schedule, "simple", variance)[t - 1]
    assert torch.allclose(lam * term, simple[t - 1] * dsm + lam * constant, rtol=1e-10, atol=1e-10)
    eps_hat = model.predicted_noise(xt, t)
    assert torch.allclose(((noise - eps_hat) ** 2).sum(1), simple[t - 1] * dsm, rtol=1e-10, atol=1e-12)


def test_refusals():
    model = _model()
    x0, noise, t = _draw()
    with pytest.raises(ValueError, match="noise of shape"):
        dsm_loss(model, x0, t, noise[:, :2])
    with pytest.raises(ValueError, match="integer tensor"):
        score(model, x0, t.double())
    with pytest.raises(ValueError, match="fixed reverse variance"):
        dsm_weights(model.schedule, "elbo", "learned")
