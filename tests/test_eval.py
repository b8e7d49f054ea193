"""eval.py: metric definitions against naive formulas and the chance levels of the official
protocols, retrieval conventions with an exactly equivariant oracle, exact 1-vs-2-process
extraction and metrics, an end-to-end evaluate() on the toy set with a tiny conv net, and the CLI's
error messages."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import eval as ev
from conftest import REPO, leave_process_group, run


pytestmark = pytest.mark.usefixtures("one_thread")     # conftest.py: small tensors


def identity(x):
    return x


def pixel_means(x):
    """(N, C, H, W) images -> (N, C) means: an exact, model-free feature."""
    return x.mean((2, 3))


# ------------------------------------------------------------------ metrics vs naive formulas
def test_r2_definitions_match_naive_formulas():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(50, 4, generator=g) + torch.tensor([0, 0, 0, 2.0])
    p = torch.randn(50, 4, generator=g)
    rows, cols = t.tolist(), p.tolist()
    flat = [x for r in rows for x in r]
    mean = sum(flat) / len(flat)
    ss_res = sum((rows[i][j] - cols[i][j]) ** 2 for i in range(50) for j in range(4))
    ss_tot = sum((x - mean) ** 2 for x in flat)
    assert ev.r2_pooled(p, t) == pytest.approx(1 - ss_res / ss_tot, rel=1e-5)
    per = []
    for j in range(4):
        mj = sum(rows[i][j] for i in range(50)) / 50
        per.append(1 - sum((rows[i][j] - cols[i][j]) ** 2 for i in range(50)) /
                   sum((rows[i][j] - mj) ** 2 for i in range(50)))
    assert ev.r2_per_output(p, t) == pytest.approx(sum(per) / 4, rel=1e-5)
    assert ev.r2_pooled(t, t) == 1.0 and ev.r2_per_output(t, t) == 1.0


def test_constant_mean_predictor_on_relative_quaternions():
    """Official R² (eval_angle_prediction.py): the per-component-mean predictor scores pooled
    R² ≈ 0.229, per-output R² = 0."""
    rng = np.random.default_rng(0)
    a1, a2 = rng.uniform(-np.pi / 2, np.pi / 2, (2, 100_000, 3))
    t = torch.from_numpy(data.relative_quaternion(a1, a2))
    pred = t.mean(0, keepdim=True).expand_as(t)
    assert ev.r2_pooled(pred, t) == pytest.approx(0.229, abs=0.01)
    assert ev.r2_per_output(pred, t) == pytest.approx(0.0, abs=1e-9)
    assert ev.constant_r2(t)[0] == pytest.approx(ev.r2_pooled(pred, t))


def test_random_rankings_are_at_chance():
    g = torch.Generator().manual_seed(0)
    ranks, _ = ev.target_ranks(torch.randn(2000, 50, 8, generator=g),
                               torch.randn(2000, 50, 8, generator=g))
    m = ev.mrr_hits(ranks)
    assert m["mrr"] == pytest.approx(0.090, abs=0.004)
    for k in (1, 2, 5, 10):
        assert m[f"H@{k}"] == pytest.approx(k / 50, abs=0.006)
    assert ev.chance_levels(50, torch.randn(10, 4))["mrr"] == pytest.approx(0.0900, abs=1e-4)


def test_hand_built_ranks():
    """Two objects, 3 views on the unit circle; the predictions' ranks are known by construction."""
    ang = torch.tensor([0.0, 2.0, 4.0])
    cands = torch.stack([torch.cos(ang), torch.sin(ang)], -1).expand(2, 3, 2)
    pred = torch.stack([cands[0, [0, 0, 0]] * 3.0,           # view 0 predicted for every target
                        cands[1, [0, 1, 2]] * 0.5])           # perfect predictions
    ranks, _ = ev.target_ranks(pred, cands)
    # object 0: target 0 ranks 1; target 1 (2 rad away) 2; target 2 (4 rad = 2.28 rad away) 3
    assert ranks.tolist() == [[1, 2, 3], [1, 1, 1]]
    m = ev.mrr_hits(ranks, ks=(1, 2))
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 3) / 6)
    assert m["H@1"] == pytest.approx(4 / 6) and m["H@2"] == pytest.approx(5 / 6)


