import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyrodiff import DiffusionGuide, DiffusionModel, NoiseSchedule, objective_weights, reweight
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
