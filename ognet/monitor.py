"""What a person watching a run sees: log lines on the main rank and TensorBoard event files.

Only the main rank writes; every other rank gets a monitor that does nothing, so callers never
test the rank themselves. Log lines go to the `ognet` log channel (see ognet.session), which adds
the time and the rank.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.tensorboard.summary import hparams

from ognet.config import flatten
from ognet.pictures import point_spacing

MESH_POINT_SIZE = 1.5  # in point spacings: neighbouring points overlap, the surface reads as closed
log = logging.getLogger("ognet")


class Monitor:
    def __init__(self, log_dir: str | Path | None, enabled: bool):
        self.enabled = enabled
        self.writer = None
        if enabled and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # the writer's start-up: the main rank only

            self.writer = SummaryWriter(str(log_dir))

    def log(self, message: str) -> None:
        if self.enabled:
            log.info(message)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An (H, W, 3) uint8 picture."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def point_cloud(self, tag: str, xyz: np.ndarray, rgb: np.ndarray, step: int) -> None:
        """One coloured cloud for TensorBoard's mesh plugin (rgb in [0, 1]), its points drawn
        MESH_POINT_SIZE spacings wide (the viewer's default, 0.005 units, leaves specks)."""
        if self.writer is not None:
            colors = torch.from_numpy(np.clip(rgb * 255, 0, 255).astype(np.uint8))[None]
            material = {"cls": "PointsMaterial", "size": MESH_POINT_SIZE * point_spacing(xyz)}
            self.writer.add_mesh(
                tag,
                vertices=torch.from_numpy(xyz)[None],
                colors=colors,
                config_dict={"material": material},
                global_step=step,
            )

    def hparams(self, config: dict, metric_tags: list[str]) -> None:
        """The run's hyper-parameters for TensorBoard's HParams tab, written into this run's own
        event file (SummaryWriter.add_hparams would start a separate run) and as text."""
        if self.writer is None:
            return
        flat = flatten(config)
        values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}
        for summary in hparams(values, dict.fromkeys(metric_tags, 0.0)):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
