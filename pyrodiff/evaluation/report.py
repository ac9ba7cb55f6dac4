r"""The bound report: where the bits go, term by term, with uncertainties and plots.

:func:`summarise` is the one schema of every bound pyrodiff writes (``bound.json`` of a report and the
``test_bound.json`` written after training): the model's choices (prediction, variance, decoder,
schedule), the total, rate and distortion, and every term with its standard error.
:func:`write_report` adds ``terms.csv``, ``rate_distortion.csv``, ``summary.md`` and three plots (the
terms :math:`L_k` on a log scale with error bars; the cumulative rate; the rate-distortion curve of
progressive decoding, Ho et al. 2020, section 4.3).  Uncertainty: the examples are independent, so the ``+-``
of every term and of the total is the plain standard error across examples (:meth:`BoundTerms.stderr`); ArviZ's
Monte Carlo diagnostics apply only to the repeated draws of the noisy inputs of one example (with at least
:data:`MIN_DRAWS_FOR_DIAGNOSTICS` draws per example): the Monte Carlo standard error of each term's mean that
comes from the draws, and the smallest effective sample size of one example's draws.  Every file is written to a
temporary folder first and moved into place only when all are complete; an existing report is never
replaced unless asked.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .bound import BoundTerms, nats_to_bits_per_dim

__all__ = ["summarise", "write_report", "progressive_rate_distortion", "draws_diagnostics"]

REPORT_FILES = (
    "bound.json",
    "terms.csv",
    "rate_distortion.csv",
    "summary.md",
    "terms.png",
    "cumulative_rate.png",
    "rate_distortion.png",
)


#: the fewest draws per example on which ArviZ's diagnostics of those draws are computed
MIN_DRAWS_FOR_DIAGNOSTICS = 4


def draws_diagnostics(terms: BoundTerms) -> tuple[np.ndarray, np.ndarray] | None:
    r"""ArviZ's diagnostics of the repeated draws of the noisy inputs, each example's S draws one chain, for each term
    :math:`L_k`: the Monte Carlo standard error of the term's mean over draws and examples that comes from the draws
    alone, :math:`\sqrt{\sum_n \mathrm{MCSE}_{n,k}^2} / N`, and the smallest effective sample size of one example's
    draws.  ``None`` with fewer than :data:`MIN_DRAWS_FOR_DIAGNOSTICS` draws per example.  The examples themselves
    are independent and not a chain: their spread is the plain standard error (:meth:`BoundTerms.stderr`)."""
    num_draws, num_examples = terms.nats.shape[:2]
    if num_draws < MIN_DRAWS_FOR_DIAGNOSTICS:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az

        draws = terms.nats.double().cpu().numpy()[None]  # (chain = 1, draw = S, example = N, k)
        data = az.convert_to_dataset({"L": draws}, dims={"L": ["example", "k"]})
        mcse = az.mcse(data, method="mean")["L"].values  # (N, T + 1)
        ess = az.ess(data, method="mean")["L"].values
    return np.sqrt((mcse**2).sum(0)) / num_examples, ess.min(0)


def progressive_rate_distortion(terms: BoundTerms) -> tuple[np.ndarray, np.ndarray]:
    r"""For stopping the reverse process at t = T, T-1, .., 1 (entry i is t = T - i): the rate
    :math:`\sum_{k \ge t} L_k` in bits/dim received so far, and the distortion, the root mean square error
    per dimension of :math:`\hat x_0(x_t)`, in the decoder's distortion units (grey levels for a discretized
    decoder, the data's own units for a continuous one)."""
    rate = terms.to_bits_per_dim(terms.mean()).double().cpu().numpy()[1:]  # L_1..L_T
    received = np.cumsum(rate[::-1])  # t = T, T-1, .., 1
    mse = terms.x0_sq_error.double().mean((0, 1)).cpu().numpy() / terms.dims  # per dimension, t = 1..T
    return received, np.sqrt(mse[::-1]) * terms.decoder.units_per_data_unit


