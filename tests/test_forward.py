"""Closed forms of the forward chain against independent derivations (float64)."""

import numpy as np
import pyro
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pyro import poutine
from scipy.stats import norm
from torch.distributions import MultivariateNormal

from pyrodiff import DiffusionGuide, NoiseSchedule
from pyrodiff.chain.forward import QForwardOrder, QPosteriorOrder, check_batch, q_marginal, q_posterior, q_trajectory
from pyrodiff.testing import data_batches, schedules


@given(schedules(), data_batches(), st.data())
def test_marginal_is_composition_of_transitions(schedule, x0, data):
    t = data.draw(st.integers(1, schedule.num_steps))
    mean, var = x0.clone(), torch.zeros(())
    for s in range(t):  # compose q(x_s | x_{s-1}) = N(sqrt(alpha_s) x_{s-1}, beta_s)
        alpha = 1 - schedule.betas[s]
        mean, var = alpha.sqrt() * mean, alpha * var + schedule.betas[s]
    loc, v = q_marginal(schedule, x0, torch.full((x0.shape[0],), t))
    assert torch.allclose(loc, mean, rtol=1e-10, atol=1e-12)
    assert torch.allclose(v, var.expand_as(v), rtol=1e-10)


@given(schedules(), data_batches(), st.data())
def test_posterior_is_gaussian_conditioning_of_the_joint(schedule, x0, data):
    t = data.draw(st.integers(2, schedule.num_steps))
    xt = torch.randn_like(x0)
    abar_prev, abar = schedule.alphas_cumprod[t - 2], schedule.alphas_cumprod[t - 1]
    alpha = schedule.alphas[t - 1]
    # joint of (x_{t-1}, x_t) given x0, then condition on x_t
    mu1, v1 = abar_prev.sqrt() * x0, 1 - abar_prev
    mu2, v2 = abar.sqrt() * x0, 1 - abar
    cov = alpha.sqrt() * v1
    loc, var = q_posterior(schedule, x0, xt, torch.full((x0.shape[0],), t))
    assert torch.allclose(loc, mu1 + cov / v2 * (xt - mu2), rtol=1e-9, atol=1e-12)
    assert torch.allclose(var, (v1 - cov**2 / v2).expand_as(var), rtol=1e-8, atol=1e-14)


def _joint_covariance(schedule):
    """Covariance of x_{1:T} given x0 for one scalar dimension: Cov(x_s, x_t) = sqrt(abar_t/abar_s)(1 - abar_s), s <= t."""
    abar = schedule.alphas_cumprod
    s, t = torch.meshgrid(torch.arange(len(abar)), torch.arange(len(abar)), indexing="ij")
    lo, hi = torch.minimum(s, t), torch.maximum(s, t)
    return (abar[hi] / abar[lo]).sqrt() * (1 - abar[lo])


@given(schedules(max_steps=8), data_batches(max_dim=3))
def test_both_orders_give_the_joint_density(schedule, x0):
    fwd, post = QForwardOrder(x0, schedule), QPosteriorOrder(x0, schedule)
    path = fwd.rsample()
    lp_fwd, lp_post = fwd.log_prob(path), post.log_prob(path)
    assert lp_fwd.shape == lp_post.shape == (schedule.num_steps, x0.shape[0])
    mean = schedule.alphas_cumprod.sqrt()[:, None, None] * x0.unsqueeze(0)  # (T, N, D)
    dense = MultivariateNormal(torch.zeros(schedule.num_steps, dtype=torch.float64), _joint_covariance(schedule))
    expected = dense.log_prob((path - mean).permute(1, 2, 0)).sum(-1)  # sum over D
    assert torch.allclose(lp_fwd.sum(0), expected, rtol=1e-7, atol=1e-7)
    assert torch.allclose(lp_post.sum(0), expected, rtol=1e-7, atol=1e-7)


