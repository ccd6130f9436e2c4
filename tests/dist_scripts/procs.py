"""Start real multi-process runs from tests: torchrun, or SLURM-style tasks started by hand.

Every run has a timeout, so a bug makes a test fail instead of hanging CI, and a failure shows
the processes' output.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import socket
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A port free now, from a range of its own per pytest-xdist worker (gw0: 12000-14499, gw1:
    14500-16999, ... gw7: 29500-31999), so that two workers never pick the same one between its
    check and its use; all below Linux's ephemeral ports (32768-60999), which any process's outgoing
    connection, torchrun --standalone and the SLURM cluster may take meanwhile."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    low = 12000 + 2500 * (worker % 8)
    for port in random.Random().sample(range(low, low + 2500), 2500):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{low + 2499}")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables, with the repository importable."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1", **extra)
    return env


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `cmd` to completion; fail with its output if it errs or outlives `timeout`."""
    try:
        proc = subprocess.run(cmd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{cmd} timed out after {timeout} s\n{e.stdout}\n{e.stderr}") from None
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def run_here(main: Callable[[list[str]], None], argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """An ognet command's `main(argv)` run in this process, its exit and output reported as `run`
    reports a process's: for tests that need no process boundary, it saves a process's start-up
    (importing torch and torch._dynamo: about 3 CPU-s). It runs on one thread, as `clean_env`'s
    processes do, so that its results equal theirs bit for bit. The exit status is what the process
    would have had (a `sys.exit` message: printed to stderr, status 1; an exception: its traceback, 1)."""
    import torch

    out, err = io.StringIO(), io.StringIO()
    status, threads = 0, torch.get_num_threads()
    torch.set_num_threads(1)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        # torchrun's `record` enables faulthandler on stderr, which a StringIO cannot take (no fileno)
        warnings.filterwarnings("ignore", "Unable to enable fault handler")
        try:
            main(argv)
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except Exception:  # noqa: BLE001  (a process would print it and exit 1)
            traceback.print_exc()
            status = 1
        finally:
            torch.set_num_threads(threads)
    proc = subprocess.CompletedProcess(argv, status, out.getvalue(), err.getvalue())
    assert not check or status == 0, f"{main.__module__}.main{argv} exited {status}\n{proc.stdout}\n{proc.stderr}"
    return proc


def torchrun(script: str, nproc: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=nproc tests/dist_scripts/<script> args...` on gloo."""
    cmd = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", str(SCRIPTS / script), *args]
    return run(cmd, timeout=timeout)


def python(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The same script as one plain process (no launcher: world size 1, no process group)."""
    return run([sys.executable, str(SCRIPTS / script), *args], timeout=timeout)


def start_slurm_tasks(script: str, ntasks: int, *args: str) -> list[subprocess.Popen]:
    """Start `ntasks` processes with the variables srun gives its tasks on one node, no torchrun."""
    port = str(free_port())
    procs = []
    for rank in range(ntasks):
        env = clean_env(
            SLURM_PROCID=str(rank),
            SLURM_LOCALID=str(rank),
            SLURM_NTASKS=str(ntasks),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(SCRIPTS / script), *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    """Wait for `proc`; return (returncode, stdout + stderr). Kill it if it outlives `timeout`."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{proc.args} timed out after {timeout} s\n{out}\n{err}") from None
    return proc.returncode, out + err


def slurm_tasks(script: str, ntasks: int, *args: str, timeout: float = 120) -> None:
    """Run `script` as `ntasks` SLURM-style tasks; fail with their output if any errs or hangs."""
    procs = start_slurm_tasks(script, ntasks, *args)
    try:
        for rank, proc in enumerate(procs):
            rc, output = finish(proc, timeout)
            assert rc == 0, f"task {rank} of {script} exited {rc}\n{output}"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
