"""The ``pyrodiff`` command: ``train`` a specification, ``sample`` a checkpoint, ``report`` its bound.

Every error (a bad specification, checkpoint or argument, a result that would be overwritten) is printed
as one line, ``pyrodiff: error: ...``, with exit status 2; Ctrl-C exits with status 130 after one line (a
training saves a checkpoint first).  The arguments are read before torch and Pyro are imported, so an
argument error and ``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

from . import __version__, checks

DEFAULT_SPEC = "digits"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, as the command's other errors are."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"pyrodiff: error: {message} (see {self.prog} --help)\n")


#: The largest count (samples, examples, steps) an argument may give: torch sizes beyond it fail inside torch with
#: an unexplained error (a count of 10^19 does not even fit its integers).
MAX_COUNT = 2**31 - 1
#: The largest seed: torch's generators take a 64-bit seed.
MAX_SEED = 2**63 - 1


def _integer(minimum: int, maximum: int = MAX_COUNT):
    """An argument type: an integer in ``minimum..maximum`` (:func:`pyrodiff.checks.integer`, then
    :func:`pyrodiff.checks.int_in`), the text shown as typed."""

    def parse(text: str) -> int:
        try:
            value: object = int(text)
        except ValueError:
            value = text  # not an integer: the check refuses it
        try:
            checks.integer("argument", value, minimum)  # argparse names the option
            return checks.int_in("argument", value, minimum, maximum)
        except checks.CheckError as e:
            raise argparse.ArgumentTypeError(f"must be {e.expected}, got {text!r}") from None

    return parse


def _train(args: argparse.Namespace) -> int:
    from .training.loop import TrainingInterrupted, train
    from .training.spec import load_spec

    if args.change_hyperparameters and not args.resume:
        raise ValueError("--change-hyperparameters applies to a resume: pass --resume too")
    spec = load_spec(args.config)
    if args.no_graph:
        spec = spec.with_changes({"training": {"graph": False}})
    out = Path(args.out or Path("runs") / spec.name)
    try:
        result = train(
            spec,
            out,
            steps=args.steps,
            device=args.device,
            seed=args.seed,
            resume=args.resume,
            data_root=args.data_root,
            change_hyperparameters=args.change_hyperparameters,
        )
    except TrainingInterrupted as e:
        resume = _resume_command(args, out)
        if e.checkpoint is not None:
            print(
                f"pyrodiff: interrupted: step {e.step} saved to {e.checkpoint}; continue with: {resume}",
                file=sys.stderr,
            )
        else:
            print(f"pyrodiff: {e}; continue with: {resume}", file=sys.stderr)
        return 130
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


def _resume_command(args: argparse.Namespace, out: Path) -> str:
    """The command that continues an interrupted ``train``: its own options that shape the run (the
    specification, ``--steps``, ``--seed``, the device, the data) and ``--resume``, quoted for a POSIX shell."""
    words = ["pyrodiff", "train", "--config", args.config, "--out", str(out)]
    for option in ("steps", "seed", "data_root"):
        if getattr(args, option) is not None:
            words += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    if args.device != "cpu":
        words += ["--device", args.device]
    if args.no_graph:
        words.append("--no-graph")
    return shlex.join([*words, "--resume"])


def _sample(args: argparse.Namespace) -> int:
    if args.eta is not None and args.sampler != "ddim":
        raise ValueError("--eta is DDIM's: give --sampler ddim (the ancestral sampler has no eta)")
    import torch

    from . import samplers
    from .evaluation.plots import save_samples_figure
    from .training.trained import load_trained

    out = Path(args.out or Path(args.checkpoint).with_name(f"samples-seed{args.seed}.png"))
    if out.exists() and not out.is_file():
        raise FileExistsError(f"{out} is not a regular file: it is never replaced; choose another --out")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists: choose another --out or pass --overwrite")
    torch.manual_seed(args.seed)
    built, model = load_trained(args.checkpoint, args.device, args.data_root)
    sampler = samplers.ddim if args.sampler == "ddim" else samplers.ancestral
    options = {"eta": args.eta or 0.0} if args.sampler == "ddim" else {}
    samples = sampler(
        model,
        args.num,
        steps=args.steps,
        last=args.last,
        clip=args.clip,
        progress=True,
        graph=args.device == "cuda" and not args.no_graph,  # one CUDA graph replayed per step
        **options,
    )
    bad = int((~torch.isfinite(samples.flatten(1))).any(1).sum())
    if bad:
        raise ArithmeticError(
            f"{bad} of the {len(samples)} samples are not finite (NaN or infinite): the weights in {args.checkpoint} "
            f"do not give a usable model; no picture was written"
        )
    save_samples_figure(samples, out, data=built.data.test, title=f"{built.spec.name}: {args.num} samples")
    print(f"samples: {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .training.trained import report_checkpoint

    summary, out = report_checkpoint(
        args.checkpoint,
        args.out,
        args.split,
        args.num_samples,
        args.draws,
        args.max_examples,
        args.device,
        args.data_root,
        overwrite=args.overwrite,
        progress=True,
        steps=args.steps,
        variance=args.variance,
        eta=args.eta,
    )
    print((out / "summary.md").read_text())
    print(f"report: {out} (bound.json, terms.csv, summary.md, terms.png, cumulative_rate.png, rate_distortion.png)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyrodiff", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model specification (default: bundled digits)")
    t.add_argument(
        "--config",
        default=DEFAULT_SPEC,
        help=f"model specification: a TOML file, or the name of a bundled one in models/ (default {DEFAULT_SPEC})",
    )
    t.add_argument("--steps", type=_integer(1), help="training steps (overrides the specification)")
    t.add_argument("--out", help="output folder (default runs/NAME)")
    t.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    t.add_argument("--no-graph", action="store_true", help="on CUDA, run the step eagerly instead of as one CUDA graph")
    t.add_argument("--seed", type=_integer(0, MAX_SEED), help="random seed (overrides the specification)")
    t.add_argument("--resume", action="store_true", help="continue the checkpoint in --out exactly")
    t.add_argument(
        "--change-hyperparameters",
        action="store_true",
        help="with --resume: accept a specification whose lr, weight_decay, warmup_steps, grad_clip or ema_decay "
        "differ from the checkpoint's (they take effect from the next step)",
    )
    t.add_argument("--data-root", help="folder of local dataset files (MNIST, CIFAR-10)")
    t.set_defaults(run=_train)
    s = sub.add_parser("sample", help="draw samples from a checkpoint (ancestral or DDIM) into a PNG")
    s.add_argument("checkpoint")
    s.add_argument("--num", type=_integer(1), default=64, help="number of samples (default 64)")
    s.add_argument("--out", help="PNG file (default: samples-seedS.png beside the checkpoint)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    s.add_argument("--seed", type=_integer(0, MAX_SEED), default=0)
    s.add_argument("--sampler", default="ancestral", choices=["ancestral", "ddim"])
    s.add_argument("--no-graph", action="store_true", help="on CUDA, run each step eagerly instead of as a CUDA graph")
    s.add_argument("--steps", type=_integer(2), help="sample with K evenly spaced steps (default: all T)")
    s.add_argument("--eta", type=float, help="with --sampler ddim: DDIM's eta in [0, 1] (default 0: deterministic)")
    s.add_argument("--last", default="mean", choices=["mean", "sample"], help="last step: the decoder's mean or a draw")
    s.add_argument("--clip", action="store_true", help="clamp each predicted x_0 to [-1, 1] (not the scored model)")
    s.add_argument("--data-root")
    s.set_defaults(run=_sample)
    r = sub.add_parser("report", help="decompose the bound into its T + 1 terms: JSON, CSV, Markdown and plots")
    r.add_argument("checkpoint")
    r.add_argument("--split", default="test", choices=["test", "train"])
    r.add_argument(
        "--num-samples", type=_integer(1), default=1, help="independent draws of the noisy inputs (default 1)"
    )
    r.add_argument("--draws", default="independent", choices=["independent", "trajectory"])
    r.add_argument("--max-examples", type=_integer(1), help="use only the first N examples of the split")
    r.add_argument("--steps", type=_integer(2), help="the bound of the respaced K-step chain (default: all T)")
    r.add_argument(
        "--variance",
        choices=["small", "large", "analytic"],
        help="replace the model's reverse variance (analytic: Analytic-DPM's, fitted to the trained mean)",
    )
    r.add_argument(
        "--eta",
        type=float,
        help="the bound of DDIM's generative process with this eta in (0, 1] (eta = 0 has no bound: refused)",
    )
    r.add_argument("--out", help="report folder (default: report-SPLIT beside the checkpoint)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing report in the folder")
    r.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    r.add_argument("--data-root")
    r.set_defaults(run=_report)
    return parser


def _one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


@contextlib.contextmanager
def _exit_on_interrupt():
    """While torch and Pyro load (seconds), Ctrl-C ends the process at once, with one line and status 130:
    nothing has been written yet, and a ``KeyboardInterrupt`` raised inside a half-finished import would
    leave the modules half-initialised for whatever runs next (torch's interpreter-exit hooks included)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame) -> None:
        sys.stderr.write("pyrodiff: interrupted while starting; nothing was written\n")
        sys.stderr.flush()
        os._exit(130)

    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv: list[str] | None = None) -> int:
    """Run the command; the exit status (argument errors exit with status 2 from the parser)."""
    args = build_parser().parse_args(argv)
    try:
        with _exit_on_interrupt():
            from .training.loop import check_device  # imports torch, Pyro and the package's modules

            if args.command == "train":  # AdamW imports it when first built, where an interrupt is lost
                import torch._dynamo  # noqa: F401

        check_device(args.device)
        return args.run(args)
    except (ValueError, OSError, RuntimeError, ArithmeticError) as e:  # CheckpointError is a RuntimeError
        print(f"pyrodiff: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyrodiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
