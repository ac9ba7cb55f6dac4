"""Checkpoints: written atomically, checked when read.

A checkpoint is a ``torch.save`` dictionary with the specification, the network, its exponential
moving average, the noise schedule's parameters and their average (``schedule`` and ``schedule_ema``, only for a
schedule that has parameters), the optimiser, the step and every random-number state needed to continue exactly.
It is written to a temporary file in the same folder, flushed to disk and renamed over the old one,
and the folder is flushed too, so a crash never leaves a half-written checkpoint and the previous one
survives until the new one is complete. A process killed mid-save can leave its temporary file
behind; :func:`remove_stale_temporaries` clears those.  The run's other results are written the same way
(:func:`write_atomically`), never through a link at their path, with the mode ``open`` gives (0666 less the umask).

A checkpoint is read with ``torch.load(..., weights_only=True)``: it holds only tensors and plain
data, and unpickling anything else could run code from the file, so such a file is refused.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import torch

from .. import checks

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError"]

FORMAT = "pyrodiff-checkpoint-1"
_KEYS = ("format", "spec", "step", "network", "ema", "optimizer")
#: How torch's weights-only unpickler names a global (a class or function) it refused to load.
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)")
_TEMPORARY_SUFFIX = ".tmp"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or that belongs to another specification."""


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (:func:`write_atomically`)."""
    write_atomically(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def write_atomically(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Write a file at ``path`` by ``write(file)``: into a new temporary file ``NAME.<random>.tmp`` beside it
    (created, never opened through a link, with the mode ``open`` gives, 0666 less the umask), flushed to disk and
    renamed over ``path``.  A rename replaces a link at ``path`` instead of writing where it points, so nothing is
    written outside the folder; a path that is a folder or a device is refused.  A failure leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_symlink() and not path.is_file():
        raise IsADirectoryError(f"{path} exists and is not a regular file: it was not replaced")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}{_TEMPORARY_SUFFIX}")
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries to disk, so that the rename survives a power cut, not only the data.

    Windows cannot open a folder this way, and some filesystems refuse to sync one; there the rename is
    left for the operating system to flush."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | Path, *names: str) -> list[Path]:
    """Delete the temporary files ``NAME.*.tmp`` (for each of ``names``, by default ``checkpoint.pt``) that a process
    killed mid-write left in ``folder``; return them.

    :func:`write_atomically` writes ``NAME.<random>.tmp`` beside ``NAME`` and renames it, so such a file outlives
    only an interrupted write. Call this when no other process is writing to ``folder`` (at the start of
    training), or it would delete that write's file before the rename."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    patterns = [
        re.compile(re.escape(name + ".") + ".+" + re.escape(_TEMPORARY_SUFFIX)) for name in names or ("checkpoint.pt",)
    ]
    stale = sorted(
        p for p in folder.iterdir() if any(pattern.fullmatch(p.name) for pattern in patterns) and p.is_file()
    )
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _is_specification(path: Path) -> bool:
    """Whether ``path`` holds TOML tables (a model specification) rather than torch's zip or pickle."""
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    try:
        return bool(tomllib.loads(head.decode("utf-8")))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read a checkpoint; refuse a corrupt one, and one holding anything but tensors and plain data
    (unpickling that could run code from the file).  Whether it may be resumed with a given specification
    is the training loop's question (:meth:`pyrodiff.training.spec.Spec.differences`)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # how torch's weights-only unpickler refuses a file
        refused = _REFUSED_GLOBAL.search(str(e))
        if refused is None and _is_specification(path):
            raise CheckpointError(
                f"{path} is a model specification (TOML), not a checkpoint: train it (pyrodiff train --config {path}) "
                f"and give the checkpoint.pt that training writes"
            ) from None
        if refused is None:
            raise CheckpointError(
                f"checkpoint {path} is corrupt, or holds objects other than tensors and plain data; "
                f"it was not loaded, because loading it could run code"
            ) from e
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain data ({refused[1]}); "
            f"it was not loaded, because loading it could run code"
        ) from e
    except Exception as e:  # torch raises many types for a damaged file
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT or any(k not in state for k in _KEYS):
        raise CheckpointError(f"{path} is not a pyrodiff checkpoint (format {FORMAT})")
    step = state["step"]
    if not checks.is_integer(step) or step < 0:
        raise CheckpointError(f"{path}: step must be an integer >= 0, got {step!r}")
    return state
