import math

import numpy as np
import pytest
import torch

from pyrodiff import MLPDenoiser, UNet
from pyrodiff.networks import fourier_exponents_for_levels, fourier_features, timestep_embedding


@pytest.mark.parametrize(
    "shape, kwargs", [((2, 1, 8, 8), {"channels": 16, "channel_mult": (1, 2)}), ((2, 3, 16, 16), {"channels": 16})]
)
def test_unet_shapes_and_time_dependence(shape, kwargs):
    torch.manual_seed(0)
    net = UNet(shape[1], **kwargs)
    for p in net.parameters():  # leave the zero initialisation so that the output depends on t
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(shape)
    y1, y2 = net(x, torch.tensor([1, 1])), net(x, torch.tensor([500, 500]))
    assert y1.shape == shape
    assert not torch.allclose(y1, y2)


def test_unet_starts_at_zero_and_refuses_bad_input():
    net = UNet(1, channels=8, channel_mult=(1, 2))
    assert torch.count_nonzero(net(torch.randn(2, 1, 8, 8), torch.tensor([3, 4]))) == 0
    assert UNet(1, channels=8, channel_mult=(1, 2), out_channels=2)(
        torch.randn(2, 1, 8, 8), torch.tensor([3, 4])
    ).shape == (
        2,
        2,
        8,
        8,
    )
    with pytest.raises(ValueError, match="needs input"):
        net(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(2, 1, 7, 7), torch.tensor([1, 2]))


def test_mlp_denoiser():
    net = MLPDenoiser(2, hidden=16, depth=2)
    assert net(torch.randn(5, 2), torch.arange(1, 6)).shape == (5, 2)
    assert MLPDenoiser(2, hidden=16, out_dim=4)(torch.randn(5, 2), torch.arange(1, 6)).shape == (5, 4)
    with pytest.raises(ValueError, match="needs input"):
        net(torch.randn(5, 3), torch.arange(1, 6))


