"""Compare the bound decompositions of several checkpoints on one plot and one table.

    python analysis/compare_bounds.py runs/digits/checkpoint.pt runs/digits-cosine/checkpoint.pt \\
        [--labels linear cosine] --out reports/compare [--num-samples 1] [--max-examples 200] [--overwrite]

Each argument is a checkpoint (decomposed on its test split, and its report written beside it, in
``report-test``) or a folder holding a ``bound.json`` written by ``pyrodiff report``.  Writes
``compare.png`` (L_1..L_T against k, log scales, one curve per model, with standard-error bands) and
``compare.md`` (with L_0).  Unless ``--labels`` are given, each model is labelled by its name and what its
``bound.json`` records that differs from the others' (run, training steps, objective, prediction, variance,
schedule, T, DDIM eta, split and examples).  Neither an existing ``compare.md`` nor an existing
report beside a checkpoint is replaced without ``--overwrite`` (pass the report's folder to reuse it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROG = "compare_bounds"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", type=Path)
    p.add_argument("--labels", nargs="+", help="one label per source (default: from each bound.json)")
    p.add_argument("--out", default="reports/compare", type=Path)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-examples", type=int)
    p.add_argument(
        "--overwrite", action="store_true", help="replace existing reports beside checkpoints and compare.md"
    )
    return p


if __name__ == "__main__":  # refuse bad arguments before torch and Pyro load (seconds)
    build_parser().parse_args()

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pyrodiff.evaluation.bound import nats_to_bits_per_dim  # noqa: E402
from pyrodiff.evaluation.report import REPORT_FILES  # noqa: E402
from pyrodiff.refusal import run_refusing  # noqa: E402
from pyrodiff.training.trained import report_checkpoint  # noqa: E402


def report_folder(source: Path) -> Path:
    """Where a source's ``bound.json`` is, or will be written: the folder itself, or ``report-test``
    beside a checkpoint (:func:`~pyrodiff.training.trained.report_checkpoint`'s default)."""
    return source if source.is_dir() else source.parent / "report-test"


def check_sources(sources: list[Path], out: Path, overwrite: bool) -> None:
    """Refuse, before anything is computed, a missing source, a folder without ``bound.json``, and results
    that would be replaced without ``overwrite``: a report beside a checkpoint, ``compare.md``."""
    for source in sources:
        if not source.exists():
            raise FileNotFoundError(f"{source}: no such checkpoint or report folder")
        if source.is_dir() and not (source / "bound.json").exists():
            raise FileNotFoundError(f"{source} holds no bound.json: run `pyrodiff report` first or pass a checkpoint")
        folder = report_folder(source)
        if source.is_file() and not overwrite and any((folder / f).exists() for f in REPORT_FILES):
            raise FileExistsError(
                f"{folder} already holds a report: pass that folder instead of {source}, or --overwrite"
            )
    if not overwrite and any((out / f).exists() for f in ("compare.md", "compare.png")):
        raise FileExistsError(f"{out} already holds a comparison: choose another --out or pass --overwrite")


def load_summary(source: Path, args: argparse.Namespace) -> dict:
    """The ``bound.json`` of a report folder, or of a new report of a checkpoint's test split."""
    if source.is_dir():
        return json.loads((source / "bound.json").read_text())
    summary, _ = report_checkpoint(
        source,
        split="test",
        num_samples=args.num_samples,
        max_examples=args.max_examples,
        overwrite=args.overwrite,
        progress=True,
    )
    return summary


def facets(summary: dict, source: Path) -> list[str]:
    """What a ``bound.json`` records about how its numbers were made, as label parts: the run (its folder), the
    training steps and objective, the model's choices, the chain that was scored and the data."""
    m, run = summary["model"], summary.get("checkpoint")
    eta, respaced = summary.get("eta"), summary.get("respaced_steps")
    return [
        f"run {Path(run).parent.name if run else source.name}",
        f"{summary['training_steps']} training steps" if summary.get("training_steps") is not None else "",
        f"trained on {summary['objective']}" if summary.get("objective") else "",
        m["prediction"],
        f"{m['variance']} variance",
        f"{m['schedule']['kind']} schedule",
        f"T = {summary['num_steps']}" + (" (respaced)" if respaced is not None else ""),
        f"DDIM eta = {eta:g}" if eta is not None else "",
        f"{summary.get('split', 'given')} split, {summary['num_examples']} examples",
    ]


def labels(summaries: list[dict], sources: list[Path]) -> list[str]:
    """One label per model: its name and what tells it apart from the others (every facet with one model); the
    source's path where the records do not differ at all."""
    rows = [facets(s, source) for s, source in zip(summaries, sources, strict=True)]
    differs = [len({row[i] for row in rows}) > 1 or len(rows) == 1 for i in range(len(rows[0]))]
    names = []
    for s, row in zip(summaries, rows, strict=True):
        parts = [f for f, keep in zip(row, differs, strict=True) if keep and f]
        names.append(s.get("name", "model") + (": " + ", ".join(parts) if parts else ""))
    if len(set(names)) < len(names):
        names = [f"{name} ({source})" for name, source in zip(names, sources, strict=True)]
    return names


def run(args: argparse.Namespace) -> int:
    if args.labels is not None and len(args.labels) != len(args.sources):
        raise ValueError("give one label per source")
    check_sources(args.sources, args.out, args.overwrite)
    summaries = [load_summary(s, args) for s in args.sources]
    names = args.labels or labels(summaries, args.sources)
    args.out.mkdir(parents=True, exist_ok=True)

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    rows = [
        "| model | T | bits/dim | +- | rate | distortion | L_T (prior) | examples |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in zip(names, summaries, strict=True):
        mean = np.array(s["terms_bits_per_dim"])
        se = nats_to_bits_per_dim(np.array(s["terms_stderr"]), s["dims"])
        k = np.arange(1, len(mean))  # the KL terms L_1..L_T (L_0 may be negative: a density; see the table)
        ax.plot(k, mean[1:], lw=1, label=name)
        ax.fill_between(k, np.clip(mean[1:] - se[1:], 1e-12, None), mean[1:] + se[1:], alpha=0.25)
        rows.append(
            f"| {name} | {s['num_steps']} | {s['bits_per_dim']:.4f} | {s['bits_per_dim_stderr']:.4f} | "
            f"{s['rate_bits_per_dim']:.4f} | {s['distortion_bits_per_dim']:.4f} | {mean[-1]:.2e} | {s['num_examples']} |"
        )
    ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel("k (L_1 .. L_T; L_0 is in the table)")
    ax.set_ylabel("L_k (bits/dim)")
    ax.legend()
    fig.savefig(args.out / "compare.png", dpi=110, bbox_inches="tight")
    table = "\n".join(rows) + "\n"
    (args.out / "compare.md").write_text(table)
    print(table)
    print(f"wrote {args.out / 'compare.png'} and {args.out / 'compare.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_refusing(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
