r"""Models trained elsewhere: a noise network of diffusers, improved-diffusion or denoising-diffusion-pytorch with
its scheduler's settings, as a :class:`~pyrodiff.chain.reverse.DiffusionModel` whose bound pyrodiff reports
(``analysis/external_bound.py``).

What differs from pyrodiff's conventions (``docs/MATH.md``, sections 1-4), and how it is mapped:

- **Timesteps.** Those libraries index the noising steps from 0: diffusers' ``DDPMScheduler.add_noise(x_0, eps, t)``
  uses ``alphas_cumprod[t]``, pyrodiff's :math:`\bar\alpha_{t+1}`; improved-diffusion and denoising-diffusion-pytorch
  draw ``t`` in ``0..T-1`` likewise.  pyrodiff's math timesteps are 1..T, so :class:`ZeroIndexedNetwork` calls
  ``net(x_t, t - 1)``.  improved-diffusion's ``rescale_timesteps=True`` feeds ``t * 1000 / T`` as a float:
  ``timestep_scale=1000 / T``.
- **Output.** A tensor, or an object whose ``.sample`` is one (diffusers' ``UNet2DOutput``).
- **Prediction** (``prediction_type``, :data:`PREDICTION_TYPES`): ``"epsilon"``, ``"sample"`` and
  ``"v_prediction"`` are pyrodiff's ``"epsilon"``, ``"x0"`` and ``"v"``: ``DDPMScheduler.step`` forms
  ``pred_original_sample`` with the formulas of :mod:`pyrodiff.chain.parameterization` and its mean is the posterior mean
  at it, :math:`\tilde\mu_t(\hat x_0, x_t)` (Ho et al. 2020, eq. 7), as pyrodiff's.
- **Variance** (``variance_type``, :data:`VARIANCE_TYPES`): ``"fixed_small"`` is :math:`\tilde\beta_t`
  (``"fixed_small_log"`` draws with :math:`\exp(\tfrac12 \log\tilde\beta_t)`, the same law), ``"fixed_large"`` is
  :math:`\beta_t`, and ``"learned_range"`` is Nichol & Dhariwal's (2021, eq. 15) interpolation
  :math:`\log\sigma^2 = f\log\beta_t + (1 - f)\log\tilde\beta_t`, :math:`f = (v + 1)/2`, with :math:`v` the second
  half of the network's output channels, unclamped: pyrodiff's ``"learned"`` (``LearnedVariance``) for every
  t >= 2, checked against ``DDPMScheduler.step`` by ``tests/test_adapters.py``.  At t = 1 (diffusers' t = 0)
  diffusers clamps :math:`\tilde\beta_1 = 0` to 1e-20 where improved-diffusion and pyrodiff use :math:`\tilde\beta_2`;
  diffusers never uses that variance (its sampler adds no noise at the last step) and defines no decoder
  :math:`p(x_0 \mid x_1)`, so the bound uses pyrodiff's (:mod:`pyrodiff.chain.decoders`), with variance
  :math:`\tilde\beta_2` (fixed variances) or :math:`\exp(f\log\beta_1 + (1 - f)\log\tilde\beta_2)` (learned).
  Refused: ``"learned"`` (the output read as the variance itself) and ``"fixed_large_log"`` (whose ``step`` takes the
  square root of :math:`\log\beta_t`): pyrodiff has no such reverse step.
- **Betas.** diffusers computes them in float32 (for the linear schedule at T = 1000 the relative error is up to
  1.1e-7 on :math:`\beta_t` and 3.6e-7 on :math:`\bar\alpha_t`; for ``"squaredcos_cap_v2"`` 1.3e-5 on
  :math:`\bar\alpha_T`).  pyrodiff holds a schedule in float64 (MATH.md, section 1), so the closed forms are recomputed
  in float64 from the configuration: ``"linear"`` (:meth:`NoiseSchedule.linear`), ``"scaled_linear"``
  (:math:`\beta_t` the squares of ``linspace(sqrt(beta_start), sqrt(beta_end), T)``) and ``"squaredcos_cap_v2"``
  (:meth:`NoiseSchedule.cosine`, the same formula with s = 0.008, max_beta = 0.999); ``trained_betas`` are taken as
  given; any other schedule (``"sigmoid"``, ``"laplace"``) from the scheduler's own float32 ``betas``.  The network
  was trained on diffusers' float32 :math:`\bar\alpha_t`; the difference is far below a bound's Monte Carlo error.
- **Options of the sampler, not of the model** (:data:`SAMPLER_OPTIONS`): ``clip_sample``, ``clip_sample_range``,
  ``thresholding``, ``dynamic_thresholding_ratio`` and ``sample_max_value`` clamp :math:`\hat x_0` inside ``step``,
  which training never calls; ``timestep_spacing`` and ``steps_offset`` choose inference timesteps.  The bound is
  that of the unclipped T-step chain the network was trained for, as for pyrodiff's own models (MATH.md, section 3:
  the clipped sampler is not the model whose bound is scored); :func:`sampler_options` lists them for the report.
  ``rescale_betas_zero_snr=True`` is refused: it sets :math:`\beta_T = 1`, which no schedule of the bound allows.

Missing configuration keys take ``DDPMScheduler``'s defaults; a configuration with neither ``beta_schedule`` nor
``trained_betas`` is not one of a discrete-time (DDPM-family) scheduler and is refused.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from .. import checks
from ..chain.decoders import Decoder
from ..chain.parameterization import ReverseVariance, parse_variance
from ..chain.reverse import DiffusionModel
from ..chain.schedule import NoiseSchedule
from ..refusal import objects_refused

__all__ = [
    "ZeroIndexedNetwork",
    "model_from_diffusers",
    "schedule_from_config",
    "scheduler_config",
    "sampler_options",
    "PREDICTION_TYPES",
    "VARIANCE_TYPES",
    "load_diffusers",
    "load_network",
    "recorded_num_steps",
]

#: diffusers' ``prediction_type`` -> pyrodiff's ``prediction``
PREDICTION_TYPES = {"epsilon": "epsilon", "sample": "x0", "v_prediction": "v"}
#: diffusers' ``variance_type`` -> pyrodiff's ``variance``
VARIANCE_TYPES = {
    "fixed_small": "small",
    "fixed_small_log": "small",
    "fixed_large": "large",
    "learned_range": "learned",
}
_REFUSED_VARIANCE_TYPES = {
    "learned": "reads the network's output as the variance itself",
    "fixed_large_log": "draws with the square root of log(beta_t) in DDPMScheduler.step",
}
#: configuration keys that change only the sampler, not the model whose bound is reported
SAMPLER_OPTIONS = (
    "clip_sample",
    "clip_sample_range",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "timestep_spacing",
    "steps_offset",
)
#: ``DDPMScheduler``'s defaults for the keys that define the model
_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "trained_betas": None,
    "prediction_type": "epsilon",
    "variance_type": "fixed_small",
    "rescale_betas_zero_snr": False,
}
_SCHEDULER_FILE = "scheduler_config.json"
_CLOSED_FORMS = ("linear", "scaled_linear", "squaredcos_cap_v2")


class HasConfig(Protocol):
    """A diffusers scheduler (any object with a ``config`` mapping)."""

    config: Mapping


#: what names a scheduler: the object, its configuration, or a ``scheduler_config.json`` (or its folder)
SchedulerSource = HasConfig | Mapping | str | Path


class ZeroIndexedNetwork(nn.Module):
    r"""A network that numbers the noising steps from 0, called as pyrodiff calls networks (``network(x_t, t)``, math
    timesteps t in 1..T): ``net(x_t, t - 1)``, or ``net(x_t, (t - 1) * timestep_scale)`` as floats with a
    ``timestep_scale`` (improved-diffusion's ``rescale_timesteps``: 1000 / T).  The output's ``.sample`` where it has
    one (diffusers' ``UNet2DOutput``), else the output, which must then be a tensor.

    :param net: e.g. a ``diffusers.UNet2DModel``, improved-diffusion's ``UNetModel`` or denoising-diffusion-pytorch's
        ``Unet``.
    :param timestep_scale: None to pass integer timesteps ``t - 1`` (LongTensor); a positive number to pass
        ``(t - 1) * timestep_scale`` as float32.
    """

    def __init__(self, net: nn.Module, timestep_scale: float | None = None) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"the network must be a torch.nn.Module, got {type(net).__name__}")
        self.net = net
        self.timestep_scale = (
            None if timestep_scale is None else checks.number("timestep_scale", timestep_scale, 0, lo_open=True)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        step = t - 1
        out = self.net(x, step if self.timestep_scale is None else step.float() * self.timestep_scale)
        out = getattr(out, "sample", out)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"the network returned a {type(out).__name__}; it must return a tensor or an object whose .sample is one"
            )
        return out


def _find_scheduler_config(folder: Path) -> Path:
    """``scheduler_config.json`` of a pipeline folder (``folder/scheduler/``) or of a model folder (``folder/``)."""
    for candidate in (folder / "scheduler" / _SCHEDULER_FILE, folder / _SCHEDULER_FILE):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no {_SCHEDULER_FILE} in {folder / 'scheduler'} or {folder}: give the scheduler's configuration file"
    )


def scheduler_config(source: SchedulerSource) -> dict:
    """A diffusers scheduler's configuration as a plain dict, from the scheduler object (its ``.config``), a mapping,
    a ``scheduler_config.json`` file, or a folder holding one (a pipeline's ``scheduler/`` or a model folder)."""
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(getattr(source, "config", None), Mapping):
        return dict(source.config)
    if isinstance(source, str | Path):
        path = Path(source)
        path = _find_scheduler_config(path) if path.is_dir() else path
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read the scheduler configuration {path}: {e}") from e
        if not isinstance(config, dict):
            raise ValueError(f"{path} does not hold a JSON object")
        return config
    raise TypeError(
        f"a scheduler must be a diffusers scheduler, a configuration dict or a path, got {type(source).__name__}"
    )


def _setting(config: Mapping, key: str):
    value = config.get(key)
    return _DEFAULTS[key] if value is None else value


def schedule_from_config(scheduler: SchedulerSource) -> NoiseSchedule:
    """The :class:`NoiseSchedule` of a diffusers scheduler (object, configuration or path; see :func:`scheduler_config`),
    in float64: closed forms recomputed, ``trained_betas`` as given, other schedules from the object's ``betas``
    (module docstring)."""
    config = scheduler_config(scheduler)
    T = _setting(config, "num_train_timesteps")
    checks.integer("num_train_timesteps", T, 2)
    if _setting(config, "rescale_betas_zero_snr"):
        raise ValueError(
            "rescale_betas_zero_snr=True sets beta_T = 1 (zero terminal SNR): a schedule of the bound needs every beta "
            "strictly inside (0, 1)"
        )
    trained, kind = config.get("trained_betas"), config.get("beta_schedule")
    if trained is not None:
        if len(trained) != T:
            raise ValueError(f"trained_betas has {len(trained)} values for num_train_timesteps = {T}")
        return NoiseSchedule(torch.as_tensor(trained, dtype=torch.float64), {"kind": "trained_betas"})
    start, end = float(_setting(config, "beta_start")), float(_setting(config, "beta_end"))
    if kind == "linear":
        return NoiseSchedule.linear(T, start, end)
    if kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2
        return NoiseSchedule(betas, {"kind": "scaled_linear", "beta_start": start, "beta_end": end})
    if kind == "squaredcos_cap_v2":
        return NoiseSchedule.cosine(T)
    if kind is None:
        raise ValueError(
            "the scheduler configuration has neither beta_schedule nor trained_betas: it is not a discrete-time "
            "(DDPM-family) scheduler's"
        )
    betas = getattr(scheduler, "betas", None)
    if not isinstance(betas, torch.Tensor):
        raise ValueError(
            f"beta_schedule {kind!r} is not one of the closed forms {_CLOSED_FORMS}: give the scheduler object, whose "
            "float32 betas are then used"
        )
    if betas.numel() != T:
        raise ValueError(f"the scheduler has {betas.numel()} betas for num_train_timesteps = {T}")
    return NoiseSchedule(betas.double(), {"kind": kind, "beta_start": start, "beta_end": end, "precision": "float32"})


def _choice(config: Mapping, key: str, table: Mapping[str, str], refused: Mapping[str, str]) -> str:
    value = _setting(config, key)
    if isinstance(value, str) and value in refused:
        raise ValueError(
            f"{key} {value!r} {refused[value]}: pyrodiff has no such reverse step; use one of {tuple(table)}"
        )
    return table[checks.one_of(key, value, table)]


def sampler_options(scheduler: SchedulerSource) -> dict:
    """The scheduler's settings that change only sampling (:data:`SAMPLER_OPTIONS`), not the bound: recorded in
    reports so that nobody takes the bound for the clipped or thresholded sampler's."""
    config = scheduler_config(scheduler)
    return {k: config[k] for k in SAMPLER_OPTIONS if k in config}


def _check_network_config(
    network: nn.Module, T: int, variance: ReverseVariance, data_shape: tuple[int, ...] | None
) -> None:
    """Refuse a network whose configuration (diffusers models carry one) contradicts the scheduler or the data."""
    config = getattr(network, "config", None)
    if not isinstance(config, Mapping):
        return
    if config.get("time_embedding_type") == "fourier":
        raise ValueError(
            "the network has a Fourier time embedding: it is a score-SDE (VE) network, called with a noise level, "
            "not a DDPM step"
        )
    trained_T = config.get("num_train_timesteps")
    if trained_T is not None and trained_T != T:
        raise ValueError(f"the network was built for {trained_T} timesteps, the scheduler has {T}")
    c_in, c_out = config.get("in_channels"), config.get("out_channels")
    if c_in is not None and c_out is not None and c_out != variance.output_channels(c_in):
        raise ValueError(
            f"the network returns {c_out} channels for {c_in} input channels; the {variance.name!r} variance needs "
            f"{variance.output_channels(c_in)}" + (" (the prediction, then v)" if variance.learned else "")
        )
    if c_in is not None and data_shape is not None and data_shape[0] != c_in:
        raise ValueError(
            f"the network takes {c_in} channels, the data have {data_shape[0]} (shape {tuple(data_shape)})"
        )


def model_from_diffusers(
    network: nn.Module,
    scheduler: SchedulerSource,
    *,
    decoder: str | Decoder = "gaussian",
    levels: int | None = None,
    data_shape: tuple[int, ...] | None = None,
    variance: str | None = None,
    timestep_scale: float | None = None,
) -> DiffusionModel:
    """The :class:`DiffusionModel` of a network trained with a diffusers-style scheduler: the network wrapped in
    :class:`ZeroIndexedNetwork`, the scheduler's betas (:func:`schedule_from_config`), its ``prediction_type`` and
    ``variance_type`` mapped as in the module docstring.

    :param network: called as ``network(x_t, t0)`` with 0-indexed timesteps ``t0``; returns a tensor or an object
        with ``.sample``.
    :param scheduler: a diffusers scheduler, its configuration (dict) or a path (:func:`scheduler_config`).
    :param decoder: pyrodiff's decoder: ``"discretized"`` with ``levels`` (256 for 8-bit images, data in [-1, 1])
        or ``"gaussian"``.
    :param data_shape: one example's shape; checked against the network's configuration where it has one.
    :param variance: pyrodiff's ``"small"``, ``"large"`` or ``"learned"`` in place of the scheduler's variance_type.
    :param timestep_scale: see :class:`ZeroIndexedNetwork`.
    """
    config = scheduler_config(scheduler)
    schedule = schedule_from_config(scheduler)
    prediction = _choice(config, "prediction_type", PREDICTION_TYPES, {})
    reverse_variance = parse_variance(
        variance or _choice(config, "variance_type", VARIANCE_TYPES, _REFUSED_VARIANCE_TYPES)
    )
    _check_network_config(network, schedule.num_steps, reverse_variance, data_shape)
    return DiffusionModel(
        ZeroIndexedNetwork(network, timestep_scale), schedule, prediction, reverse_variance, decoder, levels, data_shape
    )


def load_diffusers(folder: str | Path, scheduler: str | Path | None = None) -> tuple[nn.Module, dict]:
    """A diffusers model saved with ``save_pretrained`` and its scheduler's configuration, from a local folder only
    (nothing is downloaded; weights are read by diffusers, from safetensors or with ``torch.load(weights_only=True)``).

    :param folder: a pipeline folder (the network in ``unet/``, the scheduler in ``scheduler/``) or a model folder
        (``config.json`` and the weights, ``scheduler_config.json`` beside them if saved there).
    :param scheduler: the scheduler's ``scheduler_config.json`` (or its folder), if not in ``folder``.
    :returns: the network (in evaluation mode) and the scheduler's configuration, for :func:`model_from_diffusers`.
    """
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(f"loading a diffusers folder needs diffusers: pip install 'pyrodiff[diffusers]' ({e})") from e
    folder = Path(folder)
    model_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"no diffusers model in {folder}: neither {folder / 'unet' / 'config.json'} nor {config_file}"
        )
    try:
        model_config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the model configuration {config_file}: {e}") from e
    if not isinstance(model_config, dict):
        raise ValueError(f"{config_file} does not hold a JSON object")
    name = model_config.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ValueError(f"{config_file} names {name!r}, which is not a diffusers model class")
    network = cls.from_pretrained(model_dir, local_files_only=True, low_cpu_mem_usage=False)
    return network.eval(), scheduler_config(folder if scheduler is None else scheduler)


def _select(state: object, key: str | None, prefix: str | None, path: Path) -> dict:
    for part in key.split(".") if key else ():
        if not isinstance(state, Mapping) or part not in state:
            raise KeyError(f"{path} has no entry {key!r} (no {part!r})")
        state = state[part]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}{f' [{key}]' if key else ''} is not a state dict (a mapping of names to tensors)")
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"no entry of {path}{f' [{key}]' if key else ''} starts with {prefix!r}")
    return dict(state)


