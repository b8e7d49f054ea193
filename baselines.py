"""The methods SIE (Garrido, Najman, LeCun, ICML 2023, https://arxiv.org/abs/2302.10283) is compared
with on 3DIEBench, as the official SIE code (https://github.com/facebookresearch/SIE) has them in
src/models.py; one file: model, loss, DDP training, exact resume, evaluation. --method picks one.

    vicreg           VICReg (Bardes, Ponce, LeCun, ICLR 2022) https://arxiv.org/abs/2105.04906
    simclr           SimCLR (Chen et al., ICML 2020) https://arxiv.org/abs/2002.05709
    simclr-augself   SimCLR + AugSelf (Lee et al., NeurIPS 2021) https://arxiv.org/abs/2111.09613
    equimod-simclr   EquiMod (Devillers, Lefort, ICLR 2023) https://arxiv.org/abs/2211.01244
    equimod-vicreg   EquiMod on VICReg, as the official SIE code has it
    vicreg-partinv   SIE's ablation: VICReg whose invariance term leaves the last e dims out
    simclr-onlyequi  SIE's ablation: SimCLR between the predicted and the actual embedding

Every method sees sie.py's data: two renderings x, x' of one 3-D object that differ by a rotation
g (the relative quaternion, scalar last; with --rot-color also the two hue differences). One
ResNet-18 maps each image to a 512-d representation y, a projector maps y to an embedding z of
width D (the last --mlp width). p(z, g) is SIE's predictor W(g) z, where a hypernetwork makes the
matrix W(g) from g (--predictor mlp: a Linear on [g; z]). Each loss is written above its code.

    x, x' (B, 3, S, S) --ResNet-18--> y, y' (B, 512) --projector--> z, z' (B, D)
    EquiMod:   y, y' --second projector--> z_equi, z'_equi (B, D);  p(z_equi, g) (B, D)
    only-equi: p(z, g) (B, D);  AugSelf: [y; y'] (B, 1024) --phi--> (B, 4 or 6), against g

Nothing runs at import; the training harness after the flags is the same text in all three scripts.

    python baselines.py --method simclr                     # toy preset: CPU, generated data
    torchrun --standalone --nproc_per_node=2 baselines.py --method vicreg     # 2 processes
    torchrun --standalone --nproc_per_node=8 baselines.py --method equimod-vicreg --preset paper \\
        --data-root /data/3DIEBench
"""
import argparse
import json
import os
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import data
import eval  # noqa: A004 (the project's eval.py; the builtin eval() is never used here)

# ================================== presets ==================================
# --preset fills the flags' defaults; the command line overrides them. Both match sie.py's
# presets (data, resolution, batch, epochs, total projector width), so the numbers compare.
PRESETS = {
    # sie.py's toy run; 64-64-64 is the total width of sie.py's two toy projectors (2 x 32), and
    # vicreg-partinv leaves the last 32 of the 64 embedding dims out of its invariance term.
    "toy": dict(epochs=140, batch_size=32, resolution=32, mlp="64-64-64", equi_emb_dims=32,
                num_workers=0),
    # The official comparison: the SIE README command, with the baseline's --experience.
    "paper": dict(epochs=2000, batch_size=1024, resolution=256, mlp="2048-2048-2048",
                  sim_coeff=10.0, std_coeff=10.0, cov_coeff=1.0, temperature=0.1,
                  augself_weight=1.0, equi_emb_dims=256, lr=1e-3, wd=1e-6, num_workers=8),
}
METHODS = ("vicreg", "simclr", "simclr-augself", "equimod-simclr", "equimod-vicreg",
           "vicreg-partinv", "simclr-onlyequi")
PREDICTS = ("equimod-simclr", "equimod-vicreg", "simclr-onlyequi")    # those with a p(z, g)
USES_G = PREDICTS + ("simclr-augself",)                               # those that read g
VICREG_BASED = ("vicreg", "equimod-vicreg", "vicreg-partinv")
SIMCLR_BASED = ("simclr", "simclr-augself", "equimod-simclr", "simclr-onlyequi")
# The flags one method family reads: given with another method, they are refused, not ignored.
FLAG_USERS = {"--sim-coeff": VICREG_BASED, "--std-coeff": VICREG_BASED,
              "--cov-coeff": VICREG_BASED, "--temperature": SIMCLR_BASED,
              "--augself-weight": ("simclr-augself",),
              "--equi-factor": ("equimod-simclr", "equimod-vicreg"),
              "--equi-emb-dims": ("vicreg-partinv",)}
