r"""Samplers of the reverse chain: one flat function per algorithm, one signature.

A sampler takes the model, the starting noise :math:`x_T` (a tensor, or a number of samples to draw it
for), and an optional ``torch.Generator`` for every draw it makes, so that a run is reproducible given
``x_T`` and the generator's seed; ``steps`` (a count K) or ``timesteps`` (increasing math timesteps) run it
on the respaced K-step chain (:meth:`~pyrodiff.chain.reverse.DiffusionModel.respaced`; the network always sees the
original timesteps).  :func:`reverse_step` is the single reverse transition.

- :func:`ancestral`: DDPM's sampler (Ho et al. 2020, Algorithm 2), :math:`x_{t-1} = \mu_\theta(x_t, t) +
  \sigma_t z` down to :math:`x_1`, then the decoder: by default its mean :math:`\mu_\theta(x_1, 1)` (Algorithm 2's
  noiseless last step, as improved-diffusion and diffusers do); ``last="sample"`` draws :math:`x_0` from the
  decoder, so that the samples follow exactly the law :math:`p_\theta(x_0)` whose bound pyrodiff reports.
- :func:`ddim`: Song et al. (2021), eq. 12: :math:`x_{s} = \sqrt{\bar\alpha_s}\,\hat x_0 + \sqrt{1 - \bar\alpha_s - \sigma^2}\,\hat\epsilon + \sigma z`
  from step t to the previous visited step s, :math:`\sigma = \eta\sqrt{(1 - \bar\alpha_s)/(1 - \bar\alpha_t)}\sqrt{1 - \bar\alpha_t/\bar\alpha_s}`;
  :math:`\eta = 1` is the ancestral sampler with the "small" variance on the same timesteps, :math:`\eta = 0` is
  deterministic given :math:`x_T`.

``clip=True`` clamps every prediction :math:`\hat x_0` to [-1, 1] and recomputes the step from it (the
references' ``clip_denoised``): the clipped sampler is not the model whose bound pyrodiff scores.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .forward import InferenceFamily

if TYPE_CHECKING:  # the samplers use only the chain's predict and decoder
    from .reverse import ReverseChain

__all__ = ["reverse_step", "ancestral", "ddim", "LAST_STEPS"]

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
    clip: bool = False,
) -> torch.Tensor:
    r"""One draw from :math:`p(x_{t-1} \mid x_t)` (the chain's :class:`~pyrodiff.chain.reverse.ReverseStep`): for a
    network, :math:`\mu_\theta(x_t, t) + \sigma_t z` for t >= 2, and at t = 1 a draw of :math:`x_0` from the decoder.

    :param x_t: a batch ``(N, *D)``.
    :param t: the math timestep of every example (an int in 1..T) or of each (a LongTensor ``(N,)``).
    :param generator: the generator of the standard normal draw ``z`` (not of ``z`` if ``noise`` is given; a
        mixture step also draws its component with it).
    :param noise: the standard normal draw ``z`` itself, shaped like ``x_t``.
    :param clip: clamp :math:`\hat x_0` to [-1, 1] and take the step from it (module docstring).
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
    if clip:
        step = step.clipped(model, x_t, steps)
    if isinstance(t, int):  # no device-side selection (nor a host read) when all examples share t
        return step.decode(model.decoder, noise, generator) if t == 1 else step.draw(noise, generator)
    at_one = (steps == 1).reshape((N,) + (1,) * (x_t.dim() - 1))
    return torch.where(at_one, step.decode(model.decoder, noise, generator), step.draw(noise, generator))


@torch.no_grad()
def ancestral(
    model: ReverseChain,
    x_T: torch.Tensor | int,
    *,
    steps: int | None = None,
    timesteps: Sequence[int] | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    last: str = "mean",
    clip: bool = False,
    return_path: bool = False,
    progress: bool = False,
    graph: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""DDPM's ancestral sampler, over all T steps or over the respaced chain of ``steps`` / ``timesteps``.

    :param x_T: the starting noise ``(N, *D)``, or a number N of samples: then :math:`x_T \sim N(0, I)` is
        drawn with ``generator`` on the network's device (the model needs a ``data_shape``).
    :param steps: run the K-step chain of K evenly spaced timesteps (first and last included).
    :param timesteps: run the chain visiting these math timesteps (1..T, increasing).
    :param generator: the generator of every draw (on the device of ``x_T``).
    :param last: ``"mean"`` (default) returns the decoder's mean :math:`\mu_\theta(x_1, 1)`; ``"sample"`` draws
        :math:`x_0` from the decoder (the model's law); ``"none"`` stops at :math:`x_1`.
    :param clip: clamp each :math:`\hat x_0` to [-1, 1] (see the module docstring).
    :param return_path: also return the path :math:`x_{1:K}`, shape ``(K, N, *D)``, row k - 1 holding :math:`x_k`.
    :param progress: show a progress bar over the steps.
    :param graph: capture one reverse step as a CUDA graph and replay it at every step (a
        :class:`~pyrodiff.chain.reverse.DiffusionModel` on a CUDA device): one launch per step instead of one per kernel,
        the same draws from ``generator`` (drawn outside the graph) and the same samples.
    """
    chain, x_T = _start(model, x_T, steps, timesteps, last, generator)
    move = _graphed(chain, x_T, functools.partial(_ancestral_step, chain, clip)) if graph else None
    x, path = x_T, [x_T]
    for t in tqdm(
        range(chain.schedule.num_steps, 1, -1), desc="sample", disable=not progress, mininterval=1.0, leave=False
    ):
        if move is None:
            x = reverse_step(chain, x, t, generator=generator, clip=clip)
        else:  # the same draw as reverse_step's, made outside the graph
            x = move(x, _timestep(x, t), torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype))
        path.append(x)
    x = _last_step(chain, x, last, clip, generator)
    return (x, torch.stack(path[::-1])) if return_path else x


@torch.no_grad()
def ddim(
    model: ReverseChain,
    x_T: torch.Tensor | int,
    *,
    steps: int | None = None,
    timesteps: Sequence[int] | torch.Tensor | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    last: str = "mean",
    clip: bool = False,
    return_path: bool = False,
    progress: bool = False,
    graph: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""DDIM (Song et al. 2021, eq. 12) over all T steps or the respaced chain of ``steps`` / ``timesteps``; the
    arguments are :func:`ancestral`'s, and ``eta`` in [0, 1] scales the noise (module docstring).  From step t to
    the previous visited step s, with :math:`\hat x_0` the chain's prediction and
    :math:`\hat\epsilon = (x_t - \sqrt{\bar\alpha_t}\,\hat x_0)/\sqrt{1 - \bar\alpha_t}`,
    :math:`x_s = \sqrt{\bar\alpha_s}\,\hat x_0 + \sqrt{1 - \bar\alpha_s - \sigma^2}\,\hat\epsilon + \sigma z`.  The last
    step (to :math:`x_0`) is the decoder's, as in :func:`ancestral`.  This is :math:`q_\sigma(x_s \mid x_t, \hat x_0)`
    (:class:`~pyrodiff.chain.forward.InferenceFamily`): the ancestral sampler of the Pyro model
    :meth:`DiffusionModel.ddim(eta) <pyrodiff.chain.reverse.DiffusionModel.ddim>`, whose bound ``bound_terms`` gives for
    eta > 0."""
    family = InferenceFamily(eta)
    chain, x_T = _start(model, x_T, steps, timesteps, last, generator)
    move = functools.partial(_ddim_step, chain, family, clip)
    move = _graphed(chain, x_T, move) if graph else move
    x, path = x_T, [x_T]
    for t in tqdm(
        range(chain.schedule.num_steps, 1, -1), desc="ddim", disable=not progress, mininterval=1.0, leave=False
    ):
        z = [torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)] if family.has_density else []
        x = move(x, _timestep(x, t), *z)
        path.append(x)
    x = _last_step(chain, x, last, clip, generator)
    return (x, torch.stack(path[::-1])) if return_path else x


def _ancestral_step(chain, clip: bool, x, t, noise) -> torch.Tensor:
    r""":math:`x_{t-1} \sim p(x_{t-1} \mid x_t)` for t >= 2 (a tensor) from the standard normal ``noise``: the step
    :func:`ancestral` captures as a graph (:func:`reverse_step`'s draw, without its checks and its decoder rows)."""
    step = chain.predict(x, t)
    return (step.clipped(chain, x, t) if clip else step).draw(noise)


def _ddim_step(chain, family: InferenceFamily, clip: bool, x, t, noise=None) -> torch.Tensor:
    r""":math:`x_s \sim q_\sigma(x_s \mid x_t, \hat x_0)` from the standard normal ``noise`` (none when eta = 0)."""
    step = chain.predict(x, t)
    x_s, var = family.posterior(chain.schedule, step.x0.clamp(-1, 1) if clip else step.x0, x, t)
    return x_s if noise is None else x_s + var.sqrt() * noise


def _timestep(x: torch.Tensor, t: int) -> torch.Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


def _graphed(chain, x_T: torch.Tensor, move):
    """``move`` as a :class:`~pyrodiff.cuda_graph.GraphedStep`, after checking that it can be one."""
    from ..cuda_graph import GraphedStep
    from .reverse import DiffusionModel

    if x_T.device.type != "cuda":
        raise ValueError(f"graph=True captures a step as a CUDA graph: x_T must be on a CUDA device, not {x_T.device}")
    if not isinstance(chain, DiffusionModel):
        raise ValueError(
            f"graph=True needs a DiffusionModel (its steps draw only the noise given), not {type(chain).__name__}"
        )
    return GraphedStep(move)


def _start(model, x_T, steps, timesteps, last, generator):
    """The chain to run (respaced if asked) and the starting noise, after checking the arguments."""
    if last not in LAST_STEPS:
        raise ValueError(f"last must be one of {LAST_STEPS}, got {last!r}")
    if steps is not None and timesteps is not None:
        raise ValueError("give steps (a count) or timesteps (a list), not both")
    chain = model
    if steps is not None or timesteps is not None:
        if not hasattr(model, "respaced"):
            raise ValueError(f"{type(model).__name__} cannot be respaced: run it over all its steps")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 2):
            raise ValueError(f"steps must be an integer in 2..T = 2..{model.schedule.num_steps}, got {steps!r}")
        chain = model.respaced(steps if steps is not None else timesteps)
    if not torch.is_tensor(x_T):
        x_T = _standard_noise(chain, x_T, generator)
    elif model.data_shape is not None and tuple(x_T.shape[1:]) != tuple(model.data_shape):
        raise ValueError(f"x_T must have shape (N, *{tuple(model.data_shape)}), got {tuple(x_T.shape)}")
    return chain, x_T


def _last_step(chain, x, last: str, clip: bool, generator) -> torch.Tensor:
    if last == "sample":
        return reverse_step(chain, x, 1, generator=generator, clip=clip)
    if last == "mean":
        one = torch.ones(x.shape[0], device=x.device, dtype=torch.long)
        step = chain.predict(x, one)
        return (step.clipped(chain, x, one) if clip else step).mean
    return x


def _standard_noise(model: ReverseChain, num_samples: int, generator: torch.Generator | None) -> torch.Tensor:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"the number of samples must be a positive integer, got {num_samples!r}")
    if model.data_shape is None:
        raise ValueError("to sample, give the DiffusionModel a data_shape (or score one batch of data first)")
    device, dtype = model.device_and_dtype()
    return torch.randn((num_samples,) + model.data_shape, generator=generator, device=device, dtype=dtype)
