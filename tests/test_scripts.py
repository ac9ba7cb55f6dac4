"""The analysis and benchmark scripts as a new user meets them: refused input is one line with exit status 2 (as
the ``pyrodiff`` command's), arguments are checked before torch loads, default outputs go beside the run (never
into the committed docs/), results record how they were made and survive a later failure."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from pyrodiff import cli

ROOT = Path(__file__).parents[1]
SCRIPTS = {
    "bound_vs_steps": ROOT / "analysis" / "bound_vs_steps.py",
    "sample_quality": ROOT / "analysis" / "sample_quality.py",
    "compare_bounds": ROOT / "analysis" / "compare_bounds.py",
    "ode_likelihood": ROOT / "analysis" / "ode_likelihood.py",
    "perspectives": ROOT / "analysis" / "perspectives.py",
    "timestep_variance": ROOT / "benchmarks" / "timestep_variance.py",
}
LEARNED_SCHEDULE = ROOT / "analysis" / "learned_schedule.py"  # no checkpoint argument: not in SCRIPTS
TINY = (
    '[data]\nname = "gaussians8"\n[schedule]\nnum_steps = 10\n[model]\ndecoder = "gaussian"\n'
    '[network]\nkind = "mlp"\nhidden = 8\ndepth = 1\n'
    "[training]\nsteps = 2\nbatch_size = 8\neval_examples = 16\n"
)


def _main(name: str):
    return runpy.run_path(str(SCRIPTS[name]))["main"]


def _error(capsys, prog: str) -> str:
    """The script's stderr, which must be one line ``PROG: error: ...``, no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A checkpoint of a tiny gaussians8 specification (T = 10), trained by the command."""
    folder = tmp_path_factory.mktemp("trained")
    (folder / "tiny.toml").write_text(TINY)
    assert cli.main(["train", "--config", str(folder / "tiny.toml"), "--out", str(folder / "run")]) == 0
    return folder / "run" / "checkpoint.pt"


@pytest.fixture
def corrupt(tmp_path) -> Path:
    path = tmp_path / "run" / "checkpoint.pt"
    path.parent.mkdir()
    path.write_bytes(b"not a checkpoint")
    return path


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_a_refused_checkpoint_is_one_line_with_status_2(name, corrupt, tmp_path, capsys):
    argv = {
        "perspectives": ["--digits", str(corrupt), "--gaussians8", str(corrupt), "--out", str(tmp_path / "p")],
        "compare_bounds": [str(corrupt), "--out", str(tmp_path / "c")],
    }.get(name, [str(corrupt)])
    assert _main(name)(argv) == 2
    assert str(corrupt) in _error(capsys, name)


