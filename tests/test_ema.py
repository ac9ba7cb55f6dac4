"""The EMA of the weights (pyrodiff/training/ema.py) against torch's own ``AveragedModel``, step by step."""

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pyrodiff.training.ema import ExponentialMovingAverage

DECAY = 0.9


class _Net(nn.Module):
    """Parameters and a floating-point buffer (what is averaged)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.register_buffer("scale", torch.ones(2))

    def forward(self, x):
        return self.linear(x) * self.scale


def _perturb(net: nn.Module, generator: torch.Generator) -> None:
    """A stand-in for an optimiser step: every floating-point tensor moves by a random amount."""
    with torch.no_grad():
        for t in [*net.parameters(), *net.buffers()]:
            t.add_(torch.randn(t.shape, generator=generator))


def _reference(net: nn.Module) -> AveragedModel:
    return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=True)


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def test_the_average_is_torchs_averaged_model_at_every_step():
    """The first update copies the weights, each later one is decay * average + (1 - decay) * weights: the same
    tensors, bit for bit, as ``AveragedModel(use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(decay))``."""
    torch.manual_seed(0)
    net, g = _Net(), torch.Generator().manual_seed(1)
    ema, reference = ExponentialMovingAverage(net, DECAY), _reference(net)
    for step in range(1, 6):
        _perturb(net, g)
        ema.update(net)
        reference.update_parameters(net)
        assert int(ema.n_averaged) == int(reference.n_averaged) == step
        for ours, theirs in zip(_tensors(ema.module), _tensors(reference.module), strict=True):
            assert torch.equal(ours, theirs), step
    # and it is an average: neither the last weights nor the first
    assert not torch.equal(ema.module.linear.weight, net.linear.weight)


def test_the_average_is_the_exponentially_weighted_sum_of_the_weights():
    """Independently of torch's implementation: after updates with weights w_1..w_n the average is
    decay^(n-1) w_1 + sum_{k >= 2} (1 - decay) decay^(n-k) w_k."""
    torch.manual_seed(0)
    net, g = _Net(), torch.Generator().manual_seed(2)
    ema = ExponentialMovingAverage(net, DECAY)
    history = []
    for _ in range(4):
        _perturb(net, g)
        ema.update(net)
        history.append(net.linear.weight.detach().clone().double())
    n = len(history)
    expected = DECAY ** (n - 1) * history[0] + sum(
        (1 - DECAY) * DECAY ** (n - k) * history[k - 1] for k in range(2, n + 1)
    )
    torch.testing.assert_close(ema.module.linear.weight.double(), expected, rtol=1e-6, atol=1e-6)


def test_the_state_loads_into_averaged_model_and_back_and_the_average_continues():
    """A state written by either loads into both, and a loaded EMA continues as the uninterrupted one (its
    next update averages, it does not copy)."""
    torch.manual_seed(0)
    net, g = _Net(), torch.Generator().manual_seed(3)
    ema, reference = ExponentialMovingAverage(net, DECAY), _reference(net)
    for _ in range(3):
        _perturb(net, g)
        ema.update(net)
        reference.update_parameters(net)

    restored, reference_restored = ExponentialMovingAverage(_Net(), DECAY), _reference(_Net())
    restored.load_state_dict(ema.state_dict())
    reference_restored.load_state_dict(ema.state_dict())
    assert ema.state_dict().keys() == reference.state_dict().keys()
    from_reference = ExponentialMovingAverage(_Net(), DECAY)
    from_reference.load_state_dict(reference.state_dict())

    _perturb(net, g)
    for average in (ema, restored, from_reference):
        average.update(net)
    reference.update_parameters(net)
    reference_restored.update_parameters(net)
    for continued in (restored, from_reference, reference, reference_restored):
        for ours, theirs in zip(_tensors(ema.module), _tensors(continued.module), strict=True):
            assert torch.equal(ours, theirs)
    assert int(restored.n_averaged) == int(from_reference.n_averaged) == 4


def test_integer_buffers_are_copied():
    """A batch-norm counter (an integer buffer) holds the current network's value, not an average."""
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ExponentialMovingAverage(net, DECAY)
    net(torch.randn(4, 2))
    ema.update(net)
    net(torch.randn(4, 2))
    net(torch.randn(4, 2))
    ema.update(net)
    assert int(ema.module[1].num_batches_tracked) == int(net[1].num_batches_tracked) == 3


@pytest.mark.parametrize("decay", [0.0, 0.999])
def test_the_average_is_a_frozen_copy(decay):
    """The averaged copy is not the network and needs no gradient; the network keeps its own."""
    net = _Net()
    ema = ExponentialMovingAverage(net, decay)
    assert ema.module is not net and all(not p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in net.parameters())
    ema.update(net)
    with torch.no_grad():
        net.linear.weight.add_(1.0)
    ema.update(net)
    expected = net.linear.weight - 1.0 + (1 - decay) * 1.0
    torch.testing.assert_close(ema.module.linear.weight, expected, rtol=0, atol=1e-6)
