"""Evaluation protocols shared by every script: SIE's 3DIEBench protocols (sie.md §4) and SER's
ImageFolder protocols (ser.md §3). Frozen backbone; every metric is written with its definition.

    python eval.py runs/sie-toy                                    # all protocols, the run's checkpoint
    python eval.py runs/sie-toy/checkpoint.pt --protocol rotation retrieval --bn train
    torchrun --standalone --nproc_per_node=2 eval.py runs/sie-toy   # same numbers, extraction sharded
    python eval.py --table runs/sie-toy runs/baselines-toy-*         # one markdown row per run
In code: `evaluate(Probeable(...), data_root, ...)` -> dict; it prints a table and writes eval.json.
"""
import argparse
import copy
import importlib
import json
import math
import os
import re
import sys
import warnings
from argparse import Namespace
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import data

# ================================== config ==================================
PROTOCOLS = {"3diebench": ("classify", "rotation", "color", "retrieval"),      # sie.md §4
             "imagefolder": ("linear", "knn", "equivariance", "robustness")}   # ser.md §3
# Probe settings. `paper` = the official README commands (sie.md §4): Adam 1e-3, no schedule, batch
# 256, 300 epochs, MLP head 1024-1024 for the R² probes, BN in train mode while fitting.
# Deviation (toy): 100 epochs, batch 64, MLP hidden 256, 10 cached views per training object, BN in
# eval mode so features are extracted once: seconds on a laptop CPU. Same head shapes and metrics.
# ImageFolder: linear probe 50 epochs (ser.md §3.1), DINO's k-NN k ∈ {10, 20, 100, 200}, T = 0.07;
# Deviation (toy): k ∈ {10, 20}, 100 probe epochs, the equivariance score on 256 held-out images.
PRESETS = {
    "paper": dict(epochs=300, batch_size=256, lr=1e-3, hidden=1024, train_views=None, val_pairs=10, bn="train",
                  workers=8, seed=0, figure_objects=6, linear_epochs=50, knn_k=(10, 20, 100, 200), equi_images=2000),
    "toy": dict(epochs=100, batch_size=64, lr=1e-3, hidden=256, train_views=10, val_pairs=10, bn="eval",
                workers=0, seed=0, figure_objects=6, linear_epochs=100, knn_k=(10, 20), equi_images=256),
}
BN_MODES = {
    "eval": "frozen backbone in eval mode (pretraining BN statistics) everywhere; features extracted once "
            "and cached, the probe samples views from the cache each epoch",
    "train": "official: BN in train mode while fitting (batch statistics of each probe batch, running statistics "
             "re-estimated on train), then eval mode with those for val; features recomputed every epoch",
}
DEFS = {
    "top1": "top-1 of a linear probe Linear(k, C) (cross-entropy, Adam) on the frozen representation slice, "
            "over every view of every val object (the official one-random-view score's expectation, sie.md §4.1)",
    "r2_pooled": "OFFICIAL R² = 1 - Σ(t-p)² / Σ(t-t̄)² with ONE scalar mean t̄ over all components of "
                 "all val targets (sie.md §4.2); a constant predictor already scores ≈0.23 on quaternions",
    "r2_per_output": "mean over output components j of 1 - Σ_i(t_ij-p_ij)² / Σ_i(t_ij-t̄_j)² "
                     "(scikit-learn's uniform average; a constant predictor scores 0)",
    "mrr": "mean 1/rank of target view v among the object's views by cosine to predict(embed(view 0), g(0→v)); "
           "every v including v = 0 (sie.md §4.4)",
    "hits": "fraction of the MRR queries whose target view ranks <= k",
    "pre": "mean of 1 - <q, q̂>² between the absolute quaternion of the target view and that of the "
           "nearest neighbour (cosine) of the prediction among ALL embeddings of the split (sie.md §4.4)",
    "linear": "top-1 of a linear probe Linear(k, C) (Adam, cached centre-crop features) on the frozen "
              "representation; for SER the concatenated [CLS] of the last 4 blocks (ser.md §3.1)",
    "knn": "top-1 of DINO's weighted k-NN: the k={k} nearest train features by cosine vote with exp(cos / 0.07)",
    "robust": "top-1 of the clean-trained linear probe on shifted val images (ImageNet-C/P-like proxy)",
    "equivariance": "OUR PROXY (the paper's definition is not published, ser.md §3.4): mean over "
                    "held-out images, tokens and g ∈ {rot90, rot180, rot270, flip} of "
                    "cos(ρ_g(f_l(x)), f_l(g·x)) for the block-l patch-token map; per_g holds each "
                    "g's mean; 'chance' = the same with ρ_g left out (a map that ignores g scores "
                    "this), per g in per_g_chance. per_g also holds rescale 1.25x (ρ = bicubic "
                    "resample to f(g·x)'s grid), left out of the mean and of 'chance': a map that "
                    "ignores the rescale is compared through the same resample, so it has no no-ρ "
                    "reference (its Δ would be 0)",
}


@dataclass
class Probeable:
    """What a method script hands to `evaluate` (CONTRACT.md)."""
    backbone: nn.Module                 # images (B,3,H,W) -> representation (B, D)
    parts: dict                         # name -> slice of the representation, e.g. {"full": slice(0, 512)}
    embed: nn.Module | None = None      # representation (B, D) -> equivariant embedding (B, d)
    predict: Callable | None = None     # (embedding (B, d), g (B, g_dim)) -> predicted embedding (B, d)
    g_dim: int = 4                      # 4 (quaternion) or 6 (quaternion + 2 hue differences)
    token_maps: Callable | None = None  # images -> [per-block token map (B, C, h, w)] (ViT / SER)
    input_stats: tuple | None = None    # (mean, std) the backbone was trained with; None = the data's own
    step: int = 0                       # checkpoint step, reported with every metric


