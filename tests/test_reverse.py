from contextlib import nullcontext

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive, Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import Normal, kl_divergence

from pyrodiff import DiffusionGuide, DiffusionModel, MLPDenoiser, NoiseSchedule, UNet
from pyrodiff.chain.kl import FORWARD_ORDER_MEAN_FIELD_ERROR
from pyrodiff.testing import LinearDenoiser


def _model(T=5, **kwargs):
    schedule = NoiseSchedule.linear(T, 0.05, 0.3)
    g = torch.Generator().manual_seed(1)
    net = LinearDenoiser(T, torch.rand(T, generator=g) - 0.5, torch.rand(T, generator=g) - 0.5)
    return DiffusionModel(net, schedule, **kwargs), DiffusionGuide(schedule)


def test_trace_exposes_per_timestep_log_densities():
    model, guide = _model()
    x0 = torch.rand(3, 2) * 2 - 1
    gt = poutine.trace(guide).get_trace(x0)
    mt = poutine.trace(poutine.replay(model, trace=gt)).get_trace(x0)
    mt.compute_log_prob()
    gt.compute_log_prob()
    assert mt.nodes["x_{1:T}"]["log_prob"].shape == (5, 3)
    assert gt.nodes["x_{1:T}"]["log_prob"].shape == (5, 3)
    assert mt.nodes["x_0"]["log_prob"].shape == (3,)
    assert {f.name: f.dim for f in mt.nodes["x_{1:T}"]["cond_indep_stack"]} == {"time": -2, "data": -1}


def test_full_chain_makes_one_network_call():
    model, guide = _model(T=7)
    calls = []
    model.network.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    Trace_ELBO().loss(model, guide, torch.zeros(4, 2))
    assert calls == [7 * 4]
    calls.clear()
    Trace_ELBO().loss(model, guide, torch.zeros(4, 2), 3)
    assert calls == [3 * 4]


def test_mean_field_kl_is_the_sum_of_per_step_kls():
    model, guide = _model()
    x0 = torch.rand(3, 2) * 2 - 1
    gt = poutine.trace(guide).get_trace(x0)
    mt = poutine.trace(poutine.replay(model, trace=gt)).get_trace(x0)
    path = gt.nodes["x_{1:T}"]["value"]
    kl = kl_divergence(gt.nodes["x_{1:T}"]["fn"], mt.nodes["x_{1:T}"]["fn"])
    s = model.schedule
    for k in range(1, 5):  # rows k < T: KL(q(x_k | x_{k+1}, x0) || p(x_k | x_{k+1}))
        t = k + 1
        c0, ct, bt = s.posterior_mean_coef_x0[t - 1], s.posterior_mean_coef_xt[t - 1], s.posterior_variance[t - 1]
        q = Normal(c0 * x0 + ct * path[k], bt.sqrt())
        mean = model.predict(path[k], torch.full((3,), t)).mean
        p = Normal(mean, s.posterior_variance[t - 1].sqrt())
        assert torch.allclose(kl[k - 1], kl_divergence(q, p).sum(-1).float(), rtol=1e-4, atol=1e-5)
    abar = s.alphas_cumprod[-1]
    prior = kl_divergence(Normal(abar.sqrt() * x0, (1 - abar).sqrt()), Normal(0.0, 1.0)).sum(-1)
    assert torch.allclose(kl[-1], prior.float(), rtol=1e-5)


@pytest.mark.parametrize("subsample_steps", [None, 2])
def test_mean_field_with_forward_order_is_refused(subsample_steps):
    model, _ = _model()
    guide = DiffusionGuide(model.schedule, order="forward")
    with (
        pytest.warns(UserWarning) if subsample_steps else nullcontext(),
        pytest.raises(ValueError, match=r"biased[\s\S]*order='posterior'") as refused,
    ):
        TraceMeanField_ELBO().loss(model, guide, torch.zeros(2, 2), subsample_steps)
    assert str(refused.value) == FORWARD_ORDER_MEAN_FIELD_ERROR


def test_sampling_plain_call_and_predictive():
    model, _ = _model(data_shape=(2,))
    x = model.sample(6)
    assert x.shape == (6, 2)
    pred = Predictive(model, num_samples=3, return_sites=["x_0", "x_{1:T}"])(None, batch_size=4)
    assert pred["x_0"].shape == (3, 1, 4, 2)  # Predictive pads to the two plates (time, data)
    assert pred["x_{1:T}"].shape == (3, 5, 4, 2)


