"""DDIM as a Pyro program: Song et al.'s inference family q_sigma as the guide, its generative process as the
model, and the exact bound of the pair for eta in (0, 1].

Oracles written here or in :mod:`pyrodiff.testing` from the papers' formulas: the family's eq. 7 and 16 in numpy,
the generative step's eq. 12 (``linear_reverse_coefficients(eta=...)``), and the exact terms of a network linear
in x_t (``linear_elbo_terms(eta=...)``).
"""

import numpy as np
import pyro
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from test_samplers import KEPT, LONG, _long_model  # the linear model on a 30-step schedule

from pyrodiff import DiffusionGuide, NoiseSchedule, bound_terms, samplers
from pyrodiff.chain.forward import DDPM, InferenceFamily, q_posterior, q_sigma_posterior
from pyrodiff.testing import linear_elbo_terms, linear_reverse_coefficients, schedules


def _song(schedule, eta):
    """Song et al. (2021), eq. 16 and eq. 7 in numpy: sigma_t, and the coefficients of x_0 and x_t in the mean."""
    abar = np.cumprod(1 - schedule.betas.numpy())
    prev = np.concatenate([[1.0], abar[:-1]])
    sigma = eta * np.sqrt((1 - prev) / (1 - abar)) * np.sqrt(1 - abar / prev)
    coef_xt = np.sqrt(np.maximum(1 - prev - sigma**2, 0)) / np.sqrt(1 - abar)
    return sigma, np.sqrt(prev) - coef_xt * np.sqrt(abar), coef_xt, abar, prev


# ---------------------------------------------------------------------- the inference family
@given(schedules(max_steps=12), st.floats(0, 1), st.data())
def test_q_sigma_is_song_eq_7_with_the_marginals_of_ddpm(schedule, eta, data):
    """The posterior's coefficients and variance are eq. 7/16's; composed with q(x_t | x_0) they give back
    q(x_{t-1} | x_0) = N(sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}) (their Lemma 1); at eta = 1 it is DDPM's posterior."""
    T = schedule.num_steps
    t = torch.tensor([data.draw(st.integers(1, T))])
    x0, xt = torch.tensor([[0.7, -0.3]], dtype=torch.float64), torch.tensor([[-1.1, 0.4]], dtype=torch.float64)
    loc, var = q_sigma_posterior(schedule, eta, x0, xt, t)
    sigma, cx0, cxt, abar, prev = _song(schedule, eta)
    i = t.item() - 1
    assert np.allclose(var.numpy(), sigma[i] ** 2, rtol=1e-10, atol=1e-15)
    assert np.allclose(loc.numpy(), cx0[i] * x0.numpy() + cxt[i] * xt.numpy(), rtol=1e-9, atol=1e-12)
    assert np.isclose(cx0[i] + cxt[i] * np.sqrt(abar[i]), np.sqrt(prev[i]), rtol=1e-9)  # the marginal's mean
    assert np.isclose(cxt[i] ** 2 * (1 - abar[i]) + sigma[i] ** 2, 1 - prev[i], rtol=1e-9, atol=1e-15)  # variance
    ddpm_loc, ddpm_var = q_posterior(schedule, x0, xt, t)
    one_loc, one_var = q_sigma_posterior(schedule, 1.0, x0, xt, t)
    assert torch.allclose(one_loc, ddpm_loc, rtol=1e-9, atol=1e-12) and torch.allclose(one_var, ddpm_var, rtol=1e-9)


def test_the_guide_draws_paths_with_the_ddpm_marginals_and_the_q_sigma_joint(float64):
    """Sampled paths of DiffusionGuide(eta=0.3): each x_t has mean sqrt(abar_t) x_0 and variance 1 - abar_t, and
    consecutive rows have the covariance coef_xt (1 - abar_t) of q_sigma, not DDPM's (each within 4.5 standard
    errors; 20000 seeded paths)."""
    schedule = NoiseSchedule.linear(6, 0.05, 0.4)
    eta, M = 0.3, 20000
    x0 = torch.full((M, 1), 0.8)
    pyro.set_rng_seed(3)
    path = poutine.trace(DiffusionGuide(schedule, eta=eta)).get_trace(x0).nodes["x_{1:T}"]["value"][..., 0]
    sigma, _, cxt, abar, _ = _song(schedule, eta)
    mean, var = path.mean(1).numpy(), path.var(1).numpy()
    assert np.all(np.abs(mean - np.sqrt(abar) * 0.8) < 4.5 * np.sqrt((1 - abar) / M))
    assert np.all(np.abs(var - (1 - abar)) < 4.5 * (1 - abar) * np.sqrt(2 / (M - 1)))
    centred = path - path.mean(1, keepdim=True)
    cov = (centred[:-1] * centred[1:]).sum(1).numpy() / (M - 1)  # cov(x_k, x_{k+1}), k = 1..T-1
    expected = cxt[1:] * (1 - abar[1:])
    se = np.sqrt(((1 - abar[:-1]) * (1 - abar[1:]) + expected**2) / M)
    assert np.all(np.abs(cov - expected) < 4.5 * se)
    ddpm = schedule.posterior_mean_coef_xt.numpy()[1:] * (1 - abar[1:])
    assert np.all(np.abs(ddpm - expected) > 10 * se)  # the test tells the two families apart


