r"""Every KL divergence pyrodiff registers with ``torch.distributions.kl_divergence``, in one place (as
Pyro keeps its own in ``pyro/distributions/kl.py``).

- :math:`\mathrm{KL}(q \,\|\, p_\theta)` per timestep between the posterior-order guide's path law and the
  reverse chain, taken along the path the model was evaluated on: what ``TraceMeanField_ELBO`` uses.
- The forward-order guide's laws against anything: refused, because ``TraceMeanField_ELBO`` is biased
  with that order (a model parent of :math:`x_{t-1}`, namely :math:`x_t`, is a guide descendant of it;
  on a 3-step linear-Gaussian chain the per-site KLs sum to -2.72 where the ELBO is -2.16).
"""

from __future__ import annotations

import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import Normal, register_kl

from .forward import ForwardTransition, QForwardOrder, QPosteriorOrder
from .reverse import PTheta

FORWARD_ORDER_MEAN_FIELD_ERROR = (
    "TraceMeanField_ELBO is biased with DiffusionGuide(order='forward'): in the forward-order guide "
    "x_t is a descendant of x_{t-1}, yet x_t is the model's parent of x_{t-1}, so the per-site "
    "analytic KLs do not sum to the ELBO (-2.72 against the exact -2.16 on a 3-step chain). "
    "Use DiffusionGuide(order='posterior') with TraceMeanField_ELBO, or Trace_ELBO with either order."
)


@register_kl(ForwardTransition, Normal)
@register_kl(QForwardOrder, TorchDistribution)
def _kl_forward_order(q, p):
    raise ValueError(FORWARD_ORDER_MEAN_FIELD_ERROR)


@register_kl(QPosteriorOrder, PTheta)
def _kl_posterior_order_reverse(q: QPosteriorOrder, p: PTheta) -> torch.Tensor:
    r"""Row k < T is :math:`\mathrm{KL}(q(x_k \mid x_{k+1}, x_0) \,\|\, p_\theta(x_k \mid x_{k+1}))`, row T is
    :math:`\mathrm{KL}(q(x_T \mid x_0) \,\|\, N(0, I))`, along the path the model was evaluated on (the
    guide's sample, replayed).  Their sum is the Rao-Blackwellised rate that ``TraceMeanField_ELBO`` uses;
    it is unbiased because the guide is in posterior order."""
    return p.kl_from(*q.conditionals(p.evaluated_path()))
