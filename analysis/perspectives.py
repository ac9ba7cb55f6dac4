"""The seeds' questions answered with numbers: one report, from bundled data.

    python analysis/perspectives.py [--digits runs/digits/checkpoint.pt] [--digits-long runs/digits-long/checkpoint.pt]
        [--gaussians8 runs/gaussians8/checkpoint.pt] [--vae runs/vae-digits/vae.pt] [--out runs/perspectives]
        [--overwrite]

1. "If q(x_{t-1} | x_t, x_0) is tractable, why do we need to learn p_theta at all?"  (section C)
2. "In what sense is training a diffusion model (a) maximum likelihood, (b) minimising an upper bound on
   KL(q(x_0) || p_theta(x_0)), (c) a hierarchical VAE whose encoder has no parameters, (d) breaking one hard
   problem into many easy ones?"  (sections A and B: a, b; E: c; D: d; F: b on real data)

Writes ``perspectives.md`` (every table), ``perspectives.json`` (every number) and the plots into ``--out``.
Checkpoints are passed in (``pyrodiff train`` makes them: the default digits run, ``--steps 10000`` for the
longer one, ``--config gaussians8``); the VAE is trained here for the digits run's own training time unless
``--vae`` gives one (then it is reused).  Nothing in the report is typed by hand: every number is computed
by this run, with the seed fixed.  An existing report is never replaced without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

PROG = "perspectives"
REPORT = "perspectives.md"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--digits", type=Path, default=Path("runs/digits/checkpoint.pt"))
    p.add_argument("--digits-long", type=Path, default=Path("runs/digits-long/checkpoint.pt"))
    p.add_argument("--gaussians8", type=Path, default=Path("runs/gaussians8/checkpoint.pt"))
    p.add_argument("--vae", type=Path, default=None, help="a VAE trained earlier (else one is trained here)")
    p.add_argument(
        "--vae-seconds",
        type=float,
        default=None,
        help="the VAE's training budget (default: the digits run's own training time)",
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
from pyrodiff.data import GAUSSIANS8_ENTROPY  # noqa: E402
from pyrodiff.evaluation.bound import bound_terms, nats_to_bits_per_dim  # noqa: E402
from pyrodiff.evaluation.likelihood import log_likelihood_bound  # noqa: E402
from pyrodiff.refusal import run_refusing  # noqa: E402
from pyrodiff.theory import exact  # noqa: E402
from pyrodiff.theory.empirical import EmpiricalReverse  # noqa: E402
from pyrodiff.theory.mixture import IsotropicGaussianMixture, moment_matched_bound  # noqa: E402
from pyrodiff.theory.vae import load_vae, negative_elbo, save_vae, train_vae  # noqa: E402


# ---------------------------------------------------------------------- helpers
def _mean_se(values) -> tuple[float, float]:
    """Mean and standard error over independent values."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    v = v[torch.isfinite(v)]
    return v.mean().item(), (v.std().item() / math.sqrt(v.numel()) if v.numel() > 1 else float("nan"))


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


#: distances below it (exact copies, at distance 0) are drawn at log10 = -4 in exact_reverse.png, and say so
DISTANCE_FLOOR = 1e-4
#: step KLs below it are drawn at it on the log axis of many_easy_problems.png, and the axis says so
KL_FLOOR = 1e-6


def _save(fig: Figure, path: Path) -> str:
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path.name


class Clock:
    """Wall-clock seconds of each section, reported at the end."""

    def __init__(self) -> None:
        self.began, self.sections = time.time(), {}

    def section(self, name: str, since: float) -> None:
        self.sections[name] = round(time.time() - since, 1)
        print(f"  {name}: {self.sections[name]} s", flush=True)


