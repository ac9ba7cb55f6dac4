"""The learned-encoder VAE (pyrodiff.theory.vae): its bound against an exact oracle, its Pyro programs under SVI,
training, checkpoints and input checks.

The oracle: with both networks affine (depth 0), a constant encoder scale s and decoder scale sigma,
q(z | x) = N(A x + a, diag s^2) and the decoder mean mu_d = W_d . z + w0_d is, under q, a 1-D Gaussian
N(W_d . m + w0_d, sum_k W_dk^2 s_k^2) per pixel.  So E_q[-log p(x | z)] is a sum of 1-D expectations of the
exact bin mass (Gauss-Hermite quadrature, scipy) and KL(q || N(0, I)) = 1/2 sum_k (m_k^2 + s_k^2 - 1 - log s_k^2).
Everything in the oracle is numpy/scipy, independent of the package.
"""

import math

import numpy as np
import pyro
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from scipy import integrate
from scipy.stats import norm

from pyrodiff.chain.decoders import DiscretizedGaussian
from pyrodiff.data import load_dataset
from pyrodiff.theory.vae import (
    DECODER_MIN_SCALE,
    ENCODER_MIN_SCALE,
    VAE,
    load_vae,
    negative_elbo,
    parameter_count,
    save_vae,
    train_vae,
)
from pyrodiff.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pyrodiff.training.spec import load_spec

F64 = torch.float64


# ---------------------------------------------------------------------- the oracle (numpy / scipy only)
def log_bin_mass(x, mu, sigma, levels):
    """log P(x) of the discretized Gaussian: the N(mu, sigma^2) mass of x's bin, open-ended at -1 and 1, in
    log space on the side of the mean where it is accurate: log(sf(lo) - sf(hi)) above, log(cdf(hi) - cdf(lo))
    below, each as log a + log1p(-b / a)."""
    h = 1 / (levels - 1)
    lo = np.where(x < -1 + h / 2, -np.inf, x - h)
    hi = np.where(x > 1 - h / 2, np.inf, x + h)
    with np.errstate(divide="ignore"):  # log1p(-1) at an infinite edge is never selected
        above = norm.logsf(lo, mu, sigma) + np.log1p(-np.exp(norm.logsf(hi, mu, sigma) - norm.logsf(lo, mu, sigma)))
        below = norm.logcdf(hi, mu, sigma) + np.log1p(-np.exp(norm.logcdf(lo, mu, sigma) - norm.logcdf(hi, mu, sigma)))
    return np.where(lo > mu, above, below)


def oracle(case, x, quadrature_points=80):
    """Exact per-example (distortion, KL) in nats for the affine VAE ``case`` and data ``x`` (N, D)."""
    A, a, s, W, w0, sigma, levels = (case[k] for k in ("A", "a", "s", "W", "w0", "sigma", "levels"))
    m = x @ A.T + a  # (N, L)
    kl = 0.5 * (m**2 + s**2 - 1 - np.log(s**2)).sum(1)
    mu_mean = m @ W.T + w0  # (N, D)
    mu_sd = np.sqrt((W**2) @ s**2)  # (D,)
    u, w = np.polynomial.hermite_e.hermegauss(quadrature_points)
    w = w / w.sum()
    mu = mu_mean[..., None] + mu_sd[:, None] * u  # (N, D, Q)
    logp = log_bin_mass(x[..., None], mu, sigma[:, None], levels)
    return -(logp * w).sum(-1).sum(1), kl


def inverse_softplus(y):
    return np.log(np.expm1(y))


def random_case(rng, D=6, L=2, levels=5, decoder_weight=0.8):
    return {
        "A": rng.uniform(-0.6, 0.6, (L, D)),
        "a": rng.uniform(-0.5, 0.5, L),
        "s": rng.uniform(0.2, 1.2, L),
        "W": rng.uniform(-decoder_weight, decoder_weight, (D, L)),
        "w0": rng.uniform(-1.2, 1.2, D),
        "sigma": rng.uniform(0.05, 0.8, D),
        "levels": levels,
    }


