"""Why a fixed encoder, and what does learning it buy?  Digits bits/dim of models trained for the same wall-clock time.

Each row is trained here for ``--seconds`` of wall clock (``training.seconds``; the VAE by
:func:`pyrodiff.theory.vae.train_vae`'s own budget), with the same network size (the U-Net of ``models/digits.toml``;
the VAE sized to match it), then scored on the whole test split (359 digits) by its own bound, in bits/dim on the
17-level scale, with the standard error across examples:

1. fixed linear schedule, L_simple, fixed "small" variance (``models/digits.toml``, the default run);
2. fixed linear schedule trained on the bound, learned variances;
3. learned schedule (VDM's monotone gamma, learned endpoints) trained on the discrete bound at T = 1000;
4. continuous time (T = infinity) with a learned schedule, without Fourier features;
5. the same with Fourier features (``models/digits-vdm.toml``);
6. the VAE (``pyrodiff.theory.vae``; its ELBO, 100 draws per example);
7. independent per-pixel histograms (exact; add-one smoothing of the 17 levels' training counts).

Every figure is an upper bound on the negative log-likelihood (an ELBO; the histograms' is exact), so lower is better
and bounds are compared with bounds.  The discrete chains' bounds are ``bound_terms`` (each term analytic given one
draw of its x_t); the continuous-time rows' ``continuous_bound`` (100 stratified draws of t per example).

Rows are trained only if their folder has no checkpoint, so two processes may train different ``--rows`` at once;
each then writes the table of every row that is ready (``table.md``, ``table.json``).  ``--quick`` uses a 20-second
budget and 40 test digits, to check the script (its numbers mean nothing)::

    OMP_NUM_THREADS=1 python analysis/fixed_encoder.py --out runs/fixed-encoder --rows 1,3,5 &
    OMP_NUM_THREADS=1 python analysis/fixed_encoder.py --out runs/fixed-encoder --rows 2,4,6,7
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from pyrodiff import load_dataset, load_spec, train
from pyrodiff.data import pixel_histogram_nats
from pyrodiff.evaluation.bound import nats_to_bits_per_dim
from pyrodiff.refusal import run_refusing
from pyrodiff.theory.vae import negative_elbo, save_vae, train_vae
from pyrodiff.training.checkpoint import write_atomically

ROOT = Path(__file__).resolve().parents[1]

#: each diffusion row: its label and its changes to a bundled specification
ROWS = {
    1: ("fixed linear schedule, L_simple, fixed small variance", "digits", {}),
    2: (
        "fixed linear schedule, the bound, learned variances",
        "digits",
        {"model": {"variance": "learned"}, "training": {"objective": "elbo"}},
    ),
    3: (
        "learned schedule, the bound at T = 1000",
        "digits-vdm",
        {"model": {"time": "discrete"}, "network": {"fourier_exponents": []}, "training": {"subsample_steps": 1}},
    ),
    4: ("continuous time, learned schedule", "digits-vdm", {"network": {"fourier_exponents": []}}),
    5: ("continuous time, learned schedule, Fourier features", "digits-vdm", {}),
    6: ("VAE (same decoder, about the same parameter count)", None, {}),
    7: ("independent per-pixel histograms", None, {}),
}


def row_spec(row: int, seconds: float, eval_examples: int) -> dict:
    _, base, changes = ROWS[row]
    spec = load_spec(base).to_dict()
    for table, values in changes.items():
        spec[table] = {**spec[table], **values}
    spec["name"] = f"row{row}"
    spec["training"] |= {"seconds": seconds, "steps": 1_000_000, "eval_examples": eval_examples}
    return spec


def train_row(
    row: int, folder: Path, seconds: float, eval_examples: int, test: torch.Tensor, data, num_samples: int | None
) -> None:
    """Train row ``row`` into ``folder`` (unless it holds a result) and write its ``result.json``."""
    if (folder / "result.json").exists():
        return
    if row == 7:
        nats = pixel_histogram_nats(data.train, test, data.levels)
        result = {"parameters": int(test[0].numel() * data.levels), "seconds": 0.0, "steps": 0}
    elif row == 6:
        vae, info = train_vae(data.train, seconds, seed=0)
        save_vae(folder / "vae.pt", vae, info)
        with torch.no_grad():
            terms = negative_elbo(vae, test, 100, generator=torch.Generator().manual_seed(0))
        nats = terms.total.mean(0)
        result = {
            "parameters": sum(p.numel() for p in vae.parameters()),
            "seconds": info["seconds"],
            "steps": info["steps"],
            "best_step": info["best_step"],
        }
    else:
        done = train(row_spec(row, seconds, eval_examples), folder, progress=False, num_samples=num_samples)
        bound = done.test_bound
        state = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=False)
        parameters = sum(v.numel() for v in state["network"].values()) + sum(
            v.numel() for k, v in state.get("schedule", {}).items()
        )
        result = {
            "parameters": parameters,
            "seconds": done.seconds,
            "steps": done.steps,
            "bits_per_dim": bound["bits_per_dim"],
            "bits_per_dim_stderr": bound["bits_per_dim_stderr"],
            "nats": bound["total_nats"],
            "nats_stderr": bound["total_stderr"],
            "bound": "continuous-time bound (100 stratified draws)" if bound.get("time") == "continuous" else "ELBO",
        }
        write_result(folder, result)
        return
    dims = test[0].numel()
    se = float(nats.std() / math.sqrt(len(nats)))
    result |= {
        "bits_per_dim": nats_to_bits_per_dim(float(nats.mean()), dims),
        "bits_per_dim_stderr": nats_to_bits_per_dim(se, dims),
        "nats": float(nats.mean()),
        "nats_stderr": se,
        "bound": "exact" if row == 7 else "ELBO (100 draws per example)",
    }
    write_result(folder, result)


def write_result(folder: Path, result: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / "result.json", lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))


def write_table(out: Path, num_test: int) -> None:
    rows = []
    for row, (label, _, _) in ROWS.items():
        path = out / f"row{row}" / "result.json"
        if path.exists():
            rows.append({"row": row, "label": label, **json.loads(path.read_text())})
    lines = [
        "| # | model | parameters | training | bound | bits/dim | +- se |",
        "| ---: | --- | ---: | --- | --- | ---: | ---: |",
    ]
    for r in rows:
        training = f"{r['seconds']:.0f} s, {r.get('steps', 0)} steps" if r["row"] != 7 else "counts"
        lines.append(
            f"| {r['row']} | {r['label']} | {r['parameters']:,} | {training} | {r['bound']} | "
            f"{r['bits_per_dim']:.4f} | {r['bits_per_dim_stderr']:.4f} |"
        )
    lines.append("")
    lines.append(f"{num_test} test digits (the whole test split unless --quick); 17 levels; lower is better.")
    text = "\n".join(lines) + "\n"
    write_atomically(out / "table.md", lambda f: f.write(text.encode()))
    write_atomically(out / "table.json", lambda f: f.write((json.dumps(rows, indent=2) + "\n").encode()))
    print(text)


PROG = "fixed_encoder.py"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder of the rows' runs and the table")
    p.add_argument("--rows", default="1,2,3,4,5,6,7", help="the rows to train here, e.g. 1,3,5")
    p.add_argument("--seconds", type=float, default=422.0, help="wall-clock training budget of every row")
    p.add_argument("--quick", action="store_true", help="20 s per row and 40 test digits: checks the script only")
    args = p.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"--rows: no row {unknown[0]}; the rows are {', '.join(map(str, ROWS))}")
    seconds = 20.0 if args.quick else args.seconds
    return run_refusing(PROG, lambda: run(args, rows, seconds))


def run(args: argparse.Namespace, rows: list[int], seconds: float) -> None:
    data = load_dataset("digits")
    test = data.test[:40] if args.quick else data.test
    args.out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        print(f"row {row}: {ROWS[row][0]}", file=sys.stderr)
        train_row(row, args.out / f"row{row}", seconds, len(test), test, data, 4 if args.quick else 16)
    write_table(args.out, len(test))


if __name__ == "__main__":
    sys.exit(main())