# ---------------------------------------------------------------------- A: the exactly solvable diffusion
def exactly_solvable(out: Path, numbers: dict) -> str:
    """Gaussian data N(m, S) in 2-D with a full covariance, the linear schedule respaced to 100 steps, an affine
    network: every quantity of the chain of inequalities in closed form, for several theta, and plain SVI."""
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    base = pyrodiff.NoiseSchedule.linear(1000)
    schedule = base.respace(base.evenly_spaced_timesteps(100))
    m = torch.tensor([0.5, -0.3], dtype=torch.float64)
    S = torch.tensor([[0.36, 0.18], [0.18, 0.25]], dtype=torch.float64)
    data = torch.distributions.MultivariateNormal(m, S).sample((4096,))
    # SVI on this finite sample maximises the ELBO under the sample's law (the ELBO is quadratic in x_0)
    sample_mean, sample_cov = data.mean(0), torch.cov(data.T, correction=0)

    def affine_model() -> pyrodiff.DiffusionModel:
        net = exact.AffineDenoiser(schedule.num_steps, 2).double()
        return pyrodiff.DiffusionModel(net, schedule, "epsilon", "small", "gaussian", data_shape=(2,))

    untrained, trained = affine_model(), affine_model()
    steps, lr = 2000, 0.05
    optimizer = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.01 ** (1 / steps)})
    guide = pyrodiff.DiffusionGuide(schedule)
    svi = pyro.infer.SVI(trained, guide, optimizer, pyro.infer.Trace_ELBO())
    sample_optimum = -exact.expected_elbo(exact.best_affine(schedule, sample_mean, sample_cov), sample_mean, sample_cov)
    curve = []
    for step in range(steps + 1):
        if step % 100 == 0:
            curve.append((step, -exact.expected_elbo(trained, sample_mean, sample_cov).item()))
        if step < steps:
            svi.step(data[torch.randint(0, len(data), (64,))])
    rows, table = [], {}
    thetas = (
        ("untrained (network = 0)", untrained),
        (f"plain SVI + Trace_ELBO, {steps} steps", trained),
        ('best affine mean, "small" variance', exact.best_affine(schedule, m, S, "small")),
        ('best affine mean, "large" variance', exact.best_affine(schedule, m, S, "large")),
        ("true reverse q(x_{t-1} | x_t)", exact.true_reverse(schedule, m, S)),
    )
    for label, chain in thetas:
        p = exact.perspectives(chain, m, S)
        table[label] = p
        residual = p["expected_neg_elbo"] - p["entropy"] - p["joint_kl"]
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
    svi_final = curve[-1][1]
    numbers["A"] = {
        "theta": table,
        "svi_curve": curve,
        "mean": m.tolist(),
        "cov": S.tolist(),
        "T": 100,
        "svi_minus_sample_optimum": svi_final - sample_optimum.item(),
        "sample_optimum": sample_optimum.item(),
    }
    fig, ax = _axes("SVI step", "nats per example (sample's law)", yscale="log")
    ax.plot([c[0] for c in curve], [c[1] for c in curve], "o-", ms=3, label="E[-ELBO] of the SVI iterate (exact)")
    ax.axhline(sample_optimum.item(), color="k", ls="--", label="closed-form optimum of the class")
    ax.legend(fontsize=7)
    plot = _save(fig, out / "exact_svi.png")
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
    best_small = table['best affine mean, "small" variance']
    best_large = table['best affine mean, "large" variance']
    return f"""## A. The exactly solvable diffusion (perspectives a and b, exact)

Data q(x_0) = N(m, S) with m = {m.tolist()}, S = {S.tolist()} (D = 2, full covariance); the linear T = 1000
schedule respaced to 100 evenly spaced steps (same endpoints); an affine network (`pyrodiff.theory.exact.AffineDenoiser`,
out = W_t x_t + b_t), epsilon prediction and the Gaussian decoder. Every number is a closed form
(`pyrodiff.theory.exact`), each computed on its own: E[-log p(x_0)] from the chain's Gaussian marginal, E[-ELBO] term
by term, KL(q_0:T || p_0:T) as one KL between two 202-dimensional Gaussians, KL(q0 || p0) between the
marginals. Nats per example, under the data law.

{_table(header, rows)}

Read across a row: H(q0) + KL(q0 || p0) = E[-log p(x0)] <= E[-ELBO] = H(q0) + KL(q_0:T || p_0:T), for every
theta, not only at the optimum (the last column is the identity's residual, computed from independent
closed forms). (a) The ELBO is a lower bound on the log-likelihood: E[-ELBO] - E[-log p] = E[gap] =
E KL(q(x_1:T | x_0) || p(x_1:T | x_0)) >= 0, so maximising it is maximum likelihood up to that gap. (b) E[-ELBO]
- H = KL(q_0:T || p_0:T) >= KL(q0 || p0): the bound minus the data entropy bounds the KL from the data to the
model. Plain `pyro.infer.SVI` with `Trace_ELBO` (full chain, batches of 64 from 4096 draws) ends
{svi_final - sample_optimum.item():.3g} nats above the closed-form maximum of its model class for its sample
(plot; {sample_optimum.item():.4g} nats). With the "small" variance the best affine model has
KL(q0 || p0) = {best_small["data_kl"]:.3g} nats: its marginal is nearly the data law, yet its bound is
{best_small["expected_gap"]:.3g} nats loose, because the fixed isotropic variance along the path is not the true
reverse covariance (the "large" variance's best bound is {best_large["expected_gap"]:.3g} nats loose). The true reverse process (prior q(x_T), steps
q(x_{{t-1}} | x_t), both Gaussian) closes every gap.

![SVI against the closed form]({plot})
"""


