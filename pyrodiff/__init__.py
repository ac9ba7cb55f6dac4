"""pyrodiff: denoising diffusion probabilistic models as Pyro programs.

The forward chain is a parameterless guide (:class:`DiffusionGuide`), the reverse chain a model
(:class:`DiffusionModel`); ``pyro.infer.SVI`` with ``Trace_ELBO`` optimises the diffusion model's
evidence lower bound as a hierarchical VAE with a fixed encoder.  ``docs/MATH.md`` has the notation,
``docs/API.md`` the public interface.
"""

from . import adapters
from .chain import kl as _kl  # noqa: F401  (registers the KL divergences of the chains)
from .chain import samplers
from .chain.decoders import DiscretizedGaussian
from .chain.forward import DiffusionGuide
from .chain.importance import ImportanceSampler
from .chain.objectives import objective_weights, reweight
from .chain.reverse import DiffusionModel, GaussianStep
from .chain.schedule import NoiseSchedule, Schedule
from .data import Dataset, load_dataset
from .evaluation.bound import BoundTerms, bound_terms
from .evaluation.likelihood import LikelihoodBound, log_likelihood_bound
from .evaluation.report import write_report
from .networks import MLPDenoiser, UNet
from .theory.empirical import EmpiricalReverse
from .training.loop import train
from .training.spec import load_spec
from .training.trained import load_trained, report_checkpoint

__all__ = [
    "BoundTerms",
    "Dataset",
    "DiffusionGuide",
    "DiffusionModel",
    "DiscretizedGaussian",
    "EmpiricalReverse",
    "GaussianStep",
    "ImportanceSampler",
    "LikelihoodBound",
    "MLPDenoiser",
    "NoiseSchedule",
    "Schedule",
    "UNet",
    "adapters",
    "bound_terms",
    "load_dataset",
    "load_spec",
    "load_trained",
    "log_likelihood_bound",
    "objective_weights",
    "report_checkpoint",
    "reweight",
    "samplers",
    "train",
    "write_report",
]
__version__ = "0.1.0"
