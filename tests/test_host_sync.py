"""A training step reads no tensor value on the host: on a GPU every such read waits for the device, and a
CUDA graph cannot capture it.  Counted on the CPU (so in CI) with a dispatch mode that sees every aten op."""

import collections
import functools
import traceback
from pathlib import Path

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from test_train import TINY_2D, TINY_DIGITS
from torch.utils._python_dispatch import TorchDispatchMode

from pyrodiff.chain.objectives import parse_estimator
from pyrodiff.testing import EndpointSchedule
from pyrodiff.training import loop as train_module
from pyrodiff.training import optimisation
from pyrodiff.training import spec as spec_module
from pyrodiff.training.checkpoint import load_checkpoint
from pyrodiff.training.graphed import elbo_on_device
from pyrodiff.training.spec import build

#: aten ops that read a tensor's value on the host: item/float/int/bool, data-dependent output shapes, comparisons
#: answered on the host.  Boolean-mask indexing and tensors made from host data are recognised by their arguments.
_READING_OPS = {
    "aten._local_scalar_dense.default",
    "aten.is_nonzero.default",
    "aten.nonzero.default",
    "aten.masked_select.default",
    "aten.equal.default",
    "aten.allclose.default",
    "aten.bincount.default",
    "aten.unique_consecutive.default",
    "aten._unique2.default",
    "aten.repeat_interleave.Tensor",
    "aten.multinomial.default",
}
#: Tensor methods that read values without an aten op on the CPU (they copy to the host on a GPU).
_READING_METHODS = ("tolist", "numpy", "cpu")
_PYRODIFF = str(Path(train_module.__file__).parents[1])