def test_pre_random_retrieval_and_chance():
    rng = np.random.default_rng(1)
    q = ev.absolute_quaternion(np.concatenate([rng.uniform(-np.pi / 2, np.pi / 2, (20_000, 3)),
                                               np.zeros((20_000, 4))], 1))
    g = torch.Generator().manual_seed(1)
    pre = ev.pose_retrieval_error(torch.randn(4000, 8, generator=g),
                                  torch.randn(20_000, 8, generator=g), q[:4000], q,
                                  torch.device("cpu"))
    assert pre == pytest.approx(0.627, abs=0.02)
    assert ev.chance_levels(50, q)["pre"] == pytest.approx(0.627, abs=0.01)
    # retrieving itself (or any view with the same pose, whatever the quaternion sign) is perfect
    emb = torch.randn(100, 8, generator=g)
    itself = ev.pose_retrieval_error(emb, emb, q[:100], -q[:100], torch.device("cpu"))
    assert itself == pytest.approx(0, abs=1e-6)


def record_blocks(monkeypatch):
    """Shapes of every similarity block the retrieval metrics compute."""
    shapes, block = [], ev.similarity_block

    def recording(p, c):
        out = block(p, c)
        shapes.append(tuple(out.shape))
        return out
    monkeypatch.setattr(ev, "similarity_block", recording)
    return shapes


def test_pre_streams_bounded_blocks_with_the_full_argmax_result(monkeypatch):
    """PRE's nearest neighbour over the whole split, in blocks of at most chunk x cand_chunk
    similarities (not Q x M: 527,600² floats at 3DIEBench's val size), gives the one full argmax's
    indices: first index on ties, NaN rows as torch.argmax does."""
    g, cpu = torch.Generator().manual_seed(4), torch.device("cpu")
    pred, cands = torch.randn(50, 6, generator=g), torch.randn(37, 6, generator=g)
    cands[30] = cands[2]                                     # an exact tie: the first index wins
    pred[7] = cands[2] * 3
    pred[9] = 0                                              # normalised without eps: a NaN row
    unit_cands = cands / (cands.norm(dim=-1, keepdim=True) + 1e-8)
    full = (F.normalize(pred, dim=-1, eps=0) @ unit_cands.T).argmax(1)
    shapes = record_blocks(monkeypatch)
    for chunk, cand_chunk in ((4, 5), (1, 1), (50, 37), (4096, 32768)):
        shapes.clear()
        assert torch.equal(ev.nearest_neighbours(pred, cands, cpu, chunk, cand_chunk), full)
        assert max(a * b for a, b in shapes) <= chunk * cand_chunk
    assert full[7] == 2 and full[9] == 0
    q = F.normalize(torch.randn(37, 4, generator=g), dim=-1)        # q[:13]: the queries' poses
    want = float((1 - (q[:13] * q[full[:13]]).sum(-1) ** 2).mean())
    assert ev.pose_retrieval_error(pred[:13], cands, q[:13], q, cpu, 4, 5) == want
    # the defaults bound the candidate dimension whatever the split's size
    shapes.clear()
    big_split = torch.randn(100_000, 2, generator=g)
    ev.nearest_neighbours(torch.randn(10, 2, generator=g), big_split, cpu)
    assert max(b for _, b in shapes) == 32768 and len(shapes) == 4


def test_target_ranks_chunked_over_objects(monkeypatch):
    g = torch.Generator().manual_seed(5)
    pred, cands = torch.randn(7, 5, 3, generator=g), torch.randn(7, 5, 3, generator=g)
    ranks, sims = ev.target_ranks(pred, cands)
    shapes = record_blocks(monkeypatch)
    r2, s2 = ev.target_ranks(pred, cands, chunk=2)
    assert torch.equal(ranks, r2) and torch.equal(sims, s2)
    assert shapes == [(2, 5, 5)] * 3 + [(1, 5, 5)]


def test_statistics_stay_fp32_under_a_callers_autocast(tiny_ckpt, toy_root, toy_imagefolder):
    """.float() does not stop autocast: the similarities, k-NN votes, probe losses and R² must be
    the fp32 ones even when evaluate() or a metric is called under torch.autocast (bf16 on CPU)."""
    g, cpu = torch.Generator().manual_seed(6), torch.device("cpu")
    pred, cands = torch.randn(40, 16, generator=g), torch.randn(300, 16, generator=g)
    ytr, yva = torch.randint(0, 3, (300,), generator=g), torch.randint(0, 3, (40,), generator=g)
    per_object = pred.view(4, 10, 16), cands[:40].view(4, 10, 16)
    plain = (ev.nearest_neighbours(pred, cands, cpu), ev.target_ranks(*per_object),
             ev.knn_top1(cands, ytr, pred, yva, (10, 20), 0.07, 3, cpu))
    probe, _ = ev.load_probeable(str(tiny_ckpt), cpu)
    opts = dict(protocols=("classify", "rotation", "retrieval"), epochs=2, hidden=16)
    want = ev.evaluate(probe, toy_root, **opts)["summary"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ev.nearest_neighbours(pred, cands, cpu), plain[0])
        ranks, sims = ev.target_ranks(*per_object)
        assert sims.dtype == torch.float32
        assert torch.equal(ranks, plain[1][0]) and torch.equal(sims, plain[1][1])
        assert ev.knn_top1(cands, ytr, pred, yva, (10, 20), 0.07, 3, cpu) == plain[2]
        assert ev.evaluate(probe, toy_root, **opts)["summary"] == want


