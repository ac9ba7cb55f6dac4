"""The loop-per-timestep program scores a path exactly as the vectorised one does."""

import pytest
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO

from pyrodiff import DiffusionGuide, DiffusionModel, NoiseSchedule
from pyrodiff.loop import loop_guide, loop_model
from pyrodiff.testing import LinearDenoiser


@pytest.mark.parametrize("order", ["posterior", "forward"])
@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_same_elbo_on_the_same_path(order, prediction, float64):
    T = 5
    schedule = NoiseSchedule.linear(T, 0.05, 0.3)
    net = LinearDenoiser(T, torch.linspace(-0.5, 0.5, T), torch.linspace(0.2, -0.2, T))
    model = DiffusionModel(net, schedule, prediction=prediction)
    guide = DiffusionGuide(schedule, order=order)
    x0 = torch.rand(3, 2) * 2 - 1
    gt = poutine.trace(guide).get_trace(x0)
    mt = poutine.trace(poutine.replay(model, trace=gt)).get_trace(x0)
    path = gt.nodes["x_{1:T}"]["value"]
    data = {f"x_{k}": path[k - 1] for k in range(1, T + 1)}
    lgt = poutine.trace(poutine.condition(lambda x: loop_guide(guide, x), data=data)).get_trace(x0)
    lmt = poutine.trace(poutine.condition(lambda x: loop_model(model, x), data=data)).get_trace(x0)
    for tr in (gt, mt, lgt, lmt):
        tr.compute_log_prob()
    elbo = mt.log_prob_sum() - gt.log_prob_sum()
    loop_elbo = lmt.log_prob_sum() - lgt.log_prob_sum()
    assert torch.isclose(elbo, loop_elbo, rtol=1e-10)
    # and per timestep: the loop's site x_k holds row k of the vectorised site
    for k in range(1, T + 1):
        assert torch.allclose(lmt.nodes[f"x_{k}"]["log_prob"], mt.nodes["x_{1:T}"]["log_prob"][k - 1])
        assert torch.allclose(lgt.nodes[f"x_{k}"]["log_prob"], gt.nodes["x_{1:T}"]["log_prob"][k - 1])


def test_loop_forward_order_with_mean_field_is_refused():
    schedule = NoiseSchedule.linear(3, 0.1, 0.3)
    model = DiffusionModel(LinearDenoiser(3), schedule)
    guide = DiffusionGuide(schedule, order="forward")
    with pytest.raises(ValueError, match="biased"):
        TraceMeanField_ELBO().loss(lambda x: loop_model(model, x), lambda x: loop_guide(guide, x), torch.zeros(2, 1))
