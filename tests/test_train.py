"""Training, checkpoints and resume on tiny specifications."""

import copy
import csv
import os
import signal

import numpy as np
import pytest
import torch
from pyro import poutine

from pyrodiff import DiffusionGuide
from pyrodiff.chain.objectives import ESTIMATORS
from pyrodiff.training import loop as train_module
from pyrodiff.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pyrodiff.training.loop import TrainingError, TrainingInterrupted, train
from pyrodiff.training.spec import Spec, SpecError

TINY_2D = Spec.from_dict(
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
TINY_DIGITS = Spec.from_dict(
    {
        "name": "tinydigits",
        "data": {"name": "digits"},
        "schedule": {"kind": "cosine", "num_steps": 10},
        "model": {"prediction": "v", "decoder": "discretized"},
        "network": {"kind": "unet", "channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1},
        "training": {"steps": 3, "batch_size": 4, "eval_examples": 4, "objective": "simple"},
    }
)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _same_run(a, b):
    """Two checkpoints hold the same loss history and the same EMA weights, bit for bit."""
    a, b = load_checkpoint(a), load_checkpoint(b)
    return a["losses"] == b["losses"] and all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


class _EstimatorHook(ESTIMATORS["trace"]):
    """``Trace_ELBO`` calling ``hook(n)`` at its n-th training (gradient-recording) loss; the hook may change the loss."""

    hook = staticmethod(lambda n, loss: loss)
    calls = 0

    def differentiable_loss(self, *args, **kwargs):
        loss = super().differentiable_loss(*args, **kwargs)
        if torch.is_grad_enabled():
            type(self).calls += 1
            loss = self.hook(type(self).calls, loss)
        return loss


@pytest.fixture
def hooked(monkeypatch):
    """Train with the ``trace`` estimator replaced by :class:`_EstimatorHook`; returns the class to set ``hook`` on."""

    class Hooked(_EstimatorHook):
        calls = 0

    monkeypatch.setitem(ESTIMATORS, "trace", Hooked)
    return Hooked


def test_train_writes_everything(tmp_path):
    result = train(TINY_DIGITS, tmp_path, progress=False, num_samples=4)
    for name in ("checkpoint.pt", "losses.csv", "test_bound.json", "samples.png"):
        assert (tmp_path / name).exists()
    state = load_checkpoint(result.checkpoint)
    assert state["step"] == 3 and len(state["losses"]) == 3
    assert Spec.from_dict(state["spec"]) == TINY_DIGITS
    assert np.isfinite(result.test_bound["bits_per_dim"])


@pytest.mark.parametrize(("spec", "header"), [(TINY_2D, "negative_elbo_nats"), (TINY_DIGITS, "simple_loss")])
def test_losses_csv_is_headed_by_what_it_holds(tmp_path, spec, header):
    train(spec, tmp_path, steps=2, progress=False, num_samples=4)
    rows = _rows(tmp_path / "losses.csv")
    assert rows[0] == ["step", header]
    assert [float(v) for _, v in rows[1:]] == pytest.approx(
        load_checkpoint(tmp_path / "checkpoint.pt")["losses"], rel=1e-5
    )


@pytest.mark.parametrize(
    "options", [{}, {"timestep_sampler": "importance", "amp": "bf16", "objective": "min_snr", "subsample_steps": 2}]
)
def test_resume_reproduces_the_uninterrupted_run(tmp_path, options):
    spec = TINY_2D.with_changes({"training": options})
    full = train(spec, tmp_path / "full", progress=False, num_samples=8)
    train(spec, tmp_path / "split", steps=4, progress=False, num_samples=8)
    resumed = train(spec, tmp_path / "split", resume=True, progress=False, num_samples=8)
    assert _same_run(full.checkpoint, resumed.checkpoint)
    assert resumed.test_bound["terms_nats"] == full.test_bound["terms_nats"]


def _gaussian_log_density(x, mean, var):
    """log N(x; mean, var I), summed over the last dimension (float64 numpy)."""
    return (-0.5 * (np.log(2 * np.pi * var) + (x - mean) ** 2 / var)).sum(-1)


def test_the_full_chain_trains_on_the_negative_elbo_of_every_step(tmp_path, monkeypatch):
    """With ``subsample_steps = "all"`` the first logged loss is the batch mean of log q(x_{1:T} | x_0) -
    log p(x_{0:T}) at the initial weights, recomputed here by hand (MATH.md, "The bound") from the path the guide
    drew: q's factors N(x_t; sqrt(1 - beta_t) x_{t-1}, beta_t) with the linear betas, p's prior N(0, I), its
    reverse steps and its Gaussian decoder from the network's predictions."""
    spec = TINY_2D.with_changes({"training": {"subsample_steps": "all", "steps": 2, "estimator": "trace"}})
    assert spec.training.subsample_steps is None
    first = {}

    class Recording(ESTIMATORS["trace"]):
        def differentiable_loss(self, model, guide, x0, *args):
            if torch.is_grad_enabled() and not first:
                first.update(model=copy.deepcopy(model), x0=x0.clone(), args=args, rng=torch.get_rng_state())
            return super().differentiable_loss(model, guide, x0, *args)

    monkeypatch.setitem(ESTIMATORS, "trace", Recording)
    result = train(spec, tmp_path, progress=False, num_samples=8)
    logged = load_checkpoint(result.checkpoint)["losses"][0]

    model, x0, T = first["model"], first["x0"], 20
    assert first["args"] in ((), (None,)) and x0.shape == (16, 2)
    torch.set_rng_state(first["rng"])
    with torch.no_grad():
        path = poutine.trace(DiffusionGuide(model.schedule)).get_trace(x0).nodes["x_{1:T}"]["value"]  # (T, N, 2)
        steps = [model.predict(path[t - 1], torch.full((16,), t)) for t in range(1, T + 1)]
    betas = np.linspace(1e-3, 0.3, T)
    x = [x0.double().numpy()] + [path[t - 1].double().numpy() for t in range(1, T + 1)]  # x[t] = x_t
    log_q = sum(
        _gaussian_log_density(x[t], np.sqrt(1 - betas[t - 1]) * x[t - 1], betas[t - 1]) for t in range(1, T + 1)
    )
    log_p = _gaussian_log_density(x[T], 0.0, 1.0)
    for t in range(1, T + 1):  # p(x_{t-1} | x_t), the decoder at t = 1
        mean, var = steps[t - 1].mean.double().numpy(), steps[t - 1].variance.double().numpy()
        log_p = log_p + _gaussian_log_density(x[t - 1], mean, var)
    assert logged == pytest.approx((log_q - log_p).mean(), rel=1e-5)


def test_existing_checkpoint_is_not_overwritten(tmp_path):
    train(TINY_2D, tmp_path, steps=2, progress=False, num_samples=8)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError, match="--resume"):
        train(TINY_2D, tmp_path, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_resume_with_another_specification_is_refused_naming_what_differs(tmp_path):
    train(TINY_2D, tmp_path, steps=2, progress=False, num_samples=8)
    other = TINY_2D.with_changes({"model": {"prediction": "x0"}, "training": {"lr": 1e-3}})
    with pytest.raises(CheckpointError, match="another specification") as caught:
        train(other, tmp_path, resume=True, progress=False)
    assert "model.prediction: 'epsilon' -> 'x0'" in str(caught.value)
    assert "training.lr: 0.0002 -> 0.001" in str(caught.value)


def test_resume_to_fewer_steps_is_refused_and_to_as_many_only_evaluates(tmp_path):
    train(TINY_2D, tmp_path, steps=4, progress=False, num_samples=8)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match="at step 4: training it to 2 steps would go back"):
        train(TINY_2D, tmp_path, steps=2, resume=True, progress=False)
    result = train(TINY_2D, tmp_path, steps=4, resume=True, progress=False, num_samples=8)
    assert result.steps == 4 and np.isfinite(result.test_bound["total_nats"])
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_changed_hyperparameters_are_refused_unless_asked_and_then_take_effect(tmp_path):
    train(TINY_2D, tmp_path / "run", steps=4, progress=False, num_samples=8)
    faster = TINY_2D.with_changes({"training": {"lr": 1e-2, "warmup_steps": 10, "weight_decay": 0.5}})
    with pytest.raises(CheckpointError, match=r"training\.lr: 0\.0002 -> 0\.01.*--change-hyperparameters"):
        train(faster, tmp_path / "run", resume=True, progress=False)
    train(faster, tmp_path / "run", resume=True, change_hyperparameters=True, progress=False, num_samples=8)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    group = state["optimizer"]["param_groups"][0]
    assert group["lr"] == pytest.approx(1e-2 * 9 / 10) and group["weight_decay"] == 0.5  # warm-up step 8 of 10
    assert state["scheduler"]["base_lrs"] == [1e-2]
    assert Spec.from_dict(state["spec"]) == faster
    # allowing changes changes nothing when there are none: the run is the uninterrupted one
    full = train(TINY_2D, tmp_path / "full", progress=False, num_samples=8)
    train(TINY_2D, tmp_path / "same", steps=4, progress=False, num_samples=8)
    same = train(TINY_2D, tmp_path / "same", resume=True, change_hyperparameters=True, progress=False, num_samples=8)
    assert _same_run(full.checkpoint, same.checkpoint)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, hooked):
    hooked.hook = staticmethod(lambda n, loss: loss * float("nan") if n > 6 else loss)
    with pytest.raises(TrainingError, match="non-finite loss.*step 7.*step 4\\) is kept"):
        train(TINY_2D.with_changes({"training": {"estimator": "trace"}}), tmp_path, progress=False)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 4 and all(np.isfinite(state["losses"]))


