"""SER on a ViT in one file: model, losses, DDP training, exact resume, evaluation, with MoCo-v3,
DINO or Barlow Twins as the invariant base method (--base).

Paper: Lee, Kim, Kim, Lee, Lee, "Soft Equivariance Regularization for Invariant Self-Supervised
Learning", ICLR 2026, https://arxiv.org/abs/2603.06693. Official code ("the released code"):
https://github.com/aitrics-chris/SER, where SER is called "erl"; cited by file and function.

The method. An invariant SSL method trains a ViT's final [CLS] embedding to ignore the
augmentations. SER adds a soft equivariance loss on an EARLY layer: the patch-token map after
block L (3 of 12) should TRANSFORM with the input. For two views u0 = g0.x and u1 = g1.x of one
image (g_v: 90-degree rotations, flips, a rescale), the token map of u0 moved by the analytic
feature action rho_g (the same rotation, flip and bicubic resize, on the token grid) must match
the token map of u1, token by token (the paper's Fig. 1). [CLS] joins only after block L
("delayed [CLS]"), so blocks 1..L see a clean token grid. A small share b2 of each batch carries
these group views; the rest, b1, the base method's usual two crops.

The loss, per step (the paper's equation numbers are not cited: the forms follow its Fig. 1 and
the released code, builder/moco.py, MoCo.equiv):

    L = L_inv + lambda * L_equiv
    L_inv   = the base loss on the final [CLS] of b1 and b2 together: MoCo-v3's symmetrised
              InfoNCE (Chen et al. 2021, Alg. 1), DINO's cross-entropy to the centred teacher
              (Caron et al. 2021, Eq. 1-4) or Barlow Twins' (Zbontar et al. 2021, Eq. 1)
    L_equiv = 1/2 [NCE(h(m_1), rho_{0->1}(h(m'_0))) + NCE(h(m_0), rho_{1->0}(h(m'_1)))]
    NCE(a, t) = mean over the anchor tokens (i, j), i = image, j = grid place, of
        -log exp(s(a_ij, t_ij)) / [exp(s(a_ij, t_ij)) + sum_{m != i} sum_n exp(s(a_ij, t_mn))]
    s(a, b) = cos(a, b) / tau

m_v is the student's layer-L token map of view u_v, m'_v the teacher's (MoCo, DINO; the
student's for Barlow Twins) and h a small 1x1-conv token projector. An online linear probe on the
detached [CLS] joins the total as a monitor.

The tensors of one step (per process: B images, n_b2 = round(--b2-ratio x B) of them in b2,
image side S, patch P, grid G = S / P, width D, token-projector width E):

    loader: two crops x_a, x_b (B, 3, S, S) in [0, 1]
    b1 (B - n_b2): v1 = t1(x_a), v2 = t2(x_b)     b2 (n_b2): u_v = g_v . t_v(x_a)  (SAME crop x_a)
    u_v (n_b2, 3, P h_v, P w_v), token area h_v w_v ~ G^2 x U(0.7, 1.3), then turned k_v x 90 deg
    view --patch embedding + position table--> tokens (n, h w, D)
         --blocks 1..L (patch tokens only)--> norm_equiv --> token map m (n, D, h, w)
         --[CLS] joins--> blocks L+1..depth --> final LayerNorm --> [CLS] (n, D) --head--> L_inv
    b2 only: m --h (1x1 convs)--> (n_b2, E, h, w) --rho_g--> the other view's frame --> L_equiv

What SER is compared with (--equiv-objective): AugSelf, EquiMod and E-SSL in L_equiv's place,
at the final [CLS] or layer-decoupled (--ser-layer L < --depth); the 2+4 views (--local-crops 4).

    python ser.py --base moco                                # toy preset: CPU, generated data
    torchrun --standalone --nproc_per_node=2 ser.py --base moco       # the same, 2 processes
    torchrun --standalone --nproc_per_node=8 ser.py --preset paper --base moco \\
        --data-root /data/imagenet
"""
import argparse
import copy
import json
import math
import os
import random
import shutil
import sys
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import transforms
from tqdm import tqdm

import data
import eval  # noqa: A004 (the project's eval.py; the builtin eval() is never used here)

# ================================== presets ==================================
# --preset and --base fill the defaults below; any flag given on the command line overrides them.
# The paper preset is the released run_pretrain.sh: ViT-S/16, batch 2048 on 8 GPUs, 100 epochs.
PAPER = dict(data_root="data/imagenet", resolution=224, patch=16, dim=384, depth=12, heads=6,
             batch_size=2048, epochs=100, warmup_epochs=10, ser_layer=3, b2_ratio=0.01,
             token_dim=512, num_workers=10)
# Deviation (toy, a CPU in minutes): 32-px crops, patch 4 (an 8 x 8 token grid), a 64-wide ViT,
# b2 = 8 of 64 images, not 1 %, so that every anchor has other images as negatives, crops of at
# least 25 % of the image (a 32-px 8 % crop is mostly background).
TOY = dict(data_root=data.DEFAULT_IMAGEFOLDER_ROOT, resolution=32, patch=4, dim=64, depth=6,
           heads=2, crop_min=0.25, batch_size=64, epochs=10, warmup_epochs=1, ser_layer=2,
           b2_ratio=0.125, token_dim=128, num_workers=1)
BASE_COMMON = dict(momentum=0.99, teacher_temp_epochs=10, freeze_last_epochs=0,
                   head_bottleneck=256, drop_path=0.0, clip_grad=0.0)
# Per base method, both presets: run_pretrain.sh, main_moco.py, main_dino.py, main_barlowtwins.py.
METHOD = {
    "moco": dict(blr=3e-4, min_lr_frac=0.0, wd=0.1, wd_end=0.1, crop_min=0.08, interp="bilinear",
                 head_hidden=4096, head_dim=256, ser_lambda=1.0, ser_tau=0.5),
    "dino": dict(blr=1e-4, min_lr_frac=1e-5 / 8e-4, wd=0.04, wd_end=0.4, clip_grad=0.3,
                 crop_min=0.25, interp="bicubic", drop_path=0.1, momentum=0.982,
                 freeze_last_epochs=1, head_hidden=2048, head_dim=65536, ser_lambda=0.3,
                 ser_tau=0.4),
    "bt": dict(blr=1e-4, min_lr_frac=1e-3, wd=0.1, wd_end=0.1, clip_grad=0.3, crop_min=0.08,
               interp="bicubic", head_hidden=8192, head_dim=8192, ser_lambda=1.0, ser_tau=0.4),
}
# The toy preset's narrower heads, larger lr and short warm-ups.
TOY_METHOD = {
    "moco": dict(blr=3e-3, head_hidden=512, head_dim=128),
    "dino": dict(blr=2e-3, head_hidden=512, head_bottleneck=128, head_dim=1024,
                 teacher_temp_epochs=1, drop_path=0.0),
    "bt": dict(blr=2e-3, head_hidden=512, head_dim=512),
}
# Per --equiv-objective, over the preset: an add-on's --ser-layer 0 means the last block (the
# published baselines read the final [CLS]); EquiMod's tau is main_moco.py's --temperature-equiv.
OBJECTIVE = {"ser": {}, "augself": dict(ser_layer=0), "equimod": dict(ser_layer=0, ser_tau=0.2),
             "essl": dict(ser_layer=0)}
SCRIPT = "ser"                   # the checkpoint's "script" field (eval.py accepts only ours)
DATA_KIND = "ImageFolder"        # the on-disk layout data.py reads (and generates by default)
ITEM = "images"                  # what one batch row is, for the throughput log
DROP_LAST = True                 # as the released code: every step has a full batch (and b2)
MEMORY_FORMAT = torch.contiguous_format    # a ViT: nothing to gain from channels_last
# Flags that may change between a run and its resumption. Not --epochs: the lr, weight-decay and
# momentum schedules are cosines over all epochs. num_classes is read from the data.
RUN_LENGTH_FLAGS = eval.RESUMABLE_FLAGS | {"num_classes"}


def preset_defaults(preset, base, equiv_objective="ser"):
    """The defaults: the common ones, the base method's, the preset's, the objective's."""
    if preset == "paper":
        return {**BASE_COMMON, **METHOD[base], **PAPER, **OBJECTIVE[equiv_objective]}
    return {**BASE_COMMON, **METHOD[base], **TOY, **TOY_METHOD[base],
            **OBJECTIVE[equiv_objective]}


# ================================ the method ================================
# Two helpers come from the harness below: gather (the autograd all-gather of a batch over
# processes; the identity in one process) and autocast (bf16 or fp16 on CUDA, off on CPU).

# ---- the group elements, their action on images and on token maps (builder/utils.py) ----
class GroupElement(NamedTuple):
    """One b2 view's g_v = R90^k o S o F^f o R180^d: rot180 and hflip per image, a resize S to a
    token grid (h, w), then k quarter turns (k and the grid are shared by the view's images)."""
    k: int                  # quarter turns
    hw: tuple               # the token grid (h, w) after the resize
    d: torch.Tensor         # (n,) bool: rot180 per image
    f: torch.Tensor         # (n,) bool: hflip per image


