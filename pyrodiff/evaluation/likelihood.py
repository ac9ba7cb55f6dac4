r"""The likelihood behind the bound: the importance-weighted bound with the forward chain as proposal.

For one example :math:`x_0` and K paths :math:`x_{1:T}^k \sim q(x_{1:T} \mid x_0)` drawn independently,
the importance weights of the reverse chain against the forward chain are

.. math:: w_k = \frac{p_\theta(x_0, x_{1:T}^k)}{q(x_{1:T}^k \mid x_0)}, \qquad E_q[w_k] = p_\theta(x_0),

and the importance-weighted bound (Burda, Grosse & Salakhutdinov 2016, "IWAE") is

.. math:: \mathrm{IWAE}_K(x_0) = \log \frac1K \sum_{k=1}^K w_k, \qquad
   \mathrm{ELBO}(x_0) = E[\mathrm{IWAE}_1] \le E[\mathrm{IWAE}_K] \le E[\mathrm{IWAE}_{K+1}] \le \log p_\theta(x_0).

:func:`log_likelihood_bound` computes the log weights from the Pyro program itself: the posterior-order
guide :class:`~pyrodiff.chain.forward.DiffusionGuide` is traced on the data replicated once per particle, the
model is replayed on that trace, and :math:`-\log w` is the sum of the single-sample terms that
:func:`~pyrodiff.chain.traces.trace_terms` reads off the pair (the same numbers ``Trace_ELBO`` scores).  So it
holds for any reverse-chain model with the sites and call signature of
:class:`~pyrodiff.chain.reverse.DiffusionModel`.  Per example it reports (:class:`LikelihoodBound`, nats):

- ``estimate``: :math:`\mathrm{IWAE}_K`, and ``stderr``, its delta-method standard error
  :math:`\sqrt{(K\sum_k \tilde w_k^2 - 1)/(K - 1)}` with :math:`\tilde w_k = w_k / \sum_j w_j` (NaN for K = 1);
- ``khat``: the Pareto shape :math:`\hat k` of the weights' right tail (PSIS, Vehtari et al. 2024, by
  ArviZ's ``psislw``), NaN when fewer than 5 weights fall in the tail (K < 21) or the fit fails;
- ``elbo``, ``elbo_stderr``: the mean of :math:`\log w_k` over the same draws and its standard error.

The (N, K) log weights are kept, so that :meth:`LikelihoodBound.at` gives :math:`\mathrm{IWAE}_k` for any
k <= K from the first k of the same draws.  The derivations are docs/MATH.md, section 12, "The likelihood behind the
bound: the importance-weighted bound".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyro.poutine as poutine
import torch
from tqdm.auto import tqdm

from .. import checks
from ..chain.forward import DiffusionGuide, check_batch
from ..chain.traces import trace_terms
from .bound import nats_to_bits_per_dim

__all__ = [
    "log_likelihood_bound",
    "LikelihoodBound",
    "pareto_khat",
    "khat_threshold",
    "KHAT_FINITE_VARIANCE",
    "KHAT_UNRELIABLE",
]

#: network inputs per particle chunk by default, the bound's 4096: a chunk of P particles for N examples makes one
#: network call over P * N * T inputs, and on a CPU larger calls are slower per input; the full chain needs N * T
#: inputs per call whatever the budget (P >= 1)
DEFAULT_BUDGET = 2**12

#: ArviZ's PSIS fits the generalized Pareto to the M = ceil(min(K / 5, 3 sqrt(K))) largest weights and
#: needs M >= 5 of them, i.e. K >= 21; below that k-hat is undefined (NaN here)
MIN_PARTICLES_FOR_KHAT = 21

#: Vehtari et al. (2024): weights with a Pareto tail of shape k have finite moments of order < 1/k only, so their
#: variance is finite for k < 0.5 and infinite above
KHAT_FINITE_VARIANCE = 0.5
#: Vehtari et al. (2024): above it an importance-sampling estimate is unreliable, whatever the number of draws
KHAT_UNRELIABLE = 0.7


def khat_threshold(num_draws: int) -> float:
    r"""Vehtari et al.'s (2024, "Pareto smoothed importance sampling", JMLR) sample-size-dependent
    threshold :math:`\min(1 - 1/\log_{10} S, 0.7)` for S draws: with :math:`\hat k` above it the (Pareto-smoothed)
    estimate is unreliable, and the draws needed to make it reliable grow impractically.  It is below
    :data:`KHAT_UNRELIABLE` for S < 2155 (0.5 at S = 100).  The thresholds' reading is docs/MATH.md, section 12,
    "Pareto k-hat".  ``num_draws`` must be an int of at least :data:`MIN_PARTICLES_FOR_KHAT`, the fewest draws
    for which :func:`pareto_khat` is defined."""
    checks.integer("num_draws", num_draws, minimum=MIN_PARTICLES_FOR_KHAT)
    return min(1.0 - 1.0 / math.log10(num_draws), KHAT_UNRELIABLE)


def pareto_khat(log_weights: torch.Tensor) -> torch.Tensor:
    r"""The Pareto shape :math:`\hat k` of the right tail of each row's weights, shape ``(N,)`` from ``(N, K)``
    log weights: ArviZ's ``psislw(log_weights, reff=1.0)`` (Vehtari et al. 2024, PSIS; the generalized Pareto
    is fitted to the :math:`M = \lceil\min(K/5, 3\sqrt K)\rceil` largest weights with Zhang & Stephens' estimator
    and its prior).  NaN where it is undefined: K < :data:`MIN_PARTICLES_FOR_KHAT` (fewer than 5 tail
    weights), where ArviZ cannot fit (ties leaving fewer than 5 weights above the cutoff), or where a log
    weight is NaN or +inf or all are -inf.  Zero weights (log weight -inf) are valid.

    Reading it: weights with a Pareto tail of shape k have finite moments of order < 1/k only, so
    :math:`\hat k >` :data:`KHAT_FINITE_VARIANCE` (0.5) says their variance is infinite and the standard error is
    not to be trusted; above :func:`khat_threshold` (K), :math:`\min(1 - 1/\log_{10} K, 0.7)`, Vehtari et al. call
    the estimate unreliable, and above :data:`KHAT_UNRELIABLE` (0.7) unreliable whatever K."""
    if log_weights.dim() != 2:
        raise ValueError(f"log_weights must have shape (N, K), got {tuple(log_weights.shape)}")
    N, K = log_weights.shape
    out = torch.full((N,), float("nan"), dtype=torch.float64)
    lw = log_weights.detach().double().cpu().numpy()
    # a weight of 0 (log weight -inf) is a valid weight; NaN, +inf or no positive weight at all is not
    rows = ~(np.isnan(lw) | (lw == np.inf)).any(1) & (lw > -np.inf).any(1)
    if K >= MIN_PARTICLES_FOR_KHAT and rows.any():
        import arviz as az  # imported here: it takes a while to import and only this function needs it

        _, k = az.psislw(lw[rows], reff=1.0)
        k = np.asarray(k, dtype=np.float64)
        out[torch.from_numpy(rows)] = torch.from_numpy(np.where(np.isfinite(k), k, np.nan))
    return out


@dataclass(frozen=True)
class LikelihoodBound:
    r"""The importance-weighted bound of each example and its diagnostics (nats per example).

    ``log_weights[n, k]`` is :math:`\log w_k = \log p_\theta(x_0, x_{1:T}^k) - \log q(x_{1:T}^k \mid x_0)` for
    example n; everything else is computed from it (:meth:`from_log_weights`), each of shape ``(N,)``:
    ``estimate`` :math:`\mathrm{IWAE}_K`, ``stderr`` its standard error, ``khat`` the Pareto shape of the
    weights, ``elbo`` the mean log weight and ``elbo_stderr`` its standard error.  ``dims`` is D, the number
    of dimensions of one example (for bits/dim).

    The delta-method ``stderr`` can never exceed 1 nat (:math:`K\sum\tilde w^2 \le K`): when one weight dominates
    (effective sample size :math:`1/\sum\tilde w^2` near 1) it sits near 1 whatever the real error is; read
    ``khat`` then.
    """

    estimate: torch.Tensor
    stderr: torch.Tensor
    khat: torch.Tensor
    elbo: torch.Tensor
    elbo_stderr: torch.Tensor
    log_weights: torch.Tensor
    dims: int

    @classmethod
    def from_log_weights(cls, log_weights: torch.Tensor, dims: int) -> LikelihoodBound:
        r"""The bound and its diagnostics from ``(N, K)`` log weights:

        - :math:`\mathrm{IWAE}_K = \operatorname{logsumexp}_k \log w_k - \log K`;
        - standard error :math:`\sqrt{(K \sum_k \tilde w_k^2 - 1)/(K - 1)}`, :math:`\tilde w = \operatorname{softmax}(\log w)`:
          the delta method, :math:`\mathrm{Var}(\log \bar w) \approx \mathrm{Var}(w) / (K E[w]^2)`, with the sample
          variance of the weights over the square of their mean (NaN for K = 1);
        - ``elbo`` the mean of :math:`\log w_k`, ``elbo_stderr`` their sample standard deviation over
          :math:`\sqrt K` (NaN for K = 1);
        - ``khat``: :func:`pareto_khat`.
        """
        if not torch.is_tensor(log_weights) or log_weights.dim() != 2 or log_weights.shape[1] < 1:
            raise ValueError("log_weights must be a tensor of shape (N, K) with K >= 1")
        checks.positive_int("dims", dims)
        K = log_weights.shape[1]
        estimate = torch.logsumexp(log_weights, dim=1) - math.log(K)
        elbo = log_weights.mean(1)
        if K > 1:
            normalised = torch.softmax(log_weights, dim=1)
            spread = (K * normalised.pow(2).sum(1) - 1).clamp(min=0)  # >= 0 by Cauchy-Schwarz
            stderr = (spread / (K - 1)).sqrt()
            elbo_stderr = log_weights.std(1) / math.sqrt(K)
        else:
            stderr = torch.full_like(estimate, float("nan"))
            elbo_stderr = torch.full_like(elbo, float("nan"))
        khat = pareto_khat(log_weights).to(log_weights.device, log_weights.dtype)
        return cls(estimate, stderr, khat, elbo, elbo_stderr, log_weights, dims)

    @property
    def num_particles(self) -> int:
        """K, the number of importance samples per example."""
        return self.log_weights.shape[1]

    @property
    def num_examples(self) -> int:
        return self.log_weights.shape[0]

    def at(self, k: int) -> LikelihoodBound:
        r"""The bound :math:`\mathrm{IWAE}_k` from the first ``k`` draws of the same log weights (1 <= k <= K):
        nested estimates for k = 1, 2, .., K, increasing in k in expectation."""
        checks.int_in("k", k, 1, self.num_particles, hi_name="K")
        return LikelihoodBound.from_log_weights(self.log_weights[:, :k], self.dims)

    def expected_at(self, k: int) -> torch.Tensor:
        r""":math:`E[\mathrm{IWAE}_k]` of each example, estimated from all K draws: the mean of :math:`\mathrm{IWAE}_k`
        over the :math:`\lfloor K / k \rfloor` disjoint blocks of k draws (unbiased for :math:`E[\mathrm{IWAE}_k]`,
        with less variance than one block; k = 1 gives the ELBO of the draws).  Shape ``(N,)``."""
        checks.int_in("k", k, 1, self.num_particles, hi_name="K")
        n = self.num_examples
        blocks = self.log_weights[:, : self.num_particles // k * k].reshape(n, -1, k)
        return (torch.logsumexp(blocks, -1) - math.log(k)).mean(-1)

    def to_bits_per_dim(self, nats):
        """nats per example -> bits per dimension, ``nats / (D ln 2)``."""
        return nats_to_bits_per_dim(nats, self.dims)

    @property
    def bits_per_dim(self) -> torch.Tensor:
        r""":math:`-\mathrm{IWAE}_K` in bits/dim, shape ``(N,)``: an estimate of an upper bound on
        :math:`-\log_2 p_\theta(x_0) / D` (on the decoder's scale, as the ELBO's bits/dim)."""
        return self.to_bits_per_dim(-self.estimate)

    @property
    def stderr_bits_per_dim(self) -> torch.Tensor:
        return self.to_bits_per_dim(self.stderr)


def default_chunk_size(num_examples: int, num_steps: int, budget: int = DEFAULT_BUDGET) -> int:
    """Particles per chunk so that a chunk's network call sees about ``budget`` inputs (P * N * T), at least 1."""
    return max(1, budget // (num_examples * num_steps))


@torch.no_grad()
def log_likelihood_bound(
    model,
    x0: torch.Tensor,
    num_particles: int = 1,
    *,
    chunk_size: int | None = None,
    progress: bool = False,
) -> LikelihoodBound:
    r"""The importance-weighted bound :math:`\mathrm{IWAE}_K(x_0)` of every example, with the forward chain
    :math:`q(x_{1:T} \mid x_0)` as proposal (see the module docstring).

    :param model: a reverse-chain Pyro model with the sites of :class:`~pyrodiff.chain.reverse.DiffusionModel`
        (``"x_{1:T}"`` in the plates ``time`` and ``data``, the observed ``"x_0"``), called as ``model(x0)``,
        and a ``schedule`` attribute.
    :param x0: data ``(N, *D)`` on the model's device.
    :param num_particles: K >= 1, paths drawn from the guide per example.
    :param chunk_size: particles P drawn per trace (the batch is P * N and the network sees P * N * T
        inputs); by default as many as keep that near :data:`DEFAULT_BUDGET`, at least 1.  Only the
        ``(N, K)`` log weights are kept between chunks.
    :param progress: show a progress bar over the chunks.
    """
    checks.positive_int("num_particles", num_particles)
    if chunk_size is not None:
        checks.positive_int("chunk_size", chunk_size)
    check_batch(x0)
    schedule = getattr(model, "schedule", None)
    if schedule is None:
        raise TypeError(f"the model must have a noise schedule attribute `schedule`; got {type(model).__name__}")
    guide = DiffusionGuide(schedule, order="posterior")
    N, K, T = x0.shape[0], num_particles, schedule.num_steps
    P = min(K, chunk_size or default_chunk_size(N, T))
    repeat = (1,) * (x0.dim() - 1)
    chunks = []
    bar = tqdm(total=K, desc="likelihood", unit="particle", disable=not progress, mininterval=1.0, leave=False)
    for start in range(0, K, P):
        p = min(P, K - start)
        data = x0.repeat((p,) + repeat)  # row i * N + n holds example n (particle i)
        guide_trace = poutine.trace(guide).get_trace(data)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(data)
        log_w = -trace_terms(model_trace, guide_trace).sum(-1)  # (p * N,)
        chunks.append(log_w.reshape(p, N).T)
        bar.update(p)
    bar.close()
    log_weights = torch.cat(chunks, dim=1)
    if torch.isnan(log_weights).any() or (log_weights == math.inf).any():
        raise FloatingPointError(
            "a log importance weight is NaN or +inf: the model's log-density is broken on a path of the guide"
        )
    return LikelihoodBound.from_log_weights(log_weights, int(x0[0].numel()))
