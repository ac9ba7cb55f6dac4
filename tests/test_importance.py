"""Timestep subsampling: uniform and importance-sampled draws, both unbiased for the full ELBO."""

from collections import deque

import numpy as np
import pyro
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyrodiff import DiffusionGuide, DiffusionModel, NoiseSchedule
from pyrodiff.chain.importance import ImportanceSampler
from pyrodiff.chain.traces import drawn_terms
from pyrodiff.testing import LinearDenoiser, linear_elbo_terms

T = 6
SCHEDULE = NoiseSchedule.linear(T, 0.05, 0.4)


def _setup():
    g = torch.Generator().manual_seed(9)
    a = (torch.rand(T, generator=g, dtype=torch.float64) - 0.5) * 0.8
    b = (torch.rand(T, generator=g, dtype=torch.float64) - 0.5) * 0.4
    x0 = torch.rand(3, 2, generator=g, dtype=torch.float64) * 2 - 1
    model = DiffusionModel(LinearDenoiser(T, a, b), SCHEDULE)
    return model, DiffusionGuide(SCHEDULE), x0, linear_elbo_terms(SCHEDULE, a.numpy(), b.numpy(), x0).sum()


def _skewed_sampler():
    sampler = ImportanceSampler(T, history=2, uniform_mix=0.05)
    for _ in range(2):  # warm it with values that make p far from uniform
        sampler.update(torch.arange(1, T + 1), torch.tensor([8.0, 1, 1, 0.5, 0.2, 0.1]))
    assert sampler.warm
    return sampler


@pytest.mark.parametrize("estimator", [Trace_ELBO, TraceMeanField_ELBO])
@pytest.mark.parametrize("subsample_steps", [1, 3])
def test_importance_sampled_estimate_is_unbiased(estimator, subsample_steps, float64):
    model, guide, x0, exact = _setup()
    sampler = _skewed_sampler()
    p = sampler.probs()
    assert p.max() / p.min() > 10
    pyro.set_rng_seed(21)
    losses = np.array([estimator().loss(sampler(model), sampler(guide), x0, subsample_steps) for _ in range(600)])
    stderr = losses.std(ddof=1) / np.sqrt(len(losses))
    assert abs(losses.mean() - exact) < 4 * stderr


def test_importance_draws_follow_the_proposal(float64):
    model, guide, x0, _ = _setup()
    sampler = _skewed_sampler()
    pyro.set_rng_seed(22)
    counts = torch.zeros(T)
    n = 0
    for _ in range(200):
        t = poutine.trace(sampler(guide)).get_trace(x0.repeat(10, 1), 2).nodes["t"]["value"]
        counts += torch.bincount(t.reshape(-1) - 1, minlength=T)
        n += t.numel()
    p = sampler.probs()
    assert ((counts / n - p).abs() <= 4 * (p * (1 - p) / n).sqrt()).all()


def test_drawn_terms_and_sampler_statistics(float64):
    model, guide, x0, _ = _setup()
    pyro.set_rng_seed(23)
    gt = poutine.trace(guide).get_trace(x0, 2)
    mt = poutine.trace(poutine.replay(model, trace=gt)).get_trace(x0, 2)
    t, terms = drawn_terms(mt, gt)
    assert t.shape == terms.shape == (2, 3)
    # weighted by T/k and added to the prior term, the drawn terms are the TraceMeanField loss
    prior = torch.distributions.kl_divergence(gt.nodes["x_T"]["fn"], mt.nodes["x_T"]["fn"]).sum()
    pyro.set_rng_seed(23)
    loss = TraceMeanField_ELBO(max_plate_nesting=2).loss(model, guide, x0, 2)
    assert (terms.sum() * T / 2 + prior).item() == pytest.approx(loss, rel=1e-10)
    sampler = ImportanceSampler(T, history=3)
    sampler.update(t, terms)
    assert sampler.counts.sum() == 6 and not sampler.warm
    assert torch.allclose(sampler.probs(), torch.full((T,), 1 / T, dtype=torch.float64))
    state = sampler.state_dict()
    other = ImportanceSampler(T, history=3)
    other.load_state_dict(state)
    assert torch.equal(other.values, sampler.values)


def test_sampler_keeps_the_newest_values_of_each_timestep():
    sampler = ImportanceSampler(3, history=2)
    sampler.update(torch.tensor([1, 1, 1, 2]), torch.tensor([1.0, 2.0, 3.0, 5.0]))
    sampler.update(torch.tensor([2, 3, 3]), torch.tensor([7.0, 8.0, 9.0]))
    assert sorted(sampler.values[0].tolist()) == [2.0, 3.0]
    assert sorted(sampler.values[1].tolist()) == [5.0, 7.0]
    assert sorted(sampler.values[2].tolist()) == [8.0, 9.0]
    assert sampler.warm
    expected = torch.tensor([(6.5) ** 0.5, 37.0**0.5, 72.5**0.5], dtype=torch.float64)
    assert torch.allclose(sampler.probs(), 0.999 * expected / expected.sum() + 0.001 / 3)


@given(
    st.integers(1, 4),
    st.lists(st.lists(st.tuples(st.integers(1, 4), st.floats(-5, 5)), min_size=1, max_size=9), min_size=1, max_size=5),
)
def test_sampler_history_is_the_last_values_of_each_timestep(history, batches):
    """Against a plain reference: one deque of the last ``history`` values per t, fed in order."""
    T = 4
    sampler = ImportanceSampler(T, history=history)
    last = {t: deque(maxlen=history) for t in range(1, T + 1)}
    for batch in batches:
        t = torch.tensor([s for s, _ in batch])
        sampler.update(t, torch.tensor([v for _, v in batch], dtype=torch.float64))
        for s, v in batch:
            last[s].append(v)
    counts = [sum(s == t for batch in batches for s, _ in batch) for t in range(1, T + 1)]
    assert sampler.counts.tolist() == counts
    for t in range(1, T + 1):
        kept = sampler.values[t - 1, : min(counts[t - 1], history)].tolist()
        assert sorted(kept) == pytest.approx(sorted(last[t])), t
    if all(c >= history for c in counts):
        assert sampler.warm
        rms = np.array([np.sqrt(np.mean(np.square(last[t]))) for t in range(1, T + 1)])
        if rms.sum() > 0:
            expected = 0.999 * rms / rms.sum() + 0.001 / T
            assert np.allclose(sampler.probs().numpy(), expected, rtol=1e-9)
    else:
        assert not sampler.warm


def test_sampler_warms_after_ten_values_of_every_timestep():
    sampler = ImportanceSampler(3)
    for _ in range(9):
        sampler.update(torch.tensor([1, 2, 3]), torch.tensor([1.0, 2.0, 3.0]))
    assert not sampler.warm
    sampler.update(torch.tensor([1, 2, 3]), torch.tensor([1.0, 2.0, 3.0]))
    assert sampler.warm
    assert np.allclose(sampler.probs().numpy(), 0.999 * np.array([1, 2, 3]) / 6 + 0.001 / 3)
