"""Fixtures shared by several test files (data set fixtures live in data_fixtures.py)."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors gain nothing from threads, and on busy shared cores the hand-offs made some
    files several times slower. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
