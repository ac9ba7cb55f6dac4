r"""The terms of the bound read off Pyro traces of the program.

- :func:`trace_terms`: from a pair of full-chain traces, every term :math:`L_0 .. L_T` of one draw
  (single-sample, not Rao-Blackwellised); they sum exactly to ``Trace_ELBO``'s loss on those traces.
- :func:`drawn_terms`: from a pair of subsampled traces, the drawn timesteps and the unweighted values of
  their terms (analytic KL for t >= 2, the decoder's negative log-likelihood at t = 1): what the
  importance sampler of timesteps learns from.
"""

from __future__ import annotations

import torch
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import kl_divergence

__all__ = ["trace_terms", "drawn_terms"]


def trace_terms(model_trace, guide_trace) -> torch.Tensor:
    r"""Column k of the result, shape ``(N, T + 1)``, is :math:`\log q - \log p` of row k of the site
    ``"x_{1:T}"`` (k = 1..T) and column 0 is :math:`-\log p_\theta(x_0 \mid x_1)`."""
    model_trace, guide_trace = prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)
    for tr in (model_trace, guide_trace):
        tr.compute_log_prob()
    chain = guide_trace.nodes["x_{1:T}"]["log_prob"] - model_trace.nodes["x_{1:T}"]["log_prob"]  # (T, N)
    decoder = -model_trace.nodes["x_0"]["log_prob"]
    return torch.cat([decoder.unsqueeze(-1), chain.T], dim=-1)


def drawn_terms(model_trace, guide_trace) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The drawn timesteps ``t`` and the unweighted values of their terms :math:`\ell_t`, both ``(k, N)``."""
    t = guide_trace.nodes["t"]["value"]
    kl = kl_divergence(guide_trace.nodes["x_{t-1}"]["fn"], model_trace.nodes["x_{t-1}"]["fn"])
    decoder = model_trace.nodes["x_0"]
    nll = -decoder["fn"].log_prob(decoder["value"])
    return t, torch.where(t == 1, nll, kl).detach()
