"""Issue 11's table on a CUDA device: one training step of a plain PyTorch DDPM (t, noise, MSE) and of the Pyro
program (``TraceMeanField_ELBO()(model, guide)``, one timestep per example, L_simple), each eager and captured as
one CUDA graph, with the same network, batch and fused AdamW; for the digits U-Net of ``models/digits.toml``
(batch 64) and DDPM's CIFAR-10 U-Net (35.7M parameters, batch 128), in float32 and under bf16 autocast.  Then
``pyrodiff train``'s own step on the default specification (clipping and EMA included), in steps/s.

    python benchmarks/gpu_step.py [--steps 50] [--repeats 5] [--networks digits cifar] [--precisions fp32 bf16]

Prints ms/step (median over repeats of ``--steps`` steps), images/s, and each row's ratio to the graphed plain
step (the limit).  Goals (issue 11): the pyrodiff graphed step >= 0.9x the limit's images/s; ``pyrodiff train``
on the default specification >= 300 steps/s.  Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import TraceMeanField_ELBO

from pyrodiff import DiffusionGuide, DiffusionModel, NoiseSchedule, UNet
from pyrodiff.chain.objectives import objective_weights, reweight
from pyrodiff.cuda_graph import GraphedStep
from pyrodiff.training.distributed import World
from pyrodiff.training.graphed import elbo_on_device
from pyrodiff.training.spec import load_spec

NETWORKS = {
    # name: (constructor arguments, data shape, batch, levels)
    "digits": (
        dict(in_channels=1, channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,)),
        (1, 8, 8),
        64,
        17,
    ),
    "cifar": (
        dict(
            in_channels=3, channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_levels=(1,), dropout=0.1
        ),
        (3, 32, 32),
        128,
        256,
    ),
}


def _time(step, steps: int, repeats: int) -> float:
    """Median seconds per step of ``step()`` over ``repeats`` runs of ``steps`` steps (after a warm-up run)."""
    for _ in range(steps):
        step()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def _rows(name: str, precision: str, steps: int, repeats: int) -> dict[str, float]:
    """Seconds per step of the four steps on one network and precision."""
    kwargs, shape, batch, levels = NETWORKS[name]
    device = torch.device("cuda")
    torch.manual_seed(0)
    schedule = NoiseSchedule.linear(1000)
    x0 = (torch.randint(0, levels, (batch, *shape), device=device).float() * 2 / (levels - 1) - 1).contiguous()
    amp = torch.bfloat16 if precision == "bf16" else None
    out = {}

    def plain(network, optimizer):
        """Ho et al.'s step: t uniform, noise, the MSE of the predicted noise."""
        abar = schedule.alphas_cumprod.to(device, torch.float32)

        def step():
            optimizer.zero_grad(set_to_none=True)
            t = torch.randint(1, 1001, (batch,), device=device)
            noise = torch.randn_like(x0)
            a = abar[t - 1].view(-1, *[1] * len(shape))
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            with torch.autocast("cuda", amp) if amp else contextlib.nullcontext():
                eps = network(x_t, t)
            loss = (eps.float() - noise).square().sum() / batch
            loss.backward()
            optimizer.step()
            return loss.detach()

        return step

    def program(network, optimizer, on_device: bool):
        """The Pyro program's step: Pyro's ELBO of the reweighted model and guide (L_simple, k = 1)."""
        model = DiffusionModel(network, schedule, decoder="discretized", levels=levels)
        model.register_with_pyro, model.autocast_dtype = False, amp
        weights = objective_weights(schedule, "simple")
        elbo = elbo_on_device(TraceMeanField_ELBO()) if on_device else TraceMeanField_ELBO()
        loss_module = elbo(reweight(model, weights), reweight(DiffusionGuide(schedule), weights))

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = loss_module(x0, 1)
            (loss / batch).backward()
            optimizer.step()
            return loss.detach()

        return step

    for label, make, graphed in [
        ("plain PyTorch DDPM step, eager", lambda n, o: plain(n, o), False),
        ("plain PyTorch DDPM step, one CUDA graph", lambda n, o: plain(n, o), True),
        ("pyrodiff step (Pyro's eager ELBO), eager", lambda n, o: program(n, o, on_device=False), False),
        ("pyrodiff step, one CUDA graph", lambda n, o: program(n, o, on_device=True), True),
    ]:
        torch.manual_seed(0)
        network = UNet(**kwargs).to(device)
        lr = torch.tensor(1e-4, device=device) if graphed else 1e-4
        optimizer = torch.optim.AdamW(network.parameters(), lr=lr, fused=True, capturable=graphed)
        step = make(network, optimizer)
        if graphed:
            step = GraphedStep(step)
        with pyro.validation_enabled(False):
            out[label] = _time(step, steps, repeats)
        del network, optimizer, step
        torch.cuda.empty_cache()
    return out


def _train_steps_per_second(steps: int, repeats: int) -> tuple[float, float]:
    """``pyrodiff train``'s step on the default specification (graphed, then eager), steps/s."""
    from pyrodiff.training.loop import _Run  # the loop's own step: data, clipping, EMA, scheduler included

    rates = []
    for graph in (True, False):
        spec = load_spec("digits").with_changes({"training": {"graph": graph}})
        with tempfile.TemporaryDirectory() as folder, pyro.validation_enabled(False):
            run = _Run(spec, World(device=torch.device("cuda")), None, Path(folder) / "checkpoint.pt")

            def step(run=run, log_every=spec.training.log_every):
                run.train_step(run._next_batch())
                if len(run.pending) >= log_every:  # the loop's read of the losses
                    torch.stack(run.pending).tolist()
                    run.pending.clear()

            rates.append(1 / _time(step, steps, repeats))
    return rates[0], rates[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50, help="steps per timing")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_step.py measures CUDA steps: torch sees no CUDA device here")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
    for name in args.networks:
        batch = NETWORKS[name][2]
        for precision in args.precisions:
            rows = _rows(name, precision, args.steps, args.repeats)
            limit = rows["plain PyTorch DDPM step, one CUDA graph"]
            print(f"\n{name} U-Net, batch {batch}, {precision}")
            for label, seconds in rows.items():
                print(
                    f"  {label:42s} {seconds * 1e3:8.2f} ms/step {batch / seconds:10.0f} images/s"
                    f"   {limit / seconds:5.2f}x the graphed plain step's images/s"
                )
            pyro_eager = rows["pyrodiff step (Pyro's eager ELBO), eager"]
            fast = rows["pyrodiff step, one CUDA graph"]
            plain_eager = rows["plain PyTorch DDPM step, eager"]
            print(
                f"  pyrodiff graphed / pyrodiff eager: {pyro_eager / fast:.2f}x; / plain eager: {plain_eager / fast:.2f}x"
            )
    graphed, eager = _train_steps_per_second(args.steps, args.repeats)
    print(
        f"\npyrodiff train, models/digits.toml: {graphed:.0f} steps/s graphed, {eager:.0f} steps/s eager (graph = false)"
    )


if __name__ == "__main__":
    main()
