"""SER: Soft Equivariance Regularization for invariant self-supervised learning (Lee, Kim, Kim, Lee, Lee,
ICLR 2026, arXiv 2603.06693) on a ViT, with MoCo-v3, DINO or Barlow Twins as the invariant base method.

The base method trains the final [CLS] embedding. SER adds a patch-wise contrastive loss on the token map
after an early block L (3 of 12) asking that map to TRANSFORM with the input: for x2 = g.x1 (90-degree
rotations, flips, rescaling) the map of x1 moved by the analytic feature action rho_g must match the map
of x2. [CLS] joins only after block L ("delayed [CLS]"), so blocks 1..L see a clean token grid; a small
sub-batch b2 carries the group-transformed views. "§x" = shared/spec/ser.md. Nothing runs at import.

    python ser.py --base moco                                   # toy preset: CPU, generated data, minutes
    torchrun --standalone --nproc_per_node=8 ser.py --preset paper --base moco --data-root /data/imagenet
"""
import argparse
import copy
import fcntl
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import data
import eval  # noqa: A004 (the project's eval.py; the builtin eval() is never used here)

SCRIPT = "ser"          # the checkpoint's "script" field; eval.py accepts only the project's scripts

# ================================== config ==================================
# --preset and --base fill these defaults; any flag given on the command line overrides them.
PAPER = dict(data_root="data/imagenet", resolution=224, patch=16, dim=384, depth=12, heads=6, batch_size=2048,
             epochs=100, warmup_epochs=10, ser_layer=3, b2_ratio=0.01, token_dim=512, num_workers=10)
# Deviation (toy, a CPU in minutes): 32-px crops, patch 4 (an 8 x 8 token grid as in §7), a 64-wide ViT,
# b2 = 8 of 64 images instead of 1 % so that every anchor has other images as negatives (§6.1), crops of at
# least 25 % of the image (a 32-px 8 % crop is mostly background).
TOY = dict(data_root=data.DEFAULT_IMAGEFOLDER_ROOT, resolution=32, patch=4, dim=64, depth=6, heads=2, crop_min=0.25,
           batch_size=64, epochs=10, warmup_epochs=1, ser_layer=2, b2_ratio=0.125, token_dim=128, num_workers=1)
BASE_COMMON = dict(momentum=0.99, teacher_temp_epochs=10, freeze_last_epochs=0, head_bottleneck=256,
                   drop_path=0.0, clip_grad=0.0)
METHOD = {  # the §2 table (the released run_pretrain.sh), both presets
    "moco": dict(blr=3e-4, min_lr_frac=0.0, wd=0.1, wd_end=0.1, crop_min=0.08, interp="bilinear",
                 head_hidden=4096, head_dim=256, ser_lambda=1.0, ser_tau=0.5),
    "dino": dict(blr=1e-4, min_lr_frac=1e-5 / 8e-4, wd=0.04, wd_end=0.4, clip_grad=0.3, crop_min=0.25,
                 interp="bicubic", drop_path=0.1, momentum=0.982, freeze_last_epochs=1, head_hidden=2048,
                 head_dim=65536, ser_lambda=0.3, ser_tau=0.4),
    "bt": dict(blr=1e-4, min_lr_frac=1e-3, wd=0.1, wd_end=0.1, clip_grad=0.3, crop_min=0.08, interp="bicubic",
               head_hidden=8192, head_dim=8192, ser_lambda=1.0, ser_tau=0.4),
}
TOY_METHOD = {"moco": dict(blr=3e-3, head_hidden=512, head_dim=128),   # narrower heads, larger lr, short warm-ups
              "dino": dict(blr=2e-3, head_hidden=512, head_bottleneck=128, head_dim=1024, teacher_temp_epochs=1,
                           drop_path=0.0),
              "bt": dict(blr=2e-3, head_hidden=512, head_dim=512)}

def preset_defaults(preset, base):
    return {**BASE_COMMON, **METHOD[base], **(PAPER if preset == "paper" else {**TOY, **TOY_METHOD[base]})}