class HostReads(TorchDispatchMode):
    """Records every host read of a tensor value (see :data:`_READING_OPS`) with the Python stack of its call."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, list[traceback.FrameSummary]]] = []

    def record(self, what: str) -> None:
        self.reads.append((what, traceback.extract_stack()[:-2]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        flat = [a for arg in args for a in (arg if isinstance(arg, list | tuple) else (arg,))]
        if (
            name in _READING_OPS
            or (name.startswith(("aten.index.", "aten.index_put")) and any(_is_mask(a) for a in flat))
            or (name == "aten.lift_fresh.default" and args[0].numel() > 0)  # torch.tensor(data): a copy to the device
        ):
            self.record(name)
        return func(*args, **(kwargs or {}))


def _is_mask(a) -> bool:
    return isinstance(a, torch.Tensor) and a.dtype == torch.bool


@pytest.fixture
def host_reads(monkeypatch):
    """A :class:`HostReads` that also sees :data:`_READING_METHODS`; enter it to record."""
    mode = HostReads()
    for method in _READING_METHODS:
        original = getattr(torch.Tensor, method)

        def reading(self, *args, _original=original, _method=method, **kwargs):
            if mode.active:
                mode.record(f"Tensor.{_method}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, reading)
    mode.active = False
    return mode


def _where(frames, line: bool = True) -> str:
    """The innermost frame in pyrodiff or Pyro (who asked for the read), as ``file:line function``."""
    for f in reversed(frames):
        if f.filename.startswith(_PYRODIFF) or "/pyro/" in f.filename:
            # pyrodiff's files relative to the checkout (wherever it is), Pyro's relative to site-packages
            root = str(Path(_PYRODIFF).parent) + "/"
            path = (
                f.filename.removeprefix(root)
                if f.filename.startswith(_PYRODIFF)
                else f.filename.split("site-packages/")[-1]
            )
            return f"{path}{f':{f.lineno}' if line else ''} {f.name}"
    return f"{frames[-1].filename}:{frames[-1].lineno}"


def _in(frames, *functions) -> bool:
    files = (train_module.__file__, optimisation.__file__)
    return any(f.filename in files and f.name in functions for f in frames)


def _steps_reads(mode, spec, tmp_path, monkeypatch) -> tuple[list[str], list[str]]:
    """Train ``spec`` recording host reads; (the reads of the steps, the reads at the loop's intervals).
    The CPU's AdamW reads its step counter on the host (``foreach``; the fused CUDA AdamW keeps it on the
    device): reads inside ``Optimizer.step`` are left out."""
    run_train = train_module._Run.train

    def recorded(self, progress):
        mode.active = True
        try:
            with mode:
                return run_train(self, progress)
        finally:
            mode.active = False

    monkeypatch.setattr(train_module._Run, "train", recorded)
    train_module.train(spec, tmp_path, progress=False, num_samples=4)
    steps, intervals = [], []
    for what, frames in mode.reads:
        if any(f.filename.endswith("torch/optim/optimizer.py") for f in frames):  # in Optimizer.step
            continue
        (intervals if _in(frames, "read_losses", "save") else steps).append(f"{what} at {_where(frames)}")
    return steps, intervals


@pytest.mark.parametrize(
    ("spec", "options"),
    [
        (TINY_DIGITS, {}),
        (TINY_2D, {"timestep_sampler": "importance", "objective": "min_snr", "subsample_steps": 2}),
        (TINY_2D, {"estimator": "trace", "micro_batches": 2, "amp": "bf16"}),
        (TINY_2D, {"subsample_steps": "all"}),
    ],
)
def test_no_host_read_between_the_loops_reads_of_the_losses(tmp_path, monkeypatch, host_reads, spec, options):
    spec = spec.with_changes({"training": {**options, "steps": 6, "log_every": 3, "checkpoint_every": 6}})
    steps, intervals = _steps_reads(host_reads, spec, tmp_path, monkeypatch)
    assert steps == [], "host reads in the training step:\n" + "\n".join(steps)
    assert any("Tensor.tolist at pyrodiff/training/optimisation.py" in r and "read_losses" in r for r in intervals)


def test_a_schedule_with_parameters_adds_no_host_read_to_the_step(tmp_path, monkeypatch, host_reads):
    """Its tables are recomputed from its parameters at every step, on the device; its EMA and checkpoint too."""
    monkeypatch.setitem(spec_module.SCHEDULES, "endpoints", EndpointSchedule)
    changes = {"schedule": {"kind": "endpoints", "num_steps": 20, "log_snr_max": 5.0, "log_snr_min": -5.0}}
    spec = TINY_2D.with_changes(changes | {"training": {"steps": 6, "log_every": 3, "checkpoint_every": 6}})
    steps, _ = _steps_reads(host_reads, spec, tmp_path, monkeypatch)
    assert steps == [], "host reads in the training step:\n" + "\n".join(steps)
    assert "schedule" in load_checkpoint(tmp_path / "checkpoint.pt")  # it did train a schedule with parameters


def test_the_recorder_sees_every_kind_of_host_read(host_reads):
    x = torch.randn(5)
    host_reads.active = True
    with host_reads:
        x[0].item(), float(x[1]), int(x[2]), bool(x[3] > 0), x.tolist(), x.numpy(), x.cpu()
        x[x > 0], x.nonzero(), torch.equal(x, x), torch.tensor([1.0, 2.0])
        if (x > 0).any():
            pass
    host_reads.active = False
    dense = "aten._local_scalar_dense.default"
    assert [what for what, _ in host_reads.reads] == [
        *[dense] * 4,
        "Tensor.tolist",
        "Tensor.numpy",
        "Tensor.cpu",
        "aten.index.Tensor",
        "aten.nonzero.default",
        "aten.equal.default",
        "aten.lift_fresh.default",
        dense,
    ]


@pytest.mark.parametrize("estimator", ["mean_field", "trace"])
def test_the_elbo_on_the_device_reads_nothing_on_the_host(estimator, host_reads):
    """One step of the digits program (loss and backward) with :func:`elbo_on_device`'s estimator queues device
    work only (that it is Pyro's loss with Pyro's gradient: tests/test_graphed.py)."""
    built = build(TINY_DIGITS.with_changes({"training": {"estimator": estimator}}))
    built.model.register_with_pyro = False
    loss_module = elbo_on_device(parse_estimator(estimator)())(built.model, built.guide)
    host_reads.active = True
    with host_reads, pyro.validation_enabled(False):  # as in the training loop: validation reads values
        loss_module(built.data.train[:6], 2).backward()
    host_reads.active = False
    assert [f"{what} at {_where(frames)}" for what, frames in host_reads.reads] == []


@pytest.mark.parametrize("estimator", ["mean_field", "trace"])
@pytest.mark.parametrize("interior", ["bound", "variance"])
def test_the_continuous_time_step_with_a_learned_schedule_reads_nothing_on_the_host(estimator, interior, host_reads):
    """One continuous-time step (loss and backward) with a learned schedule: the low-discrepancy times, gamma(t) and
    its closed-form rate, the prior and decoder at the learned endpoints and, with interior="variance", the gradient
    hooks that rescale the interior's gradient all stay on the device."""
    from pyrodiff import ContinuousDiffusionModel, ContinuousGuide, LearnedSchedule, MLPDenoiser

    schedule = LearnedSchedule(100, hidden=16)
    model = ContinuousDiffusionModel(MLPDenoiser(2, hidden=16, depth=1), schedule, "gaussian", interior=interior)
    guide = ContinuousGuide(schedule)
    model.register_with_pyro = guide.register_with_pyro = False
    loss_module = elbo_on_device(parse_estimator(estimator)())(model, guide)
    x = torch.randn(8, 2)
    host_reads.active = True
    with host_reads, pyro.validation_enabled(False):
        loss_module(x).backward()
    host_reads.active = False
    assert [f"{what} at {_where(frames)}" for what, frames in host_reads.reads] == []
    assert schedule.w2.grad is not None and schedule.gamma_0.grad is not None  # it did reach the schedule


