"""The ``pyrodiff`` command: one-line errors, nothing overwritten silently, specifications found by name,
Ctrl-C saving a checkpoint; and the comparison script."""

import os
import runpy
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pyrodiff import cli
from pyrodiff.training import loop as train_module
from pyrodiff.training.checkpoint import FORMAT, load_checkpoint

ROOT = Path(__file__).parents[1]
TINY = (
    '[data]\nname = "gaussians8"\n[schedule]\nnum_steps = 10\n[model]\ndecoder = "gaussian"\n'
    '[network]\nkind = "mlp"\nhidden = 8\ndepth = 1\n'
    "[training]\nsteps = 2\nbatch_size = 8\neval_examples = 16\n"
)


def _error(capsys) -> str:
    """The command's stderr, which must be one line ``pyrodiff: error: ...``, no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyrodiff: error: "), err
    return lines[0]


def _argument_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as caught:
        cli.main(argv)
    assert caught.value.code == 2
    return _error(capsys)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A checkpoint of the tiny specification, trained by the command (with samples.png beside it)."""
    folder = tmp_path_factory.mktemp("trained")
    (folder / "tiny.toml").write_text(TINY)
    assert cli.main(["train", "--config", str(folder / "tiny.toml"), "--out", str(folder / "run")]) == 0
    return folder / "run" / "checkpoint.pt"


