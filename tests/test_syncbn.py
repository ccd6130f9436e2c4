"""ognet.dist.SyncBatchNorm: torch's BatchNorm without a process group, the global batch's
statistics on 2 gloo ranks (tests/dist_scripts/syncbn.py checks against torch's BatchNorm on the
whole batch), and a model converted without changing its state_dict."""

import pytest
import torch
from dist_scripts.procs import torchrun
from torch import nn

from ognet import dist
from ognet.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("norm", "shape", "momentum", "affine"),
    [
        (nn.BatchNorm1d, (6, 5), 0.1, True),
        (nn.BatchNorm1d, (4, 5, 9), None, True),
        (nn.BatchNorm2d, (3, 4, 7, 5), 0.3, False),
    ],
)
def test_without_a_process_group_it_is_torch_batchnorm_exactly(norm, shape, momentum, affine):
    assert not torch.distributed.is_initialized()
    torch.manual_seed(0)
    reference = norm(shape[1], momentum=momentum, affine=affine)
    if affine:
        nn.init.normal_(reference.weight, 1.0, 0.3), nn.init.normal_(reference.bias, 0.0, 0.3)
    synced = dist.convert_sync_batchnorm(norm(shape[1], momentum=momentum, affine=affine))
    synced.load_state_dict(reference.state_dict())
    assert type(synced) is dist.SyncBatchNorm
    for step in range(3):
        training = step < 2
        reference.train(training), synced.train(training)
        x = (torch.randn(shape) * 2 + 1).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y, y2 = reference(x), synced(x2)
        (y * torch.arange(y.numel()).view_as(y)).sum().backward()
        (y2 * torch.arange(y.numel()).view_as(y)).sum().backward()
        assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad)
        for (name, a), b in zip(reference.state_dict().items(), synced.state_dict().values()):
            assert torch.equal(a, b), name
        if affine:
            assert torch.equal(reference.weight.grad, synced.weight.grad)
            assert torch.equal(reference.bias.grad, synced.bias.grad)


@pytest.mark.parametrize("norm", ["bn2", "bn"])
def test_converting_a_model_keeps_its_state_dict_and_parameters(norm):
    model = build_model("ognet-small", 5, init_points=32, k=4, norm=norm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    parameters = list(model.parameters())
    norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert dist.convert_sync_batchnorm(model) is model
    assert sum(type(m) is dist.SyncBatchNorm for m in model.modules()) == norms > 10
    assert list(model.parameters()) == parameters  # the same Parameter objects: optimizers still hold them
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(ValueError, match="expects \\(N, C, ...\\) input, got 1D"):
        dist.SyncBatchNorm(3)(torch.ones(3))


@pytest.mark.slow
def test_two_gloo_ranks_normalise_with_the_whole_batch_statistics():
    proc = torchrun("syncbn.py", 2, timeout=180)
    assert proc.stdout.count("6 cases equal") == 2, proc.stdout
