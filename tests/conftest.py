"""Suite-wide settings."""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The test models are tiny: one thread is fastest, and on a shared 2-core machine several
    OpenMP threads spin-wait on each other (tiny-model generation measured up to 30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
