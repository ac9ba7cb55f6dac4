"""The probability-flow ODE's exact likelihood of a trained model beside its ELBO, IWAE and the data's entropy.

    python analysis/ode_likelihood.py runs/gaussians8/checkpoint.pt [--examples 200] [--particles 50]
        [--rtol 1e-5] [--atol 1e-5] [--divergence exact|hutchinson] [--probes K] [--threads N]
        [--dtype float64|float32] [--out DIR]

On the first ``--examples`` test examples (float64 copies of the EMA model; ``--dtype float32`` is about five times
faster for the digits U-Net on a CPU, the tolerances still above float32's rounding), each per example and then averaged with
a standard error across examples:

- ``ode``: -log p_ODE(x) by the instantaneous change of variables (`pyrodiff.ode_log_likelihood`: exact divergence
  for D <= 128, Hutchinson otherwise; dequantised on discrete data), with its NFE, seconds and tolerances;
- ``elbo``: the negative ELBO (`bound_terms`, one draw of the path per example);
- ``iwae``: -IWAE_K with the forward chain as proposal (`log_likelihood_bound`), with the share of examples whose
  Pareto k-hat is above Vehtari et al.'s min(1 - 1/log10 K, 0.7) (the estimate is unreliable there);
- where the data law is known (gaussians8): the true entropy H (`GAUSSIANS8_ENTROPY`) and, paired per example,
  E[log q(x) - log p(x)] for each of the three (the KL(q || p_ODE) for the ODE, bounds on KL(q || p_theta) for the
  others), and the ODE NLL of the exact score's flow (`IsotropicGaussianMixture.noise`) started at the same noise
  level: the floor that starting at lambda_1 leaves; and the trained network's score against the exact score per t
  (relative squared error E||s_theta - s||^2 / E||s||^2 over x_t ~ q(x_t), with its standard error).

Writes ``ode_likelihood.json`` (with every example's figures under ``per_example``: the three negative
log-likelihoods, k-hat, log q) and ``ode_likelihood.md`` (with the command line) into ``--out`` (default: beside the
checkpoint); ``analysis/perspectives.py --ode-digits/--ode-gaussians8`` shows them as its section G.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

PROG = "ode_likelihood"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--examples", type=int, default=200, help="first test examples scored")
    p.add_argument("--particles", type=int, default=50, help="IWAE particles K (0: no IWAE)")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument(
        "--divergence",
        choices=("exact", "hutchinson"),
        default=None,
        help="default: exact for D <= 128 (64 network-Jacobian products per evaluation on digits: about 0.9 s for 10 "
        "examples on one CPU thread, against 0.05 s for one Hutchinson probe)",
    )
    p.add_argument("--probes", type=int, default=1, help="Hutchinson probes per example")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=None, help="torch's CPU threads (default: torch's; 1 on a shared machine)"
    )
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="the model's and data's dtype")
    p.add_argument("--out", type=Path, default=None, help="default: ode-likelihood beside the checkpoint")
    return p


def _mean_se(values, mean: str = "mean", stderr: str = "stderr") -> dict[str, float]:
    """The mean of ``values`` and its standard error across them, under the names given."""
    n = values.numel()
    return {mean: values.mean().item(), stderr: (values.std() / math.sqrt(n)).item() if n > 1 else float("nan")}


def score_errors(model, law, x0, steps, generator) -> list[dict]:
    """Relative squared error of the network's score against the exact score of q(x_t), per t, with its standard
    error (delta method for the ratio of two means over the same draws)."""
    import torch

    from pyrodiff.chain.score import score

    rows = []
    table = model.schedule.tables()
    for t in steps:
        abar = table.alphas_cumprod[t - 1]
        xt = abar.sqrt() * x0 + (1 - abar).sqrt() * torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        with torch.no_grad():
            s = score(model, xt, torch.full((len(x0),), t))
        exact = -law.noise(xt, table.log_snr[t - 1]) / (1 - abar).sqrt()
        num, den = ((s - exact) ** 2).sum(1), (exact**2).sum(1)
        ratio = num.mean() / den.mean()
        resid = (num - ratio * den) / den.mean()
        rows.append(
            {
                "t": t,
                "relative_squared_error": ratio.item(),
                "stderr": (resid.std() / math.sqrt(len(x0))).item(),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    from pyrodiff.refusal import run_refusing

    return run_refusing(PROG, lambda: run(args, argv))


def run(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from pyrodiff import bound_terms, load_trained, log_likelihood_bound, ode_log_likelihood
    from pyrodiff.chain.probability_flow import ProbabilityFlow
    from pyrodiff.data import GAUSSIANS8_ENTROPY
    from pyrodiff.evaluation.likelihood import MIN_PARTICLES_FOR_KHAT, khat_threshold
    from pyrodiff.theory.mixture import IsotropicGaussianMixture

    torch.manual_seed(args.seed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    built, model = load_trained(args.checkpoint)
    dtype = getattr(torch, args.dtype)
    model = model.to(dtype)
    x = built.data.test[: args.examples].to(dtype)
    D = x[0].numel()
    out_dir = args.out or args.checkpoint.parent / "ode-likelihood"
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    report: dict = {
        "command": "python analysis/ode_likelihood.py " + shlex.join(argv),
        "checkpoint": str(args.checkpoint),
        "data": built.spec.data.name,
        "examples": len(x),
        "dims": D,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "model": model.describe(),
    }

    ode = ode_log_likelihood(
        model, x, rtol=args.rtol, atol=args.atol, divergence=args.divergence, num_probes=args.probes, generator=g
    )
    report["ode"] = ode.summary()
    began = time.perf_counter()
    with torch.no_grad():
        terms = bound_terms(model, x, generator=g)
    neg_elbo = terms.total.double().mean(0)  # (N,): the mean over the draws of each example's path
    report["elbo"] = _mean_se(neg_elbo, "negative_elbo_nats", "stderr_nats")
    report["elbo"]["seconds"] = time.perf_counter() - began
    rows = {"ode": -ode.log_likelihood, "elbo": neg_elbo}
    if args.particles:
        began = time.perf_counter()
        with torch.no_grad():
            iwae = log_likelihood_bound(model, x, num_particles=args.particles)
        neg_iwae = -iwae.estimate.double()
        # k-hat needs K >= 21 (MIN_PARTICLES_FOR_KHAT); below that it is NaN and no threshold applies
        threshold = khat_threshold(args.particles) if args.particles >= MIN_PARTICLES_FOR_KHAT else float("nan")
        report["iwae"] = {
            **_mean_se(neg_iwae, "negative_iwae_nats", "stderr_nats"),
            "particles": args.particles,
            "khat_median": iwae.khat.nanmedian().item(),
            "khat_threshold": threshold,
            "share_khat_above_threshold": (
                (iwae.khat > threshold).double().mean().item() if threshold == threshold else float("nan")
            ),
            "seconds": time.perf_counter() - began,
        }
        rows["iwae"] = neg_iwae
        khat = iwae.khat.tolist()
    mixture = built.data.mixture
    if mixture is not None:
        law = IsotropicGaussianMixture.of(built.data)
        log_q = law.log_prob(x).double()
        report["entropy_nats"] = GAUSSIANS8_ENTROPY if built.spec.data.name == "gaussians8" else None
        report["entropy_of_these_examples_nats"] = _mean_se(-log_q)
        report["paired_kl_nats"] = {name: _mean_se(values - (-log_q)) for name, values in rows.items()}
        flow = ProbabilityFlow.of(model)
        exact_flow = ProbabilityFlow(flow.log_snr, law.noise, flow.start, flow.end)
        exact = ode_log_likelihood(exact_flow, x, rtol=args.rtol, atol=args.atol)
        report["exact_score_ode"] = {
            **exact.summary(),
            "paired_kl_nats": _mean_se(-exact.log_likelihood - (-log_q)),
        }
        T = model.schedule.num_steps
        steps = sorted({1, 10, T // 20, T // 10, T // 4, T // 2, 3 * T // 4, T})
        report["score_error"] = score_errors(model, law, x, steps, g)
    # every example's figures, for paired differences and k-hat counts (analysis/perspectives.py, section G)
    report["per_example"] = {name: values.tolist() for name, values in rows.items()}
    if args.particles:
        report["per_example"]["khat"] = khat
    if mixture is not None:
        report["per_example"]["log_q"] = log_q.tolist()
    (out_dir / "ode_likelihood.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "ode_likelihood.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(r: dict) -> str:
    o = r["ode"]
    lines = [
        f"# The probability-flow ODE's likelihood: {r['data']}",
        "",
        f"`{r['command']}`",
        "",
        f"{r['examples']} test examples, D = {r['dims']}, {r['threads']} CPU thread(s), {r['dtype']}; nats per example, "
        "mean +- standard error across examples.",
        "",
        "| quantity | nats | paired E[log q - log p] |",
        "| --- | --- | --- |",
    ]
    kl = r.get("paired_kl_nats", {})

    def pair(name: str) -> str:
        return f"{kl[name]['mean']:.4f} +- {kl[name]['stderr']:.4f}" if name in kl else ""

    lines.append(
        f"| -log p_ODE ({o['divergence']} divergence, {o['method']}, rtol {o['rtol']:g}, atol {o['atol']:g}, "
        f"NFE {o['nfe']}, {o['seconds']:.1f} s) | {o['negative_log_likelihood_nats']:.4f} +- {o['stderr_nats']:.4f} "
        f"| {pair('ode')} |"
    )
    e = r["elbo"]
    lines.append(
        f"| -ELBO (one path per example) | {e['negative_elbo_nats']:.4f} +- {e['stderr_nats']:.4f} | {pair('elbo')} |"
    )
    if "iwae" in r:
        i = r["iwae"]
        lines.append(
            f"| -IWAE_{i['particles']} (median k-hat {i['khat_median']:.2f}; {100 * i['share_khat_above_threshold']:.0f}% "
            f"above {i['khat_threshold']:.2f}) | {i['negative_iwae_nats']:.4f} +- {i['stderr_nats']:.4f} | {pair('iwae')} |"
        )
    if "exact_score_ode" in r:
        x = r["exact_score_ode"]
        lines.append(
            f"| -log p_ODE of the exact score (NFE {x['nfe']}) | {x['negative_log_likelihood_nats']:.4f} +- "
            f"{x['stderr_nats']:.4f} | {x['paired_kl_nats']['mean']:.4f} +- {x['paired_kl_nats']['stderr']:.4f} |"
        )
        h = r["entropy_of_these_examples_nats"]
        lines += [
            f"| true entropy H(q) | {r['entropy_nats']:.4f} (these examples' -log q: {h['mean']:.4f} +- "
            f"{h['stderr']:.4f}) | |",
            "",
            "The ODE starts at the first step's noise level: its density is that of x at log-SNR "
            f"{o['start']:.3f}, with the data taken as that variable.",
            "",
            "Score error per t, E||s_theta - s||^2 / E||s||^2 over x_t ~ q(x_t) (the exact score of the mixture):",
            "",
            "| t | relative squared error |",
            "| --- | --- |",
        ]
        lines += [f"| {s['t']} | {s['relative_squared_error']:.4g} +- {s['stderr']:.2g} |" for s in r["score_error"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
