r"""The exact reverse process of a finite data set: why :math:`p_\theta` is learned.

The posterior :math:`q(x_{t-1} \mid x_t, x_0)` is tractable only given :math:`x_0`.  Without it, the true
reverse conditional of the empirical distribution :math:`\hat q(x_0) = \frac1N \sum_i \delta(x_0 - x_0^i)` is
the mixture over the training points of those posteriors, each weighted by how likely that point is to
have produced :math:`x_t`:

.. math:: q(x_{t-1} \mid x_t) = \sum_{i=1}^N w_i(x_t)\, q(x_{t-1} \mid x_t, x_0^i), \qquad
          w_i(x_t) = q(x_0^i \mid x_t) \propto N(x_t; \sqrt{\bar\alpha_t}\, x_0^i, (1 - \bar\alpha_t) I)

(:meth:`pyrodiff.theory.mixture.IsotropicGaussianMixture.reverse` with variance 0).  :class:`EmpiricalReverse` is
this chain written as a Pyro model with the sites and call signature of
:class:`~pyrodiff.chain.reverse.DiffusionModel`, so that sampling, :func:`~pyrodiff.evaluation.bound.bound_terms` and the
report work on it unchanged.  Each step costs the whole data set (O(N) per example and step, against a
network's fixed cost), and its samples are copies of training points.

At t = 1 the posterior is a point mass (:math:`\tilde\beta_1 = 0`); the decoder is then the model's own
decoder around each training point, :math:`p(x_0 \mid x_1) = \sum_i w_i(x_1)\, p_{\rm dec}(x_0; x_0^i, \sigma_1^2)`,
with :math:`\sigma_1^2 = \tilde\beta_2` (the "small" variance's convention, docs/MATH.md): a probability
close to :math:`w_i(x_1)` for grid data scored by the discretized decoder, a density for continuous data.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution

from ..chain.decoders import Decoder, parse_decoder
from ..chain.gaussian import normal_log_prob
from ..chain.reverse import ReverseChain
from ..chain.schedule import NoiseSchedule
from .mixture import IsotropicGaussianMixture, ReverseMixture, draw_components

__all__ = ["EmpiricalReverse", "EmpiricalStep"]

#: elements of one (rows, points, *D) block of decoder log-densities
_BLOCK = 2**22


class EmpiricalReverse(ReverseChain):
    r"""The true reverse process :math:`q(x_{t-1} \mid x_t)` of the empirical distribution of ``data``.

    :param data: the training set ``(N, *D)``, N >= 1 (on the device and in the dtype the chain runs in).
    :param schedule: the noise schedule (T >= 2).
    :param decoder: the decoder around each training point at t = 1 (``"gaussian"`` or ``"discretized"``
        with ``levels``), as for :class:`~pyrodiff.chain.reverse.DiffusionModel`.
    """

    def __init__(
        self,
        data: torch.Tensor,
        schedule: NoiseSchedule,
        decoder: str | Decoder = "gaussian",
        levels: int | None = None,
    ) -> None:
        if not torch.is_tensor(data):
            raise TypeError(f"data must be a torch tensor of shape (N, *data_shape), got {type(data).__name__}")
        if data.dim() < 2:
            raise ValueError(f"data must have shape (N, *data_shape), got shape {tuple(data.shape)}")
        if data.shape[0] == 0:
            raise ValueError("the empirical reverse process needs a non-empty data set (got N = 0 examples)")
        if not data.is_floating_point():
            raise TypeError(f"data must be a floating-point tensor, got {data.dtype}")
        if not torch.isfinite(data).all():
            raise ValueError("data contains NaN or infinite values")
        decoder = parse_decoder(decoder, levels)
        decoder.check(data)
        super().__init__(schedule, decoder, tuple(data.shape[1:]))
        self.register_buffer("data", data)
        #: the empirical distribution of the data, a mixture of point masses (built once: it caches its component
        #: tables per device and dtype, which every step reuses)
        self.law = IsotropicGaussianMixture(data, variance=0.0)

    def describe(self) -> dict:
        return {"reverse": "empirical", "examples": self.data.shape[0], **super().describe()}

    def device_and_dtype(self) -> tuple[torch.device, torch.dtype]:
        return self.data.device, self.data.dtype

    def predict(self, xt: torch.Tensor, t: torch.Tensor) -> EmpiricalStep:
        r"""The mixture :math:`q(x_{t-1} \mid x_t)` for a batch of any leading shape ``t.shape``."""
        shape = t.shape
        flat_x = xt.reshape((-1,) + xt.shape[t.dim() :])
        flat_t = t.reshape(-1)
        mixture = self.law.reverse(self.schedule, flat_x, flat_t)
        return EmpiricalStep(mixture, self.decoder_variance_at_one().to(xt), shape, self.data.to(xt))

    def marginal_log_prob(self, x0: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p(x_0)` of this chain, exactly up to the prior's mismatch :math:`N(0, I)` against
        :math:`\hat q(x_T)` (which vanishes with :math:`\bar\alpha_T`): the steps are the exact reverse conditionals,
        so :math:`x_1 \sim \hat q(x_1)`, :math:`E[w_i(x_1)] = 1/N`, and
        :math:`p(x_0) = \frac1N \sum_i p_{\rm dec}(x_0; x_0^i, \sigma_1^2)`: the empirical distribution seen through the
        decoder (a kernel density estimate of bandwidth :math:`\sigma_1` for the Gaussian decoder; for grid data
        scored by the discretized decoder, the fraction of training points equal to :math:`x_0`, to within
        :math:`\Phi(-\text{half bin} / \sigma_1)`).  Shape ``(N,)`` for ``x0`` ``(N, *D)``."""
        self.check_data(x0)
        points = self.data.to(x0)
        log_w = torch.full((points.shape[0],), -math.log(points.shape[0]), dtype=x0.dtype, device=x0.device)
        variance = self.decoder_variance_at_one().to(x0)
        return _points_log_prob(x0, log_w, points, variance, self.decoder, x0.dim() - 1)

    def decoder_variance_at_one(self) -> torch.Tensor:
        r""":math:`\sigma_1^2 = \tilde\beta_2`, the decoder's variance around each training point (float64)."""
        return self.schedule.posterior_variance[1]


