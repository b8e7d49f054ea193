"""SIE: Self-supervised learning of Split Invariant-Equivariant representations, in one file:
model, loss, DDP training, exact resume, evaluation.

Paper: Q. Garrido, L. Najman, Y. LeCun, ICML 2023, https://arxiv.org/abs/2302.10283. Official code:
https://github.com/facebookresearch/SIE (cited below by file and function). Data: 3DIEBench.

The method. Two renderings x, x' of one 3-D object differ by a rotation. A ResNet-18 maps each
image to a 512-d representation y, split into an invariant part (the first 512 - e dims) and an
equivariant part (the last e dims, e = --equi-dims, 256 in the paper). Each part has its own
projector. The invariant embeddings of x and x' must agree. The equivariant embedding of x,
moved by a linear map W(g) that a hypernetwork makes from the relative rotation g, must predict
the equivariant embedding of x'. VICReg's variance and covariance terms stop the collapse.

g is the rotation from view 1 to view 2 in the object's frame: the quaternion of R1^T R2, where
R_k is view k's object rotation (extrinsic x-y-z Euler angles in the latent files), written
scalar-last (x, y, z, w) and not canonicalised (q and -q both occur).

The loss (the paper's Eq. 6, in the official code's exact form), per batch of N pairs:

    L = l_sim * MSE(z_inv, z'_inv)                              invariance
      + l_sim * equi_factor * MSE(W(g) z_equi, z'_equi)         equivariance, x -> x' only
      + l_std * (V(Z)/2 + V(Z')/2 + V(W(g) z_equi)/2)           variance hinges
      + l_cov * (C(Z) + C(Z'))                                  covariance
    V(A) = mean_j max(0, 1 - sqrt(Var(A_j) + 1e-4)),  C(A) = sum_{i != j} Cov(A)_ij^2 / D

with Z = [z_inv; z_equi] the whole embedding; l_sim = 10, equi_factor = 0.45 (the paper's α),
l_std = 10, l_cov = 1.

    x, x' (B, 3, S, S) --ResNet-18--> y, y' (B, 512) = [y_inv (512 - e) | y_equi (e)]
    y_inv --projector--> z_inv (B, D_inv)      y_equi --projector--> z_equi (B, D_equi)
    g (B, 4) --hypernetwork--> W(g) (D_equi, D_equi);   prediction = W(g) z_equi (B, D_equi)

    python sie.py                                            # toy preset: CPU, generated data
    torchrun --standalone --nproc_per_node=2 sie.py          # the same run in 2 processes
    torchrun --standalone --nproc_per_node=8 sie.py --preset paper --data-root /data/3DIEBench
"""
import argparse
import json
import os
import random
import shutil
import sys
import time
from collections import OrderedDict

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
# --preset fills the flags' defaults; a flag on the command line overrides them.
PRESETS = {
    # A laptop CPU, minutes, on data.py's generated set at 32 px (README, "The toy preset").
    # Deviation (toy): projector widths keep the paper's embedding / batch ratio of 2048 / 1024.
    # Deviation (toy): W(g) starts at 0 (hypernet_gain=0). From the official init, the 700-step
    # run stays at chance on 2 of 4 seeds; from 0, all 4 learn the pose (results/README.md).
    "toy": dict(epochs=140, batch_size=32, resolution=32, mlp="64-64-64", num_workers=0,
                hypernet_gain=0.0),
    # The official README command: 8 GPUs x 128 pairs, 2000 epochs = 82,000 steps.
    "paper": dict(epochs=2000, batch_size=1024, resolution=256, mlp="2048-2048-2048",
                  equi_dims=256, sim_coeff=10.0, equi_factor=0.45, std_coeff=10.0, cov_coeff=1.0,
                  lr=1e-3, wd=1e-6, num_workers=8),
}
REPR_DIM = 512                   # the ResNet-18 representation
SCRIPT = "sie"                   # the checkpoint's "script" field (eval.py accepts only ours)
DATA_KIND = "3DIEBench"          # the on-disk layout data.py reads (and generates by default)
ITEM = "pairs"                   # what one batch row is, for the throughput log
DROP_LAST = False                # the last, smaller batch of an epoch is trained on
MEMORY_FORMAT = torch.channels_last   # faster ResNet convolutions, the same maths
# Flags that may change between a run and its resumption (the lr is constant, so --epochs may grow).
RUN_LENGTH_FLAGS = eval.RESUMABLE_FLAGS | {"epochs", "decode"}


