"""`kill -USR2 PID` prints every thread's Python stack to stderr and the run goes on.

Why not faulthandler: its all-thread dump runs inside the signal handler and walks the other
threads' frames while they run, which segfaulted a rank whose TensorBoard writer thread was in
gfile. Here nothing runs in signal context: SIGUSR2 is blocked in every thread and a daemon
thread takes it with `sigwait`, then formats `sys._current_frames()` holding the GIL like any
Python code (other threads are paused at a bytecode boundary or in C code without the GIL, so
a main thread waiting inside a gloo/nccl collective, GIL released, does not delay the dump).

The mask is per thread and inherited at thread creation, so it must be set before other threads
start: `block_dump_signal()` at the top of the launch scripts, before `import numpy` starts
OpenBLAS's thread pool (one thread per core when OMP_NUM_THREADS allows). A thread that still
predates the mask (`ognet-train` as a console script with OMP_NUM_THREADS > 1) may take the
signal instead: the C part of a Python-level handler (no default action, which would end the
process) wakes a relay thread through `signal.set_wakeup_fd`, which hands the signal to the
dumper. The wake-up fd is the process's only one: a later `set_wakeup_fd` (asyncio's event loop
in the main thread; ognet runs none) silences that path until it is given back.

Child processes: a forked one (DataLoader workers under the default `fork` start method) gets a
dumper of its own, so `kill -USR2 WORKER_PID` shows where a worker is; a spawned or exec'd one
(`spawn`/`forkserver` workers, `pipe:` commands) inherits the blocked signal without a thread to
take it: USR2 stays pending there, i.e. it is ignored, never fatal.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from types import FrameType

DUMP_SIGNAL = signal.SIGUSR2
HEADER = "ognet stack dump"  # every dump's first line: f"{HEADER} {n}: pid ..."
_installed = False
_count = 0  # dumps printed by this process
_lock = threading.Lock()  # one dump at a time (write_stack_dump may also be called directly)
_dumper: threading.Thread | None = None
_wakeup: tuple[int, int] = (-1, -1)  # the relay's pipe (read, write)


def block_dump_signal() -> None:
    """Block SIGUSR2 in the calling thread, and so in every thread it starts later: the first
    thing a launch script does."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {DUMP_SIGNAL})


def enable_stack_dumps() -> None:
    """Make SIGUSR2 print every thread's stack (main thread only; a second call does nothing)."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    block_dump_signal()
    signal.signal(DUMP_SIGNAL, _relayed)  # not the default action (the end of the process), see _relay
    _start_threads()
    os.register_at_fork(after_in_child=_after_fork)
    _installed = True


def _start_threads() -> None:
    """The dumper, and the relay for signals taken by a thread that predates the mask: Python's C
    handler, in whatever thread took the signal, writes its number to the wake-up pipe (async-signal
    safe), the relay reads it and hands the signal to the dumper."""
    global _dumper, _wakeup
    _dumper = threading.Thread(target=_dump_on_signal, name="ognet-stack-dumps", daemon=True)
    _dumper.start()
    read, write = os.pipe()
    os.set_blocking(write, False)  # set_wakeup_fd's condition: a full pipe must not block a handler
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)  # every Python-handled signal writes here
    _wakeup = (read, write)
    threading.Thread(target=_relay, args=(read,), name="ognet-stack-dumps-relay", daemon=True).start()


def _after_fork() -> None:
    """A forked child has only the forking thread (the mask is inherited): a dumper and relay of
    its own, counting from 1, a fresh lock (the parent's dumper may have held it at the fork) and
    its own wake-up pipe (the inherited one would wake the parent's relay)."""
    global _count, _lock
    inherited = _wakeup
    _count, _lock = 0, threading.Lock()
    _start_threads()
    for fd in inherited:
        os.close(fd)


def _dump_on_signal() -> None:
    while True:
        signal.sigwait({DUMP_SIGNAL})  # blocks without the GIL; takes the signal from no one else
        write_stack_dump()


def _relay(read: int) -> None:
    while True:
        if int(DUMP_SIGNAL) in os.read(read, 64):  # several signals in one read: one dump, as the kernel merges them
            signal.pthread_kill(_dumper.ident, DUMP_SIGNAL)


def _relayed(signum: int, frame: FrameType | None) -> None:
    """The main thread's part of a relayed signal, run at its next bytecode: nothing left to do."""


def format_stack_dump(number: int) -> str:
    """Every thread's stack, the main thread first, each under its name: the dump's text."""
    frames = sys._current_frames()  # a snapshot under the GIL: no thread moves while it is taken
    threads = {t.ident: t for t in threading.enumerate()}
    main = threading.main_thread().ident
    rank = os.environ.get("RANK", "-")
    parts = [f"{HEADER} {number}: pid {os.getpid()}, rank {rank}, {len(frames)} thread(s) (SIGUSR2; the run goes on)\n"]
    for ident in sorted(frames, key=lambda i: (i != main, i)):
        thread = threads.get(ident)
        name = thread.name if thread else "(not started by threading)"
        daemon = ", daemon" if thread is not None and thread.daemon else ""
        parts.append(f'\nThread "{name}" (ident {ident}{daemon}), most recent call last:\n')
        parts.extend(traceback.format_stack(frames[ident]))
    del frames  # frames keep their locals alive
    parts.append(f"end of {HEADER} {number}\n")
    return "".join(parts)


def write_stack_dump() -> None:
    """Format the dump and write it to the process's stderr in one write (os.write: no Python I/O
    lock that a stuck thread could hold; a dump over the pipe's 4 KiB atomic size may still
    interleave with another process's output). Not through the `ognet` log channel: its terminal
    handler writes to the same stderr (every dump twice), and its lock may be held by the thread
    that is stuck."""
    global _count
    with _lock:
        _count += 1
        data = format_stack_dump(_count).encode(errors="replace")
        try:
            fd = sys.__stderr__.fileno()  # the process's own stderr, also where sys.stderr is replaced (pytest)
        except (AttributeError, OSError, ValueError):
            fd = 2
        try:
            while data:
                data = data[os.write(fd, data) :]
        except OSError:
            pass  # stderr closed: a dump must never end the run
