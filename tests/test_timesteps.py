"""The timestep subsample site and its weights."""

import pytest
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites, site_is_subsample

from pyrodiff import DiffusionGuide, NoiseSchedule
from pyrodiff.chain.timesteps import TimestepSubsample, TimestepWeighting, check_subsample_steps, step_scale


def test_pyro_still_recognises_and_prunes_the_timestep_site():
    """Pyro recognises subsample sites by the private class name ``_Subsample``
    (``pyro.poutine.util.site_is_subsample``) and prunes them from ELBO traces.  If a Pyro upgrade
    changes that rule, the drawn timesteps would be scored as a random variable: fail loudly here."""
    guide = DiffusionGuide(NoiseSchedule.linear(6, 0.05, 0.3))
    trace = poutine.trace(guide).get_trace(torch.zeros(3, 2), 2)
    site = trace.nodes["t"]
    assert site_is_subsample(site), "Pyro no longer recognises pyrodiff's timestep site as a subsample site"
    pruned = prune_subsample_sites(trace)
    assert "t" not in pruned.nodes, "Pyro no longer prunes pyrodiff's timestep site from ELBO traces"
    assert {"x_T", "x_t", "x_{t-1}"} <= set(pruned.nodes)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_drawn_timesteps_are_distinct_per_example_and_in_range(k):
    guide = DiffusionGuide(NoiseSchedule.linear(6, 0.05, 0.3))
    t = poutine.trace(guide).get_trace(torch.zeros(50, 2), k).nodes["t"]["value"]
    assert t.shape == (k, 50) and t.min() >= 1 and t.max() <= 6
    assert all(len(set(col.tolist())) == k for col in t.T)


@pytest.mark.parametrize("k", [1, 2])
def test_each_timestep_is_drawn_with_probability_k_over_T(k):
    """Every t in 1..T is included with probability k/T, independently per example (4 standard errors)."""
    T, N = 5, 4000
    torch.manual_seed(0)
    t = TimestepSubsample(N, k, T, torch.device("cpu")).sample()
    assert t.shape == (k, N) and t.dtype == torch.long
    included = torch.stack([(t == s).any(0) for s in range(1, T + 1)]).double().mean(1).numpy()
    p = k / T
    assert (abs(included - p) <= 4 * (p * (1 - p) / N) ** 0.5).all(), included
    assert t.min() >= 1 and t.max() <= T


def test_draws_from_given_probabilities_with_replacement():
    T, N, k = 4, 3000, 2
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    torch.manual_seed(1)
    t = TimestepSubsample(N, k, T, torch.device("cpu")).with_probs(probs).sample()
    assert t.shape == (k, N) and t.min() >= 1 and t.max() <= T
    freq = torch.bincount(t.reshape(-1) - 1, minlength=T).double() / (k * N)
    assert ((freq - probs).abs() <= 4 * (probs * (1 - probs) / (k * N)).sqrt()).all(), freq
    assert (t[0] == t[1]).any()  # with replacement


def test_step_weights_and_checks():
    t = torch.ones(3, 7, dtype=torch.long)
    assert step_scale(t, 12) == 4.0
    for k in (1, 6):
        check_subsample_steps(k, 6)
    for bad in (0, 7, 1.5, True):
        with pytest.raises(ValueError, match="subsample_steps"):
            check_subsample_steps(bad, 6)


def test_weighting_scales_each_drawn_term_by_its_timestep():
    """Sites x_t, x_{t-1}, x_0 get weights[t - 1] on top of their scale; other sites are left alone."""
    schedule = NoiseSchedule.linear(5, 0.05, 0.3)
    weights = torch.tensor([1.0, 10.0, 100.0, 1000.0, 10000.0], dtype=torch.float64)
    tr = poutine.trace(TimestepWeighting(weights)(DiffusionGuide(schedule))).get_trace(torch.zeros(6, 2), 2)
    t = tr.nodes["t"]["value"]
    for name in ("x_t", "x_{t-1}"):
        assert torch.allclose(torch.as_tensor(tr.nodes[name]["scale"]), 2.5 * weights.float()[t - 1])
    assert tr.nodes["x_T"]["scale"] == 1.0
    with pytest.raises(ValueError, match="subsample_steps"):
        poutine.trace(TimestepWeighting(weights)(DiffusionGuide(schedule))).get_trace(torch.zeros(6, 2))


def test_weights_are_cast_once_per_device():
    weighting = TimestepWeighting(torch.arange(1.0, 4.0, dtype=torch.float64))
    cpu = weighting._device_weights(torch.device("cpu"))
    assert cpu.dtype == torch.get_default_dtype() and weighting._device_weights(torch.device("cpu")) is cpu
    assert weighting._device_weights(torch.device("meta")).device.type == "meta"
    weighting.set_weights(torch.ones(3, dtype=torch.float64))
    assert weighting._device_weights(torch.device("cpu")).tolist() == [1.0, 1.0, 1.0]
