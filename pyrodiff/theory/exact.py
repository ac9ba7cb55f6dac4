r"""The exactly solvable diffusion: Gaussian data and a reverse chain that is affine in :math:`x_t`.

With data :math:`q(x_0) = N(m, S)` (any :math:`D`, full covariance) and a reverse chain whose every step is
Gaussian with a mean affine in :math:`x_t`,

.. math:: p(x_{0:T}) = N(x_T; \mu_p, \Sigma_p) \prod_{t=1}^{T} N(x_{t-1}; C_t x_t + d_t, \Sigma_t),

every quantity of the variational account of a diffusion model is a closed form (docs/MATH.md, "An exactly
solvable diffusion"): the exact log-likelihood :math:`\log p(x_0)`, every term
:math:`L_0 .. L_T` of the bound and its expectation under :math:`q(x_0)`, the gap
:math:`\log p(x_0) - \mathrm{ELBO}(x_0) = \mathrm{KL}(q(x_{1:T} \mid x_0) \,\|\, p(x_{1:T} \mid x_0))`, the data KL
:math:`\mathrm{KL}(q(x_0) \,\|\, p(x_0))` and the joint KL :math:`\mathrm{KL}(q(x_{0:T}) \,\|\, p(x_{0:T}))`.  They
answer in numbers in what sense training a diffusion model is maximum likelihood:

.. math:: H(q_0) + \mathrm{KL}(q_0 \,\|\, p_0) = E_q[-\log p(x_0)] \le E_q[-\mathrm{ELBO}] = H(q_0) + \mathrm{KL}(q_{0:T} \,\|\, p_{0:T}).

A :class:`~pyrodiff.chain.reverse.DiffusionModel` is such a chain when its network is affine in :math:`x_t` (e.g.
:class:`pyrodiff.testing.LinearDenoiser`, :class:`AffineDenoiser`), its variances are fixed
("small" or "large") and its decoder is Gaussian; :func:`reverse_chain` reads it as one (with
:math:`\mu_p = 0`, :math:`\Sigma_p = I`, :math:`\Sigma_t = \sigma_t^2 I`).  :func:`true_reverse` is the exact reverse
of :math:`q(x_{0:T})` (every gap closes) and :func:`best_affine` the maximiser of :math:`E_q[\mathrm{ELBO}]` over
affine means with the model's fixed variances.  Every function taking ``model_or_chain`` accepts either.

All computations are in float64; data of shape ``(N, *shape)`` is flattened to ``(N, D)``.  The ELBO terms
are computed from per-step Gaussian moments; the log-likelihood from the chain's marginals; the KLs of
paths from the joint Gaussians of :math:`(x_0, \dots, x_T)` (dimension :math:`(T + 1) D`), independently of the
terms, so that the identities between them are checks.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.distributions import MultivariateNormal, kl_divergence

from .. import checks
from ..chain.continuous import ContinuousDiffusionModel
from ..chain.forward import check_batch
from ..chain.parameterization import parse_variance
from ..chain.probability_flow import continuous_log_snr
from ..chain.reverse import DiffusionModel
from ..chain.schedule import Schedule

__all__ = [
    "AffineDenoiser",
    "GaussianScore",
    "probability_flow_marginal",
    "GaussianReverseChain",
    "reverse_chain",
    "true_reverse",
    "best_affine",
    "forward_joint",
    "log_likelihood",
    "elbo_terms",
    "elbo",
    "posterior_kl",
    "expected_log_likelihood",
    "expected_elbo_terms",
    "expected_elbo",
    "data_kl",
    "joint_kl",
    "gaussian_entropy",
    "perspectives",
    "noise_prediction_map",
    "continuous_elbo_terms",
    "expected_continuous_elbo_terms",
    "diffusion_estimator_moments",
]

_F64 = torch.float64
_LOG_2PI = math.log(2 * math.pi)


class AffineDenoiser(nn.Module):
    r"""``network(x_t, t) = W[t-1] x_t + b[t-1]`` on the flattened :math:`x_t` (D values), with a full matrix
    ``weight`` :math:`W`, shape ``(T, D, D)``, and ``bias`` :math:`b`, shape ``(T, D)`` (zeros by default): a network
    affine in :math:`x_t` that couples the dimensions.  With fixed variances and the Gaussian decoder its
    reverse chain is Gaussian for any prediction (:func:`reverse_chain`); also ``pyrodiff.testing.AffineDenoiser``."""

    def __init__(
        self, num_steps: int, dim: int, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.dim = dim
        weight = torch.zeros(num_steps, dim, dim) if weight is None else torch.as_tensor(weight).clone()
        bias = torch.zeros(num_steps, dim) if bias is None else torch.as_tensor(bias).clone()
        if weight.shape != (num_steps, dim, dim) or bias.shape != (num_steps, dim):
            raise ValueError(
                f"AffineDenoiser({num_steps}, {dim}) needs weight ({num_steps}, {dim}, {dim}) and bias "
                f"({num_steps}, {dim}), got {tuple(weight.shape)} and {tuple(bias.shape)}"
            )
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """At integer t the step's ``W[t-1] x + b[t-1]``; at real t in [1, T] (the continuous extension of
        :mod:`pyrodiff.chain.probability_flow`) the weights and bias interpolated linearly between the steps."""
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"AffineDenoiser(dim={self.dim}) got inputs of {flat.shape[1]} values each")
        if t.is_floating_point():
            T = self.weight.shape[0]
            i = t.floor().long().clamp(1, T - 1)
            frac = (t - i).to(self.weight.dtype)
            weight = self.weight[i - 1] + frac[:, None, None] * (self.weight[i] - self.weight[i - 1])
            bias = self.bias[i - 1] + frac[:, None] * (self.bias[i] - self.bias[i - 1])
        else:
            weight, bias = self.weight[t - 1], self.bias[t - 1]
        out = torch.einsum("bij,bj->bi", weight, flat) + bias
        return out.reshape(x.shape)


class GaussianScore(nn.Module):
    r"""The exact noise prediction for data :math:`N(m, S)`, a network on the continuous extension of ``schedule``
    (:func:`pyrodiff.chain.probability_flow.continuous_log_snr`): at real timestep u with log-SNR :math:`\lambda(u)`,
    :math:`\alpha^2 = \mathrm{sigmoid}(\lambda)`, :math:`\sigma^2 = \mathrm{sigmoid}(-\lambda)`,
    :math:`V = \alpha^2 S + \sigma^2 I`, ``network(x, u)`` :math:`= E[\epsilon \mid x] = \sigma V^{-1}(x - \alpha m)`, i.e.
    the score :math:`-V^{-1}(x - \alpha m)` of :math:`q(x_\lambda) = N(\alpha m, V)`.  As a ``"epsilon"`` model's network
    it is, at the integer steps, the optimal affine chain (:func:`best_affine`); its probability-flow ODE is linear, with
    the closed-form marginal :func:`probability_flow_marginal` (:meth:`noise` serves any log-SNR, e.g. for a
    continuous-time model).  Float64, on the CPU."""

    def __init__(self, schedule: Schedule, mean: torch.Tensor, cov: torch.Tensor) -> None:
        super().__init__()
        _check_schedule(schedule)
        m, S = _check_law(mean, cov)
        values, U = torch.linalg.eigh(S)
        self.register_buffer("mean", m)
        self.register_buffer("eigenvalues", values)
        self.register_buffer("eigenvectors", U)
        self.register_buffer("log_snr", schedule.tables().log_snr.to(_F64))

    def noise(self, x: torch.Tensor, log_snr: torch.Tensor) -> torch.Tensor:
        r""":math:`E[\epsilon \mid x_\lambda = x] = \sigma V^{-1}(x - \alpha m)` at log-SNR ``log_snr`` (a number, a 0-dim
        tensor or one per example), for ``x`` of shape ``(N, D)``; float64."""
        lam = torch.as_tensor(log_snr, dtype=_F64).reshape(-1, 1)
        alpha, sigma2 = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam)
        centred = (x.to(_F64) - alpha * self.mean) @ self.eigenvectors
        return (sigma2.sqrt() * centred / (alpha**2 * self.eigenvalues + sigma2)) @ self.eigenvectors.T

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        lam = continuous_log_snr(self.log_snr, t.to(_F64))
        return self.noise(x.reshape(x.shape[0], -1), lam).to(x.dtype).reshape(x.shape)


def probability_flow_marginal(
    mean: torch.Tensor, cov: torch.Tensor, start: float, end: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Mean and covariance of :math:`x(\lambda_0)`, ``start`` :math:`= \lambda_0`, under the probability-flow ODE of the
    exact score of data :math:`N(m, S)` (:class:`GaussianScore`) started from :math:`N(0, I)` at ``end``
    :math:`= \lambda_1` (log-SNRs; for a discrete model :math:`\lambda_1` and :math:`\lambda_T` of its schedule;
    docs/MATH.md, "The score and the probability-flow ODE").  In the eigenbasis of :math:`S`, :math:`y = x - \alpha m`
    solves :math:`dy_i/d\lambda = \tfrac12\sigma^2(1 - 1/v_i)\,y_i = \tfrac12 (d\log v_i/d\lambda)\,y_i` with
    :math:`v_i = \alpha^2 s_i + \sigma^2`, so :math:`y(\lambda_0) = R\,y(\lambda_1)`,
    :math:`R = U\,\mathrm{diag}(\sqrt{v_i(\lambda_0)/v_i(\lambda_1)})\,U^\top`: the mean is
    :math:`\alpha_0 m - \alpha_1 R m` and the covariance :math:`R R^\top` (which would be :math:`V(\lambda_0)` if the
    prior were :math:`q(x_{\lambda_1})`)."""
    m, S = _check_law(mean, cov)
    values, U = torch.linalg.eigh(S)
    lam = torch.tensor([checks.number("start", start), checks.number("end", end)], dtype=_F64, device=m.device)
    alpha2, sigma2 = torch.sigmoid(lam), torch.sigmoid(-lam)
    v = alpha2[:, None] * values + sigma2[:, None]  # (2, D): v_i at the start and the end
    ratio = v[0] / v[1]
    R = _from_eigen(U, ratio.sqrt())
    return alpha2[0].sqrt() * m - alpha2[1].sqrt() * (R @ m), _from_eigen(U, ratio)


