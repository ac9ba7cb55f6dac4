r"""The continuous-time bound (:math:`T \to \infty`) of a variance-preserving diffusion as a Pyro program.

Variational Diffusion Models (Kingma et al. 2021, VDM, eq. 17 and appendix E) write the negative ELBO of
:math:`x` as three terms (docs/MATH.md, section 16, "Continuous time and learned schedules"):

.. math:: -\log p(x) \le \underbrace{\mathrm{KL}(q(z_1 \mid x) \,\|\, N(0, I))}_{\text{prior}}
    + \underbrace{E_{q(z_0 \mid x)}[-\log p(x \mid z_0)]}_{\text{decoder}}
    + \underbrace{\tfrac12 E_{t \sim U(0, 1),\, \epsilon \sim N(0, I)}\big[\gamma'(t)\,
      \|\epsilon - \hat\epsilon_\theta(z_t, t)\|^2\big]}_{\text{diffusion}},

:math:`z_t = \alpha_t x + \sigma_t \epsilon` with :math:`\alpha_t^2 = \sigma(-\gamma(t))`,
:math:`\sigma_t^2 = \sigma(\gamma(t))` (:mod:`pyrodiff.chain.log_snr`).  The decoder is VDM's: the discretized (or
Gaussian) decoder with mean :math:`z_0/\alpha_0` and variance :math:`\sigma_0^2/\alpha_0^2 = e^{\gamma_0}`, no network.
Prior and decoder depend on the schedule only through its endpoints; the diffusion term's expectation too
(:math:`\int_0^1 \gamma'(t) f(\gamma(t))\,dt = \int_{\gamma_0}^{\gamma_1} f(\gamma)\,d\gamma` for a network that
sees the noise level), so the interior changes only the estimator's variance.

The program (:class:`ContinuousGuide`, :class:`ContinuousDiffusionModel`), in the plate ``data``:

- ``"t"``: the time of each example, drawn by the guide with low discrepancy across the batch
  (:func:`~pyrodiff.chain.timesteps.draw_times`) and replayed into the model (a subsample site, pruned from the
  ELBO);
- ``"z_1"``: :math:`q(z_1 \mid x)` in the guide, :math:`N(0, I)` in the model: the prior term (exact under
  ``TraceMeanField_ELBO``, one draw under ``Trace_ELBO``);
- ``"eps_t"`` and ``"eps_0"``: the standard normal draws of :math:`z_t` and :math:`z_0`, with the same law in guide
  and model (their log-ratio is zero).  The model makes :math:`z_t, z_0` from them: the guide draws t and
  :math:`z_t` (reparameterised), the model scores them;
- ``"diffusion"``: a ``pyro.factor`` in the model, minus the diffusion integrand at the draw.  It is no log-ratio of
  the densities of finitely many variables: it is the limit, as the step shrinks, of the subsampled chain's
  :math:`T \cdot \mathrm{KL}(q(z_s \mid z_t, x) \,\|\, p_\theta(z_s \mid z_t))` at one drawn step;
- ``"x_0"``: the data, observed under the decoder at :math:`z_0`.

So ``Trace_ELBO()(model, guide)`` (and ``SVI``) estimate exactly the bound above, without bias, with gradients for
the network, the endpoints and the interior.  With ``interior="variance"`` (VDM section 5.3) the interior's
gradient is that of :math:`E[L_\text{diff}^2]`, whose minimiser is the interior of least estimator variance (its
mean does not depend on the interior), while the network and the endpoints follow the bound.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .. import checks
from .decoders import Decoder, parse_decoder
from .forward import SCHEDULE_KEY, check_batch
from .gaussian import expand_event
from .log_snr import LogSNRSchedule, NoiseLevelInput
from .reverse import NO_DATA_SHAPE, DiffusionModel, _SameSchedule, check_model_data
from .timesteps import draw_times

__all__ = ["ContinuousGuide", "ContinuousDiffusionModel", "INTERIOR_OBJECTIVES", "alpha_sigma"]

#: what trains a learned schedule's interior: the bound (``"bound"``) or the variance of its estimator (``"variance"``)
INTERIOR_OBJECTIVES = ("bound", "variance")


def alpha_sigma(gamma: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`\alpha = \sqrt{\sigma(-\gamma)}` and :math:`\sigma = \sqrt{\sigma(\gamma)}` (float64 in), shaped to
    broadcast over ``like`` (a batch ``(N, *D)``) and cast to its dtype."""
    event_dim = like.dim() - gamma.dim()
    alpha = torch.sigmoid(-gamma).sqrt().to(like.dtype)
    sigma = torch.sigmoid(gamma).sqrt().to(like.dtype)
    return expand_event(alpha, event_dim), expand_event(sigma, event_dim)