# EquiMod's alpha without --equi-factor, never the official argparse default 4.5 (a forgotten flag
# would weigh the equivariant term 4.5 x). SimCLR: 1, EquiMod's lambda, as SimCLREquiModRotColor
# and seq-JEPA's re-runs (App. A.3); VICReg: 0.45, the SIE README's (MSE weight 10 x 0.45 = 4.5).
EQUI_FACTOR = {"equimod-simclr": 1.0, "equimod-vicreg": 0.45}
REPR_DIM = 512                   # the ResNet-18 representation
MIN_RESOLUTION = 24              # the smallest image side the ResNet-18's stride-2 stages accept
SCRIPT = "baselines"             # the checkpoint's "script" field (eval.py accepts only ours)
DATA_KIND = "3DIEBench"          # the on-disk layout data.py reads (and generates by default)
ITEM = "pairs"                   # what one batch row is, for the throughput log
DROP_LAST = False                # the last, smaller batch of an epoch is trained on
MEMORY_FORMAT = torch.channels_last   # faster ResNet convolutions, the same maths
# Flags that may change between a run and its resumption (the lr is constant, so --epochs may grow).
RUN_LENGTH_FLAGS = eval.RESUMABLE_FLAGS | {"epochs"}

# ================================ the method ================================
# From the harness below: gather (the autograd all-gather over processes) and autocast (CUDA only).


# ---- the backbone: the official ResNet-18 variant (official code, src/resnet.py) ----
class BasicBlock(nn.Module):
    """The official block: the stride sits on conv2, after an asymmetric zero pad (0, 1, 0, 1).
    Every stage's first block has a 1x1 projection shortcut, layer1's included."""

    def __init__(self, c_in, c_out, stride, project):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1)) if stride == 2 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride, 0 if stride == 2 else 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                       nn.BatchNorm2d(c_out)) if project else nn.Identity())

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(self.pad(out)))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """The official ResNet-18, not torchvision's: 11,180,736 parameters, (B, 3, S, S) -> (B, 512).
    At S = 256 the stages are 128 -> 64 -> 64 -> 32 -> 16 -> 8, then global average pooling."""

    def __init__(self):
        super().__init__()
        self.stem_pad = nn.ZeroPad2d((2, 3, 2, 3))          # left 2, right 3, top 2, bottom 3
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages = []
        for c_in, c_out, stride in ((64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)):
            first = BasicBlock(c_in, c_out, stride, project=True)
            stages.append(nn.Sequential(first, BasicBlock(c_out, c_out, 1, project=False)))
        self.layers = nn.Sequential(*stages)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)         # zero_init_residual: blocks start as identity

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(self.stem_pad(x))))
        x = F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=-1e4), 3, 2)   # -1e4 pad: never the max
        return torch.flatten(F.adaptive_avg_pool2d(self.layers(x), 1), 1)


# ---- the heads the methods share (official code, src/models.py, Projector) ----
def projector(d_in, widths):
    """Linear-BN-ReLU for every layer but the last, a bias-free Linear (VICReg, Sec. 4.2).
    widths: e.g. [2048, 2048, 2048], which has 9,449,472 parameters from d_in = 512."""
    dims = [d_in] + list(widths)
    layers = []
    for d_layer_in, d_layer_out in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(d_layer_in, d_layer_out), nn.BatchNorm1d(d_layer_out),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Linear(dims[-2], dims[-1], bias=False))