def test_extract_with_an_empty_shard(monkeypatch):
    """More ranks than items: rank 1 of 2 holds nothing but still joins the all_gather with the
    right shape (2 gloo processes do the same in test_one_vs_two_gloo_processes_identical)."""
    from torch.utils.data import TensorDataset
    image = torch.arange(6.0).view(1, 6, 1, 1).expand(1, 6, 2, 2).clone()
    ds = TensorDataset(image, torch.zeros(1))
    gathered = []

    def all_gather(shards, padded):      # rank 0 sends its one item, rank 1 (this one) its padding
        gathered.append(padded.clone())
        shards[0].copy_(torch.arange(6.0).view(1, 6) * 2)
        shards[1].copy_(padded)

    def rank_1_of_2():
        return 1, 2

    def twice_pixel_means(x):
        return 2 * x.mean((2, 3))
    monkeypatch.setattr(ev, "world", rank_1_of_2)
    monkeypatch.setattr(ev.dist, "all_gather", all_gather)
    out = ev.extract(twice_pixel_means, ds, 4, torch.device("cpu"))
    assert gathered[0].shape == (1, 6) and torch.equal(out, torch.arange(6.0).view(1, 6) * 2)
    with pytest.raises(ValueError, match="empty"):
        ev.extract(identity, TensorDataset(torch.zeros(0, 3, 2, 2)), 4, torch.device("cpu"))


def quat_to_matrix(q):
    x, y, z, w = q.unbind(-1)
    return torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
                        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
                        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
                       -1).unflatten(-1, (3, 3))


def oracle_predict(e, g):
    """The exact predictor for embedding = the view's rotation matrix: R_0 @ R(g)."""
    return (e.view(-1, 3, 3) @ quat_to_matrix(g)).flatten(1)


def world_frame_predict(e, g):
    """The same with the product the wrong way round, R(g) @ R_0 (a world-frame g)."""
    return (quat_to_matrix(g) @ e.view(-1, 3, 3)).flatten(1)


def test_retrieval_conventions_with_an_equivariant_oracle():
    """Embedding = the view's rotation matrix R_v; predictor = R_0 @ R(g). Exact only if
    g = quat(R_0^T R_v) with view 0 as source, the latents read in list order: MRR = H@1 = 1 and
    PRE = 0. Dropping the transpose (world-frame g) must break it."""
    rng = np.random.default_rng(2)
    N, V = 6, 50
    lat = np.concatenate([rng.uniform(-np.pi / 2, np.pi / 2, (N * V, 3)),
                          rng.uniform(0, 1, (N * V, 4))], 1)
    reps = torch.from_numpy(data.euler_xyz_to_matrix(lat[:, :3])).float().reshape(N, V, 9)
    probe = ev.Probeable(nn.Identity(), {}, embed=nn.Identity(), predict=oracle_predict)
    recs, _ = ev.retrieval_metrics(probe, reps, lat, torch.device("cpu"), 64)
    got = {r["name"]: r["value"] for r in recs}
    assert got["mrr"] == pytest.approx(1.0) and got["H@1"] == pytest.approx(1.0)
    definitions = {r["name"]: r["definition"] for r in recs}
    for k in (1, 2, 5, 10):
        assert definitions[f"H@{k}"].endswith(f"whose target view ranks <= {k}")
    assert got["pre"] == pytest.approx(0.0, abs=1e-4)
    wrong = ev.Probeable(nn.Identity(), {}, embed=nn.Identity(), predict=world_frame_predict)
    wrong_recs = ev.retrieval_metrics(wrong, reps, lat, torch.device("cpu"), 64)[0]
    assert {r["name"]: r["value"] for r in wrong_recs}["mrr"] < 0.9


