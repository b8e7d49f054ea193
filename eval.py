"""Frozen-backbone evaluation of the checkpoints that sie.py, baselines.py and ser.py write.

On a 3DIEBench root, the protocols of the official SIE code (eval_classification.py,
eval_angle_prediction.py, eval_color_prediction.py, eval_MRR_Hk.py, eval_prediction_errors.py):
    classify    top-1 of a linear probe on each part of the representation (full, inv, equi)
    rotation    R² of an MLP probe predicting the relative rotation of two views from their pair
    color       the same for the floor-hue and spot-hue differences
    retrieval   MRR, H@k and PRE of the trained predictor (where the model has one)
    predictor   ours: is the predictor's W(g) a representation of the rotations, does it tell
                q from -q, and predictor.png (where the model has a predictor)
On an ImageFolder root, SER's ImageNet protocols at small scale:
    linear      top-1 of a linear probe (official SER code, lincls_parallel.py)
    knn         DINO's weighted k-NN top-1
    equivariance  our proxy score per block of the token maps (SER's definition is not available)
    robustness  top-1 of the linear probe on shifted val images (an ImageNet-C/P-like proxy)
Every metric is written with its definition (DEFS) and its chance level.

    python eval.py runs/sie-toy                       # all protocols, the run's checkpoint
    python eval.py runs/sie-toy/checkpoint.pt --protocol rotation retrieval --bn train
    torchrun --standalone --nproc_per_node=2 eval.py runs/sie-toy   # same numbers, sharded
    python eval.py --table runs/sie-toy runs/baselines-toy-*        # one markdown row per run
In code: evaluate(Probeable(...), data_root, ...) -> dict; it prints a table and writes eval.json.

The checkpoint contract, what eval.py needs from a training script:
  - the script is one of SCRIPTS (sie.py, baselines.py, ser.py) and defines, at module level,
      build_model(args) -> nn.Module       the training model, rebuilt from the saved args
      probeable(model, args) -> Probeable  what of that model the protocols use (see Probeable)
      DATA_KIND                            "3DIEBench" or "ImageFolder": the layout it reads
    where Probeable.embeddings, when set, gives the projector outputs the loss acts on, probed
    instead of the representation with `--features embeddings` (sie.py)
  - its checkpoint.pt is a dict written with torch.save, holding
      "script"  "sie", "baselines" or "ser": the module that eval.py imports to rebuild the model
      "args"    vars() of the script's argparse namespace (a dict with str keys)
      "model"   the model's state_dict, loaded strictly
      "step"    the optimizer step (an int), reported with every metric
    and, for resuming training (save_checkpoint / read_checkpoint / restore below, which the
    scripts call): "optimizer", "scaler", "epoch", "rng". It is loaded weights_only: tensors,
    numbers, strings, lists and dicts only.
"""
import argparse
import copy
import ctypes
import fcntl
import functools
import gc
import importlib
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
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

# ====================================================================================== settings
PREDICTOR_PROTOCOLS = ("retrieval", "predictor")   # they measure a predictor; without one: none
PROTOCOLS = {"3diebench": ("classify", "rotation", "color", "retrieval", "predictor"),
             "imagefolder": ("linear", "knn", "equivariance", "robustness")}
# Probe settings. `paper` = the official README commands: Adam 1e-3, no schedule, batch 256, 300
# epochs, MLP head 1024-1024 for the R² probes, BN in train mode while fitting.
# Deviation (toy): 100 epochs, batch 64, MLP hidden 256, 10 cached views per training object, BN
# in eval mode so that features are extracted once: seconds on a laptop CPU. The same head shapes
# and metrics.
# ImageFolder: linear probe 50 epochs (official SER code, config/eval.yaml), DINO's k-NN with
# k in {10, 20, 100, 200} and T = 0.07.
# Deviation (toy): k in {10, 20}, 100 probe epochs, the equivariance score on 256 held-out images.
PRESETS = {
    "paper": dict(epochs=300, batch_size=256, lr=1e-3, hidden=1024, train_views=None, val_pairs=10,
                  bn="train", workers=8, seed=0, figure_objects=6, linear_epochs=50,
                  knn_k=(10, 20, 100, 200), equi_images=2000),
    "toy": dict(epochs=100, batch_size=64, lr=1e-3, hidden=256, train_views=10, val_pairs=10,
                bn="eval", workers=0, seed=0, figure_objects=6, linear_epochs=100,
                knn_k=(10, 20), equi_images=256),
}
BN_MODES = {
    "eval": "frozen backbone in eval mode (pretraining BN statistics) everywhere; features "
            "extracted once and cached, the probe samples views from the cache each epoch",
    "train": "official: BN in train mode while fitting (batch statistics of each probe batch, "
             "running statistics re-estimated on train), then eval mode with those for val; "
             "features recomputed every epoch",
}
# The definition written next to each metric in eval.json.
DEFS = {
    "top1": "top-1 of a linear probe Linear(k, C) (cross-entropy, Adam) on the frozen "
            "representation slice, over every view of every val object (the expectation of the "
            "official score, one random view per object, eval_classification.py)",
    "r2_pooled": "OFFICIAL R² = 1 - Σ(t-p)² / Σ(t-t̄)² with ONE scalar mean t̄ over all components "
                 "of all val targets (eval_angle_prediction.py, r2_score); a constant predictor "
                 "already scores ≈0.23 on quaternions",
    "r2_per_output": "mean over output components j of 1 - Σ_i(t_ij-p_ij)² / Σ_i(t_ij-t̄_j)² "
                     "(scikit-learn's uniform average; a constant predictor scores 0)",
    "mrr": "mean 1/rank of target view v among the object's views by cosine to "
           "predict(embed(view 0), g(0→v)); every v including v = 0 (eval_MRR_Hk.py)",
    "hits": "fraction of the MRR queries whose target view ranks <= {k}",
    "pre": "mean of 1 - <q, q̂>² between the absolute quaternion of the target view and that of "
           "the nearest neighbour (cosine) of the prediction among ALL embeddings of the split "
           "(eval_prediction_errors.py)",
    "linear": "top-1 of a linear probe Linear(k, C) (Adam, cached centre-crop features) on the "
              "frozen representation; for SER the concatenated [CLS] of the last 4 blocks "
              "(official SER code, lincls_parallel.py)",
    "knn": "top-1 of DINO's weighted k-NN: the k={k} nearest train features by cosine vote with "
           "exp(cos / 0.07)",
    "robust": "top-1 of the clean-trained linear probe on shifted val images (ImageNet-C/P-like "
              "proxy)",
    "equivariance": "OUR PROXY (the SER paper's definition could not be read): mean over "
                    "held-out images, tokens and g ∈ {rot90, rot180, rot270, flip} of "
                    "cos(ρ_g(f_l(x)), f_l(g·x)) for the block-l patch-token map; per_g holds each "
                    "g's mean; 'chance' = the same with ρ_g left out (a map that ignores g scores "
                    "this), per g in per_g_chance. per_g also holds rescale 1.25x (ρ = bicubic "
                    "resample to f(g·x)'s grid), left out of the mean and of 'chance': a map that "
                    "ignores the rescale is compared through the same resample, so it has no no-ρ "
                    "reference (its Δ would be 0)",
    # the predictor protocol (W(g) = the predictor's linear map, materialised; p(z, g) = the
    # predictor; chains a → b → c of 3 views of one val object, g_ac = g_ab g_bc)
    "rep_identity/W": "||W(e) - I||_F / ||I||_F, e the identity rotation: 0 for a representation",
    "rep_composition/W": "mean over the chains of ||W(g_ac) - W(g_bc) W(g_ab)||_F / ||W(g_ac)||_F: "
                         "0 for a predictor that composes as the data does (g_ab first)",
    "rep_inverse/W": "mean over the chains of ||W(g_ba) W(g_ab) - I||_F / ||I||_F, g_ba = g_ab⁻¹",
    "rep_orthogonality/W": "mean over the chains of ||W(g_ab)ᵀ W(g_ab) - I||_F / ||I||_F: 0 for "
                           "an orthogonal W(g)",
    "rep_identity/z": "mean over the chains of |p(z_a, e) - z_a| / |z_a|",
    "rep_composition/z": "mean over the chains of |p(p(z_a, g_ab), g_bc) - p(z_a, g_ac)| / "
                         "|p(z_a, g_ac)|: two predicted steps against one",
    "rep_inverse/z": "mean over the chains of |p(p(z_a, g_ab), g_ba) - z_a| / |z_a|",
    "rep_isometry/z": "mean over the chains of | |p(z_a, g_ab)| / |z_a| - 1 |",
    "rep_prediction_error/z": "mean over the chains of |p(z_a, g_ab) - z_b| / |z_b|: the error "
                              "the loss trains down, for scale",
    "w_negative/queries": "share of the retrieval queries' g(view 0 → v) whose scalar part w is "
                          "< 0 (g = conj(q_0) q_v, not canonicalised; -g is the same rotation)",
    "w_negative/pairs": "share of random pairs of distinct views whose g has w < 0",
    "mrr_g/embedding": "the retrieval MRR (see mrr), with the references beside it",
    "mrr_minus_g/embedding": "the retrieval MRR with every g replaced by -g (the same rotation)",
    "mrr_canonical_g/embedding": "the retrieval MRR with every g replaced by its w >= 0 sign",
    "mrr_w_neg/embedding": "the retrieval MRR over the queries whose g has w < 0, g as given",
    "mrr_w_neg_flipped/embedding": "the same queries with -g (w > 0) instead",
}


@dataclass
class Probeable:
    """What a method script hands to `evaluate` (its `probeable(model, args)` returns one)."""
    backbone: nn.Module                 # images (B, 3, H, W) -> representation (B, D)
    parts: dict                         # name -> slice of the representation: slice(0, 512)
    embed: nn.Module | None = None      # the 'equi' part (else all) of the representation ->
    #                                     equivariant embedding (B, d)
    predict: Callable | None = None     # (embedding (B, d), g (B, g_dim)) -> prediction (B, d)
    g_dim: int = 4                      # 4 (quaternion) or 6 (quaternion + 2 hue differences)
    embeddings: Callable | None = None  # representation -> all embeddings Z, where the loss acts
    embedding_parts: dict | None = None  # name -> slice of Z, probed with --features embeddings
    token_maps: Callable | None = None  # images -> [per-block token map (B, C, h, w)] (ViT / SER)
    input_stats: tuple | None = None    # (mean, std) the backbone was trained with, or the data's
    kind: str | None = None             # the data layout it trained on: its script's DATA_KIND
    predictor_init: Callable | None = None   # () -> the predictor at step 0 (model_at_init)
    step: int = 0                       # the checkpoint's step, reported with every metric


