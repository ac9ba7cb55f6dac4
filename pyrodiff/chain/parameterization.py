r"""Parameterisations of the reverse step :math:`p_\theta(x_{t-1} \mid x_t) = N(\mu_\theta(x_t, t), \sigma_t^2 I)`.

Two independent choices, each parsed once from its name into an object that the model, the objectives
and the specification share:

- **what the network predicts** (:class:`Target`): the noise :math:`\epsilon` (Ho et al. 2020, eq. 11), the
  data :math:`x_0`, or :math:`v = \sqrt{\bar\alpha_t}\,\epsilon - \sqrt{1 - \bar\alpha_t}\,x_0` (Salimans & Ho
  2022).  With :math:`x_t = \sqrt{\bar\alpha_t} x_0 + \sqrt{1 - \bar\alpha_t}\,\epsilon` any one of the three
  determines the other two given :math:`x_t` (:func:`eps_to_x0`, :func:`x0_to_eps`, :func:`v_to_x0`,
  :func:`v_to_eps`), and the reverse mean is the posterior mean at the predicted :math:`\hat x_0`,
  :math:`\mu_\theta = \tilde\mu_t(\hat x_0, x_t)`.
- **the reverse variance** (:class:`ReverseVariance`): fixed "small" :math:`\tilde\beta_t` or "large"
  :math:`\beta_t` (improved-diffusion's ``fixedsmall``/``fixedlarge``; both take :math:`\tilde\beta_2` at
  t = 1, where :math:`\tilde\beta_1 = 0`), or "learned" (Nichol & Dhariwal 2021, eq. 15):
  :math:`\log\sigma^2 = f \log\beta_t + (1 - f)\log\tilde\beta_t`, :math:`f = (v_\theta + 1)/2`, with
  :math:`\tilde\beta_1` replaced by :math:`\tilde\beta_2` (their ``learned_range``).  A learned variance
  doubles the network's output channels: the prediction, then :math:`v_\theta`, along dim 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import checks
from .forward import InferenceFamily
from .gaussian import at_timesteps, expand_event
from .schedule import Schedule

__all__ = [
    "Target",
    "parse_target",
    "ReverseVariance",
    "parse_variance",
    "eps_to_x0",
    "x0_to_eps",
    "v_to_x0",
    "v_to_eps",
    "DDIMVariance",
    "TableVariance",
]


# ---------------------------------------------------------------------- conversions
def eps_to_x0(eps: torch.Tensor, xt: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    r""":math:`\hat x_0 = (x_t - \sqrt{1 - \bar\alpha_t}\,\epsilon) / \sqrt{\bar\alpha_t}`."""
    return (xt - (1 - abar).sqrt() * eps) / abar.sqrt()


def x0_to_eps(x0: torch.Tensor, xt: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    r""":math:`\epsilon = (x_t - \sqrt{\bar\alpha_t}\,x_0) / \sqrt{1 - \bar\alpha_t}`."""
    return (xt - abar.sqrt() * x0) / (1 - abar).sqrt()


def v_to_x0(v: torch.Tensor, xt: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    r""":math:`x_0 = \sqrt{\bar\alpha_t}\,x_t - \sqrt{1 - \bar\alpha_t}\,v`."""
    return abar.sqrt() * xt - (1 - abar).sqrt() * v


def v_to_eps(v: torch.Tensor, xt: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    r""":math:`\epsilon = \sqrt{1 - \bar\alpha_t}\,x_t + \sqrt{\bar\alpha_t}\,v`."""
    return (1 - abar).sqrt() * xt + abar.sqrt() * v


# ---------------------------------------------------------------------- what the network predicts
class Target:
    """A choice (a frozen dataclass: equal to another of its kind, hashable). What the network's (first ``C``) output channels predict; :meth:`to_x0` turns them into
    :math:`\\hat x_0`, given :math:`x_t` and :math:`\\bar\\alpha_t` broadcast against the data."""

    name: str = ""

    def to_x0(self, out: torch.Tensor, xt: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_eps(self, out: torch.Tensor, xt: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        r"""The noise :math:`\hat\epsilon` that the output implies (the conversions of the module docstring)."""
        raise NotImplementedError


@dataclass(frozen=True)
class EpsilonTarget(Target):
    r"""The network predicts the noise :math:`\epsilon` (Ho et al. 2020)."""

    name = "epsilon"

    def to_x0(self, out, xt, abar):
        return eps_to_x0(out, xt, abar)

    def to_eps(self, out, xt, abar):
        return out


@dataclass(frozen=True)
class X0Target(Target):
    r"""The network predicts :math:`x_0` itself."""

    name = "x0"

    def to_x0(self, out, xt, abar):
        return out

    def to_eps(self, out, xt, abar):
        return x0_to_eps(out, xt, abar)


@dataclass(frozen=True)
class VTarget(Target):
    r"""The network predicts :math:`v = \sqrt{\bar\alpha_t}\,\epsilon - \sqrt{1 - \bar\alpha_t}\,x_0`."""

    name = "v"

    def to_x0(self, out, xt, abar):
        return v_to_x0(out, xt, abar)

    def to_eps(self, out, xt, abar):
        return v_to_eps(out, xt, abar)


# ---------------------------------------------------------------------- reverse variances
class ReverseVariance:
    r""":math:`\sigma_t^2` of the reverse step.  Fixed variances have a :meth:`table` (float64, entry t - 1);
    learned ones read :math:`v_\theta` from the network's extra output channels."""

    name: str = ""
    learned: bool = False

    def output_channels(self, data_channels: int) -> int:
        """Channels the network must return for data with ``data_channels`` channels."""
        return 2 * data_channels if self.learned else data_channels

    def table(self, schedule: Schedule) -> torch.Tensor:
        raise NotImplementedError(f"the {self.name!r} variance has no fixed table")

    def variance(
        self,
        schedule: Schedule,
        t: torch.Tensor,
        event_dim: int,
        like: torch.Tensor,
        v: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r""":math:`\sigma_t^2` at the timesteps ``t`` on the device and in the dtype of ``like``: shape
        ``t.shape + (1,) * event_dim`` for fixed variances, the shape of ``v`` for learned ones."""
        return at_timesteps(schedule.derived(self.table, like.device, like.dtype), t, event_dim)


def _clipped_posterior_variance(schedule: Schedule) -> torch.Tensor:
    r""":math:`\tilde\beta_t` with :math:`\tilde\beta_2` in place of :math:`\tilde\beta_1 = 0` (T >= 2)."""
    posterior_variance = schedule.tables().posterior_variance
    return torch.cat([posterior_variance[1:2], posterior_variance[1:]])


@dataclass(frozen=True)
class SmallVariance(ReverseVariance):
    r"""Fixed :math:`\sigma_t^2 = \tilde\beta_t` (:math:`\tilde\beta_2` at t = 1): the lower bound of Ho et al."""

    name = "small"

    def table(self, schedule):
        return _clipped_posterior_variance(schedule)


@dataclass(frozen=True)
class LargeVariance(ReverseVariance):
    r"""Fixed :math:`\sigma_t^2 = \beta_t` (:math:`\tilde\beta_2` at t = 1): the upper bound of Ho et al."""

    name = "large"

    def table(self, schedule):
        c = schedule.tables()
        return torch.cat([c.posterior_variance[1:2], c.betas[1:]])


@dataclass(frozen=True)
class LearnedVariance(ReverseVariance):
    r"""Nichol & Dhariwal (2021, eq. 15): :math:`\sigma^2 = \exp(f \log\beta_t + (1 - f)\log\tilde\beta_t)`,
    :math:`f = (v + 1)/2`, per dimension; :math:`v = -1` gives "small", :math:`v = 1` gives :math:`\beta_t`."""

    name = "learned"
    learned = True

    def variance(self, schedule, t, event_dim, like, v=None):
        if v is None:
            raise ValueError("a learned variance needs the network's interpolation output v")
        f = (v + 1) / 2
        log_small = schedule.derived(_log_clipped, like.device, like.dtype)
        log_beta = schedule.derived(_log_betas, like.device, like.dtype)
        return torch.exp(f * at_timesteps(log_beta, t, event_dim) + (1 - f) * at_timesteps(log_small, t, event_dim))


@dataclass(frozen=True)
class TableVariance(ReverseVariance):
    r"""A fixed :math:`\sigma_t^2` given as a table (entry t - 1 for step t), e.g. the training-free optimal
    variances of Analytic-DPM estimated for a trained mean (:func:`pyrodiff.chain.analytic.analytic_variance`)."""

    values: tuple[float, ...]
    name: str = "analytic"

    def __post_init__(self) -> None:
        if not self.values or not all(v > 0 and v == v and v != float("inf") for v in self.values):
            raise ValueError("a variance table needs one positive finite value per step")

    def table(self, schedule):
        if len(self.values) != schedule.num_steps:
            raise ValueError(
                f"the {self.name} variance has {len(self.values)} steps, the schedule {schedule.num_steps}"
            )
        return torch.tensor(self.values, dtype=torch.float64)


@dataclass(frozen=True)
class DDIMVariance(ReverseVariance):
    r"""The variances of DDIM's generative process (Song et al. 2021, eq. 12), those of its inference family
    (:class:`~pyrodiff.chain.forward.InferenceFamily`): :math:`\sigma_t^2 = \eta^2 \tilde\beta_t` for t >= 2 (0 when
    :math:`\eta = 0`: the steps are then deterministic and have no density); at t = 1 the decoder keeps the
    ``base`` variance, the model's own, so that DDIM and DDPM share :math:`p_\theta(x_0 \mid x_1)`."""

    family: InferenceFamily
    base: ReverseVariance
    name: str = "ddim"

    @property
    def learned(self) -> bool:
        return self.base.learned

    def table(self, schedule):
        return torch.cat([self.base.table(schedule)[:1], self.family.variances(schedule)[1:]])

    def variance(self, schedule, t, event_dim, like, v=None):
        sigma2 = at_timesteps(self.family.tables(schedule, like.device, like.dtype).variance, t, event_dim)
        decoder = self.base.variance(schedule, t, event_dim, like, v)
        return torch.where(expand_event(t == 1, event_dim), decoder, sigma2)


def _log_clipped(schedule: Schedule) -> torch.Tensor:
    return _clipped_posterior_variance(schedule).log()


def _log_betas(schedule: Schedule) -> torch.Tensor:
    return schedule.tables().betas.log()


TARGETS: dict[str, Target] = {c.name: c() for c in (EpsilonTarget, X0Target, VTarget)}
VARIANCES: dict[str, ReverseVariance] = {c.name: c() for c in (SmallVariance, LargeVariance, LearnedVariance)}


def parse_target(target: str | Target) -> Target:
    """The :class:`Target` named ``target`` (``"epsilon"``, ``"x0"`` or ``"v"``); an object passes through."""
    if isinstance(target, Target):
        return target
    return TARGETS[checks.one_of("prediction", target, TARGETS)]


def parse_variance(variance: str | ReverseVariance) -> ReverseVariance:
    """The :class:`ReverseVariance` named ``variance`` (``"small"``, ``"large"`` or ``"learned"``)."""
    if isinstance(variance, ReverseVariance):
        return variance
    return VARIANCES[checks.one_of("variance", variance, VARIANCES)]