def test_arguments_are_checked_before_torch_loads():
    """A bad argument exits with status 2 from the parser, with neither torch nor Pyro imported."""
    code = (
        "import runpy, sys\n"
        f"for path in {[str(p) for p in [*SCRIPTS.values(), ROOT / 'analysis' / 'external_bound.py', LEARNED_SCHEDULE]]!r}:\n"
        "    sys.argv = [path, '--no-such-option']\n"
        "    try:\n"
        "        runpy.run_path(path, run_name='__main__')\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 2, (path, e.code)\n"
        "    else:\n"
        "        raise AssertionError(path + ' accepted a bad argument')\n"
        "    assert 'torch' not in sys.modules and 'pyro' not in sys.modules, path + ' imported torch first'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]


def test_perspectives_runs_on_the_main_install():
    """perspectives.py needs nothing from the testing extra (hypothesis, scipy): its affine network is in
    pyrodiff.theory.exact."""
    code = (
        "import sys, runpy\n"
        "sys.modules['hypothesis'] = None\n"  # as if it were not installed
        "sys.modules['scipy'] = None\n"
        f"runpy.run_path({str(SCRIPTS['perspectives'])!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("name", ["bound_vs_steps", "sample_quality", "perspectives", "ode_likelihood"])
def test_default_outputs_are_not_the_committed_docs(name):
    args = runpy.run_path(str(SCRIPTS[name]))["build_parser"]().parse_args([] if name == "perspectives" else ["x.pt"])
    assert args.out is None or not str(args.out).startswith("docs"), args.out


def test_bound_vs_steps_beside_the_checkpoint_with_eta_zero_and_the_command_line(trained, capsys):
    argv = [str(trained), "--steps", "2", "5", "--variances", "small", "--etas", "0.5", "0", "--max-examples", "8"]
    assert _main("bound_vs_steps")(argv) == 0
    out = trained.parent / "bound-vs-steps"
    table = (out / "bound_vs_steps.md").read_text()
    assert "| ddim eta=0 | 2 | no bound |" in table and "| ddim eta=0 | 5 | no bound |" in table
    assert "python analysis/bound_vs_steps.py " + " ".join(argv) in table
    assert "Incomplete" not in table
    results = json.loads((out / "bound_vs_steps.json").read_text())
    assert results["ddim eta=0"]["5"]["bits_per_dim"] is None
    assert results["small"]["5"]["bits_per_dim"] > 0 and results["ddim eta=0.5"]["2"]["bits_per_dim"] > 0
    assert _main("bound_vs_steps")(argv) == 2  # never replaced without --overwrite
    assert "exists: choose another --out or pass --overwrite" in _error(capsys, "bound_vs_steps")


def test_bound_vs_steps_keeps_the_rows_finished_before_a_failure(trained, tmp_path, monkeypatch, capsys):
    script = runpy.run_path(str(SCRIPTS["bound_vs_steps"]))
    calls = []

    def fails_the_second_time(model, x0, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise FloatingPointError("L_3 of the bound is not finite")
        return real(model, x0, **kwargs)

    real = script["bound_terms"]
    script["main"].__globals__["bound_terms"] = fails_the_second_time
    out = tmp_path / "bvs"
    argv = [str(trained), "--steps", "2", "5", "--variances", "small", "large", "--etas", "--out", str(out)]
    assert script["main"](argv) == 2
    assert "L_3 of the bound is not finite" in _error(capsys, "bound_vs_steps")
    table = (out / "bound_vs_steps.md").read_text()
    assert "| small | 2 |" in table and "Incomplete: 1 of 4 rows" in table
    assert list(json.loads((out / "bound_vs_steps.json").read_text())) == ["small"]


def test_bound_vs_steps_refuses_an_eta_outside_0_1_before_any_work(trained, tmp_path, capsys):
    argv = [str(trained), "--etas", "1.5", "--out", str(tmp_path / "b")]
    assert _main("bound_vs_steps")(argv) == 2
    assert "--etas must lie in [0, 1], got [1.5]" in _error(capsys, "bound_vs_steps")
    assert not (tmp_path / "b").exists()


def test_ode_likelihood_reports_the_library_calls_numbers(trained, tmp_path):
    """Every number of the report is the library call's on the same examples: the ODE NLL, the bound, IWAE, the
    entropy of gaussians8, the paired KLs and the exact score's ODE NLL."""
    import torch

    from pyrodiff import bound_terms, load_trained, ode_log_likelihood
    from pyrodiff.data import GAUSSIANS8_ENTROPY
    from pyrodiff.theory.mixture import IsotropicGaussianMixture

    argv = [str(trained), "--examples", "12", "--particles", "3", "--out", str(tmp_path)]
    assert _main("ode_likelihood")(argv) == 0
    report = json.loads((tmp_path / "ode_likelihood.json").read_text())
    assert report["command"] == "python analysis/ode_likelihood.py " + " ".join(argv)
    built, model = load_trained(trained)
    x = built.data.test[:12].double()
    ode = ode_log_likelihood(model.double(), x)
    assert report["ode"]["negative_log_likelihood_nats"] == pytest.approx(-ode.log_likelihood.mean().item(), rel=1e-9)
    assert report["ode"]["nfe"] == ode.nfe and report["ode"]["rtol"] == 1e-5
    assert report["entropy_nats"] == GAUSSIANS8_ENTROPY
    log_q = IsotropicGaussianMixture.of(built.data).log_prob(x)
    kl = report["paired_kl_nats"]["ode"]["mean"]
    assert kl == pytest.approx((-ode.log_likelihood - (-log_q)).mean().item(), rel=1e-9)
    with torch.no_grad():
        neg_elbo = bound_terms(model, x, generator=torch.Generator().manual_seed(0)).total.double()
    assert report["elbo"]["negative_elbo_nats"] == pytest.approx(neg_elbo.mean().item(), rel=1e-9)
    assert report["paired_kl_nats"]["elbo"]["mean"] == pytest.approx((neg_elbo + log_q).mean().item(), rel=1e-9)
    # every example's figures, for analysis/perspectives.py's paired differences
    per_example = report["per_example"]
    assert per_example["ode"] == pytest.approx((-ode.log_likelihood).tolist(), rel=1e-9)
    assert per_example["elbo"] == pytest.approx(neg_elbo.mean(0).tolist(), rel=1e-9)
    assert per_example["log_q"] == pytest.approx(log_q.tolist(), rel=1e-9)
    assert len(per_example["iwae"]) == len(per_example["khat"]) == 12
    assert report["iwae"]["particles"] == 3
    assert [row["t"] for row in report["score_error"]] == sorted({row["t"] for row in report["score_error"]})
    assert torch.isfinite(torch.tensor([row["relative_squared_error"] for row in report["score_error"]])).all()
    assert (tmp_path / "ode_likelihood.md").read_text().startswith("# The probability-flow ODE's likelihood")
    # --dtype float32: the same figure to float32's rounding under the same tolerances, computed in float32
    argv = [str(trained), "--examples", "12", "--particles", "0", "--dtype", "float32", "--out", str(tmp_path / "f32")]
    assert _main("ode_likelihood")(argv) == 0
    single = json.loads((tmp_path / "f32" / "ode_likelihood.json").read_text())
    assert (
        single["dtype"] == "float32"
        and "12 test examples, D = 2, " in (tmp_path / "f32" / "ode_likelihood.md").read_text()
    )
    nll = single["ode"]["negative_log_likelihood_nats"]
    assert nll == pytest.approx(report["ode"]["negative_log_likelihood_nats"], rel=1e-3)
    assert nll != report["ode"]["negative_log_likelihood_nats"]


def test_sample_quality_beside_the_checkpoint_with_the_command_line(trained, capsys):
    argv = [str(trained), "--steps", "2", "--num", "20", "--samplers", "ddim"]
    assert _main("sample_quality")(argv) == 0
    text = (trained.parent / "sample-quality" / "sample_quality.md").read_text()
    assert "`python analysis/sample_quality.py " + " ".join(argv) + "`" in text
    assert "| ddim | 2 |" in text


def _readme_commands() -> list[str]:
    """The commands the README prints: inline code and indented blocks that start with ``pyrodiff`` or ``python``
    (continuation lines joined)."""
    import re

    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    spans = re.findall(r"`((?:pyrodiff|python) [^`]+)`", text)
    blocks = re.findall(r"^ {4}((?:pyrodiff|python) .+)$", text, flags=re.M)
    return [" ".join(c.split()) for c in spans + blocks]


def test_no_readme_command_writes_into_the_committed_docs():
    """A fresh clone holds docs/'s reports, so a command writing there would refuse as printed: the README's
    commands write beside the run, and docs/ is named only with --overwrite."""
    commands = _readme_commands()
    assert any(c.startswith("pyrodiff report runs/digits/checkpoint.pt") for c in commands)
    wrong = [c for c in commands if "--out docs" in c and "--overwrite" not in c]
    assert not wrong, wrong


def test_compare_labels_say_what_differs(tmp_path, capsys):
    """Two digits reports that differ only in training steps get labels naming them (they read the same before);
    records that do not differ at all are told apart by their source."""
    import torch

    from pyrodiff import bound_terms
    from pyrodiff.chain.reverse import DiffusionModel
    from pyrodiff.chain.schedule import NoiseSchedule
    from pyrodiff.evaluation.report import write_report
    from pyrodiff.testing import LinearDenoiser

    T = 4
    model = DiffusionModel(LinearDenoiser(T, torch.full((T,), 0.1), torch.zeros(T)), NoiseSchedule.linear(T, 0.05, 0.3))
    terms = bound_terms(model.eval(), torch.linspace(-1, 1, 6).reshape(6, 1))
    for run, steps in (("digits", 1000), ("digits-long", 4000)):
        meta = {"name": "digits", "checkpoint": f"runs/{run}/checkpoint.pt", "training_steps": steps}
        write_report(terms, tmp_path / run, {**meta, "objective": "simple", "split": "test"})
    compare = _main("compare_bounds")
    assert compare([str(tmp_path / "digits"), str(tmp_path / "digits-long"), "--out", str(tmp_path / "c")]) == 0
    table = (tmp_path / "c" / "compare.md").read_text()
    assert "| digits: run digits, 1000 training steps | 4 |" in table
    assert "| digits: run digits-long, 4000 training steps | 4 |" in table
    argv = [str(tmp_path / "digits"), str(tmp_path / "digits"), "--out", str(tmp_path / "d")]
    assert compare(argv) == 0
    assert f"| digits ({tmp_path / 'digits'}) | 4 |" in (tmp_path / "d" / "compare.md").read_text()


def test_a_report_records_eta_respaced_and_training_steps_one_meaning_per_key(trained, tmp_path, capsys):
    out = tmp_path / "ddim"
    argv = ["report", str(trained), "--steps", "5", "--eta", "0.5", "--max-examples", "4", "--out", str(out)]
    assert cli.main(argv) == 0
    bound = json.loads((out / "bound.json").read_text())
    assert bound["respaced_steps"] == 5 and bound["num_steps"] == 5 and bound["training_steps"] == 2
    assert bound["eta"] == 0.5 and bound["objective"] == "elbo" and "steps" not in bound
    summary = (out / "summary.md").read_text()
    assert "respaced to 5 steps; DDIM's generative process with eta = 0.5" in summary
    assert "trained for 2 steps on elbo" in summary
    test_bound = json.loads((trained.parent / "test_bound.json").read_text())
    assert test_bound["training_steps"] == 2 and "steps" not in test_bound and "respaced_steps" not in test_bound


# ---------------------------------------------------------------------- external_bound.py
EXTERNAL = ROOT / "analysis" / "external_bound.py"


def _external(argv):
    return runpy.run_path(str(EXTERNAL))["main"](argv)


@pytest.fixture
def stand_in(tmp_path) -> list[str]:
    """external_bound's network arguments for test_adapters' stand-in (12 steps), weights in a .pt file."""
    import torch
    from test_adapters import STAND_IN, T, _stand_in

    torch.save(_stand_in().state_dict(), tmp_path / "net.pt")
    common = ["--network", STAND_IN, "--kwargs", json.dumps({"steps": T}), "--state-dict", str(tmp_path / "net.pt")]
    return common + ["--beta-schedule", "linear", "--num-train-timesteps", str(T), "--out", str(tmp_path / "r")]


def test_external_data_on_the_wrong_scale_is_refused(stand_in, tmp_path, capsys):
    """Integers without --levels were read as 8-bit (19.40 bits/dim for 0..16 data instead of 17.46), floats
    outside [-1, 1] were scored (41.7 bits/dim for all 7.0): both are refused, naming what was found."""
    import numpy as np

    np.save(tmp_path / "ints.npy", np.random.default_rng(0).integers(0, 17, (4, 1, 8, 8)))
    assert _external([*stand_in, "--data", str(tmp_path / "ints.npy")]) == 2
    assert "holds integers 0..16: give their number of levels, --levels L" in _error(capsys, "external_bound")
    np.save(tmp_path / "sevens.npy", np.full((4, 1, 8, 8), 7.0, dtype=np.float32))
    assert _external([*stand_in, "--data", str(tmp_path / "sevens.npy")]) == 2
    assert "holds floats in 7..7: data must lie in [-1, 1]" in _error(capsys, "external_bound")
    assert not (tmp_path / "r").exists()
    assert _external([*stand_in, "--data", str(tmp_path / "ints.npy"), "--levels", "17", "--max-examples", "2"]) == 0
    assert json.loads((tmp_path / "r" / "bound.json").read_text())["levels"] == 17
    assert "bits/dim" in capsys.readouterr().out


def test_external_inputs_that_gave_tracebacks_are_one_line(stand_in, tmp_path, capsys):
    import types

    import numpy as np
    import torch

    np.save(tmp_path / "x.npy", np.zeros((2, 1, 8, 8), dtype=np.float32))
    data = ["--data", str(tmp_path / "x.npy")]
    argv = [*stand_in, *data]
    assert _external([*argv[:1], "test_adapters:NoSuch", *argv[2:]]) == 2
    assert "cannot import the network test_adapters:NoSuch" in _error(capsys, "external_bound")
    assert _external([*argv[:1], "no_such_package.models:Unet", *argv[2:]]) == 2
    assert "cannot import the network no_such_package.models:Unet" in _error(capsys, "external_bound")
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file({"w": torch.zeros(100)}, tmp_path / "w.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:-50])
    weights = argv.index("--state-dict") + 1
    assert _external([*argv[:weights], str(tmp_path / "cut.safetensors"), *argv[weights + 1 :]]) == 2
    assert f"{tmp_path / 'cut.safetensors'} is not a readable safetensors file" in _error(capsys, "external_bound")
    torch.save({"x": types.SimpleNamespace(a=1)}, tmp_path / "code.pt")
    assert _external([*stand_in, "--data", str(tmp_path / "code.pt")]) == 2
    line = _error(capsys, "external_bound")
    assert f"{tmp_path / 'code.pt'} holds objects other than tensors and plain data (types.SimpleNamespace)" in line
    assert "weights_only" not in line


def test_external_diffusers_configuration_errors_name_the_file(tmp_path, capsys):
    pytest.importorskip("diffusers")
    folder = tmp_path / "pipeline"
    (folder / "unet").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"num_train_timesteps": 20}))
    argv = ["--diffusers", str(folder), "--dataset", "digits", "--out", str(tmp_path / "r")]
    config = folder / "unet" / "config.json"
    for content in (b"[1, 2]", b"\x80\x81\xff binary", b"{broken"):
        config.write_bytes(content)
        assert _external(argv) == 2
        assert str(config) in _error(capsys, "external_bound")
    assert _external([*argv, "--num-train-timesteps", "30"]) == 2  # a network trained for 20 steps
    assert "records num_train_timesteps = 20, --num-train-timesteps gives 30" in _error(capsys, "external_bound")


def test_external_shows_progress_by_default():
    parse = runpy.run_path(str(EXTERNAL))["build_parser"]().parse_args
    argv = ["--diffusers", "d", "--dataset", "digits", "--out", "o"]
    assert parse(argv).progress is True and parse([*argv, "--no-progress"]).progress is False


# ---------------------------------------------------------------------- plots
def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_many_easy_problems_labels_stay_in_their_panel_and_say_the_kl_floor():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = runpy.run_path(str(SCRIPTS["perspectives"]))["many_easy_problems_figure"]
    section = {
        T: {"bound": 1.0 / T, "bound_stderr": 0.01, "step_kls": [10.0**-i for i in range(T)]} for T in (1, 5, 20)
    }
    fig = figure(section)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    left, right = fig.axes
    assert not _overlap(right.yaxis.label.get_window_extent(renderer), left.get_tightbbox(renderer))
    assert not _overlap(left.yaxis.label.get_window_extent(renderer), right.get_tightbbox(renderer))
    assert "below 1e-6 drawn at 1e-6" in right.get_ylabel()
    assert min(line.get_ydata().min() for line in right.get_lines()) == 1e-6  # the floor the label names


def test_exact_copies_are_counted_where_the_histogram_draws_them():
    import torch
    from matplotlib.figure import Figure

    histogram = runpy.run_path(str(SCRIPTS["perspectives"]))["distance_histogram"]
    ax = Figure().add_subplot()
    histogram(ax, torch.tensor([0.0, 0.0, 0.0, 0.5, 2.0], dtype=torch.float64), "exact reverse")
    histogram(ax, torch.tensor([0.5, 2.0], dtype=torch.float64), "trained network")
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["exact reverse (3 at distance < 1e-4, drawn at -4)", "trained network"]
    assert ax.containers[0].datavalues.sum() == 5 and ax.containers[0][0].get_x() == pytest.approx(-4)


def test_external_refuses_a_scheduler_with_other_steps_than_the_weights_record(tmp_path, capsys):
    """A training checkpoint that keeps the schedule's betas beside the network (denoising-diffusion-pytorch's
    GaussianDiffusion) tells its T: a scheduler of 30 steps on weights trained for 20 is refused."""
    import numpy as np
    import torch
    from test_adapters import STAND_IN, _stand_in

    net = _stand_in()  # 12 timesteps in its table, scored on T = 12 below
    state = {"model." + k: v for k, v in net.state_dict().items()} | {"betas": torch.linspace(1e-4, 0.02, 20)}
    torch.save({"ema": state}, tmp_path / "ckpt.pt")
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 8, 8), dtype=np.float32))
    argv = ["--network", STAND_IN, "--kwargs", '{"steps": 12}', "--state-dict", str(tmp_path / "ckpt.pt")]
    argv += ["--state-key", "ema", "--prefix", "model.", "--beta-schedule", "linear", "--data", str(tmp_path / "x.npy")]
    assert _external([*argv, "--num-train-timesteps", "30", "--out", str(tmp_path / "a")]) == 2
    message = _error(capsys, "external_bound")
    assert "ckpt.pt records betas of 20 steps: the network was trained on 20 steps, the scheduler has 30" in message
    state["betas"] = torch.linspace(1e-4, 0.02, 12)
    torch.save({"ema": state}, tmp_path / "ckpt.pt")
    assert _external([*argv, "--num-train-timesteps", "12", "--out", str(tmp_path / "b")]) == 0