class HypernetPredictor(nn.Module):
    """p(z, g) = W(g) z: SIE's hypernetwork predictor (official code, src/hypernetwork.py,
    HyperNet), which the SIE code also gives EquiMod and SimCLR only-equi. H is one bias-free
    Linear(k, d * d): 16,777,216 parameters at d = 2048, k = 4. z: (B, d), g: (B, k)."""

    def __init__(self, d, g_dim=4, deep=False):
        super().__init__()
        self.d = d
        self.hyper_in = nn.Identity()
        if deep:      # --hypernet deep: two bias-free Linear(k, k) + ReLU before H (width k)
            self.hyper_in = nn.Sequential(nn.Linear(g_dim, g_dim, bias=False), nn.ReLU(),
                                          nn.Linear(g_dim, g_dim, bias=False), nn.ReLU())
        self.hyper = nn.Linear(g_dim, d * d, bias=False)             # H, weight (d * d, k)

    def forward(self, z, g):
        # Materialised: W(g) = reshape(H c) row-major, c = hyper_in(g) (= g for --hypernet linear);
        # W is linear in c, so W(g) z = sum_k c_k (A_k z), A_k[o, i] = H[o * d + i, k]: no (B, d, d)
        # tensor. test_hypernet_predictor_equals_materialised_weights checks that the two agree.
        c = self.hyper_in(g)                                 # (B, k)
        A = self.hyper.weight.view(self.d, self.d, -1)       # A[o, i, k]
        Az = torch.einsum("oik,bi->bko", A, z)               # A_k z for every k: (B, k, d)
        return torch.einsum("bk,bko->bo", c, Az)


class MLPPredictor(nn.Linear):
    """--predictor mlp (official code, src/predictors.py, MLPPredictor, at its default depth 1):
    p(z, g) = Linear([g; z]), closer to EquiMod's own predictor than W(g) z."""

    def __init__(self, d, g_dim=4):
        super().__init__(d + g_dim, d)

    def forward(self, z, g):
        return super().forward(torch.cat([g, z], dim=1))


# ---- the losses, one section per method ----
# Under DDP the MSE terms are per-rank means (DDP's gradient averaging makes them global); the
# variance, covariance and NT-Xent terms see the batch of every process, with gradients, in fp32
# with autocast off (.float() alone is not: autocast would run their matmuls in bf16 again).

# ---- VICReg (official code, src/models.py, VICReg) ----
# L = l_sim * MSE(Z, Z') + l_std * (V(Z)/2 + V(Z')/2) + l_cov * (C(Z) + C(Z'))     (Eq. 6)
# V(Z) = mean_j max(0, 1 - sqrt(Var(Z_j) + 1e-4))                                 (Eqs. 1-2)
# C(Z) = sum_{i != j} Cov(Z)_ij^2 / D,  Cov(Z) = Zc^T Zc / (N - 1), Zc centred    (Eqs. 3-4)
# with l_sim = 10, l_std = 10, l_cov = 1; Z, Z' the (N, D) embeddings of all x, all x'.
def variance_loss(z):
    return F.relu(1.0 - torch.sqrt(z.var(dim=0) + 1e-4)).mean()