def sample_group(n, grid, step, seed, device):
    """The group elements (g_0, g_1) of the two b2 views of n images. Per image d0, f0 ~ B(1/2);
    view 1 takes the complements, so every pair differs by a reflection (as the released code).
    k_v and the token grid (h_v, w_v) (area grid^2 x U(0.7, 1.3), aspect log-U(3/4, 4/3)) are
    drawn once per step, the same on every rank.
    Deviation: the released code draws them per GPU; one draw keeps the gathered maps one shape."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    uniforms = torch.rand(4, generator=generator).tolist()
    k = torch.randint(4, (2,), generator=generator).tolist()
    hw = []
    for v in range(2):
        area = grid * grid * (0.7 + 0.6 * uniforms[2 * v])
        aspect = math.exp(math.log(3 / 4) + math.log(16 / 9) * uniforms[2 * v + 1])
        hw.append((round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))))
    d0 = torch.rand(n, device=device) < 0.5
    f0 = torch.rand(n, device=device) < 0.5
    return GroupElement(k[0], hw[0], d0, f0), GroupElement(k[1], hw[1], ~d0, ~f0)


def act_on_images(x, g, patch):
    """The input action of one view's g, in the released aug_equiv's order: rot180^d and hflip^f
    per image, a bicubic resize to EXACTLY (patch h, patch w) px so that the token grid is h x w
    (a clean grid resample, no partial patches), then rot90^k."""
    x = torch.where(g.d.view(-1, 1, 1, 1), x.flip(-2, -1), x)
    x = torch.where(g.f.view(-1, 1, 1, 1), x.flip(-1), x)
    size = (patch * g.hw[0], patch * g.hw[1])
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    return torch.rot90(x, g.k, dims=(-2, -1))


def rho(z, g_from, g_to):
    """The feature action rho_g: moves a (n, C, h, w) token map from one b2 view's frame into the
    other's, in the released Aug_equi.aug_equiv_feat's order: undo the source's rot90^k; a
    vertical flip (the complementary flip and rot180 flags make it the same for every image); a
    bicubic resize to the target's grid; the target's rot90^k."""
    z = torch.rot90(z, 2 - g_from.k, dims=(-2, -1))     # rot90^{-k_from}, then rot180 ...
    z = torch.flip(z, dims=(-1,))                       # ... then hflip: together the vertical flip
    z = F.interpolate(z, size=tuple(g_to.hw), mode="bicubic", align_corners=False)
    return torch.rot90(z, g_to.k, dims=(-2, -1))


def objective(args):
    """The run's equivariance objective: "ser", an add-on, or "none" (--ser off); old args: SER."""
    return getattr(args, "equiv_objective", "ser") if args.ser == "on" else "none"


def b2_size(local_batch, args):
    """b2's images per rank (run_pretrain.sh's --equiv-ratio-start); 0 = vanilla or an add-on."""
    return round(args.b2_ratio * local_batch) if objective(args) == "ser" else 0


def make_views(crops, args, step):
    """The step's views (builder/moco.py: MoCo.train_erl_inv; train_erl_local4, train_augself,
    train_equimod, train_essl) from the loader's crops -> (views, g, aux): b1's query views, then
    b2's, one each. b1 = the first B - n_b2 images: crops a, b through t1, t2 (AugSelf: its own
    pipeline), the 2+4 local crops through theirs. b2 = the last n_b2: the SAME crop x_a through
    t1 and t2, then g = (g_0, g_1); in 2+4 a list of three such pairs, from crop a and local crops
    1 and 3 (the released images[0], [2], [4]), all through the local pipeline. aux: an add-on's
    inputs. The draws keep this order: b1's views, per pair its flags and views, an add-on's."""
    x = dict(zip(crop_names(args), crops))
    B = x["a"].shape[0]
    n_b2 = b2_size(B, args)
    pipelines = (AUGSELF_PIPELINE,) * 2 if objective(args) == "augself" else PIPELINES
    records = ({}, {})                                  # each view's augmentation parameters
    views = [normalize(photometric(x[name][:B - n_b2], *pipeline, record=record))
             for name, pipeline, record in zip("ab", pipelines, records)]
    local = [x[f"local{i}"] for i in range(1, args.local_crops + 1)]
    views += [normalize(photometric(crop[:B - n_b2], *LOCAL_PIPELINE)) for crop in local]
    pairs = []
    for p, source in enumerate([x["a"], *local[0::2]] if n_b2 else []):
        # Pair p's own draws: seed + p 2^31 (p = 0: the 2-view draws), beyond every --seed.
        g = sample_group(n_b2, source.shape[-1] // args.patch, step, args.seed + (p << 31),
                         source.device)
        for g_v, pipeline in zip(g, (LOCAL_PIPELINE,) * 2 if local else PIPELINES):
            u = normalize(photometric(source[B - n_b2:], *pipeline))
            views.append(act_on_images(u, g_v, args.patch))
        pairs.append(g)
    g = (pairs if local else pairs[0]) if pairs else None
    return views, g, addon_inputs(x, records, args)


# ---- the token loss L_equiv (builder/moco.py, MoCo.equiv) ----
# Local vs global: MoCo's keys, L_equiv's targets and Barlow Twins' embeddings are gathered over
# ranks (with gradients wherever they carry any); DINO's cross-entropy, L_equiv's anchors and the
# probe are per-rank means (DDP's averaging makes them global).
def process_rank():
    """This process's rank (0 without a process group): where its rows sit in a gathered batch."""
    return dist.get_rank() if dist.is_initialized() else 0


def autocast_off(x):
    """Context for a loss's statistics in fp32 under any autocast, as the released code sums in
    fp32 under AMP. `.float()` alone does not do it: under autocast a matmul of two fp32 tensors
    still runs in bf16 / fp16. Each loss casts its inputs with .float() inside the context."""
    return torch.autocast(x.device.type, enabled=False)


def token_rows(token_map):
    """(n, C, h, w) -> (n h w, C) unit vectors, image-major then row-major. Anchor and target
    use the same order, so the same-image mask below is right."""
    n, C, h, w = token_map.shape
    rows = token_map.float().flatten(2).transpose(1, 2).reshape(n * h * w, C)
    return F.normalize(rows, dim=1)


def token_nce(anchor, target, tau, negatives="target"):
    """Patch-wise NT-Xent. anchor, target: (n, C, h, w) maps in the same frame, n = this rank's b2
    images. Anchor token (i, j): positive = target token (i, j); negatives = every target token
    of every OTHER image of the global b2 (with "both", also every anchor token of other images:
    the paper's 2N-way form, the released MoCo.erl_local4). Image i's other tokens are left out
    (App. B.4): with them the loss would become a within-image localisation task."""
    n, _, h, w = anchor.shape
    n_tokens = h * w
    with autocast_off(anchor):
        a = token_rows(anchor)                          # (n h w, C)
        t = token_rows(target)
        positive = (a * t).sum(1) / tau
        anchor_image = torch.arange(n, device=a.device).repeat_interleave(n_tokens)
        anchor_image = anchor_image + process_rank() * n        # global image ids
        candidates = [gather(t)]
        if negatives == "both":
            candidates.append(gather(a))
        logits = [positive[:, None]]                    # column 0: the positive
        for cand in candidates:                         # (global b2 x h w, C)
            cand_image = torch.arange(cand.shape[0] // n_tokens, device=a.device)
            cand_image = cand_image.repeat_interleave(n_tokens)
            # The same-image mask drops the anchor image's other tokens, and with them the
            # positive itself (target token (i, j) is one of them): column 0 adds it back, once.
            same_image = anchor_image[:, None] == cand_image[None, :]
            logits.append((a @ cand.T / tau).masked_fill(same_image, float("-inf")))
        return (torch.logsumexp(torch.cat(logits, dim=1), dim=1) - positive).mean()


def equivariance_loss(proj, maps, targets, g, tau, negatives="target"):
    """L_equiv, symmetrised. Anchors: the student's projected layer-L maps of the b2 views (group
    elements g = (g_0, g_1)). Targets: the other view's map (the teacher's for MoCo and DINO; the
    student's for Barlow Twins: targets=None) through the STUDENT's projector h, then rho_g into
    the anchor's frame (as the released code). Gradients reach f1 via the anchors, h via both.
    Deviation for Barlow Twins: the released barlowtwins.train_erl uses one direction only."""
    anchors = [proj(m) for m in maps]
    projected = anchors
    if targets is not None:
        projected = [proj(t) for t in targets]
    g0, g1 = g
    loss_0_to_1 = token_nce(anchors[1], rho(projected[0], g0, g1), tau, negatives)
    loss_1_to_0 = token_nce(anchors[0], rho(projected[1], g1, g0), tau, negatives)
    return 0.5 * (loss_0_to_1 + loss_1_to_0)


# ---- the compared add-ons (builder/moco.py's augself, equimod, essl modes) and the 2+4 views ----
# An add-on's loss takes L_equiv's place (L = L_inv + lambda L_addon, whole batch, no b2) and reads
# one feature per view: the final [CLS] (the published baselines) or, decoupled (--ser-layer L <
# --depth), norm_equiv(the [CLS] after block L), [CLS] joining at the input: the augself branch's
# vision_transformer.py :: forward_baseline; not a delayed-[CLS] token map as SER's. Deviation
# (extensions without released code): decoupled EquiMod and E-SSL follow that recipe; every base
# runs every add-on (the released AugSelf, EquiMod: MoCo-v3 only). STL (MoCo.stl) is left out: it
# needs image pairs sharing one crop and jitter draw (another loader) and a 19 M-parameter
# hypernetwork (utils.py :: EquiTrans).
def addon_feature(out):
    """A student output ([CLS], layer-L feature or None) -> the add-on's feature of the view."""
    return out[0] if out[1] is None else out[1]


# AugSelf (Lee et al. 2021, https://arxiv.org/abs/2111.09613, Sec. 3; augself branch:
# builder/utils.py :: SSObjective, extract_diff, load_ss_predictor; builder/moco.py ::
# MoCo.augself): predict the difference of two views' augmentation parameters from their features.
# Deviation: the targets are our jitter's (fixed order, YIQ hue: color_jitter); the flip is drawn
# in the loader, not on the GPU (same targets); lambda scales the released sum (1: the same).
def augself_targets(box1, box2, record1, record2):
    """The ordered pair (1, 2)'s targets (extract_diff): crop = box 1 - box 2 as (centre y,
    centre x, height, width) in image fractions, both centres mirrored if VIEW 1 is flipped (as
    the original AugSelf); color = w_1 - w_2, w = the jitter's codes (_extract_w)."""
    codes = []
    for box, record in ((box1, record1), (box2, record2)):
        centre_x = box[:, 1] + box[:, 3] / 2
        centre_x = torch.where(box1[:, 4] > 0.5, 1 - centre_x, centre_x)
        crop = torch.stack([box[:, 0] + box[:, 2] / 2, centre_x, box[:, 2], box[:, 3]], 1)
        codes.append(torch.cat([crop, record["jitter_w"]], 1))
    diff = codes[0] - codes[1]
    return {"crop": diff[:, :4], "color": diff[:, 4:]}


def augself_heads(args):
    """Per parameter of positive weight: [f_1, f_2] -> 512 -> 512 -> 4: (bias-free Linear, BN,
    ReLU) x 2, a Linear with bias (load_mlp_augself; reset_parameters_augself = PyTorch's init)."""
    weights = {"crop": args.augself_crop, "color": args.augself_color}
    return nn.ModuleDict({name: nn.Sequential(*mlp([2 * args.dim, 512, 512]), nn.BatchNorm1d(512),
                                              nn.ReLU(inplace=True), nn.Linear(512, 4))
                          for name, weight in weights.items() if weight > 0})


def augself_loss(heads, f1, f2, targets, args):
    """sum_k w_k MSE(tanh(head_k([f1, f2; f2, f1])), [d_k(1, 2); d_k(2, 1)]), k = crop, color
    (SSObjective, symmetric); a per-rank mean."""
    pairs = torch.cat([torch.cat([f1, f2], 1), torch.cat([f2, f1], 1)])
    loss = 0.0
    for name, head in heads.items():
        out = head(pairs)
        with autocast_off(out):
            mse = F.mse_loss(torch.tanh(out.float()), targets[name])
            loss = loss + getattr(args, f"augself_{name}") * mse
    return loss


# EquiMod (Devillers & Lefort 2023, https://arxiv.org/abs/2211.01244, Sec. 3; builder/moco.py ::
# MoCo.equimod, train_equimod; loader/equimod.py): from the untransformed view's embedding and the
# augmentation's parameters, predict the augmented view's embedding, trained with InfoNCE.
def equimod_params(box, record):
    """(B, 14): the crop box (top, left, height, width, flip), jitter applied and its 4 codes (0
    without), grayscale, blur applied and its sigma (0 without), solarised.
    Deviation: the released vector is 18-d: + the jitter's random order (ours has none); the box
    in pixels; raw factors, (1, 1, 1, 0) without jitter (per column an affine map of our codes)."""
    keys = ("jitter", "jitter_w", "gray", "blur", "sigma", "solarize")
    return torch.cat([box] + [record[k] for k in keys], 1)


def equimod_heads(args, y=128, n_params=14):
    """project: D -> D -> D -> 128 (projector_equiv = mlp(last_bn=True)); embed: p -> 128
    (proj_head_t: Linear, BN); predict: [y_0, embed(p)] -> 128 (predictor_eq: Linear, BN no affine).
    Deviation: p is standardised by an affine-free BN, not by the released fixed ImageNet
    estimates (p_mean, p_std), which other data and crop sizes would miss."""
    return nn.ModuleDict({
        "project": mlp([args.dim, args.dim, args.dim, y], last_bn=True),
        "embed": nn.Sequential(nn.BatchNorm1d(n_params, affine=False),
                               nn.Linear(n_params, y, bias=False), nn.BatchNorm1d(y)),
        "predict": nn.Sequential(nn.Linear(2 * y, y, bias=False), nn.BatchNorm1d(y, affine=False))})


def equimod_loss(heads, f_centre, f_views, params, tau):
    """1/2 [NCE(y_t, y_hat) + NCE(y_hat, y_t)] over both views' rows: y_t = project(f_t), a call
    per view (its own BN statistics), y_hat = predict([project(f_centre), embed(p_t)]). NCE =
    moco_infonce over the global batch, the keys detached: contrastive_loss_temp's all-gather
    carries no gradient."""
    y_t = torch.cat([heads["project"](f) for f in f_views])
    y_0 = heads["project"](f_centre).repeat(2, 1)
    y_hat = heads["predict"](torch.cat([y_0, heads["embed"](params)], 1))
    return 0.5 * (moco_infonce(y_t, y_hat.detach(), tau) + moco_infonce(y_hat, y_t.detach(), tau))


# E-SSL (Dangovski et al. 2022, https://arxiv.org/abs/2111.00899, Sec. 3; builder/moco.py ::
# train_essl, MoCo.forward_essl; loader/essl.py): predict which of 4 rotations an extra small crop
# went through, cross-entropy (a per-rank mean); its "2+4" views are the two views and the 4
# rotated copies. Deviation (an extension): --local-crops 4 adds MoCo-v3's 2+4 views to it.
def four_rotations(x):
    """(n, ...) -> ([x, rot90 x, rot180 x, rot270 x] (4 n, ...), labels 0.., 1.., 2.., 3..), the
    released train_essl's flips and transposes (counter-clockwise quarter turns)."""
    rotated = torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)])
    return rotated, torch.arange(4, device=x.device).repeat_interleave(x.shape[0])


