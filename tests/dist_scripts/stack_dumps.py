"""Processes for tests/test_stack_dumps.py, with stack dumps on SIGUSR2 as the launch scripts set them up.

usage: stack_dumps.py collective RELEASE       (any ranks) the last one joins the all_reduce once RELEASE exists
       stack_dumps.py collective-late RELEASE  the same with the mask set after `import numpy` (console scripts)
       stack_dumps.py children RELEASE         a forked and a spawned child print their pids and wait for RELEASE
"""

import sys

from ognet.stack_dumps import block_dump_signal

if sys.argv[1].endswith("-late"):
    import numpy  # noqa: F401  OpenBLAS's threads start now, before the mask (with OMP_NUM_THREADS > 1)
else:
    block_dump_signal()  # as launch/train.py: before numpy and torch start threads

import multiprocessing  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from ognet.stack_dumps import enable_stack_dumps  # noqa: E402


def wait_for(release: Path) -> None:
    while not release.exists():
        time.sleep(0.05)


def collective(release: Path) -> None:
    import torch

    from ognet import dist

    info = dist.init_distributed(timeout_s=120)
    if info.rank == info.world_size - 1:
        wait_for(release)
    print(f"rank {info.rank} enters all_reduce", flush=True)
    total = dist.all_reduce_sum(torch.ones(1))
    print(f"rank {info.rank} sum {total.item():g}", flush=True)
    dist.cleanup()


def waiting_child(kind: str, release: Path) -> None:
    print(f"{kind} child pid {multiprocessing.current_process().pid}", flush=True)
    wait_for(release)


def children(release: Path) -> None:
    procs = [
        multiprocessing.get_context(kind).Process(target=waiting_child, args=(kind, release), name=kind)
        for kind in ("fork", "spawn")
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        print(f"{p.name} child exit code {p.exitcode}", flush=True)


if __name__ == "__main__":
    enable_stack_dumps()
    {"collective": collective, "collective-late": collective, "children": children}[sys.argv[1]](Path(sys.argv[2]))
