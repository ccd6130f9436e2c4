"""What every benchmark records about the machine and the code it ran on."""

import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The `model name` of /proc/cpuinfo (the processor string elsewhere)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def commit(tree: Path = ROOT) -> str:
    """The short commit of `tree` measured, with `+changes` when its working tree differs from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return f"{head}+changes" if git("status", "--porcelain", "--untracked-files=no") else head


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def provenance(title: str) -> list[str]:
    """The first lines of a results file: title, the command, the commit, the machine (the load
    averages at start and end are the caller's to add, when it measures)."""
    import torch

    return [
        f"# {title}",
        "",
        f"Command: `{' '.join(['python', f'benchmarks/{Path(sys.argv[0]).name}', *sys.argv[1:]])}`",
        "",
        f"- commit {commit()}; CPU: {cpu_model()}; cores {os.cpu_count()}; python {platform.python_version()}; "
        f"torch {torch.__version__}",
    ]