# ---------------------------------------------------------------------- the chain
@dataclass(frozen=True, eq=False)
class GaussianReverseChain:
    r"""The law :math:`p(x_{0:T}) = N(x_T; \mu_p, \Sigma_p)\prod_{t=1}^T N(x_{t-1}; C_t x_t + d_t, \Sigma_t)` on
    :math:`\mathbb{R}^D` (float64 tensors; row ``t - 1`` belongs to step ``t``, step 1 being the decoder
    :math:`p(x_0 \mid x_1)`), together with the ``schedule`` of the forward chain :math:`q` it is compared with.

    :param weights: :math:`C_t`, shape ``(T, D, D)``.
    :param offsets: :math:`d_t`, shape ``(T, D)``.
    :param covariances: :math:`\Sigma_t`, shape ``(T, D, D)``, symmetric positive definite.
    :param prior_mean: :math:`\mu_p`, shape ``(D,)``.
    :param prior_cov: :math:`\Sigma_p`, shape ``(D, D)``, symmetric positive definite.

    Tensors are converted to float64 (a no-op that keeps autograd for float64 ones) and validated.
    """

    schedule: Schedule
    weights: torch.Tensor
    offsets: torch.Tensor
    covariances: torch.Tensor
    prior_mean: torch.Tensor
    prior_cov: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, Schedule):
            raise TypeError(f"schedule must be a Schedule, got {type(self.schedule).__name__}")
        for name in ("weights", "offsets", "covariances", "prior_mean", "prior_cov"):
            value = getattr(self, name)
            if not torch.is_tensor(value):
                raise TypeError(f"{name} must be a torch tensor, got {type(value).__name__}")
            object.__setattr__(self, name, value.to(_F64))
        T = self.schedule.num_steps
        if self.prior_mean.dim() != 1 or self.prior_mean.numel() < 1:
            raise ValueError(f"prior_mean must have shape (D,), got {tuple(self.prior_mean.shape)}")
        D = self.prior_mean.numel()
        expected = {
            "weights": (T, D, D),
            "offsets": (T, D),
            "covariances": (T, D, D),
            "prior_cov": (D, D),
        }
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(
                    f"{name} must have shape {shape} for T = {T} steps and D = {D}, got {tuple(getattr(self, name).shape)}"
                )
        for name in ("weights", "offsets", "prior_mean"):
            if not torch.isfinite(getattr(self, name)).all():
                raise ValueError(f"{name} of the reverse chain is not finite")
        _check_covariance(self.covariances, "covariances (Sigma_t)", steps=True)
        _check_covariance(self.prior_cov, "prior_cov")

    @property
    def num_steps(self) -> int:
        """``T``."""
        return self.schedule.num_steps

    @property
    def dim(self) -> int:
        """``D``, the flattened data dimension."""
        return self.prior_mean.numel()

    @property
    def device(self) -> torch.device:
        return self.prior_mean.device

    def to(self, device: torch.device | str) -> GaussianReverseChain:
        """The same chain on ``device`` (itself if already there)."""
        if torch.device(device) == self.device:
            return self
        move = lambda x: x.to(device)  # noqa: E731
        return GaussianReverseChain(
            self.schedule,
            move(self.weights),
            move(self.offsets),
            move(self.covariances),
            move(self.prior_mean),
            move(self.prior_cov),
        )

    def marginals(self) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Means ``(T + 1, D)`` and covariances ``(T + 1, D, D)`` of :math:`p(x_t)`, row ``t`` for :math:`x_t`
        (t = 0..T), from the top down: :math:`m_T = \mu_p`, :math:`V_T = \Sigma_p`, :math:`m_{t-1} = C_t m_t + d_t`,
        :math:`V_{t-1} = C_t V_t C_t^\top + \Sigma_t`.  O(T D^3)."""
        means, covs = [self.prior_mean], [self.prior_cov]
        for t in range(self.num_steps, 0, -1):
            C = self.weights[t - 1]
            means.append(C @ means[-1] + self.offsets[t - 1])
            cov = C @ covs[-1] @ C.T + self.covariances[t - 1]
            covs.append(0.5 * (cov + cov.T))
        return torch.stack(means[::-1]), torch.stack(covs[::-1])

    def joint(self) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Mean ``((T + 1) D,)`` and covariance ``((T + 1) D, (T + 1) D)`` of :math:`p(x_{0:T})`, the vector
        :math:`(x_0, x_1, \dots, x_T)`.  Diagonal blocks are the :meth:`marginals`; above the diagonal,
        :math:`\mathrm{Cov}(x_{t-1}, x_u) = C_t\,\mathrm{Cov}(x_t, x_u)` for :math:`u \ge t` (the step's noise is
        independent of :math:`x_{t..T}`).  O(T^2 D^2) memory."""
        means, covs = self.marginals()
        T, D = self.num_steps, self.dim
        cov = covs.new_zeros((T + 1) * D, (T + 1) * D)
        cov[T * D :, T * D :] = covs[T]
        for t in range(T, 0, -1):
            cross = self.weights[t - 1] @ cov[t * D : (t + 1) * D, t * D :]  # Cov(x_{t-1}, x_{t..T})
            cov[(t - 1) * D : t * D, t * D :] = cross
            cov[t * D :, (t - 1) * D : t * D] = cross.T
            cov[(t - 1) * D : t * D, (t - 1) * D : t * D] = covs[t - 1]
        return means.reshape(-1), cov


