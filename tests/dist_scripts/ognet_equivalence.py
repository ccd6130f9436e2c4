"""OG-Net's loss, parameter gradients, updated weights and BatchNorm statistics after one training
step on a fixed global batch: 2 ranks x B/2 under DDP versus one process x B, for each norm given.

BatchNorm is in training mode, synchronised over the ranks (ognet.dist.convert_sync_batchnorm,
as train.sync_bn does); dropout is off. Everything else (the all-gathered circle loss, DDP
averaging, Adam) is the real training path. Writes OUT/<norm>-rank<r>.pt (tensors only).

usage: ognet_equivalence.py OUT NORM...     NORM: bn2 (BatchNorm2d) or bn (BatchNorm1d), one process
group for all (each launch costs seconds of start-up)
"""

import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from ognet import dist
from ognet.losses import ReidLoss
from ognet.model import build_model

LABELS = [0, 1, 2, 0, 3, 1, 2, 3]


def main(out: Path, norms: list[str]) -> None:
    torch.set_default_dtype(torch.float64)
    info = dist.init_distributed(timeout_s=120)
    for norm in norms:
        step(out / f"{norm}-rank{info.rank}.pt", norm, info)
    dist.cleanup()


def step(path: Path, norm: str, info: dist.DistInfo) -> None:
    torch.manual_seed(0)
    model = dist.convert_sync_batchnorm(build_model("ognet-small", 4, init_points=32, k=4, dropout=0.0, norm=norm))
    model.train()
    # The statistics are equal on every rank by construction: no broadcast of rank 0's (as the engine).
    net = DistributedDataParallel(model, broadcast_buffers=False) if info.backend else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True, weight_decay=5e-4)
    g = torch.Generator().manual_seed(1)
    xyz, rgb = torch.randn(len(LABELS), 128, 3, generator=g) * 0.3, torch.rand(len(LABELS), 128, 3, generator=g) - 0.5
    labels = torch.tensor(LABELS)
    n = len(LABELS) // info.world_size
    local = slice(info.rank * n, (info.rank + 1) * n)

    out_ = net(xyz[local], rgb[local])
    terms = ReidLoss(circle=True, gamma=64.0)(out_.logits, labels[local], out_.circle_feature)
    terms.loss.backward()
    result = {"loss": terms.total}
    result.update({f"grad/{name}": p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    optimizer.step()
    result.update({f"state/{name}": v.clone() for name, v in model.state_dict().items()})
    torch.save(result, path)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