# ---------------------------------------------------------------------- B: the likelihood behind the bound
def likelihood_bound(models: dict, out: Path, numbers: dict) -> str:
    ks = (1, 10, 100, 1000)
    rows, section, notes = [], {}, []
    fig, ax = _axes("k (particles)", "E[IWAE_k] - ELBO (nats)", xscale="log")
    for name, (model, x0, K, log_q) in models.items():
        torch.manual_seed(0)
        began = time.time()
        res = log_likelihood_bound(model, x0, num_particles=K)
        seconds = time.time() - began
        lw = res.log_weights.double().cpu()
        elbo = lw.mean(1)
        per_k = {}
        if log_q is not None:  # the paired bounds on KL(q(x_0) || p(x_0)) from the ELBO and from IWAE_K
            excess = {"elbo": -elbo + log_q, "iwae": -res.expected_at(K).double().cpu() + log_q}
            numbers.setdefault("F", {})[name] = {k: _mean_se(v) for k, v in excess.items()}
        for k in [k for k in ks if k <= K]:
            recovered = (
                res.expected_at(k).double().cpu() - elbo
            )  # the part of the gap log p - ELBO that k particles recover
            khat = res.at(k).khat.cpu().numpy() if k == K or k >= 21 else np.full(x0.shape[0], np.nan)
            per_k[k] = {
                "iwae_nats": _mean_se(res.expected_at(k).double().cpu()),
                "recovered_nats": _mean_se(recovered),
                "khat_median": float(np.nanmedian(khat)) if np.isfinite(khat).any() else float("nan"),
            }
            rows.append(
                [
                    name,
                    k,
                    *per_k[k]["iwae_nats"],
                    *per_k[k]["recovered_nats"],
                    nats_to_bits_per_dim(per_k[k]["recovered_nats"][0], res.dims),
                    per_k[k]["khat_median"],
                ]
            )
        khat = res.khat.cpu().numpy()
        section[name] = {
            "examples": x0.shape[0],
            "K": K,
            "elbo_nats": _mean_se(elbo),
            "per_k": per_k,
            "seconds": round(seconds, 1),
            "dims": res.dims,
            "khat": khat.tolist(),
            "log_weight_sd": lw.std(1).tolist(),
            "stderr_of_iwae_K": res.stderr.cpu().tolist(),
        }
        trusted = int((khat < 0.7).sum())
        verdict = (
            "the weights are degenerate: one path carries the estimate, and IWAE_K is a loose, noisy lower "
            "bound that more particles raise in jumps"
            if trusted < len(khat) / 2
            else "the weights are well behaved and IWAE_K can be trusted"
        )
        notes.append(
            f"- **{name}**: {s_examples(x0)} test examples, K = {K} forward paths each ({seconds:.0f} s). The log "
            f"weights' standard deviation is {np.median(section[name]['log_weight_sd']):.2f} nats (median over "
            f"examples); k-hat is below 0.7 for {trusted} of {len(khat)} examples (median "
            f"{np.median(khat):.2f}, largest {np.max(khat):.2f}): {verdict}. K = {K} particles recover "
            f"{per_k[K]['recovered_nats'][0]:.4g} +- {per_k[K]['recovered_nats'][1]:.2g} nats "
            f"({nats_to_bits_per_dim(per_k[K]['recovered_nats'][0], res.dims):.4f} bits/dim) of the gap between "
            f"the ELBO and log p."
        )
        kk = [k for k in ks if k <= K]
        ax.errorbar(
            kk,
            [per_k[k]["recovered_nats"][0] for k in kk],
            [per_k[k]["recovered_nats"][1] for k in kk],
            marker="o",
            label=name,
        )
    numbers["B"] = section
    ax.legend(fontsize=7)
    plot = _save(fig, out / "iwae.png")
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
the mean log weight of the same draws). The Pareto k-hat (PSIS, ArviZ) of the weights says whether an
importance-weighted estimate can be trusted: below 0.7 it can; above 0.7 the weights have effectively
infinite variance (k-hat needs at least 21 draws). Standard errors are over examples.

