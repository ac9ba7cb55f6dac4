import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyrodiff import DiffusionGuide, DiffusionModel, NoiseSchedule, objective_weights, reweight
from pyrodiff.chain.objectives import (
    ESTIMATORS,
    ELBOObjective,
    MinSNRObjective,
    Objective,
    SimpleObjective,
    parse_estimator,
    parse_objective,
)
from pyrodiff.testing import LinearDenoiser


def _model_guide(prediction="epsilon"):
    T = 8
    schedule = NoiseSchedule.linear(T, 0.02, 0.3)
    net = LinearDenoiser(T, torch.linspace(-0.3, 0.3, T), torch.linspace(0.1, -0.1, T))
    return DiffusionModel(net, schedule, prediction=prediction), DiffusionGuide(schedule)


def test_elbo_weights_are_one():
    s = NoiseSchedule.linear(10)
    assert torch.equal(objective_weights(s, "elbo"), torch.ones(10, dtype=torch.float64))


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_simple_objective_is_the_noise_regression(prediction, float64):
    """With lambda_t = 1 / w_t, the analytic term of a drawn t >= 2 is ||eps - eps_hat||^2 summed over
    dimensions (Ho et al. 2020, eq. 14), for any parameterisation."""
    model, guide = _model_guide(prediction)
    s = model.schedule
    weights = objective_weights(s, "simple")
    x0 = torch.rand(5, 3) * 2 - 1
    gt = poutine.trace(reweight(guide, weights)).get_trace(x0, 1)
    mt = poutine.trace(poutine.replay(reweight(model, weights), trace=gt)).get_trace(x0, 1)
    t = gt.nodes["t"]["value"][0]
    xt = gt.nodes["x_t"]["value"][0]
    abar = s.alphas_cumprod[t - 1][:, None]
    eps = (xt - abar.sqrt() * x0) / (1 - abar).sqrt()
    x0_hat = model.predict(xt, t).x0
    eps_hat = (xt - abar.sqrt() * x0_hat) / (1 - abar).sqrt()
    kl = torch.distributions.kl_divergence(gt.nodes["x_{t-1}"]["fn"], mt.nodes["x_{t-1}"]["fn"])
    scale = gt.nodes["x_{t-1}"]["scale"]
    keep = t >= 2
    expected = (eps - eps_hat).pow(2).sum(-1) * s.num_steps
    assert torch.allclose((kl * scale)[0][keep], expected[keep], rtol=1e-8)


def test_min_snr_caps_the_weight():
    s = NoiseSchedule.linear(100)
    simple, min_snr = objective_weights(s, "simple"), objective_weights(s, "min_snr", gamma=5.0)
    snr = s.log_snr.exp()
    assert torch.allclose(min_snr, simple * torch.clamp(snr, max=5.0) / snr)
    assert torch.equal(min_snr[snr <= 5], simple[snr <= 5])


def test_reweighted_programs_train():
    model, guide = _model_guide()
    weights = objective_weights(model.schedule, "simple")
    loss = TraceMeanField_ELBO().differentiable_loss(
        reweight(model, weights), reweight(guide, weights), torch.zeros(4, 3), 2
    )
    loss.backward()
    assert model.network.a.grad is not None and torch.isfinite(model.network.a.grad).all()


def test_reweighting_needs_subsampled_terms():
    model, guide = _model_guide()
    w = objective_weights(model.schedule, "simple")
    with pytest.raises(ValueError, match="subsample_steps"):
        Trace_ELBO().loss(reweight(model, w), reweight(guide, w), torch.zeros(2, 3))


def test_unknown_objective():
    with pytest.raises(ValueError, match="objective"):
        objective_weights(NoiseSchedule.linear(4), "perceptual")


def test_learned_variances_are_trained_by_the_bound():
    schedule = NoiseSchedule.linear(4)
    assert torch.equal(objective_weights(schedule, "elbo", "learned"), torch.ones(4, dtype=torch.float64))
    for objective in ("simple", "min_snr"):
        with pytest.raises(ValueError, match="learned variances"):
            objective_weights(schedule, objective, "learned")


def test_prior_term_is_not_reweighted():
    model, guide = _model_guide()
    w = objective_weights(model.schedule, "simple")
    pyro.set_rng_seed(0)
    gt = poutine.trace(reweight(guide, w)).get_trace(torch.zeros(2, 3), 1)
    assert gt.nodes["x_T"]["scale"] == 1.0


def _w(schedule, variance):
    """w_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) from the betas (MATH.md, section 7), in numpy."""
    beta = schedule.betas.numpy()
    abar = np.cumprod(1 - beta)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    bt = beta * (1 - abar_prev) / (1 - abar)
    sigma2 = np.concatenate([[bt[1]], bt[1:] if variance == "small" else beta[1:]])
    return beta**2 / (2 * sigma2 * (1 - beta) * (1 - abar)), abar / (1 - abar)


@pytest.mark.parametrize("variance", ["small", "large"])
def test_noise_weights_follow_their_definition(variance):
    s = NoiseSchedule.linear(12, 0.01, 0.3)
    w, snr = _w(s, variance)
    assert np.allclose(objective_weights(s, "simple", variance).numpy(), 1 / w, rtol=1e-12)
    # min-SNR-gamma, gamma = 5 by default: min(snr, gamma) / snr / w
    for gamma, weights in (
        (5.0, objective_weights(s, "min_snr", variance)),
        (0.5, objective_weights(s, "min_snr", variance, 0.5)),
    ):
        assert np.allclose(weights.numpy(), np.minimum(snr, gamma) / snr / w, rtol=1e-12)
    assert (snr > 5).any() and (snr < 5).any() and (snr < 0.5).any()
    assert parse_objective("min_snr").gamma == 5.0


def test_objective_objects():
    """One class per kind, parsed once from its name; an object passes through parse_objective."""
    assert parse_objective("elbo") == ELBOObjective() and parse_objective("simple") == SimpleObjective()
    assert parse_objective("min_snr", 0.5) == MinSNRObjective(0.5) != MinSNRObjective()
    assert all(isinstance(parse_objective(name), Objective) for name in ("elbo", "simple", "min_snr"))
    assert ELBOObjective().is_bound and not SimpleObjective().is_bound and not MinSNRObjective().is_bound
    assert ELBOObjective().loss_name == "negative_elbo_nats" and SimpleObjective().loss_name == "simple_loss"
    assert MinSNRObjective().loss_name == "min_snr_loss"
    objective = MinSNRObjective(0.5)
    assert parse_objective(objective) is objective and parse_objective(objective, gamma=2.0).gamma == 0.5
    s = NoiseSchedule.linear(12, 0.01, 0.3)
    assert torch.equal(objective.weights(s, "large"), objective_weights(s, "min_snr", "large", gamma=0.5))
    for gamma in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="the min-SNR gamma must be a finite number > 0"):
            MinSNRObjective(gamma)
        with pytest.raises(ValueError, match="gamma"):
            objective_weights(s, "min_snr", gamma=gamma)
    for name in (3, "perceptual", "ELBO"):
        with pytest.raises(ValueError, match="^objective must be one of 'elbo', 'simple', 'min_snr', got "):
            parse_objective(name)


def test_estimators_are_pyros_elbo_classes_by_name():
    assert parse_estimator("mean_field") is TraceMeanField_ELBO and parse_estimator("trace") is Trace_ELBO
    assert set(ESTIMATORS) == {"mean_field", "trace"}
    for name in ("iwae", "Trace", None):
        with pytest.raises(ValueError, match="^estimator must be one of 'mean_field', 'trace', got "):
            parse_estimator(name)
