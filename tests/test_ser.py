"""ser.py: rho_g against an exactly equivariant stand-in encoder, the token loss against an
explicit log-softmax, where L_equiv's gradient goes, delayed-[CLS] order, exact token grids, the
released recipe's heads, inits, drop-path rule, position-table resize and solarisation, fp32
losses under autocast, the paper preset, every preset key and bad flag, 1 vs 2 gloo processes,
the harness interface (online probe, backbone, per-block compile, b2 check), the compared add-ons
and the 2+4 views (each loss against its formula, the crops and recorded parameters, where each
add-on's gradient goes, every configuration end to end and under torchrun), exact resume, the
README commands."""
import json
import math
import os
import shlex
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import ser
from conftest import leave_process_group, readme_commands, run

# A ViT small enough for a CPU test: 16-px crops, patch 4 (4 x 4 tokens), 3 blocks.
TINY = ["--resolution", "16", "--patch", "4", "--dim", "32", "--depth", "3", "--heads", "2",
        "--ser-layer", "1", "--batch-size", "16", "--b2-ratio", "0.25", "--head-hidden", "64",
        "--head-dim", "32", "--token-dim", "32", "--num-workers", "0", "--log-every", "1"]


def tiny(flags):
    """TINY + flags, less TINY's SER-only flags (b2, token projector) when flags pick an add-on,
    which refuses them."""
    if "--equiv-objective" not in flags:
        return TINY + list(flags)
    drop = {i + d for i, w in enumerate(TINY) if w in ("--b2-ratio", "--token-dim") for d in (0, 1)}
    return [w for i, w in enumerate(TINY) if i not in drop] + list(flags)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster than two on a shared 2-core machine; restored
    after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def smooth_images(n, size, seed=0):
    """Zero-mean, low-frequency images: bicubic upsampling of 4 x 4 noise (natural-image-like
    smoothness)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 3, 4, 4, generator=g)
    return F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)


def map_cosine(a, b):
    """Mean over images of the cosine between two whole maps (flattened, all tokens and
    channels)."""
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).mean().item()


# ---------------------------------------------------------------- rho_g
def test_rho_aligns_an_exactly_equivariant_encoder():
    """With f = patch average pooling (exactly equivariant to rot90/flip permutations),
    rho_g(f(x1)) matches f(x2) up to the bicubic resampling error, both directions; without the
    reflection it does not."""
    P, S, n = 8, 64, 6

    def encoder(x):
        return F.avg_pool2d(x, P)

    good, bad = [], []
    for step in range(12):
        g0, g1 = ser.sample_group(n, S // P, step, seed=1, device="cpu")
        x = smooth_images(n, S, seed=step)
        z0 = encoder(ser.act_on_images(x, g0, P))
        z1 = encoder(ser.act_on_images(x, g1, P))
        good.append(map_cosine(ser.rho(z0, g0, g1), z1))
        good.append(map_cosine(ser.rho(z1, g1, g0), z0))
        # The same map with the reflection dropped: undo k0, resize, apply k1.
        unrotated = torch.rot90(z0, -g0.k, dims=(-2, -1))
        resized = F.interpolate(unrotated, size=g1.hw, mode="bicubic", align_corners=False)
        wrong = torch.rot90(resized, g1.k, dims=(-2, -1))
        bad.append(map_cosine(wrong, z1))
    assert min(good) > 0.9, good
    assert sum(bad) / len(bad) < 0.3, bad


def test_every_pair_differs_by_a_reflection():
    g0, g1 = ser.sample_group(64, 8, 0, 0, "cpu")
    assert torch.equal(g1.d, ~g0.d) and torch.equal(g1.f, ~g0.f)


# ---------------------------------------------------------------- token NT-Xent
def reference_token_nce(anchor, target, tau, both, same_image=False):
    """Per anchor token: -log softmax over [positive, other images' target tokens (+ anchor
    tokens)]; same_image=True also lets the anchor's own image's other tokens in (the mistake
    that turns the loss into within-image localisation)."""
    n, C, h, w = anchor.shape
    A = F.normalize(anchor.reshape(n, C, h * w).permute(0, 2, 1), dim=-1)   # (n, T, C)
    B = F.normalize(target.reshape(n, C, h * w).permute(0, 2, 1), dim=-1)
    losses = []
    for i in range(n):
        for j in range(h * w):
            logits = [A[i, j] @ B[i, j] / tau]
            for m in range(n):
                for k in range(h * w):
                    if m != i or (same_image and k != j):
                        logits.append(A[i, j] @ B[m, k] / tau)
                        if both:
                            logits.append(A[i, j] @ A[m, k] / tau)
            losses.append(-torch.log_softmax(torch.stack(logits), 0)[0])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("negatives", ["target", "both"])
def test_token_loss_equals_explicit_log_softmax(negatives):
    torch.manual_seed(0)
    a = torch.randn(3, 5, 2, 3, dtype=torch.float64)
    t = torch.randn(3, 5, 2, 3, dtype=torch.float64)
    both = negatives == "both"
    got = ser.token_nce(a, t, 0.4, negatives).double()
    torch.testing.assert_close(got, reference_token_nce(a, t, 0.4, both), rtol=1e-6, atol=1e-8)
    assert not torch.allclose(got, reference_token_nce(a, t, 0.4, both, same_image=True))
    aligned = ser.token_nce(t, t, 0.05, negatives)
    assert aligned < 0.01 * ser.token_nce(a, t, 0.05, negatives)                  # aligned -> ~0


# ---------------------------------------------------------------- where L_equiv's gradient goes
def _step_grads(base, lam):
    args = ser.parse_args(TINY + ["--base", base, "--ser-lambda", str(lam)])
    args.num_classes = 4
    torch.manual_seed(0)
    model = ser.build_model(args)
    torch.manual_seed(1)
    x = torch.rand(16, 3, 16, 16)
    views, g, _ = ser.make_views([x, x.flip(-1)], args, step=0)
    loss, terms, _ = model(views, g, torch.arange(16) % 4, ser.schedule(0, args, 1))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return model, grads, terms


@pytest.mark.parametrize("base", ["moco", "bt"])
def test_equiv_gradient_reaches_first_blocks_and_projector_only_when_lambda_positive(base):
    model, g1, terms = _step_grads(base, 1.0)
    _, g0, terms0 = _step_grads(base, 0.0)
    assert torch.isfinite(terms["equiv"])
    assert torch.equal(terms["equiv"], terms0["equiv"])                 # logged even at lambda 0
    L = 1                                                               # --ser-layer in TINY
    first_blocks = tuple(f"student.blocks.{i}." for i in range(L))
    for name in g1:
        if name.startswith("token_proj") or name.startswith("student.norm_equiv"):
            assert g1[name].abs().sum() > 0 and g0[name].abs().sum() == 0, name
        elif name.startswith(first_blocks):
            assert not torch.allclose(g1[name], g0[name]), name        # L_equiv adds to 1..L
        elif name.startswith("student.blocks."):
            torch.testing.assert_close(g1[name], g0[name], msg=name)   # ... and nothing after L
    assert "student.blocks.0.qkv.weight" in g1 and "token_proj.0.weight" in g1


def test_equiv_loss_alone_has_gradient_on_student_maps():
    """The released code's bug: its gathered student tokens carry no gradient (the gathers are
    @torch.no_grad()). Here they do."""
    args = ser.parse_args(TINY + ["--base", "moco"])
    args.num_classes = 4
    model = ser.build_model(args)
    x = torch.rand(4, 3, 16, 16)
    g = ser.sample_group(4, 4, 0, 0, "cpu")
    u = [ser.act_on_images(x, g_v, 4) for g_v in g]
    maps = [model.student(v)[1] for v in u]
    with torch.no_grad():
        targets = [model.teacher(v)[1] for v in u]
    loss = ser.equivariance_loss(model.token_proj, maps, targets, g, 0.5)
    inputs = [maps[0], model.student.blocks[0].qkv.weight, model.token_proj[0].weight]
    grads = torch.autograd.grad(loss, inputs)
    assert all(gr.abs().sum() > 0 for gr in grads)


# ---------------------------------------------------------------- delayed [CLS], exact grids
@pytest.mark.parametrize("ser_flag,layer,expect_cls_at",
                         [("on", 2, 2), ("on", 4, 3), ("off", 2, 0)])
def test_delayed_cls_order(ser_flag, layer, expect_cls_at):
    args = ser.parse_args(TINY + ["--depth", "4", "--ser", ser_flag, "--ser-layer", str(layer)])
    args.num_classes = 4
    vit = ser.build_model(args).student.eval()
    assert vit.cls_at == expect_cls_at and vit.pos_embed.shape[1] == 16   # no [CLS] row
    assert (vit.cls_pos is None) == (ser_flag == "on")
    seen = []

    def record_length(module, inputs, output):
        seen.append(inputs[0].shape[1])

    hooks = [b.register_forward_hook(record_length) for b in vit.blocks]
    x = torch.randn(2, 3, 16, 24)                                       # a non-square 4 x 6 grid
    cls, eq_map = vit(x)
    for h in hooks:
        h.remove()
    assert seen == [24] * expect_cls_at + [25] * (4 - expect_cls_at)   # [CLS] before cls_at + 1
    assert cls.shape == (2, 32)
    if ser_flag == "on":
        assert eq_map.shape == (2, 32, 4, 6)
        vit.cls_token.data.add_(1.0)                    # the layer-L map never sees [CLS] ...
        cls2, eq2 = vit(x)
        if layer <= expect_cls_at:
            torch.testing.assert_close(eq2, eq_map)
        assert not torch.allclose(cls2, cls)            # ... the final [CLS] does
    else:
        assert eq_map is None
    assert vit.last_blocks_features(x).shape == (2, 4 * 32)
    assert [m.shape for m in vit.block_maps(x)] == [(2, 32, 4, 6)] * 4


@pytest.mark.parametrize("grid,lo,hi", [(8, 6, 11), (14, 10, 18)])
def test_token_grids_are_exact_patch_multiples(grid, lo, hi):
    P = 4
    vit = ser.ViT(grid * P, P, 16, 2, 2, cls_at=1, loss_layer=1)
    for step in range(40):
        for g_v in ser.sample_group(2, grid, step, 0, "cpu"):
            h, w = g_v.hw
            assert lo <= h <= hi and lo <= w <= hi
            u = ser.act_on_images(torch.rand(2, 3, grid * P, grid * P), g_v, P)
            expect = (P * h, P * w) if g_v.k % 2 == 0 else (P * w, P * h)
            assert tuple(u.shape[-2:]) == expect
            if step < 4:
                assert vit(u)[1].shape[-2:] == (expect[0] // P, expect[1] // P)


# ---------------------------------------------------------------- the released recipe's pieces
def _tiny_model(*flags):
    args = ser.parse_args(TINY + list(flags))
    args.num_classes = 4
    return ser.build_model(args)


def _layout(seq):
    """An nn.Sequential as [(type name, in, out, affine or bias)] for a structural comparison."""
    out = []
    for m in seq:
        if isinstance(m, torch.nn.Linear):
            out.append(("Linear", m.in_features, m.out_features, m.bias is not None))
        elif isinstance(m, torch.nn.BatchNorm1d):
            out.append(("BN", m.num_features, m.num_features, m.affine))
        else:
            out.append((type(m).__name__,))
    return out


def test_moco_v3_heads_end_in_an_affine_free_batchnorm():
    """MoCo-v3's ViT builder: projector Linear-BN-ReLU-Linear-BN-ReLU-Linear-BN(affine=False),
    predictor Linear-BN-ReLU-Linear-BN(affine=False), all linears bias-free; Barlow Twins'
    projector ends in a plain Linear (its affine-free BN is the loss's standardisation)."""
    moco = _tiny_model("--base", "moco")                        # dim 32, hidden 64, head dim 32
    assert _layout(moco.head) == [("Linear", 32, 64, False), ("BN", 64, 64, True), ("ReLU",),
                                  ("Linear", 64, 64, False), ("BN", 64, 64, True), ("ReLU",),
                                  ("Linear", 64, 32, False), ("BN", 32, 32, False)]
    assert _layout(moco.predictor) == [("Linear", 32, 64, False), ("BN", 64, 64, True),
                                       ("ReLU",), ("Linear", 64, 32, False),
                                       ("BN", 32, 32, False)]
    assert _layout(moco.teacher_head) == _layout(moco.head)
    bt = _tiny_model("--base", "bt")
    assert _layout(bt.head) == _layout(moco.head)[:-1]


def test_drop_path_rises_linearly_over_depth():
    model = _tiny_model("--base", "dino", "--depth", "4", "--drop-path", "0.1")
    rates = [b.drop_path for b in model.student.blocks]
    assert rates == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])
    assert [b.drop_path for b in model.teacher.blocks] == [0.0] * 4