def summarise(terms: BoundTerms, meta: dict | None = None, log_q: torch.Tensor | None = None) -> dict:
    r"""The content of ``bound.json`` (and of training's ``test_bound.json``): ``meta`` (name, split, ...),
    the model's choices, and every term; with the exact data log-density ``log_q`` of each example, also the
    bound on :math:`\mathrm{KL}(q(x_0) \,\|\, p_\theta(x_0))` (:meth:`~pyrodiff.evaluation.bound.BoundTerms.kl_bound`)."""
    mean, stderr = terms.mean().double().cpu().numpy(), terms.stderr().double().cpu().numpy()
    diagnostics = draws_diagnostics(terms)
    total, total_stderr = float(mean.sum()), terms.total_stderr()
    summary = {
        **(meta or {}),
        "model": terms.model,
        "num_examples": int(terms.nats.shape[1]),
        "num_samples": int(terms.nats.shape[0]),
        "num_steps": terms.num_steps,
        "dims": terms.dims,
        "decoder": terms.decoder.name,
        "levels": terms.decoder.levels,
        "scale": terms.decoder.describe(),
        "bits_per_dim_is_8bit_scale": terms.is_8bit_scale,
        "total_nats": total,
        "total_stderr": total_stderr,
        "bits_per_dim": nats_to_bits_per_dim(total, terms.dims),
        "bits_per_dim_stderr": nats_to_bits_per_dim(total_stderr, terms.dims),
        "rate_bits_per_dim": nats_to_bits_per_dim(float(mean[1:].sum()), terms.dims),
        "distortion_bits_per_dim": nats_to_bits_per_dim(float(mean[0]), terms.dims),
        "distortion_units": terms.decoder.distortion_units,
        "terms_nats": mean.tolist(),
        "terms_stderr": stderr.tolist(),
        "terms_bits_per_dim": nats_to_bits_per_dim(mean, terms.dims).tolist(),
        "terms_draws_mcse": None if diagnostics is None else diagnostics[0].tolist(),
        "terms_draws_ess": None if diagnostics is None else diagnostics[1].tolist(),
    }
    if log_q is not None:
        summary["kl_bound_nats"], summary["kl_bound_stderr"] = terms.kl_bound(log_q)
    return summary


def _row_groups(T: int) -> list[tuple[str, slice]]:
    """The rows of the summary table: L_0, L_1, L_2..L_10, L_11..L_100, L_101..L_{T-1}, L_T (as T allows)."""
    rows = [("L_0 (decoder, distortion)", slice(0, 1))]
    edges = [1, 2, 11, 101, T]
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        if lo < T:
            hi = min(hi, T)
            rows.append((f"L_{lo}" + (f" .. L_{hi - 1}" if hi - 1 > lo else ""), slice(lo, hi)))
    rows.append((f"L_{T} (prior)", slice(T, T + 1)))
    return rows


