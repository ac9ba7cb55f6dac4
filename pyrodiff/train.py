"""The training loop: the ELBO of the Pyro program as an ``nn.Module``, a torch optimiser, checkpoints.

``Trace_ELBO()(model, guide)`` (or ``TraceMeanField_ELBO``, the default: analytic per-timestep KLs)
turns the model and guide into a module whose output is the loss; it is minimised with AdamW,
linear learning-rate warm-up, gradient-norm clipping and an exponential moving average (EMA) of the
weights, used for evaluation and sampling.  Options: Nichol & Dhariwal's importance sampler of
timesteps, bf16 autocast around the network only (log-densities stay float32), ``torch.compile`` of
the network.  Checkpoints are atomic and hold every state needed to
resume exactly: network, EMA, optimiser, scheduler, step, loss history and the random-number
states of Pyro (torch's global generator) and of the data order.
"""

from __future__ import annotations

import copy
import csv
import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from .bound import bound_terms
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .distributed import RandomStreams, init_world
from .objectives import objective_weights, reweight
from .plots import save_samples_figure
from .report import summarise
from .spec import Built, build
from .importance import ImportanceSampler
from .traces import drawn_terms

__all__ = ["train", "TrainingError", "TrainResult"]

CHECKPOINT = "checkpoint.pt"
ESTIMATORS = {"mean_field": TraceMeanField_ELBO, "trace": Trace_ELBO}


class TrainingError(RuntimeError):
    """Training stopped: a non-finite loss (the last good checkpoint is kept)."""


@dataclass
class TrainResult:
    checkpoint: Path
    samples: Path
    test_bound: dict
    steps: int
    seconds: float


def _optimizer(params, tr: dict, device: torch.device) -> torch.optim.Optimizer:
    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(params, lr=tr["lr"], weight_decay=tr["weight_decay"], **kwargs)