def rotation_head(args):
    """D -> D -> D -> 256 -> 4 with LayerNorms (the essl mode's projector_equiv)."""
    D = args.dim
    return nn.Sequential(nn.Linear(D, D), nn.LayerNorm(D), nn.ReLU(inplace=True), nn.Linear(D, D),
                         nn.LayerNorm(D), nn.ReLU(inplace=True), nn.Linear(D, 256),
                         nn.LayerNorm(256), nn.Linear(256, 4))


def addon_inputs(x, records, args):
    """An add-on's inputs besides the two views: AugSelf's targets of both orders, EquiMod's
    untransformed view and parameters, E-SSL's rotated crops and labels."""
    if objective(args) == "augself":
        d12 = augself_targets(x["box_a"], x["box_b"], *records)
        d21 = augself_targets(x["box_b"], x["box_a"], *records[::-1])
        return {k: torch.cat([d12[k], d21[k]]) for k in d12}
    if objective(args) == "equimod":
        params = [equimod_params(x[box], rec) for box, rec in zip(("box_a", "box_b"), records)]
        return {"centre": normalize(x["centre"]), "params": torch.cat(params)}
    if objective(args) == "essl":
        return four_rotations(normalize(photometric(x["rotate"], *ROTATE_PIPELINE)))
    return None


# The 2+4 views (MoCo-v3; builder/moco.py :: MoCo.inv_local4, MoCo.erl_local4; loader/local4.py).
def multi_view_infonce(queries, keys, tau):
    """sum_i sum_{j != i} InfoNCE(q_i, k_j) over the query views i and the two global keys j: 10
    terms in 2+4, summed as released; with 2 views, MoCo-v3's symmetrised loss."""
    return sum(moco_infonce(q, k, tau) for i, q in enumerate(queries)
               for j, k in enumerate(keys) if i != j)


def local_pair_loss(proj, map_0, map_1, g, tau):
    """One 2+4 SER pair: the paper's 2N-way token NT-Xent on the STUDENT's maps, view 1's moved
    into view 0's frame; every token of both maps an anchor, other images' tokens the negatives.
    Deviation: the released erl_local4 reads bs (a view's token count) from the b2 image count,
    misplacing its positives, masks and normaliser, and gathers without gradient; this is its
    evident intent, the paper's equation, with gradients."""
    a, b = proj(map_0), rho(proj(map_1), g[1], g[0])
    return 0.5 * (token_nce(a, b, tau, "both") + token_nce(b, a, tau, "both"))


