"""The command line every run command shares: `--config FILE [key=value ...]`, stack dumps on
SIGUSR2, and errors as one line naming what is wrong instead of a traceback."""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

import yaml
from torch.distributed.elastic.multiprocessing.errors import record

from ognet.config import Config, keys_help, load_config
from ognet.errors import PREEMPTED_EXIT_CODE, OgnetError, Preempted
from ognet.stack_dumps import enable_stack_dumps

EPILOG = """exit codes: 0 done; 1 an error (one line naming what is wrong); 2 bad arguments;
  75 preempted: a checkpoint was written, run the same command again to resume

config keys (key=default, then what it means; override any with key=value):
{keys}
"""


class RawHelp(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's lines as written."""


def run_command(
    prog: str,
    description: str,
    run: Callable[[Config, argparse.Namespace], Any],
    argv: list[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> None:
    """Parse `argv`, load and check the config, then `run(config, args)`. A preemption exits with
    PREEMPTED_EXIT_CODE (75: run again to resume), an `OgnetError` with `prog: error: ...`. With
    `argv` None (the process's own command line) the process then ends at once (`end_process`)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=EPILOG.format(keys=keys_help()), formatter_class=RawHelp
    )
    parser.add_argument("--config", help="YAML config (configs/...); defaults apply where it is silent")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit")
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=10 data.root=/data/market")
    args = parser.parse_args(argv)
    enable_stack_dumps()
    status: int | str = 0
    try:
        config = load_config(args.config, args.overrides)
        if args.print_config:
            print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
            return
        record(run)(config, args)  # record: torchrun's error file
    except Preempted:
        status = PREEMPTED_EXIT_CODE
    except OgnetError as e:
        status = f"{prog}: error: {e}"
    if argv is None:
        end_process(status)
    if status:
        sys.exit(status)


def end_process(status: int | str) -> NoReturn:
    """Exit with `status` as `sys.exit` would (a message: printed, exit code 1) but without the
    interpreter's teardown, which with torch and torch._dynamo loaded (the optimizers import it)
    frees millions of objects: about a second per process, on every rank and every restart. What
    a command writes is closed by now (checkpoints, logs, TensorBoard, the process group); the
    streams and logging are flushed here and child processes (DataLoader workers) stopped, as a
    normal exit would. A live non-daemon thread that is not ours gets a normal exit instead."""
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(status)
    if isinstance(status, str):
        print(status, file=sys.stderr)
        status = 1
    for child in multiprocessing.active_children():
        child.terminate()
        child.join()
    logging.shutdown()
    with contextlib.suppress(OSError, ValueError):  # a closed stream or pipe: nothing left to flush
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(status)
