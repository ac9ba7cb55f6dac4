"""Overhead of the Pyro program in training: one pyrodiff training step (``TraceMeanField_ELBO()(model,
guide)``, subsample_steps=1, AdamW) against a plain PyTorch DDPM step that computes the same loss
(the same analytic per-timestep KLs, decoder term and prior term) with the same network, batch,
optimizer and random timesteps, measured side by side in one run.

    python benchmarks/train_step.py [--device cpu|cuda] [--steps 30] [--repeats 5]

Goal (issue 4): ratio <= 1.05.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch
from pyro.infer import TraceMeanField_ELBO

from pyrodiff import DiffusionGuide, DiffusionModel, NoiseSchedule, UNet
from pyrodiff.chain.forward import q_marginal, q_posterior
from pyrodiff.chain.gaussian import expand_event, normal_kl
from pyrodiff.data import load_dataset


def plain_pytorch_loss(model: DiffusionModel, x0: torch.Tensor) -> torch.Tensor:
    """The subsampled negative ELBO (k = 1) without Pyro: T * l_t + L_T, summed over the batch."""
    schedule, T, N, event_dim = model.schedule, model.schedule.num_steps, x0.shape[0], x0.dim() - 1
    t = torch.randint(1, T + 1, (N,), device=x0.device)
    loc, var = q_marginal(schedule, x0, t)
    xt = loc + var.sqrt() * torch.randn_like(x0)
    mean, var_p, _ = model.predict(xt, t)
    loc_q, var_q = q_posterior(schedule, x0, xt, t)
    first = expand_event(t == 1, event_dim)
    kl = normal_kl(loc_q, torch.where(first, torch.ones_like(var_q), var_q), mean, var_p, event_dim)
    nll = -model.decoder.distribution(torch.where(first, mean, x0), var_p, event_dim).log_prob(x0)
    m_T, v_T = q_marginal(schedule, x0, torch.full_like(t, T))
    prior = normal_kl(m_T, v_T, torch.zeros_like(x0), torch.ones_like(v_T), event_dim)
    return (T * torch.where(t == 1, nll, kl) + prior).sum()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=30, help="training steps per timing")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--validation", action="store_true", help="keep Pyro's validation on (pyrodiff train turns it off)")
    args = p.parse_args()
    pyro.enable_validation(args.validation)
    device = torch.device(args.device)
    torch.manual_seed(0)
    data = load_dataset("digits").train.to(device)
    schedule = NoiseSchedule.linear(1000)
    net = UNet(1, channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,)).to(device)
    model = DiffusionModel(net, schedule, decoder="discretized", levels=17)
    model.register_with_pyro = False  # as in pyrodiff train: the torch optimizer holds the parameters
    loss_module = TraceMeanField_ELBO()(model, DiffusionGuide(schedule))
    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, **kwargs)
    batches = [data[torch.randint(len(data), (args.batch_size,))] for _ in range(args.steps)]

    def run(loss_fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for x0 in batches:
            opt.zero_grad(set_to_none=True)
            loss_fn(x0).backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / len(batches)

    pyro_step = lambda x0: loss_module(x0, 1)  # noqa: E731
    torch_step = lambda x0: plain_pytorch_loss(model, x0)  # noqa: E731
    run(pyro_step), run(torch_step)  # warm-up
    times = {"plain PyTorch": [], "pyrodiff (Pyro program)": []}
    for _ in range(args.repeats):  # interleaved
        times["plain PyTorch"].append(run(torch_step))
        times["pyrodiff (Pyro program)"].append(run(pyro_step))
    base = statistics.median(times["plain PyTorch"])
    print(
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads; digits U-Net, "
        f"batch {args.batch_size}; Pyro validation {'on' if args.validation else 'off'}"
    )
    for label, ts in times.items():
        med = statistics.median(ts)
        print(f"  {label:26s} {med * 1e3:8.2f} ms/step   ratio {med / base:.3f}")


if __name__ == "__main__":
    main()
