r"""Per-example timestep subsampling: an unbiased estimate of the full-chain ELBO.

The negative ELBO is :math:`L_T + \sum_{t=1}^{T} \ell_t` with :math:`\ell_1 = L_0` (decoder) and
:math:`\ell_t = L_{t-1}` for t >= 2.  :math:`L_T` has no parameters and is scored on every example.
The other T terms are estimated by drawing, for each example independently, k distinct timesteps
uniformly from 1..T and weighting each drawn term by T/k: every term is included with probability
k/T, so the weighted sum is unbiased.  Per-example draws are far less variable than one index set
shared by the whole batch (what a ``pyro.plate`` subsample would give; MATH.md).

The draw is a Pyro *subsample* site: recorded by the guide, replayed into the model so that both
score the same timesteps, and pruned from the ELBO like the index site of a subsampled
``pyro.plate``.
"""

from __future__ import annotations

import pyro
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample as _PyroSubsample

__all__ = [
    "draw_timesteps",
    "step_scale",
    "check_subsample_steps",
    "ImportanceSampler",
    "TimestepWeighting",
    "STEP_SITES",
    "drawn_terms",
]

#: The sites of one drawn term: each carries the weight of its timestep.
STEP_SITES = ("x_t", "x_{t-1}", "x_0")


class _Subsample(_PyroSubsample):
    """k timesteps in 1..T for each of N examples, shape ``(k, N)``: distinct and uniform, or, given
    ``probs`` (length T), drawn with replacement from them.

    Named ``_Subsample`` on purpose: Pyro recognises subsample sites by this class name
    (``pyro.poutine.util.site_is_subsample``) and prunes them from ELBO traces, with log-density 0.
    """

    def __init__(
        self,
        num_examples: int,
        subsample_steps: int,
        num_steps: int,
        device: torch.device,
        probs: torch.Tensor | None = None,
    ) -> None:
        super().__init__(num_steps, subsample_steps, device=device)
        self.num_examples = num_examples
        self.probs = probs

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        if sample_shape:
            raise NotImplementedError("timestep subsample sites are not vectorised over particles")
        T, k, N = self.size, self.subsample_size, self.num_examples
        if self.probs is not None:
            return torch.multinomial(self.probs, k * N, replacement=True).reshape(k, N) + 1
        if k == 1:
            return torch.randint(1, T + 1, (1, N), device=self.device)
        return torch.rand(N, T, device=self.device).topk(k, dim=1).indices.T + 1


def check_subsample_steps(subsample_steps: int, num_steps: int) -> None:
    """Refuse a number of steps per example outside 1..T."""
    if (
        isinstance(subsample_steps, bool)
        or not isinstance(subsample_steps, int)
        or not 1 <= subsample_steps <= num_steps
    ):
        raise ValueError(f"subsample_steps must be an integer in 1..T = 1..{num_steps}, got {subsample_steps!r}")


def draw_timesteps(num_examples: int, subsample_steps: int, num_steps: int, device: torch.device) -> torch.Tensor:
    """The subsample site ``"t"``: timesteps of shape ``(k, N)``, shared by guide and model."""
    check_subsample_steps(subsample_steps, num_steps)
    return pyro.sample("t", _Subsample(num_examples, subsample_steps, num_steps, device))


def step_scale(t: torch.Tensor, num_steps: int) -> float:
    """The weight T/k of each drawn term, which makes the estimate unbiased."""
    return num_steps / t.shape[0]