def test_weights_whose_loss_is_not_finite_are_never_checkpointed(tmp_path, monkeypatch):
    """Step 8's update leaves weights that give NaN (as a learning rate of 1e6 does) although the loss
    of step 8 itself was finite: they must not replace the step-4 checkpoint, which must still resume."""
    full = train(TINY_2D, tmp_path / "full", progress=False, num_samples=8)
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def poisoned(parameters, max_norm):
        parameters = list(parameters)
        calls.append(1)
        if len(calls) == 8:
            parameters[0].grad.fill_(float("inf"))
        return clip(parameters, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoned)
    with pytest.raises(TrainingError, match=r"the weights after step 8 give a non-finite loss.*step 4\) is kept"):
        train(TINY_2D, tmp_path / "run", progress=False)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 4 and all(torch.isfinite(w).all() for w in state["network"].values())
    monkeypatch.undo()
    resumed = train(TINY_2D, tmp_path / "run", resume=True, progress=False, num_samples=8)
    assert _same_run(full.checkpoint, resumed.checkpoint)


def test_sigint_saves_a_checkpoint_that_resumes_exactly(tmp_path, hooked):
    spec = TINY_2D.with_changes({"training": {"estimator": "trace"}})
    full = train(spec, tmp_path / "full", progress=False, num_samples=8)
    hooked.calls, hooked.hook = (
        0,
        staticmethod(lambda n, loss: os.kill(os.getpid(), signal.SIGINT) or loss if n == 3 else loss),
    )
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="checkpoint of step 3 saved") as caught:
        train(spec, tmp_path / "split", progress=False)
    assert caught.value.step == 3 and caught.value.checkpoint == tmp_path / "split" / "checkpoint.pt"
    assert load_checkpoint(caught.value.checkpoint)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is handler  # given back
    hooked.hook = staticmethod(lambda n, loss: loss)
    resumed = train(spec, tmp_path / "split", resume=True, progress=False, num_samples=8)
    assert _same_run(full.checkpoint, resumed.checkpoint)


