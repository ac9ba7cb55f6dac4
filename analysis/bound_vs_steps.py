"""The bound of a trained model's K-step chains: bits/dim against the number of sampling steps.

    python analysis/bound_vs_steps.py runs/digits/checkpoint.pt [--steps 10 25 50 100 250 1000]
        [--variances small large analytic] [--etas 0.5 0.2] [--analytic-examples 200] [--max-examples 100]
        [--out DIR] [--overwrite]

For each K, the model respaced to K evenly spaced steps (`DiffusionModel.respaced`, the network seeing the
original timesteps) is scored by `bound_terms` on the first test examples: the exact bound of the K-step
ancestral sampler, every term, one draw of the noisy inputs per example.  Each reverse variance is the
respaced chain's own ("small": its beta_tilde, "large": its beta; "analytic": Analytic-DPM's optimal variances for
the trained mean, `pyrodiff.chain.analytic`, estimated on the first training examples, the estimate included in the
seconds).  Each eta adds the K-step DDIM chain with that eta (`DiffusionModel.ddim`, variances eta^2 beta_tilde,
scored against its own inference family q_sigma; eta = 1 is "small"; eta = 0 is deterministic and has no bound, so
its rows read "no bound").  Writes `bound_vs_steps.md` (with the exact command line), `bound_vs_steps.json` and
`bound_vs_steps.png` into `--out` (default: `bound-vs-steps` beside the checkpoint), rewritten after every row, so
that a later failure or Ctrl-C loses no finished row.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

PROG = "bound_vs_steps"
VARIANCES = ("small", "large", "analytic")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50, 100, 250, 1000])
    p.add_argument("--variances", nargs="+", default=list(VARIANCES), choices=VARIANCES)
    p.add_argument("--etas", type=float, nargs="*", default=[0.5, 0.2], help="DDIM chains to score, eta in [0, 1]")
    p.add_argument("--analytic-examples", type=int, default=200, help="training examples that estimate Gamma_t")
    p.add_argument("--max-examples", type=int, default=100)
    p.add_argument("--out", type=Path, help="default: bound-vs-steps beside the checkpoint")
    p.add_argument("--overwrite", action="store_true")
    return p


if __name__ == "__main__":  # refuse bad arguments before torch and Pyro load (seconds)
    build_parser().parse_args()

import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pyrodiff import bound_terms, load_trained  # noqa: E402
from pyrodiff.chain.analytic import analytic_variance  # noqa: E402
from pyrodiff.refusal import run_refusing  # noqa: E402


def command_line(argv: list[str]) -> str:
    """The command that produced the results, as it can be typed again."""
    return shlex.join(["python", "analysis/bound_vs_steps.py", *argv])


def write(out: Path, results: dict, rows: list[str], header: str, total_rows: int) -> None:
    """``bound_vs_steps.{md,json,png}`` with the rows finished so far."""

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    for variance, r in results.items():
        ks = sorted(k for k in r if r[k]["bits_per_dim"] is not None)
        if ks:
            ax.errorbar(
                ks, [r[k]["bits_per_dim"] for k in ks], [r[k]["stderr"] for k in ks], marker="o", label=variance
            )
    ax.set_xscale("log")
    ax.set_xlabel("K (sampling steps, evenly spaced)")
    ax.set_ylabel("bound (bits/dim)")
    ax.set_yscale("log")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(title="reverse variance")
    fig.savefig(out / "bound_vs_steps.png", dpi=100, bbox_inches="tight")
    (out / "bound_vs_steps.json").write_text(json.dumps(results, indent=1) + "\n")
    missing = "" if len(rows) == total_rows else f"\n\n**Incomplete: {len(rows)} of {total_rows} rows.**"
    (out / "bound_vs_steps.md").write_text(
        header
        + missing
        + "\n\n| variance | K | bits/dim | +- | rate (bits/dim) | seconds |\n| --- | ---: | ---: | ---: | ---: | ---: |\n"
        + "\n".join(rows)
        + "\n\n![bound against steps](bound_vs_steps.png)\n"
    )


def run(args: argparse.Namespace, argv: list[str]) -> int:
    bad = [eta for eta in args.etas if not 0 <= eta <= 1]
    if bad:
        raise ValueError(f"--etas must lie in [0, 1], got {bad}")
    out = args.out or args.checkpoint.parent / "bound-vs-steps"
    if (out / "bound_vs_steps.md").exists() and not args.overwrite:
        raise FileExistsError(f"{out / 'bound_vs_steps.md'} exists: choose another --out or pass --overwrite")
    built, trained = load_trained(args.checkpoint)
    for K in args.steps:  # every K is checked before anything is computed
        trained.respaced(K)
    x0 = built.data.test[: args.max_examples]
    out.mkdir(parents=True, exist_ok=True)
    scale = "17-level" if trained.decoder.levels == 17 else trained.decoder.describe()
    rows, results, seconds = [], {}, []
    chains = [(variance, variance) for variance in args.variances] + [(f"ddim eta={eta:g}", eta) for eta in args.etas]

    def header() -> str:
        return (
            f"# The bound of the K-step chains of {args.checkpoint}\n\n"
            f"`{command_line(argv)}` on the first {x0.shape[0]} test examples (bits/dim, {scale} scale; every term, "
            f"one draw per example; {math.fsum(seconds):.0f} s)."
        )

    for variance, choice in chains:
        fixed = choice if choice in ("small", "large") else "small"
        model = trained.with_variance(fixed)
        for K in args.steps:
            if choice == 0:  # DDIM with eta = 0 is deterministic: no density, no bound
                results.setdefault(variance, {})[K] = {"bits_per_dim": None, "note": "no bound"}
                rows.append(f"| {variance} | {K} | no bound | | | |")
            else:
                torch.manual_seed(0)
                began = time.time()
                chain = model.respaced(K)
                if choice == "analytic":  # Analytic-DPM's variances for this chain, from training data
                    chain = analytic_variance(chain, built.data.train[: args.analytic_examples])
                elif not isinstance(choice, str):
                    chain = chain.ddim(choice)
                terms = bound_terms(chain, x0)
                seconds.append(time.time() - began)
                total = terms.total.mean().item()
                bpd, se = terms.to_bits_per_dim(total), terms.to_bits_per_dim(terms.total_stderr())
                rate = terms.to_bits_per_dim(terms.rate.mean().item())
                results.setdefault(variance, {})[K] = {
                    "bits_per_dim": bpd,
                    "stderr": se,
                    "rate": rate,
                    "seconds": seconds[-1],
                }
                rows.append(f"| {variance} | {K} | {bpd:.4f} | {se:.4f} | {rate:.4f} | {seconds[-1]:.1f} |")
            print(rows[-1], flush=True)
            write(out, results, rows, header(), len(chains) * len(args.steps))
    print(f"wrote {out / 'bound_vs_steps.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    return run_refusing(PROG, lambda: run(args, argv))


if __name__ == "__main__":
    sys.exit(main())