{_table(header, rows)}

{chr(10).join(notes)}

![recovered gap]({plot})
"""


def s_examples(x0: torch.Tensor) -> int:
    return x0.shape[0]


# ---------------------------------------------------------------------- C: the exact reverse process
def nearest_distances(samples: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """For each sample, the distance to its nearest training example: the largest absolute difference over
    dimensions (images) or the Euclidean distance (points)."""
    s, d = samples.reshape(len(samples), -1).double(), data.reshape(len(data), -1).double()
    out = []
    for chunk in s.split(64):
        diff = chunk[:, None, :] - d[None]
        out.append(diff.abs().amax(-1).amin(1) if samples.dim() > 2 else diff.norm(dim=-1).amin(1))
    return torch.cat(out)


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


def exact_reverse(cases: dict, out: Path, numbers: dict) -> str:
    rows_samples, rows_bound, rows_cost, section, readings = [], [], [], {}, []
    fig = Figure(figsize=(9, 3.2))
    for i, (name, case) in enumerate(cases.items()):
        data, learned, tolerance, scale = case["train"], case["model"], case["tolerance"], case["scale"]
        n_samples, n_bound = case["samples"], case["examples"]
        empirical = EmpiricalReverse(data, learned.schedule, learned.decoder)
        result = {}
        ax = fig.add_subplot(1, len(cases), i + 1)
        for label, model in (("exact reverse", empirical), ("trained network", learned)):
            g = torch.Generator().manual_seed(0)
            began = time.time()
            x = noise_free_samples(model, n_samples, g)
            sample_seconds = time.time() - began
            dist = nearest_distances(x, data) * scale
            within = (dist <= tolerance * scale).double().mean().item()
            torch.manual_seed(0)
            train_terms = bound_terms(model, data[:n_bound])
            test_terms = bound_terms(model, case["test"][:n_bound])
            quantiles = torch.quantile(dist, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
            if model is empirical:
                log_p = {
                    "train": -model.marginal_log_prob(data[:n_bound]),
                    "test": -model.marginal_log_prob(case["test"][:n_bound]),
                }
            else:
                log_p = {"train": torch.full((1,), float("nan")), "test": torch.full((1,), float("nan"))}
            result[label] = {
                "train_neg_log_p": _mean_se(log_p["train"]),
                "test_neg_log_p": _mean_se(log_p["test"]),
                "within": within,
                "nn_distance_quantiles": quantiles,
                "train_bound_nats": _mean_se(train_terms.total),
                "test_bound_nats": _mean_se(test_terms.total),
                "test_bound_median_nats": test_terms.total.mean(0).median().item(),
                "sample_seconds": round(sample_seconds, 2),
            }
            r = result[label]
            rows_samples.append([name, label, n_samples, f"{100 * within:.1f}%", *quantiles])
            rows_bound.append(
                [
                    name,
                    label,
                    n_bound,
                    *r["train_bound_nats"],
                    r["train_neg_log_p"][0],
                    *r["test_bound_nats"],
                    r["test_bound_median_nats"],
                    r["test_neg_log_p"][0],
                ]
            )
            distance_histogram(ax, dist, label)
        ax.set_title(f"{name}: distance to the nearest training example", fontsize=8)
        ax.set_xlabel(f"log10 distance ({case['units']}; 0 drawn at {math.log10(DISTANCE_FLOOR):g})", fontsize=8)
        ax.legend(fontsize=6)
        result["cost"] = _step_cost(empirical, learned, data)
        for n, ms in result["cost"]["empirical_ms"].items():
            rows_cost.append([name, n, ms, result["cost"]["network_ms"], ms / result["cost"]["network_ms"]])
        section[name] = result
        e, n = result["exact reverse"], result["trained network"]
        grid = bool(learned.decoder.levels)
        kind = "probabilities of grid points" if grid else "densities: a kernel density estimate of bandwidth sigma_1"
        readings.append(
            f"- **{name}** (N = {data.shape[0]}, log N = {math.log(data.shape[0]):.3f}): "
            f"{100 * e['within']:.0f}% of the exact process's samples are copies of training examples, against "
            f"{100 * n['within']:.0f}% of the network's. Its exact -log p(x_0) is {e['train_neg_log_p'][0]:.4g} "
            f"nats on training examples and {e['test_neg_log_p'][0]:.4g} on test examples ({kind}); its bound "
            f"{e['train_bound_nats'][0]:.4g} +- {e['train_bound_nats'][1]:.2g} and {e['test_bound_nats'][0]:.4g} +- "
            f"{e['test_bound_nats'][1]:.2g} nats, the network's {n['train_bound_nats'][0]:.4g} +- "
            f"{n['train_bound_nats'][1]:.2g} and {n['test_bound_nats'][0]:.4g} +- {n['test_bound_nats'][1]:.2g} "
            f"(test minus train: {e['test_bound_nats'][0] - e['train_bound_nats'][0]:.4g} nats for the exact "
            f"process, {n['test_bound_nats'][0] - n['train_bound_nats'][0]:.4g} for the network)."
        )
    numbers["C"] = section
    plot = _save(fig, out / "exact_reverse.png")
    sample_header = [
        "data",
        "reverse process",
        "samples",
        "copies of a training example",
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
difference in grey levels, a copy meaning within half a grid step; gaussians8: Euclidean, within 1e-3).

{_table(sample_header, rows_samples)}

**The bound** (-ELBO, nats per example, every term; the exact process's KL terms are one-draw Monte Carlo
estimates, its steps being mixtures) and, for the exact process, its exact -log p(x_0)
(`EmpiricalReverse.marginal_log_prob`: the training set seen through the decoder, up to the prior's
mismatch, about 1e-5 here):

{_table(bound_header, rows_bound)}

**The cost of one reverse step** (a batch of 64, one `predict`, median of 5 calls; the exact process also on the
training set tiled 10 and 100 times, up to 200 000 points, to show its cost grow linearly with N, where the
network's is fixed):

{_table(cost_header, rows_cost)}

![nearest-neighbour distances]({plot})

{chr(10).join(readings)}

This is the answer to the question: the posterior q(x_{{t-1}} | x_t, x_0) is tractable only given x_0.
Without x_0 the exact reverse process is this mixture over the whole data set, at every step: its cost per
step grows with N, and what it samples is the training set itself. It maximises the likelihood of the
empirical distribution, which puts no probability on a new grid image; seen through a Gaussian decoder it is
a kernel density estimate whose bandwidth is the decoder's sigma_1, not a choice made for generalisation.
A learned p_theta gives up that exactness for a fixed cost per step and a density that generalises: compare
the test-minus-train differences above.
"""