def test_an_unwritable_output_folder_is_refused_before_training(tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train_module, "_Run", no_training)
    (tmp_path / "file").write_text("not a folder")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(TrainingError, match=f"cannot write to the output folder {out}"):
            train(TINY_2D, out, progress=False)


def test_stale_temporaries_are_removed_and_losses_rewritten_on_resume(tmp_path, caplog):
    train(TINY_2D, tmp_path, steps=4, progress=False, num_samples=8)
    stale = tmp_path / "checkpoint.pt.k1ll3d.tmp"  # as a save killed before its rename leaves it
    stale.write_bytes(b"half a checkpoint")
    rows = _rows(tmp_path / "losses.csv")
    (tmp_path / "losses.csv").write_text("\n".join(",".join(r) for r in rows[:-1]) + "\n")  # a row behind
    train(TINY_2D, tmp_path, steps=4, resume=True, progress=False, num_samples=8)
    assert not stale.exists() and str(stale) in caplog.text
    assert _rows(tmp_path / "losses.csv") == rows


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


def test_corrupt_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    train(TINY_2D, tmp_path, steps=2, progress=False, num_samples=8)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    torch.save({"something": 1}, path)
    with pytest.raises(CheckpointError, match="not a pyrodiff checkpoint"):
        load_checkpoint(path)