# ================================ the method ================================
# ---- the backbone: the official ResNet-18 variant (official code, src/resnet.py) ----
class BasicBlock(nn.Module):
    """The official block: the stride sits on conv2, after an asymmetric zero pad (0, 1, 0, 1)."""

    def __init__(self, c_in, c_out, stride, project):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1)) if stride == 2 else nn.Identity()
        conv2_padding = 0 if stride == 2 else 1
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride, conv2_padding, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        # Every stage's first block has a 1x1 projection shortcut, layer1's included.
        self.shortcut = nn.Identity()
        if project:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

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
            second = BasicBlock(c_out, c_out, 1, project=False)
            stages.append(nn.Sequential(first, second))
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


# ---- the split and the projectors (Sec. 3.2; official code, src/models.py, SIE.__init__) ----
def split_widths(mlp, repr_dims):
    """--mlp widths scaled by the part's share of the 512 dims, rounded half to even as the
    official code's np.round: 2048-2048-2048 with a 256-d part -> [1024, 1024, 1024]."""
    full_widths = np.array([int(w) for w in mlp.split("-")])
    return [int(w) for w in np.round(full_widths * repr_dims / REPR_DIM)]


def projector(d_in, layer_widths):
    """Linear-BN-ReLU for every layer but the last, then a bias-free Linear (official code,
    src/models.py, Projector). layer_widths: e.g. [1024, 1024, 1024]."""
    dims = [d_in] + list(layer_widths)
    layers = []
    for d_hidden_in, d_hidden_out in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(d_hidden_in, d_hidden_out), nn.BatchNorm1d(d_hidden_out),
                   nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
    # Numbered from 1, so checkpoints of earlier versions (whose layer 0 sliced y) still load.
    return nn.Sequential(OrderedDict((str(i), layer) for i, layer in enumerate(layers, start=1)))


# ---- the predictor (Sec. 3.3; official code, src/hypernetwork.py, HyperNet) ----
class HypernetPredictor(nn.Module):
    """prediction = W(g) z: the hypernetwork H, one bias-free Linear(k, d * d) (4,194,304
    parameters at d = 1024, k = 4), writes the weights of a linear map from c = g (the paper)
    or c = MLP(g) (--hypernet deep):
        materialised:  W(g) = (H c).view(d, d)   prediction = W(g) z     (B x d x d floats)
        computed here: A_k = H[:, k].view(d, d)  prediction = sum_k c_k (A_k z)
    Equal for every --hypernet, H c being linear in c (values and gradients: tests/test_sie.py::
    test_predictor_cheap_form_equals_materialised); the second never builds the weights."""

    def __init__(self, d, g_dims=4, deep=False, bias=False):
        super().__init__()
        self.d = d
        self.hyper_in = nn.Identity()
        if deep:      # --hypernet deep: two bias-free Linear(k, k) + ReLU before H (width k)
            self.hyper_in = nn.Sequential(nn.Linear(g_dims, g_dims, bias=False), nn.ReLU(),
                                          nn.Linear(g_dims, g_dims, bias=False), nn.ReLU())
        self.hyper = nn.Linear(g_dims, d * d, bias=False)            # H, weight (d * d, k)
        self.hyper_bias = None                                       # --pred-bias: b(g) = B c
        if bias:
            self.hyper_bias = nn.Linear(g_dims, d, bias=False)

    def forward(self, z, g):
        """z: (B, d) equivariant embeddings of view 1, g: (B, k) -> (B, d) predictions."""
        c = self.hyper_in(g)                                 # (B, k)
        A = self.hyper.weight.view(self.d, self.d, -1)       # A[o, i, k] = H[o * d + i, k]
        Az = torch.einsum("oik,bi->bko", A, z)               # A_k z for every k: (B, k, d)
        out = torch.einsum("bk,bko->bo", c, Az)
        if self.hyper_bias is not None:
            out = out + self.hyper_bias(c)
        return out