def test_rsample_has_the_forward_marginals(float64):
    schedule = NoiseSchedule.linear(50, 1e-3, 0.2)
    x0 = torch.tensor([[0.7, -0.3]])
    paths = QForwardOrder(x0.expand(20000, 2), schedule).rsample()  # (T, 20000, 2)
    loc, var = q_marginal(schedule, x0, torch.arange(1, 51)[:, None])  # (T, 2), (T, 1)
    mean, v = paths.mean(1), paths.var(1)
    n = paths.shape[1]
    assert ((mean - loc).abs() <= 4 * (var / n).sqrt()).all()
    # the sample variance has standard error var * sqrt(2 / (n - 1))
    assert ((v - var).abs() <= 4 * var * (2 / (n - 1)) ** 0.5).all()


@pytest.mark.parametrize("subsample_steps", [None, 3])
def test_orders_share_sites_and_replay(subsample_steps, float64):
    schedule = NoiseSchedule.linear(5, 0.05, 0.3)
    x0 = torch.rand(4, 1, 2, 2) * 2 - 1
    traces = {}
    for order in ("posterior", "forward"):
        traces[order] = poutine.trace(DiffusionGuide(schedule, order)).get_trace(x0, subsample_steps)
    sites = {o: {n: s["value"].shape for n, s in tr.nodes.items() if s["type"] == "sample"} for o, tr in traces.items()}
    assert sites["posterior"] == sites["forward"]
    replayed = poutine.trace(poutine.replay(DiffusionGuide(schedule, "forward"), trace=traces["posterior"])).get_trace(
        x0, subsample_steps
    )
    for name in sites["posterior"]:
        assert torch.equal(replayed.nodes[name]["value"], traces["posterior"].nodes[name]["value"])
    # same joint: the total log-density of one path agrees between orders
    replayed.compute_log_prob()
    traces["posterior"].compute_log_prob()
    if subsample_steps is None:
        assert torch.isclose(replayed.log_prob_sum(), traces["posterior"].log_prob_sum(), rtol=1e-9)


def test_guide_has_no_parameters():
    schedule = NoiseSchedule.linear(4)
    pyro.clear_param_store()
    poutine.trace(DiffusionGuide(schedule)).get_trace(torch.zeros(2, 3))
    assert len(pyro.get_param_store()) == 0


def test_bad_order():
    with pytest.raises(ValueError, match="order"):
        DiffusionGuide(NoiseSchedule.linear(4), order="sideways")


def _np_tables(schedule):
    beta = schedule.betas.numpy()
    abar = np.cumprod(1 - beta)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    P = np.sqrt(abar_prev) * beta / (1 - abar)
    Q = np.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)
    return beta, abar, P, Q, beta * (1 - abar_prev) / (1 - abar)


def _logpdf(x, loc, var, event_dims):
    return norm.logpdf(x, loc, np.sqrt(var)).sum(tuple(range(-event_dims, 0)))


@pytest.mark.parametrize("data_shape, sample_shape", [((3, 2), ()), ((2, 1, 2, 2), ()), ((3, 2), (4,))])
def test_rsample_is_the_forward_recursion(data_shape, sample_shape, float64):
    """Driven by the same standard normal draws eps_t, the path is x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) eps_t."""
    schedule = NoiseSchedule.linear(6, 0.05, 0.4)
    x0 = torch.rand(data_shape) * 2 - 1
    torch.manual_seed(5)
    path = QForwardOrder(x0, schedule).rsample(torch.Size(sample_shape))
    torch.manual_seed(5)
    eps = torch.randn(sample_shape + (6,) + data_shape)
    assert path.shape == eps.shape
    x = x0.expand(sample_shape + data_shape)
    time_dim = len(sample_shape)
    for t in range(6):
        beta = schedule.betas[t]
        x = (1 - beta).sqrt() * x + beta.sqrt() * eps.select(time_dim, t)
        assert torch.allclose(path.select(time_dim, t), x, rtol=1e-10, atol=1e-12), t


