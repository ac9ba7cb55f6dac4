r"""Laws of a whole path :math:`x_{1:T}` as one distribution, the shared shape of both chains.

The full chain is one Pyro sample site ``"x_{1:T}"`` inside the plates ``time`` (dim -2, size T) and
``data`` (dim -1, size N): its value has shape ``(T, N, *D)``, row k - 1 holding :math:`x_k`, and its
``log_prob`` has shape ``(T, N)``, one log-density per variable.  The forward chain's two orders
(:mod:`pyrodiff.chain.forward`) and the reverse chain (:mod:`pyrodiff.chain.reverse`) are such laws.
"""

from __future__ import annotations

import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution

from .gaussian import expand_event


def path_timesteps(batch_shape: torch.Size, device: torch.device) -> torch.Tensor:
    """The math timestep of each row of a path of batch shape ``(T, N)``: row k - 1 holds k."""
    T = batch_shape[0]
    return torch.arange(1, T + 1, device=device).unsqueeze(-1).expand(batch_shape)


def is_last_row(batch_shape: torch.Size, event_dim: int, device: torch.device) -> torch.Tensor:
    """True on row T of a path (the variable x_T), shaped to broadcast over ``(T, N, *D)``."""
    T = batch_shape[0]
    return expand_event(torch.arange(T, device=device) == T - 1, event_dim + 1)


class PathDistribution(TorchDistribution):
    """A law of :math:`x_{1:T}` with batch shape ``(T, N)`` (time, data) and the data's event shape, real
    support.  It broadcasts only to its own batch shape: vectorised particles are not supported."""

    arg_constraints: dict = {}

    @constraints.dependent_property
    def support(self):
        return constraints.independent(constraints.real, self.event_dim)

    def expand(self, batch_shape, _instance=None):
        if torch.Size(batch_shape) != self.batch_shape:
            raise ValueError(
                f"the law of the path x_(1:T) has batch shape (T, N) = {tuple(self.batch_shape)} and cannot be "
                f"expanded to {tuple(batch_shape)}; vectorised particles are not supported"
            )
        return self
