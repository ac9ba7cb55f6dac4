"""Stage 3 (beside training), adapters: models trained elsewhere (diffusers, improved-diffusion,
denoising-diffusion-pytorch) as pyrodiff chains, so that the bound and the report apply to them.
Imports only the chain (and stage 0).
"""

from .external import (
    PREDICTION_TYPES,
    SAMPLER_OPTIONS,
    VARIANCE_TYPES,
    SchedulerSource,
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
    "SchedulerSource",
    "PREDICTION_TYPES",
    "VARIANCE_TYPES",
    "SAMPLER_OPTIONS",
    "scheduler_config",
    "schedule_from_config",
    "sampler_options",
    "model_from_diffusers",
    "load_diffusers",
    "load_network",
    "recorded_num_steps",
]