def test_the_guide_scores_its_path_with_q_sigma(float64):
    schedule = NoiseSchedule.linear(5, 0.05, 0.4)
    x0 = torch.tensor([[0.5, -0.2], [0.1, 0.9]])
    trace = poutine.trace(DiffusionGuide(schedule, eta=0.6)).get_trace(x0)
    site = trace.nodes["x_{1:T}"]
    path = site["value"].numpy()
    sigma, cx0, cxt, abar, _ = _song(schedule, 0.6)
    expected = np.zeros((5, 2))
    for k in range(1, 5):  # row k - 1: log q_sigma(x_k | x_{k+1}, x_0), step t = k + 1
        loc, var = cx0[k] * x0.numpy() + cxt[k] * path[k], sigma[k] ** 2
        expected[k - 1] = (-0.5 * ((path[k - 1] - loc) ** 2 / var + np.log(2 * np.pi * var))).sum(-1)
    loc, var = np.sqrt(abar[-1]) * x0.numpy(), 1 - abar[-1]
    expected[4] = (-0.5 * ((path[4] - loc) ** 2 / var + np.log(2 * np.pi * var))).sum(-1)
    assert np.allclose(site["fn"].log_prob(site["value"]).numpy(), expected, rtol=1e-10)


# ---------------------------------------------------------------------- the generative process
@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
@torch.no_grad()
def test_the_ddim_step_is_song_eq_12_and_eta_one_is_ddpm(prediction, float64):
    model, a, b = _long_model(prediction, "large")
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1, 2, 17, 30])
    for eta in (0.0, 0.4):
        step = model.ddim(eta).predict(x, t)
        c, d = linear_reverse_coefficients(LONG, a.numpy(), b.numpy(), prediction, eta)
        expected = c[t - 1, None] * x.numpy() + d[t - 1, None]
        assert np.allclose(step.mean[1:].numpy(), expected[1:], rtol=1e-10, atol=1e-12)
        sigma, *_ = _song(LONG, eta)
        assert np.allclose(step.variance[1:, 0].numpy(), sigma[t[1:] - 1] ** 2, rtol=1e-10, atol=1e-300)
        base = model.predict(x, t)  # the decoder at t = 1 is the model's own, whatever eta
        assert torch.allclose(step.mean[0], base.mean[0]) and torch.equal(step.variance[0], base.variance[0])
    one = model.ddim(1.0).predict(x, t)  # eta = 1: DDPM with the "small" variance, whatever the base variance
    ddpm = _long_model(prediction, "small")[0].predict(x, t)
    assert torch.allclose(one.mean, ddpm.mean, rtol=1e-12) and torch.allclose(one.variance, ddpm.variance)


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("clip", [False, True])
def test_the_ddim_sampler_is_ancestral_sampling_of_the_ddim_model(eta, clip, float64):
    model, _, _ = _long_model("x0")
    x_T = torch.randn(4, 3, generator=torch.Generator().manual_seed(2)) * 3
    for kw in ({"timesteps": KEPT}, {"steps": 7}):
        by_sampler = samplers.ddim(model, x_T, eta=eta, generator=torch.Generator().manual_seed(5), clip=clip, **kw)
        chain = model.respaced(kw.get("timesteps") or kw["steps"]).ddim(eta)
        by_model = samplers.ancestral(chain, x_T, generator=torch.Generator().manual_seed(5), clip=clip)
        assert torch.allclose(by_sampler, by_model, rtol=1e-12, atol=1e-12)
    pyro.set_rng_seed(0)
    drawn = poutine.trace(model.ddim(eta)).get_trace(None, batch_size=3).nodes["x_0"]["value"]
    assert drawn.shape == (3, 3) and torch.isfinite(drawn).all()