class EmpiricalStep(NamedTuple):
    r"""One step of :class:`EmpiricalReverse` for a batch of rows (a :class:`~pyrodiff.chain.reverse.ReverseStep`):
    the mixture :math:`q(x_{t-1} \mid x_t)` (flat over the rows), the decoder's variance :math:`\sigma_1^2` (a
    scalar tensor), the rows' leading shape and the training points ``(N, *D)``.  Its KL from a Gaussian has no closed form: :meth:`kl_from` is a one-draw Monte Carlo
    estimate, unbiased."""

    mixture: ReverseMixture
    decoder_variance: torch.Tensor
    shape: torch.Size
    points: torch.Tensor

    analytic_kl = False

    def _unflat(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.shape + x.shape[1:])

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape((-1,) + x.shape[len(self.shape) :])

    @property
    def mean(self) -> torch.Tensor:
        return self._unflat(self.mixture.mean)

    @property
    def x0(self) -> torch.Tensor:
        return self._unflat(self.mixture.x0_mean)

    def log_prob(self, value: torch.Tensor, event_dim: int) -> torch.Tensor:
        return self._unflat(self.mixture.log_prob(self._flat(value)))

    def transition(self, event_dim: int) -> TorchDistribution:
        return _StepLaw(self, event_dim)

    def kl_from(
        self, loc: torch.Tensor, variance: torch.Tensor, event_dim: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        r""":math:`\log N(y; \text{loc}, \text{variance}) - \log q(y \mid x_t)` at one draw
        :math:`y \sim N(\text{loc}, \text{variance})` (``generator``, torch's global one if None): an unbiased
        estimate of the KL."""
        y = loc + variance.sqrt() * torch.randn(loc.shape, generator=generator, dtype=loc.dtype, device=loc.device)
        return normal_log_prob(y, loc, variance, event_dim) - self.log_prob(y, event_dim)

    def draw(self, noise: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._unflat(self.mixture.sample(generator=generator, noise=self._flat(noise)))

    def decoder(self, decoder: Decoder, event_dim: int, rows=None, fill=None) -> TorchDistribution:
        return _PointsDecoder(self, decoder, event_dim)

    def decode(self, decoder: Decoder, noise: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        index = draw_components(self.mixture.log_weights, generator)
        return decoder.draw(self._unflat(self.points[index]), self.decoder_variance, noise)

    def clipped(self, chain, x_t, t) -> EmpiricalStep:
        """Its predictions are averages of training points: already in the data's range."""
        return self

    def select(self, index) -> EmpiricalStep:
        rows = torch.arange(math.prod(self.shape), device=self.decoder_variance.device).reshape(self.shape)[index]
        flat = rows.reshape(-1)
        return EmpiricalStep(self.mixture.select(flat), self.decoder_variance, rows.shape, self.points)


class _StepLaw(TorchDistribution):
    """:math:`q(x_{t-1} \\mid x_t)` of an :class:`EmpiricalStep` as a distribution (a Pyro site's law)."""

    arg_constraints: dict = {}
    support = constraints.real

    def __init__(self, step: EmpiricalStep, event_dim: int) -> None:
        self.step = step
        x = step.mixture.mean
        super().__init__(step.shape, x.shape[x.dim() - event_dim :])

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """At rows with t = 1 (masked by the program: x_0 is the decoder's) the step is a set of points; their
        log-density is left at 0."""
        step = self.step
        t = step.mixture.t
        if bool((t >= 2).all()):
            return step.log_prob(value, self.event_dim)
        out = value.new_zeros(t.shape)
        rows = torch.nonzero(t >= 2).squeeze(-1)
        out[rows] = step.mixture.select(rows).log_prob(step._flat(value)[rows])
        return step._unflat(out)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        if sample_shape:
            raise NotImplementedError("the empirical reverse step draws one value per row")
        return self.step.draw(torch.randn_like(self.step.mean))


class _PointsDecoder(TorchDistribution):
    r""":math:`\sum_i w_i(x_1)\, p_{\rm dec}(x_0; x_0^i, \sigma_1^2)`: the decoder around each training point."""

    arg_constraints: dict = {}
    support = constraints.real

    def __init__(self, step: EmpiricalStep, decoder: Decoder, event_dim: int) -> None:
        self.step, self.decoder = step, decoder
        x = step.mixture.mean
        super().__init__(step.shape, x.shape[x.dim() - event_dim :])

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        step = self.step
        log_w = step.mixture.log_weights
        lp = _points_log_prob(
            step._flat(value), log_w, step.points, step.decoder_variance, self.decoder, self.event_dim
        )
        return step._unflat(lp)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        if sample_shape:
            raise NotImplementedError("the empirical decoder draws one value per row")
        noise = torch.randn_like(self.step.mean)
        return self.step.decode(self.decoder, noise)


def _points_log_prob(
    value: torch.Tensor,
    log_weights: torch.Tensor,
    points: torch.Tensor,
    variance: torch.Tensor,
    decoder: Decoder,
    event_dim: int,
) -> torch.Tensor:
    r""":math:`\log \sum_i w_i\, p_{\rm dec}(x; x^i, \sigma^2)` for each row ``x`` of ``value`` ``(B, *D)``, with per-row
    ``log_weights`` ``(B, N)`` (or ``(N,)`` shared) over the ``points`` ``(N, *D)``, in blocks of rows so that the
    ``(rows, N, *D)`` temporary stays near :data:`_BLOCK` elements."""
    rows = max(1, _BLOCK // points.numel())
    out = []
    for start in range(0, value.shape[0], rows):
        v = value[start : start + rows].unsqueeze(1)  # (b, 1, *D)
        loc = points.expand((v.shape[0],) + points.shape)  # (b, N, *D)
        w = log_weights if log_weights.dim() == 1 else log_weights[start : start + rows]
        out.append(torch.logsumexp(w + decoder.distribution(loc, variance, event_dim).log_prob(v), -1))
    return torch.cat(out)
