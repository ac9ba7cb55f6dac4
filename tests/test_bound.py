"""The decomposition of the bound: closed forms, the trace identity, draws, reports."""

import math
import warnings
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

from pyrodiff import DiffusionModel, NoiseSchedule
from pyrodiff.evaluation.bound import BoundTerms, bound_terms
from pyrodiff.evaluation.report import write_report
from pyrodiff.testing import LinearDenoiser, linear_case

T = 8
SCHEDULE = NoiseSchedule.linear(T, 0.02, 0.4)


def _model(prediction="epsilon", variance="small", decoder="gaussian"):
    return linear_case(SCHEDULE, prediction, variance, decoder, shape=(4, 3), seed=3)


@pytest.mark.parametrize("draws", ["independent", "trajectory"])
@pytest.mark.parametrize(
    "prediction, variance, decoder",
    [
        ("epsilon", "small", "gaussian"),
        ("v", "large", "gaussian"),
        ("x0", "small", "discretized"),
        ("epsilon", "learned", "discretized"),
    ],
)
def test_every_term_agrees_with_its_closed_form(draws, prediction, variance, decoder, float64):
    model, x0, exact = _model(prediction, variance, decoder)
    pyro.set_rng_seed(1)
    terms = bound_terms(model, x0, num_samples=400, draws=draws, chunk_size=3)
    assert terms.nats.shape == (400, 4, T + 1)
    mean = terms.nats.mean(0).numpy()  # (N, T + 1), per example and term
    stderr = terms.nats.std(0).numpy() / np.sqrt(400)
    exact_terms = exact
    deterministic = stderr < 1e-12  # L_T is exact
    assert np.allclose(mean[deterministic], exact_terms[deterministic], rtol=1e-10)
    z = np.abs(mean - exact_terms)[~deterministic] / stderr[~deterministic]
    assert z.max() < 4, z.max()  # every term within 4 standard errors


def test_trajectory_and_independent_draws_agree_in_mean(float64):
    model, x0, _ = _model()
    pyro.set_rng_seed(2)
    a = bound_terms(model, x0, 300, "independent").total.mean(0)
    b = bound_terms(model, x0, 300, "trajectory").total
    assert (torch.abs(a - b.mean(0)) < 4 * torch.sqrt(b.var(0) / 300 * 2)).all()


def _x0_hat_coefficients(schedule, model):
    """x0_hat = g_t x_t + h_t for the linear network a_t x_t + b_t, derived here from the definitions of
    the three targets (independently of pyrodiff.chain.parameterization)."""
    a, b = model.network.a.detach().numpy(), model.network.b.detach().numpy()
    abar = schedule.alphas_cumprod.numpy()
    r, q = np.sqrt(abar), np.sqrt(1 - abar)
    name = model.prediction.name
    if name == "epsilon":  # x_t = r x0 + q eps
        return (1 - q * a) / r, -q * b / r
    if name == "x0":
        return a, b
    return r - q * a, -q * b  # v = r eps - q x0  =>  x0 = r x_t - q v


@pytest.mark.parametrize("draws", ["independent", "trajectory"])
@pytest.mark.parametrize("chunk_size", [1, 3, T])
@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_reconstruction_errors_and_terms_are_exact_in_mean_for_any_chunking(draws, chunk_size, prediction, float64):
    """E||x0_hat(x_t) - x0||^2 has a closed form for a linear network, x_t ~ N(m x0, s^2): per dimension
    ((g m - 1) x0 + h)^2 + g^2 s^2.  Every chunking and both kinds of draws must give it (a trajectory carried
    wrongly between chunks has the wrong marginals), and the terms their closed forms."""
    model, x0, exact = _model(prediction)
    g, h = _x0_hat_coefficients(SCHEDULE, model)
    abar = SCHEDULE.alphas_cumprod.numpy()
    m, s2 = np.sqrt(abar), 1 - abar
    x = x0.numpy()[:, None, :]  # (N, 1, D) against t on axis 1
    expected = (((g * m - 1)[:, None] * x + h[:, None]) ** 2 + (g**2 * s2)[:, None]).sum(-1)  # (N, T)
    pyro.set_rng_seed(5)
    terms = bound_terms(model, x0, num_samples=300, draws=draws, chunk_size=chunk_size)
    err = terms.x0_sq_error.numpy()
    z = (err.mean(0) - expected) / (err.std(0) / np.sqrt(300))
    assert np.abs(z).max() < 4.5, np.abs(z).max()
    nats = terms.nats.numpy()[..., :T]  # L_T is exact and checked elsewhere
    z = (nats.mean(0) - exact[:, :T]) / (nats.std(0) / np.sqrt(300))
    assert np.abs(z).max() < 4.5, np.abs(z).max()


