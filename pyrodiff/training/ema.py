"""The exponential moving average (EMA) of a network's weights, updated without reading the device.

:class:`torch.optim.swa_utils.AveragedModel` reads its update counter on the host at every update
(``if self.n_averaged == 0``, ``if self.n_averaged > 0``): two device synchronisations per training step
on a GPU, and an update that a CUDA graph cannot capture.  :class:`ExponentialMovingAverage` computes the
same average of the floating-point tensors (a copy at the first update, then ``torch._foreach_lerp_`` with weight
``1 - decay``; integer buffers, such as a batch-norm counter, are copied where ``AveragedModel`` averages them in
integer arithmetic: pyrodiff's networks have none), deciding the first update from a host flag instead of the device counter, and keeps
``AveragedModel(use_buffers=True)``'s state (``n_averaged`` and ``module.*``), so checkpoints written by
either load into both.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ExponentialMovingAverage"]


class ExponentialMovingAverage(nn.Module):
    r"""The EMA :math:`\bar\theta \leftarrow \text{decay}\,\bar\theta + (1 - \text{decay})\,\theta` of ``module``'s
    parameters and buffers (floating-point ones averaged, others copied), initialised to the weights of the
    first :meth:`update`.  ``self.module`` is the averaged copy; ``n_averaged`` counts the updates on the
    device and is read on the host only when a state is loaded."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        super().__init__()
        self.module = copy.deepcopy(module).requires_grad_(False)
        device = next(module.parameters()).device
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=device))
        self.decay = decay
        self._started = False  # whether n_averaged > 0, known on the host

    def _tensors(self, module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``module``'s floating-point tensors and its other ones, in a fixed order."""
        tensors = [*module.parameters(), *module.buffers()]
        return [t for t in tensors if t.is_floating_point()], [t for t in tensors if not t.is_floating_point()]

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Average ``module``'s current weights in (the first update copies them): device work only."""
        (averaged, copied), (current, current_copied) = self._tensors(self.module), self._tensors(module)
        if self._started:
            torch._foreach_lerp_(averaged, current, 1 - self.decay)
        else:
            torch._foreach_copy_(averaged, current)
        if copied:
            torch._foreach_copy_(copied, current_copied)
        self.n_averaged.add_(1)
        self._started = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._started = bool(self.n_averaged > 0)  # one host read, when a checkpoint is loaded
