"""The training loop: the ELBO of the Pyro program as an ``nn.Module``, a torch optimiser, checkpoints.

``Trace_ELBO()(model, guide)`` (or ``TraceMeanField_ELBO``, the default: analytic per-timestep KLs)
turns the model and guide into a module whose output is the loss; it is minimised with AdamW,
linear learning-rate warm-up, gradient-norm clipping and an exponential moving average (EMA) of the
weights, used for evaluation and sampling.  Options: Nichol & Dhariwal's importance sampler of
timesteps, bf16 autocast around the network only (log-densities stay float32), ``torch.compile`` of
the network.

A step never waits for the device: the loss, the gradient, the optimiser, the EMA and the importance
sampler's statistics stay on it (Pyro's ELBO through :func:`~pyrodiff.training.graphed.elbo_on_device`), and the host
reads the losses every ``log_every`` steps (for the progress bar and ``losses.csv``) and at checkpoints.  A
non-finite loss is therefore found at the first read after it, up to ``log_every - 1`` steps later: training
stops there, naming the step whose loss was non-finite (every loss is kept), and its weights, spoiled by that
step, are never saved.  On a CUDA device, with one process, one micro-batch, no ``torch.compile`` and
``graph`` on (the default), the step is captured once as a CUDA graph (:class:`~pyrodiff.cuda_graph.GraphedStep`)
after three eager steps, and replayed; the learning-rate schedule writes the rate into a device tensor the
graph reads.

A noise schedule with parameters (:class:`~pyrodiff.chain.schedule.Schedule`) is trained with the network: the
optimiser holds its parameters too (without weight decay, which would pull them toward 0), gradients are clipped
over both, and it has its own EMA, with the network's decay; the evaluated model is the EMA network on the EMA
schedule, as VDM (Kingma et al. 2021) evaluates with an EMA of all its parameters.

Checkpoints are atomic and hold every state needed to resume exactly: network, EMA, the schedule's parameters and
their EMA (when it has any), optimiser, scheduler, step, loss history and the random-number states of Pyro (torch's
global generator) and of the data order.  A checkpoint is written only for weights whose loss is finite, so the one
kept after a failure can be resumed.  Ctrl-C (SIGINT) finishes the current step and saves a checkpoint before
stopping (one process; under ``torchrun`` the last checkpoint is kept as it is).
"""

from __future__ import annotations

import contextlib
import csv
import gc
import io
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch
from pyro import poutine
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..chain.continuous import ContinuousDiffusionModel
from ..chain.importance import ImportanceSampler
from ..chain.objectives import objective_weights, parse_estimator, reweight
from ..chain.traces import drawn_terms
from ..evaluation.bound import bound_terms
from ..evaluation.continuous import continuous_bound
from ..evaluation.plots import save_samples_figure
from ..evaluation.report import summarise
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
    write_atomically,
)
from .distributed import RandomStreams, World, init_world
from .graphed import elbo_on_device
from .optimisation import OptimisationLoop
from .spec import Spec, as_spec, build

__all__ = ["train", "TrainResult", "TrainingError", "TrainingInterrupted"]

CHECKPOINT = "checkpoint.pt"
LOSSES = "losses.csv"
TEST_BOUND = "test_bound.json"
SAMPLES = "samples.png"
#: Temporaries a killed run can leave beside its results, removed at the next start: those of
#: :func:`~pyrodiff.training.checkpoint.write_atomically` (``NAME.<random>.tmp``), the samples figure's, and the
#: name earlier versions wrote ``losses.csv`` through.
_FIXED_TEMPORARIES = ("samples.tmp.png", "losses.tmp")
#: ``[training]`` keys a resume may always change: how long to train, how often to save and read the losses,
#: what to evaluate, whether to capture the step as a CUDA graph (the same step either way).
RUN_KEYS = ("steps", "seconds", "checkpoint_every", "log_every", "eval_examples", "graph")
#: The optimisation hyperparameters a resume may change when asked (``change_hyperparameters=True``).
HYPERPARAMETERS = ("lr", "weight_decay", "warmup_steps", "grad_clip", "ema_decay")
log = logging.getLogger(__name__)


