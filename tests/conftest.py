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


def require(module: str, why: str):
    """Import `module` for a test that needs it. Missing: outside CI the test skips saying why; under
    CI (the `CI` variable set) it fails, naming what is missing, since CI must run everything."""
    import importlib
    import os

    try:
        return importlib.import_module(module)
    except ImportError as e:
        message = f"{module} is missing ({e}): {why}"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; under CI nothing may be skipped", pytrace=False)
        pytest.skip(message)


def require_program(program: str, why: str) -> str:
    """The path of an executable a test needs; missing: skip outside CI, fail under CI."""
    import os
    import shutil

    path = shutil.which(program)
    if path is None:
        message = f"{program} is not on PATH: {why}"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; under CI nothing may be skipped", pytrace=False)
        pytest.skip(message)
    return path
