"""Shared fixtures. Helpers that tests import as functions (data writers, frozen layers from block
lists, structure setters) live in tests/fixtures.py: pytest puts this folder on the import path
(its default "prepend" import mode), so test files import them with ``from fixtures import ...``."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (restored after): for tiny matrices one thread is the
    fastest, and far faster than several on a loaded two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
