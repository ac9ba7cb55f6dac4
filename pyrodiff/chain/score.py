r"""The score of a diffusion model, and its training objectives as weighted denoising score matching.

With :math:`x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1 - \bar\alpha_t}\,\epsilon` and :math:`s_t^2 = 1 - \bar\alpha_t`
(the noise variance; docs/MATH.md, "The score and the probability-flow ODE"):

- **Tweedie's formula**: :math:`\nabla_{x_t}\log q(x_t) = -E[\epsilon \mid x_t] / s_t`, so the denoiser is a score
  model, :math:`s_\theta(x_t, t) = -\hat\epsilon_\theta(x_t, t) / s_t` (Vincent 2011; Song et al. 2021, eq. 13's
  :math:`\nabla\log p_t`), in its three forms (:func:`score_from_noise`, :func:`score_from_x0`,
  :func:`score_from_v`): :math:`-\hat\epsilon / s_t = -(x_t - \sqrt{\bar\alpha_t}\,\hat x_0) / s_t^2
  = -(s_t x_t + \sqrt{\bar\alpha_t}\,\hat v) / s_t`.
- **Denoising score matching** (Vincent 2011): :math:`J_t(\theta) = E\,\Vert s_\theta(x_t, t) - \nabla_{x_t}\log
  q(x_t \mid x_0)\Vert^2` with the conditional score :math:`\nabla_{x_t}\log q(x_t \mid x_0) = -\epsilon / s_t`
  (:func:`conditional_score`, :func:`dsm_loss`).  Since :math:`s_\theta - \nabla\log q(x_t \mid x_0) = (\epsilon -
  \hat\epsilon) / s_t`, :math:`\Vert\epsilon - \hat\epsilon\Vert^2 = s_t^2\,\Vert s_\theta - \nabla\log q(x_t \mid x_0)\Vert^2`.
- **Every objective is a weighted DSM loss** (:func:`dsm_weights`): the bound's term is
  :math:`\ell_t = w_t\Vert\epsilon - \hat\epsilon\Vert^2 + c_t` (docs/MATH.md, "Objectives as reweightings"), so an
  objective's term :math:`\lambda_t\ell_t = \lambda_t w_t s_t^2 J_t + \lambda_t c_t`: DSM with weight
  :math:`\lambda_t w_t (1 - \bar\alpha_t)`, i.e. :math:`\beta_t^2 / (2\sigma_t^2\alpha_t)` for the ELBO and
  :math:`1 - \bar\alpha_t` for :math:`L_\text{simple}` (Song et al. 2021's :math:`\lambda(t) \propto \sigma_t^2`).
"""

from __future__ import annotations

import torch

from .gaussian import at_timesteps
from .objectives import Objective, _bound_weight, parse_objective
from .parameterization import ReverseVariance, parse_variance
from .reverse import DiffusionModel
from .schedule import Schedule

__all__ = [
    "score",
    "score_from_noise",
    "score_from_x0",
    "score_from_v",
    "conditional_score",
    "dsm_loss",
    "dsm_weights",
]


def score_from_noise(eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    r""":math:`s = -\hat\epsilon / \sqrt{1 - \bar\alpha_t}` (``abar`` broadcast against ``eps``)."""
    return -eps / (1 - abar).sqrt()


def score_from_x0(x0: torch.Tensor, xt: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    r""":math:`s = -(x_t - \sqrt{\bar\alpha_t}\,\hat x_0) / (1 - \bar\alpha_t)` (Tweedie's formula for the mean)."""
    return -(xt - abar.sqrt() * x0) / (1 - abar)


def score_from_v(v: torch.Tensor, xt: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    r""":math:`s = -(\sqrt{1 - \bar\alpha_t}\,x_t + \sqrt{\bar\alpha_t}\,\hat v) / \sqrt{1 - \bar\alpha_t}`."""
    return -((1 - abar).sqrt() * xt + abar.sqrt() * v) / (1 - abar).sqrt()


def conditional_score(xt: torch.Tensor, x0: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    r""":math:`\nabla_{x_t}\log q(x_t \mid x_0) = -(x_t - \sqrt{\bar\alpha_t}\,x_0) / (1 - \bar\alpha_t)`, the target of
    denoising score matching (:math:`= -\epsilon / \sqrt{1 - \bar\alpha_t}` on the path of noise :math:`\epsilon`)."""
    return score_from_x0(x0, xt, abar)


def score(model: DiffusionModel, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    r""":math:`s_\theta(x_t, t) = -\hat\epsilon_\theta(x_t, t) / \sqrt{1 - \bar\alpha_t}` at math timesteps ``t``
    (1..T, shape ``(N,)`` for ``xt`` ``(N, *D)``), from one network call whatever the model predicts."""
    abar = _abar(model.schedule, xt, t)
    return score_from_noise(model.predicted_noise(xt, t, abar), abar)


def dsm_loss(model: DiffusionModel, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    r"""The denoising score-matching loss of each example, shape ``(N,)``, summed over dimensions:
    :math:`\Vert s_\theta(x_t, t) - \nabla_{x_t}\log q(x_t \mid x_0)\Vert^2` at
    :math:`x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1 - \bar\alpha_t}\,\epsilon`, ``noise`` :math:`\epsilon` (its expectation
    over :math:`x_0, \epsilon` is Vincent's :math:`J_t`)."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise of shape {tuple(noise.shape)} does not match x0 of shape {tuple(x0.shape)}")
    abar = _abar(model.schedule, x0, t)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    diff = score(model, xt, t) - conditional_score(xt, x0, abar)
    return (diff**2).flatten(1).sum(1)


def dsm_weights(
    schedule: Schedule, objective: str | Objective = "elbo", variance: str | ReverseVariance = "small"
) -> torch.Tensor:
    r"""The weight of denoising score matching in each term of ``objective``, float64, entry ``t - 1``:
    :math:`\lambda_t w_t (1 - \bar\alpha_t)`, so that the objective's term t is this weight times
    :math:`\Vert s_\theta - \nabla\log q(x_t \mid x_0)\Vert^2` plus a constant :math:`\lambda_t c_t` (module docstring;
    ``"elbo"``: :math:`\beta_t^2 / (2\sigma_t^2\alpha_t)`, ``"simple"``: :math:`1 - \bar\alpha_t`), for the fixed reverse
    variances ``variance`` (learned variances are refused: their term is not a function of the noise error alone)."""
    objective = parse_objective(objective)
    if parse_variance(variance).learned:
        raise ValueError("dsm_weights needs a fixed reverse variance ('small' or 'large'), got 'learned'")
    c = schedule.tables()
    w = _bound_weight(schedule, c, variance, objective.name)
    return (objective.weights(schedule, variance) * w * (1 - c.alphas_cumprod)).detach()


def _abar(schedule: Schedule, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if t.shape != x.shape[:1] or t.is_floating_point():
        raise ValueError(f"t must be an integer tensor of shape ({x.shape[0]},) for x of shape {tuple(x.shape)}")
    return at_timesteps(schedule.coefficients(x.device, x.dtype).alphas_cumprod, t, x.dim() - 1)
