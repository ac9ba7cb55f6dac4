"""The estimator without host reads (:func:`~pyrodiff.training.graphed.elbo_on_device`) leaves Pyro as it is: its
modules' helpers stay Pyro's own, in a training step as outside it, so every other ELBO in the process (in any
thread) keeps its reads and NaN checks; its loss and gradient are Pyro's.  That it reads nothing on the host is
tests/test_host_sync.py's."""

import warnings

import pyro.infer.trace_elbo
import pyro.infer.trace_mean_field_elbo
import pyro.infer.util
import pyro.util
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from test_train import TINY_2D, TINY_DIGITS

from pyrodiff.chain.forward import DiffusionGuide
from pyrodiff.chain.objectives import parse_estimator
from pyrodiff.training.graphed import elbo_on_device
from pyrodiff.training.loop import train
from pyrodiff.training.spec import build


def _pyros_own() -> bool:
    """Whether Pyro's ELBO modules hold Pyro's own ``torch_item`` and ``warn_if_nan``."""
    modules = (pyro.infer.trace_elbo, pyro.infer.trace_mean_field_elbo)
    return all(m.torch_item is pyro.infer.util.torch_item and m.warn_if_nan is pyro.util.warn_if_nan for m in modules)


def test_pyros_helpers_stay_its_own_during_a_training_step(tmp_path, monkeypatch):
    """Seen from inside the guide, that is while the training step computes its loss, Pyro's modules are unchanged."""
    seen = []
    original = DiffusionGuide.__call__

    def guide(self, *args, **kwargs):
        seen.append(_pyros_own())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionGuide, "__call__", guide)
    train(TINY_2D, tmp_path / "run", steps=2, progress=False, num_samples=4)
    assert len(seen) >= 2 and all(seen)


@pytest.mark.parametrize("estimator", [Trace_ELBO, TraceMeanField_ELBO])
def test_elbo_on_device_is_a_copy_of_a_subclass_and_changes_nothing_of_pyros(estimator):
    elbo = estimator(num_particles=3, max_plate_nesting=2)
    fast = elbo_on_device(elbo)
    assert isinstance(fast, estimator) and type(fast) is not estimator and type(elbo) is estimator
    assert (fast.num_particles, fast.max_plate_nesting) == (3, 2)
    assert _pyros_own()
    # Pyro's own methods' code with the two helpers rebound: the copy skips the NaN check, Pyro's ELBO keeps it
    assert fast.differentiable_loss.__code__ is estimator.differentiable_loss.__code__

    def model():
        pyro.sample("x", pyro.distributions.Normal(torch.tensor(float("nan")), 1.0), obs=torch.tensor(0.0))

    with pyro.validation_enabled(False):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.isnan(fast.differentiable_loss(model, lambda: None))
        with pytest.warns(UserWarning, match="Encountered NaN"):
            elbo.differentiable_loss(model, lambda: None)


def test_elbo_on_device_refuses_what_is_not_an_elbo():
    with pytest.raises(TypeError, match="needs a Pyro ELBO instance, got function"):
        elbo_on_device(lambda: None)


def _loss_and_grads(estimator: str, on_device: bool):
    """Loss and gradients of one step of the digits program (two timesteps per example) on fixed draws, with Pyro's
    estimator or its copy on the device."""
    torch.manual_seed(0)
    built = build(TINY_DIGITS.with_changes({"training": {"estimator": estimator}}))
    built.model.register_with_pyro = False
    elbo = parse_estimator(estimator)()
    loss_module = (elbo_on_device(elbo) if on_device else elbo)(built.model, built.guide)
    pyro.set_rng_seed(5)
    with pyro.validation_enabled(False):  # as in the training loop
        loss = loss_module(built.data.train[:6], 2)
        loss.backward()
    return loss.detach(), [p.grad for p in built.model.network.parameters()]


@pytest.mark.parametrize("estimator", ["mean_field", "trace"])
def test_the_elbo_on_the_device_is_pyros_loss_with_pyros_gradient(estimator):
    loss, grads = _loss_and_grads(estimator, on_device=False)
    fast_loss, fast_grads = _loss_and_grads(estimator, on_device=True)
    if estimator == "mean_field":
        assert torch.equal(fast_loss, loss)
    else:  # Pyro sums Trace_ELBO's site log-densities as Python floats (float64), the device in float32
        torch.testing.assert_close(fast_loss, loss, rtol=1e-6, atol=0)
    assert all(g is not None for g in grads)
    assert all(torch.equal(a, b) for a, b in zip(fast_grads, grads, strict=True))
