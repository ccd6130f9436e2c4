"""Reading bytes from a location that is not a local folder: fsspec URLs and `pipe:` commands.

Every read is bounded in time and retried: a request that fails for a reason that may pass
(a dropped connection, a stall past `timeout_s`, a truncated response, a 5xx) is tried again
after an exponential back-off (`backoff_s`, doubling), with a warning naming the URL; a missing
object (404) or a refusal (4xx) is not. The last failure is a `ShardError` naming the URL and
what went wrong; a `pipe:` command's failure carries the end of its stderr.

fsspec URLs are read by byte ranges (`read_range`), which object stores and HTTP servers serve
without sending the whole object, and streams (`open_stream`) are sequences of large ranges, so
a dropped connection costs one chunk, not the shard. A `pipe:` command can only be read from the
start: its output is a stream, read with a timeout per read.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ognet.data.locations import is_pipe, is_url, pipe_command
from ognet.errors import ShardError

log = logging.getLogger(__name__)
T = TypeVar("T")
STREAM_CHUNK = 8 * 2**20  # bytes per range request of a stream: one request per 8 MiB costs little
STDERR_TAIL = 2000  # characters of a failed command's stderr put into the error


@dataclass(frozen=True)
class RemoteOptions:
    """How remote data is read (the `data.remote_*` config keys)."""

    timeout_s: float = 60.0  # one request (or one read of a pipe) that takes longer fails
    retries: int = 3  # further attempts after a failure that may pass
    backoff_s: float = 1.0  # first wait before a retry, doubled each time
    storage_options: dict = field(default_factory=dict)  # fsspec options (credentials, endpoint, ...)


class CommandError(ShardError):
    """A `pipe:` command that failed or stalled: `detail` says how, with its stderr."""

    def __init__(self, location: str, detail: str):
        super().__init__(f"{location}: {detail}")
        self.detail = detail


class PermanentError(Exception):
    """A failure that retrying cannot mend (missing object, refused request, server without ranges)."""


# ------------------------------------------------------------------------------------------------
# Retries


def with_retries(what: str, attempt: Callable[[], T], options: RemoteOptions) -> T:
    """`attempt()` until it succeeds, at most 1 + retries times; `what` names the URL and range."""
    tries = 1 + max(options.retries, 0)
    for n in range(1, tries + 1):
        try:
            return attempt()
        except (PermanentError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
            raise ShardError(f"{what}: {_describe(e, options)}") from e
        except Exception as e:  # noqa: BLE001 (transports raise many types; whatever it is, it is named)
            if _status(e) is not None and _status(e) < 500 and _status(e) != 429:
                raise ShardError(f"{what}: {_describe(e, options)}") from e
            if n == tries:
                raise ShardError(f"{what}: failed after {tries} attempts ({_describe(e, options)})") from e
            delay = options.backoff_s * 2 ** (n - 1) * random.uniform(0.75, 1.25)  # jitter: ranks do not retry in step
            log.warning(f"{what}: attempt {n}/{tries} failed ({_describe(e, options)}); retrying in {delay:.1f} s")
            time.sleep(delay)
    raise AssertionError("unreachable")


def _status(error: Exception) -> int | None:
    status = getattr(error, "status", None)  # aiohttp.ClientResponseError and friends
    return status if isinstance(status, int) else None


def _describe(error: BaseException, options: RemoteOptions) -> str:
    if isinstance(error, CommandError):
        return error.detail
    if isinstance(error, (ShardError, PermanentError)):
        return str(error)
    if isinstance(error, FileNotFoundError):
        return "not found (404 or no such object)"
    if _status(error) is not None:
        return f"HTTP {_status(error)} {getattr(error, 'message', '')}".strip()
    if isinstance(error, TimeoutError) or type(error).__name__ in ("FSTimeoutError", "TimeoutError"):
        return f"no answer within {options.timeout_s:g} s (timeout)"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


# ------------------------------------------------------------------------------------------------
# fsspec


def filesystem(url: str, options: RemoteOptions):
    """(fsspec filesystem, path) for a URL. HTTP gets connect and read timeouts of `timeout_s`
    unless storage_options set its client's own; fsspec reuses one instance per process."""
    import fsspec  # imported here: local-only runs never pay for it (and its http backend's start-up)

    storage = dict(options.storage_options)
    if url.startswith(("http://", "https://")) and "client_kwargs" not in storage:
        import aiohttp  # fsspec's HTTP backend; only HTTP URLs need it

        t = options.timeout_s
        storage["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, connect=t, sock_read=t)}
    try:
        return fsspec.core.url_to_fs(url, **storage)
    except (ImportError, ValueError) as e:  # an unknown protocol or its package missing (s3fs, gcsfs)
        raise ShardError(f"{url}: cannot open this kind of location ({e})") from e


def _call(fs, name: str, timeout_s: float, *args, **kwargs):
    """fs.<name>(...) bounded by timeout_s: async filesystems (http, s3, gcs) run the coroutine on
    fsspec's loop with a deadline (the request is cancelled); others are local and called directly."""
    if getattr(fs, "async_impl", False):
        import fsspec.asyn

        return fsspec.asyn.sync(fs.loop, getattr(fs, f"_{name}"), *args, timeout=timeout_s, **kwargs)
    return getattr(fs, name)(*args, **kwargs)


def read_range(url: str, start: int, end: int, options: RemoteOptions) -> bytes:
    """Bytes [start, end) of the object at `url`, exactly: a short or long answer is retried, then
    an error (a server that ignores ranges sends the whole object: a permanent error)."""
    fs, path = filesystem(url, options)

    def attempt() -> bytes:
        data = _call(fs, "cat_file", options.timeout_s, path, start=start, end=end)
        if len(data) != end - start:
            if start > 0 and len(data) > end - start:
                raise PermanentError(
                    f"the server sent {len(data)} bytes for a range of {end - start}: it does not serve byte "
                    "ranges (use data.remote_cache=shard)"
                )
            raise ShardError(f"truncated response ({len(data)} of {end - start} bytes)")
        return data

    return with_retries(f"{url} (bytes {start}-{end - 1})", attempt, options)


def remote_size(url: str, options: RemoteOptions) -> int:
    fs, path = filesystem(url, options)
    size = with_retries(url, lambda: _call(fs, "size", options.timeout_s, path), options)
    if size is None:
        raise ShardError(f"{url}: the server does not say how large the object is")
    return int(size)


# ------------------------------------------------------------------------------------------------
# pipe: commands


class PipeStream(io.RawIOBase):
    """The standard output of a `pipe:` command as a stream. A read that gets nothing for
    `timeout_s` kills the command; an exit status other than 0 is an error with its stderr."""

    def __init__(self, location: str, timeout_s: float):
        self.location, self.timeout_s = location, timeout_s
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close()); a file, not a pipe: a chatty command cannot block on it
        self._proc = subprocess.Popen(
            pipe_command(location),
            shell=True,  # the user's own command template; names from data were checked and quoted
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, killed whole on a timeout
        )
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._done:
            return 0
        fd = self._proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], self.timeout_s)
        if not ready:
            self._kill()
            raise CommandError(self.location, f"no output for {self.timeout_s:g} s, the command was stopped")
        data = os.read(fd, len(buffer))
        if not data:
            self._finish()
            return 0
        buffer[: len(data)] = data
        return len(data)

    def _finish(self) -> None:
        self._done = True
        try:
            code = self._proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            self._kill()
            raise ShardError(
                f"{self.location}: closed its output but did not exit within {self.timeout_s:g} s"
            ) from None
        if code != 0:
            raise CommandError(self.location, f"the command exited with status {code}: {self.stderr_tail()}")

    def stderr_tail(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace").strip()
        return (text[-STDERR_TAIL:] if text else "(no output on stderr)").replace("\n", " | ")

    def _kill(self) -> None:
        self._done = True
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()

    def close(self) -> None:
        if not self.closed:
            self._kill()
            self._proc.stdout.close()
            self._stderr.close()
        super().close()


def _read_pipe_once(location: str, options: RemoteOptions) -> bytes:
    with PipeStream(location, options.timeout_s) as stream:
        return stream.read()


# ------------------------------------------------------------------------------------------------
# Whole files and streams, whatever the location


class RangeStream(io.RawIOBase):
    """An fsspec object of known size read front to back by ranges of `chunk` bytes, each retried."""

    def __init__(self, url: str, size: int, options: RemoteOptions, chunk: int = STREAM_CHUNK):
        self.url, self.size, self.options, self.chunk = url, size, options, chunk
        self._pos, self._data, self._data_pos = 0, b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._data_pos >= len(self._data):
            if self._pos >= self.size:
                return 0
            end = min(self._pos + self.chunk, self.size)
            self._data, self._data_pos = read_range(self.url, self._pos, end, self.options), 0
            self._pos = end
        n = min(len(buffer), len(self._data) - self._data_pos)
        buffer[:n] = self._data[self._data_pos : self._data_pos + n]
        self._data_pos += n
        return n


def open_stream(location: str, size: int, options: RemoteOptions) -> io.BufferedReader:
    """A file, URL or `pipe:` command as a buffered binary stream of (about) `size` bytes."""
    if is_pipe(location):
        return io.BufferedReader(PipeStream(location, options.timeout_s), 2**20)
    if is_url(location):
        return io.BufferedReader(RangeStream(location, size, options), 2**20)
    try:
        return open(location, "rb")  # noqa: SIM115 (the caller closes it)
    except OSError as e:
        raise ShardError(f"{location}: cannot open ({e.strerror or e})") from e


def read_whole(location: str, options: RemoteOptions, what: str = "file") -> bytes:
    """A small file (an index) from any kind of location; errors say "<location>: cannot read <what>"."""
    if is_pipe(location):
        return with_retries(f"{location}: cannot read {what}", lambda: _read_pipe_once(location, options), options)
    if is_url(location):
        fs, path = filesystem(location, options)
        return with_retries(
            f"{location}: cannot read {what}", lambda: _call(fs, "cat_file", options.timeout_s, path), options
        )
    try:
        return Path(location).read_bytes()
    except OSError as e:
        raise ShardError(f"{location}: cannot read {what} ({e.strerror or e})") from e
