"""A schedule with parameters (pyrodiff/chain/schedule.py), shown with the smallest one, ``EndpointSchedule`` (its two
log-SNR endpoints): its tables follow its parameters, gradients reach them through the ELBO of model and guide (the
reparameterised path and every KL term), plain SVI and ``pyrodiff train`` optimise them, checkpoints hold them and
resume exactly, ``load_trained`` restores their average, a guide on another schedule object is refused, and a bad
schedule is refused where it enters."""

import contextlib
import math

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from pyrodiff import DiffusionGuide, DiffusionModel, MLPDenoiser, NoiseSchedule
from pyrodiff.chain.schedule import Schedule, ScheduleTables
from pyrodiff.testing import EndpointSchedule
from pyrodiff.training import spec as spec_module
from pyrodiff.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pyrodiff.training.loop import train
from pyrodiff.training.spec import Spec, SpecError
from pyrodiff.training.trained import load_trained


def _model(schedule: Schedule) -> tuple[DiffusionModel, DiffusionGuide]:
    torch.manual_seed(1)
    network = MLPDenoiser(2, hidden=8, depth=1).double()
    return DiffusionModel(network, schedule), DiffusionGuide(schedule)


# ---------------------------------------------------------------------- the tables follow the parameters
def test_tables_are_recomputed_from_the_parameters_at_every_call():
    """No stale cache: after an optimiser-like in-place change, every copy reflects the new parameters."""
    schedule = EndpointSchedule(4, 3.0, -3.0)
    before = schedule.coefficients("cpu", torch.float32)
    assert before.log_snr.tolist() == [3.0, 1.0, -1.0, -3.0]
    with torch.no_grad():
        schedule.log_snr_max.add_(1.5)
    after = schedule.coefficients("cpu", torch.float64)
    assert after.log_snr.tolist() == pytest.approx([4.5, 2.0, -0.5, -3.0], rel=1e-15, abs=1e-15)
    assert after.alphas_cumprod.tolist() == pytest.approx([1 / (1 + math.exp(-v)) for v in (4.5, 2.0, -0.5, -3.0)])
    assert schedule.coefficients("cpu", torch.float32).log_snr.tolist() == pytest.approx([4.5, 2.0, -0.5, -3.0])


def test_a_fixed_schedules_tables_are_no_state():
    """Its buffers are remade from its description: a model's state (and a fixed run's checkpoint) holds none."""
    schedule = NoiseSchedule.linear(10)
    assert not schedule.has_parameters and dict(schedule.state_dict()) == {}
    model = DiffusionModel(MLPDenoiser(2, hidden=4, depth=1), schedule)
    assert not any(k.startswith("schedule") for k in model.state_dict())


def test_derived_tables_are_keyed_by_value_and_closures_are_refused():
    """Equal derivations made anew share one entry (no cache growth per call); a lambda or closure, which would not,
    is refused."""
    from pyrodiff.chain.forward import InferenceFamily

    schedule = NoiseSchedule.linear(10)
    first = InferenceFamily(0.5).tables(schedule, "cpu", torch.float32)
    assert InferenceFamily(0.5).tables(schedule, "cpu", torch.float32) is first
    assert InferenceFamily(0.25).tables(schedule, "cpu", torch.float32) is not first
    scale = 2.0

    def scaled(s):
        return scale * s.tables().betas

    for derivation in (lambda s: s.tables().betas, scaled):
        with pytest.raises(TypeError, match="named by value"):
            schedule.derived(derivation, "cpu", torch.float32)


def test_a_module_cast_moves_a_schedule_but_keeps_its_dtype():
    """model.float() must not round the float64 tables (nor a schedule's float64 parameters)."""
    fixed, learned = NoiseSchedule.cosine(50), EndpointSchedule(5)
    betas = fixed.betas.clone()
    nn.ModuleList([fixed, learned]).float()
    assert fixed.betas.dtype == torch.float64 and torch.equal(fixed.betas, betas)
    assert learned.log_snr_max.dtype == torch.float64 and learned.log_snr_max.item() == 6.0


