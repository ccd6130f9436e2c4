"""How a command's process ends (ognet.cli.end_process): at once, without the interpreter's
teardown, yet with its output flushed; normally while a thread that is not ours still runs."""

from __future__ import annotations

import subprocess
import sys

from dist_scripts.procs import clean_env

# A command through run_command with the process's own command line (argv None): it prints a line
# without a newline (left in stdout's buffer), optionally starts a non-daemon thread that prints
# later, and registers an exit handler, which only a normal interpreter exit runs.
COMMAND = """
import atexit, os, threading, time
from ognet.cli import run_command

def run(config, args):
    print("output without a newline", end="")
    if os.environ["MODE"] == "thread":
        threading.Thread(target=lambda: (time.sleep(0.3), print(", then the thread's", end=""))).start()

atexit.register(lambda: print(" [teardown ran]", end=""))
run_command("ognet-test", "a test command", run)
"""


def test_a_command_ends_without_teardown_and_with_its_output_flushed():
    procs = {
        mode: subprocess.Popen(
            [sys.executable, "-c", COMMAND],
            env=clean_env(MODE=mode),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mode in ("plain", "thread")
    }
    results = {mode: (*proc.communicate(timeout=120), proc.returncode) for mode, proc in procs.items()}
    out, err, code = results["plain"]
    assert (out, code) == ("output without a newline", 0), err
    out, err, code = results["thread"]
    assert (out, code) == ("output without a newline, then the thread's [teardown ran]", 0), err
