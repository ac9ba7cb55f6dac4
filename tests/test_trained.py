"""A trained model from a checkpoint (pyrodiff/training/trained.py): ``load_trained`` rebuilds the specification's
objects with the EMA weights, bit for bit; ``report_checkpoint`` scores that model."""

import json

import numpy as np
import pytest
import torch
from test_train import TINY_2D

from pyrodiff.chain.decoders import GaussianDecoder
from pyrodiff.training.checkpoint import CheckpointError, save_checkpoint
from pyrodiff.training.ema import ExponentialMovingAverage
from pyrodiff.training.spec import SpecError, build
from pyrodiff.training.trained import load_trained


def _checkpoint(path, spec=TINY_2D, steps=3):
    """A checkpoint written as training writes one: the specification, the network after ``steps`` random moves
    and the EMA of those weights (decay 0.5, so that the average differs visibly from the last weights)."""
    torch.manual_seed(0)
    network = build(spec).model.network
    ema = ExponentialMovingAverage(network, 0.5)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        with torch.no_grad():
            for p in network.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        ema.update(network)
    save_checkpoint(
        path,
        {
            "spec": spec.to_dict(),
            "step": steps,
            "network": network.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": {},
        },
    )
    return network, ema


def test_load_trained_rebuilds_the_specification_with_the_ema_weights(tmp_path):
    network, ema = _checkpoint(tmp_path / "checkpoint.pt")
    built, model = load_trained(tmp_path / "checkpoint.pt")
    assert built.spec == TINY_2D
    assert torch.equal(built.schedule.betas, torch.linspace(1e-3, 0.3, 20, dtype=torch.float64))
    assert model.schedule is built.schedule and built.guide.schedule is built.schedule
    assert model.describe() == {
        "prediction": "epsilon",
        "variance": "small",
        "decoder": "gaussian",
        "levels": None,
        "schedule": {"kind": "linear", "num_steps": 20, "beta_start": 1e-3, "beta_end": 0.3},
    }
    assert isinstance(model.decoder, GaussianDecoder) and model.data_shape == (2,)
    assert torch.equal(built.data.train, build(TINY_2D).data.train)
    loaded = model.network.state_dict()
    averaged = ema.module.state_dict()
    assert loaded.keys() == averaged.keys() == network.state_dict().keys()
    assert all(torch.equal(loaded[k], averaged[k]) for k in loaded)
    assert not all(torch.equal(loaded[k], network.state_dict()[k]) for k in loaded)  # the average, not the last weights
    assert not model.training and not model.network.training
    assert all(p.device.type == "cpu" for p in model.network.parameters())


def test_load_trained_rebuilds_a_network_with_fourier_features(tmp_path):
    """The exponents are part of the specification a checkpoint holds: the loaded network has them, the EMA weights
    and the outputs of the averaged network."""
    spec = TINY_2D.with_changes({"network": {"fourier_exponents": [1, 5]}})
    _, ema = _checkpoint(tmp_path / "checkpoint.pt", spec)
    built, model = load_trained(tmp_path / "checkpoint.pt")
    assert built.spec == spec and model.network.fourier_exponents == (1, 5) and model.network.inp.in_features == 10
    x, t = torch.randn(4, 2, generator=torch.Generator().manual_seed(2)), torch.tensor([1, 5, 10, 20])
    with torch.no_grad():
        assert torch.equal(model.network(x, t), ema.module.eval()(x, t))


def test_a_checkpoint_that_does_not_fit_its_specification_is_refused_naming_it(tmp_path):
    _checkpoint(tmp_path / "wide.pt", TINY_2D.with_changes({"network": {"hidden": 24}}))
    state = torch.load(tmp_path / "wide.pt", weights_only=True)
    state["spec"] = TINY_2D.to_dict()  # the weights of a wider network under the tiny specification
    save_checkpoint(tmp_path / "mismatch.pt", {k: v for k, v in state.items() if k != "format"})
    with pytest.raises(CheckpointError, match=r"mismatch\.pt does not fit its specification's network"):
        load_trained(tmp_path / "mismatch.pt")
    state["spec"] = {**TINY_2D.to_dict(), "schedule": {"kind": "linear", "num_steps": 0}}
    save_checkpoint(tmp_path / "bad-spec.pt", {k: v for k, v in state.items() if k != "format"})
    with pytest.raises(SpecError, match=r"^checkpoint .*bad-spec\.pt: "):
        load_trained(tmp_path / "bad-spec.pt")


