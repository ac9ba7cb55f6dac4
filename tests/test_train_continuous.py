"""Training a forward process with parameters: the continuous-time bound and a learned schedule through
``pyrodiff train``, its checkpoints and resume, the wall-clock budget, and the report of such a checkpoint."""

import json
import math

import pytest
import torch

from pyrodiff import ContinuousDiffusionModel, LearnedSchedule
from pyrodiff.chain.log_snr import NoiseLevelInput
from pyrodiff.evaluation.continuous import continuous_bound
from pyrodiff.training import loop as train_module
from pyrodiff.training.checkpoint import load_checkpoint
from pyrodiff.training.loop import train
from pyrodiff.training.spec import Spec, SpecError, build
from pyrodiff.training.trained import load_trained, report_checkpoint

CONTINUOUS_2D = Spec.from_dict(
    {
        "name": "continuous2d",
        "data": {"name": "gaussians8"},
        "schedule": {"kind": "learned", "num_steps": 20, "hidden": 8, "gamma_min": -6.0, "gamma_max": 4.0},
        "model": {"time": "continuous", "decoder": "gaussian"},
        "network": {"kind": "mlp", "hidden": 16, "depth": 1},
        "training": {"steps": 8, "batch_size": 16, "checkpoint_every": 4, "eval_examples": 32},
    }
)


def _same_run(a, b):
    a, b = load_checkpoint(a), load_checkpoint(b)
    return (
        a["losses"] == b["losses"]
        and all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
        and all(torch.equal(a["schedule_ema"][k], b["schedule_ema"][k]) for k in a["schedule_ema"])
    )


def test_the_specification_builds_the_continuous_time_program():
    built = build(CONTINUOUS_2D)
    assert isinstance(built.model, ContinuousDiffusionModel)
    assert isinstance(built.schedule, LearnedSchedule)
    assert built.model.schedule is built.guide.schedule is built.schedule
    discrete = build(CONTINUOUS_2D.with_changes({"model": {"time": "discrete"}}))
    assert discrete.model.noise_level == NoiseLevelInput()  # a log-SNR schedule: the network is told the noise level
    fixed = build(
        CONTINUOUS_2D.with_changes({"schedule": {"kind": "linear", "num_steps": 20}, "model": {"time": "discrete"}})
    )
    assert fixed.model.noise_level is None


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"schedule": {"kind": "linear", "num_steps": 20}}, "model.time.*'learned' or 'linear_log_snr'"),
        ({"training": {"objective": "simple"}}, "training.objective.*objective = 'elbo'"),
        ({"training": {"timestep_sampler": "importance"}}, "timestep_sampler = 'uniform'"),
        ({"model": {"prediction": "x0"}}, "model.time.*predicts epsilon"),
        ({"model": {"variance": "learned"}}, "model.time.*'small' variance"),
        ({"model": {"time": "discrete", "interior": "variance"}}, "model.interior.*time = 'continuous'"),
        ({"model": {"time": "forever"}}, "model.time"),
        ({"model": {"interior": "mean"}}, "model.interior"),
        ({"training": {"seconds": 0}}, "training.seconds"),
        ({"training": {"seconds": "forever"}}, "training.seconds"),
        ({"schedule": {"gamma_min": 5.0, "gamma_max": 4.0}}, r"\[schedule\].*gamma_max = 4.0 must exceed gamma_min"),
    ],
)
def test_bad_combinations_are_refused_when_the_specification_is_read(changes, match):
    d = CONTINUOUS_2D.to_dict()
    for table, values in changes.items():
        d[table] = values if "kind" in values else {**d[table], **values}
    with pytest.raises(SpecError, match=match):
        Spec.from_dict(d)


