r"""The reverse (denoising) chain :math:`p_\theta(x_{0:T})` as a Pyro model.

:math:`p(x_T) = N(0, I)`; for t >= 2, :math:`p_\theta(x_{t-1} \mid x_t) = N(\mu_\theta(x_t, t), \sigma_t^2 I)`;
the decoder :math:`p_\theta(x_0 \mid x_1)` scores the data (:mod:`pyrodiff.decoders`).  The variance
:math:`\sigma_t^2` is fixed, "small" :math:`\tilde\beta_t` or "large" :math:`\beta_t` (MATH.md), or "learned" as
Nichol & Dhariwal (2021, eq. 15) learn it, per dimension, interpolating in the log domain between the two:

.. math:: \log \sigma_\theta^2(x_t, t) = f \log \beta_t + (1 - f) \log \tilde\beta_t, \qquad f = (v_\theta(x_t, t) + 1) / 2,

with :math:`v_\theta` the second half of the network's output channels and :math:`\tilde\beta_1` replaced by
:math:`\tilde\beta_2` (improved-diffusion's ``learned_range``).  At t = 1 the range is
:math:`[\tilde\beta_2, \beta_1]`: on continuous data the decoder's best variance is near :math:`\beta_1`, above
the fixed choices' :math:`\tilde\beta_2`.  The network's output is turned into :math:`\mu_\theta` by one of three
parameterisations (Ho et al. 2020, eq. 11; Salimans & Ho 2022 for v):

- ``epsilon``: :math:`\mu_\theta = \frac{1}{\sqrt{\alpha_t}}\big(x_t - \frac{\beta_t}{\sqrt{1-\bar\alpha_t}}\epsilon_\theta\big)`
- ``x0``: :math:`\mu_\theta = \tilde\mu_t(\hat x_0, x_t)` with :math:`\hat x_0` the output
- ``v``: :math:`\hat x_0 = \sqrt{\bar\alpha_t} x_t - \sqrt{1 - \bar\alpha_t} v_\theta`, then as ``x0``.

The model has the sites of :class:`~pyrodiff.forward.DiffusionGuide` plus the observed ``"x_0"``.
The full chain is scored with one batched network call over all T timesteps; called without data it
runs DDPM's ancestral sampler (Ho et al. 2020, Algorithm 2), T sequential calls.
"""

from __future__ import annotations

from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution
from torch import nn
from torch.distributions import register_kl

from .decoders import DiscretizedGaussian, check_levels_grid
from .forward import PosteriorChain, _expand_chain, path_timesteps, q_marginal, q_posterior
from .gaussian import at_timesteps, expand_event, normal_kl, normal_log_prob
from .schedule import NoiseSchedule
from .subsample import draw_timesteps, step_scale

__all__ = ["DiffusionModel", "ReverseChain", "Prediction"]

PREDICTIONS = ("epsilon", "x0", "v")
VARIANCES = ("small", "large", "learned")
DECODERS = ("gaussian", "discretized")


class Prediction(NamedTuple):
    r"""What one network call gives for :math:`x_t`: the reverse step :math:`N(\text{mean}, \text{variance})`
    and the implied :math:`\hat x_0`.  ``variance`` broadcasts against ``mean``: shape ``t.shape + (1, ...)``
    for fixed variances, the data's shape for learned ones."""

    mean: torch.Tensor
    variance: torch.Tensor
    x0: torch.Tensor


