"""Exercise ognet.dist under any launcher and write what each rank saw to OUT/rank<r>.json.

usage: collectives.py OUT            check set-up and gathers
       collectives.py OUT stuck      rank 0 waits in a barrier that rank 1 never joins
"""

import json
import sys
import time
from pathlib import Path

import torch

from ognet import dist


def check(out: Path) -> None:
    info = dist.init_distributed(timeout_s=60)
    r, w = info.rank, info.world_size
    result = {
        "rank": r,
        "local_rank": info.local_rank,
        "world_size": w,
        "backend": info.backend,
        "device": str(info.device),
        "is_main": info.is_main,
    }

    # Rank r holds r + 1 rows filled with r.
    result["uneven"] = dist.all_gather_uneven(torch.full((r + 1, 2), float(r))).tolist()
    result["uneven_empty"] = dist.all_gather_uneven(torch.empty(0, 3)).shape[0]

    # Every rank computes the same loss sum(weights * gathered); rank r's input gets the gradient
    # of the sum of all ranks' losses: world_size * weights[r's rows].
    x = torch.full((2, 3), float(r), requires_grad=True)
    gathered = dist.all_gather_with_grad(x)
    weights = torch.arange(gathered.numel(), dtype=torch.float32).reshape(gathered.shape)
    (weights * gathered).sum().backward()
    result["gathered"] = gathered.tolist()
    result["grad"] = x.grad.tolist()

    result["mean"] = dist.all_reduce_mean(torch.tensor([float(r)])).item()
    try:
        dist.all_gather_with_grad(torch.zeros(r + 1, 3))
        result["mismatch_error"] = None
    except ValueError as e:
        result["mismatch_error"] = str(e)

    dist.barrier()
    dist.cleanup()
    (out / f"rank{r}.json").write_text(json.dumps(result))


def stuck() -> None:
    info = dist.init_distributed(timeout_s=3)
    if info.rank == 0:
        dist.barrier()
    else:
        time.sleep(20)


if __name__ == "__main__":
    if sys.argv[2:] == ["stuck"]:
        stuck()
    else:
        check(Path(sys.argv[1]))
