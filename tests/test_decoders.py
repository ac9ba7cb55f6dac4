import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.stats import norm

from pyrodiff.chain.decoders import (
    DiscretizedDecoder,
    DiscretizedGaussian,
    GaussianDecoder,
    check_levels_grid,
    log_normal_bin_mass,
    parse_decoder,
    round_to_grid,
)


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


@pytest.mark.parametrize(
    "lower, upper",
    [
        (-np.inf, -3.0),
        (-np.inf, 0.4),
        (-1.0, 0.5),
        (0.0, 0.3),
        (0.2, 0.9),
        (2.0, 2.5),
        (6.0, 6.01),
        (7.0, np.inf),
        (-np.inf, np.inf),
        (-40.0, -39.9),
        (-0.3, 0.0),
    ],
)
def test_log_bin_mass_against_scipy(lower, upper):
    """log(Phi(u) - Phi(l)), each mass taken by scipy in the tail where it is accurate."""
    got = log_normal_bin_mass(torch.tensor([lower], dtype=torch.float64), torch.tensor([upper], dtype=torch.float64))
    mass = norm.sf(lower) - norm.sf(upper) if lower > 0 else norm.cdf(upper) - norm.cdf(lower)
    expected = (
        np.log(mass)
        if mass > 1e-300
        else norm.logcdf(upper) + np.log1p(-np.exp(norm.logcdf(lower) - norm.logcdf(upper)))
    )
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_log_bin_mass_is_floored_where_the_edges_meet():
    """Edges that coincide in float64 give a relative mass of 1e-12 of Phi(u), not log 0."""
    edge = torch.tensor([0.3], dtype=torch.float64)
    got = log_normal_bin_mass(edge, edge)
    assert got.item() == pytest.approx(norm.logsf(0.3) + np.log(1e-12), abs=1e-3)
    assert log_normal_bin_mass(-edge, -edge).item() == pytest.approx(norm.logcdf(-0.3) + np.log(1e-12), abs=1e-3)


@pytest.mark.parametrize("levels", [2, 3, 17])
def test_grid_accepts_its_values_and_refuses_the_rest(levels):
    grid = torch.linspace(-1, 1, levels, dtype=torch.float64)
    check_levels_grid(grid, levels)
    step = 2 / (levels - 1)
    for off in (0.5, 0.25, 0.0015):  # fractions of a bin
        with pytest.raises(ValueError, match="off the grid"):
            check_levels_grid(grid[:-1] + off * step, levels)
    check_levels_grid(grid[:-1] + 0.0005 * step, levels)  # within the tolerance of 1e-3 bins


def test_grid_range_tolerance():
    for inside in (-1 - 1e-6, 1 + 1e-6, -1 - 5e-7, 1 + 5e-7):
        check_levels_grid(torch.tensor([inside, 0.0], dtype=torch.float64), 3)
    for outside in (-1 - 1.5e-6, 1 + 1.5e-6, -1.5, 1.5, -3.0, 3.0):
        with pytest.raises(ValueError, match=r"\[-1, 1\]"):
            check_levels_grid(torch.tensor([outside, 0.0], dtype=torch.float64), 3)
    with pytest.raises(ValueError, match="at least 2 levels"):
        check_levels_grid(torch.tensor([0.0]), 1)


@given(arrays(np.float64, 20, elements=st.floats(-3, 3)), st.integers(2, 40))
def test_round_to_grid_is_the_nearest_level(x, levels):
    got = round_to_grid(torch.tensor(x), levels).numpy()
    grid = np.linspace(-1, 1, levels)
    distance = np.abs(np.clip(x, -1, 1)[:, None] - grid[None])
    nearest = distance.min(1)
    assert np.allclose(np.abs(np.clip(x, -1, 1) - got), nearest, atol=1e-12)
    assert np.allclose(np.abs(got[:, None] - grid[None]).min(1), 0, atol=1e-12)


