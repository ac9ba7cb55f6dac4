import decimal
import math
from decimal import Decimal

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pyrodiff import NoiseSchedule
from pyrodiff.chain.schedule import ScheduleTables
from pyrodiff.testing import schedules


@given(schedules(min_steps=1, max_steps=20))
def test_tables_follow_the_forward_recursion_in_exact_arithmetic(schedule):
    """Every table against the forward recursion, in 60-digit decimal arithmetic from the float64 betas: given x_0,
    x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) e_t has mean m_t x_0 with m_t = sqrt(alpha_t) m_{t-1} (m_0 = 1) and
    variance v_t = alpha_t v_{t-1} + beta_t (v_0 = 0), so abar_t = m_t^2, snr_t = m_t^2 / v_t, and conditioning the
    jointly Gaussian (x_{t-1}, x_t) on x_t gives the posterior: slope c = Cov / v_t with Cov = sqrt(alpha_t) v_{t-1},
    variance v_{t-1} - Cov^2 / v_t, and coefficient of x_0 m_{t-1} - c m_t.  No closed form of the code is used.
    The tolerances are float64 rounding (relative ~1e-16 per operation, over at most 20 steps; the conditional
    variance and log-SNR lose up to 1/(1 - abar_t) <= 1e4 of it to cancellation)."""
    with decimal.localcontext(decimal.Context(prec=60)):
        m, v = Decimal(1), Decimal(0)
        expected = {name: [] for name in ScheduleTables._fields}
        for beta in map(Decimal, schedule.betas.tolist()):
            alpha = 1 - beta
            m_prev, v_prev = m, v
            m, v = alpha.sqrt() * m_prev, alpha * v_prev + beta
            slope = alpha.sqrt() * v_prev / v
            for name, value in (
                ("betas", beta),
                ("alphas", alpha),
                ("alphas_cumprod", m * m),
                ("alphas_cumprod_prev", m_prev * m_prev),
                ("log_snr", (m * m / v).ln()),
                ("posterior_variance", v_prev - slope * alpha.sqrt() * v_prev),
                ("posterior_mean_coef_x0", m_prev - slope * m),
                ("posterior_mean_coef_xt", slope),
            ):
                expected[name].append(float(value))
    for name, want in expected.items():
        got = getattr(schedule, name)
        assert got.dtype == torch.float64
        assert np.allclose(got.numpy(), want, rtol=1e-11, atol=1e-11 if name == "log_snr" else 1e-15), name


def test_linear_matches_ho_et_al():
    s = NoiseSchedule.linear(1000)
    assert s.num_steps == 1000
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.01)


def test_cosine_matches_definition():
    T, s = 100, 0.008
    sched = NoiseSchedule.cosine(T, s)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (1, 10, 50, 90):
        assert sched.alphas_cumprod[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)


def test_sigmoid_is_valid_and_ends_near_zero():
    s = NoiseSchedule.sigmoid(200)
    assert s.alphas_cumprod[-1] < 1e-2 and s.alphas_cumprod[0] > 0.9