#: draws of the continuous-time bound per test example at the end of training (stratified times)
CONTINUOUS_DRAWS = 100


class TrainingError(RuntimeError):
    """Training cannot start (an unusable output folder) or had to stop (a non-finite loss; the last
    good checkpoint is kept)."""


class TrainingInterrupted(TrainingError):
    """Training was stopped by SIGINT (Ctrl-C).  ``checkpoint`` is where this run's state was saved after
    ``step`` steps, or None when nothing was saved beyond the last checkpoint."""

    def __init__(self, message: str, checkpoint: Path | None, step: int) -> None:
        super().__init__(message)
        self.checkpoint, self.step = checkpoint, step


@dataclass
class TrainResult:
    """What a finished run wrote: the checkpoint, the samples' picture, the test-set bound
    (:func:`~pyrodiff.evaluation.report.summarise`'s schema), the number of steps and the training time of these
    weights in seconds, over every run that trained them (None for a checkpoint written before it was recorded)."""

    checkpoint: Path
    samples: Path
    test_bound: dict
    steps: int
    seconds: float | None


def train(
    spec: Spec | Mapping,
    out_dir: str | Path,
    steps: int | None = None,
    device: str = "cpu",
    seed: int | None = None,
    resume: bool = False,
    progress: bool = True,
    data_root: str | Path | None = None,
    num_samples: int | None = None,
    change_hyperparameters: bool = False,
) -> TrainResult | None:
    """Train the model of ``spec``, writing ``checkpoint.pt``, ``losses.csv``, ``test_bound.json`` and
    ``samples.png`` to ``out_dir``.  The test-set bound is the exact decomposition of
    :func:`~pyrodiff.evaluation.bound.bound_terms` (every term, one draw of the noisy inputs) on the first
    ``eval_examples`` test examples.  ``steps`` and ``seed`` override the specification's.

    ``resume`` continues the checkpoint in ``out_dir`` exactly; its specification must be this one up to
    :data:`RUN_KEYS`, and also :data:`HYPERPARAMETERS` with ``change_hyperparameters`` (the new values
    take effect from the next step).  Raises :class:`TrainingInterrupted` after saving on SIGINT.

    Under ``torchrun`` every process trains its slice of each global batch (see
    :mod:`pyrodiff.training.distributed`); rank 0 writes the files and gets the result, the others ``None``."""
    spec = as_spec(spec)
    overrides = {k: v for k, v in (("steps", steps), ("seed", seed)) if v is not None}
    if overrides:
        spec = spec.with_changes({"training": overrides})
    out = Path(out_dir)
    checkpoint = out / CHECKPOINT
    if not resume and checkpoint.exists():
        raise CheckpointError(f"{checkpoint} exists: pass --resume to continue it, or choose another --out")
    earlier = [name for name in (LOSSES, TEST_BOUND, SAMPLES) if not resume and os.path.lexists(out / name)]
    if earlier:
        raise TrainingError(f"{out} holds an earlier run's {', '.join(earlier)}: choose another --out")
    check_device(device)
    world = init_world(device)
    _prepare_output(out, world)
    run = _Run(spec, world, data_root, checkpoint)
    if resume:
        run.resume(change_hyperparameters)
    run.train(progress)
    # DistributedDataParallel holds the process group: release it (and the compiled wrapper) first, so
    # that leaving the group tears the backend down while every rank is still there
    run.model.network = run.network
    gc.collect()
    world.close()
    if not world.is_main:
        return None
    return run.evaluate(out, num_samples, progress)


