r"""The exact likelihood of the probability-flow ODE, by the instantaneous change of variables.

For the flow :math:`dx/d\tau = f(x, \tau)` of a model (:class:`~pyrodiff.chain.probability_flow.ProbabilityFlow`),
started from the prior :math:`N(0, I)` at the noise end :math:`\tau_1` and run to the data end :math:`\tau_0`, the
density of :math:`x(\tau_0)` obeys :math:`d\log p(x(\tau))/d\tau = -\nabla\cdot f` (Chen et al. 2018, theorem 1), so

.. math:: \log p^\text{ODE}_\theta(x) = \log N(x(\tau_1); 0, I) + \int_{\tau_0}^{\tau_1} \nabla\cdot f(x(\tau), \tau)\,d\tau,

solving :math:`[x, \int\nabla\cdot f]` from :math:`x(\tau_0) = x` to :math:`\tau_1` (Song et al. 2021, appendix D.2;
docs/MATH.md, "The score and the probability-flow ODE").  The divergence is

- ``"exact"``: the trace of the Jacobian from D Jacobian-vector products along the unit vectors, batched
  (``torch.func.vmap`` of ``jvp``): D network evaluations' worth of work per drift evaluation;
- ``"hutchinson"``: :math:`E_v[v^\top (\partial f/\partial x) v]` with K probes :math:`v` (Rademacher or Gaussian)
  drawn once per example and held fixed along the solve (FFJORD, Grathwohl et al. 2019): each probe gives an unbiased
  estimate of the log-likelihood, and their spread its standard error (NaN for K = 1).

**Where it starts.**  The ODE cannot start at :math:`\lambda = \infty`.  A continuous-time model starts at
:math:`\lambda = -\gamma_0` (VDM's :math:`\gamma_0 = -13.3`: :math:`\sigma^2 \approx 1.7 \times 10^{-6}`).  A
discrete-time model starts at the first step's log-SNR :math:`\lambda_1` (the decoder's noise level, :math:`\sigma_1^2 = 1 - \bar\alpha_1`): the number
is the density of :math:`x` as the flow's variable at that noise level, :math:`p^\text{ODE}_\theta(x_{\lambda_1})`,
with the data taken as that variable (the :math:`\epsilon = 10^{-5}` caveat of Song et al. 2021): a smoothed model of
the data, not the reverse chain's :math:`p_\theta(x_0)` with its decoder.

**Discrete data.**  With ``levels`` (data on a grid of that many values in [-1, 1], spacing :math:`\Delta = 2/(L - 1)`),
the data are dequantised uniformly, :math:`y = x + u`, :math:`u \sim U(-\Delta/2, \Delta/2)^D` (one draw per example),
and :math:`P(x) = \int_{\text{bin}(x)} p^\text{ODE}(y)\,dy \ge \Delta^D \exp E_u\log p^\text{ODE}(x + u)` (Jensen), a
distribution on the grid (its bins tile the line around the grid), so
:math:`-\log p^\text{ODE}(x + u) - D\log\Delta` is an unbiased estimate of an **upper bound on the negative
log-likelihood of the discrete data** under the ODE model's binned law: the quantity reported, in bits/dim on the same
L-level scale as the ELBO's discretized decoder (Theis et al. 2016; Song et al. 2021, appendix D.2).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .. import checks
from ..chain.continuous import ContinuousDiffusionModel
from ..chain.decoders import check_levels_grid
from ..chain.forward import check_batch
from ..chain.probability_flow import ProbabilityFlow, solve
from ..chain.reverse import DiffusionModel
from .bound import nats_to_bits_per_dim

__all__ = ["ode_log_likelihood", "ODELikelihood", "EXACT_DIVERGENCE_MAX_DIMS"]

#: the largest D whose divergence is exact by default: D Jacobian-vector products per drift evaluation cost about
#: D network calls of work, affordable for the bundled data (gaussians8: 2, digits: 64)
EXACT_DIVERGENCE_MAX_DIMS = 128

_LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class ODELikelihood:
    r"""The probability-flow ODE's log-likelihood of each example and how it was computed.

    ``log_likelihood`` ``(N,)`` (nats): :math:`\log p^\text{ODE}_\theta(x)` (continuous data) or, dequantised,
    :math:`\log p^\text{ODE}_\theta(x + u) + D\log\Delta`, the estimate of a lower bound on the discrete
    log-likelihood; ``stderr`` ``(N,)`` its standard error over the Hutchinson probes (0 for the exact divergence, NaN
    for one probe).  ``probes`` ``(N, K)``: the estimate of each probe.  ``nfe``: drift evaluations of the solve;
    ``seconds``: its wall time; ``rtol``, ``atol``, ``method``: the solver's; ``divergence``: ``"exact"`` or
    ``"hutchinson"``; ``start``, ``end``: the times the flow ran between; ``levels``: the grid's, or None; ``dims``: D.
    """

    log_likelihood: torch.Tensor
    stderr: torch.Tensor
    probes: torch.Tensor
    nfe: int
    seconds: float
    rtol: float
    atol: float
    method: str
    divergence: str
    start: float
    end: float
    levels: int | None
    dims: int

    @property
    def dequantised(self) -> bool:
        return self.levels is not None

    def bits_per_dim(self) -> torch.Tensor:
        r"""``-log_likelihood`` in bits/dim, ``(N,)``: for discrete data an upper bound on :math:`-\log_2 P(x) / D`."""
        return nats_to_bits_per_dim(-self.log_likelihood, self.dims)

    def summary(self) -> dict:
        r"""The mean negative log-likelihood over the examples (nats and bits/dim) with its standard error across
        examples (which includes the probes' noise: each example's estimate is unbiased), and how it was computed."""
        nll = -self.log_likelihood.double()
        n = nll.numel()
        se = (nll.std() / math.sqrt(n)).item() if n > 1 else float("nan")
        return {
            "quantity": (
                f"upper bound on -log P(x) of the {self.levels}-level data (uniform dequantisation)"
                if self.dequantised
                else "-log p_ODE(x) (density at the first step's noise level)"
            ),
            "negative_log_likelihood_nats": nll.mean().item(),
            "stderr_nats": se,
            "bits_per_dim": nats_to_bits_per_dim(nll.mean(), self.dims).item(),
            "bits_per_dim_stderr": se / (self.dims * math.log(2)),
            "examples": n,
            "nfe": self.nfe,
            "seconds": self.seconds,
            "rtol": self.rtol,
            "atol": self.atol,
            "method": self.method,
            "divergence": self.divergence,
            "probes": self.probes.shape[1] if self.divergence == "hutchinson" else 0,
            "start": self.start,
            "end": self.end,
        }


def ode_log_likelihood(
    model: DiffusionModel | ContinuousDiffusionModel | ProbabilityFlow,
    x0: torch.Tensor,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    divergence: str | None = None,
    num_probes: int = 1,
    probe: str = "rademacher",
    levels: int | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> ODELikelihood:
    r""":math:`\log p^\text{ODE}_\theta(x_0)` of each example by the instantaneous change of variables (module
    docstring), solved with ``torchdiffeq.odeint`` in the data's dtype and on its device (float64 data and network
    recommended: the tolerances then bind, not rounding).

    :param model: a :class:`~pyrodiff.chain.reverse.DiffusionModel` (its continuous extension), a
        :class:`~pyrodiff.chain.continuous.ContinuousDiffusionModel` (:meth:`ProbabilityFlow.of
        <pyrodiff.chain.probability_flow.ProbabilityFlow.of>`) or a ``ProbabilityFlow``.
    :param x0: data ``(N, *D)``.
    :param rtol: the solver's relative tolerance (on :math:`x` and the integrated divergence alike).
    :param atol: the solver's absolute tolerance.
    :param method: an adaptive ``torchdiffeq.odeint`` method (:data:`~pyrodiff.chain.probability_flow.METHODS`).
    :param divergence: ``"exact"`` or ``"hutchinson"``; by default exact for D <= :data:`EXACT_DIVERGENCE_MAX_DIMS`.
    :param num_probes: Hutchinson's probes per example, K >= 1 (K >= 2 gives a per-example standard error).
    :param probe: ``"rademacher"`` (entries +-1; the smaller variance) or ``"gaussian"``.
    :param levels: dequantise data on a grid of this many levels in [-1, 1] (module docstring); by default the
        model's discretized decoder's levels (None for the Gaussian decoder or a flow: continuous data).
    :param generator: draws the probes and the dequantisation noise.
    :param chunk_size: directions per batched Jacobian-vector product (all at once by default).
    """
    flow = ProbabilityFlow.of(model)
    check_batch(x0)
    if not x0.is_floating_point() or not torch.isfinite(x0).all():
        raise ValueError("x0 must be a finite floating-point tensor")
    D = x0[0].numel()
    divergence = checks.one_of(
        "divergence", divergence or ("exact" if D <= EXACT_DIVERGENCE_MAX_DIMS else "hutchinson"), _DIVERGENCES
    )
    checks.positive_int("num_probes", num_probes)
    checks.one_of("probe", probe, ("rademacher", "gaussian"))
    if levels is None and not isinstance(model, ProbabilityFlow):
        levels = model.decoder.levels
    x = x0
    if levels is not None:
        checks.integer("levels", levels, 2)
        check_levels_grid(x0, levels)
        width = 2 / (levels - 1)
        u = torch.rand(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        x = x0 + (u - 0.5) * width
    N = x.shape[0]
    probes = None
    if divergence == "hutchinson":
        shape = (num_probes,) + x.shape
        if probe == "gaussian":
            probes = torch.randn(shape, generator=generator, dtype=x.dtype, device=x.device)
        else:
            probes = torch.randint(0, 2, shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1

    def augmented(tau: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return flow.drift_and_divergence(tau, state[0], probes, chunk_size)

    K = 1 if divergence == "exact" else num_probes
    began = time.perf_counter()
    (x_end, integral), nfe = solve(
        augmented, (x, x.new_zeros(K, N)), flow.start, flow.end, rtol, atol, method, flow.knots
    )
    seconds = time.perf_counter() - began
    prior = -0.5 * (x_end.flatten(1) ** 2).sum(1) - 0.5 * D * _LOG_2PI
    per_probe = (prior + integral).T  # (N, K)
    if levels is not None:
        per_probe = per_probe + D * math.log(2 / (levels - 1))
    estimate = per_probe.mean(1)
    if divergence == "exact":
        stderr = torch.zeros_like(estimate)
    else:
        stderr = per_probe.std(1) / math.sqrt(K) if K > 1 else torch.full_like(estimate, float("nan"))
    return ODELikelihood(
        estimate, stderr, per_probe, nfe, seconds, rtol, atol, method, divergence, flow.start, flow.end, levels, D
    )


_DIVERGENCES = ("exact", "hutchinson")
