r"""Per-example values of the bound, read off Pyro traces of the model and the guide.

For one draw of the guide, the negative ELBO of example n is the sum over sites of
:math:`\log q - \log p` (or, for latent sites, the analytic :math:`\mathrm{KL}(q \| p)` that
``TraceMeanField_ELBO`` uses), each scaled and masked as the site says, summed over every batch
dimension but the data plate's.  Summed over n this is exactly the loss of ``Trace_ELBO`` (or
``TraceMeanField_ELBO``) on the same traces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import kl_divergence

__all__ = ["negative_elbo_per_example", "estimate_bound", "BoundEstimate"]


def _per_example(value: torch.Tensor, site: dict) -> torch.Tensor:
    value = scale_and_mask(value, site["scale"], site["mask"])
    frame = next(f for f in site["cond_indep_stack"] if f.name == "data")
    value = value.expand(site["fn"].batch_shape) if value.dim() < len(site["fn"].batch_shape) else value
    dim = value.dim() + frame.dim
    others = tuple(d for d in range(value.dim()) if d != dim)
    return value.sum(others) if others else value  # (sum over an empty tuple would reduce every dim)


def negative_elbo_per_example(
    model, guide, x0: torch.Tensor, subsample_steps: int | None = None, analytic: bool = True
) -> torch.Tensor:
    """One draw of each example's negative ELBO, shape ``(N,)`` (nats)."""
    guide_trace = poutine.trace(guide).get_trace(x0, subsample_steps)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x0, subsample_steps)
    guide_trace, model_trace = prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)
    total = x0.new_zeros(x0.shape[0])
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            total = total - _per_example(site["fn"].log_prob(site["value"]), site)
            continue
        guide_site = guide_trace.nodes[name]
        if analytic:
            term = kl_divergence(guide_site["fn"], site["fn"])
        else:
            term = guide_site["fn"].log_prob(site["value"]) - site["fn"].log_prob(site["value"])
        total = total + _per_example(term, guide_site)
    return total


@dataclass
class BoundEstimate:
    """Mean negative ELBO over examples with its standard error, in nats and in bits/dim."""

    nats: float
    stderr: float
    num_examples: int
    dims: int

    @property
    def bits_per_dim(self) -> float:
        return self.nats / (self.dims * math.log(2))

    @property
    def bits_per_dim_stderr(self) -> float:
        return self.stderr / (self.dims * math.log(2))


@torch.no_grad()
def estimate_bound(
    model, guide, data: torch.Tensor, subsample_steps: int | None, batch_size: int = 256
) -> BoundEstimate:
    """The negative ELBO of ``data`` (one draw per example, analytic KLs), averaged over examples;
    with ``subsample_steps`` it is the unbiased subsampled estimate, whose extra variance the
    standard error (across examples) includes."""
    values = torch.cat(
        [negative_elbo_per_example(model, guide, batch, subsample_steps) for batch in data.split(batch_size)]
    ).double()
    n = values.numel()
    stderr = values.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return BoundEstimate(values.mean().item(), stderr, n, int(data[0].numel()))