# =================================================================================== distributed
def world():
    """(rank, world size) of the process group that torchrun or the calling script set up, else
    (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def main_process():
    """Whether this process prints, writes files and shows progress bars (rank 0)."""
    rank, _ = world()
    return rank == 0


def sum_over_ranks(sums):
    """{name: device scalar} -> {name: float}, summed over the processes: one all-reduce and one
    host sync (the training scripts' logging point)."""
    keys = sorted(sums)
    vec = torch.stack([sums[k].float() for k in keys])
    if dist.is_initialized():
        dist.all_reduce(vec)
    return dict(zip(keys, vec.tolist()))


def from_rank0(value):
    """Rank 0's value of a picklable object, on every process (itself without a process group)."""
    if not dist.is_initialized():
        return value
    message = [value]
    dist.broadcast_object_list(message, src=0)
    return message[0]


def default_device():
    """cuda:LOCAL_RANK where there is a GPU (LOCAL_RANK: torchrun's, else 0), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def start_process_group(device):
    """Join the process group that torchrun describes in the environment (RANK, WORLD_SIZE, ...),
    unless there is none or it is joined already: NCCL on GPU, bound to this rank's device;
    gloo on CPU. The training scripts and eval.py's command line both start here."""
    if "RANK" not in os.environ or dist.is_initialized():
        return
    if sys.platform == "linux":
        # A kill -9 of torchrun's agent would leave its workers running unsupervised: ask Linux
        # to send this worker SIGTERM when its parent, the agent, dies (1 = PR_SET_PDEATHSIG).
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    if device.type == "cuda":
        torch.cuda.set_device(device)      # before init, so NCCL binds this rank to its own GPU
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")


def end_process_group(clean=True):
    """Leave the process group for good. DDP's reducer keeps the gloo context alive past
    destroy_process_group, and a peer that exits first would close its sockets under it
    (SIGABRT, 'terminate called without an active exception'): it is collected first. The ranks
    meet at a barrier after a clean run only; after a failure a peer may be gone already."""
    if not dist.is_initialized():
        return
    gc.collect()
    if clean:
        dist.barrier()
    dist.destroy_process_group()


# ====================================================================================== features
@torch.no_grad()
def extract(fn, dataset, batch_size, device, workers=0, desc="features", shard=True):
    """fn(images) -> (B, ...) for every item of `dataset`, returned on CPU in dataset order, on
    every rank. Exact under torchrun: rank r takes items r, r+W, r+2W, ... (no DistributedSampler,
    which pads the shards with repeated items); the shards are padded to equal length only for
    the all_gather and interleaved back, so that every item counts exactly once whatever W is.
    shard=False: every rank runs all items itself, in batches of dataset order (BN in train
    mode)."""
    rank, W = world() if shard else (0, 1)
    if len(dataset) == 0:
        raise ValueError(f"{desc}: the data set is empty, nothing to extract")
    mine = Subset(dataset, range(rank, len(dataset), W))
    loader = DataLoader(mine, batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    batches = tqdm(loader, desc=desc, disable=not main_process(), leave=False)
    outs = [fn(batch[0].to(device, non_blocking=True)).float() for batch in batches]
    if not outs:   # more ranks than items, this shard is empty: item 0 gives the output's shape
        outs = [fn(dataset[0][0][None].to(device)).float()[:0]]
    local = torch.cat(outs)
    if W == 1:
        return local.cpu()
    shard_length = -(-len(dataset) // W)                                  # ceil(len / W)
    padding = local.new_zeros(shard_length - len(local), *local.shape[1:])
    padded = torch.cat([local, padding])
    shards = [torch.empty_like(padded) for _ in range(W)]
    dist.all_gather(shards, padded)
    out = torch.empty(len(dataset), *local.shape[1:])
    for r, shard_r in enumerate(shards):
        out[r::W] = shard_r[:len(range(r, len(dataset), W))].cpu()
    return out


def backbone_fn(backbone, device, pre=None):
    """images -> the fp32 representation of pre(images); bf16 autocast and channels_last on GPU
    (numerics only)."""
    def fn(x):
        if pre is not None:
            x = pre(x)
        if device.type == "cuda":
            with torch.autocast("cuda", torch.bfloat16):
                return backbone(x.contiguous(memory_format=torch.channels_last)).float()
        return backbone(x)
    return fn


def features_of(backbone, dataset, desc, pre, cfg, device):
    """The frozen representation of every item of `dataset` (extract of backbone_fn)."""
    fn = backbone_fn(backbone, device, pre)
    return extract(fn, dataset, cfg["batch_size_extract"], device, cfg["workers"], desc)


def normalizer(stats, src=None):
    """x in [0, 1], or normalised with src = (mean, std) -> normalised with stats = (mean, std)."""
    def pre(x):
        if src is not None:
            x = data.denormalize_channels(x, src)
        return data.normalize_channels(x, stats)
    return pre


def shifted(shift, pre):
    """x -> pre(shift(x)): a test-time shift of the [0, 1] images, then the normalisation."""
    def fn(x):
        return pre(shift(x))
    return fn


# ============================================================================= 3DIEBench targets
def epoch_views(n_obj, n_views, seed, epoch):
    """(order, v_i, v_j): a shuffled object order and two DISTINCT uniform views per object, a
    function of (seed, epoch) only, so that every rank draws the same (the official probes use an
    unseeded generator)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n_obj)
    vi = rng.integers(n_views, size=n_obj)
    vj = (vi + rng.integers(1, n_views, size=n_obj)) % n_views   # uniform over the other views
    return order, vi[order], vj[order]


def pair_targets(labels, lat_i, lat_j):
    """The probes' targets for pairs of views with latents lat_i, lat_j (N, 7): the labels, the
    relative quaternion (N, 4) (data.relative_g, the angles cast to float32 as the official probes
    do) and the hue differences (N, 2)."""
    return {"classify": torch.from_numpy(labels), "rotation": data.relative_g(lat_i, lat_j),
            "color": torch.from_numpy(data.hue_differences(lat_i, lat_j)).float()}


def absolute_quaternion(lat):
    """The absolute pose quaternion of each view, from its float64 Euler angles (for PRE)."""
    rotations = data.euler_xyz_to_matrix(lat[..., :3])
    return torch.from_numpy(data.matrix_to_quaternion(rotations)).float()


# =================================================================================== probe heads
def regression_mlp(width, hidden, outputs):
    """The README's `--deep-end` head: Linear(width, h)-ReLU-Linear(h, h)-ReLU-Linear(h, out)."""
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, outputs))


def make_heads(tasks, parts, n_classes, hidden):
    """One head per "task/part": Linear(k, C) for classification (eval_classification.py); the MLP
    on [f(x_i); f(x_j)] for the rotation (4 outputs) and colour (2 outputs) regressions
    (eval_angle_prediction.py, eval_color_prediction.py)."""
    heads = {}
    for name, sl in parts.items():
        width = sl.stop - sl.start
        for task in tasks:
            if task == "classify":
                heads[f"{task}/{name}"] = nn.Linear(width, n_classes)
            else:
                outputs = 4 if task == "rotation" else 2
                heads[f"{task}/{name}"] = regression_mlp(2 * width, hidden, outputs)
    return nn.ModuleDict(heads)


def head_loss(out, target):
    if target.dtype == torch.long:
        return F.cross_entropy(out, target)
    return F.mse_loss(out, target)


def fit_heads(heads, epoch_data, cfg, device):
    """Fit every head at once on frozen features: Adam, constant lr, no weight decay (the official
    scripts define a schedule but never call it); the last epoch is the one reported.
    epoch_data(epoch) -> {key: (inputs (N, k), targets (N, ...))} in that epoch's order. The heads
    are independent, so one Adam on the summed losses fits each exactly as alone."""
    optimizer = torch.optim.Adam(heads.parameters(), lr=cfg["lr"], weight_decay=0)
    B = cfg["batch_size"]
    epochs = tqdm(range(cfg["epochs"]), desc="probes", disable=not main_process(), leave=False)
    for epoch in epochs:
        batch = epoch_data(epoch)
        n = len(next(iter(batch.values()))[0])
        for s in range(0, n, B):
            loss = sum(head_loss(heads[key](x[s:s + B].to(device)), y[s:s + B].to(device))
                       for key, (x, y) in batch.items())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def seeded(seed, build, *args):
    """build(*args) with torch's generator seeded, leaving the caller's random stream alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(*args)


@torch.no_grad()
def batched(fn, n, chunk):
    """fn(rows) for rows = slice(s, s + chunk) over range(n), as one fp32 CPU tensor filled in
    place: no list of chunks next to their concatenation (2 x 2.2 GB for the embeddings at
    3DIEBench's val size)."""
    out = None
    for s in range(0, n, chunk):
        y = fn(slice(s, min(s + chunk, n))).float().cpu()
        if out is None:
            out = y.new_empty(n, *y.shape[1:])
        out[s:s + len(y)] = y
    return out


def apply(head, x, device, chunk=4096):
    def rows_of(rows):
        return head(x[rows].to(device))
    return batched(rows_of, len(x), chunk)


def pair_batch(keys, parts, f_i, f_j, targets):
    """{"task/part": (input, target)}: a classifier reads f_i[part], a regressor
    [f_i[part]; f_j[part]]."""
    batch = {}
    for key in keys:
        task, part = key.split("/", 1)
        sl = parts[part]
        if task == "classify":
            inputs = f_i[:, sl]
        else:
            inputs = torch.cat([f_i[:, sl], f_j[:, sl]], 1)
        batch[key] = (inputs, targets[task])
    return batch


# ======================================================================================= metrics
def r2_pooled(pred, target):
    """The official SIE R² (eval_angle_prediction.py, r2_score): one scalar mean over ALL entries of
    the targets."""
    return float(1 - ((target - pred) ** 2).sum() / ((target - target.mean()) ** 2).sum())


def r2_per_output(pred, target):
    """scikit-learn's r2_score default: R² per output column, then the plain average."""
    per_column = 1 - ((target - pred) ** 2).sum(0) / ((target - target.mean(0)) ** 2).sum(0)
    return float(per_column.mean())


def constant_r2(target):
    """Both R²s of the best constant predictor (the per-component mean of the val targets)."""
    return r2_pooled(target.mean(0, keepdim=True).expand_as(target), target), 0.0


def similarity_block(p, c):
    """Dot products of unit rows: (Q, d) x (M, d) -> (Q, M), or per object (n, Q, d) x (n, M, d)
    -> (n, Q, M). Every similarity matrix of the retrieval metrics is one such block (the tests
    bound their size)."""
    if p.dim() == 2:
        return p @ c.T
    return torch.einsum("nqd,ncd->nqc", p, c)


def unit_rows(c):
    """The candidates' normalisation of the official scripts: +1e-8 on the norm."""
    return c / (c.norm(dim=-1, keepdim=True) + 1e-8)


def target_ranks(pred, cands, chunk=1024):
    """pred (N, V, d): the prediction for target view v of object n; cands (N, V, d): the object's
    views. -> (ranks (N, V): the 1-based rank of view v among the V candidates by cosine, sims
    (N, V, V)). p is normalised without eps, the candidates with +1e-8 on the norm, as in the
    official script. `chunk` objects at a time: the normalised copies are (chunk, V, d), not
    (N, V, d) (row-wise, so the numbers do not depend on it)."""
    ranks, sims = [], []
    with torch.autocast(pred.device.type, enabled=False):   # fp32 even under a caller's autocast
        for s in range(0, len(pred), chunk):
            p = pred[s:s + chunk]
            p = p / p.norm(dim=-1, keepdim=True)
            c = unit_rows(cands[s:s + chunk])
            sim = similarity_block(p, c)
            # ties count in the target's favour (measure zero with real features)
            target_sim = sim.diagonal(dim1=1, dim2=2).unsqueeze(-1)
            ranks.append(1 + (sim > target_sim).sum(-1))
            sims.append(sim)
    return torch.cat(ranks), torch.cat(sims)


def mrr_hits(ranks, ks=(1, 2, 5, 10)):
    r = ranks.double().flatten()
    metrics = {"mrr": float((1 / r).mean())}
    for k in ks:
        metrics[f"H@{k}"] = float((r <= k).double().mean())
    return metrics


@torch.no_grad()
def nearest_neighbours(pred, cands, device, chunk=4096, cand_chunk=32768):
    """The index of the nearest candidate (M, d) by cosine of each prediction (Q, d): the argmax
    over every candidate, streamed over blocks of at most chunk x cand_chunk similarities (512 MiB
    in fp32 by default, whatever Q and M are: 527,600 x 527,600 at 3DIEBench's val size), plus
    the M x d normalised candidates on `device`. The running maximum keeps the first index of the
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
    """PRE (eval_prediction_errors.py): for each prediction (Q, d) the nearest candidate (M, d) by
    cosine over the WHOLE split; the mean of 1 - <q, q̂>² between the absolute quaternions (Q, 4)
    and (M, 4): sign-invariant, and retrieving another object in the same pose counts as perfect.
    Memory: see nearest_neighbours."""
    nn_idx = nearest_neighbours(pred, cands, device, chunk, cand_chunk)
    return float((1 - (q_true * q_cands[nn_idx]).sum(-1) ** 2).mean())


def chance_levels(n_views, q_split):
    """A random ranking of V candidates: MRR = H_V / V (0.0900 for 50), H@k = k / V; a random
    retrieval: PRE = 1 - mean_{a,b} <q_a, q_b>² = 1 - ||QᵀQ||_F² / M² exactly (≈0.627 on
    3DIEBench's poses)."""
    q = q_split.double()
    levels = {"mrr": sum(1 / r for r in range(1, n_views + 1)) / n_views}
    for k in (1, 2, 5, 10):
        levels[f"H@{k}"] = min(k, n_views) / n_views
    levels["pre"] = float(1 - (q.T @ q).pow(2).sum() / len(q) ** 2)
    return levels


def record(name, part, value, definition, n, representation, chance, protocol, split="val"):
    """One JSON record per metric; evaluate adds the checkpoint's step."""
    return dict(name=name, part=part, value=value, definition=definition, n=n,
                representation=representation, chance=chance, protocol=protocol, split=split)


def slice_name(sl):
    return f"representation[{sl.start}:{sl.stop}]"


# ========================================================================= 3DIEBench protocols
def score_probes(heads, parts, val_reps, labels, latents, majority, cfg, device):
    """Top-1 over every view of every val object; both R²s over `val_pairs` fixed, seeded
    distinct-view pairs per object (the official probe re-draws one pair per object per epoch:
    the same expectation, more noise). val_reps (N, V, D), latents (N * V, 7)."""
    N, V, D = val_reps.shape
    obj = np.repeat(np.arange(N), cfg["val_pairs"])
    _, vi, vj = epoch_views(len(obj), V, cfg["seed"] + 1, 0)
    classify_keys = [k for k in heads if k.startswith("classify")]
    regression_keys = [k for k in heads if not k.startswith("classify")]
    view_labels = {"classify": torch.from_numpy(np.repeat(labels, V))}
    every_view = pair_batch(classify_keys, parts, val_reps.reshape(N * V, D), None, view_labels)
    targets = pair_targets(labels[obj], latents[obj * V + vi], latents[obj * V + vj])
    pairs = pair_batch(regression_keys, parts, val_reps[obj, vi], val_reps[obj, vj], targets)
    records = []
    for key, (x, t) in {**every_view, **pairs}.items():
        task, part = key.split("/", 1)
        sl = parts[part]
        p = apply(heads[key], x, device)
        rep = slice_name(sl)
        if task == "classify":
            top1 = float((p.argmax(1) == t).double().mean())
            chance = float((t == majority).double().mean())
            records.append(record("top1", part, top1, DEFS["top1"], len(t), rep, chance, task))
            continue
        if task == "rotation":
            name, what = "rot", "relative quaternion (x,y,z,w)"
        else:
            name, what = "color", "(Δfloor-hue, Δspot-hue)"
        chance_pooled, chance_per_output = constant_r2(t)
        pair_rep = f"[f(x_i); f(x_j)] of {rep}"
        records.append(record(f"{name}_r2_pooled", part, r2_pooled(p, t),
                              f"{what}; {DEFS['r2_pooled']}", len(t), pair_rep, chance_pooled,
                              task))
        records.append(record(f"{name}_r2_per_output", part, r2_per_output(p, t),
                              f"{what}; {DEFS['r2_per_output']}", len(t), pair_rep,
                              chance_per_output, task))
    return records


@torch.no_grad()
def retrieval_metrics(probe, val_reps, latents, device, batch_size):
    """MRR, H@k and PRE of the trained predictor on val (eval_MRR_Hk.py, eval_prediction_errors.py):
    embeddings e(o, v) of every view (backbone and projector in eval mode), queries p(o, v) =
    predict(e(o, 0), g(0 -> v)) for every v including 0, g from the float64 latents.
    -> (records, sims (N, V, V) for the figure)."""
    N, V, D = val_reps.shape
    equi_part = probe.parts.get("equi", slice(None))            # what probe.embed reads
    emb = apply(probe.embed, val_reps.reshape(N * V, D)[:, equi_part], device, batch_size)
    lat = latents.reshape(N, V, 7)
    source_lat = np.repeat(lat[:, :1], V, 1)                     # view 0 of each object
    g = data.relative_g(source_lat, lat, color=probe.g_dim == 6, float32_angles=False)
    g = g.reshape(N * V, -1)
    sources = emb[::V]                           # e(o, 0) of every object, for queries o * V + v

    def predictions(rows):
        objects = torch.arange(rows.start, rows.stop) // V
        return probe.predict(sources[objects].to(device), g[rows].to(device))
    pred = batched(predictions, N * V, batch_size)
    ranks, sims = target_ranks(pred.reshape(N, V, -1), emb.reshape(N, V, -1))
    q = absolute_quaternion(latents)
    chance = chance_levels(V, q)
    rep = "predict(embed(view 0), g) vs embed(view v), equivariant embedding"
    records = []
    for name, value in mrr_hits(ranks).items():
        definition = DEFS["mrr"] if name == "mrr" else DEFS["hits"].format(k=name[2:])
        records.append(record(name, "embedding", value, definition, N * V, rep, chance[name],
                              "retrieval"))
    pre = pose_retrieval_error(pred, emb, q, q, device)
    records.append(record("pre", "embedding", pre, DEFS["pre"], N * V,
                          rep + f", over all {N * V} val views", chance["pre"], "retrieval"))
    return records, sims


def save_retrieval_figure(path, val_ds, sims, n_objects, seed, top=5):
    """Like the paper's qualitative figure: per row, the source view (view 0), the `top` nearest
    neighbours of the prediction among the object's views, and the true target view."""
    from torchvision.utils import make_grid, save_image
    N, V, _ = sims.shape
    rng = np.random.default_rng([seed, 2])
    images = []
    for o in range(min(n_objects, N)):
        v = int(rng.integers(1, V))
        nearest = sims[o, v].argsort(descending=True)[:top].tolist()
        images += [val_ds[o * V + u][0] for u in [0] + nearest + [v]]
    x = data.denormalize_channels(torch.stack(images))
    save_image(make_grid(x.clamp(0, 1), nrow=top + 2, padding=2, pad_value=1.0), path)


def bn_train_copy(backbone):
    """A copy of the frozen backbone with only its BatchNorm layers in train mode: the official
    probes' net.train() (dropout stays off)."""
    copied = copy.deepcopy(backbone).eval().requires_grad_(False)
    for module in copied.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
    return copied


def probe_records(probe, root, tasks, cfg, device, pre, val_ds, val_reps):
    """Fit the classify / rotation / color heads on train and score them on val -> records.
    val_reps: the val features (bn="eval"), or None (bn="train": computed after fitting)."""
    V = len(val_ds.view_ids)
    if cfg["bn"] == "train" or cfg["train_views"] is None:
        views = None
    else:
        views = range(min(cfg["train_views"], V))
    train_ds = data.Views3DIEBench(root, "train", size=cfg["size"], views=views)
    n_train = len(train_ds.entries)
    n_views = len(train_ds.view_ids)                 # pairs are drawn among these views
    views_on_disk = len(train_ds.latents) // n_train   # latent row = object * views_on_disk + view
    heads = seeded(cfg["seed"], make_heads, tasks, probe.parts, train_ds.num_classes, cfg["hidden"])
    heads = heads.to(device)
    bn_backbone = None                 # bn="train": the copy whose BN statistics the probes move
    if cfg["bn"] == "eval":
        # features once; each epoch picks two of the cached views per object
        cache = features_of(probe.backbone, train_ds, "train features", pre, cfg, device)
        cache = cache.unflatten(0, (n_train, n_views))

        def pair_features(order, vi, vj):
            return cache[order, vi], cache[order, vj]
    else:
        # batch statistics of each probe batch, running statistics drifting to train's
        bn_backbone = bn_train_copy(probe.backbone)
        fn = backbone_fn(bn_backbone, device, pre)

        def pair_features(order, vi, vj):
            # per epoch, the images of exactly the probe's minibatches, so that BN sees what
            # the official probe sees
            return [extract(fn, Subset(train_ds, order * views_on_disk + v), cfg["batch_size"],
                            device, cfg["workers"], "epoch", shard=False) for v in (vi, vj)]

    def epoch_data(epoch):
        order, vi, vj = epoch_views(n_train, n_views, cfg["seed"], epoch)
        f_i, f_j = pair_features(order, vi, vj)
        lat_i = train_ds.latents[order * views_on_disk + vi]
        lat_j = train_ds.latents[order * views_on_disk + vj]
        targets = pair_targets(train_ds.labels[order], lat_i, lat_j)
        return pair_batch(heads, probe.parts, f_i, f_j, targets)
    fit_heads(heads, epoch_data, cfg, device)
    if cfg["bn"] == "train":             # val in eval mode, with the re-estimated statistics
        val_reps = features_of(bn_backbone.eval(), val_ds, "val features (re-estimated BN)", pre,
                               cfg, device).unflatten(0, (-1, V))
    majority = int(np.bincount(train_ds.labels).argmax())
    return score_probes(heads, probe.parts, val_reps, val_ds.labels, val_ds.latents, majority,
                        cfg, device)


def evaluate_3diebench(probe, root, protos, cfg, device, out_dir):
    """SIE's protocols on 3DIEBench (or its look-alike) -> (records, notes)."""
    val_ds = data.Views3DIEBench(root, "val", size=cfg["size"])
    V = len(val_ds.view_ids)
    tasks = [p for p in ("classify", "rotation", "color") if p in protos]
    has_predictor = probe.embed is not None and probe.predict is not None
    retrieval = "retrieval" in protos and has_predictor
    predictor = "predictor" in protos and has_predictor
    records, notes = [], []
    for name, runs in (("retrieval (MRR, H@k, PRE)", retrieval), ("predictor", predictor)):
        if name.split()[0] in protos and not runs:
            notes.append(f"{name} skipped: this probeable has no embed/predict (no predictor)")
    # a backbone trained with other input statistics (an ImageNet ViT) gets its own
    pre = None
    if probe.input_stats:
        pre = normalizer(probe.input_stats, src=(data.MEAN, data.STD))
    val_reps = None
    if retrieval or predictor or (tasks and cfg["bn"] == "eval"):   # pretraining BN statistics
        val_reps = features_of(probe.backbone, val_ds, "val features", pre, cfg, device)
        val_reps = val_reps.unflatten(0, (-1, V))
    if retrieval:
        retrieval_records, sims = retrieval_metrics(probe, val_reps, val_ds.latents, device,
                                                    cfg["batch_size_extract"])
        records += retrieval_records
        if out_dir and main_process() and cfg["figure_objects"]:
            save_retrieval_figure(os.path.join(out_dir, "retrieval.png"), val_ds, sims,
                                  cfg["figure_objects"], cfg["seed"])
    if predictor:
        figure = bool(out_dir and main_process() and cfg["figure_objects"])
        predictor_recs, predictor_notes, fig = predictor_records(probe, val_reps, val_ds.latents,
                                                                 cfg, device, figure)
        records += predictor_recs
        notes += predictor_notes
        if figure:
            save_predictor_figure(os.path.join(out_dir, "predictor.png"), val_ds, fig)
    if tasks:
        records += probe_records(probe, root, tasks, cfg, device, pre, val_ds, val_reps)
    return records, notes


# ============================================================================ predictor analysis
# The `predictor` protocol: is the trained predictor p(z, g) (W(g) z for SIE's hypernetwork) a
# representation of the rotations, does it tell the quaternion g from -g, and how does it move
# an embedding along a path of rotations (predictor.png). Every measure has two references:
# chance_init, the same predictor at its initialisation on the same trained embeddings
# (Probeable.predictor_init), and chance_random, a Gaussian W(g) linear in g like the
# hypernetwork, with the trained W(g)'s mean squared Frobenius norm (GaussianPredictor).
# `chance` repeats chance_random, except for the MRRs, whose chance is a random ranking's.
# The SIE paper's abstract announces an analysis of "how [the predictor] steers the learned latent
# space"; its analysis section could not be read here, so these measures are ours.
#
# The convention (data.relative_quaternion): g(a→b) = conj(q_a) q_b, the rotation R_a^T R_b in
# view a's object frame, q_a and q_b the views' quaternions from their Euler angles (w >= 0 for
# 3DIEBench's angles in [-π/2, π/2]). A chain of views a → b → c has g(a→c) = g(a→b) g(b→c)
# exactly, sign included, so a predictor that fits the data composes in the reverse order of the
# quaternion product:  W(g_ab g_bc) = W(g_bc) W(g_ab)  (g ↦ W(g⁻¹) is a representation). Exact
# example: W(g) = right multiplication by g, which maps q_a to q_a g_ab = q_b. The measures draw
# such chains of three val views of one object, so every g is a real relative rotation of the data.
PREDICTOR = dict(
    matrix_chains=32,         # chains whose W(g) are materialised (d + 1 predictions per g)
    embedding_chains=2048,    # chains for the measures on embeddings
    angle_bins=9,             # predictor.png: 20° bins of the rotation angle of g(view 0 → v)
    path_steps=8,             # predictor.png: θ = 0, 22.5, ..., 180° about the object's z axis
    spectrum_steps=19,        # predictor.png: θ = 0, 20, ..., 360° for the eigenvalues of W(g(θ))
    affine_tolerance=1e-3,    # |p(z, g) - W(g) z - b(g)| / |p(z, g)| above this: not affine in z
)
PLOT_COLOURS = {"trained": (31, 119, 180), "init": (255, 127, 14), "random": (127, 127, 127),
                "no predictor": (44, 160, 44)}


def model_at_init(build_model, args):
    """build_model(args) as the training harness calls it at step 0 (setup_run): torch, random and
    numpy seeded with args.seed, then the model built on the CPU; nothing in between draws from
    them (tests/test_predictor.py compares with a real run's step-0 weights). The scripts'
    probeable hands it to the predictor protocol as predictor_init. Only the CPU generator is
    seeded (the harness's torch.manual_seed also seeds CUDA's, which a CPU build does not read),
    and the caller's random states are left as they were."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(args.seed)
            random.seed(args.seed)
            np.random.seed(args.seed)
            return build_model(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class GaussianPredictor(nn.Module):
    """The random reference: p(z, g) = W(g) z, W(g) = Σ_k g_k G_k with G_k (d, d) iid N(0, σ²),
    seeded. Linear in g like the hypernetwork; for a unit g, W(g) has iid N(0, σ²) entries, so
    with s = d σ² the expected errors are about √(1 + s) (identity, composition), √(1 + s²)
    (inverse), √(2s² - 2s + 1) (orthogonality) and |√s - 1| (isometry)."""

    def __init__(self, d, g_dim, sigma, seed):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("G", sigma * torch.randn(g_dim, d, d, generator=generator))

    def forward(self, z, g):
        Gz = torch.einsum("koi,bi->bko", self.G, z)          # G_k z for every k: (B, k, d)
        return torch.einsum("bk,bko->bo", g, Gz)


def view_chains(n_obj, n_views, count, seed):
    """`count` seeded chains (object, a, b, c): three distinct views of one object."""
    rng = np.random.default_rng([seed, 4])
    obj = rng.integers(n_obj, size=count)
    a, b, c = np.argsort(rng.random((count, n_views)), 1)[:, :3].T
    return obj, a, b, c


def chain_transformations(lat, obj, a, b, c, color):
    """The chains' g (float32 (count, g_dim), from the float64 latents (N, V, 7)): ab, bc, ac,
    ba = ab⁻¹, and aa = the identity e."""
    def g(u, v):
        return data.relative_g(lat[obj, u], lat[obj, v], color=color, float32_angles=False)
    return {"ab": g(a, b), "bc": g(b, c), "ac": g(a, c), "ba": g(b, a), "aa": g(a, a)}


def flip_quaternion(g, mask):
    """g with its quaternion part negated where mask: the same rotation (hue differences kept)."""
    sign = torch.where(mask, -1.0, 1.0).to(g.dtype)[:, None]
    return torch.cat([g[:, :4] * sign, g[:, 4:]], 1)


def z_rotation(degrees, g_dim):
    """g(θ) (len(degrees), g_dim): the rotation by θ about the object's own z axis, scalar last,
    with zero hue differences for a 6-d g."""
    half = torch.deg2rad(torch.as_tensor(degrees, dtype=torch.float64)) / 2
    zero = torch.zeros_like(half)
    q = torch.stack([zero, zero, half.sin(), half.cos()], -1)
    return torch.cat([q, q.new_zeros(len(q), g_dim - 4)], 1).float()


def rotation_degrees(q):
    """The angle in [0, 180] of the rotation of each quaternion (..., 4): 2 acos |w| (q and -q
    alike)."""
    return torch.rad2deg(2 * torch.acos(q[..., 3].abs().clamp(max=1)))


def ratio(num, den):
    """num / den, NaN where den is 0: a relative error against nothing is undefined (W = 0)."""
    return torch.where(den > 0, num / den, torch.full_like(num, math.nan))


def defined_mean(x):
    """The mean of the finite values as a float, or None if there are none."""
    x = x[torch.isfinite(x)]
    return float(x.double().mean()) if len(x) else None


@torch.no_grad()
def materialise(predict, g, d):
    """(W(g) (G, d, d), b(g) (G, d)) of a predictor affine in z, p(z, g) = W(g) z + b(g), read off
    its outputs: b(g) = p(0, g) and column i of W(g) = p(e_i, g) - b(g). Generic: any predictor
    module or function; affine_error says whether it is affine."""
    basis = torch.cat([g.new_zeros(1, d), torch.eye(d, device=g.device)])      # 0, e_1 .. e_d
    out = predict(basis.repeat(len(g), 1), g.repeat_interleave(d + 1, 0)).float()
    out = out.view(len(g), d + 1, d)
    return (out[:, 1:] - out[:, :1]).transpose(1, 2), out[:, 0]


@torch.no_grad()
def affine_error(predict, z, g, W, b):
    """The largest |p(z, g) - (W(g) z + b(g))| / |p(z, g)| over the rows: ~1e-7 when p is affine
    in z (the hypernetworks, --predictor mlp), large for a deeper MLP predictor."""
    p = predict(z, g).float()
    gap = (p - torch.einsum("boi,bi->bo", W, z) - b).norm(dim=1)
    return float(ratio(gap, p.norm(dim=1)).nan_to_num(0.0).max())


@torch.no_grad()
def matrix_measures(predict, gs, z, d):
    """Identity, composition, inverse and orthogonality errors of the materialised W(g) over the
    chains (gs: chain_transformations on the device; z: the chains' source embeddings) -> (means
    or None, the largest affine_error, rms ||W(g_ab)||_F, rms |b(g_ab)| / rms |p(z, g_ab)|)."""
    eye = torch.eye(d, device=z.device)
    W_e = materialise(predict, gs["aa"][:1], d)[0][0]
    errors = {"composition": [], "inverse": [], "orthogonality": []}
    norms, offsets, outputs, worst = [], [], [], 0.0
    chunk = max(1, 2 ** 20 // (d * d))                  # chains per pass: ~4 M entries of W
    for s in range(0, len(z), chunk):
        g = {k: v[s:s + chunk] for k, v in gs.items()}
        (W_ab, b_ab), (W_bc, _), (W_ac, _), (W_ba, _) = (materialise(predict, g[k], d)
                                                          for k in ("ab", "bc", "ac", "ba"))
        worst = max(worst, affine_error(predict, z[s:s + chunk], g["ab"], W_ab, b_ab))
        errors["composition"].append(ratio((W_ac - W_bc @ W_ab).flatten(1).norm(dim=1),
                                           W_ac.flatten(1).norm(dim=1)))
        errors["inverse"].append((W_ba @ W_ab - eye).flatten(1).norm(dim=1) / d ** 0.5)
        errors["orthogonality"].append((W_ab.transpose(1, 2) @ W_ab - eye).flatten(1).norm(dim=1)
                                       / d ** 0.5)
        norms.append(W_ab.flatten(1).norm(dim=1))
        offsets.append(b_ab.norm(dim=1))
        outputs.append(predict(z[s:s + chunk], g["ab"]).float().norm(dim=1))
    means = {"identity": float((W_e - eye).norm() / d ** 0.5)}
    means.update({k: defined_mean(torch.cat(v)) for k, v in errors.items()})
    rms = {k: float(torch.cat(v).pow(2).mean().sqrt()) for k, v in
           (("norm", norms), ("offset", offsets), ("output", outputs))}
    return means, worst, rms["norm"], rms["offset"] / max(rms["output"], 1e-12)


@torch.no_grad()
def embedding_measures(predict, gs, z_a, z_b):
    """The same questions asked of predicted embeddings (any predictor, affine or not), per chain
    -> {name: mean or None}."""
    p_ab, p_ac = predict(z_a, gs["ab"]).float(), predict(z_a, gs["ac"]).float()
    two_steps = predict(p_ab, gs["bc"]).float()
    there_and_back = predict(p_ab, gs["ba"]).float()
    p_aa = predict(z_a, gs["aa"]).float()
    n_a = z_a.norm(dim=1)
    errors = {"identity": ratio((p_aa - z_a).norm(dim=1), n_a),
              "composition": ratio((two_steps - p_ac).norm(dim=1), p_ac.norm(dim=1)),
              "inverse": ratio((there_and_back - z_a).norm(dim=1), n_a),
              "isometry": (ratio(p_ab.norm(dim=1), n_a) - 1).abs(),
              "prediction_error": ratio((p_ab - z_b).norm(dim=1), z_b.norm(dim=1))}
    return {k: defined_mean(v) for k, v in errors.items()}


@torch.no_grad()
def query_ranks(predict, emb, g, V, device, batch_size):
    """The retrieval protocol's ranks (N * V,) with the queries' g replaced by `g`: target view v
    among the object's views by cosine to p(e(view 0), g). NaN where the prediction is 0 (W = 0
    at init): its cosines are undefined, and target_ranks would rank it first."""
    N = len(emb) // V
    sources = emb[::V]

    def predictions(rows):
        objects = torch.arange(rows.start, rows.stop) // V
        return predict(sources[objects].to(device), g[rows].to(device))
    pred = batched(predictions, N * V, batch_size)
    ranks = target_ranks(pred.view(N, V, -1), emb.view(N, V, -1))[0].flatten().double()
    return ranks.masked_fill(pred.norm(dim=1) == 0, math.nan)


def defined_mrr(ranks):
    """mrr_hits' MRR over the defined ranks, or None if there are none."""
    ranks = ranks[ranks.isfinite()]
    return mrr_hits(ranks)["mrr"] if len(ranks) else None


def sign_mrrs(predict, emb, g, V, device, batch_size):
    """MRR with g as the data has it, with -g, with g canonicalised to w >= 0, and on the queries
    whose g has w < 0: as given, and flipped to w >= 0."""
    negative = g[:, 3] < 0
    raw = query_ranks(predict, emb, g, V, device, batch_size)
    minus = query_ranks(predict, emb, flip_quaternion(g, torch.ones_like(negative)), V, device,
                        batch_size)
    canonical = query_ranks(predict, emb, flip_quaternion(g, negative), V, device, batch_size)
    mrrs = {"mrr_g": defined_mrr(raw), "mrr_minus_g": defined_mrr(minus),
            "mrr_canonical_g": defined_mrr(canonical)}
    if negative.any():
        mrrs["mrr_w_neg"] = defined_mrr(raw[negative])
        mrrs["mrr_w_neg_flipped"] = defined_mrr(canonical[negative])
    return mrrs


@torch.no_grad()
def target_cosines(predict, emb, g, V, device, batch_size):
    """cos(p(e(view 0), g(0→v)), e(view v)) for every query; predict None: cos(e(view 0), e(v))."""
    sources = emb[::V]

    def cosines(rows):
        source = sources[torch.arange(rows.start, rows.stop) // V].to(device)
        pred = source if predict is None else predict(source, g[rows].to(device)).float()
        return F.cosine_similarity(pred, emb[rows].to(device), dim=1)
    return batched(cosines, len(emb), batch_size)


@torch.no_grad()
def path_views(predict, emb, lat, objects, V, steps, g_dim, device):
    """predictor.png's rows: for each object, the view nearest (cosine) to W(g(θ)) e(view 0) and
    the view whose pose is nearest R_0 Rz(θ) (we cannot render that pose), with the angle between
    that view's pose and R_0 Rz(θ), for θ = 0 .. 180° in `steps` steps."""
    degrees = np.linspace(0, 180, steps + 1)
    g = z_rotation(degrees, g_dim)
    rows = []
    for o in objects:
        views = emb[o * V:(o + 1) * V].to(device)
        pred = predict(views[:1].expand(len(g), -1), g.to(device)).float()
        nearest = (F.normalize(pred, dim=1) @ unit_rows(views).T).argmax(1).cpu()
        q = torch.from_numpy(data.relative_quaternion(np.repeat(lat[o, :1, :3], V, 0),
                                                      lat[o, :, :3]))
        gap = rotation_degrees(data.quaternion_multiply(
            q[None] * q.new_tensor([-1.0, -1, -1, 1]), g[:, None, :4].double()))  # conj(q_v) g(θ)
        rows.append((nearest.tolist(), gap.argmin(1).tolist(), gap.min(1).values.tolist()))
    return degrees, rows


def eigen_angles(predict, degrees, g_dim, d, device):
    """The eigenvalues of W(g(θ)) for each θ -> (θ, argument in degrees, modulus / the largest
    modulus at that θ) triples."""
    W = torch.cat([materialise(predict, g[None], d)[0]
                   for g in z_rotation(degrees, g_dim).to(device)])
    eigenvalues = torch.linalg.eigvals(W.double().cpu())
    angles, moduli = torch.rad2deg(eigenvalues.angle()), eigenvalues.abs()
    moduli = moduli / moduli.max(1, keepdim=True).values.clamp_min(1e-300)
    return [(float(t), float(a), float(r)) for t, row, rs in zip(degrees, angles, moduli)
            for a, r in zip(row, rs)]


def predictor_references(probe, d, sigma, seed, device):
    """{"trained", "init" (when the probeable has predictor_init), "random"} -> predictor."""
    predictors = {"trained": probe.predict}
    if probe.predictor_init is not None:
        init = probe.predictor_init()
        predictors["init"] = init.to(device).eval() if isinstance(init, nn.Module) else init
    predictors["random"] = GaussianPredictor(d, probe.g_dim, sigma, seed).to(device)
    return predictors


def predictor_record(name, part, values, definition, n, representation, chance=None):
    """The trained predictor's value with chance_init and chance_random (None: undefined or not
    measured); `chance` defaults to chance_random."""
    chance = values.get("random") if chance is None else chance
    r = record(name, part, values["trained"], definition, n, representation, chance, "predictor")
    r.update(chance_init=values.get("init"), chance_random=values.get("random"))
    return r


def predictor_records(probe, val_reps, latents, cfg, device, figure=False):
    """The predictor protocol on val -> (records, notes, predictor.png's data or None)."""
    N, V, D = val_reps.shape
    equi_part = probe.parts.get("equi", slice(None))       # what probe.embed reads (as retrieval)
    emb = apply(probe.embed, val_reps.reshape(N * V, D)[:, equi_part], device,
                cfg["batch_size_extract"])
    d = emb.shape[1]
    lat = latents.reshape(N, V, 7)
    color = probe.g_dim == 6
    obj, a, b, c = view_chains(N, V, PREDICTOR["embedding_chains"], cfg["seed"])
    gs = {k: v.to(device) for k, v in chain_transformations(lat, obj, a, b, c, color).items()}
    z_a, z_b = emb.view(N, V, d)[obj, a].to(device), emb.view(N, V, d)[obj, b].to(device)
    m = PREDICTOR["matrix_chains"]
    matrix_gs = {k: v[:m] for k, v in gs.items()}
    trained, worst, norm, offset = matrix_measures(probe.predict, matrix_gs, z_a[:m], d)
    affine = worst <= PREDICTOR["affine_tolerance"]
    notes = []
    if not affine:
        notes.append(f"predictor: p(z, g) is not affine in z (relative gap {worst:.2g}): the W(g) "
                     f"measures are left out, the embedding measures kept")
        gain = ratio(probe.predict(z_a, gs["ab"]).float().norm(dim=1), z_a.norm(dim=1))
        norm = float(gain.nan_to_num(0).pow(2).mean().sqrt()) * d ** 0.5   # |W|_F of that gain
    elif offset > PREDICTOR["affine_tolerance"]:
        notes.append(f"predictor: p(z, g) = W(g) z + b(g) with an offset (rms |b| / rms |p| = "
                     f"{offset:.2g}): the W(g) measures are on its linear part")
    if probe.predictor_init is None:
        notes.append("predictor: no predictor_init in the probeable: chance_init left out")
    predictors = predictor_references(probe, d, norm / d, cfg["seed"], device)
    matrix = {"trained": trained}
    for name in ("init", "random") if affine else ():
        if name in predictors:
            matrix[name] = matrix_measures(predictors[name], matrix_gs, z_a[:m], d)[0]
    embedding = {name: embedding_measures(p, gs, z_a, z_b) for name, p in predictors.items()}
    source_lat = np.repeat(lat[:, :1], V, 1)                      # the retrieval protocol's queries
    g = data.relative_g(source_lat, lat, color=color, float32_angles=False).reshape(N * V, -1)
    mrrs = {name: sign_mrrs(p, emb, g, V, device, cfg["batch_size_extract"])
            for name, p in predictors.items()}
    n_negative = int((g[:, 3] < 0).sum())
    chains = "chains a → b → c of 3 views of a val object"
    measures = [(f"rep_{key}", "W", matrix, key, 1 if key == "identity" else m,
                 f"W(g) materialised from the predictor; {m} {chains}")
                for key in ("identity", "composition", "inverse", "orthogonality") if affine]
    measures += [(f"rep_{key}", "z", embedding, key, len(obj),
                  f"p(z, g) on the equivariant embeddings z; {len(obj)} {chains}")
                 for key in ("identity", "composition", "inverse", "isometry", "prediction_error")]
    measures += [(key, "embedding", mrrs, key, n_negative if "w_neg" in key else N * V,
                  "predict(embed(view 0), g) vs embed(view v), the retrieval protocol's queries")
                 for key in ("mrr_g", "mrr_minus_g", "mrr_canonical_g", "mrr_w_neg",
                             "mrr_w_neg_flipped") if key in mrrs["trained"]]
    mrr_chance = sum(1 / r for r in range(1, V + 1)) / V     # a random ranking's, as chance_levels
    records, undefined = [], []
    for name, part, results, key, n, representation in measures:
        values = {ref: results[ref].get(key) for ref in results}
        if values["trained"] is None:
            undefined.append(f"{name}/{part}")
            continue
        chance = mrr_chance if part == "embedding" else None
        records.append(predictor_record(name, part, values, DEFS[f"{name}/{part}"], n,
                                        representation, chance))
    if undefined:
        notes.append(f"predictor: the trained predictor predicts 0 (W = 0), so these relative "
                     f"measures are undefined and left out: {', '.join(undefined)}")
    for part, share, n in (("queries", (g[:, 3] < 0).double().mean(), N * V),
                           ("pairs", (gs["ab"][:, 3] < 0).double().mean(), len(obj))):
        r = record("w_negative", part, float(share), DEFS[f"w_negative/{part}"], n,
                   "relative quaternions g of val view pairs", None, "predictor")
        records.append({**r, "chance_init": None, "chance_random": None})   # no predictor in it
    if not figure:
        return records, notes, None
    return records, notes, predictor_figure_data(predictors, emb, lat, g, affine, cfg, device)


def predictor_figure_data(predictors, emb, lat, g, affine, cfg, device):
    """What save_predictor_figure draws: the path rows, the binned target cosines of each
    predictor and of no predictor, and the trained W(g(θ))'s eigenvalue angles (affine only)."""
    N, V = lat.shape[:2]
    trained, g_dim = predictors["trained"], g.shape[1]
    rng = np.random.default_rng([cfg["seed"], 3])
    objects = rng.choice(N, min(cfg["figure_objects"], N), replace=False).tolist()
    degrees, rows = path_views(trained, emb, lat, objects, V, PREDICTOR["path_steps"], g_dim,
                               device)
    edges = np.linspace(0, 180, PREDICTOR["angle_bins"] + 1)
    bins = np.clip(np.digitize(rotation_degrees(g).numpy(), edges) - 1, 0, len(edges) - 2)
    curves = {}
    for name, p in {**predictors, "no predictor": None}.items():
        cos = target_cosines(p, emb, g, V, device, cfg["batch_size_extract"]).numpy()
        curves[name] = [float(cos[bins == k].mean()) if (bins == k).any() else None
                        for k in range(len(edges) - 1)]
    spectrum = None
    if affine:
        spectrum = eigen_angles(trained, np.linspace(0, 360, PREDICTOR["spectrum_steps"]), g_dim,
                                emb.shape[1], device)
    return dict(objects=objects, V=V, degrees=degrees.tolist(), rows=rows,
                bin_centres=((edges[1:] + edges[:-1]) / 2).tolist(), curves=curves,
                spectrum=spectrum)


class PlotPanel:
    """A minimal plot drawn with PIL (no plotting library here): a frame in data coordinates,
    lines, dots, tick labels and a legend."""

    def __init__(self, draw, box, x_range, y_range, title, x_ticks, y_ticks, font):
        self.draw, self.box, self.font = draw, box, font
        self.x_range, self.y_range = x_range, y_range
        left, top, right, bottom = box
        draw.rectangle(box, outline=(0, 0, 0))
        draw.text((left, top - 14), title, fill=(0, 0, 0), font=font)
        for x in x_ticks:
            px = self.xy(x, y_range[0])[0]
            draw.line((px, bottom, px, bottom + 3), fill=(0, 0, 0))
            draw.text((px - 8, bottom + 5), f"{x:g}", fill=(0, 0, 0), font=font)
        for y in y_ticks:
            py = self.xy(x_range[0], y)[1]
            draw.line((left - 3, py, left, py), fill=(0, 0, 0))
            draw.text((left - 34, py - 6), f"{y:g}", fill=(0, 0, 0), font=font)

    def xy(self, x, y):
        left, top, right, bottom = self.box
        (x0, x1), (y0, y1) = self.x_range, self.y_range
        return (left + (x - x0) / (x1 - x0) * (right - left),
                bottom - (y - y0) / (y1 - y0) * (bottom - top))

    def line(self, xs, ys, colour):
        points = [self.xy(x, y) for x, y in zip(xs, ys) if y is not None]
        if len(points) > 1:
            self.draw.line(points, fill=colour, width=2)

    def dots(self, points, colour, radius=1):
        """points: (x, y) or (x, y, weight in [0, 1]): a weight fades the colour to white."""
        for x, y, *weight in points:
            px, py = self.xy(x, y)
            w = weight[0] if weight else 1.0
            fill = tuple(int(255 - w * (255 - c)) for c in colour)
            self.draw.ellipse((px - radius, py - radius, px + radius, py + radius), fill=fill)

    def legend(self, entries):
        """In one row under the frame's tick labels."""
        x, y = self.box[0], self.box[3] + 20
        for name, colour in entries:
            self.draw.rectangle((x, y + 2, x + 8, y + 10), fill=colour)
            self.draw.text((x + 12, y), name, fill=(0, 0, 0), font=self.font)
            x += 12 + int(self.draw.textlength(name, font=self.font)) + 16


def thumbnail(x, size):
    """A normalised image (3, H, W) -> a size x size PIL image."""
    from PIL import Image
    x = data.denormalize_channels(x[None]).clamp(0, 1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[0]
    return Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy())


def save_predictor_figure(path, val_ds, fig, cell=64):
    """predictor.png: the path of rotations (per object, the view nearest to the prediction above
    the view nearest in pose), the target cosine against the rotation angle for the trained
    predictor and its references, and the eigenvalue angles of W(g(θ)) against θ."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default()
    V, degrees, rows = fig["V"], fig["degrees"], fig["rows"]
    label_w, top = 90, 34
    grid_h = top + 2 * len(rows) * (cell + 14)
    width = max(label_w + (len(degrees) + 1) * (cell + 2), 1000)
    image = Image.new("RGB", (width, grid_h + 410), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.text((4, 2), "W(g(theta)) e(view 0), theta about the object's z axis (its own frame). "
              "Per object, top: its view nearest the prediction (cosine); bottom: its rendered "
              "view nearest in pose to R_0 Rz(theta)", fill=(0, 0, 0), font=font)
    draw.text((4, 16), "(no new renders: the gap to that pose is written under it). First "
              "column: the source, view 0.", fill=(0, 0, 0), font=font)
    for j, theta in enumerate(degrees):
        draw.text((label_w + (j + 1) * (cell + 2) + 4, top - 2), f"{theta:g}°", fill=(0, 0, 0),
                  font=font)
    y = top + 12
    for o, (nearest, posed, gaps) in zip(fig["objects"], rows):
        for k, (label, views) in enumerate((("prediction", nearest), ("pose", posed))):
            draw.text((4, y + cell // 2 - 12), f"object {o}\n{label}", fill=(0, 0, 0), font=font)
            if k == 0:
                image.paste(thumbnail(val_ds[o * V][0], cell), (label_w, y))
            for j, v in enumerate(views):
                x = label_w + (j + 1) * (cell + 2)
                image.paste(thumbnail(val_ds[o * V + v][0], cell), (x, y))
                if k == 1:
                    draw.text((x + 2, y + cell), f"{gaps[j]:.0f}° off", fill=(0, 0, 0), font=font)
            y += cell + 14
    box = (60, grid_h + 40, 470, grid_h + 360)
    curves = fig["curves"]
    values = [v for ys in curves.values() for v in ys if v is not None]
    low, high = min(values + [0.0]), max(values + [1.0])
    plot = PlotPanel(draw, box, (0, 180), (low, high), "cos(prediction, target view) vs the "
                     "rotation angle of g (degrees), val queries", range(0, 181, 30),
                     sorted({round(low, 1), 0, round(high, 1)}), font)
    for name in [n for n in curves if n != "trained"] + ["trained"]:     # trained on top
        plot.line(fig["bin_centres"], curves[name], PLOT_COLOURS[name])
    plot.legend([(name, PLOT_COLOURS[name]) for name in curves])
    if fig["spectrum"] is not None:
        box = (580, grid_h + 40, 990, grid_h + 360)
        plot = PlotPanel(draw, box, (0, 360), (-180, 180), "arguments of the eigenvalues of "
                         "W(g(theta)) vs theta, degrees", range(0, 361, 60), range(-180, 181, 90),
                         font)
        draw.text((box[0], box[3] + 20), "darker: a larger |eigenvalue|; grey: ±theta/2 (spin "
                  "1/2, as quaternion multiplication), ±theta (spin 1)", fill=(0, 0, 0), font=font)
        guide = np.linspace(0, 360, 181)
        for slope in (0.5, -0.5, 1, -1):
            wrapped = (slope * guide + 180) % 360 - 180
            plot.dots(zip(guide, wrapped), (200, 200, 200))
        plot.dots(fig["spectrum"], PLOT_COLOURS["trained"], radius=2)
    image.save(path)


# ======================================================================= ImageFolder protocols
def resample(x, size, mode="bicubic"):
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)


def rot90(x, k):
    """Rotate images or token maps (B, C, H, W) by k x 90 degrees."""
    return torch.rot90(x, k, (2, 3))


def rot90_map(m, target, k):
    return rot90(m, k)


def hflip(x):
    return x.flip(3)


def hflip_map(m, target):
    return hflip(m)


def rescale(x, grid, up):
    """Resize images so that their token grid goes from grid x grid to up x up."""
    return resample(x, (x.shape[2] * up // grid, x.shape[3] * up // grid))


def resample_to(m, target):
    """A token map resampled to the grid of target."""
    return resample(m, target.shape[-2:])


# The g whose no-ρ reference is ρ itself: f(g·x) lives on another token grid, so any comparison
# resamples f(x) to it, and a map that ignores the rescale (f(g·x) = resample(f(x))) scores 1
# like an equivariant one. Its Δ would be 0 by construction: it stays out of the score's mean
# and reference.
NO_REFERENCE = ("rescale",)


def group_actions(grid):
    """The equivariance score's g: [(name, its action on images, ρ_g(map, f(g·x)) on token
    maps)]. rot90^k and the flip permute tokens; the rescale resizes the image to a 1.25x token
    grid (exact patch multiples) and ρ resamples the map bicubically to the grid f(g·x) has."""
    up = max(grid + 1, round(1.25 * grid))
    actions = [(f"rot{90 * k}", functools.partial(rot90, k=k), functools.partial(rot90_map, k=k))
               for k in (1, 2, 3)]
    actions.append(("flip", hflip, hflip_map))
    actions.append(("rescale", functools.partial(rescale, grid=grid, up=up), resample_to))
    return actions


def mean_token_cosine(a, b):
    """(B, C, h, w) x (B, C, h, w) -> (B,): the mean over tokens of the channel vectors' cosine."""
    return F.cosine_similarity(a.float(), b.float(), dim=1).flatten(1).mean(1)


def equivariance_fn(token_maps, pre, grid):
    """images -> (B, blocks, |G|, 2): per image, block and g, the mean over tokens of
    cos(ρ_g(f_l(x)), f_l(g·x)), and as a reference the same with ρ_g ignored (for the rescale
    only resampled to the other grid, which is ρ itself: see NO_REFERENCE)."""
    def fn(x):
        maps = token_maps(pre(x))
        per_g = []
        for _, act, rho in group_actions(grid):
            per_block = []
            for m, target in zip(maps, token_maps(pre(act(x)))):
                equivariant = mean_token_cosine(rho(m, target), target)
                reference = mean_token_cosine(resample_to(m, target), target)
                per_block.append(torch.stack([equivariant, reference], 1))
            per_g.append(torch.stack(per_block, 1))
        return torch.stack(per_g, 2)
    return fn


def vflip(x):
    return x.flip(2)


def zoom_centre(x, size, border):
    """1.5x zoom: the centre (size - 2 border)² crop resized back to size."""
    return resample(x[..., border:size - border, border:size - border], (size, size))


def add_noise(x, noise):
    return (x + noise.to(x)).clamp(0, 1)


def gaussian_blur(x, sigma):
    from torchvision.transforms.functional import gaussian_blur as blur
    return blur(x, [2 * math.ceil(2 * sigma) + 1] * 2, [sigma] * 2)


def jpeg_quality_10(x):
    from torchvision.io import decode_jpeg, encode_jpeg
    encoded = encode_jpeg(list((x * 255).round().byte().cpu()), quality=10)
    return torch.stack(decode_jpeg(encoded)).to(x)


def corruptions(size, seed):
    """Test-time shifts of [0, 1] images (an ImageNet-C/P-like proxy, one severity each):
    geometric (rot90, rot180, vertical flip, 1.5x zoom on the centre) and corruptions (Gaussian
    noise σ 0.1, a fixed seeded field, so that the result does not depend on how images are
    batched or sharded; Gaussian blur σ = size/64 px; JPEG quality 10)."""
    noise = 0.1 * torch.randn(3, size, size, generator=torch.Generator().manual_seed(seed))
    sigma = max(size / 64, 0.5)
    border = round(size / 6)
    return {"rot90": functools.partial(rot90, k=1), "rot180": functools.partial(rot90, k=2),
            "vflip": vflip, "zoom": functools.partial(zoom_centre, size=size, border=border),
            "noise": functools.partial(add_noise, noise=noise),
            "blur": functools.partial(gaussian_blur, sigma=sigma), "jpeg": jpeg_quality_10}


def knn_top1(train, train_labels, val, val_labels, ks, T, n_classes, device, chunk=1024):
    """DINO's weighted k-NN (Caron et al. 2021, eval_knn.py): cosine similarity to every training
    feature, the k nearest vote with weight exp(sim / T). -> {k: top-1}."""
    correct = dict.fromkeys(ks, 0)
    with torch.autocast(device.type, enabled=False):          # fp32 even under a caller's autocast
        tr = F.normalize(train.to(device), dim=1)
        labels = train_labels.to(device)
        for s in range(0, len(val), chunk):
            sims = F.normalize(val[s:s + chunk].to(device), dim=1) @ tr.T
            sims, idx = sims.topk(min(max(ks), len(tr)), 1)
            for k in ks:
                votes = torch.zeros(len(idx), n_classes, device=device)
                votes.scatter_add_(1, labels[idx[:, :k]], (sims[:, :k] / T).exp())
                correct[k] += int((votes.argmax(1).cpu() == val_labels[s:s + chunk]).sum())
    return {k: correct[k] / len(val) for k in ks}


def linear_heads(keys, n_classes):
    return nn.ModuleDict({k: nn.Linear(sl.stop - sl.start, n_classes) for k, sl in keys.items()})


def fit_linear_probes(parts, features, labels, n_classes, cfg, device):
    """One Linear(k, C) per representation part, keyed "linear/<part>" (a part may be named like a
    method), fit on the cached train features for cfg["linear_epochs"]."""
    keys = {f"linear/{p}": sl for p, sl in parts.items()}
    heads = seeded(cfg["seed"], linear_heads, keys, n_classes).to(device)

    def epoch_data(epoch):
        order = np.random.default_rng([cfg["seed"], epoch]).permutation(len(labels))
        order = torch.from_numpy(order)
        return {k: (features[order][:, sl], labels[order]) for k, sl in keys.items()}
    fit_heads(heads, epoch_data, dict(cfg, epochs=cfg["linear_epochs"]), device)
    return heads


def linear_top1(head, features, labels, device):
    return float((apply(head, features, device).argmax(1) == labels).double().mean())


def equivariance_records(probe, val_ds, pre, cfg, device):
    """The equivariance score per block on cfg["equi_images"] held-out val images -> (records,
    note)."""
    held_out = Subset(val_ds, range(min(cfg["equi_images"], len(val_ds))))
    first_image = held_out[0][0][None].to(device)
    grid = probe.token_maps(pre(first_image))[0].shape[-1]
    fn = equivariance_fn(probe.token_maps, pre, grid)
    cos = extract(fn, held_out, cfg["batch_size_extract"], device, cfg["workers"], "equivariance")
    names = [name for name, _, _ in group_actions(grid)]
    scored = [i for i, name in enumerate(names) if name not in NO_REFERENCE]
    records = []
    for block, c in enumerate(cos.mean(0), 1):                       # c: (|G|, 2) per block
        r = record("equivariance", f"block{block}", float(c[scored, 0].mean()),
                   DEFS["equivariance"], len(held_out), f"patch-token map after block {block}",
                   float(c[scored, 1].mean()), "equivariance")
        r["per_g"] = dict(zip(names, c[:, 0].tolist()))
        r["per_g_chance"] = {names[i]: float(c[i, 1]) for i in scored}
        records.append(r)
    note = (f"equivariance: value and chance over {[names[i] for i in scored]}; "
            f"{list(NO_REFERENCE)} only in per_g (its no-ρ reference is ρ itself: "
            "Δ = 0 for any map)")
    return records, note


def evaluate_imagefolder(probe, root, protos, cfg, device):
    """SER's protocols on an ImageFolder root: linear probe and weighted k-NN on every
    representation part, linear-probe accuracy on shifted val images, the per-block equivariance
    score -> (records, notes)."""
    import torchvision.transforms as T
    size = cfg["size"]
    records, notes = [], []
    # Deviation: features of the test transform (resize 256/224 + centre crop) for train and val,
    # cached; SER's probe trains on random-resized crops and flips with SGD and a cosine schedule
    # (official SER code, lincls_parallel.py).
    resize = [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)] if size else []
    transform = T.Compose(resize + [T.ToTensor()])
    train_ds = data.ImageFolder(root, "train", transform)
    val_ds = data.ImageFolder(root, "val", transform)
    pre = normalizer(probe.input_stats or (data.IMAGENET_MEAN, data.IMAGENET_STD))
    y_train = torch.tensor(train_ds.targets)
    y_val = torch.tensor(val_ds.targets)
    n_classes = len(train_ds.classes)
    majority = float((y_val == y_train.bincount().argmax()).double().mean())
    f_train = f_val = heads = None        # features and linear heads, where protocols need them
    if {"linear", "knn", "robustness"} & set(protos):
        f_train = features_of(probe.backbone, train_ds, "train features", pre, cfg, device)
        f_val = features_of(probe.backbone, val_ds, "val features", pre, cfg, device)
    if {"linear", "robustness"} & set(protos):
        heads = fit_linear_probes(probe.parts, f_train, y_train, n_classes, cfg, device)
    if "linear" in protos:
        for part, sl in probe.parts.items():
            top1 = linear_top1(heads[f"linear/{part}"], f_val[:, sl], y_val, device)
            records.append(record("linear_top1", part, top1, DEFS["linear"], len(y_val),
                                  slice_name(sl), majority, "linear"))
    if "knn" in protos:
        for part, sl in probe.parts.items():
            accuracies = knn_top1(f_train[:, sl], y_train, f_val[:, sl], y_val, cfg["knn_k"], 0.07,
                                  n_classes, device)
            for k, top1 in accuracies.items():
                records.append(record(f"knn{k}_top1", part, top1, DEFS["knn"].format(k=k),
                                      len(y_val), slice_name(sl), majority, "knn"))
    if "robustness" in protos:
        part = next(iter(probe.parts))
        sl = probe.parts[part]
        image_size = size or val_ds[0][0].shape[-1]
        for name, shift in corruptions(image_size, cfg["seed"]).items():
            f_shifted = features_of(probe.backbone, val_ds, f"val {name}", shifted(shift, pre), cfg,
                                    device)
            top1 = linear_top1(heads[f"linear/{part}"], f_shifted[:, sl], y_val, device)
            records.append(record(f"robust_top1_{name}", part, top1, DEFS["robust"], len(y_val),
                                  slice_name(sl) + f" of {name} val images", majority,
                                  "robustness"))
    if "equivariance" in protos and probe.token_maps is None:
        notes.append("equivariance skipped: this probeable has no token_maps")
    elif "equivariance" in protos:
        equivariance, note = equivariance_records(probe, val_ds, pre, cfg, device)
        records += equivariance
        notes.append(note)
    return records, notes