@pytest.mark.parametrize("base", ["moco", "dino", "bt"])
def test_patch_embedding_keeps_pytorch_default_init(base):
    """The released ViT leaves the patch Conv2d at PyTorch's default init for every base (MoCo:
    frozen too): weight and bias ~ U(+-1/sqrt(fan_in)), bias non-zero (MoCo-v3's own xavier
    init has a wider bound and a zero bias)."""
    pe = _tiny_model("--base", base).student.patch_embed
    bound = 1 / math.sqrt(3 * 4 * 4)
    assert pe.weight.abs().max() <= bound and pe.weight.abs().max() > 0.9 * bound
    assert pe.bias.abs().min() > 0 and pe.bias.abs().max() <= bound
    assert pe.weight.requires_grad == (base != "moco")


def test_position_table_resize_is_dinos_scale_factor():
    """A non-native grid reads the table through F.interpolate(scale_factor=(h + 0.1) / grid),
    as the released interpolate_pos_encoding; the native grid reads it as is."""
    vit = ser.ViT(16, 4, 8, 1, 2, cls_at=1, loss_layer=1)
    with torch.no_grad():
        vit.pos_embed.normal_()
        vit.patch_embed.weight.zero_()                              # tokens = position rows only
        vit.patch_embed.bias.zero_()
    table = vit.pos_embed.reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    for h, w in ((6, 5), (3, 4), (2, 7)):
        got = vit.patch_tokens(torch.rand(1, 3, 4 * h, 4 * w))[0]
        want = F.interpolate(table, scale_factor=((h + 0.1) / 4, (w + 0.1) / 4), mode="bicubic",
                             align_corners=False).flatten(2).transpose(1, 2)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(vit.patch_tokens(torch.rand(1, 3, 16, 16))[0], vit.pos_embed)


