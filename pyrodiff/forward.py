r"""The forward (noising) chain :math:`q(x_{1:T} \mid x_0)`: closed forms and the Pyro guide.

The guide has no parameters.  It exposes the same sample sites in both of its orders
(docs/MATH.md, "The two chains"):

- full chain (``subsample_steps=None``): one site ``"x_{1:T}"`` inside the plates
  ``time`` (dim -2, size T) and ``data`` (dim -1, size N); its value has shape ``(T, N, *D)``,
  row ``k - 1`` holding :math:`x_k`, and its ``log_prob`` has shape ``(T, N)``: the per-timestep
  log-densities of the chosen order.
- subsampled (``subsample_steps=k``): the per-example timesteps ``"t"`` (a subsample site,
  shared with the model and pruned from the ELBO like a plate's subsample), ``"x_T"``, and inside
  the plate ``steps`` (dim -2, size k) the pair ``"x_t"``, ``"x_{t-1}"``
  (see :mod:`pyrodiff.timesteps`).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from .gaussian import at_timesteps, expand_event, normal_log_prob
from .path import PathDistribution, is_last_row, path_timesteps
from .schedule import NoiseSchedule
from .timesteps import draw_timesteps, step_scale

__all__ = [
    "DiffusionGuide",
    "QForwardOrder",
    "QPosteriorOrder",
    "ForwardTransition",
    "q_marginal",
    "q_posterior",
    "check_batch",
    "SCHEDULE_KEY",
]

#: key of the ``infer`` dict in which the guide's sites carry its schedule (replayed into the model,
#: which refuses a guide built on another schedule)
SCHEDULE_KEY = "diffusion_schedule"


def check_batch(x0) -> None:
    """Refuse what cannot be a batch of data ``(N, *D)`` with N >= 1 of floating type; under Pyro's
    validation (the default), also non-finite values (reading them is a device synchronisation)."""
    if not torch.is_tensor(x0):
        raise TypeError(f"x0 must be a torch tensor of shape (N, *data_shape), got {type(x0).__name__}")
    if x0.dim() < 2:
        raise ValueError(f"x0 must have shape (N, *data_shape), got shape {tuple(x0.shape)}")
    if x0.shape[0] == 0:
        raise ValueError("x0 holds no examples (N = 0)")
    if not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating-point tensor, got {x0.dtype}")
    if dist.is_validation_enabled() and not torch.isfinite(x0).all():
        raise ValueError("data contains NaN or infinite values")


def q_marginal(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Mean and variance of :math:`q(x_t \mid x_0) = N(\sqrt{\bar\alpha_t} x_0, (1 - \bar\alpha_t) I)`.

    ``t`` holds math timesteps 1..T with shape ``x0.shape[:len(t.shape)]`` or broadcastable to it.
    """
    c = schedule.coefficients(x0.device, x0.dtype)
    event_dim = x0.dim() - t.dim()
    abar = at_timesteps(c.alphas_cumprod, t, event_dim)
    return abar.sqrt() * x0, 1.0 - abar


