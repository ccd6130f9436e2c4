"""Where packed splits live, and how a name read from an index becomes a path, a URL or a command.

A location is one of
- a local folder (`data/market/shards/query`),
- an fsspec URL prefix (`http(s)://`, `s3://`, `gs://`, `file://`, `memory://`, ...),
- a `pipe:` shell command template. `{}` stands for the file to read, relative to the data root:
  `pipe:aws s3 cp s3://bucket/market/{} -` reads `s3://bucket/market/query/index.json` as
  `aws s3 cp s3://bucket/market/query/index.json -`. Without `{}` the file is appended
  (`pipe:cat /data/query/` + `shard-000000.tar`).

Names that come from data (shard names in an index) are never trusted: they must be plain file
names of letters, digits, `.`, `_` and `-` (not starting with `.` or `-`, at most 255 characters), and
what is inserted into a command is quoted with `shlex.quote` as well. The template itself comes
from the user's config and is run by the shell as written.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from ognet.errors import ShardError

PIPE = "pipe:"
PLACEHOLDER = "{}"
MAX_NAME = 255
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")  # no leading "-": a command would take it for an option
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_safe_name(name: object) -> bool:
    """A plain file name that is the same on every file system and in a shell word."""
    return isinstance(name, str) and 0 < len(name) <= MAX_NAME and _SAFE_NAME.fullmatch(name) is not None


def check_name(name: object, source: str, what: str = "name") -> str:
    """`name` if it is safe to put into a path, a URL or a command; else a ShardError naming `source`."""
    if not is_safe_name(name):
        shown = (
            repr(name) if not isinstance(name, str) or len(name) <= 80 else f"{name[:80]!r}... ({len(name)} characters)"
        )
        raise ShardError(
            f"{source}: {what} {shown} is not a plain file name (letters, digits, '.', '_', '-'; "
            f"not starting with '.' or '-'; at most {MAX_NAME} characters)"
        )
    return name


def is_pipe(location: str | os.PathLike) -> bool:
    return str(location).startswith(PIPE)


def is_url(location: str | os.PathLike) -> bool:
    """An fsspec URL (`scheme://...`); local folders and `pipe:` commands are not."""
    return _URL.match(str(location)) is not None


def is_remote(location: str | os.PathLike) -> bool:
    return is_pipe(location) or is_url(location)


def _insert(location: str, text: str) -> str:
    if is_pipe(location) and PLACEHOLDER in location:
        return location.replace(PLACEHOLDER, text)  # every {}: a template may name the file twice
    if location.endswith(("/", " ")):
        return location + text
    return f"{location}/{text}"


def join_location(location: str | os.PathLike, name: str) -> str:
    """The location of the folder `name` inside `location` (a split inside a data root)."""
    location = str(location)
    if not is_remote(location):
        return str(Path(location) / name)
    parts = [check_name(part, location) for part in name.strip("/").split("/")]
    joined = "/".join(shlex.quote(p) for p in parts) if is_pipe(location) else "/".join(parts)
    if is_pipe(location) and PLACEHOLDER in location:
        return _insert(location, f"{joined}/{PLACEHOLDER}")
    return _insert(location, joined)


def file_location(location: str | os.PathLike, name: str) -> str:
    """The path, URL or `pipe:` command that reads the file `name` (e.g. a shard) of `location`.

    `name` must be a safe name (checked here too, whatever checked it before)."""
    location = str(location)
    check_name(name, location)
    if not is_remote(location):
        return str(Path(location) / name)
    return _insert(location, shlex.quote(name) if is_pipe(location) else name)


def pipe_command(location: str) -> str:
    """The shell command of a `pipe:` file location."""
    return location[len(PIPE) :]
