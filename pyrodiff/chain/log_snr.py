r"""Schedules given by a log-SNR in continuous time: :math:`\gamma(t) = -\log\mathrm{SNR}(t)` on :math:`t \in [0, 1]`.

Variational Diffusion Models (Kingma et al. 2021, VDM) write the forward process through
:math:`\gamma(t)`, increasing in t: :math:`\alpha_t^2 = \sigma(-\gamma(t))`, :math:`\sigma_t^2 = \sigma(\gamma(t))`
(:math:`\sigma(\cdot)` the logistic function), :math:`z_t = \alpha_t x + \sigma_t \epsilon` (docs/MATH.md, section 16,
"Continuous time and learned schedules").  Its endpoints :math:`\gamma_0 = \gamma(0)` (the least noise,
:math:`\mathrm{SNR}_\max = e^{-\gamma_0}`) and :math:`\gamma_1 = \gamma(1)` (the most) are all that the continuous-time
bound depends on; the interior changes only the variance of its estimator.  Here

.. math:: \gamma(t) = \gamma_0 + (\gamma_1 - \gamma_0)\, s(t), \qquad s(0) = 0,\ s(1) = 1,\ s' > 0,

with the *interior* :math:`s`: linear (:class:`LinearLogSNR`, VDM's fixed schedule) or VDM's monotone network
(:class:`LearnedSchedule`).

Every such schedule is also a :class:`~pyrodiff.chain.schedule.Schedule` of ``num_steps`` = T steps, the discretisation
at :math:`t_k = (k - 1)/(T - 1)`, k = 1..T: :math:`\lambda_k = -\gamma(t_k)`, so that the chain's
:math:`x_1` has :math:`\mathrm{SNR}_\max` and :math:`x_T` has :math:`\mathrm{SNR}_\min` at every T
(:meth:`LogSNRSchedule.discretised` gives the same schedule at another T, sharing its parameters).  At finite T a
learned schedule is a schedule: the chain's sites, ``bound_terms``, the samplers, respacing and DDIM use its tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .. import checks
from .schedule import Schedule, ScheduleTables, check_num_steps

__all__ = ["LogSNRSchedule", "LinearLogSNR", "LearnedSchedule", "DiscretisedSchedule", "LogSNRAt", "NoiseLevelInput"]

#: the number of evenly spaced times in [0, 1] at which :meth:`LogSNRSchedule.check` requires :math:`\gamma'(t) > 0`
RATE_CHECK_POINTS = 1025


class LogSNRAt(NamedTuple):
    r""":math:`\gamma` and its derivative at times t (float64, the shape of t), and the interior they are made of."""

    #: :math:`\gamma(t)`
    gamma: torch.Tensor
    #: :math:`\gamma'(t) = (\gamma_1 - \gamma_0)\, s'(t)`
    rate: torch.Tensor
    #: :math:`s(t)` (what variance minimisation trains, VDM section 5.3)
    interior: torch.Tensor
    #: :math:`s'(t)`
    interior_rate: torch.Tensor


class LogSNRSchedule(Schedule):
    r"""A schedule :math:`\gamma(t) = \gamma_0 + (\gamma_1 - \gamma_0) s(t)` on [0, 1] (module docstring), discretised
    at T = ``num_steps`` >= 2 steps for the chain.  Subclasses implement :meth:`interior`.

    :param gamma_min: :math:`\gamma_0`, log of the least noise-to-signal ratio (VDM: -13.3).
    :param gamma_max: :math:`\gamma_1` (VDM: 5.0); must exceed ``gamma_min``.
    :param learn_endpoints: the endpoints are parameters (trained by the bound) rather than buffers.
    """

    def __init__(
        self, num_steps: int, gamma_min: float, gamma_max: float, learn_endpoints: bool, description: dict
    ) -> None:
        check_num_steps(num_steps)
        if num_steps < 2:
            raise ValueError(f"a log-SNR schedule is discretised at T >= 2 steps, got num_steps = {num_steps}")
        gamma_min = checks.number("gamma_min", gamma_min)
        gamma_max = checks.number("gamma_max", gamma_max)
        if not gamma_max > gamma_min:
            raise ValueError(
                f"invalid schedule: gamma_max = {gamma_max} must exceed gamma_min = {gamma_min} (gamma increases "
                "with the noise)"
            )
        checks.one_of("learn_endpoints", learn_endpoints, (True, False))
        super().__init__(
            num_steps,
            {**description, "gamma_min": gamma_min, "gamma_max": gamma_max, "learn_endpoints": learn_endpoints},
        )
        for name, value in (("gamma_0", gamma_min), ("gamma_1", gamma_max)):
            tensor = torch.tensor(value, dtype=torch.float64)
            if learn_endpoints:
                setattr(self, name, nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor)

    # ------------------------------------------------------------------ continuous time
    def interior(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`s(t)` and :math:`s'(t)` (float64, the shape of ``t``), with :math:`s(0) = 0`, :math:`s(1) = 1`."""
        raise NotImplementedError

    def at(self, t: torch.Tensor) -> LogSNRAt:
        r""":math:`\gamma(t)`, :math:`\gamma'(t)` and the interior at times ``t`` in [0, 1] (any shape; float64 on the
        schedule's device, differentiable in its parameters)."""
        t = t.to(device=self.gamma_0.device, dtype=torch.float64)
        s, ds = self.interior(t)
        width = self.gamma_1 - self.gamma_0
        return LogSNRAt(self.gamma_0 + width * s, width * ds, s, ds)

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        r""":math:`\gamma(t) = -\log\mathrm{SNR}(t)`."""
        return self.at(t).gamma

    def endpoints(self) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`(\gamma_0, \gamma_1)` (float64 scalars)."""
        return self.gamma_0, self.gamma_1

    # ------------------------------------------------------------------ the discrete chain
    def discrete_times(self, num_steps: int | None = None) -> torch.Tensor:
        r"""The times :math:`t_k = (k - 1)/(T - 1)`, k = 1..T, of the discretisation at ``num_steps`` (this one's T by
        default)."""
        T = self.num_steps if num_steps is None else num_steps
        return torch.linspace(0.0, 1.0, T, dtype=torch.float64, device=self.gamma_0.device)

    def tables(self) -> ScheduleTables:
        return ScheduleTables.from_log_snr(-self.gamma(self.discrete_times()))

    def discretised(self, num_steps: int) -> Schedule:
        """This schedule discretised at ``num_steps`` >= 2 steps (itself at its own T), sharing its parameters."""
        if num_steps == self.num_steps:
            return self
        return DiscretisedSchedule(self, num_steps)

    def check(self) -> LogSNRSchedule:
        r"""The checks of :meth:`Schedule.check` (non-finite parameters, endpoints out of order, a log-SNR that is not
        strictly decreasing at the T steps), the endpoints themselves in order, and :math:`\gamma'(t) > 0` on a grid of
        :data:`RATE_CHECK_POINTS` times in [0, 1] (the continuous-time bound draws t anywhere, not only at the T
        steps)."""
        gamma_0, gamma_1 = float(self.gamma_0.detach()), float(self.gamma_1.detach())
        if math.isfinite(gamma_0) and math.isfinite(gamma_1) and not gamma_1 > gamma_0:
            raise ValueError(
                f"invalid schedule: its endpoints are out of order (gamma_0 = {gamma_0:.6g}, gamma_1 = "
                f"{gamma_1:.6g}): gamma must increase from t = 0 to t = 1"
            )
        if all(torch.isfinite(p).all() for p in self.parameters()):  # else Schedule.check names the parameter
            t = torch.linspace(0.0, 1.0, RATE_CHECK_POINTS, dtype=torch.float64, device=self.gamma_0.device)
            with torch.no_grad():
                rate = self.at(t).rate.cpu()
            bad = ~(rate > 0)
            if bad.any():
                i = int(torch.nonzero(bad)[0])
                raise ValueError(
                    f"invalid schedule: gamma(t) is not strictly increasing: gamma'(t) = {rate[i].item():.6g} at "
                    f"t = {t[i].item():.6g}"
                )
        super().check()
        return self


class DiscretisedSchedule(Schedule):
    r"""A :class:`LogSNRSchedule` discretised at another number of steps K (:meth:`LogSNRSchedule.discretised`): its
    tables are :math:`\lambda_k = -\gamma((k - 1)/(K - 1))`, computed from the original's parameters at every call
    (it holds the original as a submodule)."""

    def __init__(self, schedule: LogSNRSchedule, num_steps: int) -> None:
        check_num_steps(num_steps)
        if num_steps < 2:
            raise ValueError(f"a log-SNR schedule is discretised at T >= 2 steps, got {num_steps}")
        super().__init__(num_steps, {"kind": "discretised", "of": dict(schedule.description)})
        self.original = schedule

    def at(self, t: torch.Tensor) -> LogSNRAt:
        """The original's :meth:`LogSNRSchedule.at`."""
        return self.original.at(t)

    def tables(self) -> ScheduleTables:
        return ScheduleTables.from_log_snr(-self.original.gamma(self.original.discrete_times(self.num_steps)))

    def discretised(self, num_steps: int) -> Schedule:
        return self.original.discretised(num_steps)