# ====================================================================================== evaluate
def resolve(preset, opts):
    """The preset's values, then the caller's options; an unknown option is an error naming it."""
    if preset not in PRESETS:
        raise ValueError(f"unknown eval preset {preset!r}; choose from {sorted(PRESETS)}")
    cfg = dict(PRESETS[preset], size=None, batch_size_extract=256)
    unknown = sorted(set(opts) - set(cfg))
    if unknown:
        raise ValueError(f"unknown eval option(s) {unknown}; known: {sorted(cfg)}")
    cfg.update({k: v for k, v in opts.items() if v is not None})
    if cfg["bn"] not in BN_MODES:
        raise ValueError(f"unknown bn mode {cfg['bn']!r}; choose from {sorted(BN_MODES)}")
    return cfg


def dataset_kind(root, expected=None):
    """'3diebench' or 'imagefolder' (PROTOCOLS' keys), as data.layout decides it once for training
    and evaluation: with `expected` (a script's DATA_KIND), a root of the other layout, or one
    holding both, is a DataError naming the file."""
    return data.layout(root, expected).lower()


def expand_protocols(protocols, kind):
    names = [p.strip() for p in ([protocols] if isinstance(protocols, str) else protocols)
             if p.strip()]
    known = PROTOCOLS[kind]
    for p in names:
        if p != "all" and p not in known:
            other = [k for k, v in PROTOCOLS.items() if p in v]
            if other:
                what = f"protocol {p!r} needs a {other[0]} data root, this one is {kind}"
            else:
                what = f"unknown protocol {p!r}"
            raise ValueError(f"{what}; choose from {['all', *known]}")
    if "all" in names or not names:
        return tuple(known)
    return tuple(dict.fromkeys(names))


