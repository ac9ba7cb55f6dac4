"""The bound of a trained model's K-step chains: bits/dim against the number of sampling steps.

    python analysis/bound_vs_steps.py runs/digits/checkpoint.pt [--steps 10 25 50 100 250 1000]
        [--variances small large analytic] [--etas 0.5 0.2] [--analytic-examples 200] [--max-examples 100]
        [--out docs/bound-vs-steps] [--overwrite]

For each K, the model respaced to K evenly spaced steps (`DiffusionModel.respaced`, the network seeing the
original timesteps) is scored by `bound_terms` on the first test examples: the exact bound of the K-step
ancestral sampler, every term, one draw of the noisy inputs per example.  Each reverse variance is the
respaced chain's own ("small": its beta_tilde, "large": its beta; "analytic": Analytic-DPM's optimal variances for
the trained mean, `pyrodiff.chain.analytic`, estimated on the first training examples, the estimate included in the
seconds).  Each eta adds the K-step DDIM chain with that eta (`DiffusionModel.ddim`, variances eta^2 beta_tilde,
scored against its own inference family q_sigma; eta = 1 is "small", eta = 0 has no bound).  Writes `bound_vs_steps.md`,
`bound_vs_steps.json` and `bound_vs_steps.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

from pyrodiff import DiffusionModel, bound_terms, load_trained
from pyrodiff.chain.analytic import analytic_variance


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50, 100, 250, 1000])
    p.add_argument(
        "--variances", nargs="+", default=["small", "large", "analytic"], choices=["small", "large", "analytic"]
    )
    p.add_argument("--etas", type=float, nargs="*", default=[0.5, 0.2], help="DDIM chains to score, eta in (0, 1]")
    p.add_argument("--analytic-examples", type=int, default=200, help="training examples that estimate Gamma_t")
    p.add_argument("--max-examples", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path("docs/bound-vs-steps"))
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if (args.out / "bound_vs_steps.md").exists() and not args.overwrite:
        raise SystemExit(f"{args.out / 'bound_vs_steps.md'} exists: choose another --out or pass --overwrite")
    built, trained = load_trained(args.checkpoint)
    x0 = built.data.test[: args.max_examples]
    rows, results = [], {}
    chains = [(variance, variance) for variance in args.variances] + [(f"ddim eta={eta:g}", eta) for eta in args.etas]
    for variance, choice in chains:
        fixed = choice if choice in ("small", "large") else "small"
        model = DiffusionModel(
            trained.network, trained.schedule, trained.prediction, fixed, trained.decoder, None, trained.data_shape
        )
        for K in args.steps:
            torch.manual_seed(0)
            began = time.time()
            chain = model.respaced(K)
            if choice == "analytic":  # Analytic-DPM's variances for this chain, from training data
                chain = analytic_variance(chain, built.data.train[: args.analytic_examples])
            elif not isinstance(choice, str):
                chain = chain.ddim(choice)
            terms = bound_terms(chain, x0)
            seconds = time.time() - began
            total = terms.total.mean().item()
            bpd, se = terms.to_bits_per_dim(total), terms.to_bits_per_dim(terms.total_stderr())
            rate = terms.to_bits_per_dim(terms.rate.mean().item())
            results.setdefault(variance, {})[K] = {"bits_per_dim": bpd, "stderr": se, "rate": rate, "seconds": seconds}
            rows.append(f"| {variance} | {K} | {bpd:.4f} | {se:.4f} | {rate:.4f} | {seconds:.1f} |")
            print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    for variance, r in results.items():
        ks = sorted(r)
        ax.errorbar(ks, [r[k]["bits_per_dim"] for k in ks], [r[k]["stderr"] for k in ks], marker="o", label=variance)
    ax.set_xscale("log")
    ax.set_xlabel("K (sampling steps, evenly spaced)")
    ax.set_ylabel("bound (bits/dim)")
    ax.set_yscale("log")
    ax.legend(title="reverse variance")
    fig.savefig(args.out / "bound_vs_steps.png", dpi=100, bbox_inches="tight")
    scale = "17-level" if trained.decoder.levels == 17 else trained.decoder.describe()
    (args.out / "bound_vs_steps.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "bound_vs_steps.md").write_text(
        f"# The bound of the K-step chains of {args.checkpoint}\n\n"
        f"`python analysis/bound_vs_steps.py {args.checkpoint}` on the first {x0.shape[0]} test examples (bits/dim, "
        f"{scale} scale; every term, one draw per example; {math.fsum(v['seconds'] for r in results.values() for v in r.values()):.0f} s).\n\n"
        "| variance | K | bits/dim | +- | rate (bits/dim) | seconds |\n| --- | ---: | ---: | ---: | ---: | ---: |\n"
        + "\n".join(rows)
        + "\n\n![bound against steps](bound_vs_steps.png)\n"
    )
    print(f"wrote {args.out / 'bound_vs_steps.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