def affine_vae(case, data_shape):
    """A depth-0 VAE whose weights are set by hand to ``case`` ()."""
    D, L = case["W"].shape
    vae = VAE(data_shape, latent_dim=L, depth=0, levels=case["levels"]).to(F64)
    enc, dec = vae.encoder[0], vae.decoder[0]
    with torch.no_grad():
        enc.weight.zero_()
        enc.weight[:L] = torch.tensor(case["A"])
        enc.bias[:L] = torch.tensor(case["a"])
        enc.bias[L:] = torch.tensor(inverse_softplus(case["s"] - ENCODER_MIN_SCALE))
        dec.weight.zero_()
        dec.weight[:D] = torch.tensor(case["W"])
        dec.bias[:D] = torch.tensor(case["w0"])
        dec.bias[D:] = torch.tensor(inverse_softplus(case["sigma"] - DECODER_MIN_SCALE))
    return vae.eval()


def grid_data(rng, n, shape, levels):
    v = rng.integers(0, levels, (n,) + tuple(shape))
    return torch.tensor(2 * v / (levels - 1) - 1, dtype=F64)


def tiny_vae(dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    return VAE((1, 8, 8), **{"latent_dim": 4, "hidden": 32, "depth": 1, **kwargs}).to(dtype)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


# ---------------------------------------------------------------------- the oracle itself
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oracle_quadrature_matches_adaptive_integration(seed):
    """Gauss-Hermite over the pixel's Gaussian mean against scipy's adaptive quadrature of the same 1-D integral.
    The integrand has kinks where the mean crosses the bin's edges, so Gauss-Hermite converges slowly (about
    1e-6 relative with 80 nodes when sigma is small against the mean's spread): far below any Monte Carlo error."""
    rng = np.random.default_rng(seed)
    case = random_case(rng, D=3, L=2)
    x = grid_data(rng, 2, (3,), case["levels"]).numpy()
    distortion, _ = oracle(case, x)
    m = x @ case["A"].T + case["a"]
    mu_sd = np.sqrt((case["W"] ** 2) @ case["s"] ** 2)
    for n in range(2):
        total = 0.0
        for d in range(3):
            mean = m[n] @ case["W"][d] + case["w0"][d]

            def f(mu, n=n, d=d, mean=mean):
                return -log_bin_mass(np.array(x[n, d]), mu, case["sigma"][d], case["levels"]) * norm.pdf(
                    mu, mean, mu_sd[d]
                )

            total += integrate.quad(f, mean - 12 * mu_sd[d], mean + 12 * mu_sd[d], limit=200, epsabs=1e-11)[0]
        assert distortion[n] == pytest.approx(total, rel=2e-5)


# ---------------------------------------------------------------------- the bound against the oracle
@given(st.integers(0, 2**32 - 1), st.integers(1, 4), st.integers(2, 9))
def test_bound_is_exact_when_the_decoder_ignores_z(seed, latent_dim, levels):
    """With W = 0 the draw of z does not matter: every draw of L_0 is the exact distortion, and L_1 is always
    the closed-form KL; the squared error is that of the clipped decoder mean."""
    rng = np.random.default_rng(seed)
    case = random_case(rng, D=6, L=latent_dim, levels=levels, decoder_weight=0.0)
    x = grid_data(rng, 3, (2, 3), levels)
    vae = affine_vae(case, (2, 3))
    terms = negative_elbo(vae, x, num_samples=2)
    distortion, kl = oracle(case, x.reshape(3, -1).numpy())
    assert terms.nats.shape == (2, 3, 2)
    np.testing.assert_allclose(terms.nats[..., 0].numpy(), np.broadcast_to(distortion, (2, 3)), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(terms.nats[..., 1].numpy(), np.broadcast_to(kl, (2, 3)), rtol=1e-10, atol=1e-12)
    sq = ((np.clip(case["w0"], -1, 1) - x.reshape(3, -1).numpy()) ** 2).sum(1)
    np.testing.assert_allclose(terms.x0_sq_error[..., 0].numpy(), np.broadcast_to(sq, (2, 3)), rtol=1e-10)
    assert terms.dims == 6 and terms.decoder.levels == levels


@pytest.mark.parametrize("seed", [0, 1])
def test_negative_elbo_matches_the_exact_value_within_standard_errors(seed):
    """A decoder mean linear in z: the Monte Carlo L_0 per example within 4.5 standard errors of the exact
    expectation (Gauss-Hermite), the KL exact, and bits/dim = nats / (D ln 2)."""
    rng = np.random.default_rng(seed)
    case = random_case(rng, D=6, L=3, levels=5, decoder_weight=0.8)
    x = grid_data(rng, 4, (1, 2, 3), 5)
    vae = affine_vae(case, (1, 2, 3))
    S = 4000
    terms = negative_elbo(vae, x, num_samples=S, generator=torch.Generator().manual_seed(seed))
    distortion, kl = oracle(case, x.reshape(4, -1).numpy())
    draws = terms.nats[..., 0].numpy()  # (S, N)
    se = draws.std(0, ddof=1) / math.sqrt(S)
    assert (se > 1e-3).all()  # the draws of z matter here
    assert np.all(np.abs(draws.mean(0) - distortion) < 4.5 * se), (draws.mean(0), distortion, se)
    np.testing.assert_allclose(terms.nats[..., 1].numpy(), np.broadcast_to(kl, (S, 4)), rtol=1e-10)
    total = terms.total.mean().item()
    assert total == pytest.approx((distortion + kl).mean(), abs=4.5 * np.sqrt((se**2).sum()) / 4)
    assert terms.to_bits_per_dim(total) == pytest.approx(total / (6 * math.log(2)))


def test_negative_elbo_draws_follow_the_generator():
    rng = np.random.default_rng(3)
    case = random_case(rng)
    vae, x = affine_vae(case, (6,)), grid_data(rng, 5, (6,), 5)
    a = negative_elbo(vae, x, 3, generator=torch.Generator().manual_seed(7)).nats
    b = negative_elbo(vae, x, 3, generator=torch.Generator().manual_seed(7)).nats
    c = negative_elbo(vae, x, 3, generator=torch.Generator().manual_seed(8)).nats
    assert torch.equal(a, b) and not torch.equal(a[..., 0], c[..., 0])
    assert not torch.equal(a[0, :, 0], a[1, :, 0])  # independent draws of z per sample


def test_networks_are_silu_mlps_with_softplus_scales():
    """encode/decode against a numpy forward pass of the documented architecture: Linear layers with SiLU
    between them, outputs split [loc, raw], scale = softplus(raw) + floor."""
    torch.manual_seed(4)
    vae = VAE((2, 3), latent_dim=3, hidden=5, depth=2, levels=9).to(F64)
    w = {k: v.numpy() for k, v in vae.state_dict().items()}

    def mlp(h, name):
        for i in (0, 2, 4):
            h = h @ w[f"{name}.{i}.weight"].T + w[f"{name}.{i}.bias"]
            if i < 4:
                h = h / (1 + np.exp(-h))
        return h

    def scale(raw, floor):
        return np.log1p(np.exp(raw)) + floor

    x = grid_data(np.random.default_rng(0), 4, (2, 3), 9)
    out = mlp(x.reshape(4, 6).numpy(), "encoder")
    loc, sc = vae.encode(x)
    np.testing.assert_allclose(loc.detach().numpy(), out[:, :3], rtol=1e-12)
    np.testing.assert_allclose(sc.detach().numpy(), scale(out[:, 3:], ENCODER_MIN_SCALE), rtol=1e-12)
    z = torch.randn(4, 3, dtype=F64)
    out = mlp(z.numpy(), "decoder")
    loc, sc = vae.decode(z)
    np.testing.assert_allclose(loc.detach().numpy(), out[:, :6].reshape(4, 2, 3), rtol=1e-12)
    np.testing.assert_allclose(sc.detach().numpy(), scale(out[:, 6:], DECODER_MIN_SCALE).reshape(4, 2, 3), rtol=1e-12)


# ---------------------------------------------------------------------- the Pyro programs
def _case_and_data(seed=0, n=5):
    rng = np.random.default_rng(seed)
    case = random_case(rng, D=6, L=2, levels=5)
    return affine_vae(case, (1, 6)), grid_data(rng, n, (1, 6), 5)


def _independent_terms(vae, x, z):
    """Per example log p(x|z), log N(z; 0, I), log q(z|x), KL(q || N(0, I)), from numpy/scipy."""
    with torch.no_grad():
        loc, scale = (t.numpy().reshape(len(x), -1) for t in vae.decode(z))
        m, s = (t.numpy() for t in vae.encode(x))
    zz, xx = z.detach().numpy(), x.numpy().reshape(len(x), -1)
    log_px = log_bin_mass(xx, loc, scale, vae.levels).sum(1)
    log_pz = norm.logpdf(zz).sum(1)
    log_qz = norm.logpdf(zz, m, s).sum(1)
    kl = 0.5 * (m**2 + s**2 - 1 - np.log(s**2)).sum(1)
    return log_px, log_pz, log_qz, kl


@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO])
def test_svi_loss_is_the_negative_elbo_at_the_guides_draw(elbo):
    """Trace_ELBO's loss is -sum_n [log p(x|z) + log p(z) - log q(z|x)] at the guide's z; TraceMeanField_ELBO's is
    sum_n [-log p(x|z) + KL(q || p)]: the single-sample estimates negative_elbo's columns are made of."""
    vae, x = _case_and_data()
    pyro.set_rng_seed(11)
    loss = elbo().loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(11)
    z = poutine.trace(vae.guide).get_trace(x).nodes["z"]["value"]
    log_px, log_pz, log_qz, kl = _independent_terms(vae, x, z)
    expected = -(log_px + log_pz - log_qz).sum() if elbo is Trace_ELBO else (-log_px + kl).sum()
    assert loss == pytest.approx(expected, rel=1e-10)