# ---------------------------------------------------------------------- the bound
@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
@pytest.mark.parametrize("eta", [0.2, 0.7])
def test_bound_terms_of_a_respaced_ddim_chain_are_exact(prediction, eta, float64):
    """bound_terms of model.respaced(KEPT).ddim(eta) against linear_elbo_terms(eta=...), every term within
    4.5 standard errors."""
    model, a, b = _long_model(prediction)
    short = model.respaced(KEPT).ddim(eta)
    kept = torch.tensor(KEPT) - 1
    x0 = torch.rand(4, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    exact = linear_elbo_terms(short.schedule, a[kept].numpy(), b[kept].numpy(), x0, prediction, eta=eta)
    ddpm = linear_elbo_terms(short.schedule, a[kept].numpy(), b[kept].numpy(), x0, prediction)
    torch.manual_seed(0)
    terms = bound_terms(short, x0, num_samples=400)
    mean, se = terms.nats.mean(0).numpy(), terms.nats.std(0).numpy() / np.sqrt(400)
    assert np.all(np.abs(mean - exact) <= 4.5 * se + 1e-10)
    assert np.abs(exact - ddpm)[:, 1:-1].max() > 0.1  # the oracle is not DDPM's


@pytest.mark.parametrize("estimator", [Trace_ELBO, TraceMeanField_ELBO])
@pytest.mark.parametrize("subsample_steps", [None, 2])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_the_pyro_elbo_of_a_respaced_chain_is_its_exact_bound(estimator, subsample_steps, eta, float64):
    """The respaced DDPM chain (eta = 1: model.respaced(KEPT) and the DDPM guide) and the respaced DDIM model with its
    q_sigma guide: the Pyro ELBO's draws average to -sum(linear_elbo_terms) within 4 standard errors (300 seeded
    draws)."""
    model, a, b = _long_model("epsilon")
    short = model.respaced(KEPT) if eta == 1 else model.respaced(KEPT).ddim(eta)
    kept = torch.tensor(KEPT) - 1
    x0 = torch.rand(3, 3, generator=torch.Generator().manual_seed(2)) * 2 - 1
    exact = linear_elbo_terms(short.schedule, a[kept].numpy(), b[kept].numpy(), x0, "epsilon", eta=eta).sum()
    guide = DiffusionGuide(short.schedule) if eta == 1 else DiffusionGuide(short.schedule, eta=eta)
    pyro.set_rng_seed(21)
    losses = np.array([estimator().loss(short, guide, x0, subsample_steps) for _ in range(300)])
    assert abs(losses.mean() - exact) < 4 * losses.std(ddof=1) / np.sqrt(len(losses)), (losses.mean(), exact)


# ---------------------------------------------------------------------- bad input
def test_eta_zero_has_no_bound_and_bad_etas_are_refused(float64):
    model, _, _ = _long_model()
    x0 = torch.zeros(2, 3)
    deterministic = model.ddim(0.0)
    with pytest.raises(ValueError, match="eta = 0.*no bound"):
        bound_terms(deterministic, x0)
    with pytest.raises(ValueError, match="eta = 0.*no bound"):
        Trace_ELBO().loss(deterministic, DiffusionGuide(LONG, eta=0.5), x0)
    with pytest.raises(ValueError, match="eta = 0.*no density"):
        DiffusionGuide(LONG, eta=0.0)
    with pytest.raises(ValueError, match="forward order"):
        DiffusionGuide(LONG, order="forward", eta=0.5)
    for bad in (1.5, -0.1, True, "0.5", float("nan")):
        with pytest.raises(ValueError, match="eta must be a number in \\[0, 1\\]"):
            model.ddim(bad)
        with pytest.raises(ValueError, match="eta must be a number in \\[0, 1\\]"):
            DiffusionGuide(LONG, eta=bad)
        with pytest.raises(ValueError, match="eta must be a number in \\[0, 1\\]"):
            q_sigma_posterior(LONG, bad, x0, x0, torch.full((2,), 3))
    assert InferenceFamily(1) == DDPM and DDPM.is_markov and not InferenceFamily(0.5).is_markov
    assert model.ddim(0.3).ddim(0.6).variance.base == model.variance  # re-choosing eta keeps the base decoder
    assert model.ddim(0.3).describe()["eta"] == 0.3 and "eta" not in model.describe()
