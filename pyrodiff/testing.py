r"""Tools to property-test diffusion code: hypothesis strategies and an exactly solvable model.

Strategies (for ``@hypothesis.given``): :func:`schedules`, :func:`timesteps`, :func:`data_batches`,
:func:`linear_denoisers`.

:class:`EndpointSchedule` is the smallest schedule with parameters (its two log-SNR endpoints), for tests of what
trains, checkpoints and validates a schedule's parameters.

:class:`LinearDenoiser` is a network linear in :math:`x_t`, ``out = a_t x_t + b_t``; with it every
parameterisation gives a reverse mean :math:`\mu_\theta = c_t x_t + d_t`, and
:func:`linear_elbo_terms` gives every term :math:`L_0 .. L_T` of the bound in closed form (float64),
derived here from Gaussian moments and independently of the Pyro program: the oracle for
statistical tests of any ELBO estimator.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

try:
    from hypothesis import strategies as st
    from hypothesis.extra.numpy import arrays
    from scipy.special import log_ndtr
except ImportError as e:  # pragma: no cover
    raise ImportError(f"pyrodiff.testing needs the testing extra: pip install 'pyrodiff[testing]' ({e})") from e

from . import checks
from .chain.schedule import NoiseSchedule, Schedule, ScheduleTables
from .theory.exact import AffineDenoiser

__all__ = [
    "schedules",
    "timesteps",
    "data_batches",
    "linear_denoisers",
    "LinearDenoiser",
    "linear_elbo_terms",
    "linear_case",
    "AffineDenoiser",
    "EndpointSchedule",
]


class EndpointSchedule(Schedule):
    r"""A schedule whose parameters are its log-SNR endpoints :math:`\lambda_1` (``log_snr_max``) and
    :math:`\lambda_T` (``log_snr_min``), with a fixed interior, linear in t:
    :math:`\lambda_t = \lambda_1 + (\lambda_T - \lambda_1)\,\frac{t - 1}{T - 1}`, and the tables of
    :meth:`~pyrodiff.chain.schedule.ScheduleTables.from_log_snr`.  For tests of the machinery (gradients through the
    program, training, checkpoints, validation), not a schedule to learn with: its interior cannot move.  T >= 2;
    parameters in float64."""

    def __init__(self, num_steps: int, log_snr_max: float = 6.0, log_snr_min: float = -6.0) -> None:
        checks.integer("num_steps", num_steps, minimum=2)
        super().__init__(num_steps, {"kind": "endpoints", "log_snr_max": log_snr_max, "log_snr_min": log_snr_min})
        self.log_snr_max = nn.Parameter(torch.tensor(float(log_snr_max), dtype=torch.float64))
        self.log_snr_min = nn.Parameter(torch.tensor(float(log_snr_min), dtype=torch.float64))
        self.register_buffer("fraction", torch.linspace(0, 1, num_steps, dtype=torch.float64), persistent=False)

    def tables(self) -> ScheduleTables:
        log_snr = self.log_snr_max + (self.log_snr_min - self.log_snr_max) * self.fraction
        return ScheduleTables.from_log_snr(log_snr)


@st.composite
def schedules(draw, min_steps: int = 2, max_steps: int = 20) -> NoiseSchedule:
    """Valid schedules: linear, cosine, sigmoid, or random betas in [1e-4, 0.5]."""
    T = draw(st.integers(min_steps, max_steps))
    kind = draw(st.sampled_from(["linear", "cosine", "sigmoid", "random"]))
    if kind == "linear":
        start = draw(st.floats(1e-4, 0.05))
        return NoiseSchedule.linear(T, start, draw(st.floats(start, 0.5)))
    if kind == "cosine":
        return NoiseSchedule.cosine(T)
    if kind == "sigmoid":
        return NoiseSchedule.sigmoid(T)
    betas = draw(arrays(np.float64, T, elements=st.floats(1e-4, 0.5)))
    return NoiseSchedule.from_betas(torch.tensor(betas))


def timesteps(schedule: NoiseSchedule, min_t: int = 1) -> st.SearchStrategy[int]:
    """A math timestep in ``min_t..T``."""
    return st.integers(min_t, schedule.num_steps)


def data_batches(
    max_examples: int = 4, max_dim: int = 4, levels: int | None = None, dtype: torch.dtype = torch.float64
) -> st.SearchStrategy[torch.Tensor]:
    """Batches ``(N, D)`` in [-1, 1]; on the grid of ``levels`` values when given."""

    @st.composite
    def batch(draw):
        n, d = draw(st.integers(1, max_examples)), draw(st.integers(1, max_dim))
        if levels is None:
            x = draw(arrays(np.float64, (n, d), elements=st.floats(-1, 1)))
        else:
            x = 2 * draw(arrays(np.int64, (n, d), elements=st.integers(0, levels - 1))) / (levels - 1) - 1
        return torch.tensor(x, dtype=dtype)

    return batch()


class LinearDenoiser(nn.Module):
    """``network(x_t, t) = a[t-1] * x_t + b[t-1]``: a network linear in :math:`x_t`, one scalar pair per t.
    Given ``v``, it also outputs the constant ``v[t-1]`` as a second half of the channels (dim 1), the
    interpolation output of learned variances."""

    def __init__(
        self,
        num_steps: int,
        a: torch.Tensor | None = None,
        b: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(num_steps) if a is None else torch.as_tensor(a).clone())
        self.b = nn.Parameter(torch.zeros(num_steps) if b is None else torch.as_tensor(b).clone())
        self.v = None if v is None else nn.Parameter(torch.as_tensor(v).clone())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x.dim() - 1)
        out = self.a[t - 1].reshape(shape) * x + self.b[t - 1].reshape(shape)
        if self.v is None:
            return out
        return torch.cat([out, self.v[t - 1].reshape(shape).expand_as(x)], dim=1)


def linear_denoisers(num_steps: int, dtype: torch.dtype = torch.float64) -> st.SearchStrategy[LinearDenoiser]:
    """Linear denoisers with coefficients in [-1, 1]."""
    coef = arrays(np.float64, num_steps, elements=st.floats(-1, 1))
    return st.builds(
        lambda a, b: LinearDenoiser(num_steps, torch.tensor(a, dtype=dtype), torch.tensor(b, dtype=dtype)), coef, coef
    )


def linear_reverse_coefficients(
    schedule: NoiseSchedule, a, b, prediction: str, eta: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    r""":math:`c_t, d_t` (arrays over t = 1..T) with :math:`\mu_\theta(x_t, t) = c_t x_t + d_t` for the
    network ``a_t x_t + b_t`` under ``prediction``: DDPM's mean (Ho et al. 2020, eq. 7 and 11), or for
    ``eta != 1`` the mean of DDIM's step (Song et al. 2021, eq. 12), :math:`\sqrt{\bar\alpha_{t-1}}\,\hat x_0 +
    \sqrt{1 - \bar\alpha_{t-1} - \sigma_t^2}\,\hat\epsilon` with :math:`\sigma_t^2 = \eta^2\tilde\beta_t`."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    beta = schedule.betas.numpy()
    alpha = 1 - beta
    abar = np.cumprod(alpha)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    if eta != 1:
        # x0_hat = e x_t + f; eps_hat = (x_t - sqrt(abar) x0_hat) / sqrt(1 - abar)
        e, f = {
            "epsilon": ((1 - np.sqrt(1 - abar) * a) / np.sqrt(abar), -np.sqrt(1 - abar) * b / np.sqrt(abar)),
            "x0": (a, b),
            "v": (np.sqrt(abar) - np.sqrt(1 - abar) * a, -np.sqrt(1 - abar) * b),
        }[prediction]
        r = np.sqrt(np.maximum(1 - abar_prev - eta**2 * beta * (1 - abar_prev) / (1 - abar), 0)) / np.sqrt(1 - abar)
        return np.sqrt(abar_prev) * e + r * (1 - np.sqrt(abar) * e), np.sqrt(abar_prev) * f - r * np.sqrt(abar) * f
    P = np.sqrt(abar_prev) * beta / (1 - abar)
    Q = np.sqrt(alpha) * (1 - abar_prev) / (1 - abar)
    if prediction == "epsilon":
        return (1 - beta * a / np.sqrt(1 - abar)) / np.sqrt(alpha), -beta * b / np.sqrt((1 - abar) * alpha)
    if prediction == "x0":
        return P * a + Q, P * b
    if prediction == "v":
        return P * (np.sqrt(abar) - np.sqrt(1 - abar) * a) + Q, -P * np.sqrt(1 - abar) * b
    raise ValueError(prediction)


def linear_elbo_terms(
    schedule: NoiseSchedule,
    a,
    b,
    x0: torch.Tensor,
    prediction: str = "epsilon",
    variance: str = "small",
    levels: int | None = None,
    quadrature_points: int = 80,
    v=None,
    eta: float = 1.0,
) -> np.ndarray:
    r"""Every term of the bound, shape ``(N, T + 1)`` (column k is :math:`L_k`, nats), for the model with
    network :class:`LinearDenoiser` ``(a, b)`` (and ``v`` for learned variances, where
    :math:`\sigma_t^2 = \beta_t^f \tilde\beta_t^{1-f}`, :math:`f = (v_t + 1)/2`, :math:`\tilde\beta_1 := \tilde\beta_2`).
    With :math:`x_t \sim N(m x_0, s^2)`:

    - :math:`L_{t-1} = \tfrac12\sum_d \big[\log\frac{\sigma_t^2}{\tilde\beta_t} + \frac{\tilde\beta_t}{\sigma_t^2} - 1
      + \frac{(A x_0 - d + (B - c) m x_0)^2 + (B - c)^2 s^2}{\sigma_t^2}\big]`, where :math:`A x_0 + B x_t`
      is the posterior mean,
    - :math:`L_0` (Gaussian) :math:`= \tfrac12\sum_d \big[\log 2\pi\sigma_1^2 + \frac{((1 - c m) x_0 - d)^2 + c^2 s^2}{\sigma_1^2}\big]`;
      discretized: Gauss-Hermite quadrature over :math:`x_1` of the exact bin mass (scipy's ``log_ndtr``),
    - :math:`L_T = \tfrac12\sum_d \big[s^2 + m^2 x_0^2 - 1 - \log s^2\big]`.

    With ``eta != 1``, the model is DDIM's (``model.ddim(eta)``): the posterior is Song et al.'s
    :math:`q_\sigma` (their eq. 7, variance :math:`\eta^2\tilde\beta_t` in place of :math:`\tilde\beta_t`), the
    steps have that variance for t >= 2, and the decoder keeps ``variance``.
    """
    x = x0.detach().double().reshape(x0.shape[0], -1).numpy()
    T = schedule.num_steps
    c, d = linear_reverse_coefficients(schedule, a, b, prediction, eta)
    beta = schedule.betas.numpy()
    alpha = 1 - beta
    abar = np.cumprod(alpha)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    beta_tilde = beta * (1 - abar_prev) / (1 - abar)
    small = np.concatenate([[beta_tilde[1]], beta_tilde[1:]])
    if variance == "learned":
        f = (np.asarray(v, np.float64) + 1) / 2
        sigma2 = beta**f * small ** (1 - f)
    else:
        sigma2 = small if variance == "small" else np.concatenate([[beta_tilde[1]], beta[1:]])
    A = np.sqrt(abar_prev) * beta / (1 - abar)
    B = np.sqrt(alpha) * (1 - abar_prev) / (1 - abar)
    if eta != 1:  # Song et al.'s q_sigma: x_{t-1} = A x_0 + B x_t + N(0, eta^2 beta_tilde)
        beta_tilde = eta**2 * beta_tilde
        B = np.sqrt(np.maximum(1 - abar_prev - beta_tilde, 0)) / np.sqrt(1 - abar)
        A = np.sqrt(abar_prev) - B * np.sqrt(abar)
        sigma2 = np.concatenate([sigma2[:1], beta_tilde[1:]])
    m, s2 = np.sqrt(abar), 1 - abar
    terms = np.zeros((x.shape[0], T + 1))
    for t in range(2, T + 1):
        i = t - 1
        bias = A[i] * x - d[i] + (B[i] - c[i]) * m[i] * x
        quad = (bias**2 + (B[i] - c[i]) ** 2 * s2[i]) / sigma2[i]
        terms[:, t - 1] = 0.5 * (np.log(sigma2[i] / beta_tilde[i]) + beta_tilde[i] / sigma2[i] - 1 + quad).sum(1)
    if levels is None:
        quad = (((1 - c[0] * m[0]) * x - d[0]) ** 2 + c[0] ** 2 * s2[0]) / sigma2[0]
        terms[:, 0] = 0.5 * (np.log(2 * math.pi * sigma2[0]) + quad).sum(1)
    else:
        z, w = np.polynomial.hermite_e.hermegauss(quadrature_points)
        w = w / w.sum()
        mean = (c[0] * m[0] * x + d[0])[..., None] + c[0] * math.sqrt(s2[0]) * z
        sd, h = math.sqrt(sigma2[0]), 1 / (levels - 1)
        upper = np.where(x[..., None] > 1 - h / 2, np.inf, (x[..., None] + h - mean) / sd)
        lower = np.where(x[..., None] < -1 + h / 2, -np.inf, (x[..., None] - h - mean) / sd)
        flip = lower > 0
        lo, hi = np.where(flip, -upper, lower), np.where(flip, -lower, upper)
        log_mass = log_ndtr(hi) + np.log1p(-np.exp(log_ndtr(lo) - log_ndtr(hi)))
        terms[:, 0] = -(log_mass * w).sum(-1).sum(1)
    terms[:, T] = 0.5 * (s2[-1] + m[-1] ** 2 * x**2 - 1 - np.log(s2[-1])).sum(1)
    return terms


def linear_case(
    schedule: NoiseSchedule,
    prediction: str = "epsilon",
    variance: str = "small",
    decoder: str = "gaussian",
    shape: tuple[int, int] = (3, 2),
    seed: int = 0,
    levels: int = 9,
):
    """A ready test case in float64: a :class:`~pyrodiff.chain.reverse.DiffusionModel` with a random
    :class:`LinearDenoiser` (coefficients ``a`` in [-0.4, 0.4], ``b`` in [-0.2, 0.2], and ``v`` in [-1, 1]
    for learned variances), data ``x0`` of
    ``shape`` (on the grid of ``levels`` values for the discretized decoder, else uniform in [-1, 1])
    and its exact terms from :func:`linear_elbo_terms`, shape ``(N, T + 1)``."""
    from .chain.reverse import DiffusionModel

    T = schedule.num_steps
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(T, generator=g, dtype=torch.float64) - 0.5) * 0.8
    b = (torch.rand(T, generator=g, dtype=torch.float64) - 0.5) * 0.4
    v = torch.rand(T, generator=g, dtype=torch.float64) * 2 - 1 if variance == "learned" else None
    levels = levels if decoder == "discretized" else None
    model = DiffusionModel(LinearDenoiser(T, a, b, v), schedule, prediction, variance, decoder, levels)
    if levels:
        x0 = (torch.randint(0, levels, shape, generator=g) * 2 / (levels - 1) - 1).double()
    else:
        x0 = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    v = None if v is None else v.numpy()
    return model, x0, linear_elbo_terms(schedule, a.numpy(), b.numpy(), x0, prediction, variance, levels, v=v)
