"""Two gloo processes under torchrun give the parameters of one process with the same global batch.

Rank r draws its noise from random stream r; one process with ``micro_batches = 2`` draws micro-batch
j's noise from stream j, so both runs see the same noise for the same examples (pyrodiff.training.distributed).
"""

import subprocess
import sys

import pytest
import torch

from pyrodiff import cli
from pyrodiff.testing import EndpointSchedule
from pyrodiff.training import spec as spec_module
from pyrodiff.training.checkpoint import load_checkpoint
from pyrodiff.training.distributed import World
from pyrodiff.training.loop import _Run, train
from pyrodiff.training.spec import load_spec

SPEC = """
[data]
name = "gaussians8"
[schedule]
{schedule}
[model]
decoder = "gaussian"
[network]
kind = "mlp"
hidden = 16
depth = 1
[training]
steps = 5
batch_size = 16
micro_batches = {micro}
eval_examples = 16
subsample_steps = 2
timestep_sampler = "importance"
"""


LINEAR = "num_steps = 20\nbeta_start = 0.001\nbeta_end = 0.3"
#: a schedule with parameters (registered for the test): DDP averages the network's gradients, the loop the schedule's
ENDPOINTS = 'kind = "endpoints"\nnum_steps = 20\nlog_snr_max = 6.0\nlog_snr_min = -6.0'
#: ``pyrodiff`` under torchrun with the test's schedule kind registered
RUNNER = """
import sys
from pyrodiff import cli
from pyrodiff.testing import EndpointSchedule
from pyrodiff.training import spec
spec.SCHEDULES["endpoints"] = EndpointSchedule
sys.exit(cli.main(sys.argv[1:]))
"""


def _spec(tmp_path, micro, schedule=LINEAR):
    path = tmp_path / f"spec{micro}.toml"
    path.write_text(SPEC.format(micro=micro, schedule=schedule))
    return str(path)


def test_two_gloo_processes_match_one_process(tmp_path, monkeypatch):
    """torchrun's two processes (the documented command, with a schedule that has parameters) against one process
    with two micro-batches, trained here in the test's own process (a third interpreter would only repeat the
    imports)."""
    monkeypatch.setitem(spec_module.SCHEDULES, "endpoints", EndpointSchedule)
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    env_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ddp = subprocess.run(
        env_cmd + [str(runner), "train", "--config", _spec(tmp_path, 1, ENDPOINTS), "--out", str(tmp_path / "ddp")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    train(load_spec(_spec(tmp_path, 2, ENDPOINTS)), tmp_path / "one", progress=False, num_samples=8)
    a, b = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt"), load_checkpoint(tmp_path / "one" / "checkpoint.pt")
    assert a["world_size"] == 2 and b["world_size"] == 1
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)
    for name, value in a["network"].items():
        assert torch.allclose(value, b["network"][name], rtol=1e-5, atol=1e-6), name
    for name, start in (("log_snr_max", 6.0), ("log_snr_min", -6.0)):  # its steps (small in the warm-up), compared
        moved, expected = a["schedule"][name] - start, b["schedule"][name] - start
        assert moved != 0 and torch.allclose(moved, expected, rtol=1e-6), name
    assert torch.equal(a["timestep_sampler"]["counts"], b["timestep_sampler"]["counts"])
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "ddp").iterdir())


def test_world_size_must_divide_the_batch(tmp_path, capsys):
    """16 examples cannot be cut into 3 micro-batches: the specification is refused when loaded (by the command, exit
    status 2); 16 cannot be cut between 3 processes either (known only when they start), which training refuses."""
    assert cli.main(["train", "--config", _spec(tmp_path, 3), "--out", str(tmp_path / "x")]) == 2
    assert "training.micro_batches: must divide batch_size = 16, got 3" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="batch size 16 must be divisible by world size x micro-batches = 3 x 1"):
        _Run(load_spec(_spec(tmp_path, 1)), World(0, 3), None, tmp_path / "checkpoint.pt")
