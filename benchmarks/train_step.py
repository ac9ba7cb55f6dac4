"""Overhead of the Pyro program in training: one pyrodiff training step (``TraceMeanField_ELBO()(model,
guide)``, subsample_steps=1, AdamW) against a plain PyTorch DDPM step that computes the same loss
(the same analytic per-timestep KLs, decoder term and prior term) with the same network, batch,
optimizer and random timesteps, measured side by side in one run.

The same pyrodiff step with a learned schedule (``LearnedSchedule(1000)``, VDM's monotone network with learned
endpoints, shared by the model and the guide, its parameters in a second AdamW group as ``pyrodiff train`` puts them)
is timed against the step with the fixed linear schedule, interleaved with the others.

    python benchmarks/train_step.py [--device cpu|cuda] [--steps 30] [--repeats 5] [--schedule-hidden 1024] [--cpu-time]

``--cpu-time`` times with the process's CPU time instead of the wall clock (CPU only): steadier on a shared machine,
best with one thread (``OMP_NUM_THREADS=1``).

Goals: the Pyro step <= 1.05 x the plain PyTorch one (issue 4); the learned schedule's step <= 1.1 x the fixed
schedule's (issue 17).
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch
from pyro.infer import TraceMeanField_ELBO

from pyrodiff import (
    ContinuousDiffusionModel,
    ContinuousGuide,
    DiffusionGuide,
    DiffusionModel,
    LearnedSchedule,
    LinearLogSNR,
    NoiseSchedule,
    UNet,
)
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
    p.add_argument("--schedule-hidden", type=int, default=1024, help="width of the learned schedule's network (VDM's)")
    p.add_argument("--cpu-time", action="store_true", help="time with the process's CPU time (CPU device only)")
    args = p.parse_args()
    if args.cpu_time and torch.device(args.device).type != "cpu":
        p.error("--cpu-time measures the host's CPU time: use it with --device cpu")
    clock = time.process_time if args.cpu_time else time.perf_counter
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
    # the same step with a learned schedule, shared by model and guide (neither registers with Pyro: AdamW holds them)
    learned = LearnedSchedule(1000, hidden=args.schedule_hidden).to(device)
    learned_model = DiffusionModel(net, learned, decoder="discretized", levels=17)
    learned_guide = DiffusionGuide(learned)
    learned_model.register_with_pyro = learned_guide.register_with_pyro = False
    learned_loss = TraceMeanField_ELBO()(learned_model, learned_guide)
    learned_opt = torch.optim.AdamW(
        [{"params": net.parameters()}, {"params": learned.parameters(), "weight_decay": 0.0}], lr=1e-4, **kwargs
    )
    batches = [data[torch.randint(len(data), (args.batch_size,))] for _ in range(args.steps)]

    def run(loss_fn, opt=opt):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        for x0 in batches:
            opt.zero_grad(set_to_none=True)
            loss_fn(x0).backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (clock() - start) / len(batches)

    pyro_step = lambda x0: loss_module(x0, 1)  # noqa: E731
    torch_step = lambda x0: plain_pytorch_loss(model, x0)  # noqa: E731

    def learned_step(x0):  # as pyrodiff train takes it: the schedule's tables computed once per loss
        with learned.memoised():
            return learned_loss(x0, 1)

    # the continuous-time bound (the network told the noise level), with VDM's fixed linear and a learned schedule
    continuous = {}
    for kind, schedule_c in (
        ("fixed", LinearLogSNR(1000)),
        ("learned", LearnedSchedule(1000, hidden=args.schedule_hidden)),
    ):
        schedule_c = schedule_c.to(device)
        model_c = ContinuousDiffusionModel(net, schedule_c, "discretized", 17)
        guide_c = ContinuousGuide(schedule_c)
        model_c.register_with_pyro = guide_c.register_with_pyro = False
        groups = [{"params": net.parameters()}] + (
            [{"params": schedule_c.parameters(), "weight_decay": 0.0}] if schedule_c.has_parameters else []
        )
        continuous[kind] = (TraceMeanField_ELBO()(model_c, guide_c), torch.optim.AdamW(groups, lr=1e-4, **kwargs))
    cont_fixed, cont_learned = "continuous time, fixed", "continuous time, learned"
    steps = {
        "plain PyTorch": (torch_step, opt),
        "pyrodiff (Pyro program)": (pyro_step, opt),
        "pyrodiff, learned schedule": (learned_step, learned_opt),
        cont_fixed: (continuous["fixed"][0], continuous["fixed"][1]),
        cont_learned: (continuous["learned"][0], continuous["learned"][1]),
    }
    plain, fixed, with_learned = list(steps)[:3]
    for step, optimiser in steps.values():  # warm-up
        run(step, optimiser)
    times = {label: [] for label in steps}
    for _ in range(args.repeats):  # interleaved
        for label, (step, optimiser) in steps.items():
            times[label].append(run(step, optimiser))
    medians = {label: statistics.median(ts) for label, ts in times.items()}
    print(
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads; digits U-Net, "
        f"batch {args.batch_size}; Pyro validation {'on' if args.validation else 'off'}; learned schedule: "
        f"LearnedSchedule(1000, hidden={args.schedule_hidden}); {'CPU' if args.cpu_time else 'wall-clock'} time"
    )
    for label, med in medians.items():
        print(f"  {label:26s} {med * 1e3:8.2f} ms/step   ratio {med / medians[plain]:.3f}")
    print(
        f"  learned schedule / fixed schedule (both pyrodiff, T = 1000): {medians[with_learned] / medians[fixed]:.3f}"
    )
    print(f"  learned schedule / fixed schedule (continuous time): {medians[cont_learned] / medians[cont_fixed]:.3f}")


if __name__ == "__main__":
    main()
