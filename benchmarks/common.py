"""What every benchmark records about the machine it ran on."""

import platform
from pathlib import Path


def cpu_model() -> str:
    """The `model name` of /proc/cpuinfo (the processor string elsewhere)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