def check_protocols(protocols, data_root, flag="--eval-protocols", kind=None):
    """The protocols that evaluate(probe, data_root, protocols) will run, checked now: for the
    training scripts to call at start-up, so that a typo is an error before training, not after
    it. protocols: a comma-separated string (the scripts' flag) or a sequence of names. The data
    root need not exist yet (the default data sets are generated on first use; see dataset_kind).
    -> a tuple of names; a ValueError with a one-line message naming `flag` and the choices."""
    names = protocols.split(",") if isinstance(protocols, str) else list(protocols)
    try:
        return expand_protocols(names, dataset_kind(data_root, kind))
    except ValueError as e:
        raise ValueError(f"{flag}: {e} (comma-separated)") from None


def print_table(result):
    lines = [f"\nevaluation: step {result['step']}, {result['data_root']}, "
             f"preset {result['preset']}",
             f"{'metric':<22}{'part':<11}{'value':>9}{'chance':>9}{'n':>9}  split"]
    for r in result["metrics"]:
        chance = "" if r["chance"] is None else f"{r['chance']:.4f}"
        lines.append(f"{r['name']:<22}{r['part']:<11}{r['value']:>9.4f}{chance:>9}{r['n']:>9}  "
                     f"{r['split']}")
    lines += [f"note: {n}" for n in result["notes"]]
    print("\n".join(lines), flush=True)


