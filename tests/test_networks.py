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


def test_timestep_embedding():
    e = timestep_embedding(torch.tensor([0, 7]), 8)
    assert e.shape == (2, 8)
    assert torch.allclose(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
