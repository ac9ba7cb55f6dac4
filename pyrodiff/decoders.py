r"""Decoders :math:`p_\theta(x_0 \mid x_1)`: the last step of the reverse chain, which scores the data.

- ``gaussian``: :math:`N(\mu_\theta(x_1, 1), \sigma_1^2 I)`, a density for continuous data.
- ``discretized``: Ho et al. (2020), eq. 13: data on a grid of ``levels`` values in [-1, 1]
  (256 for 8-bit images); each level owns a bin of width :math:`2/(\text{levels} - 1)`, open-ended
  at -1 and 1, and gets the Gaussian mass of its bin.  pyrodiff uses the exact normal CDF
  (``torch.special.log_ndtr``) where improved-diffusion uses a tanh approximation of it.
"""

from __future__ import annotations

import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution

__all__ = ["DiscretizedGaussian", "check_levels_grid", "log_normal_bin_mass"]


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
        inf = torch.tensor(float("inf"), dtype=self.loc.dtype, device=self.loc.device)
        upper = torch.where(value > 1 - h, inf, (value + h - self.loc) / self.scale)
        lower = torch.where(value < -1 + h, -inf, (value - h - self.loc) / self.scale)
        return log_normal_bin_mass(lower, upper)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        """A Gaussian draw rounded to the nearest level (the bin it falls in), clamped to [-1, 1]."""
        shape = self._extended_shape(sample_shape)
        x = self.loc.expand(shape) + self.scale.expand(shape) * torch.randn(
            shape, dtype=self.loc.dtype, device=self.loc.device
        )
        index = ((x.clamp(-1, 1) + 1) / (2 * self.half_width)).round()
        return index * 2 * self.half_width - 1

    @property
    def mean(self) -> torch.Tensor:
        return self.loc
