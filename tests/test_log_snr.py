"""Schedules given by a log-SNR in continuous time (pyrodiff/chain/log_snr.py) against independent derivations: the
closed-form derivative of VDM's monotone network against finite differences and autograd, the endpoints, the
discretisation t_k = (k - 1)/(T - 1) against a decimal computation of alpha_bar and beta, shared parameters, the
noise-level input, and the refusals of a bad schedule."""

import math
from decimal import Decimal, getcontext

import pyro
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pyro.infer import Trace_ELBO
from torch import nn

from pyrodiff import ContinuousDiffusionModel, ContinuousGuide, NoiseSchedule
from pyrodiff.chain.log_snr import (
    DiscretisedSchedule,
    LearnedSchedule,
    LinearLogSNR,
    LogSNRSchedule,
    NoiseLevelInput,
)
from pyrodiff.chain.schedule import ScheduleTables

F64 = torch.float64


def _learned(seed: int, hidden: int = 8, num_steps: int = 10, gamma_min=-7.0, gamma_max=4.0) -> LearnedSchedule:
    """A LearnedSchedule with far-from-linear random parameters (the default interior is nearly linear)."""
    schedule = LearnedSchedule(num_steps, gamma_min, gamma_max, hidden=hidden)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        schedule.w1.copy_(torch.randn((), generator=g, dtype=F64) * 3)
        schedule.b1.copy_(torch.randn((), generator=g, dtype=F64))
        schedule.w2.copy_(torch.randn(hidden, generator=g, dtype=F64) * 6)
        schedule.b2.copy_(torch.randn(hidden, generator=g, dtype=F64) * 2)
        schedule.w3.copy_(torch.randn(hidden, generator=g, dtype=F64) * 2)
    return schedule.check()


class _Noise(nn.Module):
    """eps_hat(z, c) = 0: the smallest network for building a continuous-time model."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros((), dtype=F64))

    def forward(self, z, c):
        return self.scale * z


# ---------------------------------------------------------------------- gamma, its derivative, its endpoints
@given(seed=st.integers(0, 2**16), t=st.floats(0.0, 1.0))
def test_the_closed_form_rate_is_the_derivative_of_gamma(seed, t):
    """gamma'(t) (at(t).rate, in closed form) against a central finite difference and autograd of gamma; likewise the
    interior's s'(t)."""
    schedule = _learned(seed)
    at = schedule.at(torch.tensor([t], dtype=F64))
    tt = torch.tensor([t], dtype=F64, requires_grad=True)
    gamma = schedule.gamma(tt)
    (autograd,) = torch.autograd.grad(gamma.sum(), tt)
    (interior_autograd,) = torch.autograd.grad(schedule.at(tt).interior.sum(), tt)
    h = 1e-6
    with torch.no_grad():
        lo, hi = max(t - h, 0.0), min(t + h, 1.0)  # one-sided at the ends, still second order well inside
        fd = (schedule.gamma(torch.tensor([hi], dtype=F64)) - schedule.gamma(torch.tensor([lo], dtype=F64))) / (hi - lo)
    scale = 1 + at.rate.abs().item()
    assert at.rate.item() == pytest.approx(autograd.item(), rel=1e-10, abs=1e-10 * scale)
    assert at.interior_rate.item() == pytest.approx(interior_autograd.item(), rel=1e-10, abs=1e-10)
    # an off-centre difference (within h of an end) is first order in h, a centred one second order
    second = 1e-3 * scale if (t - lo) != (hi - t) else 1e-5 * scale
    assert at.rate.item() == pytest.approx(fd.item(), abs=second)
    width = (schedule.gamma_1 - schedule.gamma_0).item()
    assert at.rate.item() == pytest.approx(width * at.interior_rate.item(), rel=1e-14)


@given(seed=st.integers(0, 2**16))
def test_the_interior_runs_from_0_to_1_and_increases(seed):
    schedule = _learned(seed)
    ends = schedule.at(torch.tensor([0.0, 1.0], dtype=F64))
    assert ends.interior.tolist() == [0.0, 1.0]
    assert ends.gamma[0].item() == schedule.gamma_0.item()
    assert ends.gamma[1].item() == pytest.approx(schedule.gamma_1.item(), rel=1e-15, abs=1e-14)
    grid = schedule.at(torch.linspace(0, 1, 2001, dtype=F64))
    assert (grid.rate > 0).all() and (grid.gamma.diff() > 0).all()


def test_the_interior_is_vdms_monotone_network_written_out():
    """s(t) = (g(t) - g(0)) / (g(1) - g(0)), g(t) = h + sum_j |w3_j| (2 sigmoid(|w2_j| h + b2_j) - 1), h = |w1| t + b1,
    written here in plain floats."""
    schedule = _learned(3, hidden=3)
    w1, b1 = abs(schedule.w1.item()), schedule.b1.item()
    w2, b2, w3 = (getattr(schedule, n).tolist() for n in ("w2", "b2", "w3"))

    def g(t):
        h = w1 * t + b1
        return h + sum(abs(c) * (2 / (1 + math.exp(-(abs(a) * h + b))) - 1) for a, b, c in zip(w2, b2, w3, strict=True))

    for t in (0.1, 0.5, 0.93):
        s = (g(t) - g(0)) / (g(1) - g(0))
        assert schedule.at(torch.tensor(t, dtype=F64)).interior.item() == pytest.approx(s, rel=1e-13)
        gamma = schedule.gamma_0.item() + (schedule.gamma_1.item() - schedule.gamma_0.item()) * s
        assert schedule.gamma(torch.tensor(t, dtype=F64)).item() == pytest.approx(gamma, rel=1e-13)


def test_linear_log_snr_is_linear():
    schedule = LinearLogSNR(5, -6.0, 2.0)
    t = torch.tensor([0.0, 0.25, 0.6, 1.0], dtype=F64)
    at = schedule.at(t)
    assert at.gamma.tolist() == pytest.approx([-6.0, -4.0, -1.2, 2.0], rel=1e-15)
    assert at.rate.tolist() == [8.0] * 4
    assert not schedule.has_parameters
    assert LinearLogSNR(5, -6.0, 2.0, learn_endpoints=True).has_parameters


def test_the_defaults_are_vdms():
    """gamma from -13.3 to 5 (SNR_max = e^13.3), 1000 steps, a 1024-wide monotone network that starts close to linear,
    and the noise-level input mapping [-13.3, 5] onto DDPM's timestep range [0, 1000]."""
    for schedule in (LinearLogSNR(), LearnedSchedule()):
        assert [g.item() for g in schedule.endpoints()] == [-13.3, 5.0] and schedule.num_steps == 1000
    learned = LearnedSchedule()
    assert learned.w2.numel() == 1024
    t = torch.linspace(0, 1, 101, dtype=F64)
    assert (learned.at(t).interior - t).abs().max().item() < 0.01
    assert NoiseLevelInput()(torch.tensor([-13.3, 5.0], dtype=F64)).tolist() == pytest.approx([0.0, 1000.0], abs=1e-12)


