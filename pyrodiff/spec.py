"""Model specifications: the TOML files in ``models/`` that say what to train and how.

A specification has the tables ``[data]``, ``[schedule]``, ``[model]``, ``[network]`` and
``[training]`` (see ``models/digits.toml`` for every key).  :func:`build` turns one into the data,
the model and the guide; the specification is saved in every checkpoint, so a checkpoint is
self-describing.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .data import Dataset, load_dataset
from .forward import DiffusionGuide
from .networks import MLPDenoiser, UNet
from .reverse import DiffusionModel
from .schedule import NoiseSchedule

__all__ = ["load_spec", "build", "Built", "DEFAULT_TRAINING"]

DEFAULT_TRAINING = {
    "steps": 2000,
    "batch_size": 128,
    "micro_batches": 1,
    "lr": 2e-4,
    "weight_decay": 0.0,
    "warmup_steps": 100,
    "grad_clip": 1.0,
    "ema_decay": 0.999,
    "estimator": "mean_field",
    "objective": "elbo",
    "subsample_steps": 1,
    "timestep_sampler": "uniform",
    "amp": False,
    "compile": False,
    "checkpoint_every": 500,
    "eval_examples": 2000,
    "seed": 0,
}
_SECTIONS = ("data", "schedule", "model", "network", "training")


def load_spec(path: str | Path) -> dict:
    """Read and check a specification file; fill training defaults."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model specification at {path}")
    with open(path, "rb") as f:
        try:
            spec = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path} is not valid TOML: {e}") from e
    spec.setdefault("name", path.stem)
    return normalise(spec)


def normalise(spec: dict) -> dict:
    spec = copy.deepcopy(spec)
    missing = [s for s in _SECTIONS[:4] if s not in spec]
    if missing:
        raise ValueError(f"specification {spec.get('name', '?')!r} lacks the table(s) {missing}")
    unknown = set(spec.get("training", {})) - set(DEFAULT_TRAINING)
    if unknown:
        raise ValueError(f"unknown [training] keys {sorted(unknown)}; known: {sorted(DEFAULT_TRAINING)}")
    spec["training"] = {**DEFAULT_TRAINING, **spec.get("training", {})}
    return spec


def build_schedule(spec: dict) -> NoiseSchedule:
    s = dict(spec["schedule"])
    kind = s.pop("kind", "linear")
    if kind == "betas":
        return NoiseSchedule.from_betas(s["betas"])
    if kind not in ("linear", "cosine", "sigmoid"):
        raise ValueError(f"unknown schedule kind {kind!r}: linear, cosine, sigmoid or betas")
    return getattr(NoiseSchedule, kind)(**s)


def build_network(spec: dict, data: Dataset):
    n = dict(spec["network"])
    kind = n.pop("kind", "unet")
    channels = data.data_shape[0]
    out = 2 * channels if spec["model"].get("variance") == "learned" else channels  # prediction, then v
    if kind == "unet":
        n = {k: tuple(v) if isinstance(v, list) else v for k, v in n.items()}
        return UNet(in_channels=channels, out_channels=out, **n)
    if kind == "mlp":
        return MLPDenoiser(dim=channels, out_dim=out, **n)
    raise ValueError(f"unknown network kind {kind!r}: unet or mlp")


@dataclass
class Built:
    spec: dict
    data: Dataset
    schedule: NoiseSchedule
    model: DiffusionModel
    guide: DiffusionGuide


def build(spec: dict, data_root: str | Path | None = None) -> Built:
    """The data, schedule, model and guide a specification describes."""
    data = load_dataset(spec["data"]["name"], data_root or spec["data"].get("root"))
    schedule = build_schedule(spec)
    m = dict(spec["model"])
    if m.get("decoder") == "discretized":
        if data.levels is None:
            raise ValueError(f"the discretized decoder needs integer-valued data; {data.name!r} is continuous")
        m.setdefault("levels", data.levels)
    model = DiffusionModel(build_network(spec, data), schedule, data_shape=data.data_shape, **m)
    return Built(spec, data, schedule, model, DiffusionGuide(schedule, order="posterior"))
