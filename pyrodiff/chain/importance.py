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
    (:func:`pyrodiff.chain.traces.drawn_terms` reads them off the traces; ``pyrodiff train`` does this).
    """

    def __init__(
        self, num_steps: int, history: int = 10, uniform_mix: float = 1e-3, device: torch.device | str | None = None
    ) -> None:
        self.num_steps = num_steps
        self.history = history
        self.uniform_mix = uniform_mix
        # the ring buffers, plus one spare entry that receives the values update() drops: updates write in place
        # (a CUDA graph replays them on the same memory) with a fixed shape (no host read of the batch's content)
        self._buffer = torch.zeros(num_steps * history + 1, dtype=torch.float64, device=device)
        self.values = self._buffer[:-1].view(num_steps, history)
        self.counts = torch.zeros(num_steps, dtype=torch.long, device=device)

    @property
    def warm(self) -> bool:
        """Whether every t has ``history`` values (reads the device; the sampler itself never does)."""
        return bool(self._warm())

    def _warm(self) -> torch.Tensor:
        return (self.counts >= self.history).all()

    def probs(self) -> torch.Tensor:
        """p(t) for t = 1..T (float64, on the sampler's device), chosen on the device: no host read."""
        uniform = torch.full((self.num_steps,), 1 / self.num_steps, dtype=torch.float64, device=self.counts.device)
        rms = self.values.pow(2).mean(1).sqrt()
        weighted = (1 - self.uniform_mix) * rms / rms.sum() + self.uniform_mix * uniform
        return torch.where(self._warm(), weighted, uniform)

    def update(self, t: torch.Tensor, terms: torch.Tensor) -> None:
        """Record the values ``terms`` of the drawn terms ``t`` (same shape): each t keeps a ring buffer
        of its last ``history`` values.  Device work of fixed shapes only: no host read, capturable in a CUDA graph."""
        t = t.detach().reshape(-1).to(self.counts.device) - 1
        values = terms.detach().reshape(-1).to(self._buffer.device, torch.float64)
        order = torch.argsort(t, stable=True)
        t, values = t[order], values[order]
        in_batch = torch.zeros_like(self.counts).index_add_(0, t, torch.ones_like(t))  # bincount of a fixed length
        rank = torch.arange(t.numel(), device=t.device) - (torch.cumsum(in_batch, 0) - in_batch)[t]  # rank within t
        keep = rank >= in_batch[t] - self.history  # only the newest `history` values of each t matter
        slot = t * self.history + (self.counts[t] + rank) % self.history  # distinct for the kept values
        self._buffer.index_put_((slot.masked_fill(~keep, self.values.numel()),), values)  # the rest: the spare entry
        self.counts += in_batch

    def state_dict(self) -> dict:
        return {"values": self.values.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Copy a state in (in place, onto the sampler's device)."""
        self.values.copy_(state["values"])
        self.counts.copy_(state["counts"])

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
            probs = self.sampler.probs().to(msg["fn"].device)  # a no-op when the sampler is on the draws' device
            self.set_weights(1 / (self.sampler.num_steps * probs))
            msg["fn"] = msg["fn"].with_probs(probs)
        super()._process_message(msg)
