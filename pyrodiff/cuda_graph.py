"""A device-only step captured once as a CUDA graph and replayed (shared by the training loop and the samplers).

Every kernel launch costs the host tens of microseconds; a small step is bound by them.  :class:`GraphedStep`
runs a step that only queues device work eagerly on a side stream for its first calls (which allocate the
optimiser's state and warm the libraries), captures it once as a :class:`torch.cuda.CUDAGraph` and replays it
at every later call: one launch for the whole step.  CUDA only; callers run the same step eagerly elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["GraphedStep"]


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