@pytest.fixture(scope="module")
def learned_schedule_quick(tmp_path_factory) -> tuple[list[str], Path]:
    """analysis/learned_schedule.py --quick, run once for the tests below."""
    out = tmp_path_factory.mktemp("learned-schedule")
    argv = ["--quick", "--out", str(out)]
    assert runpy.run_path(str(LEARNED_SCHEDULE))["main"](argv) == 0
    return argv, out


def test_learned_schedule_small_T_rows_are_the_library_calls_numbers(learned_schedule_quick):
    """Each T = 5 row: the test bound is `bound_terms` of the trained checkpoint on the whole test split (seeded), the
    paired difference is per example, the floor is `moment_matched_bound` of the row's schedule (the linear one the
    T = 1000 schedule respaced), and the entropy is the data module's."""
    import torch

    from pyrodiff import NoiseSchedule, bound_terms, load_trained
    from pyrodiff.data import GAUSSIANS8_ENTROPY
    from pyrodiff.theory.mixture import IsotropicGaussianMixture, moment_matched_bound

    argv, out = learned_schedule_quick
    report = json.loads((out / "learned_schedule.json").read_text())
    assert report["command"] == "python analysis/learned_schedule.py " + " ".join(argv)
    assert report["entropy_nats"] == GAUSSIANS8_ENTROPY
    rows, per_example = report["small_T"]["5"], {}
    for kind in ("linear", "cosine", "linear_log_snr", "learned"):
        built, model = load_trained(rows[kind]["checkpoint"])
        x = built.data.test
        with torch.no_grad():
            nats = bound_terms(model, x, generator=torch.Generator().manual_seed(0)).total.mean(0).double()
        per_example[kind] = nats
        assert rows[kind]["bound_nats"]["mean"] == pytest.approx(nats.mean().item(), rel=1e-9)
        assert rows[kind]["bound_nats"]["stderr"] == pytest.approx((nats.std() / len(nats) ** 0.5).item(), rel=1e-9)
        law = IsotropicGaussianMixture.of(built.data)
        floor = moment_matched_bound(law, model.schedule, 200, torch.Generator().manual_seed(5), GAUSSIANS8_ENTROPY)
        assert rows[kind]["moment_matched_bound_nats"]["mean"] == pytest.approx(floor.bound, rel=1e-9)
    assert report["test_negative_log_q_nats"]["mean"] == pytest.approx(-law.log_prob(x).mean().item(), rel=1e-9)
    base = NoiseSchedule.linear(1000)
    respaced = base.respace(base.evenly_spaced_timesteps(5)).tables().log_snr
    assert rows["linear"]["log_snr_ends"] == pytest.approx([respaced[0].item(), respaced[-1].item()], rel=1e-12)
    difference = (per_example["cosine"] - per_example["learned"]).mean().item()
    assert rows["cosine"]["minus_learned_nats"]["mean"] == pytest.approx(difference, rel=1e-9)
    assert "| 5 | learned |" in (out / "learned_schedule.md").read_text()


