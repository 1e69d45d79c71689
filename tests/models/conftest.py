import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """These tests run tiny tensors, where a second intra-op thread only adds synchronisation; on a
    shared, oversubscribed 2-core machine that synchronisation made backward passes ~100x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
