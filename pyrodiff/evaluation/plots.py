"""Pictures of samples (a grid of images, or a scatter of 2-D samples over the data) and of noise schedules.

Figures are made with matplotlib's object-oriented API (:class:`matplotlib.figure.Figure`, no pyplot), so
drawing chooses no backend for the process and opens no window; matplotlib is imported at the first figure, not
with this module (``import pyrodiff`` does not load it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["save_samples_figure", "save_schedule_figure"]


def save_samples_figure(
    samples: torch.Tensor, path: str | Path, data: torch.Tensor | None = None, title: str = ""
) -> None:
    """Write ``samples`` (images ``(N, C, H, W)`` in [-1, 1], or points ``(N, 2)``) as a PNG to ``path``
    (through a temporary file, so an existing picture is replaced only by a complete one)."""
    samples = samples.detach().float().cpu()
    fig = _image_grid(samples) if samples.dim() == 4 else _scatter(samples, data)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def save_schedule_figure(
    times: torch.Tensor, log_snrs: dict[str, torch.Tensor], path: str | Path, title: str = ""
) -> None:
    r"""Write, as a PNG to ``path``, each schedule of ``log_snrs`` (a name and its log-SNR :math:`\lambda` at ``times``
    in [0, 1]) in two panels: :math:`\log_{10}\mathrm{SNR}(t)` and :math:`\sigma(t) = \sqrt{\mathrm{sigmoid}(-\lambda)}`,
    the noise's standard deviation in :math:`z_t = \alpha_t x + \sigma_t\epsilon`."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6))
    snr_ax, sigma_ax = fig.subplots(1, 2)
    t = times.detach().double().cpu().numpy()
    for name, log_snr in log_snrs.items():
        lam = log_snr.detach().double().cpu()
        snr_ax.plot(t, (lam / math.log(10)).numpy(), label=name)
        sigma_ax.plot(t, torch.sigmoid(-lam).sqrt().numpy(), label=name)
    snr_ax.set(xlabel="t", ylabel="log10 SNR(t)")
    sigma_ax.set(xlabel="t", ylabel="sigma(t)", yscale="log")
    snr_ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def _save(fig: Figure, path: str | Path) -> None:
    """Write ``fig`` through a temporary file, so an existing picture is replaced only by a complete one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    tmp.replace(path)


def _image_grid(images: torch.Tensor) -> Figure:
    from matplotlib.figure import Figure

    n = images.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    C, H, W = images.shape[1:]
    grid = torch.full((rows * (H + 1) + 1, cols * (W + 1) + 1, C), 0.3)  # light grey spacers
    for i, img in enumerate(((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)):
        r, c = divmod(i, cols)
        grid[1 + r * (H + 1) : 1 + r * (H + 1) + H, 1 + c * (W + 1) : 1 + c * (W + 1) + W] = img
    fig = Figure(figsize=(cols * 0.6 + 1, rows * 0.6 + 1))
    ax = fig.subplots()
    ax.imshow(
        grid.squeeze(-1).numpy() if C == 1 else grid.numpy(),
        cmap="gray_r" if C == 1 else None,
        vmin=0,
        vmax=1,
        interpolation="nearest",
    )
    ax.axis("off")
    return fig


def _scatter(points: torch.Tensor, data: torch.Tensor | None) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    if data is not None:
        d = data.detach().float().cpu()[: len(points) * 4]
        ax.scatter(d[:, 0], d[:, 1], s=2, alpha=0.3, c="tab:blue", label="data")
    ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.6, c="tab:red", label="samples")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=4)
    return fig