@pytest.mark.parametrize("log_snr", [[4.0, 1.0, -2.0, -6.0], [9.0, 8.5, 0.0, -13.0]])
def test_tables_from_the_log_snr_are_those_from_the_betas(log_snr):
    """ScheduleTables.from_log_snr against from_betas on the betas it implies (1 - abar_t / abar_{t-1}, computed
    here in 50-digit arithmetic): two routes to the same tables."""
    import decimal

    with decimal.localcontext(decimal.Context(prec=50)):
        abar = [1 / (1 + (-decimal.Decimal(v)).exp()) for v in log_snr]
        betas = [float(1 - a / b) for a, b in zip(abar, [decimal.Decimal(1), *abar[:-1]], strict=True)]
    by_betas = ScheduleTables.from_betas(torch.tensor(betas, dtype=torch.float64))
    by_log_snr = ScheduleTables.from_log_snr(torch.tensor(log_snr, dtype=torch.float64))
    for name, a, b in zip(ScheduleTables._fields, by_log_snr, by_betas, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15), name


def test_a_respaced_schedule_shares_the_parameters():
    schedule = EndpointSchedule(5, 4.0, -4.0)
    short = schedule.respace([1, 3, 5])
    assert all(p is q for p, q in zip(short.parameters(), schedule.parameters(), strict=True))
    assert torch.equal(short.tables().log_snr, schedule.tables().log_snr[[0, 2, 4]])
    assert short.respace([2, 3]).description["timesteps"] == [3, 5]  # respacing composes on the original
    short.tables().betas.sum().backward()
    assert schedule.log_snr_max.grad is not None and schedule.log_snr_max.grad != 0


# ---------------------------------------------------------------------- (a) gradients through the program
def _loss(estimator, model, guide, x0, k):
    pyro.set_rng_seed(3)  # the same noise and timesteps at every evaluation: the loss is a function of the parameters
    return estimator().differentiable_loss(model, guide, x0, k)


@pytest.mark.parametrize("estimator", [Trace_ELBO, TraceMeanField_ELBO])
@pytest.mark.parametrize("k", [None, 2])
def test_the_elbos_gradient_in_the_schedules_parameters_is_its_derivative(estimator, k):
    """Autograd's gradient of the ELBO of model + guide in the two endpoints against central differences of the
    same draws (float64): it runs through the reparameterised path (Trace_ELBO) and the analytic KL terms
    (TraceMeanField_ELBO) of both sides; a cached or detached table would break the agreement."""
    schedule = EndpointSchedule(6, 3.0, -3.0)
    model, guide = _model(schedule)
    x0 = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    loss = _loss(estimator, model, guide, x0, k)
    grads = torch.autograd.grad(loss, [schedule.log_snr_max, schedule.log_snr_min])
    h = 1e-5
    for parameter, grad in zip((schedule.log_snr_max, schedule.log_snr_min), grads, strict=True):
        with torch.no_grad():
            parameter += h
            up = _loss(estimator, model, guide, x0, k).item()
            parameter -= 2 * h
            down = _loss(estimator, model, guide, x0, k).item()
            parameter += h
        assert grad.item() == pytest.approx((up - down) / (2 * h), rel=1e-6, abs=1e-8)
        assert grad.item() != 0


def test_plain_svi_optimises_the_schedule_registered_by_the_guide():
    schedule = EndpointSchedule(6, 3.0, -3.0)
    model, guide = _model(schedule)
    x0 = torch.randn(8, 2, dtype=torch.float64)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(3):
        svi.step(x0)
    store = pyro.get_param_store()
    assert store["schedule$$$log_snr_max"] is schedule.log_snr_max
    assert schedule.log_snr_max.item() != 3.0 and schedule.log_snr_min.item() != -3.0


# ---------------------------------------------------------------------- (c) one schedule object
def test_a_guide_on_another_schedule_object_is_refused_even_with_equal_parameters():
    schedule = EndpointSchedule(5, 3.0, -3.0)
    model, _ = _model(schedule)
    twin = DiffusionGuide(EndpointSchedule(5, 3.0, -3.0))
    with pytest.raises(ValueError, match="another noise schedule object than the model's"):
        Trace_ELBO().loss(model, twin, torch.zeros(3, 2, dtype=torch.float64))
    short = model.respaced(3)  # a respaced model's guide is built on its own schedule, which shares the parameters
    assert math.isfinite(
        Trace_ELBO().loss(short, DiffusionGuide(short.schedule), torch.zeros(3, 2, dtype=torch.float64))
    )


