"""The methods SIE (Garrido, Najman, LeCun, ICML 2023) is compared with on 3DIEBench, in one file:
model, loss, DDP training, exact resume, evaluation. --method picks one of them.

    vicreg           VICReg (Bardes, Ponce, LeCun, ICLR 2022)
    simclr           SimCLR (Chen, Kornblith, Norouzi, Hinton, ICML 2020)
    simclr-augself   SimCLR + AugSelf (Lee, Lee, Lee, Lee, Shin, NeurIPS 2021)
    equimod-simclr   EquiMod (Devillers, Lefort, ICLR 2023) on SimCLR
    equimod-vicreg   EquiMod on VICReg, as the official SIE code has it
    vicreg-partinv   SIE's ablation: VICReg whose invariance term leaves the last e dims out
    simclr-onlyequi  SIE's ablation: SimCLR between the predicted and the actual embedding

The methods. Every method sees the same data as sie.py: two renderings x, x' of one 3-D object
that differ by a rotation g (the relative quaternion, scalar last; with --rot-color also the two
hue differences). The same ResNet-18 maps each image to a 512-d representation y, and a projector
maps y to an embedding z of width D (the last --mlp width, 2048 in the paper). The losses, per
batch of N pairs (Z, Z' = the embeddings of all x, all x'):

    vicreg           l_sim * MSE(Z, Z') + l_std * (V(Z)/2 + V(Z')/2) + l_cov * (C(Z) + C(Z'))
                     (VICReg's Eq. 6, with its variance Eqs. 1-2 and covariance Eqs. 3-4:)
                     V(A) = mean_j max(0, 1 - sqrt(Var(A_j) + 1e-4))
                     C(A) = sum_{i != j} Cov(A)_ij^2 / D
    simclr           NT-Xent(Z, Z')  (SimCLR's Eq. 1, averaged over the 2N rows of [Z; Z']:)
                     NT-Xent(A, B) = mean_i -log( exp(cos(r_i, r_i+-N) / tau)
                                                  / sum_{k != i} exp(cos(r_i, r_k) / tau) )
    simclr-augself   NT-Xent(Z, Z') + w * MSE(phi([y; y']), g)             (AugSelf, Sec. 3)
    equimod-simclr   NT-Xent(Z_inv, Z'_inv) + alpha * NT-Xent(p(Z_equi, g), Z'_equi)
                                                                           (EquiMod, Sec. 3)
    equimod-vicreg   VIC(Z_inv, Z'_inv) + alpha * [l_sim * MSE(p(Z_equi, g), Z'_equi)
                         + l_std * (V(Z_equi)/2 + V(Z'_equi)/2) + l_cov * (C(Z_equi) + C(Z'_equi))]
                     VIC = the vicreg loss above
    vicreg-partinv   vicreg with the MSE on the first D - e embedding dims only (e =
                     --equi-emb-dims); V and C still on all D
    simclr-onlyequi  NT-Xent(p(Z, g), Z')

with l_sim = 10, l_std = 10, l_cov = 1, tau = 0.1, w = 1, alpha = 1 (SimCLR EquiMod) or 0.45
(VICReg EquiMod). p(z, g) is SIE's predictor: a hypernetwork makes a matrix W(g) from g, and
p(z, g) = W(g) z (or, with --predictor mlp, a Linear on [g; z]). EquiMod's Z_inv and Z_equi come
from two projectors, both reading all 512 dims of y; phi is AugSelf's MLP on [y; y'].

The tensors of one step (S = image side, D = 2048 in the paper):

    x, x' (B, 3, S, S) --ResNet-18--> y, y' (B, 512) --projector--> z, z' (B, D)
    EquiMod:   y, y' --second projector--> z_equi, z'_equi (B, D);  p(z_equi, g) (B, D)
    only-equi: p(z, g) (B, D);  AugSelf: [y; y'] (B, 1024) --phi--> (B, 4 or 6), against g

Reading order: the config, then the method (backbone, the heads the methods share, one section
per method with its loss, the model that picks the method's pieces, the optimiser, train_step),
then one banner after which the training harness is the same text in sie.py, baselines.py and
ser.py. Nothing runs at import (`from baselines import nt_xent, vicreg_loss` is safe).

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

# ================================== config ==================================
# --preset fills the defaults below; any flag given on the command line overrides them. Both
# presets match sie.py's (data, resolution, batch, epochs, total projector width), so the numbers
# compare.
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
# The methods that read the transformation g, and those with a predictor p(z, g).
USES_G = ("simclr-augself", "equimod-simclr", "equimod-vicreg", "simclr-onlyequi")
PREDICTS = ("equimod-simclr", "equimod-vicreg", "simclr-onlyequi")
# EquiMod's alpha when --equi-factor is not given. The official argparse default is 4.5, which
# weighs the equivariant term 4.5 times whenever the flag is forgotten; so, per version:
# SimCLR, 1: EquiMod's own lambda, the weight of the official SimCLREquiModRotColor, and what the
# third-party re-runs used (seq-JEPA, App. A.3). VICReg, 0.45: the SIE README's --equi-factor, so
# the equivariance MSE weighs 10 x 0.45 = 4.5, as in SIE.
EQUI_FACTOR = {"equimod-simclr": 1.0, "equimod-vicreg": 0.45}
NUM_CLASSES = data.NUM_CLASSES   # 3DIEBench's 55 synsets; generated sets use the first labels
REPR_DIM = 512                   # the ResNet-18 representation
MIN_RESOLUTION = 24              # the smallest image side the ResNet-18's stride-2 stages accept
SCRIPT = "baselines"             # the checkpoint's "script" field (eval.py accepts only ours)
DATA_KIND = "3DIEBench"          # the on-disk layout data.py reads (and generates by default)
ITEM = "pairs"                   # what one batch row is, for the throughput log
DROP_LAST = False                # the last, smaller batch of an epoch is trained on
MEMORY_FORMAT = torch.channels_last   # faster ResNet convolutions, the same maths
# Flags that may change between a run and its resumption (the lr is constant, so --epochs may grow).
RUN_LENGTH_FLAGS = {"epochs", "stop_after_epochs", "run_dir", "resume", "data_root", "num_workers",
                    "log_every", "compile", "eval_protocols", "no_eval"}


# argparse types: a bad value is one "argument --flag: ..." line and exit 2, never a traceback.
def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonnegative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def nonnegative_float(text):
    """A finite float >= 0 that fp32 can hold (1e39 would become inf in the model)."""
    value = float(text)
    if not 0 <= value <= 1e30:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not 0 < value <= 1e30:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def learning_rate(text):
    value = float(text)
    if not 0 < value <= 10:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 10], got {text}")
    return value


def resolution(text):
    value = int(text)
    if value < MIN_RESOLUTION:
        raise argparse.ArgumentTypeError(f"must be >= {MIN_RESOLUTION} px (ResNet-18), got {text}")
    return value


def widths(text):
    """'2048-2048-2048' -> the same string, checked: positive integer widths joined by '-'."""
    parts = text.split("-")
    if not all(w.isdigit() and int(w) > 0 for w in parts):
        raise argparse.ArgumentTypeError(f"must be positive widths joined by '-', e.g. "
                                         f"2048-2048-2048, got {text!r}")
    return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are printed once under torchrun (by rank 0); every rank exits 2."""

    def error(self, message):
        if os.environ.get("RANK", "0") == "0":
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default and keeps the layout of the method list (its epilog)."""


def parse_args(argv=None):
    paragraphs = __doc__.split("\n\n")
    p = ArgumentParser(description=paragraphs[0], epilog=paragraphs[1],
                       formatter_class=HelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="toy",
                   help="toy: CPU minutes, generated data; paper: the official comparison")
    # Required, but checked after the parse: argparse's required=True would also stop the early
    # parse that reads --preset, and with it --help.
    p.add_argument("--method", choices=METHODS, help="which method (list below); required")
    g = p.add_argument_group("data")
    g.add_argument("--data-root", default=data.DEFAULT_ROOT,
                   help="3DIEBench root; the default is generated if missing")
    g.add_argument("--resolution", type=resolution,
                   help="image side in px (paper 256; 128 = low-compute regime)")
    g.add_argument("--num-workers", type=nonnegative_int,
                   help="DataLoader worker processes per rank")
    g = p.add_argument_group("model")
    g.add_argument("--mlp", type=widths,
                   help="projector widths 512 -> a-b-c, one such projector per head "
                        "(paper 2048-2048-2048)")
    g.add_argument("--predictor", choices=("hypernet", "mlp"), default="hypernet",
                   help="EquiMod / only-equi predictor: W(g) z (the SIE code's default) or "
                        "MLP([g; z])")
    g.add_argument("--hypernet", choices=("linear", "deep"), default="linear",
                   help="g -> W(g): one bias-free Linear or 3 bias-free Linears of width 4 "
                        "with ReLUs")
    g.add_argument("--rot-color", action="store_true",
                   help="condition on the 6-d g = [quaternion, d floor hue, d spot hue] "
                        "(the official RotColor variants)")
    g = p.add_argument_group("loss")
    g.add_argument("--sim-coeff", type=nonnegative_float, default=10.0,
                   help="VICReg lambda on the invariance MSE (paper 10)")
    g.add_argument("--std-coeff", type=nonnegative_float, default=10.0,
                   help="VICReg mu on the variance terms (paper 10)")
    g.add_argument("--cov-coeff", type=nonnegative_float, default=1.0,
                   help="VICReg nu on the covariance terms (paper 1)")
    g.add_argument("--temperature", type=positive_float, default=0.1,
                   help="NT-Xent tau (official --simclr-temp 0.1)")
    g.add_argument("--augself-weight", type=nonnegative_float, default=1.0,
                   help="w on AugSelf's regression MSE (official --ec-weight 1)")
    g.add_argument("--equi-factor", type=nonnegative_float,
                   help="EquiMod alpha on the equivariant loss; default 1 (SimCLR version), 0.45 "
                        "(VICReg version). NOT the official argparse default 4.5")
    g.add_argument("--equi-emb-dims", type=int,
                   help="e for vicreg-partinv: how many EMBEDDING dims, the last e, are left out "
                        "of the invariance term (official 256)")
    g = p.add_argument_group("optimisation (official README command)")
    g.add_argument("--epochs", type=positive_int,
                   help="one epoch = one view pair per training object")
    g.add_argument("--batch-size", type=positive_int,
                   help="GLOBAL batch in pairs; per-rank batch = global / world size")
    g.add_argument("--lr", type=learning_rate, default=1e-3,
                   help="Adam lr, constant: no warmup, no schedule (paper 1e-3)")
    g.add_argument("--wd", type=nonnegative_float, default=1e-6,
                   help="Adam weight decay on every parameter (paper 1e-6)")
    g.add_argument("--amp", choices=("bf16", "fp16", "none"), default="bf16",
                   help="autocast dtype on CUDA (ignored on CPU); fp16 adds a GradScaler; "
                        "loss statistics are computed in fp32 with autocast off")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model's forward (same maths; slow start)")
    g = p.add_argument_group("run")
    g.add_argument("--run-dir",
                   help="default runs/baselines-<preset>-<method>[-<variant>]; rerun the same "
                        "command to resume")
    g.add_argument("--resume",
                   help="checkpoint to resume from (default: <run-dir>/checkpoint.pt if present)")
    g.add_argument("--stop-after-epochs", type=positive_int,
                   help="end this invocation after N more epochs (rerun to continue; no eval)")
    g.add_argument("--seed", type=nonnegative_int, default=0,
                   help="model init, view sampling and data order")
    g.add_argument("--log-every", type=positive_int, default=20,
                   help="steps between log lines (the only host syncs)")
    g.add_argument("--eval-protocols", default="all",
                   help="eval.py protocols after training, comma-separated")
    g.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    # The preset's values become the defaults (in --help too). This comes after every
    # add_argument, whose own default= would otherwise win over the preset.
    preset = p.parse_known_args(without_help(argv))[0].preset
    p.set_defaults(**PRESETS[preset])
    args = p.parse_args(argv)
    if args.method is None:
        p.error(f"argument --method: required, one of {', '.join(METHODS)}")
    if args.rot_color and args.method not in USES_G:
        p.error(f"argument --rot-color: {args.method} does not use the transformation g")
    has_default_predictor = (args.predictor, args.hypernet) == ("hypernet", "linear")
    if args.method not in PREDICTS and not has_default_predictor:
        p.error(f"argument --predictor/--hypernet: {args.method} has no predictor")
    emb_dims = int(args.mlp.split("-")[-1])
    if args.method == "vicreg-partinv" and not 0 < args.equi_emb_dims < emb_dims:
        p.error(f"argument --equi-emb-dims: must be in 1..{emb_dims - 1} (the embedding width "
                f"- 1), got {args.equi_emb_dims}")
    if args.batch_size < 2:
        p.error("argument --batch-size: must be >= 2 (the variance needs two samples)")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world:
        p.error(f"argument --batch-size: {args.batch_size} is not divisible by the {world} "
                f"processes (--batch-size is the global batch)")
    if args.resume and not os.path.isfile(args.resume):
        p.error(f"argument --resume: no checkpoint file {args.resume}")
    if args.equi_factor is None:
        args.equi_factor = EQUI_FACTOR.get(args.method)      # None for methods without EquiMod
    if args.run_dir is None:
        name = ["baselines", args.preset, args.method] + run_tags(args)
        args.run_dir = os.path.join("runs", "-".join(name))
    return args


def without_help(argv):
    """The command line without -h/--help, to read --preset before the full parse."""
    return [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("-h", "--help")]


def run_tags(args):
    """Short names of the variant flags in use: each variant gets its own run dir."""
    tags = []
    if args.rot_color:
        tags.append("rotcolor")
    if args.predictor == "mlp":
        tags.append("mlppred")
    elif args.hypernet == "deep":
        tags.append("deephyper")
    return tags


# ================================ the method ================================
# The methods, top to bottom: the backbone, the heads they share, one section per method with its
# loss, the model that picks a method's pieces, the optimiser and one training step. Two helpers
# come from the harness below: gather (the autograd all-gather of a batch over processes; the
# identity in one process) and autocast (bf16 or fp16 on CUDA, off on CPU).

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
    HyperNet), which the SIE code also gives EquiMod and SimCLR only-equi. W(g) = reshape(H g)
    row-major: W[o, i] = (H g)[o * d + i], no bias. H is one bias-free Linear(k, d * d):
    16,777,216 parameters at d = 2048, k = 4. W is linear in g, so W(g) z = sum_k g_k (A_k z)
    with A_k[o, i] = H[o * d + i, k]. forward computes that sum, so the (B, d, d) tensor of
    weights is never built. The value is that of the materialised form (a test checks)."""

    def __init__(self, d, g_dim=4, deep=False):
        super().__init__()
        self.d = d
        self.hyper_in = nn.Identity()
        if deep:      # --hypernet deep: two bias-free Linear(k, k) + ReLU before H (width k)
            self.hyper_in = nn.Sequential(nn.Linear(g_dim, g_dim, bias=False), nn.ReLU(),
                                          nn.Linear(g_dim, g_dim, bias=False), nn.ReLU())
        self.hyper = nn.Linear(g_dim, d * d, bias=False)             # H, weight (d * d, k)

    def forward(self, z, g):
        """z: (B, d) embeddings of view 1, g: (B, k) -> (B, d) predictions for view 2."""
        c = self.hyper_in(g)                                 # (B, k)
        A = self.hyper.weight.view(self.d, self.d, -1)       # A[o, i, k]
        Az = torch.einsum("oik,bi->bko", A, z)               # A_k z for every k: (B, k, d)
        return torch.einsum("bk,bko->bo", c, Az)


