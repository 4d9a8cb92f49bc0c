import pytest
import torch
from hypothesis import settings

settings.register_profile("linalg", max_examples=25, deadline=None)
settings.load_profile("linalg")


@pytest.fixture
def two_threads():
    """torch at two threads for the test (the workers' pool is sized by it), the caller's count restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)