class MLPPredictor(nn.Linear):
    """--predictor mlp (official code, src/predictors.py, MLPPredictor, at its default depth 1):
    p(z, g) = Linear([g; z]). g only shifts the output, so this predictor can ignore g and
    collapse to invariance: the case the paper makes for the hypernetwork."""

    def __init__(self, d, g_dims=4):
        super().__init__(d + g_dims, d)

    def forward(self, z, g):
        return super().forward(torch.cat([g, z], dim=1))


# ---- the loss (Eq. 6; official code, src/models.py, SIE.forward) ----
def variance_loss(z):
    """V(Z) = mean_j ReLU(1 - sqrt(Var_j(Z) + 1e-4)), the unbiased variance over the rows."""
    return F.relu(1.0 - torch.sqrt(z.var(dim=0) + 1e-4)).mean()


def covariance_loss(z, divisor):
    """C(Z) = (1/D) sum_{i != j} Cov(Z)_ij^2, with Cov = Zc^T Zc / divisor and Zc centred."""
    z = z - z.mean(dim=0)
    cov = z.T @ z / divisor
    return (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / z.shape[1]


def sie_loss(z1, z2, pred, inv_emb_dims, batch_size=None, sim_coeff=10.0, equi_factor=0.45,
             std_coeff=10.0, cov_coeff=1.0, pred_var=True):
    """The SIE objective on one (local) batch -> the unweighted terms and the weighted 'loss'.
    z1, z2: (B, D) embeddings [z_inv; z_equi] of x and x' (the first inv_emb_dims columns
    invariant); pred: W(g) z1_equi. batch_size: the command line's GLOBAL batch: like the official
    code, the covariance divides by it - 1 even in a smaller last batch (None: the real count).
    Under DDP the MSEs are per-rank means (DDP averages their gradients); the variance and
    covariance terms see the gathered global batch on every rank."""
    # Statistics in fp32 under any autocast: .float() alone is not enough, autocast would run the
    # covariance matmul in bf16 again (~1 % error in that term), so autocast is switched off here.
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2, pred = z1.float(), z2.float(), pred.float()
        zero = z1.new_zeros(())
        inv = zero
        if inv_emb_dims:
            inv = F.mse_loss(z1[:, :inv_emb_dims], z2[:, :inv_emb_dims])      # invariance
        equi = F.mse_loss(pred, z2[:, inv_emb_dims:])                        # x -> x' only
        terms = {"inv": inv, "equi": equi}
        Z1, Z2 = gather(z1), gather(z2)                    # (global batch, D): all processes' rows
        divisor = (batch_size or Z1.shape[0]) - 1
        # Variance and covariance act on the whole concatenation [z_inv; z_equi], D = both
        # widths together, so the invariant and equivariant embeddings are also decorrelated.
        terms["std"] = variance_loss(Z1) / 2 + variance_loss(Z2) / 2
        terms["pred_std"] = variance_loss(gather(pred)) / 2 if pred_var else zero
        terms["cov"] = covariance_loss(Z1, divisor) + covariance_loss(Z2, divisor)
        terms["loss"] = (sim_coeff * terms["inv"] + sim_coeff * equi_factor * terms["equi"]
                         + std_coeff * (terms["std"] + terms["pred_std"])
                         + cov_coeff * terms["cov"])
    return terms


# ---- the model: everything one step computes ----
class SIE(nn.Module):
    """Backbone + split projectors + predictor + online monitor. forward(x1, x2, g, labels)
    returns (total loss, SIE loss terms, monitor sums): the whole objective of one step."""

    def __init__(self, args):
        super().__init__()
        self.inv_repr_dims = REPR_DIM - args.equi_dims      # y_inv = y[:, :inv_repr_dims]
        inv_widths = split_widths(args.mlp, self.inv_repr_dims)
        equi_widths = split_widths(args.mlp, args.equi_dims)
        g_dims = 6 if args.rot_color else 4
        self.backbone = ResNet18()
        self.proj_inv = None
        self.inv_emb_dims = 0                               # the invariant embedding's width
        if self.inv_repr_dims:
            self.proj_inv = projector(self.inv_repr_dims, inv_widths)
            self.inv_emb_dims = inv_widths[-1]
        self.proj_equi = projector(args.equi_dims, equi_widths)
        self.equi_emb_dims = equi_widths[-1]                # the equivariant embedding's width
        if args.predictor == "hypernet":
            self.predictor = HypernetPredictor(self.equi_emb_dims, g_dims,
                                               deep=args.hypernet == "deep", bias=args.pred_bias)
            if args.hypernet_gain is not None:
                init_hypernet_gain(self.predictor, args.hypernet_gain)
        else:
            self.predictor = MLPPredictor(self.equi_emb_dims, g_dims)
        # The parts of the representation the monitor and eval.py probe: full, inv and equi.
        self.parts = {"full": slice(0, REPR_DIM)}
        if self.inv_repr_dims:
            self.parts.update(inv=slice(0, self.inv_repr_dims),
                              equi=slice(self.inv_repr_dims, REPR_DIM))
        self.online = eval.OnlineEvaluator(self.parts)      # a monitor, not part of the method
        # --equi-only follows the official SIEOnlyEqui: the equivariance MSE weighs sim_coeff alone.
        equi_factor = 1.0 if args.equi_only else args.equi_factor
        self.loss_kw = dict(batch_size=args.batch_size, sim_coeff=args.sim_coeff,
                            equi_factor=equi_factor, std_coeff=args.std_coeff,
                            cov_coeff=args.cov_coeff, pred_var=not args.no_pred_var)

    def embed(self, y):
        """The split: y (B, 512) -> Z = [z_inv; z_equi] (B, D_inv + D_equi)."""
        y_inv, y_equi = y[:, :self.inv_repr_dims], y[:, self.inv_repr_dims:]
        z_equi = self.proj_equi(y_equi)
        if self.proj_inv is None:                           # --equi-only: no invariant part
            return z_equi
        return torch.cat([self.proj_inv(y_inv), z_equi], dim=1)

    def forward(self, x1, x2, g, labels):
        y1 = self.backbone(x1)                 # two calls: BN statistics per view, as official
        y2 = self.backbone(x2)
        z1, z2 = self.embed(y1), self.embed(y2)
        pred = self.predictor(z1[:, self.inv_emb_dims:], g)    # one direction only: x -> x'
        terms = sie_loss(z1, z2, pred, self.inv_emb_dims, **self.loss_kw)
        online_loss, sums = self.online(y1, y2, g[:, :4], labels)
        return terms["loss"] + online_loss, terms, sums


# ---- the optimiser and one training step (official README command) ----
def make_optimizer(model, args):
    """Adam, a constant lr, L2 weight decay on every parameter: no schedule to resume."""
    return torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.wd,
                            fused=next(model.parameters()).is_cuda)