def _check_schedule(schedule) -> LogSNRSchedule:
    if not isinstance(schedule, LogSNRSchedule):
        raise TypeError(
            "the continuous-time bound needs a schedule defined for every t in [0, 1], a LogSNRSchedule (e.g. "
            f"LearnedSchedule() or LinearLogSNR()), got {type(schedule).__name__}"
        )
    return schedule.check()


class ContinuousGuide:
    r"""The forward process in continuous time as a Pyro guide: draws t (low discrepancy), :math:`z_1 \sim q(z_1 \mid
    x)` and the standard normal draws of :math:`z_t` and :math:`z_0` (module docstring).  Its parameters are its
    schedule's, registered with Pyro at each call (``pyro.module("schedule", ...)``) unless
    :attr:`register_with_pyro` is off (``pyrodiff train`` holds them in its own optimiser).

    :param schedule: a :class:`~pyrodiff.chain.log_snr.LogSNRSchedule`, the very object of the model's.
    """

    def __init__(self, schedule: LogSNRSchedule) -> None:
        self.schedule = _check_schedule(schedule)
        self.register_with_pyro = True

    def __call__(self, x0: torch.Tensor, subsample_steps: int | None = None, **kwargs) -> torch.Tensor:
        if x0 is None:
            raise ValueError("the guide q(z | x) needs data x0")
        if subsample_steps is not None:
            raise ValueError("the continuous-time bound draws one time per example: subsample_steps must be None")
        check_batch(x0)
        if self.register_with_pyro and self.schedule.has_parameters:
            pyro.module("schedule", self.schedule)
        N, event_dim = x0.shape[0], x0.dim() - 1
        t = draw_times(N, x0.device)
        with pyro.plate("data", N, dim=-1, device=x0.device):
            alpha_1, sigma_1 = alpha_sigma(self.schedule.endpoints()[1].expand(N), x0)
            infer = {SCHEDULE_KEY: self.schedule}
            pyro.sample("z_1", dist.Normal(alpha_1 * x0, sigma_1.expand_as(x0)).to_event(event_dim), infer=infer)
            standard = dist.Normal(torch.zeros_like(x0), torch.ones_like(x0)).to_event(event_dim)
            pyro.sample("eps_t", standard)
            pyro.sample("eps_0", standard)
        return t


