"""Shared test setup."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the tiny shapes of the tests gain nothing from more, and a shared 2-core
    machine with OpenMP spinning on both cores is many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
