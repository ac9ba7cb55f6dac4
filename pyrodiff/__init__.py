"""pyrodiff: denoising diffusion probabilistic models as Pyro programs.

The forward chain is a parameterless guide (:class:`DiffusionGuide`), the reverse chain a model
(:class:`DiffusionModel`); ``pyro.infer.SVI`` with ``Trace_ELBO`` optimises the diffusion model's
evidence lower bound as a hierarchical VAE with a fixed encoder.  ``docs/MATH.md`` has the notation,
``docs/API.md`` the public interface.
"""

from . import adapters, samplers
from . import kl as _kl  # noqa: F401  (registers the KL divergences of the chains)
from .bound import BoundTerms, bound_terms
from .data import Dataset, load_dataset
from .decoders import DiscretizedGaussian
from .empirical import EmpiricalReverse
from .forward import DiffusionGuide
from .importance import ImportanceSampler
from .likelihood import LikelihoodBound, log_likelihood_bound
from .networks import MLPDenoiser, UNet
from .objectives import objective_weights, reweight
from .report import report_checkpoint, write_report
from .reverse import DiffusionModel, Prediction
from .schedule import NoiseSchedule
from .spec import load_spec
from .trained import load_trained
from .training import train

__all__ = [
    "BoundTerms",
    "Dataset",
    "DiffusionGuide",
    "DiffusionModel",
    "DiscretizedGaussian",
    "EmpiricalReverse",
    "ImportanceSampler",
    "LikelihoodBound",
    "MLPDenoiser",
    "NoiseSchedule",
    "Prediction",
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