# ---------------------------------------------------------------------- building chains
def reverse_chain(
    model: DiffusionModel, data_shape: tuple[int, ...] | None = None, check_points: int = 3
) -> GaussianReverseChain:
    r"""The model's reverse chain as a :class:`GaussianReverseChain` (a float64 snapshot, without gradients).

    :math:`\mu_\theta(x, t) = C_t x + d_t` is read from ``model.predict`` on a float64 deep copy of the model
    (the user's model is left as it is), in one batched call over every t at :math:`x = 0` (giving
    :math:`d_t`) and at the D unit vectors :math:`e_i` (giving the columns :math:`C_t e_i = \mu_\theta(e_i, t) - d_t`);
    affinity is then checked at ``check_points`` further points drawn from a fixed seed (a
    ``ValueError`` names the first step where the network is not affine in :math:`x_t`).
    :math:`\Sigma_t = \sigma_t^2 I` with the model's fixed variance (:math:`\tilde\beta_2` at t = 1), and
    :math:`p(x_T) = N(0, I)`.  Models with a learned variance or a discretized decoder are refused.

    :param data_shape: the shape of one example, if the model does not know it (``model.data_shape``).
    """
    if not isinstance(model, DiffusionModel):
        raise TypeError(f"expected a DiffusionModel or a GaussianReverseChain, got {type(model).__name__}")
    if model.decoder.name != "gaussian":
        raise ValueError(
            f"the exact Gaussian account needs the Gaussian decoder; the model's decoder is {model.decoder.name!r}"
        )
    if not model.family.is_markov:
        raise ValueError(
            "the exact Gaussian account scores a chain against DDPM's forward process; a DDIM model (eta < 1) is "
            "scored against its own inference family by bound_terms"
        )
    if model.variance.learned:
        raise ValueError(
            "the exact Gaussian account needs a fixed reverse variance ('small' or 'large'); a learned variance "
            "depends on the network's output and is refused"
        )
    checks.positive_int("check_points", check_points)
    shape = _data_shape(model, data_shape)
    schedule, T, D = model.schedule, model.schedule.num_steps, math.prod(shape)
    device = model.device_and_dtype()[0]
    work = copy.deepcopy(model).to(_F64)
    work.autocast_dtype = None
    points, probes = _affine_probes(D, check_points, device)
    K = points.shape[0]
    x = points.expand(T, K, D).reshape((T, K) + shape)
    t = torch.arange(1, T + 1, device=device)[:, None].expand(T, K)
    with torch.no_grad():
        prediction = work.predict(x, t)
    weights, offsets, bad, error = _affine_fit(prediction.mean.reshape(T, K, D), probes)
    if bad is not None:
        raise ValueError(
            f"the model's network is not affine in x_t at t = {bad + 1} (at a test point its reverse mean is off the "
            f"affine map through 0 and the unit vectors by {error:.3g}); the exact Gaussian "
            "account needs mu_theta(x_t, t) = C_t x_t + d_t"
        )
    variance = prediction.variance.reshape(T, K, -1)[:, 0, 0]
    eye = torch.eye(D, dtype=_F64, device=device)
    return GaussianReverseChain(
        schedule, weights, offsets, variance[:, None, None] * eye, eye.new_zeros(D), eye.clone()
    )


def true_reverse(schedule: Schedule, mean: torch.Tensor, cov: torch.Tensor) -> GaussianReverseChain:
    r"""The exact reverse of :math:`q(x_{0:T}) = N(x_0; m, S) \prod_t q(x_t \mid x_{t-1})`: prior :math:`q(x_T)` and
    steps :math:`q(x_{t-1} \mid x_t)`, so that :math:`p = q` jointly.

    With :math:`V_t = \bar\alpha_t S + (1 - \bar\alpha_t) I` (:math:`V_0 = S`), :math:`q(x_t) = N(\sqrt{\bar\alpha_t} m, V_t)`
    and :math:`\mathrm{Cov}(x_{t-1}, x_t) = \sqrt{\alpha_t} V_{t-1}`; Gaussian conditioning gives
    :math:`C_t = \sqrt{\alpha_t} V_{t-1} V_t^{-1}`, :math:`d_t = \sqrt{\bar\alpha_{t-1}} m - C_t \sqrt{\bar\alpha_t} m`,
    :math:`\Sigma_t = V_{t-1} - \alpha_t V_{t-1} V_t^{-1} V_{t-1} = \beta_t V_{t-1} V_t^{-1}` (all :math:`V_t` are functions
    of :math:`S` and commute).  Computed in the eigenbasis of :math:`S`, where every matrix is diagonal.
    ``cov`` must be positive definite (else :math:`\Sigma_1` is singular).
    """
    _check_schedule(schedule)
    m, S = _check_law(mean, cov)
    c = schedule.coefficients(m.device, _F64)
    lam, U = torch.linalg.eigh(S)
    abar = torch.cat([c.alphas_cumprod.new_ones(1), c.alphas_cumprod])  # t = 0..T
    v = abar[:, None] * lam + (1 - abar)[:, None]  # eigenvalues of V_t, (T + 1, D)
    ratio = v[:-1] / v[1:]  # V_{t-1} V_t^{-1}
    weights = _from_eigen(U, c.alphas.sqrt()[:, None] * ratio)
    covariances = _from_eigen(U, c.betas[:, None] * ratio)
    means = abar.sqrt()[:, None] * m  # E_q x_t, t = 0..T
    offsets = means[:-1] - torch.einsum("tij,tj->ti", weights, means[1:])
    return GaussianReverseChain(schedule, weights, offsets, covariances, means[-1], _from_eigen(U, v[-1]))


