"""pyrodiff's terms against the definitions of improved-diffusion (Nichol & Dhariwal 2021):
``_vb_terms_bpd`` (KL between the true posterior, log-variance clipped, and the model; discretized
decoder at the first step) and ``_prior_bpd``.  The reference is re-derived here from its published
definitions (not its code), in float64, with ``clip_denoised=False`` (pyrodiff scores the model it
trains, whose mean is not clipped).  Its decoder uses the tanh approximation of the normal CDF,
clamps probabilities at 1e-12 and supports 8-bit data only; pyrodiff uses the exact CDF.  So the decoder
term is checked twice: against the reference's definition with the exact CDF (to 1e-9), and against the
reference itself within the error bound that the approximation's largest error implies.
"""

import math

import numpy as np
import pytest
import torch
from scipy.special import ndtr

from pyrodiff import DiffusionModel, NoiseSchedule
from pyrodiff.evaluation.bound import bound_terms
from pyrodiff.testing import LinearDenoiser


def _approx_cdf(x):
    return 0.5 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _reference_bin_probability(x, mean, log_scale, cdf=_approx_cdf):
    """P(x) per dimension, the reference's discretized Gaussian on 256 levels (before its clamp at 1e-12)."""
    inv = np.exp(-log_scale)
    cdf_plus = cdf(inv * (x - mean + 1 / 255))
    cdf_min = cdf(inv * (x - mean - 1 / 255))
    return np.where(x < -0.999, cdf_plus, np.where(x > 0.999, 1 - cdf_min, cdf_plus - cdf_min))


def _reference_decoder_nll(x, mean, log_scale, cdf=_approx_cdf):
    """-log P(x) per dimension, the reference's discretized Gaussian on 256 levels."""
    inv = np.exp(-log_scale)
    cdf_plus = cdf(inv * (x - mean + 1 / 255))
    cdf_min = cdf(inv * (x - mean - 1 / 255))
    logp = np.where(
        x < -0.999,
        np.log(np.maximum(cdf_plus, 1e-12)),
        np.where(x > 0.999, np.log(np.maximum(1 - cdf_min, 1e-12)), np.log(np.maximum(cdf_plus - cdf_min, 1e-12))),
    )
    return -logp


def _reference_terms_bpd(schedule, a, b, x0, eps, variance, v=None, cdf=_approx_cdf, decoder_inputs=None):
    """Reference per-term bits/dim (mean over dimensions) for x_t = sqrt(abar) x0 + sqrt(1 - abar) eps;
    learned variances are the reference's ``learned_range``: frac = (v + 1) / 2 between the clipped
    posterior log-variance and log beta."""
    beta = schedule.betas.numpy()
    abar = np.cumprod(1 - beta)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = beta * (1 - abar_prev) / (1 - abar)
    post_logvar_clipped = np.log(np.append(post_var[1], post_var[1:]))
    if variance == "learned":
        frac = (v + 1) / 2
        model_logvar = frac * np.log(beta) + (1 - frac) * post_logvar_clipped
    else:
        model_logvar = post_logvar_clipped if variance == "small" else np.log(np.append(post_var[1], beta[1:]))
    c1, c2 = beta * np.sqrt(abar_prev) / (1 - abar), (1 - abar_prev) * np.sqrt(1 - beta) / (1 - abar)
    T, out = len(beta), []
    for i in range(T):  # reference index i = our t - 1
        xt = np.sqrt(abar[i]) * x0 + np.sqrt(1 - abar[i]) * eps[i]
        eps_hat = a[i] * xt + b[i]
        pred_x0 = np.sqrt(1 / abar[i]) * xt - np.sqrt(1 / abar[i] - 1) * eps_hat
        model_mean = c1[i] * pred_x0 + c2[i] * xt
        true_mean = c1[i] * x0 + c2[i] * xt
        if i == 0:
            term = _reference_decoder_nll(x0, model_mean, 0.5 * model_logvar[0], cdf)
            if decoder_inputs is not None:
                decoder_inputs.update(mean=model_mean, log_scale=0.5 * model_logvar[0])
        else:
            lv1, lv2 = post_logvar_clipped[i], model_logvar[i]
            term = 0.5 * (-1 + lv2 - lv1 + np.exp(lv1 - lv2) + (true_mean - model_mean) ** 2 * np.exp(-lv2))
        out.append(term.mean(-1) / math.log(2))
    prior = 0.5 * (-1 - np.log(1 - abar[-1]) + (1 - abar[-1]) + abar[-1] * x0**2)
    out.append(prior.mean(-1) / math.log(2))
    return np.stack(out, -1)  # (N, T + 1)


@pytest.mark.parametrize("variance", ["small", "large", "learned"])
def test_terms_agree_with_improved_diffusion(variance, float64):
    T, N, D = 50, 6, 16
    schedule = NoiseSchedule.linear(T, 1e-4, 0.2)
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(T, generator=g, dtype=torch.float64) - 0.5) * 0.2
    b = (torch.rand(T, generator=g, dtype=torch.float64) - 0.5) * 0.1
    v = torch.rand(T, generator=g, dtype=torch.float64) * 2 - 1 if variance == "learned" else None
    x0 = torch.randint(0, 256, (N, D), generator=g).double() / 127.5 - 1
    model = DiffusionModel(LinearDenoiser(T, a, b, v), schedule, "epsilon", variance, "discretized", 256)
    torch.manual_seed(3)
    ours = bound_terms(model, x0, num_samples=1, draws="independent", chunk_size=T).bits_per_dim[0].numpy()
    torch.manual_seed(3)
    eps = torch.randn(T, N, D, dtype=torch.float64).numpy()  # the same draws bound_terms made
    ref = _reference_terms_bpd(
        schedule, a.numpy(), b.numpy(), x0.numpy(), eps, variance, None if v is None else v.numpy()
    )
    assert np.allclose(ours[:, 1:], ref[:, 1:], rtol=1e-9, atol=1e-12)  # every KL term and the prior
    # the decoder: with the exact normal CDF in place of the reference's tanh approximation, exactly the same
    inputs = {}
    exact_cdf = _reference_terms_bpd(
        schedule, a.numpy(), b.numpy(), x0.numpy(), eps, variance, None if v is None else v.numpy(), ndtr, inputs
    )
    assert np.allclose(ours[:, 0], exact_cdf[:, 0], rtol=1e-9)
    # and with the approximation, within the bound its largest error implies: |Phi~ - Phi| <= e everywhere,
    # so each bin's probability moves by at most 2 e and -log P by at most 2 e / min(P~, P) (mean value theorem)
    grid = np.linspace(-12, 12, 2_400_001)
    e = np.abs(_approx_cdf(grid) - ndtr(grid)).max()
    p_approx = _reference_bin_probability(x0.numpy(), inputs["mean"], inputs["log_scale"])
    p_exact = _reference_bin_probability(x0.numpy(), inputs["mean"], inputs["log_scale"], ndtr)
    assert p_approx.min() > 1e-12  # the reference's clamp plays no part here
    bound_bpd = (2 * e / np.minimum(p_approx, p_exact)).mean(-1) / math.log(2)
    assert (np.abs(ours[:, 0] - ref[:, 0]) <= bound_bpd).all()
    assert np.abs(ours[:, 0] - ref[:, 0]).max() > 0  # the approximation is really different
