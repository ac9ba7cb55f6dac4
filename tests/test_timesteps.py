"""The timestep subsample site and its weights."""

import pytest
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites, site_is_subsample

from pyrodiff import DiffusionGuide, NoiseSchedule


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
