r"""The reverse (denoising) chain :math:`p_\theta(x_{0:T})` as a Pyro model.

:math:`p(x_T) = N(0, I)`; for t >= 2, :math:`p_\theta(x_{t-1} \mid x_t) = N(\mu_\theta(x_t, t), \sigma_t^2 I)`;
the decoder :math:`p_\theta(x_0 \mid x_1)` scores the data (:mod:`pyrodiff.chain.decoders`).  The variance
:math:`\sigma_t^2` is fixed, "small" :math:`\tilde\beta_t` or "large" :math:`\beta_t` (MATH.md), or "learned" as
Nichol & Dhariwal (2021, eq. 15) learn it, per dimension, interpolating in the log domain between the two:

.. math:: \log \sigma_\theta^2(x_t, t) = f \log \beta_t + (1 - f) \log \tilde\beta_t, \qquad f = (v_\theta(x_t, t) + 1) / 2,

with :math:`v_\theta` the second half of the network's output channels and :math:`\tilde\beta_1` replaced by
:math:`\tilde\beta_2` (improved-diffusion's ``learned_range``).  At t = 1 the range is
:math:`[\tilde\beta_2, \beta_1]`: on continuous data the decoder's best variance is near :math:`\beta_1`, above
the fixed choices' :math:`\tilde\beta_2`.  The network's output is turned into :math:`\hat x_0` by what it predicts (:math:`\epsilon`, :math:`x_0` or
:math:`v`; :mod:`pyrodiff.chain.parameterization`) and :math:`\mu_\theta = \tilde\mu_t(\hat x_0, x_t)`, the posterior
mean at the prediction (for :math:`\epsilon` this is Ho et al. 2020, eq. 11).

The model has the sites of :class:`~pyrodiff.chain.forward.DiffusionGuide` plus the observed ``"x_0"``.
The full chain is scored with one batched network call over all T timesteps; called without data it
runs the ancestral sampler of the chain (:func:`sample_chain`), T sequential calls.  The single reverse transition
(:func:`reverse_step`) and that sampler live here, with the chain; :mod:`pyrodiff.samplers` builds its
samplers on them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.poutine.messenger import Messenger
from torch import nn
from tqdm.auto import tqdm

from .. import checks
from ..cuda_graph import GraphedStep
from .decoders import Decoder, parse_decoder
from .forward import DDPM, ETA_ZERO_HAS_NO_BOUND, SCHEDULE_KEY, InferenceFamily, check_batch, q_marginal
from .gaussian import at_timesteps, expand_event, normal_kl, normal_log_prob
from .log_snr import NoiseLevelInput
from .parameterization import DDIMVariance, ReverseVariance, Target, parse_target, parse_variance
from .path import PathDistribution, path_timesteps
from .schedule import Schedule
from .timesteps import draw_timesteps, step_scale

__all__ = ["ReverseChain", "ReverseStep", "DiffusionModel", "GaussianStep", "PTheta", "reverse_step", "sample_chain"]


#: why a chain that does not know its data shape cannot sample
NO_DATA_SHAPE = (
    "the model does not know the shape of one example, so it cannot sample: give DiffusionModel(..., data_shape=D) "
    "(a network with a data_shape attribute, such as MLPDenoiser, gives it), or score one batch of data first"
)


def check_model_data(x0: torch.Tensor, data_shape: tuple[int, ...] | None, decoder: Decoder) -> None:
    """Refuse what is not a batch of data of shape ``(N, *data_shape)`` (any shape if None), and, while Pyro's
    validation is enabled, data the decoder cannot score (off its grid): what every model's ``check_data`` checks."""
    check_batch(x0)
    if data_shape is not None and tuple(x0.shape[1:]) != data_shape:
        raise ValueError(f"data of shape {tuple(x0.shape[1:])} does not fit the model's data shape {data_shape}")
    if dist.is_validation_enabled():
        decoder.check(x0)