# ---- the ViT with delayed [CLS] (vision_transformer.py, VisionTransformer) ----
class Block(nn.Module):
    """Pre-norm transformer block (Dosovitskiy et al. 2021): x + Attn(LN(x)), then x + MLP(LN(x));
    qkv bias, LayerNorm eps 1e-6, MLP 4x, stochastic depth on both residual branches."""

    def __init__(self, dim, heads, drop_path=0.0):
        super().__init__()
        self.heads = heads
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def attention(self, x):
        """(B, N, D) -> (B, N, D)."""
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                       # each (B, heads, N, D / heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))

    def drop(self, x):
        """Stochastic depth: drop a whole branch per sample, rescale the kept ones."""
        if not self.training or self.drop_path == 0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= self.drop_path
        return x * keep / (1 - self.drop_path)

    def forward(self, x):
        x = x + self.drop(self.attention(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """ViT with delayed [CLS]. cls_at = the blocks that run before [CLS] joins: L with SER
    (blocks 1..L see patch tokens only; [CLS] has no position embedding), 0 = vanilla. A separate
    LayerNorm norm_equiv reads the layer-L patch map for L_equiv only; the un-normalised stream
    goes on (the released forward_equiv). With [CLS] at the input and a loss layer (a decoupled
    add-on) it reads the layer-L [CLS] instead. Training and evaluation use the same forward."""

    def __init__(self, resolution, patch, dim, depth, heads, cls_at, loss_layer=0, drop_path=0.0):
        super().__init__()
        self.patch = patch
        self.grid = resolution // patch
        self.cls_at = cls_at
        self.loss_layer = loss_layer
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid ** 2, dim))    # patch tokens only
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_pos = None
        if cls_at == 0:                                 # vanilla: [CLS] at the input
            self.cls_pos = nn.Parameter(torch.zeros(1, 1, dim))
        # Stochastic depth rises linearly over depth, 0 at block 1 to drop_path at the last
        # (DINO's and the released vision_transformer.py's decay rule, Huang et al. 2016).
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(Block(dim, heads, rate) for rate in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.norm_equiv = None
        if loss_layer:
            self.norm_equiv = nn.LayerNorm(dim, eps=1e-6)

    def init_weights(self, moco_v3):
        """timm/DINO init (trunc-normal 0.02), or MoCo-v3's (Chen et al. 2021, Sec. 5):
        xavier-uniform linears with qkv as three matrices, [CLS] ~ N(0, 1e-6). The patch embedding
        keeps PyTorch's default init for every base, as the released VisionTransformer.__init__
        (MoCo-v3's xavier patch init is commented out there; for MoCo it only freezes it)."""
        for name, module in self.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            if moco_v3:
                fan_out = module.weight.shape[0]
                if name.endswith("qkv"):                # three (D, D) matrices stacked
                    fan_out = fan_out // 3
                bound = math.sqrt(6.0 / (fan_out + module.weight.shape[1]))
                nn.init.uniform_(module.weight, -bound, bound)
            else:
                nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        for table in (self.pos_embed, self.cls_pos):
            if table is not None:
                nn.init.trunc_normal_(table, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6 if moco_v3 else 0.02)

    def patch_tokens(self, x):
        """(B, 3, P h, P w) -> ((B, h w, D) row-major tokens plus the position table, (h, w)).
        The table is resized bicubically to any grid, as the released interpolate_pos_encoding
        (DINO's): with scale_factor (h + 0.1) / grid, which sets both the output size (floor:
        exactly h) and the sampling positions (not quite those of a resize to size=(h, w)))."""
        tokens = self.patch_embed(x)                    # (B, D, h, w)
        h, w = tokens.shape[-2:]
        pos = self.pos_embed
        if (h, w) != (self.grid, self.grid):
            pos = pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
            scale = ((h + 0.1) / self.grid, (w + 0.1) / self.grid)
            pos = F.interpolate(pos, scale_factor=scale, mode="bicubic", align_corners=False)
            pos = pos.flatten(2).transpose(1, 2)
        return tokens.flatten(2).transpose(1, 2) + pos, (h, w)

    def forward(self, x, every_block=False):
        """-> (final-norm [CLS] (B, D), the loss map norm_equiv(f1(x)) (B, D, h, w) (an add-on's:
        (B, D)) or None), and with every_block also the list of every block's output tokens."""
        tokens, (h, w) = self.patch_tokens(x)
        B = tokens.shape[0]
        loss_map = None
        block_outputs = []
        for i, block in enumerate(self.blocks):         # block i + 1 in the paper's count
            if i == self.cls_at:                        # delayed [CLS], before block cls_at + 1
                cls = self.cls_token
                if self.cls_pos is not None:
                    cls = cls + self.cls_pos
                tokens = torch.cat([cls.expand(B, -1, -1), tokens], dim=1)
            tokens = block(tokens)
            if i + 1 == self.loss_layer and self.cls_at == 0:   # a decoupled add-on's feature:
                loss_map = self.norm_equiv(tokens[:, 0])        # the layer-L [CLS], its own LN
            elif i + 1 == self.loss_layer:              # f1(x): layer-L patch tokens, their own LN
                patch_only = tokens[:, int(i >= self.cls_at):]
                loss_map = self.norm_equiv(patch_only).transpose(1, 2).reshape(B, -1, h, w)
            if every_block:
                block_outputs.append(tokens)
        cls = self.norm(tokens)[:, 0]
        if every_block:
            return cls, loss_map, block_outputs
        return cls, loss_map

    def last_blocks_features(self, x, n=4):
        """SER's probe feature (the released lincls_parallel.py, n_last_blocks 4: DINO's ViT-S
        protocol): the final-norm [CLS] of the last n blocks, (B, n D).
        Deviation: a block run before [CLS] joins (if L > depth - n) gives its mean final-norm
        patch token."""
        features = []
        for i, out in enumerate(self(x, every_block=True)[2]):
            if i >= len(self.blocks) - n:
                out = self.norm(out)
                features.append(out[:, 0] if i >= self.cls_at else out.mean(1))
        return torch.cat(features, dim=1)

    def block_maps(self, x):
        """Each block's output patch tokens as (B, D, h, w) maps (for the equivariance score)."""
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        maps = []
        for i, out in enumerate(self(x, every_block=True)[2]):
            patch_only = out[:, int(i >= self.cls_at):]
            maps.append(patch_only.transpose(1, 2).reshape(out.shape[0], -1, h, w))
        return maps


# ---- the base methods: heads and losses L_inv (MoCo-v3, DINO, Barlow Twins) ----
def mlp(dims, last_bn=False):
    """MoCo-v3 / Barlow Twins MLP: (Linear without bias, BN, ReLU) between layers, a bias-free
    last Linear, and for MoCo-v3's ViT projector AND predictor a final BN without affine
    parameters (MoCo_ViT._build_mlp, last_bn=True for both; only its ResNet predictor drops it)."""
    layers = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < len(dims) - 2:                           # every layer but the last
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
    if last_bn:
        layers.append(nn.BatchNorm1d(dims[-1], affine=False))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINO's head (Caron et al. 2021, Sec. 3.1): a 3-layer GELU MLP without BN -> bottleneck ->
    L2 norm -> a weight-normalised linear layer to K prototypes (norm_last_layer False: its norm
    g is trained too). Init as DINO's DINOHead: the MLP trunc-normal (0.02) with zero biases; the
    last layer PyTorch's default (DINO inits before creating it), g = 1."""

    def __init__(self, dim, hidden, bottleneck, out):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        last = nn.Linear(bottleneck, out, bias=False)
        self.last = nn.utils.parametrizations.weight_norm(last)
        self.last.parametrizations.weight.original0.data.fill_(1.0)

    def forward(self, x):
        return self.last(F.normalize(self.mlp(x), dim=-1))


def moco_infonce(q, k, tau):
    """MoCo-v3 (Chen et al. 2021, Alg. 1): cross-entropy of q.k / tau over the keys of the whole
    global batch, label = own key, times 2 tau. The keys come from the teacher: no gradient."""
    with autocast_off(q):
        q = F.normalize(q.float(), dim=1)
        k = F.normalize(gather(k.float()), dim=1)
        labels = torch.arange(q.shape[0], device=q.device) + process_rank() * q.shape[0]
        return F.cross_entropy(q @ k.T / tau, labels) * 2 * tau


def dino_loss(s_a, s_b, t_a, t_b, center, tau_s, tau_t):
    """DINO (Caron et al. 2021, Eq. 1-4) with two global views and no multi-crop (the released
    local_crops_number 0): cross-entropy between the centred, sharpened teacher softmax of one
    view and the student of the other, averaged over both pairs."""
    loss = 0.0
    with autocast_off(s_a):
        for student, teacher in ((s_b, t_a), (s_a, t_b)):
            p_teacher = F.softmax((teacher.float() - center.float()) / tau_t, dim=1)
            log_p_student = F.log_softmax(student.float() / tau_s, dim=1)
            loss = loss + torch.sum(-p_teacher * log_p_student, dim=1).mean()
    return loss / 2


def standardise(z):
    """BN without affine parameters over the rows (eps 1e-5, biased variance)."""
    return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)


def barlow_twins_loss(z1, z2, lam):
    """Barlow Twins (Zbontar et al. 2021, Eq. 1): sum_i (1 - C_ii)^2 + lam sum_{i != j} C_ij^2,
    with C the cross-correlation of the batch-standardised embeddings over the GLOBAL batch."""
    # Deviation (DDP gradient scale): the released BarlowTwins.forward_equiv sums C over GPUs
    # with an in-place all_reduce that autograd does not see; each rank back-propagates only its
    # own share of C and DDP's averaging leaves 1/W of the true gradient (W = world size). Here
    # the gather carries gradients, so the gradient is the true one. AdamW ignores the overall
    # scale, the per-parameter clip does not: the released clip 0.3 on W GPUs equals
    # --clip-grad 0.3 x W here (2.4 at 8 GPUs); the same in one process (W = 1).
    with autocast_off(z1):
        z1, z2 = gather(z1.float()), gather(z2.float())
        c = standardise(z1).T @ standardise(z2) / z1.shape[0]
        on_diagonal = (torch.diagonal(c) - 1).pow(2).sum()
        off_diagonal = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
        return on_diagonal + lam * off_diagonal


