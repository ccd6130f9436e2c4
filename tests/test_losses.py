"""Circle loss against direct loops, ReidLoss and the loss warm-up against the original's update,
and N ranks x B/N samples (torchrun, DDP on gloo) against one process with the whole batch."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from dist_scripts.procs import python, torchrun

from ognet.errors import ConfigError
from ognet.losses import LossWarmup, ReidLoss, circle_loss, circle_loss_per_anchor


def normalised(features):
    return [f / (f.norm() + 1e-6) for f in features]


def circle_loss_loop(features, labels, m, gamma):
    """The original's formula, pair by pair over i < j."""
    f = normalised(features)
    logits_p, logits_n = [], []
    for i, j in itertools.combinations(range(len(f)), 2):
        s = f[i] @ f[j]
        if labels[i] == labels[j]:
            logits_p.append(-gamma * torch.clamp_min(1 + m - s.detach(), 0) * (s - (1 - m)))
        else:
            logits_n.append(gamma * torch.clamp_min(s.detach() + m, 0) * (s - m))
    return F.softplus(torch.logsumexp(torch.stack(logits_n), 0) + torch.logsumexp(torch.stack(logits_p), 0))


def circle_loss_per_anchor_loop(features, labels, m, gamma):
    f = normalised(features)
    per_anchor = []
    for i in range(len(f)):
        sims = [(f[i] @ f[j], labels[i] == labels[j]) for j in range(len(f)) if j != i]
        logit_p = [-gamma * torch.clamp_min(1 + m - s.detach(), 0) * (s - (1 - m)) for s, same in sims if same]
        logit_n = [gamma * torch.clamp_min(s.detach() + m, 0) * (s - m) for s, same in sims if not same]
        if logit_p and logit_n:
            per_anchor.append(
                F.softplus(torch.logsumexp(torch.stack(logit_p), 0) + torch.logsumexp(torch.stack(logit_n), 0))
            )
    return torch.stack(per_anchor).mean()


def batch(seed, n=10, dim=5, num_ids=4):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(num_ids, (n,), generator=g)
    labels[:2] = 0  # at least one positive pair
    labels[2] = 1  # and one negative pair
    return features, labels


@pytest.mark.parametrize("seed,m,gamma", [(0, 0.25, 64.0), (1, 0.25, 32.0), (2, 0.4, 80.0), (3, 0.1, 1.0)])
@pytest.mark.parametrize("form", ["global", "per_anchor"])
def test_circle_loss_matches_a_loop_in_value_and_gradient(seed, m, gamma, form):
    fast, loop = {
        "global": (circle_loss, circle_loss_loop),
        "per_anchor": (circle_loss_per_anchor, circle_loss_per_anchor_loop),
    }[form]
    features, labels = batch(seed)
    a = features.clone().requires_grad_()
    b = features.clone().requires_grad_()
    expected = loop(b, labels.tolist(), m, gamma)
    value = fast(a, labels, m, gamma)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-10)
    value.backward()
    expected.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fn", [circle_loss, circle_loss_per_anchor])
@pytest.mark.parametrize("labels", [[0, 1, 2, 3], [5, 5, 5, 5], [7]], ids=["no_positive", "no_negative", "single"])
def test_circle_loss_is_a_backwardable_zero_without_positive_or_negative_pairs(fn, labels):
    features = torch.randn(len(labels), 3, requires_grad=True)
    value = fn(features, torch.tensor(labels))
    assert value.item() == 0 and value.grad_fn is not None
    value.backward()
    assert torch.equal(features.grad, torch.zeros_like(features))


def test_per_anchor_form_skips_anchors_without_a_positive():
    features, labels = batch(4)
    labels = torch.tensor([0, 0, 1, 1, 2, 3, 4, 5, 6, 7])  # anchors 4..9 have no positive
    torch.testing.assert_close(
        circle_loss_per_anchor(features, labels), circle_loss_per_anchor_loop(features, labels.tolist(), 0.25, 32.0)
    )


def test_reid_loss_single_process():
    features, labels = batch(5, num_ids=3)
    logits = torch.randn(10, 3, dtype=torch.float64)
    ce = F.cross_entropy(logits, labels)
    plain = ReidLoss()(logits, labels)
    torch.testing.assert_close((plain.loss, plain.total, plain.circle), (ce, ce, torch.zeros((), dtype=ce.dtype)))
    circle = ReidLoss(circle=True, gamma=32.0)(logits, labels, features)
    expected = ce + circle_loss(features, labels, gamma=32.0) / 10  # the original divides by batch size
    torch.testing.assert_close((circle.loss, circle.total), (expected, expected))
    per_anchor = ReidLoss(circle=True, circle_form="per_anchor")(logits, labels, features)
    torch.testing.assert_close(per_anchor.loss, ce + circle_loss_per_anchor(features, labels))
    with pytest.raises(ConfigError, match="circle_form"):
        ReidLoss(circle=True, circle_form="pairs")
    with pytest.raises(ValueError, match="features"):
        ReidLoss(circle=True)(logits, labels)


@pytest.mark.parametrize("num_samples,batch_size", [(12936, 36), (12936, 30), (1010, 30)])
@pytest.mark.parametrize("iters_per_epoch", ["floor", "class_sampler"])
def test_loss_warmup_equals_the_original_iterative_update(num_samples, batch_size, iters_per_epoch):
    # 1010/30 = 33.7 rounds up: warm_iterations 340 > the 330 iterations of 10 floor-sized epochs,
    # so the original's factor never reaches 1 during warm-up and jumps to 1 at epoch 10.
    warmup = LossWarmup.original(num_samples, batch_size, warm_epochs=10)
    per_epoch = num_samples // batch_size if iters_per_epoch == "floor" else 372
    factor, iteration = 0.1, 0
    for epoch in range(13):
        for _ in range(per_epoch):
            if epoch < 10:
                factor = min(1.0, factor + 0.9 / warmup.warm_iterations)
            expected = factor if epoch < 10 else 1.0
            assert warmup.factor(iteration, epoch) == pytest.approx(expected, abs=1e-9)
            iteration += 1
    assert LossWarmup.original(12936, 36).warm_iterations == 3590  # the Market opts.yaml value
    assert LossWarmup(0, 0).factor(0, 0) == 1.0
    with pytest.raises(ConfigError):
        LossWarmup(0, 10)


def load_results(path, world_size):
    return [torch.load(path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The whole batch through the bare model in one plain process."""
    out = tmp_path_factory.mktemp("single")
    python("loss_equivalence.py", str(out))
    return load_results(out, 1)[0]


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_loss_and_gradients_equal_one_process(tmp_path, world_size, single):
    """CE on each rank's slice + circle over all-gathered features, under DDP's gradient averaging,
    gives the loss value and the gradients of one process on the concatenated batch."""
    torchrun("loss_equivalence.py", world_size, str(tmp_path))
    for rank, result in enumerate(load_results(tmp_path, world_size)):
        assert result.keys() == single.keys()
        for key, expected in single.items():
            # float64: measured up to 6e-15 apart (values up to 32), summation order only; a wrong
            # scale or a missing term is off by far more
            torch.testing.assert_close(result[key], expected, rtol=1e-12, atol=1e-12, msg=f"rank {rank}: {key}")
    # The circle term really contributes gradient, so a wrong scale of it could not pass.
    for case in ("circle_global", "circle_per_anchor"):
        grad = single[f"{case}/backbone.0.weight"] - single["ce/backbone.0.weight"]
        assert grad.abs().max() > 1e-3
