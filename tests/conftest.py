"""Fixtures shared by several test files (data set fixtures live in data_fixtures.py)."""

import os

import pytest
import torch

# Under pytest-xdist each worker shares the cores with the others: one intra-op thread per worker
# avoids oversubscription (the tests' subprocesses already run with OMP_NUM_THREADS=1).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


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

    try:
        return importlib.import_module(module)
    except ImportError as e:
        message = f"{module} is missing ({e}): {why}"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; under CI nothing may be skipped", pytrace=False)
        pytest.skip(message)


def require_program(program: str, why: str) -> str:
    """The path of an executable a test needs; missing: skip outside CI, fail under CI."""
    import shutil

    path = shutil.which(program)
    if path is None:
        message = f"{program} is not on PATH: {why}"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; under CI nothing may be skipped", pytrace=False)
        pytest.skip(message)
    return path


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    """Under pytest-xdist with `--dist loadgroup` (tests/run.sh), the tests of a module that share a
    module-scoped fixture (often a training run, also one imported from another test file) or a
    session-scoped one of its own (the SLURM cluster) stay on one worker, so that it is made once;
    every other test is handed out on its own. First: xdist's worker turns the marks into groups in
    its own hook of this name, which otherwise runs before this one and sees none."""
    for item in items:
        module = getattr(item, "module", None)
        info = getattr(item, "_fixtureinfo", None)
        if module is None or info is None:
            continue
        if any(
            (d.scope == "module" and d.argname != "one_thread")  # made once per module, wherever defined
            or (d.scope == "session" and getattr(d.func, "__module__", None) == module.__name__)
            for defs in info.name2fixturedefs.values()
            for d in defs
        ):
            item.add_marker(pytest.mark.xdist_group(module.__name__))
    if getattr(config.option, "loadgroup", False):  # an xdist worker's (its `dist` option reads "no")
        # Longest first (tests/run.sh passes --no-loadscope-reorder, so xdist hands out work in this
        # order): the slow tests, and the groups holding one, before the many quick ones, so that no
        # worker is still running a long test when the others have run out of work.
        def unit(item) -> str:
            group = item.get_closest_marker("xdist_group")
            return group.args[0] if group else item.nodeid

        slow = {unit(item) for item in items if item.get_closest_marker("slow")}
        items.sort(key=lambda item: unit(item) not in slow)  # stable: collection order otherwise


def pytest_configure(config) -> None:
    """Stop, rather than run the suite slower and differently, where xdist cannot make its groups:
    pytest-xdist 3.8 groups by appending `@group` to each test's nodeid, which pytest 9.2 made
    read-only (the groups are then silently lost; pyproject.toml pins pytest below 9.2)."""
    version = tuple(int(part) for part in pytest.__version__.split(".")[:2])
    if getattr(config.option, "dist", "no") == "loadgroup" and version >= (9, 2):
        raise pytest.UsageError(
            f"pytest {pytest.__version__} breaks pytest-xdist's --dist loadgroup (tests sharing a module fixture "
            "would be split over workers and repeat it): install the pytest named in pyproject.toml's dev extra"
        )