class DiffusionModel(nn.Module):
    r"""The reverse chain as a Pyro model, :math:`p(x_T)\prod_{t \ge 2} p_\theta(x_{t-1} \mid x_t)\, p_\theta(x_0 \mid x_1)`.

    :param network: any module called as ``network(x_t, t)`` with ``x_t`` of shape ``(B, *D)`` and
        ``t`` a LongTensor of shape ``(B,)`` holding math timesteps 1..T; returns shape ``(B, *D)``, or
        for learned variances ``(B, 2 D_0, D_1, ...)``: the prediction, then :math:`v_\theta`, along dim 1.
    :param schedule: the noise schedule (T >= 2).
    :param prediction: what the network predicts: ``"epsilon"``, ``"x0"`` or ``"v"``.
    :param variance: ``"small"`` (:math:`\tilde\beta_t`), ``"large"`` (:math:`\beta_t`) or ``"learned"``
        (see the module docstring; train it with the bound, ``objective="elbo"``).
    :param decoder: ``"gaussian"`` (continuous data) or ``"discretized"`` (data on a grid of
        ``levels`` values in [-1, 1]).
    :param levels: number of levels of the discretized decoder (256 for 8-bit images).
    :param data_shape: shape ``D`` of one example; learnt from the first batch if omitted, needed to sample.

    Called as ``model(x0, subsample_steps=None)``, as the guide is.  ``model(None, batch_size=n)``
    draws n samples ancestrally (also through ``pyro.infer.Predictive``).
    """

    def __init__(
        self,
        network: nn.Module,
        schedule: NoiseSchedule,
        prediction: str = "epsilon",
        variance: str = "small",
        decoder: str = "gaussian",
        levels: int | None = None,
        data_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if variance not in VARIANCES:
            raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        if decoder == "discretized" and (levels is None or levels < 2):
            raise ValueError("the discretized decoder needs levels >= 2 (256 for 8-bit images)")
        if schedule.num_steps < 2:
            raise ValueError("a diffusion model needs T >= 2 steps")
        self.network = network
        self.schedule = schedule
        self.prediction = prediction
        self.variance = variance
        self.decoder = decoder
        self.levels = levels
        self.data_shape = None if data_shape is None else tuple(data_shape)
        #: if set (e.g. ``torch.bfloat16``), the network runs under autocast to this dtype; its output
        #: is cast back to the data's dtype, so every log-density stays in full precision
        self.autocast_dtype: torch.dtype | None = None
        #: register the network's parameters in Pyro's param store at each call (``pyro.module``), as
        #: ``pyro.infer.SVI`` with a ``pyro.optim`` optimizer needs; a torch optimizer over
        #: ``Trace_ELBO()(model, guide)`` does not, and ``pyrodiff train`` turns it off (it costs a
        #: few milliseconds per step)
        self.register_with_pyro = True

    def with_network(self, network: nn.Module) -> DiffusionModel:
        """The same model with another network (e.g. the exponential moving average of the weights)."""
        return DiffusionModel(
            network, self.schedule, self.prediction, self.variance, self.decoder, self.levels, self.data_shape
        )

    # ------------------------------------------------------------------ transitions
    def predict(self, xt: torch.Tensor, t: torch.Tensor) -> Prediction:
        r"""One network call on a batch of any leading shape ``t.shape``: :math:`\mu_\theta(x_t, t)`,
        :math:`\sigma_t^2` and :math:`\hat x_0`."""
        batch = t.shape
        flat_x = xt.reshape((-1,) + xt.shape[t.dim() :])
        flat_t = t.reshape(-1)
        try:
            with torch.autocast(
                xt.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=self.autocast_dtype is not None
            ):
                out = self.network(flat_x, flat_t).to(xt.dtype)
        except RuntimeError as e:
            raise ValueError(f"data of shape {tuple(flat_x.shape[1:])} does not fit the network: {e}") from e
        learned = self.variance == "learned"
        expected = (flat_x.shape[0], 2 * flat_x.shape[1]) + flat_x.shape[2:] if learned else flat_x.shape
        if out.shape != expected:
            raise ValueError(
                f"the network returned shape {tuple(out.shape)} for input shape {tuple(flat_x.shape)}; it must "
                + ("return twice the channels of x_t (learned variances)" if learned else "return the shape of x_t")
            )
        out, v = out.chunk(2, dim=1) if learned else (out, None)
        out = out.reshape(xt.shape)
        c = self.schedule.coefficients(xt.device, xt.dtype)
        event_dim = xt.dim() - len(batch)
        variance = self._reverse_variance(c, t, event_dim, None if v is None else v.reshape(xt.shape))
        abar = at_timesteps(c.alphas_cumprod, t, event_dim)
        if self.prediction == "epsilon":
            x0_hat = (xt - (1 - abar).sqrt() * out) / abar.sqrt()
            beta = at_timesteps(c.betas, t, event_dim)
            mean = (xt - beta / (1 - abar).sqrt() * out) / at_timesteps(c.alphas, t, event_dim).sqrt()
            return Prediction(mean, variance, x0_hat)
        x0_hat = out if self.prediction == "x0" else abar.sqrt() * xt - (1 - abar).sqrt() * out
        mean, _ = q_posterior(self.schedule, x0_hat, xt, t)
        return Prediction(mean, variance, x0_hat)

    def _reverse_variance(self, c, t: torch.Tensor, event_dim: int, v: torch.Tensor | None) -> torch.Tensor:
        r""":math:`\sigma_t^2`: the fixed table at ``t``, or for learned variances
        :math:`\exp(f \log \beta_t + (1 - f) \log \tilde\beta_t)` with :math:`f = (v + 1) / 2`."""
        if v is None:
            table = c.reverse_variance_small if self.variance == "small" else c.reverse_variance_large
            return at_timesteps(table, t, event_dim)
        f = (v + 1) / 2
        log_small = at_timesteps(c.reverse_variance_small, t, event_dim).log()
        return torch.exp(f * at_timesteps(c.betas, t, event_dim).log() + (1 - f) * log_small)

    def decoder_distribution(self, loc: torch.Tensor, variance: torch.Tensor, event_dim: int):
        r""":math:`p_\theta(x_0 \mid x_1)` with mean ``loc`` = :math:`\mu_\theta(x_1, 1)` and variance :math:`\sigma_1^2`."""
        scale = variance.sqrt().expand_as(loc)
        if self.decoder == "gaussian":
            return dist.Normal(loc, scale).to_event(event_dim)
        return DiscretizedGaussian(loc, scale, self.levels).to_event(event_dim)

    # ------------------------------------------------------------------ the program
    def forward(
        self, x0: torch.Tensor | None = None, subsample_steps: int | None = None, *, batch_size: int | None = None
    ) -> torch.Tensor:
        if self.register_with_pyro:
            pyro.module("network", self.network)
        if x0 is None:
            if subsample_steps is not None:
                raise ValueError("subsample_steps scores data; sampling (x0=None) always runs the full chain")
            return self._full_chain(None, batch_size or 1)
        self.check_data(x0)
        if subsample_steps is None:
            return self._full_chain(x0, x0.shape[0])
        return self._subsampled(x0, subsample_steps)

    def _full_chain(self, x0: torch.Tensor | None, N: int) -> torch.Tensor:
        if x0 is None and self.data_shape is None:
            raise ValueError("to sample, give the DiffusionModel a data_shape (or score one batch of data first)")
        device, dtype = (x0.device, x0.dtype) if x0 is not None else _network_device_dtype(self.network)
        chain = ReverseChain(self, N, self.data_shape, device, dtype)
        with pyro.plate("data", N, dim=-1):
            with pyro.plate("time", self.schedule.num_steps, dim=-2):
                path = pyro.sample("x_{1:T}", chain)
            loc, var = chain.decoder_params(path)
            return pyro.sample("x_0", self.decoder_distribution(loc, var, len(self.data_shape)), obs=x0)

    def _subsampled(self, x0: torch.Tensor, subsample_steps: int) -> torch.Tensor:
        T, N, event_dim = self.schedule.num_steps, x0.shape[0], x0.dim() - 1
        t = draw_timesteps(N, subsample_steps, T, x0.device)
        with pyro.plate("data", N, dim=-1):
            pyro.sample("x_T", dist.Normal(torch.zeros_like(x0), torch.ones_like(x0)).to_event(event_dim))
            x0 = x0.expand(t.shape + x0.shape[1:])
            with pyro.plate("steps", subsample_steps, dim=-2), pyro.poutine.scale(scale=step_scale(t, T)):
                loc, var = q_marginal(self.schedule, x0, t)
                xt = pyro.sample("x_t", dist.Normal(loc, var.sqrt()).to_event(event_dim))
                mean, var, _ = self.predict(xt, t)
                is_decoder = t == 1
                step_var = torch.where(expand_event(is_decoder, event_dim), 1.0, var)
                pyro.sample("x_{t-1}", dist.Normal(mean, step_var.sqrt()).to_event(event_dim).mask(~is_decoder))
                # rows with t >= 2 are masked out of the decoder; their mean is set to the data so
                # that no infinite log-density (and NaN gradient) can arise there
                decoder_loc = torch.where(expand_event(is_decoder, event_dim), mean, x0)
                decoder = self.decoder_distribution(decoder_loc, var, event_dim).mask(is_decoder)
                pyro.sample("x_0", decoder, obs=x0)
        return xt

    def check_data(self, x0: torch.Tensor) -> None:
        """Refuse data of the wrong shape, non-finite data, or data off the decoder's grid.  The checks of
        the values read the data (a device synchronisation on a GPU), so like Pyro's checks of
        distribution arguments they run only while Pyro's validation is enabled (the default);
        ``pyrodiff train`` checks the whole training set once and trains with validation off."""
        if not torch.is_tensor(x0) or x0.dim() < 2:
            raise ValueError("x0 must be a tensor of shape (N, *data_shape)")
        if self.data_shape is None:
            self.data_shape = tuple(x0.shape[1:])
        elif tuple(x0.shape[1:]) != self.data_shape:
            raise ValueError(
                f"data of shape {tuple(x0.shape[1:])} does not fit the model's data shape {self.data_shape}"
            )
        if not dist.is_validation_enabled():
            return
        if not torch.isfinite(x0).all():
            raise ValueError("data contains NaN or infinite values")
        if self.decoder == "discretized":
            check_levels_grid(x0, self.levels)

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """``num_samples`` draws of :math:`x_0` by ancestral sampling (Algorithm 2)."""
        return self(None, batch_size=num_samples)


class ReverseChain(TorchDistribution):
    r"""The reverse chain's law of the path :math:`x_{1:T}` (batch shape ``(T, N)``, the data's event shape).

    ``log_prob`` row k < T is :math:`\log p_\theta(x_k \mid x_{k+1})`, row T is :math:`\log N(x_T; 0, I)`.
    The network's means and variances along a path are computed in one batched call and kept for that
    path, so that the decoder (which needs :math:`\mu_\theta(x_1, 1)`), ``log_prob`` and the analytic KL to the
    posterior-order guide (``TraceMeanField_ELBO``) share them.  ``sample`` is DDPM's ancestral sampler.
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, model: DiffusionModel, num_examples: int, data_shape, device, dtype) -> None:
        self.model = model
        self.device, self.dtype = torch.device(device), dtype
        self._path: torch.Tensor | None = None
        self._predictions: Prediction | None = None
        super().__init__(torch.Size((model.schedule.num_steps, num_examples)), torch.Size(data_shape))

    @constraints.dependent_property
    def support(self):
        return constraints.independent(constraints.real, self.event_dim)

    def expand(self, batch_shape, _instance=None):
        return _expand_chain(self, batch_shape)

    def predictions(self, path: torch.Tensor) -> Prediction:
        r"""Row k - 1 holds :math:`\mu_\theta(x_k, k)` and :math:`\sigma_k^2`, the law of :math:`x_{k-1}` given :math:`x_k`."""
        if path is not self._path:
            if path.shape != self.shape():
                raise ValueError(f"a path must have shape {tuple(self.shape())}, got {tuple(path.shape)}")
            self._path, self._predictions = (
                path,
                self.model.predict(path, path_timesteps(self.batch_shape, self.device)),
            )
        return self._predictions

    def parent_params(self, path: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of each row's reverse conditional: rows k < T from x_{k+1}, row T the prior."""
        mean, var, _ = self.predictions(path)
        return torch.cat([mean[1:], torch.zeros_like(mean[:1])]), torch.cat([var[1:], torch.ones_like(var[:1])])

    def decoder_params(self, path: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`\mu_\theta(x_1, 1)` and :math:`\sigma_1^2` along ``path``."""
        mean, var, _ = self.predictions(path)
        return mean[0], var[0]

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        loc, var = self.parent_params(value)
        return normal_log_prob(value, loc, var, self.event_dim)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        r"""Algorithm 2 of Ho et al. (2020): :math:`x_T \sim N(0, I)`, then
        :math:`x_{t-1} = \mu_\theta(x_t, t) + \sigma_t z` for t = T..2."""
        if sample_shape:
            raise NotImplementedError(
                "ancestral sampling is not vectorised over particles; use Predictive(parallel=False)"
            )
        T, N = self.batch_shape
        x = torch.randn((N,) + self.event_shape, device=self.device, dtype=self.dtype)
        path, predictions = [x], []
        for step in range(T, 0, -1):
            t = torch.full((N,), step, device=self.device, dtype=torch.long)
            mean, var, x0_hat = self.model.predict(x, t)
            predictions.append(Prediction(mean, var, x0_hat))
            if step > 1:
                x = mean + var.sqrt() * torch.randn_like(x)
                path.append(x)
        self._path = torch.stack(path[::-1])
        self._predictions = Prediction(*(torch.stack(p[::-1]) for p in zip(*predictions, strict=True)))
        return self._path


def _network_device_dtype(network: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(network.parameters(), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.get_default_dtype())


@register_kl(PosteriorChain, ReverseChain)
def _kl_posterior_chain_reverse_chain(q: PosteriorChain, p: ReverseChain) -> torch.Tensor:
    r"""Per-timestep analytic KLs along the path the model was evaluated on (the guide's sample, replayed):
    row k < T is :math:`\mathrm{KL}(q(x_k \mid x_{k+1}, x_0) \,\|\, p_\theta(x_k \mid x_{k+1}))`, row T is
    :math:`\mathrm{KL}(q(x_T \mid x_0) \,\|\, N(0, I))`.  Their sum is the Rao-Blackwellised estimate of the
    rate that ``TraceMeanField_ELBO`` uses; it is unbiased because the guide is in posterior order."""
    if p._path is None:
        raise ValueError("the KL of the reverse chain is taken along a path: evaluate the model on one first")
    loc_q, var_q = q.conditionals(p._path)
    loc_p, var_p = p.parent_params(p._path)
    return normal_kl(loc_q, var_q, loc_p, var_p, p.event_dim)
