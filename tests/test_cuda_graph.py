"""The step captured once as a CUDA graph (pyrodiff/cuda_graph.py): its refusal of a capture without warm-up (any
machine), and on a CUDA device (``pytest -m gpu``) each call equal to the eager step's."""

import pytest
import torch

from pyrodiff.cuda_graph import GraphedStep


@pytest.mark.parametrize("warmup", [0, -1])
def test_a_graphed_step_needs_an_eager_warmup_call(warmup):
    with pytest.raises(ValueError, match=f"at least one eager warm-up call, got warmup = {warmup}$"):
        GraphedStep(lambda x: x, warmup=warmup)


def _stateful_step(state: torch.Tensor):
    """A step that changes a state in place, draws noise on the device and returns a value: what a training step does
    (weights, dropout and timesteps, the loss)."""

    def step(x: torch.Tensor) -> torch.Tensor:
        state.mul_(0.5).add_(x)
        return (state * 2 + torch.randn_like(x)).sum()

    return step


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("warmup", [1, 3])
def test_every_call_equals_the_eager_step_warmup_capture_and_replays(warmup):
    """Same inputs, same CUDA generator state before each call: the warm-up calls, the capture and the replays give
    the eager step's outputs and states; each output is a fresh tensor, not overwritten by the next replay."""
    device = torch.device("cuda")
    graphed_state, eager_state = torch.zeros(4, device=device), torch.zeros(4, device=device)
    graphed, eager = GraphedStep(_stateful_step(graphed_state), warmup), _stateful_step(eager_state)
    g = torch.Generator().manual_seed(0)
    outputs = []
    for call in range(warmup + 4):
        x = torch.randn(4, generator=g).to(device)
        torch.cuda.manual_seed(call)
        out = graphed(x)
        torch.cuda.manual_seed(call)
        expected = eager(x)
        assert graphed.captured == (call >= warmup)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(graphed_state, eager_state, rtol=1e-6, atol=1e-6)
        outputs.append((out, expected.clone()))
    for out, expected in outputs:  # earlier outputs survive later replays
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert graphed.calls == warmup + 4
