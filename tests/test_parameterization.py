"""Targets and reverse variances against independent derivations (float64).

The conversions are checked against the defining relations x_t = sqrt(abar) x0 + sqrt(1 - abar) eps and
v = sqrt(abar) eps - sqrt(1 - abar) x0; the variance tables against their definition from the betas
(MATH.md, section 3), recomputed here in numpy.
"""

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pyrodiff.chain.parameterization import (
    TARGETS,
    VARIANCES,
    eps_to_x0,
    parse_target,
    parse_variance,
    v_to_eps,
    v_to_x0,
    x0_to_eps,
)
from pyrodiff.chain.schedule import NoiseSchedule
from pyrodiff.testing import schedules

values = arrays(np.float64, 5, elements=st.floats(-3, 3))


def _triple(abar, x0, eps):
    """x_t and v from their definitions, in numpy."""
    xt = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps
    v = np.sqrt(abar) * eps - np.sqrt(1 - abar) * x0
    return xt, v


@given(st.floats(0.01, 0.99), values, values)
@example(0.3, np.array([1.0, -0.5, 0.2, 2.0, -1.5]), np.array([0.4, 1.2, -0.7, -2.0, 0.1]))
def test_conversions_invert_the_definitions(abar, x0, eps):
    xt, v = _triple(abar, x0, eps)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    ab = torch.full((5,), abar, dtype=torch.float64)
    assert np.allclose(eps_to_x0(t(eps), t(xt), ab).numpy(), x0, rtol=1e-9, atol=1e-9)
    assert np.allclose(x0_to_eps(t(x0), t(xt), ab).numpy(), eps, rtol=1e-9, atol=1e-9)
    assert np.allclose(v_to_x0(t(v), t(xt), ab).numpy(), x0, rtol=1e-9, atol=1e-9)
    assert np.allclose(v_to_eps(t(v), t(xt), ab).numpy(), eps, rtol=1e-9, atol=1e-9)
    # each target reads its own quantity as the network's output and returns x0
    for name, out in (("epsilon", eps), ("x0", x0), ("v", v)):
        assert np.allclose(TARGETS[name].to_x0(t(out), t(xt), ab).numpy(), x0, rtol=1e-9, atol=1e-9), name


def test_conversions_on_known_numbers():
    """abar = 0.64: sqrt(abar) = 0.8, sqrt(1 - abar) = 0.6; x0 = 1, eps = 2 give x_t = 2, v = 1."""
    one = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    abar, xt = one(0.64), one(2.0)
    assert eps_to_x0(one(2.0), xt, abar).item() == pytest.approx(1.0, abs=1e-12)
    assert x0_to_eps(one(1.0), xt, abar).item() == pytest.approx(2.0, abs=1e-12)
    assert v_to_x0(one(1.0), xt, abar).item() == pytest.approx(1.0, abs=1e-12)
    assert v_to_eps(one(1.0), xt, abar).item() == pytest.approx(2.0, abs=1e-12)


def _tables(schedule):
    """beta, beta_tilde with beta_tilde_1 replaced by beta_tilde_2 ("small"), and "large", from the betas."""
    beta = schedule.betas.numpy().copy()
    abar = np.cumprod(1 - beta)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    beta_tilde = beta * (1 - abar_prev) / (1 - abar)
    small = np.concatenate([[beta_tilde[1]], beta_tilde[1:]])
    large = np.concatenate([[beta_tilde[1]], beta[1:]])
    return beta, small, large


@given(schedules())
def test_fixed_variance_tables_follow_their_definition(schedule):
    _, small, large = _tables(schedule)
    assert np.allclose(VARIANCES["small"].table(schedule).numpy(), small, rtol=1e-12, atol=0)
    assert np.allclose(VARIANCES["large"].table(schedule).numpy(), large, rtol=1e-12, atol=0)


