"""Noise schedules: the forward chain's variances beta_1..beta_T and every quantity derived from them.

A schedule is an ``nn.Module`` (:class:`Schedule`).  Its state (buffers, and parameters when it has any) moves
with the model that holds it (``model.to(device)``); its tables (:class:`ScheduleTables`, docs/MATH.md, section 1,
"Noise schedules") are float64 tensors computed from that state on its device, entry ``t - 1`` for the math
timestep ``t`` in 1..T.  Two kinds:

- **fixed** (:class:`NoiseSchedule`: linear, cosine, sigmoid, explicit betas and their respacings): the tables are
  computed and validated once, when it is made, and held as buffers.  Their copies on other devices and in other
  dtypes, and the tables other modules derive from them (:meth:`Schedule.derived`), are cached.
- **with parameters** (a subclass that implements :meth:`Schedule.tables` from its ``nn.Parameter`` s; e.g. a
  learned log-SNR): the tables are recomputed from the parameters at every call, differentiably, and nothing is
  cached, since an optimiser step changes the parameters.  :meth:`Schedule.check` validates them where the schedule
  enters (a model or guide is built, training starts, a checkpoint is loaded); the hot path reads nothing on the host.

The model and the guide share one schedule object (:class:`~pyrodiff.chain.reverse.DiffusionModel` refuses a
guide built on another), so their tables cannot disagree.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import NamedTuple, TypeVar

import torch
from torch import nn
from torch.nn import functional as F

from .. import checks

__all__ = ["Schedule", "NoiseSchedule", "RespacedSchedule", "ScheduleTables", "MAX_NUM_STEPS"]

#: The largest T a schedule is made for: far above any published chain (4000 steps), and small enough that its
#: tables (a few dozen float64 vectors of length T) fit in memory; a larger T is refused before anything is allocated
#: (10^10 steps would ask for 80 GB per table).
MAX_NUM_STEPS = 1_000_000


def check_num_steps(num_steps: int) -> int:
    """``num_steps``, an integer in 1..:data:`MAX_NUM_STEPS`, or :class:`~pyrodiff.checks.CheckError`."""
    return checks.int_in("num_steps", num_steps, 1, MAX_NUM_STEPS, "MAX_NUM_STEPS")


_Derived = TypeVar("_Derived")


class ScheduleTables(NamedTuple):
    r"""The per-timestep quantities of a schedule (each a tensor of length ``T``, entry ``t - 1`` for step ``t``).
    With :math:`\alpha_t = 1 - \beta_t` and :math:`\bar\alpha_t = \prod_{s \le t} \alpha_s` (:math:`\bar\alpha_0 = 1`)
    (docs/MATH.md, section 1, "Noise schedules"):"""

    #: :math:`\beta_t`
    betas: torch.Tensor
    #: :math:`\alpha_t = 1 - \beta_t`
    alphas: torch.Tensor
    #: :math:`\bar\alpha_t`
    alphas_cumprod: torch.Tensor
    #: :math:`\bar\alpha_{t-1}`
    alphas_cumprod_prev: torch.Tensor
    #: :math:`\log \mathrm{snr}_t = \log \bar\alpha_t - \log(1 - \bar\alpha_t)`
    log_snr: torch.Tensor
    #: :math:`\tilde\beta_t = \beta_t (1 - \bar\alpha_{t-1}) / (1 - \bar\alpha_t)`
    posterior_variance: torch.Tensor
    #: :math:`P_t = \sqrt{\bar\alpha_{t-1}}\,\beta_t / (1 - \bar\alpha_t)`
    posterior_mean_coef_x0: torch.Tensor
    #: :math:`Q_t = \sqrt{\alpha_t}\,(1 - \bar\alpha_{t-1}) / (1 - \bar\alpha_t)`
    posterior_mean_coef_xt: torch.Tensor

    @staticmethod
    def from_betas(betas: torch.Tensor) -> ScheduleTables:
        r"""The tables of the variances ``betas`` (float64), by the definitions above: :math:`\bar\alpha_t` as the
        cumulative product of the :math:`\alpha_s` (how every fixed schedule's tables are made)."""
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, 0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        return ScheduleTables(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            log_snr=torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod),
            posterior_variance=betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef_x0=alphas_cumprod_prev.sqrt() * betas / (1.0 - alphas_cumprod),
            posterior_mean_coef_xt=alphas.sqrt() * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        )

    @staticmethod
    def from_log_snr(log_snr: torch.Tensor) -> ScheduleTables:
        r"""The tables of the log-SNRs :math:`\lambda_t = \log\mathrm{snr}_t` (how a schedule with parameters makes
        them; Kingma et al. 2021, VDM, with :math:`\gamma = -\lambda`): :math:`\bar\alpha_t = \sigma(\lambda_t)`,
        :math:`1 - \bar\alpha_t = \sigma(-\lambda_t)` (:math:`\sigma` the logistic function), and
        :math:`\beta_t = 1 - \bar\alpha_t / \bar\alpha_{t-1} = -\mathrm{expm1}(\log\sigma(\lambda_t) -
        \log\sigma(\lambda_{t-1}))` (:math:`\log\sigma(\lambda_0) = 0`), each without cancellation; the rest by
        the definitions above."""
        log_abar = F.logsigmoid(log_snr)
        log_abar_prev = torch.cat([log_abar.new_zeros(1), log_abar[:-1]])
        alphas_cumprod, one_minus = torch.sigmoid(log_snr), torch.sigmoid(-log_snr)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        one_minus_prev = torch.cat([one_minus.new_zeros(1), one_minus[:-1]])
        log_alphas = log_abar - log_abar_prev
        alphas, betas = log_alphas.exp(), -torch.expm1(log_alphas)
        return ScheduleTables(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            log_snr=log_snr,
            posterior_variance=betas * one_minus_prev / one_minus,
            posterior_mean_coef_x0=alphas_cumprod_prev.sqrt() * betas / one_minus,
            posterior_mean_coef_xt=alphas.sqrt() * one_minus_prev / one_minus,
        )


