r"""The bound, term by term: :math:`L_0, \dots, L_T` (docs/MATH.md, section 5, "The bound") for every example.

:func:`bound_terms` computes, for S independent draws of the noisy inputs and N examples,

- :math:`L_T = \mathrm{KL}(q(x_T \mid x_0) \,\|\, N(0, I))`, exact;
- :math:`L_{k} = \mathrm{KL}(q(x_k \mid x_{k+1}, x_0) \,\|\, p_\theta(x_k \mid x_{k+1}))` for k = 1..T-1,
  analytic given the draw of :math:`x_{k+1}` (Rao-Blackwellised, as improved-diffusion's ``_vb_terms_bpd``);
- :math:`L_0 = -\log p_\theta(x_0 \mid x_1)`, at the draw of :math:`x_1`.

Each column is an unbiased estimate of its term.  The draws of :math:`x_t` are either independent per
timestep from :math:`q(x_t \mid x_0)` (``draws="independent"``, the reference's choice) or one forward
trajectory per sample (``draws="trajectory"``, what ``Trace_ELBO`` uses).  Timesteps are processed in
chunks: one batched network call per chunk, memory independent of T, on the model's device.  Along the
way :math:`\hat x_0(x_t)` is kept for progressive decoding (Ho et al. 2020, section 4.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro.distributions as dist
import torch
from tqdm.auto import tqdm

from .. import checks
from ..chain.decoders import Decoder
from ..chain.forward import q_marginal, q_trajectory
from ..chain.gaussian import normal_kl
from ..chain.reverse import ReverseChain

__all__ = ["bound_terms", "BoundTerms", "nats_to_bits_per_dim"]

DRAWS = ("trajectory", "independent")


def nats_to_bits_per_dim(nats, dims: int):
    r"""nats per example to bits per dimension: :math:`\text{nats} / (D \ln 2)` (a float, array or tensor)."""
    return nats / (dims * math.log(2))


@dataclass
class BoundTerms:
    r"""Per-term draws of the bound.

    ``nats[s, n, k]`` is draw s of :math:`L_k` for example n (nats); ``x0_sq_error[s, n, t - 1]`` is the
    squared error :math:`\|\hat x_0(x_t) - x_0\|^2` (summed over dimensions, on the data's scale) of the
    prediction of :math:`x_0` from the same draw of :math:`x_t`, clipped to [-1, 1] for image data
    (discretized decoder) as in Ho et al.'s progressive decoding.  ``decoder`` is the model's decoder,
    which says on what scale bits/dim and distortions are; ``model`` is :meth:`DiffusionModel.describe`.
    """

    nats: torch.Tensor
    x0_sq_error: torch.Tensor
    dims: int
    decoder: Decoder
    model: dict

    @property
    def num_steps(self) -> int:
        return self.nats.shape[-1] - 1

    @property
    def total(self) -> torch.Tensor:
        r"""The negative ELBO of each draw and example, shape ``(S, N)``."""
        return self.nats.sum(-1)

    @property
    def rate(self) -> torch.Tensor:
        r""":math:`L_1 + \dots + L_T`, shape ``(S, N)``."""
        return self.nats[..., 1:].sum(-1)

    @property
    def distortion(self) -> torch.Tensor:
        r""":math:`L_0`, shape ``(S, N)``."""
        return self.nats[..., 0]

    def to_bits_per_dim(self, nats):
        """nats per example -> bits per dimension, ``nats / (D ln 2)``."""
        return nats_to_bits_per_dim(nats, self.dims)

    @property
    def bits_per_dim(self) -> torch.Tensor:
        """Every term in bits/dim, shape ``(S, N, T + 1)``."""
        return self.to_bits_per_dim(self.nats)

    @property
    def is_8bit_scale(self) -> bool:
        """Whether bits/dim is comparable with published 8-bit figures (discretized decoder, 256 levels)."""
        return self.decoder.is_8bit_scale

    def mean(self) -> torch.Tensor:
        """Mean of each term over draws and examples, ``(T + 1,)`` nats."""
        return self.nats.mean((0, 1))

    def stderr(self) -> torch.Tensor:
        """Standard error of :meth:`mean` for each term: examples are independent, so it is the standard
        deviation across examples of their per-example means over draws, over sqrt(N)."""
        return _stderr_over_examples(self.nats)

    def total_stderr(self) -> float:
        return float(_stderr_over_examples(self.total.unsqueeze(-1))[0])

    def kl_bound(self, log_q: torch.Tensor) -> tuple[float, float]:
        r"""Mean and standard error of :math:`-\text{ELBO}(x_0) + \log q(x_0)` over the examples, given the
        exact data log-density ``log_q`` of each (shape ``(N,)``).  It estimates without bias
        :math:`E_q[-\text{ELBO}] - H(q) = \mathrm{KL}(q(x_0) \,\|\, p_\theta(x_0)) + E_q[\log p_\theta(x_0) - \text{ELBO}]`,
        an upper bound on the KL from the data to the model; paired per example, its standard error
        leaves out the spread of :math:`-\log q(x_0)` that comparing with the entropy would add."""
        excess = self.total + log_q.to(self.total)
        return excess.mean().item(), float(_stderr_over_examples(excess.unsqueeze(-1))[0])


def _stderr_over_examples(values: torch.Tensor) -> torch.Tensor:
    per_example = values.double().mean(0)  # (N, K)
    n = per_example.shape[0]
    if n < 2:
        # one example: the Monte Carlo error across draws is all there is
        s = values.shape[0]
        return values.double().std(0)[0] / math.sqrt(s) if s > 1 else torch.full(values.shape[2:], float("nan"))
    return per_example.std(0) / math.sqrt(n)


@torch.no_grad()
def bound_terms(
    model: ReverseChain,
    x0: torch.Tensor,
    num_samples: int = 1,
    draws: str = "independent",
    chunk_size: int | None = None,
    progress: bool = False,
    generator: torch.Generator | None = None,
) -> BoundTerms:
    r"""Draws of every term :math:`L_0 .. L_T` of the bound for the examples ``x0``: see the module docstring.

    :param model: the reverse chain (a :class:`~pyrodiff.chain.reverse.DiffusionModel`'s network is evaluated in chunks of
        ``chunk_size`` timesteps; a chain whose steps have no closed-form KL, such as
        :class:`~pyrodiff.theory.empirical.EmpiricalReverse`, gives a one-draw Monte Carlo estimate of each KL term).
    :param x0: data ``(N, *D)`` on the model's device.
    :param num_samples: S, independent draws of the noisy inputs.
    :param draws: ``"independent"`` per timestep, or ``"trajectory"`` (one forward path per draw).
    :param chunk_size: timesteps per network call (memory grows with ``chunk_size * N``, not with T);
        by default as many as keep one call at about 4096 network inputs.
    :param progress: show a progress bar over the chunks.
    :param generator: draws the noisy inputs (and the Monte Carlo KLs), on ``x0``'s device; torch's global generator
        if None.
    """
    checks.positive_int("num_samples", num_samples)
    checks.one_of("draws", draws, DRAWS)
    if chunk_size is not None:
        checks.positive_int("chunk_size", chunk_size)
    model.check_data(x0)
    validate = dist.is_validation_enabled()
    schedule, T, N = model.schedule, model.schedule.num_steps, x0.shape[0]
    chunk_size = chunk_size or max(1, 4096 // N)
    event_dim = x0.dim() - 1
    sum_event = tuple(range(-event_dim, 0))
    nats = x0.new_empty(num_samples, N, T + 1)
    sq_error = x0.new_empty(num_samples, N, T)
    m_T, v_T = q_marginal(schedule, x0, torch.full((N,), T, device=x0.device))
    nats[:, :, T] = normal_kl(m_T, v_T, torch.zeros_like(x0), torch.ones_like(v_T), event_dim)
    bar = tqdm(total=num_samples * T, desc="bound", unit="step", disable=not progress, mininterval=1.0, leave=False)
    for s in range(num_samples):
        scaled_sum = x0  # x_t / sqrt(abar_t) before the chunk (q_trajectory's start)
        for start in range(1, T + 1, chunk_size):
            stop = min(start + chunk_size, T + 1)
            t = torch.arange(start, stop, device=x0.device)
            K = stop - start
            tt = t[:, None].expand(K, N)
            x0k = x0.expand((K,) + x0.shape)
            if draws == "independent":
                loc, var = q_marginal(schedule, x0k, tt)
                xt = loc + var.sqrt() * _normal(x0k, generator)
            else:
                xt, scaled_sum = q_trajectory(schedule, scaled_sum, _normal(x0k, generator), t)
            step = model.predict(xt, tt)
            if validate:  # before the laws are built from the step (they would refuse its values less clearly)
                _check_finite(torch.isfinite(step.mean.reshape(K, -1)).all(1), first=start - 1)
            sq_error[s, :, start - 1 : stop - 1] = (model.decoder.reconstruction(step.x0) - x0k).pow(2).sum(sum_event).T
            # L_{t-1} for the rows with t >= 2 (sliced with host integers: no read of device values)
            kl = slice(1 if start == 1 else 0, K)
            if kl.start < kl.stop:
                loc_q, var_q = model.posterior(x0k[kl], xt[kl], tt[kl])
                nats[s, :, start - 1 + kl.start : stop - 1] = (
                    step.select(kl).kl_from(loc_q, var_q, event_dim, generator).T
                )
            if start == 1:  # L_0 from the draw of x_1
                nats[s, :, 0] = -step.select(0).decoder(model.decoder, event_dim).log_prob(x0)
            bar.update(K)
    bar.close()
    _check_finite(torch.isfinite(nats.reshape(-1, T + 1)).all(0))
    return BoundTerms(nats, sq_error, int(x0[0].numel()), model.decoder, model.describe())


def _normal(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal draws of ``like``'s shape, dtype and device from ``generator`` (the global one if None)."""
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)


def _check_finite(finite: torch.Tensor, first: int = 0) -> None:
    r"""Refuse non-finite terms, naming the first :math:`L_k` that is not finite: ``finite[j]`` says whether
    :math:`L_{\text{first} + j}` (or what feeds it) is.  A host read: once at the end of :func:`bound_terms`, and per
    chunk only while Pyro's validation is on (as the distributions' own checks are)."""
    if not finite.all():
        k = first + int(torch.nonzero(~finite)[0])
        raise FloatingPointError(
            f"the term L_{k} of the bound is not finite (the network's output or the data is broken there)"
        )
