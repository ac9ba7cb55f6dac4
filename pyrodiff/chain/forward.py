r"""The forward (noising) chain :math:`q(x_{1:T} \mid x_0)`: closed forms and the Pyro guide.

The guide has no parameters.  It exposes the same sample sites in both of its orders
(docs/MATH.md, section 2, "The forward chain", "Two orderings of one joint"):

- full chain (``subsample_steps=None``): one site ``"x_{1:T}"`` inside the plates
  ``time`` (dim -2, size T) and ``data`` (dim -1, size N); its value has shape ``(T, N, *D)``,
  row ``k - 1`` holding :math:`x_k`, and its ``log_prob`` has shape ``(T, N)``: the per-timestep
  log-densities of the chosen order.
- subsampled (``subsample_steps=k``): the per-example timesteps ``"t"`` (a subsample site,
  shared with the model and pruned from the ELBO like a plate's subsample), ``"x_T"``, and inside
  the plate ``steps`` (dim -2, size k) the pair ``"x_t"``, ``"x_{t-1}"``
  (see :mod:`pyrodiff.chain.timesteps`).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pyro
import pyro.distributions as dist
import torch

from .. import checks
from .gaussian import at_timesteps, expand_event, normal_log_prob
from .path import PathDistribution, is_last_row, path_timesteps
from .schedule import Schedule
from .timesteps import draw_timesteps, step_scale

__all__ = [
    "q_marginal",
    "q_posterior",
    "DiffusionGuide",
    "QForwardOrder",
    "QPosteriorOrder",
    "InferenceFamily",
    "DDPM",
    "q_sigma_posterior",
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


def q_marginal(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Mean and variance of :math:`q(x_t \mid x_0) = N(\sqrt{\bar\alpha_t} x_0, (1 - \bar\alpha_t) I)`.

    ``t`` holds math timesteps 1..T with shape ``x0.shape[:len(t.shape)]`` or broadcastable to it.
    """
    c = schedule.coefficients(x0.device, x0.dtype)
    event_dim = x0.dim() - t.dim()
    abar = at_timesteps(c.alphas_cumprod, t, event_dim)
    return abar.sqrt() * x0, 1.0 - abar