def covariance_loss(z, divisor):
    with torch.autocast(z.device.type, enabled=False):      # the matmul in fp32
        z = z.float() - z.float().mean(dim=0)
        cov = z.T @ z / divisor
        return (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / z.shape[1]


def vicreg_regularizer(z1, z2, batch_size=None):
    """(V(Z)/2 + V(Z')/2, C(Z) + C(Z')). Like the SIE code, C divides by the command line's
    GLOBAL batch_size - 1, even for a smaller last batch (None: by the real count - 1)."""
    Z1 = gather(z1.float())                     # (global batch, D): all processes' rows
    Z2 = gather(z2.float())
    divisor = (batch_size or Z1.shape[0]) - 1
    # Deviation: the 1/2 per view is the official VICReg code's; the paper's Eq. 6 has none.
    variance = variance_loss(Z1) / 2 + variance_loss(Z2) / 2
    covariance = covariance_loss(Z1, divisor) + covariance_loss(Z2, divisor)
    return variance, covariance


def vicreg_loss(z1, z2, batch_size=None, sim_coeff=10.0, std_coeff=10.0, cov_coeff=1.0,
                n_inv=None):
    """-> the unweighted terms 'inv', 'std', 'cov' and the weighted 'loss'. n_inv: the
    invariance covers the first n_inv embedding dims only (part-inv; None: all D)."""
    # Deviation: the invariance is the mean over all N x D entries, the official code's
    # F.mse_loss; the paper's Eq. 5 sums over the D dims (the same up to a factor D in l_sim).
    terms = {"inv": F.mse_loss(z1[:, :n_inv].float(), z2[:, :n_inv].float())}   # per rank
    terms["std"], terms["cov"] = vicreg_regularizer(z1, z2, batch_size)
    terms["loss"] = (sim_coeff * terms["inv"] + std_coeff * terms["std"]
                     + cov_coeff * terms["cov"])
    return terms


# ---- SimCLR (official code, src/models.py, SimCLR.info_nce_loss) ----
# L = NT-Xent(Z, Z'), the mean over the 2N rows r_i of [Z; Z'] of                    (Eq. 1)
#     -log( exp(cos(r_i, r_i+-N) / tau) / sum_{k != i} exp(cos(r_i, r_k) / tau) ),  tau = 0.1
# Row i's negatives are the other 2N - 2 rows, from every process.
def nt_xent(a, b, temperature=0.1):
    with torch.autocast(a.device.type, enabled=False):      # the logits matmul in fp32
        rows = torch.cat([gather(a.float()), gather(b.float())])
        rows = F.normalize(rows, dim=1)                              # (2N, d)
        n = rows.shape[0] // 2
        logits = rows @ rows.T / temperature
        logits = logits.fill_diagonal_(float("-inf"))                # no self-pairs
        positive = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(rows.device)
        return F.cross_entropy(logits, positive)


def simclr_loss(z1, z2, temperature=0.1):
    loss = nt_xent(z1, z2, temperature)
    return {"inv": loss, "loss": loss}


# ---- SimCLR + AugSelf (official code, src/models.py, SimCLRAugSelf) ----
# L = NT-Xent(Z, Z') + w * MSE(phi([y; y']), g),  w = 1                              (Sec. 3)
# phi regresses the relative transformation g from the two views' representations, which are NOT
# detached: the head's gradient shapes the backbone, the point of AugSelf.
def augself_head(repr_dim, g_dim):
    """phi at the SIE code's sizes: an MLP 2 * 512 -> 1024 -> 1024 -> k on [y; y'];
    2,103,300 parameters at k = 4."""
    # Deviation: AugSelf's own code uses 512-wide heads; these are the SIE comparison's widths.
    width = 2 * repr_dim
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True),
                         nn.Linear(width, width), nn.ReLU(inplace=True),
                         nn.Linear(width, g_dim))


def augself_loss(head, y1, y2, g):
    # Deviation: one order, as the SIE code; AugSelf's code also feeds [y'; y] (reversed target).
    prediction = head(torch.cat([y1, y2], dim=1))
    return F.mse_loss(prediction.float(), g.float())


def simclr_augself_loss(z1, z2, head, y1, y2, g, temperature=0.1, augself_weight=1.0):
    terms = {"inv": nt_xent(z1, z2, temperature), "augself": augself_loss(head, y1, y2, g)}
    terms["loss"] = terms["inv"] + augself_weight * terms["augself"]
    return terms


# ---- EquiMod, SimCLR version (official code, src/models.py, SimCLREquiMod) ----
# L = NT-Xent(Z_inv, Z'_inv) + alpha * NT-Xent(p(Z_equi, g), Z'_equi),  alpha = 1     (Sec. 3)
# Two projectors read all 512 dims of y: z_inv must not change with g, z_equi must move with g
# in a way the predictor p can forecast. pred = p(z1_equi, g).
def equimod_simclr_loss(z1_inv, z2_inv, pred, z2_equi, temperature=0.1, alpha=1.0):
    # Deviation: EquiMod predicts from an un-augmented x0, which 3DIEBench lacks: here view 1 ->
    # view 2, with the SIE code's predictor (a hypernetwork by default), not EquiMod's Linear + BN.
    terms = {"inv": nt_xent(z1_inv, z2_inv, temperature),
             "equi": nt_xent(pred, z2_equi, temperature)}
    terms["loss"] = terms["inv"] + alpha * terms["equi"]
    return terms


