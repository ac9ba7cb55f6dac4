"""Model specifications: the TOML files in ``models/`` that say what to train and how.

A specification has the tables ``[data]``, ``[schedule]``, ``[model]``, ``[network]`` and
``[training]`` (see ``models/digits.toml`` for every key) and an optional ``name`` (default: the file's
stem), which names the default output folder ``runs/NAME``.  :func:`load_spec` reads a file into a
:class:`Spec`, a frozen object with one frozen table per section, and validates every table and key
there and only there, types included, so that a mistake fails at once with one line naming the file,
the ``table.key`` and the allowed values, never deep inside training or after a resume.  Schedule keys
are checked against the chosen schedule's constructor and network keys against the chosen network's.

The specification is saved in every checkpoint as plain data (:meth:`Spec.to_dict`, which fills every
default, so a checkpoint is self-describing) and read back with the same validation
(:meth:`Spec.from_dict`).  :func:`build` turns a specification into the data, the model and the guide.
"""

from __future__ import annotations

import difflib
import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from torch import nn

from .. import checks
from ..chain.continuous import INTERIOR_OBJECTIVES, ContinuousDiffusionModel, ContinuousGuide
from ..chain.decoders import parse_decoder
from ..chain.forward import DiffusionGuide
from ..chain.log_snr import LearnedSchedule, LinearLogSNR, LogSNRSchedule, NoiseLevelInput
from ..chain.objectives import ESTIMATORS, parse_objective
from ..chain.parameterization import parse_target, parse_variance
from ..chain.reverse import DiffusionModel
from ..chain.schedule import MAX_NUM_STEPS, NoiseSchedule, Schedule
from ..chain.timesteps import check_subsample_steps
from ..data import DATASETS, Dataset, load_dataset
from ..networks import MLPDenoiser, UNet

__all__ = ["load_spec", "Spec", "SpecError", "Built"]

#: How training draws timesteps: uniformly, or by Nichol & Dhariwal's importance sampler.
TIMESTEP_SAMPLERS = ("uniform", "importance")
#: ``amp``: full precision, or bf16 autocast around the network.
AMP = (False, "bf16")
#: The schedule kinds and their constructors (whose keyword arguments are the table's other keys): the fixed
#: tables, and the schedules in continuous time (:mod:`pyrodiff.chain.log_snr`), VDM's linear log-SNR and the learned
#: one, whose networks are told the noise level (:class:`~pyrodiff.chain.log_snr.NoiseLevelInput`).
SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "linear": NoiseSchedule.linear,
    "cosine": NoiseSchedule.cosine,
    "sigmoid": NoiseSchedule.sigmoid,
    "betas": NoiseSchedule.from_betas,
    "linear_log_snr": LinearLogSNR,
    "learned": LearnedSchedule,
}
#: ``model.time``: the chain of T steps, or the continuous-time bound (a ``linear_log_snr`` or ``learned`` schedule)
TIMES = ("discrete", "continuous")
#: The network kinds, their constructors, and the constructor arguments set from the data, not the table.
NETWORKS: dict[str, tuple[type[nn.Module], tuple[str, str]]] = {
    "unet": (UNet, ("in_channels", "out_channels")),
    "mlp": (MLPDenoiser, ("dim", "out_dim")),
}
TABLES = ("data", "schedule", "model", "network", "training")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_REQUIRED = object()


class SpecError(ValueError):
    """A specification that cannot be used; the message names its source, the ``table.key`` and what is allowed."""


# ---------------------------------------------------------------------- reading values
def _show(value: Any) -> str:
    """``value`` as TOML writes it (``false``, ``"bf16"``, ``[1, 2]``)."""
    return json.dumps(_plain(value), default=repr)


def _describe(value: Any) -> str:
    """``value`` as TOML writes it, with its type as the file has it (a list read into a tuple is a list)."""
    return f"{_show(value)} ({type(_plain(value)).__name__})"


