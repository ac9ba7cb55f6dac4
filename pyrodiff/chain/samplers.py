r"""Samplers of the reverse chain: one flat function per algorithm, one signature.

A sampler takes the model, the starting noise :math:`x_T` (a tensor, or a number of samples to draw it
for), and an optional ``torch.Generator`` for every draw it makes, so that a run is reproducible given
``x_T`` and the generator's seed; ``steps`` (a count K) or ``timesteps`` (increasing math timesteps) run it
on the respaced K-step chain (:meth:`~pyrodiff.chain.reverse.DiffusionModel.respaced`; the network always sees the
original timesteps).  Each is the ancestral sampler of a chain (:func:`~pyrodiff.chain.reverse.sample_chain`, whose
single transition is :func:`reverse_step`):

- :func:`ancestral`: DDPM's sampler (Ho et al. 2020, Algorithm 2), :math:`x_{t-1} = \mu_\theta(x_t, t) +
  \sigma_t z` down to :math:`x_1`, then the decoder: by default its mean :math:`\mu_\theta(x_1, 1)` (Algorithm 2's
  noiseless last step, as improved-diffusion and diffusers do); ``last="sample"`` draws :math:`x_0` from the
  decoder, so that the samples follow exactly the law :math:`p_\theta(x_0)` whose bound pyrodiff reports.
- :func:`ddim`: Song et al. (2021), eq. 12: :math:`x_{s} = \sqrt{\bar\alpha_s}\,\hat x_0 + \sqrt{1 - \bar\alpha_s - \sigma^2}\,\hat\epsilon + \sigma z`
  from step t to the previous visited step s, :math:`\sigma = \eta\sqrt{(1 - \bar\alpha_s)/(1 - \bar\alpha_t)}\sqrt{1 - \bar\alpha_t/\bar\alpha_s}`,
  the ancestral sampler of DDIM's generative process
  (:meth:`DiffusionModel.ddim(eta) <pyrodiff.chain.reverse.DiffusionModel.ddim>`); :math:`\eta = 1` is the ancestral
  sampler with the "small" variance on the same timesteps, :math:`\eta = 0` is deterministic given :math:`x_T`.

- :func:`ode`: the probability-flow ODE (Song et al. 2021, eq. 13) of the model's continuous extension
  (:class:`~pyrodiff.chain.probability_flow.ProbabilityFlow`), solved by an adaptive solver (torchdiffeq) from
  :math:`x_T` at :math:`\lambda_T` to the first step's noise level :math:`\lambda_1`: deterministic given :math:`x_T`;
  its samples follow the law whose density :func:`pyrodiff.evaluation.ode_likelihood.ode_log_likelihood` computes.

``clip=True`` clamps every prediction :math:`\hat x_0` to [-1, 1] and recomputes the step from it (the
references' ``clip_denoised``): the clipped sampler is not the model whose bound pyrodiff scores.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from .. import checks
from .continuous import ContinuousDiffusionModel
from .probability_flow import ProbabilityFlow, solve
from .reverse import DiffusionModel, ReverseChain, _start, reverse_step, sample_chain

__all__ = ["ancestral", "ddim", "ode", "reverse_step"]


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
    return sample_chain(
        _respaced(model, steps, timesteps),
        x_T,
        generator=generator,
        last=last,
        clip=clip,
        return_path=return_path,
        progress=progress,
        graph=graph,
    )


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
    r"""DDIM (Song et al. 2021, eq. 12) over all T steps or the respaced chain of ``steps`` / ``timesteps``: the
    :func:`ancestral` sampler of :meth:`model.ddim(eta) <pyrodiff.chain.reverse.DiffusionModel.ddim>`, with its
    arguments, and ``eta`` in [0, 1] scaling the noise (module docstring).  From step t to the previous visited step
    s, with :math:`\hat x_0` the chain's prediction and
    :math:`\hat\epsilon = (x_t - \sqrt{\bar\alpha_t}\,\hat x_0)/\sqrt{1 - \bar\alpha_t}`,
    :math:`x_s = \sqrt{\bar\alpha_s}\,\hat x_0 + \sqrt{1 - \bar\alpha_s - \sigma^2}\,\hat\epsilon + \sigma z`, the law
    :math:`q_\sigma(x_s \mid x_t, \hat x_0)` (:class:`~pyrodiff.chain.forward.InferenceFamily`); with eta = 0 no noise
    is drawn.  The last step (to :math:`x_0`) is the model's decoder, as in :func:`ancestral`.  ``bound_terms`` gives
    this sampler's bound for eta > 0."""
    if not hasattr(model, "ddim"):
        raise ValueError(f"{type(model).__name__} has no DDIM process (ddim(eta)): sample it with ancestral")
    return ancestral(
        model.ddim(eta),
        x_T,
        steps=steps,
        timesteps=timesteps,
        generator=generator,
        last=last,
        clip=clip,
        return_path=return_path,
        progress=progress,
        graph=graph,
    )


def ode(
    model: DiffusionModel | ContinuousDiffusionModel | ProbabilityFlow,
    x_T: torch.Tensor | int,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    generator: torch.Generator | None = None,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict]:
    r"""The probability-flow ODE sampler: :math:`x` solved deterministically from :math:`x_T` at the noise end to the
    data end of the model's :class:`~pyrodiff.chain.probability_flow.ProbabilityFlow` (a continuous-time model's from
    :math:`\gamma_1` to :math:`\gamma_0`; for a
    :class:`~pyrodiff.chain.reverse.DiffusionModel`, from :math:`\lambda_T` to :math:`\lambda_1`: the samples are
    :math:`x` at the first step's noise level, the law :math:`p^\text{ODE}_\theta` whose log-density
    :func:`~pyrodiff.evaluation.ode_likelihood.ode_log_likelihood` computes; no decoder step follows).

    :param x_T: the starting noise ``(N, *D)``, or a number N of samples drawn from :math:`N(0, I)` with
        ``generator`` (a model with a ``data_shape``).
    :param rtol: the solver's relative tolerance.
    :param atol: the solver's absolute tolerance.
    :param method: an adaptive ``torchdiffeq.odeint`` method (:data:`~pyrodiff.chain.probability_flow.METHODS`).
    :param return_info: also return ``{"nfe", "seconds", "rtol", "atol", "method"}``, ``nfe`` the number of drift
        evaluations (one network call each).
    """
    flow = ProbabilityFlow.of(model)
    if isinstance(model, ProbabilityFlow) and not torch.is_tensor(x_T):
        raise ValueError("a ProbabilityFlow does not know its data shape: give x_T as a tensor")
    x_T = x_T if isinstance(model, ProbabilityFlow) else _start(model, x_T, generator)
    began = time.perf_counter()
    x, nfe = solve(flow.drift, x_T, flow.end, flow.start, rtol, atol, method, flow.knots)
    info = {"nfe": nfe, "seconds": time.perf_counter() - began, "rtol": rtol, "atol": atol, "method": method}
    return (x, info) if return_info else x


def _respaced(model: ReverseChain, steps: int | None, timesteps: Sequence[int] | torch.Tensor | None) -> ReverseChain:
    """The chain to run: ``model``, or its respaced chain, after checking the arguments."""
    if steps is not None and timesteps is not None:
        raise ValueError("give steps (a count) or timesteps (a list), not both")
    if steps is None and timesteps is None:
        return model
    if not hasattr(model, "respaced"):
        raise ValueError(f"{type(model).__name__} cannot be respaced: run it over all its steps")
    if steps is not None:
        checks.int_in("steps", steps, 2, model.schedule.num_steps, hi_name="T")
    return model.respaced(steps if steps is not None else timesteps)