def test_a_model_knows_its_data_shape_from_its_network_or_the_argument():
    """Sampling before any data was scored: an MLPDenoiser's model takes the shape from the network, a UNet's (which
    fits any image size) from ``data_shape``; a ``data_shape`` that contradicts the network is refused, and a model
    that knows no shape says how to give it."""
    schedule = NoiseSchedule.linear(4, 0.1, 0.4)
    mlp = DiffusionModel(MLPDenoiser(3, hidden=8, depth=1), schedule)
    assert mlp.data_shape == (3,) and mlp(None, batch_size=5).shape == (5, 3)
    assert Predictive(mlp, num_samples=2)(None, batch_size=4)["x_0"].shape == (2, 1, 4, 3)
    unet = UNet(1, channels=8, channel_mult=(1,), num_res_blocks=1)
    assert DiffusionModel(unet, schedule, data_shape=(1, 8, 8))(None, batch_size=2).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"data_shape \(4,\) does not fit the network's data shape \(3,\)"):
        DiffusionModel(MLPDenoiser(3), schedule, data_shape=(4,))
    with pytest.raises(ValueError, match=r"does not know the shape of one example.*data_shape=D"):
        DiffusionModel(unet, schedule)(None, batch_size=2)


def test_sampling_follows_the_network():
    """A network predicting epsilon = 0 with x0 prediction gives deterministic means; check the sampler
    uses mu_theta: with the 'x0' parameterisation and output 0, x_{t-1} ~ N(coef_xt x_t, sigma_t^2)."""
    T = 4
    schedule = NoiseSchedule.linear(T, 0.1, 0.4)
    model = DiffusionModel(LinearDenoiser(T), schedule, prediction="x0", data_shape=(20000,))
    pyro.set_rng_seed(3)
    path = poutine.trace(model).get_trace(None, batch_size=1).nodes["x_{1:T}"]["value"][:, 0]  # (T, 20000)
    for k in range(1, T):  # x_k | x_{k+1}: regression slope coef_xt(k+1), residual variance sigma^2
        x_parent, x_child = path[k], path[k - 1]
        slope = (x_parent * x_child).mean() / (x_parent**2).mean()
        assert slope.item() == pytest.approx(schedule.posterior_mean_coef_xt[k].item(), abs=0.03)


def test_data_errors():
    model, guide = _model(decoder="discretized", levels=17, data_shape=(2,))
    with pytest.raises(ValueError, match="does not fit"):
        Trace_ELBO().loss(model, guide, torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        Trace_ELBO().loss(model, guide, torch.full((3, 2), 2.0))
    with pytest.raises(ValueError, match="off the grid"):
        Trace_ELBO().loss(model, guide, torch.full((3, 2), 0.01))
    with pytest.raises(ValueError, match="NaN"):
        Trace_ELBO().loss(model, guide, torch.full((3, 2), float("nan")))
    with pyro.validation_enabled(False):  # value checks follow Pyro's validation; shape checks always run
        model.check_data(torch.full((3, 2), float("nan")))
        with pytest.raises(ValueError, match="does not fit"):
            model.check_data(torch.zeros(3, 5))


def test_unet_shape_mismatch_is_named():
    schedule = NoiseSchedule.linear(4)
    model = DiffusionModel(UNet(1, channels=8, channel_mult=(1,), num_res_blocks=1), schedule)
    with pytest.raises(ValueError, match="does not fit|needs input"):
        Trace_ELBO().loss(model, DiffusionGuide(schedule), torch.zeros(2, 3, 8, 8))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prediction": "score"}, "prediction"),
        ({"variance": "fixed"}, "variance"),
        ({"decoder": "bernoulli"}, "decoder"),
        ({"decoder": "discretized"}, "levels"),
    ],
)
def test_bad_model_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _model(**kwargs)


def test_subsample_steps_out_of_range():
    model, guide = _model()
    for k in (0, 6, 1.5):
        with pytest.raises(ValueError, match="subsample_steps"):
            Trace_ELBO().loss(model, guide, torch.zeros(2, 2), k)


def test_elbo_module_trains_with_a_torch_optimizer():
    model, guide = _model()
    loss_module = Trace_ELBO()(model, guide)
    params = list(loss_module.parameters())
    assert len(params) == 2
    opt = torch.optim.Adam(params, lr=0.05)
    x0 = torch.rand(64, 2) * 0.2 + 0.5
    first = None
    for _ in range(150):
        opt.zero_grad()
        loss = loss_module(x0, 2)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    final = sum(loss_module(x0).item() for _ in range(20)) / 20
    assert final < first


def test_svi_with_pyro_optim():
    model, guide = _model()
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    assert torch.isfinite(torch.tensor(svi.step(torch.zeros(4, 2))))
    assert set(pyro.get_param_store().keys()) == {"network$$$a", "network$$$b"}