class LinearLogSNR(LogSNRSchedule):
    r""":math:`\gamma(t) = \gamma_0 + (\gamma_1 - \gamma_0) t`: VDM's fixed linear schedule (:math:`s(t) = t`).  With
    ``learn_endpoints=True`` the endpoints are learned and the interior stays linear."""

    def __init__(
        self, num_steps: int = 1000, gamma_min: float = -13.3, gamma_max: float = 5.0, learn_endpoints: bool = False
    ) -> None:
        super().__init__(num_steps, gamma_min, gamma_max, learn_endpoints, {"kind": "linear_log_snr"})

    def interior(self, t):
        return t, torch.ones_like(t)


class LearnedSchedule(LogSNRSchedule):
    r"""A learned :math:`\gamma_\eta(t)`: VDM's monotone network (Kingma et al. 2021, appendix H) as the interior,

    .. math:: \tilde g(t) = h + w_3^\top \big(2\,\sigma(w_2 h + b_2) - 1\big), \qquad h = w_1 t + b_1, \qquad
        s(t) = \frac{\tilde g(t) - \tilde g(0)}{\tilde g(1) - \tilde g(0)},

    every weight taken in absolute value (:math:`|w_1|, |w_2|, |w_3|`), so :math:`\tilde g` increases with t
    (:math:`\tilde g'(t) = |w_1|\,(1 + \sum_j |w_{3j}|\, 2\sigma'(a_j) |w_{2j}|) > 0`, computed in closed form, not by
    differentiating twice), and learned endpoints :math:`\gamma_0, \gamma_1` (``learn_endpoints=False`` fixes them).
    ``hidden`` is the width of the sigmoid layer (VDM: 1024).  Parameters are float64, like the tables.

    Registered with Pyro by :class:`~pyrodiff.chain.forward.DiffusionGuide` (and the continuous-time guide), so plain
    ``SVI`` trains it with the network; ``pyrodiff train`` puts it in its own parameter group without weight decay.
    """

    def __init__(
        self,
        num_steps: int = 1000,
        gamma_min: float = -13.3,
        gamma_max: float = 5.0,
        hidden: int = 1024,
        learn_endpoints: bool = True,
    ) -> None:
        checks.positive_int("hidden", hidden)
        super().__init__(num_steps, gamma_min, gamma_max, learn_endpoints, {"kind": "learned", "hidden": hidden})
        f64 = {"dtype": torch.float64}
        generator = torch.Generator().manual_seed(0)  # the same initial interior whatever the global seed
        self.w1 = nn.Parameter(torch.ones((), **f64))
        self.b1 = nn.Parameter(torch.zeros((), **f64))
        self.w2 = nn.Parameter(torch.randn(hidden, generator=generator, **f64))
        self.b2 = nn.Parameter(torch.randn(hidden, generator=generator, **f64))
        self.w3 = nn.Parameter(torch.randn(hidden, generator=generator, **f64) / hidden)

    def _g(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`\tilde g(t)` and :math:`\tilde g'(t)`."""
        w1, w2, w3 = self.w1.abs(), self.w2.abs(), self.w3.abs()
        h = w1 * t + self.b1
        a = torch.sigmoid(h.unsqueeze(-1) * w2 + self.b2)
        g = h + (2 * a - 1) @ w3
        dg = w1 * (1 + (2 * a * (1 - a) * w2) @ w3)
        return g, dg

    def interior(self, t):
        g, dg = self._g(t)
        ends, _ = self._g(torch.arange(2, dtype=torch.float64, device=t.device))  # t = 0, 1 made on the device
        width = ends[1] - ends[0]
        return (g - ends[0]) / width, dg / width


@dataclass(frozen=True)
class NoiseLevelInput:
    r"""What a network conditioned on the noise level is given in place of a timestep: the affine map
    :math:`c(\gamma) = \text{scale}\,(\gamma - \text{low})/(\text{high} - \text{low})` of :math:`\gamma = -\log\mathrm{SNR}`
    (VDM feeds the network :math:`\gamma_t` rescaled to [0, 1], then times 1000, so that the sinusoidal embedding sees
    the range of DDPM's timesteps).  Fixed constants, not the learned endpoints: the network's input then names a noise
    level, whatever the schedule's interior does."""

    low: float = -13.3
    high: float = 5.0
    scale: float = 1000.0

    def __post_init__(self) -> None:
        for name in ("low", "high", "scale"):
            object.__setattr__(self, name, checks.number(f"the noise-level input's {name}", getattr(self, name)))
        if not self.high > self.low or not self.scale > 0:
            raise ValueError(f"a noise-level input needs high > low and scale > 0, got {self}")

    def __call__(self, gamma: torch.Tensor) -> torch.Tensor:
        return self.scale * (gamma - self.low) / (self.high - self.low)

    def gamma(self, value: torch.Tensor) -> torch.Tensor:
        r""":math:`\gamma` from the input (the inverse map)."""
        return self.low + value * (self.high - self.low) / self.scale