def test_probes_see_the_right_targets(toy_root, monkeypatch):
    """Replace feature extraction by an oracle that returns each view's pose matrix, hues and
    one-hot label: the probes (fit on pairs drawn per epoch, scored on fixed val pairs) must then
    succeed, which they cannot if views, latent rows, labels or pairs are misaligned anywhere in
    evaluate()."""
    def oracle(fn, ds, *a, **k):
        i = np.arange(len(ds))
        obj, view = i // len(ds.view_ids), np.array(ds.view_ids)[i % len(ds.view_ids)]
        lat = ds.latents[obj * (len(ds.latents) // len(ds.entries)) + view]
        rot = data.euler_xyz_to_matrix(lat[:, :3]).reshape(-1, 9)
        features = np.concatenate([rot, lat[:, [3, 6]], np.eye(4)[ds.labels[obj]]], 1)
        return torch.from_numpy(features).float()
    monkeypatch.setattr(ev, "extract", oracle)
    probe = ev.Probeable(nn.Identity(), {"full": slice(0, 15)})
    res = ev.evaluate(probe, toy_root, protocols=("classify", "rotation", "color"), epochs=100,
                      lr=1e-2, hidden=64, batch_size=16)["summary"]
    assert res["top1/full"] > 0.95
    assert res["color_r2_pooled/full"] > 0.9 and res["rot_r2_pooled/full"] > 0.6, res


# ------------------------------------------------------------------ a tiny method + checkpoint
TINY_METHOD = '''
"""A stand-in method script with the build_model / probeable that eval.py imports (tests only)."""
import torch, torch.nn as nn
import eval as ev
DATA_KIND = "3DIEBench"

class Tiny(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.width = width
        self.proj = nn.Sequential(nn.Linear(width, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                  nn.Linear(16, 8))
        self.hyper = nn.Linear(4, 64, bias=False)

    def predict(self, z, g):
        return torch.einsum("boi,bi->bo", self.hyper(g).view(-1, 8, 8), z)

def build_model(args):
    torch.manual_seed(args.seed)
    return Tiny(args.width)

def probeable(model, args):
    w = model.width
    parts = {"full": slice(0, 2 * w), "inv": slice(0, w), "equi": slice(w, 2 * w)}
    return ev.Probeable(model.backbone, parts, embed=model.proj, predict=model.predict)
'''


@pytest.fixture()
def tiny_ckpt(tmp_path, toy_root, monkeypatch):
    (tmp_path / "tinymethod.py").write_text(TINY_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(ev, "SCRIPTS", (*ev.SCRIPTS, "tinymethod"))   # eval.py imports only these
    import importlib
    tiny = importlib.import_module("tinymethod")
    args = dict(width=8, seed=0, data_root=toy_root, resolution=None, preset="toy")
    model = tiny.build_model(type("A", (), args))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"script": "tinymethod", "args": args, "model": model.state_dict(), "step": 11},
               run_dir / "checkpoint.pt")
    return run_dir


# ------------------------------------------------------------------ end to end
def test_evaluate_end_to_end_on_toy_set(tiny_ckpt, toy_root, tmp_path):
    probe, _ = ev.load_probeable(str(tiny_ckpt), torch.device("cpu"))
    probe.backbone.train()
    bn_before = probe.backbone[1].running_mean.clone()
    out = tmp_path / "out"
    res = ev.evaluate(probe, toy_root, out_dir=str(out), preset="toy", epochs=3, bn="train",
                      hidden=32)
    assert probe.backbone.training                        # the caller's mode is restored
    assert torch.equal(probe.backbone[1].running_mean, bn_before)   # bn=train works on a copy
    saved = json.loads((out / "eval.json").read_text())
    assert saved["summary"] == pytest.approx(res["summary"])
    assert (out / "retrieval.png").stat().st_size > 0
    n_val = len(data.read_split(toy_root, "val")[0])
    names = {(r["name"], r["part"]) for r in saved["metrics"]}
    for part in ("full", "inv", "equi"):
        assert {("top1", part), ("rot_r2_pooled", part), ("rot_r2_per_output", part),
                ("color_r2_pooled", part), ("color_r2_per_output", part)} <= names
    assert {("mrr", "embedding"), ("H@1", "embedding"), ("H@10", "embedding"),
            ("pre", "embedding")} <= names
    for r in saved["metrics"]:
        assert r["step"] == 11 and r["split"] == "val" and r["definition"] and r["representation"]
        assert math.isfinite(r["value"])
        if r["protocol"] == "predictor":                # its counts: tests/test_predictor.py
            continue
        every_view = r["name"] in ("top1", "mrr", "pre") or r["name"].startswith("H@")
        assert r["n"] == n_val * (50 if every_view else 10)
    assert any("BN: train" in n for n in saved["notes"])
    # without a predictor the retrieval protocol is skipped with a note
    probe.embed = probe.predict = None
    res = ev.evaluate(probe, toy_root, protocols=("retrieval", "classify"), epochs=1, hidden=8)
    assert {r["name"] for r in res["metrics"]} == {"top1"} and "skipped" in res["notes"][0]
    with pytest.raises(ValueError, match="unknown protocol"):
        ev.evaluate(probe, toy_root, protocols=("rotaton",))
    with pytest.raises(ValueError, match="unknown eval option"):
        ev.evaluate(probe, toy_root, epoch=3)


def ddp_check(ckpt, root, out):
    """Features of an odd-length subset (raw pixel means, exact; backbone features) and a whole
    evaluate(); run once in this process and once under torchrun with 2 gloo processes."""
    import torch.distributed as dist
    from torch.utils.data import Subset
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank, world = ev.world()
    cpu = torch.device("cpu")
    ev.SCRIPTS = (*ev.SCRIPTS, "tinymethod")
    probe, _ = ev.load_probeable(ckpt, cpu)
    val = data.Views3DIEBench(root, "val")
    odd = Subset(val, range(len(val) - 1))                    # not a multiple of the world size
    pix = ev.extract(pixel_means, odd, 16, cpu)
    one = ev.extract(pixel_means, Subset(val, [3]), 16, cpu)   # rank 1's is empty
    assert torch.equal(one, pix[3:4])
    feats = ev.extract(ev.backbone_fn(probe.backbone.eval(), cpu), odd, 16, cpu)
    res = ev.evaluate(probe, root, out_dir=os.path.join(out, f"w{world}"), epochs=2, hidden=32,
                      bn="eval")
    if rank == 0:
        torch.save({"pix": pix, "feats": feats, "metrics": res["metrics"]},
                   os.path.join(out, f"w{world}.pt"))
    if dist.is_initialized():
        leave_process_group()


def test_one_vs_two_gloo_processes_identical(tiny_ckpt, toy_root, tmp_path):
    script = tmp_path / "ddp_check.py"
    script.write_text("import sys, test_eval\ntest_eval.ddp_check(*sys.argv[1:4])\n")
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), str(tmp_path)])}
    args = [str(tiny_ckpt / "checkpoint.pt"), toy_root, str(tmp_path)]
    run(f"torchrun --standalone --nproc_per_node=2 {script} {' '.join(args)}", cwd=tmp_path,
        env=env, timeout=120)
    ddp_check(*args)
    one, two = torch.load(tmp_path / "w1.pt"), torch.load(tmp_path / "w2.pt")
    assert len(one["pix"]) == len(data.Views3DIEBench(toy_root, "val")) - 1
    assert torch.equal(one["pix"], two["pix"])
    assert torch.allclose(one["feats"], two["feats"], atol=1e-5)
    for a, b in zip(one["metrics"], two["metrics"], strict=True):
        assert (a["name"], a["part"], a["n"]) == (b["name"], b["part"], b["n"])
        assert a["value"] == pytest.approx(b["value"], abs=1e-4)


