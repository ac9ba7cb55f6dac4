"""The estimator without host reads (:func:`~pyrodiff.training.graphed.elbo_on_device`) leaves Pyro as it is: its
modules' helpers stay Pyro's own, in a training step as outside it, so every other ELBO in the process (in any
thread) keeps its reads and NaN checks.  That its loss and gradient are Pyro's, with no host read, is
tests/test_host_sync.py's."""

import warnings

import pyro.infer.trace_elbo
import pyro.infer.trace_mean_field_elbo
import pyro.infer.util
import pyro.util
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from test_train import TINY_2D

from pyrodiff.chain.forward import DiffusionGuide
from pyrodiff.training.graphed import elbo_on_device
from pyrodiff.training.loop import train


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