# ---- EquiMod, VICReg version (official code, src/models.py, VICRegEquiMod) ----
# L = VIC(Z_inv, Z'_inv) + alpha * [l_sim * MSE(p(Z_equi, g), Z'_equi)
#         + l_std * (V(Z_equi)/2 + V(Z'_equi)/2) + l_cov * (C(Z_equi) + C(Z'_equi))]
# VIC is the VICReg loss, alpha = 0.45. The SIE README calls this "a new VICReg based version".
def equimod_vicreg_loss(z1_inv, z2_inv, z1_equi, z2_equi, pred, batch_size=None, alpha=0.45,
                        sim_coeff=10.0, std_coeff=10.0, cov_coeff=1.0):
    """V and C act on the equivariant embeddings of both views, NOT on the predictions; the
    invariant and equivariant embeddings are not decorrelated from each other."""
    terms = vicreg_loss(z1_inv, z2_inv, batch_size, sim_coeff, std_coeff, cov_coeff)
    terms["equi"] = F.mse_loss(pred.float(), z2_equi.float())     # per-rank mean
    terms["std_equi"], terms["cov_equi"] = vicreg_regularizer(z1_equi, z2_equi, batch_size)
    equivariant = (sim_coeff * terms["equi"] + std_coeff * terms["std_equi"]
                   + cov_coeff * terms["cov_equi"])
    terms["loss"] = terms["loss"] + alpha * equivariant
    return terms


# ---- VICReg part-inv, SIE's ablation (official code, src/models.py, VICRegPartInv) ----
# L = VIC with its MSE on the first n_inv = D - e dims only (e = --equi-emb-dims), V and C on all
# D: the last e dims may vary with the view, but nothing ties them to g (SIE's split, no predictor).
def vicreg_partinv_loss(z1, z2, n_inv, batch_size=None, **weights):
    return vicreg_loss(z1, z2, batch_size, **weights, n_inv=n_inv)


# ---- SimCLR only-equi, SIE's ablation (official code, src/models.py, SimCLROnlyEqui) ----
# L = NT-Xent(p(Z, g), Z'): SimCLR where view 1's embedding is first moved by the predictor.
def simclr_onlyequi_loss(pred, z2, temperature=0.1):
    loss = nt_xent(pred, z2, temperature)
    return {"equi": loss, "loss": loss}


# ---- the model: its pieces, the online monitor (eval.py, OnlineEvaluator) and the loss ----
# No baseline splits its representation (EquiMod's projectors both read all 512 dims, part-inv
# splits the EMBEDDING): each is monitored and probed on all 512 dims, as the official evaluation.
PARTS = {"full": slice(0, REPR_DIM)}


class Baseline(nn.Module):
    """Backbone + the method's heads + online monitor. forward(x1, x2, g, labels) returns
    (total loss, the method's loss terms, monitor sums): the whole objective of one step."""

    def __init__(self, args):
        super().__init__()
        self.args = args
        mlp_widths = [int(w) for w in args.mlp.split("-")]
        g_dim = 6 if args.rot_color else 4
        self.backbone = ResNet18()
        self.projector = projector(REPR_DIM, mlp_widths)    # the invariant head, if there are two
        if args.method.startswith("equimod"):     # EquiMod's equivariant head, on all 512 dims
            self.proj_equi = projector(REPR_DIM, mlp_widths)
        if args.method in PREDICTS and args.predictor == "hypernet":
            self.predictor = HypernetPredictor(mlp_widths[-1], g_dim, args.hypernet == "deep")
        elif args.method in PREDICTS:
            self.predictor = MLPPredictor(mlp_widths[-1], g_dim)
        if args.method == "simclr-augself":
            self.augself = augself_head(REPR_DIM, g_dim)
        self.online = eval.OnlineEvaluator(PARTS)

    def forward(self, x1, x2, g, labels):
        y1 = self.backbone(x1)                 # two calls: BN statistics per view, as official
        y2 = self.backbone(x2)
        terms = method_loss(self, y1, y2, g, self.args)
        online_loss, sums = self.online(y1, y2, g[:, :4], labels)
        return terms["loss"] + online_loss, terms, sums