# ------------------------------------------------------------------ ImageFolder protocols
def test_weighted_knn_matches_a_naive_loop():
    g = torch.Generator().manual_seed(3)
    tr, va = torch.randn(60, 5, generator=g), torch.randn(25, 5, generator=g)
    ytr, yva = torch.randint(0, 3, (60,), generator=g), torch.randint(0, 3, (25,), generator=g)
    correct = {10: 0, 20: 0}
    for i in range(25):
        cos = [float(va[i] @ tr[j] / va[i].norm() / tr[j].norm()) for j in range(60)]
        nearest = sorted(range(60), key=cos.__getitem__, reverse=True)   # stable: ties by index
        for k in correct:
            votes = [sum(math.exp(cos[j] / 0.07) for j in nearest[:k] if ytr[j] == c)
                     for c in range(3)]
            correct[k] += votes.index(max(votes)) == yva[i]
    got = ev.knn_top1(tr, ytr, va, yva, (10, 20), 0.07, 3, torch.device("cpu"), chunk=7)
    assert got == {k: pytest.approx(v / 25) for k, v in correct.items()}


def test_normalizer_maps_between_input_statistics():
    x = torch.rand(2, 3, 4, 4)
    mine = (x - torch.tensor(data.MEAN).view(3, 1, 1)) / torch.tensor(data.STD).view(3, 1, 1)
    want = ((x - torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1))
            / torch.tensor(data.IMAGENET_STD).view(3, 1, 1))
    stats = (data.IMAGENET_MEAN, data.IMAGENET_STD)
    assert torch.allclose(ev.normalizer(stats, src=(data.MEAN, data.STD))(mine), want, atol=1e-5)
    assert torch.allclose(ev.normalizer(stats)(x), want, atol=1e-6)