def model_device(probe):
    """The device of the backbone's first parameter (CPU for a backbone without any)."""
    return next(probe.backbone.parameters(), torch.empty(0)).device


def evaluate(probe, data_root, protocols=("all",), out_dir=None, device=None, preset="toy",
             kind=None, **opts):
    """Run the protocols on the frozen model, print a table, write out_dir/eval.json (rank 0) and
    return the result dict: {"metrics": [one record per metric, with its definition, split, n,
    representation, chance level and the checkpoint step], "summary": {"name/part": value},
    "settings", "notes", ...}. opts override the preset (PRESETS' keys, plus size: the image side,
    None = native; batch_size_extract). kind ("3DIEBench" or "ImageFolder", the training script's
    DATA_KIND) picks the protocols (PROTOCOLS); None: guessed from the root's layout.
    Under torchrun every rank must call it."""
    cfg = resolve(preset, opts)
    kind = dataset_kind(data_root, kind or probe.kind)
    protos = expand_protocols(protocols, kind)
    if set(protos) <= set(PREDICTOR_PROTOCOLS) and (probe.embed is None or probe.predict is None):
        raise ValueError(f"protocol {protos[0]!r} measures the model's predictor, and these "
                         f"features have none (a model without one, or --features embeddings): "
                         f"nothing to evaluate")
    if device is None:
        device = model_device(probe)
    device = torch.device(device)
    modules = [m for m in (probe.backbone, probe.embed, probe.predict) if isinstance(m, nn.Module)]
    modes = [m.training for m in modules]
    for m in modules:
        m.to(device).eval()
    if out_dir and main_process():
        os.makedirs(out_dir, exist_ok=True)
    # Probe losses, R², similarities and k-NN votes in fp32 even when the caller runs under
    # autocast (.float() on an input does not stop autocast from casting the next matmul);
    # backbone_fn turns bf16 back on for the backbone's forward alone.
    try:
        with torch.autocast(device.type, enabled=False):
            if kind == "3diebench":
                records, notes = evaluate_3diebench(probe, data_root, protos, cfg, device, out_dir)
            else:
                records, notes = evaluate_imagefolder(probe, data_root, protos, cfg, device)
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    for r in records:
        r["step"] = probe.step
    if kind == "3diebench":
        notes.append(f"BN: {cfg['bn']} mode = {BN_MODES[cfg['bn']]}")
    summary = {f"{r['name']}/{r['part']}": r["value"] for r in records}
    result = dict(step=probe.step, data_root=str(data_root), preset=preset, protocols=list(protos),
                  settings=cfg, notes=notes, metrics=records, summary=summary)
    if main_process():
        print_table(result)
    if out_dir and main_process():
        tmp = os.path.join(out_dir, "eval.json.tmp")
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, os.path.join(out_dir, "eval.json"))
    return result


