"""OG-Net model: parameter counts, shapes, gradients, determinism, original checkpoints, fidelity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ognet.errors import ConfigError, OgnetError
from ognet.model import build_model, export_original, load_original
from ognet.model.convert import import_original, infer_model_config, main

VARIANTS = ("ognet", "ognet-small", "ognet-deep")


pytestmark = pytest.mark.usefixtures("one_thread")

# Reference section 4: parameters incl. the classifier, without the original's logit_scale.
PARAMS = {
    "ognet": {751: 2_337_001, 702: 2_311_864, 767: 2_345_209, 1041: 2_485_771},
    "ognet-small": {751: 1_586_096, 702: 1_560_959, 767: 1_594_304, 1041: 1_734_866},
    "ognet-deep": {751: 2_855_761, 702: 2_830_624, 767: 2_863_969, 1041: 3_004_531},
}

# Reference sections 3.2 and 4.1: (out, in) of every EdgeConv conv, SA widths C and SE widths q.
CONVS = {
    "ognet": [(64, 6), (128, 128), (256, 256), (512, 512)],
    "ognet-small": [(48, 6), (96, 96), (192, 192), (384, 384)],
    "ognet-deep": [(48, 6), (48, 96), (96, 96), (96, 192), (96, 192), (96, 192), (192, 192), (192, 384),
                   (192, 384), (192, 384), (384, 384), (384, 768), (384, 768), (384, 768)],
}  # fmt: skip
SA_WIDTHS = {"ognet": [64, 128, 256, 512], "ognet-small": [48, 96, 192, 384], "ognet-deep": [48, 96, 192, 384]}
SE_WIDTHS = {"ognet": [1, 2, 5, 10], "ognet-small": [1, 2, 4, 8], "ognet-deep": [1, 2, 4, 8]}
CONV_S2 = [(48, 3), (96, 48), (192, 96), (384, 192)]


def original_state_dict(variant: str, num_classes: int, gem: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state_dict as the original code saves it (DataParallel keys, circle's logit_scale), random values."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {"module.logit_scale": torch.tensor(1.0)}

    def weight(*shape: int) -> torch.Tensor:
        fan_in = math.prod(shape[1:])
        return torch.randn(*shape, generator=g) * (1.5 / fan_in) ** 0.5

    def bn(name: str, c: int) -> None:
        sd[f"{name}.weight"] = 1 + 0.2 * torch.randn(c, generator=g)
        sd[f"{name}.bias"] = 0.2 * torch.randn(c, generator=g)
        sd[f"{name}.running_mean"] = 0.2 * torch.randn(c, generator=g)
        sd[f"{name}.running_var"] = 0.5 + torch.rand(c, generator=g)
        sd[f"{name}.num_batches_tracked"] = torch.tensor(7)

    if variant == "ognet-deep":
        sd["module.p_w"] = torch.randn(7, generator=g)
    for i, (out, inp) in enumerate(CONVS[variant]):
        sd[f"module.conv.{i}.weight"] = weight(out, inp, 1, 1)
        sd[f"module.conv.{i}.bias"] = 0.1 * torch.randn(out, generator=g)
    if gem:
        for i in range(len(CONVS[variant])):
            sd[f"module.agg.{i}.p"] = torch.randn(1, generator=g)
    for i, (out, _) in enumerate(CONVS[variant]):
        bn(f"module.bn.{i}", out)
    for s, (c, q) in enumerate(zip(SA_WIDTHS[variant], SE_WIDTHS[variant])):
        for b in range(3):
            p = f"module.sa.{s}.mlps.{b}"
            sd[f"{p}.0.weight"] = weight(c // 2, c + 3, 1, 1)
            bn(f"{p}.1", c // 2)
            sd[f"{p}.2.se_reduce.weight"] = weight(q, c // 2, 1, 1)
            sd[f"{p}.2.se_reduce.bias"] = 0.1 * torch.randn(q, generator=g)
            sd[f"{p}.2.se_expand.weight"] = weight(c // 2, q, 1, 1)
            sd[f"{p}.2.se_expand.bias"] = 0.1 * torch.randn(c // 2, generator=g)
            sd[f"{p}.3.weight"] = weight(c, c // 2, 1, 1)
            bn(f"{p}.4", c)
    if variant == "ognet-deep":
        for s, (out, inp) in enumerate(CONV_S2):
            sd[f"module.conv_s2.{s}.0.weight"] = weight(out, inp)
            sd[f"module.conv_s2.{s}.0.bias"] = 0.1 * torch.randn(out, generator=g)
    sd["module.embs.0.weight"] = weight(512, 2 * SA_WIDTHS[variant][-1])
    bn("module.bn_embs.0", 512)
    sd["module.proj_output.weight"] = weight(num_classes, 512)
    sd["module.proj_output.bias"] = 0.1 * torch.randn(num_classes, generator=g)
    return sd


def cloud(batch: int, n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xyz = torch.randn(batch, n, 3, generator=g) * torch.tensor([0.2, 0.5, 0.1])
    rgb = torch.rand(batch, n, 3, generator=g) - 0.5
    return xyz.to(dtype), rgb.to(dtype)


# ---------------------------------------------------------------------------------------------
# Structure


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_counts(variant):
    for classes, total in PARAMS[variant].items():
        assert sum(p.numel() for p in build_model(variant, classes).parameters()) == total


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_keys_are_the_original_ones(variant):
    ours = build_model(variant, 751).state_dict()
    original = original_state_dict(variant, 751)
    assert {"module." + k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in original.items() if k != "module.logit_scale"
    }
    assert len(original) == {"ognet": 233, "ognet-small": 233, "ognet-deep": 322}[variant]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("points,batch", [(4096, 1), (3445, 1)])
def test_output_shapes_at_paper_sizes(variant, points, batch):
    model = build_model(variant, 751).eval()
    with torch.no_grad():
        out = model(*cloud(batch, points))
    assert out.logits.shape == (batch, 751)
    assert out.feature.shape == out.circle_feature.shape == (batch, 512)
    assert out.circle_feature is out.feature
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.feature).all()


def test_initialisation_follows_the_original():
    model = build_model("ognet-deep", 751)
    assert model.proj_output.weight.std() < 1e-5 and not model.proj_output.bias.any()
    assert not model.p_w.any() and all(not a.p.any() for a in model.agg)
    bn_weights = torch.cat([m.weight for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    assert abs(bn_weights.mean().item() - 1) < 0.01 and abs(bn_weights.std().item() - 0.02) < 0.005
    conv = model.conv[13].weight  # kaiming normal, fan_in = 768
    assert abs(conv.std().item() - (2 / 768) ** 0.5) < 0.003 and not model.conv[13].bias.any()
    emb = model.embs[0].weight  # kaiming normal, fan_out = 512
    assert abs(emb.std().item() - (2 / 512) ** 0.5) < 0.003


# ---------------------------------------------------------------------------------------------
# Training behaviour


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_parameter_gets_a_gradient(variant):
    torch.manual_seed(0)
    model = build_model(variant, 10, init_points=160).train()
    out = model(*cloud(4, 320))
    f = F.normalize(out.circle_feature, dim=1)
    loss = F.cross_entropy(out.logits, torch.tensor([0, 1, 0, 1])) + (f @ f.T).triu(1).sum()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # EdgeConv's conv biases: the BatchNorm's batch statistics remove them, so their gradient is
        # 0 in exact math (the fused path returns exactly 0; the others, rounding noise)
        assert p.grad.any() or (name.startswith("conv.") and name.endswith(".bias")), name


def test_train_mode_circle_feature_is_the_dropped_out_feature():
    torch.manual_seed(0)
    model = build_model("ognet-small", 10, init_points=160).train()
    out = model(*cloud(4, 256))
    kept = out.circle_feature != 0
    assert 0.55 < 1 - kept.float().mean().item() < 0.85  # dropout 0.7
    torch.testing.assert_close(out.circle_feature[kept], out.feature[kept] / 0.3)
    torch.testing.assert_close(out.logits, model.proj_output(out.circle_feature))


def test_same_seed_same_init_and_outputs():
    def run() -> tuple[dict, torch.Tensor, torch.Tensor]:
        torch.manual_seed(123)
        model = build_model("ognet-deep", 10, init_points=160)
        train_out = model.train()(*cloud(3, 256))
        eval_out = model.eval()(*cloud(3, 256))
        return model.state_dict(), train_out.circle_feature, eval_out.feature

    (sd_a, train_a, eval_a), (sd_b, train_b, eval_b) = run(), run()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert torch.equal(train_a, train_b) and torch.equal(eval_a, eval_b)


def test_bf16_autocast_forward_and_backward_on_cpu():
    """bf16 autocast computes the float32 model's features and gradients to bf16's precision.
    Measured (4 seeds, train mode, batch 4): feature cosine 0.967-0.977 (two clouds' features: -0.35),
    the cosine of all parameter gradients 0.70-0.78 (8-bit mantissas through a batch of 4's
    statistics); a wrong cast, sign or dropped term would come nowhere near."""
    torch.manual_seed(0)
    model = build_model("ognet", 10, init_points=160, dropout=0.0).train()
    inputs, params = cloud(4, 320), list(model.parameters())
    direction = torch.randn(4, 512, generator=torch.Generator().manual_seed(9))

    def features_and_gradient(out) -> tuple[torch.Tensor, torch.Tensor]:
        grads = torch.autograd.grad((out.feature.float() * direction).sum(), params, allow_unused=True)
        return out.feature.float(), torch.cat([g.flatten() for g in grads if g is not None])

    want, want_grad = features_and_gradient(model(*inputs))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*inputs)
    assert out.feature.dtype == torch.bfloat16
    got, got_grad = features_and_gradient(out)
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(got, want).min() > 0.95 and torch.isfinite(got_grad).all()
    assert got_grad.shape == want_grad.shape and cosine(got_grad, want_grad, dim=0) > 0.6


def test_eval_feature_of_a_cloud_alone_equals_its_feature_in_a_batch():
    """In eval mode a cloud's feature does not depend on the clouds batched with it."""
    torch.manual_seed(0)
    model = build_model("ognet-deep", 10).eval()
    xyz, rgb = cloud(3, 1024)
    with torch.no_grad():
        alone, together = model(xyz[1:2], rgb[1:2]).feature, model(xyz, rgb).feature
    assert alone.shape == (1, 512)
    torch.testing.assert_close(alone[0], together[1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Options


def test_unknown_override_and_variant_are_named():
    with pytest.raises(ConfigError, match="'kk'"):
        build_model("ognet", 10, kk=3)
    with pytest.raises(ConfigError, match="'ognet-huge'"):
        build_model("ognet-huge", 10)
    with pytest.raises(ConfigError, match="norm"):
        build_model("ognet", 10, norm="ln")
    with pytest.raises(ConfigError, match="k='9': expected int"):
        build_model("ognet", 10, k="9")
    with pytest.raises(ConfigError, match="fewer than k=20"):
        build_model("ognet", 10, init_points=100)


def test_overrides_change_the_model():
    model = build_model("ognet-deep", 10, norm="bn", gem=False, k=5, feature_dims=[32, 64, 64])
    assert model.config.k == 5 and model.config.feature_dims == (32, 64, 64)
    assert isinstance(model.bn[0], torch.nn.BatchNorm1d) and not any(k.startswith("agg.") for k in model.state_dict())
    assert len(model.sa) == 2 and model.sa[1].npoint == 384
    model.eval()
    with torch.no_grad():
        assert model(*cloud(2, 900)).logits.shape == (2, 10)
    plain = build_model("ognet-small", 10, use_xyz=False, use_se=False, dropout=0.5, embedding_dim=256, init_points=160)
    assert plain.sa[0].mlps[0][0].in_channels == 48 and not any("se_" in k for k in plain.state_dict())
    with torch.no_grad():
        assert plain.eval()(*cloud(2, 320)).feature.shape == (2, 256)


# ---------------------------------------------------------------------------------------------
# Original checkpoints


@pytest.mark.parametrize("variant", VARIANTS)
def test_original_checkpoint_loads_and_round_trips(variant):
    original = original_state_dict(variant, 751)
    model = build_model(variant, 751, init_points=160)
    load_original(model, original)
    exported = export_original(model, logit_scale=1.0)
    assert set(exported) == set(original) and all(torch.equal(exported[k], original[k]) for k in original)
    again = build_model(variant, 751, init_points=160)
    load_original(again, exported)
    xyz, rgb = cloud(2, 256)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(xyz, rgb).feature, again.eval()(xyz, rgb).feature, rtol=0, atol=0)


def test_mismatched_original_checkpoints_name_the_keys():
    model = build_model("ognet", 751)
    with pytest.raises(OgnetError, match=r"mis-shaped: module\.proj_output\.weight \(702, 512\)"):
        load_original(model, original_state_dict("ognet", 702))
    with pytest.raises(OgnetError, match=r"module\.conv\.0\.weight \(48, 6, 1, 1\)"):
        load_original(model, original_state_dict("ognet-small", 751))
    with pytest.raises(OgnetError, match=r"unexpected: module\.p_w, module\.conv\.4\.weight"):
        load_original(model, original_state_dict("ognet-deep", 751))
    broken = original_state_dict("ognet", 751)
    del broken["module.bn_embs.0.running_var"]
    with pytest.raises(OgnetError, match=r"missing: module\.bn_embs\.0\.running_var"):
        load_original(model, broken)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_and_classes_are_inferred(variant):
    bn2 = {"norm": "bn2"}
    assert infer_model_config(original_state_dict(variant, 702), overrides=bn2) == (variant, 702, bn2)
    name, classes, options = infer_model_config(original_state_dict(variant, 767, gem=False), overrides={"norm": "bn"})
    assert (name, classes, options) == (variant, 767, {"gem": False, "norm": "bn"})


def test_import_original_command(tmp_path):
    original = original_state_dict("ognet-deep", 1041)
    torch.save(original, tmp_path / "model_last.pth")
    assert main([str(tmp_path / "model_last.pth"), str(tmp_path / "out" / "ognet.pt"), "--set", "norm=bn"]) == 0
    ckpt = torch.load(tmp_path / "out" / "ognet.pt", weights_only=True)
    assert ckpt["format"] == "ognet-checkpoint" and ckpt["version"] == 1
    cfg = ckpt["model_config"]
    assert cfg == {"variant": "ognet-deep", "num_classes": 1041, "overrides": {"norm": "bn"}}
    model = build_model(cfg["variant"], cfg["num_classes"], **cfg["overrides"])
    model.load_state_dict(ckpt["model"], strict=True)
    assert torch.equal(model.p_w, original["module.p_w"])
    with pytest.raises(OgnetError, match="matches no OG-Net variant"):
        import_original(
            str(tmp_path / "model_last.pth"), str(tmp_path / "x.pt"), variant="ognet", overrides={"norm": "bn"}
        )
    assert not (tmp_path / "x.pt").exists()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert main([str(tmp_path / "junk.pth"), str(tmp_path / "y.pt")]) == 1
    assert not (tmp_path / "y.pt").exists()


# ---------------------------------------------------------------------------------------------
# Fidelity to the original forward


def _fps(xyz: torch.Tensor, m: int) -> list[int]:
    """Original FPS kernel for one cloud (N, 3), float32: start at 0, skip |p|^2 <= 1e-3."""
    p = xyz.float()
    valid = (p[:, 0] * p[:, 0] + p[:, 1] * p[:, 1] + p[:, 2] * p[:, 2]).double() > 1e-3
    dist = torch.full((len(p),), 1e10)
    picked = [0]
    for _ in range(1, m):
        last = p[picked[-1]]
        d = (p[:, 0] - last[0]) ** 2 + (p[:, 1] - last[1]) ** 2 + (p[:, 2] - last[2]) ** 2
        dist = torch.minimum(dist, d)
        best, best_i = -1.0, 0
        for k in range(len(p)):
            if valid[k] and dist[k] > best:
                best, best_i = dist[k].item(), k
        picked.append(best_i)
    return picked


def _ball_query(xyz: torch.Tensor, centres: torch.Tensor, radius: float, nsample: int) -> list[list[int]]:
    """Original ball-query kernel for one cloud: first nsample in index order with d^2 < r^2."""
    r2 = torch.tensor(radius, dtype=xyz.dtype) ** 2
    out = []
    for c in centres:
        d2 = (xyz[:, 0] - c[0]) ** 2 + (xyz[:, 1] - c[1]) ** 2 + (xyz[:, 2] - c[2]) ** 2
        hits = [k for k in range(len(xyz)) if d2[k] < r2][:nsample]
        out.append(hits + [hits[0]] * (nsample - len(hits)) if hits else [0] * nsample)
    return out


def _knn(space: torch.Tensor, k: int) -> torch.Tensor:
    """Original `knn` for one sample, point by point: score = -|x_j|^2 + 2 x_i.x_j - |x_i|^2."""
    pts = space.T  # (N, C)
    sq = (pts**2).sum(1)
    return torch.stack([(-sq + 2 * (pts @ pts[i]) - sq[i]).topk(k).indices for i in range(len(pts))])


def original_eval_feature(sd: dict, cfg: dict, xyz: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """Eval-mode retrieval feature of `ModelE_dense`, restated from reference 3.2 / 3.4 with plain
    per-sample loops, reading an original-layout state_dict. The original code itself needs CUDA
    kernels and dgl, so this restatement is the best available oracle."""

    def w(name: str) -> torch.Tensor:
        return sd["module." + name]

    def bn(x: torch.Tensor, name: str) -> torch.Tensor:
        stats = w(f"{name}.running_mean"), w(f"{name}.running_var")
        return F.batch_norm(x, *stats, w(f"{name}.weight"), w(f"{name}.bias"), False, 0.0, 1e-5)

    dims, k, num_conv = cfg["feature_dims"], cfg["k"], cfg["num_conv"]
    B = xyz.shape[0]
    h = rgb  # (B, N, C) as in the original between layers
    npoint, n = cfg["init_points"], 0
    s = 0
    for i, dim in enumerate(dims):
        h_in, xyz_in = h, xyz
        for _ in range(num_conv):
            x = h.transpose(1, 2)  # (B, C, N)
            space = torch.cat([xyz.transpose(1, 2), x], 1) if i == len(dims) - 1 else xyz.transpose(1, 2)
            edges = []
            for b in range(B):
                idx = _knn(space[b], k)  # (N, k)
                nbr = x[b].T[idx]  # (N, k, C)
                ctr = x[b].T[:, None, :].expand_as(nbr)
                edges.append(torch.cat([nbr - ctr, ctr], dim=2).permute(2, 0, 1))
            e = F.conv2d(torch.stack(edges), w(f"conv.{n}.weight"), w(f"conv.{n}.bias"))
            if cfg["norm"] == "bn2":
                e = bn(e, f"bn.{n}")
            if cfg["gem"]:
                a = torch.sigmoid(w(f"agg.{n}.p"))
                e = a * e.max(-1)[0] + (1 - a) * e.mean(-1)
            else:
                e = e.max(-1)[0]
            if cfg["norm"] == "bn":
                e = bn(e, f"bn.{n}")
            h = F.leaky_relu(e, 0.2).transpose(1, 2)
            n += 1
        downsample = i == 0 or dim > dims[i - 1]
        if downsample:
            npoint = npoint if i == 0 else npoint // 2
            new_xyz, feats, fps = [], [], []
            for b in range(B):
                pick = _fps(xyz_in[b], npoint)
                fps.append(pick)
                centres = xyz_in[b][pick]
                total = 0
                for br, (r, ns) in enumerate(zip((0.1, 0.2, 0.4), (8, 16, 32))):
                    idx = torch.tensor(_ball_query(xyz_in[b], centres, r, ns))  # (M, ns)
                    grouped = torch.cat([(xyz_in[b][idx] - centres[:, None]), h[b][idx]], 2).permute(2, 0, 1)[None]
                    p = f"sa.{s}.mlps.{br}"
                    y = bn(F.conv2d(grouped, w(f"{p}.0.weight")), f"{p}.1")
                    z = F.conv2d(y, w(f"{p}.2.se_reduce.weight"), w(f"{p}.2.se_reduce.bias"))
                    z = F.conv2d(z * torch.sigmoid(z), w(f"{p}.2.se_expand.weight"), w(f"{p}.2.se_expand.bias"))
                    y = F.relu(bn(F.conv2d(y * torch.sigmoid(z), w(f"{p}.3.weight")), f"{p}.4"))
                    total = total + y.max(-1)[0][0]  # (C, M)
                new_xyz.append(centres)
                feats.append(total.T)
            xyz, h = torch.stack(new_xyz), torch.stack(feats)
            if cfg["id_skip"] == 2:
                gathered = torch.stack([h_in[b][fps[b]] for b in range(B)])
                h_in = F.leaky_relu(F.linear(gathered, w(f"conv_s2.{s}.0.weight"), w(f"conv_s2.{s}.0.bias")), 0.2)
            s += 1
        if cfg["id_skip"] == 2:
            a = torch.sigmoid(w("p_w")[i])
            h = a * h_in + (1 - a) * h
    pooled = torch.cat([h.max(1)[0], h.mean(1)], 1)
    return bn(F.linear(pooled, w("embs.0.weight")), "bn_embs.0")


@pytest.mark.parametrize(
    "variant,overrides",
    [("ognet", {}), ("ognet-deep", {}), ("ognet-deep", {"norm": "bn", "gem": False})],
)
def test_eval_feature_equals_the_original_forward(variant, overrides):
    overrides = {"init_points": 160, **overrides}
    model = build_model(variant, 751, **overrides).double().eval()
    original = original_state_dict(variant, 751, gem=overrides.get("gem", True))
    sd = {k: v.double() if v.is_floating_point() else v for k, v in original.items()}
    load_original(model, sd)
    xyz, rgb = cloud(2, 300, seed=1, dtype=torch.float64)
    xyz[0, 5] = 0.0  # FPS must skip it
    fields = ("feature_dims", "k", "num_conv", "init_points", "norm", "gem", "id_skip")
    cfg = {f: getattr(model.config, f) for f in fields}
    with torch.no_grad():
        ours = model(xyz, rgb).feature
        want = original_eval_feature(sd, cfg, xyz, rgb)
    torch.testing.assert_close(ours, want, rtol=1e-9, atol=1e-9)