def _all_tables(schedule: Schedule) -> ScheduleTables:
    """Every table of ``schedule`` (the derivation behind :meth:`Schedule.coefficients`)."""
    return schedule.tables()


def _derivation_key(derivation: Callable) -> object:
    """A derivation as a cache key, by value: a method of a value object (e.g. a frozen dataclass) is the pair
    (that object, the function), so that equal objects made anew share one entry; a function is itself."""
    owner = getattr(derivation, "__self__", None)
    return derivation if owner is None else (owner, derivation.__func__)


def _cast(value, device: torch.device, dtype: torch.dtype):
    """A table, or a tuple or namespace of them, on ``device`` in ``dtype``."""
    if torch.is_tensor(value):
        return value.to(device=device, dtype=dtype)
    if isinstance(value, SimpleNamespace):
        return SimpleNamespace(**{k: _cast(v, device, dtype) for k, v in vars(value).items()})
    if isinstance(value, tuple):
        return type(value)(*(_cast(v, device, dtype) for v in value))
    raise TypeError(f"a schedule's derived table must be a tensor, a tuple or a namespace of them, got {type(value)}")


class Schedule(nn.Module):
    r"""A noise schedule of ``num_steps`` = T steps: an ``nn.Module`` whose :meth:`tables` are computed from its
    state (module docstring).  Subclasses implement :meth:`tables`; :class:`NoiseSchedule` is the fixed one.

    A module cast (``model.double()``, ``model.float()``) moves a schedule with the model but never changes its
    dtype: its tables are float64 by definition (docs/MATH.md, section 1), and its parameters keep the dtype they were
    made in.  Schedules compare by identity."""

    def __init__(self, num_steps: int, description: dict) -> None:
        super().__init__()
        self._num_steps = num_steps
        #: how the schedule was made (recorded in reports): the constructor and its arguments
        self.description = {"kind": description["kind"], "num_steps": num_steps, **description}
        # the derived tables of a schedule without parameters, by (derivation, device, dtype)
        self._derived: dict[tuple[object, torch.device, torch.dtype], object] = {}
        # those of a schedule with parameters inside :meth:`memoised` (None outside)
        self._memo: dict[tuple[object, torch.device, torch.dtype], object] | None = None

    @property
    def num_steps(self) -> int:
        """``T``, the number of noising steps."""
        return self._num_steps

    @property
    def has_parameters(self) -> bool:
        """Whether the schedule has parameters (then its tables are recomputed at every call, and training
        optimises, averages and checkpoints them with the network's)."""
        return next(self.parameters(), None) is not None

    def tables(self) -> ScheduleTables:
        """Every table, float64, on the schedule's device, computed from its state (differentiable in its
        parameters)."""
        raise NotImplementedError

    def coefficients(self, device: torch.device | str, dtype: torch.dtype) -> ScheduleTables:
        """Every table on ``device`` in ``dtype``: what the hot path uses (:meth:`derived` of :meth:`tables`)."""
        return self.derived(_all_tables, device, dtype)

    def derived(
        self, derivation: Callable[[Schedule], _Derived], device: torch.device | str, dtype: torch.dtype
    ) -> _Derived:
        """``derivation(self)``, a float64 table computed from this schedule (or a tuple or namespace of them), cast to
        ``device`` and ``dtype``: how other modules keep their per-timestep tables (e.g. the fixed reverse variances of
        :mod:`pyrodiff.chain.parameterization`).

        A schedule without parameters computes each derivation once per device and dtype and keeps it, so that the
        hot path copies nothing from the host; one with parameters computes it at every call, so that gradients reach
        them.  ``derivation`` is named by value: a module-level function, or a method of a hashable value object (a
        frozen dataclass such as :class:`~pyrodiff.chain.forward.InferenceFamily`), never a closure made per call."""
        key = (_derivation_key(derivation), torch.device(device), dtype)
        store = self._memo if self.has_parameters else self._derived
        value = None if store is None else store.get(key)
        if value is None:
            name = getattr(derivation, "__qualname__", repr(derivation))
            if "<lambda>" in name or getattr(derivation, "__closure__", None) is not None:
                raise TypeError(
                    f"a schedule's derivation must be named by value (a module-level function or a method of a frozen "
                    f"dataclass), not a lambda or closure: {name} would be a new cache entry per call"
                )
            value = _cast(derivation(self), key[1], dtype)
            if store is not None:
                store[key] = value
        return value

    @contextlib.contextmanager
    def memoised(self) -> Iterator[Schedule]:
        """Within this context a schedule with parameters computes each derived table once and reuses it: for one
        evaluation of a loss (model and guide call :meth:`coefficients` several times), whose one backward pass then
        carries every use to the parameters.  Leave it before the parameters change or the graph is freed (the
        training loop enters it around each micro-batch's loss).  A schedule without parameters caches anyway;
        nested contexts share the outer one's tables."""
        outer = self._memo
        if outer is not None:
            yield self
            return
        memo = self._memo = {}
        compute = self.tables

        def tables() -> ScheduleTables:  # the tables themselves too, for derivations that start from them
            if "tables" not in memo:
                memo["tables"] = compute()
            return memo["tables"]

        if self.has_parameters:
            self.tables = tables  # an instance attribute over the method, for this context only
        try:
            yield self
        finally:
            self._memo = None
            self.__dict__.pop("tables", None)

    def check(self) -> Schedule:
        """Refuse (``ValueError``, one line) a schedule whose state is no forward chain: a parameter that is not
        finite, log-SNR endpoints out of order, a log-SNR that is not strictly decreasing, a beta outside (0, 1).
        Reads the tables on the host: called where a schedule enters (a model or a guide is built, training starts
        or resumes, a checkpoint is loaded), never inside a step.  Returns the schedule."""
        for name, parameter in self.named_parameters():
            if not torch.isfinite(parameter).all():
                raise ValueError(f"invalid schedule: its parameter {name!r} is not finite")
        with torch.no_grad():
            tables = self.tables()
        log_snr = tables.log_snr.detach().cpu()
        if not torch.isfinite(log_snr).all():
            bad = int(torch.nonzero(~torch.isfinite(log_snr))[0]) + 1
            raise ValueError(f"invalid schedule: its log-SNR at t = {bad} is not finite ({log_snr[bad - 1].item()})")
        if log_snr.numel() >= 2 and not log_snr[0] > log_snr[-1]:
            raise ValueError(
                f"invalid schedule: its log-SNR endpoints are out of order (log snr_1 = {log_snr[0].item():.6g}, "
                f"log snr_T = {log_snr[-1].item():.6g}): the log-SNR must decrease from t = 1 to t = T"
            )
        rising = log_snr[1:] >= log_snr[:-1]
        if rising.any():
            k = int(torch.nonzero(rising)[0]) + 1
            raise ValueError(
                f"invalid schedule: its log-SNR is not strictly decreasing: log snr_{k + 1} = "
                f"{log_snr[k].item():.6g} after log snr_{k} = {log_snr[k - 1].item():.6g}"
            )
        _refuse_invalid_betas(tables.betas.detach().cpu())
        return self

    # ------------------------------------------------------------------ sub-chains
    def respace(self, timesteps: torch.Tensor | list[int]) -> Schedule:
        r"""The schedule of the sub-chain that visits only the math timesteps :math:`t_1 < \dots < t_K` of this one:
        its :math:`\bar\alpha'_i = \bar\alpha_{t_i}` (improved-diffusion's ``respace.py``; docs/MATH.md, section 13.4,
        "Respacing").  Here a :class:`RespacedSchedule`, which computes its tables from this schedule's and so shares
        its parameters; :meth:`NoiseSchedule.respace` makes a fixed one.

        :param timesteps: strictly increasing math timesteps in ``1..T``, at least one (e.g.
            :meth:`evenly_spaced_timesteps`).
        """
        return RespacedSchedule(self, self.validated_timesteps(timesteps))

    def evenly_spaced_timesteps(self, count: int) -> torch.Tensor:
        r"""``count`` evenly spaced math timesteps with this schedule's endpoints, for :meth:`respace`.

        For :math:`K = \text{count} \ge 2`: :math:`t_i = \lfloor 1 + (i - 1)\frac{T - 1}{K - 1} + \tfrac12 \rfloor`,
        :math:`i = 1..K` (``linspace(1, T, K)`` rounded half up), so :math:`t_1 = 1` and :math:`t_K = T`; for
        :math:`K \le T` the spacing :math:`(T - 1)/(K - 1)` is at least 1 and rounding half up keeps the
        timesteps strictly increasing (:math:`\lfloor y + \tfrac12 \rfloor \ge \lfloor x + \tfrac12 \rfloor + 1` when
        :math:`y \ge x + 1`).  For :math:`K = 1`: :math:`[T]`, the one step from :math:`x_0` to :math:`x_T`.
        Returns a LongTensor of length ``count``.
        """
        T = self.num_steps
        checks.int_in("count", count, 1, T, hi_name="T")
        if count == 1:
            return torch.tensor([T])
        grid = torch.linspace(1, T, count, dtype=torch.float64)
        return torch.floor(grid + 0.5).long()

    def validated_timesteps(self, timesteps: torch.Tensor | list[int]) -> torch.Tensor:
        """``timesteps`` as a LongTensor (on the CPU), refused unless a non-empty, strictly increasing 1-D sequence of
        integers in 1..T."""
        T = self.num_steps
        t = torch.as_tensor(timesteps).detach().cpu()
        if t.dim() != 1 or t.numel() == 0:
            raise ValueError(f"timesteps must be a non-empty 1-D sequence, got shape {tuple(t.shape)}")
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise TypeError(f"timesteps must be integers, got dtype {t.dtype}")
        t = t.long()
        outside = (t < 1) | (t > T)
        if outside.any():
            raise ValueError(f"timesteps must lie in 1..T = 1..{T}, got {t[outside][0].item()}")
        if (t[1:] <= t[:-1]).any():
            i = int(torch.nonzero(t[1:] <= t[:-1])[0]) + 1
            raise ValueError(
                f"timesteps must be strictly increasing, got {t[i - 1].item()} then {t[i].item()} at position {i}"
            )
        return t

    # ------------------------------------------------------------------ module
    def extra_repr(self) -> str:
        return f"num_steps={self.num_steps}, kind={self.description['kind']!r}"

    def _apply(self, fn, recurse: bool = True):
        """Apply ``fn`` (a move or a cast of every tensor) but keep each tensor's dtype (class docstring)."""

        def keep_dtype(tensor: torch.Tensor) -> torch.Tensor:
            applied = fn(tensor)
            return applied if applied.dtype == tensor.dtype else tensor.to(applied.device)

        return super()._apply(keep_dtype, recurse)


