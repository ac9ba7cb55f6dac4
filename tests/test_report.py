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


def test_an_existing_report_is_never_replaced_silently(tmp_path):
    write_report(_terms(seed=1), tmp_path / "r", {"name": "first"})
    before = (tmp_path / "r" / "bound.json").read_text()
    with pytest.raises(FileExistsError, match="already holds a report"):
        write_report(_terms(seed=2), tmp_path / "r", {"name": "second"})
    assert (tmp_path / "r" / "bound.json").read_text() == before
    write_report(_terms(seed=2), tmp_path / "r", {"name": "second"}, overwrite=True)
    assert json.loads((tmp_path / "r" / "bound.json").read_text())["name"] == "second"