@pytest.mark.parametrize(
    ("estimator", "reads"),
    [
        (TraceMeanField_ELBO, {"pyro/infer/util.py torch_item": 2, "pyro/util.py warn_if_nan": 2}),
        (Trace_ELBO, {"pyro/infer/util.py torch_item": 8, "pyro/util.py warn_if_nan": 2}),
    ],
)
def test_pyros_eager_elbo_reads_the_loss_on_the_host(estimator, reads, host_reads):
    """What :func:`elbo_on_device` removes: the eager ELBO's reads of the loss (``torch_item``) and its NaN checks
    (``warn_if_nan``, forward and in a backward hook) on the 2-D program with one timestep per example."""
    built = build(TINY_2D)
    built.model.register_with_pyro = False
    loss_module = estimator()(built.model, built.guide)
    host_reads.active = True
    with host_reads, pyro.validation_enabled(False):
        loss_module(built.data.train[:4], 1).backward()
    host_reads.active = False
    found = collections.Counter(_where(frames, line=False) for _, frames in host_reads.reads)
    assert found == reads


@pytest.mark.parametrize(
    ("sampler", "options"), [("ancestral", {"last": "sample", "clip": True}), ("ddim", {"eta": 0.5})]
)
def test_the_samplers_steps_read_nothing_on_the_host(host_reads, sampler, options):
    """The reverse steps of both samplers (eager, and the function a CUDA graph captures) only queue device work: the
    one read is the check that the given x_T is finite, before the steps."""
    from pyrodiff import samplers
    from pyrodiff.chain.reverse import _transition

    chain = build(TINY_DIGITS).model.eval().respaced(6)
    x_T = torch.randn((3,) + chain.data_shape)
    fn = getattr(samplers, sampler)
    t = torch.full((3,), 4)
    stepped = chain if sampler == "ancestral" else chain.ddim(options["eta"])
    captured = functools.partial(_transition, stepped, options.get("clip", False), x_T, t, torch.randn_like(x_T))
    host_reads.active = True
    with host_reads, pyro.validation_enabled(False), torch.no_grad():
        fn(chain, x_T, generator=torch.Generator().manual_seed(0), **options)
        captured()
    host_reads.active = False
    assert [_where(frames, line=False) for _, frames in host_reads.reads] == ["pyrodiff/chain/reverse.py _start"]


def test_bound_terms_reads_the_host_once_after_all_its_chunks(host_reads):
    """With validation off (as in training's evaluation), one read: the finiteness check at the end."""
    from pyrodiff import bound_terms

    built = build(TINY_DIGITS)
    model = built.model.eval()
    host_reads.active = True
    with host_reads, pyro.validation_enabled(False):
        bound_terms(model, built.data.test[:3], num_samples=2, chunk_size=2)
    host_reads.active = False
    assert [_where(frames, line=False) for _, frames in host_reads.reads] == [
        "pyrodiff/evaluation/bound.py _check_finite"
    ]