def schedule(step, args, steps_per_epoch):
    """The hyper-parameters of a step, for the log: the lr is constant."""
    return {"lr": args.lr}


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


# ---- what the harness and eval.py take from the method ----
def make_dataset(args, root):
    """One item per training OBJECT: two distinct views, their relative rotation g (with
    --rot-color also the two hue differences) and the label. -> (dataset, collate_fn)."""
    if args.decode != "pil":                # an experiment: JPEG decoding off PIL, for speed
        return data.jpeg_pairs(root, "train", args.resolution, args.rot_color, args.seed,
                               args.decode)
    return data.Pairs3DIEBench(root, "train", args.resolution, args.rot_color, args.seed), None


def to_device(batch, device, args):
    """(x1, x2, g, labels) from the loader -> the device; images channels_last (--decode cpu|gpu
    images are decoded and normalised there)."""
    x1, x2, g, labels = batch
    images = [data.images_to_device(x, device, args.resolution) for x in (x1, x2)]
    x1, x2 = [x.contiguous(memory_format=MEMORY_FORMAT) for x in images]
    return x1, x2, g.to(device, non_blocking=True), labels.to(device, non_blocking=True)


build_model = SIE          # the whole training model from (saved) args; eval.py rebuilds it so
monitor_metrics = eval.monitor_metrics     # the online monitor's epoch figures, for the log


