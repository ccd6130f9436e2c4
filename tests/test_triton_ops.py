"""The Triton point ops give the reference's indices exactly, run by Triton's interpreter on CPU.

Triton decides at import (of triton itself, of kernels, and of its lazily imported parts while a
kernel runs) whether it interprets, so `TRITON_INTERPRET=1` is set here, before anything imports
triton, and stays set for the rest of this pytest process (nothing else uses Triton on CPU). The
interpreter runs one program at a time in numpy: sizes keep this file well under a minute.
"""

import copy
import dataclasses
import os
import sys

if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import require  # noqa: E402
from dist_scripts.procs import REPO, clean_env, run  # noqa: E402
from test_edge_conv import Layer, relative, zero_in_exact_math  # noqa: E402

from ognet.config import load_config  # noqa: E402
from ognet.errors import ConfigError  # noqa: E402
from ognet.model import build_model, get_point_ops, ops, select_point_ops, using_point_ops  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def triton_ops():
    """The kernels' module, defined under the interpreter."""
    triton = require("triton", "the Triton point ops (pip install triton)")
    if not triton.knobs.runtime.interpret:
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set: run this file in its own process")
    from ognet.model import triton_ops

    return triton_ops


def cloud(batch: int, n: int, seed: int) -> torch.Tensor:
    """A person-like cloud (tall and thin, centred), some points exactly at the origin (invalid)."""
    g = torch.Generator().manual_seed(seed)
    xyz = torch.randn(batch, n, 3, generator=g) * torch.tensor([0.2, 0.5, 0.1])
    xyz[torch.rand(batch, n, generator=g) < 0.05] = 0.0
    return xyz


def centres_of(xyz: torch.Tensor, m: int) -> torch.Tensor:
    idx = ops.farthest_point_sample(xyz, m)
    return ops.gather_points(xyz.transpose(1, 2), idx).transpose(1, 2)


@pytest.mark.parametrize(("batch", "n", "m"), [(3, 1000, 100), (1, 37, 37), (2, 513, 200), (1, 8192, 48)])
def test_fps_matches_the_reference(triton_ops, batch, n, m):
    xyz = cloud(batch, n, seed=n)
    assert torch.equal(triton_ops.farthest_point_sample(xyz, m), ops.farthest_point_sample(xyz, m))


def test_fps_ties_go_to_the_lowest_index_and_invalid_rows_pick_zero(triton_ops):
    g = torch.Generator().manual_seed(0)
    distinct = torch.randn(5, 3, generator=g)
    duplicates = distinct[torch.randint(0, 5, (300,), generator=g)]  # 5 places, 300 points: ties
    invalid = torch.rand(300, 3, generator=g) * 1e-2  # all within sqrt(1e-3) of the origin
    xyz = torch.stack([duplicates, invalid, torch.zeros(300, 3)])
    got = triton_ops.farthest_point_sample(xyz, 20)
    assert torch.equal(got, ops.farthest_point_sample(xyz, 20))
    assert got[1:].eq(0).all() and got[0].unique().numel() == 5


def test_fps_validity_threshold_is_the_references_float64_comparison(triton_ops):
    """A point whose float32 squared norm is the first float32 above 1e-3 counts (float64 > 1e-3),
    the float32 below it does not: the kernel's float32 threshold must agree at that edge."""
    threshold = torch.tensor(triton_ops.FPS_MIN_NORM2_F32)
    below = torch.nextafter(threshold, torch.tensor(0.0))
    assert threshold.double() > 1e-3 >= below.double()
    x = torch.nextafter(threshold.sqrt(), torch.tensor(0.0))
    y = torch.linspace(0, 3e-5, 200_000)
    norm2 = x * x + y * y
    edge = [torch.stack([x, y[norm2 == v][0], torch.tensor(0.0)]) for v in (threshold, below)]
    xyz = torch.stack([torch.ones(3), *edge, torch.full((3,), -1.0)])[None]
    got = triton_ops.farthest_point_sample(xyz, 4)
    assert torch.equal(got, ops.farthest_point_sample(xyz, 4))
    assert 1 in got and 2 not in got