# ---------------------------------------------------------------------- the discretisation
@pytest.mark.parametrize("num_steps", [2, 7, 50])
def test_tables_are_the_discretisation_at_evenly_spaced_times(num_steps):
    """lambda_k = -gamma(t_k), t_k = (k - 1)/(T - 1); alpha_bar_k = sigmoid(-gamma_k) and beta_k =
    1 - alpha_bar_k/alpha_bar_{k-1} (alpha_bar_0 = 1) computed here in 40-digit decimals."""
    getcontext().prec = 40
    schedule = _learned(5, num_steps=num_steps)
    tables = schedule.tables()
    times = [(k - 1) / (num_steps - 1) for k in range(1, num_steps + 1)]
    gamma = schedule.gamma(torch.tensor(times, dtype=F64)).detach()
    assert tables.log_snr.tolist() == pytest.approx((-gamma).tolist(), rel=1e-14, abs=1e-14)
    expected = ScheduleTables.from_log_snr(-gamma)
    for name in ScheduleTables._fields:
        assert getattr(tables, name).tolist() == pytest.approx(getattr(expected, name).tolist(), rel=1e-12), name
    abar = [1 / (1 + Decimal(g.item()).exp()) for g in gamma]
    prev = [Decimal(1)] + abar[:-1]
    betas = [1 - a / p for a, p in zip(abar, prev, strict=True)]
    assert tables.alphas_cumprod.tolist() == pytest.approx([float(a) for a in abar], rel=1e-14)
    assert tables.betas.tolist() == pytest.approx([float(b) for b in betas], rel=1e-12)
    one_minus = [1 - a for a in abar]
    posterior = [b * (1 - p) / o for b, p, o in zip(betas, prev, one_minus, strict=True)]
    assert tables.posterior_variance.tolist() == pytest.approx([float(v) for v in posterior], rel=1e-12, abs=1e-300)


