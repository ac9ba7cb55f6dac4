r"""The probability-flow ODE of a variance-preserving diffusion, parameterised by the log-SNR.

The forward process :math:`x_t = \alpha x_0 + \sigma\epsilon` with :math:`\alpha^2 = \mathrm{sigmoid}(\lambda)`,
:math:`\sigma^2 = \mathrm{sigmoid}(-\lambda)`, :math:`\lambda` the log-SNR, has marginals that the deterministic
flow (Song et al. 2021, eq. 13; docs/MATH.md, "The score and the probability-flow ODE")

.. math:: \frac{dx}{d\tau} = f\,x - \tfrac12 g^2\,s(x, \tau)
          = \tfrac12\,\lambda'(\tau)\,\big(\sigma^2 x - \sigma\,\hat\epsilon(x, \tau)\big)

shares, for any time variable :math:`\tau` with log-SNR :math:`\lambda(\tau)` (with :math:`f = \tfrac12\sigma^2\lambda'`,
:math:`g^2 = -\sigma^2\lambda'`, :math:`s = -\hat\epsilon/\sigma` the score); in :math:`\tau = \lambda` it is DDIM's ODE,
:math:`d(x/\alpha) = -\tfrac12 e^{-\lambda/2}\hat\epsilon\,d\lambda` (Song, Meng & Ermon 2021, eq. 14).
:class:`ProbabilityFlow` holds a log-SNR function of time and a noise prediction function of :math:`(x, \tau)`,
so that any model plugs in: a continuous-time model with :math:`\gamma(t) = -\lambda(t)` as
``ProbabilityFlow(lambda t: -gamma(t), noise, start, end)``, and a discrete one through
:meth:`ProbabilityFlow.of`, the continuous extension of its schedule:

- the log-SNR is interpolated linearly in a continuous timestep :math:`u \in [1, T]` through the knots
  :math:`(t, \lambda_t)` (:func:`continuous_log_snr`), and the network is fed the real :math:`u`
  (:func:`continuous_timestep`, exact at the knots: at :math:`u = t` it is the discrete network's output);
- the flow's time is :math:`\tau = \lambda` itself, from :math:`\lambda_1` (the first step's noise level, where the
  data are taken to be) to :math:`\lambda_T` (where :math:`N(0, I)` is the prior): in :math:`\lambda` the drift is
  continuous (the kinks of the interpolation move into the network's input), so an adaptive solver meets no jump.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .. import checks
from .continuous import ContinuousDiffusionModel
from .reverse import DiffusionModel, _RespacedNetwork

__all__ = ["ProbabilityFlow", "continuous_timestep", "continuous_log_snr", "solve", "METHODS", "MAX_KNOTS"]


class ProbabilityFlow:
    r""":math:`dx/d\tau = \tfrac12\lambda'(\tau)(\sigma^2 x - \sigma\hat\epsilon(x, \tau))` between ``start`` (the data
    end) and ``end`` (the noise end, prior :math:`N(0, I)`); module docstring.

    :param log_snr: :math:`\tau \mapsto \lambda(\tau)` on a 0-dim tensor, differentiable (:math:`\lambda'` is taken by
        forward-mode autodiff).
    :param noise: :math:`(x, \tau) \mapsto \hat\epsilon(x, \tau)`, ``x`` of shape ``(N, *D)`` and ``tau`` a 0-dim tensor,
        batch-independent (example n's output depends on example n only) and written in functional torch
        operations, so that ``torch.func.jvp`` and ``vmap`` apply.
    :param start: :math:`\tau` at the data end.
    :param end: :math:`\tau` at the noise end.
    :param knots: times where the drift is continuous but not smooth (the knots of an interpolation): the solver steps
        onto each of them, so that no step straddles a kink and its error estimate holds.
    """

    def __init__(
        self,
        log_snr: Callable[[torch.Tensor], torch.Tensor],
        noise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        start: float,
        end: float,
        knots: Sequence[float] = (),
    ) -> None:
        if not (callable(log_snr) and callable(noise)):
            raise TypeError("log_snr and noise must be callables")
        if not (start == start and end == end) or start == end:
            raise ValueError(f"the flow needs two different finite times, got start={start} and end={end}")
        self.log_snr, self.noise, self.start, self.end = log_snr, noise, float(start), float(end)
        self.knots = tuple(float(k) for k in knots if min(start, end) < k < max(start, end))

    @classmethod
    def of(cls, model: DiffusionModel | ContinuousDiffusionModel | ProbabilityFlow) -> ProbabilityFlow:
        r"""The flow of a model: a flow passes through; a continuous-time
        :class:`~pyrodiff.chain.continuous.ContinuousDiffusionModel` runs in :math:`\tau = \lambda = -\gamma` from
        :math:`-\gamma_0` to :math:`-\gamma_1` with its network at :math:`c(\gamma)` (the schedule's interior plays no
        part: in :math:`\lambda` the flow does not depend on it); a :class:`~pyrodiff.chain.reverse.DiffusionModel` gives the
        continuous extension of its schedule (module docstring), time :math:`\tau = \lambda` from :math:`\lambda_1` to
        :math:`\lambda_T`, the network fed :math:`u(\lambda)` and its output read as :math:`\hat\epsilon` by the model's
        prediction target with :math:`\bar\alpha = \mathrm{sigmoid}(\lambda)` (a model with a ``noise_level`` input is
        fed :math:`c(-\lambda)` instead, continuous in :math:`\lambda` without interpolation); for T <= :data:`MAX_KNOTS` the solver
        steps onto every :math:`\lambda_t` (where :math:`u(\lambda)` has its kinks; above that the kinks are slight and
        stepping onto each would cost T steps).  A respaced model is refused (the
        adaptive solver chooses its own steps: pass the original model)."""
        if isinstance(model, ProbabilityFlow):
            return model
        if isinstance(model, ContinuousDiffusionModel):
            gamma_0, gamma_1 = (g.item() for g in model.schedule.endpoints())

            def level(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
                return model.eps_hat(x, (-lam).clamp(gamma_0, gamma_1).to(x.dtype).expand(x.shape[0]))

            return cls(_identity, level, -gamma_0, -gamma_1)
        if not isinstance(model, DiffusionModel):
            raise TypeError(
                f"expected a DiffusionModel, a ContinuousDiffusionModel or a ProbabilityFlow, got {type(model).__name__}"
            )
        if isinstance(model.network, _RespacedNetwork):
            raise ValueError(
                "the probability-flow ODE of a respaced model is that of its original network: pass the original "
                "model (the adaptive solver chooses its own steps)"
            )
        table = model.schedule.tables().log_snr.detach()
        level = model.noise_level

        def noise(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
            if level is None:
                step = continuous_timestep(table.to(lam.device), lam)
            else:
                step = level(-lam.clamp(table[-1].item(), table[0].item()))
            abar = torch.sigmoid(lam).to(x.dtype)
            return model.predicted_noise(x, step.to(x.dtype).expand(x.shape[0]), abar)

        knots = table[1:-1].tolist() if level is None and len(table) <= MAX_KNOTS else ()
        return cls(_identity, noise, table[0].item(), table[-1].item(), knots)

    def drift(self, tau: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\tfrac12\lambda'(\tau)(\sigma^2 x - \sigma\hat\epsilon(x, \tau))` at the 0-dim time ``tau``."""
        lam, dlam = torch.func.jvp(self.log_snr, (tau,), (torch.ones_like(tau),))
        sigma2 = torch.sigmoid(-lam).to(x.dtype)
        return 0.5 * dlam.to(x.dtype) * (sigma2 * x - sigma2.sqrt() * self.noise(x, tau))

    def drift_and_jvps(
        self, tau: torch.Tensor, x: torch.Tensor, directions: torch.Tensor, chunk_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The drift :math:`f(x, \tau)` and its Jacobian-vector products :math:`(\partial f / \partial x)\,v` for each
        direction ``directions[k]`` (shape ``(K, N, *D)``), by forward-mode autodiff batched over k
        (``torch.func.vmap`` of ``torch.func.jvp``; ``chunk_size`` directions at a time)."""

        def one(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.func.jvp(lambda y: self.drift(tau, y), (x,), (v,))

        values, products = torch.func.vmap(one, chunk_size=chunk_size)(directions)
        return values[0], products

    def drift_and_divergence(
        self, tau: torch.Tensor, x: torch.Tensor, probes: torch.Tensor | None = None, chunk_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The drift and its divergence :math:`\nabla_x\cdot f` for each example: exact (``probes`` None), the trace
        from D Jacobian-vector products along the unit vectors, shape ``(1, N)``; or Hutchinson's estimates
        :math:`v^\top(\partial f/\partial x)v` for each probe ``probes[k]`` (``(K, N, *D)``, entries of mean 0 and
        covariance I), shape ``(K, N)``, each unbiased (Hutchinson 1990)."""
        if probes is not None:
            drift, products = self.drift_and_jvps(tau, x, probes, chunk_size)
            return drift, (probes * products).flatten(2).sum(2)
        N, D = x.shape[0], x[0].numel()
        basis = torch.eye(D, dtype=x.dtype, device=x.device).reshape((D, 1) + x.shape[1:])
        drift, products = self.drift_and_jvps(tau, x, basis.expand((D,) + x.shape), chunk_size)
        return drift, products.reshape(D, N, D).diagonal(dim1=0, dim2=2).sum(1)[None]  # sum_i d f_i / d x_i


def continuous_timestep(log_snr: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    r"""The continuous timestep :math:`u \in [1, T]` at log-SNR ``lam`` (a 0-dim tensor) on the piecewise-linear
    interpolation of the knots :math:`(t, \lambda_t)`, ``log_snr`` the table :math:`\lambda_1 > \dots > \lambda_T`:
    :math:`u = i + (\lambda_i - \lambda)/(\lambda_i - \lambda_{i+1})` for :math:`\lambda_{i+1} \le \lambda \le \lambda_i`
    (exactly t at :math:`\lambda = \lambda_t`).  Beyond the knots u stays at 1 or T (a constant extension: the solvers
    probe there only to choose their first step, and :func:`solve` never steps past the end)."""
    T = log_snr.shape[0]
    lam = lam.to(log_snr.dtype).clamp(log_snr[-1], log_snr[0])
    j = torch.searchsorted(log_snr.flip(0), lam.reshape(1)).clamp(1, T - 1)[0]
    i = T - j  # lambda_{i+1} <= lam <= lambda_i
    upper, lower = log_snr[i - 1], log_snr[i]
    return i.to(log_snr.dtype) + (upper - lam) / (upper - lower)


#: the largest T whose knots :math:`\lambda_t` the solver steps onto (:meth:`ProbabilityFlow.of`)
MAX_KNOTS = 100

#: the adaptive ``torchdiffeq`` methods :func:`solve` accepts
METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


def solve(
    drift: Callable, state, start: float, end: float, rtol: float, atol: float, method: str, knots: Sequence[float] = ()
) -> tuple[object, int]:
    r"""``state`` at ``end`` by ``torchdiffeq.odeint`` from ``start`` with the adaptive ``method`` (one of
    :data:`METHODS`) and tolerances ``rtol``, ``atol``, stepping exactly onto ``knots`` and ``end`` (its ``step_t``
    option; torchdiffeq's steps may otherwise pass the end and interpolate back), without gradients; and the number of
    evaluations of ``drift(tau, state)``."""
    from torchdiffeq import odeint  # imported here: only the ODE sampler and likelihood need it

    checks.one_of("method", method, METHODS)
    checks.number("rtol", rtol, 0, lo_open=True)
    checks.number("atol", atol, 0, lo_open=True)
    like = state[0] if isinstance(state, tuple) else state
    times = torch.tensor([start, end], dtype=like.dtype, device=like.device)
    count = 0

    def counted(tau, y):
        nonlocal count
        count += 1
        return drift(tau, y)

    with torch.no_grad():
        steps = torch.tensor(sorted({*knots, end}), dtype=like.dtype, device=like.device)
        out = odeint(counted, state, times, rtol=rtol, atol=atol, method=method, options={"step_t": steps})
    final = tuple(o[-1] for o in out) if isinstance(out, tuple) else out[-1]
    return final, count


def continuous_log_snr(log_snr: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    r""":math:`\lambda(u)` on the piecewise-linear interpolation of the knots :math:`(t, \lambda_t)` (``log_snr`` the
    table, entry t - 1), for real ``u`` in [1, T] of any shape: the inverse of :func:`continuous_timestep`."""
    T = log_snr.shape[0]
    u = u.to(log_snr.dtype)
    if not bool(((u >= 1) & (u <= T)).all()):
        raise ValueError(f"continuous timesteps must lie in [1, T] = [1, {T}]")
    i = u.floor().long().clamp(1, T - 1)
    return log_snr[i - 1] + (u - i) * (log_snr[i] - log_snr[i - 1])


def _identity(tau: torch.Tensor) -> torch.Tensor:
    return tau