def test_learned_schedule_estimators_are_unbiased_for_continuous_bound(learned_schedule_quick):
    """Each estimator's mean bound of the fixed batch agrees with `continuous_bound` on it within 4 standard errors
    (the importance-sampled one too: its weights undo its density), and the paired comparisons are the cells'."""
    import torch

    from pyrodiff import load_trained
    from pyrodiff.evaluation.continuous import continuous_bound

    _, out = learned_schedule_quick
    report = json.loads((out / "learned_schedule.json").read_text())
    c = report["continuous"]
    built, model = load_trained(c["runs"]["bound"]["checkpoint"])
    x = built.data.test[:256]
    draws = continuous_bound(model, x, num_samples=64, generator=torch.Generator().manual_seed(1)).per_example()
    reference, reference_se = draws.mean().item(), (draws.std() / len(draws) ** 0.5).item()
    for estimator in ("uniform", "low_discrepancy", "importance"):
        cell = c["cells"][f"bound|bound|{estimator}|fixed_batch"]
        # the fixed batch's bound is a constant: only the estimator's noise (cell stderr) and the reference's count;
        # the reference's per-example spread overstates its own noise, which keeps the check conservative
        z = (cell["mean"] - reference) / (cell["stderr"] ** 2 + reference_se**2) ** 0.5
        assert abs(z) < 4, (estimator, cell, reference, reference_se)
    a, b = c["cells"]["variance|variance|importance|test_batches"], c["cells"]["variance|bound|importance|test_batches"]
    paired = c["paired"]["variance|variance-bound|importance|test_batches"]
    assert paired["difference"]["mean"] == pytest.approx(a["mean"] - b["mean"], abs=1e-9)
    assert paired["std_ratio"]["ratio"] == pytest.approx(a["std_std"] / b["std_std"], rel=1e-9)


