"""Checkpoints: loading never runs code from the file, saving flushes the folder, stale temporaries go."""

import os
import stat
import tempfile

import pytest
import torch
from test_train import TINY_2D

from pyrodiff.training import checkpoint as checkpoint_module
from pyrodiff.training.checkpoint import CheckpointError, load_checkpoint, remove_stale_temporaries, save_checkpoint
from pyrodiff.training.loop import train

TINY = TINY_2D.with_changes({"training": {"steps": 2, "batch_size": 8, "timestep_sampler": "importance"}})


class _RunsCode:
    """Pickles as a call to ``os.system``: unpickling it runs the shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _minimal_state() -> dict:
    return {"spec": {}, "step": 0, "network": {}, "ema": {}, "optimizer": {}}


def test_a_real_checkpoint_loads_with_every_entry(tmp_path):
    train(TINY, tmp_path, progress=False, num_samples=4)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 2 and len(state["losses"]) == 2 and state["world_size"] == 1
    assert isinstance(state["data_rng"], torch.ByteTensor)
    assert isinstance(state["noise_rng"][0][0], torch.Tensor)
    assert set(state["timestep_sampler"]) == {"values", "counts"}
    assert state["optimizer"]["state"] and "base_lrs" in state["scheduler"]


@pytest.mark.parametrize("step", [-5, 2.5, "3", True])
def test_a_checkpoint_whose_step_is_not_a_count_is_refused(tmp_path, step):
    """A step that no training reaches (negative, not an integer) is refused when the checkpoint is read."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {**_minimal_state(), "step": step})
    with pytest.raises(CheckpointError, match=f"{path}: step must be an integer >= 0, got {step!r}"):
        load_checkpoint(path)


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": checkpoint_module.FORMAT, **_minimal_state(), "hook": _RunsCode(f"touch '{marker}'")}, path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    assert not marker.exists()
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    assert "objects other than tensors and plain data" in message and "system" in message
    assert "could run code" in message
    torch.load(path, weights_only=False)  # the payload is live: an unrestricted load runs it
    assert marker.exists()


def test_a_damaged_pickle_stream_is_refused_as_corrupt(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"\x80\x02" + bytes(range(150, 250)))
    with pytest.raises(CheckpointError, match="is corrupt, or holds objects other than tensors"):
        load_checkpoint(path)


def test_save_flushes_the_folder_after_the_rename(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        fsync(fd)

    def recording_replace(src, dst):
        events.append("rename")
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    save_checkpoint(tmp_path / "checkpoint.pt", _minimal_state())
    assert events == ["fsync file", "rename", "fsync folder"]
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 0
    assert list(tmp_path.iterdir()) == [tmp_path / "checkpoint.pt"]


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    save_checkpoint(tmp_path / "checkpoint.pt", _minimal_state())
    stale = []
    for _ in range(2):  # named exactly as an interrupted save_checkpoint leaves them
        fd, name = tempfile.mkstemp(prefix="checkpoint.pt.", suffix=".tmp", dir=tmp_path)
        os.close(fd)
        stale.append(tmp_path / os.path.basename(name))
    kept = ["checkpoint.pt", "other.tmp", "checkpoint.pt.tmp", "checkpoint.pt.abc", "losses.csv", "model.pt.x1y2.tmp"]
    for name in kept[1:]:
        (tmp_path / name).write_text("keep")
    (tmp_path / "checkpoint.pt.folder.tmp").mkdir()
    assert remove_stale_temporaries(tmp_path) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "checkpoint.pt.folder.tmp"])
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 0
    assert remove_stale_temporaries(tmp_path) == []
    assert remove_stale_temporaries(tmp_path, "model.pt") == [tmp_path / "model.pt.x1y2.tmp"]
    assert remove_stale_temporaries(tmp_path / "absent") == []
