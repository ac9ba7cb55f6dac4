r"""Per-example timestep subsampling: the drawn timesteps as a Pyro subsample site, and their weights.

The negative ELBO is :math:`L_T + \sum_{t=1}^{T} \ell_t` with :math:`\ell_1 = L_0` (decoder) and
:math:`\ell_t = L_{t-1}` for t >= 2.  :math:`L_T` has no parameters and is scored on every example.
The other T terms are estimated by drawing, for each example independently, k distinct timesteps
uniformly from 1..T and weighting each drawn term by T/k: every term is included with probability
k/T, so the weighted sum is unbiased.  Per-example draws are far less variable than one index set
shared by the whole batch (what a ``pyro.plate`` subsample would give).

The draw is a Pyro *subsample* site ``"t"``: recorded by the guide, replayed into the model so that
both score the same timesteps, and pruned from the ELBO like the index site of a subsampled
``pyro.plate``.  This module is the only place that depends on how Pyro recognises such sites.
:class:`TimestepWeighting` rescales the drawn terms by any per-timestep weights (objectives,
importance sampling).
"""

from __future__ import annotations

import pyro
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample as _PyroSubsample

from .. import checks

__all__ = ["TimestepSubsample", "TimestepWeighting"]

#: The sites of one drawn term: each carries the weight of its timestep.
STEP_SITES = ("x_t", "x_{t-1}", "x_0")


class _Subsample(_PyroSubsample):
    """k timesteps in 1..T for each of N examples, shape ``(k, N)``: distinct and uniform, or, given
    ``probs`` (length T, on the device), drawn with replacement from them.  Drawing reads nothing back to
    the host, so it runs inside a captured CUDA graph.

    Named ``_Subsample`` on purpose: Pyro recognises subsample sites by this class name
    (``pyro.poutine.util.site_is_subsample``) and prunes them from ELBO traces, with log-density 0;
    ``tests/test_timesteps.py`` fails if a Pyro upgrade changes that rule.
    """

    def __init__(
        self,
        num_examples: int,
        subsample_steps: int,
        num_steps: int,
        device: torch.device,
        probs: torch.Tensor | None = None,
        continuous: bool = False,
    ) -> None:
        super().__init__(num_steps, subsample_steps, device=device)
        self.num_examples = num_examples
        self.probs = probs
        self.continuous = continuous

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        if sample_shape:
            raise NotImplementedError("timestep subsample sites are not vectorised over particles")
        T, k, N = self.size, self.subsample_size, self.num_examples
        if self.continuous:  # VDM's low-discrepancy times: one uniform shift of an even grid, shape (N,)
            u = torch.rand((), dtype=torch.float64, device=self.device)
            return torch.remainder(u + torch.arange(N, dtype=torch.float64, device=self.device) / N, 1.0)
        if self.probs is not None:  # inverse CDF: unlike torch.multinomial, never a host read (nor for one draw)
            cdf = self.probs.cumsum(0)
            u = torch.rand(k * N, dtype=cdf.dtype, device=cdf.device) * cdf[-1]
            return torch.searchsorted(cdf, u, right=True).clamp_(max=T - 1).reshape(k, N) + 1
        if k == 1:
            return torch.randint(1, T + 1, (1, N), device=self.device)
        return torch.rand(N, T, device=self.device).topk(k, dim=1).indices.T + 1

    def with_probs(self, probs: torch.Tensor) -> _Subsample:
        """The same site drawing from ``probs`` (length T) with replacement."""
        return _Subsample(self.num_examples, self.subsample_size, self.size, self.device, probs)


#: the public name of the site's distribution
TimestepSubsample = _Subsample


def check_subsample_steps(subsample_steps: int, num_steps: int) -> None:
    """Refuse a number of steps per example outside 1..T."""
    checks.int_in("subsample_steps", subsample_steps, 1, num_steps, hi_name="T")


def draw_timesteps(num_examples: int, subsample_steps: int, num_steps: int, device: torch.device) -> torch.Tensor:
    """The subsample site ``"t"``: timesteps of shape ``(k, N)``, shared by guide and model."""
    check_subsample_steps(subsample_steps, num_steps)
    return pyro.sample("t", _Subsample(num_examples, subsample_steps, num_steps, device))


def draw_times(num_examples: int, device: torch.device) -> torch.Tensor:
    r"""The subsample site ``"t"`` of a continuous-time program: one time in [0, 1) per example, shape ``(N,)``
    (float64), :math:`t_i = (u + i/N) \bmod 1` with one :math:`u \sim U[0, 1)` for the batch (Kingma et al. 2021,
    VDM, appendix I.1: each :math:`t_i` is uniform, and the batch covers [0, 1) evenly, which lowers the variance of
    the batch's mean); shared by guide and model, and pruned from the ELBO like the timesteps."""
    return pyro.sample("t", _Subsample(num_examples, 1, 1, device, continuous=True))


def step_scale(t: torch.Tensor, num_steps: int) -> float:
    """The weight T/k of each drawn term, which makes the estimate unbiased."""
    return num_steps / t.shape[0]


class TimestepWeighting(Messenger):
    r"""Scales the sites of each drawn term (:data:`STEP_SITES`) by ``weights[t - 1]``, with t read from
    the subsample site ``"t"`` that precedes them.  Wrap model and guide alike.  The full chain has no
    drawn terms to weight and is refused.  The weights are cast to the device and dtype of the draws
    once, not at every site."""

    def __init__(self, weights: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weights = weights
        self._on_device: torch.Tensor | None = None
        self._t: torch.Tensor | None = None

    def set_weights(self, weights: torch.Tensor) -> None:
        self.weights, self._on_device = weights, None

    def _process_message(self, msg) -> None:
        if msg["name"] == "x_{1:T}":
            raise ValueError("timestep weights apply to subsampled terms: pass subsample_steps")
        if msg["name"] in STEP_SITES and self._t is not None:
            msg["scale"] = msg["scale"] * self._device_weights(self._t.device)[self._t - 1]

    def _device_weights(self, device: torch.device) -> torch.Tensor:
        if self._on_device is None or self._on_device.device != device:
            self._on_device = self.weights.to(device, torch.get_default_dtype())
        return self._on_device

    def _postprocess_message(self, msg) -> None:
        if msg["name"] == "t":
            self._t = msg["value"]