class MLPPredictor(nn.Linear):
    """--predictor mlp (official code, src/predictors.py, MLPPredictor, at its default depth 1):
    p(z, g) = Linear([g; z]). Closer to EquiMod's own predictor (a Linear on z and the embedded
    transformation) than W(g) z."""

    def __init__(self, d, g_dim=4):
        super().__init__(d + g_dim, d)

    def forward(self, z, g):
        return super().forward(torch.cat([g, z], dim=1))


# ---- the losses, one section per method ----
# Under DDP the MSE terms (invariance, equivariance, AugSelf) are per-rank means, which DDP's
# gradient averaging makes global means; the variance, covariance and NT-Xent terms see the
# batch gathered from every process, with gradients. Their statistics are computed in fp32 with
# autocast off: .float() alone is not enough, autocast would run their matmuls in bf16 again.

# ---- VICReg (Bardes, Ponce, LeCun, ICLR 2022; official SIE code, src/models.py, VICReg) ----
# L = l_sim * MSE(Z, Z') + l_std * (V(Z)/2 + V(Z')/2) + l_cov * (C(Z) + C(Z'))     (Eq. 6)
# V(A) = mean_j max(0, 1 - sqrt(Var(A_j) + 1e-4))                                 (Eqs. 1-2)
# C(A) = sum_{i != j} Cov(A)_ij^2 / D,  Cov(A) = Ac^T Ac / (N - 1), Ac centred    (Eqs. 3-4)
def variance_loss(z):
    """V(Z) = mean_j ReLU(1 - sqrt(Var_j(Z) + 1e-4)), the unbiased variance over the rows."""
    return F.relu(1.0 - torch.sqrt(z.var(dim=0) + 1e-4)).mean()


