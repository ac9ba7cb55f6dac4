"""Checkpoints: written atomically, checked when read.

A checkpoint is a ``torch.save`` dictionary with the specification, the network, its exponential
moving average, the optimiser, the step and every random-number state needed to continue exactly.
It is written to a temporary file in the same folder, flushed to disk and renamed over the old one,
so a crash never leaves a half-written checkpoint and the previous one survives until the new one
is complete.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "FORMAT"]

FORMAT = "pyrodiff-checkpoint-1"
_KEYS = ("format", "spec", "step", "network", "ema", "optimizer")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or that belongs to another specification."""


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | Path, spec: dict | None = None, map_location="cpu") -> dict:
    """Read a checkpoint; refuse a corrupt one, or one made with a specification other than ``spec``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many types for a damaged file
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT or any(k not in state for k in _KEYS):
        raise CheckpointError(f"{path} is not a pyrodiff checkpoint (format {FORMAT})")
    if spec is not None:
        ours, theirs = _comparable(spec), _comparable(state["spec"])
        if ours != theirs:
            diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            raise CheckpointError(f"checkpoint {path} was made with another specification (differs in {diff})")
    return state


def _comparable(spec: dict) -> dict:
    """The parts of a specification that must match to resume (the training length may change)."""
    training = {
        k: v for k, v in spec.get("training", {}).items() if k not in ("steps", "checkpoint_every", "eval_examples")
    }
    return {**{k: spec.get(k) for k in ("data", "schedule", "model", "network")}, "training": training}
