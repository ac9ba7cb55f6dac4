"""Stage 3 (beside training), adapters: models trained elsewhere (diffusers, improved-diffusion,
denoising-diffusion-pytorch) as pyrodiff chains, so that the bound and the report apply to them.
Imports only the chain (and stage 0).
"""

from .external import (
    PREDICTION_TYPES,
    VARIANCE_TYPES,
    ZeroIndexedNetwork,
    load_diffusers,
    load_network,
    model_from_diffusers,
    recorded_num_steps,
    sampler_options,
    schedule_from_config,
    scheduler_config,
)

__all__ = [
    "ZeroIndexedNetwork",
    "model_from_diffusers",
    "schedule_from_config",
    "scheduler_config",
    "sampler_options",
    "PREDICTION_TYPES",
    "VARIANCE_TYPES",
    "load_diffusers",
    "load_network",
    "recorded_num_steps",
]