def test_report_checkpoint_decomposes_the_ema_model_on_the_split(tmp_path):
    """``pyrodiff report`` end to end: the written bound is the decomposition of the checkpoint's EMA model
    on the first examples of the split, with the model's choices and the split recorded; its draws come from a
    generator seeded with ``seed`` (the same report for the same seed, another for another) and torch's global
    random state is left as it was, the analytic variances' draws included."""
    from pyrodiff.evaluation.bound import bound_terms
    from pyrodiff.training.loop import train
    from pyrodiff.training.spec import Spec
    from pyrodiff.training.trained import load_trained, report_checkpoint

    spec = Spec.from_dict(
        {
            "name": "tiny",
            "data": {"name": "gaussians8"},
            "schedule": {"kind": "cosine", "num_steps": 10},
            "model": {"prediction": "v", "variance": "large", "decoder": "gaussian"},
            "network": {"kind": "mlp", "hidden": 8, "depth": 1},
            "training": {"steps": 3, "batch_size": 8, "eval_examples": 8},
        }
    )
    result = train(spec, tmp_path / "run", progress=False, num_samples=4)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    summary, folder = report_checkpoint(result.checkpoint, split="train", num_samples=2, max_examples=6)
    assert torch.equal(torch.get_rng_state(), before)
    assert folder == tmp_path / "run" / "report-train"
    assert json.loads((folder / "bound.json").read_text()) == json.loads(json.dumps(summary))
    built, model = load_trained(result.checkpoint)
    terms = bound_terms(model, built.data.train[:6], num_samples=2, generator=torch.Generator().manual_seed(0))
    assert summary["total_nats"] == pytest.approx(terms.total.mean().item(), rel=1e-6)
    assert np.allclose(summary["terms_nats"], terms.mean().numpy(), rtol=1e-5, atol=1e-7)
    assert summary["num_examples"] == 6 and summary["num_samples"] == 2 and summary["split"] == "train"
    assert summary["model"]["prediction"] == "v" and summary["model"]["variance"] == "large"
    assert summary["model"]["schedule"] == {"kind": "cosine", "num_steps": 10, "s": 0.008, "max_beta": 0.999}
    assert "kl_bound_nats" in summary  # gaussians8's density is known
    assert summary["name"] == "tiny" and summary["checkpoint"] == str(result.checkpoint)
    assert summary["seed"] == 0
    analytic = [
        report_checkpoint(result.checkpoint, tmp_path / f"a{i}", num_samples=2, variance="analytic", seed=seed)[0]
        for i, seed in enumerate((3, 3, 4))
    ]
    assert torch.equal(torch.get_rng_state(), before)
    assert analytic[0]["terms_nats"] == analytic[1]["terms_nats"] != analytic[2]["terms_nats"]


class _Caught(Exception):
    """Raised by a stand-in to stop a function where it hands over a value."""


def test_report_checkpoint_replaces_only_the_variance(tmp_path, monkeypatch):
    """``report_checkpoint(variance="small")`` scores the checkpoint's model with that variance and every other part
    kept, the inference family included: a DDIM model stays DDIM (the model is caught where it would be scored)."""
    from types import SimpleNamespace

    from pyrodiff import DiffusionModel, NoiseSchedule
    from pyrodiff.testing import LinearDenoiser
    from pyrodiff.training import trained

    schedule = NoiseSchedule.linear(10, 0.01, 0.2)
    loaded = DiffusionModel(LinearDenoiser(10), schedule, "x0", "large", data_shape=(2,)).ddim(0.5)
    data = torch.zeros(4, 2)
    built = SimpleNamespace(data=SimpleNamespace(train=data, test=data, log_density=None), spec=SimpleNamespace())
    monkeypatch.setattr(trained, "_load_trained", lambda *args: (built, loaded, 0))
    scored = []

    def caught(model, *args, **kwargs):
        scored.append(model)
        raise _Caught

    monkeypatch.setattr(trained, "bound_terms", caught)
    with pytest.raises(_Caught):
        trained.report_checkpoint("checkpoint.pt", tmp_path / "report", variance="small")
    (model,) = scored
    assert model.family == loaded.family and not model.family.is_markov and model.variance.name == "small"
    assert (model.network, model.schedule, model.prediction, model.decoder, model.data_shape) == (
        loaded.network,
        schedule,
        loaded.prediction,
        loaded.decoder,
        (2,),
    )
