"""Fixtures shared by the engine tests."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread for a module, as the official fixtures were made (and much faster for these
    tiny models on a busy machine); the previous count is restored after it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