# ---------------------------------------------------------------------- (d) bad schedules are refused
class _FreeLogSNR(Schedule):
    """A schedule whose whole log-SNR table is a parameter (for the refusal of a non-monotone one)."""

    def __init__(self, log_snr: list[float]) -> None:
        super().__init__(len(log_snr), {"kind": "free"})
        self.log_snr = nn.Parameter(torch.tensor(log_snr, dtype=torch.float64))

    def tables(self) -> ScheduleTables:
        return ScheduleTables.from_log_snr(self.log_snr)


class _LogOfParameter(Schedule):
    """A schedule whose log-SNR is the log of its (finite) parameter: a zero entry gives a log-SNR of -inf there."""

    def __init__(self, values: list[float]) -> None:
        super().__init__(len(values), {"kind": "log"})
        self.values = nn.Parameter(torch.tensor(values, dtype=torch.float64))

    def tables(self) -> ScheduleTables:
        return ScheduleTables.from_log_snr(torch.log(self.values))


def _nan_endpoint() -> Schedule:
    schedule = EndpointSchedule(4)
    with torch.no_grad():
        schedule.log_snr_min.fill_(float("nan"))
    return schedule


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (_nan_endpoint, r"^invalid schedule: its parameter 'log_snr_min' is not finite$"),
        (
            lambda: EndpointSchedule(4, -2.0, 3.0),
            r"^invalid schedule: its log-SNR endpoints are out of order \(log snr_1 = -2, log snr_T = 3\)",
        ),
        (
            lambda: _FreeLogSNR([3.0, 1.0, 2.0, -1.0]),
            r"^invalid schedule: its log-SNR is not strictly decreasing: log snr_3 = 2 after log snr_2 = 1$",
        ),
        (lambda: _FreeLogSNR([3.0, 1.0, 1.0, -1.0]), "log snr_3 = 1 after log snr_2 = 1"),
        # the first of two rises is named, and the endpoints are compared as such (log snr_2 > log snr_1 and
        # log snr_3 > log snr_1 here, with log snr_1 > log snr_T): no endpoints message
        (
            lambda: _FreeLogSNR([3.0, 4.0, 1.0, 2.0, -1.0]),
            r"^invalid schedule: its log-SNR is not strictly decreasing: log snr_2 = 4 after log snr_1 = 3$",
        ),
        (
            lambda: _FreeLogSNR([3.0, -2.0, 4.0, -1.0]),
            r"^invalid schedule: its log-SNR is not strictly decreasing: log snr_3 = 4 after log snr_2 = -2$",
        ),
        # equal endpoints, and T = 2, are out of order (not a rise in the interior)
        (lambda: EndpointSchedule(4, 1.0, 1.0), r"endpoints are out of order \(log snr_1 = 1, log snr_T = 1\)"),
        (lambda: EndpointSchedule(2, -2.0, 3.0), r"endpoints are out of order \(log snr_1 = -2, log snr_T = 3\)"),
        # a log-SNR that is not finite from finite parameters: the first such t is named (log 0 = -inf at t = 2, 4)
        (
            lambda: _LogOfParameter([20.0, 0.0, 1.0, 0.0]),
            r"^invalid schedule: its log-SNR at t = 2 is not finite \(-inf\)$",
        ),
        (
            lambda: _FreeLogSNR([3.0, 1.0, -800.0]),
            r"beta_3 = 1\.0 is not strictly inside \(0, 1\)",
        ),  # sigmoid(-800) = 0
    ],
)
def test_a_bad_schedule_is_refused_where_it_enters_with_one_line(make, match):
    for enter in (lambda s: DiffusionModel(MLPDenoiser(2, hidden=4, depth=1), s), DiffusionGuide):
        with pytest.raises(ValueError, match=match) as refused:
            enter(make())
        assert "\n" not in str(refused.value)


# ---------------------------------------------------------------------- (b) training, checkpoints, resume
@pytest.fixture
def endpoints_spec(monkeypatch):
    """A tiny specification whose schedule has parameters (the kind ``endpoints``, registered for the test)."""
    monkeypatch.setitem(spec_module.SCHEDULES, "endpoints", EndpointSchedule)
    return Spec.from_dict(
        {
            "name": "tiny-endpoints",
            "data": {"name": "gaussians8"},
            "schedule": {"kind": "endpoints", "num_steps": 8, "log_snr_max": 5.0, "log_snr_min": -5.0},
            "model": {"prediction": "epsilon", "variance": "small", "decoder": "gaussian"},
            "network": {"kind": "mlp", "hidden": 16, "depth": 1},
            "training": {
                "steps": 4,
                "batch_size": 16,
                "checkpoint_every": 2,
                "eval_examples": 16,
                "lr": 0.05,
                "ema_decay": 0.5,
                "subsample_steps": 2,
            },
        }
    )