@pytest.mark.parametrize(("batch", "n", "m"), [(2, 700, 50), (1, 37, 37), (1, 8192, 16)])
def test_ball_query_matches_the_reference(triton_ops, batch, n, m):
    xyz = cloud(batch, n, seed=n)
    centres = centres_of(xyz, m)
    centres[:, -3:] = 10.0  # far from every point: no hit, all zeros
    radii, nsamples = (0.1, 0.2, 0.4), (8, 16, 32)
    got = triton_ops.ball_query(xyz, centres, radii, nsamples)
    want = ops.ball_query(xyz, centres, radii, nsamples)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert want[0][:, -1].eq(0).all() and (want[2][:, 0] != want[2][:, 0, :1]).any()  # both cases occur


def test_ball_query_duplicates_few_points_and_more_than_three_radii(triton_ops):
    xyz = cloud(2, 9, seed=1)
    xyz[:, 4:] = xyz[:, :1]  # duplicates of point 0
    centres = xyz[:, :6]
    radii, nsamples = (0.05, 0.3, 1.0, 5.0), (2, 8, 16, 3)  # nsample > n; two launches
    got = triton_ops.ball_query(xyz, centres, radii, nsamples)
    want = ops.ball_query(xyz, centres, radii, nsamples)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize(
    ("norm", "gem", "training", "c_in", "c_out", "n", "k"),
    [
        ("bn2", True, True, 3, 16, 64, 20),
        ("bn2", False, True, 32, 40, 37, 9),
        ("bn", True, True, 32, 40, 37, 9),
        ("bn2", True, False, 3, 16, 64, 20),
        ("bn", False, False, 32, 40, 37, 9),
    ],
)
def test_edge_conv_kernels_equal_the_edge_tensor_path_in_float64(triton_ops, norm, gem, training, c_in, c_out, n, k):
    """One fused EdgeConv by kernel (pool, statistics, scatter) against the original's edge tensor
    and torch's modules: output, every gradient, running statistics, two steps."""
    ref = Layer(c_in, c_out, norm, gem).double().train(training)
    ours = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(n)
    h = torch.randn(2, c_in, n, generator=g, dtype=torch.float64) + 2.0
    idx = ops.knn(torch.randn(2, 3, n, generator=g), k)
    weights = torch.randn(2, c_out, n, generator=g, dtype=torch.float64)
    results = []
    for layer, path, point_ops in ((ref, "edge_tensor", ops.REFERENCE_OPS), (ours, "fused", triton_ops.TRITON_OPS)):
        x = h.clone().requires_grad_()
        for _ in range(2):
            layer.zero_grad()
            with using_point_ops(point_ops):
                out = layer(x, idx, path)
                (out * weights).sum().backward()
        results.append([out.detach(), x.grad, *(p.grad for p in layer.parameters()), *layer.buffers()])
    names = ["output", "input", *(name for name, _ in ref.named_parameters()), *(n for n, _ in ref.named_buffers())]
    scale = max(float(t.norm()) for t in results[0][1:4])
    for name, want, got in zip(names, *results):
        if name == "conv.bias" and training:  # batch statistics remove the bias: zero in exact math
            assert float(got.norm()) < 1e-12 * scale, name
        else:
            assert relative(got, want) < 1e-12, name