def train(
    spec: dict,
    out_dir: str | Path,
    steps: int | None = None,
    device: str = "cpu",
    seed: int | None = None,
    resume: bool = False,
    progress: bool = True,
    data_root: str | Path | None = None,
    num_samples: int | None = None,
) -> TrainResult | None:
    """Train the model of ``spec``, writing ``checkpoint.pt``, ``losses.csv``, ``test_bound.json`` and
    ``samples.png`` to ``out_dir``.  The test-set bound is the exact decomposition of
    :func:`~pyrodiff.bound.bound_terms` (every term, one draw of the noisy inputs) on the first
    ``eval_examples`` test examples.  ``steps`` and ``seed`` override the specification's.

    Under ``torchrun`` every process trains its slice of each global batch (see
    :mod:`pyrodiff.distributed`); rank 0 writes the files and gets the result, the others ``None``."""
    spec = copy.deepcopy(spec)
    tr = spec["training"]
    if steps is not None:
        tr["steps"] = steps
    if seed is not None:
        tr["seed"] = seed
    out = Path(out_dir)
    ckpt_path = out / CHECKPOINT
    if not resume and ckpt_path.exists():
        raise CheckpointError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    world = init_world(device)
    device = world.device
    B, M = tr["batch_size"], tr["micro_batches"]
    if B % (world.size * M):
        raise ValueError(f"the batch size {B} must be divisible by world size x micro-batches = {world.size} x {M}")
    b = B // (world.size * M)  # examples per micro-batch

    torch.manual_seed(tr["seed"])  # the same initial weights on every rank
    pyro.set_rng_seed(tr["seed"])
    built = build(spec, data_root)
    model = built.model.to(device)
    network = model.network  # the bare module: its weights are what is saved and averaged
    if tr["amp"] not in (False, "bf16"):
        raise ValueError(f"amp must be false or 'bf16', got {tr['amp']!r}")
    model.autocast_dtype = torch.bfloat16 if tr["amp"] == "bf16" else None
    model.register_with_pyro = False  # the torch optimizer holds the parameters
    if world.distributed:
        model.network = DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)
    if tr["compile"]:
        model.network = torch.compile(model.network)
    train_data = built.data.train.to(device)
    with pyro.validation_enabled(True):  # once here: the loop runs with validation off
        model.check_data(train_data)
    optimizer = _optimizer(network.parameters(), tr, device)
    warmup = max(1, tr["warmup_steps"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    ema = AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(tr["ema_decay"]), use_buffers=True)
    data_generator = torch.Generator().manual_seed(tr["seed"])  # the same global batches on every rank
    streams = RandomStreams(tr["seed"], world, M)
    if tr["timestep_sampler"] not in ("uniform", "importance"):
        raise ValueError(f"timestep_sampler must be 'uniform' or 'importance', got {tr['timestep_sampler']!r}")
    sampler = ImportanceSampler(built.schedule.num_steps) if tr["timestep_sampler"] == "importance" else None
    losses: list[float] = []
    start = 0

    if resume:
        state = load_checkpoint(ckpt_path, spec, map_location=device)
        network.load_state_dict(state["network"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["world_size"] != world.size:
            raise CheckpointError(f"{ckpt_path} was written by {state['world_size']} processes, not {world.size}")
        data_generator.set_state(state["data_rng"])
        streams.states = list(state["noise_rng"][world.rank])
        losses = list(state["losses"])
        start = state["step"]
        if sampler is not None:
            sampler.load_state_dict(state["timestep_sampler"])

    model_fn, guide_fn = model, built.guide
    if tr["objective"] != "elbo":
        weights = objective_weights(built.schedule, tr["objective"], model.variance)
        model_fn, guide_fn = reweight(model_fn, weights), reweight(guide_fn, weights)
    if sampler is not None:
        # record both traces of each step: the drawn terms feed the sampler's statistics
        model_fn, guide_fn = poutine.trace(sampler(model_fn)), poutine.trace(sampler(guide_fn))
    if tr["estimator"] not in ESTIMATORS:
        raise ValueError(f"unknown estimator {tr['estimator']!r}: {sorted(ESTIMATORS)}")
    loss_module = ESTIMATORS[tr["estimator"]]()(model_fn, guide_fn)
    k = tr["subsample_steps"]
    dims = train_data[0].numel()

    def checkpoint(step: int) -> None:
        noise_rng = world.gather_objects(streams.states)  # every rank takes part; rank 0 writes
        if not world.is_main:
            return
        save_checkpoint(
            ckpt_path,
            {
                "spec": spec,
                "step": step,
                "network": network.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "world_size": world.size,
                "data_rng": data_generator.get_state(),
                "noise_rng": noise_rng,
                "losses": losses,
                "timestep_sampler": None if sampler is None else sampler.state_dict(),
            },
        )
        _write_losses(out / "losses.csv", losses)

    def step_loss(batch: torch.Tensor) -> torch.Tensor:
        """Back-propagate this rank's micro-batches of ``batch``; the global-batch loss (nats/example)."""
        total = torch.zeros((), device=device)
        drawn = []
        mine = batch[world.rank * M * b : (world.rank + 1) * M * b]
        for j in range(M):
            with streams.stream(j):
                loss = loss_module(mine[j * b : (j + 1) * b], k)
            # DDP averages gradients over ranks: scale so that the sum is d(global loss / B)
            (loss * world.size / (B * dims)).backward()
            total = total + loss.detach()
            if sampler is not None:
                t, values = drawn_terms(model_fn.trace, guide_fn.trace)  # (k, b) each
                drawn.append(torch.stack([t.to(values.dtype), values], -1).transpose(0, 1))  # (b, k, 2)
        if sampler is not None:  # every rank records every drawn term, in global example order
            t, values = world.all_cat(torch.cat(drawn)).unbind(-1)
            sampler.update(t.long(), values)
        return world.all_sum(total) / B

    began = time.time()
    steps = range(start, tr["steps"])
    running = None
    # the training data were checked above; Pyro's per-site validation would cost time at every step
    with (
        pyro.validation_enabled(False),
        tqdm(
            steps,
            initial=start,
            total=tr["steps"],
            disable=not (progress and world.is_main),
            desc="train",
            mininterval=1.0,
        ) as bar,
    ):
        for step in bar:
            index = torch.randint(len(train_data), (B,), generator=data_generator).to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = step_loss(train_data[index])
            if not torch.isfinite(loss):
                kept = (
                    f"the last good checkpoint ({ckpt_path}, step {start}) is kept"
                    if ckpt_path.exists()
                    else "no checkpoint was written yet"
                )
                raise TrainingError(f"non-finite loss ({loss.item()}) at step {step + 1}; training stopped, {kept}")
            torch.nn.utils.clip_grad_norm_(network.parameters(), tr["grad_clip"])
            optimizer.step()
            scheduler.step()
            ema.update_parameters(network)
            losses.append(loss.item())
            running = losses[-1] if running is None else 0.98 * running + 0.02 * losses[-1]
            bar.set_postfix(loss=f"{running:.4g}", refresh=False)
            if (step + 1) % tr["checkpoint_every"] == 0:
                checkpoint(step + 1)
                start = step + 1
    checkpoint(tr["steps"])
    seconds = time.time() - began
    # DistributedDataParallel holds the process group: release it (and the compiled wrapper) first, so
    # that leaving the group tears the backend down while every rank is still there
    model.network = network
    gc.collect()
    world.close()
    if not world.is_main:
        return None

    trained = model.with_network(ema.module).eval()
    test = built.data.test[: tr["eval_examples"]].to(device)
    terms = bound_terms(trained, test)
    meta = {"name": spec["name"], "split": "test", "steps": tr["steps"], "train_seconds_this_run": seconds}
    log_q = built.data.log_density(test) if built.data.log_density is not None else None
    report = summarise(terms, meta, log_q)
    (out / "test_bound.json").write_text(json.dumps(report, indent=2) + "\n")
    samples_path = out / "samples.png"
    n = num_samples or (64 if train_data.dim() == 4 else 2000)
    save_samples_figure(
        trained.sample(n), samples_path, data=built.data.test, title=f"{spec['name']}: {tr['steps']} steps"
    )
    return TrainResult(ckpt_path, samples_path, report, tr["steps"], seconds)


def _write_losses(path: Path, losses: list[float]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss_nats_per_example"])
        w.writerows((i + 1, f"{v:.6g}") for i, v in enumerate(losses))
    tmp.replace(path)
