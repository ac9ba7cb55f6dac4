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
- :class:`GraphedStep`: a step that only queues device work, reading its inputs from fixed tensors, runs
  eagerly on a side stream for its first calls (which allocate the optimiser's state and warm the libraries),
  is then captured once as a :class:`torch.cuda.CUDAGraph` and replayed at every later call: one launch for
  the whole forward, backward, clipping, AdamW and EMA update.

The graph is CUDA only; elsewhere the same step runs eagerly (still without host reads).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pyro.infer.trace_elbo
import pyro.infer.trace_mean_field_elbo
import torch

__all__ = ["elbo_on_device", "GraphedStep"]

#: Pyro's ELBO modules (those of :data:`pyrodiff.spec.ESTIMATORS`) whose host reads :func:`elbo_on_device` replaces.
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


class GraphedStep:
    """``step(*inputs)``, a function that only queues device work (no host reads, no host-to-device copies),
    run as a CUDA graph.  Each call copies its tensor inputs into tensors that stay in place and runs ``step`` on
    those: the first ``warmup`` calls eagerly, on a side stream (as ``torch.cuda.graph`` requires: the
    optimiser's state and the libraries' workspaces are allocated there), the next captures it once and every
    call from then on replays it.  Each call is one real step; it returns the step's output as a fresh tensor
    (the graph's own output is overwritten by the next replay).  Inputs must keep their shapes and dtypes.

    The random draws of a replay come from CUDA's default generator at its state at the replay (which the
    replay advances), exactly as the eager step's would: set that state before a call to reproduce a step."""

    def __init__(self, step: Callable[..., torch.Tensor], warmup: int = 3) -> None:
        if warmup < 1:
            raise ValueError(f"a graphed step needs at least one eager warm-up call, got warmup = {warmup}")
        self.step, self.warmup = step, warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._inputs: list[torch.Tensor] | None = None
        self._output: torch.Tensor | None = None
        self._side_stream: torch.cuda.Stream | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self._inputs is None:
            self._inputs = [torch.empty_like(x) for x in inputs]
        for static, x in zip(self._inputs, inputs, strict=True):
            static.copy_(x)
        self.calls += 1
        if self.graph is None and self.calls <= self.warmup:
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream()
            main = torch.cuda.current_stream()
            self._side_stream.wait_stream(main)
            with torch.cuda.stream(self._side_stream):
                output = self.step(*self._inputs)
            main.wait_stream(self._side_stream)
            return output
        if self.graph is None:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records the kernels without running them
                self._output = self.step(*self._inputs)
            self.graph, self._side_stream = graph, None  # only a capture that finished is kept
        self.graph.replay()
        return self._output.clone()
