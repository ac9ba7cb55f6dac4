import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import norm

from pyrodiff.decoders import DiscretizedGaussian, check_levels_grid


@given(st.integers(2, 300), st.floats(-1.5, 1.5), st.floats(1e-3, 2.0))
def test_bin_masses_match_scipy_and_sum_to_one(levels, loc, scale):
    grid = torch.linspace(-1, 1, levels, dtype=torch.float64)
    lp = DiscretizedGaussian(
        torch.tensor(loc, dtype=torch.float64), torch.tensor(scale, dtype=torch.float64), levels
    ).log_prob(grid)
    h = 1 / (levels - 1)
    edges = np.concatenate([[-np.inf], grid[:-1].numpy() + h, [np.inf]])
    lo, hi = edges[:-1], edges[1:]
    # mass of each bin, taken in the tail where it is accurate (sf above the mean, cdf below)
    expected = np.where(
        lo > loc, norm.sf(lo, loc, scale) - norm.sf(hi, loc, scale), norm.cdf(hi, loc, scale) - norm.cdf(lo, loc, scale)
    )
    keep = expected > 1e-300
    assert np.allclose(lp.exp().numpy(), expected, rtol=1e-6, atol=1e-12)
    assert np.allclose(lp.numpy()[keep], np.log(expected[keep]), rtol=1e-6, atol=1e-8)
    assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_far_tail_is_finite():
    d = DiscretizedGaussian(torch.tensor(0.9, dtype=torch.float64), torch.tensor(1e-3, dtype=torch.float64), 256)
    assert torch.isfinite(d.log_prob(torch.tensor(-1.0, dtype=torch.float64)))
    assert torch.isfinite(d.log_prob(torch.tensor(0.0, dtype=torch.float64)))


def test_samples_lie_on_the_grid():
    d = DiscretizedGaussian(torch.zeros(1000), torch.ones(1000), 17)
    x = d.sample()
    check_levels_grid(x, 17)
    assert x.min() >= -1 and x.max() <= 1


def test_grid_errors():
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        check_levels_grid(torch.tensor([1.5]), 17)
    with pytest.raises(ValueError, match="off the grid"):
        check_levels_grid(torch.tensor([0.01]), 17)