def check_device(device: str | torch.device) -> None:
    """Refuse a CUDA device when torch sees none (before anything is loaded)."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} was asked for, but torch sees no CUDA device")


def _prepare_output(out: Path, world: World) -> None:
    """Make sure rank 0 can write to ``out`` (create it, write and remove a probe file) before any
    training, and clear the temporaries of a save that was killed; every rank learns the outcome."""
    problem = None
    if world.is_main:
        try:
            if out.exists() and not out.is_dir():
                raise NotADirectoryError(f"{out} is a file, not a folder")
            out.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=out)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            problem = f"cannot write to the output folder {out}: {e.strerror or e}"
        else:
            stale = remove_stale_temporaries(out, CHECKPOINT, LOSSES, TEST_BOUND)
            for path in stale + [out / name for name in _FIXED_TEMPORARIES if (out / name).is_file()]:
                path.unlink(missing_ok=True)
                log.warning("removed %s, left by a run that was interrupted while writing", path)
    problem = next((p for p in world.gather_objects(problem) if p is not None), None)
    if problem is not None:
        raise TrainingError(problem)


class _Run(OptimisationLoop):
    """One training run: the model, the optimiser (:class:`~pyrodiff.training.optimisation.OptimisationLoop`'s) and
    everything else a checkpoint holds (saved to and resumed from ``path``), the loss of one step, the loop and the
    evaluation."""

    def __init__(self, spec: Spec, world: World, data_root: str | Path | None, path: Path) -> None:
        tr = spec.training
        self.spec, self.world, self.path, device = spec, world, path, world.device
        self.B, self.M = tr.batch_size, tr.micro_batches
        if tr.seconds is not None and world.distributed:
            raise ValueError(
                "training.seconds: a time budget under torchrun would stop the ranks at different steps (each reads "
                "its own clock); give training.steps instead"
            )
        if self.B % (world.size * self.M):
            raise ValueError(
                f"the batch size {self.B} must be divisible by world size x micro-batches = {world.size} x {self.M}"
            )
        self.b = self.B // (world.size * self.M)  # examples per micro-batch

        torch.manual_seed(tr.seed)  # the same initial weights on every rank
        pyro.set_rng_seed(tr.seed)
        self.built = build(spec, data_root)
        self.model = self.built.model.to(device)
        self.network = self.model.network  # the bare module: its weights are what is saved and averaged
        self.schedule = self.model.schedule  # the guide's too (moved with the model); trained if it has parameters
        self.model.autocast_dtype = torch.bfloat16 if tr.amp == "bf16" else None
        self.model.register_with_pyro = self.built.guide.register_with_pyro = False  # the torch optimizer holds them
        if world.distributed:
            self.model.network = DistributedDataParallel(
                self.network, device_ids=[device.index] if device.type == "cuda" else None
            )
        if tr.compile:
            self.model.network = torch.compile(self.model.network)
        self.train_data = self.built.data.train.to(device)
        with pyro.validation_enabled(True):  # once here: the loop runs with validation off
            self.model.check_data(self.train_data)
        # a CUDA graph needs static shapes and one random stream per step; DDP and torch.compile bring their own
        graphed = tr.graph and device.type == "cuda" and not world.distributed and self.M == 1 and not tr.compile
        groups = [{"params": list(self.network.parameters())}]
        averaged = [self.network]
        if self.schedule.has_parameters:  # no weight decay, which would pull them toward 0
            groups.append({"params": list(self.schedule.parameters()), "weight_decay": 0.0})
            averaged.append(self.schedule)
        super().__init__(
            groups,
            lr=tr.lr,
            weight_decay=tr.weight_decay,
            warmup_steps=tr.warmup_steps,
            grad_clip=tr.grad_clip,
            averaged=averaged,
            ema_decay=tr.ema_decay,
            device=device,
            graphed=graphed,
        )
        self.ema = self.averages[0]  # the network's
        self.schedule_ema = self.averages[1] if self.schedule.has_parameters else None
        self.data_generator = torch.Generator().manual_seed(tr.seed)  # the same global batches on every rank
        self.streams = RandomStreams(tr.seed, world, self.M)
        schedule = self.built.schedule
        self.sampler = (
            ImportanceSampler(schedule.num_steps, device=device) if tr.timestep_sampler == "importance" else None
        )
        self.saved_step = 0
        #: seconds spent training to the current step, over every run of this checkpoint (None: not recorded)
        self.seconds: float | None = 0.0
        self._clock: tuple[float, float | None] | None = None  # (time and seconds when this run's training began)

        #: the terms drawn per example (None: the full chain, or the continuous-time bound's one time per example)
        self.subsample_steps = None if spec.model.time == "continuous" else tr.subsample_steps
        self.model_fn, self.guide_fn = self.model, self.built.guide
        if tr.objective != "elbo":
            weights = objective_weights(schedule, tr.objective, self.model.variance)
            self.model_fn, self.guide_fn = reweight(self.model_fn, weights), reweight(self.guide_fn, weights)
        if self.sampler is not None:
            # record both traces of each step: the drawn terms feed the sampler's statistics
            self.model_fn = poutine.trace(self.sampler(self.model_fn))
            self.guide_fn = poutine.trace(self.sampler(self.guide_fn))
        self.loss_module = elbo_on_device(parse_estimator(tr.estimator)())(self.model_fn, self.guide_fn)
        self.dims = self.train_data[0].numel()

    # ------------------------------------------------------------------ the resumable state
    def state_dict(self, noise_rng: list, device_rng: list) -> dict:
        """What a checkpoint holds (``noise_rng``, ``device_rng``: every rank's random streams, on the host and
        on a CUDA device; the latter only for a run on CUDA).  The learning rate is saved as a number, also when
        a graphed step keeps it in a device tensor."""
        optimizer = self.optimizer.state_dict()
        for group in optimizer["param_groups"]:  # copies of the live groups
            group["lr"] = float(group["lr"])
        state = {
            "spec": self.spec.to_dict(),
            "step": self.step,
            "network": self.network.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "world_size": self.world.size,
            "data_rng": self.data_generator.get_state(),
            "noise_rng": noise_rng,
            "losses": self.losses,
            "train_seconds": self.seconds,
            "timestep_sampler": None if self.sampler is None else self.sampler.state_dict(),
        }
        if self.schedule_ema is not None:
            state |= {"schedule": self.schedule.state_dict(), "schedule_ema": self.schedule_ema.state_dict()}
        return state | ({"device_rng": device_rng} if self.streams.on_device else {})

    def resume(self, change_hyperparameters: bool) -> None:
        """Continue the checkpoint: refuse another specification (naming what differs), a
        shorter run, another world size; rewrite ``losses.csv`` from the checkpoint's losses."""
        path = self.path
        # on the CPU: random-number states must stay there; every other state is copied onto its module's device
        state = load_checkpoint(path, map_location="cpu")
        saved = Spec.of_checkpoint(state, path)
        _check_resumable(saved, self.spec, path, change_hyperparameters)
        if self.spec.training.steps < state["step"]:
            raise ValueError(
                f"{path} is at step {state['step']}: training it to {self.spec.training.steps} steps would go back; "
                f"give --steps {state['step']} or more ({state['step']} only evaluates it)"
            )
        if state["world_size"] != self.world.size:
            raise CheckpointError(f"{path} was written by {state['world_size']} processes, not {self.world.size}")
        self.network.load_state_dict(state["network"])
        self.ema.load_state_dict(state["ema"])
        if self.schedule_ema is not None:
            if "schedule" not in state:
                raise CheckpointError(f"{path} holds no schedule parameters, but the specification's schedule has some")
            self.schedule.load_state_dict(state["schedule"])
            self.schedule_ema.load_state_dict(state["schedule_ema"])
            try:
                self.schedule.check()
            except ValueError as e:
                raise CheckpointError(f"{path}: {e}") from None
        self.optimizer.load_state_dict(_with_implementation(state["optimizer"], self.optimizer))
        self.scheduler.load_state_dict(state["scheduler"])
        self.data_generator.set_state(state["data_rng"])
        self.streams.states = list(state["noise_rng"][self.world.rank])
        if self.streams.on_device:
            if "device_rng" in state:
                self.streams.device_states = list(state["device_rng"][self.world.rank])
            else:
                log.warning("%s was written on the CPU: the noise on %s is drawn afresh", path, self.world.device)
        self.losses = list(state["losses"])
        self.step = self.saved_step = state["step"]
        self.seconds = state.get("train_seconds")
        if self.sampler is not None:
            self.sampler.load_state_dict(state["timestep_sampler"])
        if change_hyperparameters:
            self._apply_hyperparameters()
        if self.world.is_main:
            _write_losses(path.with_name(LOSSES), self.losses, self.spec.training.loss_name)

    def _apply_hyperparameters(self) -> None:
        """Put this specification's learning rate and weight decay into the loaded optimiser and scheduler
        (loading restored the checkpoint's); the warm-up, clipping and EMA decay are read from it anyway."""
        tr = self.spec.training
        self.scheduler.base_lrs = [tr.lr for _ in self.optimizer.param_groups]
        for group, factor in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas, strict=True):
            group.update(initial_lr=tr.lr, lr=tr.lr * factor(self.scheduler.last_epoch))
        self.optimizer.param_groups[0]["weight_decay"] = tr.weight_decay  # the network's (never the schedule's)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def save(self, batch: torch.Tensor) -> None:
        """Write a checkpoint of the current step, if the current weights give a finite loss on ``batch``
        (every rank takes part; rank 0 writes); else raise :class:`TrainingError`, keeping the last one."""
        loss = self._loss_without_training(batch)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"the weights after step {self.step} give a non-finite loss ({loss.item()}) on the last batch; "
                f"training stopped and they were not saved, {self._kept()}"
            )
        self.seconds = self._seconds_now()
        noise_rng = self.world.gather_objects(self.streams.states)  # every rank takes part; rank 0 writes
        device_rng = self.world.gather_objects(self.streams.device_states)
        if self.world.is_main:
            save_checkpoint(self.path, self.state_dict(noise_rng, device_rng))
            _write_losses(self.path.with_name(LOSSES), self.losses, self.spec.training.loss_name)
        self.saved_step = self.step

    def _kept(self) -> str:
        if self.path.exists():
            return f"the last good checkpoint ({self.path}, step {self.saved_step}) is kept"
        return "no checkpoint was written yet"

    # ------------------------------------------------------------------ one step
    def _micro_batches(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """This rank's micro-batches of a global batch."""
        r, M, b = self.world.rank, self.M, self.b
        mine = batch[r * M * b : (r + 1) * M * b]
        return [mine[j * b : (j + 1) * b] for j in range(M)]

    def _next_batch(self) -> torch.Tensor:
        """The next global batch, drawn on the host (the same order on every device); on CUDA the indices go
        over from pinned memory without waiting for the device."""
        index = torch.randint(len(self.train_data), (self.B,), generator=self.data_generator)
        if self.world.device.type == "cuda":
            index = index.pin_memory().to(self.world.device, non_blocking=True)
        return self.train_data[index]

    def step_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Back-propagate this rank's micro-batches of ``batch``; the global-batch loss (per example).  Each
        micro-batch draws from its own random stream, except in a graphed step, whose one stream the replay holds."""
        k, world = self.subsample_steps, self.world
        total = torch.zeros((), device=world.device)
        drawn = []
        for j, micro in enumerate(self._micro_batches(batch)):
            with contextlib.nullcontext() if self.graphed else self.streams.stream(j), self.schedule.memoised():
                loss = self.loss_module(micro, k)
            # DDP averages gradients over ranks: scale so that the sum is d(global loss / B)
            (loss * world.size / (self.B * self.dims)).backward()
            total = total + loss.detach()
            if self.sampler is not None:
                t, values = drawn_terms(self.model_fn.trace, self.guide_fn.trace)  # (k, b) each
                drawn.append(torch.stack([t.to(values.dtype), values], -1).transpose(0, 1))  # (b, k, 2)
        if self.sampler is not None:  # every rank records every drawn term, in global example order
            t, values = world.all_cat(torch.cat(drawn)).unbind(-1)
            self.sampler.update(t.long(), values)
        if world.distributed and self.schedule_ema is not None:  # DDP averages the network's gradients only
            for p in self.schedule.parameters():
                p.grad = world.all_sum(p.grad) / world.size
        return world.all_sum(total) / self.B

    def _loss_without_training(self, batch: torch.Tensor) -> torch.Tensor:
        """The global-batch loss of the current weights on ``batch``, drawing its noise from a fork of torch's
        generators: no random stream of the run is consumed, so results do not depend on it."""
        devices = [self.world.device] if self.world.device.type == "cuda" else []
        total = torch.zeros((), device=self.world.device)
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            for micro in self._micro_batches(batch):
                with self.schedule.memoised():
                    total = total + self.loss_module(micro, self.subsample_steps)
        return self.world.all_sum(total) / self.B

    def replay_context(self) -> contextlib.AbstractContextManager:
        """A graph's replay draws from the first micro-batch's random stream."""
        return self.streams.stream(0)

    def non_finite(self, value: float, step: int) -> TrainingError:
        return TrainingError(
            f"non-finite loss ({value}) at step {step} (losses are read every "
            f"{self.spec.training.log_every} steps and at checkpoints: this was seen at step {self.step}); "
            f"training stopped, {self._kept()}"
        )

    # ------------------------------------------------------------------ the loop
    def train(self, progress: bool) -> float:
        """Train to the specification's steps, saving a checkpoint every ``checkpoint_every`` steps, at the
        end, and on SIGINT (then raising :class:`TrainingInterrupted`); the seconds spent training to the last step,
        over every run of the checkpoint (:attr:`seconds`)."""
        tr, path = self.spec.training, self.path
        if self.step >= tr.steps:  # a finished run: nothing to train, its time stays as recorded
            return self.seconds
        self._clock = (time.time(), self.seconds)
        bar = tqdm(
            initial=self.step,
            total=tr.steps,
            disable=not (progress and self.world.is_main),
            desc="train",
            mininterval=1.0,
        )
        # the training data were checked above; Pyro's per-site validation would cost time at every step
        with pyro.validation_enabled(False), bar, _StopOnInterrupt(enabled=not self.world.distributed) as stop:
            try:
                while self.step < tr.steps and not self._out_of_time():
                    batch = self._next_batch()
                    self.train_step(batch)
                    stopping = stop.requested  # read once: a signal may come at any moment
                    last = self.step == tr.steps or self._out_of_time()
                    saving = self.step % tr.checkpoint_every == 0 or last or stopping
                    if saving or self.step % tr.log_every == 0:
                        self.read_losses(bar)
                    if saving:
                        self.save(batch)
                    if stopping:
                        raise TrainingInterrupted(
                            f"training interrupted: checkpoint of step {self.step} saved to {path}; "
                            "resume it to continue (pyrodiff train --resume)",
                            path,
                            self.step,
                        )
            except KeyboardInterrupt:  # under torchrun, or a second Ctrl-C: nothing can be saved safely
                raise TrainingInterrupted(
                    f"training interrupted at step {self.step}: nothing was saved beyond the last checkpoint; "
                    + self._kept(),
                    None,
                    self.step,
                ) from None
        return self.seconds  # as the last step's checkpoint records it

    def _out_of_time(self) -> bool:
        """Whether the specification's time budget (``training.seconds``) is spent (a host clock read, no device
        synchronisation)."""
        budget = self.spec.training.seconds
        return budget is not None and (self._seconds_now() or 0.0) >= budget

    def _seconds_now(self) -> float | None:
        """The seconds spent training to the current step: the checkpoint's, plus this run's so far."""
        if self._clock is None or self._clock[1] is None:
            return self.seconds
        began, before = self._clock
        return before + (time.time() - began)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, out: Path, num_samples: int | None, progress: bool) -> TrainResult:
        """The EMA model's test-set bound (``test_bound.json``) and samples (``samples.png``)."""
        tr, data, device = self.spec.training, self.built.data, self.world.device
        schedule = None if self.schedule_ema is None else self.schedule_ema.module
        trained = self.model.with_network(self.ema.module, schedule).eval()
        test = data.test[: tr.eval_examples].to(device)
        meta = {
            "name": self.spec.name,
            "split": "test",
            "training_steps": self.step,
            "objective": tr.objective,
            "train_seconds": self.seconds,
        }
        log_q = data.log_density(test) if data.log_density is not None else None
        if isinstance(trained, ContinuousDiffusionModel):
            generator = torch.Generator(device).manual_seed(tr.seed)
            report = continuous_bound(trained, test, CONTINUOUS_DRAWS, generator=generator).summary(meta)
        else:
            report = summarise(bound_terms(trained, test, progress=progress), meta, log_q)
        write_atomically(out / TEST_BOUND, lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
        samples_path = out / SAMPLES
        n = num_samples or (64 if self.train_data.dim() == 4 else 2000)
        samples = trained.sample(n, progress=progress)
        save_samples_figure(samples, samples_path, data=data.test, title=f"{self.spec.name}: {self.step} steps")
        return TrainResult(out / CHECKPOINT, samples_path, report, self.step, self.seconds)


def _with_implementation(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """The saved optimiser state with this run's implementation flags (``fused``, ``foreach``, ``capturable``):
    ``load_state_dict`` would otherwise restore the saved ones (a checkpoint written on the CPU, or without the
    graph, would make a CUDA graph's optimiser step uncapturable)."""
    groups = [dict(saved_group) for saved_group in saved["param_groups"]]
    for group, live in zip(groups, optimizer.param_groups, strict=True):
        group.update({k: live[k] for k in ("fused", "foreach", "capturable") if k in live})
    return {**saved, "param_groups": groups}


def _check_resumable(saved: Spec, spec: Spec, path: Path, change_hyperparameters: bool) -> None:
    """Refuse to resume a checkpoint made with ``saved`` under ``spec`` if they differ in more than
    :data:`RUN_KEYS` (and :data:`HYPERPARAMETERS` when allowed) or the name, naming every difference."""
    allowed = {"name", *(f"training.{k}" for k in RUN_KEYS)}
    hyperparameters = {f"training.{k}" for k in HYPERPARAMETERS}
    if change_hyperparameters:
        allowed |= hyperparameters
    refused = {k: v for k, v in saved.differences(spec).items() if k not in allowed}
    if refused:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        hint = (
            f" (pass --change-hyperparameters to change {', '.join(HYPERPARAMETERS)} on resume)"
            if set(refused) <= hyperparameters
            else ""
        )
        raise CheckpointError(f"checkpoint {path} was made with another specification: {listed}{hint}")


class _StopOnInterrupt:
    """While active (one process, main thread), the first SIGINT sets :attr:`requested`, so that the loop
    stops after its current step; a second one raises ``KeyboardInterrupt`` at once."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(
            "interrupted: finishing this step and saving a checkpoint (Ctrl-C again to stop at once)", file=sys.stderr
        )

    def __enter__(self) -> _StopOnInterrupt:
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)


def _write_losses(path: Path, losses: list[float], loss_name: str) -> None:
    """``losses.csv``: one row per step, the training loss per example, headed by what it holds."""
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(["step", loss_name])
    w.writerows((i + 1, f"{v:.6g}") for i, v in enumerate(losses))
    write_atomically(path, lambda f: f.write(text.getvalue().encode()))
