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

from dataclasses import dataclass

import torch
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO

from .. import checks
from .parameterization import ReverseVariance, parse_variance
from .schedule import Schedule, ScheduleTables
from .timesteps import TimestepWeighting

__all__ = [
    "Objective",
    "ELBOObjective",
    "SimpleObjective",
    "MinSNRObjective",
    "parse_objective",
    "objective_weights",
    "reweight",
    "ESTIMATORS",
    "parse_estimator",
]


class Objective:
    r"""A training objective: the weights :math:`\lambda_t` of the drawn terms, one subclass per kind
    (:func:`parse_objective` reads a name).  ``is_bound`` says whether the loss is the negative ELBO;
    ``loss_name`` names what a training loss under it holds."""

    name: str = ""
    is_bound: bool = False

    @property
    def loss_name(self) -> str:
        """The column name of a training loss under this objective, per example."""
        return "negative_elbo_nats" if self.is_bound else f"{self.name}_loss"

    def weights(self, schedule: Schedule, variance: str | ReverseVariance = "small") -> torch.Tensor:
        r""":math:`\lambda_t` for t = 1..T (float64, entry t - 1, on the schedule's device), for reverse variances
        ``variance``: constants, from the schedule's tables as they are now (a schedule with parameters changes them
        as it trains; only the ELBO's weights, all 1, do not depend on them)."""
        raise NotImplementedError


@dataclass(frozen=True)
class ELBOObjective(Objective):
    r""":math:`\lambda_t = 1`: the negative ELBO, the only objective that is a bound."""

    name = "elbo"
    is_bound = True

    def weights(self, schedule, variance="small"):
        return torch.ones_like(schedule.tables().betas).detach()


def _bound_weight(
    schedule: Schedule, c: ScheduleTables, variance: str | ReverseVariance, objective: str
) -> torch.Tensor:
    r""":math:`w_t = \frac{\beta_t^2}{2 \sigma_t^2 \alpha_t (1 - \bar\alpha_t)}` (Ho et al. 2020, eq. 12) from the
    schedule's tables ``c``: the bound's weight of the noise loss at t (docs/MATH.md, "Objectives as
    reweightings"); refused for learned variances, which only the bound trains."""
    variance = parse_variance(variance)
    if variance.learned:
        raise ValueError(f"learned variances are trained by the bound: use objective 'elbo', not {objective!r}")
    sigma2 = variance.table(schedule)
    return c.betas**2 / (2 * sigma2 * c.alphas * (1 - c.alphas_cumprod))


@dataclass(frozen=True)
class SimpleObjective(Objective):
    r""":math:`\lambda_t = 1 / w_t`: Ho et al.'s :math:`L_\text{simple}`, the unweighted noise loss."""

    name = "simple"

    def weights(self, schedule, variance="small"):
        return (1 / _bound_weight(schedule, schedule.tables(), variance, self.name)).detach()


@dataclass(frozen=True)
class MinSNRObjective(Objective):
    r""":math:`\lambda_t = \min(\text{snr}_t, \gamma) / \text{snr}_t \cdot 1 / w_t`: min-SNR-:math:`\gamma`
    weighting of the noise loss (Hang et al. 2023), ``gamma`` > 0."""

    name = "min_snr"
    gamma: float = 5.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "gamma", checks.number("the min-SNR gamma", self.gamma, 0, lo_open=True))

    def weights(self, schedule, variance="small"):
        c = schedule.tables()
        w = _bound_weight(schedule, c, variance, self.name)
        snr = c.log_snr.exp()
        return (torch.clamp(snr, max=self.gamma) / snr / w).detach()


#: The objectives by name.
OBJECTIVES: dict[str, type[Objective]] = {c.name: c for c in (ELBOObjective, SimpleObjective, MinSNRObjective)}


def parse_objective(objective: str | Objective, gamma: float = MinSNRObjective.gamma) -> Objective:
    """The :class:`Objective` named ``objective`` (``"elbo"``, ``"simple"``, or ``"min_snr"`` with ``gamma``);
    an object passes through."""
    if isinstance(objective, Objective):
        return objective
    checks.one_of("objective", objective, OBJECTIVES)
    return MinSNRObjective(gamma) if objective == "min_snr" else OBJECTIVES[objective]()


def objective_weights(
    schedule: Schedule, objective: str | Objective, variance: str | ReverseVariance = "small", gamma: float = 5.0
) -> torch.Tensor:
    r""":math:`\lambda_t` for t = 1..T (float64, entry t - 1) of ``objective`` (``"elbo"``, ``"simple"`` or
    ``"min_snr"`` with ``gamma``), for reverse variances ``variance``."""
    return parse_objective(objective, gamma).weights(schedule, variance)


def reweight(fn, weights: torch.Tensor):
    r"""``fn`` (the model or the guide) with each drawn term :math:`\ell_t` scaled by ``weights[t - 1]``.
    Wrap model and guide alike so that both sides of every term carry the same weight."""
    return TimestepWeighting(weights)(fn)


#: How each drawn term :math:`\ell_t` is estimated, the other half of a training loss
#: :math:`\sum_t \lambda_t \hat\ell_t`: ``"mean_field"`` (Pyro's ``TraceMeanField_ELBO``) takes the KL of each
#: step in closed form (the registrations of :mod:`pyrodiff.chain.kl`), ``"trace"`` (``Trace_ELBO``) the
#: single-sample log-density ratio.  Both estimate the same terms without bias; they live here, beside the
#: weights, because the specification, the training loop and the VAE baseline choose them together.
ESTIMATORS: dict[str, type[ELBO]] = {"mean_field": TraceMeanField_ELBO, "trace": Trace_ELBO}


def parse_estimator(estimator: str) -> type[ELBO]:
    """The Pyro ELBO class of :data:`ESTIMATORS` named ``estimator``."""
    return ESTIMATORS[checks.one_of("estimator", estimator, ESTIMATORS)]
