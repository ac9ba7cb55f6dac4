"""A trained model from a checkpoint: the specification's objects with the EMA weights, and its bound report.

Reading a checkpoint comes before everything that uses a trained model (the report, sampling, the
analysis scripts) and after the specification and the checkpoint format it rests on.  :func:`report_checkpoint`
joins the two stages: it reads a checkpoint here and scores it with the evaluation stage's
:func:`~pyrodiff.evaluation.bound.bound_terms` and :func:`~pyrodiff.evaluation.report.write_report`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .. import checks
from ..chain.analytic import analytic_variance
from ..chain.continuous import ContinuousDiffusionModel
from ..chain.forward import ETA_ZERO_HAS_NO_BOUND, InferenceFamily
from ..chain.log_snr import LogSNRSchedule
from ..chain.reverse import DiffusionModel
from ..chain.schedule import NoiseSchedule, Schedule
from ..evaluation.bound import bound_terms
from ..evaluation.continuous import continuous_bound
from ..evaluation.plots import save_schedule_figure
from ..evaluation.report import REPORT_FILES, write_report
from .checkpoint import CheckpointError, load_checkpoint
from .spec import Built, Spec, build

__all__ = ["load_trained", "report_checkpoint"]

#: draws per example of a continuous-time model's own bound in its report (at least; stratified times)
CONTINUOUS_DRAWS = 100


def load_trained(
    checkpoint_path: str | Path, device: str = "cpu", data_root: str | Path | None = None
) -> tuple[Built, DiffusionModel]:
    """The specification's objects and the EMA-weighted model of a checkpoint, in evaluation mode.  The
    checkpoint's specification is validated as a file's is (:meth:`~pyrodiff.training.spec.Spec.from_dict`).
    The network's initial weights, replaced by the checkpoint's, are drawn without changing torch's global random
    state (the specification's objects are built on the CPU).
    A schedule with parameters gets their EMA, loaded into ``built.schedule`` itself, which the model and
    ``built.guide`` share, and is validated (:meth:`~pyrodiff.chain.schedule.Schedule.check`)."""
    built, model, _ = _load_trained(checkpoint_path, device, data_root)
    return built, model


def _load_trained(
    checkpoint_path: str | Path, device: str, data_root: str | Path | None
) -> tuple[Built, DiffusionModel, int]:
    """:func:`load_trained`'s objects and model, and the training step the checkpoint was saved at."""
    state = load_checkpoint(checkpoint_path, map_location=device)
    spec = Spec.of_checkpoint(state, checkpoint_path)
    with torch.random.fork_rng(devices=[]):
        built = build(spec, data_root)
    decay = get_ema_multi_avg_fn(spec.training.ema_decay)
    ema = AveragedModel(built.model.network, multi_avg_fn=decay, use_buffers=True)
    try:
        ema.load_state_dict(state["ema"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {checkpoint_path} does not fit its specification's network: {e}") from e
    if built.schedule.has_parameters:
        _load_schedule_average(built.schedule, state, checkpoint_path)
    return built, built.model.with_network(ema.module).to(device).eval(), int(state["step"])


def _load_schedule_average(schedule: Schedule, state: dict, path: str | Path) -> None:
    """Load the EMA of the schedule's parameters (the ``module.*`` entries of ``state["schedule_ema"]``) into
    ``schedule`` and validate it."""
    if "schedule_ema" not in state:
        raise CheckpointError(
            f"checkpoint {path} holds no schedule parameters, but its specification's schedule has some"
        )
    averaged = {k.removeprefix("module."): v for k, v in state["schedule_ema"].items() if k.startswith("module.")}
    try:
        schedule.load_state_dict(averaged)
        schedule.check()
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: its schedule does not load: {e}") from None


def report_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path | None = None,
    split: str = "test",
    num_samples: int = 1,
    draws: str = "independent",
    max_examples: int | None = None,
    device: str = "cpu",
    data_root: str | Path | None = None,
    chunk_size: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
    steps: int | None = None,
    variance: str | None = None,
    analytic_examples: int = 200,
    eta: float | None = None,
    seed: int = 0,
) -> tuple[dict, Path]:
    r"""Decompose the bound of a checkpoint's EMA model on a data split and write the report
    (default folder: ``report-SPLIT`` beside the checkpoint).  With ``steps`` = K, the bound of the respaced
    K-step chain (:meth:`~pyrodiff.chain.reverse.DiffusionModel.respaced`).  ``variance`` replaces the model's reverse variance:
    ``"small"`` or ``"large"``, or ``"analytic"`` for Analytic-DPM's optimal variances for the trained mean
    (:func:`~pyrodiff.chain.analytic.analytic_variance`, estimated on the first ``analytic_examples`` training examples).
    ``eta`` in (0, 1] scores DDIM's generative process with that eta (:meth:`~pyrodiff.chain.reverse.DiffusionModel.ddim`)
    against its inference family :math:`q_\sigma`; eta = 0 has no bound and is refused.
    The draws (of the analytic variances' and of the bound's noisy inputs) come from a generator seeded with ``seed``
    on ``device``: the same report for the same seed, and torch's global random state untouched.
    Returns the summary and the folder."""
    checks.one_of("split", split, ("test", "train"))
    checks.positive_int("num_samples", num_samples)
    if max_examples is not None:
        checks.positive_int("max_examples", max_examples)
    checks.integer("seed", seed, 0)
    if eta is not None:
        if variance is not None:
            raise ValueError("DDIM's variances are set by eta: give variance or eta, not both")
        if not InferenceFamily(eta).has_density:
            raise ValueError(ETA_ZERO_HAS_NO_BOUND)
    out = Path(out_dir) if out_dir else Path(checkpoint).parent / f"report-{split}"
    if not overwrite and out.is_dir() and any((out / f).exists() for f in REPORT_FILES):
        raise FileExistsError(f"{out} already holds a report: choose another folder or pass --overwrite")
    built, model, training_steps = _load_trained(checkpoint, device, data_root)
    data = getattr(built.data, split)[:max_examples]
    generator = torch.Generator(device=device)
    continuous = None
    if isinstance(model, ContinuousDiffusionModel):  # its own bound, then its chain at T (or K) steps
        generator.manual_seed(seed)
        draws_per_example = max(num_samples, CONTINUOUS_DRAWS)
        continuous = continuous_bound(model, data.to(device), draws_per_example, generator=generator).summary()
        model = model.discretised()
    if variance is not None:
        checks.one_of("variance", variance, ("small", "large", "analytic"))
        fixed = "small" if variance == "analytic" else variance
        model = model.with_variance(fixed)
    if steps is not None:
        model = model.respaced(steps)
    if eta is not None:
        model = model.ddim(eta)
    if variance == "analytic":
        generator.manual_seed(seed)
        model = analytic_variance(model, built.data.train[:analytic_examples].to(device), generator=generator)
    if tuple(data.shape[1:]) != model.data_shape:
        raise ValueError(
            f"checkpoint's data shape {model.data_shape} does not match the {split} data {tuple(data.shape[1:])}"
        )
    generator.manual_seed(seed)
    terms = bound_terms(
        model,
        data.to(device),
        num_samples=num_samples,
        draws=draws,
        chunk_size=chunk_size,
        progress=progress,
        generator=generator,
    )
    meta = {
        "name": built.spec.name,
        "checkpoint": str(checkpoint),
        "split": split,
        "training_steps": training_steps,
        "objective": built.spec.training.objective,
        "draws": draws,
        "respaced_steps": steps,
        "variance": variance,
        "eta": eta,
        "seed": seed,
        "continuous_bound": continuous,
    }
    schedule = built.schedule
    curve = None
    if isinstance(schedule, LogSNRSchedule):
        with torch.no_grad():
            times = torch.linspace(0, 1, 101, dtype=torch.float64)
            gamma = schedule.gamma(times).cpu()
        meta["schedule_curve"] = curve = {"t": times.tolist(), "gamma": gamma.tolist()}
    log_q = built.data.log_density(data) if built.data.log_density else None
    summary = write_report(terms, out, meta, log_q, overwrite=overwrite)
    if curve is not None:
        save_schedule_figure(
            times,
            {"learned" if schedule.has_parameters else "this": -gamma, **_fixed_log_snrs(times)},
            out / "schedule.png",
            title=f"{built.spec.name}: the noise schedule",
        )
    return summary, out


def _fixed_log_snrs(times: torch.Tensor) -> dict[str, torch.Tensor]:
    """DDPM's fixed schedules at T = 1000 (linear, cosine) as log-SNRs at ``times``, their step k at
    t = (k - 1)/(T - 1) as a :class:`~pyrodiff.chain.log_snr.LogSNRSchedule`'s discretisation places it (linear
    interpolation between steps)."""
    curves = {}
    for name, schedule in (("linear (DDPM)", NoiseSchedule.linear(1000)), ("cosine", NoiseSchedule.cosine(1000))):
        log_snr = schedule.log_snr.cpu().numpy()
        grid = np.linspace(0, 1, len(log_snr))
        curves[name] = torch.from_numpy(np.interp(times.numpy(), grid, log_snr))
    return curves
