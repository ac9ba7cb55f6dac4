"""Closed forms for diagonal Gaussians shared by the forward and reverse chains."""

from __future__ import annotations

import math

import torch

_LOG_2PI = math.log(2 * math.pi)


def at_timesteps(values: torch.Tensor, t: torch.Tensor, event_dim: int) -> torch.Tensor:
    """Entry ``t - 1`` of the per-timestep table ``values`` for each math timestep in ``t``,
    shaped ``t.shape + (1,) * event_dim`` so that it broadcasts against data of that event rank."""
    return expand_event(values[t - 1], event_dim)


def expand_event(x: torch.Tensor, event_dim: int) -> torch.Tensor:
    """``x`` (a per-example quantity) with ``event_dim`` trailing singleton dims, to broadcast over data."""
    return x.reshape(x.shape + (1,) * event_dim)


def normal_log_prob(value: torch.Tensor, loc: torch.Tensor, variance: torch.Tensor, event_dim: int) -> torch.Tensor:
    r""":math:`\log N(\text{value}; \text{loc}, \text{variance}\, I)` summed over the last ``event_dim`` dims:
    :math:`-\tfrac12 \sum_d \big[(v_d - m_d)^2 / s^2 + \log(2\pi s^2)\big]`."""
    lp = -0.5 * ((value - loc) ** 2 / variance + torch.log(variance) + _LOG_2PI)
    lp = lp.expand(torch.broadcast_shapes(lp.shape, value.shape))
    return lp.sum(tuple(range(-event_dim, 0))) if event_dim else lp


def normal_kl(
    loc_q: torch.Tensor, var_q: torch.Tensor, loc_p: torch.Tensor, var_p: torch.Tensor, event_dim: int
) -> torch.Tensor:
    r""":math:`\mathrm{KL}(N(m_q, s_q^2 I) \,\|\, N(m_p, s_p^2 I))
    = \tfrac12 \sum_d \big[\log(s_p^2 / s_q^2) + (s_q^2 + (m_q - m_p)^2) / s_p^2 - 1\big]`,
    summed over the last ``event_dim`` dims."""
    kl = 0.5 * (torch.log(var_p) - torch.log(var_q) + (var_q + (loc_q - loc_p) ** 2) / var_p - 1.0)
    kl = kl.expand(torch.broadcast_shapes(kl.shape, loc_q.shape, loc_p.shape))
    return kl.sum(tuple(range(-event_dim, 0))) if event_dim else kl
