r"""The same model and guide written with one Pyro site per timestep: for teaching and for tests.

Sites are ``"x_T"`` (written ``f"x_{T}"``), ..., ``"x_1"`` and the observed ``"x_0"``; each reverse
step calls the network once, so a step of SVI costs T sequential network calls (about 45x the
vectorised program at T = 1000, MATH.md).  The ELBO is the same as that of
:class:`~pyrodiff.chain.reverse.DiffusionModel` and :class:`~pyrodiff.chain.forward.DiffusionGuide`, which the
tests check path by path.  Use it only with small T.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from ..chain.forward import DiffusionGuide, ForwardTransition, q_marginal
from ..chain.reverse import DiffusionModel

__all__ = ["loop_model", "loop_guide"]


def loop_model(model: DiffusionModel, x0: torch.Tensor) -> torch.Tensor:
    r""":math:`p(x_T) \prod_{t=T}^{2} p_\theta(x_{t-1} \mid x_t)\, p_\theta(x_0 \mid x_1)`, one site per step."""
    pyro.module("network", model.network)
    model.check_data(x0)
    T, N, event_dim = model.schedule.num_steps, x0.shape[0], x0.dim() - 1
    with pyro.plate("data", N, dim=-1):
        x = pyro.sample(f"x_{T}", dist.Normal(torch.zeros_like(x0), 1.0).to_event(event_dim))
        for step in range(T, 0, -1):
            t = torch.full((N,), step, device=x0.device, dtype=torch.long)
            law = model.predict(x, t)
            if step > 1:
                x = pyro.sample(f"x_{step - 1}", law.transition(event_dim))
        return pyro.sample("x_0", law.decoder(model.decoder, event_dim), obs=x0)


def loop_guide(guide: DiffusionGuide, x0: torch.Tensor) -> None:
    """The forward chain with one site per step, in the guide's order."""
    schedule, T, N, event_dim = guide.schedule, guide.schedule.num_steps, x0.shape[0], x0.dim() - 1
    step = lambda s: torch.full((N,), s, device=x0.device, dtype=torch.long)  # noqa: E731
    with pyro.plate("data", N, dim=-1):
        if guide.order == "posterior":
            loc, var = q_marginal(schedule, x0, step(T))
            x = pyro.sample(f"x_{T}", dist.Normal(loc, var.sqrt()).to_event(event_dim))
            for s in range(T, 1, -1):
                loc, var = guide.family.posterior(schedule, x0, x, step(s))
                x = pyro.sample(f"x_{s - 1}", dist.Normal(loc, var.sqrt()).to_event(event_dim))
        else:
            c = schedule.coefficients(x0.device, x0.dtype)
            x = x0
            for s in range(1, T + 1):
                loc, scale = c.alphas[s - 1].sqrt() * x, c.betas[s - 1].sqrt()
                x = pyro.sample(f"x_{s}", ForwardTransition(loc, scale.expand_as(loc)).to_event(event_dim))