@pytest.mark.parametrize(
    "betas, match",
    [
        ([0.1, 1.0], "beta_2"),
        ([0.0, 0.1], "beta_1"),
        ([0.1, float("nan")], "not finite"),
        ([0.1, -0.2], "beta_2"),
        ([], "non-empty"),
    ],
)
def test_invalid_schedules_are_refused(betas, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.from_betas(betas)


def test_log_snr_underflow_is_refused():
    with pytest.raises(ValueError, match="log-SNR"):
        NoiseSchedule.from_betas([0.999] * 200)


def test_bad_num_steps():
    for make in (NoiseSchedule.linear, NoiseSchedule.cosine, NoiseSchedule.sigmoid):
        expected = r"^num_steps must be an integer in 1\.\.MAX_NUM_STEPS = 1\.\.1000000, got "
        with pytest.raises(ValueError, match=expected + "0$"):
            make(0)
        with pytest.raises(TypeError, match=expected + "True$"):
            make(True)
        with pytest.raises(ValueError, match=expected + "10000000000$"):  # refused before 80 GB are asked for
            make(10**10)


def test_coefficients_are_cached_per_device_and_dtype():
    s = NoiseSchedule.linear(10)
    c = s.coefficients("cpu", torch.float32)
    assert c is s.coefficients(torch.device("cpu"), torch.float32)
    assert c.betas.dtype == torch.float32
    assert torch.allclose(c.alphas_cumprod.double(), s.alphas_cumprod, rtol=1e-6)


def _abar_and_prev(schedule):
    beta = schedule.betas.numpy()
    abar = np.cumprod(1 - beta)
    return beta, abar, np.concatenate([[1.0], abar[:-1]])


@given(schedules())
def test_posterior_tables_are_the_conditioning_of_the_joint(schedule):
    """Given x0, x_{t-1} ~ N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) and x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) e:
    conditioning x_{t-1} on x_t (Gaussian regression) gives the posterior's coefficients and variance."""
    beta, abar, abar_prev = _abar_and_prev(schedule)
    alpha = 1 - beta
    cov = np.sqrt(alpha) * (1 - abar_prev)  # Cov(x_{t-1}, x_t | x0)
    slope = cov / (1 - abar)  # regression of x_{t-1} on x_t
    coef_x0 = np.sqrt(abar_prev) - slope * np.sqrt(abar)
    var = (1 - abar_prev) - cov**2 / (1 - abar)
    assert np.allclose(schedule.alphas.numpy(), alpha, rtol=1e-15, atol=0)
    assert np.allclose(schedule.alphas_cumprod_prev.numpy(), abar_prev, rtol=1e-12, atol=0)
    assert np.allclose(schedule.posterior_mean_coef_xt.numpy(), slope, rtol=1e-9, atol=1e-15)
    assert np.allclose(schedule.posterior_mean_coef_x0.numpy(), coef_x0, rtol=1e-9, atol=1e-12)
    assert np.allclose(schedule.posterior_variance.numpy(), var, rtol=1e-8, atol=1e-15)
    assert schedule.posterior_variance[0] == 0 and schedule.posterior_mean_coef_x0[0].item() == pytest.approx(
        1, rel=1e-9
    )
    assert schedule.posterior_mean_coef_xt[0] == 0


def test_tables_of_a_two_step_schedule_by_hand():
    """betas (0.1, 0.2): abar = (0.9, 0.72), log snr_1 = log 9, beta_tilde_2 = 0.2 * 0.1 / 0.28,
    P_2 = sqrt(0.9) * 0.2 / 0.28, Q_2 = sqrt(0.8) * 0.1 / 0.28."""
    s = NoiseSchedule.from_betas([0.1, 0.2])
    expect = {
        "alphas": [0.9, 0.8],
        "alphas_cumprod": [0.9, 0.72],
        "alphas_cumprod_prev": [1.0, 0.9],
        "log_snr": [math.log(9), math.log(0.72 / 0.28)],
        "posterior_variance": [0.0, 0.02 / 0.28],
        "posterior_mean_coef_x0": [1.0, math.sqrt(0.9) * 0.2 / 0.28],
        "posterior_mean_coef_xt": [0.0, math.sqrt(0.8) * 0.1 / 0.28],
    }
    for name, values in expect.items():
        assert getattr(s, name).tolist() == pytest.approx(values, rel=1e-12, abs=1e-15), name


def test_one_step_schedules_are_valid():
    for s in (NoiseSchedule.from_betas([0.3]), NoiseSchedule.linear(1), NoiseSchedule.cosine(1)):
        assert s.num_steps == 1 and s.alphas_cumprod_prev.tolist() == [1.0]
    assert NoiseSchedule.from_betas([0.3]).alphas_cumprod.item() == pytest.approx(0.7, rel=1e-15)


def test_linear_endpoints_and_spacing():
    s = NoiseSchedule.linear(5, 0.1, 0.5)
    assert s.betas.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5], rel=1e-12)
    default = NoiseSchedule.linear(3)
    assert default.betas.tolist() == pytest.approx([1e-4, (1e-4 + 0.02) / 2, 0.02], rel=1e-12)


