"""The figures (pyrodiff/evaluation/plots.py and the report's plots): what each draws, read back from the matplotlib
figure objects; and that importing pyrodiff loads no matplotlib."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from test_report import D, N, T, _terms

from pyrodiff.chain.decoders import DiscretizedDecoder
from pyrodiff.evaluation.plots import save_samples_figure
from pyrodiff.evaluation.report import write_report

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def drawn(monkeypatch):
    """The figures saved during a test, by file name (each still written by matplotlib)."""
    figures: dict[str, Figure] = {}
    savefig = Figure.savefig

    def recording(fig, fname, *args, **kwargs):
        figures[Path(fname).name] = fig
        return savefig(fig, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    return figures


def _png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("channels", [1, 3])
def test_an_image_grid_shows_each_sample_in_its_cell(tmp_path, drawn, channels):
    """Five images in a 2 x 3 grid, row by row, one grey pixel (0.3) between cells; values mapped from [-1, 1] to
    [0, 1] and clipped; grey images drawn with gray_r on [0, 1]."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, channels, 4, 3, generator=g) * 2.4 - 1.2  # some values outside [-1, 1]
    save_samples_figure(images, tmp_path / "s.png", title="five")
    assert _png(tmp_path / "s.png") and not (tmp_path / "s.tmp.png").exists()
    fig = drawn["s.tmp.png"]
    assert fig._suptitle.get_text() == "five"
    (ax,) = fig.axes
    assert not ax.axison
    (image,) = ax.get_images()
    grid = np.asarray(image.get_array())
    assert grid.shape == ((2 * 5 + 1, 3 * 4 + 1) if channels == 1 else (2 * 5 + 1, 3 * 4 + 1, 3))
    grid = grid.reshape(grid.shape[:2] + (channels,))
    expected = ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    cells = np.zeros(grid.shape[:2], dtype=bool)
    for i in range(5):
        r, c = divmod(i, 3)
        rows, cols = slice(1 + 5 * r, 5 + 5 * r), slice(1 + 4 * c, 4 + 4 * c)
        np.testing.assert_allclose(grid[rows, cols], expected[i], rtol=0, atol=1e-6)
        cells[rows, cols] = True
    assert np.all(grid[~cells] == np.float32(0.3))  # spacers and the empty sixth cell
    assert image.get_clim() == (0, 1)
    if channels == 1:
        assert image.get_cmap().name == "gray_r"


def test_a_scatter_shows_the_samples_over_at_most_four_times_as_many_data_points(tmp_path, drawn):
    g = torch.Generator().manual_seed(1)
    samples, data = torch.randn(10, 2, generator=g), torch.randn(100, 2, generator=g) * 3
    save_samples_figure(samples, tmp_path / "p.png", data=data)
    assert _png(tmp_path / "p.png")
    (ax,) = drawn["p.tmp.png"].axes
    shown_data, shown_samples = (c for c in ax.collections if isinstance(c, PathCollection))
    np.testing.assert_array_equal(shown_data.get_offsets(), data[:40].numpy())
    np.testing.assert_array_equal(shown_samples.get_offsets(), samples.numpy())
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["data", "samples"]
    assert ax.get_aspect() == 1.0
    assert drawn["p.tmp.png"]._suptitle is None  # no title given