class ContinuousDiffusionModel(nn.Module):
    r"""The generative side of the continuous-time bound as a Pyro model (module docstring), for a network
    :math:`\hat\epsilon_\theta(z, c)` called with the noise level :math:`c = c(\gamma_t)`
    (:class:`~pyrodiff.chain.log_snr.NoiseLevelInput`).  Called as ``model(x0)``, as :class:`ContinuousGuide` is;
    ``model(None, batch_size=n)`` and :meth:`sample` draw from :meth:`discretised` (ancestral sampling of the chain at
    the schedule's T).

    :param network: called as ``network(z, c)`` with ``z`` of shape ``(B, *D)`` and ``c`` of shape ``(B,)``
        (floating), returns the predicted noise, shape ``(B, *D)``.
    :param schedule: a :class:`~pyrodiff.chain.log_snr.LogSNRSchedule` (guide and model share the object).
    :param decoder: ``"discretized"`` (data on a grid of ``levels`` values) or ``"gaussian"``.
    :param interior: what trains a learned interior: ``"bound"`` (default) or ``"variance"`` (VDM section 5.3).
    :param noise_level: the map from :math:`\gamma` to the network's input.
    """

    def __init__(
        self,
        network: nn.Module,
        schedule: LogSNRSchedule,
        decoder: str | Decoder = "discretized",
        levels: int | None = None,
        data_shape: tuple[int, ...] | None = None,
        interior: str = "bound",
        noise_level: NoiseLevelInput = NoiseLevelInput(),
    ) -> None:
        super().__init__()
        if not isinstance(noise_level, NoiseLevelInput):
            raise TypeError(f"noise_level must be a NoiseLevelInput, got {type(noise_level).__name__}")
        self.schedule = _check_schedule(schedule)
        self.decoder = parse_decoder(decoder, levels)
        self.network = network
        declared = getattr(network, "data_shape", None)
        if declared is not None and data_shape is not None and tuple(declared) != tuple(data_shape):
            raise ValueError(f"data_shape {tuple(data_shape)} does not fit the network's data shape {tuple(declared)}")
        self.data_shape = tuple(declared if data_shape is None else data_shape) if (declared or data_shape) else None
        self.interior = checks.one_of("interior", interior, INTERIOR_OBJECTIVES)
        self.noise_level = noise_level
        #: run the network under autocast to this dtype (None: full precision), as :class:`DiffusionModel` does
        self.autocast_dtype: torch.dtype | None = None
        #: register the network with Pyro's param store at each call (``pyro.infer.SVI``); ``pyrodiff train`` turns
        #: it off
        self.register_with_pyro = True

    @property
    def levels(self) -> int | None:
        return self.decoder.levels

    def describe(self) -> dict:
        return {
            "time": "continuous",
            "prediction": "epsilon",
            "decoder": self.decoder.name,
            "levels": self.decoder.levels,
            "interior": self.interior,
            "schedule": dict(self.schedule.description),
        }

    def device_and_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.network.parameters(), None)
        return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.get_default_dtype())

    def with_network(self, network: nn.Module, schedule: LogSNRSchedule | None = None) -> ContinuousDiffusionModel:
        """The same model with another network (e.g. the weights' average) and schedule, if given."""
        return ContinuousDiffusionModel(
            network,
            self.schedule if schedule is None else schedule,
            self.decoder,
            None,
            self.data_shape,
            self.interior,
            self.noise_level,
        )

    def discretised(self, num_steps: int | None = None) -> DiffusionModel:
        r"""The chain of this network at ``num_steps`` = K steps (the schedule's T by default): the
        :class:`~pyrodiff.chain.reverse.DiffusionModel` on :meth:`LogSNRSchedule.discretised(K)
        <pyrodiff.chain.log_snr.LogSNRSchedule.discretised>`, the "small" variance, the network told each step's
        noise level, and VDM's decoder at t = 1.  Its bound (``bound_terms``) has this model's prior and decoder terms
        and a diffusion part that decreases toward this model's as K grows (Kingma et al. 2021, section 4.1); it is
        what the samplers run."""
        K = self.schedule.num_steps if num_steps is None else num_steps
        return DiffusionModel(
            self.network,
            self.schedule.discretised(K),
            "epsilon",
            "small",
            self.decoder,
            None,
            self.data_shape,
            noise_level=self.noise_level,
        )

    def eps_hat(self, z: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        r""":math:`\hat\epsilon_\theta(z, c(\gamma))` for a batch ``z`` ``(N, *D)`` and its :math:`\gamma` ``(N,)``."""
        with torch.autocast(
            z.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=bool(self.autocast_dtype)
        ):
            out = self.network(z, self.noise_level(gamma).to(z.dtype)).to(z.dtype)
        if out.shape != z.shape:
            raise ValueError(f"the network returned shape {tuple(out.shape)} for input shape {tuple(z.shape)}")
        return out

    def diffusion_loss(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        r""":math:`\tfrac12 \gamma'(t)\,\|\epsilon - \hat\epsilon_\theta(z_t, t)\|^2` per example (shape ``(N,)``),
        :math:`z_t = \alpha_t x_0 + \sigma_t \epsilon`: the diffusion term's integrand at the draw ``(t, eps)``.
        With ``interior="variance"`` the gradient reaching the schedule's interior is scaled per example by
        :math:`2 L_\text{diff}`, which makes it the gradient of :math:`L_\text{diff}^2` (VDM section 5.3)."""
        at = self.schedule.at(t)
        alpha, sigma = alpha_sigma(at.gamma, x0)
        z = alpha * x0 + sigma * eps
        sum_event = tuple(range(1, x0.dim()))
        loss = 0.5 * at.rate.to(x0.dtype) * (eps - self.eps_hat(z, at.gamma)).pow(2).sum(sum_event)
        if self.interior == "variance" and torch.is_grad_enabled():
            scale = 2 * loss.detach().to(torch.float64)
            for interior in (at.interior, at.interior_rate):
                if interior.requires_grad:  # a constant s'(t) (a linear interior) has no gradient to scale
                    interior.register_hook(lambda grad: grad * scale)
        return loss

    def decoder_law(self, z0: torch.Tensor) -> dist.TorchDistribution:
        r"""VDM's decoder :math:`p(x \mid z_0)`: mean :math:`z_0/\alpha_0`, variance :math:`e^{\gamma_0}`."""
        gamma_0 = self.schedule.endpoints()[0]
        alpha_0, _ = alpha_sigma(gamma_0.expand(z0.shape[0]), z0)
        variance = expand_event(gamma_0.exp().expand(z0.shape[0]).to(z0.dtype), z0.dim() - 1)
        return self.decoder.distribution(z0 / alpha_0, variance, z0.dim() - 1)

    def check_data(self, x0: torch.Tensor) -> None:
        """Refuse what is not a batch of data of the model's shape; under Pyro's validation also data off the
        decoder's grid (as :meth:`DiffusionModel.check_data`)."""
        check_model_data(x0, self.data_shape, self.decoder)

    def forward(
        self, x0: torch.Tensor | None = None, subsample_steps: int | None = None, *, batch_size: int | None = None
    ) -> torch.Tensor:
        if x0 is None:
            if self.data_shape is None:
                raise ValueError(NO_DATA_SHAPE)
            return self.discretised()(None, batch_size=batch_size)
        if subsample_steps is not None:
            raise ValueError("the continuous-time bound draws one time per example: subsample_steps must be None")
        self.check_data(x0)
        if self.register_with_pyro:
            pyro.module("network", self.network)
        N, event_dim = x0.shape[0], x0.dim() - 1
        with _SameSchedule(self.schedule):
            t = draw_times(N, x0.device)
        with _SameSchedule(self.schedule), pyro.plate("data", N, dim=-1, device=x0.device):
            standard = dist.Normal(torch.zeros_like(x0), torch.ones_like(x0)).to_event(event_dim)
            pyro.sample("z_1", standard)
            eps_t = pyro.sample("eps_t", standard)
            pyro.factor("diffusion", -self.diffusion_loss(x0, t, eps_t))
            eps_0 = pyro.sample("eps_0", standard)
            alpha_0, sigma_0 = alpha_sigma(self.schedule.endpoints()[0].expand(N), x0)
            pyro.sample("x_0", self.decoder_law(alpha_0 * x0 + sigma_0 * eps_0), obs=x0)
        if self.data_shape is None:
            self.data_shape = tuple(x0.shape[1:])
        return x0

    def sample(self, num_samples: int, **kwargs) -> torch.Tensor:
        """``num_samples`` samples by ancestral sampling of :meth:`discretised` (its ``sample``'s arguments)."""
        return self.discretised().sample(num_samples, **kwargs)
