r"""Training objectives as reweightings of the per-timestep terms of the bound.

The subsampled program (:mod:`pyrodiff.chain.timesteps`) scores, for each drawn timestep t, the term
:math:`\ell_t` (:math:`L_0` at t = 1, :math:`L_{t-1}` for t >= 2).  For a Gaussian reverse step,
:math:`L_{t-1} = w_t\, E\|\epsilon - \hat\epsilon_\theta\|^2` with
:math:`w_t = \frac{\beta_t^2}{2 \sigma_t^2 \alpha_t (1 - \bar\alpha_t)}` (Ho et al. 2020, eq. 12), whatever
the network predicts (:math:`\hat\epsilon_\theta` is the noise implied by its output), up to a constant that
does not depend on :math:`\theta` (zero for the "small" variance; for "large" the mismatch of the variances,
:math:`\tfrac D2[\log(\sigma_t^2/\tilde\beta_t) + \tilde\beta_t/\sigma_t^2 - 1]`).  An objective
multiplies :math:`\ell_t` by :math:`\lambda_t` through ``pyro.poutine``'s scale, in model and guide alike:

- ``"elbo"``: :math:`\lambda_t = 1`.  **The only one that is a bound** on :math:`-\log p_\theta(x_0)`.
- ``"simple"``: :math:`\lambda_t = 1 / w_t`, Ho et al.'s :math:`L_\text{simple}`,
  :math:`E\|\epsilon - \hat\epsilon_\theta\|^2` (summed over dimensions).  Not a bound.
- ``"min_snr"``: :math:`\lambda_t = \min(\text{snr}_t, \gamma) / \text{snr}_t \cdot 1 / w_t`,
  min-SNR-:math:`\gamma` weighting (Hang et al. 2023) of the noise loss.  Not a bound.

The prior term :math:`L_T` has no parameters and is never reweighted.  Learned variances
(:class:`~pyrodiff.chain.reverse.DiffusionModel` ``variance="learned"``) are trained by the bound only: the
noise losses have no term for them (Nichol & Dhariwal's hybrid :math:`L_\text{simple} + \lambda L_\text{vlb}`,
with the mean's gradient stopped in :math:`L_\text{vlb}`, is not one program's reweighting).
"""

from __future__ import annotations

import torch

from .parameterization import ReverseVariance, parse_variance
from .schedule import Schedule
from .timesteps import TimestepWeighting

__all__ = ["OBJECTIVES", "Objective", "parse_objective", "objective_weights", "reweight"]

OBJECTIVES = ("elbo", "simple", "min_snr")


class Objective:
    r"""A training objective: the weights :math:`\lambda_t` of the drawn terms.  ``is_bound`` says whether
    the loss is the negative ELBO; ``loss_name`` names what a training loss under it holds."""

    def __init__(self, name: str, gamma: float = 5.0) -> None:
        if not isinstance(name, str) or name not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {name!r}")
        if not gamma > 0:
            raise ValueError(f"the min-SNR gamma must be positive, got {gamma!r}")
        self.name, self.gamma = name, gamma

    @property
    def is_bound(self) -> bool:
        return self.name == "elbo"

    @property
    def loss_name(self) -> str:
        """The column name of a training loss under this objective, per example."""
        return "negative_elbo_nats" if self.is_bound else f"{self.name}_loss"

    def weights(self, schedule: Schedule, variance: str | ReverseVariance = "small") -> torch.Tensor:
        r""":math:`\lambda_t` for t = 1..T (float64, entry t - 1, on the schedule's device), for reverse variances
        ``variance``: constants, from the schedule's tables as they are now (a schedule with parameters changes them
        as it trains; only the ELBO's weights, all 1, do not depend on them)."""
        c = schedule.tables()
        if self.is_bound:
            return torch.ones_like(c.betas).detach()
        variance = parse_variance(variance)
        if variance.learned:
            raise ValueError(f"learned variances are trained by the bound: use objective 'elbo', not {self.name!r}")
        sigma2 = variance.table(schedule)
        w = c.betas**2 / (2 * sigma2 * c.alphas * (1 - c.alphas_cumprod))
        if self.name == "simple":
            return (1 / w).detach()
        snr = c.log_snr.exp()
        return (torch.clamp(snr, max=self.gamma) / snr / w).detach()

    def __repr__(self) -> str:
        return f"Objective({self.name!r})"


def parse_objective(objective: str | Objective) -> Objective:
    """The :class:`Objective` named ``objective``; an object passes through."""
    return objective if isinstance(objective, Objective) else Objective(objective)


def objective_weights(
    schedule: Schedule, objective: str | Objective, variance: str | ReverseVariance = "small", gamma: float = 5.0
) -> torch.Tensor:
    r""":math:`\lambda_t` for t = 1..T (float64, entry t - 1) of ``objective`` (``"elbo"``, ``"simple"`` or
    ``"min_snr"`` with ``gamma``), for reverse variances ``variance``."""
    if not isinstance(objective, Objective):
        objective = Objective(objective, gamma)
    return objective.weights(schedule, variance)


def reweight(fn, weights: torch.Tensor):
    r"""``fn`` (the model or the guide) with each drawn term :math:`\ell_t` scaled by ``weights[t - 1]``.
    Wrap model and guide alike so that both sides of every term carry the same weight."""
    return TimestepWeighting(weights)(fn)
