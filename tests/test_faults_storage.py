"""Storage faults (issue 7): a process killed while it writes a checkpoint, and a disk that fills
up while checkpoints or shards are written. Real processes and real files throughout.

A kill lands inside a write by construction, not by luck: the test waits for the writer's
temporary file to hold part of a checkpoint, stops the writer (SIGSTOP, and waits until it is
stopped), checks that the file is still half-written and unrenamed, and only then sends SIGKILL;
had the write got further meanwhile, the writer goes on and its next write is caught. The full disk is a small tmpfs mounted for the test, which needs
root: elsewhere those tests skip with the reason, except under CI (CI set), where they fail.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from data_fixtures import MAX_COUNT, tiny_root, tiny_shards  # noqa: F401  (fixtures)
from dist_scripts.procs import REPO, clean_env, run, run_here
from test_shards import files_of, shard_paths
from test_train import TRAIN, assert_same_weights, train_args

from ognet.checkpoint import CheckpointError, checkpoint_steps, latest_checkpoint, load_checkpoint, save_checkpoint
from ognet.data.pack import PARTS_DIR
from ognet.data.shards import INDEX_NAME, shard_name
from ognet.io import DiskFullError
from ognet.train import main as train_main

# a checkpoint after every step, all kept: 2 epochs of 3 steps give step-00000001.pt ... step-00000006.pt
EVERY_STEP = ("train.checkpoint_every_steps=1", "train.keep_checkpoints=10", "eval.rank_list_queries=0")
PARTIAL = re.compile(r"^\.step-(\d+)\.pt\..+\.partial$")  # atomic_write's temporary file for step-N.pt
PAGE = 4096  # tmpfs counts whole pages


def partials(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.name.endswith(".partial"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_shards, tmp_path_factory) -> Path:
    """The reference: the tiny training run start to end, never interrupted."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_here(train_main, train_args(tiny_shards, run_dir, *EVERY_STEP))  # in this process: nothing kills it
    return run_dir


# ------------------------------------------------------------------------------------------------
# A kill while a checkpoint is being written


def kill_inside_a_checkpoint_write(
    proc: subprocess.Popen, folder: Path, first_step: int, log: Path, timeout: float = 180
) -> tuple[int, Path]:
    """SIGKILL `proc` half-way through writing `folder/step-N.pt` for some N >= first_step: its
    temporary file holds some bytes, fewer than the complete checkpoint before it. Returns N and
    the temporary file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the writer ended before a write could be caught\n{log.read_text()[-3000:]}"
        caught = [
            (int(m.group(1)), p)
            for p in folder.glob(".step-*.partial")
            if (m := PARTIAL.match(p.name)) and int(m.group(1)) >= first_step
        ]
        if not caught or not _half_written(*caught[0]):
            time.sleep(0.0005)
            continue
        os.kill(proc.pid, signal.SIGSTOP)
        _, status = os.waitpid(proc.pid, os.WUNTRACED)  # stopped for sure: no system call of it is under way
        assert os.WIFSTOPPED(status), f"the writer ended instead of stopping\n{log.read_text()[-3000:]}"
        if _half_written(*caught[0]):  # still so, and not renamed into place
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return caught[0]
        os.kill(proc.pid, signal.SIGCONT)  # that write got further meanwhile; catch the next one
    raise AssertionError(f"no checkpoint write of step >= {first_step} caught half-way in {timeout} s")


def _half_written(step: int, partial: Path) -> bool:
    """More than nothing, less than the complete checkpoint of the step before (same size)."""
    try:
        return 0 < partial.stat().st_size < (partial.parent / f"step-{step - 1:08d}.pt").stat().st_size
    except FileNotFoundError:
        return False


WRITER = """
import sys, torch
from pathlib import Path
from ognet.checkpoint import save_checkpoint
for step in range(1, 100):  # 16 tensors of 2 MiB each, holding the step number
    model = {f"w{i}": torch.full((2**19,), float(step)) for i in range(16)}
    save_checkpoint(Path(sys.argv[1]) / f"step-{step:08d}.pt", {"model": model})