def test_the_reports_plots_show_the_terms_the_cumulative_rate_and_the_rate_distortion_curve(tmp_path, drawn):
    """terms.png: L_k in bits/dim with error bars of one standard error over the examples, against k; the
    cumulative rate sum_{j >= k} L_j; the rate received against the RMSE of x0_hat (computed here from the draws)."""
    terms = _terms()  # continuous decoder, L_0 < 0
    write_report(terms, tmp_path / "r", {"name": "m"})
    for name in ("terms.png", "cumulative_rate.png", "rate_distortion.png"):
        assert _png(tmp_path / "r" / name)
    to_bpd = 1 / (D * math.log(2))
    bpd = terms.nats.mean((0, 1)).numpy() * to_bpd
    se = terms.nats.mean(0).std(0).numpy() / math.sqrt(N) * to_bpd
    k = np.arange(T + 1)

    (ax,) = drawn["terms.png"].axes
    (bars,) = ax.containers
    line, _, (segments,) = bars
    np.testing.assert_allclose(line.get_xydata(), np.stack([k, bpd], 1), rtol=1e-12)
    np.testing.assert_allclose(
        np.asarray(segments.get_segments()),
        np.stack([np.stack([k, bpd - se], 1), np.stack([k, bpd + se], 1)], 1),
        rtol=1e-12,
    )
    assert (ax.get_xscale(), ax.get_yscale()) == ("symlog", "log")
    lo, hi = ax.get_xlim()
    assert lo < 0 and hi > T  # every term in view, L_0 and L_T included
    assert ax.get_ylabel() == "L_k (bits/dim)" and ax.get_xlabel().startswith("k (L_0 decoder")
    assert ax.get_title() == "Terms of the bound, mean +- standard error (L_0 <= 0 not shown)"

    (ax,) = drawn["cumulative_rate.png"].axes
    (line,) = ax.get_lines()
    rate_from_k = np.array([bpd[j:].sum() for j in range(1, T + 1)])
    np.testing.assert_allclose(line.get_xydata(), np.stack([k[1:], rate_from_k], 1), rtol=1e-12)
    assert ax.get_title() == f"Cumulative rate (total rate {bpd[1:].sum():.3f} bits/dim)"
    assert ax.get_xscale() == "log"

    (ax,) = drawn["rate_distortion.png"].axes
    (line,) = ax.get_lines()
    rmse = np.sqrt(terms.x0_sq_error.mean((0, 1)).numpy() / D)[::-1]  # t = T .. 1
    np.testing.assert_allclose(line.get_xydata(), np.stack([rate_from_k[::-1], rmse], 1), rtol=1e-12)
    assert ax.get_xlabel() == "rate received (bits/dim)" and ax.get_ylabel().startswith("distortion: RMSE of x0_hat (")


def test_the_terms_plot_notes_an_l0_its_log_scale_cannot_show(tmp_path, drawn):
    """Positive L_0: no note; L_0 = 0 exactly (as negative ones) has no place on the log scale: noted."""
    write_report(_terms(DiscretizedDecoder(17)), tmp_path / "r", {"name": "m"})
    assert drawn["terms.png"].axes[0].get_title() == "Terms of the bound, mean +- standard error"
    zero = _terms(DiscretizedDecoder(17))
    zero.nats[..., 0] = 0.0
    write_report(zero, tmp_path / "zero", {"name": "m"})
    assert drawn["terms.png"].axes[0].get_title() == "Terms of the bound, mean +- standard error (L_0 <= 0 not shown)"
    assert drawn["rate_distortion.png"].axes[0].get_ylabel() == "distortion: RMSE of x0_hat (grey levels 0..16)"


def test_importing_pyrodiff_loads_no_matplotlib_and_drawing_chooses_no_backend():
    """In a fresh interpreter (one for both checks): ``import pyrodiff`` and its command-line, training and report
    modules load no matplotlib; drawing (and importing the analysis script that plots) then neither picks a backend
    nor imports pyplot."""
    code = (
        "import sys, runpy, torch\n"
        "import pyrodiff, pyrodiff.cli, pyrodiff.training.loop, pyrodiff.evaluation.plots, pyrodiff.evaluation.report\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib')\n"
        "assert not loaded, f'importing pyrodiff loaded {loaded[:3]}'\n"
        "import matplotlib\n"
        "def refuse(*a, **k): raise AssertionError('a backend was chosen')\n"
        "matplotlib.use = refuse\n"
        "import tempfile, pathlib\n"
        "with tempfile.TemporaryDirectory() as d:\n"
        "    pyrodiff.evaluation.plots.save_samples_figure(torch.zeros(2, 2), pathlib.Path(d) / 's.png')\n"
        f"runpy.run_path({str(ROOT / 'analysis' / 'compare_bounds.py')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