def test_trajectory_draws_are_one_forward_path_across_chunks(float64):
    """With draws="trajectory", x_t and x_(t+1) come from one forward path: with the x0 target and the
    identity network (x0_hat = x_t), Cov(x_t, x_(t+1)) = sqrt(alpha_(t+1)) (1 - abar_t) per dimension, also
    across a chunk boundary; independent draws give 0."""
    schedule = NoiseSchedule.linear(4, 0.1, 0.4)
    model = DiffusionModel(LinearDenoiser(4, torch.ones(4), torch.zeros(4)), schedule, prediction="x0")
    x0 = torch.zeros(20000, 1)  # one-dimensional: the squared error of x0_hat is x_t^2
    pyro.set_rng_seed(6)
    terms = bound_terms(model, x0, num_samples=1, draws="trajectory", chunk_size=2)
    xt_sq = terms.x0_sq_error[0]  # (N, T): x_t^2 per example
    abar, alpha = schedule.alphas_cumprod, schedule.alphas
    for t in (1, 2, 3):  # 2 -> 3 crosses the chunk boundary
        # for a zero-mean bivariate normal, Cov(X^2, Y^2) = 2 Cov(X, Y)^2
        cov = alpha[t].sqrt() * (1 - abar[t - 1])
        sample_cov = torch.cov(xt_sq[:, t - 1 : t + 1].T)[0, 1]
        expected = 2 * cov**2
        se = (xt_sq[:, t - 1] * xt_sq[:, t]).std() / np.sqrt(len(xt_sq))
        assert abs(sample_cov - expected) < 4 * se, (t, sample_cov.item(), expected.item())
    independent = bound_terms(model, x0, num_samples=1, draws="independent", chunk_size=2).x0_sq_error[0]
    se = (independent[:, 1] * independent[:, 2]).std() / np.sqrt(len(independent))
    assert abs(torch.cov(independent[:, 1:3].T)[0, 1]) < 4 * se


def test_every_kl_term_is_non_negative(float64):
    """Each KL term is an expectation of KL divergences: every draw of L_1 .. L_T is >= 0."""
    model, x0, _ = _model(decoder="discretized")
    pyro.set_rng_seed(6)
    terms = bound_terms(model, x0, num_samples=3)
    assert (terms.nats[..., 1:] >= 0).all()


def test_kl_bound_pairs_the_bound_with_the_data_log_density(tmp_path, float64):
    """With log q(x_0) known, the report gives mean(-ELBO + log q) and its paired standard error."""
    model, x0, _ = _model()
    pyro.set_rng_seed(8)
    terms = bound_terms(model, x0, num_samples=5)
    log_q = -0.5 * x0.pow(2).sum(-1)
    excess = (terms.total.mean(0) + log_q).numpy()  # per example, averaged over draws
    summary = write_report(terms, tmp_path / "r", {"name": "linear"}, log_q)
    assert summary["kl_bound_nats"] == pytest.approx(excess.mean())
    assert summary["kl_bound_stderr"] == pytest.approx(excess.std(ddof=1) / np.sqrt(len(excess)))
    assert "Bound on KL" in (tmp_path / "r" / "summary.md").read_text()


def test_by_default_one_independent_draw_per_example(float64):
    model, x0, _ = _model()
    torch.manual_seed(4)
    default = bound_terms(model, x0)
    torch.manual_seed(4)
    explicit = bound_terms(model, x0, num_samples=1, draws="independent")
    assert default.nats.shape == (1, 4, T + 1)
    assert torch.equal(default.nats, explicit.nats) and torch.equal(default.x0_sq_error, explicit.x0_sq_error)


@pytest.mark.parametrize(("num_examples", "calls"), [(4, 1), (1024, 2), (5000, T)])
def test_by_default_one_network_call_takes_about_4096_inputs(num_examples, calls, float64):
    """The default chunk is max(1, 4096 // N) timesteps: all T = 8 at once for 4 examples, 4 per call for 1024, one
    per call beyond 4096."""
    model, _, _ = _model()
    seen = []
    model.network.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    bound_terms(model, torch.rand(num_examples, 3, dtype=torch.float64) * 2 - 1)
    assert len(seen) == calls and sum(seen) == T * num_examples