# ================================================ the online monitor of sie.py and baselines.py
# A probe trained DURING pretraining, as the official SIE code does (src/models.py,
# OnlineEvaluator): the training scripts add it to their model; eval.py's protocols above are the
# offline measurements after training.
class OnlineEvaluator(nn.Module):
    """A training monitor on DETACHED representations, per part: a linear classifier on single
    views and a rotation MLP on [y1; y2] -> quaternion. Its losses join the total (the same Adam)
    but cannot reach the backbone.
    Deviation: the official heads on the 2048-d projector embeddings (about 40 M parameters) are
    left out; the representation heads are what eval.py measures."""

    def __init__(self, parts, n_classes=data.NUM_CLASSES):
        super().__init__()
        self.parts = parts                                   # name -> slice of the representation
        part_dims = {name: s.stop - s.start for name, s in parts.items()}
        self.classify = nn.ModuleDict({name: nn.Linear(k, n_classes)
                                       for name, k in part_dims.items()})
        self.rotation = nn.ModuleDict({name: rotation_mlp(2 * k) for name, k in part_dims.items()})

    def forward(self, y1, y2, q, labels):
        """-> (summed CE + MSE losses, device-side sums for top-1 and the pooled R²)."""
        y1, y2, q = y1.detach().float(), y2.detach().float(), q.float()
        both_labels = torch.cat([labels, labels])
        loss = 0.0
        sums = {"pairs": q.new_full((), q.shape[0]), "q_sum": q.sum(), "q_sq": q.pow(2).sum()}
        for name, s in self.parts.items():
            logits = self.classify[name](torch.cat([y1[:, s], y2[:, s]]))
            pred = self.rotation[name](torch.cat([y1[:, s], y2[:, s]], dim=1))
            loss = loss + F.cross_entropy(logits, both_labels) + F.mse_loss(pred, q)
            sums[f"{name}_correct"] = (logits.argmax(1) == both_labels).sum().float()
            sums[f"{name}_sse"] = (pred - q).pow(2).sum()
        return loss, sums