def test_model_scores_data_with_the_diffusion_models_decoder():
    vae, x = _case_and_data()
    trace = poutine.trace(poutine.replay(vae.model, poutine.trace(vae.guide).get_trace(x))).get_trace(x)
    site = trace.nodes["x"]
    assert site["is_observed"] and torch.equal(site["value"], x)
    assert isinstance(site["fn"].base_dist, DiscretizedGaussian) and site["fn"].base_dist.levels == 5
    assert site["fn"].event_shape == x.shape[1:]
    plate = trace.nodes["z"]["cond_indep_stack"]
    assert trace.nodes["z"]["fn"].event_shape == (2,) and [(f.name, f.size) for f in plate] == [("data", 5)]


def test_svi_step_trains_both_networks():
    """Under a user's own SVI loop both pyro.module registrations take effect: both networks change."""
    vae, x = _case_and_data()
    vae.train()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    svi.step(x)
    for prefix in ("encoder.", "decoder."):
        assert any(not torch.equal(v, before[k]) for k, v in vae.state_dict().items() if k.startswith(prefix)), prefix


# ---------------------------------------------------------------------- the parameter count
@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=3),
    st.integers(1, 6),
    st.integers(1, 12),
    st.integers(0, 3),
)
def test_parameter_count_is_the_number_of_parameters(data_shape, latent_dim, hidden, depth):
    vae = VAE(data_shape, latent_dim=latent_dim, hidden=hidden, depth=depth)
    assert parameter_count(data_shape, latent_dim, hidden, depth) == sum(p.numel() for p in vae.parameters())


