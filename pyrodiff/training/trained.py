"""A trained model from a checkpoint: the specification's objects with the EMA weights.

Reading a checkpoint comes before everything that uses a trained model (the report, sampling, the
analysis scripts) and after the specification and the checkpoint format it rests on.
"""

from __future__ import annotations

from pathlib import Path

from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..chain.reverse import DiffusionModel
from .checkpoint import CheckpointError, load_checkpoint
from .spec import Built, Spec, build

__all__ = ["load_trained"]


def load_trained(
    checkpoint_path: str | Path, device: str = "cpu", data_root: str | Path | None = None
) -> tuple[Built, DiffusionModel]:
    """The specification's objects and the EMA-weighted model of a checkpoint, in evaluation mode.  The
    checkpoint's specification is validated as a file's is (:meth:`~pyrodiff.training.spec.Spec.from_dict`)."""
    state = load_checkpoint(checkpoint_path, map_location=device)
    spec = Spec.from_dict(state["spec"], f"checkpoint {checkpoint_path}")
    built = build(spec, data_root)
    decay = get_ema_multi_avg_fn(spec.training.ema_decay)
    ema = AveragedModel(built.model.network, multi_avg_fn=decay, use_buffers=True)
    try:
        ema.load_state_dict(state["ema"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {checkpoint_path} does not fit its specification's network: {e}") from e
    return built, built.model.with_network(ema.module).to(device).eval()