def _step_cost(empirical, learned, data, batch: int = 64, repeats: int = 5) -> dict:
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
        for k in (1, 10, 100)
        if k == 1 or data.shape[0] * k <= 200_000
    }
    return {"empirical_ms": tiled, "network_ms": median_ms(learned), "batch": batch}


# ---------------------------------------------------------------------- D: many easy problems
def many_easy_problems_figure(section: dict) -> Figure:
    """The best Gaussian-step bound against T, and each step's KL against t / T (floored at :data:`KL_FLOOR` on the
    log axis, as its label says); the panels are laid out so that no label runs into the other panel."""
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    ax = fig.add_subplot(1, 2, 1)
    Ts = list(section)
    ax.errorbar(Ts, [section[T]["bound"] for T in Ts], [section[T]["bound_stderr"] for T in Ts], marker="o")
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


def many_easy_problems(law, out: Path, numbers: dict, num_samples: int) -> str:
    base = pyrodiff.NoiseSchedule.linear(1000)
    rows, section = [], {}
    for T in (1, 2, 5, 10, 20, 50, 100, 1000):
        schedule = base.respace(base.evenly_spaced_timesteps(T))
        r = moment_matched_bound(
            law, schedule, num_samples, generator=torch.Generator().manual_seed(T), entropy=GAUSSIANS8_ENTROPY
        )
        section[T] = r.to_dict()
        rows.append([T, r.bound, r.bound_stderr, r.gap, r.step_kls.sum().item(), r.step_kls.max().item(), r.prior_kl])
    numbers["D"] = section
    plot = _save(many_easy_problems_figure(section), out / "many_easy_problems.png")
    header = ["T", "best bound (nats)", "+-", "excess over H(q0)", "sum of step KLs", "largest step KL", "prior KL"]
    return f"""## D. Many easy problems (perspective d)

gaussians8's density is known, so every true reverse conditional q(x_{{t-1}} | x_t) is a known Gaussian
mixture (`pyrodiff.theory.mixture`). The best any chain of Gaussian steps can do is to match each conditional's
mean and covariance; its expected negative ELBO is then exactly H(q(x_0)) + KL(q(x_T) || N(0, I)) + sum_t
E KL(q(x_{{t-1}} | x_t) || its moment-matched Gaussian). Each step KL is a Monte Carlo estimate
({num_samples} draws per step) with its standard error. The schedules are the linear T = 1000 schedule
respaced to T evenly spaced steps with the same endpoints (`NoiseSchedule.respace`).

{_table(header, rows)}

![many easy problems]({plot})

With one step, the single Gaussian step must cover all eight modes and the bound is that of one Gaussian
fitted to the data; as T grows each step's true conditional becomes closer to Gaussian (the largest step KL
falls), and the best bound approaches the entropy, {GAUSSIANS8_ENTROPY:.3f} nats.
"""


