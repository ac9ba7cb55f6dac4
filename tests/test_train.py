"""Training, checkpoints, resume and the CLI, on tiny specifications."""

import copy

import numpy as np
import pytest
import torch

from pyrodiff import cli
from pyrodiff import train as train_module
from pyrodiff.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pyrodiff.spec import normalise
from pyrodiff.train import TrainingError, train

TINY_2D = normalise(
    {
        "name": "tiny2d",
        "data": {"name": "gaussians8"},
        "schedule": {"kind": "linear", "num_steps": 20, "beta_start": 1e-3, "beta_end": 0.3},
        "model": {"prediction": "epsilon", "variance": "small", "decoder": "gaussian"},
        "network": {"kind": "mlp", "hidden": 16, "depth": 1},
        "training": {
            "steps": 8,
            "batch_size": 16,
            "checkpoint_every": 4,
            "eval_examples": 32,
        },
    }
)
TINY_DIGITS = normalise(
    {
        "name": "tinydigits",
        "data": {"name": "digits"},
        "schedule": {"kind": "cosine", "num_steps": 10},
        "model": {"prediction": "v", "decoder": "discretized"},
        "network": {"kind": "unet", "channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1},
        "training": {"steps": 3, "batch_size": 4, "eval_examples": 4, "objective": "simple"},
    }
)


def test_train_writes_everything(tmp_path):
    result = train(TINY_DIGITS, tmp_path, progress=False, num_samples=4)
    for name in ("checkpoint.pt", "losses.csv", "test_bound.json", "samples.png"):
        assert (tmp_path / name).exists()
    state = load_checkpoint(result.checkpoint, TINY_DIGITS)
    assert state["step"] == 3 and len(state["losses"]) == 3
    assert np.isfinite(result.test_bound["bits_per_dim"])


@pytest.mark.parametrize(
    "options", [{}, {"timestep_sampler": "importance", "amp": "bf16", "objective": "min_snr", "subsample_steps": 2}]
)
def test_resume_reproduces_the_uninterrupted_run(tmp_path, options):
    spec = copy.deepcopy(TINY_2D)
    spec["training"].update(options)
    full = train(spec, tmp_path / "full", progress=False, num_samples=8)
    losses_full = load_checkpoint(full.checkpoint)["losses"]
    train(spec, tmp_path / "split", steps=4, progress=False, num_samples=8)
    resumed = train(spec, tmp_path / "split", resume=True, progress=False, num_samples=8)
    assert load_checkpoint(resumed.checkpoint)["losses"] == losses_full
    a, b = load_checkpoint(full.checkpoint)["ema"], load_checkpoint(resumed.checkpoint)["ema"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_checkpoint_is_not_overwritten(tmp_path):
    train(TINY_2D, tmp_path, steps=2, progress=False, num_samples=8)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError, match="--resume"):
        train(TINY_2D, tmp_path, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_resume_with_another_specification_is_refused(tmp_path):
    train(TINY_2D, tmp_path, steps=2, progress=False, num_samples=8)
    other = copy.deepcopy(TINY_2D)
    other["model"]["prediction"] = "x0"
    with pytest.raises(CheckpointError, match="another specification"):
        train(other, tmp_path, resume=True, progress=False)


def test_corrupt_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    train(TINY_2D, tmp_path, steps=2, progress=False, num_samples=8)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    torch.save({"something": 1}, path)
    with pytest.raises(CheckpointError, match="not a pyrodiff checkpoint"):
        load_checkpoint(path)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    class NaNAfterSix(train_module.Trace_ELBO):
        calls = 0

        def differentiable_loss(self, *args, **kwargs):
            NaNAfterSix.calls += 1
            loss = super().differentiable_loss(*args, **kwargs)
            return loss * float("nan") if NaNAfterSix.calls > 6 else loss

    monkeypatch.setitem(train_module.ESTIMATORS, "trace", NaNAfterSix)
    spec = copy.deepcopy(TINY_2D)
    spec["training"]["estimator"] = "trace"
    with pytest.raises(TrainingError, match="step 7"):
        train(spec, tmp_path, progress=False)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 4 and all(np.isfinite(state["losses"]))


def test_atomic_save_leaves_the_old_checkpoint_on_failure(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"spec": {}, "step": 1, "network": {}, "ema": {}, "optimizer": {}, "rng": {}})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(path, {"spec": {}, "step": 2, "network": Unpicklable(), "ema": {}, "optimizer": {}, "rng": {}})
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_cli_train_and_sample(tmp_path, capsys):
    spec_file = tmp_path / "tiny.toml"
    spec_file.write_text(
        '[data]\nname = "gaussians8"\n[schedule]\nnum_steps = 10\n[model]\ndecoder = "gaussian"\n'
        '[network]\nkind = "mlp"\nhidden = 8\ndepth = 1\n'
        "[training]\nsteps = 2\nbatch_size = 8\neval_examples = 16\n"
    )
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(spec_file), "--out", str(out), "--seed", "3"]) == 0
    assert "bits/dim" in capsys.readouterr().out
    assert cli.main(["sample", str(out / "checkpoint.pt"), "--num", "10", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert cli.main(["sample", str(tmp_path / "missing.pt")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_learned_variances_train_on_the_bound_and_refuse_the_noise_losses(tmp_path):
    spec = copy.deepcopy(TINY_2D)
    spec["model"]["variance"] = "learned"
    result = train(spec, tmp_path / "learned", progress=False, num_samples=8)
    assert np.isfinite(result.test_bound["total_nats"])
    assert "kl_bound_nats" in result.test_bound  # gaussians8's density is known exactly
    spec["training"]["objective"] = "simple"
    with pytest.raises(ValueError, match="learned variances"):
        train(spec, tmp_path / "simple", progress=False)