# ---- the model: everything one step computes ----
class SER(nn.Module):
    """The student ViT, the base method's head(s), the 1x1 token projector h (the released
    projector_equiv) or an add-on's head, the EMA teacher (MoCo-v3, DINO), DINO's centre, a linear
    probe on the detached [CLS]. forward() is a step's whole loss: DDP sees one forward."""

    def __init__(self, args):
        super().__init__()
        self.args = args
        D, hidden, out = args.dim, args.head_hidden, args.head_dim
        self.student = self.make_vit(args.drop_path)
        self.student.init_weights(moco_v3=args.base == "moco")
        if args.base == "moco":
            # MoCo-v3's frozen random patch projection (Chen et al. 2021, Sec. 5)
            self.student.patch_embed.requires_grad_(False)
            self.head = mlp([D, hidden, hidden, out], last_bn=True)
            self.predictor = mlp([out, hidden, out], last_bn=True)
        elif args.base == "dino":
            self.head = DINOHead(D, hidden, args.head_bottleneck, out)
            self.register_buffer("center", torch.zeros(1, out))
        else:
            self.head = mlp([D, hidden, hidden, out])
        self.token_proj = None
        if objective(args) == "ser":                    # h = Conv1x1 D->E, GELU, Conv1x1 E->E
            E = args.token_dim
            self.token_proj = nn.Sequential(nn.Conv2d(D, E, 1, bias=False), nn.GELU(),
                                            nn.Conv2d(E, E, 1, bias=False))
        heads = {"augself": augself_heads, "equimod": equimod_heads, "essl": rotation_head}
        self.addon_head = heads[objective(args)](args) if objective(args) in heads else None
        self.probe = nn.Linear(D, getattr(args, "num_classes", 1000))
        self.teacher, self.teacher_head = None, None
        if args.base in ("moco", "dino"):               # EMA teacher, without stochastic depth
            self.teacher = self.make_vit(0.0)
            self.teacher.load_state_dict(self.student.state_dict())
            self.teacher_head = copy.deepcopy(self.head)
            self.teacher.requires_grad_(False)
            self.teacher_head.requires_grad_(False)

    def make_vit(self, drop_path):
        """The ViT of this run (student or teacher): [CLS] joins after block L with SER, at the
        input without it or with an add-on, which reads block L's [CLS] if L < depth.
        Deviation: with L = depth, [CLS] joins before the last block (none would be left)."""
        args = self.args
        cls_at, loss_layer = 0, 0
        if objective(args) == "ser":
            cls_at = min(args.ser_layer, args.depth - 1)
            loss_layer = args.ser_layer
        elif objective(args) != "none" and args.ser_layer < args.depth:
            loss_layer = args.ser_layer
        return ViT(args.resolution, args.patch, args.dim, args.depth, args.heads, cls_at,
                   loss_layer, drop_path)

    @property
    def backbone(self):
        """The ViT that eval.py probes and backbone.pt holds: DINO's teacher (DINO evaluates
        its teacher, Caron et al. 2021), the student for MoCo-v3 and Barlow Twins."""
        return self.teacher if self.args.base == "dino" else self.student

    def compile(self, *args, **kwargs):
        """torch.compile each ViT block in place (the harness calls model.compile()), not the
        whole model, whose graph the b2 views' new h x w grid would recompile every step; a
        block only sees token sequences, whose length varies along one dimension."""
        for vit in (self.student, self.teacher):
            if vit is not None:
                for block in vit.blocks:
                    block.compile(*args, **kwargs)

    def forward(self, views, g, labels, sched, aux=None):
        """views = b1's query views (v1, v2; in 2+4 then the four local ones), then with SER b2's,
        one per query view (make_views); g: b2's group elements; aux: an add-on's inputs. Every
        query view's [CLS] (b1 and b2) meets both global keys in L_inv (as the released code), b2
        alone L_equiv. sched: this step's schedule values (DINO's teacher temperature).
        -> (total loss, detached loss terms, the probe's device-side counts)."""
        args = self.args
        n = 2 + args.local_crops                        # query views
        student_out = [self.student(v) for v in views]  # ([CLS], layer-L map) per view
        cls = [torch.cat([out[0] for out in student_out[i::n]]) for i in range(n)]  # b1, then b2
        teacher_out = None
        if self.teacher is not None:                    # the keys: the global views 0 and 1
            with torch.no_grad():
                teacher_out = [self.teacher(v) for v in views[:2] + views[n:n + 2]]
                keys = [self.teacher_head(torch.cat([out[0] for out in teacher_out[i::2]]))
                        for i in range(2)]
        if args.base == "moco":                         # symmetrised InfoNCE (MoCo-v3 Alg. 1)
            queries = [self.predictor(self.head(c)) for c in cls]
            inv = multi_view_infonce(queries, keys, args.moco_tau)
        elif args.base == "dino":
            inv = dino_loss(self.head(cls[0]), self.head(cls[1]), *keys, self.center,
                            args.student_temp, sched["teacher_temp"])
            self.update_center(torch.cat(keys))
        else:
            inv = barlow_twins_loss(self.head(cls[0]), self.head(cls[1]), args.bt_lambda)
        terms = {"inv": inv.detach()}
        loss = inv
        if g is not None or aux is not None:            # L = L_inv + lambda (L_equiv or L_addon)
            equiv = (self.ser_loss(student_out, teacher_out, g) if aux is None
                     else self.addon_loss(student_out, aux))
            loss = loss + args.ser_lambda * equiv       # lambda = 0: computed and logged only
            terms["equiv"] = equiv.detach()
        # The online monitor: a linear probe on the detached [CLS], nothing reaches the ViT.
        logits = self.probe(cls[0].detach().float())
        probe_loss = F.cross_entropy(logits, labels)
        terms["probe"] = probe_loss.detach()
        sums = {"probe_correct": (logits.argmax(1) == labels).sum().float(),
                "images": logits.new_full((), labels.shape[0])}
        return loss + probe_loss, terms, sums

    def ser_loss(self, student_out, teacher_out, g):
        """L_equiv on b2's layer-L maps, the teacher's as targets (MoCo.equiv; Barlow Twins: the
        student's); in 2+4 the sum of local_pair_loss over the three pairs (MoCo.erl_local4)."""
        args = self.args
        maps = [out[1] for out in student_out[2 + args.local_crops:]]    # pair by pair
        if args.local_crops:
            return sum(local_pair_loss(self.token_proj, *maps[2 * p:2 * p + 2], g_p, args.ser_tau)
                       for p, g_p in enumerate(g))
        targets = None if teacher_out is None else [out[1] for out in teacher_out[2:]]
        return equivariance_loss(self.token_proj, maps, targets, g, args.ser_tau,
                                 args.ser_negatives)

    def addon_loss(self, student_out, aux):
        """An add-on's loss on the student's features (addon_feature) of the whole batch."""
        args, features = self.args, [addon_feature(out) for out in student_out[:2]]
        if args.equiv_objective == "augself":
            return augself_loss(self.addon_head, *features, aux, args)
        if args.equiv_objective == "equimod":           # the third view: the untransformed one
            centre = addon_feature(self.student(aux["centre"]))
            return equimod_loss(self.addon_head, centre, features, aux["params"], args.ser_tau)
        rotated, labels = aux                           # E-SSL
        logits = self.addon_head(addon_feature(self.student(rotated)))
        return F.cross_entropy(logits.float(), labels)

    @torch.no_grad()
    def update_center(self, teacher_out):
        """DINO Eq. 4: c <- m c + (1 - m) mean of the teacher outputs over the global batch."""
        mean = teacher_out.float().mean(0, keepdim=True)
        if dist.is_initialized():
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        momentum = self.args.center_momentum
        self.center.mul_(momentum).add_(mean, alpha=1 - momentum)

    @torch.no_grad()
    def ema_update(self, momentum):
        """teacher <- m teacher + (1 - m) student after each step (MoCo-v3's momentum encoder,
        DINO's teacher).
        Deviation for MoCo-v3, which updates before computing the keys: one step later."""
        if self.teacher is None:
            return
        pairs = ((self.student, self.teacher), (self.head, self.teacher_head))
        for student, teacher in pairs:
            for p_teacher, p_student in zip(teacher.parameters(), student.parameters()):
                p_teacher.lerp_(p_student, 1 - momentum)


# ---- the optimiser, the schedules and one training step (the released main_*.py) ----
def make_optimizer(model, args):
    """AdamW; weight decay on weights, none on biases and norm parameters (DINO's rule).
    Deviation for MoCo-v3 and Barlow Twins, whose code decays everything: one rule for all three
    bases. lr and wd are set every step from schedule()."""
    params = [p for p in model.parameters() if p.requires_grad]
    param_groups = [{"params": [p for p in params if p.ndim > 1], "apply_wd": True},
                    {"params": [p for p in params if p.ndim <= 1], "apply_wd": False}]
    return torch.optim.AdamW(param_groups, lr=0.0, weight_decay=0.0,
                             fused=next(model.parameters()).is_cuda)


def cosine(t, start, end):
    """A half cosine from start (t = 0) to end (t = 1), t clipped to [0, 1]."""
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


def schedule(step, args, steps_per_epoch):
    """Every schedule as a pure function of the global step (nothing to store for a resume).
    lr: linear warm-up to blr x batch / 256 (the linear scaling rule, Goyal et al. 2017), then a
    half cosine to min_lr_frac x peak; wd: cosine wd -> wd_end (DINO); teacher momentum: cosine
    m -> 1 (MoCo-v3, DINO); DINO's teacher temperature: linear warm-up, then constant."""
    total = args.epochs * steps_per_epoch
    warmup = args.warmup_epochs * steps_per_epoch
    peak = args.blr * args.batch_size / 256
    if step < warmup:
        # From 0, as the official warm-ups: step / W in MoCo-v3's and Barlow Twins' (main_moco.py
        # :: adjust_learning_rate, builder/barlowtwins.py :: adjust_learning_rate), DINO's
        # np.linspace(0, peak, W) (builder/utils.py :: cosine_scheduler) step / (W - 1).
        lr = peak * step / (max(1, warmup - 1) if args.base == "dino" else warmup)
    else:
        lr = cosine((step - warmup) / max(1, total - warmup), peak, peak * args.min_lr_frac)
    # DINO's teacher temperature per epoch, np.linspace(t0, t, E) over the first E epochs
    # (main_dino.py :: DINOLoss): t at epoch E - 1.
    epoch = step // steps_per_epoch
    temp_progress = min(1.0, epoch / max(1, args.teacher_temp_epochs - 1))
    teacher_temp = args.teacher_temp0 + (args.teacher_temp - args.teacher_temp0) * temp_progress
    return {"lr": lr, "wd": cosine(step / total, args.wd, args.wd_end),
            "momentum": cosine(step / total, args.momentum, 1.0), "teacher_temp": teacher_temp}


def train_step(model, batch, optimizer, scaler, args, step=0, steps_per_epoch=1):
    """One optimisation step on a device batch (*crops, labels): the schedules, the views,
    forward, backward, DINO's per-parameter clipping and frozen last layer, AdamW, the teacher
    EMA. Returns (loss terms, probe counts), device tensors only: no host sync in the step."""
    sched = schedule(step, args, steps_per_epoch)
    for param_group in optimizer.param_groups:
        param_group["lr"] = sched["lr"]
        param_group["weight_decay"] = sched["wd"] if param_group["apply_wd"] else 0.0
    *crops, labels = batch
    views, g, aux = make_views(crops, args, step)
    with autocast(args, labels.device):
        loss, terms, sums = model(views, g, labels, sched, aux)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    core = model.module if isinstance(model, DistributedDataParallel) else model
    if args.clip_grad > 0:                              # DINO clips each parameter's norm alone
        scaler.unscale_(optimizer)
        for p in core.parameters():
            if p.grad is not None:
                torch.nn.utils.clip_grad_norm_(p, args.clip_grad)
    if args.base == "dino" and step < args.freeze_last_epochs * steps_per_epoch:
        for p in core.head.last.parameters():           # DINO: last layer frozen at first
            p.grad = None
    scaler.step(optimizer)
    scaler.update()
    core.ema_update(sched["momentum"])
    return {"total": loss.detach(), **terms}, sums


def monitor_metrics(sums):
    """The online probe's epoch figure from its summed counts: top-1 over the epoch's images."""
    return {"top1_probe": sums["probe_correct"] / sums["images"]}


# ---- what the harness and eval.py need from this method ----
def make_dataset(args, root):
    """The ImageFolder train split, the crops of crop_names per image -> (dataset, None). Sets
    args.num_classes (the probe's width) from the data, on every rank."""
    dataset = data.ImageFolder(root, "train", transform=Crops(args))
    args.num_classes = len(dataset.classes)
    return dataset, None


def to_device(batch, device, args):
    """(crops, labels) from the loader -> (*crops, labels) on the device, images in [0, 1]."""
    crops, labels = batch
    return tuple(t.to(device, non_blocking=True) for t in (*crops, labels))