def test_dino_head_init_is_trunc_normal():
    head = _tiny_model("--base", "dino", "--head-hidden", "256").head
    for m in head.mlp:
        if isinstance(m, torch.nn.Linear):
            assert m.weight.std().item() == pytest.approx(0.02, rel=0.15) and not m.bias.any()
    norm_g = head.last.parametrizations.weight.original0
    assert torch.equal(norm_g, torch.ones_like(norm_g))                      # weight-norm g = 1


def identity(x, **unused):
    return x


def test_solarize_threshold_is_uniform(monkeypatch):
    """kornia's RandomSolarize(thresholds=0.5) draws the threshold from U(0, 1): a grey level 0.7
    is inverted in ~70 % of the images, not always (a fixed 0.5 would)."""
    monkeypatch.setattr(ser, "color_jitter", identity)   # keep the grey level; grayscale: no-op
    torch.manual_seed(0)
    out = ser.photometric(torch.full((4000, 3, 10, 10), 0.7), blur_p=0.0, solarize_p=1.0)
    inverted = (out[:, 0, 0, 0] - 0.3).abs() < 1e-6
    assert torch.all(inverted | ((out[:, 0, 0, 0] - 0.7).abs() < 1e-6))
    assert 0.65 < inverted.float().mean().item() < 0.75


def _loss_value(name):
    """One loss on fixed random inputs (the same inputs at every call)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    if name == "token_nce":
        return ser.token_nce(r(4, 64, 3, 3), r(4, 64, 3, 3), 0.1, "both")
    if name == "moco":
        return ser.moco_infonce(r(16, 32), r(16, 32), 0.2)
    if name == "dino":
        return ser.dino_loss(r(16, 64), r(16, 64), r(16, 64), r(16, 64), 0.1 * r(1, 64), 0.1, 0.04)
    return ser.barlow_twins_loss(r(16, 32), r(16, 32), 0.0051)


@pytest.mark.parametrize("name", ["token_nce", "moco", "dino", "bt"])
def test_loss_statistics_are_fp32_under_autocast(name):
    """.float() does not stop autocast (a matmul of fp32 tensors still runs in bf16); each loss
    switches it off."""
    torch.manual_seed(0)
    want = _loss_value(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _loss_value(name)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


# ---------------------------------------------------------------- paper preset
def _final_lr(base):
    args = ser.parse_args(["--preset", "paper", "--base", base])
    return ser.schedule(10 ** 9, args, 1)["lr"]


def test_paper_preset_is_the_released_recipe():
    expect = {"moco": dict(lr=2.4e-3, wd=0.1, wd_end=0.1, clip_grad=0.0, crop_min=0.08,
                           interp="bilinear", head_hidden=4096, head_dim=256, momentum=0.99,
                           ser_lambda=1.0, ser_tau=0.5, drop_path=0.0),
              "dino": dict(lr=8e-4, wd=0.04, wd_end=0.4, clip_grad=0.3, crop_min=0.25,
                           interp="bicubic", head_hidden=2048, head_dim=65536,
                           head_bottleneck=256, momentum=0.982, ser_lambda=0.3, ser_tau=0.4,
                           drop_path=0.1, freeze_last_epochs=1, teacher_temp_epochs=10),
              "bt": dict(lr=8e-4, wd=0.1, clip_grad=0.3, crop_min=0.08, interp="bicubic",
                         head_hidden=8192, head_dim=8192, ser_lambda=1.0, ser_tau=0.4,
                         drop_path=0.0)}
    for base, want in expect.items():
        a = ser.parse_args(["--preset", "paper", "--base", base])
        assert (a.resolution, a.patch, a.dim, a.depth, a.heads) == (224, 16, 384, 12, 6)
        assert (a.batch_size, a.epochs, a.warmup_epochs) == (2048, 100, 10)
        assert (a.ser_layer, a.token_dim) == (3, 512)
        assert ser.b2_size(256, a) == 3 and a.ser == "on" and a.ser_negatives == "target"
        temperatures = (a.moco_tau, a.student_temp, a.teacher_temp0, a.teacher_temp)
        assert temperatures == (0.2, 0.1, 0.04, 0.07)
        assert (a.center_momentum, a.bt_lambda) == (0.9, 0.0051)
        assert a.blr * a.batch_size / 256 == pytest.approx(want.pop("lr"))
        assert {k: getattr(a, k) for k in want} == want, base
    final = (_final_lr("moco"), _final_lr("dino"), _final_lr("bt"))
    assert final == pytest.approx((0.0, 1e-5, 8e-7))
    model = ser.build_model(ser.parse_args(["--preset", "paper", "--base", "moco"]))
    # The released projector_equiv: ~0.46 M parameters.
    assert sum(p.numel() for p in model.token_proj.parameters()) == 458_752
    # ViT-S/16: timm's 21,665,664 - the [CLS] position row (384) + the separate norm_equiv (768).
    assert sum(p.numel() for p in model.student.parameters()) == 21_666_048
    assert not model.student.patch_embed.weight.requires_grad        # MoCo-v3: frozen patch proj.


# ---------------------------------------------------------------- 1 vs 2 gloo processes
LOSSES = ("token_target", "token_both", "bt", "moco", "equimod", "local_pair", "multi_view")


def add_halves(z):
    """A stand-in for EquiMod's predictor: (n, 32) -> (n, 16)."""
    return z[:, :16] + z[:, 16:]


EQUIMOD_STANDIN = {"project": identity, "embed": identity, "predict": add_halves}


def _losses(rows, w, rank=0, world=1):
    """Every gathered loss on this rank's rows of a shared batch, through a shared parameter w."""
    per = rows.shape[0] // world
    z = rows[rank * per:(rank + 1) * per] @ w                     # (per, 64): two 8 x 2 x 2 maps
    maps = z.view(per, 2, 8, 2, 2)
    out = {}
    for negatives in ("target", "both"):
        out[f"token_{negatives}"] = ser.token_nce(maps[:, 0], maps[:, 1], 0.4, negatives)
    out["bt"] = ser.barlow_twins_loss(z[:, :16], z[:, 16:32], 0.0051)
    out["moco"] = ser.moco_infonce(z[:, :16], z[:, 16:32].detach(), 0.2)
    params = torch.cat([z[:, 48:], z[:, 48:].flip(1)])              # the two views' p
    out["equimod"] = ser.equimod_loss(EQUIMOD_STANDIN, z[:, :16], (z[:, 16:32], z[:, 32:48]),
                                      params, 0.2)
    g = (ser.GroupElement(1, (2, 2), None, None), ser.GroupElement(3, (2, 2), None, None))
    out["local_pair"] = ser.local_pair_loss(identity, maps[:, 0], maps[:, 1], g, 0.4)
    queries = [z[:, :16], z[:, 16:32], z[:, 32:48]]
    out["multi_view"] = ser.multi_view_infonce(queries, [z[:, 48:].detach(), z[:, :16].detach()],
                                               0.2)
    return out