# argparse types: a bad value is one "argument --flag: ..." line and exit code 2, never a traceback later.
def _number(text, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value

def _checked(text, kind, ok, rule):
    value = _number(text, kind)
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{text} is not {rule}")
    return value

MAX_FLOAT = 1e6     # above any sensible lr, weight, temperature or decay; 1e39 would be inf in fp32

def positive_int(text):
    return _checked(text, int, lambda v: v >= 1, "an integer >= 1")

def nonneg_int(text):
    return _checked(text, int, lambda v: v >= 0, "an integer >= 0")

def seed_int(text):                 # epoch_seed() and sample_group() scale it up: keep it inside 64 bits
    return _checked(text, int, lambda v: 0 <= v < 2 ** 31, "an integer in [0, 2^31)")

def positive_float(text):
    return _checked(text, float, lambda v: 0 < v <= MAX_FLOAT, f"a number in (0, {MAX_FLOAT:g}]")

def nonneg_float(text):
    return _checked(text, float, lambda v: 0 <= v <= MAX_FLOAT, f"a number in [0, {MAX_FLOAT:g}]")

def unit_float(text):               # momenta, end fractions
    return _checked(text, float, lambda v: 0 <= v <= 1, "a number in [0, 1]")

def crop_scale(text):               # RandomResizedCrop's minimum area fraction
    return _checked(text, float, lambda v: 0 < v <= 1, "a number in (0, 1]")

def proper_fraction(text):          # b2's share: b1 and b2 both non-empty
    return _checked(text, float, lambda v: 0 < v < 1, "a number in (0, 1)")

def drop_rate(text):                # 1 would divide by 1 - p = 0
    return _checked(text, float, lambda v: 0 <= v < 1, "a number in [0, 1)")

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are printed once under torchrun (by rank 0); every rank exits 2."""

    def error(self, message):
        if os.environ.get("RANK", "0") == "0":
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = ArgumentParser(description="SER: soft equivariance regularization on a ViT (Lee et al., ICLR 2026).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=("toy", "paper"), default="toy", help="toy = CPU minutes; paper = §2")
    p.add_argument("--base", choices=("moco", "dino", "bt"), default="moco", help="the invariant SSL method")
    g = p.add_argument_group("data")
    g.add_argument("--data-root", help="ImageFolder root (train/<wnid>/*.JPEG); the toy location is generated")
    g.add_argument("--resolution", type=positive_int, help="crop side in px (paper 224)")
    g.add_argument("--crop-min", type=crop_scale, help="RandomResizedCrop min scale (moco/bt 0.08, dino 0.25)")
    g.add_argument("--interp", choices=("bilinear", "bicubic"), help="crop interpolation (moco bilinear)")
    g.add_argument("--num-workers", type=nonneg_int, help="DataLoader worker processes per rank")
    g = p.add_argument_group("ViT (§1.1-1.2)")
    g.add_argument("--patch", type=positive_int, help="patch side in px (paper 16)")
    g.add_argument("--dim", type=positive_int, help="token width (ViT-S 384)")
    g.add_argument("--depth", type=positive_int, help="blocks (ViT-S 12)")
    g.add_argument("--heads", type=positive_int, help="attention heads (ViT-S 6)")
    g.add_argument("--drop-path", type=drop_rate, help="student stochastic depth of the LAST block, linear from 0 "
                   "at the first (dino 0.1, else 0)")
    g = p.add_argument_group("base method (§2)")
    g.add_argument("--head-hidden", type=positive_int, help="projector/predictor hidden width (moco 4096, dino 2048, "
                   "bt 8192)")
    g.add_argument("--head-dim", type=positive_int, help="head output (moco 256, dino 65536 prototypes, bt 8192)")
    g.add_argument("--head-bottleneck", type=positive_int, help="DINO head bottleneck (256)")
    g.add_argument("--moco-tau", type=positive_float, default=0.2, help="MoCo-v3 InfoNCE temperature (0.2)")
    g.add_argument("--momentum", type=unit_float, help="teacher EMA momentum at step 0, cosine to 1 (moco 0.99, "
                   "dino 0.982)")
    g.add_argument("--student-temp", type=positive_float, default=0.1, help="DINO student temperature (0.1)")
    g.add_argument("--teacher-temp0", type=positive_float, default=0.04, help="DINO teacher temperature at step 0")
    g.add_argument("--teacher-temp", type=positive_float, default=0.07, help="DINO teacher temperature after warm-up")
    g.add_argument("--teacher-temp-epochs", type=nonneg_int, help="DINO teacher-temperature warm-up, epochs (10)")
    g.add_argument("--center-momentum", type=unit_float, default=0.9, help="DINO centre momentum (0.9)")
    g.add_argument("--freeze-last-epochs", type=nonneg_int, help="DINO: epochs with the head's last layer frozen (1)")
    g.add_argument("--bt-lambda", type=nonneg_float, default=0.0051, help="Barlow Twins off-diagonal weight")
    g = p.add_argument_group("SER (§1.3-1.8)")
    g.add_argument("--ser", choices=("on", "off"), default="on", help="off = vanilla base: [CLS] at the input, no b2")
    g.add_argument("--ser-layer", type=positive_int, help="block L whose tokens get L_equiv; [CLS] joins after it "
                   "(paper 3)")
    g.add_argument("--ser-lambda", type=nonneg_float, help="weight of L_equiv (moco/bt 1, dino 0.3); 0 = the "
                   "paper's control")
    g.add_argument("--ser-tau", type=positive_float, help="token NT-Xent temperature (moco 0.5, dino/bt 0.4)")
    g.add_argument("--ser-negatives", choices=("target", "both"), default="target", help="target: other images' "
                   "tokens of the target branch (released 2-view code); both: of both branches (paper's equation)")
    g.add_argument("--b2-ratio", type=proper_fraction, help="share of each per-rank batch in b2 (paper 0.01: 3 of "
                   "256)")
    g.add_argument("--token-dim", type=positive_int, help="width of the 1x1 token projector (paper 512)")
    g = p.add_argument_group("optimisation (§2)")
    g.add_argument("--epochs", type=positive_int, help="pretraining epochs (paper 100)")
    g.add_argument("--warmup-epochs", type=nonneg_int, help="linear lr warm-up, <= --epochs (paper 10)")
    g.add_argument("--batch-size", type=positive_int, help="GLOBAL batch; per-rank batch = global / world size "
                   "(paper 2048)")
    g.add_argument("--blr", type=positive_float, help="base lr: lr = blr x batch / 256 (moco 3e-4, dino/bt 1e-4)")
    g.add_argument("--min-lr-frac", type=unit_float, help="final lr / peak lr (moco 0, dino 1/80, bt 1e-3)")
    g.add_argument("--wd", type=nonneg_float, help="AdamW weight decay at step 0 (moco/bt 0.1, dino 0.04)")
    g.add_argument("--wd-end", type=nonneg_float, help="weight decay at the end, cosine (dino 0.4, else = --wd)")
    g.add_argument("--clip-grad", type=nonneg_float, help="per-parameter gradient-norm clip, 0 = off (dino/bt 0.3; "
                   "bt on W GPUs: 0.3 x W matches the released code, see barlow_twins_loss)")
    g.add_argument("--amp", choices=("bf16", "fp16", "none"), default="bf16", help="CUDA autocast; fp16 + GradScaler")
    g.add_argument("--compile", action="store_true", help="torch.compile every ViT block (same maths; slow start)")
    g = p.add_argument_group("run")
    g.add_argument("--run-dir", help="default runs/ser-<preset>-<base>[-tags]; rerun the same command to resume")
    g.add_argument("--resume", help="checkpoint to resume from (default: <run-dir>/checkpoint.pt if present)")
    g.add_argument("--seed", type=seed_int, default=0, help="model init, augmentation and data order")
    g.add_argument("--log-every", type=positive_int, default=10, help="steps between log lines (the only host "
                   "syncs)")
    g.add_argument("--stop-after-epochs", type=nonneg_int, default=0, help="stop after N epochs (0 = never); rerun "
                   "resumes")
    g.add_argument("--eval-protocols", default="all", help="eval.py protocols after training, comma-separated")
    g.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    known = p.parse_known_args(argv)[0]
    p.set_defaults(**preset_defaults(known.preset, known.base))
    args = p.parse_args(argv)
    if args.resolution % args.patch or args.resolution < 2 * args.patch:
        p.error(f"--resolution {args.resolution} must be a multiple of --patch {args.patch} and at least twice it "
                "(a token grid of at least 2 x 2 for rho_g to act on)")
    if args.dim % args.heads:
        p.error(f"--dim {args.dim} must be a multiple of --heads {args.heads}")
    if not 1 <= args.ser_layer <= args.depth:
        p.error(f"--ser-layer must be in 1..{args.depth} (the ViT's blocks)")
    if args.warmup_epochs > args.epochs:
        p.error(f"--warmup-epochs {args.warmup_epochs} exceeds --epochs {args.epochs}: the lr would never reach "
                "its peak")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world:
        p.error(f"argument --batch-size: {args.batch_size} is not divisible by the {world} "
                f"processes (--batch-size is the global batch)")
    if args.resume and not os.path.isfile(args.resume):
        p.error(f"argument --resume: no checkpoint file {args.resume}")
    if args.run_dir is None:                                # one run dir per README row: vanilla, lambda, L, seed
        tags = ["vanilla"] if args.ser == "off" else [f"{n}{getattr(args, k):g}" for n, k in (("L", "ser_layer"), (
            "lam", "ser_lambda")) if getattr(args, k) != preset_defaults(args.preset, args.base)[k]]
        tags += [f"s{args.seed}"] if args.seed else []
        args.run_dir = os.path.join("runs", "-".join(["ser", args.preset, args.base, *tags]))
    return args

def usage_error(message):
    """A flag found bad after parsing (it needs the data or the world size): argparse's format, exit code 2."""
    if get_rank() == 0:
        print(f"ser.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)

# =============================== distributed ================================
def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (NCCL on GPUs, gloo on CPU); without them, one plain process."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)     # before init, so NCCL binds this rank to its own GPU
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return rank, world, device

def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*msg):
    if is_main():
        print(*msg, flush=True)

class FullGather(torch.autograd.Function):
    """all_gather that keeps gradients: backward sums the incoming gradients over ranks and returns this rank's
    slice, which DDP's averaging turns into the full-batch gradient. L_equiv's student side MUST use it: the
    released code gathers with @torch.no_grad() helpers, so its L_equiv never reaches the weights (§5.1)."""

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
    """(n_local, ...) -> (n_global, ...), rank-major, differentiable; identity in a single process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return torch.cat(FullGather.apply(x))

# ================================== data ====================================
class TwoCrops:
    """Two independent RandomResizedCrop + horizontal-flip crops of one image as [0, 1] tensors (§2, 'crop
    (CPU)'). b1 uses both, b2 the first one twice (§1.5); photometric ops run later, on the batch."""

    def __init__(self, args):
        interp = getattr(T.InterpolationMode, args.interp.upper())
        self.t = T.Compose([T.RandomResizedCrop(args.resolution, scale=(args.crop_min, 1.0), interpolation=interp),
                            T.RandomHorizontalFlip(), T.ToTensor()])

    def __call__(self, img):
        return self.t(img), self.t(img)

def check_inputs(args):
    """What training and the evaluation at its end will read, checked cheaply before the first
    step (start_up calls this on rank 0): the data set, the batch against it, the protocols."""
    root = data.ensure_imagefolder(args.data_root)     # generates the toy set on first use
    data.preflight(root, "ImageFolder")
    n_train = len(data.ImageFolder(root, "train").samples)
    if args.batch_size > n_train:                     # drop_last: 0 steps and an untrained "result"
        raise RunError(f"--batch-size {args.batch_size} exceeds the {n_train} training images of "
                       f"{root} (no full batch to train on; lower --batch-size)")
    if not args.no_eval:
        eval.check_protocols(args.eval_protocols, root)


def make_loader(args, rank, world):
    """ImageFolder train split, two crops per image; the global order depends only on (seed, epoch)."""
    root = data.ensure_imagefolder(args.data_root)
    dataset = data.ImageFolder(root, "train", transform=TwoCrops(args))
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=args.batch_size // world, sampler=sampler, drop_last=True,
                        num_workers=args.num_workers, pin_memory=torch.cuda.is_available())
    return loader, root

def to_device(batch, device):
    """((x_a, x_b), labels) from the loader -> (x_a, x_b, labels) on the device; x in [0, 1], (B, 3, S, S)."""
    (x_a, x_b), labels = batch
    return tuple(t.to(device, non_blocking=True) for t in (x_a, x_b, labels))

def grayscale(x):                                           # ITU-R 601 luma, (B, 3, H, W) -> (B, 1, H, W)
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]

YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])

def color_jitter(x, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
    """ColorJitter(0.4, 0.4, 0.2, 0.1) with per-image factors, on the batch. Deviation: a fixed order instead of
    a random one, and hue rotates the chroma plane in YIQ space instead of shifting the HSV hue."""
    B, dev = x.shape[0], x.device
    factor = lambda s: 1 + s * (2 * torch.rand(B, 1, 1, 1, device=dev) - 1)
    x = (x * factor(brightness)).clamp(0, 1)
    mean = grayscale(x).mean((1, 2, 3), keepdim=True)
    x = ((x - mean) * factor(contrast) + mean).clamp(0, 1)
    gray = grayscale(x)
    x = ((x - gray) * factor(saturation) + gray).clamp(0, 1)
    theta = 2 * math.pi * hue * (2 * torch.rand(B, device=dev) - 1)
    c, s, one, zero = theta.cos(), theta.sin(), torch.ones_like(theta), torch.zeros_like(theta)
    rot = torch.stack([one, zero, zero, zero, c, -s, zero, s, c], 1).view(B, 3, 3)
    # (B, 3, 3): RGB -> YIQ, rotate (I, Q), -> RGB. Inverse on the CPU, non_blocking copies: no host sync on CUDA.
    mix = torch.linalg.inv(YIQ).to(dev, non_blocking=True) @ rot @ YIQ.to(dev, non_blocking=True)
    return torch.einsum("bij,bjhw->bihw", mix, x).clamp(0, 1)

def gaussian_blur(x, sigma, k=9):
    """Per-image Gaussian blur, k x k kernel, std sigma (B,); separable, reflect padding."""
    B, C, H, W = x.shape
    r = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    ker = torch.exp(-r ** 2 / (2 * sigma[:, None] ** 2))
    ker = (ker / ker.sum(1, keepdim=True)).repeat_interleave(C, 0)              # (B*C, k)
    y = F.pad(x.reshape(1, B * C, H, W), (k // 2,) * 4, mode="reflect")
    y = F.conv2d(F.conv2d(y, ker[:, None, None, :], groups=B * C), ker[:, None, :, None], groups=B * C)
    return y.reshape(B, C, H, W)

def solarize(x):
    """Per-image solarisation with a threshold drawn from U(0, 1), as the released pipeline's kornia
    RandomSolarize(thresholds=0.5, additions=0) does (thresholds=0.5 means 0.5 +- 0.5, not a fixed 0.5;
    builder/utils.py :: Aug_equi); BYOL's PIL solarise fixes it at 128/255 instead."""
    threshold = torch.rand(x.shape[0], 1, 1, 1, device=x.device)
    return torch.where(x < threshold, x, 1 - x)

def photometric(x, blur_p, solarize_p):
    """BYOL's asymmetric pipelines (Grill et al. 2020, Tab. 6; §2): jitter p 0.8, grayscale p 0.2, Gaussian blur
    (k 9, sigma ~ U(0.1, 2)) p blur_p, solarise (random threshold) p solarize_p; every coin per image."""
    B, dev = x.shape[0], x.device
    coin = lambda p: torch.rand(B, 1, 1, 1, device=dev) < p
    x = torch.where(coin(0.8), color_jitter(x), x)
    x = torch.where(coin(0.2), grayscale(x).expand_as(x), x)
    x = torch.where(coin(blur_p), gaussian_blur(x, 0.1 + 1.9 * torch.rand(B, device=dev)), x)
    return torch.where(coin(solarize_p), solarize(x), x) if solarize_p else x

T1, T2 = (1.0, 0.0), (0.1, 0.2)                             # (blur p, solarise p) of t1 and of t2

def normalize(x):
    mean, std = (torch.tensor(v).view(1, 3, 1, 1).to(x.device, non_blocking=True)   # non_blocking: no host sync
                 for v in (data.IMAGENET_MEAN, data.IMAGENET_STD))
    return (x - mean) / std

def b2_size(local_batch, args):
    """Images of the equivariant sub-batch per rank (§1.8: round(0.01 x 256) = 3 in the paper); 0 = vanilla."""
    return round(args.b2_ratio * local_batch) if args.ser == "on" else 0

def sample_group(n, grid, step, seed, device):
    """The b2 views' group elements g_v = R90^{k_v} o S_v o F^{f_v} o R180^{d_v} (§1.4). k_v and the token grid
    (h_v, w_v) (area grid^2 x U(0.7, 1.3), aspect log-U(3/4, 4/3)) are drawn once per step, the same on every
    rank (Deviation: per GPU in the code; one draw keeps gathered maps one shape). Per image d0, f0 ~ B(1/2);
    view 1 takes the complements, so every pair differs by a reflection."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    u, k = torch.rand(4, generator=gen).tolist(), torch.randint(4, (2,), generator=gen).tolist()
    hw = []
    for v in range(2):
        area, aspect = grid * grid * (0.7 + 0.6 * u[2 * v]), math.exp(math.log(3 / 4) + math.log(16 / 9) * u[2 * v + 1])
        hw.append((round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))))
    d0, f0 = torch.rand(n, device=device) < 0.5, torch.rand(n, device=device) < 0.5
    return {"k": k, "hw": hw, "d": [d0, ~d0], "f": [f0, ~f0]}

def act_on_images(x, g, v, patch):
    """Input action of g_v in the §1.4 order: rot180^d and hflip^f per image, bicubic resize to EXACTLY
    (patch h_v, patch w_v) px so the token grid is h_v x w_v (§6.5), then rot90^{k_v}."""
    x = torch.where(g["d"][v].view(-1, 1, 1, 1), x.flip(-2, -1), x)
    x = torch.where(g["f"][v].view(-1, 1, 1, 1), x.flip(-1), x)
    x = F.interpolate(x, size=tuple(patch * s for s in g["hw"][v]), mode="bicubic", align_corners=False)
    return torch.rot90(x, g["k"][v], dims=(-2, -1))

def make_views(x_a, x_b, args, step):
    """The step's views (§1.5, §7.1) -> ([v1, v2] or [v1, v2, u0, u1], g or None). b1 = the first B - e images:
    two independent crops through t1 / t2. b2 = the last e: the SAME crop x_a through t1 and t2, then g_0 / g_1."""
    B, e = x_a.shape[0], b2_size(x_a.shape[0], args)
    views = [normalize(photometric(x_a[:B - e], *T1)), normalize(photometric(x_b[:B - e], *T2))]
    if e == 0:
        return views, None
    g = sample_group(e, args.resolution // args.patch, step, args.seed, x_a.device)
    return views + [act_on_images(normalize(photometric(x_a[B - e:], *t)), g, v, args.patch)
                    for v, t in enumerate((T1, T2))], g

# =============================== model pieces ===============================
class Block(nn.Module):
    """Pre-norm transformer block (Dosovitskiy et al. 2021): x + Attn(LN(x)), then x + MLP(LN(x)); qkv bias,
    LayerNorm eps 1e-6, MLP 4x, stochastic depth on both residual branches."""

    def __init__(self, dim, heads, drop_path=0.0):
        super().__init__()
        self.heads, self.drop_path = heads, drop_path
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def attention(self, x):                                 # (B, N, D) -> (B, N, D)
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))

    def drop(self, x):                                      # drop a whole branch per sample, rescale the rest
        if not self.training or self.drop_path == 0:
            return x
        return x * (torch.rand(x.shape[0], 1, 1, device=x.device) >= self.drop_path) / (1 - self.drop_path)

    def forward(self, x):
        x = x + self.drop(self.attention(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))

class ViT(nn.Module):
    """ViT with delayed [CLS] (§1.2). cls_at = blocks run before [CLS] joins: L with SER (blocks 1..L see patch
    tokens only; [CLS] has no position embedding), 0 = vanilla. A separate LayerNorm norm_equiv reads the
    layer-L patch map for L_equiv only; the un-normalised stream goes on. Training and evaluation: one forward."""

    def __init__(self, resolution, patch, dim, depth, heads, cls_at, loss_layer=0, drop_path=0.0):
        super().__init__()
        self.patch, self.grid, self.cls_at, self.loss_layer = patch, resolution // patch, cls_at, loss_layer
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid ** 2, dim))      # patch tokens only
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, dim)) if cls_at == 0 else None
        # Stochastic depth rises linearly over depth, 0 at block 1 to drop_path at the last (DINO's / the
        # released vision_transformer.py's decay rule, Huang et al. 2016).
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(Block(dim, heads, rate) for rate in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.norm_equiv = nn.LayerNorm(dim, eps=1e-6) if loss_layer else None

    def init_weights(self, moco_v3):
        """timm/DINO init (trunc-normal 0.02), or MoCo-v3's (Chen et al. 2021, Sec. 5 / §6.13): xavier-uniform
        linears with qkv treated as three matrices, [CLS] ~ N(0, 1e-6). The patch embedding keeps PyTorch's
        default Conv2d init for every base, as in the released vision_transformer.py (VisionTransformer.__init__
        has MoCo-v3's xavier patch init commented out; for MoCo it only freezes the layer)."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                bound = math.sqrt(6.0 / (m.weight.shape[0] // (3 if name.endswith("qkv") else 1) + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound) if moco_v3 else nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for p in (self.pos_embed, self.cls_pos):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6 if moco_v3 else 0.02)

    def patch_tokens(self, x):
        """(B, 3, P h, P w) -> (B, h w, D) row-major, plus the position table bicubically resized to h x w
        (any grid, square or not: §6.5). As in the released interpolate_pos_encoding (DINO's): the resize is
        given as scale_factor (h + 0.1) / grid, which sets both the output size (floor: exactly h) and the
        sampling positions (slightly different from a resize to size=(h, w))."""
        t = self.patch_embed(x)                             # (B, D, h, w)
        h, w = t.shape[-2:]
        pos = self.pos_embed
        if (h, w) != (self.grid, self.grid):
            pos = pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
            scale = ((h + 0.1) / self.grid, (w + 0.1) / self.grid)
            pos = F.interpolate(pos, scale_factor=scale, mode="bicubic", align_corners=False)
            pos = pos.flatten(2).transpose(1, 2)
        return t.flatten(2).transpose(1, 2) + pos, (h, w)

    def forward(self, x, every_block=False):
        """-> (final-norm [CLS] (B, D), loss map norm_equiv(f1(x)) (B, D, h, w) or None[, block outputs])."""
        t, (h, w) = self.patch_tokens(x)
        B, eq_map, outs = t.shape[0], None, []
        for i, blk in enumerate(self.blocks):               # blk is block i + 1 in the paper's count
            if i == self.cls_at:                            # delayed [CLS] insertion, before block cls_at + 1
                cls = self.cls_token if self.cls_pos is None else self.cls_token + self.cls_pos
                t = torch.cat([cls.expand(B, -1, -1), t], dim=1)
            t = blk(t)
            if i + 1 == self.loss_layer:                    # f1(x): layer-L patch tokens through their own LN
                eq_map = self.norm_equiv(t[:, int(i >= self.cls_at):]).transpose(1, 2).reshape(B, -1, h, w)
            if every_block:
                outs.append(t)
        cls = self.norm(t)[:, 0]
        return (cls, eq_map, outs) if every_block else (cls, eq_map)

    def last_blocks_features(self, x, n=4):
        """SER's probe feature (§3.1, DINO's ViT-S protocol): final-norm [CLS] of the last n blocks, (B, n D).
        Deviation: a block run before [CLS] joins (if L > depth - n) gives its mean final-norm patch token."""
        outs = self(x, every_block=True)[2]
        return torch.cat([self.norm(o)[:, 0] if i >= self.cls_at else self.norm(o).mean(1)
                          for i, o in enumerate(outs) if i >= len(outs) - n], dim=1)

    def block_maps(self, x):
        """Every block's output patch tokens as maps [(B, D, h, w)] x depth (the per-layer equivariance score)."""
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        outs = self(x, every_block=True)[2]
        return [o[:, int(i >= self.cls_at):].transpose(1, 2).reshape(o.shape[0], -1, h, w) for i, o in enumerate(outs)]

def mlp(dims, last_bn=False):
    """MoCo-v3 / Barlow Twins MLP: (Linear without bias, BN, ReLU) between layers, a bias-free last Linear,
    and for MoCo-v3's ViT projector AND predictor a final BN without affine parameters (MoCo-v3's
    MoCo_ViT._build_mlp with last_bn=True for both; only its ResNet predictor drops it)."""
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        hidden = [nn.BatchNorm1d(b), nn.ReLU(inplace=True)] if i < len(dims) - 2 else []
        layers += [nn.Linear(a, b, bias=False), *hidden]
    return nn.Sequential(*layers, *([nn.BatchNorm1d(dims[-1], affine=False)] if last_bn else []))

class DINOHead(nn.Module):
    """DINO's head (Caron et al. 2021, Sec. 3.1): 3-layer MLP with GELU and no BN -> bottleneck -> L2 norm ->
    weight-normalised linear layer to K prototypes (norm_last_layer False: the norm g is trained too). Init as
    DINOHead: the MLP's weights trunc-normal(0.02) and biases 0; the last layer keeps PyTorch's default (DINO
    applies its init before creating it), its norm g = 1."""

    def __init__(self, dim, hidden, bottleneck, out):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, out, bias=False))
        self.last.parametrizations.weight.original0.data.fill_(1.0)

    def forward(self, x):
        return self.last(F.normalize(self.mlp(x), dim=-1))

class SER(nn.Module):
    """Student ViT, base-method head(s), the 1x1 token projector h (§1.7), EMA teacher (MoCo-v3, DINO), DINO's
    centre, an online linear probe on detached [CLS]. forward() is a step's whole loss: DDP sees one forward."""

    def __init__(self, args):
        super().__init__()
        self.args, ser, D, H, d = args, args.ser == "on", args.dim, args.head_hidden, args.head_dim
        # Deviation: with L = depth no block would be left for [CLS]; it then joins before the last block.
        cls_at = min(args.ser_layer, args.depth - 1) if ser else 0
        vit = lambda dp: ViT(args.resolution, args.patch, D, args.depth, args.heads, cls_at,
                             args.ser_layer if ser else 0, dp)
        self.student = vit(args.drop_path)
        self.student.init_weights(moco_v3=args.base == "moco")
        if args.base == "moco":
            self.student.patch_embed.requires_grad_(False)  # MoCo-v3's frozen random patch projection (§6.13)
            self.head, self.predictor = mlp([D, H, H, d], last_bn=True), mlp([d, H, d], last_bn=True)
        elif args.base == "dino":
            self.head = DINOHead(D, H, args.head_bottleneck, d)
            self.register_buffer("center", torch.zeros(1, d))
        else:
            self.head = mlp([D, H, H, d])
        E = args.token_dim                                  # h = Conv1x1 D->E, GELU, Conv1x1 E->E, no bias
        self.token_proj = nn.Sequential(nn.Conv2d(D, E, 1, bias=False), nn.GELU(),
                                        nn.Conv2d(E, E, 1, bias=False)) if ser else None
        self.probe = nn.Linear(D, getattr(args, "num_classes", 1000))
        self.teacher = self.teacher_head = None
        if args.base in ("moco", "dino"):                   # EMA teacher, without stochastic depth
            self.teacher = vit(0.0)
            self.teacher.load_state_dict(self.student.state_dict())
            self.teacher_head = copy.deepcopy(self.head)
            self.teacher.requires_grad_(False), self.teacher_head.requires_grad_(False)

    def forward(self, views, g, labels, sched):
        """views = [v1, v2] (b1) + [u0, u1] (b2) with SER: even = view A, odd = view B of each image. Both
        sub-batches feed the invariance loss (§1.8), b2 alone L_equiv. -> (total loss, detached terms)."""
        a = self.args
        st = [self.student(v) for v in views]               # (cls, layer-L map) per view
        cls_a, cls_b = torch.cat([s[0] for s in st[0::2]]), torch.cat([s[0] for s in st[1::2]])
        te = None
        if self.teacher is not None:
            with torch.no_grad():
                te = [self.teacher(v) for v in views]
                t_a, t_b = (self.teacher_head(torch.cat([t[0] for t in te[i::2]])) for i in (0, 1))
        if a.base == "moco":                                # symmetrised InfoNCE (MoCo-v3 Alg. 1)
            q_a, q_b = self.predictor(self.head(cls_a)), self.predictor(self.head(cls_b))
            inv = moco_infonce(q_a, t_b, a.moco_tau) + moco_infonce(q_b, t_a, a.moco_tau)
        elif a.base == "dino":
            inv = dino_loss(self.head(cls_a), self.head(cls_b), t_a, t_b, self.center, a.student_temp,
                            sched["teacher_temp"])
            self.update_center(torch.cat([t_a, t_b]))
        else:
            inv = barlow_twins_loss(self.head(cls_a), self.head(cls_b), a.bt_lambda)
        terms, loss = {"inv": inv.detach()}, inv
        if len(views) == 4:                                 # §1.8: L = L_inv + lambda L_equiv
            targets = None if te is None else (te[2][1], te[3][1])
            equiv = equivariance_loss(self.token_proj, (st[2][1], st[3][1]), targets, g, a.ser_tau, a.ser_negatives)
            loss = loss + a.ser_lambda * equiv              # lambda = 0: computed and logged, no gradient
            terms["equiv"] = equiv.detach()
        logits = self.probe(cls_a.detach().float())         # online monitor: nothing flows into the backbone
        probe = F.cross_entropy(logits, labels)
        terms.update(probe=probe.detach(), probe_acc=(logits.argmax(1) == labels).float().mean())
        return loss + probe, terms

    @torch.no_grad()
    def update_center(self, t):
        """DINO Eq. 4: c <- m c + (1 - m) mean of the teacher outputs over the global batch."""
        mean = t.float().mean(0, keepdim=True)
        if dist.is_initialized():
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        self.center.mul_(self.args.center_momentum).add_(mean, alpha=1 - self.args.center_momentum)

    @torch.no_grad()
    def ema_update(self, m):
        """teacher <- m teacher + (1 - m) student (MoCo-v3's momentum encoder, DINO's teacher), after each step.
        Deviation for MoCo-v3, which updates before computing the keys: the same update, one step later."""
        if self.teacher is not None:
            for s, t in ((self.student, self.teacher), (self.head, self.teacher_head)):
                for pt, ps in zip(t.parameters(), s.parameters()):
                    pt.lerp_(ps, 1 - m)

def build_model(args):                                      # the training model from (saved) args; eval.py too
    return SER(args)

class LastBlocksCLS(nn.Module):                             # images -> ViT.last_blocks_features, (B, 4 D)
    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit.last_blocks_features(x, n=4)

def probeable(model, args):
    """What eval.py needs (CONTRACT.md): "full" = last-4 [CLS] (the paper's probe), "last" = the final [CLS], every
    block's token map. DINO is probed on its teacher (Caron et al. 2021), MoCo-v3 and BT on the student."""
    import eval as evaluation                               # the name shadows a builtin: imported locally
    vit = model.teacher if args.base == "dino" else model.student
    return evaluation.Probeable(backbone=LastBlocksCLS(vit), token_maps=vit.block_maps,
                                parts={"full": slice(0, 4 * args.dim), "last": slice(3 * args.dim, 4 * args.dim)})

# =================================== loss ===================================
# Local vs global: MoCo's keys, L_equiv's targets and Barlow Twins' embeddings are gathered over ranks (with
# gradients wherever they carry any); DINO's cross-entropy, L_equiv's anchors and the probe are per-rank means
# (DDP's averaging makes them global). Statistics and log-sum-exps run in fp32 under any autocast (§6.16).

def autocast_off(x):
    """Context for the losses' statistics in fp32: `.float()` alone does not do it, since under autocast a matmul
    of two fp32 tensors still runs in bf16 / fp16 (similarities, logits, the cross-correlation). Each loss casts
    its inputs with .float() inside the context."""
    return torch.autocast(x.device.type, enabled=False)

def rho(z, k_from, hw_to, k_to):
    """Feature action rho_g (§1.4, §6.3): move a (n, C, h, w) token map from one b2 view's frame into the other's,
    in the released aug_equiv_feat's order: undo the source's rot90^k; vertical flip (their complementary flip and
    rot180 flags make it the same for every image); bicubic resize to the target's grid; the target's rot90^k."""
    z = torch.rot90(z, 2 - k_from, dims=(-2, -1))           # rot90^{-k_from}, then rot180 ...
    z = torch.flip(z, dims=(-1,))                           # ... then hflip: together the vertical flip
    z = F.interpolate(z, size=tuple(hw_to), mode="bicubic", align_corners=False)
    return torch.rot90(z, k_to, dims=(-2, -1))

def token_nce(anchor, target, tau, negatives="target"):
    """Patch-wise NT-Xent (§1.6). anchor, target: (n, C, h, w) maps in the same frame, n = this rank's b2 images.
    Anchor token (i, j): positive = target token (i, j); negatives = every target token of every OTHER image of
    the global b2 (with "both", also every anchor token of other images: the paper's 2N-way form). The other
    tokens of image i are left out (paper L300, §6.8). Similarity = cosine / tau; mean over the anchor tokens."""
    n, C, h, w = anchor.shape
    flat = lambda m: F.normalize(m.float().flatten(2).transpose(1, 2).reshape(n * h * w, C), dim=1)
    with autocast_off(anchor):
        a, t = flat(anchor), flat(target)                   # (n h w, C), sample-major then row-major (§6.7)
        pos = (a * t).sum(1) / tau
        img = torch.arange(n, device=a.device).repeat_interleave(h * w) + get_rank() * n    # global image ids
        logits = [pos[:, None]]
        for cand in [gather(t)] + ([gather(a)] if negatives == "both" else []):
            cand_img = torch.arange(cand.shape[0] // (h * w), device=a.device).repeat_interleave(h * w)
            logits.append((a @ cand.T / tau).masked_fill(img[:, None] == cand_img[None, :], float("-inf")))
        return (torch.logsumexp(torch.cat(logits, dim=1), dim=1) - pos).mean()

def equivariance_loss(proj, maps, targets, g, tau, negatives="target"):
    """L_equiv (§1.6, §7.1). Anchors: the student's projected layer-L maps of the two b2 views. Targets: the other
    view's map (the teacher's for MoCo/DINO, §6.9; the student's for BT: targets=None) through the STUDENT's
    projector h, moved into the anchor's frame by rho_g (after h, as in the code, §1.7); symmetrised. Gradients
    reach f1 through the anchors and h through both sides. Deviation for BT: the code uses one direction."""
    p = [proj(m) for m in maps]
    q = p if targets is None else [proj(t) for t in targets]
    t01 = rho(q[0], g["k"][0], g["hw"][1], g["k"][1])       # view-0 tokens in view 1's frame
    t10 = rho(q[1], g["k"][1], g["hw"][0], g["k"][0])
    return 0.5 * (token_nce(p[1], t01, tau, negatives) + token_nce(p[0], t10, tau, negatives))

def moco_infonce(q, k, tau):
    """MoCo-v3 (Chen et al. 2021, Alg. 1): cross-entropy of q.k / tau over the keys of the whole global batch,
    label = own key, times 2 tau. The keys come from the teacher: no gradient to carry."""
    with autocast_off(q):
        q, k = F.normalize(q.float(), dim=1), F.normalize(gather(k.float()), dim=1)
        labels = torch.arange(q.shape[0], device=q.device) + get_rank() * q.shape[0]
        return F.cross_entropy(q @ k.T / tau, labels) * 2 * tau

def dino_loss(s_a, s_b, t_a, t_b, center, tau_s, tau_t):
    """DINO (Caron et al. 2021, Eq. 1-4) with two global views and no multi-crop (§2): cross-entropy between the
    centred, sharpened teacher softmax of one view and the student of the other, averaged over both pairs."""
    loss = 0.0
    with autocast_off(s_a):
        for s, t in ((s_b, t_a), (s_a, t_b)):
            p_t = F.softmax((t.float() - center.float()) / tau_t, dim=1)
            loss = loss + torch.sum(-p_t * F.log_softmax(s.float() / tau_s, dim=1), dim=1).mean()
    return loss / 2

def barlow_twins_loss(z1, z2, lam):
    """Barlow Twins (Zbontar et al. 2021, Eq. 1): sum_i (1 - C_ii)^2 + lam sum_{i != j} C_ij^2, with C the cross-
    correlation of the batch-standardised embeddings (BN without affine, eps 1e-5) over the GLOBAL batch."""
    # Deviation (DDP gradient scale): the released BarlowTwins.forward_equiv sums C over GPUs with an in-place
    # all_reduce that autograd does not see; each rank back-propagates only its own share of C and DDP's
    # averaging leaves 1/W of the true gradient (W = world size). Here the gather carries gradients, so the
    # gradient is the true one. AdamW ignores the overall scale, the per-parameter clip does not: the released
    # clip 0.3 on W GPUs equals --clip-grad 0.3 x W here (2.4 at 8 GPUs); the same in one process (W = 1).
    with autocast_off(z1):
        z1, z2 = gather(z1.float()), gather(z2.float())
        std = lambda z: (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)
        c = std(z1).T @ std(z2) / z1.shape[0]
        return (torch.diagonal(c) - 1).pow(2).sum() + lam * (c.pow(2).sum() - torch.diagonal(c).pow(2).sum())

# ================================ optimiser =================================
def make_optimizer(model):
    """AdamW; weight decay on weights, none on biases and norm parameters (DINO's rule, §2). Deviation for
    MoCo-v3 / BT, whose code decays everything: one rule for all three bases. lr and wd are set every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "apply_wd": True},
              {"params": [p for p in params if p.ndim <= 1], "apply_wd": False}]
    return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, fused=next(model.parameters()).is_cuda)

def cosine(t, start, end):                                  # half cosine from start (t = 0) to end (t = 1)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))

def schedule(step, args, steps_per_epoch):
    """Every schedule as a pure function of the global step (§2). lr: linear warm-up to blr x batch / 256 (linear
    scaling rule, Goyal et al. 2017), half-cosine to min_lr_frac x peak; wd: cosine wd -> wd_end (DINO); teacher
    momentum: cosine m -> 1 (MoCo-v3, DINO); DINO teacher temperature: linear warm-up, then constant."""
    total, warm = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch
    peak = args.blr * args.batch_size / 256
    lr = peak * (step + 1) / warm if step < warm else cosine((step - warm) / max(1, total - warm), peak,
                                                              peak * args.min_lr_frac)
    temp = args.teacher_temp0 + (args.teacher_temp - args.teacher_temp0) * min(
        1.0, step / max(1, args.teacher_temp_epochs * steps_per_epoch))
    return {"lr": lr, "wd": cosine(step / total, args.wd, args.wd_end),
            "momentum": cosine(step / total, args.momentum, 1.0), "teacher_temp": temp}

# ================================ checkpoint ================================
RUN_LENGTH_FLAGS = {"run_dir", "resume", "data_root", "num_workers", "log_every", "stop_after_epochs", "compile",
                    "eval_protocols", "no_eval", "num_classes"}   # may change between a run and its resumption

def epoch_seed(args, epoch, rank):
    """Every random draw of an epoch (crops, workers, photometric coins, flip flags) comes from torch's global RNG,
    re-seeded with this at each epoch start: a resumed run repeats the interrupted one exactly, ranks differ."""
    return (args.seed * 100_003 + epoch) * 1_009 + rank

class RunError(Exception):
    """Bad input or a broken environment (flag, data, run dir, checkpoint, disk): the message is
    printed alone, without a traceback, and the run exits with code 2."""


def atomic_save(obj, path):
    """Write path.tmp, then rename it over path: a kill mid-write leaves the old file intact. A
    failed write (a full disk) removes its .tmp and says which file could not be written."""
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


def keep_previous(path):
    """path -> path's .prev.pt twin, atomically, while path itself stays in place: a hard link
    (a copy where links are not supported) renamed over the old .prev.pt."""
    prev = previous_checkpoint(path)
    try:
        os.link(path, prev + ".tmp")
    except OSError:
        shutil.copyfile(path, prev + ".tmp")
    os.replace(prev + ".tmp", prev)


def previous_checkpoint(path):
    return path[:-len(".pt")] + ".prev.pt" if path.endswith(".pt") else path + ".prev"


def save_checkpoint(path, model, optimizer, scaler, epoch, step, args):
    # per-method: no RNG state to store, every epoch re-seeds torch's RNG from epoch_seed
    if os.path.exists(path):                 # the last good checkpoint survives a damaged new one
        keep_previous(path)
    atomic_save({"script": SCRIPT, "args": vars(args), "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "epoch": epoch, "step": step,
                 "rng": {"next_epoch_seed_rank0": epoch_seed(args, epoch, 0)}}, path)


def read_checkpoint(path, args):
    """torch.load with weights_only=True, and the checks that make resuming safe: the file is
    whole, written by this script, with the same training flags. Any fault is one RunError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                   # truncated zip, foreign pickle, not a file: many types
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        prev = previous_checkpoint(path)
        fallback = (f"; the previous checkpoint {prev} is kept: resume from it with --resume {prev}"
                    if os.path.isfile(prev) else "")
        raise RunError(f"{path} is damaged or not a checkpoint ({reason}){fallback}; or move it "
                       f"away to start afresh") from None
    keys = ("script", "args", "model", "optimizer", "scaler", "epoch", "step", "rng")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in keys) or ckpt["script"] != SCRIPT:
        raise RunError(f"{path} is not a {SCRIPT}.py checkpoint; pass another --run-dir")
    for key, old in ckpt["args"].items():
        new = getattr(args, key, None)
        if key not in RUN_LENGTH_FLAGS and old != new:
            raise RunError(f"{path} was trained with --{key.replace('_', '-')} {old}, this command "
                           f"has {new}; pass the same flags to resume, or another --run-dir to "
                           f"start afresh")
    return ckpt


def load_checkpoint(path, model, optimizer, scaler, args):
    """Restores everything save_checkpoint wrote; returns (epochs done, step)."""
    ckpt = read_checkpoint(path, args)
    model.load_state_dict(ckpt["model"], strict=True)
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    return ckpt["epoch"], ckpt["step"]


def resume_path(args):
    """--resume, else the run dir's checkpoint.pt when there is one, else None (a fresh run)."""
    ckpt = os.path.join(args.run_dir, "checkpoint.pt")
    return args.resume or (ckpt if os.path.exists(ckpt) else None)


# ================================= start-up =================================
RUN_DIR_LOCK = []          # rank 0 keeps its locked file here for the whole run


def lock_run_dir(run_dir):
    """Create the run dir, check it is writable and lock it: a second run on the same dir is
    refused, naming the process that holds it (the kernel drops the lock when that one dies,
    kill -9 included). Left-over .tmp files of a run killed while saving are removed."""
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
    RUN_DIR_LOCK.append(lock)
    for name in os.listdir(run_dir):
        if name.endswith(".tmp"):
            os.remove(os.path.join(run_dir, name))


def unlock_run_dir():
    while RUN_DIR_LOCK:
        RUN_DIR_LOCK.pop().close()          # closing the file releases its flock


def start_up(args):
    """Rank 0 does the one-time work and every cheap check before anybody trains: it generates
    the default data, validates the data and the eval protocols, locks the run dir and reads the
    checkpoint to resume. The others wait, then all stop together on a problem (exit 2), which
    rank 0 alone prints."""
    problem = None
    if is_main():
        try:
            check_inputs(args)
            lock_run_dir(args.run_dir)
            if resume_path(args):
                read_checkpoint(resume_path(args), args)
        except (RunError, data.DataError, ValueError) as e:
            problem = str(e)
    if dist.is_initialized():
        message = [problem]
        dist.broadcast_object_list(message, src=0)
        problem = message[0]
    if problem:
        raise RunError(problem)


# ================================ train loop ================================
class NonFiniteLoss(RuntimeError):
    pass

def train_step(model, batch, optimizer, scaler, args, step=0, steps_per_epoch=1):
    """One optimisation step on a device batch (x_a, x_b, labels): schedules, views, forward, backward, DINO's
    per-parameter clipping and frozen last layer, AdamW, teacher EMA. Returns device tensors only."""
    sched = schedule(step, args, steps_per_epoch)
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = sched["lr"], sched["wd"] if group["apply_wd"] else 0.0
    x_a, x_b, labels = batch
    views, g = make_views(x_a, x_b, args, step)
    dtype = torch.float16 if args.amp == "fp16" else torch.bfloat16     # autocast on CUDA only, CPU in fp32
    with torch.autocast(x_a.device.type, dtype=dtype, enabled=x_a.is_cuda and args.amp != "none"):
        loss, terms = model(views, g, labels, sched)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    core = model.module if isinstance(model, DistributedDataParallel) else model
    if args.clip_grad > 0:                                  # DINO clips each parameter's gradient norm alone
        scaler.unscale_(optimizer)
        for p in core.parameters():
            if p.grad is not None:
                torch.nn.utils.clip_grad_norm_(p, args.clip_grad)
    if args.base == "dino" and step < args.freeze_last_epochs * steps_per_epoch:
        for p in core.head.last.parameters():               # DINO: last layer frozen during the first epoch
            p.grad = None
    scaler.step(optimizer)
    scaler.update()
    core.ema_update(sched["momentum"])
    return {"total": loss.detach(), **terms}

def reduce_means(sums, n):
    """One all-reduce and one host sync for a dict of device sums: the logging point. -> means over ranks."""
    keys = sorted(sums)
    vec = torch.stack([sums[k].float() for k in keys]) / n
    if dist.is_initialized():
        dist.all_reduce(vec)
        vec /= dist.get_world_size()
    return dict(zip(keys, vec.tolist()))

def log_event(args, kind, **fields):
    if get_rank() == 0:
        with open(os.path.join(args.run_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps({"kind": kind, **fields}) + "\n")

def versions(device):
    git = subprocess.run("git rev-parse --short HEAD && git status --porcelain -uno | head -1", shell=True,
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "git": git.split("\n")[0] + ("-dirty" if git.split("\n", 1)[-1].strip() else ""),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()}

def setup_run(args, rank, world, device):
    """Data, model, optimiser, scaler; resumes from the run dir's checkpoint when there is one."""
    local = args.batch_size // world
    if args.ser == "on" and not 2 <= b2_size(local, args) < local:
        usage_error(f"--b2-ratio {args.b2_ratio} gives {b2_size(local, args)} of {local} images per rank to b2; "
                    "L_equiv needs >= 2 (other images are its negatives) and b1 >= 1 (change --b2-ratio or "
                    "--batch-size)")
    loader, root = make_loader(args, rank, world)
    if len(loader) == 0:                                    # drop_last: else 0 steps and an untrained "result"
        usage_error(f"--batch-size {args.batch_size} exceeds the {len(loader.dataset)} training images of {root} "
                    "(no full batch to train on; lower --batch-size)")
    args.num_classes = len(loader.dataset.classes)
    torch.manual_seed(args.seed)                            # the same initial weights on every rank
    model = build_model(args).to(device)
    if device.type == "cuda" and world > 1:                 # BN of the heads over the global batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.compile:                                        # per block: the b2 views change shape every step
        for block in [*model.student.blocks, *(model.teacher.blocks if model.teacher is not None else [])]:
            block.compile()
    optimizer = make_optimizer(model)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and args.amp == "fp16")
    resume = resume_path(args)
    epoch, step = load_checkpoint(resume, model, optimizer, scaler, args) if resume else (0, 0)
    if resume:
        if rank == 0:
            print(f"resumed from {resume}: {epoch} epochs done, step {step}", flush=True)
        log_event(args, "resume", checkpoint=resume, epoch=epoch, step=step, world_size=world)
    else:
        log_event(args, "config", config=vars(args), argv=sys.argv, versions=versions(device), world_size=world)
        if rank == 0:                                       # the run dir carries the code that produced it
            shutil.copyfile(os.path.abspath(__file__), os.path.join(args.run_dir, f"{SCRIPT}.py.txt"))
    return loader, root, model, optimizer, scaler, epoch, step

def train(args, rank, world, device):
    """Pretrains; returns the unwrapped model, the data root, the final step and whether training is complete."""
    loader, root, model, optimizer, scaler, epoch0, step = setup_run(args, rank, world, device)
    ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) if world > 1 else model
    ckpt, spe = os.path.join(args.run_dir, "checkpoint.pt"), len(loader)
    end = min(args.epochs, epoch0 + args.stop_after_epochs) if args.stop_after_epochs else args.epochs
    bar = tqdm(total=args.epochs * spe, initial=step, disable=rank != 0, unit="step", dynamic_ncols=True)
    for epoch in range(epoch0, end):
        loader.sampler.set_epoch(epoch)                     # data order = f(seed, epoch)
        torch.manual_seed(epoch_seed(args, epoch, rank))    # augmentation = f(seed, epoch, rank)
        ddp.train()
        window, n_win, t0, t_data, t_wait = {}, 0, time.perf_counter(), 0.0, time.perf_counter()
        for i, batch in enumerate(loader):
            t_data += time.perf_counter() - t_wait
            terms = train_step(ddp, to_device(batch, device), optimizer, scaler, args, step, spe)
            window = {k: window.get(k, 0) + v for k, v in terms.items()}
            step, n_win = step + 1, n_win + 1
            bar.update()
            t_wait = time.perf_counter()
            if step % args.log_every and i < len(loader) - 1:
                continue
            means = reduce_means(window, n_win)              # device sums until here: one host sync per line
            if not math.isfinite(means["total"]):            # a NaN/inf in any step of the window shows here
                log_event(args, "error", epoch=epoch, step=step, terms=means)
                raise NonFiniteLoss(f"non-finite loss in steps {step - n_win + 1}-{step} (epoch {epoch}): {means}; "
                                    f"{ckpt} keeps the last good state")
            elapsed = time.perf_counter() - t0
            log_event(args, "train", epoch=epoch, step=step, **schedule(step - 1, args, spe), **means,
                      img_per_s=n_win * args.batch_size / elapsed, data_frac=t_data / elapsed)
            bar.set_postfix(ep=epoch, **{k: f"{v:.3f}" for k, v in means.items() if k in ("total", "inv", "equiv")})
            window, n_win, t0, t_data = {}, 0, time.perf_counter(), 0.0
        if rank == 0:
            save_checkpoint(ckpt, model, optimizer, scaler, epoch + 1, step, args)
        if dist.is_initialized():
            dist.barrier()                                  # nobody runs ahead of a checkpoint being written
    bar.close()
    return model, root, step, end == args.epochs

# =================================== eval ===================================
def run_evaluation(model, args, root, step, device):
    """Export the probed ViT (backbone.pt), then eval.py's protocols in-process on every rank (eval.json)."""
    import eval as evaluation
    probe = probeable(model, args)
    probe.step = step
    if get_rank() == 0:
        atomic_save(probe.backbone.vit.state_dict(), os.path.join(args.run_dir, "backbone.pt"))
    if args.no_eval:
        return None
    model.eval()
    result = evaluation.evaluate(probe, root, protocols=tuple(args.eval_protocols.split(",")), out_dir=args.run_dir,
                                 device=device, preset=args.preset, size=args.resolution)
    log_event(args, "eval", step=step, summary=result.get("summary"))
    return result

# =================================== main ===================================
def finish_distributed(clean):
    """Leave the process group for good. The DDP wrapper's reducer keeps the group alive past
    destroy_process_group, so it is collected first; otherwise the gloo context lives on until
    the interpreter exits, and a peer that exits earlier closes its sockets under it: SIGABRT,
    'terminate called without an active exception'. After a clean run the ranks then meet at a
    barrier, so none leaves while another is still talking; after a failure there is no barrier,
    which could wait forever for a rank that is gone."""
    if not dist.is_initialized():
        return
    gc.collect()
    if clean:
        dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    clean = False
    try:
        start_up(args)
        model, root, step, done = train(args, rank, world, device)
        if done:                                 # per-method: --stop-after-epochs ends a sitting early
            run_evaluation(model, args, root, step, device)
        clean = True
    except RunError as e:                    # one message from rank 0, no traceback
        if is_main():
            print(f"error: {e}", file=sys.stderr)
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
        finish_distributed(clean)
        unlock_run_dir()


if __name__ == "__main__":
    main()
