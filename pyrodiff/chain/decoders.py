r"""Decoders :math:`p_\theta(x_0 \mid x_1)`: the last step of the reverse chain, which scores the data.

- ``gaussian``: :math:`N(\mu_\theta(x_1, 1), \sigma_1^2 I)`, a density for continuous data.
- ``discretized``: Ho et al. (2020), eq. 13: data on a grid of ``levels`` values in [-1, 1]
  (256 for 8-bit images); each level owns a bin of width :math:`2/(\text{levels} - 1)`, open-ended
  at -1 and 1, and gets the Gaussian mass of its bin.  pyrodiff uses the exact normal CDF
  (``torch.special.log_ndtr``) where improved-diffusion uses a tanh approximation of it.

Each is parsed once from its name into a :class:`Decoder` (:func:`parse_decoder`), which also knows the
data's scale: the grid it checks, how a reconstruction :math:`\hat x_0` is clipped, and the units in which
a distortion is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pyro.distributions import Normal, constraints
from pyro.distributions.torch_distribution import TorchDistribution

from .. import checks

__all__ = ["Decoder", "parse_decoder", "DiscretizedGaussian", "check_levels_grid"]


def log_normal_bin_mass(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    r""":math:`\log(\Phi(u) - \Phi(l))` for standardised bin edges ``l < u`` (either may be infinite),
    computed in the tail where it is accurate: for :math:`l > 0` it uses the mirror
    :math:`\Phi(-l) - \Phi(-u)`, then :math:`\log\Phi(b) + \log(1 - e^{\log\Phi(a) - \log\Phi(b)})`."""
    flip = lower > 0
    a = torch.where(flip, -upper, lower)
    b = torch.where(flip, -lower, upper)
    log_b = torch.special.log_ndtr(b)
    log_a = torch.special.log_ndtr(a)
    return log_b + torch.log1p(-torch.exp(log_a - log_b).clamp(max=1 - 1e-12))


def check_levels_grid(x: torch.Tensor, levels: int) -> None:
    """Refuse data outside [-1, 1] or off the grid of ``levels`` equally spaced values."""
    if levels < 2:
        raise ValueError(f"the discretized decoder needs at least 2 levels, got {levels}")
    lo, hi = x.min().item(), x.max().item()
    if lo < -1 - 1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"data must lie in [-1, 1] for the discretized decoder; found values in [{lo:.4g}, {hi:.4g}]")
    index = (x + 1) * (levels - 1) / 2
    off = (index - index.round()).abs().max().item()
    if off > 1e-3:
        raise ValueError(
            f"data is off the grid of {levels} levels in [-1, 1] (largest distance {off:.3g} bins); "
            "scale integer data v in 0..levels-1 as 2 v / (levels - 1) - 1"
        )


def round_to_grid(x: torch.Tensor, levels: int) -> torch.Tensor:
    """``x`` clamped to [-1, 1] and rounded to the nearest of the ``levels`` grid values (the bin it falls in)."""
    step = 2 / (levels - 1)
    return ((x.clamp(-1, 1) + 1) / step).round() * step - 1


class DiscretizedGaussian(TorchDistribution):
    r"""A Gaussian :math:`N(\text{loc}, \text{scale}^2)` integrated over the bins of a grid of ``levels``
    values in [-1, 1]: :math:`P(x) = \Phi\big(\tfrac{x^+ - \mu}{\sigma}\big) - \Phi\big(\tfrac{x^- - \mu}{\sigma}\big)`
    with :math:`x^\pm = x \pm 1/(\text{levels} - 1)`, and :math:`x^- = -\infty` at -1, :math:`x^+ = \infty` at 1.
    Univariate; use ``.to_event`` for images."""

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    has_rsample = False

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, levels: int, validate_args=None) -> None:
        self.loc, self.scale = torch.broadcast_tensors(torch.as_tensor(loc), torch.as_tensor(scale))
        self.levels = int(levels)
        super().__init__(self.loc.shape, torch.Size(), validate_args=validate_args)

    @constraints.dependent_property
    def support(self):
        return constraints.real

    @property
    def half_width(self) -> float:
        return 1.0 / (self.levels - 1)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return DiscretizedGaussian(self.loc.expand(batch_shape), self.scale.expand(batch_shape), self.levels)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        h = self.half_width
        # masked_fill takes the infinities as kernel arguments: no tensor is made on the host and copied over
        upper = ((value + h - self.loc) / self.scale).masked_fill(value > 1 - h, float("inf"))
        lower = ((value - h - self.loc) / self.scale).masked_fill(value < -1 + h, float("-inf"))
        return log_normal_bin_mass(lower, upper)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        """A Gaussian draw rounded to the nearest level (the bin it falls in), clamped to [-1, 1]."""
        shape = self._extended_shape(sample_shape)
        noise = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return round_to_grid(self.loc.expand(shape) + self.scale.expand(shape) * noise, self.levels)

    @property
    def mean(self) -> torch.Tensor:
        return self.loc


class Decoder:
    r""":math:`p_\theta(x_0 \mid x_1)` as a choice of the model (subclasses are frozen dataclasses: equal when of
    one kind with equal fields, hashable): its distribution given the reverse mean and
    variance at :math:`x_1`, and what it implies about the data's scale."""

    name: str = ""
    levels: int | None = None

    def distribution(self, loc: torch.Tensor, variance: torch.Tensor, event_dim: int) -> TorchDistribution:
        """The decoder with mean ``loc`` and variance ``variance`` (broadcast to ``loc``), ``event_dim`` data dims."""
        raise NotImplementedError

    def draw(self, loc: torch.Tensor, variance: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """A draw of :math:`x_0` given standard normal ``noise`` of the data's shape."""
        return loc + variance.sqrt() * noise

    def check(self, x0: torch.Tensor) -> None:
        """Refuse data this decoder cannot score (reads the values: a device synchronisation on a GPU)."""

    def reconstruction(self, x0_hat: torch.Tensor) -> torch.Tensor:
        r"""A prediction :math:`\hat x_0` as a reconstruction of the data (clipped to the data's range)."""
        return x0_hat

    @property
    def units_per_data_unit(self) -> float:
        """Factor from the data's scale to the units distortions are reported in (:attr:`distortion_units`)."""
        return 1.0

    @property
    def distortion_units(self) -> str:
        return "data units"

    @property
    def is_8bit_scale(self) -> bool:
        """Whether bits/dim is comparable with published 8-bit figures (discretized, 256 levels)."""
        return False

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class GaussianDecoder(Decoder):
    r""":math:`N(\mu_\theta(x_1, 1), \sigma_1^2 I)`: a density for continuous data (its :math:`L_0` may be negative)."""

    name = "gaussian"

    def distribution(self, loc, variance, event_dim):
        return Normal(loc, variance.sqrt().expand_as(loc)).to_event(event_dim)

    def describe(self) -> str:
        return "continuous Gaussian decoder (a density on the data's scale)"


@dataclass(frozen=True)
class DiscretizedDecoder(Decoder):
    r"""Data on a grid of ``levels`` values in [-1, 1], each scored by the Gaussian mass of its bin."""

    name = "discretized"
    levels: int

    def __post_init__(self) -> None:
        if not checks.is_integer(self.levels) or self.levels < 2:
            raise ValueError(
                "the discretized decoder needs an integer number of levels >= 2 (256 for 8-bit images), "
                f"got {self.levels!r}"
            )

    def distribution(self, loc, variance, event_dim):
        return DiscretizedGaussian(loc, variance.sqrt().expand_as(loc), self.levels).to_event(event_dim)

    def draw(self, loc, variance, noise):
        return round_to_grid(super().draw(loc, variance, noise), self.levels)

    def check(self, x0):
        check_levels_grid(x0, self.levels)

    def reconstruction(self, x0_hat):
        return x0_hat.clamp(-1, 1)

    @property
    def units_per_data_unit(self) -> float:
        return (self.levels - 1) / 2

    @property
    def distortion_units(self) -> str:
        return f"grey levels 0..{self.levels - 1}"

    @property
    def is_8bit_scale(self) -> bool:
        return self.levels == 256

    def describe(self) -> str:
        return f"discretized decoder, {self.levels} levels" + (" (8-bit scale)" if self.is_8bit_scale else "")


DECODERS = ("gaussian", "discretized")


def parse_decoder(decoder: str | Decoder, levels: int | None = None) -> Decoder:
    """The :class:`Decoder` named ``decoder`` (``"gaussian"``, or ``"discretized"`` with ``levels``)."""
    if isinstance(decoder, Decoder):
        return decoder
    checks.one_of("decoder", decoder, DECODERS)
    if decoder == "gaussian":
        if levels is not None:
            raise ValueError("levels belong to the discretized decoder; the gaussian decoder takes none")
        return GaussianDecoder()
    if levels is None:
        raise ValueError("the discretized decoder needs levels >= 2 (256 for 8-bit images)")
    return DiscretizedDecoder(levels)
