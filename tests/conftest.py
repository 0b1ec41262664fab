import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/fixtures.py


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (restored after): for tiny matrices one thread is the
    fastest, and far faster than several on a loaded two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