# ================================ distributed ================================
def world():
    """(rank, world size) of the process group that torchrun / the calling script set up, else (0, 1)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


# =================================== data ===================================
@torch.no_grad()
def extract(fn, dataset, batch_size, device, workers=0, desc="features", shard=True):
    """fn(images) -> (B, ...) for every item of `dataset`, returned on CPU in dataset order, on every rank.
    Exact under torchrun (style rule 16): rank r takes items r, r+W, r+2W, ... (no DistributedSampler,
    which pads the shards with repeated items); the shards are padded to equal length only for the
    all_gather and interleaved back, so every item is counted exactly once whatever W is.
    shard=False: every rank runs all items itself, in batches of dataset order (BN in train mode)."""
    rank, W = world() if shard else (0, 1)
    if len(dataset) == 0:
        raise ValueError(f"{desc}: the data set is empty, nothing to extract")
    mine = Subset(dataset, range(rank, len(dataset), W))
    loader = DataLoader(mine, batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    outs = [fn(batch[0].to(device, non_blocking=True)).float()
            for batch in tqdm(loader, desc=desc, disable=world()[0] != 0, leave=False)]
    if not outs:   # more ranks than items, this shard is empty: item 0 gives the output's shape
        outs = [fn(dataset[0][0][None].to(device)).float()[:0]]
    local = torch.cat(outs)
    if W == 1:
        return local.cpu()
    padded = torch.cat([local, local.new_zeros(-(-len(dataset) // W) - len(local), *local.shape[1:])])
    shards = [torch.empty_like(padded) for _ in range(W)]
    dist.all_gather(shards, padded)
    out = torch.empty(len(dataset), *local.shape[1:])
    for r, shard in enumerate(shards):
        out[r::W] = shard[:len(range(r, len(dataset), W))].cpu()
    return out


def backbone_fn(backbone, device, pre=None):
    """images -> fp32 representation of pre(images); bf16 autocast + channels_last on GPU (numerics only)."""
    def fn(x):
        x = pre(x) if pre is not None else x
        if device.type == "cuda":
            with torch.autocast("cuda", torch.bfloat16):
                return backbone(x.contiguous(memory_format=torch.channels_last)).float()
        return backbone(x)
    return fn


def normalizer(stats, src=None):
    """x in [0, 1], or normalised with src = (mean, std) -> normalised with stats = (mean, std)."""
    col = lambda v, x: torch.tensor(v, device=x.device, dtype=x.dtype).view(3, 1, 1)
    def pre(x):
        x = x if src is None else x * col(src[1], x) + col(src[0], x)
        return (x - col(stats[0], x)) / col(stats[1], x)
    return pre


def epoch_views(n_obj, n_views, seed, epoch):
    """(order, v_i, v_j): a shuffled object order and two DISTINCT uniform views per object, a function
    of (seed, epoch) only, so every rank draws the same (the official probes use an unseeded RNG)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n_obj)
    vi = rng.integers(n_views, size=n_obj)
    vj = (vi + rng.integers(1, n_views, size=n_obj)) % n_views   # uniform over the other views
    return order, vi[order], vj[order]


def rotation_target(lat_i, lat_j):
    """Relative quaternion quat(R_i^T R_j), scalar-last, not canonicalised (sie.md §1.3); angles cast to
    float32 first, as the official probes do (sie.md §6)."""
    f32 = lambda a: a[..., :3].astype(np.float32).astype(np.float64)
    return torch.from_numpy(data.relative_quaternion(f32(lat_i), f32(lat_j))).float()


def color_target(lat_i, lat_j):
    """(Δfloor-hue, Δspot-hue) = latent_j[[3, 6]] - latent_i[[3, 6]], raw, not wrapped (sie.md §4.3)."""
    return torch.from_numpy(lat_j[..., [3, 6]] - lat_i[..., [3, 6]]).float()


def absolute_quaternion(lat):
    """Absolute pose quaternion of each view from its float64 Euler angles (PRE, sie.md §4.4)."""
    return torch.from_numpy(data.matrix_to_quaternion(data.euler_xyz_to_matrix(lat[..., :3]))).float()


