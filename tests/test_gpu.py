"""On a CUDA device: training (graphed by default), resume, sampling and the report; the graphed step equals the
eager step; the step never synchronises with the host.  Not run by CI: ``pytest -m gpu`` (skipped without CUDA)."""

import pyro
import pytest
import torch
from test_train import TINY_2D, TINY_DIGITS

from pyrodiff.cli import main
from pyrodiff.training import loop as train_module
from pyrodiff.training.checkpoint import load_checkpoint
from pyrodiff.training.distributed import World
from pyrodiff.training.loop import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

#: the digits program, long enough for the graph to be captured (three eager steps, then replays) before and
#: after the checkpoint a resume starts from
DIGITS = TINY_DIGITS.with_changes({"training": {"steps": 10, "batch_size": 8, "checkpoint_every": 5, "log_every": 5}})


def _close_runs(a, b):
    """Two checkpoints hold the same losses and EMA weights up to the order of CUDA's floating-point sums."""
    a, b = load_checkpoint(a), load_checkpoint(b)
    torch.testing.assert_close(torch.tensor(a["losses"]), torch.tensor(b["losses"]), rtol=1e-4, atol=1e-6)
    for k in a["ema"]:
        torch.testing.assert_close(a["ema"][k], b["ema"][k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("spec", [DIGITS, TINY_2D.with_changes({"training": {"timestep_sampler": "importance"}})])
def test_train_resume_sample_and_report_on_cuda(tmp_path, spec):
    full = train(spec, tmp_path / "full", device="cuda", progress=False, num_samples=4)
    steps = spec.training.checkpoint_every
    train(spec, tmp_path / "split", steps=steps, device="cuda", progress=False, num_samples=4)
    resumed = train(spec, tmp_path / "split", resume=True, device="cuda", progress=False, num_samples=4)
    _close_runs(full.checkpoint, resumed.checkpoint)
    checkpoint = str(full.checkpoint)
    assert main(["sample", checkpoint, "--num", "4", "--device", "cuda", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["report", checkpoint, "--max-examples", "8", "--device", "cuda", "--out", str(tmp_path / "r")]) == 0


def _run(spec, tmp_path, graph: bool) -> train_module._Run:
    spec = spec.with_changes({"training": {"graph": graph}})
    return train_module._Run(spec, World(device=torch.device("cuda")), None, tmp_path / "checkpoint.pt")


@pytest.mark.parametrize("options", [{}, {"timestep_sampler": "importance", "amp": "bf16"}])
def test_the_graphed_step_equals_the_eager_step(tmp_path, options):
    """Same weights, same batches, same random streams: the graphed run (3 eager steps, the capture, replays)
    gives the eager run's losses, gradients and weights."""
    spec = DIGITS.with_changes({"training": options})
    graphed, eager = _run(spec, tmp_path / "g", graph=True), _run(spec, tmp_path / "e", graph=False)
    assert graphed.graphed and not eager.graphed
    with pyro.validation_enabled(False):
        for _ in range(6):
            batch = graphed._next_batch()
            assert torch.equal(batch, eager._next_batch())
            graphed.train_step(batch), eager.train_step(batch)
    assert graphed.graph.captured
    torch.testing.assert_close(torch.stack(graphed.pending), torch.stack(eager.pending), rtol=1e-5, atol=1e-6)
    for a, b in zip(graphed.network.parameters(), eager.network.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(graphed.ema.state_dict().values(), eager.ema.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("graph", [True, False])
def test_the_step_does_not_synchronise_with_the_host(tmp_path, graph):
    """CUDA's sync-debug mode raises at any synchronising call (a read of a value, a copy from pageable memory)
    made by the steps after the first (which copies the objective's weights and makes the graph)."""
    run = _run(DIGITS.with_changes({"training": {"timestep_sampler": "importance"}}), tmp_path, graph)
    with pyro.validation_enabled(False):
        for _ in range(4):  # the eager warm-up and the capture (which synchronises once, by design)
            run.train_step(run._next_batch())
        batches = [run._next_batch() for _ in range(3)]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for batch in batches:
                run.train_step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(torch.stack(run.pending)).all()


@pytest.mark.parametrize("sampler, options", [("ancestral", {"clip": True}), ("ddim", {"eta": 0.5}), ("ddim", {})])
def test_the_graphed_sampler_equals_the_eager_one(sampler, options):
    """samplers.*(graph=True): one reverse step captured and replayed, with the generator's draws made outside the
    graph: the samples are the eager ones (to CUDA's floating-point order).  That the steps read nothing on the host
    is tested on the CPU (tests/test_host_sync.py)."""
    from pyrodiff import samplers
    from pyrodiff.training.spec import build

    model = build(DIGITS).model.eval()
    model.network.cuda()
    x_T = torch.randn((8,) + model.data_shape, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    fn = getattr(samplers, sampler)
    runs = [
        fn(model, x_T, steps=20, generator=torch.Generator("cuda").manual_seed(1), graph=graph, **options)
        for graph in (False, True)
    ]
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-4, atol=1e-5)