def test_a_linear_schedules_steps_are_hand_values():
    schedule = LinearLogSNR(4, -6.0, 3.0)
    assert schedule.tables().log_snr.tolist() == pytest.approx([6.0, 3.0, 0.0, -3.0], rel=1e-15)
    assert schedule.discrete_times().tolist() == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0], rel=1e-15)


def test_discretised_shares_the_parameters():
    """The schedule at another K has the tables of a fresh schedule with the same state at K, and the gradient of its
    tables reaches the original's parameters (it holds no copy)."""
    schedule = _learned(7)
    five = schedule.discretised(5)
    assert isinstance(five, DiscretisedSchedule) and schedule.discretised(10) is schedule
    assert five.discretised(10) is schedule and five.discretised(3).original is schedule
    fresh = LearnedSchedule(5, hidden=8)
    fresh.load_state_dict(schedule.state_dict())
    for name in ScheduleTables._fields:
        assert torch.equal(getattr(five.tables(), name), getattr(fresh.tables(), name)), name
    five.tables().alphas_cumprod.sum().backward()
    fresh.tables().alphas_cumprod.sum().backward()
    for name, parameter in schedule.named_parameters():
        assert parameter.grad is not None and torch.equal(parameter.grad, getattr(fresh, name).grad), name
    with torch.no_grad():
        schedule.gamma_1.add_(0.5)
    assert five.tables().log_snr[-1].item() == pytest.approx(-4.5, rel=1e-14)
    assert torch.equal(five.at(torch.tensor([0.3], dtype=F64)).gamma, schedule.gamma(torch.tensor([0.3], dtype=F64)))


def test_the_noise_level_input_and_its_inverse():
    level = NoiseLevelInput(-10.0, 6.0, 1000.0)
    gamma = torch.tensor([-10.0, -2.0, 6.0], dtype=F64)
    assert level(gamma).tolist() == [0.0, 500.0, 1000.0]
    assert level.gamma(level(gamma)).tolist() == pytest.approx(gamma.tolist(), rel=1e-15)
    assert NoiseLevelInput(scale=0.5)(torch.tensor([5.0], dtype=F64)).item() == pytest.approx(0.5, rel=1e-15)
    for bad in ({"low": 1.0, "high": 1.0}, {"scale": 0.0}, {"low": float("nan")}):
        with pytest.raises((ValueError, TypeError), match="noise-level input"):
            NoiseLevelInput(**bad)


# ---------------------------------------------------------------------- refusals
def test_endpoints_out_of_order_or_not_finite_are_refused_where_they_enter():
    for gamma_min, gamma_max in ((2.0, 2.0), (3.0, -1.0)):
        for make in (LinearLogSNR, LearnedSchedule):
            with pytest.raises(ValueError, match=r"gamma_max = .* must exceed gamma_min") as info:
                make(10, gamma_min, gamma_max)
            assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="gamma_min"):
        LearnedSchedule(10, float("nan"), 1.0)


def test_endpoints_moved_out_of_order_are_refused():
    schedule = LearnedSchedule(10, -5.0, 5.0, hidden=4)
    with torch.no_grad():
        schedule.gamma_1.fill_(-6.0)
    with pytest.raises(ValueError, match=r"endpoints are out of order \(gamma_0 = -5, gamma_1 = -6\)"):
        schedule.check()
    with torch.no_grad():
        schedule.gamma_1.fill_(-5.0)
    with pytest.raises(ValueError, match=r"endpoints are out of order \(gamma_0 = -5, gamma_1 = -5\)"):
        schedule.check()


def test_a_nan_parameter_is_refused_by_name():
    schedule = LearnedSchedule(10, hidden=4)
    with torch.no_grad():
        schedule.w2[1] = float("nan")
    with pytest.raises(ValueError, match="parameter 'w2' is not finite"):
        schedule.check()
    with pytest.raises(ValueError, match="parameter 'w2' is not finite"):
        ContinuousGuide(schedule)


def test_a_flat_learned_interior_is_refused_as_not_increasing():
    """|w1| = 0 makes g(t) constant: s = 0/0.  Refused as not increasing, before any NaN table."""
    schedule = LearnedSchedule(10, hidden=4)
    with torch.no_grad():
        schedule.w1.zero_()
    with pytest.raises(ValueError, match=r"gamma\(t\) is not strictly increasing: gamma'\(t\) = nan at t = 0$"):
        schedule.check()


