"""Stage 1, the chain: the two Markov chains of a diffusion model as Pyro programs, and what they are made of.

Schedules, the Gaussian closed forms, the forward chain (the guide), the reverse chain (the model), its
parameterisations and decoders, the KL registrations, timestep subsampling, objectives and the samplers.
Imports nothing from pyrodiff but the foundation modules (``pyrodiff.checks``, ``pyrodiff.cuda_graph``).
docs/MATH.md sections 1-9.
"""

from . import kl as _kl  # noqa: F401  (registers the KL divergences of the chains, wherever the chain is used)