@pytest.mark.parametrize("v, fixed", [(-1.0, "small"), (1.0, "large")])
def test_learned_variance_spans_the_fixed_ones(v, fixed, float64):
    """Interpolation output v = -1 gives beta_tilde_t, v = +1 gives beta_t (Nichol & Dhariwal, eq. 15);
    at t = 1 the range is [beta_tilde_2, beta_1]."""
    T = 6
    schedule = NoiseSchedule.linear(T, 0.05, 0.3)
    a, b = torch.rand(T, dtype=torch.float64), torch.rand(T, dtype=torch.float64)
    learned = DiffusionModel(LinearDenoiser(T, a, b, torch.full((T,), v)), schedule, variance="learned")
    fixed_model = DiffusionModel(LinearDenoiser(T, a, b), schedule, variance=fixed)
    x, t = torch.randn(T, 3, dtype=torch.float64), torch.arange(1, T + 1)
    got, want = learned.predict(x, t), fixed_model.predict(x, t)
    assert torch.allclose(got.mean, want.mean) and torch.allclose(got.x0, want.x0)
    assert got.variance.shape == x.shape
    want_var = want.variance.expand_as(x).clone()
    if fixed == "large":
        want_var[0] = schedule.betas[0]
    assert torch.allclose(got.variance, want_var, rtol=1e-12)


def test_learned_variance_samples_and_checks_the_network():
    T = 5
    schedule = NoiseSchedule.linear(T, 0.05, 0.3)
    model = DiffusionModel(LinearDenoiser(T, v=torch.zeros(T)), schedule, variance="learned", data_shape=(3,))
    assert model.sample(4).shape == (4, 3)
    with pytest.raises(ValueError, match="twice the channels"):
        DiffusionModel(LinearDenoiser(T), schedule, variance="learned").predict(torch.zeros(2, 3), torch.tensor([1, 2]))


def test_a_refused_call_leaves_no_state_behind():
    """Data of the wrong shape for the network is refused, and the model still takes correct data after."""
    schedule = NoiseSchedule.linear(4)
    model = DiffusionModel(UNet(1, channels=8, channel_mult=(1,), num_res_blocks=1), schedule)
    guide = DiffusionGuide(schedule)
    with pytest.raises(ValueError, match="needs input"):
        Trace_ELBO().loss(model, guide, torch.zeros(2, 8, 8))
    assert model.data_shape is None
    assert torch.isfinite(torch.tensor(Trace_ELBO().loss(model, guide, torch.zeros(2, 1, 8, 8))))
    assert model.data_shape == (1, 8, 8)


def test_a_guide_on_another_schedule_object_is_refused():
    """Model and guide share one schedule object: another one is refused, even with equal tables."""
    model, _ = _model()
    other = DiffusionGuide(NoiseSchedule.linear(5, 0.01, 0.2))  # same length, other betas
    equal = DiffusionGuide(NoiseSchedule.linear(5, 0.05, 0.3))  # the model's tables, another object
    for guide in (other, equal):
        for estimator, k in ((Trace_ELBO, None), (TraceMeanField_ELBO, None), (Trace_ELBO, 2)):
            with pytest.raises(ValueError, match="another noise schedule object than the model's"):
                estimator().loss(model, guide, torch.zeros(3, 2), k)
    same = DiffusionGuide(model.schedule)
    assert torch.isfinite(torch.tensor(Trace_ELBO().loss(model, same, torch.zeros(3, 2))))


@pytest.mark.parametrize(
    "data, error, match",
    [
        (np.zeros((3, 2)), TypeError, "torch tensor"),
        (torch.zeros(0, 2), ValueError, "no examples"),
        (torch.zeros(3, 2, dtype=torch.long), TypeError, "floating"),
        (torch.full((3, 2), float("nan")), ValueError, "NaN"),
    ],
)
def test_bad_data_is_named_where_it_enters(data, error, match):
    model, guide = _model()
    with pytest.raises(error, match=match):
        Trace_ELBO().loss(model, guide, data)  # the guide runs first: it must name the problem


def test_data_of_another_dtype_than_the_network_is_named():
    schedule = NoiseSchedule.linear(5)
    model = DiffusionModel(MLPDenoiser(2, hidden=8, depth=1), schedule)  # float32 weights
    with pytest.raises(TypeError, match="float64 does not match the network's torch.float32"):
        Trace_ELBO().loss(model, DiffusionGuide(schedule), torch.zeros(3, 2, dtype=torch.float64))
