"""The KL divergences registered for the chains (float64)."""

import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import kl_divergence

from pyrodiff import DiffusionGuide, NoiseSchedule
from pyrodiff.testing import linear_case

T = 5
SCHEDULE = NoiseSchedule.linear(T, 0.05, 0.3)


def _gaussian_kl(mq, vq, mp, vp):
    return 0.5 * (np.log(vp / vq) + (vq + (mq - mp) ** 2) / vp - 1)


@pytest.mark.parametrize("variance", ["large", "learned"])
def test_path_kl_is_the_per_row_kl_along_the_evaluated_path(variance, float64):
    """Row k < T: KL(q(x_k | x_{k+1}, x0) || p(x_k | x_{k+1})); row T: KL(q(x_T | x0) || N(0, I)); summed over
    the data's dimensions, from the guide's tables and the model's prediction at x_{k+1}."""
    model, x0, _ = linear_case(SCHEDULE, "x0", variance, shape=(3, 2), seed=5)
    pyro.set_rng_seed(0)
    gt = poutine.trace(DiffusionGuide(SCHEDULE)).get_trace(x0)
    mt = poutine.trace(poutine.replay(model, trace=gt)).get_trace(x0)
    kl = kl_divergence(gt.nodes["x_{1:T}"]["fn"], mt.nodes["x_{1:T}"]["fn"]).detach().numpy()
    assert kl.shape == (T, 3)
    path, s = gt.nodes["x_{1:T}"]["value"], SCHEDULE
    x = x0.numpy()
    for k in range(1, T):
        with torch.no_grad():
            mean, var, _ = model.predict(path[k], torch.full((3,), k + 1))
        mq = s.posterior_mean_coef_x0[k].item() * x + s.posterior_mean_coef_xt[k].item() * path[k].numpy()
        vq = s.posterior_variance[k].item()
        expected = _gaussian_kl(mq, vq, mean.numpy(), var.expand_as(mean).numpy()).sum(-1)
        assert np.allclose(kl[k - 1], expected, rtol=1e-10), k
    abar = s.alphas_cumprod[-1].item()
    prior = _gaussian_kl(np.sqrt(abar) * x, 1 - abar, 0.0, 1.0).sum(-1)
    assert np.allclose(kl[-1], prior, rtol=1e-10)


def test_trace_mean_field_elbo_refuses_the_forward_order_guide(float64):
    """TraceMeanField_ELBO with the forward-order guide raises, naming the bias and the fix; the same estimator with
    the posterior-order guide (and Trace_ELBO with the forward order) gives the loss."""
    model, x0, _ = linear_case(SCHEDULE, shape=(2, 2))
    pyro.set_rng_seed(0)
    with pytest.raises(ValueError) as refusal:
        TraceMeanField_ELBO().loss(model, DiffusionGuide(SCHEDULE, "forward"), x0)
    message = str(refusal.value)
    assert message.startswith("TraceMeanField_ELBO is biased with DiffusionGuide(order='forward')")
    assert "Use DiffusionGuide(order='posterior') with TraceMeanField_ELBO, or Trace_ELBO with either order." in message
    assert "\n" not in message
    assert math.isfinite(TraceMeanField_ELBO().loss(model, DiffusionGuide(SCHEDULE, "posterior"), x0))
    assert math.isfinite(Trace_ELBO().loss(model, DiffusionGuide(SCHEDULE, "forward"), x0))