class ReverseStep(Protocol):
    r"""The law of :math:`x_{t-1}` given :math:`x_t` for a batch of rows, as a reverse chain gives it
    (:meth:`ReverseChain.predict`); at rows with t = 1 the variable is :math:`x_0` and the law is the
    decoder's.  :class:`GaussianStep` is the Gaussian step of a network; the exact reverse process of a
    data set (:class:`~pyrodiff.theory.empirical.EmpiricalReverse`) gives a mixture.  What every consumer
    (the Pyro program, :func:`~pyrodiff.evaluation.bound.bound_terms`, the samplers) uses:"""

    #: :math:`E[x_{t-1} \mid x_t]` (at t = 1 the decoder's mean)
    mean: torch.Tensor
    #: the implied prediction :math:`\hat x_0(x_t)` (progressive decoding)
    x0: torch.Tensor
    #: whether :meth:`kl_from` is exact (else a one-draw Monte Carlo estimate)
    analytic_kl: bool

    def log_prob(self, value: torch.Tensor, event_dim: int) -> torch.Tensor:
        r""":math:`\log p(x_{t-1} = \text{value} \mid x_t)` for rows with t >= 2."""

    def kl_from(
        self, loc: torch.Tensor, variance: torch.Tensor, event_dim: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        r""":math:`\mathrm{KL}(N(\text{loc}, \text{variance}\, I) \,\|\, p(x_{t-1} \mid x_t))` for rows with t >= 2
        (``generator`` draws the Monte Carlo estimate where it is not :attr:`analytic_kl`)."""

    def draw(self, noise: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw of :math:`x_{t-1}` (rows with t >= 2) from standard normal ``noise`` of the data's shape."""

    def transition(self, event_dim: int) -> TorchDistribution:
        r""":math:`p(x_{t-1} \mid x_t)` as a distribution (rows with t >= 2; the others must stay finite)."""

    def decoder(
        self, decoder: Decoder, event_dim: int, rows: torch.Tensor | None = None, fill: torch.Tensor | None = None
    ) -> TorchDistribution:
        r"""The decoder :math:`p(x_0 \mid x_1)` (rows with t = 1).  Given the boolean ``rows`` where it is used (a
        caller masks the others), the other rows' mean may be set to ``fill`` (the data), so that no infinite
        log-density or NaN gradient arises where the result is masked."""

    def decode(self, decoder: Decoder, noise: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw of :math:`x_0` from :meth:`decoder` given standard normal ``noise``."""

    def select(self, index) -> ReverseStep:
        """The rows ``index`` (any index of the leading dim)."""

    def clipped(self, chain: ReverseChain, x_t: torch.Tensor, t: torch.Tensor) -> ReverseStep:
        r"""The step of ``chain`` taken from :math:`\hat x_0` clamped to [-1, 1] (the references' ``clip_denoised``)."""


class GaussianStep(NamedTuple):
    r"""What one network call gives for :math:`x_t`: the Gaussian reverse step :math:`N(\text{mean}, \text{variance})`
    and the implied :math:`\hat x_0`.  ``variance`` broadcasts against ``mean``: shape ``t.shape + (1, ...)``
    for fixed variances, the data's shape for learned ones.  A :class:`ReverseStep`."""

    mean: torch.Tensor
    variance: torch.Tensor
    x0: torch.Tensor

    analytic_kl = True

    def log_prob(self, value: torch.Tensor, event_dim: int) -> torch.Tensor:
        return normal_log_prob(value, self.mean, self.variance, event_dim)

    def kl_from(
        self, loc: torch.Tensor, variance: torch.Tensor, event_dim: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return normal_kl(loc, variance, self.mean, self.variance, event_dim)

    def draw(self, noise: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean + self.variance.sqrt() * noise

    def transition(self, event_dim: int) -> TorchDistribution:
        return dist.Normal(self.mean, self.variance.sqrt()).to_event(event_dim)

    def decoder(self, decoder, event_dim, rows=None, fill=None):
        loc = self.mean if rows is None else torch.where(expand_event(rows, event_dim), self.mean, fill)
        return decoder.distribution(loc, self.variance, event_dim)

    def decode(self, decoder: Decoder, noise: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return decoder.draw(self.mean, self.variance, noise)

    def select(self, index) -> GaussianStep:
        return GaussianStep(self.mean[index], self.variance[index], self.x0[index])

    def clipped(self, chain: ReverseChain, x_t: torch.Tensor, t: torch.Tensor) -> GaussianStep:
        r""":math:`\tilde\mu_t(\mathrm{clamp}(\hat x_0, -1, 1), x_t)` (the chain's posterior mean) with the same
        variance."""
        x0 = self.x0.clamp(-1, 1)
        return GaussianStep(chain.posterior(x0, x_t, t)[0], self.variance, x0)


class ReverseChain(nn.Module):
    r"""A reverse chain as a Pyro model, :math:`p(x_T)\prod_{t \ge 2} p(x_{t-1} \mid x_t)\, p(x_0 \mid x_1)` with
    :math:`p(x_T) = N(0, I)`: the program (its sites, the call signature, sampling, the data checks) shared by
    every reverse chain.  A subclass says what the law of :math:`x_{t-1}` given :math:`x_t` is
    (:meth:`predict`, a :class:`ReverseStep`): :class:`DiffusionModel` from a network,
    :class:`~pyrodiff.theory.empirical.EmpiricalReverse` exactly, from a data set.

    Called as ``model(x0, subsample_steps=None)``, as the guide is.  ``model(None, batch_size=n)``
    draws n samples ancestrally (also through ``pyro.infer.Predictive``).
    """

    #: the inference family whose posterior :math:`q(x_{t-1} \mid x_t, x_0)` the bound compares the steps with
    #: (:meth:`posterior`): DDPM's forward chain unless the chain is DDIM's (:meth:`DiffusionModel.ddim`)
    family: InferenceFamily = DDPM

    def __init__(self, schedule: Schedule, decoder: Decoder, data_shape: tuple[int, ...] | None) -> None:
        super().__init__()
        if not isinstance(schedule, Schedule):
            raise TypeError(
                f"schedule must be a Schedule (e.g. NoiseSchedule.linear(1000)), got {type(schedule).__name__}"
            )
        if schedule.num_steps < 2:
            raise ValueError("a diffusion model needs T >= 2 steps")
        #: the noise schedule, a submodule (its state moves with the model); the guide must be built on this object
        self.schedule = schedule.check()
        self.decoder = decoder
        self.data_shape = None if data_shape is None else tuple(data_shape)

    @property
    def levels(self) -> int | None:
        """The discretized decoder's number of levels (None for the Gaussian decoder)."""
        return self.decoder.levels

    def describe(self) -> dict:
        """The model's choices as plain data (recorded in reports and their comparisons)."""
        return {
            "decoder": self.decoder.name,
            "levels": self.decoder.levels,
            "schedule": dict(self.schedule.description),
        }

    def device_and_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where samples are drawn."""
        raise NotImplementedError

    def predict(self, xt: torch.Tensor, t: torch.Tensor) -> ReverseStep:
        r"""The law of :math:`x_{t-1}` given :math:`x_t` for a batch of any leading shape ``t.shape``."""
        raise NotImplementedError

    def posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Mean and variance of the chain's inference posterior :math:`q(x_{t-1} \mid x_t, x_0)` (:attr:`family`)."""
        return self.family.posterior(self.schedule, x0, xt, t)

    def _register(self) -> None:
        """Register parameters with Pyro's param store, if the chain has any."""

    # ------------------------------------------------------------------ the program
    def forward(
        self, x0: torch.Tensor | None = None, subsample_steps: int | None = None, *, batch_size: int | None = None
    ) -> torch.Tensor:
        self._register()
        with _SameSchedule(self.schedule):
            if x0 is None:
                if subsample_steps is not None:
                    raise ValueError("subsample_steps scores data; sampling (x0=None) always runs the full chain")
                if self.data_shape is None:
                    raise ValueError(NO_DATA_SHAPE)
                if batch_size is not None:
                    checks.positive_int("batch_size", batch_size)
                return self._full_chain(None, batch_size or 1, self.data_shape)
            self.check_data(x0)
            if subsample_steps is None:
                out = self._full_chain(x0, x0.shape[0], tuple(x0.shape[1:]))
            else:
                out = self._subsampled(x0, subsample_steps)
        if self.data_shape is None:  # learnt only from a batch that was scored without error
            self.data_shape = tuple(x0.shape[1:])
        return out

    def _full_chain(self, x0: torch.Tensor | None, N: int, data_shape: tuple[int, ...]) -> torch.Tensor:
        device, dtype = (x0.device, x0.dtype) if x0 is not None else self.device_and_dtype()
        chain = PTheta(self, N, data_shape, device, dtype)
        with pyro.plate("data", N, dim=-1, device=device):
            with pyro.plate("time", self.schedule.num_steps, dim=-2, device=device):
                path = pyro.sample("x_{1:T}", chain)
            return pyro.sample("x_0", chain.decoder_law(path), obs=x0)

    def _subsampled(self, x0: torch.Tensor, subsample_steps: int) -> torch.Tensor:
        T, N, event_dim = self.schedule.num_steps, x0.shape[0], x0.dim() - 1
        t = draw_timesteps(N, subsample_steps, T, x0.device)
        with pyro.plate("data", N, dim=-1, device=x0.device):
            pyro.sample("x_T", dist.Normal(torch.zeros_like(x0), torch.ones_like(x0)).to_event(event_dim))
            x0 = x0.expand(t.shape + x0.shape[1:])
            with (
                pyro.plate("steps", subsample_steps, dim=-2, device=x0.device),
                pyro.poutine.scale(scale=step_scale(t, T)),
            ):
                loc, var = q_marginal(self.schedule, x0, t)
                xt = pyro.sample("x_t", dist.Normal(loc, var.sqrt()).to_event(event_dim))
                step = self.predict(xt, t)
                pyro.sample("x_{t-1}", step.transition(event_dim).mask(t >= 2))
                pyro.sample("x_0", step.decoder(self.decoder, event_dim, t == 1, x0).mask(t == 1), obs=x0)
        return xt

    def check_data(self, x0: torch.Tensor) -> None:
        """Refuse what is not a batch of data of the model's shape, and, while Pyro's validation is enabled
        (the default; the value checks read the data, a device synchronisation on a GPU, like Pyro's checks
        of distribution arguments), non-finite data or data off the decoder's grid.  ``pyrodiff train``
        checks the whole training set once and trains with validation off.  Nothing is changed.  A chain without
        a density (DDIM with eta = 0) scores nothing."""
        if not self.family.has_density:
            raise ValueError(ETA_ZERO_HAS_NO_BOUND)
        check_model_data(x0, self.data_shape, self.decoder)

    def sample(
        self,
        num_samples: int,
        *,
        generator: torch.Generator | None = None,
        last: str = "mean",
        progress: bool = False,
    ) -> torch.Tensor:
        """``num_samples`` samples of :math:`x_0` by ancestral sampling (:func:`sample_chain`; by default the last
        step is the decoder's mean, ``last="sample"`` draws from it)."""
        return sample_chain(self, num_samples, generator=generator, last=last, progress=progress)


class DiffusionModel(ReverseChain):
    r"""The reverse chain of a network, :math:`p(x_T)\prod_{t \ge 2} p_\theta(x_{t-1} \mid x_t)\, p_\theta(x_0 \mid x_1)`
    with Gaussian steps :math:`N(\mu_\theta(x_t, t), \sigma_t^2 I)`.

    :param network: any module called as ``network(x_t, t)`` with ``x_t`` of shape ``(B, *D)`` and
        ``t`` a LongTensor of shape ``(B,)`` holding math timesteps 1..T; returns shape ``(B, *D)``, or
        for learned variances ``(B, 2 D_0, D_1, ...)``: the prediction, then :math:`v_\theta`, along dim 1.
    :param schedule: the noise schedule (T >= 2).
    :param prediction: what the network predicts: ``"epsilon"``, ``"x0"`` or ``"v"`` (or a
        :class:`~pyrodiff.chain.parameterization.Target`).
    :param variance: ``"small"`` (:math:`\tilde\beta_t`), ``"large"`` (:math:`\beta_t`) or ``"learned"``
        (train it with the bound, ``objective="elbo"``), or a :class:`~pyrodiff.chain.parameterization.ReverseVariance`.
    :param decoder: ``"gaussian"`` (continuous data) or ``"discretized"`` (data on a grid of
        ``levels`` values in [-1, 1]), or a :class:`~pyrodiff.chain.decoders.Decoder`.
    :param levels: number of levels of the discretized decoder (256 for 8-bit images).
    :param data_shape: shape ``D`` of one example, needed to sample; by default the network's ``data_shape``
        attribute where it has one (:class:`~pyrodiff.networks.MLPDenoiser`: ``(dim,)``), else learnt from the first
        batch scored without error.  A ``data_shape`` other than the network's is refused.
    :param noise_level: ``None`` (default): the network is called with the math timestep t.  A
        :class:`~pyrodiff.chain.log_snr.NoiseLevelInput`: it is called with the step's noise level
        :math:`c(\gamma_t)`, :math:`\gamma_t = -\lambda_t` (as a continuous-time model is, so that the same network
        serves the chain at every T and a learned schedule's steps keep their meaning), and the decoder at t = 1 is
        VDM's (Kingma et al. 2021, eq. 31): mean :math:`x_1 / \sqrt{\bar\alpha_1}` and variance
        :math:`(1 - \bar\alpha_1)/\bar\alpha_1 = 1/\mathrm{SNR}_1`, the network unused there, so that the chain's
        decoder term is the continuous-time bound's at every T (docs/MATH.md, section 16, "Continuous time and
        learned schedules").
    :param family: the inference family (:class:`~pyrodiff.chain.forward.InferenceFamily`) whose posterior at
        :math:`\hat x_0` is the mean, :math:`\mu_\theta = E_{q}[x_{t-1} \mid x_t, \hat x_0]`: DDPM's (default) or,
        through :meth:`ddim`, DDIM's.

    Called as ``model(x0, subsample_steps=None)``, as the guide is.  ``model(None, batch_size=n)``
    draws n samples ancestrally (also through ``pyro.infer.Predictive``).
    """

    def __init__(
        self,
        network: nn.Module,
        schedule: Schedule,
        prediction: str | Target = "epsilon",
        variance: str | ReverseVariance = "small",
        decoder: str | Decoder = "gaussian",
        levels: int | None = None,
        data_shape: tuple[int, ...] | None = None,
        family: InferenceFamily = DDPM,
        noise_level: NoiseLevelInput | None = None,
    ) -> None:
        prediction, variance = parse_target(prediction), parse_variance(variance)
        if noise_level is not None and not isinstance(noise_level, NoiseLevelInput):
            raise TypeError(f"noise_level must be a NoiseLevelInput or None, got {type(noise_level).__name__}")
        if not isinstance(family, InferenceFamily):
            raise TypeError(f"family must be an InferenceFamily, got {type(family).__name__}")
        declared = getattr(network, "data_shape", None)
        if declared is not None and data_shape is not None and tuple(declared) != tuple(data_shape):
            raise ValueError(f"data_shape {tuple(data_shape)} does not fit the network's data shape {tuple(declared)}")
        super().__init__(schedule, parse_decoder(decoder, levels), declared if data_shape is None else data_shape)
        self.prediction = prediction
        self.variance = variance
        self.family = family
        self.network = network
        #: how the network is told the step: None, the math timestep t; a :class:`NoiseLevelInput`, the noise level
        #: :math:`c(-\lambda_t)` of the step (and then the decoder at t = 1 is VDM's, without the network)
        self.noise_level = noise_level
        #: if set (e.g. ``torch.bfloat16``), the network runs under autocast to this dtype; its output
        #: is cast back to the data's dtype, so every log-density stays in full precision
        self.autocast_dtype: torch.dtype | None = None
        #: register the network's parameters in Pyro's param store at each call (``pyro.module``), as
        #: ``pyro.infer.SVI`` with a ``pyro.optim`` optimizer needs; a torch optimizer over
        #: ``Trace_ELBO()(model, guide)`` does not, and ``pyrodiff train`` turns it off (it costs a
        #: few milliseconds per step)
        self.register_with_pyro = True

    def describe(self) -> dict:
        eta = {} if self.family.is_markov else {"eta": self.family.eta}
        return {"prediction": self.prediction.name, "variance": self.variance.name, **eta, **super().describe()}

    def device_and_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where samples are drawn: the device and dtype of the network's parameters."""
        p = next(self.network.parameters(), None)
        return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.get_default_dtype())

    def with_network(self, network: nn.Module, schedule: Schedule | None = None) -> DiffusionModel:
        """The same model with another network (e.g. the exponential moving average of the weights), and another
        schedule if given (e.g. the average of a schedule's parameters; its guide must then be built on it)."""
        return self._with(network, self.schedule if schedule is None else schedule)

    def with_variance(self, variance: str | ReverseVariance) -> DiffusionModel:
        """The same model with another reverse variance (``"small"``, ``"large"``, ``"learned"`` or a
        :class:`~pyrodiff.chain.parameterization.ReverseVariance`, e.g. Analytic-DPM's table); the network, schedule,
        prediction, decoder, data shape and inference family are kept."""
        return self._with(self.network, self.schedule, parse_variance(variance))

    def _with(self, network: nn.Module, schedule: Schedule, variance=None, family=None) -> DiffusionModel:
        """A model of the same parts but these (the run-time options, ``autocast_dtype`` and ``register_with_pyro``,
        back to their defaults)."""
        return DiffusionModel(
            network,
            schedule,
            self.prediction,
            variance or self.variance,
            self.decoder,
            None,
            self.data_shape,
            family or self.family,
            self.noise_level,
        )

    def respaced(self, steps: int | Sequence[int] | torch.Tensor) -> DiffusionModel:
        r"""The same network on a shorter chain: the K-step diffusion that visits only the math timesteps
        :math:`t_1 < \dots < t_K` (``steps`` = K gives K evenly spaced ones, first and last included), with the
        betas of :meth:`Schedule.respace` (improved-diffusion's respacing; Nichol & Dhariwal 2021, section 4).
        Its step i is the original step :math:`t_i`: the network always sees the original timestep, and the fixed
        or learned variances follow the respaced schedule.  ``bound_terms``, the samplers and the Pyro program work
        on it unchanged: its bound is the exact bound of the K-step sampler.  K >= 2."""
        if checks.is_integer(steps):
            timesteps = self.schedule.evenly_spaced_timesteps(steps)
        else:
            timesteps = self.schedule.validated_timesteps(steps)
        if self.noise_level is not None:  # the network is told the noise level, which respacing keeps
            return self._with(self.network, self.schedule.respace(timesteps))
        return self._with(_RespacedNetwork(self.network, timesteps), self.schedule.respace(timesteps))

    def ddim(self, eta: float) -> DiffusionModel:
        r"""DDIM's generative process (Song et al. 2021, eq. 12) for this network, on this (possibly respaced)
        chain: :math:`p_\theta(x_{t-1} \mid x_t) = q_\sigma(x_{t-1} \mid x_t, \hat x_0(x_t))`, the family's
        posterior at the prediction, with :math:`\sigma_t^2 = \eta^2\tilde\beta_t`
        (:class:`~pyrodiff.chain.parameterization.DDIMVariance`; the decoder at t = 1 is this model's).  Its guide is
        ``DiffusionGuide(schedule, eta=eta)``, and ``bound_terms`` gives its exact bound for eta in (0, 1]; ancestral
        sampling of it is :func:`pyrodiff.samplers.ddim`.  With eta = 0 the steps are deterministic: the model samples
        but has no bound (scoring data is refused).  eta = 1 is this network's DDPM chain with the "small" variance."""
        family = InferenceFamily(eta)
        base = self.variance.base if isinstance(self.variance, DDIMVariance) else self.variance
        return self._with(self.network, self.schedule, DDIMVariance(family, base), family)

    def _register(self) -> None:
        if self.register_with_pyro:
            pyro.module("network", self.network)

    # ------------------------------------------------------------------ transitions
    def predict(self, xt: torch.Tensor, t: torch.Tensor) -> GaussianStep:
        r"""One network call on a batch of any leading shape ``t.shape``: :math:`\mu_\theta(x_t, t)`,
        :math:`\sigma_t^2` and :math:`\hat x_0`."""
        flat_x = xt.reshape((-1,) + xt.shape[t.dim() :])
        c = self.schedule.coefficients(xt.device, xt.dtype)
        step = t.reshape(-1) if self.noise_level is None else self.noise_level(-c.log_snr[t.reshape(-1) - 1])
        out = self._network_output(flat_x, step)
        out, v = out.chunk(2, dim=1) if self.variance.learned else (out, None)
        event_dim = xt.dim() - t.dim()
        abar = at_timesteps(c.alphas_cumprod, t, event_dim)
        x0_hat = self.prediction.to_x0(out.reshape(xt.shape), xt, abar)
        if self.noise_level is not None:  # VDM's decoder at t = 1: the latent rescaled, not the network
            x0_hat = torch.where(expand_event(t == 1, event_dim), xt / abar.sqrt(), x0_hat)
        mean, _ = self.posterior(x0_hat, xt, t)
        variance = self.variance.variance(self.schedule, t, event_dim, xt, None if v is None else v.reshape(xt.shape))
        if self.noise_level is not None:  # (1 - abar_1)/abar_1 = 1/SNR_1, without the cancellation of 1 - abar_1
            inverse_snr = at_timesteps(c.log_snr, t, event_dim).neg().exp()
            variance = torch.where(expand_event(t == 1, event_dim), inverse_snr, variance)
        return GaussianStep(mean, variance, x0_hat)

    def predicted_noise(self, xt: torch.Tensor, t: torch.Tensor, abar: torch.Tensor | None = None) -> torch.Tensor:
        r"""The noise :math:`\hat\epsilon_\theta(x_t, t)` that one network call implies (whatever it predicts:
        ``prediction.to_eps``), for a batch of any leading shape ``t.shape``.  An integer ``t`` holds math timesteps
        1..T (the network is given t, or the step's noise level with ``noise_level``; :math:`\bar\alpha_t` is the
        schedule's); a real ``t`` is given to the network as it is, with ``abar`` (broadcast against ``xt``) its
        :math:`\bar\alpha`: the continuous extension of :mod:`pyrodiff.chain.probability_flow` passes real inputs."""
        flat_x = xt.reshape((-1,) + xt.shape[t.dim() :])
        step = t.reshape(-1)
        if not t.is_floating_point():
            c = self.schedule.coefficients(xt.device, xt.dtype)
            step = step if self.noise_level is None else self.noise_level(-c.log_snr[step - 1])
            abar = at_timesteps(c.alphas_cumprod, t, xt.dim() - t.dim())
        elif abar is None:
            raise ValueError("predicted_noise at real times t needs their abar")
        out = self._network_output(flat_x, step)
        out = out.chunk(2, dim=1)[0] if self.variance.learned else out
        return self.prediction.to_eps(out.reshape(xt.shape), xt, abar)

    def _network_output(self, flat_x: torch.Tensor, flat_t: torch.Tensor) -> torch.Tensor:
        try:
            with torch.autocast(
                flat_x.device.type,
                dtype=self.autocast_dtype or torch.bfloat16,
                enabled=self.autocast_dtype is not None,
            ):
                out = self.network(flat_x, flat_t).to(flat_x.dtype)
        except RuntimeError as e:
            p = next(self.network.parameters(), None)
            if p is not None and p.dtype != flat_x.dtype and self.autocast_dtype is None:
                raise TypeError(
                    f"data of dtype {flat_x.dtype} does not match the network's {p.dtype}: convert one to the other"
                ) from e
            if p is not None and p.device != flat_x.device:
                raise ValueError(
                    f"data on {flat_x.device} but the network is on {p.device}: move one to the other"
                ) from e
            raise ValueError(f"data of shape {tuple(flat_x.shape[1:])} does not fit the network: {e}") from e
        channels = self.variance.output_channels(flat_x.shape[1])
        expected = (flat_x.shape[0], channels) + flat_x.shape[2:]
        if out.shape != expected:
            raise ValueError(
                f"the network returned shape {tuple(out.shape)} for input shape {tuple(flat_x.shape)}; it must "
                + (
                    "return twice the channels of x_t (learned variances)"
                    if self.variance.learned
                    else "return the shape of x_t"
                )
            )
        return out


class _RespacedNetwork(nn.Module):
    """A network seen from a respaced chain: step i (1..K) is the original math timestep ``timesteps[i - 1]``."""

    def __init__(self, network: nn.Module, timesteps: torch.Tensor) -> None:
        super().__init__()
        self.network = network
        p = next(network.parameters(), None)
        self.register_buffer("timesteps", timesteps.to(p.device if p is not None else "cpu"))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.network(x, self.timesteps[t - 1])


class PTheta(PathDistribution):
    r"""A reverse chain's law :math:`p(x_{1:T})` of the path (batch shape ``(T, N)``, the data's event shape).

    ``log_prob`` row k < T is :math:`\log p(x_k \mid x_{k+1})`, row T is :math:`\log N(x_T; 0, I)`.
    The steps along a path (:meth:`ReverseChain.predict`, one batched network call for a
    :class:`DiffusionModel`) are computed once and kept for that path, so that the decoder (the step at
    :math:`x_1`), ``log_prob`` and the analytic KL to the posterior-order guide (``TraceMeanField_ELBO``,
    :mod:`pyrodiff.chain.kl`) share them.  ``sample`` is the ancestral sampler.
    """

    has_rsample = False

    def __init__(self, model: ReverseChain, num_examples: int, data_shape, device, dtype) -> None:
        self.model = model
        self.device, self.dtype = torch.device(device), dtype
        self._path: torch.Tensor | None = None
        self._steps: ReverseStep | None = None
        self._sampled: tuple[torch.Tensor, ReverseStep] | None = None
        super().__init__(torch.Size((model.schedule.num_steps, num_examples)), torch.Size(data_shape))

    def evaluated_path(self) -> torch.Tensor:
        """The path the model was last evaluated on."""
        if self._path is None:
            raise ValueError("the KL of the reverse chain is taken along a path: evaluate the model on one first")
        return self._path

    def steps(self, path: torch.Tensor) -> ReverseStep:
        r"""Row k - 1 is the step from :math:`x_k`: the law of :math:`x_{k-1}` given :math:`x_k`."""
        if path is not self._path:
            if path.shape != self.shape():
                raise ValueError(f"a path must have shape {tuple(self.shape())}, got {tuple(path.shape)}")
            self._path, self._steps = path, self.model.predict(path, path_timesteps(self.batch_shape, self.device))
        return self._steps

    def decoder_law(self, path: torch.Tensor) -> TorchDistribution:
        r"""The decoder :math:`p(x_0 \mid x_1)` at the first row of ``path``."""
        if self._sampled is not None and path is self._sampled[0]:
            return self._sampled[1].decoder(self.model.decoder, self.event_dim)
        return self.steps(path).select(0).decoder(self.model.decoder, self.event_dim)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        following = self.steps(value).select(slice(1, None))  # the laws of x_1 .. x_{T-1}
        zero = torch.zeros((), device=value.device, dtype=value.dtype)
        prior = normal_log_prob(value[-1:], zero, zero + 1, self.event_dim)
        return torch.cat([following.log_prob(value[:-1], self.event_dim), prior])

    def kl_from(self, loc: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
        r"""Row k < T: :math:`\mathrm{KL}(N(\text{loc}_k, \text{variance}_k I) \,\|\, p(x_k \mid x_{k+1}))` along the
        evaluated path; row T: the KL to :math:`N(0, I)`.  Raises ``NotImplementedError`` where the steps have no
        closed-form KL (Pyro's ``TraceMeanField_ELBO`` then falls back to the log-density ratio)."""
        following = self.steps(self.evaluated_path()).select(slice(1, None))
        if not following.analytic_kl:
            raise NotImplementedError("the reverse steps of this chain have no closed-form KL")
        zero = torch.zeros((), device=loc.device, dtype=loc.dtype)
        prior = normal_kl(loc[-1:], variance[-1:], zero, zero + 1, self.event_dim)
        return torch.cat([following.kl_from(loc[:-1], variance[:-1], self.event_dim), prior])

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        """A path :math:`x_{1:T}` of the ancestral sampler (:func:`sample_chain`); the model
        then draws :math:`x_0` from the decoder at :math:`x_1`."""
        if sample_shape:
            raise NotImplementedError(
                "ancestral sampling is not vectorised over particles; use Predictive(parallel=False)"
            )
        T, N = self.batch_shape
        x_T = torch.randn((N,) + self.event_shape, device=self.device, dtype=self.dtype)
        _, path = sample_chain(self.model, x_T, return_path=True, last="none")
        at_one = self.model.predict(path[0], torch.ones(N, device=self.device, dtype=torch.long))
        self._sampled = (path, at_one)  # the decoder at x_1 (log_prob recomputes the rest)
        return path


class _SameSchedule(Messenger):
    """Refuses a guide built on another schedule object than the model's, even one with equal tables (a schedule
    with parameters must be one object, so that both sides see the same parameters and gradients reach them from
    both): the guide's sites carry its schedule in their ``infer`` dict, which ``poutine.replay`` hands to the
    model's sites."""

    def __init__(self, schedule: Schedule) -> None:
        super().__init__()
        self.schedule = schedule

    def _postprocess_message(self, msg) -> None:
        theirs = (msg.get("infer") or {}).get(SCHEDULE_KEY)
        if theirs is not None and theirs is not self.schedule:
            raise ValueError(
                "the guide was built on another noise schedule object than the model's: build the guide on the "
                "model's own, DiffusionGuide(model.schedule)"
            )


# ---------------------------------------------------------------------- sampling the chain
#: what :func:`sample_chain` returns after x_1: a draw of the decoder, its mean, or x_1 itself
LAST_STEPS = ("sample", "mean", "none")


@torch.no_grad()
def reverse_step(
    model: ReverseChain,
    x_t: torch.Tensor,
    t: int | torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    clip: bool = False,
) -> torch.Tensor:
    r"""One draw from :math:`p(x_{t-1} \mid x_t)` (the chain's :class:`ReverseStep`): for a network,
    :math:`\mu_\theta(x_t, t) + \sigma_t z` for t >= 2, and at t = 1 a draw of :math:`x_0` from the decoder.

    :param x_t: a batch ``(N, *D)``.
    :param t: the math timestep of every example (an int in 1..T) or of each (a LongTensor ``(N,)``).
    :param generator: the generator of the standard normal draw ``z`` (not of ``z`` if ``noise`` is given; a
        mixture step also draws its component with it).
    :param noise: the standard normal draw ``z`` itself, shaped like ``x_t``.
    :param clip: clamp :math:`\hat x_0` to [-1, 1] and take the step from it (:meth:`ReverseStep.clipped`, the
        references' ``clip_denoised``: the clipped sampler is not the model whose bound pyrodiff scores).
    """
    T, N = model.schedule.num_steps, x_t.shape[0]
    if checks.is_integer(t):
        steps = torch.full((N,), checks.int_in("t", t, 1, T, hi_name="T"), device=x_t.device, dtype=torch.long)
    elif torch.is_tensor(t):
        steps = t
    else:
        raise checks.CheckTypeError.refuse("t", f"an integer in 1..T = 1..{T} or a tensor of shape ({N},)", t)
    if steps.shape != (N,):
        raise ValueError(f"t must be an int or a tensor of shape ({N},), got shape {tuple(steps.shape)}")
    if noise is None:
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
    elif noise.shape != x_t.shape:
        raise ValueError(f"noise must have the shape of x_t {tuple(x_t.shape)}, got {tuple(noise.shape)}")
    step = _step(model, x_t, steps, clip)
    if checks.is_integer(t):  # no device-side selection (nor a host read) when all examples share t
        return step.decode(model.decoder, noise, generator) if t == 1 else step.draw(noise, generator)
    at_one = (steps == 1).reshape((N,) + (1,) * (x_t.dim() - 1))
    return torch.where(at_one, step.decode(model.decoder, noise, generator), step.draw(noise, generator))


@torch.no_grad()
def sample_chain(
    chain: ReverseChain,
    x_T: torch.Tensor | int,
    *,
    generator: torch.Generator | None = None,
    last: str = "mean",
    clip: bool = False,
    return_path: bool = False,
    progress: bool = False,
    graph: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Ancestral sampling of ``chain`` (Ho et al. 2020, Algorithm 2, for any reverse chain): from :math:`x_T`, a
    draw of every :math:`x_{t-1} \sim p(x_{t-1} \mid x_t)` down to :math:`x_1`, then the decoder.  A chain whose
    steps are deterministic (DDIM with eta = 0, ``family.has_density`` false) takes each step's mean and draws
    no noise.

    :param x_T: the starting noise ``(N, *D)`` (finite), or a number N of samples: then :math:`x_T \sim N(0, I)` is
        drawn with ``generator`` on the chain's device (the chain needs a ``data_shape``).
    :param generator: the generator of every draw (on the device of ``x_T``).
    :param last: ``"mean"`` (default) returns the decoder's mean :math:`\mu_\theta(x_1, 1)` (Algorithm 2's noiseless
        last step, as improved-diffusion and diffusers do); ``"sample"`` draws :math:`x_0` from the decoder, so that
        the samples follow exactly the law :math:`p_\theta(x_0)` whose bound pyrodiff reports; ``"none"`` stops at
        :math:`x_1`.
    :param clip: clamp each :math:`\hat x_0` to [-1, 1] (:func:`reverse_step`).
    :param return_path: also return the path :math:`x_{1:T}`, shape ``(T, N, *D)``, row k - 1 holding :math:`x_k`.
    :param progress: show a progress bar over the steps.
    :param graph: capture one reverse step as a CUDA graph and replay it at every step (a :class:`DiffusionModel`
        on a CUDA device): one launch per step instead of one per kernel, the same draws from ``generator`` (drawn
        outside the graph) and the same samples.
    """
    checks.one_of("last", last, LAST_STEPS)
    x_T = _start(chain, x_T, generator)
    move = functools.partial(_transition, chain, clip)
    move = _graphed(chain, x_T, move) if graph else functools.partial(move, generator=generator)
    x, path, noisy = x_T, [x_T] if return_path else None, chain.family.has_density
    for t in tqdm(
        range(chain.schedule.num_steps, 1, -1), desc="sample", disable=not progress, mininterval=1.0, leave=False
    ):
        z = [torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)] if noisy else []
        x = move(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long), *z)
        if path is not None:
            path.append(x)
    x = _last_step(chain, x, last, clip, generator)
    return (x, torch.stack(path[::-1])) if return_path else x


def _step(chain: ReverseChain, x_t: torch.Tensor, t: torch.Tensor, clip: bool) -> ReverseStep:
    step = chain.predict(x_t, t)
    return step.clipped(chain, x_t, t) if clip else step


def _transition(
    chain: ReverseChain,
    clip: bool,
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r""":math:`x_{t-1} \sim p(x_{t-1} \mid x_t)` for t >= 2 (a LongTensor) from the standard normal ``noise``, or the
    step's mean without it (a deterministic chain): :func:`reverse_step`'s draw without its checks and its decoder
    rows, the step :func:`sample_chain` repeats (and captures as a graph)."""
    step = _step(chain, x_t, t, clip)
    return step.mean if noise is None else step.draw(noise, generator)


def _start(chain: ReverseChain, x_T: torch.Tensor | int, generator: torch.Generator | None) -> torch.Tensor:
    """The starting noise: ``x_T`` checked (its shape, and that it is finite), or ``x_T`` draws of N(0, I)."""
    if not torch.is_tensor(x_T):
        checks.positive_int("the number of samples", x_T)
        if chain.data_shape is None:
            raise ValueError(NO_DATA_SHAPE)
        device, dtype = chain.device_and_dtype()
        return torch.randn((x_T,) + chain.data_shape, generator=generator, device=device, dtype=dtype)
    if chain.data_shape is not None and tuple(x_T.shape[1:]) != chain.data_shape:
        raise ValueError(f"x_T must have shape (N, *{chain.data_shape}), got {tuple(x_T.shape)}")
    if not torch.isfinite(x_T).all():  # one host read, before the steps
        raise ValueError("x_T holds NaN or infinite values: every sample would be NaN; start from finite noise")
    return x_T


def _graphed(chain: ReverseChain, x_T: torch.Tensor, move: Callable[..., torch.Tensor]) -> GraphedStep:
    """``move`` as a :class:`~pyrodiff.cuda_graph.GraphedStep`, after checking that it can be one."""
    if x_T.device.type != "cuda":
        raise ValueError(f"graph=True captures a step as a CUDA graph: x_T must be on a CUDA device, not {x_T.device}")
    if not isinstance(chain, DiffusionModel):
        raise ValueError(
            f"graph=True needs a DiffusionModel (its steps draw only the noise given), not {type(chain).__name__}"
        )
    return GraphedStep(move)


def _last_step(
    chain: ReverseChain, x_1: torch.Tensor, last: str, clip: bool, generator: torch.Generator | None
) -> torch.Tensor:
    if last == "sample":
        return reverse_step(chain, x_1, 1, generator=generator, clip=clip)
    if last == "mean":
        return _step(chain, x_1, torch.ones(x_1.shape[0], device=x_1.device, dtype=torch.long), clip).mean
    return x_1