@pytest.mark.parametrize("dim, max_period", [(8, 10000.0), (6, 100.0), (128, 10000.0)])
def test_timestep_embedding_is_the_sinusoidal_code(dim, max_period):
    """Column i < d/2 is cos(t w_i) and column d/2 + i is sin(t w_i), with w_i = P^(-i / (d/2)) (the Transformer's
    frequencies, Vaswani et al. 2017, section 3.5, in improved-diffusion's cos-then-sin order), at t from 0 to
    T = 1000, computed here in float64; the embedding is float32, so the tolerance is a few float32 roundings of the
    largest argument t w_0 = t."""
    t = np.array([0, 1, 2, 7, 100, 537, 999, 1000])
    half = dim // 2
    omega = np.array([max_period ** (-i / half) for i in range(half)])
    args = t[:, None].astype(np.float64) * omega[None, :]
    expected = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    e = timestep_embedding(torch.tensor(t), dim, max_period)
    assert e.shape == (len(t), dim) and e.dtype == torch.float32
    tolerance = 4 * t.max() * np.finfo(np.float32).eps
    np.testing.assert_allclose(e.double().numpy(), expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("dim", [7, 1, 0, 8.0, True])
def test_timestep_embedding_refuses_a_width_that_is_not_even(dim):
    """Half cosines, half sines: an odd width would silently lose a column (dim 7 gave 6), so it is refused."""
    with pytest.raises(ValueError, match=r"dim must be an even integer >= 2"):
        timestep_embedding(torch.tensor([1, 2]), dim)


# ---------------------------------------------------------------------- Fourier features of the input
def _features_float64(x: np.ndarray, exponents) -> np.ndarray:
    """The features written out entry by entry in float64: channel block 0 is x, then for the j-th exponent n the
    block 1 + 2j holds sin(2^n pi x) and 2 + 2j holds cos(2^n pi x), channel c of each block from channel c of x."""
    channels = x.shape[1]
    out = np.empty((x.shape[0], channels * (1 + 2 * len(exponents)), *x.shape[2:]))
    for c in range(channels):
        out[:, c] = x[:, c]
        for j, n in enumerate(exponents):
            out[:, channels * (1 + 2 * j) + c] = np.sin(np.pi * 2.0**n * x[:, c])
            out[:, channels * (2 + 2 * j) + c] = np.cos(np.pi * 2.0**n * x[:, c])
    return out


@pytest.mark.parametrize("shape", [(3, 2, 4, 4), (5, 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fourier_features_are_sines_and_cosines_of_powers_of_two_times_pi(shape, dtype):
    """Against the float64 features entry by entry; the tolerance is a few roundings (of ``dtype``) of the largest
    argument 2^7 pi |x|, as the argument is rounded before its sine is taken."""
    exponents = (0, 3, 7)
    x = (3 * torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 1.5).to(dtype)
    expected = _features_float64(x.double().numpy(), exponents)
    got = fourier_features(x, exponents)
    assert got.dtype == dtype and got.shape == expected.shape
    tolerance = 4 * 2.0**7 * np.pi * 1.5 * torch.finfo(dtype).eps
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=0, atol=tolerance)
    assert fourier_features(x, ()) is x


def test_the_proposed_exponents_resolve_the_grid():
    """On the L-level grid z_k = -1 + 2k/(L-1) the larger exponent's features have period one spacing (the same at
    every level) and the smaller one's cosine alternates in sign from one level to the next; 256 levels give
    Kingma et al.'s (7, 8)."""
    assert fourier_exponents_for_levels(256) == (7, 8)
    assert fourier_exponents_for_levels(2) == (0,) and fourier_exponents_for_levels(3) == (0, 1)
    for levels in (5, 17, 65):
        low, high = fourier_exponents_for_levels(levels)
        z = -1 + 2 * np.arange(levels) / (levels - 1)
        np.testing.assert_allclose(np.cos(np.pi * 2.0**high * z), np.ones(levels), atol=1e-12)
        alternating = np.cos(np.pi * 2.0**low * z)
        np.testing.assert_allclose(np.abs(alternating), np.ones(levels), atol=1e-12)
        np.testing.assert_allclose(alternating[1:], -alternating[:-1], atol=1e-12)
    with pytest.raises(ValueError, match=r"levels must be an integer in 2\.\.65537, got 1"):
        fourier_exponents_for_levels(1)


#: The default networks' fingerprint at commit 1f1a234, before the option existed (see ``_fingerprint``): the number
#: of state_dict entries, a weighted sum of the initial values, and the sum and first three entries of the output.
BEFORE_THE_OPTION = {
    "unet": (
        128,
        21331.72292710361,
        0.42331223755354247,
        [-0.013601360627861978, -0.03434335849257718, 0.020550765196110703],
    ),
    "mlp": (22, 592.7411633580923, -2.243828721859576, [-0.7730551427379964, -0.5871250742889986, -0.7155481394643274]),
}


def _small(kind: str, **options) -> torch.nn.Module:
    """The small float64 network the fingerprints are taken of, initialised from seed 0."""
    torch.manual_seed(0)
    if kind == "unet":
        return UNet(1, channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2, **options)
    return MLPDenoiser(2, hidden=16, depth=2, **options)


def _input(kind: str, dtype=torch.float64) -> torch.Tensor:
    shape = (2, 1, 8, 8) if kind == "unet" else (2, 2)
    return torch.sin(torch.arange(math.prod(shape), dtype=dtype)).reshape(shape)


def _nudge(net: torch.nn.Module) -> None:
    """A deterministic change of every weight, so that the zero-initialised layers pass signal."""
    with torch.no_grad():
        for p in net.parameters():
            p += 0.01 * torch.sin(torch.arange(p.numel(), dtype=p.dtype)).reshape(p.shape)


def _fingerprint(net: torch.nn.Module, kind: str) -> tuple:
    state = net.state_dict()
    weighted = sum((i + 1) * v.double().sum().item() for i, v in enumerate(state.values()))
    _nudge(net)
    with torch.no_grad():
        out = net(_input(kind), torch.tensor([1, 500]))
    return len(state), weighted, out.sum().item(), out.flatten()[:3].tolist()


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_without_fourier_exponents_the_network_is_the_one_before_the_option(kind):
    """Off (the default, or an empty tuple) is the same network: the same state_dict (names, shapes, initial values
    under one seed), and the fingerprint recorded before the option existed, to float64 rounding."""
    default, off = _small(kind).double(), _small(kind, fourier_exponents=()).double()
    a, b = default.state_dict(), off.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    x, t = _input(kind), torch.tensor([1, 500])
    _nudge(default), _nudge(off)
    assert torch.equal(default(x, t), off(x, t))
    count, weighted, total, first = BEFORE_THE_OPTION[kind]
    got = _fingerprint(_small(kind).double(), kind)
    assert got[0] == count
    assert got[1:3] == pytest.approx((weighted, total), rel=1e-12, abs=1e-12)
    assert got[3] == pytest.approx(first, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_fourier_features_enter_the_network_as_extra_input_channels(kind):
    """With exponents (1, 4) the first layer takes 5 times the channels, and the network is the one without the
    option applied to the float64 features (same weights); a shift of the input by exactly 2, a period of every
    feature, reaches the output only through the raw channels: with their weights zeroed, the output is 2-periodic
    in x and still depends on x."""
    exponents = (1, 4)
    channels = 1 if kind == "unet" else 2
    net = _small(kind, fourier_exponents=exponents).double()
    first = net.stem if kind == "unet" else net.inp
    assert first.weight.shape[1] == channels * 5
    _nudge(net)
    plain = (
        UNet(5, channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2, out_channels=1)
        if kind == "unet"
        else MLPDenoiser(10, hidden=16, depth=2, out_dim=2)
    ).double()
    plain.load_state_dict(net.state_dict())
    x, t = _input(kind), torch.tensor([1, 500])
    features = torch.from_numpy(_features_float64(x.numpy(), exponents))
    with torch.no_grad():
        torch.testing.assert_close(net(x, t), plain(features, t), rtol=0, atol=1e-12)
        assert not torch.allclose(net(x + 2, t), net(x, t), rtol=0, atol=1e-6)
        first.weight[:, :channels] = 0  # the raw channels' path cut
        torch.testing.assert_close(net(x + 2, t), net(x, t), rtol=0, atol=1e-10)
        assert not torch.allclose(net(x + 0.01, t), net(x, t), rtol=0, atol=1e-6)


@pytest.mark.parametrize("exponents", [(3, 3), (17,), (-1,), (2.0,), (True,), "34", 3])
def test_bad_fourier_exponents_are_refused(exponents):
    for build in (lambda: UNet(1, fourier_exponents=exponents), lambda: MLPDenoiser(2, fourier_exponents=exponents)):
        with pytest.raises(ValueError, match=r"^fourier_exponents must be a list of distinct integers in 0\.\.16, got"):
            build()
