import numpy as np
import pytest
import torch

from pyrodiff import MLPDenoiser, UNet
from pyrodiff.networks import timestep_embedding


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
