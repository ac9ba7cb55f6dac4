"""The loop-per-timestep program scores a path exactly as the vectorised one does."""

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO

from pyrodiff import DiffusionGuide, DiffusionModel, NoiseSchedule
from pyrodiff.testing import LinearDenoiser
from pyrodiff.theory.unrolled import loop_guide, loop_model


@pytest.mark.parametrize("order, eta", [("posterior", 1.0), ("forward", 1.0), ("posterior", 0.4)])
@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_same_elbo_on_the_same_path(order, eta, prediction, float64):
    """Also for DDIM's pair (eta < 1): the model's steps and the guide's q_sigma, one site per step."""
    T = 5
    schedule = NoiseSchedule.linear(T, 0.05, 0.3)
    net = LinearDenoiser(T, torch.linspace(-0.5, 0.5, T), torch.linspace(0.2, -0.2, T))
    model = DiffusionModel(net, schedule, prediction=prediction)
    model = model if eta == 1 else model.ddim(eta)
    guide = DiffusionGuide(schedule, order=order, eta=eta)
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


@pytest.mark.parametrize("variance", ["small", "learned"])
def test_two_step_chain(variance, float64):
    """T = 2, the shortest chain a model accepts (its decoder variance uses beta_tilde_2): the vectorised program
    scores a path as the loop does; T = 1 is refused."""
    schedule = NoiseSchedule.linear(2, 0.1, 0.3)
    v = torch.tensor([0.3, -0.5]) if variance == "learned" else None
    model = DiffusionModel(
        LinearDenoiser(2, torch.tensor([0.2, -0.1]), torch.tensor([0.1, 0.3]), v), schedule, variance=variance
    )
    guide = DiffusionGuide(schedule)
    x0 = torch.rand(4, 3) * 2 - 1
    gt = poutine.trace(guide).get_trace(x0)
    mt = poutine.trace(poutine.replay(model, trace=gt)).get_trace(x0)
    path = gt.nodes["x_{1:T}"]["value"]
    data = {"x_1": path[0], "x_2": path[1]}
    lmt = poutine.trace(poutine.condition(lambda x: loop_model(model, x), data=data)).get_trace(x0)
    for tr in (mt, lmt):
        tr.compute_log_prob()
    assert torch.allclose(mt.log_prob_sum(), lmt.log_prob_sum(), rtol=1e-12)
    with pytest.raises(ValueError, match="T >= 2"):
        DiffusionModel(LinearDenoiser(1), NoiseSchedule.linear(1))


@pytest.mark.parametrize("decoder, levels", [("gaussian", None), ("discretized", 9)])
def test_sampled_paths_are_scored_as_the_loop_scores_them(decoder, levels, float64):
    """A draw of the model program (the ancestral sampler, then x_0 from the decoder at x_1) scored site by site:
    the decoder's law at the sampled x_1, every reverse step and the prior are those of the loop program."""
    T = 4
    schedule = NoiseSchedule.linear(T, 0.05, 0.3)
    net = LinearDenoiser(T, torch.linspace(-0.3, 0.3, T), torch.linspace(0.1, -0.2, T))
    model = DiffusionModel(net, schedule, prediction="v", decoder=decoder, levels=levels, data_shape=(3,))
    pyro.set_rng_seed(4)
    mt = poutine.trace(model).get_trace(None, batch_size=5)
    path, x0 = mt.nodes["x_{1:T}"]["value"], mt.nodes["x_0"]["value"]
    assert path.shape == (T, 5, 3) and x0.shape == (5, 3)
    data = {f"x_{k}": path[k - 1] for k in range(1, T + 1)}
    lmt = poutine.trace(poutine.condition(lambda x: loop_model(model, x), data=data)).get_trace(x0)
    for tr in (mt, lmt):
        tr.compute_log_prob()
    assert torch.allclose(mt.nodes["x_0"]["log_prob"], lmt.nodes["x_0"]["log_prob"], rtol=1e-12)
    for k in range(1, T + 1):
        assert torch.allclose(mt.nodes["x_{1:T}"]["log_prob"][k - 1], lmt.nodes[f"x_{k}"]["log_prob"], rtol=1e-12)
    # called without a batch size, the program draws one example; so does sample(1)
    assert poutine.trace(model).get_trace(None).nodes["x_0"]["value"].shape == (1, 3)
    assert model.sample(1).shape == (1, 3)


def test_a_failing_network_is_named():
    """A network that raises on data of the wrong shape: the model says the data does not fit it."""
    schedule = NoiseSchedule.linear(3, 0.1, 0.3)

    class Dense(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 3)

        def forward(self, x, t):
            return self.layer(x)

    model = DiffusionModel(Dense(), schedule)
    with pytest.raises(ValueError, match="does not fit the network"):
        model.predict(torch.zeros(2, 4), torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="dtype"):
        model.predict(torch.zeros(2, 3, dtype=torch.float64), torch.tensor([1, 2]))
