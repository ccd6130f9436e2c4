"""OG-Net's loss and parameter gradients on a fixed global batch: 2 ranks x B/2 under DDP versus
one process x B.

BatchNorm uses its running statistics (eval mode) and dropout is off, because on CPU torch's
SyncBatchNorm does not run: with per-rank batch statistics the two set-ups would legitimately
differ. Everything else (the all-gathered circle loss, DDP averaging) is the real training path.
Writes OUT/rank<r>.pt with the loss and every gradient (tensors only).

usage: ognet_equivalence.py OUT
"""

import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from ognet import dist
from ognet.losses import ReidLoss
from ognet.model import build_model

LABELS = [0, 1, 2, 0, 3, 1, 2, 3]


def main(out: Path) -> None:
    torch.set_default_dtype(torch.float64)
    info = dist.init_distributed(timeout_s=120)
    torch.manual_seed(0)
    model = build_model("ognet-small", 4, init_points=32, k=4, dropout=0.0)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    net = DistributedDataParallel(model) if info.backend else model
    g = torch.Generator().manual_seed(1)
    xyz, rgb = torch.randn(len(LABELS), 128, 3, generator=g) * 0.3, torch.rand(len(LABELS), 128, 3, generator=g) - 0.5
    labels = torch.tensor(LABELS)
    n = len(LABELS) // info.world_size
    local = slice(info.rank * n, (info.rank + 1) * n)

    out_ = net(xyz[local], rgb[local])
    terms = ReidLoss(circle=True, gamma=64.0)(out_.logits, labels[local], out_.circle_feature)
    terms.loss.backward()
    result = {"loss": terms.total}
    result.update({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    torch.save(result, out / f"rank{info.rank}.pt")
    dist.cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
