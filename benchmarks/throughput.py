"""Training throughput in images per second: pyrodiff's training step (``TraceMeanField_ELBO()(model,
guide)``, subsample_steps=1, AdamW) for a U-Net on 32x32x3 images, eager float32 against bf16 autocast
around the network, ``torch.compile`` of the network, and both, measured in one run.

    python benchmarks/throughput.py --device cuda              # DDPM's CIFAR-10 U-Net, batch 128

Goal (issue 4, when a GPU is lent): images/s at batch 128 with and without bf16 and compile.  The
images are random draws on the 256-level grid (no download: throughput does not depend on content).
The default network is DDPM's CIFAR-10 U-Net (128 channels, multipliers 1, 2, 2, 2, two residual
blocks per level, attention at 16x16); ``--channels 16 --batch-size 8`` makes a CPU smoke run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import pyro
import torch
from pyro.infer import TraceMeanField_ELBO

from pyrodiff import DiffusionGuide, DiffusionModel, NoiseSchedule, UNet

#: name -> (autocast dtype around the network, torch.compile of the network)
CONFIGS = {
    "float32": (None, False),
    "bf16": (torch.bfloat16, False),
    "compile": (None, True),
    "bf16 + compile": (torch.bfloat16, True),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed training steps per repetition")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = p.parse_args()
    pyro.enable_validation(False)  # as pyrodiff train runs its loop
    device = torch.device(args.device)
    torch.manual_seed(0)
    schedule = NoiseSchedule.linear(1000)
    network = UNet(3, channels=args.channels, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_levels=(1,))
    network = network.to(device)
    x0 = (torch.randint(0, 256, (args.batch_size, 3, 32, 32), device=device) / 127.5 - 1).float()
    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}

    steps = {}
    for name in args.configs:
        autocast_dtype, compiled = CONFIGS[name]
        net = copy.deepcopy(network)
        model = DiffusionModel(torch.compile(net) if compiled else net, schedule, decoder="discretized", levels=256)
        model.autocast_dtype, model.register_with_pyro = autocast_dtype, False
        loss_module = TraceMeanField_ELBO()(model, DiffusionGuide(schedule))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, **kwargs)

        def step(loss_module=loss_module, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss_module(x0, 1).backward()
            opt.step()

        for _ in range(args.warmup):
            step()
        steps[name] = step

    def images_per_second(step) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return args.steps * args.batch_size / (time.perf_counter() - start)

    rates = {name: [] for name in steps}
    for _ in range(args.repeats):  # interleaved
        for name, step in steps.items():
            rates[name].append(images_per_second(step))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    params = sum(p.numel() for p in network.parameters()) / 1e6
    print(f"torch {torch.__version__}, {name}; U-Net {params:.1f}M parameters, 32x32x3, batch {args.batch_size}")
    base = statistics.median(rates[args.configs[0]])
    for name, r in rates.items():
        med = statistics.median(r)
        print(f"  {name:16s} {med:10.1f} images/s   ratio to {args.configs[0]} {med / base:.3f}")


if __name__ == "__main__":
    main()