def rotation_mlp(width):
    """Linear(w, w)-ReLU-Linear(w, w)-ReLU-Linear(w, 4): [y1; y2] -> the quaternion g."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 4))


def monitor_metrics(sums):
    """The monitor's epoch figures from its summed counts: top-1 per part and the pooled R² (one
    scalar mean over all four quaternion components, as the official code and eval.py)."""
    parts = [key[:-len("_correct")] for key in sums if key.endswith("_correct")]
    n_pairs = sums["pairs"]
    total_sq = sums["q_sq"] - sums["q_sum"] ** 2 / (4 * n_pairs)
    top1 = {f"top1_{p}": sums[f"{p}_correct"] / (2 * n_pairs) for p in parts}
    rot_r2 = {f"rot_r2_{p}": 1 - sums[f"{p}_sse"] / total_sq for p in parts}
    return {**top1, **rot_r2}


# ============================================================== checkpoints and the run directory
# eval.py owns the checkpoint format (the contract in the module docstring): the training scripts
# write, read and resume through these functions, and `python eval.py RUN` reads the same files.
# The only modules a checkpoint's "script" field may name: eval.py imports it to rebuild the
# model, so any other name (a checkpoint from elsewhere, "os", ...) is refused before importing.
SCRIPTS = ("sie", "baselines", "ser")
RESUME_KEYS = ("optimizer", "scaler", "epoch", "step", "rng")   # what resuming needs too
# The files a run writes through a temporary twin; start-up removes a twin left by a kill while
# saving, and nothing else in the run directory.
TEMPORARY_FILES = ("checkpoint.pt.tmp", "checkpoint.prev.pt.tmp", "backbone.pt.tmp",
                   "eval.json.tmp")


class RunError(Exception):
    """A bad run directory or checkpoint, or one that cannot be written: the training scripts and
    eval.py print the message alone, without a traceback, and exit with code 2."""


def fail(msg):
    print(f"eval.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def rng_state():
    """Every RNG state as plain Python values and tensors, so the checkpoint loads weights-only."""
    np_state = np.random.get_state()
    numpy_state = [np_state[0], np_state[1].tolist(), *np_state[2:]]
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(),
            "cuda": cuda}


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path):
    """Write path.tmp, then rename it over path: a kill mid-write leaves the old file intact. A
    failed write (a full disk) removes its .tmp and is a RunError naming the file."""
    tmp = path + ".tmp"
    try:
        torch.save(obj, tmp)
    except (OSError, RuntimeError) as e:      # torch's zip writer reports ENOSPC as RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        raise RunError(f"cannot write {path}: {str(e).splitlines()[0]}; the previous "
                       f"{os.path.basename(path)} is intact (free some space and rerun the same "
                       f"command to resume from it)") from None
    os.replace(tmp, path)


def previous_checkpoint(path):
    return path[:-len(".pt")] + ".prev.pt" if path.endswith(".pt") else path + ".prev"


def save_checkpoint(path, script, args, model, optimizer, scaler, epoch, step):
    """The whole training state, for an exact resume. The checkpoint it replaces stays as
    checkpoint.prev.pt (a hard link, or a copy where links are not supported), so a damaged new
    one never costs the last good state."""
    if os.path.exists(path):
        prev = previous_checkpoint(path)
        try:
            os.link(path, prev + ".tmp")
        except OSError:
            shutil.copyfile(path, prev + ".tmp")
        os.replace(prev + ".tmp", prev)
    atomic_save({"script": script, "args": vars(args), "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "epoch": epoch, "step": step, "rng": rng_state()}, path)


def load_error(e):
    """One line out of torch.load's exception: the weights-only unpickler's reason, else line 1."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        boilerplate = ("Please file an issue", "Check the documentation")
        reasons = [line for line in lines[1:] if not line.startswith(boilerplate)]
        reason = reasons[0] if reasons else "unsupported content"
        return f"a weights-only load refused it, nothing in it was run: {reason[:200]}"
    return f"{type(e).__name__}: {lines[0][:200] if lines else 'empty or cut short'}"


def read_checkpoint(path, script=None, args=None, free_flags=()):
    """The checkpoint dict, loaded tensors-only (torch.load(weights_only=True): a pickle that would
    build objects or call functions is refused, not run). To resume, pass the `script` that
    resumes and its `args`: the file must hold the whole training state, written by that script
    with the same flags except `free_flags` (those that may change between invocations).
    Any fault is a RunError naming the file."""
    try:
        with warnings.catch_warnings():     # torch warns about pickle protocols: one message only
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated / foreign files
        prev = previous_checkpoint(path)
        fallback = ""
        if script and os.path.isfile(prev):
            fallback = (f"; the previous checkpoint {prev} is kept: resume from it with "
                        f"--resume {prev}")
        raise RunError(f"cannot read checkpoint {path} (damaged, or not a checkpoint of sie.py / "
                       f"baselines.py / ser.py): {load_error(e)}{fallback}") from None
    keys = ("script", "args", "model") + (RESUME_KEYS if script else ())
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise RunError(f"{path} is not a checkpoint written by sie.py / baselines.py / ser.py "
                       f"(missing {missing})")
    if not isinstance(ckpt["script"], str) or ckpt["script"] not in SCRIPTS:
        raise RunError(f"{path} names script {ckpt['script']!r}; only checkpoints of "
                       f"{list(SCRIPTS)} are read")
    args_ok = isinstance(ckpt["args"], dict) and all(isinstance(k, str) for k in ckpt["args"])
    if not (args_ok and isinstance(ckpt["model"], dict)):
        raise RunError(f"{path} is damaged: its 'args' must be a dict of names, 'model' a state "
                       f"dict")
    if not isinstance(ckpt.get("step", 0), int):
        raise RunError(f"{path} is damaged: its 'step' is {ckpt['step']!r}, not an int")
    if script and ckpt["script"] != script:
        raise RunError(f"{path} is a {ckpt['script']}.py checkpoint, not {script}.py's; pass "
                       f"another --run-dir")
    for key, old in ckpt["args"].items() if script else ():
        new = getattr(args, key, None)
        if key not in free_flags and old != new:
            raise RunError(f"{path} was trained with --{key.replace('_', '-')} {old}, this "
                           f"command has {new}; pass the same flags to resume, or another "
                           f"--run-dir to start afresh")
    return ckpt



def restore(ckpt, model, optimizer, scaler):
    """Everything save_checkpoint wrote, back in place -> (epochs done, step)."""
    model.load_state_dict(ckpt["model"], strict=True)
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return ckpt["epoch"], ckpt["step"]


RUN_DIR_LOCKS = []          # the locked files of this process's run directories


def lock_run_dir(run_dir):
    """Create the run directory, check that it is writable and lock it: a second run on it is
    refused, naming the process that holds it (the kernel drops the lock when that process dies,
    kill -9 included). A temporary twin (TEMPORARY_FILES) left by a kill while saving is
    removed; nothing else is."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        lock = open(os.path.join(run_dir, "lock"), "a+")
    except OSError as e:
        raise RunError(f"cannot write the run dir {run_dir} ({e.strerror}); "
                       f"pass a writable --run-dir") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        raise RunError(f"{run_dir} is in use by {holder}; wait for it to end, or pass "
                       f"another --run-dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"process {os.getpid()} on {platform.node()}\n")
    lock.flush()
    RUN_DIR_LOCKS.append(lock)
    for name in TEMPORARY_FILES:
        if os.path.isfile(os.path.join(run_dir, name)):
            os.remove(os.path.join(run_dir, name))


def unlock_run_dirs():
    while RUN_DIR_LOCKS:
        RUN_DIR_LOCKS.pop().close()          # closing the file releases its flock


def resume_path(args):
    """--resume, else the run dir's checkpoint.pt when there is one, else None (a fresh run)."""
    ckpt = os.path.join(args.run_dir, "checkpoint.pt")
    return args.resume or (ckpt if os.path.exists(ckpt) else None)


def versions(device, script_file):
    """What produced a run, for the first line of its log.jsonl: versions, git state, device."""
    try:
        git = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                             text=True, cwd=os.path.dirname(os.path.abspath(script_file))).stdout
    except OSError:                          # no git on this machine
        git = ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "cuda": torch.version.cuda, "git": git.strip(),
            "device": name}


def load_probeable(path, device, features="representation"):
    """A run directory or its checkpoint.pt -> (Probeable, the saved args): import the script that
    wrote it (one of SCRIPTS), rebuild its model from the saved args with build_model, load the
    weights strictly, ask for its probeable (the checkpoint contract of the module docstring);
    features="embeddings": the probes of its embeddings (Probeable.embeddings) instead."""
    ckpt_path = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    if not os.path.isfile(ckpt_path):
        fail(f"no checkpoint at {ckpt_path} (give a run directory holding checkpoint.pt, "
             "or the file)")
    try:
        ckpt = read_checkpoint(ckpt_path)
    except RunError as e:
        fail(str(e))
    script = ckpt["script"]
    try:
        module = importlib.import_module(script)
    except ImportError as e:
        fail(f"{ckpt_path} was written by {script}.py, which cannot be imported here ({e})")
    args = Namespace(**ckpt["args"])
    try:
        model = module.build_model(args)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        fail(f"{ckpt_path}: {script}.build_model cannot rebuild the model from the saved "
             f"args ({type(e).__name__}: {str(e)[:200]})")
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except (RuntimeError, AttributeError, TypeError, ValueError) as e:
        fail(f"{ckpt_path} does not match {script}.build_model: {' '.join(str(e).split())[:400]}")
    probe = module.probeable(model.to(device).eval(), args)
    probe.kind = module.DATA_KIND              # the data layout it trained on, for the protocols
    if features == "embeddings":
        if probe.embeddings is None:
            fail(f"{script}.py has no embedding probes (--features embeddings: sie.py only)")
        probe = Probeable(backbone=EmbeddingsOf(probe.backbone, probe.embeddings),
                          parts=probe.embedding_parts, g_dim=probe.g_dim, kind=probe.kind)
    probe.step = ckpt.get("step", 0)
    return probe, args