def _gloo_worker(rank, world, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    rows = torch.randn(8, 6, dtype=torch.float64)
    w0 = torch.randn(6, 64, dtype=torch.float64)
    res = {}
    for name in LOSSES:
        w = w0.clone().requires_grad_()
        loss = _losses(rows, w, rank, world)[name]
        loss.backward()
        both = torch.cat([loss.detach().view(1), w.grad.flatten()])
        dist.all_reduce(both)                                       # DDP: average loss and grad
        res[name] = both / world
    if rank == 0:
        torch.save(res, out)
    leave_process_group()


def test_one_vs_two_gloo_processes(tmp_path):
    torch.manual_seed(0)
    rows = torch.randn(8, 6, dtype=torch.float64)
    w0 = torch.randn(6, 64, dtype=torch.float64)
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "out.pt")), nprocs=2)
    two = torch.load(tmp_path / "out.pt")
    for name in two:
        w = w0.clone().requires_grad_()
        loss = _losses(rows, w)[name]
        loss.backward()
        one = torch.cat([loss.detach().view(1), w.grad.flatten()])

        def named(message, name=name):
            return f"{name}: {message}"

        torch.testing.assert_close(two[name], one, msg=named)


# ---------------------------------------------------------------- the harness interface
def test_online_probe_counts_and_top1():
    """forward() hands the probe's correct count and image count to the harness; monitor_metrics
    turns the epoch's sums into one top-1."""
    args = ser.parse_args(TINY + ["--base", "bt"])
    args.num_classes = 4
    model = ser.build_model(args)
    x = torch.rand(16, 3, 16, 16)
    labels = torch.arange(16) % 4
    views, g, _ = ser.make_views([x, x.flip(-1)], args, step=0)
    _, terms, sums = model(views, g, labels, ser.schedule(0, args, 1))
    with torch.no_grad():
        cls = torch.cat([model.student(views[0])[0], model.student(views[2])[0]])
        correct = (model.probe(cls).argmax(1) == labels).sum().item()
    assert set(sums) == {"probe_correct", "images"} and "probe_acc" not in terms
    assert (sums["probe_correct"].item(), sums["images"].item()) == (correct, 16)
    assert ser.monitor_metrics({"probe_correct": 30.0, "images": 64.0}) == {"top1_probe": 30 / 64}


@pytest.mark.parametrize("base", ["moco", "dino", "bt"])
def test_backbone_is_the_probed_vit(base):
    """backbone.pt holds model.backbone: DINO's teacher (DINO evaluates its teacher), else the
    student; eval.py probes the same ViT."""
    model = _tiny_model("--base", base)
    want = model.teacher if base == "dino" else model.student
    assert model.backbone is want
    assert ser.probeable(model, model.args).backbone.vit is want
    assert "backbone" not in dict(model.named_children())         # a view, not a second copy


def test_compile_compiles_every_vit_block_and_nothing_else():
    """The harness calls model.compile(): SER compiles each block of the student and the teacher
    (the b2 views change shape every step), never the whole model."""
    model = _tiny_model("--base", "moco")
    model.compile()
    blocks = [*model.student.blocks, *model.teacher.blocks]
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert model._compiled_call_impl is None and model.student._compiled_call_impl is None