build_model = SER          # the whole training model from (saved) args; eval.py rebuilds it so


class LastBlocksCLS(nn.Module):
    """images -> ViT.last_blocks_features, (B, 4 D): what eval.py probes."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit.last_blocks_features(x, n=4)


def probeable(model, args):
    """What eval.py probes: "full" = the last-4 [CLS] (the paper's probe; every block's of a ViT
    with fewer), "last" = the final [CLS], and every block's token map (the equivariance score),
    of model.backbone."""
    vit = model.backbone
    n_blocks = min(4, args.depth)                        # what last_blocks_features concatenates
    parts = {"full": slice(0, n_blocks * args.dim),
             "last": slice((n_blocks - 1) * args.dim, n_blocks * args.dim)}
    return eval.Probeable(backbone=LastBlocksCLS(vit), token_maps=vit.block_maps, parts=parts)


# ---- the augmentation pipelines (loader/*.py; builder/utils.py, Aug_equi) ----
LOCAL_SIDE, LOCAL_SCALE, ROTATE_SCALE = 96 / 224, (0.05, 0.25), (0.05, 0.14)   # local4.py, essl.py


def crop_names(args):
    """What one loader item holds, in order: crops a and b, their boxes (AugSelf, EquiMod),
    EquiMod's untransformed view, E-SSL's crop to rotate, the 2+4 local crops."""
    names = ["a", "b"] + ["box_a", "box_b"] * (objective(args) in ("augself", "equimod"))
    names += {"equimod": ["centre"], "essl": ["rotate"]}.get(objective(args), [])
    return names + [f"local{i}" for i in range(1, args.local_crops + 1)]


def local_side(args):
    """The local crops' side: 96 px at 224 (the released loaders), whole patches, at least 2.
    Deviation (toy): 12 px at 32, a 3 x 3 token grid."""
    return args.patch * max(2, round(args.resolution * LOCAL_SIDE / args.patch))


class Crops:
    """One image's crops in crop_names order, [0, 1] tensors (the photometric ops run later, on
    the device batch): a and b = RandomResizedCrop + hflip (loader/inv.py), their boxes (top, left,
    height, width as image fractions, the flip: the AugSelf loader's), EquiMod's centre view =
    Resize(256/224 S) + CenterCrop(S) (loader/equimod.py), E-SSL's and the local crops bilinear."""

    def __init__(self, args):
        self.args, self.names = args, crop_names(args)
        self.centre = transforms.Compose([transforms.Resize(round(args.resolution * 256 / 224)),
                                          transforms.CenterCrop(args.resolution),
                                          transforms.ToTensor()])

    def crop(self, image, name):
        """RandomResizedCrop, then the flip coin: Compose([it, RandomHorizontalFlip])'s draws."""
        args, size, interp = self.args, local_side(self.args), "bilinear"
        scale = ROTATE_SCALE if name == "rotate" else LOCAL_SCALE
        if name in ("a", "b"):
            size, interp, scale = args.resolution, args.interp, (args.crop_min, 1.0)
        top, left, h, w = transforms.RandomResizedCrop.get_params(image, scale, (3 / 4, 4 / 3))
        mode = getattr(transforms.InterpolationMode, interp.upper())
        out = transforms.functional.resized_crop(image, top, left, h, w, [size, size], mode)
        flip = bool(torch.rand(1) < 0.5)
        box = [top / image.height, left / image.width, h / image.height, w / image.width, flip]
        out = transforms.functional.hflip(out) if flip else out
        return transforms.functional.to_tensor(out), torch.tensor(box, dtype=torch.float32)

    def __call__(self, image):
        made = {"centre": self.centre(image)} if "centre" in self.names else {}
        for name in self.names:
            if name not in made and not name.startswith("box"):
                made[name], made["box_" + name] = self.crop(image, name)
        return tuple(made[name] for name in self.names)


def grayscale(x):
    """ITU-R 601 luma: (B, 3, H, W) -> (B, 1, H, W)."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def random_factors(batch, strength, device):
    """Per-image factors 1 + U(-strength, strength), shaped (B, 1, 1, 1)."""
    return 1 + strength * (2 * torch.rand(batch, 1, 1, 1, device=device) - 1)


def color_jitter(x, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, record=None):
    """ColorJitter(0.4, 0.4, 0.2, 0.1) with per-image factors, on the batch; record (a dict) gets
    the factors' codes jitter_w (B, 4) = (factor - 1) / (max - min), hue in turns (AugSelf's).
    Deviation: a fixed order instead of a random one, and hue rotates the chroma plane in YIQ
    space instead of shifting the HSV hue (one batched matrix per image, no per-pixel branches)."""
    batch, device = x.shape[0], x.device
    factors = [random_factors(batch, v, device) for v in (brightness, contrast, saturation)]
    x = (x * factors[0]).clamp(0, 1)
    mean = grayscale(x).mean((1, 2, 3), keepdim=True)
    x = ((x - mean) * factors[1] + mean).clamp(0, 1)
    gray = grayscale(x)
    x = ((x - gray) * factors[2] + gray).clamp(0, 1)
    turn = 2 * torch.rand(batch, device=device) - 1
    theta = 2 * math.pi * hue * turn
    if record is not None:
        strengths = (brightness, contrast, saturation)
        record["jitter_w"] = torch.cat([(f.view(batch, 1) - 1) / (2 * v) for f, v in
                                        zip(factors, strengths)] + [turn.view(batch, 1) / 2], 1)
    cos, sin = theta.cos(), theta.sin()
    one, zero = torch.ones_like(theta), torch.zeros_like(theta)
    rotation = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], 1).view(batch, 3, 3)
    # (B, 3, 3): RGB -> YIQ, rotate (I, Q), back to RGB. The inverse is taken on the CPU and
    # copied non_blocking: no host sync on CUDA.
    yiq_inverse = torch.linalg.inv(YIQ).to(device, non_blocking=True)
    mix = yiq_inverse @ rotation @ YIQ.to(device, non_blocking=True)
    return torch.einsum("bij,bjhw->bihw", mix, x).clamp(0, 1)


def gaussian_blur(x, sigma, k=9):
    """Per-image Gaussian blur, k x k kernel, std sigma (B,); separable, reflect padding."""
    B, C, H, W = x.shape
    k = min(k, 2 * ((min(H, W) - 1) // 2) + 1)      # reflect padding needs k // 2 < the side
    offsets = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    kernel = torch.exp(-offsets ** 2 / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)     # (B C, k)
    y = F.pad(x.reshape(1, B * C, H, W), (k // 2,) * 4, mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=B * C)                     # along rows
    y = F.conv2d(y, kernel[:, None, :, None], groups=B * C)                     # along columns
    return y.reshape(B, C, H, W)


def solarize(x):
    """Per-image solarisation with a threshold drawn from U(0, 1), as the released pipeline's
    kornia RandomSolarize(thresholds=0.5, additions=0) does (builder/utils.py, Aug_equi:
    thresholds=0.5 means 0.5 +- 0.5, not a fixed 0.5); BYOL's PIL solarise fixes it at 128/255."""
    threshold = torch.rand(x.shape[0], 1, 1, 1, device=x.device)
    return torch.where(x < threshold, x, 1 - x)


def coin(p, batch, device):
    """A per-image coin that shows heads with probability p, shaped (B, 1, 1, 1)."""
    return torch.rand(batch, 1, 1, 1, device=device) < p


def photometric(x, blur_p, solarize_p, gray_p=0.2, saturation=0.2, blur_k=9, record=None):
    """BYOL's asymmetric pipelines (Grill et al. 2020, Tab. 6), as the released Aug_equi: jitter
    p 0.8, grayscale p gray_p, Gaussian blur (k blur_k, sigma ~ U(0.1, 2)) p blur_p, solarise
    (random threshold) p solarize_p; every coin per image. Each coin is drawn before the op it
    gates. record (a dict) gets the applied parameters, (B, 1) or (B, 4), 0 where no op ran."""
    batch, device = x.shape[0], x.device
    jitter = coin(0.8, batch, device)
    x = torch.where(jitter, color_jitter(x, saturation=saturation, record=record), x)
    gray = coin(gray_p, batch, device)
    x = torch.where(gray, grayscale(x).expand_as(x), x)
    blur = coin(blur_p, batch, device)
    sigma = 0.1 + 1.9 * torch.rand(batch, device=device)
    x = torch.where(blur, gaussian_blur(x, sigma, blur_k), x)
    solar = torch.zeros_like(blur)
    if solarize_p:
        solar = coin(solarize_p, batch, device)
        x = torch.where(solar, solarize(x), x)
    if record is not None:
        flags = {"jitter": jitter, "gray": gray, "blur": blur, "solarize": solar}
        record.update({k: v.view(batch, 1).float() for k, v in flags.items()})
        record.update(jitter_w=record["jitter_w"] * record["jitter"],
                      sigma=sigma.view(batch, 1) * record["blur"])
    return x


PIPELINES = ((1.0, 0.0), (0.1, 0.2))     # t1, t2 as (blur p, solarise p)
# + (gray p, saturation, blur kernel): loader/local4.py :: inv_local, Aug_equi.inv_rotate (E-SSL),
# AugSelf's own on both views (augself branch, builder/utils.py :: load_equiv_aug_augself).
LOCAL_PIPELINE, ROTATE_PIPELINE, AUGSELF_PIPELINE = (0.5, 0, 0), (0.1, 0), (0.5, 0, 0.2, 0.4, 23)


def normalize(x):
    """[0, 1] images -> ImageNet mean / std (copied non_blocking: no host sync)."""
    mean = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1).to(x.device, non_blocking=True)
    std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1).to(x.device, non_blocking=True)
    return (x - mean) / std


# ================================ flags ================================
# The command line, with eval.py's parser and number types: a bad value, or a bad mix of flags,
# is one "error:" line and exit 2.
COUNT = eval.number(int, 0)
POSITIVE_INT = eval.number(int, 1)
POSITIVE = eval.number(float, 0, 1e6, low_open=True)    # 1e6: above any sensible value
NONNEGATIVE = eval.number(float, 0, 1e6)
FRACTION = eval.number(float, 0, 1)             # momenta, end fractions, --drop-path < 1
SHARE = eval.number(float, 0, 1, low_open=True)     # --crop-min, --b2-ratio < 1


