"""Terms read off Pyro traces, against the one-site-per-step program and closed forms (float64)."""

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from scipy.stats import norm

from pyrodiff import DiffusionGuide, NoiseSchedule
from pyrodiff.chain.forward import q_posterior
from pyrodiff.chain.traces import drawn_terms, trace_terms
from pyrodiff.testing import linear_case
from pyrodiff.theory.unrolled import loop_guide, loop_model

T = 5
SCHEDULE = NoiseSchedule.linear(T, 0.05, 0.3)


def _traces(model, guide, x0, seed):
    """A guide trace and the model's trace replayed on it, with the draws seeded."""
    pyro.set_rng_seed(seed)
    gt = poutine.trace(guide).get_trace(x0)
    return gt, poutine.trace(poutine.replay(model, trace=gt)).get_trace(x0)


@pytest.mark.parametrize("order", ["posterior", "forward"])
def test_trace_terms_are_the_per_site_log_ratios(order, float64):
    """Column k >= 1 is log q - log p of x_k, column 0 is -log p(x_0 | x_1): site by site in the loop program
    conditioned on the same path."""
    model, x0, _ = linear_case(SCHEDULE, "epsilon", "large", shape=(3, 2), seed=2)
    guide = DiffusionGuide(SCHEDULE, order)
    gt, mt = _traces(model, guide, x0, seed=1)
    terms = trace_terms(mt, gt)
    assert terms.shape == (3, T + 1)
    path = gt.nodes["x_{1:T}"]["value"]
    data = {f"x_{k}": path[k - 1] for k in range(1, T + 1)}
    lg = poutine.trace(poutine.condition(lambda x: loop_guide(guide, x), data=data)).get_trace(x0)
    lm = poutine.trace(poutine.condition(lambda x: loop_model(model, x), data=data)).get_trace(x0)
    lg.compute_log_prob()
    lm.compute_log_prob()
    assert torch.allclose(terms[:, 0], -lm.nodes["x_0"]["log_prob"], rtol=1e-12)
    for k in range(1, T + 1):
        expected = lg.nodes[f"x_{k}"]["log_prob"] - lm.nodes[f"x_{k}"]["log_prob"]
        assert torch.allclose(terms[:, k], expected, rtol=1e-10, atol=1e-12), k


def _kl(mq, vq, mp, vp):
    return 0.5 * (np.log(vp / vq) + (vq + (mq - mp) ** 2) / vp - 1)


@pytest.mark.parametrize("variance", ["small", "learned"])
def test_drawn_terms_are_the_analytic_kl_or_the_decoder_nll(variance, float64):
    model, x0, _ = linear_case(SCHEDULE, "v", variance, shape=(40, 2), seed=4)
    guide = DiffusionGuide(SCHEDULE)
    pyro.set_rng_seed(2)
    gt = poutine.trace(guide).get_trace(x0, 2)
    mt = poutine.trace(poutine.replay(model, trace=gt)).get_trace(x0, 2)
    t, terms = drawn_terms(mt, gt)
    assert t.shape == terms.shape == (2, 40) and (t == 1).any() and (t > 1).any()
    xt = gt.nodes["x_t"]["value"]
    x = x0.expand_as(xt)
    with torch.no_grad():
        mean, var, _ = model.predict(xt, t)
    loc_q, var_q = q_posterior(SCHEDULE, x, xt, t)
    mean, var = mean.numpy(), var.expand_as(xt).numpy()
    with np.errstate(divide="ignore", invalid="ignore"):  # q has variance 0 at t = 1, where the NLL is taken
        kl = _kl(loc_q.numpy(), var_q.numpy(), mean, var).sum(-1)
    nll = -norm.logpdf(x.numpy(), mean, np.sqrt(var)).sum(-1)
    expected = np.where(t.numpy() == 1, nll, kl)
    assert np.allclose(terms.numpy(), expected, rtol=1e-10)
    assert not terms.requires_grad


@pytest.mark.parametrize("order", ["posterior", "forward"])
def test_trace_terms_sum_to_the_trace_elbo_loss(order, float64):
    model, x0, exact = linear_case(SCHEDULE, shape=(4, 3), seed=3)
    guide = DiffusionGuide(SCHEDULE, order)
    gt, mt = _traces(model, guide, x0, seed=4)
    terms = trace_terms(mt, gt)
    assert terms.shape == (4, T + 1)
    pyro.set_rng_seed(4)
    loss = Trace_ELBO(max_plate_nesting=2).loss(model, guide, x0)  # same draws: no extra trace to guess nesting
    assert terms.sum().item() == pytest.approx(loss, rel=1e-12)
    # the posterior-order trace terms are single-sample estimates of the same L_k
    if order == "posterior":
        draws = []
        for _ in range(400):
            gt = poutine.trace(guide).get_trace(x0)
            draws.append(trace_terms(poutine.trace(poutine.replay(model, trace=gt)).get_trace(x0), gt))
        draws = torch.stack(draws).detach()
        z = (draws.mean(0).numpy() - exact) / (draws.std(0).numpy() / 20)
        assert np.abs(z).max() < 4