def test_default_size_is_within_ten_percent_of_the_digits_unet():
    unet = load_spec("digits").network.build((1, 8, 8), 1)
    target = sum(p.numel() for p in unet.parameters())
    assert target == 701_345
    count = parameter_count((1, 8, 8))
    assert count == sum(p.numel() for p in VAE().parameters()) == 673_984
    assert abs(count / target - 1) < 0.10


# ---------------------------------------------------------------------- training
def test_training_lowers_the_negative_elbo(digits):
    """100 steps of a tiny VAE: the paired drop of the negative ELBO on the examples it saw is far beyond
    its standard error (deterministic: seeded, and stopped by steps, not by time)."""
    data = digits.train[:256]
    vae = tiny_vae()
    g = torch.Generator().manual_seed(0)
    before = negative_elbo(vae, data, 2, generator=g).total.mean(0)
    vae, info = train_vae(data, math.inf, vae=vae, max_steps=100, batch_size=32, lr=3e-3, warmup_steps=10)
    after = negative_elbo(vae, data, 2, generator=g).total.mean(0)
    drop = before - after
    assert info["steps"] == 100 and info["stopped_by"] == "max_steps" and len(info["losses"]) == 100
    assert drop.mean() > 4.5 * drop.std() / math.sqrt(len(drop)) and drop.mean() > 20
    assert np.mean(info["losses"][-10:]) < np.mean(info["losses"][:10]) - 20