def covariance_loss(z, divisor):
    """C(Z) = (1/D) sum_{i != j} Cov(Z)_ij^2, with Cov = Zc^T Zc / divisor and Zc centred."""
    with torch.autocast(z.device.type, enabled=False):      # the matmul in fp32
        z = z.float() - z.float().mean(dim=0)
        cov = z.T @ z / divisor
        return (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / z.shape[1]


def vicreg_regularizer(z1, z2, batch_size=None):
    """The variance and covariance terms of both views on the gathered batch:
    (V(Z)/2 + V(Z')/2, C(Z) + C(Z')). batch_size: the GLOBAL batch of the command line; like the
    SIE code, the covariance divides by batch_size - 1 even for a smaller last batch (None: the
    real count)."""
    Z1 = gather(z1.float())                     # (global batch, D): all processes' rows
    Z2 = gather(z2.float())
    divisor = (batch_size or Z1.shape[0]) - 1
    # Deviation: the 1/2 per view is the official VICReg code's; the paper's Eq. 6 has none.
    variance = variance_loss(Z1) / 2 + variance_loss(Z2) / 2
    covariance = covariance_loss(Z1, divisor) + covariance_loss(Z2, divisor)
    return variance, covariance


def vicreg_loss(z1, z2, batch_size=None, sim_coeff=10.0, std_coeff=10.0, cov_coeff=1.0):
    """Eq. 6 on the embeddings z1, z2 (B, D) of the two views, D = the embedding width.
    Returns the unweighted terms 'inv', 'std', 'cov' and the weighted 'loss'."""
    # Deviation: the invariance is the mean over all N x D entries, the official code's
    # F.mse_loss; the paper's Eq. 5 sums over the D dims (the same up to a factor D in l_sim).
    terms = {"inv": F.mse_loss(z1.float(), z2.float())}          # per-rank mean
    terms["std"], terms["cov"] = vicreg_regularizer(z1, z2, batch_size)
    terms["loss"] = (sim_coeff * terms["inv"] + std_coeff * terms["std"]
                     + cov_coeff * terms["cov"])
    return terms


# ---- SimCLR (Chen, Kornblith, Norouzi, Hinton, ICML 2020; official SIE code, src/models.py,
# SimCLR.info_nce_loss) ----
# L = NT-Xent(Z, Z'), the mean over the 2N rows r_i of [Z; Z'] of                    (Eq. 1)
#     -log( exp(cos(r_i, r_i+-N) / tau) / sum_{k != i} exp(cos(r_i, r_k) / tau) )
def nt_xent(a, b, temperature=0.1):
    """NT-Xent on the 2N gathered rows [a; b]: cosine similarity / tau; row i's positive is row
    i +- N, the other 2N - 2 rows are its negatives, drawn from every process WITH gradients;
    the mean over the 2N anchors. tau = 0.1 is the SIE code's default."""
    with torch.autocast(a.device.type, enabled=False):      # the logits matmul in fp32
        rows = torch.cat([gather(a.float()), gather(b.float())])
        rows = F.normalize(rows, dim=1)                              # (2N, d)
        n = rows.shape[0] // 2
        logits = rows @ rows.T / temperature
        logits = logits.fill_diagonal_(float("-inf"))                # no self-pairs
        positive = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(rows.device)
        return F.cross_entropy(logits, positive)


def simclr_loss(z1, z2, temperature=0.1):
    """NT-Xent(z, z'): 'inv' is the whole loss."""
    loss = nt_xent(z1, z2, temperature)
    return {"inv": loss, "loss": loss}


# ---- SimCLR + AugSelf (H. Lee, K. Lee, K. Lee, H. Lee, Shin, NeurIPS 2021; official SIE code,
# src/models.py, SimCLRAugSelf) ----
# L = NT-Xent(Z, Z') + w * MSE(phi([y; y']), g)                                        (Sec. 3)
# phi regresses the relative transformation g from the two views' representations.
def augself_head(repr_dim, g_dim):
    """AugSelf's head phi at the SIE code's sizes: an MLP 2 * 512 -> 1024 -> 1024 -> k on the
    concatenated representations [y; y']; 2,103,300 parameters at k = 4."""
    # Deviation: AugSelf's own code uses 512-wide heads; these are the SIE comparison's widths.
    width = 2 * repr_dim
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True),
                         nn.Linear(width, width), nn.ReLU(inplace=True),
                         nn.Linear(width, g_dim))