def test_the_continuous_time_run_trains_schedule_and_network_and_resumes_exactly(tmp_path):
    full = train(CONTINUOUS_2D, tmp_path / "full", progress=False, num_samples=8)
    state = load_checkpoint(full.checkpoint)
    start = LearnedSchedule(20, -6.0, 4.0, hidden=8).state_dict()
    assert any(not torch.equal(state["schedule"][k], start[k]) for k in start)  # the schedule was trained
    train(CONTINUOUS_2D, tmp_path / "split", steps=4, progress=False, num_samples=8)
    resumed = train(CONTINUOUS_2D, tmp_path / "split", resume=True, progress=False, num_samples=8)
    assert _same_run(full.checkpoint, resumed.checkpoint)
    assert full.test_bound["time"] == "continuous"
    assert resumed.test_bound["total_nats"] == full.test_bound["total_nats"]


def test_the_end_of_training_bound_is_the_continuous_bound_of_the_averaged_model(tmp_path):
    done = train(CONTINUOUS_2D, tmp_path / "run", progress=False, num_samples=8)
    built, model = load_trained(done.checkpoint)
    test = built.data.test[:32]
    generator = torch.Generator().manual_seed(CONTINUOUS_2D.training.seed)
    again = continuous_bound(model, test, train_module.CONTINUOUS_DRAWS, generator=generator)
    assert done.test_bound["total_nats"] == pytest.approx(float(again.total.mean()), rel=1e-6)
    assert done.test_bound["num_samples"] == train_module.CONTINUOUS_DRAWS


def test_a_time_budget_stops_training_saves_and_evaluates(tmp_path, monkeypatch):
    """A fake clock that advances 1 s per read: a 3.5 s budget stops after a few steps (of 1000), whose checkpoint and
    bound are written; the run resumes from there."""
    clock = iter(range(10**6))
    monkeypatch.setattr(train_module.time, "time", lambda: float(next(clock)))
    spec = CONTINUOUS_2D.with_changes({"training": {"steps": 1000, "seconds": 3.5}})
    done = train(spec, tmp_path / "run", progress=False, num_samples=4)
    state = load_checkpoint(done.checkpoint)
    assert 1 <= done.steps < 10 and state["step"] == done.steps
    assert done.test_bound["training_steps"] == done.steps
    assert len(state["losses"]) == done.steps


def test_a_time_budget_is_refused_under_torchrun():
    world = train_module.World(rank=0, size=2, device=torch.device("cpu"))
    spec = CONTINUOUS_2D.with_changes({"training": {"seconds": 10.0}})
    with pytest.raises(ValueError, match="time budget under torchrun"):
        train_module._Run(spec, world, None, None)


def test_the_report_of_a_continuous_time_checkpoint(tmp_path):
    """Its own bound (with standard errors, recomputed here with the same seed), the per-step table of its chain at
    T, and the learned schedule recorded and plotted."""
    done = train(CONTINUOUS_2D, tmp_path / "run", progress=False, num_samples=8)
    summary, out = report_checkpoint(done.checkpoint, tmp_path / "report", max_examples=24, seed=3)
    built, model = load_trained(done.checkpoint)
    test = built.data.test[:24]
    again = continuous_bound(model, test, 100, generator=torch.Generator().manual_seed(3))
    c = summary["continuous_bound"]
    assert c["total_nats"] == pytest.approx(float(again.total.mean()), rel=1e-6)
    assert c["total_stderr"] == pytest.approx(again.total_stderr(), rel=1e-6)
    assert summary["num_steps"] == 20  # the discretised chain's per-step table
    gamma = torch.tensor(summary["schedule_curve"]["gamma"], dtype=torch.float64)
    assert gamma[0].item() == pytest.approx(float(model.schedule.gamma_0.detach()), abs=1e-12)
    assert torch.all(gamma[1:] > gamma[:-1])
    assert (out / "schedule.png").stat().st_size > 1000
    text = (out / "summary.md").read_text()
    assert f"{c['total_nats']:.4f} +- {c['total_stderr']:.4f} nats" in text
    assert f"SNR_max = {math.exp(-gamma[0].item()):.4g}" in text
    assert json.loads((out / "bound.json").read_text())["continuous_bound"] == c
