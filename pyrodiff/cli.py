"""The ``pyrodiff`` command: ``train`` a specification, ``sample`` a checkpoint, ``report`` its bound."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .checkpoint import CheckpointError

DEFAULT_SPEC = "models/digits.toml"


def _train(args: argparse.Namespace) -> int:
    from .spec import load_spec
    from .train import train

    spec = load_spec(args.config)
    out = Path(args.out or Path("runs") / spec["name"])
    result = train(
        spec, out, steps=args.steps, device=args.device, seed=args.seed, resume=args.resume, data_root=args.data_root
    )
    if result is None:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    b = result.test_bound
    print(f"checkpoint: {result.checkpoint}")
    print(f"samples:    {result.samples}")
    print(
        f"test-set negative ELBO: {b['total_nats']:.4f} +- {b['total_stderr']:.4f} nats/example "
        f"= {b['bits_per_dim']:.4f} +- {b['bits_per_dim_stderr']:.4f} bits/dim ({b['num_examples']} examples, all T + 1 terms)"
    )
    if "kl_bound_nats" in b:
        print(
            f"bound on KL(data || model) = negative ELBO - data entropy, paired per example: "
            f"{b['kl_bound_nats']:.4f} +- {b['kl_bound_stderr']:.4f} nats"
        )
    return 0


def _sample(args: argparse.Namespace) -> int:
    from .plots import save_samples_figure
    from .trained import load_trained

    torch.manual_seed(args.seed)
    built, model = load_trained(args.checkpoint, args.device, args.data_root)
    samples = model.sample(args.num)
    out = Path(args.out or Path(args.checkpoint).with_name("samples.png"))
    save_samples_figure(samples, out, data=built.data.test, title=f"{built.spec['name']}: {args.num} samples")
    print(f"samples: {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import report_checkpoint

    summary, out = report_checkpoint(
        args.checkpoint,
        args.out,
        args.split,
        args.num_samples,
        args.draws,
        args.max_examples,
        args.device,
        args.data_root,
    )
    print((out / "summary.md").read_text())
    print(f"report: {out} (bound.json, terms.csv, summary.md, terms.png, cumulative_rate.png, rate_distortion.png)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyrodiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model specification (default: bundled digits)")
    t.add_argument("--config", default=DEFAULT_SPEC, help=f"model specification (default {DEFAULT_SPEC})")
    t.add_argument("--steps", type=int, help="training steps (overrides the specification)")
    t.add_argument("--out", help="output folder (default runs/NAME)")
    t.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    t.add_argument("--seed", type=int, help="random seed (overrides the specification)")
    t.add_argument("--resume", action="store_true", help="continue the checkpoint in --out exactly")
    t.add_argument("--data-root", help="folder of local dataset files (MNIST, CIFAR-10)")
    t.set_defaults(run=_train)
    s = sub.add_parser("sample", help="draw samples from a checkpoint (ancestral sampling) into a PNG")
    s.add_argument("checkpoint")
    s.add_argument("--num", type=int, default=64)
    s.add_argument("--out", help="PNG file (default: samples.png beside the checkpoint)")
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--data-root")
    s.set_defaults(run=_sample)
    r = sub.add_parser("report", help="decompose the bound into its T + 1 terms: JSON, CSV, Markdown and plots")
    r.add_argument("checkpoint")
    r.add_argument("--split", default="test", choices=["test", "train"])
    r.add_argument("--num-samples", type=int, default=1, help="independent draws of the noisy inputs (default 1)")
    r.add_argument("--draws", default="independent", choices=["independent", "trajectory"])
    r.add_argument("--max-examples", type=int, help="use only the first N examples of the split")
    r.add_argument("--out", help="report folder (default: report-SPLIT beside the checkpoint)")
    r.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    r.add_argument("--data-root")
    r.set_defaults(run=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, CheckpointError, FileNotFoundError, RuntimeError, ArithmeticError) as e:
        print(f"pyrodiff: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
