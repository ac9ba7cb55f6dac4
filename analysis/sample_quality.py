"""A sample-quality number that needs no download: a digits classifier scores each sampler's samples.

    python analysis/sample_quality.py runs/digits/checkpoint.pt [--samplers ancestral ddim] [--steps 10 50 250 1000]
        [--num 200] [--out DIR] [--overwrite]

For digits, a logistic-regression classifier (scikit-learn) is trained on the training split's digits and checked on the
test split.  For each sampler and number of steps K, `--num` samples (seed 0, last step the decoder's mean,
clamped to [-1, 1] for the classifier) are classified: the fraction classified with probability >= 0.9
("confident"), the number of the ten classes that receive a sample, the class histogram's entropy over log 10
(1 = every class equally often), next to the same numbers for real test digits.  Writes `sample_quality.md` (with the exact
command line) and `sample_quality.json` into `--out` (default: `sample-quality` beside the checkpoint).  For 2-D data (gaussians8), the two-sample statistic is the unbiased MMD^2 between the samples
and held-out test points, beside that of two disjoint sets of test points.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

PROG = "sample_quality"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--samplers", nargs="+", default=["ancestral", "ddim"], choices=["ancestral", "ddim"])
    p.add_argument("--steps", type=int, nargs="+", default=[10, 50, 250, 1000])
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--out", type=Path, help="default: sample-quality beside the checkpoint")
    p.add_argument("--overwrite", action="store_true")
    return p


if __name__ == "__main__":  # refuse bad arguments before torch, Pyro and scikit-learn load (seconds)
    build_parser().parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pyrodiff import load_trained, samplers  # noqa: E402
from pyrodiff.refusal import run_refusing  # noqa: E402


def scores(classifier, images: torch.Tensor) -> dict:
    """Confidence and mode coverage of ``images`` under the classifier."""
    probs = classifier.predict_proba(images.clamp(-1, 1).reshape(len(images), -1).double().numpy())
    counts = np.bincount(probs.argmax(1), minlength=10)
    share = counts / counts.sum()
    entropy = -(share[share > 0] * np.log(share[share > 0])).sum() / math.log(10)
    return {
        "confident": float((probs.max(1) >= 0.9).mean()),
        "confident_stderr": float(
            np.sqrt((probs.max(1) >= 0.9).mean() * (1 - (probs.max(1) >= 0.9).mean()) / len(probs))
        ),
        "classes": int((counts > 0).sum()),
        "entropy": float(entropy),
        "histogram": counts.tolist(),
    }


def command_line(argv: list[str]) -> str:
    """The command that produced the results, as it can be typed again."""
    return shlex.join(["python", "analysis/sample_quality.py", *argv])


def write(args, results: dict, intro: str, header: str, rows: list[str]) -> None:
    """``sample_quality.json`` (every number) and ``sample_quality.md`` (the table, after the command line that
    made it) in ``--out``."""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sample_quality.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "sample_quality.md").write_text(
        f"# Sample quality of {args.checkpoint}\n\n`{command_line(args.argv)}`: {intro}\n\n"
        + header
        + "\n".join(rows)
        + "\n"
    )
    print(f"wrote {args.out / 'sample_quality.md'}")


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> float:
    """The unbiased squared maximum mean discrepancy between samples x and y, Gaussian kernel (Gretton et al.
    2012, eq. 3)."""
    k = lambda a, b: torch.exp(-torch.cdist(a, b).pow(2) / (2 * bandwidth**2))  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    n, m = len(x), len(y)
    return float(
        (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        - 2 * kxy.mean()
    )


def two_sample(model, data, args) -> int:
    """2-D data: MMD^2 between each sampler's samples and held-out test points, beside that of two disjoint sets
    of test points (what a perfect sampler would score), with the spread over 5 seeds as the error."""
    model, test = model.double(), data.test.double()
    reference = test[: args.num]
    bandwidth = float(torch.cdist(reference, reference).kthvalue(11, dim=1).values.median())  # local scale
    baseline = [mmd2(test[args.num * (i + 1) : args.num * (i + 2)], reference, bandwidth) for i in range(5)]
    rows = [f"| held-out test points | - | {np.mean(baseline):.2e} +- {np.std(baseline) / math.sqrt(5):.1e} | - |"]
    results = {"bandwidth": bandwidth, "held-out": baseline}
    for name in args.samplers:
        sampler = getattr(samplers, name)
        for K in args.steps:
            began = time.time()
            values = [
                mmd2(
                    sampler(model, args.num, steps=K, generator=torch.Generator().manual_seed(s)),
                    reference,
                    bandwidth,
                )
                for s in range(5)
            ]
            results[f"{name}, K = {K}"] = values
            rows.append(
                f"| {name} | {K} | {np.mean(values):.2e} +- {np.std(values) / math.sqrt(5):.1e} | {time.time() - began:.1f} |"
            )
            print(rows[-1], flush=True)
    intro = (
        f"unbiased MMD^2 (Gaussian kernel, bandwidth {bandwidth:.3f}: the median distance to the 10th nearest test "
        f"point) between {args.num} samples and {args.num} held-out test points, mean over 5 seeds (DDIM with eta = 0)."
    )
    write(args, results, intro, "| sampler | K | MMD^2 | seconds |\n| --- | ---: | ---: | ---: |\n", rows)
    return 0


def run(args: argparse.Namespace) -> int:
    from sklearn.linear_model import LogisticRegression

    args.out = args.out or args.checkpoint.parent / "sample-quality"
    if (args.out / "sample_quality.md").exists() and not args.overwrite:
        raise FileExistsError(f"{args.out / 'sample_quality.md'} exists: choose another --out or pass --overwrite")
    if args.num < 2:
        raise ValueError(f"--num must be at least 2, got {args.num}")
    built, model = load_trained(args.checkpoint)
    for K in args.steps:  # every K is checked before anything is computed
        model.respaced(K)
    data = built.data
    if data.train_labels is None:
        if data.train.dim() != 2:
            raise ValueError(f"{data.name} has no labels and is not 2-D: no quality number for it")
        return two_sample(model, data, args)
    classifier = LogisticRegression(max_iter=2000).fit(
        data.train.reshape(len(data.train), -1).numpy(), data.train_labels.numpy()
    )
    accuracy = classifier.score(data.test.reshape(len(data.test), -1).numpy(), data.test_labels.numpy())
    results = {"classifier_test_accuracy": accuracy, "real test digits": scores(classifier, data.test)}
    rows = [
        f"| real test digits | - | {results['real test digits']['confident']:.3f} "
        f"+- {results['real test digits']['confident_stderr']:.3f} | "
        f"{results['real test digits']['classes']} | {results['real test digits']['entropy']:.3f} | - |"
    ]
    for name in args.samplers:
        sampler = getattr(samplers, name)
        for K in args.steps:
            began = time.time()
            x = sampler(model, args.num, steps=K, generator=torch.Generator().manual_seed(0))
            r = scores(classifier, x)
            r["seconds"] = time.time() - began
            results[f"{name}, K = {K}"] = r
            rows.append(
                f"| {name} | {K} | {r['confident']:.3f} +- {r['confident_stderr']:.3f} | {r['classes']} | "
                f"{r['entropy']:.3f} | {r['seconds']:.1f} |"
            )
            print(rows[-1], flush=True)
    intro = (
        f"a logistic regression on the training digits (test accuracy {accuracy:.3f}) classifies {args.num} samples "
        "per row (DDIM with eta = 0)."
    )
    header = (
        "| sampler | K | confident (p >= 0.9) | classes covered | histogram entropy / log 10 | seconds |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: |\n"
    )
    write(args, results, intro, header, rows)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    return run_refusing(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