def probeable(model, args):
    """What eval.py probes: the representation's parts; the equivariant projector (it reads the
    'equi' part) and the predictor, for MRR, H@k, PRE and the predictor protocol (with its step-0
    state); the width of g; Z = [z_inv; z_equi] for `eval.py --features embeddings`."""
    def predictor_at_init():
        return eval.model_at_init(build_model, args).predictor
    d_inv, d_all = model.inv_emb_dims, model.inv_emb_dims + model.equi_emb_dims
    embedding_parts = {"z": slice(0, d_all)}
    if d_inv:
        embedding_parts.update(z_inv=slice(0, d_inv), z_equi=slice(d_inv, d_all))
    return eval.Probeable(backbone=model.backbone, parts=model.parts,
                          embed=model.proj_equi, predict=model.predictor,
                          g_dim=6 if args.rot_color else 4, embeddings=model.embed,
                          embedding_parts=embedding_parts, predictor_init=predictor_at_init)


# ---- this project's experiments, not in the paper ----
def init_hypernet_gain(predictor, gain):
    """--hypernet-gain G: H from N(0, G^2 / d), so |W(g) z| ~ G |z| at the start for a unit g.
    PyTorch's Linear init (the official code's) draws H from U(-1/2, 1/2) for k = 4: |W(g) z| ~
    0.29 sqrt(d) |z|, 1.6 x at the toy's d = 32, 9.2 x at the paper's d = 1024."""
    nn.init.normal_(predictor.hyper.weight, std=gain * predictor.d ** -0.5)


# ================================ flags ================================
def hypernet_gain(text):
    """--hypernet-gain: 'official' (None: PyTorch's Linear init) or a gain G >= 0."""
    return None if text == "official" else eval.number(float, 0)(text)


