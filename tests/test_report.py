"""The report: every number it writes against values computed here from known draws."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from pyrodiff.chain.decoders import DiscretizedDecoder, GaussianDecoder
from pyrodiff.evaluation.bound import BoundTerms
from pyrodiff.evaluation.report import (
    MIN_DRAWS_FOR_DIAGNOSTICS,
    REPORT_FILES,
    progressive_rate_distortion,
    summarise,
    summary_markdown,
    write_report,
)

T, N, S, D = 12, 5, 2, 3
MODEL = {"prediction": "v", "variance": "large", "decoder": "x", "levels": None, "schedule": {"kind": "cosine"}}


def _terms(decoder=None, seed=0) -> BoundTerms:
    """Known draws: distinct positive values per term (and a negative L_0 for the continuous decoder)."""
    g = torch.Generator().manual_seed(seed)
    nats = torch.rand(S, N, T + 1, generator=g, dtype=torch.float64) + torch.arange(T + 1, dtype=torch.float64)
    sq = torch.rand(S, N, T, generator=g, dtype=torch.float64) * torch.arange(1, T + 1, dtype=torch.float64)
    decoder = decoder or GaussianDecoder()
    if decoder.name == "gaussian":
        nats[..., 0] -= 3  # a density: L_0 may be negative
    return BoundTerms(nats, sq, D, decoder, MODEL)


@pytest.mark.parametrize("decoder, scale", [(GaussianDecoder(), 1.0), (DiscretizedDecoder(17), 8.0)])
def test_progressive_rate_distortion_values(decoder, scale):
    terms = _terms(decoder)
    rate, rmse = progressive_rate_distortion(terms)
    mean_bpd = terms.nats.mean((0, 1)).numpy() / (D * math.log(2))
    sq = terms.x0_sq_error.mean((0, 1)).numpy()
    for i in range(T):  # entry i: stopping at t = T - i
        t = T - i
        assert rate[i] == pytest.approx(mean_bpd[t : T + 1].sum(), rel=1e-12)  # L_t .. L_T received
        assert rmse[i] == pytest.approx(math.sqrt(sq[t - 1] / D) * scale, rel=1e-12)


def test_summary_values():
    terms = _terms()
    log_q = torch.linspace(-1, 1, N, dtype=torch.float64)
    s = summarise(terms, {"name": "m", "split": "test"}, log_q)
    per_example = terms.nats.sum(-1).mean(0)  # (N,) negative ELBO, averaged over draws
    to_bpd = 1 / (D * math.log(2))
    assert s["total_nats"] == pytest.approx(per_example.mean().item(), rel=1e-12)
    assert s["total_stderr"] == pytest.approx(per_example.std().item() / math.sqrt(N), rel=1e-12)
    assert s["bits_per_dim"] == pytest.approx(s["total_nats"] * to_bpd, rel=1e-12)
    assert s["rate_bits_per_dim"] == pytest.approx(terms.nats[..., 1:].sum(-1).mean().item() * to_bpd, rel=1e-12)
    assert s["distortion_bits_per_dim"] == pytest.approx(terms.nats[..., 0].mean().item() * to_bpd, rel=1e-12)
    term_se = terms.nats.mean(0).std(0) / math.sqrt(N)
    assert np.allclose(s["terms_stderr"], term_se.numpy(), rtol=1e-12)
    assert np.allclose(s["terms_bits_per_dim"], terms.nats.mean((0, 1)).numpy() * to_bpd, rtol=1e-12)
    excess = per_example + log_q
    assert s["kl_bound_nats"] == pytest.approx(excess.mean().item(), rel=1e-12)
    assert s["kl_bound_stderr"] == pytest.approx(excess.std().item() / math.sqrt(N), rel=1e-12)
    assert s["model"] == MODEL and s["name"] == "m" and s["num_examples"] == N and s["num_samples"] == S
    assert s["num_steps"] == T and s["levels"] is None and not s["bits_per_dim_is_8bit_scale"]


def test_summary_table_groups_terms_and_shares_only_the_rate():
    terms = _terms()
    s = summarise(terms, {"name": "m", "split": "test"})
    text = summary_markdown(s)
    mean = np.array(s["terms_nats"])
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in text.splitlines() if line.startswith("| L_")}
    groups = {
        "L_0 (decoder, distortion)": [0],
        "L_1": [1],
        "L_2 .. L_10": range(2, 11),
        "L_11": [11],
        "L_12 (prior)": [12],
    }
    assert list(rows) == list(groups)
    rate = mean[1:].sum()
    shares = 0.0
    for label, ks in groups.items():
        value, _, bpd, share = (c.strip() for c in rows[label])
        assert float(value) == pytest.approx(mean[list(ks)].sum(), abs=1e-4)
        assert float(bpd) == pytest.approx(mean[list(ks)].sum() / (D * math.log(2)), abs=1e-4)
        if label.startswith("L_0"):
            assert share == ""  # the distortion of a density can be negative: no share of the rate
        else:
            assert float(share.rstrip("%")) == pytest.approx(100 * mean[list(ks)].sum() / rate, abs=0.05)
            shares += float(share.rstrip("%"))
    assert shares == pytest.approx(100, abs=0.3)
    assert "continuous Gaussian decoder" in text and "levels=None" not in text
    assert "prediction v, variance large, cosine schedule" in text


def test_written_files_hold_the_summary(tmp_path):
    terms = _terms(DiscretizedDecoder(17))
    summary = write_report(terms, tmp_path / "r", {"name": "m"})
    folder = tmp_path / "r"
    assert sorted(p.name for p in folder.iterdir()) == sorted(REPORT_FILES)
    assert json.loads((folder / "bound.json").read_text()) == json.loads(json.dumps(summary))
    with open(folder / "terms.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["k"]) for r in rows] == list(range(T + 1))
    assert np.allclose([float(r["nats"]) for r in rows], summary["terms_nats"], rtol=1e-7)
    with open(folder / "rate_distortion.csv") as f:
        reader = csv.reader(f)
        header = next(reader)
        table = np.array([[float(v) for v in row] for row in reader])
    assert header == ["t", "rate_bits_per_dim", "rmse_grey_levels_0_16"]
    rate, rmse = progressive_rate_distortion(terms)
    assert table[:, 0].tolist() == list(range(T, 0, -1))
    assert np.allclose(table[:, 1], rate, rtol=1e-5) and np.allclose(table[:, 2], rmse, rtol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report-")]


def test_a_report_touches_nothing_beside_its_folder(tmp_path, monkeypatch):
    """While a report is written its temporary folder is inside ``--out``, not beside it (the parent is not the
    user's to litter, nor always writable); a failed report into a new folder leaves no folder behind."""
    from pyrodiff.evaluation import report as report_module

    plots, seen = report_module._plots, []

    def watched(terms, summary, folder):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        return plots(terms, summary, folder)

    monkeypatch.setattr(report_module, "_plots", watched)
    write_report(_terms(), tmp_path / "r", {"name": "m"})
    assert seen == [["r"]] and sorted(p.name for p in (tmp_path / "r").iterdir()) == sorted(REPORT_FILES)

    def failing(terms, summary, folder):
        raise OSError("disk full")

    monkeypatch.setattr(report_module, "_plots", failing)
    with pytest.raises(OSError, match="disk full"):
        write_report(_terms(), tmp_path / "new", {"name": "m"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_an_existing_report_is_never_replaced_silently(tmp_path):
    write_report(_terms(seed=1), tmp_path / "r", {"name": "first"})
    before = (tmp_path / "r" / "bound.json").read_text()
    with pytest.raises(FileExistsError, match="already holds a report"):
        write_report(_terms(seed=2), tmp_path / "r", {"name": "second"})
    assert (tmp_path / "r" / "bound.json").read_text() == before
    write_report(_terms(seed=2), tmp_path / "r", {"name": "second"}, overwrite=True)
    assert json.loads((tmp_path / "r" / "bound.json").read_text())["name"] == "second"


def _draws(num_draws: int, num_examples: int, scale: torch.Tensor, seed: int = 0) -> BoundTerms:
    """Independent draws of each term with known spread ``scale`` (T + 1,) around a per-example value."""
    g = torch.Generator().manual_seed(seed)
    per_example = torch.rand(1, num_examples, T + 1, generator=g, dtype=torch.float64) * 5
    noise = torch.randn(num_draws, num_examples, T + 1, generator=g, dtype=torch.float64) * scale
    return BoundTerms(per_example + noise, torch.zeros(num_draws, num_examples, T), D, GaussianDecoder(), MODEL)


def test_independent_examples_get_the_plain_standard_error_and_no_ess(recwarn):
    """20 examples with one draw each are not a chain: no ESS across them (it read "smallest ESS 3", and 26 > N for
    some terms), and 3 draws of 2 examples give no ArviZ warning and no NaN: too few draws for diagnostics."""
    for num_draws, num_examples in ((1, 20), (3, 2)):
        terms = _draws(num_draws, num_examples, torch.ones(T + 1))
        s = summarise(terms)
        assert s["terms_draws_ess"] is None and s["terms_draws_mcse"] is None
        per_example = terms.nats.mean(0)
        assert np.allclose(s["terms_stderr"], (per_example.std(0) / math.sqrt(num_examples)).numpy(), rtol=1e-12)
        text = summary_markdown(s)
        assert f"+- is the standard error across the {num_examples} independent examples" in text
        assert "No Monte Carlo diagnostics of the draws: they need at least 4 draws per example" in text
        assert "nan" not in text.lower()
    assert not [w for w in recwarn if "arviz" in str(w.filename).lower() or "ess" in str(w.message).lower()]


def test_arviz_diagnostics_come_from_each_examples_draws():
    """With 400 independent draws of each of 3 examples, the draws' MCSE of a term's mean is
    sqrt(sum_n sd_nk^2 / S) / N and each example's ESS is about S (seeded; the ESS estimate of S independent
    draws has a relative spread of about sqrt(2 / S) = 7%, so 4 of those bound it)."""
    num_draws, num_examples = 400, 3
    scale = torch.linspace(0.1, 3.0, T + 1, dtype=torch.float64)
    terms = _draws(num_draws, num_examples, scale)
    s = summarise(terms)
    sd = terms.nats.std(0)  # (N, T + 1)
    expected = (sd.pow(2).sum(0) / num_draws).sqrt() / num_examples
    ess = np.array(s["terms_draws_ess"])
    assert np.all(np.abs(ess / num_draws - 1) < 4 * math.sqrt(2 / num_draws) + 0.05), ess
    assert np.allclose(s["terms_draws_mcse"], expected.numpy(), rtol=4 * math.sqrt(2 / num_draws) + 0.05)
    text = summary_markdown(s)
    assert "ArviZ, across the 400 draws of each example: smallest effective sample size" in text
    correlated = _draws(num_draws, num_examples, scale)
    correlated.nats[1::2] = correlated.nats[::2]  # each draw twice: half as many independent ones
    assert max(summarise(correlated)["terms_draws_ess"]) < 0.75 * num_draws


def test_diagnostics_from_four_draws_on_are_per_term_and_the_smallest_ess_over_the_examples():
    """MIN_DRAWS_FOR_DIAGNOSTICS = 4 draws are enough; the ESS is one number per term L_k, the smallest over the
    examples: duplicating the draws of L_0 in one example only (half as many independent draws there) lowers
    L_0's ESS and no other term's."""
    assert MIN_DRAWS_FOR_DIAGNOSTICS == 4
    four = summarise(_draws(4, 2, torch.ones(T + 1)))
    assert len(four["terms_draws_ess"]) == len(four["terms_draws_mcse"]) == T + 1
    num_draws = 400
    terms = _draws(num_draws, 3, torch.ones(T + 1), seed=1)
    terms.nats[1::2, 1, 0] = terms.nats[::2, 1, 0]  # example 1, term L_0: each draw twice
    ess = np.array(summarise(terms)["terms_draws_ess"])
    assert ess.shape == (T + 1,)
    assert ess[0] < 0.75 * num_draws and np.all(ess[1:] > 0.75 * num_draws), ess


@pytest.mark.parametrize(
    ("num_steps", "labels"),
    [
        (1, ["L_1 (prior)"]),
        (4, ["L_1", "L_2 .. L_3", "L_4 (prior)"]),
        (11, ["L_1", "L_2 .. L_10", "L_11 (prior)"]),
        (101, ["L_1", "L_2 .. L_10", "L_11 .. L_100", "L_101 (prior)"]),
        (102, ["L_1", "L_2 .. L_10", "L_11 .. L_100", "L_101", "L_102 (prior)"]),
        (1000, ["L_1", "L_2 .. L_10", "L_11 .. L_100", "L_101 .. L_999", "L_1000 (prior)"]),
    ],
)
def test_summary_rows_group_the_terms_by_decade_for_any_number_of_steps(num_steps, labels):
    """Rows L_0, L_1, L_2..L_10, L_11..L_100, L_101..L_{T-1}, L_T, as T allows: no empty or overlapping row; each row's
    standard error is that of a sum of independent terms' means, sqrt(sum of their squared standard errors)."""
    g = torch.Generator().manual_seed(num_steps)
    nats = torch.rand(2, 3, num_steps + 1, generator=g, dtype=torch.float64) * 4
    terms = BoundTerms(nats, torch.zeros(2, 3, num_steps), D, GaussianDecoder(), MODEL)
    s = summarise(terms)
    rows = [line.split("|")[1:-1] for line in summary_markdown(s).splitlines() if line.startswith("| L_")]
    assert [r[0].strip() for r in rows] == ["L_0 (decoder, distortion)", *labels]
    mean, se = terms.mean().numpy(), terms.stderr().numpy()
    first = 0
    for label, value, stderr, *_ in rows:
        ends = [int(word[2:]) for word in label.split() if word.startswith("L_")]  # "L_a .. L_b", "L_a", "L_a (...)"
        assert ends[0] == first, label  # the rows follow each other
        span = slice(first, ends[-1] + 1)
        assert float(value) == pytest.approx(mean[span].sum(), abs=1e-4), label
        assert float(stderr) == pytest.approx(math.sqrt((se[span] ** 2).sum()), abs=1e-4), label
        first = ends[-1] + 1
    assert first == num_steps + 1  # every term in exactly one row


def test_summary_names_the_training_run():
    s = summarise(_terms(), {"training_steps": 300, "objective": "simple"})
    assert "T = 12; trained for 300 steps on simple." in summary_markdown(s)
    s = summarise(_terms(), {"training_steps": 5})
    assert "T = 12; trained for 5 steps." in summary_markdown(s)
