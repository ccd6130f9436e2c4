"""One process of a run: its place in the process group, its log channel and its monitor, set up
and torn down in one place for every command (training, evaluation)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from ognet import dist
from ognet.monitor import Monitor

LOG = logging.getLogger("ognet")


class _ProgressBarSafeHandler(logging.Handler):
    """Writes through tqdm, so that a progress bar on the same terminal stays intact: information
    to stdout, warnings and errors to stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout if record.levelno <= logging.INFO else sys.stderr)
        except Exception:
            self.handleError(record)


class _Context(logging.Filter):
    """Adds the rank and the seconds since the run started to every record."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank, self.start = rank, time.time()

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        record.elapsed = record.created - self.start
        return True


FORMAT = "[%(asctime)s +%(elapsed).1fs r%(rank)d%(levelmark)s] %(message)s"
PACKAGES = ("ognet", "torch", "numpy", "webdataset", "deepspeed", "triton")


def setup_logging(info: dist.DistInfo, log_file: Path | None = None) -> None:
    """The `ognet` log channel: information from the main rank, warnings from every rank, each line
    with its wall-clock time, the time since the start and the rank (`[18:04:05 +12.3s r0] ...`),
    on the terminal and, with `log_file`, in that file (the main rank's; another rank's warnings go
    to `<stem>.rank<r>.log` beside it, created only if there is one). DataLoader workers inherit it.
    Calling it again replaces the previous set-up."""
    context = _Context(info.rank)
    handlers: list[logging.Handler] = [_ProgressBarSafeHandler()]
    if log_file is not None:
        path = log_file if info.is_main else log_file.with_name(f"{log_file.stem}.rank{info.rank}.log")
        handlers.append(logging.FileHandler(path, delay=not info.is_main))
    for old in LOG.handlers[:]:
        LOG.removeHandler(old)
        old.close()
    for handler in handlers:
        handler.addFilter(context)
        handler.addFilter(_level_mark)
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        LOG.addHandler(handler)
    LOG.setLevel(logging.INFO if info.is_main else logging.WARNING)


def _level_mark(record: logging.LogRecord) -> bool:
    record.levelmark = "" if record.levelno == logging.INFO else f" {record.levelname}"
    return True


def log_provenance(info: dist.DistInfo) -> None:
    """What a log needs to be read later: the command line, the code's git commit, the versions."""
    versions = []
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{name} {importlib.metadata.version(name)}")
    LOG.info("command: %s", shlex.join(sys.argv))
    LOG.info("code: %s", _git_commit())
    LOG.info("versions: python %s, %s", platform.python_version(), ", ".join(versions))
    LOG.info(
        "host %s, %d process(es), this one rank %d on %s", platform.node(), info.world_size, info.rank, info.device
    )


def _git_commit() -> str:
    """The commit of the ognet source in use, if it is a git checkout ("+ changes" when modified)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git)"
    if commit.returncode:
        return f"unknown (not a git checkout: {here})"
    return commit.stdout.strip() + (" + changes" if dirty.stdout.strip() else "")


@contextlib.contextmanager
def session(run_dir: Path, log_name: str, timeout_s: float) -> Iterator[tuple[dist.DistInfo, Monitor]]:
    """Join the process group (or none), set up logging (`<run_dir>/<log_name>`) and the main rank's
    monitor (`<run_dir>/tb`); leave both on the way out, also after an error."""
    info = dist.init_distributed(timeout_s=timeout_s)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()  # the folder exists before any rank opens a file in it
    setup_logging(info, run_dir / log_name)
    log_provenance(info)
    monitor = Monitor(run_dir / "tb", info.is_main)
    try:
        yield info, monitor
    finally:
        monitor.close()
        dist.cleanup()