def _integer(minimum: int) -> Callable[[str, Any], int]:
    return partial(checks.integer, minimum=minimum)


def _choice(options: tuple | Mapping) -> Callable[[str, Any], Any]:
    """One of ``options`` (a mapping's keys), compared with its type: TOML's false must not pass for 0."""
    return partial(checks.one_of, options=tuple(options), show=_show)


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise checks.CheckTypeError.refuse(name, "true or false", value)
    return value


def _string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise checks.CheckTypeError.refuse(name, "a string", value)
    return value


def _sequence(item: Callable[[str, Any], Any], what: str) -> Callable[[str, Any], tuple]:
    """A list whose entries pass ``item``; the message says what each entry must be."""

    def check(name: str, value: Any) -> tuple:
        if not isinstance(value, list | tuple):
            raise checks.CheckTypeError.refuse(name, f"a list of {what}", value)
        try:
            return tuple(item(name, v) for v in value)
        except checks.CheckError as e:
            raise checks.CheckError.refuse(name, f"a list of {what}, each {e.expected}", value) from None

    return check


def _parsed_by(parse: Callable[[Any], Any]) -> Callable[[str, Any], Any]:
    """A check that runs one of the library's own parsers (whose message names the allowed values)."""

    def check(name: str, value: Any) -> Any:
        parse(value)
        return value

    return check


