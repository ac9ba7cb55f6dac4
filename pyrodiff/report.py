r"""The bound report: where the bits go, term by term, with uncertainties and plots.

:func:`write_report` turns the draws of :func:`pyrodiff.bound.bound_terms` into ``bound.json``,
``terms.csv``, ``summary.md`` and three plots (the terms :math:`L_k` on a log scale with error bars;
the cumulative rate; the rate-distortion curve of progressive decoding, Ho et al. 2020, section 4.3).
Uncertainty: the standard error across examples of each term's mean, and ArviZ's Monte Carlo standard
error and effective sample size of the per-term draws (chains = independent draws of the noisy
inputs, draws = examples).  Every file is written to a temporary folder first and moved into place
only when all are complete.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from .bound import BoundTerms
from .plots import plt

__all__ = ["write_report", "summarise", "progressive_rate_distortion"]


def _arviz_stats(terms: BoundTerms) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az

        data = az.convert_to_dataset({"L": terms.nats.double().cpu().numpy()}, dims={"L": ["k"]})
        mcse = az.mcse(data, method="mean")["L"].values
        ess = az.ess(data, method="mean")["L"].values
    return mcse, ess


def progressive_rate_distortion(terms: BoundTerms) -> tuple[np.ndarray, np.ndarray]:
    r"""For stopping the reverse process at t = T..1: the rate :math:`\sum_{k \ge t} L_k` in bits/dim
    received so far, and the distortion, the RMSE of :math:`\hat x_0(x_t)` on the 0..255 scale."""
    rate = terms.to_bits_per_dim(terms.mean()).double().cpu().numpy()[1:]  # L_1..L_T
    received = np.cumsum(rate[::-1])  # t = T, T-1, .., 1
    mse = terms.x0_sq_error.double().mean((0, 1)).cpu().numpy() / terms.dims  # per dimension, t = 1..T
    rmse_255 = np.sqrt(mse[::-1]) * 127.5
    return received, rmse_255


def summarise(terms: BoundTerms, meta: dict | None = None, log_q=None) -> dict:
    r"""The content of ``bound.json``; with the exact data log-density ``log_q`` of each example, also the
    bound on :math:`\mathrm{KL}(q(x_0) \,\|\, p_\theta(x_0))` (:meth:`~pyrodiff.bound.BoundTerms.kl_bound`)."""
    mean, stderr = terms.mean().double().cpu().numpy(), terms.stderr().double().cpu().numpy()
    mcse, ess = _arviz_stats(terms)
    to_bpd = 1 / (terms.dims * math.log(2))
    total = float(mean.sum())
    if log_q is not None:
        kl, kl_stderr = terms.kl_bound(log_q)
        meta = {**(meta or {}), "kl_bound_nats": kl, "kl_bound_stderr": kl_stderr}
    return {
        **(meta or {}),
        "num_examples": int(terms.nats.shape[1]),
        "num_samples": int(terms.nats.shape[0]),
        "num_steps": terms.num_steps,
        "dims": terms.dims,
        "decoder": terms.decoder,
        "levels": terms.levels,
        "bits_per_dim_is_8bit_scale": terms.is_8bit_scale,
        "total_nats": total,
        "total_stderr": terms.total_stderr(),
        "bits_per_dim": total * to_bpd,
        "bits_per_dim_stderr": terms.total_stderr() * to_bpd,
        "rate_bits_per_dim": float(mean[1:].sum()) * to_bpd,
        "distortion_bits_per_dim": float(mean[0]) * to_bpd,
        "terms_nats": mean.tolist(),
        "terms_stderr": stderr.tolist(),
        "terms_mcse": mcse.tolist(),
        "terms_ess": ess.tolist(),
    }


def _summary_markdown(s: dict) -> str:
    T = s["num_steps"]
    mean, se = np.array(s["terms_nats"]), np.array(s["terms_stderr"])
    to_bpd = 1 / (s["dims"] * math.log(2))
    edges = [0, 1, 2, 11, 101, T]
    rows = [("L_0 (decoder, distortion)", slice(0, 1))]
    for lo, hi in zip(edges[1:-1], edges[2:], strict=False):
        if lo < T:
            hi = min(hi, T)
            rows.append((f"L_{lo}" + (f" .. L_{hi - 1}" if hi - 1 > lo else ""), slice(lo, hi)))
    rows.append((f"L_{T} (prior)", slice(T, T + 1)))
    scale = "8-bit scale" if s["bits_per_dim_is_8bit_scale"] else f"{s['decoder']} decoder, levels={s['levels']}"
    lines = [
        f"# Where the bits go ({s.get('name', 'model')}, {s.get('split', '')} split)",
        "",
        f"{s['num_examples']} examples x {s['num_samples']} draws of the noisy inputs; bits/dim on the {scale}.",
        "",
        "| terms | nats/example | +- stderr | bits/dim | share of bound |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, sl in rows:
        v, e = mean[sl].sum(), math.sqrt((se[sl] ** 2).sum())
        lines.append(f"| {label} | {v:.4f} | {e:.4f} | {v * to_bpd:.4f} | {100 * v / s['total_nats']:.1f}% |")
    lines += [
        f"| **total (negative ELBO)** | **{s['total_nats']:.4f}** | {s['total_stderr']:.4f} | **{s['bits_per_dim']:.4f}** | 100% |",
        "",
        f"rate (L_1 .. L_T): {s['rate_bits_per_dim']:.4f} bits/dim; distortion (L_0): {s['distortion_bits_per_dim']:.4f} bits/dim.",
    ]
    if "kl_bound_nats" in s:
        lines.append(
            f"Bound on KL(q(x_0) || p_theta(x_0)), negative ELBO + log q(x_0) paired per example: "
            f"{s['kl_bound_nats']:.4f} +- {s['kl_bound_stderr']:.4f} nats."
        )
    lines += [
        f"ArviZ: smallest ESS over terms {min(s['terms_ess']):.0f}, largest MCSE {max(s['terms_mcse']):.3g} nats.",
        "",
    ]
    return "\n".join(lines)


def _plots(terms: BoundTerms, s: dict, folder: Path) -> None:
    k = np.arange(terms.num_steps + 1)
    mean, se = np.array(s["terms_nats"]), np.array(s["terms_stderr"])
    to_bpd = 1 / (s["dims"] * math.log(2))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.errorbar(k, mean * to_bpd, yerr=se * to_bpd, fmt=".", ms=2, elinewidth=0.6, capsize=0)
    ax.set_yscale("log")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(-0.3, terms.num_steps * 1.15)
    ax.set_xlabel("k (L_0 decoder, L_1..L_{T-1} denoising KLs, L_T prior)")
    ax.set_ylabel("L_k (bits/dim)")
    ax.set_title("Terms of the bound, mean +- standard error" + (" (L_0 < 0 not shown)" if mean[0] <= 0 else ""))
    fig.savefig(folder / "terms.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    cumulative = np.cumsum((mean * to_bpd)[::-1])[::-1]  # sum_{j >= k} L_j
    ax.plot(k[1:], cumulative[1:])
    ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("rate sum_{j >= k} L_j (bits/dim)")
    ax.set_title(f"Cumulative rate (total rate {s['rate_bits_per_dim']:.3f} bits/dim)")
    fig.savefig(folder / "cumulative_rate.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    rate, rmse = progressive_rate_distortion(terms)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(rate, rmse)
    ax.set_xlabel("rate received (bits/dim)")
    ax.set_ylabel("distortion: RMSE of x0_hat on 0..255")
    ax.set_title("Progressive decoding (Ho et al. 2020, 4.3)")
    fig.savefig(folder / "rate_distortion.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_report(terms: BoundTerms, out_dir: str | Path, meta: dict | None = None, log_q=None) -> dict:
    """Write ``bound.json``, ``terms.csv``, ``summary.md`` and the plots to ``out_dir``; return the summary
    (``log_q``: see :func:`summarise`)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = summarise(terms, meta, log_q)
    staging = Path(tempfile.mkdtemp(prefix=".report-", dir=out.parent))
    try:
        (staging / "bound.json").write_text(json.dumps(summary, indent=2) + "\n")
        to_bpd = 1 / (terms.dims * math.log(2))
        with open(staging / "terms.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["k", "nats", "stderr", "bits_per_dim", "mcse", "ess"])
            for k, (m, e, mc, es) in enumerate(
                zip(
                    summary["terms_nats"],
                    summary["terms_stderr"],
                    summary["terms_mcse"],
                    summary["terms_ess"],
                    strict=True,
                )
            ):
                w.writerow([k, f"{m:.8g}", f"{e:.4g}", f"{m * to_bpd:.8g}", f"{mc:.4g}", f"{es:.1f}"])
        rate, rmse = progressive_rate_distortion(terms)
        with open(staging / "rate_distortion.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["t", "rate_bits_per_dim", "rmse_0_255"])
            w.writerows(
                (terms.num_steps - i, f"{r:.6g}", f"{d:.6g}") for i, (r, d) in enumerate(zip(rate, rmse, strict=True))
            )
        (staging / "summary.md").write_text(_summary_markdown(summary))
        _plots(terms, summary, staging)
        out.mkdir(parents=True, exist_ok=True)
        for f in staging.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


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
) -> tuple[dict, Path]:
    """Decompose the bound of a checkpoint's EMA model on a data split and write the report
    (default folder: ``report-SPLIT`` beside the checkpoint).  Returns the summary and the folder."""
    import torch

    from .bound import bound_terms
    from .train import load_trained

    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    built, model = load_trained(checkpoint, device, data_root)
    data = getattr(built.data, split)[:max_examples]
    if len(data) == 0:
        raise ValueError(f"the {split} split has no examples to report on")
    if tuple(data.shape[1:]) != model.data_shape:
        raise ValueError(
            f"checkpoint's data shape {model.data_shape} does not match the {split} data {tuple(data.shape[1:])}"
        )
    torch.manual_seed(0)
    terms = bound_terms(model, data.to(device), num_samples=num_samples, draws=draws, chunk_size=chunk_size)
    out = Path(out_dir) if out_dir else Path(checkpoint).parent / f"report-{split}"
    meta = {"name": built.spec["name"], "checkpoint": str(checkpoint), "split": split, "draws": draws}
    log_q = built.data.log_density(data) if built.data.log_density else None
    return write_report(terms, out, meta, log_q), out