# ---------------------------------------------------------------------- E: a learned encoder
def pixel_histogram_nats(train: torch.Tensor, test: torch.Tensor, levels: int) -> dict:
    """A baseline with no model of dependencies: each pixel's level frequencies in the training set (add-one
    smoothed); -log p of each test example (nats)."""
    to_level = lambda x: ((x.reshape(len(x), -1) + 1) * (levels - 1) / 2).round().long()  # noqa: E731
    counts = torch.nn.functional.one_hot(to_level(train), levels).sum(0).double() + 1  # (D, levels)
    log_p = (counts / counts.sum(-1, keepdim=True)).log()
    nats = -log_p.gather(1, to_level(test).T).sum(0)
    return {"nats": nats, "parameters": log_p.numel()}


def learned_encoder(
    vae,
    vae_info: dict,
    diffusion: dict,
    train: torch.Tensor,
    test: torch.Tensor,
    levels: int,
    out: Path,
    numbers: dict,
    unet_parameters: int,
) -> str:
    torch.manual_seed(0)
    nats = negative_elbo(vae, test.to(next(vae.parameters()).dtype), num_samples=16).total.mean(0)
    count = sum(p.numel() for p in vae.parameters())
    rows = [
        [
            "Pyro VAE (Gaussian latent, learned encoder)",
            count,
            f"{vae_info.get('seconds', float('nan')):.0f}",
            *[nats_to_bits_per_dim(v, test[0].numel()) for v in _mean_se(nats)],
        ]
    ]
    histogram = pixel_histogram_nats(train, test, levels)
    rows.append(
        [
            "independent per-pixel histograms of the training set (add-one)",
            histogram["parameters"],
            "0",
            *[nats_to_bits_per_dim(v, test[0].numel()) for v in _mean_se(histogram["nats"])],
        ]
    )
    section = {
        "vae": {"bits_per_dim": rows[0][-2:], "parameters": rows[0][1], **vae_info},
        "histogram": {"bits_per_dim": rows[1][-2:]},
    }
    for label, d in diffusion.items():
        rows.append([label, unet_parameters, f"{d['seconds']:.0f}", d["bits_per_dim"], d["stderr"]])
        section[label] = d
    numbers["E"] = section
    header = ["model", "parameters", "training seconds", "test -ELBO (bits/dim)", "+-"]
    vae_bpd, vae_se = section["vae"]["bits_per_dim"]
    lines = []
    for label, d in diffusion.items():
        z = (d["bits_per_dim"] - vae_bpd) / math.hypot(d["stderr"], vae_se)
        lines.append(
            f"{label}: {d['bits_per_dim']:.3f} +- {d['stderr']:.3f} bits/dim after {d['steps']} steps "
            f"({d['bits_per_dim'] - vae_bpd:+.3f} against the VAE, {z:+.1f} standard errors)"
        )
    reading = (
        f"The VAE trained for {vae_info.get('seconds', float('nan')):.0f} s ({vae_info.get('steps')} SVI steps; "
        f"early stopping on {100 * vae_info.get('validation_fraction', 0):.0f}% of the training split held out, best "
        f"at step {vae_info.get('best_step')}) reaches {vae_bpd:.3f} +- {vae_se:.3f} bits/dim; "
        + "; ".join(lines)
        + f". The independent per-pixel histograms reach {section['histogram']['bits_per_dim'][0]:.3f}."
    )
    best = min(diffusion.values(), key=lambda d: d["bits_per_dim"]) if diffusion else None
    verdict = (
        ""
        if best is None
        else f"On {train.shape[0]} training images of {test[0].numel()} pixels the learned encoder has the "
        f"{'lower' if vae_bpd < best['bits_per_dim'] else 'higher'} bound at this budget."
    )
    return f"""## E. The parameterless encoder against a learned one (perspective c)

A diffusion model is a hierarchical VAE with T latent layers whose encoder q(x_{{1:T}} | x_0) has no
parameters. Beside it, an ordinary Pyro VAE (`pyrodiff.theory.vae`: a `pyro.infer.SVI` model/guide pair, a Gaussian
latent, a learned Gaussian encoder, the same discretized decoder on the 17 grey levels) with a parameter count
within 10% of the digits U-Net, trained on the same training set. Test-set negative ELBO on the first
{test.shape[0]} test digits (the diffusion rows are the same examples, every term of the bound), bits/dim on
the 17-level scale (uniform: log2 17 = 4.09):

{_table(header, rows)}

{reading} The digits diffusion runs are trained on L_simple, not on the bound (the bound is what is reported),
and their encoder is fixed: every one of the T = 1000 latent layers must be paid for in the rate, however
little the model needs it; a learned encoder spends its rate only where it helps. {verdict}
"""