class _Wavy(LogSNRSchedule):
    """A planted non-monotone interior s(t) = t + 0.2 sin(2 pi t): s(0) = 0, s(1/2) = 1/2, s(1) = 1, so a 3-step
    discretisation is monotone, but s'(t) = 1 + 0.4 pi cos(2 pi t) < 0 around t = 1/2."""

    def __init__(self, num_steps: int) -> None:
        super().__init__(num_steps, -5.0, 5.0, False, {"kind": "wavy"})

    def interior(self, t):
        return t + 0.2 * torch.sin(2 * math.pi * t), 1 + 0.4 * math.pi * torch.cos(2 * math.pi * t)


def test_a_non_monotone_interior_is_refused_even_between_the_steps():
    assert (_Wavy(3).tables().log_snr.diff() < 0).all()  # the chain's steps alone look fine
    with pytest.raises(ValueError, match=r"gamma\(t\) is not strictly increasing: gamma'\(t\) = -\d"):
        _Wavy(3).check()
    with pytest.raises(ValueError, match="not strictly increasing"):
        ContinuousDiffusionModel(_Noise(), _Wavy(3), decoder="gaussian")


class _Cubic(LogSNRSchedule):
    """s(t) = (4t - t^3)/3: s(0) = 0, s(1) = 1, s'(t) = (4 - 3t^2)/3 >= 1/3 on [0, 1]; it turns down only beyond t = 1.15,
    outside the process."""

    def __init__(self) -> None:
        super().__init__(5, -5.0, 5.0, False, {"kind": "cubic"})

    def interior(self, t):
        return (4 * t - t**3) / 3, (4 - 3 * t**2) / 3


def test_only_the_times_in_0_1_are_checked():
    assert _Cubic().check().at(torch.tensor([1.0], dtype=F64)).rate.item() == pytest.approx(10 / 3, rel=1e-15)


def test_fewer_than_two_steps_are_refused_two_are_enough():
    schedule = LearnedSchedule(10, -4.0, 3.0, hidden=2)
    assert schedule.discretised(2).tables().log_snr.tolist() == pytest.approx([4.0, -3.0], rel=1e-14)
    assert LinearLogSNR(2, -4.0, 3.0).tables().log_snr.tolist() == pytest.approx([4.0, -3.0], rel=1e-14)
    with pytest.raises(ValueError, match="T >= 2 steps, got num_steps = 1"):
        LinearLogSNR(1)
    with pytest.raises(ValueError, match="T >= 2 steps"):
        LearnedSchedule(10, hidden=2).discretised(1)


def test_a_guide_and_model_on_different_schedule_objects_are_refused():
    """Even with equal parameters: they must be one object."""
    model = ContinuousDiffusionModel(_Noise(), LinearLogSNR(10, learn_endpoints=True), decoder="gaussian")
    x = torch.randn(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="another noise schedule object"):
        Trace_ELBO().loss(model, ContinuousGuide(LinearLogSNR(10, learn_endpoints=True)), x)
    assert math.isfinite(Trace_ELBO().loss(model, ContinuousGuide(model.schedule), x))
    pyro.clear_param_store()
    with pytest.raises(TypeError, match="needs a schedule defined for every t in .0, 1., a LogSNRSchedule"):
        ContinuousGuide(NoiseSchedule.linear(10))
    with pytest.raises(TypeError, match="LogSNRSchedule"):
        ContinuousDiffusionModel(_Noise(), NoiseSchedule.linear(10))


@pytest.mark.parametrize("subsample_steps", [None, 2])
def test_the_chains_elbo_gradient_reaches_the_learned_schedule(subsample_steps):
    """At finite T a learned schedule is a schedule: the discrete chain's Trace_ELBO (the reparameterised path and
    every KL term) has the gradient of its central finite difference in every parameter kind, with common random
    numbers."""
    from pyrodiff import DiffusionGuide, DiffusionModel, MLPDenoiser

    schedule = _learned(11, hidden=4, num_steps=6)
    torch.manual_seed(1)
    model = DiffusionModel(MLPDenoiser(2, hidden=8, depth=1).double(), schedule)
    guide = DiffusionGuide(schedule)
    x = torch.randn(5, 2, dtype=F64) * 0.5

    def loss():
        pyro.set_rng_seed(3)
        return Trace_ELBO().differentiable_loss(model, guide, x, subsample_steps)

    params = dict(schedule.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(loss(), list(params.values())), strict=True))
    h = 1e-6
    for name in ("gamma_0", "gamma_1", "w1", "b1", "w2", "w3"):
        p = params[name]
        with torch.no_grad():
            p.view(-1)[0] += h
            up = loss().item()
            p.view(-1)[0] -= 2 * h
            down = loss().item()
            p.view(-1)[0] += h
        assert grads[name].view(-1)[0].item() == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-6), name
        assert grads[name].view(-1)[0].item() != 0, name
