"""One SVI step of the full-chain ELBO at T = 1000 against one forward+backward pass of the network
over the same N x T inputs (the floor any implementation must pay), measured side by side.

    python benchmarks/svi_step.py [--device cpu|cuda] [--repeats 10]

Prints the median time of each and the ratios.  The goal of issue 2 is ratio <= 1.3.
"""

from __future__ import annotations

import argparse
import statistics

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from timing import seconds  # benchmarks/timing.py

from pyrodiff import DiffusionGuide, DiffusionModel, MLPDenoiser, NoiseSchedule, UNet

T = 1000


def bench(name, network, x0, device, repeats):
    network = network.to(device)
    x0 = x0.to(device)
    schedule = NoiseSchedule.linear(T)
    model, guide = DiffusionModel(network, schedule), DiffusionGuide(schedule)
    N = x0.shape[0]
    flat_x = torch.randn((N * T,) + x0.shape[1:], device=device)
    flat_t = torch.arange(1, T + 1, device=device).repeat_interleave(N)

    def network_pass():
        network.zero_grad(set_to_none=True)
        network(flat_x, flat_t).square().sum().backward()

    loss_module = Trace_ELBO()(model, guide)
    torch_opt = torch.optim.Adam(network.parameters(), lr=1e-5)

    def elbo_module_step():
        torch_opt.zero_grad(set_to_none=True)
        loss_module(x0).backward()
        torch_opt.step()

    pyro.clear_param_store()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-5}), Trace_ELBO())

    def svi_step():
        svi.step(x0)

    results = {"network fwd+bwd": [], "ELBOModule + torch Adam step": [], "pyro SVI.step": []}
    for _ in range(repeats):  # interleave so that drifts of the machine hit all alike
        results["network fwd+bwd"] += seconds(network_pass, device, 1)
        results["ELBOModule + torch Adam step"] += seconds(elbo_module_step, device, 1)
        results["pyro SVI.step"] += seconds(svi_step, device, 1)
    base = statistics.median(results["network fwd+bwd"])
    print(f"\n{name}: N = {N}, T = {T}, {N * T} network inputs of shape {tuple(x0.shape[1:])}, device {device}")
    for label, times in results.items():
        med = statistics.median(times)
        print(f"  {label:32s} {med * 1e3:9.1f} ms   ratio {med / base:5.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench(
        "digits U-Net (models/digits.toml)",
        UNet(1, channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,)),
        torch.rand(4, 1, 8, 8) * 2 - 1,
        device,
        args.repeats,
    )
    bench(
        "2-D MLP (models/gaussians8.toml)",
        MLPDenoiser(2, hidden=128, depth=3),
        torch.randn(64, 2),
        device,
        args.repeats,
    )


if __name__ == "__main__":
    main()