# ---------------------------------------------------------------------- F: the bound on KL(q(x_0) || p(x_0))
def kl_bound(gaussians8: Path, numbers: dict) -> str:
    """The paired bound on KL(q(x_0) || p(x_0)) for gaussians8, whose density is known: from the checkpoint's
    test-set bound (every test example) and, on the examples of section B, from the ELBO and from IWAE_K."""
    s = json.loads((gaussians8.parent / "test_bound.json").read_text())
    rows = [
        ["-ELBO + log q (every term, `test_bound.json`)", s["num_examples"], s["kl_bound_nats"], s["kl_bound_stderr"]]
    ]
    for name, f in numbers.get("F", {}).items():
        rows.append([f"-ELBO + log q ({name}, section B's draws)", len(numbers["B"][name]["khat"]), *f["elbo"]])
        K = numbers["B"][name]["K"]
        rows.append([f"-IWAE_{K} + log q (same draws)", len(numbers["B"][name]["khat"]), *f["iwae"]])
    numbers.setdefault("F", {})["test_bound"] = {
        "examples": s["num_examples"],
        "kl_bound_nats": [s["kl_bound_nats"], s["kl_bound_stderr"]],
    }
    return f"""## F. The bound on KL(q(x_0) || p_theta(x_0)) on real data (perspective b, estimated)

gaussians8's density q(x_0) is known, so E_q[-ELBO(x_0) + log q(x_0)] = KL(q(x_0) || p(x_0)) + E_q[gap] >= KL(q(x_0)
|| p(x_0)) is estimated without bias, paired per example (`BoundTerms.kl_bound`). Replacing the ELBO by IWAE_K
tightens it by the part of the gap that K particles recover (section B); both stay upper bounds on the KL in
expectation.

{_table(["estimate", "test examples", "nats", "+-"], rows)}
"""


