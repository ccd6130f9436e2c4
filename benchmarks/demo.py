"""How long `bash launch/demo.sh` takes on this machine from a fresh clone, set-up included.

    python benchmarks/demo.py [--out benchmarks/results/demo.md]

Clones this repository's HEAD into a temporary folder (a fresh checkout: no virtual environment,
no data), runs `bash launch/demo.sh` there as a new user would, and times its phases from the
lines it prints: set-up (virtual environment, torch, the project), synthesise + pack + verify,
training (2 processes), evaluation (2 processes). Reports the wall-clock times, the final
Rank@1 / mAP and the load average, since other processes on the machine slow every phase.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, load_average, provenance

PHASES = ("== 1/4", "== 3/4", "== 4/4")  # demo.sh's markers: synthesise, train, evaluate
NAMES = ("set-up (venv, torch, ognet)", "synthesise, pack, verify", "train (2 processes)", "evaluate (2 processes)")


def run_demo(clone: Path) -> tuple[list[float], str]:
    """The seconds at which each phase ended, and the Rank@1 line."""
    start = time.monotonic()
    marks, rank1 = [], ""
    proc = subprocess.Popen(
        ["bash", "launch/demo.sh"], cwd=clone, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    for line in proc.stdout:
        sys.stdout.write(line)
        if len(marks) < len(PHASES) and line.startswith(PHASES[len(marks)]):
            marks.append(time.monotonic() - start)
        if "Rank@1:" in line:  # the last one: the separate evaluation's result line
            rank1 = line.strip()
    if proc.wait():
        sys.exit(f"launch/demo.sh exited {proc.returncode}")
    return [*marks, time.monotonic() - start], rank1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write the results (markdown) here")
    args = p.parse_args()
    load_at_start = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "ognet"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        ends, rank1 = run_demo(clone)
    phases = [b - a for a, b in zip([0.0, *ends], ends)]
    metrics = dict(re.findall(r"(Rank@1|mAP):([\d.]+)", rank1))
    lines = [
        *provenance("The demo from a fresh clone: `bash launch/demo.sh`, set-up included"),
        f"- load average (1, 5, 15 min) at start: {load_at_start}; at end: {load_average()}",
        "- the clone is of the commit above (uncommitted changes are not in it); pip downloads what the "
        "machine's package cache lacks",
        "",
        "| phase | wall-clock s |",
        "|---|---:|",
        *(f"| {name} | {s:.0f} |" for name, s in zip(NAMES, phases)),
        f"| **total** | **{ends[-1]:.0f}** ({ends[-1] / 60:.1f} min) |",
        "",
        f"Result: Rank@1 {float(metrics.get('Rank@1', 'nan')):.1%}, mAP {float(metrics.get('mAP', 'nan')):.1%}"
        f" (`{rank1}`)",
    ]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
