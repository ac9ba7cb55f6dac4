"""The training step without host synchronisation, and captured once as a CUDA graph.

On a GPU a training step is bound by the host when it is small: every kernel launch costs tens of
microseconds, and every read of a tensor's value on the host (``.item()``, ``bool(t)``, a copy from the host)
waits for the device to finish everything queued.  Two things make the Pyro program's step free of them:

- :func:`elbo_on_device`: Pyro's ``Trace_ELBO`` and ``TraceMeanField_ELBO`` read the loss on the host in
  ``differentiable_loss`` (``torch_item``, twice with ``TraceMeanField_ELBO``, more with ``Trace_ELBO``, which
  converts every site's log-density sum) and check it for NaN (``warn_if_nan``: ``bool(isnan(loss))``, and a
  backward hook that does the same for the gradient).  Inside the context those two helpers of Pyro's ELBO
  modules keep values on the device: ``torch_item`` detaches instead of reading, ``warn_if_nan`` returns its
  argument (the training loop checks the losses for NaN itself, at its logging interval).  Everything else is
  Pyro's own code for the same model and guide; the loss has the same value and the same gradient
  (``tests/test_host_sync.py``).
- :class:`pyrodiff.cuda_graph.GraphedStep` (shared with the samplers): the step, captured once as a CUDA graph
  and replayed: one launch for the whole forward, backward, clipping, AdamW and EMA update.

The graph is CUDA only; elsewhere the same step runs eagerly (still without host reads).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from contextlib import contextmanager

import pyro.infer.trace_elbo
import pyro.infer.trace_mean_field_elbo

__all__ = ["elbo_on_device"]

#: Pyro's ELBO modules (those of :data:`pyrodiff.training.spec.ESTIMATORS`) whose host reads :func:`elbo_on_device` replaces.
_ELBO_MODULES = (pyro.infer.trace_elbo, pyro.infer.trace_mean_field_elbo)


def _detach(x):
    """``torch_item`` without the host read: a tensor stays on the device (detached), a number stays a number."""
    return x if isinstance(x, numbers.Number) else x.detach()


def _unchecked(value, *args, **kwargs):
    """``warn_if_nan`` without its check (a host read) and without its gradient hook (another, in backward)."""
    return value


@contextmanager
def elbo_on_device() -> Iterator[None]:
    """Within the block, Pyro's ``Trace_ELBO`` and ``TraceMeanField_ELBO`` compute their loss without reading
    it on the host (see the module's docstring): same value, same gradient, no synchronisation.  It swaps two
    module-level helpers of Pyro's, so it affects every thread while active; the training loop holds it only
    around its own loss."""
    replaced = [(m, name, getattr(m, name)) for m in _ELBO_MODULES for name in ("torch_item", "warn_if_nan")]
    for module, name, _ in replaced:
        setattr(module, name, _detach if name == "torch_item" else _unchecked)
    try:
        yield
    finally:
        for module, name, original in replaced:
            setattr(module, name, original)
