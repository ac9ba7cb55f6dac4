"""The seeds' questions answered with numbers: one report, from bundled data.

    python analysis/perspectives.py [--digits runs/digits/checkpoint.pt] [--digits-long runs/digits-long/checkpoint.pt]
        [--gaussians8 runs/gaussians8/checkpoint.pt] [--vae runs/perspectives/vae.pt] [--out runs/perspectives]
        [--ode-gaussians8 runs/ode-gaussians8/ode_likelihood.json] [--ode-digits runs/ode-digits/ode_likelihood.json]
        [--overwrite]
    python analysis/perspectives.py --quick --out DIR       # every section on small settings, minutes on 2 CPU cores
    python analysis/perspectives.py --reuse OLD/perspectives.json --out DIR   # A and D recomputed, B, C, E, F reused

1. "If q(x_{t-1} | x_t, x_0) is tractable, why do we need to learn p_theta at all?"  (section C)
2. "In what sense is training a diffusion model (a) maximum likelihood, (b) minimising an upper bound on
   KL(q(x_0) || p_theta(x_0)), (c) a hierarchical VAE whose encoder has no parameters, (d) breaking one hard
   problem into many easy ones?"  (sections A and B: a, b; E: c; D: d; F: b on real data)

The tutorial's fifth perspective, the connection with score matching, is section G: the same network's
probability-flow ODE likelihood beside its bounds, from ``analysis/ode_likelihood.py``'s reports (``--ode-gaussians8``,
``--ode-digits``; without one the section names the command that writes it).

Writes ``perspectives.md`` (every table), ``perspectives.json`` (every number, and the settings and command that
made them) and the plots into ``--out``.  Each section is computed by one function into ``perspectives.json`` and
written as text by another from those numbers alone (:func:`render`), so a report can be re-rendered from its JSON.

Checkpoints are passed in (``pyrodiff train`` makes them: the default digits run, ``--steps 10000 --out
runs/digits-long`` for the longer one, ``--config gaussians8 --out runs/gaussians8``); the VAE is trained here for
the digits run's own training time and saved as ``OUT/vae.pt`` unless ``--vae`` names one saved by an earlier run.
``--quick`` trains tiny checkpoints of its own into ``OUT/checkpoints`` (and a VAE for a few seconds) and runs every
section on small settings (section G: ``analysis/ode_likelihood.py`` with loose tolerances on a few examples of the
quick gaussians8 checkpoint): a check that the whole report runs, not a result.  ``--reuse`` takes sections B, C, E and
F from an earlier run's ``perspectives.json`` (their checkpoints are not needed) and recomputes A and D, which need
none; the header says which sections were reused.  Nothing in the report is typed by hand: every number is
computed by a run, with the seed fixed.  An existing report is never replaced without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import math
import runpy
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PROG = "perspectives"
REPORT = "perspectives.md"
NUMBERS = "perspectives.json"
DEFAULT_CHECKPOINTS = {
    "digits": Path("runs/digits/checkpoint.pt"),
    "digits_long": Path("runs/digits-long/checkpoint.pt"),
    "gaussians8": Path("runs/gaussians8/checkpoint.pt"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, path in DEFAULT_CHECKPOINTS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=Path, default=None, help=f"a checkpoint (default {path})")
    p.add_argument("--vae", type=Path, default=None, help="a VAE saved by an earlier run, OUT/vae.pt (else trained)")
    p.add_argument(
        "--vae-seconds",
        type=float,
        default=None,
        help="the VAE's training budget (default: the digits run's own training time)",
    )
    p.add_argument("--quick", action="store_true", help="tiny checkpoints trained here and small settings")
    p.add_argument("--reuse", type=Path, default=None, help="an earlier perspectives.json: B, C, E, F taken from it")
    p.add_argument(
        "--fixed-encoder",
        type=Path,
        default=Path("docs/fixed-encoder"),
        help="the folder of analysis/fixed_encoder.py's table.json, shown as section H (skipped if absent)",
    )
    for data in ("gaussians8", "digits"):
        p.add_argument(
            f"--ode-{data}",
            type=Path,
            default=None,
            metavar="JSON",
            help=f"analysis/ode_likelihood.py's ode_likelihood.json on {data}, shown in section G",
        )
    p.add_argument("--out", type=Path, default=Path("runs/perspectives"))
    p.add_argument("--overwrite", action="store_true")
    return p


if __name__ == "__main__":  # refuse bad arguments before torch and Pyro load (seconds)
    build_parser().parse_args()

import numpy as np  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import pyrodiff  # noqa: E402
from pyrodiff.data import GAUSSIANS8_ENTROPY, load_dataset, pixel_histogram_nats  # noqa: E402
from pyrodiff.evaluation.bound import bound_terms, nats_to_bits_per_dim  # noqa: E402
from pyrodiff.evaluation.likelihood import (  # noqa: E402
    KHAT_FINITE_VARIANCE,
    KHAT_UNRELIABLE,
    MIN_PARTICLES_FOR_KHAT,
    khat_threshold,
    log_likelihood_bound,
)
from pyrodiff.refusal import run_refusing  # noqa: E402
from pyrodiff.theory import exact  # noqa: E402
from pyrodiff.theory.empirical import EmpiricalReverse  # noqa: E402
from pyrodiff.theory.mixture import IsotropicGaussianMixture, moment_matched_bound  # noqa: E402
from pyrodiff.theory.vae import load_vae, negative_elbo, save_vae, train_vae  # noqa: E402
from pyrodiff.training.spec import load_spec  # noqa: E402

#: the fewest examples an estimate is reported with: its standard error is over examples
MIN_EXAMPLES = 10
#: a difference is called significant when it is at least this many standard errors from zero (about 95%, two-sided)
SIGNIFICANT_Z = 2.0
#: distances below it (exact copies, at distance 0) are drawn at log10 = -4 in exact_reverse.png, and say so
DISTANCE_FLOOR = 1e-4
#: step KLs below it are drawn at it on the log axis of many_easy_problems.png, and the axis says so
KL_FLOOR = 1e-6
#: the sections whose numbers need a checkpoint, taken from an earlier run by --reuse
CHECKPOINT_SECTIONS = ("B", "C", "E", "F")


@dataclass(frozen=True)
class Settings:
    """How much each section computes.  ``iwae``: per data set, (examples, particles K); ``exact_reverse``: per data
    set, (samples drawn, examples bounded); ``cost_tiles``: the training set tiled this many times for the cost
    of an exact reverse step."""

    name: str
    svi_steps: int
    respaced_steps: int
    iwae: dict
    exact_reverse: dict
    cost_tiles: tuple
    max_tiled_points: int
    many_easy_steps: tuple
    many_easy_draws: int


#: the committed report's settings; the IWAE particles are fewer for digits, where each of K paths costs 1000 U-Net calls
FULL = Settings(
    name="full",
    svi_steps=2000,
    respaced_steps=100,
    iwae={"gaussians8": (64, 1000), "digits": (16, 64)},
    exact_reverse={"digits": (64, 50), "gaussians8": (100, 100)},
    cost_tiles=(1, 10, 100),
    max_tiled_points=200_000,
    many_easy_steps=(1, 2, 5, 10, 20, 50, 100, 1000),
    many_easy_draws=4000,
)
QUICK = Settings(
    name="quick",
    svi_steps=100,
    respaced_steps=20,
    iwae={"gaussians8": (16, 32), "digits": (10, 21)},
    exact_reverse={"digits": (10, 10), "gaussians8": (16, 10)},
    cost_tiles=(1, 10),
    max_tiled_points=20_000,
    many_easy_steps=(1, 10, 50),
    many_easy_draws=500,
)

#: ``--quick``'s checkpoints: the bundled specifications with T = 50 (the linear schedule's betas scaled by
#: 1000 / 50, as improved-diffusion does) and small networks, trained for a few seconds each
QUICK_SCHEDULE = {"num_steps": 50, "beta_start": 2e-3, "beta_end": 0.4}
QUICK_SPECS = {
    "gaussians8": ("gaussians8", {"network": {"hidden": 32, "depth": 2}, "training": {"steps": 60, "batch_size": 128}}),
    "digits": (
        "digits",
        {"network": {"channels": 8, "channel_mult": [1], "attention_levels": []}, "training": {"steps": 20}},
    ),
    "digits_long": (
        "digits",
        {"network": {"channels": 8, "channel_mult": [1], "attention_levels": []}, "training": {"steps": 30}},
    ),
}
QUICK_VAE_SECONDS = 3.0


# ---------------------------------------------------------------------- helpers
def _mean_se(values) -> tuple[float, float]:
    """Mean and standard error over independent values (non-finite values are refused: they would be a broken
    model, not a number to average away)."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if not torch.isfinite(v).all():
        raise FloatingPointError(f"{int((~torch.isfinite(v)).sum())} of {v.numel()} values are not finite")
    return v.mean().item(), (v.std().item() / math.sqrt(v.numel()) if v.numel() > 1 else float("nan"))


def _fraction(hits: int, n: int) -> tuple[float, float]:
    """A fraction and its binomial standard error sqrt(p (1 - p) / n)."""
    p = hits / n
    return p, math.sqrt(p * (1 - p) / n)


def _z(difference: float, *stderrs: float) -> float:
    """A difference over the standard error of independent parts."""
    se = math.sqrt(sum(s * s for s in stderrs))
    return difference / se if se > 0 else math.copysign(math.inf, difference) if difference else 0.0


def _significance(z: float) -> str:
    return (
        f"{z:+.1f} standard errors: significant"
        if abs(z) >= SIGNIFICANT_Z
        else f"{z:+.1f} standard errors: not significant"
    )


