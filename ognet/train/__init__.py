"""Training: `ognet-train`, `python -m ognet.train` or `torchrun ... launch/train.py`.

    torchrun --nproc_per_node=N launch/train.py --config configs/market/ognet-circle.yaml [key=value ...]

`train(config)` joins the process group, builds a `Trainer` (ognet.train.trainer) and runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ognet.cli import run_command
from ognet.config import Config
from ognet.session import session
from ognet.train.trainer import NonFiniteError, Trainer

__all__ = ["NonFiniteError", "Trainer", "main", "train"]


def train(config: Config) -> dict[str, Any]:
    """Train as configured; returns the final metrics (if evaluated) and where the models went."""
    with session(Path(config.run_dir), "train.log", config.train.collective_timeout_s) as (info, monitor):
        trainer = Trainer(config, info, monitor)
        try:
            return trainer.train()
        finally:
            trainer.close()


def main(argv: list[str] | None = None) -> None:
    """`ognet-train --config FILE [key=value ...]`, under torchrun, srun or as a plain process."""
    run_command("ognet-train", "Train OG-Net (DDP or DeepSpeed).", lambda config, args: train(config), argv)