def q_posterior(
    schedule: NoiseSchedule, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Mean and variance of :math:`q(x_{t-1} \mid x_t, x_0) = N(\tilde\mu_t, \tilde\beta_t I)` (Ho et al.
    2020, eq. 7), :math:`\tilde\mu_t = \frac{\sqrt{\bar\alpha_{t-1}}\beta_t}{1-\bar\alpha_t} x_0 +
    \frac{\sqrt{\alpha_t}(1-\bar\alpha_{t-1})}{1-\bar\alpha_t} x_t`.  At ``t = 1`` the variance is 0."""
    c = schedule.coefficients(xt.device, xt.dtype)
    event_dim = xt.dim() - t.dim()
    loc = (
        at_timesteps(c.posterior_mean_coef_x0, t, event_dim) * x0
        + at_timesteps(c.posterior_mean_coef_xt, t, event_dim) * xt
    )
    return loc, at_timesteps(c.posterior_variance, t, event_dim)


class _QPath(PathDistribution):
    """The law of the whole path :math:`x_{1:T}` given :math:`x_0` (batch shape ``(T, N)``, the data's event
    shape).  Subclasses choose which factorisation of the same joint ``log_prob`` reports per timestep."""

    has_rsample = True

    def __init__(self, x0: torch.Tensor, schedule: NoiseSchedule, validate_args=None) -> None:
        self.x0 = x0
        self.schedule = schedule
        T = schedule.num_steps
        batch_shape = torch.Size((T,) + x0.shape[:1])
        super().__init__(batch_shape, x0.shape[1:], validate_args=validate_args)

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        r"""A path from the forward recursion :math:`x_t = \sqrt{\alpha_t} x_{t-1} + \sqrt{\beta_t}\epsilon_t`,
        vectorised over t: :math:`x_t = \sqrt{\bar\alpha_t}\big(x_0 + \sum_{s \le t}
        \sqrt{\beta_s / \bar\alpha_s}\,\epsilon_s\big)`.  Both orders describe this same joint."""
        c = self.schedule.coefficients(self.x0.device, self.x0.dtype)
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.x0.dtype, device=self.x0.device)
        time_dim = len(sample_shape)
        view = (-1,) + (1,) * (self.event_dim + 1)
        increments = (c.betas / c.alphas_cumprod).sqrt().reshape(view) * eps
        return c.alphas_cumprod.sqrt().reshape(view) * (self.x0 + increments.cumsum(time_dim))

    def _time_dim(self, value: torch.Tensor) -> int:
        return value.dim() - self.event_dim - 2

    def _following(self, value: torch.Tensor) -> torch.Tensor:
        """The path moved one step back in time: row k holds x_{k+1} (the last row, x_T, repeated)."""
        d = self._time_dim(value)
        return torch.cat([value.narrow(d, 1, value.size(d) - 1), value.narrow(d, -1, 1)], d)

    def _preceding(self, value: torch.Tensor) -> torch.Tensor:
        """The path moved one step forward in time: row k holds x_{k-1} (the first row, x_0)."""
        d = self._time_dim(value)
        x0 = self.x0.expand(value.shape[:d] + (1,) + value.shape[d + 1 :])
        return torch.cat([x0, value.narrow(d, 0, value.size(d) - 1)], d)


class QForwardOrder(_QPath):
    r"""The forward chain in forward order: ``log_prob`` row k is :math:`\log q(x_k \mid x_{k-1})`,
    :math:`q(x_k \mid x_{k-1}) = N(\sqrt{\alpha_k} x_{k-1}, \beta_k I)`."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        c = self.schedule.coefficients(value.device, value.dtype)
        t = path_timesteps(self.batch_shape, self.x0.device)
        loc = at_timesteps(c.alphas, t, self.event_dim).sqrt() * self._preceding(value)
        return normal_log_prob(value, loc, at_timesteps(c.betas, t, self.event_dim), self.event_dim)


class QPosteriorOrder(_QPath):
    r"""The forward chain in posterior order: ``log_prob`` row k < T is
    :math:`\log q(x_k \mid x_{k+1}, x_0)` and row T is :math:`\log q(x_T \mid x_0)`."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        loc, var = self.conditionals(value)
        return normal_log_prob(value, loc, var, self.event_dim)

    def conditionals(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of each row's conditional given the rest of the path ``value``."""
        T = self.schedule.num_steps
        t_parent = (path_timesteps(self.batch_shape, self.x0.device) + 1).clamp(max=T)
        loc, var = q_posterior(self.schedule, self.x0, self._following(value), t_parent)
        m_T, v_T = q_marginal(self.schedule, self.x0.expand_as(value), torch.full_like(t_parent, T))
        is_last = is_last_row(self.batch_shape, self.event_dim, value.device)
        return torch.where(is_last, m_T, loc), torch.where(is_last, v_T, var)


class ForwardTransition(dist.Normal):
    r"""A Normal used for the forward-order guide's sites, so that ``TraceMeanField_ELBO`` (which
    would be biased on them) is refused with a clear error instead of a warning (:mod:`pyrodiff.kl`)."""


class DiffusionGuide:
    r"""The forward chain :math:`q(x_{1:T} \mid x_0)` as a Pyro guide with no parameters.

    :param schedule: the noise schedule.
    :param order: ``"posterior"`` (default) samples and scores
        :math:`q(x_T \mid x_0) \prod_t q(x_{t-1} \mid x_t, x_0)`; ``"forward"`` the literal forward
        process :math:`\prod_t q(x_t \mid x_{t-1})`.  Both are the same joint with the same sites, so a
        trace of one replays in the other; only the posterior order is valid with
        ``TraceMeanField_ELBO``.

    Called as ``guide(x0, subsample_steps=None)``, with the same arguments as
    :class:`~pyrodiff.reverse.DiffusionModel`.
    """

    def __init__(self, schedule: NoiseSchedule, order: str = "posterior") -> None:
        if order not in ("posterior", "forward"):
            raise ValueError(f"order must be 'posterior' or 'forward', got {order!r}")
        self.schedule = schedule
        self.order = order

    def __call__(self, x0: torch.Tensor, subsample_steps: int | None = None, **kwargs) -> torch.Tensor:
        if x0 is None:
            raise ValueError("the guide q(x_{1:T} | x_0) needs data x0")
        check_batch(x0)
        N = x0.shape[0]
        if subsample_steps is None:
            chain = (QPosteriorOrder if self.order == "posterior" else QForwardOrder)(x0, self.schedule)
            with pyro.plate("data", N, dim=-1), pyro.plate("time", self.schedule.num_steps, dim=-2):
                return pyro.sample("x_{1:T}", chain, infer={SCHEDULE_KEY: self.schedule})
        return self._subsampled(x0, subsample_steps)

    def _subsampled(self, x0: torch.Tensor, subsample_steps: int) -> torch.Tensor:
        T, N = self.schedule.num_steps, x0.shape[0]
        event_dim = x0.dim() - 1
        t = draw_timesteps(N, subsample_steps, T, x0.device)
        with pyro.plate("data", N, dim=-1):
            loc_T, var_T = q_marginal(self.schedule, x0, torch.full((N,), T, device=x0.device))
            pyro.sample(
                "x_T", dist.Normal(loc_T, var_T.sqrt()).to_event(event_dim), infer={SCHEDULE_KEY: self.schedule}
            )
            x0 = x0.expand(t.shape + x0.shape[1:])
            with pyro.plate("steps", subsample_steps, dim=-2), pyro.poutine.scale(scale=step_scale(t, T)):
                if self.order == "posterior":
                    loc, var = q_marginal(self.schedule, x0, t)
                    xt = pyro.sample("x_t", dist.Normal(loc, var.sqrt()).to_event(event_dim))
                    loc, var = q_posterior(self.schedule, x0, xt, t)
                    pyro.sample("x_{t-1}", _masked_where_decoder(dist.Normal, loc, var, t, event_dim))
                else:
                    loc, var = q_marginal(self.schedule, x0, (t - 1).clamp(min=1))
                    first = expand_event(t == 1, event_dim)
                    xprev = pyro.sample("x_{t-1}", _masked_where_decoder(ForwardTransition, loc, var, t, event_dim))
                    parent = torch.where(first, x0, xprev)
                    c = self.schedule.coefficients(x0.device, x0.dtype)
                    loc = at_timesteps(c.alphas, t, event_dim).sqrt() * parent
                    var = at_timesteps(c.betas, t, event_dim)
                    xt = pyro.sample("x_t", ForwardTransition(loc, var.sqrt()).to_event(event_dim))
        return xt


def _masked_where_decoder(cls, loc, var, t, event_dim):
    """The site ``x_{t-1}`` exists only where t >= 2 (at t = 1 the decoder scores x_0 instead): mask
    it there, with a harmless unit variance in place of the degenerate posterior variance 0."""
    keep = t >= 2
    var = torch.where(expand_event(keep, event_dim), var, torch.ones_like(var))
    return cls(loc, var.sqrt()).to_event(event_dim).mask(keep)