def _table(header: list[str], rows: list[list]) -> str:
    def cell(x):
        if isinstance(x, float):
            return "nan" if math.isnan(x) else f"{x:.4g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _axes(xlabel: str, ylabel: str, figsize=(6, 3.5), xscale: str = "linear", yscale: str = "linear"):
    """A figure with one labelled axes."""
    fig = Figure(figsize=figsize)
    ax = fig.add_subplot()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xscale(xscale)
    ax.set_yscale(yscale)
    return fig, ax


def _save(fig: Figure, path: Path) -> str:
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path.name


def _respaced(steps: int):
    base = pyrodiff.NoiseSchedule.linear(1000)
    return base if steps == 1000 else base.respace(base.evenly_spaced_timesteps(steps))


class Clock:
    """Wall-clock seconds of each section, reported at the end."""

    def __init__(self) -> None:
        self.sections: dict[str, float] = {}

    def time(self, name: str, compute, *args):
        since = time.time()
        result = compute(*args)
        self.sections[name] = round(time.time() - since, 1)
        print(f"  {name}: {self.sections[name]} s", flush=True)
        return result


# ---------------------------------------------------------------------- A: the exactly solvable diffusion
#: the data law of section A
GAUSSIAN_MEAN = (0.5, -0.3)
GAUSSIAN_COV = ((0.36, 0.18), (0.18, 0.25))