def test_q_trajectory_continues_from_the_state_it_returns(float64):
    """Chunks of timesteps, each started from the scaled state the previous one returned (as bound_terms draws a
    trajectory), give the path of one call over all of them, which is the recursion
    x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) eps_t."""
    schedule = NoiseSchedule.linear(6, 0.05, 0.4)
    x0 = torch.rand(3, 2) * 2 - 1
    eps = torch.randn(6, 3, 2)
    whole, end = q_trajectory(schedule, x0, eps, torch.arange(1, 7))
    start, parts = x0, []
    for t in ([1, 2], [3, 4, 5], [6]):
        part, start = q_trajectory(schedule, start, eps[t[0] - 1 : t[-1]], torch.tensor(t))
        parts.append(part)
    assert torch.allclose(torch.cat(parts), whole, rtol=1e-12, atol=1e-14)
    assert torch.allclose(start, end, rtol=1e-12, atol=1e-14)
    x = x0
    for t in range(6):
        beta = schedule.betas[t]
        x = (1 - beta).sqrt() * x + beta.sqrt() * eps[t]
        assert torch.allclose(whole[t], x, rtol=1e-10, atol=1e-12), t
    assert torch.allclose(end, whole[-1] / schedule.alphas_cumprod[-1].sqrt(), rtol=1e-12)


@pytest.mark.parametrize("data_shape", [(3, 2), (2, 2, 2, 1)])
def test_every_row_of_both_orders(data_shape, float64):
    """Forward order: row k is log N(x_k; sqrt(alpha_k) x_{k-1}, beta_k) with x_0 the data.  Posterior order:
    row k < T is log N(x_k; P_{k+1} x0 + Q_{k+1} x_{k+1}, beta_tilde_{k+1}), row T is log N(x_T; sqrt(abar_T) x0, 1 - abar_T)."""
    T = 5
    schedule = NoiseSchedule.linear(T, 0.05, 0.3)
    beta, abar, P, Q, bt = _np_tables(schedule)
    x0 = torch.rand(data_shape) * 2 - 1
    path = torch.randn((T,) + data_shape)
    fwd, post = QForwardOrder(x0, schedule).log_prob(path), QPosteriorOrder(x0, schedule).log_prob(path)
    assert fwd.shape == post.shape == (T, data_shape[0])
    x, x_0 = path.numpy(), x0.numpy()
    event = len(data_shape) - 1
    for k in range(1, T + 1):
        parent = x_0 if k == 1 else x[k - 2]
        expected = _logpdf(x[k - 1], np.sqrt(1 - beta[k - 1]) * parent, beta[k - 1], event)
        assert np.allclose(fwd[k - 1].numpy(), expected, rtol=1e-10), ("forward", k)
        if k < T:
            expected = _logpdf(x[k - 1], P[k] * x_0 + Q[k] * x[k], bt[k], event)
        else:
            expected = _logpdf(x[k - 1], np.sqrt(abar[-1]) * x_0, 1 - abar[-1], event)
        assert np.allclose(post[k - 1].numpy(), expected, rtol=1e-10), ("posterior", k)


def test_guide_uses_the_law_of_its_order():
    schedule = NoiseSchedule.linear(4, 0.05, 0.3)
    for order, cls in (("posterior", QPosteriorOrder), ("forward", QForwardOrder)):
        site = poutine.trace(DiffusionGuide(schedule, order)).get_trace(torch.zeros(2, 3)).nodes["x_{1:T}"]
        assert type(site["fn"]) is cls
        assert {f.name: f.dim for f in site["cond_indep_stack"]} == {"time": -2, "data": -1}
        assert site["value"].shape == (4, 2, 3)