def test_a_b2_split_without_negatives_is_one_message(toy_imagefolder, tmp_path, capsys):
    """b2 = 1 image per rank leaves L_equiv without negatives: one message naming --b2-ratio,
    exit 2, before the run dir is written."""
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        ser.main(TINY + ["--data-root", toy_imagefolder, "--b2-ratio", "0.05",
                         "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--b2-ratio 0.05 gives 1 of 16" in err, err
    assert "Traceback" not in err and not run_dir.exists()


# ---------------------------------------------------------------- the compared add-ons, 2+4 views
def _args(*flags):
    args = ser.parse_args(tiny(flags))
    args.num_classes = 4
    return args


def test_crops_draw_as_the_released_loader_and_their_boxes_recut_them():
    """Crops a and b are Compose([RandomResizedCrop, RandomHorizontalFlip, ToTensor])'s draws,
    image for image; each box (fractions; the flip) cuts the same crop again."""
    from PIL import Image
    from torchvision import transforms
    args = _args("--equiv-objective", "augself")
    image = Image.fromarray((torch.rand(40, 56, 3) * 255).byte().numpy())
    reference = transforms.Compose([
        transforms.RandomResizedCrop(16, scale=(args.crop_min, 1.0)),
        transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    for seed in range(5):
        torch.manual_seed(seed)
        want = reference(image), reference(image)
        torch.manual_seed(seed)
        got = ser.Crops(args)(image)
        assert ser.crop_names(args) == ["a", "b", "box_a", "box_b"] and len(got) == 4
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        for crop, box in ((got[0], got[2]), (got[1], got[3])):
            top, left, h, w = (round(v * n) for v, n in zip(box[:4].tolist(), (40, 56, 40, 56)))
            recut = transforms.functional.to_tensor(transforms.functional.resized_crop(
                image, top, left, h, w, [16, 16]))
            assert torch.equal(crop, recut.flip(-1) if box[4] else recut)
    names = {objective: ser.crop_names(_args("--equiv-objective", objective))
             for objective in ("equimod", "essl")}
    assert names == {"equimod": ["a", "b", "box_a", "box_b", "centre"],
                     "essl": ["a", "b", "rotate"]}
    assert ser.crop_names(_args("--local-crops", "4"))[2:] == ["local1", "local2", "local3",
                                                               "local4"]
    assert ser.local_side(ser.parse_args(["--preset", "paper"])) == 96      # loader/local4.py
    assert ser.local_side(ser.parse_args([])) == 12 and ser.local_side(_args()) == 8


def naive_jitter(img, b, c, s, turns):
    """ColorJitter from its formula on one image: brightness x b, contrast about the mean luma,
    saturation about the luma, hue = the chroma plane of YIQ turned by `turns` full turns."""
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
    x = (img * b).clamp(0, 1)
    mean = torch.einsum("c,chw->hw", luma, x).mean()
    x = ((x - mean) * c + mean).clamp(0, 1)
    gray = torch.einsum("c,chw->hw", luma, x)[None]
    x = ((x - gray) * s + gray).clamp(0, 1)
    yiq = ser.YIQ.double()
    t = 2 * math.pi * turns
    turn = torch.tensor([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]],
                        dtype=torch.float64)
    return torch.einsum("ij,jhw->ihw", torch.linalg.inv(yiq) @ turn @ yiq, x).clamp(0, 1)


def test_photometric_records_the_applied_parameters_without_changing_the_images():
    x = torch.rand(64, 3, 12, 12)
    for pipeline in (*ser.PIPELINES, ser.AUGSELF_PIPELINE, ser.LOCAL_PIPELINE):
        torch.manual_seed(3)
        want = ser.photometric(x, *pipeline)
        torch.manual_seed(3)
        record = {}
        assert torch.equal(ser.photometric(x, *pipeline, record=record), want)
        assert record["jitter_w"].shape == (64, 4) and record["jitter_w"].abs().max() <= 0.5
        assert torch.equal(record["jitter_w"] * (1 - record["jitter"]), torch.zeros(64, 4))
        assert torch.equal(record["sigma"] * (1 - record["blur"]), torch.zeros(64, 1))
        assert 0.1 <= record["sigma"][record["blur"] > 0].min()
        assert record["solarize"].any() == (pipeline[1] > 0) and record["gray"].any() == (
            len(pipeline) < 3 or pipeline[2] > 0)
    record = {}
    out = ser.color_jitter(x[:4], saturation=0.4, record=record)    # AugSelf's strengths
    for i in range(4):
        w = record["jitter_w"][i].double()
        factors = 1 + 2 * torch.tensor([0.4, 0.4, 0.4]) * w[:3]
        want = naive_jitter(x[i].double(), *factors.tolist(), 2 * 0.1 * w[3].item())
        torch.testing.assert_close(out[i].double(), want, atol=1e-5, rtol=0)


def _random_boxes_and_records(n, seed):
    g = torch.Generator().manual_seed(seed)
    size = 0.2 + 0.8 * torch.rand(n, 2, generator=g)
    corner = (1 - size) * torch.rand(n, 2, generator=g)
    box = torch.cat([corner, size, (torch.rand(n, 1, generator=g) < 0.5).float()], 1)
    flags = (torch.rand(n, 4, generator=g) < 0.5).float()
    record = {"jitter": flags[:, :1], "gray": flags[:, 1:2], "blur": flags[:, 2:3],
              "solarize": flags[:, 3:], "jitter_w": (torch.rand(n, 4, generator=g) - 0.5)
              * flags[:, :1], "sigma": (0.1 + 1.9 * torch.rand(n, 1, generator=g)) * flags[:, 2:3]}
    return box, record


def test_augself_targets_and_loss_follow_the_formulas():
    """extract_diff: crop centres (y, x) and sizes, centres mirrored with VIEW 1's flip; colour
    codes; SSObjective: sum_k w_k mean (tanh(head_k([f1, f2; f2, f1])) - [d12; d21])^2."""
    (box1, rec1), (box2, rec2) = _random_boxes_and_records(6, 1), _random_boxes_and_records(6, 2)
    got = ser.augself_targets(box1, box2, rec1, rec2)
    for i in range(6):
        t1, l1, h1, w1, f1 = box1[i].tolist()
        t2, l2, h2, w2, _ = box2[i].tolist()
        cx1, cx2 = (1 - l1 - w1 / 2, 1 - l2 - w2 / 2) if f1 else (l1 + w1 / 2, l2 + w2 / 2)
        want = [t1 + h1 / 2 - t2 - h2 / 2, cx1 - cx2, h1 - h2, w1 - w2]
        torch.testing.assert_close(got["crop"][i], torch.tensor(want))
        torch.testing.assert_close(got["color"][i], rec1["jitter_w"][i] - rec2["jitter_w"][i])
    args = _args("--equiv-objective", "augself", "--augself-color", "0.3")
    heads = ser.augself_heads(args)
    assert [tuple(m.weight.shape) for m in heads["crop"] if isinstance(m, torch.nn.Linear)] == [
        (512, 64), (512, 512), (4, 512)] and heads["crop"][-1].bias is not None
    crop_only = _args("--equiv-objective", "augself", "--augself-color", "0")
    assert set(ser.augself_heads(crop_only)) == {"crop"}
    torch.manual_seed(0)
    f1, f2 = torch.randn(6, 32), torch.randn(6, 32)
    targets = {k: torch.rand(12, 4) * 2 - 1 for k in ("crop", "color")}
    got = ser.augself_loss(heads, f1, f2, targets, args)
    want = 0.0
    for name, weight in (("crop", 0.5), ("color", 0.3)):
        out = heads[name](torch.cat([torch.cat([f1, f2], 1), torch.cat([f2, f1], 1)]))
        want += weight * sum((math.tanh(out[r, o].item()) - targets[name][r, o].item()) ** 2
                             for r in range(12) for o in range(4)) / 48
    assert got.item() == pytest.approx(want, rel=1e-5)


def naive_infonce(q, k, tau):
    """Mean over rows i of -log softmax_j(cos(q_i, k_j) / tau)[i], times 2 tau."""
    total = 0.0
    for i in range(q.shape[0]):
        logits = torch.stack([F.cosine_similarity(q[i], k[j], dim=0) / tau
                              for j in range(k.shape[0])])
        total = total - torch.log_softmax(logits, 0)[i]
    return total / q.shape[0] * 2 * tau


def test_equimod_loss_is_symmetric_infonce_with_detached_keys():
    """MoCo.equimod: 1/2 [C(y_t, y_hat) + C(y_hat, y_t)], C = contrastive_loss_temp (its keys
    gathered without gradient), y_hat = predict([y_0, embed(p)]) with y_0 repeated per view."""
    torch.manual_seed(0)
    f0, fa, fb, p = (torch.randn(5, 16, dtype=torch.float64, requires_grad=True) for _ in "0abp")
    got = ser.equimod_loss(EQUIMOD_STANDIN, f0, (fa, fb), torch.cat([p, -p]), 0.2)
    got.backward()
    leaves = [t.detach().clone().requires_grad_() for t in (f0, fa, fb, p)]
    y_t = torch.cat(leaves[1:3])
    y_hat = torch.cat([leaves[0] + leaves[3], leaves[0] - leaves[3]])
    want = 0.5 * (naive_infonce(y_t, y_hat.detach(), 0.2) + naive_infonce(y_hat, y_t.detach(), 0.2))
    want.backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)     # fp32 statistics
    for mine, naive in zip((f0, fa, fb, p), leaves):
        torch.testing.assert_close(mine.grad, naive.grad, rtol=1e-4, atol=1e-6)
    box, record = _random_boxes_and_records(5, 3)
    params = ser.equimod_params(box, record)
    keys = ("jitter", "jitter_w", "gray", "blur", "sigma", "solarize")
    for i in range(5):
        want = box[i].tolist() + [v for k in keys for v in record[k][i].tolist()]
        assert params[i].tolist() == want
    heads = ser.equimod_heads(ser.parse_args(["--preset", "paper"]))
    linears = [tuple(m.weight.shape) for m in heads.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [(384, 384), (384, 384), (128, 384), (128, 14), (128, 256)]
    assert not heads["project"][-1].affine and not heads["predict"][-1].affine


def test_essl_rotations_head_and_loss_are_the_released_ones():
    x = torch.rand(2, 3, 5, 5)
    rotated, labels = ser.four_rotations(x)
    # builder/moco.py :: train_essl builds the copies from flips and transposes:
    forms = [x, x.flip(3).transpose(2, 3), x.flip(3).flip(2), x.transpose(2, 3).flip(3)]
    assert torch.equal(rotated, torch.cat(forms)) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    head = ser.rotation_head(ser.parse_args(["--preset", "paper"]))
    assert [tuple(m.weight.shape) for m in head if isinstance(m, torch.nn.Linear)] == [
        (384, 384), (384, 384), (256, 384), (4, 256)]
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in head) == 3
    model = ser.build_model(_args("--equiv-objective", "essl"))
    rotated, labels = ser.four_rotations(torch.rand(3, 3, 8, 8))
    outs = [(torch.zeros(3, 32), None)] * 2
    got = model.addon_loss(outs, (rotated, labels))
    logits = model.addon_head(model.student(rotated)[1])          # TINY: block 1's [CLS]
    want = sum(-torch.log_softmax(logits[i], 0)[labels[i]] for i in range(12)) / 12
    torch.testing.assert_close(got, want)


def test_multi_view_infonce_sums_every_query_view_against_both_global_keys():
    torch.manual_seed(0)
    queries = [torch.randn(5, 3, dtype=torch.float64) for _ in range(6)]
    keys = [torch.randn(5, 3, dtype=torch.float64) for _ in range(2)]
    want = sum(naive_infonce(queries[i], keys[j], 0.2) for i in range(6) for j in range(2)
               if i != j)
    got = ser.multi_view_infonce(queries, keys, 0.2)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    two = ser.moco_infonce(queries[0], keys[1], 0.2) + ser.moco_infonce(queries[1], keys[0], 0.2)
    assert torch.equal(ser.multi_view_infonce(queries[:2], keys, 0.2), two)    # MoCo-v3, 2 views


def naive_pair_nce(a, b, tau):
    """The paper's 2N-way token NT-Xent, one anchor token at a time: anchors = every token of
    both maps; positive = the other map's token at the same image and place; negatives = every
    token of every OTHER image in both maps; the mean over the anchors."""
    n, _, h, w = a.shape
    losses = []
    for side, other in ((a, b), (b, a)):
        for i in range(n):
            for y in range(h):
                for x in range(w):
                    anchor = side[i, :, y, x]
                    logits = [F.cosine_similarity(anchor, other[i, :, y, x], dim=0) / tau]
                    logits += [F.cosine_similarity(anchor, m[j, :, yy, xx], dim=0) / tau
                               for j in range(n) if j != i for m in (a, b)
                               for yy in range(h) for xx in range(w)]
                    losses.append(-torch.log_softmax(torch.stack(logits), 0)[0])
    return torch.stack(losses).mean()


def test_local_pair_loss_is_the_papers_2n_way_equation():
    torch.manual_seed(0)
    map_0 = torch.randn(3, 4, 2, 3, dtype=torch.float64)
    map_1 = torch.randn(3, 4, 3, 2, dtype=torch.float64)
    g = (ser.GroupElement(0, (2, 3), None, None), ser.GroupElement(1, (3, 2), None, None))
    got = ser.local_pair_loss(identity, map_0, map_1, g, 0.5)
    want = naive_pair_nce(map_0, ser.rho(map_1, g[1], g[0]), 0.5)     # view 1 in view 0's frame
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_the_2_plus_4_views_pair_each_b2_source_with_its_query_views():
    """b1: 6 query views; b2: three pairs (crop a, local crops 1 and 3) with their own group
    elements, pair p in query views 2p, 2p + 1; pair 0 draws as the 2-view SER."""
    args = _args("--local-crops", "4")
    crops = [torch.rand(16, 3, 16, 16) for _ in "ab"] + [torch.rand(16, 3, 8, 8) for _ in "1234"]
    torch.manual_seed(0)
    views, g, aux = ser.make_views(crops, args, step=3)
    assert aux is None and len(views) == 12 and len(g) == 3
    assert [v.shape[0] for v in views] == [12] * 6 + [4] * 6
    assert [v.shape[-1] for v in views[2:6]] == [8] * 4
    for p, (g0, g1) in enumerate(g):
        for v, g_v in enumerate((g0, g1)):
            size = (4 * g_v.hw[0], 4 * g_v.hw[1])
            size = size if g_v.k % 2 == 0 else size[::-1]
            assert tuple(views[6 + 2 * p + v].shape[-2:]) == size
    two_view = ser.sample_group(4, 4, 3, args.seed, "cpu")
    assert [(e.k, e.hw) for e in g[0]] == [(e.k, e.hw) for e in two_view]
    assert len({(pair[0].k, pair[0].hw, pair[1].k, pair[1].hw) for pair in g}) > 1


@pytest.mark.parametrize("objective", ["augself", "equimod", "essl"])
@pytest.mark.parametrize("layer", [1, 3])
def test_each_addon_trains_its_head_and_the_blocks_up_to_its_layer(objective, layer):
    """An add-on's loss alone: its head and block 1 get gradients; decoupled (L = 1 < depth 3)
    blocks 2, 3 get none and norm_equiv does (the augself branch's forward_baseline); at the
    last block the final [CLS] is read. No token projector; the decoupled feature is
    norm_equiv(the layer-L [CLS]), [CLS] joined at the input."""
    args = _args("--equiv-objective", objective, "--ser-layer", str(layer))
    torch.manual_seed(0)
    model = ser.build_model(args)
    assert model.token_proj is None and model.student.cls_at == 0
    assert (model.student.norm_equiv is None) == (layer == 3)
    keys = model.state_dict().keys()
    assert any(k.startswith("addon_head.") for k in keys) and "student.cls_pos" in keys
    side = ser.local_side(args)
    shapes = {"a": (3, 16, 16), "b": (3, 16, 16), "centre": (3, 16, 16), "rotate": (3, side, side),
              "box_a": (5,), "box_b": (5,)}
    crops = [torch.rand(16, *shapes[name]) for name in ser.crop_names(args)]
    torch.manual_seed(1)
    views, g, aux = ser.make_views(crops, args, step=0)
    assert g is None and [v.shape[0] for v in views] == [16, 16]
    loss, terms, _ = model(views, g, torch.arange(16) % 4, ser.schedule(0, args, 1), aux)
    assert set(terms) == {"inv", "equiv", "probe"} and torch.isfinite(loss)
    model.zero_grad()
    model.addon_loss([model.student(v) for v in views], aux).backward()
    grads = {n: p.grad.abs().sum().item() for n, p in model.named_parameters()
             if p.grad is not None}
    assert any(n.startswith("addon_head.") for n in grads) and grads["student.blocks.0.qkv.weight"]
    later = [grads.get(f"student.blocks.{i}.qkv.weight", 0.0) for i in (1, 2)]
    assert (later == [0.0, 0.0]) == (layer == 1)
    x = torch.rand(2, 3, 16, 16)
    cls, feature, blocks = model.student(x, every_block=True)
    if layer == 1:
        torch.testing.assert_close(feature, model.student.norm_equiv(blocks[0][:, 0]))
    else:
        assert feature is None and ser.addon_feature((cls, feature)) is cls


def test_the_addons_leave_sers_model_and_run_dirs_as_they_were():
    """SER and --ser off build no add-on head (the state_dict keys of existing runs); run dirs
    name the add-on, a layer off its default (the last block) and the 2+4 views."""
    for flags in ([], ["--ser", "off"], ["--base", "dino"]):
        keys = ser.build_model(_args(*flags)).state_dict().keys()
        assert not any(k.startswith("addon_head") for k in keys)
    assert ser.parse_args(["--equiv-objective", "augself"]).ser_layer == 6          # toy depth
    want = {"": "ser-toy-moco", "--equiv-objective augself": "ser-toy-moco-augself",
            "--equiv-objective augself --ser-layer 2": "ser-toy-moco-augself-L2",
            "--equiv-objective equimod --ser-tau 0.2": "ser-toy-moco-equimod",
            "--equiv-objective essl --local-crops 4": "ser-toy-moco-essl-local4",
            "--local-crops 4": "ser-toy-moco-local4",
            "--ser off --local-crops 4": "ser-toy-moco-vanilla-local4"}
    for flags, run_dir in want.items():
        assert ser.parse_args(flags.split()).run_dir == os.path.join("runs", run_dir), flags


ADDON_RUNS = [
    ["--equiv-objective", "augself", "--ser-layer", "4"], ["--equiv-objective", "augself"],
    ["--equiv-objective", "equimod", "--ser-layer", "4"], ["--equiv-objective", "equimod"],
    ["--equiv-objective", "essl", "--ser-layer", "4"], ["--equiv-objective", "essl"],
    ["--local-crops", "4"], ["--local-crops", "4", "--equiv-objective", "essl", "--ser-layer", "4"],
    ["--local-crops", "4", "--ser", "off"]]


@pytest.mark.parametrize("flags", ADDON_RUNS, ids=" ".join)
def test_every_addon_trains_and_evaluates_from_one_command(toy_imagefolder, tmp_path, flags):
    """Each add-on at the last block (--ser-layer 4 = --depth) and decoupled (TINY's 1), SER and
    E-SSL in the 2+4 views, and the vanilla 2+4 base: one epoch, then the linear probe and the
    equivariance score."""
    run_dir = tmp_path / "run"
    ser.main(tiny(["--depth", "4", "--data-root", toy_imagefolder, "--epochs", "1",
                   "--eval-protocols", "linear,equivariance", "--run-dir", str(run_dir)] + flags))
    train = _log(run_dir)
    assert len(train) == 4 and all(math.isfinite(e["total"]) for e in train)
    assert all(("equiv" in e) == ("off" not in flags) for e in train)
    with open(run_dir / "eval.json") as f:
        summary = json.load(f)["summary"]
    assert {"linear_top1/full", "equivariance/block4"} <= set(summary), sorted(summary)


def test_an_addon_runs_under_torchrun(toy_imagefolder, tmp_path):
    """EquiMod (decoupled: TINY's --ser-layer 1) in two gloo processes, one epoch: DDP finds
    every parameter used (its BN heads, the untransformed view's pass, the gathered InfoNCE)."""
    run_dir = tmp_path / "run"
    flags = shlex.join(tiny(["--equiv-objective", "equimod"]))
    cmd = (f"torchrun --standalone --nproc_per_node=2 ser.py {flags} --data-root "
           f"{toy_imagefolder} --epochs 1 --no-eval --run-dir {run_dir}")
    proc = run(cmd, cwd=ser.__file__.rsplit("/", 1)[0])
    assert "Traceback" not in proc.stderr
    train = _log(run_dir)
    assert len(train) == 4 and all(math.isfinite(e["equiv"]) for e in train)


# ---------------------------------------------------------------- exact resume, README commands
def _log(run_dir, kind="train"):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [e for e in map(json.loads, f) if e["kind"] == kind]


LOSS_KEYS = ("step", "total", "inv", "equiv", "lr")


# dino: teacher EMA, centre buffer, teacher-temp schedule; the add-ons (decoupled AugSelf:
# TINY's --ser-layer 1): their extra crops, recorded draws and BN heads; SER in the 2+4 views.
@pytest.mark.parametrize("base, more", [("dino", []), ("moco", ["--equiv-objective", "equimod"]),
                                        ("moco", ["--equiv-objective", "augself"]),
                                        ("moco", ["--local-crops", "4"])], ids=str)
def test_resume_is_exact(toy_imagefolder, tmp_path, base, more, capsys):
    common = tiny(["--base", base, "--data-root", toy_imagefolder, "--no-eval", "--epochs", "2"]
                  + more)
    ser.main(common + ["--run-dir", str(tmp_path / "straight")])
    ser.main(common + ["--run-dir", str(tmp_path / "resumed"), "--stop-after-epochs", "1"])
    assert not os.path.exists(tmp_path / "resumed" / "backbone.pt")     # stopped early: no export
    ser.main(common + ["--run-dir", str(tmp_path / "resumed")])
    straight, resumed = _log(tmp_path / "straight"), _log(tmp_path / "resumed")
    assert len(straight) == len(resumed) == 8                       # 64 images / 16 x 2 epochs
    for a, b in zip(straight, resumed):
        assert {k: a[k] for k in LOSS_KEYS} == {k: b[k] for k in LOSS_KEYS}
    assert "images_per_s" in straight[0] and "probe_acc" not in straight[0]
    online = _log(tmp_path / "straight", "online")
    assert [e["epoch"] for e in online] == [0, 1] and 0 <= online[0]["top1_probe"] <= 1
    assert online == _log(tmp_path / "resumed", "online")
    ck = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert ck["script"] == "ser" and ck["epoch"] == 2 and ck["step"] == 8
    backbone = torch.load(tmp_path / "resumed" / "backbone.pt", weights_only=True)
    assert backbone.keys() == {k[len("teacher."):] for k in ck["model"] if k.startswith("teacher.")}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:             # other training flags: refused, flag named
        ser.main(common + ["--run-dir", str(tmp_path / "resumed"), "--ser-lambda", "0.5"])
    assert e.value.code == 2 and "--ser-lambda" in capsys.readouterr().err


def test_readme_commands(imagefolder_workdir):
    """Every README command for ser.py parses; the toy ones run for one epoch, the first python
    and the first torchrun command with evaluation. The 2-process torchrun launch always runs,
    even before the README shows it."""
    cmds = [c for c in readme_commands("ser.py")
            if c.split()[0] in ("python", "torchrun") and "$" not in c]
    if not any(c.startswith("torchrun") and "paper" not in c for c in cmds):
        cmds.append("torchrun --standalone --nproc_per_node=2 ser.py --base bt "
                    "--run-dir runs/ser-toy-ddp")
    if not any(c.startswith("python ser.py") for c in cmds):
        cmds.append("python ser.py --base moco")
    evaluated = set()
    for cmd in cmds:
        words = shlex.split(cmd)
        flags = words[words.index("ser.py") + 1:]
        args = ser.parse_args(flags)
        if args.preset == "paper" or "--data-root" in flags:
            continue                                            # real data, GPUs: parsing only
        shutil.rmtree(imagefolder_workdir / "runs", ignore_errors=True)
        launcher = words[0]
        extra = " --epochs 1" + (" --no-eval" if launcher in evaluated else "")
        proc = run(cmd + extra, cwd=imagefolder_workdir)
        assert "Traceback" not in proc.stderr, cmd
        assert os.path.exists(imagefolder_workdir / args.run_dir / "checkpoint.pt"), cmd
        if launcher not in evaluated:
            assert os.path.exists(imagefolder_workdir / args.run_dir / "eval.json"), cmd
            assert "equivariance" in proc.stdout and "linear_top1" in proc.stdout, cmd
        evaluated.add(launcher)


def test_missing_data_root_is_one_message(tmp_path):
    proc = run(f"python ser.py --data-root {tmp_path / 'nowhere'} --epochs 1",
               cwd=ser.__file__.rsplit("/", 1)[0], check=False)
    assert proc.returncode == 2 and "nowhere" in proc.stderr and "Traceback" not in proc.stderr


BAD_FLAGS = [
    ["--base", "simclr"], ["--no-such-flag"], ["--resolution", "30", "--patch", "4"],
    ["--resolution", "0"], ["--resolution", "4", "--patch", "4"], ["--patch", "0"],
    ["--patch", "-4"], ["--dim", "0"], ["--heads", "0"], ["--heads", "3"], ["--depth", "0"],
    ["--ser-layer", "0"], ["--ser-layer", "9", "--depth", "6"], ["--epochs", "0"],
    ["--epochs", "2.5"], ["--warmup-epochs", "-1"], ["--warmup-epochs", "11"],
    ["--batch-size", "0"], ["--blr", "-1"], ["--blr", "0"], ["--blr", "nan"], ["--blr", "1e39"],
    ["--blr", "inf"], ["--wd", "-0.1"], ["--wd-end", "nan"], ["--min-lr-frac", "1.5"],
    ["--clip-grad", "-1"], ["--seed", "-1"], ["--seed", "1e3"], ["--num-workers", "-1"],
    ["--log-every", "0"], ["--stop-after-epochs", "-1"], ["--ser-lambda", "-1"],
    ["--ser-lambda", "nan"], ["--ser-tau", "0"], ["--moco-tau", "-0.2"], ["--student-temp", "0"],
    ["--teacher-temp0", "nan"], ["--teacher-temp", "1e39"], ["--teacher-temp-epochs", "-1"],
    ["--freeze-last-epochs", "-1"], ["--momentum", "1.5"], ["--center-momentum", "-0.1"],
    ["--bt-lambda", "-1"], ["--b2-ratio", "0"], ["--b2-ratio", "1"], ["--drop-path", "1"],
    ["--drop-path", "-0.1"], ["--crop-min", "0"], ["--crop-min", "1.5"], ["--head-hidden", "0"],
    ["--head-dim", "0"], ["--head-bottleneck", "0"], ["--token-dim", "0"],
    ["--equiv-objective", "simclr"], ["--equiv-objective", "essl", "--ser", "off"],
    ["--augself-crop", "-1"], ["--augself-color", "nan"], ["--local-crops", "3"],
    ["--local-crops", "x"], ["--local-crops", "4", "--base", "dino"],
    ["--local-crops", "4", "--equiv-objective", "augself"],
    ["--augself-crop", "0", "--augself-color", "0", "--equiv-objective", "augself"],
    ["--augself-crop", "0.3"], ["--augself-color", "0.3", "--equiv-objective", "essl"],
    ["--b2-ratio", "0.2", "--equiv-objective", "equimod"],
    ["--token-dim", "64", "--equiv-objective", "augself"],
    ["--ser-negatives", "both", "--equiv-objective", "essl"],
    ["--ser-tau", "0.3", "--equiv-objective", "augself"],
]


@pytest.mark.parametrize("argv", BAD_FLAGS, ids=" ".join)
def test_bad_flags_fail_with_one_argparse_error_naming_the_flag(argv, capsys):
    with pytest.raises(SystemExit) as e:
        ser.parse_args(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert e.value.code == 2 and len(errors) == 1 and argv[0] in errors[0], err
    assert "Traceback" not in err


def changed(value):
    """A different value that still passes parse_args' cross-checks."""
    if isinstance(value, str):
        return {"bilinear": "bicubic", "bicubic": "bilinear"}.get(value, value + "-elsewhere")
    if isinstance(value, int):
        return 2 * value if value else 1
    return value / 2 if value else 0.05


@pytest.mark.parametrize("preset", ["toy", "paper"])
@pytest.mark.parametrize("base", ["moco", "dino", "bt"])
@pytest.mark.parametrize("objective", ["ser", "augself", "equimod", "essl"])
def test_every_preset_key_takes_effect(preset, base, objective, monkeypatch):
    """Each value preset_defaults returns reaches the parsed args (no flag's own default hides
    it), and each key is a real flag that overrides it; an add-on's --ser-layer 0 is the last
    block."""
    sources = [ser.BASE_COMMON, ser.METHOD[base]]
    if preset == "paper":
        sources.append(ser.PAPER)
    else:
        sources += [ser.TOY, ser.TOY_METHOD[base]]
    sources.append(ser.OBJECTIVE[objective])
    defaults = ser.preset_defaults(preset, base, objective)
    assert set(defaults) == {k for d in sources for k in d}
    common = ["--preset", preset, "--base", base, "--equiv-objective", objective]
    if objective != "ser":
        assert defaults["ser_layer"] == 0
        assert ser.parse_args(common).ser_layer == ser.parse_args(common).depth
    for key, value in defaults.items():
        winner = next(d for d in reversed(sources) if key in d)          # the dict that wins
        with monkeypatch.context() as m:
            m.setitem(winner, key, changed(value))
            got = getattr(ser.parse_args(common), key)
        assert got == changed(value) and type(got) is type(value), key
        flag = ["--" + key.replace("_", "-"), str(changed(value))]
        if objective not in ser.FLAG_USERS.get(flag[0], (objective,)):
            continue                                # refused: BAD_FLAGS
        args = ser.parse_args(common + flag)
        assert getattr(args, key) == changed(value), key


def test_silent_no_ops_are_refused(toy_imagefolder, tmp_path, capsys):
    """A batch larger than the training set would train 0 steps and evaluate random weights: one
    message naming --batch-size, exit 2, before anything is written. (--epochs 0, --resolution
    0: BAD_FLAGS.)"""
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        ser.main(TINY + ["--data-root", toy_imagefolder, "--batch-size", "128",
                         "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--batch-size 128" in err and "64 training images" in err, err
    assert not run_dir.exists()


@pytest.mark.parametrize("base", ["moco", "dino", "bt"])
def test_schedules_are_the_official_ones(base):
    """Warm-ups from 0 as the released code (MoCo-v3, Barlow Twins: peak * step / W; DINO:
    np.linspace(0, peak, W)); DINO's teacher temperature per epoch, np.linspace(t0, t, E)."""
    args = ser.parse_args(["--base", base, "--preset", "paper"])
    spe = 7                                          # steps per epoch
    W, E = args.warmup_epochs * spe, args.teacher_temp_epochs
    peak = args.blr * args.batch_size / 256
    warmup = np.linspace(0, peak, W) if base == "dino" else peak * np.arange(W) / W
    for step in (0, 1, W // 2, W - 1):
        assert ser.schedule(step, args, spe)["lr"] == pytest.approx(warmup[step], rel=1e-12)
    temps = np.linspace(args.teacher_temp0, args.teacher_temp, E)
    for epoch in (0, 1, E - 1):
        for step in (epoch * spe, epoch * spe + spe - 1):
            assert ser.schedule(step, args, spe)["teacher_temp"] == pytest.approx(temps[epoch])
    assert ser.schedule(E * spe + 3, args, spe)["teacher_temp"] == pytest.approx(args.teacher_temp)


def test_a_vit_with_fewer_than_4_blocks_is_probed_on_all_of_them():
    """The probe's parts match what LastBlocksCLS concatenates, also for --depth < 4 (the
    evaluation used to fail there, after training)."""
    for depth in (1, 3, 4, 5):
        args = ser.parse_args(TINY + ["--depth", str(depth)])          # the last --depth wins
        model = ser.build_model(args).eval()
        probe = ser.probeable(model, args)
        features = probe.backbone(torch.rand(2, 3, args.resolution, args.resolution))
        assert features.shape[1] == probe.parts["full"].stop == min(4, depth) * args.dim
        assert probe.parts["last"].stop - probe.parts["last"].start == args.dim
