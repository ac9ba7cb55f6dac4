"""Closed forms of diagonal Gaussians against scipy and torch.distributions (float64)."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.stats import norm
from torch.distributions import Normal, kl_divergence

from pyrodiff.chain.gaussian import at_timesteps, expand_event, normal_kl, normal_log_prob

finite = st.floats(-3, 3)
positive = st.floats(0.05, 4.0)


@given(
    arrays(np.float64, (2, 3, 4), elements=finite),
    arrays(np.float64, (2, 3, 4), elements=finite),
    arrays(np.float64, (2, 3, 4), elements=positive),
    st.integers(0, 2),
)
def test_log_prob_is_the_sum_of_scipy_log_densities(value, loc, var, event_dim):
    lp = normal_log_prob(torch.tensor(value), torch.tensor(loc), torch.tensor(var), event_dim)
    dense = norm.logpdf(value, loc, np.sqrt(var))
    expected = dense.sum(tuple(range(3 - event_dim, 3))) if event_dim else dense
    assert lp.shape == expected.shape
    assert np.allclose(lp.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_log_prob_broadcasts_a_per_example_variance_over_the_data():
    """The variance and mean may have singleton event dims (a per-timestep table); the sum is still over
    every dimension of the value."""
    value = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.3, -0.2]], dtype=torch.float64)
    var = torch.tensor([[0.5], [2.0]], dtype=torch.float64)
    loc = torch.tensor([[0.1], [-0.4]], dtype=torch.float64)
    lp = normal_log_prob(value, loc, var, 1)
    expected = norm.logpdf(value.numpy(), loc.numpy(), np.sqrt(var.numpy())).sum(1)
    assert lp.shape == (2,) and np.allclose(lp.numpy(), expected, rtol=1e-12)
    # the standard normal at 0 in one dimension: -log(2 pi) / 2
    zero = torch.zeros(1, 1, dtype=torch.float64)
    one = torch.ones(1, 1, dtype=torch.float64)
    assert normal_log_prob(zero, zero, one, 1).item() == pytest.approx(-0.5 * np.log(2 * np.pi), rel=1e-14)


@given(
    arrays(np.float64, (2, 3), elements=finite),
    arrays(np.float64, (2, 3), elements=positive),
    arrays(np.float64, (2, 3), elements=finite),
    arrays(np.float64, (2, 3), elements=positive),
    st.integers(0, 2),
)
def test_kl_is_torch_distributions_kl_summed(loc_q, var_q, loc_p, var_p, event_dim):
    t = torch.tensor
    kl = normal_kl(t(loc_q), t(var_q), t(loc_p), t(var_p), event_dim)
    dense = kl_divergence(Normal(t(loc_q), t(var_q).sqrt()), Normal(t(loc_p), t(var_p).sqrt()))
    expected = dense.sum(tuple(range(2 - event_dim, 2))) if event_dim else dense
    assert kl.shape == expected.shape
    assert torch.allclose(kl, expected, rtol=1e-10, atol=1e-12)


def test_kl_by_hand_and_broadcast():
    """KL(N(1, 1) || N(0, 4)) = (log 4 + (1 + 1)/4 - 1) / 2; KL of a law to itself is 0; a variance with a
    singleton event dim is broadcast over the data's dims before summing."""
    one = torch.ones(1, 1, dtype=torch.float64)
    zero = torch.zeros(1, 1, dtype=torch.float64)
    assert normal_kl(one, one, zero, 4 * one, 1).item() == pytest.approx(0.5 * (np.log(4) + 0.5 - 1), rel=1e-14)
    assert normal_kl(one, one, one, one, 1).item() == 0
    loc_q = torch.tensor([[0.2, -0.4, 1.0]], dtype=torch.float64)
    var_q, var_p = torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[0.7]], dtype=torch.float64)
    kl = normal_kl(loc_q, var_q, torch.zeros(1, 1, dtype=torch.float64), var_p, 1)
    per_dim = 0.5 * (np.log(0.7 / 0.3) + (0.3 + loc_q.numpy() ** 2) / 0.7 - 1)
    assert kl.shape == (1,) and kl.item() == pytest.approx(per_dim.sum(), rel=1e-13)


def test_at_timesteps_reads_entry_t_minus_one():
    table = torch.tensor([10.0, 20.0, 30.0, 40.0])
    t = torch.tensor([[1, 4], [3, 2]])
    out = at_timesteps(table, t, 2)
    assert out.shape == (2, 2, 1, 1)
    assert out[..., 0, 0].tolist() == [[10.0, 40.0], [30.0, 20.0]]
    assert at_timesteps(table, torch.tensor([2]), 0).tolist() == [20.0]


def test_expand_event_appends_singleton_dims():
    x = torch.arange(6.0).reshape(2, 3)
    assert expand_event(x, 0).shape == (2, 3)
    assert expand_event(x, 2).shape == (2, 3, 1, 1)
    assert torch.equal(expand_event(x, 1)[..., 0], x)
