"""pyrodiff: denoising diffusion probabilistic models as Pyro programs.

The forward chain is a parameterless guide (:class:`DiffusionGuide`), the reverse chain a model
(:class:`DiffusionModel`); ``pyro.infer.SVI`` with ``Trace_ELBO`` optimises the diffusion model's
evidence lower bound as a hierarchical VAE with a fixed encoder.  See ``MATH.md`` for the notation.
"""

from .decoders import DiscretizedGaussian
from .forward import DiffusionGuide, ForwardChain, PosteriorChain
from .networks import MLPDenoiser, UNet
from .objectives import objective_weights, reweight
from .reverse import DiffusionModel, ReverseChain
from .schedule import NoiseSchedule

__all__ = [
    "DiffusionGuide",
    "DiffusionModel",
    "DiscretizedGaussian",
    "ForwardChain",
    "MLPDenoiser",
    "NoiseSchedule",
    "PosteriorChain",
    "ReverseChain",
    "UNet",
    "objective_weights",
    "reweight",
]
__version__ = "0.1.0"