def summary_markdown(s: dict) -> str:
    """``summary.md``: the table of term groups (nats, standard error, bits/dim, share of the rate)."""
    T = s["num_steps"]
    mean, se = np.array(s["terms_nats"]), np.array(s["terms_stderr"])
    rate_nats = mean[1:].sum()
    m = s["model"]
    chain = [f"prediction {m['prediction']}, variance {m['variance']}, {m['schedule']['kind']} schedule, T = {T}"]
    if s.get("respaced_steps") is not None:
        chain.append(f"respaced to {s['respaced_steps']} steps")
    if s.get("eta") is not None:
        chain.append(f"DDIM's generative process with eta = {s['eta']:g}, scored against its inference family q_sigma")
    if s.get("training_steps") is not None:
        chain.append(
            f"trained for {s['training_steps']} steps" + (f" on {s['objective']}" if s.get("objective") else "")
        )
    lines = [
        f"# Where the bits go ({s.get('name', 'model')}, {s.get('split', 'given')} split)",
        "",
        f"{s['num_examples']} examples x {s['num_samples']} draws of the noisy inputs; {s['scale']}; "
        + "; ".join(chain)
        + ".",
        "",
        "| terms | nats/example | +- stderr | bits/dim | share of rate |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, sl in _row_groups(T):
        v, e = mean[sl].sum(), math.sqrt((se[sl] ** 2).sum())
        share = "" if sl.start == 0 else f"{100 * v / rate_nats:.1f}%"  # L_0 is distortion, and may be negative
        lines.append(f"| {label} | {v:.4f} | {e:.4f} | {nats_to_bits_per_dim(v, s['dims']):.4f} | {share} |")
    lines += [
        f"| **total (negative ELBO)** | **{s['total_nats']:.4f}** | {s['total_stderr']:.4f} | **{s['bits_per_dim']:.4f}** | |",
        "",
        f"rate (L_1 .. L_T): {s['rate_bits_per_dim']:.4f} bits/dim; distortion (L_0): {s['distortion_bits_per_dim']:.4f} bits/dim.",
    ]
    if "kl_bound_nats" in s:
        lines.append(
            f"Bound on KL(q(x_0) || p_theta(x_0)), negative ELBO + log q(x_0) paired per example: "
            f"{s['kl_bound_nats']:.4f} +- {s['kl_bound_stderr']:.4f} nats."
        )
    if s.get("continuous_bound"):
        c = s["continuous_bound"]
        terms = ", ".join(
            f"{name} {v:.4f} +- {e:.4f}"
            for name, v, e in zip(c["terms"], c["terms_nats"], c["terms_stderr"], strict=True)
        )
        lines += [
            "",
            f"The model is trained in continuous time: this table is its chain discretised at T = {T} steps. Its "
            f"continuous-time bound (T = infinity; {c['num_samples']} draws per example, stratified times): "
            f"**{c['total_nats']:.4f} +- {c['total_stderr']:.4f} nats, {c['bits_per_dim']:.4f} +- "
            f"{c['bits_per_dim_stderr']:.4f} bits/dim** ({terms} nats).",
        ]
    if s.get("schedule_curve"):
        g = s["schedule_curve"]
        lines.append(
            f"Schedule: gamma_0 = {g['gamma'][0]:.4f} (SNR_max = {math.exp(-g['gamma'][0]):.4g}), gamma_1 = "
            f"{g['gamma'][-1]:.4f} (SNR_min = {math.exp(-g['gamma'][-1]):.4g}); schedule.png plots it against "
            "DDPM's fixed schedules."
        )
    n, draws = s["num_examples"], s["num_samples"]
    lines.append(
        f"+- is the standard error across the {n} independent examples (each example's mean over its {draws} "
        f"draw{'s' if draws > 1 else ''} of the noisy inputs)."
    )
    if s["terms_draws_ess"] is None:
        lines.append(
            f"No Monte Carlo diagnostics of the draws: they need at least {MIN_DRAWS_FOR_DIAGNOSTICS} draws per "
            "example (--num-samples)."
        )
    else:
        lines.append(
            f"ArviZ, across the {draws} draws of each example: smallest effective sample size of one example's draws "
            f"{min(s['terms_draws_ess']):.1f} (of {draws}); largest Monte Carlo standard error of a term's mean from "
            f"the draws {max(s['terms_draws_mcse']):.3g} nats."
        )
    lines.append("")
    return "\n".join(lines)


def _plots(terms: BoundTerms, s: dict, folder: Path) -> None:
    from matplotlib.figure import Figure  # here, so that importing pyrodiff does not load matplotlib

    k = np.arange(terms.num_steps + 1)
    bpd = np.array(s["terms_bits_per_dim"])
    se = nats_to_bits_per_dim(np.array(s["terms_stderr"]), s["dims"])
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.errorbar(k, bpd, yerr=se, fmt=".", ms=2, elinewidth=0.6, capsize=0)
    ax.set_yscale("log")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(-0.3, terms.num_steps * 1.15)
    ax.set_xlabel("k (L_0 decoder, L_1..L_{T-1} denoising KLs, L_T prior)")
    ax.set_ylabel("L_k (bits/dim)")
    ax.set_title("Terms of the bound, mean +- standard error" + (" (L_0 <= 0 not shown)" if bpd[0] <= 0 else ""))
    fig.savefig(folder / "terms.png", dpi=110, bbox_inches="tight")

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    cumulative = np.cumsum(bpd[::-1])[::-1]  # sum_{j >= k} L_j
    ax.plot(k[1:], cumulative[1:])
    ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("rate sum_{j >= k} L_j (bits/dim)")
    ax.set_title(f"Cumulative rate (total rate {s['rate_bits_per_dim']:.3f} bits/dim)")
    fig.savefig(folder / "cumulative_rate.png", dpi=110, bbox_inches="tight")

    rate, rmse = progressive_rate_distortion(terms)
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    ax.plot(rate, rmse)
    ax.set_xlabel("rate received (bits/dim)")
    ax.set_ylabel(f"distortion: RMSE of x0_hat ({terms.decoder.distortion_units})")
    ax.set_title("Progressive decoding (Ho et al. 2020, 4.3)")
    fig.savefig(folder / "rate_distortion.png", dpi=110, bbox_inches="tight")


def write_report(
    terms: BoundTerms,
    out_dir: str | Path,
    meta: dict | None = None,
    log_q: torch.Tensor | None = None,
    overwrite: bool = False,
) -> dict:
    """Write :data:`REPORT_FILES` to ``out_dir``; return the summary (``log_q``: see :func:`summarise`).
    A folder that already holds a report is refused unless ``overwrite``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a report folder")
    if not overwrite and out.is_dir() and any((out / f).exists() for f in REPORT_FILES):
        raise FileExistsError(f"{out} already holds a report: choose another folder or pass --overwrite")
    summary = summarise(terms, meta, log_q)
    # the files are staged in a temporary folder inside ``out`` and each renamed into place (os.replace, never
    # through a link): the rename needs the same filesystem, which ``out`` itself is, and nothing is made beside it
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    try:
        (staging / "bound.json").write_text(json.dumps(summary, indent=2) + "\n")
        with open(staging / "terms.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["k", "nats", "stderr", "bits_per_dim", "draws_mcse", "draws_ess"])
            T = len(summary["terms_nats"])
            mcse = summary["terms_draws_mcse"] or [None] * T
            ess = summary["terms_draws_ess"] or [None] * T
            for k, (m, e, b, mc, es) in enumerate(
                zip(
                    summary["terms_nats"],
                    summary["terms_stderr"],
                    summary["terms_bits_per_dim"],
                    mcse,
                    ess,
                    strict=True,
                )
            ):
                diagnostics = ["", ""] if mc is None else [f"{mc:.4g}", f"{es:.1f}"]
                w.writerow([k, f"{m:.8g}", f"{e:.4g}", f"{b:.8g}", *diagnostics])
        rate, rmse = progressive_rate_distortion(terms)
        units = re.sub(r"[^0-9a-z]+", "_", terms.decoder.distortion_units.lower())
        with open(staging / "rate_distortion.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["t", "rate_bits_per_dim", f"rmse_{units}"])
            w.writerows(
                (terms.num_steps - i, f"{r:.6g}", f"{d:.6g}") for i, (r, d) in enumerate(zip(rate, rmse, strict=True))
            )
        (staging / "summary.md").write_text(summary_markdown(summary))
        _plots(terms, summary, staging)
        for f in staging.iterdir():
            os.replace(f, out / f.name)
    except BaseException:
        shutil.rmtree(out if created else staging, ignore_errors=True)  # a folder made for this report goes too
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return summary
