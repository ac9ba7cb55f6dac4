"""The optimisation loop the diffusion model's training and the VAE baseline share
(:class:`~pyrodiff.training.optimisation.OptimisationLoop`), against a plain torch loop written out here: AdamW with
the linear warm-up lr min(1, (s + 1) / warmup), the gradient's norm clipped, the EMA of the weights; losses read only
when asked, a non-finite one named by its step."""

import pytest
import torch

from pyrodiff.training.optimisation import OptimisationLoop

LR, DECAY, WARMUP, CLIP, EMA = 0.05, 0.01, 3, 0.5, 0.9


class _Regression(OptimisationLoop):
    """Least squares of a linear map: the loss of a batch (x, y) is sum |W x - y|^2."""

    def __init__(self, net: torch.nn.Linear, **kwargs) -> None:
        self.net = net
        super().__init__([{"params": list(net.parameters())}], device=torch.device("cpu"), **kwargs)

    def step_loss(self, batch: torch.Tensor) -> torch.Tensor:
        loss = ((self.net(batch[:, :3]) - batch[:, 3:]) ** 2).sum()
        loss.backward()
        return loss.detach()


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 5, generator=g, dtype=torch.float64) * 3 for _ in range(n)]


def _net() -> torch.nn.Linear:
    torch.manual_seed(1)
    return torch.nn.Linear(3, 2, dtype=torch.float64)


def test_a_step_is_adamw_with_warm_up_clipping_and_an_ema():
    batches = _batches(6)
    net = _net()
    run = _Regression(
        net, lr=LR, weight_decay=DECAY, warmup_steps=WARMUP, grad_clip=CLIP, averaged=[net], ema_decay=EMA
    )
    ref = _net()
    average = [None for _ in ref.parameters()]
    adam_m = [torch.zeros_like(p) for p in ref.parameters()]
    adam_v = [torch.zeros_like(p) for p in ref.parameters()]
    for s, batch in enumerate(batches):
        run.train_step(batch)
        ref.zero_grad()
        ((ref(batch[:, :3]) - batch[:, 3:]) ** 2).sum().backward()
        grads = [p.grad for p in ref.parameters()]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        scale = min(1.0, CLIP / (norm.item() + 1e-6))
        lr = LR * min(1.0, (s + 1) / WARMUP)
        with torch.no_grad():
            for i, p in enumerate(ref.parameters()):
                g = grads[i] * scale
                p.mul_(1 - lr * DECAY)
                adam_m[i] = 0.9 * adam_m[i] + 0.1 * g
                adam_v[i] = 0.999 * adam_v[i] + 0.001 * g**2
                m_hat, v_hat = adam_m[i] / (1 - 0.9 ** (s + 1)), adam_v[i] / (1 - 0.999 ** (s + 1))
                p.sub_(lr * m_hat / (v_hat.sqrt() + 1e-8))
                average[i] = p.clone() if s == 0 else EMA * average[i] + (1 - EMA) * p  # the first update copies
        assert norm > CLIP  # the clipping is active at every step
    assert run.step == 6 and len(run.pending) == 6 and run.losses == []  # nothing read yet
    for got, want in zip(run.net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for got, want in zip(run.averages[0].module.parameters(), average, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    run.read_losses()
    assert run.pending == [] and len(run.losses) == 6


def test_a_non_finite_loss_is_named_by_its_step_at_the_next_read():
    run = _Regression(_net(), lr=LR)
    batches = _batches(4)
    batches[2][0, 4] = float("nan")
    for batch in batches:
        run.train_step(batch)
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at step 3; training stopped"):
        run.read_losses()