def method_loss(model, y1, y2, g, args):
    """args.method's heads and loss on the representations y1, y2 (B, 512) and g (B, 4 or 6)."""
    method, tau = args.method, args.temperature
    weights = dict(sim_coeff=args.sim_coeff, std_coeff=args.std_coeff, cov_coeff=args.cov_coeff)
    z1 = model.projector(y1)                   # (B, D)
    z2 = model.projector(y2)
    if method == "vicreg":
        return vicreg_loss(z1, z2, args.batch_size, **weights)
    if method == "simclr":
        return simclr_loss(z1, z2, tau)
    if method == "simclr-augself":
        return simclr_augself_loss(z1, z2, model.augself, y1, y2, g, tau, args.augself_weight)
    if method == "vicreg-partinv":
        n_inv = z1.shape[1] - args.equi_emb_dims
        return vicreg_partinv_loss(z1, z2, n_inv, args.batch_size, **weights)
    if method == "simclr-onlyequi":
        return simclr_onlyequi_loss(model.predictor(z1, g), z2, tau)
    z1_equi = model.proj_equi(y1)              # EquiMod: the equivariant head, (B, D)
    z2_equi = model.proj_equi(y2)
    pred = model.predictor(z1_equi, g)         # one direction only: x -> x'
    if method == "equimod-simclr":
        return equimod_simclr_loss(z1, z2, pred, z2_equi, tau, args.equi_factor)
    return equimod_vicreg_loss(z1, z2, z1_equi, z2_equi, pred, args.batch_size,
                               args.equi_factor, **weights)


# ---- the optimiser and one training step (the SIE README command) ----
def make_optimizer(model, args):
    """Adam, a constant lr, L2 weight decay on every parameter: no schedule to resume."""
    return torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.wd,
                            fused=next(model.parameters()).is_cuda)


def schedule(step, args, steps_per_epoch):
    return {"lr": args.lr}                      # for the log: the lr is constant