def test_training_is_deterministic_given_the_seed_and_leaves_the_param_store(digits):
    data = digits.train[:128]
    pyro.param("users_own", torch.tensor(1.0))
    runs = [train_vae(data, math.inf, vae=tiny_vae(), max_steps=3, seed=s)[0].state_dict() for s in (1, 1, 2)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])
    assert list(pyro.get_param_store().keys()) == ["users_own"]


def test_default_vae_follows_the_data_and_time_budget_stops(digits):
    data = digits.train[:64].double()
    vae, info = train_vae(data, 0.3, batch_size=64, seed=0)
    assert next(vae.parameters()).dtype == F64 and vae.config == VAE().config and not vae.training
    assert info["stopped_by"] == "time" and info["seconds"] >= 0.3 and info["steps"] >= 1
    assert info["steps_per_second"] == pytest.approx(info["steps"] / info["seconds"])


def test_training_is_adam_with_linear_warm_up_on_the_examples_not_held_out(digits):
    """train_vae's SVI steps against a plain torch loop over the same batches and draws: a quarter of the data
    held out (never trained on), Adam on the ELBO module, learning rate lr * min(1, (step + 1) / warmup_steps)."""
    data = digits.train[:128].double()
    kwargs = {"max_steps": 4, "batch_size": 32, "lr": 0.01, "warmup_steps": 2, "seed": 5, "estimator": "trace"}
    trained, info = train_vae(data, math.inf, vae=tiny_vae(F64), validation_fraction=0.25, eval_every=100, **kwargs)
    ref = tiny_vae(F64)
    g = torch.Generator().manual_seed(5)
    split = torch.randperm(128, generator=g)
    assert info["validation_indices"] == split[:32].tolist()
    train = data[split[32:]]
    optimizer = torch.optim.Adam(ref.parameters(), lr=0.01)
    warm_up = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 2))
    pyro.set_rng_seed(5)
    with pyro.get_param_store().scope():
        loss = Trace_ELBO()(ref.model, ref.guide)
        for i in range(4):
            if i % 3 == 0:  # 96 training examples: 3 batches per epoch
                order = torch.randperm(96, generator=g)
            optimizer.zero_grad()
            loss(train[order[32 * (i % 3) : 32 * (i % 3 + 1)]]).backward()
            optimizer.step()
            warm_up.step()
    assert info["best_step"] == 4 and [s for s, _ in info["validation"]] == [4]
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(trained.state_dict()[k], v, rtol=1e-9, atol=1e-12)


