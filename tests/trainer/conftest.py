import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # The tiny models here are dominated by per-op overhead: on a shared 2-core machine two intra-op
    # threads spin against each other (measured 40x slower than one thread under load).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