def augself_loss(head, y1, y2, g):
    """MSE between phi([y; y']) and g (the quaternion; with --rot-color also the two hue
    differences). y, y' are NOT detached: the head's gradient shapes the backbone, which is the
    point of AugSelf."""
    # Deviation: one order only, as in the SIE code; AugSelf's code also feeds [y'; y] (with the
    # reversed target).
    prediction = head(torch.cat([y1, y2], dim=1))
    return F.mse_loss(prediction.float(), g.float())


def simclr_augself_loss(z1, z2, head, y1, y2, g, temperature=0.1, augself_weight=1.0):
    """NT-Xent on the embeddings plus w times AugSelf's regression on the representations."""
    terms = {"inv": nt_xent(z1, z2, temperature), "augself": augself_loss(head, y1, y2, g)}
    terms["loss"] = terms["inv"] + augself_weight * terms["augself"]
    return terms


# ---- EquiMod, SimCLR version (Devillers, Lefort, ICLR 2023; official SIE code, src/models.py,
# SimCLREquiMod) ----
# L = NT-Xent(Z_inv, Z'_inv) + alpha * NT-Xent(p(Z_equi, g), Z'_equi)                  (Sec. 3)
# Two projectors read all 512 dims of y: z_inv must not change with g, z_equi must move with g
# in a way the predictor p can forecast.
def equimod_simclr_loss(z1_inv, z2_inv, pred, z2_equi, temperature=0.1, alpha=1.0):
    """pred = p(z1_equi, g). In the second term prediction i is positive with target i; all the
    other predictions and targets are its negatives."""
    # Deviation: EquiMod predicts from an un-augmented view x0, which 3DIEBench lacks: here view
    # 1 -> view 2, with the SIE code's predictor (a hypernetwork by default) instead of
    # EquiMod's Linear + BN.
    terms = {"inv": nt_xent(z1_inv, z2_inv, temperature),
             "equi": nt_xent(pred, z2_equi, temperature)}
    terms["loss"] = terms["inv"] + alpha * terms["equi"]
    return terms