def parse_args(argv=None):
    p = eval.ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="toy",
                   help="toy: CPU minutes, generated data; paper: the official command")
    group = p.add_argument_group("data")
    group.add_argument("--data-root", default=data.DEFAULT_ROOT, help="3DIEBench root (the default "
                       "is generated if missing)")
    group.add_argument("--resolution", type=eval.number(int, 24), help="image side, px (paper 256)")
    group.add_argument("--num-workers", type=eval.number(int, 0), help="loader workers per rank")
    group.add_argument("--decode", choices=("pil", "cpu", "gpu"), default="pil", help="experiment: "
                       "JPEG decoding in PIL (readable), libjpeg-turbo or nvJPEG (fast)")
    group = p.add_argument_group("model (paper Sec. 3)")
    group.add_argument("--mlp", type=eval.widths, help="projector widths, scaled by each part's "
                       "share of the 512 dims (paper 2048-2048-2048)")
    group.add_argument("--equi-dims", type=eval.number(int, 1, REPR_DIM - 1), default=256,
                       help="e: the last e of the 512 dims are the equivariant part (paper 256)")
    group.add_argument("--equi-only", action="store_true", help="ablation: no split, all "
                       "equivariant")
    group.add_argument("--predictor", choices=("hypernet", "mlp"), default="hypernet",
                       help="W(g) z (paper) or MLP([g; z])")
    group.add_argument("--hypernet", choices=("linear", "deep"), default="linear",
                       help="g -> W(g): one bias-free Linear (paper) or an MLP of width 4 first")
    group.add_argument("--hypernet-gain", type=hypernet_gain, metavar="G", help="experiment: H "
                       "from N(0, G^2 / d), or 'official' (PyTorch's init; paper preset)")
    group.add_argument("--pred-bias", action="store_true", help="also a bias b(g) (paper figure)")
    group.add_argument("--rot-color", action="store_true", help="ablation: g = [quaternion, "
                       "floor hue difference, spot hue difference]")
    group = p.add_argument_group("loss (paper Eq. 6)")
    group.add_argument("--sim-coeff", type=eval.number(float, 0), default=10.0,
                       help="l_sim on the invariance MSE (paper 10)")
    group.add_argument("--equi-factor", type=eval.number(float, 0), default=0.45,
                       help="alpha: the equivariance MSE weighs l_sim * alpha (paper 0.45)")
    group.add_argument("--std-coeff", type=eval.number(float, 0), default=10.0,
                       help="l_std on the variance terms (paper 10)")
    group.add_argument("--cov-coeff", type=eval.number(float, 0), default=1.0,
                       help="l_cov on the covariance terms (paper 1)")
    group.add_argument("--no-pred-var", action="store_true", help="ablation: no V(W(g) z) term")
    group = p.add_argument_group("optimisation (official README command)")
    group.add_argument("--epochs", type=eval.number(int, 1), help="passes, one pair per object")
    group.add_argument("--batch-size", type=eval.number(int, 2), help="GLOBAL batch in pairs")
    group.add_argument("--lr", type=eval.number(float, 0, 10, low_open=True), default=1e-3,
                       help="Adam lr, constant: no warmup, no schedule (paper 1e-3)")
    group.add_argument("--wd", type=eval.number(float, 0), default=1e-6,
                       help="Adam weight decay on every parameter (paper 1e-6)")
    eval.add_run_flags(p, "sie")
    # The preset's values become the defaults (in --help too). This comes after every
    # add_argument, whose own default= would otherwise win over the preset.
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("-h", "--help")]
    p.set_defaults(**PRESETS[p.parse_known_args(given)[0].preset])
    args = p.parse_args(argv)
    # What one flag alone cannot check: one p.error line each.
    given = {a.split("=")[0] for a in given}
    if args.equi_only and "--equi-dims" in given:
        p.error("argument --equi-dims: --equi-only uses all 512 dims; drop one of the two")
    if args.equi_only:
        args.equi_dims = REPR_DIM
    if args.predictor == "mlp" and (args.hypernet != "linear" or "--hypernet-gain" in given):
        p.error("argument --hypernet/--hypernet-gain: they shape the hypernetwork predictor; "
                "--predictor mlp has none")
    for repr_dims in (REPR_DIM - args.equi_dims, args.equi_dims):
        if repr_dims and min(split_widths(args.mlp, repr_dims)) < 1:
            p.error(f"argument --mlp: {args.mlp} scaled by {repr_dims}/{REPR_DIM} for a part of "
                    f"the split has a layer of width 0; use a wider --mlp or another --equi-dims")
    eval.check_run_flags(p, args)
    if args.run_dir is None:
        args.run_dir = os.path.join("runs", "-".join(["sie", args.preset] + run_tags(args)))
    return args


def run_tags(args):
    """Short names of the ablations in use: each ablation gets its own run dir."""
    hypernet = args.predictor == "hypernet"
    used = {"equionly": args.equi_only, "nopredvar": args.no_pred_var, "rotcolor": args.rot_color,
            "predbias": args.pred_bias, f"e{args.equi_dims}": args.equi_dims not in (256, REPR_DIM),
            "mlppred": not hypernet, "deephyper": hypernet and args.hypernet == "deep"}
    tags = [name for name, on in used.items() if on]
    if hypernet and args.hypernet_gain != PRESETS[args.preset].get("hypernet_gain"):
        tags.append("officialinit" if args.hypernet_gain is None
                    else f"gain{args.hypernet_gain:g}")
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