def _from_annotation(hint: Any) -> Callable[[Any], Any] | None:
    """The check of a constructor argument annotated ``hint``; None for a type a TOML value cannot have."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        found = [c for c in map(_from_annotation, typing.get_args(hint)) if c is not None]
        return found[0] if found else None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (tuple, list) and args and args[0] in (int, float):
        return _sequence(_from_annotation(args[0]), "integers" if args[0] is int else "numbers")
    return {int: _integer(0), float: checks.number, bool: _boolean, str: _string}.get(hint)


def _constructor_checks(fn: Callable, exclude: tuple[str, ...] = ()) -> dict[str, tuple[Callable, Any]]:
    """The keyword arguments of ``fn`` other than ``exclude``: their checks and defaults (``_REQUIRED`` if none)."""
    hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        if name in ("self", "cls", *exclude):
            continue
        check = _from_annotation(hints[name])
        if check is not None:
            out[name] = (check, _REQUIRED if p.default is inspect.Parameter.empty else p.default)
    return out


class _Table:
    """One table of a specification being read: every error names the source and the ``table.key``."""

    def __init__(self, source: str, name: str, values: Any) -> None:
        self.source, self.name = source, name
        if not isinstance(values, Mapping):
            raise SpecError(f"{source}: [{name}] must be a table, got {_describe(values)}")
        self.values = dict(values)
        self.read: set[str] = set()

    def error(self, key: str, message: str) -> SpecError:
        return SpecError(f"{self.source}: {self.name}.{key}: {message}")

    def get(self, key: str, check: Callable[[str, Any], Any], default: Any = _REQUIRED) -> Any:
        """The value of ``key`` passed through ``check`` (a check of :mod:`pyrodiff.checks`, given the name and
        the value); ``default`` if absent (or None, which TOML cannot write)."""
        self.read.add(key)
        value = self.values.get(key)
        if value is None:
            if default is _REQUIRED:
                raise self.error(key, "is required")
            return default
        try:
            return check(f"{self.name}.{key}", value)
        except checks.CheckError as e:  # the value as the file spells it, with its type
            raise self.error(key, f"must be {e.expected}, got {_describe(e.value)}") from None
        except ValueError as e:
            raise self.error(key, str(e)) from None

    def finish(self) -> None:
        """Refuse the keys that were not read: they are no key of this table."""
        allowed = sorted(self.read)
        for key in sorted(self.values):
            if key not in allowed:
                raise SpecError(
                    f"{self.source}: unknown key {self.name}.{key}{_suggest(key, allowed)}; {self.name} keys: {', '.join(allowed)}"
                )


def _suggest(word: str, options: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _plain(value: Any) -> Any:
    """Tuples as lists (what TOML reads and a checkpoint stores), so plain forms compare equal."""
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------------- the tables
@dataclass(frozen=True)
class DataSpec:
    """``[data]``: a dataset of :data:`pyrodiff.data.DATASETS`, and the folder of its local files if it needs one."""

    name: str
    root: str | None = None

    @classmethod
    def read(cls, t: _Table) -> DataSpec:
        data = cls(t.get("name", _choice(sorted(DATASETS))), t.get("root", _string, None))
        t.finish()
        return data

    def to_dict(self) -> dict:
        return {"name": self.name} | ({} if self.root is None else {"root": self.root})


@dataclass(frozen=True)
class ScheduleSpec:
    """``[schedule]``: ``kind`` (a key of :data:`SCHEDULES`), T, and the constructor's other arguments
    (every default filled in; ``betas`` for ``kind = "betas"``)."""

    kind: str
    num_steps: int
    params: Mapping[str, Any]

    @classmethod
    def read(cls, t: _Table) -> ScheduleSpec:
        kind = t.get("kind", _choice(SCHEDULES), "linear")
        params = {
            key: t.get(key, check, default)
            for key, (check, default) in _constructor_checks(SCHEDULES[kind], ("num_steps",)).items()
        }
        num_steps = t.get(
            "num_steps",
            partial(checks.int_in, lo=1, hi=MAX_NUM_STEPS),  # before any table is made
            len(params["betas"]) if kind == "betas" else _REQUIRED,
        )
        if kind == "betas" and num_steps != len(params["betas"]):
            raise t.error("num_steps", f"must be the number of betas, {len(params['betas'])}, got {num_steps}")
        t.finish()
        spec = cls(kind, num_steps, MappingProxyType(params))
        try:
            spec.build().check()  # a schedule with parameters is validated as it starts
        except ValueError as e:
            raise SpecError(f"{t.source}: [schedule] {e}") from None
        return spec

    @property
    def is_log_snr(self) -> bool:
        """Whether the schedule is defined in continuous time (a :class:`~pyrodiff.chain.log_snr.LogSNRSchedule`)."""
        return self.kind in ("linear_log_snr", "learned")

    def build(self) -> Schedule:
        if self.kind == "betas":
            return NoiseSchedule.from_betas(list(self.params["betas"]))
        return SCHEDULES[self.kind](self.num_steps, **self.params)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "num_steps": self.num_steps, **{k: _plain(v) for k, v in self.params.items()}}


@dataclass(frozen=True)
class ModelSpec:
    """``[model]``: what the network predicts, the reverse variance, the decoder and its levels
    (None: the data's own levels, the only ones accepted); ``time``: the chain of T steps (``"discrete"``) or the
    continuous-time bound (``"continuous"``, :mod:`pyrodiff.chain.continuous`: epsilon prediction, trained by the
    bound), and ``interior``: what trains a learned schedule's interior there (``"bound"`` or ``"variance"``)."""

    prediction: str = "epsilon"
    variance: str = "small"
    decoder: str = "gaussian"
    levels: int | None = None
    time: str = "discrete"
    interior: str = "bound"

    @classmethod
    def read(cls, t: _Table) -> ModelSpec:
        model = cls(
            t.get("prediction", _parsed_by(parse_target), cls.prediction),
            t.get("variance", _parsed_by(parse_variance), cls.variance),
            t.get("decoder", _string, cls.decoder),
            t.get("levels", _integer(2), None),
            t.get("time", _choice(TIMES), cls.time),
            t.get("interior", _choice(INTERIOR_OBJECTIVES), cls.interior),
        )
        if model.time == "continuous" and (model.prediction != "epsilon" or model.variance != "small"):
            raise t.error(
                "time",
                "'continuous' predicts epsilon with the 'small' variance in its discretisations, got prediction = "
                f"{model.prediction!r}, variance = {model.variance!r}",
            )
        if model.time == "discrete" and model.interior != "bound":
            raise t.error(
                "interior", "'variance' trains the interior of a continuous-time schedule: set time = 'continuous'"
            )
        t.finish()
        if model.levels is not None or model.decoder != "discretized":  # else the data's levels, at build
            try:
                parse_decoder(model.decoder, model.levels)
            except ValueError as e:
                raise t.error("decoder", str(e)) from None
        return model

    def to_dict(self) -> dict:
        d = {"prediction": self.prediction, "variance": self.variance, "decoder": self.decoder}
        d |= {"time": self.time, "interior": self.interior}
        return d | ({} if self.levels is None else {"levels": self.levels})


@dataclass(frozen=True)
class NetworkSpec:
    """``[network]``: ``kind`` (a key of :data:`NETWORKS`) and the constructor's arguments other than the
    data's channels (every default filled in)."""

    kind: str
    params: Mapping[str, Any]

    @classmethod
    def read(cls, t: _Table) -> NetworkSpec:
        kind = t.get("kind", _choice(NETWORKS), "unet")
        constructor, from_data = NETWORKS[kind]
        params = {
            key: value
            for key, (check, default) in _constructor_checks(constructor, from_data).items()
            if (value := t.get(key, check, default)) is not None
        }
        t.finish()
        try:
            constructor.check_arguments(**params)
        except checks.CheckError as e:
            raise t.error(e.name or "kind", f"must be {e.expected}, got {_describe(e.value)}") from None
        return cls(kind, MappingProxyType(params))

    def build(self, data_shape: tuple[int, ...], output_channels: int) -> nn.Module:
        """The network for data of shape ``data_shape`` returning ``output_channels`` channels."""
        constructor, (inputs, outputs) = NETWORKS[self.kind]
        needs = 3 if self.kind == "unet" else 1
        if len(data_shape) != needs:
            raise ValueError(
                f"network.kind: {self.kind!r} needs data of {'shape (C, H, W)' if needs == 3 else 'shape (D,)'}, "
                f"the data have shape {data_shape}"
            )
        return constructor(**{inputs: data_shape[0], outputs: output_channels}, **self.params)

    def to_dict(self) -> dict:
        return {"kind": self.kind, **{k: _plain(v) for k, v in self.params.items()}}


@dataclass(frozen=True)
class TrainingSpec:
    """``[training]``: the optimiser (AdamW, linear warm-up, clipping, EMA of the weights), the objective
    and its estimator, and the run.  ``subsample_steps`` None is the full chain (``"all"`` in TOML).
    ``graph``: on a CUDA device, capture the whole step as a CUDA graph (where the run allows it, see
    :mod:`pyrodiff.training.loop`); ``log_every``: how many steps pass between the host's reads of the losses;
    ``seconds``: a wall-clock budget (training stops, saves and is evaluated at the first step past it, or at ``steps``;
    ``"none"``, the default, for no budget), to compare models at equal training time."""

    steps: int = 2000
    seconds: float | None = None
    batch_size: int = 128
    micro_batches: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    estimator: str = "mean_field"
    objective: str = "elbo"
    subsample_steps: int | None = 1
    timestep_sampler: str = "uniform"
    amp: bool | str = False
    compile: bool = False
    graph: bool = True
    checkpoint_every: int = 500
    log_every: int = 50
    eval_examples: int = 2000
    seed: int = 0

    @classmethod
    def read(cls, t: _Table) -> TrainingSpec:
        check = {
            "steps": _integer(1),
            "seconds": _seconds,
            "batch_size": _integer(1),
            "micro_batches": _integer(1),
            "lr": partial(checks.number, lo=0, lo_open=True),
            "weight_decay": partial(checks.number, lo=0),
            "warmup_steps": _integer(0),
            "grad_clip": partial(checks.number, lo=0, lo_open=True),
            "ema_decay": partial(checks.number, lo=0, hi=1, hi_open=True),
            "estimator": _choice(ESTIMATORS),
            "objective": _parsed_by(parse_objective),
            "subsample_steps": _subsample_steps,
            "timestep_sampler": _choice(TIMESTEP_SAMPLERS),
            "amp": _choice(AMP),
            "compile": _boolean,
            "graph": _boolean,
            "checkpoint_every": _integer(1),
            "log_every": _integer(1),
            "eval_examples": _integer(1),
            "seed": partial(checks.int_in, lo=0, hi=2**63 - 1),  # torch's generators take a 64-bit seed
        }
        training = cls(**{f.name: t.get(f.name, check[f.name], f.default) for f in fields(cls)})
        t.finish()
        if training.batch_size % training.micro_batches:
            raise t.error(
                "micro_batches",
                f"must divide batch_size = {training.batch_size}, got {training.micro_batches}",
            )
        return training

    @property
    def loss_name(self) -> str:
        """What a training loss under this objective holds, per example (the column of ``losses.csv``)."""
        return parse_objective(self.objective).loss_name

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["seconds"] = "none" if self.seconds is None else self.seconds
        return d | {"subsample_steps": "all" if self.subsample_steps is None else self.subsample_steps}


def _seconds(name: str, value: Any) -> float | None:
    """A time budget: seconds of training (> 0), or ``"none"`` (no budget: train ``steps`` steps)."""
    if value == "none":
        return None
    return checks.number(name, value, 0, lo_open=True)


def _subsample_steps(name: str, value: Any) -> int | None:
    if value == "all":
        return None
    if not checks.is_integer(value) or value < 1:
        raise checks.CheckError.refuse(name, "an integer >= 1 (timesteps per example) or 'all' (the full chain)", value)
    return value


# ---------------------------------------------------------------------- the specification
@dataclass(frozen=True)
class Spec:
    """A validated specification.  Make one with :func:`load_spec` (a file or a bundled name) or
    :meth:`from_dict` (plain data, e.g. from a checkpoint); both check everything.  ``source`` says
    where it came from, for messages."""

    name: str
    data: DataSpec
    schedule: ScheduleSpec
    model: ModelSpec
    network: NetworkSpec
    training: TrainingSpec
    source: str = field(default="the specification", compare=False)

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "the specification") -> Spec:
        """Validate the plain-data form ``d`` (a parsed TOML file, a checkpoint's ``"spec"``); fill defaults."""
        if not isinstance(d, Mapping):
            raise SpecError(f"{source}: a specification must be a table of tables, got {_describe(d)}")
        for key, value in d.items():
            if key != "name" and key not in TABLES:
                kind = "table" if isinstance(value, Mapping) else "key"
                raise SpecError(
                    f"{source}: unknown {kind} {key!r}{_suggest(key, TABLES)}; a specification holds name and "
                    f"the tables {', '.join(f'[{t}]' for t in TABLES)}"
                )
        missing = [t for t in TABLES[:4] if t not in d]
        if missing:
            raise SpecError(f"{source}: missing table(s) {', '.join(f'[{t}]' for t in missing)}")
        name = d.get("name")
        if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
            raise SpecError(
                f"{source}: name must be a folder name of letters, digits, '.', '_' and '-', not starting "
                f"with '.' (it names the output folder runs/NAME), got {_describe(name)}"
            )
        tables = {t: _Table(source, t, d.get(t, {})) for t in TABLES}
        spec = cls(
            name,
            DataSpec.read(tables["data"]),
            ScheduleSpec.read(tables["schedule"]),
            ModelSpec.read(tables["model"]),
            NetworkSpec.read(tables["network"]),
            TrainingSpec.read(tables["training"]),
            source,
        )
        spec._check_combinations(tables)
        return spec

    @classmethod
    def of_checkpoint(cls, state: Mapping, path: str | Path) -> Spec:
        """The validated specification a diffusion checkpoint's ``state`` was trained with (:meth:`from_dict`).
        The VAE baseline's checkpoints (:mod:`pyrodiff.theory.vae`) have the same format, but their ``spec`` names
        its ``kind``: such a file is refused as what it is."""
        d = state["spec"]
        if isinstance(d, Mapping) and "kind" in d:
            what = "a VAE checkpoint (pyrodiff.theory.vae)" if d["kind"] == "vae" else f"a {d['kind']!r} checkpoint"
            raise SpecError(f"{path} is {what}, not a diffusion model's: load it with pyrodiff.theory.vae.load_vae")
        return cls.from_dict(d, f"checkpoint {path}")

    def _check_combinations(self, tables: dict[str, _Table]) -> None:
        """The choices that depend on each other: timesteps per example against T, the objective against
        the variance and the full chain, the importance sampler against the full chain."""
        tr, training = self.training, tables["training"]
        if self.model.time == "continuous":
            if not self.schedule.is_log_snr:
                raise tables["model"].error(
                    "time",
                    "'continuous' needs a schedule defined for every t in [0, 1]: schedule.kind = 'learned' or "
                    f"'linear_log_snr', got {self.schedule.kind!r}",
                )
            if tr.objective != "elbo" or tr.timestep_sampler != "uniform":
                raise training.error(
                    "objective",
                    "the continuous-time bound is trained as the bound, with its own low-discrepancy times: it needs "
                    f"objective = 'elbo' and timestep_sampler = 'uniform', got {tr.objective!r}, "
                    f"{tr.timestep_sampler!r}",
                )
            return  # subsample_steps is not used: one time per example
        if tr.subsample_steps is None:
            if tr.objective != "elbo" or tr.timestep_sampler != "uniform":
                raise training.error(
                    "subsample_steps",
                    "'all' (the full chain) needs objective = 'elbo' and timestep_sampler = 'uniform', "
                    f"got objective = {tr.objective!r}, timestep_sampler = {tr.timestep_sampler!r}",
                )
        else:
            try:
                check_subsample_steps(tr.subsample_steps, self.schedule.num_steps)
            except ValueError as e:
                raise training.error("subsample_steps", str(e)) from None
        try:
            parse_objective(tr.objective).weights(self.schedule.build(), self.model.variance)
        except ValueError as e:
            raise training.error("objective", f"{e} (model.variance = {self.model.variance!r})") from None

    def to_dict(self) -> dict:
        """The plain-data form (TOML's types only; every default filled), as a checkpoint stores it."""
        return {
            "name": self.name,
            **{t: getattr(self, t).to_dict() for t in TABLES},
        }

    def with_changes(self, changes: Mapping[str, Mapping[str, Any]]) -> Spec:
        """A new, validated specification with the keys of ``changes`` (``{"training": {"steps": 10}}``)
        replaced; a change of a schedule's or a network's ``kind`` replaces that whole table."""
        d = self.to_dict()
        for table, values in changes.items():
            if table == "name":
                d["name"] = values
            elif table in d and "kind" not in values:
                d[table] = {**d[table], **values}
            else:
                d[table] = dict(values)
        return Spec.from_dict(d, self.source)

    def differences(self, other: Spec) -> dict[str, tuple[Any, Any]]:
        """``{"table.key": (mine, other's)}`` for every key whose value differs (the name included)."""
        a, b = _flat(self.to_dict()), _flat(other.to_dict())
        return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}

    def __reduce__(self) -> tuple:
        """Pickled (and deep-copied) as its plain-data form, validated again when read."""
        return Spec.from_dict, (self.to_dict(), self.source)