class NoiseSchedule(Schedule):
    r"""A fixed variance schedule :math:`\beta_1, \dots, \beta_T`, its tables (:class:`ScheduleTables`) computed once
    in float64 (:meth:`ScheduleTables.from_betas`) and held as buffers of the same names: ``betas``, ``alphas``,
    ``alphas_cumprod``, ``alphas_cumprod_prev``, ``log_snr``, ``posterior_variance``, ``posterior_mean_coef_x0``,
    ``posterior_mean_coef_xt``, so that :math:`q(x_{t-1} \mid x_t, x_0) = N(\text{coef}_{x_0} x_0 +
    \text{coef}_{x_t} x_t, \tilde\beta_t I)` (Ho et al. 2020, eq. 6-7).  The buffers are not part of the
    ``state_dict``: the description makes them again.

    A schedule is refused with :class:`ValueError` unless every :math:`\beta_t` is finite and
    strictly inside (0, 1) and the log-SNR decreases strictly in ``t``.
    """

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    log_snr: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_mean_coef_x0: torch.Tensor
    posterior_mean_coef_xt: torch.Tensor

    def __init__(self, betas: torch.Tensor | list[float], description: dict | None = None) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().clone()
        if betas.dim() != 1 or betas.numel() < 1:
            raise ValueError(
                f"invalid schedule: betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}"
            )
        _refuse_invalid_betas(betas)
        tables = ScheduleTables.from_betas(betas)
        _refuse_invalid_log_snr(tables.log_snr)
        super().__init__(betas.numel(), {"kind": "betas", **(description or {})})
        for name, table in tables._asdict().items():
            self.register_buffer(name, table, persistent=False)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def linear(cls, num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        r"""Ho et al. (2020): :math:`\beta_t` linear from ``beta_start`` to ``beta_end``.

        The endpoints are the paper's for ``T = 1000``; they are used as given for any ``T``.
        """
        check_num_steps(num_steps)
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        return cls(betas, {"kind": "linear", "beta_start": beta_start, "beta_end": beta_end})

    @classmethod
    def cosine(cls, num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        r"""Nichol & Dhariwal (2021), eq. 17: :math:`\bar\alpha_t = f(t)/f(0)`,
        :math:`f(t) = \cos^2\!\big(\tfrac{t/T + s}{1 + s}\tfrac{\pi}{2}\big)`, and
        :math:`\beta_t = \min(1 - \bar\alpha_t / \bar\alpha_{t-1}, \text{max\_beta})`.
        """
        check_num_steps(num_steps)
        t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        return cls(torch.clamp(1 - f[1:] / f[:-1], max=max_beta), {"kind": "cosine", "s": s, "max_beta": max_beta})

    @classmethod
    def sigmoid(
        cls, num_steps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0, max_beta: float = 0.999
    ) -> NoiseSchedule:
        r"""Chen (2023), "On the importance of noise scheduling": with :math:`\sigma` the logistic
        function, :math:`\bar\alpha(u) = \frac{\sigma(e/\tau) - \sigma((u(e - s) + s)/\tau)}
        {\sigma(e/\tau) - \sigma(s/\tau)}` for :math:`u = t/T`, and
        :math:`\beta_t = \min(1 - \bar\alpha_t / \bar\alpha_{t-1}, \text{max\_beta})`.
        """
        check_num_steps(num_steps)
        if not end > start or not tau > 0:
            raise ValueError(f"invalid schedule: sigmoid needs end > start and tau > 0, got {start}, {end}, {tau}")
        u = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        v_start, v_end = torch.sigmoid(torch.tensor([start / tau, end / tau], dtype=torch.float64))
        abar = (v_end - torch.sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)
        return cls(
            torch.clamp(1 - abar[1:] / abar[:-1], max=max_beta),
            {"kind": "sigmoid", "start": start, "end": end, "tau": tau, "max_beta": max_beta},
        )

    @classmethod
    def from_betas(cls, betas: torch.Tensor | list[float]) -> NoiseSchedule:
        """A schedule from explicit variances ``beta_1..beta_T`` (validated)."""
        return cls(betas)

    # ------------------------------------------------------------------ its state
    def tables(self) -> ScheduleTables:
        """The buffers (computed when the schedule was made)."""
        return ScheduleTables(*(getattr(self, name) for name in ScheduleTables._fields))

    def check(self) -> NoiseSchedule:
        """Nothing to do: a fixed schedule was validated when it was made, and its tables never change."""
        return self

    def respace(self, timesteps: torch.Tensor | list[int]) -> NoiseSchedule:
        r"""The fixed schedule of the sub-chain that visits only the math timesteps :math:`t_1 < \dots < t_K` of this
        one.

        The forward marginals :math:`q(x_{t_i} \mid x_0)` of the sub-chain are this chain's, so its
        :math:`\bar\alpha'_i = \bar\alpha_{t_i}` and (improved-diffusion's ``respace.py``, Nichol & Dhariwal 2021)

        .. math:: \beta'_i = 1 - \bar\alpha_{t_i} / \bar\alpha_{t_{i-1}}, \qquad \bar\alpha_{t_0} = 1,

        i.e. :math:`1 - \prod_{t_{i-1} < s \le t_i} (1 - \beta_s)`; the sub-chain's :math:`\bar\alpha'_i`, recomputed
        from these betas, is :math:`\bar\alpha_{t_i}` up to the rounding of :math:`1 - \beta'_i` (about 1e-16 absolute).
        Where :math:`t_i = t_{i-1} + 1` this is :math:`\beta_{t_i}` itself, taken as is, so respacing at every
        timestep gives this schedule back exactly.
        The sub-chain's step ``i`` (1..K) is this chain's step :math:`t_i`; ``description`` records the visited
        timesteps and this schedule's own description.  It is computed on the CPU and put on this schedule's device.

        :param timesteps: strictly increasing math timesteps in ``1..T``, at least one (e.g.
            :meth:`evenly_spaced_timesteps`).
        """
        t = self.validated_timesteps(timesteps)
        previous = torch.cat([t.new_zeros(1), t[:-1]])
        own_betas, own_abar = self.betas.cpu(), self.alphas_cumprod.cpu()
        abar = torch.cat([own_abar.new_ones(1), own_abar])  # entry t holds abar_t
        consecutive = t == previous + 1
        betas = torch.where(consecutive, own_betas[t - 1], 1.0 - abar[t] / abar[previous])
        description = {"kind": "respaced", "timesteps": t.tolist(), "of": dict(self.description)}
        return NoiseSchedule(betas, description).to(self.betas.device)

    def extra_repr(self) -> str:
        return (
            f"num_steps={self.num_steps}, beta_1={self.betas[0].item():.3g}, "
            f"beta_T={self.betas[-1].item():.3g}, alpha_bar_T={self.alphas_cumprod[-1].item():.3g}"
        )


class RespacedSchedule(Schedule):
    r"""The sub-chain of a schedule with parameters that visits only its math timesteps :math:`t_1 < \dots < t_K`
    (:meth:`Schedule.respace`): :math:`\lambda'_i = \lambda_{t_i}`, so :math:`\bar\alpha'_i = \bar\alpha_{t_i}` and
    :math:`\beta'_i = 1 - \bar\alpha_{t_i} / \bar\alpha_{t_{i-1}}` (:meth:`ScheduleTables.from_log_snr`), computed from
    the original's tables at every call: it holds the original as a submodule and shares its parameters.  Its step
    ``i`` is the original's step :math:`t_i`."""

    def __init__(self, schedule: Schedule, timesteps: torch.Tensor) -> None:
        t = schedule.validated_timesteps(timesteps)
        super().__init__(t.numel(), {"kind": "respaced", "timesteps": t.tolist(), "of": dict(schedule.description)})
        self.original = schedule
        state = next(iter([*schedule.parameters(), *schedule.buffers()]), None)
        self.register_buffer("timesteps", t if state is None else t.to(state.device), persistent=False)

    def tables(self) -> ScheduleTables:
        return ScheduleTables.from_log_snr(self.original.tables().log_snr[self.timesteps - 1])

    def respace(self, timesteps: torch.Tensor | list[int]) -> RespacedSchedule:
        """Respacing a sub-chain visits the chosen ones of its timesteps on the original."""
        t = self.validated_timesteps(timesteps).to(self.timesteps.device)
        return RespacedSchedule(self.original, self.timesteps[t - 1].cpu())


def _refuse_invalid_betas(betas: torch.Tensor) -> None:
    """Refuse betas (float64, on the CPU) that are not finite or not strictly inside (0, 1), naming the first."""
    if not torch.isfinite(betas).all():
        bad = int(torch.nonzero(~torch.isfinite(betas))[0]) + 1
        raise ValueError(f"invalid schedule: beta_{bad} is not finite ({betas[bad - 1].item()})")
    outside = (betas <= 0) | (betas >= 1)
    if outside.any():
        bad = int(torch.nonzero(outside)[0]) + 1
        raise ValueError(f"invalid schedule: beta_{bad} = {betas[bad - 1].item()!r} is not strictly inside (0, 1)")


def _refuse_invalid_log_snr(log_snr: torch.Tensor) -> None:
    """Refuse a log-SNR (on the CPU) that is not finite or not strictly decreasing."""
    if not torch.isfinite(log_snr).all() or (log_snr[1:] >= log_snr[:-1]).any():
        raise ValueError(
            "invalid schedule: the log-SNR log(alpha_bar_t / (1 - alpha_bar_t)) must be finite and "
            "strictly decreasing in t (alpha_bar_t underflows or stalls in float64)"
        )
