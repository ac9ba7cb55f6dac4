r"""The optimisation every pyrodiff training shares (the diffusion model's :mod:`pyrodiff.training.loop` and the VAE
baseline's :func:`pyrodiff.theory.vae.train_vae`): AdamW with a linear learning-rate warm-up, gradient-norm clipping,
exponential moving averages (EMA) of the weights, and a step that never waits for the device.

One step (:meth:`OptimisationLoop.train_step`) back-propagates the subclass's loss of a batch
(:meth:`OptimisationLoop.step_loss`), clips the gradients' norm, takes the AdamW step, updates the EMAs and the
warm-up; its loss stays on the device, in :attr:`OptimisationLoop.pending`, until :meth:`OptimisationLoop.read_losses`
reads all pending losses at once (one host read), appends them to :attr:`OptimisationLoop.losses` and refuses a
non-finite one, naming its step.  The learning rate at step s (from 0) is :math:`\text{lr} \cdot \min(1, (s + 1) /
\max(1, \text{warmup}))`.  With ``graphed``, the step is captured once as a CUDA graph
(:class:`~pyrodiff.cuda_graph.GraphedStep`) after three eager steps and replayed; the warm-up then writes the
learning rate into a device tensor that the graph reads.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..cuda_graph import GraphedStep
from .ema import ExponentialMovingAverage

__all__ = ["OptimisationLoop"]


class OptimisationLoop:
    """The optimiser, its warm-up, the EMAs and the losses of one training run; subclasses say what the loss of a
    batch is (:meth:`step_loss`) and run their own loop of :meth:`train_step` and :meth:`read_losses`.

    :param groups: AdamW's parameter groups (a group may set its own ``weight_decay``).
    :param lr: the learning rate after the warm-up; ``weight_decay``: AdamW's decoupled weight decay.
    :param warmup_steps: steps of the linear warm-up (0 or 1: none).
    :param grad_clip: the largest norm of the gradient of all parameters of ``groups`` (None: no clipping).
    :param averaged: the modules whose weights are averaged (an EMA each, :attr:`averages`, in this order), with
        ``ema_decay``.
    :param device: where the parameters are; on CUDA AdamW is fused (and capturable with ``graphed``), elsewhere
        ``foreach``.
    :param graphed: capture the step as a CUDA graph (CUDA only; :meth:`step_loss` must then be capturable).
    """

    def __init__(
        self,
        groups: list[dict],
        *,
        lr: float,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        grad_clip: float | None = None,
        averaged: Sequence[nn.Module] = (),
        ema_decay: float | None = None,
        device: torch.device,
        graphed: bool = False,
    ) -> None:
        self.graphed = graphed
        self.grad_clip = grad_clip
        self.trained_parameters = [p for group in groups for p in group["params"]]
        # fused AdamW keeps its step counter on the device; a graph also needs it capturable
        kwargs = {"fused": True, "capturable": graphed} if device.type == "cuda" else {"foreach": True}
        self.optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **kwargs)
        warmup = max(1, warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.averaged = list(averaged)
        self.averages = [ExponentialMovingAverage(module, ema_decay) for module in self.averaged]
        self.losses: list[float] = []
        self.pending: list[torch.Tensor] = []  # the losses of the steps since the host last read them, on the device
        self.running: float | None = None  # the progress bar's smoothed loss
        self.step = 0
        self.graph: GraphedStep | None = None  # made at the first graphed step, after a resume has loaded its state

    # ------------------------------------------------------------------ what subclasses say
    def step_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Back-propagate the loss of ``batch``; return the loss to record (detached, on the device, never read)."""
        raise NotImplementedError

    def replay_context(self) -> contextlib.AbstractContextManager:
        """The context a graph's replay runs in (a subclass's random stream)."""
        return contextlib.nullcontext()

    def non_finite(self, value: float, step: int) -> Exception:
        """The error for a non-finite loss ``value`` of ``step``, seen at :attr:`step`."""
        return FloatingPointError(f"non-finite loss ({value}) at step {step}; training stopped")

    # ------------------------------------------------------------------ one step
    def device_step(self, batch: torch.Tensor) -> torch.Tensor:
        """Everything one optimiser step does on the device (the graphed step's body): gradients of the loss on
        ``batch``, clipping, AdamW, the EMAs' updates; the loss, never read here."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.step_loss(batch)
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.trained_parameters, self.grad_clip)
        self.optimizer.step()
        for average, module in zip(self.averages, self.averaged, strict=True):
            average.update(module)
        return loss

    def _graph_step(self) -> GraphedStep:
        """The graphed step; the learning rate becomes a device tensor that the scheduler fills and the graph
        reads (made when training starts, after a resume has loaded a number into it)."""
        for group in self.optimizer.param_groups:
            group["lr"] = torch.tensor(group["lr"], dtype=torch.float32, device=self.trained_parameters[0].device)
        self.scheduler._last_lr = [group["lr"].clone() for group in self.optimizer.param_groups]
        return GraphedStep(self.device_step)

    def train_step(self, batch: torch.Tensor) -> None:
        """One optimiser step on ``batch``, eager or replayed from the graph; its loss stays on the device, in
        :attr:`pending`, until :meth:`read_losses`."""
        if self.graphed:
            if self.graph is None:
                self.graph = self._graph_step()
            with self.replay_context():
                loss = self.graph(batch)
        else:
            loss = self.device_step(batch)
        self.scheduler.step()
        self.pending.append(loss)
        self.step += 1

    def read_losses(self, bar: tqdm | None = None) -> None:
        """Read the losses of the steps since the last read (one host read), append them to :attr:`losses` and
        show their running mean on ``bar``; a non-finite one raises :meth:`non_finite`'s error, naming its step."""
        if not self.pending:
            return
        values = torch.stack(self.pending).tolist()
        self.pending.clear()
        first = self.step - len(values) + 1
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise self.non_finite(value, first + i)
            self.running = value if self.running is None else 0.98 * self.running + 0.02 * value
        self.losses.extend(values)
        if bar is not None:
            bar.update(len(values))
            bar.set_postfix(loss=f"{self.running:.4g}", refresh=False)