@pytest.mark.parametrize("T, s, max_beta", [(10, None, None), (50, 0.02, 0.9), (7, 0.008, 0.5)])
def test_cosine_betas_follow_their_definition(T, s, max_beta):
    """beta_t = min(1 - g(t)/g(t-1), max_beta), g(t) = cos^2((t/T + s)/(1 + s) pi/2); defaults s = 0.008,
    max_beta = 0.999 (the clip always bites at t = T)."""
    kwargs = {k: v for k, v in (("s", s), ("max_beta", max_beta)) if v is not None}
    sched = NoiseSchedule.cosine(T, **kwargs)
    s, max_beta = s or 0.008, max_beta or 0.999
    g = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = [min(1 - g(t) / g(t - 1), max_beta) for t in range(1, T + 1)]
    assert sched.betas.tolist() == pytest.approx(expected, rel=1e-12)
    assert sched.betas[-1].item() == max_beta
    assert sched.description["s"] == s and sched.description["max_beta"] == max_beta


@pytest.mark.parametrize(
    "T, kwargs",
    [
        (20, {}),
        (30, {"start": -2.0, "end": 4.0, "tau": 0.7}),
        (12, {"start": -1.0, "end": 0.5, "tau": 2.0}),
        (40, {"max_beta": 0.3}),
    ],
)
def test_sigmoid_betas_follow_their_definition(T, kwargs):
    """abar(u) = (sig(b/tau) - sig((u (b - a) + a)/tau)) / (sig(b/tau) - sig(a/tau)), u = t/T, defaults
    a = -3, b = 3, tau = 1, and beta_t = min(1 - abar(t/T)/abar((t-1)/T), max_beta = 0.999)."""
    sched = NoiseSchedule.sigmoid(T, **kwargs)
    a, b, tau = kwargs.get("start", -3.0), kwargs.get("end", 3.0), kwargs.get("tau", 1.0)
    max_beta = kwargs.get("max_beta", 0.999)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    abar = lambda u: (sig(b / tau) - sig((u * (b - a) + a) / tau)) / (sig(b / tau) - sig(a / tau))  # noqa: E731
    expected = [min(1 - abar(t / T) / abar((t - 1) / T), max_beta) for t in range(1, T + 1)]
    assert sched.betas.tolist() == pytest.approx(expected, rel=1e-10)
    assert sched.betas[-1].item() == max_beta  # abar(1) = 0: the clip bites at t = T


def test_sigmoid_arguments_are_checked():
    with pytest.raises(ValueError, match="end > start"):
        NoiseSchedule.sigmoid(10, start=1.0, end=1.0)
    with pytest.raises(ValueError, match="tau > 0"):
        NoiseSchedule.sigmoid(10, tau=0.0)


def test_refusals_name_the_first_bad_beta():
    with pytest.raises(ValueError, match=r"beta_2 is not finite"):
        NoiseSchedule.from_betas([0.1, float("nan"), float("inf")])
    with pytest.raises(ValueError, match=r"beta_3 = 1\.5 is not"):
        NoiseSchedule.from_betas([0.1, 0.2, 1.5, -0.1])
    with pytest.raises(ValueError, match="1-D"):
        NoiseSchedule.from_betas([[0.1, 0.2]])


def test_stalled_alpha_bar_is_refused():
    """1 - 1e-17 rounds to 1 in float64: alpha_bar stops changing and the log-SNR is not strictly decreasing."""
    for betas in ([0.1, 1e-17], [0.1, 0.2, 0.3, 1e-17]):  # a stall after the first step, or later on
        with pytest.raises(ValueError, match="log-SNR"):
            NoiseSchedule.from_betas(betas)


def test_num_steps_must_be_a_positive_integer():
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="num_steps"):
            NoiseSchedule.cosine(bad)


# ---------------------------------------------------------------------- respacing
@st.composite
def _schedule_and_timesteps(draw):
    schedule = draw(schedules(min_steps=1, max_steps=30))
    T = schedule.num_steps
    chosen = draw(st.lists(st.integers(1, T), min_size=1, max_size=T, unique=True))
    return schedule, sorted(chosen)