def test_learned_variances_train_on_the_bound_and_refuse_the_noise_losses(tmp_path):
    spec = TINY_2D.with_changes({"model": {"variance": "learned"}})
    result = train(spec, tmp_path / "learned", progress=False, num_samples=8)
    assert np.isfinite(result.test_bound["total_nats"])
    assert "kl_bound_nats" in result.test_bound  # gaussians8's density is known exactly
    with pytest.raises(SpecError, match="training.objective: learned variances"):
        spec.with_changes({"training": {"objective": "simple"}})


def test_a_non_finite_loss_is_found_at_the_next_read_of_the_losses_naming_its_step(tmp_path, hooked):
    hooked.hook = staticmethod(lambda n, loss: loss * float("nan") if n == 4 else loss)
    spec = TINY_2D.with_changes({"training": {"estimator": "trace", "log_every": 3, "checkpoint_every": 3}})
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 4 .*seen at step 6.*step 3\) is kept"):
        train(spec, tmp_path, progress=False)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3
    assert len(_rows(tmp_path / "losses.csv")) == 4  # the header and steps 1-3


def test_the_ema_is_torchs_averaged_model_and_reads_its_checkpoints():
    """Bit for bit the average of ``AveragedModel(use_buffers=True)`` with torch's EMA function, state dicts
    interchangeable both ways (old checkpoints load, and ``load_trained`` reads new ones with AveragedModel)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from pyrodiff.training.ema import ExponentialMovingAverage

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    ema = ExponentialMovingAverage(net, 0.9)
    reference = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update(net)
        reference.update_parameters(net)
    assert ema.state_dict().keys() == reference.state_dict().keys()
    assert all(
        torch.equal(a, b) for a, b in zip(ema.state_dict().values(), reference.state_dict().values(), strict=True)
    )
    fresh = ExponentialMovingAverage(net, 0.9)
    fresh.load_state_dict(reference.state_dict())
    old = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    old.load_state_dict(ema.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), ema.state_dict().values(), strict=True))
    fresh.update(net), reference.update_parameters(net)  # a loaded EMA averages (not copies) at its next update
    assert all(
        torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), reference.state_dict().values(), strict=True)
    )


def test_a_resumed_optimiser_keeps_this_runs_implementation():
    """A checkpoint's optimiser state (written on the CPU with foreach, or without the graph) loads into an optimiser
    that must stay capturable for a CUDA graph: the run's flags win, the moments and step are the checkpoint's."""
    from pyrodiff.training.loop import _with_implementation

    p = [torch.nn.Parameter(torch.randn(3))]
    saved = torch.optim.AdamW(p, foreach=True)
    p[0].grad = torch.ones(3)
    saved.step()
    live = torch.optim.AdamW(p, capturable=True, foreach=False)
    live.load_state_dict(_with_implementation(saved.state_dict(), live))
    assert live.param_groups[0]["capturable"] and not live.param_groups[0]["foreach"]
    assert torch.equal(live.state[p[0]]["exp_avg"], saved.state[p[0]]["exp_avg"]) and live.state[p[0]]["step"] == 1
    plain = torch.optim.AdamW(p, capturable=True, foreach=False)
    plain.load_state_dict(saved.state_dict())
    assert not plain.param_groups[0]["capturable"]  # what the helper prevents


OUTPUTS = ("checkpoint.pt", "losses.csv", "test_bound.json", "samples.png")


def test_an_earlier_runs_results_are_never_replaced_by_a_new_run(tmp_path):
    train(TINY_2D, tmp_path, steps=2, progress=False, num_samples=8)
    (tmp_path / "checkpoint.pt").unlink()  # the results stay: a new run must not replace them
    before = {name: (tmp_path / name).read_bytes() for name in OUTPUTS[1:]}
    with pytest.raises(TrainingError, match="holds an earlier run's losses.csv, test_bound.json, samples.png"):
        train(TINY_2D, tmp_path, steps=2, progress=False, num_samples=8)
    assert {name: (tmp_path / name).read_bytes() for name in OUTPUTS[1:]} == before


def test_resuming_a_finished_run_keeps_its_training_time(tmp_path):
    import json

    first = train(TINY_2D, tmp_path, steps=4, progress=False, num_samples=8)
    recorded = json.loads((tmp_path / "test_bound.json").read_text())["train_seconds"]
    assert recorded == first.seconds > 0
    again = train(TINY_2D, tmp_path, steps=4, resume=True, progress=False, num_samples=8)  # only evaluates
    assert json.loads((tmp_path / "test_bound.json").read_text())["train_seconds"] == recorded == again.seconds
    longer = train(TINY_2D, tmp_path, steps=6, resume=True, progress=False, num_samples=8)
    assert longer.seconds > recorded  # the time of both runs


def test_results_are_written_inside_the_folder_never_through_a_link(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    train(TINY_2D, tmp_path / "run", steps=2, progress=False, num_samples=8)
    for name in OUTPUTS[1:]:
        (outside / name).write_text("not to be touched")
        (tmp_path / "run" / name).unlink()
        (tmp_path / "run" / name).symlink_to(outside / name)
    train(TINY_2D, tmp_path / "run", steps=3, resume=True, progress=False, num_samples=8)
    for name in OUTPUTS[1:]:
        assert (outside / name).read_text() == "not to be touched"
        assert (tmp_path / "run" / name).is_file() and not (tmp_path / "run" / name).is_symlink()
    (outside / "run").mkdir()
    (outside / "run" / "test_bound.json").symlink_to(outside / "test_bound.json")  # a link is refused like a file
    with pytest.raises(TrainingError, match="holds an earlier run's test_bound.json"):
        train(TINY_2D, outside / "run", steps=2, progress=False, num_samples=8)


def test_leftovers_of_a_killed_run_are_removed_and_outputs_share_one_mode(tmp_path):
    previous = os.umask(0o027)
    try:
        train(TINY_2D, tmp_path, steps=2, progress=False, num_samples=8)
        left = ["losses.tmp", "losses.csv.k1ll3d.tmp", "test_bound.json.k1ll3d.tmp", "checkpoint.pt.k1ll3d.tmp"]
        for name in left:
            (tmp_path / name).write_text("left by a kill")
        train(TINY_2D, tmp_path, steps=3, resume=True, progress=False, num_samples=8)
    finally:
        os.umask(previous)
    assert not [name for name in left if (tmp_path / name).exists()]
    assert {name: (tmp_path / name).stat().st_mode & 0o777 for name in OUTPUTS} == dict.fromkeys(OUTPUTS, 0o640)