class PooledTokens(nn.Module):
    """Block 1: 4x4 average pooling (exactly rot90/flip-equivariant); block 2: plus a fixed
    position pattern (not equivariant). Representation = the pooled map, flattened."""
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.pos = nn.Parameter(torch.randn(1, 3, 64, 64, generator=gen))

    def maps(self, x):
        m = F.avg_pool2d(x, 4)
        return [m, m + 3 * self.pos[..., :m.shape[-2], :m.shape[-1]]]

    def forward(self, x):
        return F.adaptive_avg_pool2d(x, 4).flatten(1)


def test_imagefolder_protocols(toy_imagefolder, toy_root):
    net = PooledTokens()
    probe = ev.Probeable(net, {"full": slice(0, 48), "half": slice(0, 24)}, token_maps=net.maps,
                         step=5)
    res = ev.evaluate(probe, toy_imagefolder, linear_epochs=5)
    n_val = len(data.ImageFolder(toy_imagefolder, "val"))
    s = res["summary"]
    for part in ("full", "half"):
        assert {f"linear_top1/{part}", f"knn10_top1/{part}", f"knn20_top1/{part}"} <= set(s)
    for name in ("rot90", "rot180", "vflip", "zoom", "noise", "blur", "jpeg"):
        assert 0 <= s[f"robust_top1_{name}/full"] <= 1
    eq = {r["part"]: r for r in res["metrics"] if r["name"] == "equivariance"}
    assert set(eq) == {"block1", "block2"} and eq["block1"]["n"] == n_val
    for g in ("rot90", "rot180", "rot270", "flip"):
        # pooling commutes with them; the position pattern does not
        assert eq["block1"]["per_g"][g] == pytest.approx(1.0, abs=1e-5)
        assert eq["block2"]["per_g"][g] < 0.99
    assert eq["block1"]["per_g"]["rescale"] > 0.9
    assert eq["block1"]["value"] > eq["block1"]["chance"]
    assert all(r["step"] == 5 and r["definition"] for r in res["metrics"])
    with pytest.raises(ValueError, match="needs a imagefolder data root"):
        ev.evaluate(probe, toy_root, protocols=("linear",))
    probe.token_maps = None
    notes = ev.evaluate(probe, toy_imagefolder, protocols=("equivariance",))["notes"]
    assert "equivariance skipped" in notes[0]


def test_equivariance_score_leaves_out_rescale(toy_imagefolder):
    """The rescale's no-ρ reference is ρ itself (both resample f(x) to f(g·x)'s grid), so its Δ
    is 0 for any map: it is reported in per_g but kept out of the score's mean and of its
    reference."""
    net = PooledTokens()
    maps = net.maps(torch.rand(2, 3, 32, 32))
    cos = ev.equivariance_fn(net.maps, identity, maps[0].shape[-1])(torch.rand(2, 3, 32, 32))
    names = [n for n, _, _ in ev.group_actions(maps[0].shape[-1])]
    assert torch.equal(cos[:, :, names.index("rescale"), 0], cos[:, :, names.index("rescale"), 1])
    probe = ev.Probeable(net, {"full": slice(0, 48)}, token_maps=net.maps)
    res = ev.evaluate(probe, toy_imagefolder, protocols=("equivariance",))
    for r in (r for r in res["metrics"] if r["name"] == "equivariance"):
        others = [g for g in r["per_g"] if g != "rescale"]
        assert others == ["rot90", "rot180", "rot270", "flip"] and "rescale" in r["per_g"]
        assert set(r["per_g_chance"]) == set(others)
        assert r["value"] == pytest.approx(np.mean([r["per_g"][g] for g in others]), abs=1e-6)
        assert r["chance"] == pytest.approx(np.mean(list(r["per_g_chance"].values())), abs=1e-6)
        assert "rescale" in r["definition"] and "left out of the mean" in r["definition"]
    assert any("rescale" in n and "per_g" in n for n in res["notes"])


