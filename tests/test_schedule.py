import math

import pytest
import torch
from hypothesis import given

from pyrodiff import NoiseSchedule
from pyrodiff.testing import schedules


@given(schedules())
def test_derived_quantities(schedule):
    b = schedule.betas
    abar = torch.ones(())
    for t in range(schedule.num_steps):
        abar = abar * (1 - b[t])
        assert torch.isclose(schedule.alphas_cumprod[t], abar, rtol=1e-12)
    assert schedule.alphas_cumprod.dtype == torch.float64
    assert (schedule.log_snr[1:] < schedule.log_snr[:-1]).all()
    assert torch.allclose(schedule.log_snr, torch.log(abar_ := schedule.alphas_cumprod) - torch.log(1 - abar_))
    assert schedule.alphas_cumprod_prev[0] == 1


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
    with pytest.raises(ValueError, match="num_steps"):
        NoiseSchedule.linear(0)


def test_coefficients_are_cached_per_device_and_dtype():
    s = NoiseSchedule.linear(10)
    c = s.coefficients("cpu", torch.float32)
    assert c is s.coefficients(torch.device("cpu"), torch.float32)
    assert c.betas.dtype == torch.float32
    assert torch.allclose(c.alphas_cumprod.double(), s.alphas_cumprod, rtol=1e-6)