# ---- EquiMod, VICReg version (official SIE code, src/models.py, VICRegEquiMod) ----
# L = VIC(Z_inv, Z'_inv) + alpha * [l_sim * MSE(p(Z_equi, g), Z'_equi)
#         + l_std * (V(Z_equi)/2 + V(Z'_equi)/2) + l_cov * (C(Z_equi) + C(Z'_equi))]
# VIC is the VICReg loss above, V and C its variance and covariance. The SIE README calls this
# "a new VICReg based version" of EquiMod.
def equimod_vicreg_loss(z1_inv, z2_inv, z1_equi, z2_equi, pred, batch_size=None, alpha=0.45,
                        sim_coeff=10.0, std_coeff=10.0, cov_coeff=1.0):
    """pred = p(z1_equi, g). V and C act on the equivariant embeddings of both views, NOT on the
    predictions; the invariant and equivariant embeddings are not decorrelated from each other."""
    terms = vicreg_loss(z1_inv, z2_inv, batch_size, sim_coeff, std_coeff, cov_coeff)
    terms["equi"] = F.mse_loss(pred.float(), z2_equi.float())     # per-rank mean
    terms["std_equi"], terms["cov_equi"] = vicreg_regularizer(z1_equi, z2_equi, batch_size)
    equivariant = (sim_coeff * terms["equi"] + std_coeff * terms["std_equi"]
                   + cov_coeff * terms["cov_equi"])
    terms["loss"] = terms["loss"] + alpha * equivariant
    return terms


