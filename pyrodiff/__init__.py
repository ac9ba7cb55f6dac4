"""pyrodiff: denoising diffusion probabilistic models as Pyro programs.

The forward chain is a parameterless guide (:class:`DiffusionGuide`), the reverse chain a model
(:class:`DiffusionModel`); ``pyro.infer.SVI`` with ``Trace_ELBO`` optimises the diffusion model's
evidence lower bound as a hierarchical VAE with a fixed encoder.  See ``MATH.md`` for the notation.
"""

from .bound import BoundTerms, bound_terms, trace_terms
from .decoders import DiscretizedGaussian
from .forward import DiffusionGuide, ForwardChain, PosteriorChain
from .networks import MLPDenoiser, UNet
from .objectives import objective_weights, reweight
from .reverse import DiffusionModel, ReverseChain
from .schedule import NoiseSchedule
from .subsample import ImportanceSampler

__all__ = [
    "BoundTerms",
    "DiffusionGuide",
    "DiffusionModel",
    "DiscretizedGaussian",
    "ForwardChain",
    "ImportanceSampler",
    "MLPDenoiser",
    "NoiseSchedule",
    "PosteriorChain",
    "ReverseChain",
    "UNet",
    "bound_terms",
    "objective_weights",
    "reweight",
    "trace_terms",
]
__version__ = "0.1.0"
