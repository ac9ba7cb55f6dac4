"""The T-step ancestral sampler of the default digits model: samples/s with one kernel launch per operation
(eager) and, on a GPU, with each reverse step one CUDA graph replay (``samplers.ancestral(..., graph=True)``),
in the same run, on the same x_T and generator (the samples must agree).

    python benchmarks/sampler.py [--device cpu|cuda] [--num 64] [--repeats 3]

On the CPU only the eager sampler runs (a CUDA graph needs a CUDA device).
"""

from __future__ import annotations

import argparse

import torch
from timing import median_seconds  # benchmarks/timing.py

from pyrodiff import samplers
from pyrodiff.training.spec import build, load_spec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--num", type=int, default=64, help="samples per run (the batch)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    model = build(load_spec("digits")).model.eval()  # the default specification's U-Net, untrained: speed only
    model.network.to(device)
    T = model.schedule.num_steps
    x_T = torch.randn((args.num,) + model.data_shape, generator=torch.Generator().manual_seed(0)).to(device)

    def run(graph: bool) -> torch.Tensor:
        g = torch.Generator(device).manual_seed(1)
        return samplers.ancestral(model, x_T, generator=g, graph=graph)

    rows = {"eager": lambda: run(False)}
    if device.type == "cuda":
        rows["graphed"] = lambda: run(True)
    print(f"{T}-step ancestral sampler, {args.num} samples per run, {device} ({torch.__version__})")
    seconds = {}
    for name, fn in rows.items():
        seconds[name] = median_seconds(fn, device, args.repeats, warmup=False)
        print(f"| {name} | {seconds[name]:.2f} s | {args.num / seconds[name]:.1f} samples/s |", flush=True)
    if "graphed" in seconds:
        diff = (run(False) - run(True)).abs().max().item()
        print(f"graphed / eager speed: {seconds['eager'] / seconds['graphed']:.2f}x; max |difference| {diff:.2e}")


if __name__ == "__main__":
    main()
