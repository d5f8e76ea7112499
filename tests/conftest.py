"""Test-session settings.

One torch thread: the tests use many tiny linear-algebra calls, for which a second OpenMP thread
only adds synchronisation, and on a shared 2-core machine a spinning second thread made single
tests up to 100x slower. It also makes float results independent of the machine's core count.
"""
import pytest
import torch

from cases import CASE_IDS, CASES, SEEDS


def pytest_configure(config):
    torch.set_num_threads(1)


@pytest.fixture
def float64():
    """float64 default dtype and a fixed seed for one test (geometry modules use it for every test)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(1234)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(params=SEEDS)
def seed(request):
    torch.manual_seed(request.param)
    return request.param


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request, seed):
    return request.param