def train_step(model, batch, optimizer, scaler, args, step=0, steps_per_epoch=1):
    """Forward, loss, backward and the Adam step on a device batch (x1, x2, g, labels).
    Returns (loss terms, monitor sums), device tensors only: no host sync in the step."""
    x1, x2, g, labels = batch
    with autocast(args, x1.device):
        loss, terms, sums = model(x1, x2, g, labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    terms = {name: value.detach() for name, value in terms.items()}
    return {**terms, "total": loss.detach()}, sums


# ---- what the harness needs from this method ----
def make_dataset(args, root):
    """One item per training OBJECT: two distinct views, their relative rotation g (with
    --rot-color also the two hue differences) and the label. -> (dataset, collate_fn)."""
    dataset = data.Pairs3DIEBench(root, "train", size=args.resolution, color=args.rot_color,
                                  seed=args.seed)
    return dataset, None


def to_device(batch, device, args):
    """(x1, x2, g, labels) from the loader -> the device, images channels_last."""
    x1, x2, g, labels = (tensor.to(device, non_blocking=True) for tensor in batch)
    return (x1.contiguous(memory_format=torch.channels_last),
            x2.contiguous(memory_format=torch.channels_last), g, labels)


build_model = Baseline     # the whole training model from (saved) args; eval.py rebuilds it so
monitor_metrics = eval.monitor_metrics     # the online monitor's epoch figures, for the log


def probeable(model, args):
    """What eval.py probes: the backbone on all 512 dims; with a predictor also the equivariant
    head (only-equi's single projector) and the predictor, for MRR, H@k and PRE, and the
    predictor as it was at step 0, the predictor protocol's reference."""
    def predictor_at_init():
        return eval.model_at_init(build_model, args).predictor
    embed = predict = predictor_init = None
    if args.method in PREDICTS:
        embed, predict = getattr(model, "proj_equi", model.projector), model.predictor
        predictor_init = predictor_at_init
    return eval.Probeable(backbone=model.backbone, parts=PARTS, embed=embed, predict=predict,
                          g_dim=6 if args.rot_color else 4, predictor_init=predictor_init)


# ================================ flags ================================
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default and keeps the layout of the method list (its epilog)."""


def parse_args(argv=None):
    paragraphs = __doc__.split("\n\n")
    parser = eval.ArgumentParser(description=paragraphs[0], epilog=paragraphs[1],
                                 formatter_class=HelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="toy",
                        help="toy: CPU minutes, generated data; paper: the official comparison")
    # checked after the parse: required=True would also stop --preset's early parse and --help
    parser.add_argument("--method", choices=METHODS, help="which method (list below); required")
    group = parser.add_argument_group("data")
    group.add_argument("--data-root", default=data.DEFAULT_ROOT,
                       help="3DIEBench root; the default is generated if missing")
    group.add_argument("--resolution", type=eval.number(int, MIN_RESOLUTION),
                       help="image side in px, >= 24 (paper 256; 128 = low-compute regime)")
    group.add_argument("--num-workers", type=eval.number(int, 0), help="loader processes per rank")
    group = parser.add_argument_group("model")
    group.add_argument("--mlp", type=eval.widths, help="projector widths 512 -> a-b-c per head")
    group.add_argument("--predictor", choices=("hypernet", "mlp"), default="hypernet",
                       help="EquiMod / only-equi predictor: W(g) z (SIE's) or MLP([g; z])")
    group.add_argument("--hypernet", choices=("linear", "deep"), default="linear",
                       help="g -> W(g): one bias-free Linear, or 2 more of width k with ReLUs")
    group.add_argument("--rot-color", action="store_true", help="6-d g: quaternion, 2 hue shifts")
    group = parser.add_argument_group("loss")
    group.add_argument("--sim-coeff", type=eval.number(float, 0), default=10.0,
                       help="VICReg lambda on the invariance MSE")
    group.add_argument("--std-coeff", type=eval.number(float, 0), default=10.0,
                       help="VICReg mu on the variance terms")
    group.add_argument("--cov-coeff", type=eval.number(float, 0), default=1.0,
                       help="VICReg nu on the covariance terms")
    group.add_argument("--temperature", type=eval.number(float, 0, low_open=True), default=0.1,
                       help="NT-Xent tau (official --simclr-temp)")
    group.add_argument("--augself-weight", type=eval.number(float, 0), default=1.0,
                       help="w on AugSelf's regression MSE (official --ec-weight)")
    group.add_argument("--equi-factor", type=eval.number(float, 0),
                       help="EquiMod alpha: 1 (SimCLR), 0.45 (VICReg), not the official 4.5")
    group.add_argument("--equi-emb-dims", type=int,
                       help="vicreg-partinv's e: the last e EMBEDDING dims skip the invariance")
    group = parser.add_argument_group("optimisation (official README command)")
    group.add_argument("--epochs", type=eval.number(int, 1), help="one epoch = one pair per object")
    group.add_argument("--batch-size", type=eval.number(int, 2),
                       help="GLOBAL batch in pairs (a variance needs 2); per rank: / world size")
    group.add_argument("--lr", type=eval.number(float, 0, 10, low_open=True), default=1e-3,
                       help="Adam lr, constant: no warmup, no schedule")
    group.add_argument("--wd", type=eval.number(float, 0), default=1e-6,
                       help="Adam weight decay on every parameter")
    eval.add_run_flags(parser, "baselines")
    # The preset's values become the defaults (in --help too), after every add_argument, whose own
    # default= would otherwise win over the preset; --help waits for the full parse.
    no_help = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("-h", "--help")]
    parser.set_defaults(**PRESETS[parser.parse_known_args(no_help)[0].preset])
    args = parser.parse_args(argv)
    # What one flag alone cannot check: one argparse line and exit 2 each.
    if args.method is None:
        parser.error(f"argument --method: required, one of {', '.join(METHODS)}")
    if args.rot_color and args.method not in USES_G:
        parser.error(f"argument --rot-color: {args.method} does not use the transformation g")
    if args.method not in PREDICTS and (args.predictor, args.hypernet) != ("hypernet", "linear"):
        parser.error(f"argument --predictor/--hypernet: {args.method} has no predictor")
    given = {a.split("=")[0] for a in no_help}
    for flag, users in FLAG_USERS.items():
        if flag in given and args.method not in users:
            parser.error(f"argument {flag}: {args.method} does not use it, only "
                         f"{', '.join(users)}")
    emb_dims = int(args.mlp.split("-")[-1])
    if args.method == "vicreg-partinv" and not 0 < args.equi_emb_dims < emb_dims:
        parser.error(f"argument --equi-emb-dims: must be in 1..{emb_dims - 1} (the embedding "
                     f"width - 1), got {args.equi_emb_dims}")
    eval.check_run_flags(parser, args)
    if args.equi_factor is None:
        args.equi_factor = EQUI_FACTOR.get(args.method)      # None for methods without EquiMod
    if args.run_dir is None:
        name = ["baselines", args.preset, args.method] + run_tags(args)
        args.run_dir = os.path.join("runs", "-".join(name))
    return args


def run_tags(args):
    """Short names of the variant flags in use: each variant gets its own run dir."""
    tags = ["rotcolor"] if args.rot_color else []
    if args.predictor == "mlp":
        tags.append("mlppred")
    elif args.hypernet == "deep":
        tags.append("deephyper")
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