def test_train_prints_the_bound_and_sample_writes_a_picture(trained, tmp_path, capsys):
    assert cli.main(["sample", str(trained), "--num", "10", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert f"samples: {tmp_path / 's.png'}" in capsys.readouterr().out


def test_a_bad_specification_is_one_line(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(TINY.replace("batch_size = 8", "batch_size = 2.5"))
    assert cli.main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    assert f"{path}: training.batch_size: must be an integer >= 1, got 2.5" in _error(capsys)
    assert cli.main(["train", "--config", str(tmp_path / "absent.toml")]) == 2
    assert "no model specification at" in _error(capsys)
    assert not (tmp_path / "run").exists()


def test_bad_checkpoints_are_one_line(tmp_path, capsys):
    marker = tmp_path / "MARKER"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch '{marker}'",)

    corrupt, malicious = tmp_path / "corrupt.pt", tmp_path / "malicious.pt"
    corrupt.write_bytes(b"\x80\x02" + bytes(range(150, 250)))
    torch.save(
        {"format": FORMAT, "spec": {}, "step": 0, "network": {}, "ema": {}, "optimizer": {}, "x": RunsCode()}, malicious
    )
    for command in ("sample", "report"):
        assert cli.main([command, str(tmp_path / "missing.pt")]) == 2
        assert "no checkpoint at" in _error(capsys)
        assert cli.main([command, str(corrupt)]) == 2
        assert "is corrupt" in _error(capsys)
        assert cli.main([command, str(malicious), "--out", str(tmp_path / "out")]) == 2
        assert "could run code" in _error(capsys)
    assert not marker.exists()


def test_samples_of_weights_that_give_nan_are_refused_and_no_picture_written(trained, tmp_path, capsys):
    state = load_checkpoint(trained)
    state["ema"] = {k: v.float().fill_(float("nan")) if v.is_floating_point() else v for k, v in state["ema"].items()}
    torch.save(state, tmp_path / "checkpoint.pt")
    assert cli.main(["sample", str(tmp_path / "checkpoint.pt"), "--num", "4", "--out", str(tmp_path / "s.png")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the sampler's progress bar
    assert last.startswith("pyrodiff: error: 4 of the 4 samples are not finite (NaN or infinite)")
    assert not (tmp_path / "s.png").exists()


def test_a_specification_or_a_vae_checkpoint_where_a_diffusion_checkpoint_belongs_is_named(tmp_path, capsys):
    from pyrodiff.theory.vae import VAE, save_vae

    for command in ("sample", "report"):
        assert cli.main([command, str(ROOT / "models" / "digits.toml"), "--out", str(tmp_path / "x")]) == 2
        assert "is a model specification (TOML), not a checkpoint" in _error(capsys)
    save_vae(tmp_path / "vae.pt", VAE((1, 8, 8), latent_dim=2, hidden=8, depth=1))
    for command in ("sample", "report"):
        assert cli.main([command, str(tmp_path / "vae.pt"), "--out", str(tmp_path / "x")]) == 2
        assert f"{tmp_path / 'vae.pt'} is a VAE checkpoint (pyrodiff.theory.vae), not a diffusion model's" in _error(
            capsys
        )
    assert not (tmp_path / "x").exists()


def test_a_checkpoint_with_an_invalid_specification_is_one_line(trained, tmp_path, capsys):
    state = load_checkpoint(trained)
    state["spec"]["name"] = "../../elsewhere"
    torch.save(state, tmp_path / "checkpoint.pt")
    assert cli.main(["sample", str(tmp_path / "checkpoint.pt")]) == 2
    assert f"checkpoint {tmp_path / 'checkpoint.pt'}: name must be a folder name" in _error(capsys)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["sample", "c.pt", "--num", "0"], "argument --num: must be an integer >= 1, got '0'"),
        (["sample", "c.pt", "--num", "-3"], "argument --num: must be an integer >= 1"),
        (["sample", "c.pt", "--num", "many"], "argument --num: must be an integer >= 1, got 'many'"),
        (["report", "c.pt", "--max-examples", "0"], "argument --max-examples: must be an integer >= 1"),
        (["report", "c.pt", "--num-samples", "0"], "argument --num-samples: must be an integer >= 1"),
        (["train", "--steps", "0"], "argument --steps: must be an integer >= 1"),
        # too large for torch (a TypeError traceback from randn, "Overflow when unpacking long long")
        (["sample", "c.pt", "--num", "10000000000000000000"], "argument --num: must be an integer in 1..2147483647"),
        (["sample", "c.pt", "--seed", "10" * 12], "argument --seed: must be an integer in 0..9223372036854775807"),
        (["train", "--seed", "-1"], "argument --seed: must be an integer >= 0"),
        (
            ["report", "c.pt", "--max-examples", "3" * 12],
            "argument --max-examples: must be an integer in 1..2147483647",
        ),
        (["train", "--device", "tpu"], "argument --device: invalid choice"),
        (["report", "c.pt", "--split", "valid"], "argument --split: invalid choice"),
    ],
)
def test_bad_arguments_are_one_line(capsys, argv, fragment):
    assert fragment in _argument_error(capsys, argv)


@pytest.mark.parametrize("argv", [["sample", "missing.pt"], ["report", "missing.pt"], ["train", "--config", "absent"]])
def test_cuda_without_cuda_is_refused_before_anything_is_loaded(capsys, monkeypatch, argv):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main([*argv, "--device", "cuda"]) == 2
    assert "--device cuda was asked for, but torch sees no CUDA device" in _error(capsys)


def test_sample_never_replaces_a_picture(trained, capsys):
    training_samples = trained.with_name("samples.png").read_bytes()
    assert cli.main(["sample", str(trained), "--num", "8", "--seed", "5"]) == 0
    assert trained.with_name("samples-seed5.png").exists()
    assert trained.with_name("samples.png").read_bytes() == training_samples
    capsys.readouterr()
    assert cli.main(["sample", str(trained), "--num", "8", "--seed", "5"]) == 2
    assert "samples-seed5.png exists: choose another --out or pass --overwrite" in _error(capsys)
    assert cli.main(["sample", str(trained), "--num", "8", "--out", str(trained.with_name("samples.png"))]) == 2
    assert trained.with_name("samples.png").read_bytes() == training_samples
    _error(capsys)
    assert cli.main(["sample", str(trained), "--num", "8", "--seed", "5", "--overwrite"]) == 0


def test_sample_never_replaces_what_is_not_a_file(trained, tmp_path, capsys):
    """``--out`` naming a device or a pipe (``/dev/null`` as root was replaced by a regular file) is refused, even
    with ``--overwrite``, before anything is sampled."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert cli.main(["sample", str(trained), "--num", "4", "--out", str(fifo), "--overwrite"]) == 2
    assert f"{fifo} is not a regular file: it is never replaced" in _error(capsys)
    assert fifo.is_fifo()


def test_report_never_replaces_a_report(trained, tmp_path, capsys):
    out = str(tmp_path / "report")
    assert cli.main(["report", str(trained), "--max-examples", "4", "--out", out]) == 0
    before = (tmp_path / "report" / "bound.json").read_text()
    capsys.readouterr()
    assert cli.main(["report", str(trained), "--max-examples", "8", "--out", out]) == 2
    assert "already holds a report" in _error(capsys)
    assert (tmp_path / "report" / "bound.json").read_text() == before
    assert cli.main(["report", str(trained), "--max-examples", "8", "--out", out, "--overwrite"]) == 0
    assert (tmp_path / "report" / "bound.json").read_text() != before


def test_train_by_name_from_another_folder(tmp_path, monkeypatch, capsys):
    assert cli.build_parser().parse_args(["train"]).config == "digits"  # found by name, as in test_spec
    installed = tmp_path / "prefix" / "share" / "pyrodiff" / "models"
    installed.mkdir(parents=True)
    (installed / "tinyname.toml").write_text(TINY)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    monkeypatch.chdir(tmp_path / "prefix")
    assert cli.main(["train", "--config", "tinyname", "--steps", "1"]) == 0
    assert load_checkpoint(tmp_path / "prefix" / "runs" / "tinyname" / "checkpoint.pt")["step"] == 1


def test_unusable_output_and_rewinding_resume_are_one_line(trained, tmp_path, capsys):
    (tmp_path / "tiny.toml").write_text(TINY)
    (tmp_path / "file").write_text("")
    assert cli.main(["train", "--config", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "file")]) == 2
    assert f"cannot write to the output folder {tmp_path / 'file'}" in _error(capsys)
    argv = ["train", "--config", str(trained.parents[1] / "tiny.toml"), "--out", str(trained.parent), "--resume"]
    assert cli.main([*argv, "--steps", "1"]) == 2
    assert "at step 2: training it to 1 steps would go back" in _error(capsys)
    assert cli.main(argv[:-1] + ["--change-hyperparameters"]) == 2
    assert "--change-hyperparameters applies to a resume: pass --resume too" in _error(capsys)


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, monkeypatch, capsys):
    step = train_module._Run.train_step

    def step_then_ctrl_c(run, batch):
        loss = step(run, batch)
        if run.step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(train_module._Run, "train_step", step_then_ctrl_c)
    (tmp_path / "tiny.toml").write_text(TINY)
    config, out = str(tmp_path / "tiny.toml"), str(tmp_path / "run")
    assert cli.main(["train", "--config", config, "--out", out]) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    assert last == (
        f"pyrodiff: interrupted: step 1 saved to {checkpoint}; "
        f"continue with: pyrodiff train --config {config} --out {out} --resume"
    )
    assert load_checkpoint(checkpoint)["step"] == 1


def test_the_printed_resume_command_continues_the_same_run(tmp_path, monkeypatch, capsys):
    """After Ctrl-C, the command printed runs as printed (the --seed and --steps given kept) and ends where the
    uninterrupted run ends, bit for bit."""
    step = train_module._Run.train_step

    def step_then_ctrl_c(run, batch):
        loss = step(run, batch)
        if run.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    (tmp_path / "tiny.toml").write_text(TINY)
    options = ["--config", str(tmp_path / "tiny.toml"), "--seed", "5", "--steps", "4"]
    assert cli.main(["train", *options, "--out", str(tmp_path / "full")]) == 0
    monkeypatch.setattr(train_module._Run, "train_step", step_then_ctrl_c)
    assert cli.main(["train", *options, "--out", str(tmp_path / "split")]) == 130
    monkeypatch.setattr(train_module._Run, "train_step", step)
    printed = capsys.readouterr().err.strip().splitlines()[-1].split("continue with: ")[1]
    command = shlex.split(printed)
    assert command[0] == "pyrodiff" and cli.main(command[1:]) == 0
    full, split = (
        load_checkpoint(tmp_path / "full" / "checkpoint.pt"),
        load_checkpoint(tmp_path / "split" / "checkpoint.pt"),
    )
    assert split["step"] == 4 and split["spec"]["training"]["seed"] == 5
    assert full["losses"] == split["losses"] and all(torch.equal(full["ema"][k], split["ema"][k]) for k in full["ema"])


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


HEAVY = ("torch", "pyro", "numpy", "matplotlib")


@pytest.mark.parametrize(
    ("argv", "code", "out"),
    [
        (["sample"], 2, "pyrodiff: error: the following arguments are required: checkpoint"),
        (["train", "--steps", "0"], 2, "pyrodiff: error: argument --steps: must be an integer >= 1"),
        (["--version"], 0, "pyrodiff 0.1.0"),
    ],
)
def test_arguments_are_read_before_torch_and_pyro_are_imported(argv, code, out):
    """An argument error or ``--version`` answers at once: nothing heavy is imported to parse the arguments."""
    result = _python(
        "import sys\n"
        "from pyrodiff import cli\n"
        f"try:\n    cli.main({argv!r})\nexcept SystemExit as e:\n    print('exit', e.code)\n"
        f"print('heavy', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert out in result.stdout + result.stderr
    assert f"exit {code}" in result.stdout and "heavy []" in result.stdout, result.stdout


@pytest.mark.parametrize("module", ["torch", "pyro", "torch._dynamo", "torch._dynamo.eval_frame"])
def test_ctrl_c_while_the_command_starts_is_one_line_and_exit_130(module, tmp_path):
    """SIGINT arriving while ``module`` is being imported (the entry point's start-up) ends the command with one
    line and status 130: not a KeyboardInterrupt traceback (status -2), nor an interrupt lost inside torch's import
    of ``torch._dynamo`` (which AdamW makes when built), after which training ran on with that module half-imported."""
    result = _python(
        "import os, signal, sys\n"
        "class InterruptOnImport:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name == {module!r}:\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "        return None\n"
        "sys.meta_path.insert(0, InterruptOnImport())\n"
        "sys.argv = ['pyrodiff', 'train', '--steps', '1', '--out', " + repr(str(tmp_path / "run")) + "]\n"
        "import runpy\n"
        "runpy.run_module('pyrodiff', run_name='__main__')\n"
    )
    assert result.returncode == 130, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == ["pyrodiff: interrupted while starting; nothing was written"]
    assert not (tmp_path / "run").exists()


def test_compare_labels_from_bound_json_and_never_replaces_results(trained, tmp_path, capsys):
    compare = runpy.run_path(str(ROOT / "analysis" / "compare_bounds.py"))["main"]
    report = trained.with_name("report-test")
    out = str(tmp_path / "compare")
    assert compare([str(trained), "--max-examples", "4", "--out", out]) == 0
    assert (report / "bound.json").exists()
    table = (tmp_path / "compare" / "compare.md").read_text()
    assert (
        "| tiny: run run, 2 training steps, trained on elbo, epsilon, small variance, linear schedule, T = 10," in table
    )
    assert compare([str(trained), "--out", str(tmp_path / "other")]) == 2
    assert "already holds a report: pass that folder instead" in capsys.readouterr().err
    assert compare([str(report), "--out", out]) == 2
    assert "already holds a comparison" in capsys.readouterr().err
    assert compare([str(report), str(report), "--labels", "A", "B", "--out", out, "--overwrite"]) == 0
    assert "| A | 10 |" in (tmp_path / "compare" / "compare.md").read_text()


def test_ddim_samples_and_the_bound_of_a_shorter_chain(trained, tmp_path, capsys):
    import json

    out = tmp_path / "ddim.png"
    argv = [
        "sample",
        str(trained),
        "--num",
        "6",
        "--sampler",
        "ddim",
        "--steps",
        "4",
        "--eta",
        "0.5",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 0 and out.stat().st_size > 1000
    assert cli.main(["report", str(trained), "--steps", "4", "--max-examples", "5", "--out", str(tmp_path / "r")]) == 0
    bound = json.loads((tmp_path / "r" / "bound.json").read_text())
    assert bound["num_steps"] == 4 and len(bound["terms_nats"]) == 5 and bound["respaced_steps"] == 4
    capsys.readouterr()
    assert cli.main(["sample", str(trained), "--sampler", "ddim", "--eta", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert "eta must be a number in [0, 1]" in _error(capsys)


def test_eta_is_refused_without_the_ddim_sampler(trained, tmp_path, capsys):
    """The ancestral sampler has no eta: ``--eta`` with it is refused (exit 2, one line), never ignored."""
    out = tmp_path / "x.png"
    capsys.readouterr()
    assert cli.main(["sample", str(trained), "--eta", "0.5", "--num", "2", "--out", str(out)]) == 2
    assert _error(capsys) == "pyrodiff: error: --eta is DDIM's: give --sampler ddim (the ancestral sampler has no eta)"
    assert not out.exists()


def test_report_of_a_ddim_chain_is_its_bound_and_eta_zero_is_refused(trained, tmp_path, capsys):
    import json

    from pyrodiff import bound_terms
    from pyrodiff.training.trained import load_trained

    argv = ["report", str(trained), "--steps", "4", "--max-examples", "5", "--eta", "0.5", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    bound = json.loads((tmp_path / "bound.json").read_text())
    built, model = load_trained(trained, "cpu", None)
    torch.manual_seed(0)
    direct = bound_terms(model.respaced(4).ddim(0.5), built.data.test[:5])
    assert bound["eta"] == 0.5 and bound["model"]["eta"] == 0.5
    assert np.allclose(bound["terms_nats"], direct.mean().numpy(), rtol=1e-6)
    capsys.readouterr()
    assert cli.main(["report", str(trained), "--eta", "0", "--out", str(tmp_path / "zero")]) == 2
    assert "eta = 0" in _error(capsys) and not (tmp_path / "zero").exists()
    assert cli.main(["report", str(trained), "--eta", "0.5", "--variance", "large", "--out", str(tmp_path / "b")]) == 2
    assert "not both" in _error(capsys)


def test_report_with_other_reverse_variances(trained, tmp_path):
    import json

    totals = {}
    for variance in ("small", "large", "analytic"):
        out = tmp_path / variance
        argv = [
            "report",
            str(trained),
            "--variance",
            variance,
            "--steps",
            "5",
            "--max-examples",
            "20",
            "--out",
            str(out),
        ]
        assert cli.main(argv) == 0
        bound = json.loads((out / "bound.json").read_text())
        assert bound["variance"] == variance and bound["num_steps"] == 5
        totals[variance] = bound["total_nats"]
    assert len(set(totals.values())) == 3  # each variance gives its own bound


def test_no_graph_is_recorded_in_the_checkpoints_specification(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    argv = ["train", "--config", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "run"), "--no-graph"]
    assert cli.main(argv) == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["spec"]["training"]["graph"] is False
    assert cli.main([*argv[:-1], "--out", str(tmp_path / "default")]) == 0
    assert load_checkpoint(tmp_path / "default" / "checkpoint.pt")["spec"]["training"]["graph"] is True
