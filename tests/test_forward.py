"""Closed forms of the forward chain against independent derivations (float64)."""

import pyro
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pyro import poutine
from torch.distributions import MultivariateNormal

from pyrodiff import DiffusionGuide, NoiseSchedule
from pyrodiff.forward import QForwardOrder, QPosteriorOrder, q_marginal, q_posterior
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