@given(_schedule_and_timesteps())
def test_respaced_alpha_bar_is_the_original_at_the_visited_timesteps(case):
    """Step i of the sub-chain has abar'_i = abar_{t_i}: its marginals q(x_{t_i} | x_0) are the original chain's."""
    schedule, t = case
    sub = schedule.respace(t)
    abar = np.cumprod(1 - schedule.betas.numpy())
    assert sub.num_steps == len(t)
    # exact up to the rounding of alpha' = 1 - beta' (about 1e-16 absolute per step: relative for abar' ~ 1e-6)
    assert np.allclose(sub.alphas_cumprod.numpy(), abar[np.array(t) - 1], rtol=1e-12, atol=1e-14)
    # each beta' is 1 - prod of the skipped alphas, by an explicit product
    edges = [0] + t
    for i in range(len(t)):
        kept = np.prod(1 - schedule.betas.numpy()[edges[i] : edges[i + 1]])
        assert sub.betas[i].item() == pytest.approx(1 - kept, rel=1e-10)
    assert sub.description["kind"] == "respaced" and sub.description["timesteps"] == t
    assert sub.description["of"] == schedule.description


@given(schedules(min_steps=1, max_steps=30))
def test_respacing_at_every_timestep_gives_the_schedule_back(schedule):
    T = schedule.num_steps
    same = schedule.respace(list(range(1, T + 1)))
    assert all(torch.equal(a, b) for a, b in zip(same.tables(), schedule.tables(), strict=True))
    assert torch.equal(schedule.respace(schedule.evenly_spaced_timesteps(T)).betas, schedule.betas)


@given(_schedule_and_timesteps(), st.data())
def test_respacing_composes(case, data):
    """Respacing a respaced schedule visits the chosen timesteps of the first choice."""
    schedule, t = case
    inner = sorted(data.draw(st.lists(st.integers(1, len(t)), min_size=1, max_size=len(t), unique=True)))
    twice = schedule.respace(t).respace(inner)
    once = schedule.respace([t[i - 1] for i in inner])
    assert torch.allclose(twice.alphas_cumprod, once.alphas_cumprod, rtol=1e-12, atol=1e-14)


@given(st.integers(1, 2000), st.data())
def test_evenly_spaced_timesteps_are_evenly_spaced_with_the_same_endpoints(T, data):
    """Strictly increasing, K of them, 1 and T included (K >= 2), each within 1/2 of linspace(1, T, K)."""
    K = data.draw(st.integers(1, T))
    t = NoiseSchedule.from_betas([0.01] * T).evenly_spaced_timesteps(K).tolist()
    assert len(t) == K and all(b > a for a, b in zip(t[:-1], t[1:], strict=True))
    if K == 1:
        assert t == [T]
    else:
        ideal = 1 + np.arange(K) * (T - 1) / (K - 1)
        assert t[0] == 1 and t[-1] == T and np.all(np.abs(np.array(t) - ideal) <= 0.5)


def test_evenly_spaced_timesteps_by_hand():
    s = NoiseSchedule.linear(10)
    assert s.evenly_spaced_timesteps(1).tolist() == [10]
    assert s.evenly_spaced_timesteps(2).tolist() == [1, 10]
    assert s.evenly_spaced_timesteps(4).tolist() == [1, 4, 7, 10]
    assert s.evenly_spaced_timesteps(5).tolist() == [1, 3, 6, 8, 10]  # 1, 3.25, 5.5, 7.75, 10 rounded half up
    assert s.evenly_spaced_timesteps(10).tolist() == list(range(1, 11))


@pytest.mark.parametrize(
    "timesteps, error, match",
    [
        ([], ValueError, "non-empty"),
        ([[1, 2]], ValueError, "1-D"),
        ([0, 3], ValueError, r"1\.\.T = 1\.\.5, got 0"),
        ([2, 6], ValueError, r"1\.\.T = 1\.\.5, got 6"),
        ([1, 3, 3], ValueError, "strictly increasing, got 3 then 3 at position 2"),
        ([4, 2], ValueError, "strictly increasing, got 4 then 2"),
        ([1, 3, 3, 5, 2], ValueError, "got 3 then 3 at position 2"),  # the first offence is named
        ([1.0, 2.0], TypeError, "integers"),
        (torch.tensor([True, False]), TypeError, "integers"),
    ],
)
def test_bad_timesteps_are_refused(timesteps, error, match):
    with pytest.raises(error, match=match):
        NoiseSchedule.linear(5).respace(timesteps)


@pytest.mark.parametrize("count", [0, 6, -1, 2.0, True, "3"])
def test_bad_counts_are_refused(count):
    with pytest.raises(ValueError, match=r"count must be an integer in 1\.\.T = 1\.\.5"):
        NoiseSchedule.linear(5).evenly_spaced_timesteps(count)