# ---- VICReg part-inv, an ablation of the SIE paper (official SIE code, src/models.py,
# VICRegPartInv) ----
# L = l_sim * MSE(Z[:, :D-e], Z'[:, :D-e]) + l_std * (V(Z)/2 + V(Z')/2) + l_cov * (C(Z) + C(Z'))
# The last e EMBEDDING dims (e = --equi-emb-dims) are free to vary with the view, but nothing
# ties them to g: SIE's split without its predictor. g is not used.
def vicreg_partinv_loss(z1, z2, n_inv, batch_size=None, sim_coeff=10.0, std_coeff=10.0,
                        cov_coeff=1.0):
    """VICReg whose invariance MSE covers only the first n_inv = D - e embedding dims; the
    variance and covariance still cover all D."""
    terms = {"inv": F.mse_loss(z1[:, :n_inv].float(), z2[:, :n_inv].float())}
    terms["std"], terms["cov"] = vicreg_regularizer(z1, z2, batch_size)
    terms["loss"] = (sim_coeff * terms["inv"] + std_coeff * terms["std"]
                     + cov_coeff * terms["cov"])
    return terms


# ---- SimCLR only-equi, an ablation of the SIE paper (official SIE code, src/models.py,
# SimCLROnlyEqui) ----
# L = NT-Xent(p(Z, g), Z')
# SimCLR where view 1's embedding is first moved by the predictor: no invariant part at all.
def simclr_onlyequi_loss(pred, z2, temperature=0.1):
    """pred = p(z1, g). Prediction i is positive with target i; all the other predictions and
    targets are its negatives."""
    loss = nt_xent(pred, z2, temperature)
    return {"equi": loss, "loss": loss}


