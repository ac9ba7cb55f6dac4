r"""Importance-sampled timesteps (Nichol & Dhariwal 2021, section 3.3).

Draw t with probability :math:`p(t) \propto \sqrt{E[\ell_t^2]}` (the root mean square of the last
values of each term) and weight each drawn term by :math:`1 / (k\, p(t))`: the estimate of
:math:`\sum_t \ell_t` stays unbiased for any p with every p(t) > 0, and its variance falls where the
terms are uneven.
"""

from __future__ import annotations

import torch

from .timesteps import TimestepWeighting

__all__ = ["ImportanceSampler"]


class ImportanceSampler:
    r"""Nichol & Dhariwal (2021, section 3.3)'s loss-second-moment sampler of timesteps.

    Keeps the last ``history`` values of each term :math:`\ell_t`; once every t has them, draws t with
    probability :math:`p(t) \propto \sqrt{E[\ell_t^2]}`, mixed with a fraction ``uniform_mix`` of the
    uniform law so that every p(t) > 0 (before that it draws uniformly).  Each drawn term is weighted
    :math:`1 / (k\, p(t))`, which keeps the estimate of :math:`\sum_t \ell_t` unbiased for any p.

    Use it as a handler on model and guide alike, ``sampler(model)``, ``sampler(guide)``, with
    ``subsample_steps`` given; feed it the drawn terms with :meth:`update`
    (:func:`pyrodiff.traces.drawn_terms` reads them off the traces; ``pyrodiff train`` does this).
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


class _ImportanceMessenger(TimestepWeighting):
    """Draws the site ``"t"`` from the sampler's p and weights each drawn term by 1 / (T p(t)), which
    turns the uniform weight T/k into 1 / (k p(t))."""

    def __init__(self, sampler: ImportanceSampler) -> None:
        super().__init__()
        self.sampler = sampler

    def _process_message(self, msg) -> None:
        if msg["name"] == "t":
            probs = self.sampler.probs().to(msg["fn"].device)
            self.set_weights(1 / (self.sampler.num_steps * probs))
            msg["fn"] = msg["fn"].with_probs(probs)
        super()._process_message(msg)