# ---------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> int:
    if (args.out / REPORT).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out / REPORT} exists: choose another --out or pass --overwrite")
    for path in (args.digits, args.gaussians8):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such checkpoint (train it with `pyrodiff train`, see the README)")
    digits_built, digits = pyrodiff.load_trained(args.digits)  # a refused checkpoint stops the run before any work
    g8_built, g8 = pyrodiff.load_trained(args.gaussians8)
    args.out.mkdir(parents=True, exist_ok=True)
    clock, numbers, parts = Clock(), {}, []
    torch.set_grad_enabled(True)

    since = time.time()
    parts.append(exactly_solvable(args.out, numbers))
    clock.section("A", since)

    g8 = g8.double()  # float64 where it is cheap (a small MLP); the U-Net stays in float32
    digits_data, g8_data = digits_built.data, g8_built.data

    since = time.time()
    parts.append(
        likelihood_bound(
            {
                "gaussians8 (MLP, learned variance, T = 1000)": (
                    g8,
                    g8_data.test[:16].double(),
                    1000,
                    g8_data.log_density(g8_data.test[:16]),
                ),
                "digits (U-Net, T = 1000)": (digits, digits_data.test[:2], 100, None),
            },
            args.out,
            numbers,
        )
    )
    clock.section("B", since)

    since = time.time()
    parts.append(
        exact_reverse(
            {
                "digits": {
                    "train": digits_data.train,
                    "test": digits_data.test,
                    "model": digits,
                    "tolerance": 1 / 16,
                    "scale": 8.0,
                    "units": "grey levels",
                    "samples": 64,
                    "examples": 50,
                },
                "gaussians8": {
                    "train": g8_data.train.double(),
                    "test": g8_data.test.double(),
                    "model": g8,
                    "tolerance": 1e-3,
                    "scale": 1.0,
                    "units": "data units",
                    "samples": 100,
                    "examples": 100,
                },
            },
            args.out,
            numbers,
        )
    )
    clock.section("C", since)

    since = time.time()
    parts.append(many_easy_problems(IsotropicGaussianMixture.of(g8_data), args.out, numbers, num_samples=4000))
    clock.section("D", since)

    since = time.time()
    test = digits_data.test[:100]
    digits_json = json.loads((args.digits.parent / "test_bound.json").read_text())
    diffusion = {}
    for label, ckpt in (("diffusion, default run", args.digits), ("diffusion, longer run", args.digits_long)):
        if ckpt.exists():
            s = json.loads((ckpt.parent / "test_bound.json").read_text())
            diffusion[label] = {
                "bits_per_dim": s["bits_per_dim"],
                "stderr": s["bits_per_dim_stderr"],
                "seconds": s.get("train_seconds", s.get("train_seconds_this_run")),  # the latter: older runs
                "steps": s["training_steps"],
                "examples": s["num_examples"],
            }
    if args.vae is not None:
        vae, vae_info = load_vae(args.vae), json.loads(args.vae.with_suffix(".json").read_text())
    else:
        seconds = args.vae_seconds or digits_json.get("train_seconds", digits_json.get("train_seconds_this_run"))
        vae, vae_info = train_vae(digits_data.train, seconds, seed=0, progress=True)
        vae_info = {k: v for k, v in vae_info.items() if k != "losses"}
        save_vae(args.out / "vae.pt", vae, vae_info)
        (args.out / "vae.json").write_text(json.dumps(vae_info, indent=1, default=float) + "\n")
    unet_parameters = sum(p.numel() for p in digits.network.parameters())
    parts.append(
        learned_encoder(
            vae, vae_info, diffusion, digits_data.train, test, digits_data.levels, args.out, numbers, unet_parameters
        )
    )
    clock.section("E", since)

    parts.append(kl_bound(args.gaussians8, numbers))
    numbers["seconds"] = clock.sections
    (args.out / "perspectives.json").write_text(json.dumps(numbers, indent=1, default=float) + "\n")
    head = f"""# The seeds' questions, answered with numbers

Written by `python analysis/perspectives.py` ({", ".join(f"{k}: {v} s" for k, v in clock.sections.items())};
total {sum(clock.sections.values()):.0f} s). Nats per example unless stated; bits/dim = nats / (D ln 2).
"""
    (args.out / REPORT).write_text(head + "\n" + "\n".join(parts))
    print(f"wrote {args.out / REPORT}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_refusing(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