# ------------------------------------------------------------------ CLI
def test_table_prints_one_table_per_data_root(tmp_path, capsys):
    # runs on different data sets are never averaged or headed together
    for name, root, top1 in (("a-s0", "data/x", 0.2), ("a-s1", "data/x", 0.4),
                             ("b-s0", "data/y", 0.9)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps(dict(
            step=5, data_root=root, summary={"top1/full": top1}, metrics=[])))
    ev.main(["--table", *(str(tmp_path / n) for n in ("a-s0", "b-s0", "a-s1"))])
    out = capsys.readouterr().out
    x, y = out.split("\n\n")
    assert x.startswith("data: data/x") and "| a[-s*] mean ± std (2) |  | 0.300 ± 0.141 |" in x
    assert y.startswith("data: data/y") and "| b-s0 | 5 | 0.900 |" in y and "a-s" not in y


def test_cli_runs_a_checkpoint_and_reports_clear_errors(tiny_ckpt, tmp_path, capsys):
    ev.main([str(tiny_ckpt), "--protocol", "classify", "retrieval", "--epochs", "1"])
    saved = json.loads((tiny_ckpt / "eval.json").read_text())
    assert saved["step"] == 11 and saved["protocols"] == ["classify", "retrieval"]
    assert "top1" in capsys.readouterr().out
    ev.main(["--table", str(tiny_ckpt)])
    table = capsys.readouterr().out.splitlines()
    assert table[1].startswith("| run | step | top1/full") and table[3].startswith("| run | 11 | ")

    def error_of(argv):
        with pytest.raises(SystemExit) as e:
            ev.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err                        # one message, no usage block or traceback
        return err[0]
    assert "no checkpoint at" in error_of([str(tmp_path / "nowhere")])
    assert "no eval.json in" in error_of(["--table", str(tmp_path)])
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint")
    assert "cannot read checkpoint" in error_of([str(bad)]) and str(bad) in error_of([str(bad)])
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    assert "missing ['script', 'args']" in error_of([str(tmp_path / "foreign.pt")])
    ck = torch.load(tiny_ckpt / "checkpoint.pt", weights_only=True)
    ck["args"]["width"] = 4
    torch.save(ck, tmp_path / "mismatch.pt")
    assert "does not match tinymethod.build_model" in error_of([str(tmp_path / "mismatch.pt")])
    assert "invalid choice: 'rotaton'" in error_of([str(tiny_ckpt), "--protocol", "rotaton"])
    for flag, value, says in (("--size", "0", "0 is not >= 1"), ("--epochs", "-3", "not >= 1"),
                              ("--batch-size", "x", "'x' is not an integer"),
                              ("--workers", "-1", "not >= 0"), ("--train-views", "0", "not >= 1"),
                              ("--seed", "-1", "not >= 0"), ("--device", "gpu0", "not a device")):
        err = error_of([str(tiny_ckpt), flag, value])
        assert f"argument {flag}: " in err and says in err