def test_learned_schedule_importance_density_integrates_exactly():
    """The importance density's inverse CDF and weights: on an even grid of u (bin edges on grid edges), the weighted
    mean of f(t(u)) is the integral of f over [0, 1] (f(t) = t^2 + 1, bins of unequal mass; the midpoint rule's
    error is O(1e-11) here), and the bins are visited in proportion to their mass."""
    import torch

    density = runpy.run_path(str(LEARNED_SCHEDULE))["ImportanceDensity"](torch.tensor([1.0, 9.0, 4.0, 4.0]))
    u = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000
    t, weight = density.draw(u)
    assert (weight * (t**2 + 1)).mean().item() == pytest.approx(4 / 3, rel=1e-9)
    visits = torch.bincount((t * 4).long().clamp(max=3), minlength=4).double() / len(t)
    assert visits.tolist() == pytest.approx([1 / 8, 3 / 8, 2 / 8, 2 / 8], abs=1e-12)


def test_learned_schedule_refuses_too_few_draws_in_one_line(tmp_path, capsys):
    main = runpy.run_path(str(LEARNED_SCHEDULE))["main"]
    assert main(["--quick", "--batches", "1", "--out", str(tmp_path / "l")]) == 2
    assert "--batches must be at least 2 (a standard deviation needs two draws), got 1" in _error(
        capsys, "learned_schedule"
    )
    assert not (tmp_path / "l").exists()
