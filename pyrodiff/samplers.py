r"""Samplers of the reverse chain: one flat function per algorithm, one signature.

A sampler takes the model, the starting noise :math:`x_T` (a tensor, or a number of samples to draw it
for), and an optional ``torch.Generator`` for every draw it makes, so that a run is reproducible given
``x_T`` and the generator's seed.  :func:`reverse_step` is the single reverse transition they share.

- :func:`ancestral`: DDPM's sampler (Ho et al. 2020, Algorithm 2), :math:`x_{t-1} = \mu_\theta(x_t, t) +
  \sigma_t z` for t = T..2, then the decoder at :math:`x_1`.  With ``last="sample"`` (the default) it draws
  :math:`x_0` from the decoder, so its samples follow exactly the law :math:`p_\theta(x_0)` whose bound
  pyrodiff reports; ``last="mean"`` returns :math:`\mu_\theta(x_1, 1)` (Algorithm 2's noiseless last step).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:  # the samplers use only the chain's predict and decoder
    from .reverse import ReverseChain

__all__ = ["reverse_step", "ancestral", "LAST_STEPS"]

#: what :func:`ancestral` returns after x_1: a draw of the decoder, its mean, or x_1 itself
LAST_STEPS = ("sample", "mean", "none")


@torch.no_grad()
def reverse_step(
    model: ReverseChain,
    x_t: torch.Tensor,
    t: int | torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""One draw from :math:`p(x_{t-1} \mid x_t)` (the chain's :class:`~pyrodiff.reverse.ReverseStep`): for a
    network, :math:`\mu_\theta(x_t, t) + \sigma_t z` for t >= 2, and at t = 1 a draw of :math:`x_0` from the decoder.

    :param x_t: a batch ``(N, *D)``.
    :param t: the math timestep of every example (an int in 1..T) or of each (a LongTensor ``(N,)``).
    :param generator: the generator of the standard normal draw ``z`` (not of ``z`` if ``noise`` is given; a
        mixture step also draws its component with it).
    :param noise: the standard normal draw ``z`` itself, shaped like ``x_t``.
    """
    T, N = model.schedule.num_steps, x_t.shape[0]
    if isinstance(t, int) and not 1 <= t <= T:
        raise ValueError(f"t must lie in 1..T = 1..{T}, got {t}")
    steps = torch.full((N,), t, device=x_t.device, dtype=torch.long) if isinstance(t, int) else t
    if steps.shape != (N,):
        raise ValueError(f"t must be an int or a tensor of shape ({N},), got shape {tuple(steps.shape)}")
    if noise is None:
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
    elif noise.shape != x_t.shape:
        raise ValueError(f"noise must have the shape of x_t {tuple(x_t.shape)}, got {tuple(noise.shape)}")
    step = model.predict(x_t, steps)
    if isinstance(t, int):  # no device-side selection (nor a host read) when all examples share t
        return step.decode(model.decoder, noise, generator) if t == 1 else step.draw(noise, generator)
    at_one = (steps == 1).reshape((N,) + (1,) * (x_t.dim() - 1))
    return torch.where(at_one, step.decode(model.decoder, noise, generator), step.draw(noise, generator))


@torch.no_grad()
def ancestral(
    model: ReverseChain,
    x_T: torch.Tensor | int,
    *,
    generator: torch.Generator | None = None,
    last: str = "sample",
    return_path: bool = False,
    progress: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""DDPM's ancestral sampler over all T steps.

    :param x_T: the starting noise ``(N, *D)``, or a number N of samples: then :math:`x_T \sim N(0, I)` is
        drawn with ``generator`` on the network's device (the model needs a ``data_shape``).
    :param generator: the generator of every draw (on the device of ``x_T``).
    :param last: ``"sample"`` draws :math:`x_0` from the decoder (the model's law); ``"mean"`` returns the
        decoder's mean :math:`\mu_\theta(x_1, 1)`; ``"none"`` stops at :math:`x_1`.
    :param return_path: also return the path :math:`x_{1:T}`, shape ``(T, N, *D)``, row k - 1 holding :math:`x_k`.
    :param progress: show a progress bar over the T steps.
    """
    if last not in LAST_STEPS:
        raise ValueError(f"last must be one of {LAST_STEPS}, got {last!r}")
    if not torch.is_tensor(x_T):
        x_T = _standard_noise(model, x_T, generator)
    T = model.schedule.num_steps
    x, path = x_T, [x_T]
    for t in tqdm(range(T, 1, -1), desc="sample", disable=not progress, mininterval=1.0, leave=False):
        x = reverse_step(model, x, t, generator=generator)
        path.append(x)
    if last == "sample":
        x = reverse_step(model, x, 1, generator=generator)
    elif last == "mean":
        x = model.predict(x, torch.ones(x.shape[0], device=x.device, dtype=torch.long)).mean
    return (x, torch.stack(path[::-1])) if return_path else x


def _standard_noise(model: ReverseChain, num_samples: int, generator: torch.Generator | None) -> torch.Tensor:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"the number of samples must be a positive integer, got {num_samples!r}")
    if model.data_shape is None:
        raise ValueError("to sample, give the DiffusionModel a data_shape (or score one batch of data first)")
    device, dtype = model.device_and_dtype()
    return torch.randn((num_samples,) + model.data_shape, generator=generator, device=device, dtype=dtype)
