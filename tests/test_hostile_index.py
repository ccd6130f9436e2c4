"""A hostile `index.json` runs nothing: shard names with shell metacharacters, `..`, absolute
paths, hidden or very long names, and cache keys that climb out, are refused for every kind of
location before anything is opened, fetched or run; the error names the index."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from data_fixtures import tiny_root, tiny_shards  # noqa: F401
from http_server import FileServer

from ognet.data.fetch import ReadOptions
from ognet.data.locations import file_location, join_location
from ognet.data.remote import RemoteOptions
from ognet.data.shards import INDEX_NAME, ShardReader, shard_name
from ognet.errors import ShardError

CANARY = "pwned"
HOSTILE_NAMES = [
    f"{shard_name(0)};touch {CANARY};#",
    f"$(touch {CANARY})",
    f"`touch {CANARY}`",
    f"x|touch {CANARY}",
    f"x&&touch {CANARY}",
    f"x\ntouch {CANARY}",
    f"x'; touch {CANARY}; '",
    f"../{shard_name(0)}",
    "/etc/passwd",
    "sub/shard.tar",
    ".hidden.tar",
    "-rf",
    "..",
    "a" * 300,
    "",
]
KINDS = ["local", "http", "pipe-template", "pipe-append", "fsspec-file"]


@pytest.fixture
def hostile_split(tiny_shards, tmp_path, monkeypatch):
    """A copy of the query split whose index can be edited; the working folder is where a
    `touch` would land."""
    folder = tmp_path / "data" / "query"
    shutil.copytree(tiny_shards / "query", folder)
    monkeypatch.chdir(tmp_path)
    return folder


def location_of(kind: str, folder, url: str) -> str:
    return {
        "local": str(folder),
        "http": f"{url}/query",
        "pipe-template": join_location(f"pipe:cat {folder.parent}/{{}}", "query"),
        "pipe-append": f"pipe:cat {folder}/",
        "fsspec-file": f"file://{folder}",
    }[kind]


def edit_index(folder, **shard_fields) -> None:
    data = json.loads((folder / INDEX_NAME).read_text())
    data["shards"][0].update(shard_fields)
    (folder / INDEX_NAME).write_text(json.dumps(data))


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_shard_names_are_refused_and_nothing_runs(hostile_split, tmp_path, kind):
    options = ReadOptions(cache_dir=str(tmp_path / "cache"), remote=RemoteOptions(timeout_s=5, retries=0))
    with FileServer(hostile_split.parent) as server:
        location = location_of(kind, hostile_split, server.url)
        assert ShardReader(location, options=options)[0].index == 0  # the location works
        served = len(server.requests)
        for name in HOSTILE_NAMES:
            edit_index(hostile_split, name=name)
            with pytest.raises(ShardError) as info:
                reader = ShardReader(location, options=options)
                reader[0]  # not reached
            index = file_location(location, INDEX_NAME)
            assert str(info.value).startswith(f"{index}: shard name "), str(info.value)
            assert "is not a plain file name" in str(info.value)
            assert len(str(info.value)) < 600  # a long name is shown shortened
        assert all(path.endswith(INDEX_NAME) for _, path, _, _ in server.requests[served:])  # no shard was asked for
    assert not (tmp_path / CANARY).exists()
    assert not list(tmp_path.rglob(CANARY))


@pytest.mark.parametrize("kind", ["http", "pipe-template"])
def test_a_cache_key_that_climbs_out_is_refused(hostile_split, tmp_path, kind):
    edit_index(hostile_split, sha256="../../../../" + "0" * 52)
    with FileServer(hostile_split.parent) as server:
        location = location_of(kind, hostile_split, server.url)
        with pytest.raises(
            ShardError, match=r"shard shard-000000.tar has sha256 '\.\./\.\./.*', expected 64 hex digits"
        ):
            ShardReader(location, options=ReadOptions(cache_dir=str(tmp_path / "cache"), remote_cache="shard"))
    assert not (tmp_path / "cache").exists()


def test_names_inserted_into_commands_are_checked_and_quoted():
    for name in HOSTILE_NAMES:
        with pytest.raises(ShardError, match="is not a plain file name"):
            file_location("pipe:cat /data/{}", name)
        if "/" not in name.strip("/"):  # a split from the config may name sub-folders
            with pytest.raises(ShardError, match="is not a plain file name"):
                join_location("pipe:cat /data/{}", name)
    assert (
        file_location("pipe:aws s3 cp s3://b/m/{} -", "shard-000001.tar")
        == "pipe:aws s3 cp s3://b/m/shard-000001.tar -"
    )
    assert re.fullmatch(
        r"pipe:cat /d/query/index\.json /d/query/index\.json",
        file_location(join_location("pipe:cat /d/{} /d/{}", "query"), INDEX_NAME),
    )