def test_a_specification_with_a_bad_schedule_is_refused_when_read(endpoints_spec):
    with pytest.raises(SpecError, match=r"\[schedule\] invalid schedule: its log-SNR endpoints are out of order"):
        endpoints_spec.with_changes({"schedule": {"log_snr_max": -1.0, "log_snr_min": 2.0}})


def test_training_changes_saves_averages_and_resumes_the_schedule_exactly(tmp_path, endpoints_spec):
    full = train(endpoints_spec, tmp_path / "full", progress=False, num_samples=8)
    train(endpoints_spec, tmp_path / "split", steps=2, progress=False, num_samples=8)
    resumed = train(endpoints_spec, tmp_path / "split", resume=True, progress=False, num_samples=8)
    a, b = load_checkpoint(full.checkpoint), load_checkpoint(resumed.checkpoint)
    live, average = a["schedule"], a["schedule_ema"]
    assert live["log_snr_max"].item() != 5.0 and live["log_snr_min"].item() != -5.0  # the optimiser moved them
    assert average["module.log_snr_max"].item() != live["log_snr_max"].item()  # an average, not a copy
    assert average["n_averaged"].item() == 4
    for key in ("schedule", "schedule_ema", "network", "ema"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["losses"] == b["losses"] and resumed.test_bound["terms_nats"] == full.test_bound["terms_nats"]

    built, model = load_trained(full.checkpoint)
    assert model.schedule is built.schedule and built.guide.schedule is built.schedule
    assert built.schedule.log_snr_max.item() == average["module.log_snr_max"].item()
    assert built.schedule.log_snr_min.item() == average["module.log_snr_min"].item()
    x0 = built.data.test[:4]
    assert math.isfinite(Trace_ELBO().loss(model, built.guide, x0))


def test_a_checkpoint_with_a_bad_schedule_is_refused_on_resume_and_load(tmp_path, endpoints_spec):
    train(endpoints_spec, tmp_path, steps=2, progress=False, num_samples=8)
    path = tmp_path / "checkpoint.pt"
    state = load_checkpoint(path)
    state["schedule"]["log_snr_max"].fill_(float("nan"))
    state["schedule_ema"]["module.log_snr_max"].fill_(-9.0)  # below log_snr_min: endpoints out of order
    save_checkpoint(path, {k: v for k, v in state.items() if k != "format"})
    with pytest.raises(CheckpointError, match="parameter 'log_snr_max' is not finite"):
        train(endpoints_spec, tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="endpoints are out of order"):
        load_trained(path)


def test_memoised_tables_are_computed_once_per_loss_with_the_same_gradients(monkeypatch, float64):
    """Inside ``Schedule.memoised()`` a schedule with parameters computes each derived table once for a whole loss (the
    model and the guide ask for them several times), and the loss and every gradient are those computed without it."""
    from pyrodiff import LearnedSchedule
    from pyrodiff.chain.log_snr import NoiseLevelInput

    torch.manual_seed(0)
    schedule = LearnedSchedule(12, hidden=6)
    net = MLPDenoiser(2, hidden=8, depth=1)
    model = DiffusionModel(net, schedule, noise_level=NoiseLevelInput())
    guide = DiffusionGuide(schedule)
    x0 = torch.randn(5, 2)
    calls = []
    tables = LearnedSchedule.tables
    monkeypatch.setattr(LearnedSchedule, "tables", lambda self: calls.append(1) or tables(self))

    def loss_and_grads(memo: bool):
        pyro.set_rng_seed(3)
        calls.clear()
        with schedule.memoised() if memo else contextlib.nullcontext():
            loss = TraceMeanField_ELBO().differentiable_loss(model, guide, x0, 2)
        params = [*schedule.parameters(), *net.parameters()]
        return loss, torch.autograd.grad(loss, params), len(calls)

    plain, plain_grads, plain_calls = loss_and_grads(False)
    memo, memo_grads, memo_calls = loss_and_grads(True)
    # one computation of the tables, against one per use without
    assert memo_calls == 1 and plain_calls >= 6
    torch.testing.assert_close(memo, plain, rtol=1e-12, atol=0)
    for a, b in zip(memo_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert schedule._memo is None and "tables" not in schedule.__dict__  # nothing is kept after the loss