FLAG_USERS = {"--augself-crop": ("augself",), "--augself-color": ("augself",),
              "--b2-ratio": ("ser", "none"), "--token-dim": ("ser", "none"),
              "--ser-negatives": ("ser", "none"), "--ser-tau": ("ser", "none", "equimod")}


def parse_args(argv=None):
    """The flags, the preset's defaults, then the checks that span several flags."""
    p = eval.ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=("toy", "paper"), default="toy",
                   help="toy: CPU minutes, generated data; paper: the released run_pretrain.sh")
    p.add_argument("--base", choices=("moco", "dino", "bt"), default="moco",
                   help="the invariant SSL method")
    flags = p.add_argument_group("data")
    flags.add_argument("--data-root", help="ImageFolder root (train/<wnid>/*.JPEG)")
    flags.add_argument("--resolution", type=POSITIVE_INT, help="crop side in px (paper 224)")
    flags.add_argument("--crop-min", type=SHARE, help="RandomResizedCrop min scale")
    flags.add_argument("--interp", choices=("bilinear", "bicubic"), help="crop interpolation")
    flags.add_argument("--num-workers", type=COUNT, help="DataLoader workers per rank")
    flags = p.add_argument_group("ViT (delayed [CLS])")
    flags.add_argument("--patch", type=POSITIVE_INT, help="patch side in px (paper 16)")
    flags.add_argument("--dim", type=POSITIVE_INT, help="token width (ViT-S 384)")
    flags.add_argument("--depth", type=POSITIVE_INT, help="blocks (ViT-S 12)")
    flags.add_argument("--heads", type=POSITIVE_INT, help="attention heads (ViT-S 6)")
    flags.add_argument("--drop-path", type=FRACTION, help="stochastic depth of the last block")
    flags = p.add_argument_group("base method (released run_pretrain.sh)")
    flags.add_argument("--head-hidden", type=POSITIVE_INT, help="projector/predictor hidden width")
    flags.add_argument("--head-dim", type=POSITIVE_INT, help="head output (dino: prototypes)")
    flags.add_argument("--head-bottleneck", type=POSITIVE_INT, help="DINO head bottleneck")
    flags.add_argument("--moco-tau", type=POSITIVE, default=0.2, help="MoCo-v3 temperature")
    flags.add_argument("--momentum", type=FRACTION, help="EMA momentum at step 0, cosine to 1")
    flags.add_argument("--student-temp", type=POSITIVE, default=0.1,
                       help="DINO student temperature")
    flags.add_argument("--teacher-temp0", type=POSITIVE, default=0.04,
                       help="DINO teacher temperature at step 0")
    flags.add_argument("--teacher-temp", type=POSITIVE, default=0.07,
                       help="DINO teacher temperature after its warm-up")
    flags.add_argument("--teacher-temp-epochs", type=COUNT, help="DINO teacher-temp. warm-up")
    flags.add_argument("--center-momentum", type=FRACTION, default=0.9, help="DINO centre momentum")
    flags.add_argument("--freeze-last-epochs", type=COUNT, help="DINO: last layer frozen, epochs")
    flags.add_argument("--bt-lambda", type=NONNEGATIVE, default=0.0051, help="Barlow Twins' lambda")
    flags = p.add_argument_group("SER")
    flags.add_argument("--ser", choices=("on", "off"), default="on", help="off: the vanilla base")
    flags.add_argument("--ser-layer", type=POSITIVE_INT,
                       help="block L whose tokens get L_equiv; [CLS] joins after it (paper 3); "
                            "an add-on reads block L's [CLS] (default: the last block)")
    flags.add_argument("--ser-lambda", type=NONNEGATIVE, help="weight of L_equiv (0: logged only)")
    flags.add_argument("--ser-tau", type=POSITIVE, help="token NT-Xent temperature")
    flags.add_argument("--ser-negatives", choices=("target", "both"), default="target",
                       help="negatives: other images' target tokens (released code), or "
                            "both: also their anchor tokens (the paper's equation)")
    flags.add_argument("--b2-ratio", type=SHARE, help="b2's share of each per-rank batch")
    flags.add_argument("--token-dim", type=POSITIVE_INT, help="token projector width (paper 512)")
    flags = p.add_argument_group("compared add-ons and views (the released code's other modes)")
    flags.add_argument("--equiv-objective", choices=tuple(OBJECTIVE), default="ser",
                       help="with --ser on: SER, or an add-on in its place on the same ViT "
                            "(--ser-layer < --depth: layer-decoupled)")
    flags.add_argument("--augself-crop", type=NONNEGATIVE, default=0.5, help="AugSelf: crop weight")
    flags.add_argument("--augself-color", type=NONNEGATIVE, default=0.5, help="AugSelf: jitter")
    flags.add_argument("--local-crops", type=int, choices=(0, 4), default=0,
                       help="4: the 2+4 views (moco; with SER, E-SSL or --ser off)")
    flags = p.add_argument_group("optimisation (released run_pretrain.sh)")
    flags.add_argument("--epochs", type=POSITIVE_INT, help="pretraining epochs (paper 100)")
    flags.add_argument("--warmup-epochs", type=COUNT, help="linear lr warm-up (paper 10)")
    flags.add_argument("--batch-size", type=POSITIVE_INT, help="GLOBAL batch (paper 2048)")
    flags.add_argument("--blr", type=POSITIVE, help="base lr: lr = blr x batch / 256")
    flags.add_argument("--min-lr-frac", type=FRACTION, help="final lr / peak lr")
    flags.add_argument("--wd", type=NONNEGATIVE, help="AdamW weight decay at step 0")
    flags.add_argument("--wd-end", type=NONNEGATIVE, help="weight decay at the end, cosine")
    flags.add_argument("--clip-grad", type=NONNEGATIVE,
                       help="per-parameter grad-norm clip, 0 = off (bt: see barlow_twins_loss)")
    eval.add_run_flags(p, "ser", log_every=10)
    # --preset and --base (read without -h) set the defaults, in --help too. This comes after
    # every add_argument, whose own default= would otherwise win over the preset.
    argv = sys.argv[1:] if argv is None else argv
    known = p.parse_known_args([a for a in argv if a not in ("-h", "--help")])[0]
    p.set_defaults(**preset_defaults(known.preset, known.base, known.equiv_objective))
    args = p.parse_args(argv)
    if args.equiv_objective != "ser" and args.ser == "off":
        p.error(f"argument --equiv-objective: {args.equiv_objective} takes SER's place; --ser off "
                f"trains the base alone")
    args.ser_layer = args.ser_layer or args.depth       # an add-on's preset 0: the last block
    if args.local_crops and (args.base != "moco" or objective(args) in ("augself", "equimod")):
        p.error("argument --local-crops: the 2+4 views are for --base moco with SER, E-SSL or "
                "--ser off (the released erl_local4, inv_local4)")
    if args.equiv_objective == "augself" and args.augself_crop == args.augself_color == 0:
        p.error("argument --augself-crop: 0 with --augself-color 0 leaves AugSelf nothing to do")
    given = {a.split("=")[0] for a in argv}             # an objective's own flags, given to
    for flag, users in FLAG_USERS.items():              # another, are refused, not ignored
        if flag in given and objective(args) not in users:
            p.error(f"argument {flag}: --equiv-objective {objective(args)} does not use it")
    if args.drop_path == 1:
        p.error("argument --drop-path: 1 would divide by 1 - p = 0 (stochastic depth)")
    if args.b2_ratio == 1:
        p.error("argument --b2-ratio: 1 leaves b1 empty")
    if args.resolution % args.patch or args.resolution < 2 * args.patch:
        p.error(f"--resolution {args.resolution} must be a multiple of --patch {args.patch} and "
                f"at least twice it (a token grid of at least 2 x 2 for rho_g to act on)")
    if args.dim % args.heads:
        p.error(f"--dim {args.dim} must be a multiple of --heads {args.heads}")
    if not 1 <= args.ser_layer <= args.depth:
        p.error(f"--ser-layer must be in 1..{args.depth} (the ViT's blocks)")
    if args.warmup_epochs > args.epochs:
        p.error(f"--warmup-epochs {args.warmup_epochs} exceeds --epochs {args.epochs}: the lr "
                f"would never reach its peak")
    eval.check_run_flags(p, args)
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_batch = args.batch_size // world
    b2 = b2_size(local_batch, args)
    if objective(args) == "ser" and not 2 <= b2 < local_batch:
        p.error(f"--b2-ratio {args.b2_ratio} gives {b2} of {local_batch} images per rank to b2; "
                f"L_equiv needs >= 2 (other images are its negatives) and b1 >= 1 (change "
                f"--b2-ratio or --batch-size)")
    if args.run_dir is None:
        args.run_dir = os.path.join("runs", "-".join(["ser", args.preset, args.base]
                                                     + run_tags(args)))
    return args


def run_tags(args):
    """The run's tags, one run dir per README row: vanilla or add-on, L, lambda off the preset, 2+4,
    seed."""
    tags = []
    if args.ser == "off":
        tags.append("vanilla")
    else:
        defaults = preset_defaults(args.preset, args.base, args.equiv_objective)
        defaults["ser_layer"] = defaults["ser_layer"] or args.depth
        tags += [args.equiv_objective] if args.equiv_objective != "ser" else []
        for tag, key in (("L", "ser_layer"), ("lam", "ser_lambda")):
            if getattr(args, key) != defaults[key]:
                tags.append(f"{tag}{getattr(args, key):g}")
    if args.local_crops:
        tags.append(f"local{args.local_crops}")
    if args.seed:
        tags.append(f"s{args.seed}")
    return tags


# ============ harness: the same text in sie.py, baselines.py and ser.py ============
# The training machinery, word for word the same in the three scripts (a test compares them).
# eval.py owns checkpoints and the run-dir lock; data.py checks the data. It takes from above:
# parse_args, build_model, probeable, make_optimizer, schedule, train_step, monitor_metrics,
# make_dataset, to_device, SCRIPT, DATA_KIND, ITEM, DROP_LAST, MEMORY_FORMAT, RUN_LENGTH_FLAGS.