def best_affine(
    schedule: Schedule, mean: torch.Tensor, cov: torch.Tensor, variance: str = "small"
) -> GaussianReverseChain:
    r"""The maximiser of :math:`E_{q(x_0)}\,\mathrm{ELBO}(x_0)` over reverse chains with affine means
    :math:`C_t x_t + d_t`, the fixed variances :math:`\sigma_t^2 I` named by ``variance`` ("small" or "large", with
    :math:`\tilde\beta_2` at t = 1) and the prior :math:`N(0, I)`, for data :math:`N(m, S)`.

    :math:`E_q L_{t-1}` depends on :math:`(C_t, d_t)` only through
    :math:`E_q\Vert x_{t-1} - C_t x_t - d_t\Vert^2 / (2\sigma_t^2)` (t = 1 included: the decoder), a least-squares
    regression of :math:`x_{t-1}` on :math:`x_t` under :math:`q`, whose solution is the conditional mean
    :math:`E_q[x_{t-1} \mid x_t]`: the means of :func:`true_reverse`, for every :math:`\sigma_t^2`.
    """
    fixed = parse_variance(variance)
    if fixed.learned:
        raise ValueError("best_affine needs a fixed variance ('small' or 'large'), got 'learned'")
    true = true_reverse(schedule, mean, cov)
    D = true.dim
    eye = torch.eye(D, dtype=_F64, device=true.device)
    sigma2 = fixed.table(schedule).to(true.device)
    return GaussianReverseChain(
        schedule, true.weights, true.offsets, sigma2[:, None, None] * eye, eye.new_zeros(D), eye.clone()
    )


