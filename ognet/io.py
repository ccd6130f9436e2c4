"""Small file-system helpers: a file exists only once it is complete; a YAML file names itself in errors."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import yaml

from ognet.errors import OgnetError

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OgnetError):
    """A file could not be written for lack of space (full disk or quota); nothing already there changed."""


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write to a temporary file beside `path`, fsync it, then rename it into place.

    A crash or an error leaves the previous version of `path` untouched and no partial file under
    its name; an error also removes the temporary file. A full disk raises `DiskFullError` naming
    `path`, also where the writer wrapped the OSError (torch.save raises a RuntimeError).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        full = _disk_full(e)
        if full is not None and not isinstance(e, DiskFullError):
            raise DiskFullError(
                f"{path}: not written: {os.strerror(full.errno).lower()} ({_free(path.parent)} free "
                f"in {path.parent}); files already there are untouched"
            ) from e
        raise


def remove_partials(folder: str | os.PathLike, name_pattern: str = "*") -> list[Path]:
    """Delete what killed writers left in `folder`: the temporary files of `atomic_write` for the
    targets matching the glob `name_pattern`. Call it only where nobody is writing those targets now."""
    removed = sorted(Path(folder).glob(f".{name_pattern}.*{PARTIAL_SUFFIX}"))
    for p in removed:
        p.unlink(missing_ok=True)
    if removed:
        log.warning(
            "removed %d partial file(s) left by an interrupted write: %s",
            len(removed),
            ", ".join(str(p) for p in removed),
        )
    return removed


def _disk_full(error: BaseException | None) -> OSError | None:
    """The ENOSPC/EDQUOT OSError behind `error`, following its chain of causes."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            return error
        error = error.__cause__ or error.__context__
    return None


def _free(folder: Path) -> str:
    try:
        st = os.statvfs(folder)
    except OSError:
        return "unknown space"
    return f"{st.f_bavail * st.f_frsize / 2**20:.1f} MiB"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_yaml_mapping(path: Path, what: str, error: type[OgnetError] = OgnetError) -> dict:
    """A YAML file that must hold a mapping (an empty file is an empty one); errors name the file."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        raise error(f"{path}: {what} is not valid YAML ({e})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: {what} must be a mapping of keys, got {type(data).__name__}")
    return data