# ---- processes (eval.py starts and ends the process group, for evaluation too) ----
def print0(*msg, file=sys.stdout):
    if eval.main_process():
        print(*msg, file=file, flush=True)


class FullGather(torch.autograd.Function):
    """all_gather that keeps gradients. Every rank computes the same global loss on the gathered
    batch, so the gradient of its own rows is the SUM of all ranks' incoming gradients; DDP then
    averages over ranks, which gives exactly the full-batch gradient."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        grad = torch.stack(grads)
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


def gather(x):
    """(n_local, ...) -> (n_global, ...), rank-major, differentiable; identity in one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return torch.cat(FullGather.apply(x))


def autocast(args, device):
    """--amp bf16|fp16 autocast on CUDA only; CPU runs in fp32."""
    dtype = torch.float16 if args.amp == "fp16" else torch.bfloat16
    enabled = device.type == "cuda" and args.amp != "none"
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


# ---- start-up: rank 0 does the one-time work and every cheap check before the first step ----
def start_up(args):
    """Rank 0 generates the default data set if missing, checks the data (data.py), the eval
    protocols, the run dir (locked) and the checkpoint to resume (eval.py). The others wait;
    then all stop together on a problem (exit 2), which rank 0 alone prints."""
    problem = None
    if eval.main_process():
        try:
            root = data.ensure(args.data_root, DATA_KIND)
            data.preflight(root, DATA_KIND)             # what the evaluation reads later, too
            data.check_batch(root, DATA_KIND, args.batch_size)
            if not args.no_eval:
                eval.check_protocols(args.eval_protocols, root, kind=DATA_KIND)
            eval.lock_run_dir(args.run_dir)
            if eval.resume_path(args):
                eval.read_checkpoint(eval.resume_path(args), SCRIPT, args, RUN_LENGTH_FLAGS)
        except (data.DataError, eval.RunError, ValueError) as e:
            problem = str(e)
    problem = eval.from_rank0(problem)
    if problem:
        raise eval.RunError(problem)


# ---- logging ----
def log_event(args, kind, **fields):
    """One JSON object per line in <run-dir>/log.jsonl, written by rank 0. The kinds: config
    (flags, argv, versions), resume, train (each loss term averaged over --log-every steps, the
    schedule, items/s, data_frac = the share of time spent waiting for data), online (the
    monitor, once per epoch), error (a non-finite loss) and eval (the summary)."""
    if eval.main_process():
        with open(os.path.join(args.run_dir, "log.jsonl"), "a") as log:
            log.write(json.dumps({"kind": kind, **fields}) + "\n")


# ---- the train loop ----
class NonFiniteLoss(RuntimeError):
    """The loss became inf/nan: training stops before the next checkpoint could store the damage."""


def make_loader(args, rank, world):
    """The method's training set, sharded over the processes: the global order of the items
    depends only on (seed, epoch), so 1 and N processes see the same global batches."""
    root = data.ensure(args.data_root, DATA_KIND)
    dataset, collate_fn = make_dataset(args, root)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=DROP_LAST)
    loader = DataLoader(dataset, batch_size=args.batch_size // world, sampler=sampler,
                        drop_last=DROP_LAST, num_workers=args.num_workers,
                        pin_memory=torch.cuda.is_available(), collate_fn=collate_fn)
    return loader, root


def setup_run(args, rank, world, device):
    """Data, model, optimiser, scaler; resumes from the run dir's checkpoint when there is one."""
    torch.manual_seed(args.seed)                 # the same initial weights on every rank
    random.seed(args.seed)
    np.random.seed(args.seed)
    loader, root = make_loader(args, rank, world)
    model = build_model(args).to(device, memory_format=MEMORY_FORMAT)
    if device.type == "cuda" and world > 1:      # BN statistics over the global batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.compile:                             # in place: no "_orig_mod." in state_dict keys
        model.compile()
    optimizer = make_optimizer(model, args)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and args.amp == "fp16")
    epoch, step = 0, 0
    resume = eval.resume_path(args)
    if resume:
        ckpt = eval.read_checkpoint(resume, SCRIPT, args, RUN_LENGTH_FLAGS)
        epoch, step = eval.restore(ckpt, model, optimizer, scaler)
        print0(f"resumed from {resume}: {epoch} epochs done, step {step}")
        log_event(args, "resume", checkpoint=resume, epoch=epoch, step=step, world_size=world)
    else:
        log_event(args, "config", config=vars(args), argv=sys.argv,
                  versions=eval.versions(device, __file__), world_size=world)
        if eval.main_process():                  # the run dir keeps the code that produced it
            code_copy = os.path.join(args.run_dir, f"{SCRIPT}.py.txt")
            shutil.copyfile(os.path.abspath(__file__), code_copy)
    return loader, root, model, optimizer, scaler, epoch, step


def train(args, rank, world, device):
    """Pretrains; returns the unwrapped model, the data root, the final step, and whether all
    --epochs are done (not when --stop-after-epochs ended this invocation early)."""
    loader, root, model, optimizer, scaler, first_epoch, step = setup_run(args, rank, world, device)
    ddp = model
    if world > 1:
        ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    end = args.epochs
    if args.stop_after_epochs:
        end = min(args.epochs, first_epoch + args.stop_after_epochs)
    bar = tqdm(total=args.epochs * len(loader), initial=step, unit="step", dynamic_ncols=True,
               disable=not eval.main_process())
    for epoch in range(first_epoch, end):
        loader.sampler.set_epoch(epoch)                  # data order = f(seed, epoch)
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)              # its draws = f(seed, epoch, item)
        # every other draw (augmentations, workers) = f(seed, epoch, rank): resumes repeat it
        torch.manual_seed((args.seed * 100_003 + epoch) * 1_009 + rank)
        ddp.train()
        window, epoch_sums, n_window, items = {}, {}, 0, 0
        bad_step = torch.full((), -1, device=device)
        t_start = t_wait = time.perf_counter()
        t_data = 0.0
        for i, batch in enumerate(loader):
            t_data += time.perf_counter() - t_wait
            terms, sums = train_step(ddp, to_device(batch, device, args), optimizer, scaler, args,
                                     step, len(loader))
            # Device-side bookkeeping only: no .item() in the step, one sync per log line.
            finite = torch.isfinite(terms["total"])
            bad_step = torch.where(finite | (bad_step >= 0), bad_step, step + 1)
            window = {k: window.get(k, 0) + v for k, v in terms.items()}
            epoch_sums = {k: epoch_sums.get(k, 0) + v for k, v in sums.items()}
            step, n_window, items = step + 1, n_window + 1, items + len(batch[-1]) * world
            bar.update()
            t_wait = time.perf_counter()
            if step % args.log_every and i < len(loader) - 1:
                continue
            if dist.is_initialized():
                dist.all_reduce(bad_step, op=dist.ReduceOp.MAX)   # first bad step on any rank
            bad = int(bad_step.item())
            means = {k: v / (n_window * world) for k, v in eval.sum_over_ranks(window).items()}
            if bad >= 0:
                log_event(args, "error", epoch=epoch, step=bad, terms=means)
                raise NonFiniteLoss(f"non-finite loss at step {bad} (epoch {epoch}); loss terms "
                                    f"averaged over steps {step - n_window + 1}-{step}: {means}; "
                                    f"{args.run_dir}/checkpoint.pt keeps the last good state")
            elapsed = time.perf_counter() - t_start
            rates = {f"{ITEM}_per_s": items / elapsed, "data_frac": t_data / elapsed}
            log_event(args, "train", epoch=epoch, step=step,
                      **schedule(step - 1, args, len(loader)), **means, **rates)
            bar.set_postfix(ep=epoch, **{k: f"{v:.3f}" for k, v in means.items()})
            window, n_window, items, t_start, t_data = {}, 0, 0, time.perf_counter(), 0.0
        if epoch_sums:                                   # the online monitor, once per epoch
            log_event(args, "online", epoch=epoch, step=step,
                      **monitor_metrics(eval.sum_over_ranks(epoch_sums)))
        if eval.main_process():
            eval.save_checkpoint(os.path.join(args.run_dir, "checkpoint.pt"), SCRIPT, args, model,
                                 optimizer, scaler, epoch + 1, step)
        if dist.is_initialized():
            dist.barrier()                               # nobody runs ahead of a checkpoint write
    bar.close()
    return model, root, step, end == args.epochs


# ---- the evaluation call ----
def run_evaluation(model, args, root, step, device):
    """Exports the backbone (backbone.pt), then runs eval.py's protocols on the frozen model at
    the training resolution. Every rank calls it; rank 0 prints the table, writes eval.json."""
    if eval.main_process():
        eval.atomic_save(model.backbone.state_dict(), os.path.join(args.run_dir, "backbone.pt"))
    if args.no_eval:
        return
    model.eval()
    probe = probeable(model, args)
    probe.step = step
    result = eval.evaluate(probe, root, protocols=args.eval_protocols.split(","), kind=DATA_KIND,
                           out_dir=args.run_dir, device=device, preset=args.preset,
                           size=args.resolution)
    log_event(args, "eval", step=step, summary=result["summary"])


# ---- main ----
def main(argv=None):
    args = parse_args(argv)
    device = eval.default_device()              # cuda:LOCAL_RANK, or the CPU
    eval.start_process_group(device)            # torchrun's NCCL / gloo group; none without it
    rank, world = eval.world()
    clean = False
    try:
        start_up(args)
        model, root, step, done = train(args, rank, world, device)
        if done:
            run_evaluation(model, args, root, step, device)
        clean = True
    except eval.RunError as e:               # one message from rank 0, no traceback
        print0(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except data.DataError as e:              # found by whichever rank read the bad file
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        print0(f"\ninterrupted; rerun the same command to resume from {args.run_dir}/checkpoint.pt")
        sys.exit(130)
    finally:
        eval.end_process_group(clean)
        eval.unlock_run_dirs()


if __name__ == "__main__":
    main()