def test_early_stopping_returns_the_best_held_out_weights(digits):
    """The returned weights are those of the best evaluation: the same as training only to that step, and
    their held-out negative ELBO (same draws of z) is the smallest recorded."""
    data = digits.train[:60]
    kwargs = {"batch_size": 16, "lr": 0.02, "warmup_steps": 0, "seed": 2, "validation_fraction": 0.3}
    best, info = train_vae(data, math.inf, vae=tiny_vae(), max_steps=60, eval_every=5, **kwargs)
    steps, nats = zip(*info["validation"], strict=True)
    assert list(steps) == list(range(5, 61, 5)) and len(info["validation_indices"]) == 18
    assert info["best_step"] == steps[int(np.argmin(nats))] < 60  # this seed overfits: the selection matters
    again, _ = train_vae(data, math.inf, vae=tiny_vae(), max_steps=info["best_step"], eval_every=1000, **kwargs)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in best.state_dict().items())
    held_out = data[info["validation_indices"]]
    value = negative_elbo(best, held_out, generator=torch.Generator().manual_seed(2)).total.mean().item()
    assert value == min(nats)


@pytest.mark.parametrize("estimator", ["trace", "mean_field"])
def test_training_loss_is_the_estimator_per_example(digits, estimator):
    """The first recorded loss is the SVI loss of the first batch divided by its size."""
    data = digits.train[:64]
    kwargs = {"max_steps": 1, "batch_size": 64, "estimator": estimator, "seed": 3, "validation_fraction": 0}
    _, info = train_vae(data, math.inf, vae=tiny_vae(), **kwargs)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    same = tiny_vae()
    pyro.set_rng_seed(3)  # as train_vae: nothing else draws from torch's generator before the first step
    loss = {"trace": Trace_ELBO, "mean_field": TraceMeanField_ELBO}[estimator]().loss(
        same.model, same.guide, data[order]
    )
    assert info["losses"][0] == pytest.approx(loss / 64, rel=1e-5)


def test_a_non_finite_loss_stops_training_naming_its_step(digits):
    """The losses stay on the device between reads (the training stage's loop); the first non-finite one is named by
    its step when they are read, here at the end of 7 steps, and training stops with an error, not with weights."""
    vae = tiny_vae()
    torch.nn.init.constant_(vae.decoder[-1].bias, float("nan"))
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at step 1; training stopped"):
        train_vae(digits.train[:64], math.inf, vae=vae, max_steps=7, batch_size=16, validation_fraction=0)


# ---------------------------------------------------------------------- checkpoints
def test_save_and_load_round_trip(tmp_path, digits):
    data = digits.train[:32].double()
    vae, info = train_vae(data, math.inf, vae=tiny_vae(F64), max_steps=2)
    path = tmp_path / "vae.pt"
    save_vae(path, vae, info)
    loaded = load_vae(path)
    assert loaded.config == vae.config and next(loaded.parameters()).dtype == F64 and not loaded.training
    for a, b in zip(vae.encode(data), loaded.encode(data), strict=True):
        assert torch.equal(a, b)
    z = torch.randn(5, 4, dtype=F64)
    for a, b in zip(vae.decode(z), loaded.decode(z), strict=True):
        assert torch.equal(a, b)
    t1 = negative_elbo(vae, data, 2, generator=torch.Generator().manual_seed(1)).nats
    t2 = negative_elbo(loaded, data, 2, generator=torch.Generator().manual_seed(1)).nats
    assert torch.equal(t1, t2)
    state = load_checkpoint(path)
    assert state["info"]["losses"] == info["losses"] and state["step"] == 2


