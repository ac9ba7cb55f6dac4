"""Samplers: the reverse step's values, reproducibility, and the exact law of the ancestral chain."""

import numpy as np
import pytest
import torch
from pyro import poutine

from pyrodiff import DiffusionModel, NoiseSchedule, samplers
from pyrodiff.chain.decoders import check_levels_grid
from pyrodiff.testing import LinearDenoiser, linear_reverse_coefficients

T = 5
SCHEDULE = NoiseSchedule.linear(T, 0.05, 0.3)


def _model(prediction="epsilon", variance="small", decoder="gaussian", levels=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(4)
    a = (torch.rand(T, generator=g, dtype=dtype) - 0.5) * 0.8
    b = (torch.rand(T, generator=g, dtype=dtype) - 0.5) * 0.4
    net = LinearDenoiser(T, a, b)
    return DiffusionModel(net, SCHEDULE, prediction, variance, decoder, levels, data_shape=(3,)), a, b


def _sigma2(variance):
    """The fixed reverse variances, from the betas (beta_tilde_2 at t = 1)."""
    beta = SCHEDULE.betas.numpy()
    abar = np.cumprod(1 - beta)
    tilde = beta[1] * (1 - abar[0]) / (1 - abar[1])
    post = beta * (1 - np.concatenate([[1.0], abar[:-1]])) / (1 - abar)
    return np.concatenate([[tilde], (post if variance == "small" else beta)[1:]])


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
@pytest.mark.parametrize("variance", ["small", "large"])
def test_reverse_step_with_explicit_noise(prediction, variance, float64):
    model, a, b = _model(prediction, variance)
    c, d = linear_reverse_coefficients(SCHEDULE, a.numpy(), b.numpy(), prediction)
    sigma2 = _sigma2(variance)
    x = torch.randn(4, 3)
    z = torch.randn(4, 3)
    for t in range(2, T + 1):
        expected = c[t - 1] * x.numpy() + d[t - 1] + np.sqrt(sigma2[t - 1]) * z.numpy()
        assert np.allclose(samplers.reverse_step(model, x, t, noise=z).numpy(), expected, rtol=1e-12)
    # at t = 1, the Gaussian decoder's draw; per-example timesteps mix both
    x0 = c[0] * x.numpy() + d[0] + np.sqrt(sigma2[0]) * z.numpy()
    assert np.allclose(samplers.reverse_step(model, x, 1, noise=z).numpy(), x0, rtol=1e-12)
    mixed = samplers.reverse_step(model, x, torch.tensor([1, 3, 1, 5]), noise=z).numpy()
    for i, t in enumerate([1, 3, 1, 5]):
        assert np.allclose(mixed[i], c[t - 1] * x[i].numpy() + d[t - 1] + np.sqrt(sigma2[t - 1]) * z[i].numpy())


def test_the_discretized_decoder_draws_on_the_grid(float64):
    model, _, _ = _model(decoder="discretized", levels=9)
    x0 = samplers.reverse_step(model, torch.randn(200, 3) * 3, 1, generator=torch.Generator().manual_seed(0))
    check_levels_grid(x0, 9)
    assert len(torch.unique(x0)) > 3
    # per-example timesteps: the rows at t = 1 are decoded onto the grid, the others are Gaussian steps
    x, z, t = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([1, 2, 1, 4])
    out = samplers.reverse_step(model, x, t, noise=z)
    for i in range(4):
        alone = samplers.reverse_step(model, x[i : i + 1], int(t[i]), noise=z[i : i + 1])
        assert torch.equal(out[i : i + 1], alone)
    check_levels_grid(out[t == 1], 9)
    off_grid = (out[t > 1] + 1) * 4
    assert ((off_grid - off_grid.round()).abs() > 1e-3).any()


def test_reproducible_given_x_T_and_the_generator(float64):
    model, _, _ = _model()
    x_T = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    runs = [samplers.ancestral(model, x_T, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    other = samplers.ancestral(model, x_T, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(runs[0], other)
    counted = [samplers.ancestral(model, 6, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(counted[0], counted[1]) and counted[0].shape == (6, 3)


def test_path_and_last_steps(float64):
    model, a, b = _model("x0")
    c, d = linear_reverse_coefficients(SCHEDULE, a.numpy(), b.numpy(), "x0")
    x_T = torch.randn(4, 3)
    x0, path = samplers.ancestral(model, x_T, generator=torch.Generator().manual_seed(2), return_path=True)
    assert path.shape == (T, 4, 3) and torch.equal(path[-1], x_T)
    x1, path_none = samplers.ancestral(
        model, x_T, generator=torch.Generator().manual_seed(2), last="none", return_path=True
    )
    assert torch.equal(x1, path[0]) and torch.equal(path_none, path)
    mean = samplers.ancestral(model, x_T, generator=torch.Generator().manual_seed(2), last="mean")
    assert np.allclose(mean.numpy(), c[0] * path[0].numpy() + d[0], rtol=1e-12)
    with pytest.raises(ValueError, match="last"):
        samplers.ancestral(model, x_T, last="median")


@pytest.mark.parametrize("variance", ["small", "large"])
def test_ancestral_samples_have_the_chain_s_exact_marginal(variance, float64):
    """x_(t-1) = c_t x_t + d_t + sigma_t z from x_T ~ N(0, I): mean and variance follow the linear recursion
    m <- c m + d, v <- c^2 v + sigma^2 down to x_0 (the Gaussian decoder is the same step at t = 1)."""
    model, a, b = _model("v", variance)
    c, d = linear_reverse_coefficients(SCHEDULE, a.numpy(), b.numpy(), "v")
    sigma2 = _sigma2(variance)
    m, v = 0.0, 1.0
    for t in range(T, 0, -1):
        m, v = c[t - 1] * m + d[t - 1], c[t - 1] ** 2 * v + sigma2[t - 1]
    n = 40000
    x = samplers.ancestral(model, n, generator=torch.Generator().manual_seed(5), last="sample").numpy()
    assert np.abs(x.mean(0) - m).max() < 4 * np.sqrt(v / n)
    assert np.abs(x.var(0) - v).max() < 4 * v * np.sqrt(2 / (n - 1))


def test_the_pyro_model_samples_through_the_sampler(float64):
    model, _, _ = _model()
    trace = poutine.trace(model).get_trace(None, batch_size=5)
    path = trace.nodes["x_{1:T}"]["value"]
    assert path.shape == (T, 5, 3) and trace.nodes["x_0"]["value"].shape == (5, 3)
    trace.compute_log_prob()  # a sampled path can be scored: every row of the chain, then the decoder
    assert trace.nodes["x_{1:T}"]["log_prob"].shape == (T, 5)
    assert model.sample(7, generator=torch.Generator().manual_seed(0)).shape == (7, 3)


def test_bad_arguments(float64):
    model, _, _ = _model()
    with pytest.raises(ValueError, match="1..T"):
        samplers.reverse_step(model, torch.zeros(2, 3), T + 1)
    for t in (True, 2.0, "2"):  # not an integer (True is no t = 1), nor a tensor
        with pytest.raises(TypeError, match=f"^t must be an integer in 1..T = 1..{T} or a tensor of shape"):
            samplers.reverse_step(model, torch.zeros(2, 3), t)
    with pytest.raises(ValueError, match="noise"):
        samplers.reverse_step(model, torch.zeros(2, 3), 2, noise=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="the number of samples must be an integer >= 1, got 0"):
        samplers.ancestral(model, 0)
    with pytest.raises(ValueError, match="data_shape"):
        samplers.ancestral(DiffusionModel(LinearDenoiser(T), SCHEDULE), 3)


# ---------------------------------------------------------------------- respaced chains and DDIM
LONG = NoiseSchedule.linear(30, 1e-3, 0.2)
KEPT = [1, 4, 9, 17, 30]


def _long_model(prediction="epsilon", variance="small", seed=6):
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(30, generator=g, dtype=torch.float64) - 0.5) * 0.8
    b = (torch.rand(30, generator=g, dtype=torch.float64) - 0.5) * 0.4
    return DiffusionModel(LinearDenoiser(30, a, b), LONG, prediction, variance, data_shape=(3,)), a, b


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_a_respaced_model_has_the_exact_bound_of_its_chain(prediction, float64):
    """The respaced model is the linear model (a, b) at the kept steps on the respaced schedule, so its terms
    are linear_elbo_terms of that: bound_terms must agree within 4.5 standard errors."""
    from pyrodiff.evaluation.bound import bound_terms
    from pyrodiff.testing import linear_elbo_terms

    model, a, b = _long_model(prediction)
    short = model.respaced(KEPT)
    kept = torch.tensor(KEPT) - 1
    x0 = torch.rand(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    exact = linear_elbo_terms(short.schedule, a[kept].numpy(), b[kept].numpy(), x0, prediction)
    torch.manual_seed(0)
    terms = bound_terms(short, x0, num_samples=400)
    mean, se = terms.nats.mean(0).numpy(), terms.nats.std(0).numpy() / np.sqrt(400)
    assert np.all(np.abs(mean - exact) <= 4.5 * se + 1e-10)
    assert short.schedule.num_steps == 5 and model.respaced(5).schedule.description["timesteps"] == [1, 8, 16, 23, 30]


def test_the_network_sees_the_original_timesteps(float64):
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t):
            seen.append(t.clone())
            return torch.zeros_like(x)

    model = DiffusionModel(Recorder(), LONG, data_shape=(3,)).respaced(KEPT)
    model.predict(torch.zeros(5, 3), torch.arange(1, 6))
    assert seen[-1].tolist() == KEPT


def _ddim_reference(model, x, timesteps, prediction, a, b):
    """Song et al. (2021), eq. 12 with eta = 0, from the network's raw output (numpy, float64)."""
    abar = np.cumprod(1 - LONG.betas.numpy())
    x = x.numpy()
    for i in range(len(timesteps) - 1, 0, -1):
        t, s = timesteps[i], timesteps[i - 1]
        out = a[t - 1].item() * x + b[t - 1].item()
        at, as_ = abar[t - 1], abar[s - 1]
        if prediction == "epsilon":
            eps = out
            x0 = (x - np.sqrt(1 - at) * eps) / np.sqrt(at)
        elif prediction == "x0":
            x0 = out
            eps = (x - np.sqrt(at) * x0) / np.sqrt(1 - at)
        else:  # v: x0 = sqrt(abar) x - sqrt(1 - abar) v, eps = sqrt(1 - abar) x + sqrt(abar) v
            x0 = np.sqrt(at) * x - np.sqrt(1 - at) * out
            eps = np.sqrt(1 - at) * x + np.sqrt(at) * out
        x = np.sqrt(as_) * x0 + np.sqrt(1 - as_) * eps
    return x


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_ddim_follows_the_published_update(prediction, float64):
    model, a, b = _long_model(prediction)
    x_T = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x1 = samplers.ddim(model, x_T, timesteps=KEPT, eta=0.0, last="none")
    assert np.allclose(x1.numpy(), _ddim_reference(model, x_T, KEPT, prediction, a, b), rtol=1e-10, atol=1e-12)
    again = samplers.ddim(model, x_T, timesteps=KEPT, eta=0.0, generator=torch.Generator().manual_seed(9))
    assert torch.equal(again, samplers.ddim(model, x_T, timesteps=KEPT))  # eta = 0: deterministic given x_T


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_ddim_with_eta_one_is_the_ancestral_sampler(prediction, float64):
    model, _, _ = _long_model(prediction, "small")
    x_T = torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for kw in ({"timesteps": KEPT}, {"steps": 7}, {}):
        ddim = samplers.ddim(model, x_T, eta=1.0, generator=torch.Generator().manual_seed(5), **kw)
        ancestral = samplers.ancestral(model, x_T, generator=torch.Generator().manual_seed(5), **kw)
        assert torch.allclose(ddim, ancestral, rtol=1e-10, atol=1e-12)
    half = samplers.ddim(model, x_T, timesteps=KEPT, eta=0.5, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(half, ancestral)


def test_clipping_takes_the_step_from_the_clamped_prediction(float64):
    a, b = torch.full((30,), 0.5, dtype=torch.float64), torch.full((30,), 3.0, dtype=torch.float64)
    model = DiffusionModel(LinearDenoiser(30, a, b), LONG, "x0", data_shape=(3,))
    x_T = torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    free = samplers.ancestral(model, x_T, generator=torch.Generator().manual_seed(1))
    clipped = samplers.ancestral(model, x_T, generator=torch.Generator().manual_seed(1), clip=True)
    assert free.max() > 1.5 and clipped.abs().max() <= 1 + 1e-12
    x = torch.randn(4, 3, dtype=torch.float64)
    t = torch.full((4,), 10)
    step = model.predict(x, t).clipped(model, x, t)
    P, Q = LONG.posterior_mean_coef_x0[9], LONG.posterior_mean_coef_xt[9]
    assert torch.allclose(step.mean, P * (0.5 * x + 3).clamp(-1, 1) + Q * x)


def test_bad_sampler_arguments(float64):
    model, _, _ = _long_model()
    x_T = torch.zeros(2, 3, dtype=torch.float64)
    for kwargs, match in (
        ({"eta": 1.5}, "eta"),
        ({"eta": -0.1}, "eta"),
        ({"steps": 1}, "steps"),
        ({"steps": 31}, r"steps must be an integer in 2\.\.T = 2\.\.30, got 31"),
        ({"timesteps": [1, 5, 5]}, "increasing"),
        ({"timesteps": [0, 5]}, "1..T"),
        ({"steps": 3, "timesteps": [1, 2]}, "not both"),
    ):
        with pytest.raises(ValueError, match=match):
            samplers.ddim(model, x_T, **kwargs)
    with pytest.raises(ValueError, match="x_T must have shape"):
        samplers.ancestral(model, torch.zeros(2, 4, dtype=torch.float64))
    for bad in (float("nan"), float("inf")):  # refused, not sampled into NaN samples
        x_bad = x_T.clone()
        x_bad[1, 2] = bad
        for sampler in (samplers.ancestral, samplers.ddim):
            with pytest.raises(ValueError, match="x_T holds NaN or infinite values"):
                sampler(model, x_bad)
    for sampler in (samplers.ancestral, samplers.ddim):  # a CUDA graph on the CPU
        with pytest.raises(ValueError, match="CUDA device"):
            sampler(model, x_T, graph=True)


def test_the_pyro_model_draws_x0_from_the_decoder_at_the_sampled_x1(float64):
    """model(None): the site "x_0" is the decoder at the path's first row x_1, not at another row."""
    model, _, _ = _model("x0")
    trace = poutine.trace(model).get_trace(None, batch_size=5)
    path, fn = trace.nodes["x_{1:T}"]["value"], trace.nodes["x_0"]["fn"]
    expected = model.predict(path[0], torch.ones(5, dtype=torch.long))
    assert torch.allclose(fn.mean, expected.mean) and torch.allclose(fn.variance, expected.variance.expand(5, 3))
