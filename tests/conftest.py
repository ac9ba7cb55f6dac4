import pyro
import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("pyrodiff", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("pyrodiff")


@pytest.fixture(autouse=True)
def _seed_and_clear():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
