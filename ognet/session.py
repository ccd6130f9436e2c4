"""One process of a run: its place in the process group, its log channel and its monitor, set up
and torn down in one place for every command (training, evaluation)."""

from __future__ import annotations

import contextlib
import logging
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


def setup_logging(info: dist.DistInfo) -> None:
    """The `ognet` log channel: information from the main rank, warnings from every rank, each line
    with its wall-clock time, the time since the start and the rank (`[18:04:05 +12.3s r0] ...`).
    DataLoader workers inherit it. Calling it again replaces the previous set-up."""
    handler = _ProgressBarSafeHandler()
    handler.addFilter(_Context(info.rank))
    handler.setFormatter(
        logging.Formatter("[%(asctime)s +%(elapsed).1fs r%(rank)d%(levelmark)s] %(message)s", datefmt="%H:%M:%S")
    )
    handler.addFilter(_level_mark)
    for old in LOG.handlers[:]:
        LOG.removeHandler(old)
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO if info.is_main else logging.WARNING)


def _level_mark(record: logging.LogRecord) -> bool:
    record.levelmark = "" if record.levelno == logging.INFO else f" {record.levelname}"
    return True


@contextlib.contextmanager
def session(timeout_s: float, tensorboard_dir: Path | None) -> Iterator[tuple[dist.DistInfo, Monitor]]:
    """Join the process group (or none), set up logging and the main rank's monitor; leave both
    on the way out, also after an error."""
    info = dist.init_distributed(timeout_s=timeout_s)
    setup_logging(info)
    monitor = Monitor(tensorboard_dir, info.is_main)
    try:
        yield info, monitor
    finally:
        monitor.close()
        dist.cleanup()