def test_cli_checks_its_output_before_the_work(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """An --out that cannot be written is one message before any feature is computed (it used to
    fail after the evaluation)."""
    computed = []
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: computed.append(1))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as e:
        ev.main([str(tiny_ckpt), "--out", str(tmp_path / "a_file" / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--out" in err[0], err
    assert not computed


def test_embeddings_results_keep_the_runs_eval_json(toy_root, tmp_path, capsys):
    """--features embeddings without --out writes <run>/embeddings/eval.json, never over the
    run's own eval.json; asking it for the predictor's protocol alone is refused, not an empty
    table; a --size the ResNet cannot read is refused before the work."""
    import sie
    run_dir = tmp_path / "run"
    sie.main(["--resolution", "32", "--batch-size", "8", "--mlp", "64-64-64", "--epochs", "1",
              "--data-root", toy_root, "--run-dir", str(run_dir), "--eval-protocols", "classify"])
    before = (run_dir / "eval.json").read_text()
    ev.main([str(run_dir), "--features", "embeddings", "--protocol", "classify", "--epochs", "1"])
    assert (run_dir / "eval.json").read_text() == before
    assert "top1/z_inv" in json.loads((run_dir / "embeddings" / "eval.json").read_text())["summary"]
    capsys.readouterr()
    for argv, says in ((["--features", "embeddings", "--protocol", "retrieval"], "predictor"),
                       (["--size", "7"], "--size 7")):    # the ResNet-18 needs >= 24 px
        with pytest.raises(SystemExit) as e:
            ev.main([str(run_dir), *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err and "Traceback" not in err, err


def test_a_root_of_the_other_layout_is_refused(toy_root, toy_imagefolder, tmp_path):
    """The layout comes from the script that trained the model, not from guessing at the root: an
    ImageFolder root with a stray train_images.npy is refused, naming the file."""
    import shutil
    root = tmp_path / "imagefolder"
    shutil.copytree(toy_imagefolder, root)
    shutil.copy(os.path.join(toy_root, "train_images.npy"), root / "train_images.npy")
    with pytest.raises(data.DataError, match="train_images.npy"):
        ev.check_protocols("all", str(root), kind="ImageFolder")
    probe = ev.Probeable(backbone=torch.nn.Flatten(), parts={"full": slice(0, 3)},
                         kind="ImageFolder")
    with pytest.raises(data.DataError, match="train_images.npy"):
        ev.evaluate(probe, str(root))
    with pytest.raises(data.DataError, match="not the 3DIEBench root"):
        ev.evaluate(probe, toy_imagefolder, kind="3DIEBench")


class RunsCode:
    """Unpickling this calls os.system: what torch.load(weights_only=False) of such a file does."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cli_refuses_hostile_damaged_and_foreign_checkpoints(tiny_ckpt, tmp_path, capsys):
    """A checkpoint is loaded tensors-only and may name only the project's scripts: a pickle that
    would run code is refused without running it, and so is a zip that is not a checkpoint, a
    truncated file and a checkpoint naming another module. Each: exit 2, one line naming it."""
    import pickle
    import zipfile
    marker = tmp_path / "was_run"
    hostile = {"script": "sie", "args": {}, "model": {}, "x": RunsCode(marker)}
    torch.save(hostile, tmp_path / "hostile.pt")                       # torch's zip format
    with open(tmp_path / "hostile.pkl", "wb") as f:                # a raw (legacy-format) pickle
        pickle.dump(hostile, f, protocol=4)
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("notes/readme.txt", "not a checkpoint")
    whole = (tiny_ckpt / "checkpoint.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[:len(whole) // 2])
    ck = torch.load(tiny_ckpt / "checkpoint.pt", weights_only=True)
    torch.save(dict(ck, script="os"), tmp_path / "os.pt")
    torch.save(dict(ck, script="data"), tmp_path / "data.pt")      # importable, not a method script
    cases = {"hostile.pt": "nothing in it was run", "hostile.pkl": "nothing in it was run",
             "other.zip": "cannot read checkpoint", "cut.pt": "cannot read checkpoint",
             "os.pt": "names script 'os'", "data.pt": "names script 'data'"}
    for name, says in cases.items():
        with pytest.raises(SystemExit) as e:
            ev.main([str(tmp_path / name)])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1, err
        assert says in err[0] and str(tmp_path / name) in err[0], err
    assert not marker.exists()
    # the same from a shell, where any warning torch prints would be a second line
    proc = run(f"python {REPO / 'eval.py'} {tmp_path / 'hostile.pkl'}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not marker.exists()


def test_check_protocols_for_the_scripts_start_up(toy_root, toy_imagefolder, tmp_path, monkeypatch):
    """What sie.py / baselines.py / ser.py call before training: the flag's comma-separated value
    -> the protocols evaluate() will run, or a one-line ValueError naming the flag and choices."""
    assert ev.check_protocols("all", toy_root) == ev.PROTOCOLS["3diebench"]
    assert ev.check_protocols("rotation,classify", toy_root) == ("rotation", "classify")
    assert ev.check_protocols(["knn"], toy_imagefolder) == ("knn",)
    monkeypatch.chdir(tmp_path)                   # the default data sets are generated on first use
    default = data.DEFAULT_IMAGEFOLDER_ROOT
    assert not os.path.exists(default)
    assert ev.check_protocols("linear,equivariance", default) == ("linear", "equivariance")
    assert ev.check_protocols("retrieval", str(tmp_path / "not-yet")) == ("retrieval",)
    for value, root, says in (("rotaton", toy_root, "unknown protocol 'rotaton'"),
                              ("classify,knn", toy_root, "needs a imagefolder data root"),
                              ("color", default, "needs a 3diebench data root")):
        with pytest.raises(ValueError) as e:
            ev.check_protocols(value, root)
        msg = str(e.value)
        assert msg.startswith("--eval-protocols: ") and says in msg
        assert "choose from ['all', " in msg
        assert "\n" not in msg