def test_fixed_variance_tables_on_a_two_step_schedule():
    """T = 2, betas (0.1, 0.2): beta_tilde_2 = 0.2 * 0.1 / (1 - 0.9 * 0.8) = 0.02 / 0.28."""
    schedule = NoiseSchedule.from_betas([0.1, 0.2])
    bt2 = 0.02 / 0.28
    assert torch.allclose(VARIANCES["small"].table(schedule), torch.tensor([bt2, bt2], dtype=torch.float64))
    assert torch.allclose(VARIANCES["large"].table(schedule), torch.tensor([bt2, 0.2], dtype=torch.float64))


@pytest.mark.parametrize("name", ["small", "large"])
def test_fixed_variance_at_timesteps(name):
    schedule = NoiseSchedule.linear(7, 0.02, 0.3)
    _, small, large = _tables(schedule)
    table = {"small": small, "large": large}[name]
    t = torch.tensor([[1, 7, 3], [2, 2, 5]])
    like = torch.zeros(2, 3, 4, 5, dtype=torch.float32)
    var = VARIANCES[name].variance(schedule, t, 2, like)
    assert var.shape == (2, 3, 1, 1) and var.dtype == torch.float32
    assert np.allclose(var[..., 0, 0].double().numpy(), table[t.numpy() - 1], rtol=1e-6)


@given(schedules(), st.data())
def test_learned_variance_interpolates_in_the_log_domain(schedule, data):
    """sigma^2 = exp(f log beta_t + (1 - f) log beta_tilde_t) with beta_tilde_1 := beta_tilde_2,
    f = (v + 1) / 2 per dimension; v is not clamped."""
    T = schedule.num_steps
    beta, small, _ = _tables(schedule)
    t = torch.arange(1, T + 1)
    v = data.draw(arrays(np.float64, (T, 3), elements=st.floats(-2, 2)))
    var = VARIANCES["learned"].variance(schedule, t, 1, torch.zeros(T, 3, dtype=torch.float64), torch.tensor(v))
    f = (v + 1) / 2
    expected = np.exp(f * np.log(beta)[:, None] + (1 - f) * np.log(small)[:, None])
    assert var.shape == (T, 3)
    assert np.allclose(var.numpy(), expected, rtol=1e-10, atol=0)


def test_learned_variance_end_points():
    schedule = NoiseSchedule.from_betas([0.1, 0.2, 0.3])
    beta, small, _ = _tables(schedule)
    t = torch.tensor([1, 2, 3])
    like = torch.zeros(3, 1, dtype=torch.float64)
    learned = VARIANCES["learned"]
    lo = learned.variance(schedule, t, 1, like, torch.full((3, 1), -1.0, dtype=torch.float64))
    hi = learned.variance(schedule, t, 1, like, torch.full((3, 1), 1.0, dtype=torch.float64))
    mid = learned.variance(schedule, t, 1, like, torch.zeros(3, 1, dtype=torch.float64))
    assert np.allclose(lo[:, 0].numpy(), small, rtol=1e-12)
    assert np.allclose(hi[:, 0].numpy(), beta, rtol=1e-12)
    assert np.allclose(mid[:, 0].numpy(), np.sqrt(beta * small), rtol=1e-12)
    with pytest.raises(ValueError, match="interpolation output"):
        learned.variance(schedule, t, 1, like)


def test_output_channels():
    for name in ("small", "large"):
        assert VARIANCES[name].output_channels(3) == 3
    assert VARIANCES["learned"].output_channels(3) == 6


def test_parsing():
    for name, target in TARGETS.items():
        assert parse_target(name) is target and parse_target(target) is target and target.name == name
    for name, variance in VARIANCES.items():
        assert parse_variance(name) is variance and parse_variance(variance) is variance and variance.name == name
    assert VARIANCES["learned"].learned and not VARIANCES["small"].learned and not VARIANCES["large"].learned
    with pytest.raises(ValueError, match="prediction"):
        parse_target("score")
    with pytest.raises(ValueError, match="prediction"):
        parse_target(3)
    with pytest.raises(ValueError, match="variance"):
        parse_variance("fixed")
    with pytest.raises(NotImplementedError):
        VARIANCES["learned"].table(NoiseSchedule.linear(3))