def model_results(variant: str, point_ops: ops.PointOps, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Logits, feature and every parameter's gradient of a small model's training step under `point_ops`."""
    small = {"feature_dims": (16, 32), "init_points": 96, "embedding_dim": 32, "k": 8}
    if variant == "ognet-deep":
        small = {**small, "feature_dims": (16, 16, 32)}
    xyz, rgb = cloud(2, 300, seed=7), torch.rand(2, 300, 3, generator=torch.Generator().manual_seed(7)) - 0.5
    torch.manual_seed(0)
    model = build_model(variant, 5, **small).to(dtype).train()
    with using_point_ops(point_ops):
        out = model(xyz.to(dtype), rgb.to(dtype))
        loss = out.logits.square().mean() + out.circle_feature.square().mean()
        loss.backward()
    return {"logits": out.logits.detach(), "feature": out.feature.detach()} | {
        name: p.grad for name, p in model.named_parameters()
    }


@pytest.mark.parametrize("variant", ["ognet", "ognet-deep"])
def test_forward_and_backward_are_identical_under_both_index_op_sets(triton_ops, variant):
    """FPS and ball query by kernel give the reference's indices: the step is bitwise the same."""
    index_kernels = dataclasses.replace(triton_ops.TRITON_OPS, pool_edges=None, scatter_edges=None)
    want = model_results(variant, ops.REFERENCE_OPS, torch.float32)
    got = model_results(variant, index_kernels, torch.float32)
    assert all(torch.equal(got[name], w) for name, w in want.items())


@pytest.mark.parametrize(
    ("variant", "dtype", "features", "gradients"),
    [("ognet-deep", torch.float64, 1e-11, 1e-10), ("ognet", torch.float32, 5e-5, 2e-2)],
)
def test_forward_and_backward_match_with_the_edge_conv_kernels(triton_ops, variant, dtype, features, gradients):
    """The EdgeConv kernels sum in another order than PyTorch's ops: equal up to rounding, with the
    tolerances of tests/test_edge_conv.py's model tests (float32: gradients flattened, rounding
    amplified by the embedding's BatchNorm over 2 clouds)."""
    want = model_results(variant, ops.REFERENCE_OPS, dtype)
    got = model_results(variant, triton_ops.TRITON_OPS, dtype)
    names = [n for n in want if n not in ("logits", "feature") and not zero_in_exact_math(n)]
    scale = max(float(want[n].norm()) for n in names)
    assert relative(got["feature"], want["feature"]) < features
    assert all(float(got[n].norm()) < 1e-5 * scale for n in want if zero_in_exact_math(n))
    if dtype == torch.float64:
        assert all(relative(got[n], want[n]) < gradients for n in names), [relative(got[n], want[n]) for n in names]
    else:
        assert (
            relative(torch.cat([got[n].flatten() for n in names]), torch.cat([want[n].flatten() for n in names]))
            < gradients
        )


def test_every_kernel_compiles_for_a_cuda_gpu(triton_ops):
    """The interpreter runs a kernel's Python, not Triton's compiler: compile each one for sm_90
    (IR, PTX, the wheel's ptxas), as launched, in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in clean_env().items() if k != "TRITON_INTERPRET"}
    proc = run([sys.executable, str(REPO / "tests" / "compile_for_cuda.py")], env=env, timeout=300)
    assert proc.stdout.count("compiled ") == 7 and "sm_90 code" in proc.stdout, proc.stdout
    assert "warn" not in proc.stderr.lower(), proc.stderr


def test_point_ops_by_name_and_by_config(triton_ops, monkeypatch):
    assert get_point_ops("reference") is ops.REFERENCE_OPS
    assert select_point_ops("auto", torch.device("cpu")) is ops.REFERENCE_OPS
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="model.point_ops=triton runs on CUDA, not cpu"):
        select_point_ops("triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_point_ops("triton", torch.device("cpu")) is triton_ops.TRITON_OPS
    with pytest.raises(ConfigError, match="model.point_ops"):
        load_config(overrides=["model.point_ops=fast"])
    assert load_config(overrides=["model.point_ops=triton"]).model.point_ops == "triton"
    monkeypatch.setitem(sys.modules, "triton", None)  # as if Triton were not installed
    monkeypatch.delitem(sys.modules, "ognet.model.triton_ops")
    with pytest.raises(ConfigError, match="model.point_ops=triton needs the triton package"):
        get_point_ops("triton")
    assert select_point_ops("auto", torch.device("cuda")) is ops.REFERENCE_OPS
