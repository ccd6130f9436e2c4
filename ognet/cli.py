"""The command line every run command shares: `--config FILE [key=value ...]`, stack dumps on
SIGUSR2, and errors as one line naming what is wrong instead of a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

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
    PREEMPTED_EXIT_CODE (75: run again to resume), an `OgnetError` with `prog: error: ...`."""
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
    try:
        config = load_config(args.config, args.overrides)
        if args.print_config:
            print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
            return
        record(run)(config, args)  # record: torchrun's error file
    except Preempted:
        sys.exit(PREEMPTED_EXIT_CODE)
    except OgnetError as e:
        sys.exit(f"{prog}: error: {e}")