# ---------------------------------------------------------------------- the forward chain's joint law
def forward_joint(
    schedule: Schedule, mean: torch.Tensor, cov: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Mean and covariance of :math:`q(x_{0:T})` (the vector :math:`(x_0, \dots, x_T)`, dimension :math:`(T+1) D`) for
    :math:`x_0 \sim N(m, S)`; with ``cov=None`` the law of the path given the point :math:`x_0 = m` (the :math:`x_0` block
    is then zero).  ``mean`` may carry a batch, ``(N, D)``, giving means ``(N, (T + 1) D)``.

    From :math:`x_t = \sqrt{\bar\alpha_t}\,(x_0 + \sum_{u \le t}\sqrt{\beta_u/\bar\alpha_u}\,\epsilon_u)`:
    :math:`E x_t = a_t m` with :math:`a_t = \sqrt{\bar\alpha_t}` (:math:`a_0 = 1`) and, for :math:`s \le t`,
    :math:`\mathrm{Cov}(x_s, x_t) = a_s a_t S + K_{st} I`, :math:`K_{st} = \sqrt{\bar\alpha_t/\bar\alpha_s}\,(1 - \bar\alpha_s)`.
    """
    _check_schedule(schedule)
    m, S = (_check_vector(mean, "mean"), None) if cov is None else _check_law(mean, cov)
    c = schedule.coefficients(m.device, _F64)
    abar = torch.cat([c.alphas_cumprod.new_ones(1), c.alphas_cumprod])
    a = abar.sqrt()
    index = torch.arange(abar.numel(), device=m.device)
    first, last = torch.minimum(index[:, None], index[None]), torch.maximum(index[:, None], index[None])
    K = a[last] / a[first] * (1 - abar[first])
    D = m.shape[-1]
    joint_cov = torch.kron(K, torch.eye(D, dtype=_F64, device=m.device))
    if S is not None:
        joint_cov = joint_cov + torch.kron(a[:, None] * a, S)
    joint_mean = (a[:, None] * m[..., None, :]).reshape(m.shape[:-1] + (-1,))
    return joint_mean, joint_cov


# ---------------------------------------------------------------------- the likelihood
def log_likelihood(model_or_chain: DiffusionModel | GaussianReverseChain, x0: torch.Tensor) -> torch.Tensor:
    r""":math:`\log p_\theta(x_0)` of each example, shape ``(N,)`` (nats): the chain's marginal of :math:`x_0` is
    :math:`N(m_0, V_0)` (:meth:`GaussianReverseChain.marginals`, O(T D^3))."""
    chain, x = _chain_and_data(model_or_chain, x0)
    mean, cov = chain.marginals()
    return _normal(mean[0], cov[0], "the chain's marginal of x_0").log_prob(x)


def expected_log_likelihood(
    model_or_chain: DiffusionModel | GaussianReverseChain, mean: torch.Tensor, cov: torch.Tensor
) -> torch.Tensor:
    r""":math:`E_{x_0 \sim N(m, S)} \log p_\theta(x_0) = -\tfrac12\big[D\log 2\pi + \log\det V_0 + \mathrm{tr}(V_0^{-1} S)
    + (m - m_0)^\top V_0^{-1} (m - m_0)\big]` (a scalar, nats)."""
    chain, m, S = _chain_and_law(model_or_chain, mean, cov)
    means, covs = chain.marginals()
    return -_cross_entropy((m - means[0])[None, None], S[None], covs[0][None])[0, 0]


# ---------------------------------------------------------------------- the bound
def elbo_terms(model_or_chain: DiffusionModel | GaussianReverseChain, x0: torch.Tensor) -> torch.Tensor:
    r"""Every term of the bound exactly, shape ``(N, T + 1)``: column k is :math:`L_k` in nats, the layout of
    ``pyrodiff.bound_terms(...).nats``.  Each term is the expected cross-entropy of a Gaussian residual
    minus an entropy of :math:`q` (see :func:`_expected_terms`); :math:`\mathrm{ELBO} = -\sum_k L_k`."""
    chain, x = _chain_and_data(model_or_chain, x0)
    return _expected_terms(chain, x, None)


def elbo(model_or_chain: DiffusionModel | GaussianReverseChain, x0: torch.Tensor) -> torch.Tensor:
    r""":math:`\mathrm{ELBO}(x_0) = -\sum_{k=0}^T L_k` of each example, shape ``(N,)`` (nats)."""
    return -elbo_terms(model_or_chain, x0).sum(-1)


def expected_elbo_terms(
    model_or_chain: DiffusionModel | GaussianReverseChain, mean: torch.Tensor, cov: torch.Tensor
) -> torch.Tensor:
    r""":math:`E_{x_0 \sim N(m, S)} L_k` for k = 0..T, shape ``(T + 1,)`` (nats): each term is quadratic in :math:`x_0`,
    so the expectation adds :math:`\mathrm{tr}(\Sigma^{-1} A S A^\top)` to the point value at :math:`x_0 = m`."""
    chain, m, S = _chain_and_law(model_or_chain, mean, cov)
    return _expected_terms(chain, m[None], S)[0]


def expected_elbo(
    model_or_chain: DiffusionModel | GaussianReverseChain, mean: torch.Tensor, cov: torch.Tensor
) -> torch.Tensor:
    r""":math:`E_{x_0 \sim N(m, S)}\,\mathrm{ELBO}(x_0) = -\sum_k E L_k` (a scalar, nats)."""
    return -expected_elbo_terms(model_or_chain, mean, cov).sum()


def _expected_terms(chain: GaussianReverseChain, means: torch.Tensor, cov: torch.Tensor | None) -> torch.Tensor:
    r"""Terms ``(N, T + 1)`` for :math:`x_0 \sim N(\text{means}_n, \text{cov})`; ``cov=None`` is the point :math:`x_0`.

    Term k is :math:`E[-\log N(r_k; 0, \Sigma)] - H_k` for a Gaussian residual :math:`r_k = A_k x_0 - b_k + \text{noise}`:

    - k = t - 1, t = 1..T: :math:`r = x_{t-1} - C_t x_t - d_t` under :math:`q(x_{t-1}, x_t \mid x_0)`, with
      :math:`K_t = Q_t I - C_t`, :math:`A = P_t I + \sqrt{\bar\alpha_t} K_t`, :math:`b = d_t`, noise covariance
      :math:`(1 - \bar\alpha_t) K_t K_t^\top + \tilde\beta_t I`, :math:`\Sigma = \Sigma_t`, :math:`H = \tfrac D2\log(2\pi e\tilde\beta_t)`
      (the entropy of :math:`q(x_{t-1} \mid x_t, x_0)`; none at t = 1, where :math:`L_0` is a plain cross-entropy);
    - k = T: :math:`r = x_T - \mu_p`, :math:`A = \sqrt{\bar\alpha_T} I`, :math:`b = \mu_p`, noise :math:`(1 - \bar\alpha_T) I`,
      :math:`\Sigma = \Sigma_p`, :math:`H = \tfrac D2\log(2\pi e(1 - \bar\alpha_T))`.

    With :math:`x_0 \sim N(m, S)` the residual has mean :math:`A m - b` and covariance noise + :math:`A S A^\top`.
    """
    D = chain.dim
    c = chain.schedule.coefficients(chain.device, _F64)
    eye = torch.eye(D, dtype=_F64, device=chain.device)
    K = c.posterior_mean_coef_xt[:, None, None] * eye - chain.weights
    s2 = (1 - c.alphas_cumprod)[:, None, None]
    A_steps = c.posterior_mean_coef_x0[:, None, None] * eye + c.alphas_cumprod.sqrt()[:, None, None] * K
    A = torch.cat([A_steps, (c.alphas_cumprod[-1].sqrt() * eye)[None]])
    b = torch.cat([chain.offsets, chain.prior_mean[None]])
    noise = torch.cat([s2 * K @ K.transpose(1, 2) + c.posterior_variance[:, None, None] * eye, (s2[-1] * eye)[None]])
    sigma = torch.cat([chain.covariances, chain.prior_cov[None]])
    residual_cov = noise if cov is None else noise + A @ cov @ A.transpose(1, 2)
    residual_mean = torch.einsum("kij,nj->nki", A, means) - b
    entropy_var = torch.cat([c.posterior_variance[1:], 1 - c.alphas_cumprod[-1:]])  # k = 1..T
    entropy = torch.cat([entropy_var.new_zeros(1), 0.5 * D * (math.log(2 * math.pi * math.e) + entropy_var.log())])
    return _cross_entropy(residual_mean, residual_cov, sigma) - entropy


def _cross_entropy(mean: torch.Tensor, cov: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    r""":math:`E_{r \sim N(\mu, R)}[-\log N(r; 0, \Sigma)] = \tfrac12\big[D\log 2\pi + \log\det\Sigma + \mathrm{tr}(\Sigma^{-1} R)
    + \mu^\top\Sigma^{-1}\mu\big]` for ``mean`` ``(N, K, D)``, ``cov`` and ``sigma`` ``(K, D, D)``; returns ``(N, K)``."""
    L = torch.linalg.cholesky(sigma)
    logdet = 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    trace = torch.cholesky_solve(cov, L).diagonal(dim1=-2, dim2=-1).sum(-1)
    whitened = torch.linalg.solve_triangular(L, mean[..., None], upper=False)[..., 0]
    return 0.5 * (mean.shape[-1] * _LOG_2PI + logdet + trace + whitened.pow(2).sum(-1))


# ---------------------------------------------------------------------- KLs of whole paths
def posterior_kl(model_or_chain: DiffusionModel | GaussianReverseChain, x0: torch.Tensor) -> torch.Tensor:
    r""":math:`\mathrm{KL}(q(x_{1:T} \mid x_0) \,\|\, p_\theta(x_{1:T} \mid x_0))` of each example, shape ``(N,)`` (nats): the
    gap :math:`\log p_\theta(x_0) - \mathrm{ELBO}(x_0)`, computed independently of the terms, between two
    :math:`TD`-dimensional Gaussians: :math:`p_\theta(x_{1:T} \mid x_0)` by conditioning the joint :math:`p_\theta(x_{0:T})`
    (:meth:`GaussianReverseChain.joint`) on :math:`x_0`, :math:`q(x_{1:T} \mid x_0)` from :func:`forward_joint`."""
    chain, x = _chain_and_data(model_or_chain, x0)
    D = chain.dim
    mean, cov = chain.joint()
    L00 = _cholesky(cov[:D, :D], "the chain's marginal covariance of x_0")
    gain = torch.cholesky_solve(cov[:D, D:], L00)  # Cov(x_0)^{-1} Cov(x_0, x_{1:T})
    cond_cov = cov[D:, D:] - cov[D:, :D] @ gain
    cond_mean = mean[D:] + (x - mean[:D]) @ gain
    q_mean, q_cov = forward_joint(chain.schedule, x)
    q = _normal(q_mean[:, D:], q_cov[D:, D:], "q(x_{1:T} | x_0)")
    return kl_divergence(q, _normal(cond_mean, 0.5 * (cond_cov + cond_cov.T), "p(x_{1:T} | x_0)"))


def data_kl(
    model_or_chain: DiffusionModel | GaussianReverseChain, mean: torch.Tensor, cov: torch.Tensor
) -> torch.Tensor:
    r""":math:`\mathrm{KL}(q(x_0) \,\|\, p_\theta(x_0))` for :math:`q(x_0) = N(m, S)` (a scalar, nats)."""
    chain, m, S = _chain_and_law(model_or_chain, mean, cov)
    means, covs = chain.marginals()
    return kl_divergence(_normal(m, S, "cov"), _normal(means[0], covs[0], "the chain's marginal of x_0"))


def joint_kl(
    model_or_chain: DiffusionModel | GaussianReverseChain, mean: torch.Tensor, cov: torch.Tensor
) -> torch.Tensor:
    r""":math:`\mathrm{KL}(q(x_{0:T}) \,\|\, p_\theta(x_{0:T}))` for :math:`q(x_0) = N(m, S)` (a scalar, nats), between the two
    :math:`(T + 1)D`-dimensional Gaussians (:func:`forward_joint`, :meth:`GaussianReverseChain.joint`).  By the chain
    rule it equals :math:`E_q[-\mathrm{ELBO}] - H(q(x_0))` and :math:`\mathrm{KL}(q_0 \,\|\, p_0) + E_q[\text{gap}]`."""
    chain, m, S = _chain_and_law(model_or_chain, mean, cov)
    q_mean, q_cov = forward_joint(chain.schedule, m, S)
    p_mean, p_cov = chain.joint()
    return kl_divergence(_normal(q_mean, q_cov, "q(x_{0:T})"), _normal(p_mean, p_cov, "p(x_{0:T})"))


def gaussian_entropy(cov: torch.Tensor) -> torch.Tensor:
    r""":math:`H(N(m, S)) = \tfrac12\log\det(2\pi e S)` (nats)."""
    if not torch.is_tensor(cov):
        raise TypeError(f"cov must be a torch tensor, got {type(cov).__name__}")
    S = cov.to(_F64)
    if S.dim() != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"cov must have shape (D, D), got {tuple(S.shape)}")
    _check_covariance(S, "cov")
    return _normal(S.new_zeros(S.shape[-1]), S, "cov").entropy()


def perspectives(
    model_or_chain: DiffusionModel | GaussianReverseChain, mean: torch.Tensor, cov: torch.Tensor
) -> dict[str, float]:
    r"""The numbers of the chain :math:`H(q_0) + \mathrm{KL}(q_0 \,\|\, p_0) = E_q[-\log p(x_0)] \le E_q[-\mathrm{ELBO}]
    = H(q_0) + \mathrm{KL}(q_{0:T} \,\|\, p_{0:T})` for data :math:`N(m, S)`, each computed on its own (nats per example):
    ``entropy`` :math:`H(q_0)`, ``data_kl``, ``joint_kl``, ``expected_neg_log_likelihood``,
    ``expected_neg_elbo`` and ``expected_gap`` (their difference, :math:`E_q\,\mathrm{KL}(q(x_{1:T} \mid x_0) \,\|\,
    p(x_{1:T} \mid x_0))`), and ``dims`` (D, to convert to bits/dim: nats / (D ln 2))."""
    chain, m, S = _chain_and_law(model_or_chain, mean, cov)
    neg_log_likelihood = -expected_log_likelihood(chain, m, S)
    neg_elbo = -expected_elbo(chain, m, S)
    return {
        "entropy": gaussian_entropy(S).item(),
        "data_kl": data_kl(chain, m, S).item(),
        "joint_kl": joint_kl(chain, m, S).item(),
        "expected_neg_log_likelihood": neg_log_likelihood.item(),
        "expected_neg_elbo": neg_elbo.item(),
        "expected_gap": (neg_elbo - neg_log_likelihood).item(),
        "dims": chain.dim,
    }


# ---------------------------------------------------------------------- the continuous-time bound
def noise_prediction_map(
    model: ContinuousDiffusionModel,
    gamma: torch.Tensor,
    data_shape: tuple[int, ...] | None = None,
    check_points: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`A(\gamma)` ``(G, D, D)`` and :math:`b(\gamma)` ``(G, D)`` of a continuous-time model whose network is
    affine in :math:`z` at each noise level, :math:`\hat\epsilon_\theta(z, c(\gamma)) = A(\gamma) z + b(\gamma)`, at the
    G levels ``gamma`` (float64 snapshot, no gradients): read from a float64 copy of the network at :math:`z = 0` and
    the unit vectors, affinity checked at ``check_points`` further points (a ``ValueError`` names the first level where
    it fails), as :func:`reverse_chain` reads a chain."""
    if not isinstance(model, ContinuousDiffusionModel):
        raise TypeError(f"expected a ContinuousDiffusionModel, got {type(model).__name__}")
    checks.positive_int("check_points", check_points)
    shape = _data_shape(model, data_shape)
    D = math.prod(shape)
    device = model.device_and_dtype()[0]
    network = copy.deepcopy(model.network).to(_F64)
    gamma = torch.as_tensor(gamma).detach().to(device=device, dtype=_F64).reshape(-1)
    points, probes = _affine_probes(D, check_points, device)
    G, P = gamma.numel(), points.shape[0]
    z = points.expand(G, P, D).reshape((G * P,) + shape)
    with torch.no_grad():
        out = network(z, model.noise_level(gamma).repeat_interleave(P))
    A, b, bad, error = _affine_fit(out.reshape(G, P, D), probes)
    if bad is not None:
        raise ValueError(
            f"the model's network is not affine in z at gamma = {gamma[bad].item():.6g} (at a test point it is off "
            f"the affine map through 0 and the unit vectors by {error:.3g}); the exact continuous-time account needs "
            "eps_hat(z, gamma) = A(gamma) z + b(gamma)"
        )
    return A, b


def continuous_elbo_terms(model: ContinuousDiffusionModel, x0: torch.Tensor, nodes: int = 256) -> torch.Tensor:
    r"""The three terms of the continuous-time bound (:mod:`pyrodiff.chain.continuous`; docs/MATH.md, section 16,
    "Continuous time and learned schedules") of each example exactly, shape ``(N, 3)`` (nats): prior, decoder,
    diffusion, for a network affine in :math:`z` (:func:`noise_prediction_map`) and the Gaussian decoder.

    - prior: :math:`\mathrm{KL}(N(\alpha_1 x, \sigma_1^2 I) \,\|\, N(0, I)) = \tfrac12(D\sigma_1^2 + \alpha_1^2\Vert x\Vert^2
      - D - D\log\sigma_1^2)`;
    - decoder: :math:`E[-\log N(x; z_0/\alpha_0, e^{\gamma_0} I)] = \tfrac D2 \log(2\pi e^{\gamma_0}) + \tfrac D2`
      (:math:`z_0/\alpha_0 - x = e^{\gamma_0/2}\epsilon`);
    - diffusion: :math:`\tfrac12\int_{\gamma_0}^{\gamma_1} F(\gamma)\,d\gamma` (the change of variable
      :math:`\gamma = \gamma(t)`: only the endpoints enter) with :math:`F(\gamma) = E_\epsilon\Vert\epsilon -
      A z_\gamma - b\Vert^2 = \Vert I - \sigma A\Vert_F^2 + \Vert\alpha A x + b\Vert^2`, by Gauss-Legendre quadrature
      with ``nodes`` nodes in float64.
    """
    check_batch(x0)
    x = x0.reshape(x0.shape[0], -1).to(_F64)
    return _continuous_terms(model, x, None, tuple(x0.shape[1:]), nodes)


def expected_continuous_elbo_terms(
    model: ContinuousDiffusionModel, mean: torch.Tensor, cov: torch.Tensor, nodes: int = 256
) -> torch.Tensor:
    r""":math:`E_{x \sim N(m, S)}` of the three terms of :func:`continuous_elbo_terms`, shape ``(3,)`` (nats): each
    is quadratic in :math:`x`, so the prior adds :math:`\tfrac12\alpha_1^2\,\mathrm{tr}\,S` and :math:`F(\gamma)` adds
    :math:`\alpha^2\,\mathrm{tr}(A S A^\top)` to their values at :math:`x = m`."""
    if not torch.is_tensor(mean):
        raise TypeError(f"mean must be a torch tensor, got {type(mean).__name__}")
    m, S = _check_law(mean.reshape(-1), cov)
    return _continuous_terms(model, m[None], S, None if model.data_shape else tuple(mean.shape), nodes)[0]


def diffusion_estimator_moments(
    model: ContinuousDiffusionModel, x0: torch.Tensor, nodes: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The first two moments, each shape ``(N,)``, of the one-draw estimator of the diffusion term of each example,
    :math:`L = \tfrac12\gamma'(t)\Vert\epsilon - \hat\epsilon(z_t, \gamma(t))\Vert^2` with :math:`t \sim U(0, 1)` and
    :math:`\epsilon \sim N(0, I)` (:meth:`ContinuousDiffusionModel.diffusion_loss`), by Gauss-Legendre quadrature in
    **t** through the model's schedule (so its interior enters): with the residual
    :math:`r = (I - \sigma A)\epsilon - (\alpha A x + b) \sim N(-\mu, C)`, :math:`Q = \Vert r\Vert^2` has
    :math:`E Q = \mathrm{tr}\,C + \Vert\mu\Vert^2` and :math:`\mathrm{Var}\,Q = 2\,\mathrm{tr}(C^2) + 4\mu^\top C\mu`, so

    .. math:: E L = \tfrac12\int_0^1 \gamma'(t)\, E Q\, dt, \qquad
        E L^2 = \tfrac14\int_0^1 \gamma'(t)^2\,(\mathrm{Var}\,Q + (E Q)^2)\, dt.

    The first equals the diffusion term of :func:`continuous_elbo_terms` for every interior with the same endpoints;
    the second is what ``interior="variance"`` minimises (docs/MATH.md, section 16)."""
    check_batch(x0)
    x = x0.reshape(x0.shape[0], -1).to(_F64)
    _check_continuous(model)
    device = model.device_and_dtype()[0]
    t, w = _gauss_legendre(0.0, 1.0, nodes, device)
    with torch.no_grad():
        at = model.schedule.at(t)
    gamma, rate = at.gamma.detach(), at.rate.detach()
    mean_q, var_q = _residual_moments(model, gamma, x, None, tuple(x0.shape[1:]))
    first = 0.5 * torch.einsum("g,g,gn->n", w, rate, mean_q)
    second = 0.25 * torch.einsum("g,g,gn->n", w, rate.pow(2), var_q + mean_q.pow(2))
    return first, second


def _check_continuous(model) -> None:
    if not isinstance(model, ContinuousDiffusionModel):
        raise TypeError(f"expected a ContinuousDiffusionModel, got {type(model).__name__}")
    if model.decoder.name != "gaussian":
        raise ValueError(
            f"the exact Gaussian account needs the Gaussian decoder; the model's decoder is {model.decoder.name!r}"
        )


def _gauss_legendre(low: float, high: float, nodes: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Nodes and weights of ``nodes``-point Gauss-Legendre quadrature on [low, high] (float64): exact for
    polynomials of degree < 2 ``nodes``."""
    checks.positive_int("nodes", nodes)
    u, w = np.polynomial.legendre.leggauss(nodes)
    half = 0.5 * (high - low)
    nodes_ = torch.as_tensor(low + half * (u + 1), dtype=_F64, device=device)
    return nodes_, torch.as_tensor(half * w, dtype=_F64, device=device)


def _residual_moments(
    model: ContinuousDiffusionModel,
    gamma: torch.Tensor,
    means: torch.Tensor,
    cov: torch.Tensor | None,
    data_shape: tuple[int, ...] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`E Q` and :math:`\mathrm{Var}\,Q`, each ``(G, N)``, of :math:`Q = \Vert\epsilon - \hat\epsilon(z_\gamma,
    \gamma)\Vert^2` at the G levels ``gamma`` for :math:`x \sim N(\text{means}_n, \text{cov})` (``cov=None``: the point),
    :math:`\epsilon \sim N(0, I)` (:func:`diffusion_estimator_moments`)."""
    A, b = noise_prediction_map(model, gamma, data_shape)
    D = A.shape[-1]
    alpha = torch.sigmoid(-gamma).sqrt()[:, None, None]
    sigma = torch.sigmoid(gamma).sqrt()[:, None, None]
    M = torch.eye(D, dtype=_F64, device=A.device) - sigma * A
    C = M @ M.transpose(1, 2)
    if cov is not None:
        C = C + alpha.pow(2) * A @ cov.to(A.device) @ A.transpose(1, 2)
    mu = torch.einsum("gij,nj->gni", alpha * A, means.to(A.device)) + b[:, None]
    trace = C.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None]
    mean_q = trace + mu.pow(2).sum(-1)
    var_q = 2 * (C * C).sum((-2, -1))[:, None] + 4 * torch.einsum("gni,gij,gnj->gn", mu, C, mu)
    return mean_q, var_q


def _continuous_terms(
    model: ContinuousDiffusionModel,
    means: torch.Tensor,
    cov: torch.Tensor | None,
    data_shape: tuple[int, ...] | None,
    nodes: int,
) -> torch.Tensor:
    """Prior, decoder and diffusion terms ``(N, 3)`` for :math:`x \\sim N(\\text{means}_n, \\text{cov})`
    (``cov=None``: the points); :func:`continuous_elbo_terms`."""
    _check_continuous(model)
    device = model.device_and_dtype()[0]
    gamma_0, gamma_1 = (float(g.detach()) for g in model.schedule.endpoints())
    D = means.shape[1]
    gamma, w = _gauss_legendre(gamma_0, gamma_1, nodes, device)
    mean_q, _ = _residual_moments(model, gamma, means, cov, data_shape)
    diffusion = 0.5 * (w[:, None] * mean_q).sum(0)
    a2, s2 = torch.sigmoid(torch.tensor(-gamma_1, dtype=_F64)), torch.sigmoid(torch.tensor(gamma_1, dtype=_F64))
    square = means.pow(2).sum(-1).to(device) + (0 if cov is None else cov.diagonal().sum().to(device))
    prior = 0.5 * (D * s2 + a2 * square - D - D * s2.log())
    decoder = torch.full_like(prior, 0.5 * D * (_LOG_2PI + gamma_0 + 1))
    return torch.stack([prior, decoder, diffusion], dim=-1)


# ---------------------------------------------------------------------- helpers
def _affine_probes(D: int, check_points: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The points ``(D + 1 + check_points, D)`` where a map is read as an affine one: 0, the D unit vectors, and
    ``check_points`` further points drawn from a fixed seed (also returned alone)."""
    probes = torch.randn(check_points, D, generator=torch.Generator().manual_seed(0), dtype=_F64).to(device)
    return torch.cat([probes.new_zeros(1, D), torch.eye(D, dtype=_F64, device=device), probes]), probes


def _affine_fit(values: torch.Tensor, probes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int | None, float]:
    r"""The affine maps :math:`y = W x + c` of G functions from their values ``(G, P, D)`` at :func:`_affine_probes`'
    points: :math:`c` at 0, :math:`W` from the unit vectors; returns ``(W (G, D, D), c (G, D), first, error)``,
    ``first`` the index of the first function off its affine map at a further probe by more than 1e-8 of its scale
    (None if none) and ``error`` that distance."""
    D = values.shape[-1]
    offsets = values[:, 0]
    weights = (values[:, 1 : D + 1] - offsets[:, None]).transpose(1, 2)
    fitted = torch.einsum("gij,kj->gki", weights, probes) + offsets[:, None]
    error = (fitted - values[:, D + 1 :]).abs().amax((1, 2))
    bad = ~(error <= 1e-8 * (1 + values.abs().amax((1, 2))))
    if not bad.any():
        return weights, offsets, None, 0.0
    first = int(torch.nonzero(bad)[0])
    return weights, offsets, first, error[first].item()


def _data_shape(model: DiffusionModel | ContinuousDiffusionModel, data_shape) -> tuple[int, ...]:
    if data_shape is not None:
        data_shape = tuple(int(s) for s in data_shape)
        if model.data_shape is not None and data_shape != tuple(model.data_shape):
            raise ValueError(f"data of shape {data_shape} does not fit the model's data shape {model.data_shape}")
    shape = data_shape or model.data_shape
    if shape is None:
        raise ValueError("the model does not know its data shape: pass data_shape (or data)")
    return tuple(shape)


def _resolve(model_or_chain, data_shape: tuple[int, ...]) -> GaussianReverseChain:
    if isinstance(model_or_chain, GaussianReverseChain):
        return model_or_chain
    if isinstance(model_or_chain, DiffusionModel):
        return reverse_chain(model_or_chain, data_shape)
    raise TypeError(f"expected a DiffusionModel or a GaussianReverseChain, got {type(model_or_chain).__name__}")


def _chain_and_data(model_or_chain, x0: torch.Tensor) -> tuple[GaussianReverseChain, torch.Tensor]:
    """The chain (on the data's device) and the data as float64 ``(N, D)``."""
    check_batch(x0)
    chain = _resolve(model_or_chain, tuple(x0.shape[1:])).to(x0.device)
    x = x0.reshape(x0.shape[0], -1).to(_F64)
    if x.shape[1] != chain.dim:
        raise ValueError(f"x0 has {x.shape[1]} values per example, the reverse chain has dimension D = {chain.dim}")
    return chain, x


def _chain_and_law(model_or_chain, mean, cov) -> tuple[GaussianReverseChain, torch.Tensor, torch.Tensor]:
    """The chain (on the mean's device) and the data law :math:`N(m, S)` as float64 ``(D,)``, ``(D, D)``."""
    if not torch.is_tensor(mean):
        raise TypeError(f"mean must be a torch tensor, got {type(mean).__name__}")
    known = isinstance(model_or_chain, DiffusionModel) and model_or_chain.data_shape is not None
    chain = _resolve(model_or_chain, None if known or mean.dim() == 0 else tuple(mean.shape)).to(mean.device)
    m, S = _check_law(mean.reshape(-1), cov)
    if m.numel() != chain.dim:
        raise ValueError(f"the data law has dimension {m.numel()}, the reverse chain D = {chain.dim}")
    return chain, m, S


def _check_vector(value, name: str) -> torch.Tensor:
    """A floating-point tensor ``(..., D)`` with D >= 1 and finite values, as float64."""
    if not torch.is_tensor(value):
        raise TypeError(f"{name} must be a torch tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.dim() < 1 or value.shape[-1] < 1:
        raise ValueError(f"{name} must have shape (..., D) with D >= 1, got {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} is not finite")
    return value.to(_F64)


def _check_law(mean, cov) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``mean`` ``(..., D)`` and ``cov`` ``(D, D)`` as float64 on the mean's device; ``cov`` symmetric positive definite."""
    m = _check_vector(mean, "mean")
    if not torch.is_tensor(cov):
        raise TypeError(f"cov must be a torch tensor, got {type(cov).__name__}")
    S = cov.to(device=m.device, dtype=_F64)
    if S.shape != (m.shape[-1], m.shape[-1]):
        raise ValueError(f"cov must have shape (D, D) = {(m.shape[-1],) * 2} for the mean, got {tuple(S.shape)}")
    _check_covariance(S, "cov")
    return m, S


def _check_covariance(cov: torch.Tensor, name: str, steps: bool = False) -> None:
    """Refuse a covariance (or, with ``steps``, a stack of them, one per step t) that is not finite, symmetric
    and positive definite, naming it (and the first bad step)."""
    where = lambda bad: f" at step t = {int(torch.nonzero(bad)[0]) + 1}" if steps else ""  # noqa: E731
    flat = cov.reshape(-1, *cov.shape[-2:])
    finite = torch.isfinite(flat).all(-1).all(-1)
    if not finite.all():
        raise ValueError(f"{name} is not finite{where(~finite)}")
    asym = (flat - flat.transpose(-1, -2)).abs().amax((-1, -2)) > 1e-10 * (1 + flat.abs().amax((-1, -2)))
    if asym.any():
        raise ValueError(f"{name} is not symmetric{where(asym)}")
    info = torch.linalg.cholesky_ex(flat).info
    if (info != 0).any():
        raise ValueError(f"{name} is not positive definite{where(info != 0)}")


def _cholesky(matrix: torch.Tensor, what: str) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(matrix)
    if info.item() != 0:
        raise ValueError(f"{what} is not positive definite (numerically): its Cholesky factorisation fails")
    return L


def _normal(mean: torch.Tensor, cov: torch.Tensor, what: str) -> MultivariateNormal:
    """:math:`N(\\text{mean}, \\text{cov})` from a Cholesky factor computed here (a clear error if not PD)."""
    return MultivariateNormal(mean, scale_tril=_cholesky(cov, what), validate_args=False)


def _check_schedule(schedule) -> None:
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a Schedule (e.g. a NoiseSchedule), got {type(schedule).__name__}")


def _from_eigen(U: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    r""":math:`U \mathrm{diag}(v) U^\top` for each row ``v`` of ``values`` (``(..., D)``), exactly symmetric."""
    M = (U * values[..., None, :]) @ U.T
    return 0.5 * (M + M.transpose(-1, -2))