def test_discretized_samples_follow_the_bin_masses():
    """Frequencies of 40000 draws against the bin masses, within 4 standard errors each."""
    loc, scale, levels, n = torch.tensor(0.3), torch.tensor(0.4), 5, 40000
    d = DiscretizedGaussian(loc.expand(n).double(), scale.expand(n).double(), levels)
    torch.manual_seed(0)
    x = d.sample()
    grid = torch.linspace(-1, 1, levels, dtype=torch.float64)
    freq = (x[:, None] == grid[None]).double().mean(0).numpy()
    p = DiscretizedGaussian(loc.double(), scale.double(), levels).log_prob(grid).exp().numpy()
    assert abs(freq.sum() - 1) < 1e-12
    assert (np.abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / n)).all(), (freq, p)
    assert d.mean is d.loc and DiscretizedGaussian(0.0, 1.0, levels).half_width == 0.25


def test_decoders_draw_with_the_given_noise():
    loc = torch.tensor([[0.1, -0.5, 0.8]], dtype=torch.float64)
    var = torch.tensor([[0.04]], dtype=torch.float64)
    noise = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    expected = loc + 0.2 * noise
    assert torch.allclose(GaussianDecoder().draw(loc, var, noise), expected, rtol=1e-14)
    assert torch.allclose(DiscretizedDecoder(5).draw(loc, var, noise), round_to_grid(expected, 5))
    assert DiscretizedDecoder(5).draw(loc, var, noise).tolist() == [[0.5, -1.0, 1.0]]


@pytest.mark.parametrize("name, levels", [("gaussian", None), ("discretized", 9)])
def test_decoder_distributions_have_the_given_variance(name, levels, float64):
    decoder = parse_decoder(name, levels)
    loc = torch.tensor([[0.1, -0.5], [0.4, 0.0]])
    var = torch.tensor([[0.09], [0.25]])
    x = torch.tensor([[0.25, -0.5], [0.5, 0.0]])
    lp = decoder.distribution(loc, var, 1).log_prob(x)
    if levels is None:
        expected = norm.logpdf(x.numpy(), loc.numpy(), np.sqrt(var.numpy())).sum(1)
    else:
        expected = DiscretizedGaussian(loc, var.sqrt().expand_as(loc), levels).log_prob(x).sum(1).numpy()
        h = 1 / (levels - 1)
        mass = norm.cdf(x.numpy() + h, loc.numpy(), np.sqrt(var.numpy())) - norm.cdf(
            x.numpy() - h, loc.numpy(), np.sqrt(var.numpy())
        )
        assert np.allclose(expected, np.log(mass).sum(1), rtol=1e-9)
    assert lp.shape == (2,) and np.allclose(lp.numpy(), expected, rtol=1e-12)


def test_decoder_objects():
    gaussian, d17, d256 = parse_decoder("gaussian"), parse_decoder("discretized", 17), parse_decoder("discretized", 256)
    assert isinstance(gaussian, GaussianDecoder) and gaussian.levels is None
    assert d17 == DiscretizedDecoder(17) and d17 != DiscretizedDecoder(9) and d17 != gaussian
    assert hash(d17) == hash(DiscretizedDecoder(17))
    assert gaussian.units_per_data_unit == 1.0 and d256.units_per_data_unit == 127.5 and d17.units_per_data_unit == 8
    assert d256.is_8bit_scale and not d17.is_8bit_scale and not gaussian.is_8bit_scale
    assert d256.describe() == "discretized decoder, 256 levels (8-bit scale)"
    assert d17.describe() == "discretized decoder, 17 levels"
    x = torch.tensor([-1.7, -0.2, 1.3])
    assert torch.equal(gaussian.reconstruction(x), x)
    assert d17.reconstruction(x).tolist() == pytest.approx([-1.0, -0.2, 1.0])
    assert DiscretizedDecoder(2).levels == 2
    for bad in (1, 2.0, True):
        with pytest.raises(ValueError, match="levels"):
            DiscretizedDecoder(bad)
    with pytest.raises(ValueError, match="decoder must be"):
        parse_decoder("bernoulli")
    with pytest.raises(ValueError, match="levels belong"):
        parse_decoder("gaussian", 17)
    with pytest.raises(ValueError, match="needs levels"):
        parse_decoder("discretized")
    assert parse_decoder(d17) is d17
