"""The per-timestep bound of a diffusion model trained elsewhere (diffusers, improved-diffusion,
denoising-diffusion-pytorch), written as pyrodiff's bound report.

    # a diffusers pipeline or model folder (save_pretrained), on 8-bit CIFAR-10 test images
    python analysis/external_bound.py --diffusers path/to/ddpm-cifar10-32 --dataset cifar10 \\
        --data-root data/cifar-10-batches-py --max-examples 100 --out reports/ddpm-cifar10

    # any network class and a state dict, with the scheduler's settings given here
    python analysis/external_bound.py --network mypkg.models:Unet --kwargs '{"dim": 64}' \\
        --state-dict model-100.pt --state-key model --prefix model. \\
        --beta-schedule linear --num-train-timesteps 1000 --prediction-type epsilon \\
        --data images.npy --levels 256 --out reports/mine

The network is called with 0-indexed timesteps (``pyrodiff.adapters``: the conventions, and how the scheduler's
``prediction_type``, ``variance_type`` and betas are read).  Data: a bundled or local dataset of
``pyrodiff.data`` (``--dataset``), or a ``.npy`` / ``.pt`` tensor of shape ``(N, C, H, W)`` (``--data``, read
without running code from it): integers are levels ``0..L-1`` and scaled to ``2 v / (L - 1) - 1``
(``--levels`` is required with them: 256 for 8-bit images, 17 for 0..16), floats must already lie in [-1, 1].  With levels the decoder is pyrodiff's
discretized one, and with ``--levels 256`` bits/dim are on the 8-bit scale of published figures; without, the
continuous Gaussian decoder.  Writes bound.json (with the scheduler's configuration and the sampler-only options
that the bound does not include), terms.csv, rate_distortion.csv, summary.md and the plots
(``pyrodiff.evaluation.report.write_report``).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

PROG = "external_bound"

#: options that set a scheduler configuration key (they replace the key of ``--scheduler``'s file)
SCHEDULER_KEYS = (
    "num_train_timesteps",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "prediction_type",
    "variance_type",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--diffusers", type=Path, help="a diffusers pipeline folder (unet/, scheduler/) or model folder"
    )
    source.add_argument(
        "--network",
        help="the network's class, 'package.module:Class' (with --state-dict): trusted code, imported and built as "
        "given (a name that is not a torch.nn.Module class is refused)",
    )
    p.add_argument("--kwargs", type=json.loads, default={}, help="the class's constructor arguments, a JSON object")
    p.add_argument("--state-dict", type=Path, help=".pt/.pth/.bin (weights only) or .safetensors")
    p.add_argument("--state-key", help="dotted path of the state dict inside the file, e.g. ema")
    p.add_argument("--prefix", help="keep the entries starting with it, without it, e.g. model.")
    p.add_argument("--scheduler", type=Path, help="scheduler_config.json (default: the diffusers folder's)")
    p.add_argument("--num-train-timesteps", type=int)
    p.add_argument("--beta-schedule", help="linear, scaled_linear or squaredcos_cap_v2")
    p.add_argument("--beta-start", type=float)
    p.add_argument("--beta-end", type=float)
    p.add_argument("--prediction-type", help="epsilon, sample or v_prediction")
    p.add_argument("--variance-type", help="fixed_small, fixed_large or learned_range")
    p.add_argument("--variance", choices=["small", "large", "learned"], help="pyrodiff's variance, replacing it")
    p.add_argument("--timestep-scale", type=float, help="pass (t - 1) * scale as floats (improved-diffusion: 1000/T)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--dataset", help="a pyrodiff.data dataset: digits, mnist, cifar10, ...")
    data.add_argument("--data", type=Path, help="a .npy or .pt tensor (N, C, H, W)")
    p.add_argument("--data-root", help="folder of a local dataset's files")
    p.add_argument("--split", choices=["test", "train"], default="test")
    p.add_argument(
        "--levels",
        type=int,
        help="grid levels of the data (the discretized decoder): 256 for 8-bit; needed with integers",
    )
    p.add_argument("--max-examples", type=int)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--draws", default="independent", help="independent or trajectory (checked by bound_terms)")
    p.add_argument("--steps", type=int, help="the bound of the respaced K-step chain")
    p.add_argument("--chunk-size", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar while scoring")
    return p


if __name__ == "__main__":  # refuse bad arguments before torch and Pyro load (seconds)
    build_parser().parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pyrodiff.adapters import (  # noqa: E402
    load_diffusers,
    load_network,
    model_from_diffusers,
    sampler_options,
    schedule_from_config,
    scheduler_config,
)
from pyrodiff.data import levels_to_unit, load_dataset  # noqa: E402
from pyrodiff.evaluation.bound import bound_terms  # noqa: E402
from pyrodiff.evaluation.report import write_report  # noqa: E402
from pyrodiff.refusal import REFUSED, objects_refused, run_refusing  # noqa: E402


def load_data_file(path: Path, levels: int | None) -> tuple[torch.Tensor, int | None]:
    """A ``.npy`` or ``.pt`` tensor (no pickled code) as float32 data in [-1, 1], and its number of levels:
    integers ``0..L-1`` scaled to the grid (L = ``levels``, which integers need), floats as given (refused outside
    [-1, 1]: pyrodiff's decoders and schedules assume data on that scale)."""
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as e:  # numpy's "Object arrays cannot be loaded when allow_pickle=False"
            raise ValueError(f"{path}: {e}") from e
    elif path.suffix == ".pt":
        try:
            tensor = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(objects_refused(path, e)) from e
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path} holds a {type(tensor).__name__}, not a tensor")
        array = tensor.numpy()
    else:
        raise ValueError(f"data files are .npy or .pt, got {path}")
    if array.size == 0:
        raise ValueError(f"{path} holds no data")
    if np.issubdtype(array.dtype, np.integer):
        if levels is None:
            raise ValueError(
                f"{path} holds integers {array.min()}..{array.max()}: give their number of levels, --levels L "
                "(256 for 8-bit images), to put them on the grid in [-1, 1]"
            )
        if array.min() < 0 or array.max() > levels - 1:
            raise ValueError(
                f"integer data must lie in 0..{levels - 1} (--levels {levels}), found {array.min()}..{array.max()}"
            )
        array = levels_to_unit(array, levels)
    elif not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{path} holds {array.dtype} values; data are integers with --levels or floats in [-1, 1]")
    elif not (np.isfinite(array).all() and array.min() >= -1 and array.max() <= 1):
        raise ValueError(
            f"{path} holds floats in {np.nanmin(array):g}..{np.nanmax(array):g}"
            + ("" if np.isfinite(array).all() else " and non-finite values")
            + ": data must lie in [-1, 1] (integers on a grid of L levels: pass them with --levels L)"
        )
    return torch.as_tensor(array, dtype=torch.float32), levels