def test_bad_input(float64):
    model, x0, _ = _model()
    with pytest.raises(ValueError, match="num_samples"):
        bound_terms(model, x0, num_samples=0)
    with pytest.raises(ValueError, match="draws"):
        bound_terms(model, x0, draws="antithetic")
    broken = DiffusionModel(LinearDenoiser(T, torch.full((T,), float("nan")), torch.zeros(T)), SCHEDULE)
    with pytest.raises(FloatingPointError, match="L_0 "):
        bound_terms(broken, x0)
    a = torch.zeros(T)
    a[2] = float("inf")  # the network breaks at t = 3 only: the term it feeds is L_2
    for chunk_size in (1, 2, T):
        with pytest.raises(FloatingPointError, match="L_2 of the bound is not finite"):
            bound_terms(DiffusionModel(LinearDenoiser(T, a, torch.zeros(T)), SCHEDULE), x0, chunk_size=chunk_size)


def test_without_validation_the_last_check_names_the_first_broken_term(float64):
    """With Pyro's validation off (as in training's evaluation) the chunks are not checked one by one: the one check
    at the end names the same term, L_2 where the network breaks at t = 3 only."""
    _, x0, _ = _model()
    a = torch.zeros(T)
    a[2] = float("inf")
    with pyro.validation_enabled(False), pytest.raises(FloatingPointError, match="L_2 of the bound is not finite"):
        bound_terms(DiffusionModel(LinearDenoiser(T, a, torch.zeros(T)), SCHEDULE), x0, num_samples=2)


def test_one_example(float64):
    model, x0, _ = _model()
    terms = bound_terms(model, x0[:1])
    assert terms.nats.shape == (1, 1, T + 1) and terms.dims == 3


def test_compare_bounds_script(tmp_path, float64):
    import runpy

    model, x0, _ = _model()
    for name in ("a", "b"):
        write_report(bound_terms(model, x0, num_samples=2), tmp_path / name, {"name": name})
    compare = runpy.run_path(str(Path(__file__).parents[1] / "analysis" / "compare_bounds.py"))["main"]
    assert compare([str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "A", "B", "--out", str(tmp_path / "c")]) == 0
    table = (tmp_path / "c" / "compare.md").read_text()
    assert "| A |" in table and "| B |" in table and (tmp_path / "c" / "compare.png").exists()


def test_standard_errors_with_one_example_come_from_the_draws():
    """With one example, the Monte Carlo error across draws is all there is: sd over draws / sqrt(S); with one
    draw of one example there is no error to estimate (NaN)."""
    from pyrodiff.chain.decoders import GaussianDecoder

    nats = torch.tensor([[[1.0, 2.0, 3.0]], [[3.0, 2.0, 7.0]], [[2.0, 5.0, 2.0]]], dtype=torch.float64)  # (S=3, N=1, 3)
    terms = BoundTerms(nats, torch.zeros(3, 1, 2), 4, GaussianDecoder(), {})
    expected = nats[:, 0].std(0) / 3**0.5
    assert torch.allclose(terms.stderr(), expected)
    assert terms.total_stderr() == pytest.approx((nats.sum(-1)[:, 0].std() / 3**0.5).item())
    single = BoundTerms(nats[:1], torch.zeros(1, 1, 2), 4, GaussianDecoder(), {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no estimate attempted: not torch's warning about zero degrees of freedom
        assert single.stderr().shape == (3,) and torch.isnan(single.stderr()).all()
        assert math.isnan(single.total_stderr())
    two = BoundTerms(torch.cat([nats, nats * 2 + 1], 1), torch.zeros(3, 2, 2), 4, GaussianDecoder(), {})
    per_example = two.nats.mean(0)
    assert torch.allclose(two.stderr(), per_example.std(0) / 2**0.5)  # two examples: across examples
    assert two.total_stderr() == pytest.approx((per_example.sum(-1).std() / 2**0.5).item(), rel=1e-12)


def test_views_of_the_terms():
    """total, rate (L_1 .. L_T), distortion (L_0), bits/dim and the mean of each term, from known draws."""
    from pyrodiff.chain.decoders import GaussianDecoder

    g = torch.Generator().manual_seed(0)
    nats = torch.rand(2, 3, 5, generator=g, dtype=torch.float64)
    terms = BoundTerms(nats, torch.zeros(2, 3, 4), 6, GaussianDecoder(), {})
    assert torch.allclose(terms.total, nats[..., 0] + nats[..., 1] + nats[..., 2] + nats[..., 3] + nats[..., 4])
    assert torch.allclose(terms.rate, nats[..., 1] + nats[..., 2] + nats[..., 3] + nats[..., 4])
    assert torch.equal(terms.distortion, nats[..., 0])
    assert torch.allclose(terms.bits_per_dim, nats / (6 * math.log(2)))
    assert torch.allclose(terms.mean(), nats.sum((0, 1)) / 6)
    assert terms.num_steps == 4
    one = BoundTerms(nats[:, :1], torch.zeros(2, 1, 4), 6, GaussianDecoder(), {})  # two draws of one example
    assert torch.allclose(one.stderr(), nats[:, 0].std(0) / 2**0.5)
