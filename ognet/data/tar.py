"""A small, strict tar reader: what shards may hold, and nothing else.

`tarfile` costs more per sample than decoding the arrays, and accepts everything tar can hold;
this reader walks the 512-byte headers itself and passes only regular files with safe relative
names. It understands what other tools write around them: POSIX ustar name prefixes, PAX
extended headers (`path`, `size`; `webdataset.TarWriter` writes one per member) and GNU long
names (GNU tar). Links, devices, FIFOs, sparse files, names that are absolute or climb out with
`..`, bad header checksums, sizes outside 0..MAX_MEMBER_BYTES and truncated members are errors
naming `where`. Nothing is ever extracted to disk.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

from ognet.errors import ShardError

TAR_BLOCK = 512
MAX_MEMBER_BYTES = 256 * 2**20
_ZERO_BLOCK = bytes(TAR_BLOCK)
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE)
_PAX, _PAX_GLOBAL, _GNU_NAME = tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME


class Member(NamedTuple):
    """A regular file of a tar: its name, data, and the byte range it takes in the tar, from its
    first header (extension headers included) to the end of its padded data."""

    name: str
    data: bytes
    start: int
    end: int


def safe_member_name(name: str) -> str | None:
    """`name` without leading `./`, or None when it is not a relative path inside the tar whose
    parts are plain (no `..`, no hidden or empty parts, no backslash or NUL)."""
    while name.startswith("./"):
        name = name[2:]
    parts = name.split("/")
    if not name or "\\" in name or "\0" in name or any(not p or p.startswith(".") for p in parts):
        return None
    return name


def iter_members(f: BinaryIO, where: str, skip_directories: bool = False) -> Iterator[Member]:
    """The regular files of the tar read from `f`, in order, until its end-of-archive block (or
    the end of the data). `skip_directories` passes over directory entries (GNU tar of a folder)."""
    pos, start, pending = 0, 0, {}  # pending: name/size from extension headers for the next member
    while True:
        header = f.read(TAR_BLOCK)
        if not header or header == _ZERO_BLOCK:
            return
        if len(header) < TAR_BLOCK:
            raise ShardError(f"{where}: corrupt tar data ({len(header)} stray bytes at the end)")
        kind, name, size = _parse_header(header, pos, where)
        size = pending.get("size", size)
        if not 0 <= size <= MAX_MEMBER_BYTES:  # checked before reading: the size decides the allocation
            raise ShardError(
                f"{where}: member {pending.get('name', name)!r} declares {size} bytes, outside 0..{MAX_MEMBER_BYTES}"
            )
        data = f.read(size)
        if len(data) < size:
            raise ShardError(f"{where}: member {pending.get('name', name)!r} is truncated")
        padding = -size % TAR_BLOCK
        f.read(padding)  # missing padding after the last member is harmless: the data is complete
        end = pos + TAR_BLOCK + size + padding
        if kind in (_PAX, _PAX_GLOBAL, _GNU_NAME):
            if kind != _PAX_GLOBAL:  # a global header's values (often a comment) do not name members
                pending.update(_pax_values(data, pos, where) if kind == _PAX else {"name": _gnu_name(data)})
            pos = end
            continue
        name = pending.get("name", name)
        pending = {}
        if kind == tarfile.DIRTYPE and skip_directories:
            pos = start = end
            continue
        if kind not in _REGULAR:
            raise ShardError(f"{where}: member {name!r} is not a regular file")
        safe = safe_member_name(name)
        if safe is None:
            raise ShardError(f"{where}: member name {name!r} is not a plain file name")
        yield Member(safe, data, start, end)
        pos = start = end


def read_tar_members(data: bytes, where: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of an in-memory tar (a sample's byte range)."""
    for m in iter_members(io.BytesIO(data), where):
        yield m.name, m.data


def _parse_header(header: bytes, pos: int, where: str) -> tuple[bytes, str, int]:
    """(type flag, name, size) of one header block, its checksum checked."""
    try:
        name = header[:100].split(b"\0", 1)[0].decode()
        size = _number(header[124:136])
        checksum = int(header[148:156].strip(b"\0 ") or b"0", 8)
        if header[257:263] == b"ustar\0" and header[345] != 0:  # POSIX ustar: a name prefix makes it a path
            name = header[345:500].split(b"\0", 1)[0].decode() + "/" + name
    except (ValueError, UnicodeDecodeError):
        raise ShardError(f"{where}: corrupt tar data (unreadable member header at byte {pos})") from None
    unsigned = sum(header) - sum(header[148:156]) + 8 * ord(" ")  # the field itself counts as spaces
    signed = unsigned - 2 * sum(b for b in header[:148] + header[156:] if b > 127)  # old tars sum signed bytes
    if checksum not in (unsigned, signed):
        raise ShardError(f"{where}: corrupt tar data (bad header checksum at byte {pos})")
    return header[156:157], name, size


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 (first byte 0x80 or 0xff) for large values."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0xFF else value
    return int(field.strip(b"\0 ") or b"0", 8)


def _pax_values(data: bytes, pos: int, where: str) -> dict:
    """`path` and `size` from a PAX extended header ("<length> <key>=<value>\\n" records)."""
    values, i = {}, 0
    try:
        while i < len(data) and data[i] != 0:
            space = data.index(b" ", i)
            length = int(data[i:space])
            if length <= 0:
                raise ValueError(f"record length {length}")
            key, _, value = data[space + 1 : i + length - 1].partition(b"=")
            if key == b"path":
                values["name"] = value.decode()
            elif key == b"size":
                values["size"] = int(value)
            i += length
    except (ValueError, UnicodeDecodeError) as e:
        raise ShardError(f"{where}: corrupt tar data (unreadable PAX header at byte {pos}: {e})") from None
    return values


def _gnu_name(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode(errors="replace")