"""


def test_killed_checkpoint_writer_leaves_the_previous_checkpoint_valid(tmp_path, caplog):
    folder, log = tmp_path / "checkpoints", tmp_path / "writer.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(folder)], env=clean_env(), stdout=out, stderr=out)
    try:
        step, partial = kill_inside_a_checkpoint_write(proc, folder, first_step=3, log=log)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (folder / f"step-{step:08d}.pt").exists()
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_checkpoint(partial)  # half a checkpoint, as the writer left it

    # The temporary file is not a checkpoint; the one before it is the newest, whole and exact.
    assert [s for s, _ in checkpoint_steps(folder)] == list(range(1, step))
    assert latest_checkpoint(folder) == folder / f"step-{step - 1:08d}.pt"
    for s, path in checkpoint_steps(folder):
        model = load_checkpoint(path)["model"]
        assert len(model) == 16 and all(torch.equal(w, torch.full((2**19,), float(s))) for w in model.values()), path

    # The next save in that folder removes what the killed writer left, and says so.
    with caplog.at_level("WARNING", logger="ognet.io"):
        save_checkpoint(folder / f"step-{step:08d}.pt", {"model": {"w": torch.zeros(1)}})
    assert not partials(folder)
    assert f"removed 1 partial file(s) left by an interrupted write: {partial}" in caplog.text


@pytest.mark.slow
def test_training_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(tiny_shards, uninterrupted, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "killed.log"
    folder = run_dir / "checkpoints"
    cmd = [sys.executable, TRAIN, *train_args(tiny_shards, run_dir, *EVERY_STEP)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=clean_env(), stdout=out, stderr=out)
    try:
        # from global step 4 (epoch 1, step 1) on: resuming then replays part of an epoch
        step, partial = kill_inside_a_checkpoint_write(proc, folder, first_step=4, log=log)
    finally:
        proc.kill()
        proc.wait()
    assert not (folder / f"step-{step:08d}.pt").exists() and not (run_dir / "model_last.pt").exists()
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_checkpoint(partial)
    assert [s for s, _ in checkpoint_steps(folder)] == list(range(1, step))
    previous = latest_checkpoint(folder)
    assert previous == folder / f"step-{step - 1:08d}.pt"
    assert_same_weights(previous, uninterrupted / "checkpoints" / previous.name)  # loads, and is exact

    proc = run(cmd, timeout=300)
    assert f"resumed from {previous} " in proc.stdout
    assert f"removed 1 partial file(s) left by an interrupted write: {partial}" in proc.stderr
    assert not partials(run_dir)
    assert_same_weights(run_dir / "model_last.pt", uninterrupted / "model_last.pt")


# ------------------------------------------------------------------------------------------------
# A full disk: a small tmpfs


def _mount_failure(disk: Path, size: str) -> str | None:
    if os.geteuid() != 0:
        return "mounting a size-limited tmpfs needs root"
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True, text=True
    )
    return f"mount -t tmpfs failed ({proc.returncode}): {proc.stderr.strip()}" if proc.returncode else None


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(size) mounts a tmpfs of `size` (mount's syntax: 2m, 400k) and returns its folder;
    small_disk.grow(size) makes it bigger, as freeing space would. Unmounted at the end."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = []

    def mount(size: str) -> Path:
        reason = _mount_failure(disk, size)
        if reason:
            if os.environ.get("CI"):
                pytest.fail(f"the full-disk tests must run in CI (as root): {reason}")
            pytest.skip(reason)
        mounted.append(disk)
        return disk

    def grow(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True, capture_output=True)

    mount.grow = grow
    try:
        yield mount
    finally:
        for folder in mounted:
            if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
                subprocess.run(["umount", "--lazy", str(folder)], check=True)


def test_saving_checkpoints_into_a_full_disk(small_disk):
    folder = small_disk("2m") / "checkpoints"
    saved = {}
    with pytest.raises(DiskFullError) as info:
        for step in range(1, 100):  # 400 KB each
            w = torch.randn(100_000, generator=torch.Generator().manual_seed(step))
            save_checkpoint(folder / f"step-{step:08d}.pt", {"model": {"w": w}})
            saved[step] = w
    failed = folder / f"step-{len(saved) + 1:08d}.pt"
    assert str(info.value).startswith(f"{failed}: not written: no space left on device (")
    assert 3 <= len(saved) <= 5
    assert not failed.exists() and not partials(folder)
    assert [s for s, _ in checkpoint_steps(folder)] == sorted(saved)
    for step, w in saved.items():
        assert torch.equal(load_checkpoint(folder / f"step-{step:08d}.pt")["model"]["w"], w)


@pytest.mark.slow
def test_training_on_a_full_disk_stops_with_a_clear_error_and_resumes_once_there_is_room(
    small_disk, tiny_shards, uninterrupted
):
    # Each checkpoint takes 19 MB: two fit into 48 MB, the third does not.
    run_dir = small_disk("48m") / "run"
    folder = run_dir / "checkpoints"
    cmd = [sys.executable, TRAIN, *train_args(tiny_shards, run_dir, *EVERY_STEP)]
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, f"{proc.stdout}\n{proc.stderr}"
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith(
        f"ognet-train: error: {folder / 'step-00000003.pt'}: not written: no space left on device ("
    ), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not partials(run_dir)
    assert [s for s, _ in checkpoint_steps(folder)] == [1, 2]
    for _, path in checkpoint_steps(folder):
        assert_same_weights(path, uninterrupted / "checkpoints" / path.name)

    small_disk.grow("160m")
    proc = run(cmd, timeout=300)
    assert f"resumed from {folder / 'step-00000002.pt'} " in proc.stdout
    assert_same_weights(run_dir / "model_last.pt", uninterrupted / "model_last.pt")


def test_packing_onto_a_full_disk_keeps_the_finished_shards_and_resumes(small_disk, tiny_root, tiny_shards):
    reference = tiny_shards / "train_all"  # the same files packed the same way: shards are byte-identical
    pages = [-(-p.stat().st_size // PAGE) for p in shard_paths(reference)]
    # shards 0 and 1 with their one-page manifests fit, half of shard 2 does
    out = small_disk(f"{(pages[0] + pages[1] + 2 + pages[2] // 2) * PAGE // 1024}k") / "shards"
    folder = out / "train_all"
    pack = [
        sys.executable,
        str(REPO / "shards" / "pack.py"),
        str(tiny_root),
        str(out),
        "--splits",
        "train_all",
        "--max-count",
        str(MAX_COUNT),
        "--workers",
        "1",
    ]
    proc = subprocess.run(pack, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, f"{proc.stdout}\n{proc.stderr}"
    assert f"ognet-pack: error: {folder / shard_name(2)}: not written: no space left on device (" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not partials(out) and not (folder / INDEX_NAME).exists()
    finished = {p.name: p.stat() for p in shard_paths(folder)}
    assert sorted(finished) == [shard_name(0), shard_name(1)]
    for name in finished:
        assert (folder / name).read_bytes() == (reference / name).read_bytes()
        assert (folder / PARTS_DIR / f"{name}.json").exists()

    small_disk.grow("4m")
    run(pack, timeout=120)
    for name, stat in finished.items():  # taken as they were, not written again
        now = (folder / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), name
    verified = run([sys.executable, str(REPO / "shards" / "verify.py"), str(folder)])
    assert f"{folder}: ok {{'split': 'train_all', 'shards': 5, 'samples': 48" in verified.stdout
    assert files_of(folder) == files_of(reference)
