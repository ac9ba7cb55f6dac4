"""Noise schedules: the variances beta_1..beta_T of the forward chain and every derived quantity.

All quantities are held in float64 (docs/MATH.md, section 1, "Noise schedules") and indexed so that entry
``t - 1`` belongs to the math timestep ``t`` in 1..T.  Per-device, per-dtype copies used in
the hot path are cached by :meth:`NoiseSchedule.coefficients`.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from .. import checks

__all__ = ["NoiseSchedule"]


class NoiseSchedule:
    r"""A variance schedule :math:`\beta_1, \dots, \beta_T` and its derived quantities.

    With :math:`\alpha_t = 1 - \beta_t` and :math:`\bar\alpha_t = \prod_{s \le t} \alpha_s`
    (:math:`\bar\alpha_0 = 1`), the attributes are (each a float64 tensor of length ``T``,
    entry ``t - 1`` for timestep ``t``):

    - ``betas`` :math:`\beta_t`, ``alphas`` :math:`\alpha_t`
    - ``alphas_cumprod`` :math:`\bar\alpha_t`, ``alphas_cumprod_prev`` :math:`\bar\alpha_{t-1}`
    - ``log_snr`` :math:`\log \bar\alpha_t - \log(1 - \bar\alpha_t)`
    - ``posterior_variance`` :math:`\tilde\beta_t = \beta_t (1 - \bar\alpha_{t-1}) / (1 - \bar\alpha_t)`
    - ``posterior_mean_coef_x0`` :math:`\sqrt{\bar\alpha_{t-1}}\,\beta_t / (1 - \bar\alpha_t)`
    - ``posterior_mean_coef_xt`` :math:`\sqrt{\alpha_t}\,(1 - \bar\alpha_{t-1}) / (1 - \bar\alpha_t)`

    so that :math:`q(x_{t-1} \mid x_t, x_0) = N(\text{coef}_{x_0} x_0 + \text{coef}_{x_t} x_t,
    \tilde\beta_t I)` (Ho et al. 2020, eq. 6-7).

    A schedule is refused with :class:`ValueError` unless every :math:`\beta_t` is finite and
    strictly inside (0, 1) and the log-SNR decreases strictly in ``t``.
    """

    def __init__(self, betas: torch.Tensor | list[float], description: dict | None = None) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().clone()
        if betas.dim() != 1 or betas.numel() < 1:
            raise ValueError(
                f"invalid schedule: betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}"
            )
        if not torch.isfinite(betas).all():
            bad = int(torch.nonzero(~torch.isfinite(betas))[0]) + 1
            raise ValueError(f"invalid schedule: beta_{bad} is not finite ({betas[bad - 1].item()})")
        outside = (betas <= 0) | (betas >= 1)
        if outside.any():
            bad = int(torch.nonzero(outside)[0]) + 1
            raise ValueError(f"invalid schedule: beta_{bad} = {betas[bad - 1].item()!r} is not strictly inside (0, 1)")
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, 0)
        log_snr = torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod)
        if not torch.isfinite(log_snr).all() or (log_snr[1:] >= log_snr[:-1]).any():
            raise ValueError(
                "invalid schedule: the log-SNR log(alpha_bar_t / (1 - alpha_bar_t)) must be finite and "
                "strictly decreasing in t (alpha_bar_t underflows or stalls in float64)"
            )
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        self.betas = betas
        self.alphas = alphas
        self.alphas_cumprod = alphas_cumprod
        self.alphas_cumprod_prev = alphas_cumprod_prev
        self.log_snr = log_snr
        self.posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.posterior_mean_coef_x0 = alphas_cumprod_prev.sqrt() * betas / (1.0 - alphas_cumprod)
        self.posterior_mean_coef_xt = alphas.sqrt() * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self._cache: dict[tuple[str, torch.device, torch.dtype], object] = {}
        #: how the schedule was made (recorded in reports): the constructor and its arguments
        self.description = {"kind": "betas", "num_steps": self.num_steps, **(description or {})}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def linear(cls, num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        r"""Ho et al. (2020): :math:`\beta_t` linear from ``beta_start`` to ``beta_end``.

        The endpoints are the paper's for ``T = 1000``; they are used as given for any ``T``.
        """
        _check_num_steps(num_steps)
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        return cls(betas, {"kind": "linear", "beta_start": beta_start, "beta_end": beta_end})

    @classmethod
    def cosine(cls, num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        r"""Nichol & Dhariwal (2021), eq. 17: :math:`\bar\alpha_t = f(t)/f(0)`,
        :math:`f(t) = \cos^2\!\big(\tfrac{t/T + s}{1 + s}\tfrac{\pi}{2}\big)`, and
        :math:`\beta_t = \min(1 - \bar\alpha_t / \bar\alpha_{t-1}, \text{max\_beta})`.
        """
        _check_num_steps(num_steps)
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
        _check_num_steps(num_steps)
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

    # ------------------------------------------------------------------ helpers
    @property
    def num_steps(self) -> int:
        """``T``, the number of noising steps."""
        return self.betas.numel()

    # ------------------------------------------------------------------ sub-chains
    def respace(self, timesteps: torch.Tensor | list[int]) -> NoiseSchedule:
        r"""The schedule of the sub-chain that visits only the math timesteps :math:`t_1 < \dots < t_K` of this one.

        The forward marginals :math:`q(x_{t_i} \mid x_0)` of the sub-chain are this chain's, so its
        :math:`\bar\alpha'_i = \bar\alpha_{t_i}` and (improved-diffusion's ``respace.py``, Nichol & Dhariwal 2021)

        .. math:: \beta'_i = 1 - \bar\alpha_{t_i} / \bar\alpha_{t_{i-1}}, \qquad \bar\alpha_{t_0} = 1,

        i.e. :math:`1 - \prod_{t_{i-1} < s \le t_i} (1 - \beta_s)`; the sub-chain's :math:`\bar\alpha'_i`, recomputed
        from these betas, is :math:`\bar\alpha_{t_i}` up to the rounding of :math:`1 - \beta'_i` (about 1e-16 absolute).
        Where :math:`t_i = t_{i-1} + 1` this is :math:`\beta_{t_i}` itself, taken as is, so respacing at every
        timestep gives this schedule back exactly.
        The sub-chain's step ``i`` (1..K) is this chain's step :math:`t_i`; ``description`` records the visited
        timesteps and this schedule's own description.

        :param timesteps: strictly increasing math timesteps in ``1..T``, at least one (e.g.
            :meth:`evenly_spaced_timesteps`).
        """
        t = self.validated_timesteps(timesteps)
        previous = torch.cat([t.new_zeros(1), t[:-1]])
        abar = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod])  # entry t holds abar_t
        consecutive = t == previous + 1
        betas = torch.where(consecutive, self.betas[t - 1], 1.0 - abar[t] / abar[previous])
        description = {"kind": "respaced", "timesteps": t.tolist(), "of": dict(self.description)}
        return NoiseSchedule(betas, description)

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
        """``timesteps`` as a LongTensor (on the CPU), refused unless a non-empty, strictly increasing 1-D sequence of integers
        in 1..T."""
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

    def coefficients(self, device: torch.device | str, dtype: torch.dtype) -> SimpleNamespace:
        """All the per-timestep quantities above on ``device`` in ``dtype`` (computed in float64, cast once,
        cached, so that the hot path copies nothing from the host)."""
        return self.cached("coefficients", _all_coefficients, device, dtype)

    def cached(self, name: str, compute, device: torch.device | str, dtype: torch.dtype):
        """``compute(self)`` (a float64 table, or a namespace of them) cast to ``device`` and ``dtype`` once and
        cached under ``name``: how other modules keep their own per-timestep tables of this schedule on
        the device (e.g. the fixed reverse variances of :mod:`pyrodiff.chain.parameterization`)."""
        key = (name, torch.device(device), dtype)
        if key not in self._cache:
            value = compute(self)
            cast = lambda x: x.to(device=key[1], dtype=dtype)  # noqa: E731
            self._cache[key] = (
                SimpleNamespace(**{k: cast(v) for k, v in vars(value).items()})
                if isinstance(value, SimpleNamespace)
                else cast(value)
            )
        return self._cache[key]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoiseSchedule) and torch.equal(self.betas, other.betas)

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(num_steps={self.num_steps}, beta_1={self.betas[0].item():.3g}, "
            f"beta_T={self.betas[-1].item():.3g}, alpha_bar_T={self.alphas_cumprod[-1].item():.3g})"
        )


_COEFFICIENTS = (
    "betas",
    "alphas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "log_snr",
    "posterior_variance",
    "posterior_mean_coef_x0",
    "posterior_mean_coef_xt",
)


def _all_coefficients(schedule: NoiseSchedule) -> SimpleNamespace:
    return SimpleNamespace(**{n: getattr(schedule, n) for n in _COEFFICIENTS})


def _check_num_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"invalid schedule: num_steps must be a positive integer, got {num_steps!r}")
