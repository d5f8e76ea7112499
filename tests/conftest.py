"""Test-session settings.

One torch thread: the tests use many tiny linear-algebra calls, for which a second OpenMP thread
only adds synchronisation, and on a shared 2-core machine a spinning second thread made single
tests up to 100x slower. It also makes float results independent of the machine's core count.
"""
import torch


def pytest_configure(config):
    torch.set_num_threads(1)
