r"""Isotropic Gaussian-mixture data, its noisy marginals and its exact reverse process.

The data law is :math:`q(x_0) = \sum_j \pi_j N(\mu_j, s^2 I)` (:class:`IsotropicGaussianMixture`); with
:math:`s^2 = 0` it is a weighted set of points, e.g. a training set.  Every quantity of the forward chain is then
known exactly (derivations in docs/MATH.md, section 13, "Gaussian-mixture data"):

- the marginal :math:`q(x_t) = \sum_j \pi_j N(\sqrt{\bar\alpha_t}\mu_j, P_t I)`, :math:`P_t = \bar\alpha_t s^2 + 1 - \bar\alpha_t`
  (:meth:`IsotropicGaussianMixture.marginal`);
- the true reverse conditional (:meth:`IsotropicGaussianMixture.reverse`, a :class:`ReverseMixture`)

  .. math:: q(x_{t-1} \mid x_t) = \sum_j w_j(x_t)\, N(a_t \mu_j + b_t x_t,\ v_t I),\qquad
            w_j(x_t) \propto \pi_j N(x_t; \sqrt{\bar\alpha_t}\mu_j, P_t I),

  with :math:`a_t = \sqrt{\bar\alpha_{t-1}}\beta_t / P_t`, :math:`b_t = \sqrt{\alpha_t} P_{t-1} / P_t`,
  :math:`v_t = \beta_t P_{t-1} / P_t` (:func:`reverse_coefficients`; for :math:`s = 0` the forward posterior's
  :math:`P_t, Q_t, \tilde\beta_t` of docs/MATH.md);
- the "many easy problems" account (:func:`moment_matched_bound`): the per-step KL :math:`D_t` from the true reverse
  conditional to its moment-matched Gaussian, and the best bound any Gaussian reverse chain can reach,
  :math:`H(q(x_0)) + \mathrm{KL}(q(x_T) \,\|\, N(0, I)) + \sum_t D_t` (nats per example).

Components are never expanded against a batch: squared distances use
:math:`\|r - c\,\mu_j\|^2 = \|r\|^2 - 2c\, r\cdot\mu_j + c^2\|\mu_j\|^2` (one matmul, with the means centred at their
weighted average for accuracy), in chunks of rows so that no temporary exceeds about :data:`CHUNK_ELEMENTS`
elements besides the ``(B, K)`` table of log-weights itself.  Tensors follow the data: a law's tables are cast to
the device of its input and to the promoted dtype of the input and the means, once, and cached.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace

import pyro.distributions as pyro_dist
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from .. import checks
from ..chain.forward import q_marginal, q_posterior
from ..chain.gaussian import at_timesteps
from ..chain.schedule import NoiseSchedule, Schedule
from ..data import Dataset

__all__ = ["IsotropicGaussianMixture", "ReverseMixture", "moment_matched_bound", "MomentMatchedBound"]

_LOG_2PI = math.log(2 * math.pi)

#: the largest temporary, in elements, that a chunked computation over ``(rows, K)`` makes
CHUNK_ELEMENTS = 1 << 22


def reverse_coefficients(schedule: NoiseSchedule, variance: float) -> SimpleNamespace:
    r"""Per-timestep float64 tables (length T, entry ``t - 1`` for step t) of the reverse process of a mixture of
    components :math:`N(\mu_j, s^2 I)`, ``variance`` :math:`= s^2 \ge 0`.

    Within component j, :math:`x_t \mid j \sim N(\sqrt{\bar\alpha_t}\mu_j, P_t I)`,
    :math:`P_t = \bar\alpha_t s^2 + 1 - \bar\alpha_t` (``marginal_variance``), and :math:`x_0` given :math:`x_t` is
    the conjugate Gaussian :math:`N(c_t \mu_j + d_t x_t, r_t I)` with :math:`c_t = (1 - \bar\alpha_t)/P_t`
    (``x0_coef_mu``), :math:`d_t = s^2\sqrt{\bar\alpha_t}/P_t` (``x0_coef_xt``), :math:`r_t = s^2(1 - \bar\alpha_t)/P_t`
    (``x0_variance``).  Integrating the forward posterior :math:`N(P'_t x_0 + Q_t x_t, \tilde\beta_t I)` (the
    schedule's ``posterior_mean_coef_x0``, ``posterior_mean_coef_xt``, ``posterior_variance``) over it gives
    :math:`q(x_{t-1} \mid x_t, j) = N(a_t \mu_j + b_t x_t, v_t I)`:

    - ``coef_mu`` :math:`a_t = P'_t c_t = \sqrt{\bar\alpha_{t-1}}\beta_t / P_t`,
    - ``coef_xt`` :math:`b_t = P'_t d_t + Q_t = \sqrt{\alpha_t} P_{t-1} / P_t`,
    - ``variance`` :math:`v_t = \tilde\beta_t + P'^2_t r_t = \beta_t P_{t-1} / P_t`,

    the conditioning of the joint Gaussian of :math:`(x_{t-1}, x_t)` given j.  For :math:`s = 0` they are exactly
    :math:`P'_t, Q_t, \tilde\beta_t`; at t = 1, :math:`v_1 = s^2\beta_1/P_1` (zero for points).
    ``sqrt_alphas_cumprod`` :math:`\sqrt{\bar\alpha_t}` completes the weights' Gaussian.
    """
    variance = checks.number("variance", variance, 0)
    c = schedule.tables()
    abar = c.alphas_cumprod
    one_minus = 1.0 - abar
    marginal_variance = abar * variance + one_minus
    x0_coef_mu = one_minus / marginal_variance
    x0_coef_xt = variance * abar.sqrt() / marginal_variance
    x0_variance = variance * one_minus / marginal_variance
    p = c.posterior_mean_coef_x0
    return SimpleNamespace(
        sqrt_alphas_cumprod=abar.sqrt(),
        marginal_variance=marginal_variance,
        x0_coef_mu=x0_coef_mu,
        x0_coef_xt=x0_coef_xt,
        x0_variance=x0_variance,
        coef_mu=p * x0_coef_mu,
        coef_xt=p * x0_coef_xt + c.posterior_mean_coef_xt,
        variance=c.posterior_variance + p**2 * x0_variance,
    )


@dataclass(frozen=True)
class _ReverseTables:
    """:func:`reverse_coefficients` for one component variance, as a value (a cache key of
    :meth:`~pyrodiff.chain.schedule.Schedule.derived`)."""

    variance: float

    def of(self, schedule: Schedule) -> SimpleNamespace:
        return reverse_coefficients(schedule, self.variance)


def draw_components(log_weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""One component index per row of normalised ``log_weights`` ``(B, K)``, by inversion of the CDF: with
    :math:`u \sim U(0, 1)` (``generator``), the first :math:`j` with :math:`\sum_{i \le j} w_i > u`.  One uniform, one
    cumulative sum and one binary search per row: far cheaper than ``torch.multinomial`` over many components."""
    cdf = log_weights.exp().cumsum(-1)
    u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, dtype=cdf.dtype, device=cdf.device)
    return torch.searchsorted(cdf, u * cdf[..., -1:], right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


class _Components:
    """A law's component tables on one device in one dtype: the weighted centre ``centre`` (D,) of the means, the
    centred flattened means ``centred`` (K, D), their squared norms ``sq_norms`` (K,) and ``log_weights`` (K,)."""

    def __init__(self, means: torch.Tensor, log_weights: torch.Tensor) -> None:
        flat = means.flatten(1)
        self.centre = log_weights.exp() @ flat
        self.centred = flat - self.centre
        self.sq_norms = (self.centred**2).sum(1)
        self.log_weights = log_weights

    @property
    def num_components(self) -> int:
        return self.centred.shape[0]

    def sq_distances(self, r: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
        r""":math:`\|r - \text{scale}\,\mu^c_j\|^2 = \|r\|^2 - 2\,\text{scale}\; r\cdot\mu^c_j + \text{scale}^2\|\mu^c_j\|^2`
        (R, K) for rows ``r`` (R, D), already centred (:math:`r = x - \text{scale}\cdot\text{centre}`), and a per-row
        ``scale`` (R, 1) or a number; one matmul, clamped at 0 against rounding."""
        sq = (r * r).sum(1, keepdim=True) - 2 * scale * (r @ self.centred.T) + scale**2 * self.sq_norms
        return sq.clamp_min(0)

    def chunks(self, rows: int, extra: int = 1) -> Iterator[slice]:
        """Slices of ``rows`` rows with at most about :data:`CHUNK_ELEMENTS` elements per ``(rows, K * extra)`` block."""
        step = max(1, CHUNK_ELEMENTS // (self.num_components * extra))
        for lo in range(0, rows, step):
            yield slice(lo, min(lo + step, rows))


class IsotropicGaussianMixture:
    r"""The law :math:`q(x_0) = \sum_{j=1}^K \pi_j N(\mu_j, s^2 I)` of data of shape ``means.shape[1:]``.

    :param means: the component means :math:`\mu_j`, shape ``(K, *D)``, of floating dtype; the law's device and dtype
        (draws are made there).
    :param variance: :math:`s^2 \ge 0`; with 0 the law is the weighted set of points ``means`` (no density).
    :param weights: :math:`\pi_j \ge 0`, shape ``(K,)``, normalised here to sum to 1 (uniform if None).
    """

    def __init__(self, means: torch.Tensor, variance: float = 0.0, weights: torch.Tensor | None = None) -> None:
        if not torch.is_tensor(means):
            raise TypeError(f"means must be a tensor of shape (K, *data_shape), got {type(means).__name__}")
        if not means.is_floating_point():
            raise TypeError(f"means must be a floating-point tensor, got {means.dtype}")
        if means.dim() < 2 or means.shape[0] == 0 or means[0].numel() == 0:
            raise ValueError(f"means must have shape (K, *data_shape) with K >= 1, got {tuple(means.shape)}")
        if not torch.isfinite(means).all():
            raise ValueError("means contain NaN or infinite values")
        self._variance = checks.number("variance", variance, 0)
        K = means.shape[0]
        if weights is None:
            log_weights = torch.full((K,), -math.log(K), dtype=means.dtype, device=means.device)
        else:
            if not torch.is_tensor(weights):
                raise TypeError(f"weights must be a tensor of shape ({K},), got {type(weights).__name__}")
            weights = weights.detach().to(device=means.device, dtype=means.dtype)
            if weights.shape != (K,):
                raise ValueError(f"weights must have shape ({K},) (one per mean), got {tuple(weights.shape)}")
            if not torch.isfinite(weights).all() or (weights < 0).any() or not weights.sum() > 0:
                raise ValueError("weights must be finite, non-negative and not all zero")
            log_weights = (weights / weights.sum()).log()
        self._means = means.detach().clone()
        self._log_weights = log_weights
        self._cache: dict[tuple[torch.device, torch.dtype], _Components] = {}

    @classmethod
    def of(cls, dataset: Dataset) -> IsotropicGaussianMixture:
        """The law of a dataset whose law is a known isotropic Gaussian mixture (``dataset.mixture``, gaussians8)."""
        if dataset.mixture is None:
            raise ValueError(f"dataset {dataset.name!r} has no known Gaussian-mixture law (only gaussians8 has one)")
        p = dataset.mixture
        return cls(p.means, p.variance, p.weights)

    # ------------------------------------------------------------------ description
    @property
    def means(self) -> torch.Tensor:
        r"""The component means :math:`\mu_j`, ``(K, *D)``."""
        return self._means

    @property
    def variance(self) -> float:
        """:math:`s^2`, the variance of every component in every dimension."""
        return self._variance

    @property
    def weights(self) -> torch.Tensor:
        r"""The normalised weights :math:`\pi_j`, ``(K,)``."""
        return self._log_weights.exp()

    @property
    def num_components(self) -> int:
        return self._means.shape[0]

    @property
    def event_shape(self) -> torch.Size:
        """The data's shape ``D``."""
        return self._means.shape[1:]

    @property
    def dim(self) -> int:
        """The number of dimensions, the product of :attr:`event_shape`."""
        return self._means[0].numel()

    def __repr__(self) -> str:
        return (
            f"IsotropicGaussianMixture(K={self.num_components}, event_shape={tuple(self.event_shape)}, "
            f"variance={self.variance!r}, dtype={self._means.dtype}, device={self._means.device})"
        )

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> IsotropicGaussianMixture:
        """The same law with its means on ``device`` in ``dtype``."""
        means = self._means.to(device=device or self._means.device, dtype=dtype or self._means.dtype)
        return IsotropicGaussianMixture(means, self.variance, self._log_weights.exp().to(means))

    def _components(self, device: torch.device, dtype: torch.dtype) -> _Components:
        key = (torch.device(device), dtype)
        if key not in self._cache:
            self._cache[key] = _Components(self._means.to(*key), self._log_weights.to(*key))
        return self._cache[key]

    def _components_for(self, x: torch.Tensor) -> _Components:
        return self._components(x.device, torch.promote_types(x.dtype, self._means.dtype))

    # ------------------------------------------------------------------ the law
    def mean(self) -> torch.Tensor:
        r""":math:`E[x_0] = \sum_j \pi_j \mu_j`, shape ``D``."""
        return (self._log_weights.exp() @ self._means.flatten(1)).reshape(self.event_shape)

    def covariance(self) -> torch.Tensor:
        r""":math:`\mathrm{Cov}[x_0] = s^2 I + \sum_j \pi_j (\mu_j - \bar\mu)(\mu_j - \bar\mu)^\top`, shape ``(D, D)``
        (flattened dimensions)."""
        c = self._components(self._means.device, self._means.dtype)
        weighted = c.centred * self._log_weights.exp()[:, None]
        eye = torch.eye(self.dim, dtype=self._means.dtype, device=self._means.device)
        return self.variance * eye + weighted.T @ c.centred

    def moment_matched(self) -> MultivariateNormal:
        r"""The Gaussian with the law's mean and covariance, :math:`N(E[x_0], \mathrm{Cov}[x_0])` over the flattened
        dimensions: the Gaussian closest to the law in :math:`\mathrm{KL}(q \,\|\, \cdot)`."""
        return MultivariateNormal(self.mean().flatten(), self.covariance(), validate_args=False)

    def log_prob(self, x0: torch.Tensor) -> torch.Tensor:
        r""":math:`\log q(x_0) = \operatorname{logsumexp}_j \big[\log\pi_j - \|x_0 - \mu_j\|^2/(2s^2)\big] - \tfrac D2\log(2\pi s^2)`
        for a batch ``(N, *D)``: shape ``(N,)``, in the promoted dtype of ``x0`` and the means, on ``x0``'s device.
        Needs :math:`s^2 > 0` (a set of points has no density)."""
        if self.variance == 0:
            raise ValueError("log_prob needs variance > 0: with variance 0 the law is a set of points with no density")
        x = _check_batch(x0, "x0", self.event_shape)
        c = self._components_for(x)
        x = x.to(c.centred.dtype).flatten(1)
        parts = [
            (c.log_weights - c.sq_distances(x[rows] - c.centre, 1.0) / (2 * self.variance)).logsumexp(1)
            for rows in c.chunks(len(x))
        ]
        out = torch.cat(parts)
        return out - 0.5 * self.dim * (_LOG_2PI + math.log(self.variance))

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""``num_samples`` draws, ``(n, *D)``: a component :math:`j \sim \pi` then :math:`\mu_j + s z`,
        :math:`z \sim N(0, I)`, on the means' device with ``generator``."""
        n = checks.positive_int("num_samples", num_samples)
        j = torch.multinomial(self._log_weights.exp(), n, replacement=True, generator=generator)
        x = self._means.index_select(0, j)
        if self.variance > 0:
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = x + math.sqrt(self.variance) * z
        return x

    def entropy_estimate(self, num_samples: int, generator: torch.Generator | None = None) -> tuple[float, float]:
        r"""A Monte Carlo estimate of the differential entropy :math:`H(q) = -E_q \log q(x_0)` (nats) and its standard
        error.  A mixture's entropy has no closed form; with :math:`G` the moment-matched Gaussian,
        :math:`H(q) = H(G) - \mathrm{KL}(q \,\|\, G)` (because :math:`\log G` is quadratic, :math:`E_q \log G = E_G \log G`),
        with :math:`H(G) = \tfrac12 \log\det(2\pi e\,\mathrm{Cov})` exact and the KL estimated by
        :math:`\frac1n\sum_i [\log q(x_i) - \log G(x_i)]`, :math:`x_i \sim q` (exact for one component)."""
        if self.variance == 0:
            raise ValueError("a law with variance 0 (a set of points) has no differential entropy")
        kl, se = _kl_to_moment_matched(self, num_samples, generator)
        return self.moment_matched().entropy().item() - kl, se

    # ------------------------------------------------------------------ the forward and reverse chains
    def noise(self, x: torch.Tensor, log_snr: torch.Tensor | float) -> torch.Tensor:
        r"""The exact noise prediction :math:`E[\epsilon \mid x_\lambda = x]` of this data law at log-SNR ``log_snr``
        (a number, a 0-dim tensor or one per row of ``x``), shape of ``x`` ``(N, *D)``: with
        :math:`\alpha^2 = \mathrm{sigmoid}(\lambda)`, :math:`\sigma^2 = \mathrm{sigmoid}(-\lambda)`,
        :math:`P = \alpha^2 s^2 + \sigma^2` and the component posteriors
        :math:`w_j(x) \propto \pi_j N(x; \alpha\mu_j, P I)`, the score of :math:`q(x_\lambda)` is
        :math:`\sum_j w_j(x)(\alpha\mu_j - x)/P` and :math:`E[\epsilon \mid x] = -\sigma\,\text{score}
        = \sigma(x - \alpha\sum_j w_j\mu_j)/P` (Tweedie; docs/MATH.md, "The score and the probability-flow ODE").
        Works under ``torch.func`` transforms (no host reads)."""
        c = self._components_for(x)
        flat = x.to(c.centred.dtype).flatten(1)
        lam = torch.as_tensor(log_snr, dtype=flat.dtype, device=flat.device).reshape(-1, 1)
        alpha2, sigma2 = torch.sigmoid(lam), torch.sigmoid(-lam)
        alpha = alpha2.sqrt()
        P = alpha2 * self.variance + sigma2
        r = flat - alpha * c.centre
        logits = c.log_weights - c.sq_distances(r, alpha) / (2 * P)
        mean = torch.softmax(logits, 1) @ c.centred  # sum_j w_j mu_j, centred
        return (sigma2.sqrt() * (r - alpha * mean) / P).to(x.dtype).reshape(x.shape)

    def marginal(self, schedule: NoiseSchedule, t: int) -> IsotropicGaussianMixture:
        r"""The law of :math:`x_t`, :math:`q(x_t) = \sum_j \pi_j N(\sqrt{\bar\alpha_t}\mu_j, P_t I)` with
        :math:`P_t = \bar\alpha_t s^2 + 1 - \bar\alpha_t` (the convolution of each component with
        :math:`q(x_t \mid x_0)`); ``t`` an int in ``0..T``, 0 giving this law."""
        T = schedule.num_steps
        checks.int_in("t", t, 0, T, hi_name="T")
        if t == 0:
            return self
        steps = torch.full((self.num_components,), t, dtype=torch.long, device=self._means.device)
        means, _ = q_marginal(schedule, self._means, steps)
        variance = reverse_coefficients(schedule, self.variance).marginal_variance[t - 1].item()
        return IsotropicGaussianMixture(means, variance, self._log_weights.exp())

    def reverse(self, schedule: NoiseSchedule, x_t: torch.Tensor, t: int | torch.Tensor) -> ReverseMixture:
        r"""The true reverse conditional :math:`q(x_{t-1} \mid x_t)` of this data law for each row of ``x_t``
        (module docstring; :func:`reverse_coefficients`).

        :param x_t: a batch ``(B, *D)``; results are in the promoted dtype of ``x_t`` and the means, on ``x_t``'s device.
        :param t: the math timestep of every row (an int in 1..T) or of each (an integer tensor ``(B,)``).
        """
        x = _check_batch(x_t, "x_t", self.event_shape)
        c = self._components_for(x)
        x = x.to(c.centred.dtype)
        steps = _check_timesteps(t, x.shape[0], schedule.num_steps, x.device)
        table = schedule.derived(_ReverseTables(self.variance).of, x.device, x.dtype)
        at = lambda values: at_timesteps(values, steps, 0)[:, None]  # noqa: E731
        scale, marginal_variance = at(table.sqrt_alphas_cumprod), at(table.marginal_variance)
        flat = x.flatten(1)
        B, K = flat.shape[0], c.num_components
        log_weights = torch.empty((B, K), dtype=x.dtype, device=x.device)
        weighted_means = torch.empty_like(flat)
        for rows in c.chunks(B):
            sq = c.sq_distances(flat[rows] - scale[rows] * c.centre, scale[rows])
            logits = c.log_weights - sq / (2 * marginal_variance[rows])
            log_weights[rows] = logits - logits.logsumexp(1, keepdim=True)
            weighted_means[rows] = log_weights[rows].exp() @ c.centred
        x0_mean = at(table.x0_coef_mu) * (c.centre + weighted_means) + at(table.x0_coef_xt) * flat
        x0_mean = x0_mean.reshape(x.shape)
        mean, _ = q_posterior(schedule, x0_mean, x, steps)
        return ReverseMixture(
            log_weights=log_weights,
            mean=mean,
            x0_mean=x0_mean,
            x_t=x,
            t=steps,
            coef_mu=at(table.coef_mu)[:, 0],
            coef_xt=at(table.coef_xt)[:, 0],
            variance=at(table.variance)[:, 0],
            components=c,
        )


@dataclass(frozen=True, eq=False)
class ReverseMixture:
    r"""The true reverse conditional :math:`q(x_{t-1} \mid x_t) = \sum_j w_j N(a\mu_j + b x_t, v I)` for a batch of
    B rows (from :meth:`IsotropicGaussianMixture.reverse`); at rows with t = 1 the variable is :math:`x_0`.

    Fields (leading dim B): ``log_weights`` (B, K), :math:`\log w_j(x_t)`, normalised; ``mean`` (B, *D), the mixture's
    mean :math:`E[x_{t-1} \mid x_t] = a\bar\mu_w + b x_t = \tilde\mu_t(E[x_0 \mid x_t], x_t)` (the forward posterior mean
    is affine in :math:`x_0`); ``x0_mean`` (B, *D), :math:`E[x_0 \mid x_t] = c\,\bar\mu_w + d\,x_t` (``w @ mu`` for
    points); ``x_t``, ``t``; the per-row scalars ``coef_mu`` :math:`a`, ``coef_xt`` :math:`b`, ``variance`` :math:`v`.
    """

    log_weights: torch.Tensor
    mean: torch.Tensor
    x0_mean: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor
    coef_mu: torch.Tensor
    coef_xt: torch.Tensor
    variance: torch.Tensor
    components: _Components = field(repr=False)

    @property
    def batch_size(self) -> int:
        return self.x_t.shape[0]

    def _centred_shift(self) -> torch.Tensor:
        r""":math:`b x_t + a\,\text{centre}` (B, D): the component means are this plus :math:`a\mu^c_j`."""
        return self.coef_xt[:, None] * self.x_t.flatten(1) + self.coef_mu[:, None] * self.components.centre

    def covariance(self) -> torch.Tensor:
        r""":math:`\mathrm{Cov}[x_{t-1} \mid x_t] = v I + a^2 \mathrm{Cov}_w(\mu)`, shape ``(B, D, D)`` (flattened dims),
        :math:`\mathrm{Cov}_w(\mu) = \sum_j w_j \mu_j\mu_j^\top - \bar\mu_w\bar\mu_w^\top` (law of total covariance),
        accumulated over chunks of components (no ``(B, K, D)`` temporary)."""
        c = self.components
        K, D = c.centred.shape
        first = self.log_weights.new_zeros((self.batch_size, D))
        second = self.log_weights.new_zeros((self.batch_size, D * D))
        step = max(1, CHUNK_ELEMENTS // (D * D + self.batch_size))  # temporaries (B, step) and (step, D^2)
        for lo in range(0, K, step):
            mu = c.centred[lo : lo + step]
            w = self.log_weights[:, lo : lo + step].exp()
            first = first + w @ mu
            second = second + w @ (mu[:, :, None] * mu[:, None, :]).reshape(len(mu), D * D)
        spread = second.reshape(-1, D, D) - first[:, :, None] * first[:, None, :]
        eye = torch.eye(D, dtype=second.dtype, device=second.device)
        return self.variance[:, None, None] * eye + (self.coef_mu**2)[:, None, None] * spread

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        r""":math:`\log q(x_{t-1} = \text{value} \mid x_t) = \operatorname{logsumexp}_j\big[\log w_j - \|y - b x_t - a\mu_j\|^2/(2v)\big]
        - \tfrac D2 \log(2\pi v)` for ``value`` (B, *D): shape ``(B,)``.  Needs :math:`v > 0` on every row (at t = 1
        for points, :math:`v_1 = 0`: the components are points)."""
        if value.shape != self.x_t.shape:
            raise ValueError(f"value must have the shape of x_t {tuple(self.x_t.shape)}, got {tuple(value.shape)}")
        if not bool((self.variance > 0).all()):
            raise ValueError(
                "log_prob needs a positive variance on every row: at t = 1 a mixture of points has point components"
            )
        c = self.components
        r = value.to(self.x_t.dtype).flatten(1) - self._centred_shift()
        a, v = self.coef_mu[:, None], self.variance[:, None]
        parts = []
        for rows in c.chunks(self.batch_size):
            logits = self.log_weights[rows] - c.sq_distances(r[rows], a[rows]) / (2 * v[rows])
            parts.append(logits.logsumexp(1))
        return torch.cat(parts) - 0.5 * r.shape[1] * (_LOG_2PI + self.variance.log())

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        r"""One draw per row, ``(B, *D)``: a component :math:`j \sim w(x_t)` (:func:`draw_components` with
        ``generator``), then :math:`a\mu_j + b x_t + \sqrt v\, z` with standard normal ``noise`` :math:`z` (drawn with
        ``generator``, after the components, if not given)."""
        if noise is not None and noise.shape != self.x_t.shape:
            raise ValueError(f"noise must have the shape of x_t {tuple(self.x_t.shape)}, got {tuple(noise.shape)}")
        c = self.components
        j = draw_components(self.log_weights, generator)
        if noise is None:
            noise = torch.randn(self.x_t.shape, generator=generator, dtype=self.x_t.dtype, device=self.x_t.device)
        loc = self._centred_shift() + self.coef_mu[:, None] * c.centred.index_select(0, j)
        return (loc + self.variance.sqrt()[:, None] * noise.flatten(1)).reshape(self.x_t.shape)

    def select(self, index) -> ReverseMixture:
        """The rows ``index`` (a slice, a boolean mask or integer indices of the batch dim; an int keeps the dim)."""
        if checks.is_integer(index):
            index = slice(index, index + 1 if index != -1 else None)
        return ReverseMixture(
            log_weights=self.log_weights[index],
            mean=self.mean[index],
            x0_mean=self.x0_mean[index],
            x_t=self.x_t[index],
            t=self.t[index],
            coef_mu=self.coef_mu[index],
            coef_xt=self.coef_xt[index],
            variance=self.variance[index],
            components=self.components,
        )


# ---------------------------------------------------------------------- many easy problems
@dataclass(frozen=True)
class MomentMatchedBound:
    r"""The best bound a Gaussian reverse chain can reach on a known data law (nats per example), with its parts.

    ``step_kls[t - 1]`` is :math:`D_t = E_{q(x_t)} \mathrm{KL}(q(x_{t-1} \mid x_t) \,\|\, N(E[x_{t-1} \mid x_t],
    \mathrm{Cov}[x_{t-1} \mid x_t]))` and ``step_kls_stderr`` its standard error (float64, length T); ``prior_kl`` is
    :math:`\mathrm{KL}(q(x_T) \,\|\, N(0, I))`; ``entropy`` is :math:`H(q(x_0))`.  Each estimate is independent of the
    others, so the standard errors add in quadrature.
    """

    step_kls: torch.Tensor
    step_kls_stderr: torch.Tensor
    prior_kl: float
    prior_kl_stderr: float
    entropy: float
    entropy_stderr: float
    num_samples: int

    @property
    def gap(self) -> float:
        r""":math:`\mathrm{KL}(q(x_{0:T}) \,\|\, p^*(x_{0:T})) = \mathrm{KL}(q(x_T) \,\|\, p(x_T)) + \sum_t D_t`: the best
        Gaussian chain's bound minus the entropy."""
        return self.prior_kl + self.step_kls.sum().item()

    @property
    def gap_stderr(self) -> float:
        return math.sqrt(self.prior_kl_stderr**2 + (self.step_kls_stderr**2).sum().item())

    @property
    def bound(self) -> float:
        r""":math:`E_q[-\mathrm{ELBO}^*] = H(q(x_0)) + \mathrm{KL}(q(x_T) \,\|\, p(x_T)) + \sum_{t=1}^T D_t`."""
        return self.entropy + self.gap

    @property
    def bound_stderr(self) -> float:
        return math.sqrt(self.entropy_stderr**2 + self.gap_stderr**2)

    def to_dict(self) -> dict:
        """Every field and derived number as plain data (lists and floats), e.g. for JSON."""
        out = {name: getattr(self, name) for name in ("prior_kl", "prior_kl_stderr", "entropy", "entropy_stderr")}
        out.update(step_kls=self.step_kls.tolist(), step_kls_stderr=self.step_kls_stderr.tolist())
        out.update(num_samples=self.num_samples, gap=self.gap, gap_stderr=self.gap_stderr)
        out.update(bound=self.bound, bound_stderr=self.bound_stderr)
        return out


@torch.no_grad()
def moment_matched_bound(
    law: IsotropicGaussianMixture,
    schedule: NoiseSchedule,
    num_samples: int,
    generator: torch.Generator | None = None,
    entropy: float | None = None,
) -> MomentMatchedBound:
    r"""The per-step KLs from the true reverse conditionals to their best Gaussians, and the best bound.

    For every step t = 1..T at once (rows of all steps batched, in chunks), ``num_samples`` independent draws
    :math:`x_0 \sim q`, :math:`x_t \sim q(x_t \mid x_0)`, :math:`x_{t-1} \sim q(x_{t-1} \mid x_t, x_0)` (so that
    :math:`x_{t-1} \sim q(x_{t-1} \mid x_t)`; at t = 1 the variable is :math:`x_0` itself) give
    :math:`D_t \approx \frac1n\sum_i [\log q(x_{t-1}^i \mid x_t^i) - \log N(x_{t-1}^i; m(x_t^i), C(x_t^i))]`, with
    :math:`m, C` the exact mean and covariance of the reverse mixture.  The prior term is
    :math:`\mathrm{KL}(q(x_T) \,\|\, G_T) + \mathrm{KL}(G_T \,\|\, N(0, I))`, :math:`G_T` the moment-matched Gaussian of
    :math:`q(x_T)` (the second KL exact, the first estimated the same way; the split holds because
    :math:`\log G_T - \log N(0, I)` is quadratic).  ``entropy`` is :math:`H(q(x_0))` if known (its standard error is then
    0), else :meth:`IsotropicGaussianMixture.entropy_estimate`.

    :param law: the data law, :math:`s^2 > 0`; computations in its dtype on its device (float64 recommended).
    :param schedule: the forward chain (e.g. a :meth:`~pyrodiff.chain.schedule.NoiseSchedule.respace` of a longer one).
    :param num_samples: draws per step (and for the prior and the entropy).
    :param generator: the generator of every draw (on the law's device).
    """
    if not isinstance(law, IsotropicGaussianMixture):
        raise TypeError(f"law must be an IsotropicGaussianMixture, got {type(law).__name__}")
    if law.variance == 0:
        raise ValueError(
            "the law has variance 0 (a set of points): its entropy is -infinity and no Gaussian chain has a finite bound"
        )
    n = checks.integer("num_samples", num_samples, 2)  # a standard error needs 2 draws
    T = schedule.num_steps
    device, dtype = law.means.device, law.means.dtype
    c = law._components(device, dtype)
    steps = torch.arange(1, T + 1, device=device).repeat_interleave(n)
    terms = torch.empty(T * n, dtype=dtype, device=device)
    for rows in c.chunks(T * n, extra=1 + law.dim):
        t = steps[rows]
        x0 = law.sample(len(t), generator)
        loc, var = q_marginal(schedule, x0, t)
        x_t = loc + var.sqrt() * torch.randn(x0.shape, generator=generator, dtype=dtype, device=device)
        loc, var = q_posterior(schedule, x0, x_t, t)
        x_prev = loc + var.sqrt() * torch.randn(x0.shape, generator=generator, dtype=dtype, device=device)
        rev = law.reverse(schedule, x_t, t)
        gaussian = MultivariateNormal(rev.mean.flatten(1), rev.covariance(), validate_args=False)
        terms[rows] = rev.log_prob(x_prev) - gaussian.log_prob(x_prev.flatten(1))
    per_step = terms.reshape(T, n).double()
    step_kls, step_kls_stderr = per_step.mean(1).cpu(), _standard_error(per_step).cpu()
    prior = law.marginal(schedule, T)
    gaussian_prior = prior.moment_matched()
    standard = MultivariateNormal(
        torch.zeros(law.dim, dtype=dtype, device=device), torch.eye(law.dim, dtype=dtype, device=device)
    )
    prior_kl, prior_kl_stderr = _kl_to_moment_matched(prior, n, generator)
    prior_kl += kl_divergence(gaussian_prior, standard).item()
    if entropy is None:
        entropy, entropy_stderr = law.entropy_estimate(n, generator)
    else:
        entropy, entropy_stderr = float(entropy), 0.0
    return MomentMatchedBound(step_kls, step_kls_stderr, prior_kl, prior_kl_stderr, entropy, entropy_stderr, n)


# ---------------------------------------------------------------------- helpers
def _kl_to_moment_matched(
    law: IsotropicGaussianMixture, num_samples: int, generator: torch.Generator | None
) -> tuple[float, float]:
    r"""Monte Carlo :math:`\mathrm{KL}(q \,\|\, G) = E_q[\log q - \log G]` with its standard error, G moment-matched."""
    n = checks.integer("num_samples", num_samples, 2)
    x = law.sample(n, generator)
    diff = (law.log_prob(x) - law.moment_matched().log_prob(x.flatten(1))).double()
    return diff.mean().item(), _standard_error(diff[None])[0].item()


def _standard_error(values: torch.Tensor) -> torch.Tensor:
    """Standard error of the mean of each row (at least 2 draws)."""
    return values.std(1) / math.sqrt(values.shape[1])


def _check_batch(x: torch.Tensor, name: str, event_shape: torch.Size) -> torch.Tensor:
    if not torch.is_tensor(x):
        raise TypeError(
            f"{name} must be a tensor of shape (B, {', '.join(map(str, event_shape))}), got {type(x).__name__}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.shape[1:] != event_shape or x.shape[0] == 0:
        raise ValueError(
            f"{name} must have shape (B, {', '.join(map(str, event_shape))}) with B >= 1 (the law's data shape), "
            f"got {tuple(x.shape)}"
        )
    return x


def _check_timesteps(t: int | torch.Tensor, batch: int, num_steps: int, device: torch.device) -> torch.Tensor:
    """``t`` as a LongTensor ``(batch,)`` on ``device``; values are checked for an int, and for a tensor under Pyro's
    validation (the default: reading them is a device synchronisation)."""
    if checks.is_integer(t):
        checks.int_in("t", t, 1, num_steps, hi_name="T")
        return torch.full((batch,), t, dtype=torch.long, device=device)
    if not torch.is_tensor(t) or t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"t must be an int or an integer tensor of shape ({batch},), got {t!r}")
    if t.shape != (batch,):
        raise ValueError(f"t must be an int or a tensor of shape ({batch},), got shape {tuple(t.shape)}")
    t = t.to(device=device, dtype=torch.long)
    if pyro_dist.is_validation_enabled() and bool(((t < 1) | (t > num_steps)).any()):
        raise ValueError(f"t must lie in 1..T = 1..{num_steps}, got values outside it")
    return t