def q_trajectory(
    schedule: Schedule, start: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, dim: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Consecutive steps of the forward recursion :math:`x_t = \sqrt{\alpha_t} x_{t-1} + \sqrt{\beta_t}\epsilon_t`,
    vectorised over t (one ``cumsum``; docs/MATH.md, section 2, "Marginal"): with :math:`s_t = x_t/\sqrt{\bar\alpha_t}`,

    .. math:: s_t = s_{t_0 - 1} + \sum_{t_0 \le u \le t} \sqrt{\beta_u / \bar\alpha_u}\,\epsilon_u, \qquad
        x_t = \sqrt{\bar\alpha_t}\, s_t .

    :param start: :math:`s_{t_0 - 1}`, the scaled state before the first step (:math:`x_0` when :math:`t_0 = 1`).
    :param eps: the standard normal draws :math:`\epsilon_u`, the timesteps along dimension ``dim``.
    :param t: the consecutive math timesteps :math:`t_0, t_0 + 1, \dots, t_1` (a LongTensor).
    :returns: the states :math:`x_t` (the shape of ``eps``) and :math:`s_{t_1}`, the ``start`` of the steps after them.
    """
    c = schedule.coefficients(eps.device, eps.dtype)
    view = (-1,) + (1,) * (eps.dim() - dim - 1)
    scaled = start + ((c.betas[t - 1] / c.alphas_cumprod[t - 1]).sqrt().reshape(view) * eps).cumsum(dim)
    return c.alphas_cumprod[t - 1].sqrt().reshape(view) * scaled, scaled.select(dim, -1)


def q_posterior(
    schedule: Schedule, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
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


def q_sigma_posterior(
    schedule: Schedule, eta: float, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Mean and variance of the non-Markovian :math:`q_\sigma(x_{t-1} \mid x_t, x_0)` (Song et al. 2021, eq. 7),

    .. math:: N\Big(\sqrt{\bar\alpha_{t-1}}\, x_0 + \sqrt{1 - \bar\alpha_{t-1} - \sigma_t^2}\;
        \frac{x_t - \sqrt{\bar\alpha_t}\, x_0}{\sqrt{1 - \bar\alpha_t}},\; \sigma_t^2 I\Big),
        \qquad \sigma_t^2 = \eta^2 \tilde\beta_t

    (their eq. 16), for :math:`\eta \in [0, 1]`; :math:`\eta = 1` is :func:`q_posterior` (the same law, another
    rounding).  At ``t = 1`` the variance is 0 and the mean :math:`x_0`.  ``eta`` outside [0, 1] is refused."""
    c = InferenceFamily(eta).tables(schedule, xt.device, xt.dtype)
    event_dim = xt.dim() - t.dim()
    loc = at_timesteps(c.coef_x0, t, event_dim) * x0 + at_timesteps(c.coef_xt, t, event_dim) * xt
    return loc, at_timesteps(c.variance, t, event_dim)


@dataclass(frozen=True)
class InferenceFamily:
    r"""Song et al. (2021)'s family of inference processes :math:`q_\sigma(x_{1:T} \mid x_0) = q(x_T \mid x_0)
    \prod_{t \ge 2} q_\sigma(x_{t-1} \mid x_t, x_0)` (:func:`q_sigma_posterior`), indexed by :math:`\eta \in [0, 1]`
    through :math:`\sigma_t^2 = \eta^2 \tilde\beta_t`.  Every member has the marginals :math:`q(x_t \mid x_0)` of
    the DDPM forward chain (their Lemma 1), so every member trains the same network.  :math:`\eta = 1` (:data:`DDPM`)
    is the Markov forward chain of Ho et al., whose posterior is computed by :func:`q_posterior`; :math:`\eta < 1` is
    non-Markovian; :math:`\eta = 0` (DDIM proper) is deterministic given :math:`x_0` and :math:`x_T`: it has no
    density, and a model with its variances no bound."""

    eta: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "eta", checks.probability("eta", self.eta))

    @property
    def is_markov(self) -> bool:
        """Whether this is DDPM's Markov forward chain (eta = 1), the only member with a forward order."""
        return self.eta == 1.0

    @property
    def has_density(self) -> bool:
        """Whether the steps have a density (eta > 0)."""
        return self.eta > 0

    def posterior(
        self, schedule: Schedule, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Mean and variance of :math:`q_\sigma(x_{t-1} \mid x_t, x_0)` at the math timesteps ``t``."""
        if self.is_markov:
            return q_posterior(schedule, x0, xt, t)
        return q_sigma_posterior(schedule, self.eta, x0, xt, t)

    def variances(self, schedule: Schedule) -> torch.Tensor:
        r""":math:`\sigma_t^2 = \eta^2 \tilde\beta_t` (float64, entry t - 1; 0 at t = 1)."""
        return self.eta**2 * schedule.tables().posterior_variance

    def tables(self, schedule: Schedule, device: torch.device | str, dtype: torch.dtype) -> SimpleNamespace:
        r"""The tables of :func:`q_sigma_posterior` on ``device`` in ``dtype``, computed in float64 and cached with
        the schedule (:meth:`~pyrodiff.chain.schedule.Schedule.derived`): ``coef_x0`` and ``coef_xt`` of the mean
        :math:`A_t x_0 + B_t x_t`, and ``variance`` :math:`\sigma_t^2`."""
        return schedule.derived(self._tables, device, dtype)

    def _tables(self, schedule: Schedule) -> SimpleNamespace:
        c = schedule.tables()
        abar, abar_prev = c.alphas_cumprod, c.alphas_cumprod_prev
        variance = self.eta**2 * c.posterior_variance
        coef_xt = ((1 - abar_prev) - variance).clamp(min=0).sqrt() / (1 - abar).sqrt()
        return SimpleNamespace(coef_x0=abar_prev.sqrt() - coef_xt * abar.sqrt(), coef_xt=coef_xt, variance=variance)


#: DDPM's forward chain (eta = 1), the default of the guide and the model
DDPM = InferenceFamily(1.0)

#: why a DDIM chain with eta = 0 is not scored
ETA_ZERO_HAS_NO_BOUND = (
    "DDIM with eta = 0 is deterministic given x_T: its steps have no density, so it has no bound "
    "(every KL term would be infinite); it can only sample. Score DDIM with eta in (0, 1]"
)


class _QPath(PathDistribution):
    """The law of the whole path :math:`x_{1:T}` given :math:`x_0` (batch shape ``(T, N)``, the data's event
    shape).  Subclasses choose which factorisation of the same joint ``log_prob`` reports per timestep."""

    has_rsample = True

    def __init__(self, x0: torch.Tensor, schedule: Schedule, validate_args=None) -> None:
        self.x0 = x0
        self.schedule = schedule
        T = schedule.num_steps
        batch_shape = torch.Size((T,) + x0.shape[:1])
        super().__init__(batch_shape, x0.shape[1:], validate_args=validate_args)

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        r"""A path from the forward recursion (:func:`q_trajectory` from :math:`x_0`), vectorised over t: :math:`x_t =
        \sqrt{\bar\alpha_t}\big(x_0 + \sum_{s \le t} \sqrt{\beta_s / \bar\alpha_s}\,\epsilon_s\big)`.  Both orders
        describe this same joint."""
        eps = torch.randn(self._extended_shape(sample_shape), dtype=self.x0.dtype, device=self.x0.device)
        t = torch.arange(1, self.schedule.num_steps + 1, device=self.x0.device)
        return q_trajectory(self.schedule, self.x0, eps, t, dim=len(sample_shape))[0]

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
    :math:`\log q(x_k \mid x_{k+1}, x_0)` and row T is :math:`\log q(x_T \mid x_0)`.  With a non-Markov
    ``family`` (:class:`InferenceFamily`, eta < 1) the rows are :math:`q_\sigma(x_k \mid x_{k+1}, x_0)`, and a
    path is drawn backwards from :math:`x_T`, T - 1 sequential steps."""

    def __init__(
        self, x0: torch.Tensor, schedule: Schedule, family: InferenceFamily = DDPM, validate_args=None
    ) -> None:
        self.family = family
        super().__init__(x0, schedule, validate_args=validate_args)

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        if self.family.is_markov:
            return super().rsample(sample_shape)
        T = self.schedule.num_steps
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.x0.dtype, device=self.x0.device)
        d = len(sample_shape)
        x0 = self.x0.expand(shape[:d] + shape[d + 1 :])
        batch = shape[:d] + shape[d + 1 : d + 2]  # sample_shape + (N,)
        step = lambda s: torch.full(batch, s, device=self.x0.device, dtype=torch.long)  # noqa: E731
        loc, var = q_marginal(self.schedule, x0, step(T))
        rows = [loc + var.sqrt() * eps.select(d, T - 1)]
        for s in range(T, 1, -1):
            loc, var = self.family.posterior(self.schedule, x0, rows[-1], step(s))
            rows.append(loc + var.sqrt() * eps.select(d, s - 2))
        return torch.stack(rows[::-1], d)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        loc, var = self.conditionals(value)
        return normal_log_prob(value, loc, var, self.event_dim)

    def conditionals(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of each row's conditional given the rest of the path ``value``."""
        T = self.schedule.num_steps
        t_parent = (path_timesteps(self.batch_shape, self.x0.device) + 1).clamp(max=T)
        loc, var = self.family.posterior(self.schedule, self.x0, self._following(value), t_parent)
        m_T, v_T = q_marginal(self.schedule, self.x0.expand_as(value), torch.full_like(t_parent, T))
        is_last = is_last_row(self.batch_shape, self.event_dim, value.device)
        return torch.where(is_last, m_T, loc), torch.where(is_last, v_T, var)


class ForwardTransition(dist.Normal):
    r"""A Normal used for the forward-order guide's sites, so that ``TraceMeanField_ELBO`` (which
    would be biased on them) is refused with a clear error instead of a warning (:mod:`pyrodiff.chain.kl`)."""


class DiffusionGuide:
    r"""The forward chain :math:`q(x_{1:T} \mid x_0)` as a Pyro guide: its only parameters are its schedule's, if it
    has any (a fixed :class:`~pyrodiff.chain.schedule.NoiseSchedule` has none).

    :param schedule: the noise schedule, the very object of the model's (the model refuses a guide built on
        another); validated here (:meth:`~pyrodiff.chain.schedule.Schedule.check`).
    :param order: ``"posterior"`` (default) samples and scores
        :math:`q(x_T \mid x_0) \prod_t q(x_{t-1} \mid x_t, x_0)`; ``"forward"`` the literal forward
        process :math:`\prod_t q(x_t \mid x_{t-1})`.  Both are the same joint with the same sites, so a
        trace of one replays in the other; only the posterior order is valid with
        ``TraceMeanField_ELBO``.
    :param eta: the member of Song et al.'s inference family (:class:`InferenceFamily`): 1 (default) is DDPM's
        forward chain; eta in (0, 1) the non-Markovian :math:`q_\sigma` of DDIM, with the same marginals and
        sites (posterior order only), the guide of :meth:`DiffusionModel.ddim(eta) <pyrodiff.chain.reverse.DiffusionModel.ddim>`.
        eta = 0 is refused: that :math:`q_\sigma` is deterministic given :math:`x_0, x_T` and has no density.

    Called as ``guide(x0, subsample_steps=None)``, with the same arguments as
    :class:`~pyrodiff.chain.reverse.DiffusionModel`.  Each call registers the schedule's parameters, if it has any,
    with Pyro's param store (``pyro.module("schedule", schedule)``), so that ``pyro.infer.SVI`` optimises them with
    the model's; a torch optimiser over ``Trace_ELBO()(model, guide)`` does not need it, and ``pyrodiff train`` turns it
    off (:attr:`register_with_pyro`).
    """

    def __init__(self, schedule: Schedule, order: str = "posterior", eta: float = 1.0) -> None:
        if not isinstance(schedule, Schedule):
            raise TypeError(
                f"schedule must be a Schedule (e.g. NoiseSchedule.linear(1000)), got {type(schedule).__name__}"
            )
        checks.one_of("order", order, ("posterior", "forward"))
        family = InferenceFamily(eta)
        if not family.has_density:
            raise ValueError(
                "eta = 0 gives the deterministic q_sigma of DDIM: it has no density, so it cannot be a guide "
                "(and DDIM with eta = 0 has no bound); use eta in (0, 1]"
            )
        if order == "forward" and not family.is_markov:
            raise ValueError(f"eta = {eta} gives a non-Markovian q_sigma, which has no forward order: use 'posterior'")
        self.schedule = schedule.check()
        self.order = order
        self.family = family
        #: register the schedule's parameters (if any) with Pyro's param store at each call
        self.register_with_pyro = True

    def __call__(self, x0: torch.Tensor, subsample_steps: int | None = None, **kwargs) -> torch.Tensor:
        if x0 is None:
            raise ValueError("the guide q(x_{1:T} | x_0) needs data x0")
        check_batch(x0)
        if self.register_with_pyro and self.schedule.has_parameters:
            pyro.module("schedule", self.schedule)
        N = x0.shape[0]
        if subsample_steps is None:
            if self.order == "posterior":
                chain = QPosteriorOrder(x0, self.schedule, self.family)
            else:
                chain = QForwardOrder(x0, self.schedule)
            with (
                pyro.plate("data", N, dim=-1, device=x0.device),
                pyro.plate("time", self.schedule.num_steps, dim=-2, device=x0.device),
            ):
                return pyro.sample("x_{1:T}", chain, infer={SCHEDULE_KEY: self.schedule})
        return self._subsampled(x0, subsample_steps)

    def _subsampled(self, x0: torch.Tensor, subsample_steps: int) -> torch.Tensor:
        T, N = self.schedule.num_steps, x0.shape[0]
        event_dim = x0.dim() - 1
        t = draw_timesteps(N, subsample_steps, T, x0.device)
        with pyro.plate("data", N, dim=-1, device=x0.device):
            loc_T, var_T = q_marginal(self.schedule, x0, torch.full((N,), T, device=x0.device))
            pyro.sample(
                "x_T", dist.Normal(loc_T, var_T.sqrt()).to_event(event_dim), infer={SCHEDULE_KEY: self.schedule}
            )
            x0 = x0.expand(t.shape + x0.shape[1:])
            with (
                pyro.plate("steps", subsample_steps, dim=-2, device=x0.device),
                pyro.poutine.scale(scale=step_scale(t, T)),
            ):
                if self.order == "posterior":
                    loc, var = q_marginal(self.schedule, x0, t)
                    xt = pyro.sample("x_t", dist.Normal(loc, var.sqrt()).to_event(event_dim))
                    loc, var = self.family.posterior(self.schedule, x0, xt, t)
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
