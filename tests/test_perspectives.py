"""analysis/perspectives.py --quick runs every section, and its report says what the library computes.

The quick run (tiny checkpoints trained by the run itself) is made once for the module.  Each test recomputes some of
the report's numbers from the same checkpoints and seeds, with the library calls (or an independent computation)
that should have produced them, and finds them in ``perspectives.json`` and in the text of ``perspectives.md``;
the text is the JSON's (re-rendering the JSON gives the report).  The committed report, docs/perspectives/, is
checked the same way for the numbers that need no checkpoint, and against the statements a review flagged."""

from __future__ import annotations

import json
import math
import re
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

import pyrodiff
from pyrodiff.data import GAUSSIANS8_ENTROPY, load_dataset
from pyrodiff.evaluation.bound import bound_terms
from pyrodiff.theory import exact
from pyrodiff.theory.mixture import IsotropicGaussianMixture, moment_matched_bound
from pyrodiff.theory.vae import load_vae, negative_elbo

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "analysis" / "perspectives.py"
COMMITTED = ROOT / "docs" / "perspectives"


@pytest.fixture(scope="module")
def script() -> dict:
    return runpy.run_path(str(SCRIPT))


@pytest.fixture(scope="module")
def quick(script, tmp_path_factory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("perspectives")
    assert script["main"](["--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "perspectives.json").read_text()), (out / "perspectives.md").read_text()


def _row(report: str, *cells: str) -> str:
    """The one table row of the report that starts with these cells."""
    prefix = "| " + " | ".join(cells) + " |"
    (row,) = [line for line in report.splitlines() if line.startswith(prefix)]
    return row


def _g(x: float) -> str:
    """A float as the report's tables write it."""
    return f"{x:.4g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def test_the_report_is_its_numbers_rendered(script, quick, tmp_path):
    out, numbers, report = quick
    assert script["render"](numbers, tmp_path) == report
    assert {"A", "B", "C", "D", "E", "F", "G"} <= set(numbers) and numbers["provenance"]["settings"] == "quick"
    assert (tmp_path / "iwae.png").exists() and (out / "exact_reverse.png").exists()


def test_section_a_is_the_closed_forms(script, quick):
    _, numbers, report = quick
    a = numbers["A"]
    base = pyrodiff.NoiseSchedule.linear(1000)
    schedule = base.respace(base.evenly_spaced_timesteps(script["QUICK"].respaced_steps))
    m, S = torch.tensor(a["mean"], dtype=torch.float64), torch.tensor(a["cov"], dtype=torch.float64)
    small, true = exact.best_affine(schedule, m, S, "small"), exact.true_reverse(schedule, m, S)
    expected = exact.perspectives(small, m, S)
    got = a["theta"]['best affine mean, "small" variance']
    for key in ("entropy", "data_kl", "expected_gap", "expected_neg_elbo", "joint_kl"):
        assert got[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-12), key
    row = _row(report, 'best affine mean, "small" variance')
    assert f"| {_g(expected['expected_gap'])} | {_g(expected['expected_neg_elbo'])} |" in row
    # where the gap sits: L_1 of the respaced chain, against the true reverse process's terms
    excess = exact.expected_elbo_terms(small, m, S) - exact.expected_elbo_terms(true, m, S)
    assert int(excess.argmax()) == 1
    assert f"{excess[1].item():.4g} nats sit in one term,\nL_1," in report
    full = exact.perspectives(exact.best_affine(base, m, S, "small"), m, S)["expected_gap"]
    assert full == pytest.approx(1.137, abs=1e-3)  # the 1.14 nats, recomputed
    assert f"best bound is {full:.3g} nats loose" in report.replace("\n", " ")


def test_section_b_is_log_likelihood_bound_and_vehtaris_thresholds(quick):
    out, numbers, report = quick
    built, model = pyrodiff.load_trained(out / "checkpoints" / "gaussians8" / "checkpoint.pt")
    (name,) = [n for n in numbers["B"] if n.startswith("gaussians8")]
    b = numbers["B"][name]
    K, n = b["K"], b["examples"]
    assert n >= 10 and K >= 21
    torch.manual_seed(0)
    res = pyrodiff.log_likelihood_bound(model.double(), built.data.test[:n].double(), num_particles=K)
    np.testing.assert_allclose(b["khat"], res.khat.numpy(), rtol=1e-9)
    assert b["per_k"][str(K)]["iwae_nats"][0] == pytest.approx(res.estimate.double().mean().item(), rel=1e-9)
    # the thresholds, by hand: 0.5 (finite variance), min(1 - 1/log10 K, 0.7) and 0.7
    threshold = min(1 - 1 / math.log10(K), 0.7)
    khat = res.khat.numpy()
    sentence = (
        f"k-hat is at least 0.5 (infinite variance of the weights) for {(khat >= 0.5).sum()} of {n} examples, above "
        f"the threshold for K = {K} draws, min(1 - 1/log10 K, 0.7) = {threshold:.3f}, for {(khat > threshold).sum()} "
        f"of {n}, and above 0.7 for {(khat > 0.7).sum()} of {n}"
    )
    assert sentence in report
    assert _row(report, name, str(K)).split(" | ")[2] == _g(b["per_k"][str(K)]["iwae_nats"][0])


def test_section_c_has_the_held_out_baseline_and_the_bounds(quick):
    out, numbers, report = quick
    data = load_dataset("gaussians8")
    train, test = data.train.double(), data.test.double()
    nearest = torch.cat([torch.cdist(chunk, train).amin(1) for chunk in test.split(500)])
    hits = int((nearest <= 1e-3).sum())
    assert 0.04 < hits / len(test) < 0.08  # the 5.7% of real test points
    c = numbers["C"]["gaussians8"]
    assert (c["heldout"]["hits"], c["heldout"]["count"]) == (hits, len(test))
    assert f"against {hits} of {len(test)} real held-out test points ({100 * hits / len(test):.1f}% +-" in report
    # the network's bound on training and test examples, as the run drew it
    _, model = pyrodiff.load_trained(out / "checkpoints" / "gaussians8" / "checkpoint.pt")
    model = model.double()
    examples = numbers["settings"]["exact_reverse"]["gaussians8"][1]
    torch.manual_seed(0)
    train_bound = bound_terms(model, train[:examples]).total.mean(0)
    test_bound = bound_terms(model, test[:examples]).total.mean(0)
    assert c["trained network"]["train_bound_nats"][0] == pytest.approx(train_bound.mean().item(), rel=1e-9)
    assert c["trained network"]["test_bound_nats"][0] == pytest.approx(test_bound.mean().item(), rel=1e-9)
    d = test_bound.mean() - train_bound.mean()
    se = math.hypot(train_bound.std() / math.sqrt(examples), test_bound.std() / math.sqrt(examples))
    z = (d / se).item()
    verdict = "significant" if abs(z) >= 2 else "not significant"
    assert f"the network's bound {d:.4g} +- {se:.2g} nats ({z:+.1f} standard errors: {verdict})" in report


def test_section_d_is_moment_matched_bound(script, quick):
    _, numbers, report = quick
    T = script["QUICK"].many_easy_steps[1]
    law = IsotropicGaussianMixture.of(load_dataset("gaussians8"))
    base = pyrodiff.NoiseSchedule.linear(1000)
    r = moment_matched_bound(
        law,
        base.respace(base.evenly_spaced_timesteps(T)),
        script["QUICK"].many_easy_draws,
        generator=torch.Generator().manual_seed(T),
        entropy=GAUSSIANS8_ENTROPY,
    )
    assert numbers["D"][str(T)]["bound"] == pytest.approx(r.bound, rel=1e-12)
    assert _row(report, str(T)).startswith(f"| {T} | {_g(r.bound)} | {_g(r.bound_stderr)} |")


def test_section_e_histograms_and_vae(quick):
    out, numbers, report = quick
    data = load_dataset("digits")
    e = numbers["E"]
    test = data.test[: e["examples"]]
    levels = lambda x: np.rint((x.reshape(len(x), -1).numpy() + 1) * 8).astype(int)  # noqa: E731
    train_levels, test_levels = levels(data.train), levels(test)
    nats = np.zeros(len(test))
    for pixel in range(train_levels.shape[1]):
        counts = np.bincount(train_levels[:, pixel], minlength=17) + 1
        nats -= np.log(counts[test_levels[:, pixel]] / counts.sum())
    bits = nats / (64 * math.log(2))
    assert e["histogram"]["bits_per_dim"][0] == pytest.approx(bits.mean(), rel=1e-9)
    assert f"reach\n{bits.mean():.3f} +- " in report or f"reach {bits.mean():.3f} +- " in report
    vae = load_vae(out / "vae.pt")
    torch.manual_seed(0)
    vae_nats = negative_elbo(vae, test, num_samples=16).total.mean(0)
    assert e["vae"]["bits_per_dim"][0] == pytest.approx(vae_nats.mean().item() / (64 * math.log(2)), rel=1e-6)
    assert "pays for" not in report and "compared as bounds" in report and "confounded" in report


def test_section_f_is_the_checkpoints_test_bound(quick):
    out, numbers, report = quick
    s = json.loads((out / "checkpoints" / "gaussians8" / "test_bound.json").read_text())
    row = _row(report, "-ELBO + log q (every term, `test_bound.json`)")
    assert row == f"| -ELBO + log q (every term, `test_bound.json`) | {s['num_examples']} | " + (
        f"{_g(s['kl_bound_nats'])} | {_g(s['kl_bound_stderr'])} |"
    )


def test_section_g_is_ode_log_likelihood_beside_the_bound(quick):
    """Section G's gaussians8 numbers are ode_log_likelihood's with the quick run's loose tolerances on the first 16
    test examples of the quick checkpoint, paired with log q and with the ELBO of the same examples; its k-hat
    counts are Vehtari et al.'s thresholds applied by hand; digits, not computed by --quick, names its command."""
    out, numbers, report = quick
    g = numbers["G"]["gaussians8"]
    built, model = pyrodiff.load_trained(out / "checkpoints" / "gaussians8" / "checkpoint.pt")
    model = model.double()
    x = built.data.test[:16].double()
    ode = pyrodiff.ode_log_likelihood(model, x, rtol=1e-3, atol=1e-3)
    nll = -ode.log_likelihood
    assert g["ode"]["negative_log_likelihood_nats"] == pytest.approx(nll.mean().item(), rel=1e-9)
    assert (g["ode"]["nfe"], g["ode"]["rtol"], g["examples"]) == (ode.nfe, 1e-3, 16)
    assert f"{ode.nfe} function evaluations" in report
    log_q = IsotropicGaussianMixture.of(built.data).log_prob(x)
    kl = log_q + nll
    kl_mean, kl_se = kl.mean().item(), kl.std().item() / 4
    z = kl_mean / kl_se
    verdict = "significant" if abs(z) >= 2 else "not significant"
    assert (
        f"KL(q(x_0) || p_ODE) is estimated without bias as {kl_mean:.4f} +- {kl_se:.4f} nats, paired per example "
        f"({z:+.1f} standard errors: {verdict})" in report
    )
    assert _row(report, "-log p_ODE(x), the network's score").startswith(
        f"| -log p_ODE(x), the network's score | {_g(nll.mean().item())} | {_g(nll.std().item() / 4)} | {_g(kl_mean)} |"
    )
    with torch.no_grad():
        neg_elbo = bound_terms(model, x, generator=torch.Generator().manual_seed(0)).total.double().mean(0)
    d = nll - neg_elbo
    d_mean, d_se = d.mean().item(), d.std().item() / 4
    verdict = "significant" if abs(d_mean / d_se) >= 2 else "not significant"
    assert (
        f"the ODE's figure minus the -ELBO's is {d_mean:+.4f} +- {d_se:.4f} nats (paired per example; "
        f"{d_mean / d_se:+.1f} standard errors: {verdict})" in report
    )
    khat = np.asarray(json.loads((out / "ode-gaussians8" / "ode_likelihood.json").read_text())["per_example"]["khat"])
    K = g["iwae"]["particles"]
    threshold = min(1 - 1 / math.log10(K), 0.7)
    assert (
        f"above the threshold for K = {K} draws, min(1 - 1/log10 K, 0.7) = {threshold:.3f}, for "
        f"{(khat > threshold).sum()} of 16, and above 0.7 for {(khat > 0.7).sum()} of 16" in report
    )
    assert "**digits**: not in this report: `python analysis/ode_likelihood.py runs/digits/checkpoint.pt" in report


def test_section_g_refuses_another_data_sets_report_before_any_work(script, tmp_path, capsys):
    wrong = tmp_path / "ode_likelihood.json"
    wrong.write_text(json.dumps({"data": "digits", "ode": {}}))
    argv = [
        "--reuse",
        str(COMMITTED / "perspectives.json"),
        "--ode-gaussians8",
        str(wrong),
        "--out",
        str(tmp_path / "o"),
    ]
    assert script["main"](argv) == 2
    message = "is not analysis/ode_likelihood.py's report on gaussians8 (its data: 'digits')"
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert script["main"](["--quick", "--ode-digits", str(wrong), "--out", str(tmp_path / "o")]) == 2
    assert "drop --ode-digits" in capsys.readouterr().err


# ---------------------------------------------------------------------- the committed report
def test_the_committed_report_is_its_numbers_rendered(script, tmp_path):
    numbers = json.loads((COMMITTED / "perspectives.json").read_text())
    assert script["render"](numbers, tmp_path) == (COMMITTED / "perspectives.md").read_text()


def test_the_committed_report_has_no_n2_rows_and_the_thresholds_right():
    numbers = json.loads((COMMITTED / "perspectives.json").read_text())
    report = (COMMITTED / "perspectives.md").read_text()
    for name, b in numbers["B"].items():
        if b["examples"] < 10:
            assert not [line for line in report.splitlines() if line.startswith(f"| {name} |")], name
    for flagged in ("effectively", "can be trusted", "trustworthy", "pays for", "1e-6 or better"):
        assert flagged not in report, flagged
    assert "real held-out test points" in report


def _committed_section_g(script, data: str) -> tuple[dict, str]:
    """docs/ode-likelihood/DATA's report and section G rendered from it alone."""
    path = ROOT / "docs" / "ode-likelihood" / data / "ode_likelihood.json"
    report = script["read_ode_report"](path, data)
    section = json.loads(json.dumps(script["score_matching"]({data: (path, report)}), default=float))
    return report, script["render_score_matching"](section)


def _paired_sentence(per: dict, other: str, label: str, scale: float, unit: str) -> str:
    d = (np.asarray(per["ode"]) - np.asarray(per[other])) * scale
    mean, se = d.mean(), d.std(ddof=1) / math.sqrt(len(d))
    verdict = "significant" if abs(mean / se) >= 2 else "not significant"
    return (
        f"the ODE's figure minus {label} is {mean:+.4f} +- {se:.4f} {unit} (paired per example; "
        f"{mean / se:+.1f} standard errors: {verdict})"
    )


def _khat_sentence(khat, K: int) -> str:
    khat, n = np.asarray(khat), len(khat)
    threshold = min(1 - 1 / math.log10(K), 0.7)
    return (
        f"k-hat is at least 0.5 (infinite variance of the weights) for {(khat >= 0.5).sum()} of {n} examples, above "
        f"the threshold for K = {K} draws, min(1 - 1/log10 K, 0.7) = {threshold:.3f}, for {(khat > threshold).sum()} "
        f"of {n}, and above 0.7 for {(khat > 0.7).sum()} of {n}"
    )


def test_section_g_of_the_committed_gaussians8_report(script):
    """Section G from docs/ode-likelihood/gaussians8: the paired KL of the network's flow and its significance, the
    paired differences from the bounds and the k-hat counts, recomputed by hand from every example's figures."""
    r, text = _committed_section_g(script, "gaussians8")
    per = r["per_example"]
    kl = np.asarray(per["ode"]) + np.asarray(per["log_q"])
    mean, se = kl.mean(), kl.std(ddof=1) / math.sqrt(len(kl))
    assert f"{mean:.4f} +- {se:.4f} nats, paired per example ({mean / se:+.1f} standard errors: significant)" in text
    assert mean / se >= 2  # the network's flow is measurably not q: its KL is above 0
    assert _paired_sentence(per, "elbo", "the -ELBO's", 1.0, "nats") in text
    assert _paired_sentence(per, "iwae", f"-IWAE_{r['iwae']['particles']}'s", 1.0, "nats") in text
    assert _khat_sentence(per["khat"], r["iwae"]["particles"]) in text


def test_the_documents_have_no_control_characters():
    for path in (
        ROOT / "README.md",
        ROOT / "docs" / "MATH.md",
        ROOT / "docs" / "API.md",
        COMMITTED / "perspectives.md",
    ):
        text = path.read_text()
        bad = [(i, hex(ord(ch))) for i, ch in enumerate(text) if ord(ch) < 32 and ch not in "\n\t"]
        assert not bad, (path.name, bad[:3])


def test_the_readme_command_names_no_uncommitted_file():
    """Every docs/ path the README's perspectives paragraph names is in the repository."""
    readme = (ROOT / "README.md").read_text()
    for path in set(re.findall(r"docs/perspectives/[\w.]+", readme)):
        assert (ROOT / path).exists(), path


def test_section_g_of_the_committed_digits_report(script):
    """Section G from docs/ode-likelihood/digits: the ODE figure in bits/dim on the 17-level scale (a bound via
    dequantisation), its paired differences from the ELBO and IWAE and the k-hat counts, recomputed by hand."""
    r, text = _committed_section_g(script, "digits")
    per = r["per_example"]
    ode, n, bits = np.asarray(per["ode"]), len(per["ode"]), 1 / (64 * math.log(2))
    assert n == r["examples"] >= 10
    se = ode.std(ddof=1) / math.sqrt(n)
    assert f"| {_g(ode.mean())} | {_g(se)} | {_g(ode.mean() * bits)} | {_g(se * bits)} |" in text
    assert "upper bound on the negative log-likelihood of the 17-level data" in text.replace("\n", " ")
    assert _paired_sentence(per, "elbo", "the -ELBO", bits, "bits/dim") in text
    assert _paired_sentence(per, "iwae", f"-IWAE_{r['iwae']['particles']}", bits, "bits/dim") in text
    assert _khat_sentence(per["khat"], r["iwae"]["particles"]) in text