class ImportanceSampler:
    r"""Nichol & Dhariwal (2021, section 3.3)'s loss-second-moment sampler of timesteps.

    Keeps the last ``history`` values of each term :math:`\ell_t`; once every t has them, draws t with
    probability :math:`p(t) \propto \sqrt{E[\ell_t^2]}`, mixed with a fraction ``uniform_mix`` of the
    uniform law so that every p(t) > 0 (before that it draws uniformly).  Each drawn term is weighted
    :math:`1 / (k\, p(t))`, which keeps the estimate of :math:`\sum_t \ell_t` unbiased for any p.

    Use it as a handler on model and guide alike, ``sampler(model)``, ``sampler(guide)``, with
    ``subsample_steps`` given; feed it the drawn terms with :meth:`update` (``pyrodiff train`` does).
    """

    def __init__(self, num_steps: int, history: int = 10, uniform_mix: float = 1e-3) -> None:
        self.num_steps = num_steps
        self.history = history
        self.uniform_mix = uniform_mix
        self.values = torch.zeros(num_steps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_steps, dtype=torch.long)

    @property
    def warm(self) -> bool:
        return bool((self.counts >= self.history).all())

    def probs(self) -> torch.Tensor:
        """p(t) for t = 1..T (float64)."""
        uniform = torch.full((self.num_steps,), 1 / self.num_steps, dtype=torch.float64)
        if not self.warm:
            return uniform
        rms = self.values.pow(2).mean(1).sqrt()
        return (1 - self.uniform_mix) * rms / rms.sum() + self.uniform_mix * uniform

    def update(self, t: torch.Tensor, terms: torch.Tensor) -> None:
        """Record the values ``terms`` of the drawn terms ``t`` (same shape): each t keeps a ring buffer
        of its last ``history`` values."""
        t = t.detach().reshape(-1).cpu() - 1
        values = terms.detach().reshape(-1).double().cpu()
        order = torch.argsort(t, stable=True)
        t, values = t[order], values[order]
        in_batch = torch.bincount(t, minlength=self.num_steps)
        rank = torch.arange(t.numel()) - (torch.cumsum(in_batch, 0) - in_batch)[t]  # position within its t
        keep = rank >= in_batch[t] - self.history  # only the newest `history` values of each t matter
        self.values[t[keep], ((self.counts[t] + rank) % self.history)[keep]] = values[keep]
        self.counts += in_batch

    def state_dict(self) -> dict:
        return {"values": self.values.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.values, self.counts = state["values"].clone(), state["counts"].clone()

    def __call__(self, fn):
        return _ImportanceMessenger(self)(fn)


def drawn_terms(model_trace, guide_trace) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The drawn timesteps ``t`` and the unweighted values of their terms :math:`\ell_t` (analytic KL for
    t >= 2, decoder negative log-likelihood at t = 1), both ``(k, N)``, from traces of the subsampled
    program."""
    from torch.distributions import kl_divergence

    t = guide_trace.nodes["t"]["value"]
    kl = kl_divergence(guide_trace.nodes["x_{t-1}"]["fn"], model_trace.nodes["x_{t-1}"]["fn"])
    decoder = model_trace.nodes["x_0"]
    nll = -decoder["fn"].log_prob(decoder["value"])
    return t, torch.where(t == 1, nll, kl).detach()


class TimestepWeighting(Messenger):
    r"""Scales the sites of each drawn term (:data:`STEP_SITES`) by ``weights[t - 1]``, with t read from
    the subsample site ``"t"`` that precedes them.  Wrap model and guide alike.  The full chain has no
    drawn terms to weight and is refused."""

    def __init__(self, weights: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weights = weights
        self._t: torch.Tensor | None = None

    def _process_message(self, msg) -> None:
        if msg["name"] == "x_{1:T}":
            raise ValueError("timestep weights apply to subsampled terms: pass subsample_steps")
        if msg["name"] in STEP_SITES and self._t is not None:
            msg["scale"] = msg["scale"] * self.weights.to(self._t.device, torch.get_default_dtype())[self._t - 1]

    def _postprocess_message(self, msg) -> None:
        if msg["name"] == "t":
            self._t = msg["value"]


class _ImportanceMessenger(TimestepWeighting):
    """Draws the site ``"t"`` from the sampler's p and weights each drawn term by 1 / (T p(t)), which
    turns the uniform weight T/k into 1 / (k p(t))."""

    def __init__(self, sampler: ImportanceSampler) -> None:
        super().__init__()
        self.sampler = sampler

    def _process_message(self, msg) -> None:
        if msg["name"] == "t":
            probs = self.sampler.probs().to(msg["fn"].device)
            self.weights = 1 / (self.sampler.num_steps * probs)
            fn = msg["fn"]
            msg["fn"] = _Subsample(fn.num_examples, fn.subsample_size, fn.size, fn.device, probs)
        super()._process_message(msg)
