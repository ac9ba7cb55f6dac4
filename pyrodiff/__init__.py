"""pyrodiff: denoising diffusion probabilistic models as Pyro programs.

The forward chain is a parameterless guide (:class:`DiffusionGuide`), the reverse chain a model
(:class:`DiffusionModel`); ``pyro.infer.SVI`` with ``Trace_ELBO`` optimises the diffusion model's
evidence lower bound as a hierarchical VAE with a fixed encoder.  ``docs/MATH.md`` has the notation,
``docs/API.md`` the public interface.
"""

from importlib import import_module
from importlib.util import find_spec

__version__ = "0.1.0"

#: Each public name and the module that defines it (or that is it: ``adapters``, ``samplers``).  They are imported on
#: first use, so that ``import pyrodiff`` is instant and the ``pyrodiff`` command reads its arguments (and
#: answers an argument error, ``--version``, or Ctrl-C) before torch and Pyro load.
_EXPORTS = {
    "BoundTerms": "evaluation.bound",
    "ContinuousBound": "evaluation.continuous",
    "ContinuousDiffusionModel": "chain.continuous",
    "ContinuousGuide": "chain.continuous",
    "LearnedSchedule": "chain.log_snr",
    "LinearLogSNR": "chain.log_snr",
    "NoiseLevelInput": "chain.log_snr",
    "Dataset": "data",
    "DiffusionGuide": "chain.forward",
    "DiffusionModel": "chain.reverse",
    "DiscretizedGaussian": "chain.decoders",
    "EmpiricalReverse": "theory.empirical",
    "GaussianStep": "chain.reverse",
    "ImportanceSampler": "chain.importance",
    "LikelihoodBound": "evaluation.likelihood",
    "MLPDenoiser": "networks",
    "NoiseSchedule": "chain.schedule",
    "ODELikelihood": "evaluation.ode_likelihood",
    "ProbabilityFlow": "chain.probability_flow",
    "Schedule": "chain.schedule",
    "UNet": "networks",
    "adapters": "adapters",
    "bound_terms": "evaluation.bound",
    "continuous_bound": "evaluation.continuous",
    "load_dataset": "data",
    "load_spec": "training.spec",
    "load_trained": "training.trained",
    "log_likelihood_bound": "evaluation.likelihood",
    "objective_weights": "chain.objectives",
    "ode_log_likelihood": "evaluation.ode_likelihood",
    "report_checkpoint": "training.trained",
    "reweight": "chain.objectives",
    "samplers": "chain.samplers",
    "train": "training.loop",
    "write_report": "evaluation.report",
}
__all__ = sorted(_EXPORTS)
#: the public names that are modules themselves (every other name is an object of its module, even one named as its
#: module could be)
_MODULE_EXPORTS = frozenset({"adapters", "samplers"})


def __getattr__(name: str) -> object:
    """A public name (imported from its module on first use), or a subpackage such as ``pyrodiff.chain``."""
    if name in _EXPORTS:
        module = import_module(f".{_EXPORTS[name]}", __name__)
        value = module if name in _MODULE_EXPORTS else getattr(module, name)
    elif not name.startswith("_") and find_spec(f"{__name__}.{name}") is not None:
        value = import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
