import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """DUAL's networks are small MLPs: a second thread only adds contention (8x slower here
    under load), as in `genunc rl`, which runs on one thread unless told otherwise."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