def check_trained_steps(args: argparse.Namespace) -> None:
    """Refuse a number of steps that contradicts the one the diffusers folder's own scheduler records (before the
    network is loaded): the network was trained on that chain, and scoring it on another is scoring no model."""
    own = args.diffusers / "scheduler" / "scheduler_config.json"
    own = own if own.is_file() else args.diffusers / "scheduler_config.json"
    trained = scheduler_config(own).get("num_train_timesteps") if own.is_file() else None
    given = [("--num-train-timesteps", args.num_train_timesteps)]
    if args.scheduler is not None:
        given.append((str(args.scheduler), scheduler_config(args.scheduler).get("num_train_timesteps")))
    for source, T in given:
        if trained is not None and T is not None and T != trained:
            raise ValueError(
                f"{own} records num_train_timesteps = {trained}, {source} gives {T}: the network was trained on "
                f"{trained} steps (score a shorter chain with --steps K)"
            )


def run(args: argparse.Namespace) -> dict:
    """Load the model and the data, compute every term of the bound and write the report; return its summary."""
    if args.network and args.state_dict is None:
        raise ValueError("--network needs --state-dict")
    if args.network and args.scheduler is None and args.beta_schedule is None:
        raise ValueError("--network needs the schedule: --scheduler FILE or --beta-schedule (and its options)")
    if args.max_examples is not None and args.max_examples < 1:
        raise ValueError(f"--max-examples must be positive, got {args.max_examples}")
    if args.dataset:
        dataset = load_dataset(args.dataset, args.data_root)
        if args.levels is not None and args.levels != dataset.levels:
            raise ValueError(f"{args.dataset} has {dataset.levels} levels, not --levels {args.levels}")
        x0, levels, log_density = getattr(dataset, args.split), dataset.levels, dataset.log_density
    else:
        (x0, levels), log_density = load_data_file(args.data, args.levels), None
    x0 = x0[: args.max_examples]

    if args.diffusers:
        check_trained_steps(args)
        network, config = load_diffusers(args.diffusers, args.scheduler)
    else:
        config = scheduler_config(args.scheduler) if args.scheduler else {}
    config.update({k: getattr(args, k) for k in SCHEDULER_KEYS if getattr(args, k) is not None})
    if args.beta_schedule is not None:  # a schedule given here replaces the file's explicit betas
        config.pop("trained_betas", None)
    if not args.diffusers:  # refused if the state dict records the steps it was trained on and they differ
        T = schedule_from_config(config).num_steps
        network = load_network(args.network, args.state_dict, args.kwargs, args.state_key, args.prefix, T)
    model = model_from_diffusers(
        network,
        config,
        decoder="gaussian" if levels is None else "discretized",
        levels=levels,
        data_shape=tuple(x0.shape[1:]),
        variance=args.variance,
        timestep_scale=args.timestep_scale,
    )
    model = model.to(args.device).eval()
    if args.steps is not None:
        model = model.respaced(args.steps)
    torch.manual_seed(args.seed)
    terms = bound_terms(
        model,
        x0.to(args.device),
        num_samples=args.num_samples,
        draws=args.draws,
        chunk_size=args.chunk_size,
        progress=args.progress,
    )
    meta = {
        "name": str(args.diffusers or args.network),
        "data": args.dataset or str(args.data),
        **({"split": args.split} if args.dataset else {}),
        "draws": args.draws,
        "respaced_steps": args.steps,
        "variance": args.variance,
        "scheduler": config,
        "sampler_options_not_in_bound": sampler_options(config),
    }
    log_q = log_density(x0) if log_density else None
    return write_report(terms, args.out, meta, log_q, overwrite=args.overwrite)


def report(args: argparse.Namespace) -> int:
    summary = run(args)
    scale = "8-bit scale" if summary["bits_per_dim_is_8bit_scale"] else summary["scale"]
    print(
        f"{summary['bits_per_dim']:.4f} +- {summary['bits_per_dim_stderr']:.4f} bits/dim ({scale}); report in {args.out}"
    )
    return 0


#: besides REFUSED: the adapters' own refusals (a missing entry of a state dict, a network that is not a Module or
#: returns no tensor, diffusers not installed) and a network class called with the wrong --kwargs
ADAPTER_REFUSED = (*REFUSED, TypeError, KeyError, ImportError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_refusing(PROG, lambda: report(args), ADAPTER_REFUSED)


if __name__ == "__main__":
    sys.exit(main())