@pytest.mark.parametrize("order", ["posterior", "forward"])
@pytest.mark.parametrize("k", [4, 2])
def test_subsampled_guide_sites_follow_their_laws(order, k, float64):
    """Per drawn t: posterior order x_t ~ q(x_t | x0), x_{t-1} ~ q(x_{t-1} | x_t, x0); forward order
    x_{t-1} ~ q(x_{t-1} | x0), x_t ~ q(x_t | x_{t-1}) (parent x0 at t = 1).  x_{t-1} is masked out at t = 1,
    the drawn sites carry the weight T/k, and x_T ~ q(x_T | x0) is scored on every example."""
    T, N = 4, 30
    schedule = NoiseSchedule.linear(T, 0.05, 0.3)
    beta, abar, P, Q, bt = _np_tables(schedule)
    x0 = torch.rand(N, 2) * 2 - 1
    pyro.set_rng_seed(3)
    tr = poutine.trace(DiffusionGuide(schedule, order)).get_trace(x0, k)
    t = tr.nodes["t"]["value"].numpy()
    assert t.shape == (k, N) and (t == 1).any() and (t == 2).any()
    i = t - 1  # table index of t
    x_0 = x0.numpy()[None]
    xt, xprev = tr.nodes["x_t"]["value"].numpy(), tr.nodes["x_{t-1}"]["value"].numpy()
    if order == "posterior":
        lp_t = _logpdf(xt, np.sqrt(abar[i])[..., None] * x_0, (1 - abar[i])[..., None], 1)
        lp_prev = _logpdf(
            xprev, P[i][..., None] * x_0 + Q[i][..., None] * xt, bt[i][..., None] + (t == 1)[..., None], 1
        )
    else:
        j = np.maximum(i - 1, 0)
        lp_prev = _logpdf(xprev, np.sqrt(abar[j])[..., None] * x_0, (1 - abar[j])[..., None], 1)
        parent = np.where((t == 1)[..., None], x_0, xprev)
        lp_t = _logpdf(xt, np.sqrt(1 - beta[i])[..., None] * parent, beta[i][..., None], 1)
    sites = {"x_t": (lp_t, np.ones_like(t, bool)), "x_{t-1}": (lp_prev, t >= 2)}
    for name, (expected, keep) in sites.items():
        site = tr.nodes[name]
        got = site["fn"].log_prob(site["value"]).numpy()
        assert np.allclose(got, np.where(keep, expected, 0.0), rtol=1e-10, atol=1e-12), name
        assert site["scale"] == T / k
        assert {f.name: f.dim for f in site["cond_indep_stack"]} == {"steps": -2, "data": -1}
    x_T = tr.nodes["x_T"]
    expected = _logpdf(x_T["value"].numpy(), np.sqrt(abar[-1]) * x0.numpy(), 1 - abar[-1], 1)
    assert np.allclose(x_T["fn"].log_prob(x_T["value"]).numpy(), expected, rtol=1e-10)
    assert x_T["scale"] == 1.0 and {f.name: f.dim for f in x_T["cond_indep_stack"]} == {"data": -1}


def test_marginal_and_posterior_shapes_follow_the_timesteps(float64):
    schedule = NoiseSchedule.linear(5, 0.05, 0.3)
    x0 = torch.rand(2, 3, 4)
    t = torch.tensor([[1, 5], [3, 2]])  # (k, N) against x0 expanded to (k, N, 3, 4)
    loc, var = q_marginal(schedule, x0.expand(2, 2, 3, 4), t)
    assert loc.shape == (2, 2, 3, 4) and var.shape == (2, 2, 1, 1)
    loc, var = q_posterior(schedule, x0, torch.zeros_like(x0), torch.tensor([1, 3]))
    assert loc.shape == (2, 3, 4) and var.shape == (2, 1, 1)


def test_batches_are_checked():
    with pytest.raises(TypeError, match="torch tensor"):
        check_batch([[0.0, 1.0]])
    with pytest.raises(ValueError, match="shape"):
        check_batch(torch.zeros(3))
    with pytest.raises(ValueError, match="no examples"):
        check_batch(torch.zeros(0, 3))
    with pytest.raises(TypeError, match="floating"):
        check_batch(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        check_batch(torch.tensor([[0.0, float("inf")]]))
    for ok in (torch.zeros(1, 1), torch.zeros(2, 3), torch.zeros(1, 1, 2, 2)):
        check_batch(ok)


def test_shifted_paths():
    """``_following`` puts x_{k+1} in row k (x_T repeated in the last row), ``_preceding`` puts x_{k-1} there
    (x_0 in the first row); the repeated row is a placeholder that the posterior order replaces by q(x_T | x0)."""
    x0 = torch.tensor([[10.0, 20.0]])
    law = QPosteriorOrder(x0, NoiseSchedule.linear(3, 0.05, 0.3))
    path = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 6.0]]])  # (T, N, D) = (3, 1, 2)
    assert law._following(path)[:, 0].tolist() == [[3.0, 4.0], [5.0, 6.0], [5.0, 6.0]]
    assert law._preceding(path)[:, 0].tolist() == [[10.0, 20.0], [1.0, 2.0], [3.0, 4.0]]