def _flat(d: Mapping) -> dict[str, Any]:
    """``{"name": ..., "table.key": value, ...}`` of a plain-data specification."""
    flat = {"name": d["name"]}
    for t in TABLES:
        flat.update({f"{t}.{k}": v for k, v in d[t].items()})
    return flat


def as_spec(spec: Spec | Mapping, source: str = "the specification") -> Spec:
    """``spec`` itself, or the validated :class:`Spec` of a plain-data specification."""
    return spec if isinstance(spec, Spec) else Spec.from_dict(spec, source)


# ---------------------------------------------------------------------- files
def spec_folders() -> list[Path]:
    """Where bundled specifications are looked up by name: the repository's ``models/`` beside the package
    source (an editable install, a checkout), then the installed data ``share/pyrodiff/models``."""
    return [Path(__file__).resolve().parents[2] / "models", Path(sys.prefix) / "share" / "pyrodiff" / "models"]


def find_spec(name_or_path: str | Path) -> Path:
    """The file of a specification: a path that exists is used as it is; otherwise a bare name such as
    ``digits`` (or ``digits.toml``) is looked up in :func:`spec_folders`."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.exists():
        raise FileNotFoundError(f"{path} is not a specification file")
    if len(path.parts) == 1:
        file = path.name if path.suffix == ".toml" else f"{path.name}.toml"
        for folder in spec_folders():
            if (folder / file).is_file():
                return folder / file
    bundled = sorted({p.stem for folder in spec_folders() if folder.is_dir() for p in folder.glob("*.toml")})
    raise FileNotFoundError(
        f"no model specification at {path}, nor a bundled one of that name (bundled: {', '.join(bundled) or 'none'})"
    )


def load_spec(name_or_path: str | Path) -> Spec:
    """Read and validate a specification file (see :func:`find_spec` for names); the name defaults to the
    file's stem."""
    path = find_spec(name_or_path)
    with open(path, "rb") as f:
        try:
            d = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise SpecError(f"{path}: not valid TOML: {e}") from None
        except UnicodeDecodeError as e:
            raise SpecError(
                f"{path}: not valid TOML: not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x})"
            ) from None
    return Spec.from_dict({"name": path.stem, **d}, str(path))