def test_load_refuses_wrong_files(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_vae(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_vae(tmp_path / "junk.pt")
    diffusion = {"spec": {"data": {"name": "digits"}}, "step": 0, "network": {}, "ema": {}, "optimizer": {}}
    save_checkpoint(tmp_path / "diffusion.pt", diffusion)
    with pytest.raises(CheckpointError, match="not a VAE checkpoint.*load_trained"):
        load_vae(tmp_path / "diffusion.pt")
    vae = tiny_vae()
    save_vae(tmp_path / "vae.pt", vae)
    state = load_checkpoint(tmp_path / "vae.pt")
    state.pop("format")
    state["spec"]["config"]["latent_dim"] = 5
    save_checkpoint(tmp_path / "mismatch.pt", state)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_vae(tmp_path / "mismatch.pt")
    state["spec"]["config"]["latent_dim"] = 0
    save_checkpoint(tmp_path / "invalid.pt", state)
    with pytest.raises(CheckpointError, match="configuration is invalid"):
        load_vae(tmp_path / "invalid.pt")
    with pytest.raises(TypeError, match="VAE"):
        save_vae(tmp_path / "x.pt", torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------- bad input
def test_bad_data_is_refused(digits):
    vae = tiny_vae()
    x = digits.test[:4]
    with pytest.raises(ValueError, match="data shape"):
        negative_elbo(vae, x.reshape(4, 64))
    with pytest.raises(ValueError, match="off the grid"):
        negative_elbo(vae, x + 0.01 * (x < 0.5))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        negative_elbo(vae, x * 1.5)
    with pytest.raises(ValueError, match="NaN"):
        negative_elbo(vae, torch.where(x > 0, float("nan"), x))
    with pytest.raises(TypeError, match="floating-point"):
        negative_elbo(vae, ((x + 1) * 8).long())
    with pytest.raises(TypeError, match="torch tensor"):
        negative_elbo(vae, x.numpy())
    with pytest.raises(TypeError, match="dtype"):
        negative_elbo(vae, x.double())
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="num_samples"):
            negative_elbo(vae, x, bad)
    with pytest.raises(ValueError, match="off the grid"):
        vae.model(x + 0.01 * (x < 0.5))
    with pytest.raises(ValueError, match="data shape"):
        vae.guide(x[:, :, :4])
    with pytest.raises(ValueError, match=r"z must have shape \(N, 4\)"):
        vae.decode(torch.zeros(3, 5))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"latent_dim": 0}, ValueError, "latent_dim"),
        ({"hidden": 2.5}, ValueError, "hidden"),
        ({"depth": -1}, ValueError, "depth"),
        ({"levels": 1}, ValueError, "levels"),
        ({"data_shape": ()}, TypeError, "data_shape"),
        ({"data_shape": 64}, TypeError, "data_shape"),
        ({"data_shape": (1, 0)}, ValueError, "data_shape"),
    ],
)
def test_bad_configuration_is_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        VAE(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seconds": 0}, "seconds"),
        ({"seconds": -1.0}, "seconds"),
        ({"seconds": float("nan")}, "seconds"),
        ({"seconds": "60"}, "seconds must be a number > 0, got '60'"),
        ({"seconds": True}, "seconds must be a number > 0, got True"),
        ({"seconds": math.inf}, "max_steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": "fast"}, "lr"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"estimator": "iwae"}, "estimator"),
        ({"max_steps": 0}, "max_steps"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"validation_fraction": -0.1}, "validation_fraction"),
        ({"validation_fraction": "10%"}, "validation_fraction"),
        ({"eval_every": 0}, "eval_every"),
    ],
)
def test_bad_training_arguments_are_refused(digits, kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_vae(digits.train[:8], **{"seconds": 1.0, **kwargs})


def test_training_needs_examples_left_to_train_on(digits):
    with pytest.raises(ValueError, match="none to train on"):
        train_vae(digits.train[:1], 1.0, validation_fraction=0.5)


def test_training_refuses_a_mismatched_vae(digits):
    with pytest.raises(TypeError, match="dtype"):
        train_vae(digits.train[:8], 1.0, vae=tiny_vae(F64))
    with pytest.raises(TypeError, match="VAE"):
        train_vae(digits.train[:8], 1.0, vae=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="data shape"):
        train_vae(digits.train[:8, :, :4], 1.0, vae=tiny_vae())