def exactly_solvable(settings: Settings) -> dict:
    """Gaussian data N(m, S) in 2-D with a full covariance, the linear schedule respaced to ``respaced_steps``, an
    affine network: every quantity of the chain of inequalities in closed form, for several theta, and plain SVI;
    where the "small" variance's gap sits (per term), and the same on the full chain of 1000 steps."""
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    schedule = _respaced(settings.respaced_steps)
    m = torch.tensor(GAUSSIAN_MEAN, dtype=torch.float64)
    S = torch.tensor(GAUSSIAN_COV, dtype=torch.float64)
    data = torch.distributions.MultivariateNormal(m, S).sample((4096,))
    # SVI on this finite sample maximises the ELBO under the sample's law (the ELBO is quadratic in x_0)
    sample_mean, sample_cov = data.mean(0), torch.cov(data.T, correction=0)

    def affine_model() -> pyrodiff.DiffusionModel:
        net = exact.AffineDenoiser(schedule.num_steps, 2).double()
        return pyrodiff.DiffusionModel(net, schedule, "epsilon", "small", "gaussian", data_shape=(2,))

    untrained, trained = affine_model(), affine_model()
    steps = settings.svi_steps
    optimizer = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.01 ** (1 / steps)})
    svi = pyro.infer.SVI(trained, pyrodiff.DiffusionGuide(schedule), optimizer, pyro.infer.Trace_ELBO())
    sample_optimum = -exact.expected_elbo(exact.best_affine(schedule, sample_mean, sample_cov), sample_mean, sample_cov)
    curve = []
    for step in range(steps + 1):
        if step % max(steps // 20, 1) == 0 or step == steps:
            curve.append((step, -exact.expected_elbo(trained, sample_mean, sample_cov).item()))
        if step < steps:
            svi.step(data[torch.randint(0, len(data), (64,))])
    thetas = {
        "untrained (network = 0)": untrained,
        f"plain SVI + Trace_ELBO, {steps} steps": trained,
        'best affine mean, "small" variance': exact.best_affine(schedule, m, S, "small"),
        'best affine mean, "large" variance': exact.best_affine(schedule, m, S, "large"),
        "true reverse q(x_{t-1} | x_t)": exact.true_reverse(schedule, m, S),
    }
    true_terms = exact.expected_elbo_terms(thetas["true reverse q(x_{t-1} | x_t)"], m, S)
    small_excess = exact.expected_elbo_terms(thetas['best affine mean, "small" variance'], m, S) - true_terms
    full = _respaced(1000)
    return {
        "theta": {label: exact.perspectives(chain, m, S) for label, chain in thetas.items()},
        "svi_curve": curve,
        "svi_steps": steps,
        "mean": m.tolist(),
        "cov": S.tolist(),
        "T": schedule.num_steps,
        "svi_minus_sample_optimum": curve[-1][1] - sample_optimum.item(),
        "sample_optimum": sample_optimum.item(),
        # E[L_k] of the best "small" model minus the true reverse's, k = 0..T: where its excess -ELBO sits
        "small_excess_terms": small_excess.tolist(),
        "full_chain": {
            "T": full.num_steps,
            **{v: exact.perspectives(exact.best_affine(full, m, S, v), m, S) for v in ("small", "large")},
        },
    }


def exactly_solvable_figure(section: dict) -> Figure:
    fig, ax = _axes("SVI step", "nats per example (sample's law)", yscale="log")
    curve = section["svi_curve"]
    ax.plot([c[0] for c in curve], [c[1] for c in curve], "o-", ms=3, label="E[-ELBO] of the SVI iterate (exact)")
    ax.axhline(section["sample_optimum"], color="k", ls="--", label="closed-form optimum of the class")
    ax.legend(fontsize=7)
    return fig


def render_exactly_solvable(section: dict, out: Path) -> str:
    table = section["theta"]
    rows, residuals = [], []
    for label, p in table.items():
        residual = p["expected_neg_elbo"] - p["entropy"] - p["joint_kl"]
        residuals.append(abs(residual))
        rows.append(
            [
                label,
                p["entropy"],
                p["data_kl"],
                p["expected_neg_log_likelihood"],
                p["expected_gap"],
                p["expected_neg_elbo"],
                p["joint_kl"],
                residual,
            ]
        )
    header = [
        "theta",
        "H(q0)",
        "KL(q0 ‖ p0)",
        "E[-log p(x0)]",
        "E[gap]",
        "E[-ELBO]",
        "KL(q_0:T ‖ p_0:T)",
        "E[-ELBO] - H - KL_joint",
    ]
    plot = _save(exactly_solvable_figure(section), out / "exact_svi.png")
    small, large = table['best affine mean, "small" variance'], table['best affine mean, "large" variance']
    excess = section["small_excess_terms"]
    k = int(np.argmax(excess))
    full = section["full_chain"]
    T = section["T"]
    worst = max(range(len(residuals)), key=residuals.__getitem__)
    return f"""## A. The exactly solvable diffusion (perspectives a and b, exact)

Data q(x_0) = N(m, S) with m = {section["mean"]}, S = {section["cov"]} (D = 2, full covariance); the linear T = 1000
schedule respaced to {T} evenly spaced steps (same endpoints); an affine network (`pyrodiff.theory.exact.AffineDenoiser`,
out = W_t x_t + b_t), epsilon prediction and the Gaussian decoder. Every number is a closed form
(`pyrodiff.theory.exact`), each computed on its own: E[-log p(x_0)] from the chain's Gaussian marginal, E[-ELBO] term
by term, KL(q_0:T || p_0:T) as one KL between two {2 * (T + 1)}-dimensional Gaussians, KL(q0 || p0) between the
marginals. Nats per example, under the data law.

{_table(header, rows)}

Read across a row: H(q0) + KL(q0 || p0) = E[-log p(x0)] <= E[-ELBO] = H(q0) + KL(q_0:T || p_0:T), for every
theta, not only at the optimum. The last column is the identity's residual, computed from independent closed
forms: at most {max(residuals):.2g} (the row "{rows[worst][0]}"). (a) The ELBO is a lower bound on the
log-likelihood: E[-ELBO] - E[-log p] = E[gap] = E KL(q(x_1:T | x_0) || p(x_1:T | x_0)) >= 0, so maximising it is
maximum likelihood up to that gap. (b) E[-ELBO] - H = KL(q_0:T || p_0:T) >= KL(q0 || p0): the bound minus the data
entropy bounds the KL from the data to the model. Plain `pyro.infer.SVI` with `Trace_ELBO` (full chain,
{section["svi_steps"]} steps, batches of 64 from 4096 draws) ends {section["svi_minus_sample_optimum"]:.3g} nats above the
closed-form maximum of its model class for its sample (plot; {section["sample_optimum"]:.4g} nats).

With the "small" variance the best affine model has KL(q0 || p0) = {small["data_kl"]:.3g} nats: its marginal is
nearly the data law, yet its bound is {small["expected_gap"]:.3g} nats loose. The gap is not spread along the path:
of its excess E[-ELBO] over the true reverse process ({sum(excess):.4g} nats), {excess[k]:.4g} nats sit in one term,
L_{k}, the step from x_{k + 1} to x_{k} of the {T}-step chain ({1000 // T} original steps each; there the true
q(x_{k} | x_{k + 1}) is far wider than the fixed "small" variance, because x_0 is still uncertain given x_{k + 1}),
and {sum(excess) - excess[k]:.3g} nats in all the other terms together. On the full chain of
{full["T"]} steps the same model class's best bound is {full["small"]["expected_gap"]:.3g} nats loose with the
"small" variance and {full["large"]["expected_gap"]:.3g} with the "large" one (on the {T}-step chain:
{large["expected_gap"]:.3g} with the "large" variance). The true reverse process (prior q(x_T), steps
q(x_{{t-1}} | x_t), both Gaussian) closes every gap.

![SVI against the closed form]({plot})
"""


# ---------------------------------------------------------------------- B: the likelihood behind the bound
#: the nested k of section B's table
IWAE_KS = (1, 10, 100, 1000)


def likelihood_bound(cases: dict) -> tuple[dict, dict]:
    """``cases``: name -> (model, x0, K, log q(x0) or None).  Per case the ELBO, E[IWAE_k] for nested k and k-hat of
    every example; and, for the cases with log q, the paired bounds on KL(q(x_0) || p(x_0)) from the ELBO and from
    IWAE_K (section F's)."""
    section, kl_bounds = {}, {}
    for name, (model, x0, K, log_q) in cases.items():
        torch.manual_seed(0)
        began = time.time()
        res = log_likelihood_bound(model, x0, num_particles=K)
        seconds = time.time() - began
        lw = res.log_weights.double().cpu()
        elbo = lw.mean(1)
        per_k = {}
        for k in sorted({k for k in IWAE_KS if k <= K} | {K}):
            per_k[k] = {
                "iwae_nats": _mean_se(res.expected_at(k).double().cpu()),
                # the part of the gap log p - ELBO that k particles recover
                "recovered_nats": _mean_se(res.expected_at(k).double().cpu() - elbo),
                "khat_median": float(res.at(k).khat.median()) if k >= MIN_PARTICLES_FOR_KHAT else float("nan"),
            }
        section[name] = {
            "examples": x0.shape[0],
            "K": K,
            "elbo_nats": _mean_se(elbo),
            "per_k": per_k,
            "seconds": round(seconds, 1),
            "dims": res.dims,
            "khat": res.khat.cpu().tolist(),
            "log_weight_sd": lw.std(1).tolist(),
            "stderr_of_iwae_K": res.stderr.cpu().tolist(),
        }
        if log_q is not None:  # -ELBO + log q and -IWAE_K + log q: upper bounds on KL(q(x_0) || p(x_0))
            log_q = log_q.double().cpu()
            kl_bounds[name] = {
                "elbo": _mean_se(-elbo + log_q),
                "iwae": _mean_se(-res.expected_at(K).double().cpu() + log_q),
            }
    return section, kl_bounds


def khat_counts(khat: list, K: int) -> dict:
    """How many examples' k-hat lie above each of Vehtari et al.'s thresholds for K draws (``khat_threshold``)."""
    k = np.asarray(khat, dtype=np.float64)
    threshold = khat_threshold(K)
    return {
        "examples": len(k),
        "threshold": threshold,
        "above_finite_variance": int((k >= KHAT_FINITE_VARIANCE).sum()),
        "above_threshold": int((k > threshold).sum()),
        "above_unreliable": int((k > KHAT_UNRELIABLE).sum()),
        "undefined": int(np.isnan(k).sum()),
    }


def _khat_sentence(counts: dict, K: int) -> str:
    n = counts["examples"]
    return (
        f"k-hat is at least {KHAT_FINITE_VARIANCE} (infinite variance of the weights) for "
        f"{counts['above_finite_variance']} of {n} examples, above the threshold for K = {K} draws, "
        f"min(1 - 1/log10 K, {KHAT_UNRELIABLE}) = {counts['threshold']:.3f}, for {counts['above_threshold']} of {n}, "
        f"and above {KHAT_UNRELIABLE} for {counts['above_unreliable']} of {n}"
    )


def iwae_figure(section: dict) -> Figure:
    fig, ax = _axes("k (particles)", "E[IWAE_k] - ELBO (nats)", xscale="log")
    for name, s in section.items():
        if s["examples"] < MIN_EXAMPLES:
            continue
        ks = sorted(s["per_k"], key=int)
        ax.errorbar(
            [int(k) for k in ks],
            [s["per_k"][k]["recovered_nats"][0] for k in ks],
            [s["per_k"][k]["recovered_nats"][1] for k in ks],
            marker="o",
            label=name,
        )
    ax.legend(fontsize=7)
    return fig


def render_likelihood_bound(section: dict, out: Path) -> str:
    rows, notes = [], []
    for name, s in section.items():
        K, n, dims = s["K"], s["examples"], s["dims"]
        khat = np.asarray(s["khat"], dtype=np.float64)
        counts = khat_counts(s["khat"], K)
        spread = (
            f"The log weights' standard deviation is {np.median(s['log_weight_sd']):.2f} nats (median over examples); "
            f"k-hat median {np.nanmedian(khat):.2f}, largest {np.nanmax(khat):.2f}: {_khat_sentence(counts, K)}"
        )
        if n < MIN_EXAMPLES:
            notes.append(
                f"- **{name}**: this run drew K = {K} paths for {n} examples only, too few for a standard error over "
                f"examples (at least {MIN_EXAMPLES} are needed here): its estimates are not shown. {spread}."
            )
            continue
        for k in sorted(s["per_k"], key=int):
            p = s["per_k"][k]
            rows.append(
                [
                    name,
                    int(k),
                    *p["iwae_nats"],
                    *p["recovered_nats"],
                    nats_to_bits_per_dim(p["recovered_nats"][0], dims),
                    p["khat_median"],
                ]
            )
        recovered = s["per_k"][str(K)]["recovered_nats"]
        if counts["above_threshold"] == 0:
            verdict = f"every example's k-hat is below the threshold for K = {K}: IWAE_{K} is usable"
        else:
            verdict = (
                f"IWAE_{K} is unreliable for the {counts['above_threshold']} examples above the threshold, and its "
                f"per-example standard error understates the error wherever k-hat >= {KHAT_FINITE_VARIANCE}"
            )
            if counts["above_threshold"] > n / 2:
                verdict += (
                    "; with most examples there the weights are degenerate: one path carries the estimate, and "
                    "IWAE_K is a loose, noisy lower bound that more particles raise in jumps, not the likelihood"
                )
        notes.append(
            f"- **{name}**: {n} test examples, K = {K} forward paths each ({s['seconds']:.0f} s). {spread}; "
            f"{verdict}. K = {K} particles recover {recovered[0]:.4g} +- {recovered[1]:.2g} nats "
            f"({nats_to_bits_per_dim(recovered[0], dims):.4f} bits/dim) of the gap between the ELBO and log p, a "
            f"lower bound on that gap."
        )
    plot = _save(iwae_figure(section), out / "iwae.png")
    header = [
        "model",
        "k",
        "E[IWAE_k] (nats)",
        "+-",
        "E[IWAE_k] - ELBO (nats)",
        "+-",
        "(bits/dim)",
        "median k-hat of the first k",
    ]
    return f"""## B. The likelihood behind the bound (perspective a, estimated)

`pyrodiff.log_likelihood_bound(model, x0, num_particles=K)`: the importance-weighted bound (Burda et al.
2016) with the forward chain as proposal, ELBO <= E[IWAE_K] <= log p_theta(x_0), increasing in K. Each
example's K log weights are drawn once; E[IWAE_k] for k < K is the mean over the K / k disjoint blocks of
k draws, and "IWAE_k - ELBO" is the part of the gap log p - ELBO that k particles recover (the ELBO being
the mean log weight of the same draws). The Pareto k-hat (PSIS, ArviZ; at least {MIN_PARTICLES_FOR_KHAT} draws) of the
weights is read with Vehtari et al.'s (2024) thresholds (`pyrodiff.evaluation.likelihood.khat_threshold`): weights with
a Pareto tail of shape k have finite moments of order < 1/k only, so their variance is infinite once k > 0.5; above
min(1 - 1/log10 S, 0.7) for S draws (0.5 at S = 100, 0.67 at S = 1000) an importance-sampling estimate is
unreliable, and above 0.7 unreliable whatever S. The estimate here is not Pareto-smoothed. Standard errors are over
examples; an estimate with fewer than {MIN_EXAMPLES} examples is not shown.

{_table(header, rows)}

{chr(10).join(notes)}

![recovered gap]({plot})
"""


# ---------------------------------------------------------------------- C: the exact reverse process
#: section C's two data sets: how "a copy of a training example" is measured on each
NEAREST = {
    "digits": {"tolerance": 1 / 16, "scale": 8.0, "units": "grey levels"},
    "gaussians8": {"tolerance": 1e-3, "scale": 1.0, "units": "data units"},
}


def nearest_distances(samples: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """For each sample, the distance to its nearest training example: the largest absolute difference over
    dimensions (images) or the Euclidean distance (points)."""
    s, d = samples.reshape(len(samples), -1).double(), data.reshape(len(data), -1).double()
    out = []
    for chunk in s.split(64):
        diff = chunk[:, None, :] - d[None]
        out.append(diff.abs().amax(-1).amin(1) if samples.dim() > 2 else diff.norm(dim=-1).amin(1))
    return torch.cat(out)


def _copies(dist: torch.Tensor, name: str) -> dict:
    """How many distances (scaled to the report's units) are within the data set's tolerance, and their quantiles."""
    scale, tolerance = NEAREST[name]["scale"], NEAREST[name]["tolerance"]
    dist = dist * scale
    hits = int((dist <= tolerance * scale).sum())
    within, stderr = _fraction(hits, len(dist))
    quantiles = torch.quantile(dist, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {"hits": hits, "count": len(dist), "within": within, "within_stderr": stderr, "quantiles": quantiles}


def heldout_baseline(train: torch.Tensor, test: torch.Tensor, name: str) -> dict:
    """The memorisation metric's chance level: the same nearest-training-example distance for every real held-out
    test point, which no model produced."""
    return _copies(nearest_distances(test, train), name)


def noise_free_samples(model, n: int, generator: torch.Generator) -> torch.Tensor:
    """Ancestral samples whose last step adds no noise: the network's decoder mean, or for the exact process the
    training point its last step picks (its decoder is a point mass smoothed by sigma_1)."""
    if not isinstance(model, EmpiricalReverse):
        return pyrodiff.samplers.ancestral(model, n, generator=generator, last="mean")
    x1 = pyrodiff.samplers.ancestral(model, n, generator=generator, last="none")
    step = model.predict(x1, torch.ones(n, dtype=torch.long))
    return step.decode(model.decoder, torch.zeros_like(x1), generator)


def distance_histogram(ax, dist: torch.Tensor, label: str) -> None:
    """The histogram of log10 nearest-neighbour distances; distances below :data:`DISTANCE_FLOOR` (copies at distance
    0) are drawn at the floor, and the legend counts them."""
    floored = int((dist < DISTANCE_FLOOR).sum())
    note = f" ({floored} at distance < 1e{math.log10(DISTANCE_FLOOR):.0f}, drawn at {math.log10(DISTANCE_FLOOR):g})"
    ax.hist(dist.clamp(min=DISTANCE_FLOOR).log10().numpy(), bins=40, alpha=0.6, label=label + (note if floored else ""))


def exact_reverse(cases: dict, settings: Settings, out: Path) -> dict:
    """``cases``: name -> {"train", "test", "model"}.  Per data set and reverse process (the exact one of the training
    set, the trained network): where noise-free samples land, the bound on training and test examples, the exact
    -log p of the exact process, and the cost of one step; the plot exact_reverse.png."""
    section = {}
    fig = Figure(figsize=(9, 3.2))
    for i, (name, case) in enumerate(cases.items()):
        data, learned = case["train"], case["model"]
        n_samples, n_bound = settings.exact_reverse[name]
        empirical = EmpiricalReverse(data, learned.schedule, learned.decoder)
        result = {}
        ax = fig.add_subplot(1, len(cases), i + 1)
        for label, model in (("exact reverse", empirical), ("trained network", learned)):
            g = torch.Generator().manual_seed(0)
            began = time.time()
            x = noise_free_samples(model, n_samples, g)
            sample_seconds = time.time() - began
            dist = nearest_distances(x, data)
            torch.manual_seed(0)
            train_terms = bound_terms(model, data[:n_bound])
            test_terms = bound_terms(model, case["test"][:n_bound])
            result[label] = {
                **_copies(dist, name),
                "train_bound_nats": _mean_se(train_terms.total),
                "test_bound_nats": _mean_se(test_terms.total),
                "test_bound_median_nats": test_terms.total.mean(0).median().item(),
                "sample_seconds": round(sample_seconds, 2),
            }
            if model is empirical:
                result[label]["train_neg_log_p"] = _mean_se(-model.marginal_log_prob(data[:n_bound]))
                result[label]["test_neg_log_p"] = _mean_se(-model.marginal_log_prob(case["test"][:n_bound]))
            distance_histogram(ax, dist * NEAREST[name]["scale"], label)
        ax.set_title(f"{name}: distance to the nearest training example", fontsize=8)
        ax.set_xlabel(
            f"log10 distance ({NEAREST[name]['units']}; 0 drawn at {math.log10(DISTANCE_FLOOR):g})", fontsize=8
        )
        ax.legend(fontsize=6)
        result["cost"] = _step_cost(empirical, learned, data, settings.cost_tiles, settings.max_tiled_points)
        result["training_points"] = data.shape[0]
        result["gaussian_decoder"] = not learned.decoder.levels
        section[name] = result
    _save(fig, out / "exact_reverse.png")
    return section


def _step_cost(empirical, learned, data, tiles: tuple, max_points: int, batch: int = 64, repeats: int = 5) -> dict:
    def median_ms(model) -> float:
        dtype = model.device_and_dtype()[1]
        x = torch.randn((batch,) + tuple(data.shape[1:]), dtype=dtype)
        t = torch.full((batch,), learned.schedule.num_steps // 2, dtype=torch.long)
        with torch.no_grad():
            model.predict(x, t)
            times = []
            for _ in range(repeats):
                began = time.perf_counter()
                model.predict(x, t)
                times.append(time.perf_counter() - began)
        return 1e3 * float(np.median(times))

    tiled = {
        data.shape[0] * k: median_ms(
            EmpiricalReverse(data.repeat((k,) + (1,) * (data.dim() - 1)), empirical.schedule, empirical.decoder)
        )
        for k in tiles
        if k == 1 or data.shape[0] * k <= max_points
    }
    return {"empirical_ms": tiled, "network_ms": median_ms(learned), "batch": batch}


def _train_test(r: dict, key: str) -> str:
    """The test-minus-train difference of a mean over independent examples, with its standard error and whether it
    is significant."""
    (train, train_se), (test, test_se) = r[f"train_{key}"], r[f"test_{key}"]
    d = test - train
    return f"{d:.4g} +- {math.hypot(train_se, test_se):.2g} nats ({_significance(_z(d, train_se, test_se))})"


def render_exact_reverse(section: dict, settings: dict, out: Path) -> str:
    rows_samples, rows_bound, rows_cost, readings, differences = [], [], [], [], []
    for name, result in section.items():
        n_samples, n_bound = settings["exact_reverse"][name]
        for label in ("exact reverse", "trained network"):
            r = result[label]
            rows_samples.append(
                [
                    name,
                    label,
                    r["count"],
                    f"{100 * r['within']:.1f}% +- {100 * r['within_stderr']:.1f}%",
                    *r["quantiles"],
                ]
            )
            neg_log_p = {k: r.get(f"{k}_neg_log_p", [float("nan")])[0] for k in ("train", "test")}
            rows_bound.append(
                [
                    name,
                    label,
                    n_bound,
                    *r["train_bound_nats"],
                    neg_log_p["train"],
                    *r["test_bound_nats"],
                    r["test_bound_median_nats"],
                    neg_log_p["test"],
                ]
            )
        h = result["heldout"]
        rows_samples.append(
            [
                name,
                "real held-out test points",
                h["count"],
                f"{100 * h['within']:.1f}% +- {100 * h['within_stderr']:.1f}%",
            ]
            + h["quantiles"]
        )
        for n, ms in result["cost"]["empirical_ms"].items():
            rows_cost.append([name, int(n), ms, result["cost"]["network_ms"], ms / result["cost"]["network_ms"]])
        e, net = result["exact reverse"], result["trained network"]
        N = result["training_points"]
        kind = (
            "densities: a kernel density estimate of bandwidth sigma_1"
            if result["gaussian_decoder"]
            else "probabilities of grid points"
        )
        z_copy = _z(net["within"] - h["within"], net["within_stderr"], h["within_stderr"])
        if net["within"] == h["within"]:
            chance = "exactly as often as real data lie there"
        elif abs(z_copy) < SIGNIFICANT_Z:
            chance = "as often as chance proximity puts real data there: no sign of memorisation"
        elif z_copy > 0:
            chance = "more often than real data lie there: a sign of copying"
        else:
            chance = "less often than real data lie there"
        readings.append(
            f"- **{name}** (N = {N}, log N = {math.log(N):.3f}): {e['hits']} of {e['count']} of the exact process's "
            f"samples are copies of training examples; {net['hits']} of {net['count']} of the network's "
            f"({100 * net['within']:.1f}% +- {100 * net['within_stderr']:.1f}%) lie within the tolerance of one, "
            f"against {h['hits']} of {h['count']} real held-out test points ({100 * h['within']:.1f}% +- "
            f"{100 * h['within_stderr']:.1f}%): the difference is {_significance(z_copy)}; the network lands near "
            f"training points {chance}. "
            f"The exact process's -log p(x_0) is {e['train_neg_log_p'][0]:.4g} +- {e['train_neg_log_p'][1]:.2g} nats "
            f"on training examples and {e['test_neg_log_p'][0]:.4g} +- {e['test_neg_log_p'][1]:.2g} on test examples "
            f"({kind}); its bound {e['train_bound_nats'][0]:.4g} +- {e['train_bound_nats'][1]:.2g} and "
            f"{e['test_bound_nats'][0]:.4g} +- {e['test_bound_nats'][1]:.2g} nats, the network's "
            f"{net['train_bound_nats'][0]:.4g} +- {net['train_bound_nats'][1]:.2g} and {net['test_bound_nats'][0]:.4g} "
            f"+- {net['test_bound_nats'][1]:.2g}. Test minus train, over {n_bound} examples each: the exact process's "
            f"bound {_train_test(e, 'bound_nats')}, its exact -log p {_train_test(e, 'neg_log_p')}; the network's "
            f"bound {_train_test(net, 'bound_nats')}."
        )
        for label, r in (("the exact process", e), ("the network", net)):
            (tr, tr_se), (te, te_se) = r["train_bound_nats"], r["test_bound_nats"]
            significant = abs(_z(te - tr, tr_se, te_se)) >= SIGNIFICANT_Z
            differences.append(f"{name}, {label}: {'significant' if significant else 'not significant'}")
    plot = "exact_reverse.png"
    sample_header = [
        "data",
        "points",
        "count",
        "within the tolerance of a training example",
        "NN distance q10",
        "median",
        "q90",
    ]
    bound_header = [
        "data",
        "reverse process",
        "examples",
        "train -ELBO (nats)",
        "+-",
        "train exact -log p",
        "test -ELBO (nats)",
        "+-",
        "test median -ELBO",
        "test exact -log p",
    ]
    cost_header = ["data", "N (training points)", "exact reverse step (ms)", "network step (ms)", "ratio"]
    return f"""## C. The exact reverse process of a finite data set (question 1, measured)

`pyrodiff.EmpiricalReverse(train, schedule)` is the true q(x_{{t-1}} | x_t) of the empirical distribution of
the training set: the mixture over training points i of the tractable posteriors q(x_{{t-1}} | x_t, x_0^i),
weighted by q(x_0^i | x_t), written as a Pyro model with the sites of `DiffusionModel`. The same sampler
(`samplers.ancestral` with the same seed; its last step without noise: the network's decoder mean, the exact
process's chosen training point), `bound_terms` and report run on it and on the trained network of the same
schedule and decoder.

**Where the samples land**: the distance to the nearest training example (digits: the largest pixel
difference in grey levels, a copy meaning within half a grid step; gaussians8: Euclidean, within 1e-3), for the
samples of each reverse process and, as the chance level of the metric, for every real held-out test point
(which no model made). Fractions with their binomial standard errors.

{_table(sample_header, rows_samples)}

**The bound** (-ELBO, nats per example, every term; the exact process's KL terms are one-draw Monte Carlo
estimates, its steps being mixtures) and, for the exact process, its exact -log p(x_0)
(`EmpiricalReverse.marginal_log_prob`: the training set seen through the decoder, up to the mismatch of the prior
N(0, I) against q(x_T), which vanishes with alpha_bar_T):

{_table(bound_header, rows_bound)}

**The cost of one reverse step** (a batch of 64, one `predict`, median of 5 calls; the exact process also on the
training set tiled up to {max(settings["cost_tiles"])} times, up to {settings["max_tiled_points"]} points, to show its cost grow linearly with
N, where the network's is fixed):

{_table(cost_header, rows_cost)}

![nearest-neighbour distances]({plot})

{chr(10).join(readings)}

This is the answer to the question: the posterior q(x_{{t-1}} | x_t, x_0) is tractable only given x_0.
Without x_0 the exact reverse process is this mixture over the whole data set, at every step: its cost per
step grows with N, and what it samples is the training set itself. It maximises the likelihood of the
empirical distribution, which puts no probability on a new grid image; seen through a Gaussian decoder it is
a kernel density estimate whose bandwidth is the decoder's sigma_1, not a choice made for generalisation.
A learned p_theta gives up that exactness for a fixed cost per step. Whether its density generalises better is
read from the test-minus-train differences of the bound above (significant at {SIGNIFICANT_Z:g} standard errors or
more): {"; ".join(differences)}.
"""


# ---------------------------------------------------------------------- D: many easy problems
def many_easy_problems(law, settings: Settings) -> dict:
    """The best Gaussian-step bound of gaussians8 for each T of ``many_easy_steps`` (the linear schedule respaced to T
    steps), each step's KL a Monte Carlo estimate from ``many_easy_draws`` draws, the generator seeded with T."""
    section = {}
    for T in settings.many_easy_steps:
        r = moment_matched_bound(
            law,
            _respaced(T),
            settings.many_easy_draws,
            generator=torch.Generator().manual_seed(T),
            entropy=GAUSSIANS8_ENTROPY,
        )
        section[T] = r.to_dict()
    return section


def many_easy_problems_figure(section: dict) -> Figure:
    """The best Gaussian-step bound against T, and each step's KL against t / T (floored at :data:`KL_FLOOR` on the
    log axis, as its label says); the panels are laid out so that no label runs into the other panel."""
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    ax = fig.add_subplot(1, 2, 1)
    Ts = list(section)
    ax.errorbar(
        [int(T) for T in Ts], [section[T]["bound"] for T in Ts], [section[T]["bound_stderr"] for T in Ts], marker="o"
    )
    ax.axhline(GAUSSIANS8_ENTROPY, color="k", ls="--", label=f"H(q(x_0)) = {GAUSSIANS8_ENTROPY:.3f} nats")
    ax.set_xscale("log")
    ax.set_xlabel("T (steps, same endpoints)")
    ax.set_ylabel("best Gaussian-step bound (nats)")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 2, 2)
    for T in Ts:
        kls = np.asarray(section[T]["step_kls"])
        ax.plot(np.arange(1, len(kls) + 1) / len(kls), np.maximum(kls, KL_FLOOR), label=f"T = {T}")
    ax.set_yscale("log")
    ax.set_xlabel("t / T")
    floor = f"1e{math.log10(KL_FLOOR):.0f}"
    ax.set_ylabel(f"KL(true step || best Gaussian) (nats;\nbelow {floor} drawn at {floor})")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))  # beside the curves, not on them
    return fig


def render_many_easy_problems(section: dict, out: Path) -> str:
    rows = [
        [int(T), r["bound"], r["bound_stderr"], r["gap"], sum(r["step_kls"]), max(r["step_kls"]), r["prior_kl"]]
        for T, r in section.items()
    ]
    draws = {r["num_samples"] for r in section.values()}
    plot = _save(many_easy_problems_figure(section), out / "many_easy_problems.png")
    header = ["T", "best bound (nats)", "+-", "excess over H(q0)", "sum of step KLs", "largest step KL", "prior KL"]
    return f"""## D. Many easy problems (perspective d)

gaussians8's density is known, so every true reverse conditional q(x_{{t-1}} | x_t) is a known Gaussian
mixture (`pyrodiff.theory.mixture`). The best any chain of Gaussian steps can do is to match each conditional's
mean and covariance; its expected negative ELBO is then exactly H(q(x_0)) + KL(q(x_T) || N(0, I)) + sum_t
E KL(q(x_{{t-1}} | x_t) || its moment-matched Gaussian). Each step KL is a Monte Carlo estimate
({", ".join(str(d) for d in sorted(draws))} draws per step, `moment_matched_bound` with the generator seeded with T)
with its standard error. The schedules are the linear T = 1000 schedule respaced to T evenly spaced steps with the
same endpoints (`NoiseSchedule.respace`).

{_table(header, rows)}

![many easy problems]({plot})

With one step, the single Gaussian step must cover all eight modes and the bound is that of one Gaussian
fitted to the data; as T grows each step's true conditional becomes closer to Gaussian (the largest step KL
falls), and the best bound approaches the entropy, {GAUSSIANS8_ENTROPY:.3f} nats.
"""


# ---------------------------------------------------------------------- E: a learned encoder
def learned_encoder(vae, vae_info: dict, diffusion: dict, train, test, levels: int, unet_parameters: int) -> dict:
    """The VAE's test-set negative ELBO (16 draws of z per example), the per-pixel histograms' -log p, and the
    diffusion runs' test-set bounds (``diffusion``: label -> their ``test_bound.json`` numbers), bits/dim."""
    torch.manual_seed(0)
    nats = negative_elbo(vae, test.to(next(vae.parameters()).dtype), num_samples=16).total.mean(0)
    dims = test[0].numel()
    histogram = {"nats": pixel_histogram_nats(train, test, levels), "parameters": test[0].numel() * levels}
    return {
        "vae": {
            "bits_per_dim": [nats_to_bits_per_dim(v, dims) for v in _mean_se(nats)],
            "parameters": sum(p.numel() for p in vae.parameters()),
            **vae_info,
        },
        "histogram": {
            "bits_per_dim": [nats_to_bits_per_dim(v, dims) for v in _mean_se(histogram["nats"])],
            "parameters": histogram["parameters"],
        },
        "unet_parameters": unet_parameters,
        "examples": test.shape[0],
        "training_examples": train.shape[0],
        "dims": dims,
        **diffusion,
    }


def render_learned_encoder(section: dict, exactly_solvable_section: dict, many_easy_section: dict) -> str:
    full = exactly_solvable_section["full_chain"]
    longest = max(many_easy_section, key=int)
    vae, histogram = section["vae"], section["histogram"]
    vae_bpd, vae_se = vae["bits_per_dim"]
    diffusion = {k: v for k, v in section.items() if k.startswith("diffusion")}
    rows = [
        ["Pyro VAE (Gaussian latent, learned encoder)", vae["parameters"], f"{vae['seconds']:.0f}", vae_bpd, vae_se],
        [
            "independent per-pixel histograms of the training set (add-one)",
            histogram["parameters"],
            "0",
            *histogram["bits_per_dim"],
        ],
    ]
    lines = []
    for label, d in diffusion.items():
        rows.append([label, section["unet_parameters"], f"{d['seconds']:.0f}", d["bits_per_dim"], d["stderr"]])
        z = _z(d["bits_per_dim"] - vae_bpd, d["stderr"], vae_se)
        lines.append(
            f"{label}: {d['bits_per_dim']:.3f} +- {d['stderr']:.3f} bits/dim after {d['steps']} training steps "
            f"({d['bits_per_dim'] - vae_bpd:+.3f} against the VAE's bound, {_significance(z)})"
        )
    reading = (
        f"The VAE trained for {vae['seconds']:.0f} s ({vae['steps']} SVI steps; early stopping on "
        f"{100 * vae['validation_fraction']:.0f}% of the training split held out, best at step {vae['best_step']}) "
        f"reaches a bound of {vae_bpd:.3f} +- {vae_se:.3f} bits/dim; "
        + "; ".join(lines)
        + f". The independent per-pixel histograms (an exact likelihood, not a bound) reach "
        f"{histogram['bits_per_dim'][0]:.3f} +- {histogram['bits_per_dim'][1]:.3f}."
    )
    return f"""## E. The parameterless encoder against a learned one (perspective c)

A diffusion model is a hierarchical VAE with T latent layers whose encoder q(x_{{1:T}} | x_0) has no
parameters. Beside it, an ordinary Pyro VAE (`pyrodiff.theory.vae`: a `pyro.infer.SVI` model/guide pair, a Gaussian
latent, a learned Gaussian encoder, the same discretized decoder on the 17 grey levels) with {vae["parameters"]}
parameters against the digits U-Net's {section["unet_parameters"]}, trained on the same {section["training_examples"]}
training images. Test-set negative ELBO on the first {section["examples"]} test digits (the diffusion rows are
the same examples, every term of the bound), bits/dim on the 17-level scale (uniform: log2 17 = 4.09):

{_table(["model", "parameters", "training seconds", "test -ELBO (bits/dim)", "+-"], rows)}

{reading}

These are bounds, compared as bounds: each row is an upper bound on its own model's negative log-likelihood, and
a lower bound says the model is better only if the bounds are equally tight. Here they need not be: the
diffusion runs are trained on L_simple, not on the bound reported, and with the fixed "small" variance, which
alone leaves the best affine model of section A {full["small"]["expected_gap"]:.3g} nats above its likelihood on a chain of
{full["T"]} steps.
The comparison is therefore confounded, and it does not say that a fixed encoder with many layers must cost more:
section D shows a chain of {longest} Gaussian steps that comes within {many_easy_section[longest]["gap"]:.2g} +-
{many_easy_section[longest]["gap_stderr"]:.1g} nats of the entropy on gaussians8.
"""


# ---------------------------------------------------------------------- F: the bound on KL(q(x_0) || p(x_0))
def render_kl_bound(section: dict, likelihood_section: dict) -> str:
    """The paired bound on KL(q(x_0) || p(x_0)) for gaussians8, whose density is known: from the checkpoint's
    test-set bound (every test example) and, on the examples of section B, from the ELBO and from IWAE_K."""
    s = section["test_bound"]
    rows = [["-ELBO + log q (every term, `test_bound.json`)", s["examples"], *s["kl_bound_nats"]]]
    notes = []
    for name, f in section.items():
        if name == "test_bound":
            continue
        b = likelihood_section[name]
        K, n = b["K"], b["examples"]
        rows.append([f"-ELBO + log q ({name}, section B's draws)", n, *f["elbo"]])
        rows.append([f"-IWAE_{K} + log q (same draws)", n, *f["iwae"]])
        counts = khat_counts(b["khat"], K)
        notes.append(
            f"The IWAE_{K} row holds as far as section B's weights allow: for {name}, {_khat_sentence(counts, K)}."
        )
    return f"""## F. The bound on KL(q(x_0) || p_theta(x_0)) on real data (perspective b, estimated)

gaussians8's density q(x_0) is known, so E_q[-ELBO(x_0) + log q(x_0)] = KL(q(x_0) || p(x_0)) + E_q[gap] >= KL(q(x_0)
|| p(x_0)) is estimated without bias, paired per example (`BoundTerms.kl_bound`). Replacing the ELBO by IWAE_K
tightens it by the part of the gap that K particles recover (section B); both stay upper bounds on the KL in
expectation. A KL is at least 0: an estimate below 0 is noise, to be read with its standard error.

{_table(["estimate", "test examples", "nats", "+-"], rows)}

{" ".join(notes)}
"""


# ---------------------------------------------------------------------- G: score matching
#: the command that writes each data set's input of section G, for a report run without it
ODE_COMMANDS = {
    "gaussians8": "python analysis/ode_likelihood.py runs/gaussians8/checkpoint.pt --examples 200 --out runs/ode-gaussians8",
    "digits": (
        "python analysis/ode_likelihood.py runs/digits/checkpoint.pt --examples 100 --divergence hutchinson "
        "--probes 4 --out runs/ode-digits"
    ),
}
#: ``--quick``'s section G: analysis/ode_likelihood.py on the quick gaussians8 checkpoint, few examples, loose tolerances
QUICK_ODE = ("--examples", "16", "--particles", "21", "--rtol", "1e-3", "--atol", "1e-3")
#: the figures of analysis/ode_likelihood.py's report, by the name its ``per_example`` and ``paired_kl_nats`` use
ODE_ROWS = {"ode": "negative_log_likelihood_nats", "elbo": "negative_elbo_nats", "iwae": "negative_iwae_nats"}


def read_ode_report(path: Path, data: str) -> dict:
    """``analysis/ode_likelihood.py``'s ``ode_likelihood.json`` on ``data``, refused if it is another data set's."""
    report = json.loads(path.read_text())
    if report.get("data") != data or "ode" not in report:
        raise ValueError(
            f"{path} is not analysis/ode_likelihood.py's report on {data} (its data: {report.get('data')!r})"
        )
    return report


def quick_ode_report(checkpoint: Path, out: Path) -> Path:
    """``--quick``'s input of section G: ``analysis/ode_likelihood.py`` (:data:`QUICK_ODE`) on ``checkpoint``, into
    ``out``; returns its ``ode_likelihood.json``."""
    script = runpy.run_path(str(Path(__file__).with_name("ode_likelihood.py")))
    if script["main"]([str(checkpoint), *QUICK_ODE, "--out", str(out)]) != 0:
        raise RuntimeError(f"analysis/ode_likelihood.py failed on {checkpoint}")
    return out / "ode_likelihood.json"


def _difference(report: dict, a: str, b: str) -> dict:
    """The mean of -log p under ``a`` minus under ``b`` with its standard error: paired per example where the report
    holds every example's figures, else from the two means' standard errors combined as if independent."""
    per_example = report.get("per_example", {})
    if a in per_example and b in per_example:
        mean, se = _mean_se(np.subtract(per_example[a], per_example[b]))
        return {"nats": [mean, se], "paired": True}
    (ma, sa), (mb, sb) = ([report[x][ODE_ROWS[x]], report[x]["stderr_nats"]] for x in (a, b))
    return {"nats": [ma - mb, math.hypot(sa, sb)], "paired": False}


def score_matching(reports: dict) -> dict:
    """Section G from ``analysis/ode_likelihood.py``'s reports (``reports``: data set -> (path, report) or None): what
    the section shows, copied with its provenance, the differences of the ODE's figure from the bounds', and the
    examples' k-hat counts against Vehtari et al.'s thresholds."""
    section = {}
    for data, found in reports.items():
        if found is None:
            section[data] = {"missing": ODE_COMMANDS[data]}
            continue
        path, r = found
        case = {
            key: r.get(key)
            for key in ("command", "checkpoint", "examples", "dims", "threads", "dtype", "ode", "elbo", "iwae", "model")
        }
        case["source"] = str(path)
        case["differences"] = {f"ode - {b}": _difference(r, "ode", b) for b in ("elbo", "iwae") if r.get(b)}
        if r.get("iwae") and "khat" in r.get("per_example", {}):
            case["khat_counts"] = khat_counts(r["per_example"]["khat"], r["iwae"]["particles"])
        if "paired_kl_nats" in r:  # the data law is known
            for key in ("entropy_nats", "entropy_of_these_examples_nats", "paired_kl_nats", "exact_score_ode"):
                case[key] = r[key]
            case["score_error"] = r["score_error"]
        section[data] = case
    return section


def _pm(pair, digits: int = 4) -> str:
    return f"{pair[0]:.{digits}f} +- {pair[1]:.{digits}f}"


def _provenance(case: dict) -> str:
    o = case["ode"]
    probes = f", {o['probes']} probes" if o["divergence"] == "hutchinson" else ""
    threads = f", {case['threads']} CPU thread(s)" if case.get("threads") else ""
    threads += f", {case['dtype']}" if case.get("dtype") else ""
    iwae = f"; IWAE {case['iwae']['seconds']:.0f} s" if case.get("iwae") else ""
    return (
        f"`{case['command']}` (checkpoint `{case['checkpoint']}`, the first {case['examples']} test examples"
        f"{threads}; read from `{case['source']}`). The ODE: `torchdiffeq` {o['method']}, rtol {o['rtol']:g}, atol "
        f"{o['atol']:g}, {o['divergence']} divergence{probes}, {o['nfe']} function evaluations, {o['seconds']:.0f} s; "
        f"the ELBO {case['elbo']['seconds']:.0f} s{iwae}."
    )


def _difference_sentence(case: dict, b: str, label: str, scale: float = 1.0, unit: str = "nats") -> str:
    d = case["differences"][f"ode - {b}"]
    mean, se = d["nats"]
    how = (
        "paired per example"
        if d["paired"]
        else "the two standard errors combined as if independent, though the examples are the same: a paired error "
        "would likely be smaller"
    )
    return (
        f"the ODE's figure minus {label} is {mean * scale:+.4f} +- {se * scale:.4f} {unit} ({how}; "
        f"{_significance(_z(mean, se))})"
    )


def _khat_reading(case: dict) -> str:
    i = case["iwae"]
    K = i["particles"]
    if "khat_counts" in case:
        return f"{_khat_sentence(case['khat_counts'], K)}"
    share = i["share_khat_above_threshold"]
    return (
        f"k-hat is above the threshold for K = {K} draws, min(1 - 1/log10 K, {KHAT_UNRELIABLE}) = "
        f"{i['khat_threshold']:.3f}, for {round(share * case['examples'])} of {case['examples']} examples (median "
        f"{i['khat_median']:.2f}; this run did not record every example's k-hat)"
    )


def _render_gaussians8(case: dict) -> str:
    kl, o, e, i = case["paired_kl_nats"], case["ode"], case["elbo"], case.get("iwae")
    x = case["exact_score_ode"]
    pair = lambda d: [d["mean"], d["stderr"]]  # noqa: E731
    rows = [
        ["-log p_ODE(x), the network's score", o["negative_log_likelihood_nats"], o["stderr_nats"], *pair(kl["ode"])],
        ["-ELBO (one path per example)", e["negative_elbo_nats"], e["stderr_nats"], *pair(kl["elbo"])],
    ]
    if i:
        rows.append([f"-IWAE_{i['particles']}", i["negative_iwae_nats"], i["stderr_nats"], *pair(kl["iwae"])])
    exact_kl = pair(x["paired_kl_nats"])
    rows.append(["-log p_ODE(x), the exact score", x["negative_log_likelihood_nats"], x["stderr_nats"], *exact_kl])
    h = case["entropy_of_these_examples_nats"]
    rows.append(["H(q(x_0)), the true entropy", case["entropy_nats"], "", "", ""])
    rows.append(["-log q(x_0) of these examples", h["mean"], h["stderr"], "", ""])
    ode_kl = pair(kl["ode"])
    z = _z(*ode_kl)
    if z >= SIGNIFICANT_Z:
        verdict = "above 0, so the network's ODE NLL is above these examples' -log q"
    elif z > -SIGNIFICANT_Z:
        verdict = "consistent with 0: the flow's density is not told apart from q on these examples"
    else:
        verdict = "below 0, which a KL cannot be: a solver or estimation error"
    readings = [
        f"KL(q(x_0) || p_ODE) is estimated without bias as {_pm(ode_kl)} nats, paired per example "
        f"({_significance(z)}): {verdict}",
        f"the exact score's flow, from the same start with the same tolerances, has KL {_pm(exact_kl)} nats: the "
        f"floor that starting at lambda_1 and the solver leave, so the network's flow's KL above it comes from its "
        f"score's error",
        _difference_sentence(case, "elbo", "the -ELBO's"),
    ]
    if i:
        readings.append(_difference_sentence(case, "iwae", f"-IWAE_{i['particles']}'s"))
        readings.append(_khat_reading(case))
    score_rows = [[f"t = {s['t']}", s["relative_squared_error"], s["stderr"]] for s in case["score_error"]]
    return f"""**gaussians8** (D = {case["dims"]}): {_provenance(case)}

{_table(["quantity", "nats", "+-", "paired E[log q - log p] (nats)", "+-"], rows)}

The -ELBO and -IWAE rows bound the chain's -log p_theta(x_0); the ODE rows are exact (to the solver's tolerance) for
the flow's own density, a different model defined by the same network. Their paired E[log q - log p] are
KL(q || p_ODE) for the ODE and upper bounds on KL(q || p_theta) for the bounds (section F). The true entropy is
{case["entropy_nats"]:.3f} nats; these examples' mean -log q is {h["mean"]:.3f} +- {h["stderr"]:.3f}, the
paired baseline. Reading: {"; ".join(readings)}.

The network's score against the exact score of q(x_t) (the mixture's, `IsotropicGaussianMixture.noise`), relative
squared error E||s_theta - s||^2 / E||s||^2 over x_t ~ q(x_t) at each t, with its standard error:

{_table(["step", "relative squared error", "+-"], score_rows)}
"""


def _render_digits(case: dict) -> str:
    D, o, e, i = case["dims"], case["ode"], case["elbo"], case.get("iwae")
    levels = case["model"]["levels"]
    bits = lambda nats: nats_to_bits_per_dim(nats, D)  # noqa: E731
    rows = [
        [
            f"-log P_ODE(x) bound, dequantised ({o['divergence']} divergence)",
            o["negative_log_likelihood_nats"],
            o["stderr_nats"],
            bits(o["negative_log_likelihood_nats"]),
            bits(o["stderr_nats"]),
        ],
        [
            "-ELBO (one path per example)",
            e["negative_elbo_nats"],
            e["stderr_nats"],
            bits(e["negative_elbo_nats"]),
            bits(e["stderr_nats"]),
        ],
    ]
    readings = [_difference_sentence(case, "elbo", "the -ELBO", 1 / (D * math.log(2)), "bits/dim")]
    if i:
        K = i["particles"]
        rows.append(
            [
                f"-IWAE_{K}",
                i["negative_iwae_nats"],
                i["stderr_nats"],
                bits(i["negative_iwae_nats"]),
                bits(i["stderr_nats"]),
            ]
        )
        readings.append(_difference_sentence(case, "iwae", f"-IWAE_{K}", 1 / (D * math.log(2)), "bits/dim"))
        readings.append(
            f"{_khat_reading(case)}: where k-hat is above the threshold the IWAE figure is not a usable estimate of "
            "the chain's likelihood, only a noisy stochastic bound"
        )
    return f"""**digits** (D = {D}, {levels} grey levels): {_provenance(case)}

{_table(["quantity", "nats", "+-", "bits/dim", "+-"], rows)}

The ODE row is an upper bound on the negative log-likelihood of the {levels}-level data under the ODE model's
binned law: the data dequantised with one uniform draw per example within its grid cell, -log p_ODE(x + u) - D log
Delta (Delta = 2/{levels - 1}), an unbiased estimate of that bound (Jensen; its standard error across examples
includes the Hutchinson probes' noise). Bits/dim are on the same {levels}-level scale as the ELBO's discretized
decoder (uniform over the levels: log2 {levels} = {math.log2(levels):.2f}). The -ELBO bounds the chain's own
-log p_theta(x_0), and -IWAE_K bounds it in expectation: the smaller of two upper bounds certifies only that its
model reaches at least that likelihood, not which model is better. Reading: {"; ".join(readings)}.
"""


def render_score_matching(section: dict) -> str:
    """Section G from the numbers of :func:`score_matching` alone."""
    parts = []
    for data, case in section.items():
        if "missing" in case:
            flag = f"--ode-{data}"
            parts.append(
                f"**{data}**: not in this report: `{case['missing']}` writes its `ode_likelihood.json`, passed as "
                f"`{flag}`."
            )
        else:
            parts.append((_render_gaussians8 if data == "gaussians8" else _render_digits)(case))
    body = "\n\n".join(p.rstrip("\n") for p in parts)
    return f"""## G. Score matching: the same network's exact likelihood (perspective e)

The network's noise prediction is a score, s_theta(x_t, t) = -eps_hat(x_t, t) / sigma_t (`pyrodiff.chain.score`),
and L_simple is a weighted denoising score-matching loss. The score defines the probability-flow ODE dx/dt = f(t) x -
g(t)^2 s_theta(x, t) / 2 (Song et al. 2021), whose density at the data is computed exactly, up to the solver's
tolerance, by the instantaneous change of variables (`pyrodiff.ode_log_likelihood`; docs/MATH.md, "The score and the
probability-flow ODE"): a likelihood where the bound gives only a bound. A discrete-time model's flow starts at its
first step's noise level, lambda_1: the figure is the density of x taken as that variable. Numbers from
`analysis/ode_likelihood.py` (nats per example, mean +- standard error across examples):

{body}
"""


# ---------------------------------------------------------------------- H: a learned encoder for the diffusion
#: the rows of analysis/fixed_encoder.py's table that are diffusion models, and the two baselines
VAE_ROW, HISTOGRAM_ROW = 6, 7


def render_fixed_encoder(section: dict) -> str:
    """Section H from the rows of ``analysis/fixed_encoder.py``'s ``table.json`` (trained and scored there)."""
    rows = {r["row"]: r for r in section["rows"]}
    lines = [
        "## H. Why a fixed encoder, and what does learning it buy?",
        "",
        "A diffusion model is a hierarchical VAE whose encoder, the forward process, has no parameters. Learning it "
        "means learning the noise schedule: VDM's monotone gamma(t) = -log SNR(t) with learned endpoints. In "
        "continuous time the bound depends on the schedule only through its endpoints SNR_max and SNR_min (the "
        "interior changes only the estimator's variance), so the encoder's freedom is where the chain starts and "
        "stops, and how the network is trained along the way. Every row below was trained here for the same wall "
        f"clock on the same machine, and scored on the same test digits (`{section['source']}/table.md`, written by "
        "`analysis/fixed_encoder.py`). Each figure is a bound on -log p(x) (the histograms' is exact), so bounds "
        "are compared with bounds.",
        "",
        _table(
            ["#", "model", "parameters", "training", "bound", "bits/dim", "+- se"],
            [
                [
                    r["row"],
                    r["label"],
                    f"{r['parameters']:,}",
                    "counts" if r["row"] == HISTOGRAM_ROW else f"{r['seconds']:.0f} s, {r.get('steps', 0)} steps",
                    r["bound"],
                    f"{r['bits_per_dim']:.4f}",
                    f"{r['bits_per_dim_stderr']:.4f}",
                ]
                for r in rows.values()
            ],
        ),
        "",
    ]
    diffusion = [r for k, r in rows.items() if k not in (VAE_ROW, HISTOGRAM_ROW)]
    if diffusion and VAE_ROW in rows and HISTOGRAM_ROW in rows:
        best = min(diffusion, key=lambda r: r["bits_per_dim"])
        vae, histogram = rows[VAE_ROW], rows[HISTOGRAM_ROW]
        z_vae = _z(vae["bits_per_dim"] - best["bits_per_dim"], vae["bits_per_dim_stderr"], best["bits_per_dim_stderr"])
        lines.append(
            f"The best diffusion bound is row {best['row']} ({best['label']}): {best['bits_per_dim']:.4f} bits/dim, "
            f"{vae['bits_per_dim'] - best['bits_per_dim']:+.4f} below the VAE's ELBO (the difference is "
            f"{_significance(z_vae)}, with the two standard errors combined as if independent; both score the same test digits, so the "
            f"paired error is likely smaller) and "
            f"{histogram['bits_per_dim'] - best['bits_per_dim']:+.4f} below the per-pixel histograms."
        )
        fixed = rows.get(1)
        if fixed is not None:
            lines.append(
                f"Against the default run's recipe (row 1, a fixed schedule and L_simple) the best learned-schedule "
                f"recipe gains {fixed['bits_per_dim'] - best['bits_per_dim']:.4f} bits/dim at the same budget; it also "
                "changes the objective (the bound), the network's input (the noise level) and the decoder (VDM's), "
                "so the gain is the recipe's, not the schedule's alone."
            )
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------- the report
def render(numbers: dict, out: Path) -> str:
    """The Markdown report from the numbers of :data:`NUMBERS` alone (after their JSON round trip), and its plots."""
    p = numbers["provenance"]
    seconds = numbers["seconds"]
    head = [
        "# The seeds' questions, answered with numbers",
        "",
        f"Written by `{p['command']}` at commit {p['commit']} with the {p['settings']!r} settings "
        f"(seconds per section: {', '.join(f'{k}: {v}' for k, v in seconds.items())}; total {sum(seconds.values()):.0f} s).",
    ]
    if p["settings"] == "quick":
        head.append(
            "Quick settings: tiny checkpoints trained by the run itself (T = 50, a few seconds of training each), few "
            "examples and particles. This checks that every section runs and that its numbers are the library's; "
            "it says nothing about the models of the README."
        )
    if p.get("reused"):
        r = p["reused"]
        head.append(
            f"Sections {', '.join(CHECKPOINT_SECTIONS)} are the numbers of an earlier run, `{r['command']}` at commit "
            f"{r['commit']} ({r['note']}), read from its `{NUMBERS}` and written out by this version; sections "
            f"{', '.join(k for k in seconds)} were recomputed."
        )
    head.append("Nats per example unless stated; bits/dim = nats / (D ln 2).")
    parts = [
        "\n".join(head) + "\n",
        render_exactly_solvable(numbers["A"], out),
        render_likelihood_bound(numbers["B"], out),
        render_exact_reverse(numbers["C"], numbers["settings"], out),
        render_many_easy_problems(numbers["D"], out),
        render_learned_encoder(numbers["E"], numbers["A"], numbers["D"]),
        render_kl_bound(numbers["F"], numbers["B"]),
    ]
    if "G" in numbers:
        parts.append(render_score_matching(numbers["G"]))
    if numbers.get("H"):
        parts.append(render_fixed_encoder(numbers["H"]))
    return "\n".join(parts)


# ---------------------------------------------------------------------- the checkpoints' sections
def quick_checkpoints(folder: Path) -> dict[str, Path]:
    """``--quick``'s checkpoints (:data:`QUICK_SPECS`), trained into ``folder`` unless an earlier quick run left them."""
    paths = {}
    for name, (config, changes) in QUICK_SPECS.items():
        path = folder / name / "checkpoint.pt"
        if not path.exists():
            steps = changes["training"]["steps"]
            training = {
                "checkpoint_every": steps,
                "warmup_steps": 10,
                "eval_examples": 20 if config == "digits" else 500,
            }
            spec = load_spec(config).with_changes(
                {
                    "schedule": QUICK_SCHEDULE,
                    "network": changes["network"],
                    "training": {**changes["training"], **training},
                }
            )
            pyrodiff.train(spec, path.parent, progress=False, num_samples=16)
        paths[name] = path
    return paths


def _label(data: str, built) -> str:
    network = {"mlp": "MLP", "unet": "U-Net"}.get(built.spec.network.kind, built.spec.network.kind)
    return f"{data} ({network}, {built.spec.model.variance} variance, T = {built.model.schedule.num_steps})"


def _test_bound(checkpoint: Path) -> dict:
    return json.loads((checkpoint.parent / "test_bound.json").read_text())


def checkpoint_sections(paths: dict, settings: Settings, args: argparse.Namespace, out: Path, clock: Clock) -> dict:
    """Sections B, C, E and F from the checkpoints (the VAE trained here unless ``args.vae`` names one)."""
    digits_built, digits = pyrodiff.load_trained(paths["digits"])  # a refused checkpoint stops the run before any work
    g8_built, g8 = pyrodiff.load_trained(paths["gaussians8"])
    g8 = g8.double()  # float64 where it is cheap (a small MLP); the U-Net stays in float32
    digits_data, g8_data = digits_built.data, g8_built.data
    numbers = {}
    (n8, k8), (nd, kd) = settings.iwae["gaussians8"], settings.iwae["digits"]
    g8_test = g8_data.test[:n8].double()
    g8_name = _label("gaussians8", g8_built)
    cases = {
        g8_name: (g8, g8_test, k8, g8_data.log_density(g8_test)),
        _label("digits", digits_built): (digits, digits_data.test[:nd], kd, None),
    }
    numbers["B"], kl_bounds = clock.time("B", likelihood_bound, cases)
    cases = {
        "digits": {"train": digits_data.train, "test": digits_data.test, "model": digits},
        "gaussians8": {"train": g8_data.train.double(), "test": g8_data.test.double(), "model": g8},
    }
    numbers["C"] = clock.time("C", exact_reverse, cases, settings, out)
    for name, case in cases.items():
        numbers["C"][name]["heldout"] = heldout_baseline(case["train"], case["test"], name)

    def diffusion_row(path: Path) -> dict:
        s = _test_bound(path)
        return {
            "bits_per_dim": s["bits_per_dim"],
            "stderr": s["bits_per_dim_stderr"],
            "seconds": s["train_seconds"],
            "steps": s["training_steps"],
            "examples": s["num_examples"],
        }

    diffusion = {"diffusion, default run": diffusion_row(paths["digits"])}
    if paths["digits_long"].exists():
        diffusion["diffusion, longer run"] = diffusion_row(paths["digits_long"])
    examples = {d["examples"] for d in diffusion.values()}
    if len(examples) != 1:
        raise ValueError(f"the digits runs' test bounds are over different numbers of examples: {sorted(examples)}")
    unet_parameters = sum(p.numel() for p in digits.network.parameters())
    test = digits_data.test[: examples.pop()]

    def section_e() -> dict:
        if args.vae is not None:
            vae, vae_info = load_vae(args.vae), json.loads(args.vae.with_suffix(".json").read_text())
        else:
            quick = settings.name == "quick"
            seconds = QUICK_VAE_SECONDS if quick else args.vae_seconds or diffusion["diffusion, default run"]["seconds"]
            vae, vae_info = train_vae(digits_data.train, seconds, seed=0, progress=not quick)
            vae_info = {k: v for k, v in vae_info.items() if k != "losses"}
            save_vae(out / "vae.pt", vae, vae_info)
            (out / "vae.json").write_text(json.dumps(vae_info, indent=1, default=float) + "\n")
        return learned_encoder(vae, vae_info, diffusion, digits_data.train, test, digits_data.levels, unet_parameters)

    numbers["E"] = clock.time("E", section_e)
    s = _test_bound(paths["gaussians8"])
    numbers["F"] = {
        "test_bound": {"examples": s["num_examples"], "kl_bound_nats": [s["kl_bound_nats"], s["kl_bound_stderr"]]},
        **kl_bounds,
    }
    return numbers


# ---------------------------------------------------------------------- main
def _commit() -> str:
    """The commit of this checkout, marked where the library or the scripts differ from it."""
    where = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        try:
            found = subprocess.run(["git", *args], capture_output=True, text=True, cwd=where, timeout=10)
        except OSError:
            return ""
        return found.stdout.strip() if found.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" with uncommitted changes" if git("status", "--porcelain", "--", "pyrodiff", "analysis") else "")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    given = [f"--{name.replace('_', '-')}" for name in DEFAULT_CHECKPOINTS if getattr(args, name) is not None]
    given += ["--vae"] if args.vae is not None else []
    ode_inputs = {data: getattr(args, f"ode_{data}") for data in ODE_COMMANDS}
    ode_flags = [f"--ode-{data}" for data, path in ode_inputs.items() if path is not None]
    if args.quick and (given or ode_flags or args.reuse):
        raise ValueError(
            f"--quick trains its own checkpoints and computes its own section G: drop "
            f"{' '.join(given + ode_flags) or '--reuse'}"
        )
    ode_reports = {
        data: None if path is None else (path, read_ode_report(path, data)) for data, path in ode_inputs.items()
    }
    if args.reuse and given:
        raise ValueError(
            f"--reuse takes sections {', '.join(CHECKPOINT_SECTIONS)} from {args.reuse}: drop {' '.join(given)}"
        )
    out = args.out
    if (out / REPORT).exists() and not args.overwrite:
        raise FileExistsError(f"{out / REPORT} exists: choose another --out or pass --overwrite")
    settings = QUICK if args.quick else FULL
    earlier = None
    if args.reuse:
        earlier = json.loads(args.reuse.read_text())
        missing = [s for s in (*CHECKPOINT_SECTIONS, "provenance") if s not in earlier]
        if missing:
            raise ValueError(f"{args.reuse} has no {', '.join(missing)}: not a perspectives.json of this version")
    else:
        paths = {name: getattr(args, name) or path for name, path in DEFAULT_CHECKPOINTS.items()}
        for name in ("digits", "gaussians8"):
            if not args.quick and not paths[name].exists():
                raise FileNotFoundError(
                    f"{paths[name]}: no such checkpoint (train it with `pyrodiff train`, see the README; or pass --quick)"
                )
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    if args.quick:
        paths = clock.time("quick checkpoints", quick_checkpoints, out / "checkpoints")
    torch.set_grad_enabled(True)
    numbers = {
        "provenance": {"command": " ".join(["python analysis/perspectives.py", *argv]), "commit": _commit()},
        "settings": asdict(settings),
    }
    numbers["provenance"]["settings"] = settings.name
    numbers["A"] = clock.time("A", exactly_solvable, settings)
    if earlier is not None:
        for s in CHECKPOINT_SECTIONS:
            numbers[s] = earlier[s]
        numbers["settings"]["exact_reverse"] = earlier["settings"]["exact_reverse"]
        numbers["settings"]["cost_tiles"] = earlier["settings"]["cost_tiles"]
        old = earlier["provenance"]
        numbers["provenance"]["reused"] = {k: old.get(k, "unknown") for k in ("command", "commit", "note")}
        if args.reuse.parent.resolve() != out.resolve():
            shutil.copy(args.reuse.parent / "exact_reverse.png", out / "exact_reverse.png")
    else:
        numbers.update(checkpoint_sections(paths, settings, args, out, clock))
    law = IsotropicGaussianMixture.of(load_dataset("gaussians8"))
    numbers["D"] = clock.time("D", many_easy_problems, law, settings)
    table = args.fixed_encoder / "table.json"
    if table.exists():
        numbers["H"] = {"source": str(args.fixed_encoder), "rows": json.loads(table.read_text())}

    def section_g() -> dict:
        if args.quick:
            path = quick_ode_report(paths["gaussians8"], out / "ode-gaussians8")
            ode_reports["gaussians8"] = (path, read_ode_report(path, "gaussians8"))
        return score_matching(ode_reports)

    numbers["G"] = clock.time("G", section_g)
    numbers["seconds"] = clock.sections
    numbers = json.loads(json.dumps(numbers, default=float))  # the report is written from what the JSON holds
    (out / NUMBERS).write_text(json.dumps(numbers, indent=1) + "\n")
    (out / REPORT).write_text(render(numbers, out))
    print(f"wrote {out / REPORT}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    return run_refusing(PROG, lambda: run(args, argv))


if __name__ == "__main__":
    sys.exit(main())