# ---- the online monitor (official code, src/models.py, OnlineEvaluator) ----
class OnlineEvaluator(nn.Module):
    """A training monitor on DETACHED representations, per part: a linear classifier on single
    views and a rotation MLP on [y1; y2] -> quaternion. Its losses join the total (the same Adam)
    but cannot reach the backbone.
    Deviation: the official heads on the 2048-d projector embeddings (about 40 M parameters) are
    left out; the representation heads are what eval.py measures."""

    def __init__(self, parts):
        super().__init__()
        self.parts = parts                                   # name -> slice of the representation
        part_dims = {name: s.stop - s.start for name, s in parts.items()}
        self.classify = nn.ModuleDict({name: nn.Linear(k, NUM_CLASSES)
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


def representation_parts(args):
    """No baseline splits its representation (EquiMod's two projectors both read all 512 dims,
    part-inv splits the EMBEDDING): each is monitored and probed on the full 512 dims, as the
    official evaluation does."""
    return {"full": slice(0, REPR_DIM)}


# ---- the model: the method's pieces and everything one step computes ----
class Baseline(nn.Module):
    """Backbone + the method's heads + online monitor. forward(x1, x2, g, labels) returns
    (total loss, the method's loss terms, monitor sums): the whole objective of one step."""

    def __init__(self, args):
        super().__init__()
        self.args = args
        mlp_widths = [int(w) for w in args.mlp.split("-")]
        emb_dims = mlp_widths[-1]
        g_dims = 6 if args.rot_color else 4
        self.backbone = ResNet18()
        # The (invariant) projector; the only head of vicreg, simclr and part-inv.
        self.projector = projector(REPR_DIM, mlp_widths)
        if args.method.startswith("equimod"):     # EquiMod's equivariant head, on all 512 dims
            self.proj_equi = projector(REPR_DIM, mlp_widths)
        if args.method in PREDICTS:
            if args.predictor == "hypernet":
                self.predictor = HypernetPredictor(emb_dims, g_dims, args.hypernet == "deep")
            else:
                self.predictor = MLPPredictor(emb_dims, g_dims)
        if args.method == "simclr-augself":
            self.augself = augself_head(REPR_DIM, g_dims)
        self.online = OnlineEvaluator(representation_parts(args))

    def forward(self, x1, x2, g, labels):
        y1 = self.backbone(x1)                 # two calls: BN statistics per view, as official
        y2 = self.backbone(x2)
        terms = method_loss(self, y1, y2, g, self.args)
        online_loss, sums = self.online(y1, y2, g[:, :4], labels)
        return terms["loss"] + online_loss, terms, sums


def method_loss(model, y1, y2, g, args):
    """The projector(s), predictor and loss of args.method on the representations y1, y2
    (B, 512) of the two views; g (B, 4 or 6) is the relative transformation. Returns the dict of
    unweighted terms and the weighted 'loss'."""
    method = args.method
    tau = args.temperature
    vicreg_weights = dict(sim_coeff=args.sim_coeff, std_coeff=args.std_coeff,
                          cov_coeff=args.cov_coeff)
    z1 = model.projector(y1)                   # (B, D)
    z2 = model.projector(y2)
    if method == "vicreg":
        return vicreg_loss(z1, z2, args.batch_size, **vicreg_weights)
    if method == "simclr":
        return simclr_loss(z1, z2, tau)
    if method == "simclr-augself":
        return simclr_augself_loss(z1, z2, model.augself, y1, y2, g, tau, args.augself_weight)
    if method == "vicreg-partinv":
        n_inv = z1.shape[1] - args.equi_emb_dims
        return vicreg_partinv_loss(z1, z2, n_inv, args.batch_size, **vicreg_weights)
    if method == "simclr-onlyequi":
        return simclr_onlyequi_loss(model.predictor(z1, g), z2, tau)
    z1_equi = model.proj_equi(y1)              # EquiMod: the equivariant head, (B, D)
    z2_equi = model.proj_equi(y2)
    pred = model.predictor(z1_equi, g)         # one direction only: x -> x'
    if method == "equimod-simclr":
        return equimod_simclr_loss(z1, z2, pred, z2_equi, tau, args.equi_factor)
    return equimod_vicreg_loss(z1, z2, z1_equi, z2_equi, pred, args.batch_size,
                               args.equi_factor, **vicreg_weights)


# ---- the optimiser and one training step (the SIE README command) ----
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


def monitor_metrics(sums):
    """The monitor's epoch figures from its summed counts: top-1 per part and the pooled R² (one
    scalar mean over all four quaternion components, as the official code and eval.py)."""
    parts = [key[:-len("_correct")] for key in sums if key.endswith("_correct")]
    n_pairs = sums["pairs"]
    total_sq = sums["q_sq"] - sums["q_sum"] ** 2 / (4 * n_pairs)
    top1 = {f"top1_{p}": sums[f"{p}_correct"] / (2 * n_pairs) for p in parts}
    rot_r2 = {f"rot_r2_{p}": 1 - sums[f"{p}_sse"] / total_sq for p in parts}
    return {**top1, **rot_r2}


# ---- what the harness needs from this method ----
def make_dataset(args, root):
    """One item per training OBJECT: two distinct views, their relative rotation g (with
    --rot-color also the two hue differences) and the label. -> (dataset, collate_fn)."""
    dataset = data.Pairs3DIEBench(root, "train", size=args.resolution, color=args.rot_color,
                                  seed=args.seed)
    return dataset, None


def to_device(batch, device, args):
    """(x1, x2, g, labels) from the loader -> the device; images channels_last. args is not
    needed here (the images arrive as normalised floats); sie.py's --decode paths use it."""
    x1, x2, g, labels = batch
    images = []
    for x in (x1, x2):
        x = x.to(device, non_blocking=True)
        images.append(x.contiguous(memory_format=torch.channels_last))
    g = g.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    return images[0], images[1], g, labels


build_model = Baseline     # the whole training model from (saved) args; eval.py rebuilds it so


def probeable(model, args):
    """What eval.py probes: the backbone and its (single, full) part; with a predictor also the
    equivariant head and the predictor (for MRR, H@k and PRE), and the width of g. Only-equi's
    single projector is its equivariant head."""
    embed = None
    predict = None
    if args.method in PREDICTS:
        embed = getattr(model, "proj_equi", model.projector)
        predict = model.predictor
    return eval.Probeable(backbone=model.backbone, parts=representation_parts(args), embed=embed,
                          predict=predict, g_dim=6 if args.rot_color else 4)


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
    if dist.is_initialized():
        message = [problem]
        dist.broadcast_object_list(message, src=0)
        problem = message[0]
    if problem:
        raise eval.RunError(problem)


# ---- logging ----
def reduce_sums(sums):
    """One all-reduce and one host sync for a dict of device scalars: the logging point."""
    keys = sorted(sums)
    vec = torch.stack([sums[k].float() for k in keys])
    if dist.is_initialized():
        dist.all_reduce(vec)
    return dict(zip(keys, vec.tolist()))


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
            means = {k: v / (n_window * world) for k, v in reduce_sums(window).items()}
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
                      **monitor_metrics(reduce_sums(epoch_sums)))
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
