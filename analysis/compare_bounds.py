"""Compare the bound decompositions of several checkpoints on one plot and one table.

    python analysis/compare_bounds.py runs/digits/checkpoint.pt runs/digits-cosine/checkpoint.pt \\
        --labels linear cosine --out reports/compare [--num-samples 1] [--max-examples 200]

Each argument is a checkpoint (decomposed on its test split, and its report written beside it) or a
folder holding a ``bound.json`` written by ``pyrodiff report``.  Writes ``compare.png`` (L_1..L_T against k,
log scales, one curve per model, with standard-error bands) and ``compare.md`` (with L_0).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from pyrodiff.plots import plt
from pyrodiff.report import report_checkpoint


def load_summary(source: str, args) -> dict:
    path = Path(source)
    if path.is_dir():
        if not (path / "bound.json").exists():
            raise SystemExit(f"{path} holds no bound.json: run `pyrodiff report` first or pass a checkpoint")
        return json.loads((path / "bound.json").read_text())
    summary, _ = report_checkpoint(path, split="test", num_samples=args.num_samples, max_examples=args.max_examples)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+")
    p.add_argument("--labels", nargs="+")
    p.add_argument("--out", default="reports/compare")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-examples", type=int)
    args = p.parse_args(argv)
    labels = args.labels or [Path(s).parent.name if Path(s).is_file() else Path(s).name for s in args.sources]
    if len(labels) != len(args.sources):
        raise SystemExit("give one label per source")
    summaries = [load_summary(s, args) for s in args.sources]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(7, 4))
    rows = [
        "| model | T | bits/dim | +- | rate | distortion | L_T (prior) | examples |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, s in zip(labels, summaries, strict=True):
        to_bpd = 1 / (s["dims"] * math.log(2))
        mean, se = np.array(s["terms_nats"]) * to_bpd, np.array(s["terms_stderr"]) * to_bpd
        k = np.arange(1, len(mean))  # the KL terms L_1..L_T (L_0 may be negative: a density; see the table)
        ax.plot(k, mean[1:], lw=1, label=label)
        ax.fill_between(k, np.clip(mean[1:] - se[1:], 1e-12, None), mean[1:] + se[1:], alpha=0.25)
        rows.append(
            f"| {label} | {s['num_steps']} | {s['bits_per_dim']:.4f} | {s['bits_per_dim_stderr']:.4f} | "
            f"{s['rate_bits_per_dim']:.4f} | {s['distortion_bits_per_dim']:.4f} | {mean[-1]:.2e} | {s['num_examples']} |"
        )
    ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel("k (L_1 .. L_T; L_0 is in the table)")
    ax.set_ylabel("L_k (bits/dim)")
    ax.legend()
    fig.savefig(out / "compare.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    table = "\n".join(rows) + "\n"
    (out / "compare.md").write_text(table)
    print(table)
    print(f"wrote {out / 'compare.png'} and {out / 'compare.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
