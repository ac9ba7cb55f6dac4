r"""Training-free optimal reverse variances (Bao et al. 2022, Analytic-DPM).

Given a trained mean (the network's :math:`\hat x_0`, hence :math:`\hat\epsilon`), the variance of each Gaussian
reverse step that maximises the bound has a closed form in :math:`\Gamma_t = E_{q(x_t)}\|\hat\epsilon(x_t, t)\|^2 / D`
(their Theorem 1 with :math:`\lambda_t^2 = \tilde\beta_t`, the DDPM case, written with this project's symbols):

.. math:: \sigma_t^{*2} = \tilde\beta_t + \Big(\sqrt{\frac{1 - \bar\alpha_t}{\alpha_t}} - \sqrt{1 - \bar\alpha_{t-1} - \tilde\beta_t}\Big)^2 (1 - \Gamma_t),

clipped to the interval their Theorem 2 proves it lies in, :math:`[\tilde\beta_t, \tilde\beta_t + (\cdot)^2] = [\tilde\beta_t, \beta_t/\alpha_t]`
(the upper end: :math:`(\cdot)^2 = \beta_t^2 / (\alpha_t (1 - \bar\alpha_t))`, and :math:`\tilde\beta_t + \beta_t^2/(\alpha_t(1 - \bar\alpha_t)) = \beta_t/\alpha_t`).
With the optimal mean (:math:`\hat\epsilon = E[\epsilon \mid x_t]`) and the exact :math:`\Gamma_t` it is the true reverse
conditional's variance :math:`E\,\mathrm{Var}[x_{t-1} \mid x_t] / D` (tested against :mod:`pyrodiff.theory.exact`); with a trained
mean it is Analytic-DPM's plug-in estimate.  :math:`\Gamma_t` is a Monte Carlo average over training data.  At t = 1 the decoder keeps the
model's convention (:math:`\tilde\beta_2`).  The same holds for any respaced chain, with its own betas.
"""

from __future__ import annotations

import torch

from .forward import q_marginal
from .parameterization import TableVariance, x0_to_eps
from .reverse import DiffusionModel
from .schedule import Schedule

__all__ = ["analytic_variance", "expected_eps_norm"]


@torch.no_grad()
def expected_eps_norm(model: DiffusionModel, data: torch.Tensor, draws: int = 1, generator=None) -> torch.Tensor:
    r""":math:`\Gamma_t = E\|\hat\epsilon(x_t, t)\|^2 / D` for t = 1..T (float64, length T): ``draws`` draws of
    :math:`x_t \sim q(x_t \mid x_0)` for every example of ``data`` and every t, one network call per t."""
    model.check_data(data)
    T, N = model.schedule.num_steps, data.shape[0]
    out = torch.empty(T, dtype=torch.float64)
    for t in range(1, T + 1):
        steps = torch.full((N,), t, device=data.device, dtype=torch.long)
        loc, var = q_marginal(model.schedule, data, steps)
        total = 0.0
        for _ in range(draws):
            xt = loc + var.sqrt() * torch.randn(data.shape, generator=generator, device=data.device, dtype=data.dtype)
            abar = model.schedule.coefficients(data.device, data.dtype).alphas_cumprod[t - 1]
            eps = x0_to_eps(model.predict(xt, steps).x0, xt, abar)
            total += eps.double().pow(2).mean().item()
        out[t - 1] = total / draws
    return out


def optimal_variances(schedule: Schedule, gamma: torch.Tensor) -> torch.Tensor:
    r""":math:`\sigma_t^{*2}` of the module docstring for t = 1..T (float64), given :math:`\Gamma_t` (length T), clipped to
    :math:`[\tilde\beta_t, \beta_t/\alpha_t]`; entry 0 (the decoder) is :math:`\tilde\beta_2`."""
    c = schedule.tables()
    abar, alpha, tilde = c.alphas_cumprod, c.alphas, c.posterior_variance
    gap = ((1 - abar) / alpha).sqrt() - (1 - c.alphas_cumprod_prev - tilde).clamp(min=0).sqrt()
    sigma2 = torch.minimum(torch.maximum(tilde + gap**2 * (1 - gamma.double()), tilde), tilde + gap**2)
    sigma2[0] = tilde[1]  # the decoder keeps the model's convention
    return sigma2


def analytic_variance(model: DiffusionModel, data: torch.Tensor, draws: int = 1, generator=None) -> DiffusionModel:
    """The model with Analytic-DPM's variances for its mean (module docstring), estimated on ``data``.  DDPM's chains
    only (the formula is for the posterior of DDPM's forward process): a DDIM model is refused."""
    if not model.family.is_markov:
        raise ValueError("Analytic-DPM's variances here are those of DDPM's chain: give the model before .ddim(eta)")
    sigma2 = optimal_variances(model.schedule, expected_eps_norm(model, data, draws, generator))
    return model.with_variance(TableVariance(tuple(float(v) for v in sigma2)))