# ---------------------------------------------------------------------- building
@dataclass
class Built:
    """What a specification describes: the data, the noise schedule, the model and the guide."""

    spec: Spec
    data: Dataset
    schedule: Schedule
    model: DiffusionModel | ContinuousDiffusionModel
    guide: DiffusionGuide | ContinuousGuide


def build(spec: Spec | Mapping, data_root: str | Path | None = None) -> Built:
    """The data, schedule, model and guide a specification describes (``data_root`` overrides ``data.root``).
    Refuses what only the data can tell: a discretized decoder on continuous data, ``levels`` other than
    the data's, a network for another shape of data."""
    spec = as_spec(spec)
    data = load_dataset(spec.data.name, data_root or spec.data.root)
    schedule = spec.schedule.build()
    m = spec.model
    levels = m.levels
    if m.decoder == "discretized":
        if data.levels is None:
            raise SpecError(
                f"{spec.source}: model.decoder: 'discretized' needs integer-valued data; {data.name!r} is continuous"
            )
        if levels is not None and levels != data.levels:
            raise SpecError(
                f"{spec.source}: model.levels: the data {data.name!r} have {data.levels} levels, got {levels} "
                f"(leave levels out to use the data's)"
            )
        levels = data.levels
    try:
        network = spec.network.build(data.data_shape, parse_variance(m.variance).output_channels(data.data_shape[0]))
    except (ValueError, TypeError) as e:
        raise SpecError(f"{spec.source}: {e}") from None
    if m.time == "continuous":
        model = ContinuousDiffusionModel(network, schedule, m.decoder, levels, data.data_shape, m.interior)
        return Built(spec, data, schedule, model, ContinuousGuide(schedule))
    noise_level = NoiseLevelInput() if isinstance(schedule, LogSNRSchedule) else None
    model = DiffusionModel(
        network, schedule, m.prediction, m.variance, m.decoder, levels, data.data_shape, noise_level=noise_level
    )
    return Built(spec, data, schedule, model, DiffusionGuide(schedule, order="posterior"))