class EmbeddingsOf(nn.Module):
    """images -> embeddings(backbone(images)), as one module: what --features embeddings probes
    (the model was put in eval mode whole, its projectors included)."""

    def __init__(self, backbone, embeddings):
        super().__init__()
        self.backbone = backbone
        self.embeddings = embeddings

    def forward(self, x):
        return self.embeddings(self.backbone(x))


# ==================================================================================== runs table
# The columns of `eval.py --table`, in order; then 'Δeq l' per block l: the equivariance score
# minus its no-ρ reference.
TABLE = ("top1/full", "top1/inv", "top1/equi", "rot_r2_pooled/full", "rot_r2_pooled/inv",
         "rot_r2_pooled/equi", "color_r2_pooled/full", "mrr/embedding", "H@1/embedding",
         "H@5/embedding", "pre/embedding", "linear_top1/full", "knn20_top1/full",
         "top1/z_inv", "top1/z_equi", "rot_r2_pooled/z", "rot_r2_pooled/z_inv",
         "rot_r2_pooled/z_equi")   # the last five: eval.py --features embeddings


def read_eval_json(run_dir):
    """run_dir/eval.json as evaluate wrote it; a missing or damaged one -> fail() naming it."""
    path = os.path.join(run_dir, "eval.json")
    if not os.path.isfile(path):
        fail(f"no eval.json in {run_dir} (evaluate it first: python eval.py {run_dir})")
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"cannot read {path}: {type(e).__name__}: {e}")
    keys = {"step", "data_root", "summary", "metrics"}
    if not isinstance(result, dict) or not keys <= set(result):
        fail(f"{path} is not an eval.json written by eval.py (re-run: python eval.py {run_dir})")
    return result


def table_values(result):
    """One run's eval.json -> {column: value}: the TABLE metrics it has, then its Δeq per block."""
    values = {k: v for k, v in result["summary"].items() if k in TABLE}
    for m in result["metrics"]:
        if m["name"] == "equivariance":
            values[f"Δeq {m['part'][5:]}"] = m["value"] - m["chance"]
    return values


def group_runs(results):
    """[(run dir, eval.json)] -> {group: [(run name, step, table_values)]}. Runs whose names
    differ only by a trailing -s<seed> form one group."""
    groups = {}
    for run_dir, result in results:
        name = os.path.basename(os.path.normpath(run_dir))
        group = re.sub(r"-s\d+$", "", name)
        groups.setdefault(group, []).append((name, result["step"], table_values(result)))
    return groups


def table_column_position(column):
    """TABLE's columns in TABLE's order, any other after them (the sort is stable)."""
    return TABLE.index(column) if column in TABLE else len(TABLE)


def format_cell(values):
    """'' for no value, 'x.xxx' for one, 'mean ± std' (the sample std) for several."""
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def table_row(name, step, runs_values, columns):
    cells = [format_cell([v[c] for v in runs_values if c in v]) for c in columns]
    return f"| {name} | {step} | " + " | ".join(cells) + " |"


def print_runs_table(run_dirs):
    """Per data root, a markdown row per run dir (its eval.json), and a 'mean ± std (n)' row per
    group of runs whose names differ only by a trailing -s<seed>."""
    by_root = {}                                # runs on different data sets: separate tables
    for run_dir in run_dirs:
        result = read_eval_json(run_dir)
        by_root.setdefault(result["data_root"], []).append((run_dir, result))
    print("\n\n".join(runs_table(root, results) for root, results in by_root.items()))


def runs_table(data_root, results):
    groups = group_runs(results)
    seen = {}                                   # every column of any run, in order of appearance
    for runs in groups.values():
        for _, _, values in runs:
            seen.update(dict.fromkeys(values))
    columns = sorted(seen, key=table_column_position)
    lines = [f"data: {data_root}",
             "| run | step | " + " | ".join(columns) + " |",
             "|---" * (len(columns) + 2) + "|"]
    for group, runs in groups.items():
        for name, step, values in runs:
            lines.append(table_row(name, step, [values], columns))
        if len(runs) > 1:
            all_values = [values for _, _, values in runs]
            lines.append(table_row(f"{group}[-s*] mean ± std ({len(runs)})", "", all_values,
                                   columns))
    return "\n".join(lines)


# ================================================================================== command line
class ArgumentParser(argparse.ArgumentParser):
    """argparse for eval.py and the training scripts: a bad flag is one line, 'prog: error: ...',
    printed once under torchrun (by rank 0), and every rank exits with code 2."""

    def error(self, message):
        if os.environ.get("RANK", "0") == "0":
            print(f"{self.prog}: error: {message} (python {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def number(cast, low, high=1e30, low_open=False):
    """An argparse type: cast(text) (int or float) in [low, high], or in (low, high] with
    low_open; argparse names the flag in its message otherwise. The default high keeps a float
    finite in fp32 (1e39 would be inf in a model), and nan fails every comparison."""
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            kind = "an integer" if cast is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if not (value > low if low_open else value >= low):
            raise argparse.ArgumentTypeError(f"{text} is not {'>' if low_open else '>='} {low}")
        if not value <= high:
            bound = f"{high:g}" if isinstance(high, float) else high
            raise argparse.ArgumentTypeError(f"{text} is not <= {bound}")
        return value
    return parse


def widths(text):
    """An argparse type for a projector's widths, e.g. --mlp 2048-2048-2048: positive integers
    joined by '-', kept as the string."""
    if not all(w.isdigit() and int(w) > 0 for w in text.split("-")):
        raise argparse.ArgumentTypeError(f"must be positive widths joined by '-', e.g. "
                                         f"2048-2048-2048, got {text!r}")
    return text


# add_run_flags' flags (and the data's location and loader workers) that may change between a run
# and its resumption: they change how a run goes, not what it trains.
RESUMABLE_FLAGS = {"run_dir", "resume", "stop_after_epochs", "log_every", "eval_protocols",
                   "no_eval", "compile", "data_root", "num_workers"}


def add_run_flags(parser, script, log_every=20):
    """The flags of a training run's directory, seed, log, closing evaluation and speed: the same
    in sie.py, baselines.py and ser.py, whose harness reads them."""
    group = parser.add_argument_group("run")
    group.add_argument("--run-dir", help=f"default runs/{script}-<preset>[-<variant>]; the same "
                                         f"command again resumes")
    group.add_argument("--resume", help="checkpoint to resume (default: <run-dir>/checkpoint.pt)")
    group.add_argument("--stop-after-epochs", type=number(int, 1),
                       help="end this invocation after N more epochs (rerun to continue; no eval)")
    group.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0,
                       help="model init, augmentations and data order")
    group.add_argument("--log-every", type=number(int, 1), default=log_every,
                       help="steps between log lines (the only host syncs)")
    group.add_argument("--eval-protocols", default="all",
                       help="eval.py protocols after training, comma-separated")
    group.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    group.add_argument("--amp", choices=("bf16", "fp16", "none"), default="bf16",
                       help="autocast on CUDA (fp16 adds a GradScaler); loss statistics in fp32")
    group.add_argument("--compile", action="store_true", help="torch.compile (the same maths)")


def check_run_flags(parser, args):
    """The run's flags that need the others: one parser.error line each."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world:
        parser.error(f"argument --batch-size: {args.batch_size} is not divisible by the {world} "
                     f"processes (--batch-size is the global batch)")
    if args.resume and not os.path.isfile(args.resume):
        parser.error(f"argument --resume: no checkpoint file {args.resume}")
    if not args.data_root:
        parser.error("argument --data-root: empty")


def device_name(text):
    """An argparse type: a torch device string that this machine has."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda:1, ...)") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: no such CUDA device here")
    return text


def parse_args(argv=None):
    p = ArgumentParser(description="Evaluate a checkpoint of sie.py, baselines.py or ser.py with "
                           "frozen-backbone protocols.")
    p.add_argument("path", nargs="+", help="run directory holding checkpoint.pt, or a checkpoint "
                   "file (several run directories with --table)")
    p.add_argument("--table", action="store_true",
                   help="print one markdown row per run from its eval.json")
    p.add_argument("--protocol", nargs="+", default=["all"],
                   choices=["all", *PROTOCOLS["3diebench"], *PROTOCOLS["imagefolder"]],
                   help="3DIEBench: classify = linear top-1 per part; rotation / color = R² "
                        "(pooled and per-output); retrieval = MRR, H@1/2/5/10, PRE of the "
                        "predictor. ImageFolder: linear, knn, equivariance (per block), robustness")
    p.add_argument("--preset", choices=PRESETS,
                   help="probe settings (default: the checkpoint's preset)")
    p.add_argument("--data-root", help="data set (default: the checkpoint's --data-root)")
    p.add_argument("--size", type=number(int, 1),
                   help="image side in px (default: the checkpoint's --resolution)")
    p.add_argument("--bn", choices=BN_MODES, help="BN while fitting probes: eval (toy default, "
                   "cached features) or train (paper default, the official probes' net.train())")
    p.add_argument("--epochs", type=number(int, 1), help="probe epochs (paper 300)")
    p.add_argument("--batch-size", type=number(int, 1), help="probe batch (paper 256)")
    p.add_argument("--train-views", type=number(int, 1),
                   help="views per training object cached for --bn eval")
    p.add_argument("--workers", type=number(int, 0), help="DataLoader workers")
    p.add_argument("--seed", type=number(int, 0), help="view sampling and head init")
    p.add_argument("--features", choices=("representation", "embeddings"), default="representation",
                   help="what is probed: the backbone's representation (the papers' protocol), or "
                        "the projector outputs z_inv / z_equi the loss acts on (sie.py)")
    p.add_argument("--out", help="where eval.json / retrieval.png go (default: the run directory; "
                                 "<run>/embeddings with --features embeddings)")
    p.add_argument("--device", type=device_name,
                   help="default: cuda:LOCAL_RANK if available, else cpu")
    return p.parse_args(argv)


def saved_value(saved, *names):
    """The first of the saved args `names` that is set (sie/baselines and ser name some
    differently), else None."""
    for name in names:
        value = getattr(saved, name, None)
        if value:
            return value
    return None


def check_before_the_work(probe, out, size, device):
    """What would otherwise fail only after the features are computed, checked first: the output
    folder is writable, and the backbone reads images of `size` px (--size 7 through a ResNet's
    stride-2 stages would not)."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        fail(f"cannot write the results to {out} ({e.strerror}); pass a writable --out")
    if size:
        try:
            with torch.no_grad():
                probe.backbone(torch.zeros(2, 3, size, size, device=device))
        except RuntimeError as e:
            fail(f"--size {size}: the backbone cannot read {size} px images "
                 f"({str(e).splitlines()[0][:200]}); pass a larger --size")


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        return print_runs_table(args.path)
    if len(args.path) > 1:
        fail(f"one checkpoint at a time (got {len(args.path)} paths); several run directories "
             "need --table")
    path = args.path[0]
    device = torch.device(args.device or default_device())
    start_process_group(device)
    probe, saved = load_probeable(path, device, args.features)
    if args.preset:
        preset = args.preset
    elif getattr(saved, "preset", None) in PRESETS:
        preset = saved.preset
    else:
        preset = "toy"
    root = args.data_root or saved_value(saved, "data_root", "data") or data.DEFAULT_ROOT
    run_dir = path if os.path.isdir(path) else (os.path.dirname(path) or ".")
    # The embeddings' results go to a folder of their own: the run's eval.json is the
    # representation's.
    out = args.out or (os.path.join(run_dir, "embeddings") if args.features == "embeddings"
                       else run_dir)
    size = args.size or saved_value(saved, "resolution", "img_size")
    check_before_the_work(probe, out, size, device)
    opts = dict(size=size, bn=args.bn, epochs=args.epochs, batch_size=args.batch_size,
                train_views=args.train_views, workers=args.workers, seed=args.seed)
    try:
        evaluate(probe, root, args.protocol, out_dir=out, device=device, preset=preset, **opts)
    except (data.DataError, ValueError) as e:
        fail(str(e))
    except OSError as e:   # e.g. --out not writable; the message names the path
        fail(f"{type(e).__name__}: {e}")
    finally:
        end_process_group()


if __name__ == "__main__":
    main()
