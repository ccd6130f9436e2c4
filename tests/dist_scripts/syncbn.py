"""ognet.dist.SyncBatchNorm on this rank's slice of a batch against torch's BatchNorm on the whole
batch, computed by every rank itself (the independent reference): outputs, input and parameter
gradients, running statistics. Each case trains two steps, then evaluates. Raises on a mismatch.

usage: syncbn.py
"""

import torch
from torch import nn

from ognet import dist

# (BatchNorm class, full input shape, momentum, affine, dtype, offset of the input's mean)
CASES = [
    (nn.BatchNorm1d, (8, 5), 0.1, True, torch.float64, 0.0),
    (nn.BatchNorm1d, (8, 5, 7), None, True, torch.float64, 0.0),
    (nn.BatchNorm2d, (6, 4, 5, 3), 0.3, False, torch.float64, 0.0),
    (nn.BatchNorm2d, (8, 16, 33, 4), 0.1, True, torch.float32, 0.0),
    (nn.BatchNorm1d, (8, 16, 300), 0.9, True, torch.float32, 300.0),  # a mean 300 x the spread: float32 sums
    (nn.BatchNorm2d, (8, 8, 9, 5), 0.1, True, torch.bfloat16, 1.0),  # autocast: bf16 input, float32 module
]
# float32: the reference itself rounds x - mean; bfloat16: one rounding of the output is up to 8e-3
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1e-2}


def check_case(info: dist.DistInfo, norm: type, shape: tuple, momentum, affine: bool, dtype, offset: float) -> None:
    g = torch.Generator().manual_seed(len(shape) * 7 + shape[1])
    module_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    reference = norm(shape[1], momentum=momentum, affine=affine, dtype=module_dtype)
    if affine:
        nn.init.normal_(reference.weight, 1.0, 0.3, generator=g)
        nn.init.normal_(reference.bias, 0.0, 0.3, generator=g)
    synced = dist.convert_sync_batchnorm(norm(shape[1], momentum=momentum, affine=affine, dtype=module_dtype))
    synced.load_state_dict(reference.state_dict())
    rows = shape[0] // info.world_size
    mine = slice(info.rank * rows, (info.rank + 1) * rows)
    rtol = TOLERANCE[dtype]
    for step in range(2):
        x = (torch.randn(shape, generator=g, dtype=dtype) * 2 + offset).requires_grad_()
        weights = torch.randn(shape, generator=g, dtype=dtype)
        expected = reference(x)
        (expected * weights).sum().backward()
        x_local = x.detach()[mine].clone().requires_grad_()
        y = synced(x_local)
        (y * weights[mine]).sum().backward()
        pairs = {"y": (y, expected[mine]), "x.grad": (x_local.grad, x.grad[mine])}
        if affine:
            for name in ("weight", "bias"):  # each rank's gradient is its part of the sum
                mine_grad, full_grad = getattr(synced, name), getattr(reference, name)
                pairs[f"{name}.grad"] = (dist.all_reduce_sum(mine_grad.grad), full_grad.grad.clone())
                mine_grad.grad = full_grad.grad = None
        pairs.update(
            {name: (getattr(synced, name), getattr(reference, name)) for name in ("running_mean", "running_var")}
        )
        what = f"{norm.__name__}{shape} {dtype} step {step}"
        for name, (got, want) in pairs.items():
            torch.testing.assert_close(got, want, rtol=rtol, atol=rtol, msg=lambda m, n=f"{what} {name}": f"{n}: {m}")
        assert torch.equal(synced.num_batches_tracked, reference.num_batches_tracked), what
        same = dist.all_reduce_max(synced.running_var)  # every rank holds the same statistics, bit for bit
        assert torch.equal(same, synced.running_var), f"{what}: running_var differs between ranks"
    plain = norm(shape[1], momentum=momentum, affine=affine, dtype=module_dtype)
    plain.load_state_dict(synced.state_dict())  # eval mode: torch's BatchNorm with the same statistics
    x = torch.randn(shape, generator=g, dtype=dtype) + offset
    assert torch.equal(synced.eval()(x), plain.eval()(x)), f"{norm.__name__}{shape}: eval differs"


def main() -> None:
    info = dist.init_distributed(timeout_s=60)
    assert info.world_size > 1, "run under torchrun with several ranks"
    for case in CASES:
        check_case(info, *case)
    print(f"rank {info.rank}: {len(CASES)} cases equal")
    dist.cleanup()


if __name__ == "__main__":
    main()
