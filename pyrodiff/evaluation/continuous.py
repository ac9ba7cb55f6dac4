r"""The continuous-time bound of a :class:`~pyrodiff.chain.continuous.ContinuousDiffusionModel`, term by term, with
standard errors (docs/MATH.md, section 16, "Continuous time and learned schedules").

For each example and each of S independent draws: the prior term :math:`\mathrm{KL}(q(z_1 \mid x) \,\|\, N(0, I))`
(exact, the same in every draw), the decoder term :math:`-\log p(x \mid z_0)` at a draw of :math:`z_0`, and the
diffusion term :math:`\tfrac12\gamma'(t)\|\epsilon - \hat\epsilon_\theta(z_t, t)\|^2` at a draw of :math:`(t, \epsilon)`
(``times="stratified"``: the S times of an example are :math:`(u + s)/S`, one uniform shift per example, each time
uniform; ``"uniform"``: independent).  Each is unbiased for its term; the per-example mean over draws is unbiased for
the example's bound, and the standard error across examples includes the draws' noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .. import checks
from ..chain.continuous import ContinuousDiffusionModel, alpha_sigma
from ..chain.decoders import Decoder
from ..chain.gaussian import normal_kl
from .bound import _stderr_over_examples, nats_to_bits_per_dim

__all__ = ["continuous_bound", "ContinuousBound", "TERMS"]

#: the columns of :attr:`ContinuousBound.nats`
TERMS = ("decoder", "diffusion", "prior")
TIMES = ("stratified", "uniform")


@dataclass
class ContinuousBound:
    """Draws of the continuous-time bound's terms: ``nats[s, n, j]`` is draw s of term :data:`TERMS` ``[j]`` for
    example n (nats); ``model`` is the model's :meth:`~pyrodiff.chain.continuous.ContinuousDiffusionModel.describe`."""

    nats: torch.Tensor
    dims: int
    decoder: Decoder
    model: dict

    @property
    def total(self) -> torch.Tensor:
        """The negative ELBO of each draw and example, shape ``(S, N)``."""
        return self.nats.sum(-1)

    def per_example(self) -> torch.Tensor:
        """Each example's bound, the mean of its draws (shape ``(N,)``, nats)."""
        return self.total.mean(0)

    def mean(self) -> torch.Tensor:
        """Each term's mean over draws and examples (shape ``(3,)``, nats)."""
        return self.nats.mean((0, 1))

    def stderr(self) -> torch.Tensor:
        """Each term's standard error across examples (of the per-example means over draws)."""
        return _stderr_over_examples(self.nats)

    def total_stderr(self) -> float:
        return float(_stderr_over_examples(self.total.unsqueeze(-1))[0])

    def summary(self, meta: dict | None = None) -> dict:
        """The content of ``test_bound.json`` for a continuous-time model: the bound in nats and bits/dim with its
        standard error, and each term's."""
        mean, stderr = self.mean().double().cpu(), self.stderr().double().cpu()
        total, total_stderr = float(mean.sum()), self.total_stderr()
        return {
            **(meta or {}),
            "model": self.model,
            "time": "continuous",
            "num_examples": int(self.nats.shape[1]),
            "num_samples": int(self.nats.shape[0]),
            "dims": self.dims,
            "decoder": self.decoder.name,
            "levels": self.decoder.levels,
            "scale": self.decoder.describe(),
            "total_nats": total,
            "total_stderr": total_stderr,
            "bits_per_dim": nats_to_bits_per_dim(total, self.dims),
            "bits_per_dim_stderr": nats_to_bits_per_dim(total_stderr, self.dims),
            "terms": list(TERMS),
            "terms_nats": mean.tolist(),
            "terms_stderr": stderr.tolist(),
            "terms_bits_per_dim": nats_to_bits_per_dim(mean, self.dims).tolist(),
        }


@torch.no_grad()
def continuous_bound(
    model: ContinuousDiffusionModel,
    x0: torch.Tensor,
    num_samples: int = 1,
    times: str = "stratified",
    batch_size: int = 512,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> ContinuousBound:
    r"""S = ``num_samples`` draws of every term of the continuous-time bound for the examples ``x0`` (module
    docstring), in network calls of at most ``batch_size`` inputs, with ``generator`` (on ``x0``'s device) drawing
    every time and noise."""
    if not isinstance(model, ContinuousDiffusionModel):
        raise TypeError(f"continuous_bound scores a ContinuousDiffusionModel, got {type(model).__name__}")
    checks.positive_int("num_samples", num_samples)
    checks.one_of("times", times, TIMES)
    checks.positive_int("batch_size", batch_size)
    model.check_data(x0)
    S, N, event_dim = num_samples, x0.shape[0], x0.dim() - 1
    device = x0.device
    nats = x0.new_empty(S, N, len(TERMS))
    gamma_0, gamma_1 = model.schedule.endpoints()
    alpha_1, sigma_1 = alpha_sigma(gamma_1.expand(N), x0)
    prior = normal_kl(alpha_1 * x0, sigma_1.pow(2), torch.zeros_like(x0), torch.ones_like(x0), event_dim)
    nats[..., 2] = prior
    rand = torch.rand(N, generator=generator, device=device, dtype=torch.float64)
    if times == "stratified":
        t_all = (rand + torch.arange(S, device=device, dtype=torch.float64)[:, None]) / S  # (S, N)
    else:
        t_all = torch.cat([rand[None], torch.rand(S - 1, N, generator=generator, device=device, dtype=torch.float64)])
    alpha_0, sigma_0 = alpha_sigma(gamma_0.expand(N), x0)
    per_call = max(1, batch_size // N)
    for start in tqdm(range(0, S, per_call), desc="bound", disable=not progress, leave=False):
        stop = min(S, start + per_call)
        k = stop - start
        xk = x0.expand((k,) + x0.shape).reshape((k * N,) + x0.shape[1:])
        eps = torch.randn(xk.shape, generator=generator, device=device, dtype=x0.dtype)
        nats[start:stop, :, 1] = model.diffusion_loss(xk, t_all[start:stop].reshape(-1), eps).reshape(k, N)
        eps_0 = torch.randn((k,) + x0.shape, generator=generator, device=device, dtype=x0.dtype)
        z0 = alpha_0 * x0 + sigma_0 * eps_0
        nats[start:stop, :, 0] = -model.decoder_law(z0.reshape(xk.shape)).log_prob(xk).reshape(k, N)
    if not torch.isfinite(nats).all():
        raise ValueError("the continuous-time bound has non-finite terms: the network returned NaN or infinity")
    return ContinuousBound(nats, int(x0[0].numel()), model.decoder, model.describe())
