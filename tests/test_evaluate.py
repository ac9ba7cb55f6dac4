import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyrodiff import DiffusionGuide, DiffusionModel, NoiseSchedule
from pyrodiff.evaluate import estimate_bound, negative_elbo_per_example
from pyrodiff.testing import LinearDenoiser, linear_elbo_terms


def _model():
    T = 6
    schedule = NoiseSchedule.linear(T, 0.05, 0.4)
    net = LinearDenoiser(T, torch.linspace(-0.4, 0.4, T), torch.linspace(0.2, -0.2, T))
    return DiffusionModel(net, schedule), DiffusionGuide(schedule)


@pytest.mark.parametrize("subsample_steps", [None, 3])
@pytest.mark.parametrize("analytic, estimator", [(False, Trace_ELBO), (True, TraceMeanField_ELBO)])
def test_per_example_values_sum_to_the_pyro_loss(subsample_steps, analytic, estimator, float64):
    model, guide = _model()
    x0 = torch.rand(5, 2) * 2 - 1
    pyro.set_rng_seed(4)
    per_example = negative_elbo_per_example(model, guide, x0, subsample_steps, analytic=analytic)
    pyro.set_rng_seed(4)
    loss = estimator(max_plate_nesting=2).loss(model, guide, x0, subsample_steps)  # no extra trace to guess nesting
    assert per_example.shape == (5,)
    assert per_example.sum().item() == pytest.approx(loss, rel=1e-10)


def test_estimate_bound_agrees_with_exact(float64):
    model, guide = _model()
    x0 = (torch.rand(1, 2) * 2 - 1).repeat(3000, 1)
    exact = linear_elbo_terms(model.schedule, model.network.a.detach(), model.network.b.detach(), x0[:1]).sum()
    pyro.set_rng_seed(5)
    bound = estimate_bound(model, guide, x0, subsample_steps=2)
    assert abs(bound.nats - exact) < 4 * bound.stderr
    assert bound.bits_per_dim == pytest.approx(bound.nats / (2 * 0.6931471805599453))
