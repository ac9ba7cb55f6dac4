r"""Per-example timestep subsampling: an unbiased estimate of the full-chain ELBO.

The negative ELBO is :math:`L_T + \sum_{t=1}^{T} \ell_t` with :math:`\ell_1 = L_0` (decoder) and
:math:`\ell_t = L_{t-1}` for t >= 2.  :math:`L_T` has no parameters and is scored on every example.
The other T terms are estimated by drawing, for each example independently, k distinct timesteps
uniformly from 1..T and weighting each drawn term by T/k: every term is included with probability
k/T, so the weighted sum is unbiased.  Per-example draws are far less variable than one index set
shared by the whole batch (what a ``pyro.plate`` subsample would give; MATH.md).

The draw is a Pyro *subsample* site: recorded by the guide, replayed into the model so that both
score the same timesteps, and pruned from the ELBO like the index site of a subsampled
``pyro.plate``.
"""

from __future__ import annotations

import pyro
import torch
from pyro.poutine.subsample_messenger import _Subsample as _PyroSubsample

__all__ = ["draw_timesteps", "step_scale", "check_subsample_steps"]


class _Subsample(_PyroSubsample):
    """k distinct timesteps in 1..T for each of N examples, shape ``(k, N)``.

    Named ``_Subsample`` on purpose: Pyro recognises subsample sites by this class name
    (``pyro.poutine.util.site_is_subsample``) and prunes them from ELBO traces, with log-density 0.
    """

    def __init__(self, num_examples: int, subsample_steps: int, num_steps: int, device: torch.device) -> None:
        super().__init__(num_steps, subsample_steps, device=device)
        self.num_examples = num_examples

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        if sample_shape:
            raise NotImplementedError("timestep subsample sites are not vectorised over particles")
        T, k, N = self.size, self.subsample_size, self.num_examples
        if k == 1:
            return torch.randint(1, T + 1, (1, N), device=self.device)
        return torch.rand(N, T, device=self.device).topk(k, dim=1).indices.T + 1


def check_subsample_steps(subsample_steps: int, num_steps: int) -> None:
    """Refuse a number of steps per example outside 1..T."""
    if (
        isinstance(subsample_steps, bool)
        or not isinstance(subsample_steps, int)
        or not 1 <= subsample_steps <= num_steps
    ):
        raise ValueError(f"subsample_steps must be an integer in 1..T = 1..{num_steps}, got {subsample_steps!r}")


def draw_timesteps(num_examples: int, subsample_steps: int, num_steps: int, device: torch.device) -> torch.Tensor:
    """The subsample site ``"t"``: timesteps of shape ``(k, N)``, shared by guide and model."""
    check_subsample_steps(subsample_steps, num_steps)
    return pyro.sample("t", _Subsample(num_examples, subsample_steps, num_steps, device))


def step_scale(t: torch.Tensor, num_steps: int) -> float:
    """The weight T/k of each drawn term, which makes the estimate unbiased."""
    return num_steps / t.shape[0]