# ================================ probe heads ================================
def make_heads(tasks, parts, n_classes, hidden):
    """One head per "task/part": Linear(k, C) for classification (sie.md §4.1); the README's `--deep-end`
    MLP Linear(2k, h)-ReLU-Linear(h, h)-ReLU-Linear(h, out) on [f(x_i); f(x_j)] for the rotation
    (4 outputs) and colour (2 outputs) regressions (sie.md §4.2-4.3)."""
    mlp = lambda k, out: nn.Sequential(nn.Linear(2 * k, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                       nn.Linear(hidden, out))
    return nn.ModuleDict({f"{task}/{name}": nn.Linear(sl.stop - sl.start, n_classes) if task == "classify" else
                          mlp(sl.stop - sl.start, 4 if task == "rotation" else 2)
                          for name, sl in parts.items() for task in tasks})


def fit_heads(heads, epoch_data, cfg, device):
    """Fit every head at once on frozen features: Adam, constant lr, no weight decay (sie.md §4: the
    official schedule helper is never called); the last epoch is reported. epoch_data(epoch) ->
    {key: (inputs (N, k), targets (N, ...))} in that epoch's order. The heads are independent, so one
    Adam on the summed losses fits each exactly as alone."""
    opt, B = torch.optim.Adam(heads.parameters(), lr=cfg["lr"], weight_decay=0), cfg["batch_size"]
    head_loss = lambda out, y: F.cross_entropy(out, y) if y.dtype == torch.long else F.mse_loss(out, y)
    for epoch in tqdm(range(cfg["epochs"]), desc="probes", disable=world()[0] != 0, leave=False):
        batch = epoch_data(epoch)
        for s in range(0, len(next(iter(batch.values()))[0]), B):
            loss = sum(head_loss(heads[k](x[s:s + B].to(device)), y[s:s + B].to(device)) for k, (x, y) in batch.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def seeded(make_heads, cfg, device):
    with torch.random.fork_rng(devices=[]):   # leave the caller's RNG stream alone
        torch.manual_seed(cfg["seed"])
        return make_heads().to(device)


@torch.no_grad()
def batched(fn, n, chunk):
    """fn(rows) for rows = slice(s, s + chunk) over range(n), as one fp32 CPU tensor filled in
    place: no list of chunks next to their concatenation (2 x 2.2 GB for the embeddings at
    3DIEBench's val size)."""
    out = None
    for s in range(0, n, chunk):
        y = fn(slice(s, min(s + chunk, n))).float().cpu()
        out = y.new_empty(n, *y.shape[1:]) if out is None else out
        out[s:s + len(y)] = y
    return out


def apply(head, x, device, chunk=4096):
    def rows_of(rows):
        return head(x[rows].to(device))
    return batched(rows_of, len(x), chunk)


def pair_batch(keys, parts, f_i, f_j, targets):
    """{"task/part": (input, target)}: a classifier reads f_i[part], a regressor [f_i[part]; f_j[part]]."""
    sl = lambda key: parts[key.split("/")[1]]
    return {k: (f_i[:, sl(k)] if k.startswith("classify") else torch.cat([f_i[:, sl(k)], f_j[:, sl(k)]], 1),
                targets[k.split("/")[0]]) for k in keys}


def pair_targets(labels, lat_i, lat_j):
    return {"classify": torch.from_numpy(labels), "rotation": rotation_target(lat_i, lat_j),
            "color": color_target(lat_i, lat_j)}


# ================================== metrics ==================================
def r2_pooled(pred, target):
    """Official SIE R² (sie.md §4.2): one scalar mean over ALL entries of the targets."""
    return float(1 - ((target - pred) ** 2).sum() / ((target - target.mean()) ** 2).sum())


def r2_per_output(pred, target):
    """scikit-learn's r2_score default: R² per output column, then the plain average."""
    return float((1 - ((target - pred) ** 2).sum(0) / ((target - target.mean(0)) ** 2).sum(0)).mean())


def constant_r2(target):
    """Both R²s of the best constant predictor (the per-component mean of the val targets)."""
    return r2_pooled(target.mean(0, keepdim=True).expand_as(target), target), 0.0


def similarity_block(p, c):
    """Dot products of unit rows: (Q, d) x (M, d) -> (Q, M), or per object (n, Q, d) x (n, M, d)
    -> (n, Q, M). Every similarity matrix of the retrieval metrics is one such block (the tests
    bound their size)."""
    return p @ c.T if p.dim() == 2 else torch.einsum("nqd,ncd->nqc", p, c)


def unit_rows(c):
    """The candidates' normalisation of the official script: +1e-8 on the norm."""
    return c / (c.norm(dim=-1, keepdim=True) + 1e-8)


def target_ranks(pred, cands, chunk=1024):
    """pred (N, V, d): the prediction for target view v of object n; cands (N, V, d): the object's views.
    -> (ranks (N, V), 1-based rank of view v among the V candidates by cosine; sims (N, V, V)).
    p is normalised without eps, the candidates with +1e-8 on the norm, as the official script.
    `chunk` objects at a time: the normalised copies are (chunk, V, d), not (N, V, d) (row-wise,
    so the numbers do not depend on it)."""
    ranks, sims = [], []
    with torch.autocast(pred.device.type, enabled=False):   # fp32 even under a caller's autocast
        for s in range(0, len(pred), chunk):
            p, c = pred[s:s + chunk], cands[s:s + chunk]
            p, c = p / p.norm(dim=-1, keepdim=True), unit_rows(c)
            sim = similarity_block(p, c)
            # ties count in the target's favour (measure zero with real features)
            ranks.append(1 + (sim > sim.diagonal(dim1=1, dim2=2).unsqueeze(-1)).sum(-1))
            sims.append(sim)
    return torch.cat(ranks), torch.cat(sims)


def mrr_hits(ranks, ks=(1, 2, 5, 10)):
    r = ranks.double().flatten()
    return {"mrr": float((1 / r).mean()), **{f"H@{k}": float((r <= k).double().mean()) for k in ks}}


@torch.no_grad()
def nearest_neighbours(pred, cands, device, chunk=4096, cand_chunk=32768):
    """Index of the nearest candidate (M, d) by cosine of each prediction (Q, d): the argmax over
    every candidate, streamed over blocks of at most chunk x cand_chunk similarities (512 MiB in
    fp32 by default, whatever Q and M are: 527,600 x 527,600 at 3DIEBench's val size), plus the
    M x d normalised candidates on `device`. The running maximum keeps the first index of the
    largest value (NaN counting as the largest, as torch.argmax does): the result of one argmax
    over the full matrix."""
    with torch.autocast(device.type, enabled=False):         # fp32 even under a caller's autocast
        c = torch.empty(cands.shape, dtype=cands.dtype, device=device)   # filled chunk by chunk
        for m in range(0, len(c), cand_chunk):
            c[m:m + cand_chunk] = unit_rows(cands[m:m + cand_chunk].to(device))
        out = []
        for s in range(0, len(pred), chunk):
            p = F.normalize(pred[s:s + chunk].to(device), dim=-1, eps=0)
            best = torch.full((len(p),), -math.inf, device=device)
            best_idx = torch.zeros(len(p), dtype=torch.long, device=device)
            for m in range(0, len(c), cand_chunk):
                value, idx = similarity_block(p, c[m:m + cand_chunk]).max(1)
                better = (value > best) | (value.isnan() & ~best.isnan())
                best = torch.where(better, value, best)
                best_idx = torch.where(better, idx + m, best_idx)
            out.append(best_idx.cpu())
    return torch.cat(out)


@torch.no_grad()
def pose_retrieval_error(pred, cands, q_true, q_cands, device, chunk=4096, cand_chunk=32768):
    """PRE (sie.md §4.4): for each prediction (Q, d) the nearest candidate (M, d) by cosine over the WHOLE
    split; mean of 1 - <q, q̂>² between the absolute quaternions (Q, 4) and (M, 4): sign-invariant,
    and retrieving another object in the same pose counts as perfect. Memory: nearest_neighbours."""
    nn_idx = nearest_neighbours(pred, cands, device, chunk, cand_chunk)
    return float((1 - (q_true * q_cands[nn_idx]).sum(-1) ** 2).mean())


def chance_levels(n_views, q_split):
    """Random ranking of V candidates: MRR = H_V / V (0.0900 for 50), H@k = k / V; random retrieval:
    PRE = 1 - mean_{a,b} <q_a, q_b>² = 1 - ||QᵀQ||_F² / M² exactly (≈0.627 on 3DIEBench poses)."""
    q = q_split.double()
    return {"mrr": sum(1 / r for r in range(1, n_views + 1)) / n_views,
            **{f"H@{k}": min(k, n_views) / n_views for k in (1, 2, 5, 10)},
            "pre": float(1 - (q.T @ q).pow(2).sum() / len(q) ** 2)}


def record(name, part, value, definition, n, representation, chance, protocol, split="val"):
    return dict(locals())   # one JSON record per metric (style rule 16); the step is added by evaluate


# ============================ 3DIEBench protocols ============================
def score_probes(heads, parts, val_reps, labels, latents, majority, cfg, device):
    """Top-1 over every view of every val object; both R²s over `val_pairs` fixed, seeded distinct-view pairs
    per object (the official probe re-draws one pair per object per epoch: same expectation, more noise)."""
    N, V, D = val_reps.shape
    obj = np.repeat(np.arange(N), cfg["val_pairs"])
    _, vi, vj = epoch_views(len(obj), V, cfg["seed"] + 1, 0)
    every_view = pair_batch([k for k in heads if k.startswith("classify")], parts, val_reps.reshape(N * V, D),
                            None, {"classify": torch.from_numpy(np.repeat(labels, V))})
    pairs = pair_batch([k for k in heads if not k.startswith("classify")], parts, val_reps[obj, vi],
                       val_reps[obj, vj], pair_targets(labels[obj], latents[obj * V + vi], latents[obj * V + vj]))
    recs = []
    for key, (x, t) in {**every_view, **pairs}.items():
        task, part = key.split("/")
        sl, p = parts[part], apply(heads[key], x, device)
        rep = f"representation[{sl.start}:{sl.stop}]"
        if task == "classify":
            recs.append(record("top1", part, float((p.argmax(1) == t).double().mean()), DEFS["top1"], len(t),
                               rep, float((t == majority).double().mean()), task))
            continue
        what = "relative quaternion (x,y,z,w)" if task == "rotation" else "(Δfloor-hue, Δspot-hue)"
        name, chance = "rot" if task == "rotation" else "color", constant_r2(t)
        for i, (kind, fn) in enumerate((("pooled", r2_pooled), ("per_output", r2_per_output))):
            recs.append(record(f"{name}_r2_{kind}", part, fn(p, t), f"{what}; {DEFS['r2_' + kind]}", len(t),
                               f"[f(x_i); f(x_j)] of {rep}", chance[i], task))
    return recs


@torch.no_grad()
def retrieval_metrics(probe, val_reps, latents, device, batch_size):
    """MRR, H@k and PRE of the trained predictor on val (sie.md §4.4): embeddings e(o, v) of every view
    (backbone and projector in eval mode), queries p(o, v) = predict(e(o, 0), g(0 -> v)) for every v
    including 0, g from the float64 latents. -> (records, sims (N, V, V) for the figure)."""
    N, V, D = val_reps.shape
    emb = apply(probe.embed, val_reps.reshape(N * V, D), device, batch_size)
    lat = latents.reshape(N, V, 7)
    g = data.relative_quaternion(np.repeat(lat[:, :1, :3], V, 1), lat[:, :, :3])
    if probe.g_dim == 6:  # rotation + colour conditioning (sie.md §1.3): the same hue differences
        g = np.concatenate([g, lat[:, :, [3, 6]] - lat[:, :1, [3, 6]]], -1)
    g = torch.from_numpy(g).float().reshape(N * V, -1)
    src = emb[::V]                       # e(o, 0) of every object, for the queries o * V + v

    def predictions(rows):
        objects = torch.arange(rows.start, rows.stop) // V
        return probe.predict(src[objects].to(device), g[rows].to(device))
    pred = batched(predictions, N * V, batch_size)
    ranks, sims = target_ranks(pred.reshape(N, V, -1), emb.reshape(N, V, -1))
    q = absolute_quaternion(latents)
    chance = chance_levels(V, q)
    rep = "predict(embed(view 0), g) vs embed(view v), equivariant embedding"
    recs = [record(k, "embedding", v, DEFS["mrr"] if k == "mrr" else DEFS["hits"].replace("k", k[2:]),
                   N * V, rep, chance[k], "retrieval") for k, v in mrr_hits(ranks).items()]
    recs.append(record("pre", "embedding", pose_retrieval_error(pred, emb, q, q, device), DEFS["pre"], N * V,
                       rep + f", over all {N * V} val views", chance["pre"], "retrieval"))
    return recs, sims


def save_retrieval_figure(path, val_ds, sims, n_objects, seed, top=5):
    """Like the paper's qualitative figure: per row, the source view (view 0), the `top` nearest
    neighbours of the prediction among the object's views, and the true target view."""
    from torchvision.utils import make_grid, save_image
    N, V, _ = sims.shape
    rng = np.random.default_rng([seed, 2])
    images = []
    for o in range(min(n_objects, N)):
        v = int(rng.integers(1, V))
        shown = [0] + sims[o, v].argsort(descending=True)[:top].tolist() + [v]
        images += [val_ds[o * V + u][0] for u in shown]
    x = torch.stack(images) * torch.tensor(data.STD).view(3, 1, 1) + torch.tensor(data.MEAN).view(3, 1, 1)
    save_image(make_grid(x.clamp(0, 1), nrow=top + 2, padding=2, pad_value=1.0), path)


def evaluate_3diebench(probe, root, protos, cfg, device, out_dir):
    """sie.md §4 on 3DIEBench (or its look-alike): -> (records, notes)."""
    size, B, W = cfg["size"], cfg["batch_size_extract"], cfg["workers"]
    val_ds = data.Views3DIEBench(root, "val", size=size)
    V, recs, notes = len(val_ds.view_ids), [], []
    tasks = [p for p in ("classify", "rotation", "color") if p in protos]
    retrieval = "retrieval" in protos and probe.embed is not None and probe.predict is not None
    if "retrieval" in protos and not retrieval:
        notes.append("retrieval (MRR, H@k, PRE) skipped: this probeable has no embed/predict (no predictor)")
    # a backbone trained with other input statistics (an ImageNet ViT, ser.md §3.2) gets its own
    pre = probe.input_stats and normalizer(probe.input_stats, src=(data.MEAN, data.STD))
    features = lambda bb, ds, desc: extract(backbone_fn(bb, device, pre), ds, B, device, W, desc)
    if retrieval or (tasks and cfg["bn"] == "eval"):   # pretraining BN statistics (sie.md §4.4)
        val_reps = features(probe.backbone, val_ds, "val features").unflatten(0, (-1, V))
    if retrieval:
        r, sims = retrieval_metrics(probe, val_reps, val_ds.latents, device, B)
        recs += r
        if out_dir and world()[0] == 0 and cfg["figure_objects"]:
            save_retrieval_figure(os.path.join(out_dir, "retrieval.png"), val_ds, sims, cfg["figure_objects"],
                                  cfg["seed"])
    if not tasks:
        return recs, notes
    views = None if cfg["bn"] == "train" or cfg["train_views"] is None else range(min(cfg["train_views"], V))
    train_ds = data.Views3DIEBench(root, "train", size=size, views=views)
    n_tr, n_cached, lat = len(train_ds.entries), len(train_ds.view_ids), train_ds.latents
    Vtr = len(lat) // n_tr                                   # latent row = object * Vtr + view
    if cfg["bn"] == "eval":  # features once; each epoch picks two of the cached views per object
        cache = features(probe.backbone, train_ds, "train features").unflatten(0, (n_tr, n_cached))
        pair_features = lambda order, vi, vj: (cache[order, vi], cache[order, vj])
    else:  # sie.md §4 "net.train()": batch statistics of each probe batch, running statistics drift
        bb = copy.deepcopy(probe.backbone).eval().requires_grad_(False)   # BN only: dropout stays off
        for m in filter(lambda m: isinstance(m, nn.modules.batchnorm._BatchNorm), bb.modules()):
            m.train()
        # per epoch, the images of exactly the probe's minibatches, so BN sees what the official probe sees
        pair_features = lambda order, vi, vj: [extract(backbone_fn(bb, device, pre), Subset(
            train_ds, order * Vtr + v), cfg["batch_size"], device, W, "epoch", shard=False) for v in (vi, vj)]
    def epoch_data(epoch):
        order, vi, vj = epoch_views(n_tr, n_cached, cfg["seed"], epoch)
        return pair_batch(heads, probe.parts, *pair_features(order, vi, vj),
                          pair_targets(train_ds.labels[order], lat[order * Vtr + vi], lat[order * Vtr + vj]))
    heads = seeded(lambda: make_heads(tasks, probe.parts, train_ds.num_classes, cfg["hidden"]), cfg, device)
    fit_heads(heads, epoch_data, cfg, device)
    if cfg["bn"] == "train":
        val_reps = features(bb.eval(), val_ds, "val features (re-estimated BN)").unflatten(0, (-1, V))
    majority = int(np.bincount(train_ds.labels).argmax())
    recs += score_probes(heads, probe.parts, val_reps, val_ds.labels, val_ds.latents, majority, cfg, device)
    return recs, notes


# ============================ ImageFolder protocols ============================
# The g whose no-ρ reference is ρ itself: f(g·x) lives on another token grid, so any comparison
# resamples f(x) to it, and a map that ignores the rescale (f(g·x) = resample(f(x))) scores 1 like
# an equivariant one. Its Δ would be 0 by construction: it stays out of the score's mean and
# reference.
NO_REFERENCE = ("rescale",)


def group_actions(grid):
    """The equivariance score's g (ser.md §3.4 proxy): (name, act on images, ρ_g on token maps). rot90^k and
    the flip permute tokens; the rescale resizes the image to a 1.25x token grid (exact patch multiples) and
    ρ resamples the map bicubically to the grid f(g·x) has (ser.md §1.4)."""
    up = max(grid + 1, round(1.25 * grid))
    acts = [(f"rot{90 * k}", lambda x, k=k: torch.rot90(x, k, (2, 3)), lambda m, t, k=k: torch.rot90(m, k, (2, 3)))
            for k in (1, 2, 3)]
    return acts + [("flip", lambda x: x.flip(3), lambda m, t: m.flip(3)),
                   ("rescale", lambda x: resample(x, (x.shape[2] * up // grid, x.shape[3] * up // grid)),
                    lambda m, t: resample(m, t.shape[-2:]))]


def resample(x, size, mode="bicubic"):
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)


def equivariance_fn(token_maps, pre, grid):
    """images -> (B, blocks, |G|, 2): per image, block and g, the mean over tokens of cos(ρ_g(f_l(x)), f_l(g·x)),
    and as a reference the same with ρ_g ignored (for the rescale only resampled to the other grid,
    which is ρ itself: see NO_REFERENCE)."""
    cos = lambda a, b: F.cosine_similarity(a.float(), b.float(), dim=1).flatten(1).mean(1)
    def fn(x):
        maps, per_g = token_maps(pre(x)), []
        for _, act, rho in group_actions(grid):
            per_g.append(torch.stack([torch.stack([cos(rho(m, t), t), cos(resample(m, t.shape[-2:]), t)], 1)
                                      for m, t in zip(maps, token_maps(pre(act(x))))], 1))
        return torch.stack(per_g, 2)
    return fn


def corruptions(size, seed):
    """Test-time shifts on [0, 1] images (an ImageNet-C/P-like proxy, one severity each): geometric
    (rot90, rot180, vertical flip, 1.5x zoom on the centre) and corruptions (Gaussian noise σ 0.1 — a fixed,
    seeded field, so the result does not depend on how images are batched or sharded — Gaussian blur
    σ = size/64 px, JPEG quality 10)."""
    from torchvision.io import decode_jpeg, encode_jpeg
    from torchvision.transforms.functional import gaussian_blur
    noise = 0.1 * torch.randn(3, size, size, generator=torch.Generator().manual_seed(seed))
    sigma, c = max(size / 64, 0.5), round(size / 6)
    jpeg = lambda x: torch.stack(decode_jpeg(encode_jpeg(list((x * 255).round().byte().cpu()), quality=10))).to(x)
    return {"rot90": lambda x: torch.rot90(x, 1, (2, 3)), "rot180": lambda x: torch.rot90(x, 2, (2, 3)),
            "vflip": lambda x: x.flip(2), "zoom": lambda x: resample(x[..., c:size - c, c:size - c], (size, size)),
            "noise": lambda x: (x + noise.to(x)).clamp(0, 1),
            "blur": lambda x: gaussian_blur(x, [2 * math.ceil(2 * sigma) + 1] * 2, [sigma] * 2),
            "jpeg": jpeg}


def knn_top1(train, train_labels, val, val_labels, ks, T, n_classes, device, chunk=1024):
    """DINO's weighted k-NN (Caron et al. 2021): cosine similarity to every training feature, the k
    nearest vote with weight exp(sim / T). -> {k: top-1}."""
    correct = dict.fromkeys(ks, 0)
    with torch.autocast(device.type, enabled=False):          # fp32 even under a caller's autocast
        tr = F.normalize(train.to(device), dim=1)
        for s in range(0, len(val), chunk):
            sims = F.normalize(val[s:s + chunk].to(device), dim=1) @ tr.T
            sims, idx = sims.topk(min(max(ks), len(tr)), 1)
            for k in ks:
                votes = torch.zeros(len(idx), n_classes, device=device).scatter_add_(
                    1, train_labels.to(device)[idx[:, :k]], (sims[:, :k] / T).exp())
                correct[k] += int((votes.argmax(1).cpu() == val_labels[s:s + chunk]).sum())
    return {k: correct[k] / len(val) for k in ks}


def evaluate_imagefolder(probe, root, protos, cfg, device):
    """ser.md §3 on an ImageFolder root: linear probe and weighted k-NN on every representation part,
    per-block equivariance score, linear-probe accuracy on shifted val images -> (records, notes)."""
    import torchvision.transforms as T
    size, B, W, notes, recs = cfg["size"], cfg["batch_size_extract"], cfg["workers"], [], []
    # Deviation: features of the test transform (resize 256/224 + centre crop) for train and val, cached;
    # SER's probe trains on random-resized crops + flips with SGD and a cosine schedule (ser.md §3.1).
    tf = T.Compose(([T.Resize(round(size * 256 / 224)), T.CenterCrop(size)] if size else []) + [T.ToTensor()])
    train_ds, val_ds = data.ImageFolder(root, "train", tf), data.ImageFolder(root, "val", tf)
    pre = normalizer(probe.input_stats or (data.IMAGENET_MEAN, data.IMAGENET_STD))
    ytr, yva, C = torch.tensor(train_ds.targets), torch.tensor(val_ds.targets), len(train_ds.classes)
    feats = lambda ds, t=None, desc="val features": extract(backbone_fn(
        probe.backbone, device, pre if t is None else (lambda x: pre(t(x)))), ds, B, device, W, desc)
    majority = float((yva == ytr.bincount().argmax()).double().mean())
    if {"linear", "knn", "robustness"} & set(protos):
        ftr, fva = feats(train_ds, desc="train features"), feats(val_ds)
    rep = lambda sl: f"representation[{sl.start}:{sl.stop}]"
    if {"linear", "robustness"} & set(protos):
        parts = {f"linear/{p}": sl for p, sl in probe.parts.items()}   # "/": a part may be named like a method
        heads = seeded(lambda: nn.ModuleDict({k: nn.Linear(sl.stop - sl.start, C) for k, sl in parts.items()}),
                       cfg, device)
        def epoch_data(epoch):
            order = torch.from_numpy(np.random.default_rng([cfg["seed"], epoch]).permutation(len(ytr)))
            return {k: (ftr[order][:, sl], ytr[order]) for k, sl in parts.items()}
        fit_heads(heads, epoch_data, dict(cfg, epochs=cfg["linear_epochs"]), device)
        top1 = lambda p, f: float((apply(heads["linear/" + p], f[:, probe.parts[p]], device).argmax(1) == yva)
                                  .double().mean())
    if "linear" in protos:
        recs += [record("linear_top1", p, top1(p, fva), DEFS["linear"], len(yva), rep(sl), majority, "linear")
                 for p, sl in probe.parts.items()]
    if "knn" in protos:
        for p, sl in probe.parts.items():
            for k, acc in knn_top1(ftr[:, sl], ytr, fva[:, sl], yva, cfg["knn_k"], 0.07, C, device).items():
                recs.append(record(f"knn{k}_top1", p, acc, DEFS["knn"].format(k=k), len(yva), rep(sl), majority, "knn"))
    if "robustness" in protos:
        p = next(iter(probe.parts))
        for name, t in corruptions(size or val_ds[0][0].shape[-1], cfg["seed"]).items():
            recs.append(record(f"robust_top1_{name}", p, top1(p, feats(val_ds, t, f"val {name}")), DEFS["robust"],
                               len(yva), rep(probe.parts[p]) + f" of {name} val images", majority, "robustness"))
    if "equivariance" in protos and probe.token_maps is None:
        notes.append("equivariance skipped: this probeable has no token_maps")
    elif "equivariance" in protos:
        held_out = Subset(val_ds, range(min(cfg["equi_images"], len(val_ds))))
        grid = probe.token_maps(pre(held_out[0][0][None].to(device)))[0].shape[-1]
        cos = extract(equivariance_fn(probe.token_maps, pre, grid), held_out, B, device, W, "equivariance")
        names = [n for n, _, _ in group_actions(grid)]
        scored = [i for i, n in enumerate(names) if n not in NO_REFERENCE]
        for block, c in enumerate(cos.mean(0), 1):     # (|G|, 2) per block
            r = record("equivariance", f"block{block}", float(c[scored, 0].mean()),
                       DEFS["equivariance"], len(held_out), f"patch-token map after block {block}",
                       float(c[scored, 1].mean()), "equivariance")
            recs.append(dict(r, per_g=dict(zip(names, c[:, 0].tolist())),
                             per_g_chance={names[i]: float(c[i, 1]) for i in scored}))
        notes.append(f"equivariance: value and chance over {[names[i] for i in scored]}; "
                     f"{list(NO_REFERENCE)} only in per_g (its no-ρ reference is ρ itself: "
                     "Δ = 0 for any map)")
    return recs, notes


# ================================= evaluate =================================
def resolve(preset, opts):
    """Preset values, then the caller's options; an unknown option is an error naming it."""
    if preset not in PRESETS:
        raise ValueError(f"unknown eval preset {preset!r}; choose from {sorted(PRESETS)}")
    cfg = dict(PRESETS[preset], size=None, batch_size_extract=256)
    if unknown := sorted(set(opts) - set(cfg)):
        raise ValueError(f"unknown eval option(s) {unknown}; known: {sorted(cfg)}")
    cfg.update({k: v for k, v in opts.items() if v is not None})
    if cfg["bn"] not in BN_MODES:
        raise ValueError(f"unknown bn mode {cfg['bn']!r}; choose from {sorted(BN_MODES)}")
    return cfg


def dataset_kind(root):
    """3DIEBench layout ('{split}_images.npy' lists) or ImageNet's ('train/<wnid>/*.JPEG')."""
    folder = os.path.isdir(os.path.join(root, "train")) and not os.path.isfile(os.path.join(root, "train_images.npy"))
    default = os.path.abspath(root) == os.path.abspath(data.DEFAULT_IMAGEFOLDER_ROOT)   # generated on first use
    return "imagefolder" if folder or default else "3diebench"   # else data.py names what is missing


def expand_protocols(protocols, kind):
    names = [p.strip() for p in ([protocols] if isinstance(protocols, str) else protocols) if p.strip()]
    known = PROTOCOLS[kind]
    for p in names:
        if p != "all" and p not in known:
            other = [k for k, v in PROTOCOLS.items() if p in v]
            what = (f"protocol {p!r} needs a {other[0]} data root, this one is {kind}" if other
                    else f"unknown protocol {p!r}")
            raise ValueError(f"{what}; choose from {['all', *known]}")
    return tuple(known) if "all" in names or not names else tuple(dict.fromkeys(names))


def check_protocols(protocols, data_root, flag="--eval-protocols"):
    """The protocols that evaluate(probe, data_root, protocols) will run, checked now: for the
    training scripts to call at start-up, so a typo is an error before training, not after it.
    protocols: a comma-separated string (the scripts' flag) or a sequence of names. The data root
    need not exist yet (the default data sets are generated on first use; see dataset_kind).
    -> tuple of names; ValueError with a one-line message naming `flag` and the valid choices."""
    names = protocols.split(",") if isinstance(protocols, str) else list(protocols)
    try:
        return expand_protocols(names, dataset_kind(data_root))
    except ValueError as e:
        raise ValueError(f"{flag}: {e} (comma-separated)") from None


def print_table(result):
    lines = [f"\nevaluation: step {result['step']}, {result['data_root']}, preset {result['preset']}",
             f"{'metric':<22}{'part':<11}{'value':>9}{'chance':>9}{'n':>9}  split"]
    for r in result["metrics"]:
        chance = "" if r["chance"] is None else f"{r['chance']:.4f}"
        lines.append(f"{r['name']:<22}{r['part']:<11}{r['value']:>9.4f}{chance:>9}{r['n']:>9}  {r['split']}")
    print("\n".join(lines + [f"note: {n}" for n in result["notes"]]), flush=True)


def evaluate(probe, data_root, protocols=("all",), out_dir=None, device=None, preset="toy", **opts):
    """Run the protocols on the frozen model, print a table, write out_dir/eval.json (rank 0) and return
    the result dict: {"metrics": [one record per metric, with its definition, split, n, representation,
    chance level and the checkpoint step], "summary": {"name/part": value}, "settings", "notes", ...}.
    opts override the preset (PRESETS' keys, plus size: image side, None = native; batch_size_extract).
    The data root's layout picks the protocols (PROTOCOLS). Under torchrun every rank must call it."""
    cfg, kind = resolve(preset, opts), dataset_kind(data_root)
    protos = expand_protocols(protocols, kind)
    device = torch.device(device if device is not None else next(probe.backbone.parameters(), torch.empty(0)).device)
    modules = [m for m in (probe.backbone, probe.embed, probe.predict) if isinstance(m, nn.Module)]
    modes = [m.training for m in modules]
    for m in modules:
        m.to(device).eval()
    if out_dir and world()[0] == 0:
        os.makedirs(out_dir, exist_ok=True)
    # Probe losses, R², similarities and k-NN votes in fp32 even when the caller runs under
    # autocast (.float() on an input does not stop autocast from casting the next matmul);
    # backbone_fn turns bf16 back on for the backbone's forward alone.
    try:
        with torch.autocast(device.type, enabled=False):
            if kind == "3diebench":
                recs, notes = evaluate_3diebench(probe, data_root, protos, cfg, device, out_dir)
            else:
                recs, notes = evaluate_imagefolder(probe, data_root, protos, cfg, device)
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    for r in recs:
        r["step"] = probe.step
    if kind == "3diebench":
        notes.append(f"BN: {cfg['bn']} mode = {BN_MODES[cfg['bn']]}")
    result = dict(step=probe.step, data_root=str(data_root), preset=preset, protocols=list(protos),
                  settings=cfg, notes=notes, metrics=recs,
                  summary={f"{r['name']}/{r['part']}": r["value"] for r in recs})
    if world()[0] == 0:
        print_table(result)
    if out_dir and world()[0] == 0:
        tmp = os.path.join(out_dir, "eval.json.tmp")
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, os.path.join(out_dir, "eval.json"))
    return result


# =================================== main ===================================
def fail(msg):
    print(f"eval.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


# The only modules a checkpoint's "script" field may name: eval.py imports it to rebuild the
# model, so any other name (a checkpoint from elsewhere, "os", ...) is refused before importing.
SCRIPTS = ("sie", "baselines", "ser")


def load_error(e):
    """One line out of torch.load's exception: the weights-only unpickler's reason, else line 1."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        boilerplate = ("Please file an issue", "Check the documentation")
        reasons = [line for line in lines[1:] if not line.startswith(boilerplate)]
        reason = reasons[0] if reasons else "unsupported content"
        return f"a weights-only load refused it, nothing in it was run: {reason[:200]}"
    return f"{type(e).__name__}: {lines[0][:200] if lines else 'empty or cut short'}"


def read_checkpoint(ckpt_path):
    """The checkpoint dict, loaded tensors-only (torch.load(weights_only=True): a pickle that would
    build arbitrary objects or call functions is refused, not run); damaged or foreign -> fail()."""
    try:
        with warnings.catch_warnings():     # torch warns about pickle protocols: one message only
            warnings.simplefilter("ignore")
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated / foreign files
        fail(f"cannot read checkpoint {ckpt_path} (damaged, or not a checkpoint of sie.py / "
             f"baselines.py / ser.py): {load_error(e)}")
    if missing := [k for k in ("script", "args", "model") if not isinstance(ckpt, dict) or k not in ckpt]:
        fail(f"{ckpt_path} is not a checkpoint written by sie.py / baselines.py / ser.py (missing {missing})")
    if not isinstance(ckpt["script"], str) or ckpt["script"] not in SCRIPTS:
        fail(f"{ckpt_path} names script {ckpt['script']!r}; eval.py only rebuilds models of "
             f"{list(SCRIPTS)}")
    if not (isinstance(ckpt["args"], dict) and all(isinstance(k, str) for k in ckpt["args"])
            and isinstance(ckpt["model"], dict)):
        fail(f"{ckpt_path} is damaged: its 'args' must be a dict of names, 'model' a state dict")
    if not isinstance(ckpt.get("step", 0), int):
        fail(f"{ckpt_path} is damaged: its 'step' is {ckpt['step']!r}, not an int")
    return ckpt


def load_probeable(path, device):
    """checkpoint.pt (CONTRACT.md) -> (Probeable, saved args): import the script that wrote it (one
    of SCRIPTS), rebuild its model from the saved args, load the weights strictly, ask for its
    probeable."""
    ckpt_path = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    if not os.path.isfile(ckpt_path):
        fail(f"no checkpoint at {ckpt_path} (give a run directory holding checkpoint.pt, or the file)")
    ckpt = read_checkpoint(ckpt_path)
    try:
        module = importlib.import_module(ckpt["script"])
    except ImportError as e:
        fail(f"{ckpt_path} was written by {ckpt['script']}.py, which cannot be imported here ({e})")
    args = Namespace(**ckpt["args"])
    try:
        model = module.build_model(args)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        fail(f"{ckpt_path}: {ckpt['script']}.build_model cannot rebuild the model from the saved "
             f"args ({type(e).__name__}: {str(e)[:200]})")
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except (RuntimeError, AttributeError, TypeError, ValueError) as e:
        fail(f"{ckpt_path} does not match {ckpt['script']}.build_model: {' '.join(str(e).split())[:400]}")
    probe = module.probeable(model.to(device).eval(), args)
    probe.step = ckpt.get("step", 0)
    return probe, args


TABLE = ("top1/full", "top1/inv", "top1/equi", "rot_r2_pooled/full", "rot_r2_pooled/inv", "rot_r2_pooled/equi",
         "color_r2_pooled/full", "mrr/embedding", "H@1/embedding", "H@5/embedding", "pre/embedding", "linear_top1/full",
         "knn20_top1/full")   # then 'Δeq l' per block l: the equivariance score minus its no-ρ reference


def read_eval_json(run_dir):
    """run_dir/eval.json as evaluate wrote it; a missing or damaged one -> fail() naming it."""
    if not os.path.isfile(path := os.path.join(run_dir, "eval.json")):
        fail(f"no eval.json in {run_dir} (evaluate it first: python eval.py {run_dir})")
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"cannot read {path}: {type(e).__name__}: {e}")
    if not isinstance(res, dict) or not {"step", "data_root", "summary", "metrics"} <= set(res):
        fail(f"{path} is not an eval.json written by eval.py (re-run: python eval.py {run_dir})")
    return res


def print_runs_table(run_dirs):
    """A markdown row per run dir (its eval.json), and 'mean ± std (n)' (sample std) per group of names that
    differ only by a trailing -s<seed>."""
    groups = {}
    for d in run_dirs:
        res, name = read_eval_json(d), os.path.basename(os.path.normpath(d))
        eq = {f"Δeq {m['part'][5:]}": m["value"] - m["chance"] for m in res["metrics"] if m["name"] == "equivariance"}
        groups.setdefault(re.sub(r"-s\d+$", "", name), []).append(
            (name, res["step"], {**{k: v for k, v in res["summary"].items() if k in TABLE}, **eq}))
    cols = sorted({c: 0 for g in groups.values() for *_, r in g for c in r}, key=lambda c: (*TABLE, c).index(c))
    stat = lambda v: f"{v[0]:.3f}" if len(v) == 1 else f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" if v else ""
    line = lambda name, step, rs: f"| {name} | {step} | " + " | ".join(stat([r[c] for r in rs if c in r]) for c in cols)
    print(f"data: {res['data_root']}\n| run | step | " + " | ".join(cols) + " |\n" + "|---" * (len(cols) + 2) + "|")
    for key, g in groups.items():
        print(*[line(n, s, [r]) for n, s, r in g], *[line(f"{key}[-s*] mean ± std ({len(g)})", "", [r for *_, r in g])]
              * (len(g) > 1), sep=" |\n", end=" |\n")


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, exit 2 (argparse's default adds the usage block)."""
        fail(f"{message} (python eval.py --help)")


def count(minimum):
    """argparse type: an int >= minimum, the flag named in argparse's message otherwise."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is not >= {minimum}")
        return value
    return parse


def device_name(text):
    """argparse type: a torch device string that this machine has."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda:1, ...)") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: no such CUDA device here")
    return text


def parse_args(argv=None):
    p = Parser(description="Evaluate a checkpoint (sie.md §4, ser.md §3).")
    p.add_argument("path", nargs="+", help="run directory holding checkpoint.pt, or a checkpoint file "
                   "(several run directories with --table)")
    p.add_argument("--table", action="store_true", help="print one markdown row per run from its eval.json")
    p.add_argument("--protocol", nargs="+", default=["all"], choices=["all", *sum(PROTOCOLS.values(), ())],
                   help="3DIEBench: classify = linear top-1 per part; rotation / color = R² (pooled and "
                        "per-output); retrieval = MRR, H@1/2/5/10, PRE of the predictor. ImageFolder: linear, "
                        "knn, equivariance (per block), robustness")
    p.add_argument("--preset", choices=PRESETS, help="probe settings (default: the checkpoint's preset)")
    p.add_argument("--data-root", help="data set (default: the checkpoint's --data-root)")
    p.add_argument("--size", type=count(1),
                   help="image side in px (default: the checkpoint's --resolution)")
    p.add_argument("--bn", choices=BN_MODES, help="BN while fitting probes: eval (toy default, cached "
                   "features) or train (paper default, the official probes' net.train())")
    p.add_argument("--epochs", type=count(1), help="probe epochs (paper 300)")
    p.add_argument("--batch-size", type=count(1), help="probe batch (paper 256)")
    p.add_argument("--train-views", type=count(1),
                   help="views per training object cached for --bn eval")
    p.add_argument("--workers", type=count(0), help="DataLoader workers")
    p.add_argument("--seed", type=count(0), help="view sampling and head init")
    p.add_argument("--out", help="where eval.json / retrieval.png go (default: the run directory)")
    p.add_argument("--device", type=device_name,
                   help="default: cuda:LOCAL_RANK if available, else cpu")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        return print_runs_table(args.path)
    if len(args.path) > 1:
        fail(f"one checkpoint at a time (got {len(args.path)} paths); several run directories need --table")
    args.path = args.path[0]
    cuda = torch.cuda.is_available()
    device = torch.device(args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu"))
    if "RANK" in os.environ and not dist.is_initialized():  # torchrun: NCCL on GPU, gloo on CPU
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    probe, saved = load_probeable(args.path, device)
    preset = args.preset or (saved.preset if getattr(saved, "preset", None) in PRESETS else "toy")
    saved_arg = lambda *names: next((getattr(saved, n) for n in names if getattr(saved, n, None)), None)
    root = args.data_root or saved_arg("data_root", "data") or data.DEFAULT_ROOT   # sie/baselines, ser names
    out = args.out or (args.path if os.path.isdir(args.path) else os.path.dirname(args.path) or ".")
    opts = dict(size=args.size or saved_arg("resolution", "img_size"), bn=args.bn, epochs=args.epochs,
                batch_size=args.batch_size, train_views=args.train_views, workers=args.workers, seed=args.seed)
    try:
        evaluate(probe, root, args.protocol, out_dir=out, device=device, preset=preset, **opts)
    except (data.DataError, ValueError) as e:
        fail(str(e))
    except OSError as e:   # e.g. --out not writable; the message names the path
        fail(f"{type(e).__name__}: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