def recorded_num_steps(state: Mapping) -> int | None:
    """The number of noising steps a state dict records, where its training code saved the schedule with the weights
    (denoising-diffusion-pytorch's ``GaussianDiffusion`` keeps its ``betas`` as a buffer): the length of its 1-D
    ``betas`` entry (at any prefix), or None."""
    lengths = {
        v.numel()
        for k, v in state.items()
        if k.rsplit(".", 1)[-1] == "betas" and isinstance(v, torch.Tensor) and v.dim() == 1
    }
    return lengths.pop() if len(lengths) == 1 else None


def load_network(
    import_path: str,
    state_dict: str | Path,
    kwargs: Mapping | None = None,
    key: str | None = None,
    prefix: str | None = None,
    num_steps: int | None = None,
) -> nn.Module:
    """A network built from its class and loaded with a state dict, in evaluation mode.

    The class is imported from ``import_path`` (``"package.module:Class"``, your own code: importing and building
    it runs that code, so it must be trusted as any code you run is); a name that is not a ``torch.nn.Module``
    class (a function such as ``os:system``, another class) is refused before it is called.  The weights are read
    without running code from the file: ``.safetensors``, or ``torch.load(weights_only=True)``, which refuses
    anything but tensors and plain data.

    :param kwargs: the class's constructor arguments.
    :param key: dotted path of the state dict inside the file (``"ema"`` or ``"model"`` of a training checkpoint).
    :param prefix: keep only the entries whose names start with it, without it (``"model."`` for the network inside
        denoising-diffusion-pytorch's ``GaussianDiffusion``).
    :param num_steps: the scheduler's T; refused if the state dict records another (:func:`recorded_num_steps`).
    """
    module_name, sep, attr = import_path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"an import path is 'package.module:Class', got {import_path!r}")
    try:
        factory = importlib.import_module(module_name)
        for part in attr.split("."):
            factory = getattr(factory, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import the network {import_path}: {e}") from e
    if not inspect.isclass(factory):
        raise ValueError(f"{import_path} is not a class but a {type(factory).__name__}: name a torch.nn.Module class")
    if not issubclass(factory, nn.Module):
        raise ValueError(f"{import_path} is not a torch.nn.Module class: name the network's class")
    network = factory(**dict(kwargs or {}))
    if not isinstance(network, nn.Module):
        raise TypeError(f"{import_path} built a {type(network).__name__}, not a torch.nn.Module")
    path = Path(state_dict)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(objects_refused(path, e)) from e
        except (RuntimeError, EOFError) as e:
            raise ValueError(f"cannot read the state dict {path} (truncated or not written by torch.save?): {e}") from e
    recorded = recorded_num_steps(_select(state, key, None, path))
    if num_steps is not None and recorded is not None and recorded != num_steps:
        raise ValueError(
            f"{path} records betas of {recorded} steps: the network was trained on {recorded} steps, the scheduler "
            f"has {num_steps}"
        )
    try:
        network.load_state_dict(_select(state, key, prefix, path))
    except RuntimeError as e:
        raise ValueError(f"the state dict in {path} does not fit {import_path}: {e}") from e
    return network.eval()
