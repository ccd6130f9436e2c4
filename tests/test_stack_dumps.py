"""`kill -USR2` stack dumps (ognet.stack_dumps) in real processes: they answer while the main thread
waits inside a gloo collective, forked children dump their own stacks, spawned ones ignore the
signal, and nothing dies. (A training run dumped 50 times and still bit-identical:
test_faults_processes.py::test_fifty_stack_dumps_leave_a_training_run_bit_identical.)"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from dist_scripts.procs import SCRIPTS, clean_env, free_port

from ognet.stack_dumps import HEADER

SCRIPT = str(SCRIPTS / "stack_dumps.py")
USR2_BIT = 1 << (signal.SIGUSR2 - 1)  # in /proc/PID/task/TID/status's SigBlk mask


def threads_taking_usr2(pid: int) -> list[str]:
    """The threads of `pid` that do not block SIGUSR2 (the dumper inside sigwait is one: the kernel
    unblocks what a thread waits for), read from /proc: independent of ognet's own bookkeeping."""
    taking = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            status = (task / "status").read_text()
            if not int(re.search(r"^SigBlk:\s*([0-9a-f]+)", status, re.M).group(1), 16) & USR2_BIT:
                taking.append(re.search(r"^Name:\s*(.*)$", status, re.M).group(1))
    return taking


def wait_for_text(path: Path, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while text not in (out := path.read_text(errors="replace") if path.exists() else ""):
        assert time.monotonic() < deadline, f"{path.name} never showed {text!r} within {timeout} s:\n{out[-4000:]}"
        time.sleep(0.05)
    return out


def dump(out: str, number: int, pid: int) -> str:
    """Dump `number` of process `pid` in `out`, checked to be whole."""
    start = out.index(f"{HEADER} {number}: pid {pid},")
    end = out.index(f"end of {HEADER} {number}\n", start)
    return out[start:end]


def thread_stack(text: str, name: str) -> list[str]:
    """The `File ..., in FUNCTION` lines of thread `name` in a dump, outermost first."""
    section = text.split(f'Thread "{name}"', 1)[1].split('\nThread "', 1)[0]
    return [line.strip() for line in section.splitlines() if line.strip().startswith("File ")]


def start(tmp_path: Path, name: str, *args: str, **env: str) -> tuple[subprocess.Popen, Path, Path]:
    """The script in the background; returns it and the files of its stdout and stderr."""
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, SCRIPT, *args], env={**clean_env(), **env}, stdout=stdout, stderr=stderr
        )
    return proc, out, err


def stop(procs: list[subprocess.Popen], release: Path) -> None:
    release.touch()
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_dumps_answer_while_the_main_thread_waits_in_a_collective(tmp_path):
    """Ranks 0 and 1 wait in an all_reduce that rank 2 holds back. Rank 0 set the mask before any
    thread started (the launch scripts), so only its dumper takes USR2; rank 1 set it after `import
    numpy` started OpenBLAS's threads (the console scripts), which may take it: the relay hands it on."""
    release, port = tmp_path / "release", str(free_port())
    ranks = [
        start(
            tmp_path,
            f"rank{r}",
            mode,
            str(release),
            RANK=str(r),
            LOCAL_RANK=str(r),
            WORLD_SIZE="3",
            LOCAL_WORLD_SIZE="3",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            OMP_NUM_THREADS="2",  # an OpenBLAS pool of 2 threads where there are 2 cores
        )
        for r, mode in enumerate(("collective", "collective-late", "collective"))
    ]
    try:
        for r in (0, 1):
            wait_for_text(ranks[r][1], f"rank {r} enters all_reduce", timeout=120)
        time.sleep(1)  # ranks 0 and 1 are now inside gloo's wait (GIL released)
        early, late = (threads_taking_usr2(proc.pid) for proc, _, _ in ranks[:2])
        assert early == ["python"], early  # only the dumper: gloo's and torch's threads block it too
        # rank 1 may also have threads that predate its mask (OpenBLAS's pool, where its build starts
        # one at import: then the relay hands their signals on); its dumps below must come either way
        assert "python" in late, late
        for n in range(1, 4):
            for proc, _, err in ranks[:2]:
                os.kill(proc.pid, signal.SIGUSR2)
                text = wait_for_text(err, f"end of {HEADER} {n}\n", timeout=30)
                main = thread_stack(dump(text, n, proc.pid), "MainThread")
                assert any(line.endswith("in all_reduce_sum") for line in main), main
                assert main[-1].endswith("in all_reduce"), main  # torch.distributed.all_reduce, waiting in C++
        assert "enters all_reduce" not in ranks[2][1].read_text()  # so ranks 0 and 1 waited at every dump
    finally:
        stop([proc for proc, _, _ in ranks], release)
    for r, (proc, out, err) in enumerate(ranks):
        assert proc.returncode == 0, err.read_text()[-4000:]
        assert f"rank {r} sum 3" in out.read_text()


def test_forked_children_dump_their_own_stacks_and_spawned_ones_ignore_the_signal(tmp_path):
    release = tmp_path / "release"
    parent, out, err = start(tmp_path, "parent", "children", str(release))
    try:
        wait_for_text(out, "spawn child pid", timeout=120)
        printed = wait_for_text(out, "fork child pid", timeout=30)
        forked, spawned = (int(re.search(rf"{kind} child pid (\d+)", printed).group(1)) for kind in ("fork", "spawn"))

        os.kill(forked, signal.SIGUSR2)
        dumps = wait_for_text(err, f"end of {HEADER} 1\n", timeout=30)
        assert thread_stack(dump(dumps, 1, forked), "MainThread")[-2].endswith("in waiting_child")

        assert threads_taking_usr2(spawned) == []  # blocked, inherited through exec; no handler to run
        os.kill(spawned, signal.SIGUSR2)
        time.sleep(1)
        assert f"pid {spawned}," not in err.read_text()  # no dump, and it lives on (exit code 0 below)
    finally:
        stop([parent], release)
    assert parent.returncode == 0, err.read_text()[-4000:]
    assert "fork child exit code 0" in out.read_text() and "spawn child exit code 0" in out.read_text()
