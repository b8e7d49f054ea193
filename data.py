"""3DIEBench data: the exact on-disk format, a look-alike generator in that format, and a checker;
plus ImageNet's ImageFolder layout and its look-alike (for ser.py).

    python data.py {make-3diebench,check,contact-sheet,make-imagefolder,import-sweethome3d} -h   # the commands

3DIEBench layout (sie.md §1.1-1.2): <root>/<synset>/<obj_id>/image_k.jpg + latent_k.npy (7 float64),
<root>/{train,val}_images.npy ('/SYNSET/OBJ_ID/' entries), {train,val}_labels.npy (int64), optional
all_latents_{split}.npy (row = obj_idx * 50 + view). Scripts import the loaders; nothing runs at import.
Before their first step they call preflight(root, kind): seconds, where `python data.py check ROOT` decodes all.
"""
import argparse
import contextlib
import glob
import io
import math
import os
import re
import shutil
import socket
import sys
import time
import zipfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# ============================================================ constants (sie.md §1)
MEAN = (0.5016, 0.5037, 0.5060)      # sie.md §1.4: the data set's own statistics, not ImageNet's
STD = (0.1030, 0.0999, 0.0969)
N_VIEWS = 50                          # renderings per object (sie.md §1.1)
NUM_CLASSES = 55                      # the 55 ShapeNetCore synsets: labels 0..54, the classifier heads' width
DEFAULT_ROOT = "data/3diebench-toy"   # relative to cwd; generated on first use
# The toy set every script's default runs on (10,000 images).
# Deviation: toy only, zoom=2 doubles the lens's focal length: objects fill ~2x more of the 32 px frame, and
# paint="axes" colours each face by its object-frame normal, so the pose is visible at 32 px (README "Data"):
# on the plain look-alike no method learns rotation in a CPU-minutes run, not even a supervised regressor.
TOY_3DIEBENCH = dict(classes=10, objects_per_class=20, views=50, size=32, zoom=2.0, paint="axes", seed=0)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)   # for ImageFolder data
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")   # what an ImageFolder class holds; other files are ignored
DEFAULT_IMAGEFOLDER_ROOT = "data/imagefolder-toy"
TOY_IMAGEFOLDER = dict(classes=10, train_per_class=100, val_per_class=20, size=64, seed=0)
# The 55 real ShapeNetCore synset ids (sorted: label = position, sie.md §1.2), borrowed by the generator.
REAL_SYNSETS = """02691156 02747177 02773838 02801938 02808440 02818832 02828884 02843684 02871439 02876657
02880940 02924116 02933112 02942699 02946921 02954340 02958343 02992529 03001627 03046257 03085013 03207941
03211117 03261776 03325088 03337140 03467517 03513137 03593526 03624134 03636649 03642806 03691459 03710193
03759954 03761084 03790512 03797390 03928116 03938244 03948459 03991062 04004475 04074963 04090263 04099429
04225987 04256520 04330267 04379243 04401088 04460130 04468005 04530566 04554684""".split()
# Object-id lengths in the real val list: 29-32 hex characters (sie.md §1.1), with these frequencies.
ID_LENGTHS, ID_LENGTH_P = (32, 31, 30, 29), (0.8824, 0.1082, 0.0088, 0.0006)


class DataError(Exception):
    """A problem with the data a user can act on: one message naming the file; scripts print it, exit(2)."""

    def __str__(self):  # a DataLoader worker re-raises it wrapped in its traceback text: keep the message
        s = super().__str__()
        return s.rsplit("DataError: ", 1)[-1].strip() if "Original Traceback" in s else s


def cpu_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def parallel_map(fn, jobs, desc, progress=True, workers=None):
    """list(map(fn, jobs)) on one thread per core, torch single-threaded in each (torch, PIL, I/O release the GIL)."""
    from tqdm import tqdm
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers or cpu_cores()) as pool:
            return list(tqdm(pool.map(fn, jobs), total=len(jobs), desc=desc, disable=not progress))
    finally:
        torch.set_num_threads(threads)


# ============================================================ rotations (sie.md §1.1, §1.3)
# Pure numpy/torch, no scipy: every function takes numpy float64 arrays or torch tensors.
def euler_xyz_to_matrix(angles):
    """(..., 3) -> (..., 3, 3). Extrinsic xyz (Blender's XYZ mode, scipy "xyz"): R = Rz(a2) Ry(a1) Rx(a0)."""
    xp = torch if torch.is_tensor(angles) else np
    (ca, cb, cc), (sa, sb, sc) = ([f(angles[..., k]) for k in range(3)] for f in (xp.cos, xp.sin))
    rows = [cb * cc, sa * sb * cc - ca * sc, ca * sb * cc + sa * sc,
            cb * sc, sa * sb * sc + ca * cc, ca * sb * sc - sa * cc,
            -sb, sa * cb, ca * cb]
    return xp.stack(rows, -1).reshape(*angles.shape[:-1], 3, 3)


def matrix_to_quaternion(R):
    """(..., 3, 3) -> (..., 4) scalar-last (x, y, z, w) as scipy's from_matrix: largest component positive."""
    xp, r = torch if torch.is_tensor(R) else np, lambda i, j: R[..., i, j]
    tr = r(0, 0) + r(1, 1) + r(2, 2)
    # One unnormalised candidate per largest component (x, y, z, w), chosen from the diagonal.
    cand = xp.stack([xp.stack(c, -1) for c in (
        [1 + 2 * r(0, 0) - tr, r(1, 0) + r(0, 1), r(2, 0) + r(0, 2), r(2, 1) - r(1, 2)],
        [r(0, 1) + r(1, 0), 1 + 2 * r(1, 1) - tr, r(2, 1) + r(1, 2), r(0, 2) - r(2, 0)],
        [r(0, 2) + r(2, 0), r(1, 2) + r(2, 1), 1 + 2 * r(2, 2) - tr, r(1, 0) - r(0, 1)],
        [r(2, 1) - r(1, 2), r(0, 2) - r(2, 0), r(1, 0) - r(0, 1), 1 + tr])], -2)
    pick = xp.stack([r(0, 0), r(1, 1), r(2, 2), tr], -1).argmax(-1)[..., None, None]
    q = np.take_along_axis(cand, pick, -2) if xp is np else cand.gather(-2, pick.expand(*pick.shape[:-1], 4))
    return q[..., 0, :] / (q[..., 0, :] ** 2).sum(-1)[..., None] ** 0.5


def quaternion_multiply(p, q):
    """Hamilton product p * q of (..., 4) scalar-last quaternions (apply q first, then p)."""
    (x1, y1, z1, w1), (x2, y2, z2, w2) = ([a[..., k] for k in range(4)] for a in (p, q))
    return (torch if torch.is_tensor(p) else np).stack([
        w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2, w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
        w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2, w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2], -1)


def euler_xyz_to_quaternion(angles):
    """(..., 3) -> (..., 4) scalar-last q_z(a2) q_y(a1) q_x(a0) multiplied out, signs as scipy's from_euler("xyz")."""
    xp = torch if torch.is_tensor(angles) else np
    (cx, cy, cz), (sx, sy, sz) = ([f(angles[..., k] / 2) for k in range(3)] for f in (xp.cos, xp.sin))
    return xp.stack([sx * cy * cz - cx * sy * sz, cx * sy * cz + sx * cy * sz,
                     cx * cy * sz - sx * sy * cz, cx * cy * cz + sx * sy * sz], -1)


def relative_quaternion(a1, a2):
    """quat(R1^T R2) from two (..., 3) Euler-angle arrays: view 1 -> view 2 in view 1's OBJECT (body) frame,
    R2 = R1 r, not the world-frame R2 R1^T (sie.md §1.3, §6). Computed as the official scipy code,
    r1.inv() * r2 = conj(q1) q2, so the sign is the same (w < 0 for ~4.4 % of pairs; the hypernetwork is
    linear in g, so the sign matters); matrix_to_quaternion(R1^T R2) would flip some of them."""
    q1 = euler_xyz_to_quaternion(a1)
    conj = q1 * (q1.new_tensor([-1.0, -1, -1, 1]) if torch.is_tensor(q1) else np.array([-1.0, -1, -1, 1]))
    return quaternion_multiply(conj, euler_xyz_to_quaternion(a2))


# ============================================================ reading the on-disk format (sie.md §1.1-1.2)
def ensure(root=None, name="3DIEBench", generate=True):
    """Return root if it exists. The default location of `name` ("3DIEBench" or "ImageFolder") is generated on
    first use (one line says so); any other missing root is an error naming the command generating one there."""
    default, command, make, config = {
        "3DIEBench": (DEFAULT_ROOT, "make-3diebench", make_3diebench, TOY_3DIEBENCH),
        "ImageFolder": (DEFAULT_IMAGEFOLDER_ROOT, "make-imagefolder", make_imagefolder, TOY_IMAGEFOLDER)}[name]
    root = root or default
    if os.path.isdir(root):
        return root
    if not generate or os.path.abspath(root) != os.path.abspath(default):
        raise DataError(f"{root}: {name} root not found (generate a look-alike there with: "
                        f"python data.py {command} {root})")
    print(f"data: {root} not found, generating the toy {name} look-alike there: "
          + ", ".join(f"{k}={v}" for k, v in config.items()), file=sys.stderr)
    try:
        return make(root, **config, progress=False)
    except DataError as e:             # e.g. a read-only working directory: the set can live anywhere
        raise DataError(f"{e}; run from a writable folder, or generate the set elsewhere with "
                        f"`python data.py {command} DIR` and pass --data-root DIR") from None


ensure_3diebench = ensure                                    # (root=DEFAULT_ROOT)


def ensure_imagefolder(root=DEFAULT_IMAGEFOLDER_ROOT):
    return ensure(root, "ImageFolder")


def load_npy(path, what):
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing {what}")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: unreadable {what} ({e})") from None


def object_dir(root, entry):
    return os.path.join(root, str(entry).strip("/"))   # list entries are '/SYNSET/OBJ_ID/', both slashes (sie.md §1.2)


def read_split(root, split, check_folders=True, check_labels=True):
    """-> (entries, labels) of '{split}_images.npy' (one per object; the order matters for all_latents, sie.md §6)
    and '{split}_labels.npy' (int64 index in the sorted synsets), checked: readable, same length, not empty,
    labels < NUM_CLASSES (check_labels), folders exist (check_folders)."""
    list_file, label_file = (os.path.join(ensure_3diebench(root), f"{split}_{k}.npy") for k in ("images", "labels"))
    entries, labels = load_npy(list_file, f"{split} list file"), load_npy(label_file, f"{split} label file")
    if entries.ndim != 1 or entries.dtype.kind != "U":
        raise DataError(f"{list_file}: expected '/SYNSET/OBJ_ID/' strings, got {entries.dtype} {entries.shape}")
    if not len(entries):
        raise DataError(f"{list_file}: lists no objects")
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or (len(labels) and labels.min() < 0):
        raise DataError(f"{label_file}: expected non-negative integer labels, got {labels.dtype} {labels.shape}")
    if len(entries) != len(labels):
        raise DataError(f"{label_file}: {len(labels)} labels but {list_file} lists {len(entries)} objects")
    if check_labels and (problem := label_problem(label_file, entries, labels)):
        raise DataError(problem)
    missing = [e for e in entries if not os.path.isdir(object_dir(root, e))] if check_folders else []
    if missing:
        raise DataError(f"{list_file}: {len(missing)} of {len(entries)} listed object folders are missing, "
                        f"first: {missing[0]} ({object_dir(root, missing[0])})")
    return entries, labels.astype(np.int64)


def label_problem(label_file, entries, labels):
    """None, or why labels >= NUM_CLASSES would crash training (the classifier heads have NUM_CLASSES outputs)."""
    bad = labels >= NUM_CLASSES
    if bad.any():
        first = int(np.argmax(bad))
        return (f"{label_file}: {int(bad.sum())} label(s) >= {NUM_CLASSES} (3DIEBench has {NUM_CLASSES} classes), "
                f"first: {labels[first]} for {entries[first]}")
    return None


def views_in(folder):
    """Number of latent_k.npy files in an object folder (one per view)."""
    return sum(f.startswith("latent_") and f.endswith(".npy") for f in os.listdir(folder))


def count_views(root, entries):
    """Views per object, from the first object's folder (50 in the real data); at least 2: training pairs are
    two distinct views (sie.md §1.3)."""
    folder = object_dir(root, entries[0])
    try:
        n = views_in(folder)
    except OSError as e:
        raise DataError(f"{folder}: unreadable object folder ({e.strerror})") from None
    if n < 2:
        raise DataError(f"{folder}: {n} view(s) (latent_k.npy files); training pairs need 2 distinct views")
    return n


def load_latent(path):
    """One view's float64 (7,) latent: 3 Euler angles, floor hue, spot theta, spot phi, spot hue (sie.md §1.1)."""
    lat = load_npy(path, "latent file")
    if lat.shape != (7,) or lat.dtype.kind != "f" or not np.isfinite(lat).all():
        raise DataError(f"{path}: latent must be 7 finite floats, got {lat.dtype} {lat.shape}")
    return lat.astype(np.float64)


def load_image(path, raw=None):
    """PIL RGB image, decoded now, so that a corrupt or truncated file fails here, with its path (raw: the file's
    bytes when already read)."""
    try:
        with Image.open(path if raw is None else io.BytesIO(raw)) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: missing image") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: corrupt or truncated image ({e})") from None


def load_all_latents(root, split):
    """(N_obj * views, 7) float64, row obj_idx * views + view in list order (sie.md §1.2): the
    all_latents_{split}.npy file if present, else rebuilt from the per-view latent_k.npy files."""
    entries, _ = read_split(root, split)
    n, path = count_views(root, entries), os.path.join(root, f"all_latents_{split}.npy")
    if not os.path.exists(path):
        return np.stack([load_latent(os.path.join(object_dir(root, e), f"latent_{k}.npy"))
                         for e in entries for k in range(n)])
    return check_latent_table(path, load_npy(path, "latent table"), entries, n)


def check_latent_table(path, table, entries, views):
    """The all_latents table as load_all_latents returns it, or a DataError: shape, dtype, finite values."""
    if table.shape != (len(entries) * views, 7) or table.dtype.kind != "f":
        raise DataError(f"{path}: expected shape ({len(entries) * views}, 7) float ({len(entries)} objects x "
                        f"{views} views), got {table.dtype} {table.shape}")
    finite = np.isfinite(table).all(1)
    if not finite.all():
        row = int(np.argmin(finite))
        raise DataError(f"{path}: {int((~finite).sum())} row(s) not finite, first: row {row} "
                        f"({entries[row // views]} view {row % views})")
    return table.astype(np.float64)


# ============================================================ datasets (sie.md §1.3-1.4)
class Split3DIEBench(torch.utils.data.Dataset):
    """One split of a 3DIEBench root: list entries, labels, views per object, number of classes (1 + the
    largest label of both splits: 55 for the real data), and the image transform (size: resize, e.g. to 128x128)."""

    def __init__(self, root, split, size):
        import torchvision.transforms as T   # PIL -> float32 (3, S, S) normalised with MEAN/STD (sie.md §1.4)
        self.root = ensure_3diebench(root)
        self.entries, self.labels = read_split(root, split)
        self.views = count_views(root, self.entries)
        both = [load_npy(p, "label file") for s in ("train", "val")
                if os.path.isfile(p := os.path.join(root, f"{s}_labels.npy"))]
        self.num_classes = 1 + int(max(lab.max(initial=0) for lab in both + [self.labels]))
        self.transform = T.Compose(([T.Resize((size, size))] if size else []) + [T.ToTensor(), T.Normalize(MEAN, STD)])

    def path(self, obj, name):
        return os.path.join(object_dir(self.root, self.entries[obj]), name)

    def image(self, obj, view):
        """One view as the transformed tensor (JpegPairs3DIEBench: uint8, or the raw JPEG bytes)."""
        return self.transform(load_image(self.path(obj, f"image_{view}.jpg")))


class Pairs3DIEBench(Split3DIEBench):
    """Training / rotation-probe item: one per OBJECT (an epoch = one pair per object), two DISTINCT random
    views (sie.md §1.3) -> (x1, x2, g, label), g the relative quaternion (x, y, z, w), or with color=True
    [quat, d_floor_hue, d_spot_hue] (raw differences, not wrapped). The views are a function of (seed, epoch,
    index) only: the same for any number of ranks or DataLoader workers (the official code's are unseeded)."""

    def __init__(self, root, split="train", size=None, color=False, seed=0):
        super().__init__(root, split, size)
        self.color, self.seed, self.epoch = color, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        v1, v2 = np.random.default_rng([self.seed, self.epoch, i]).choice(self.views, 2, replace=False)
        x1, x2 = (self.image(i, v) for v in (v1, v2))
        l1, l2 = (load_latent(self.path(i, f"latent_{v}.npy")) for v in (v1, v2))
        # sie.md §6: the angles are cast to float32 before the rotation maths, as in training.
        g = relative_quaternion(*(lat[:3].astype(np.float32).astype(np.float64) for lat in (l1, l2)))
        if self.color:  # sie.md §1.3: indices 3 and 6 (floor hue, spot hue), not wrapped mod 1
            g = np.concatenate([g, l2[[3, 6]] - l1[[3, 6]]])
        return x1, x2, torch.from_numpy(g.astype(np.float32)), int(self.labels[i])


class Views3DIEBench(Split3DIEBench):
    """Evaluation item: one VIEW. Index i -> object i // len(views), view views[i % len(views)] ->
    (x, label, obj_idx, view). `latents` is the per-view table of load_all_latents."""

    def __init__(self, root, split="val", size=None, views=None):
        super().__init__(root, split, size)
        self.view_ids = list(range(self.views)) if views is None else [int(v) for v in views]
        self.latents = load_all_latents(root, split)

    def __len__(self):
        return len(self.entries) * len(self.view_ids)

    def __getitem__(self, i):
        obj, view = i // len(self.view_ids), self.view_ids[i % len(self.view_ids)]
        return self.image(obj, view), int(self.labels[obj]), obj, view


# ============================================================ fast paths: JPEG decoding off PIL (issue 9)
class JpegPairs3DIEBench(Pairs3DIEBench):
    """Pairs3DIEBench for a fast training loop; images come as uint8, to_float finishes them on the device.
    decode="cpu": workers decode with libjpeg-turbo into uint8 (3, H, W); decode="gpu": they only read, x1, x2 are
    the bytes as numpy uint8 arrays (a tensor each would hold a file descriptor), for collate_jpegs and decode_jpegs."""

    def __init__(self, root, split="train", size=None, color=False, seed=0, decode="cpu"):
        super().__init__(root, split, size, color, seed)
        self.decode = decode

    def image(self, obj, view):
        from torchvision.io import ImageReadMode, decode_jpeg
        path = self.path(obj, f"image_{view}.jpg")
        try:
            raw = np.fromfile(path, np.uint8)
            if not jpeg_markers_ok(raw[:2].tobytes(), raw[-16:].tobytes()):
                raise DataError(f"{path}: not a JPEG, or truncated")
            return raw if self.decode == "gpu" else decode_jpeg(torch.from_numpy(raw), mode=ImageReadMode.RGB)
        except OSError:
            raise DataError(f"{path}: missing image") from None
        except RuntimeError as e:
            raise DataError(f"{path}: corrupt JPEG ({e})") from None


def jpeg_markers_ok(head, tail):
    """True if a file's first bytes hold JPEG's start-of-image marker and its last 16 its end-of-image marker:
    what the fast paths demand of a file (libjpeg-turbo and nvJPEG read JPEG only, a truncated one badly)."""
    return head[:2] == b"\xff\xd8" and b"\xff\xd9" in tail[-16:]


def collate_jpegs(items):
    """decode="gpu" batches: [(bytes1, bytes2, g, label)] -> ([bytes1], [bytes2], g (B, k), labels (B,))."""
    b1, b2, g, labels = zip(*items)
    return list(b1), list(b2), torch.stack(g), torch.tensor(labels)


def decode_jpegs(blobs, device):
    """JPEG byte arrays -> uint8 (B, 3, H, W) on device: nvJPEG in one batched call on CUDA."""
    from torchvision.io import ImageReadMode, decode_jpeg
    if torch.device(device).type == "cuda":   # torchvision's nvJPEG path can write into blocks that queued
        torch.cuda.current_stream(device).synchronize()   # kernels still read (pytorch/vision#9606): drain first
    try:
        return torch.stack(decode_jpeg([torch.from_numpy(b) for b in blobs], mode=ImageReadMode.RGB, device=device))
    except RuntimeError as e:
        raise DataError(f"a JPEG of this batch does not decode ({e}); `python data.py check ROOT` names it") from None


def to_float(x, size=None):
    """uint8 (B, 3, H, W) -> float32 as Split3DIEBench's transform, on x's device: the same values at the native
    size; after a resize within ~1/255 (antialiased bilinear on floats here, on uint8 in PIL)."""
    x = x.float().div_(255)
    if size and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1).to(x.device, non_blocking=True) for v in (MEAN, STD))
    return (x - mean) / std   # non_blocking: the two constants cost no host sync


# ============================================================ checking a whole data set
def check(root, workers=None, progress=True):
    """Scan every list, folder, decoded image and latent -> {kind: [messages]}, empty if fine: all problems at once.
    root: a 3DIEBench root (list files) or an ImageFolder root (train/<wnid>/, val/<wnid>/), told by layout()."""
    ensure(root, generate=False)
    scan = check_imagefolder if layout(root) == "ImageFolder" else check_3diebench
    return scan(root, workers, progress)


def layout(root):
    """'ImageFolder' if root has a train/ or val/ folder and no 3DIEBench list file, else '3DIEBench'."""
    lists = glob.glob(os.path.join(glob.escape(root), "*_images.npy")) + glob.glob(
        os.path.join(glob.escape(root), "*_labels.npy"))
    folders = any(os.path.isdir(os.path.join(root, split)) for split in ("train", "val"))
    return "ImageFolder" if folders and not lists else "3DIEBench"


def check_image(path, size=None):
    """None, or why `path` would fail a 3DIEBench run: the PIL loader cannot decode it, the JPEG markers the
    --decode cpu/gpu paths demand are missing (a PNG renamed .jpg, say), or its size is not the set's (W, H)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return f"{path}: missing image"
    except OSError as e:
        return f"{path}: unreadable image ({e.strerror})"
    try:
        image = load_image(path, raw)
    except DataError as e:
        return str(e)
    if not jpeg_markers_ok(raw[:2], raw[-16:]):
        with Image.open(io.BytesIO(raw)) as im:
            what = f"{im.format} data under a .jpg name" if im.format != "JPEG" else "JPEG without its end marker"
        return f"{path}: {what}; sie.py --decode cpu/gpu read JPEG files only"
    if size and image.size != size:
        return f"{path}: {image.size[0]}x{image.size[1]} pixels, the set's images are {size[0]}x{size[1]}"
    return None


def check_3diebench(root, workers=None, progress=True):
    """check() of a 3DIEBench root."""
    problems, size = defaultdict(list), None          # size: the first listed image's, which every image must have

    def scan_object(folder, n):  # -> (its (n, 7) latents or None, [(kind, message)])
        if not os.path.isdir(folder):
            return None, [("object folder", f"{folder}: listed object folder is missing")]
        found, lats = [], []
        if (k := views_in(folder)) < 2:
            found.append(("object folder", f"{folder}: {k} view(s) (latent_k.npy files); training pairs need "
                                           "2 distinct views"))
        for k in range(n):
            if problem := check_image(os.path.join(folder, f"image_{k}.jpg"), size):
                found.append(("image", problem))
            try:
                lats.append(load_latent(os.path.join(folder, f"latent_{k}.npy")))
            except DataError as e:
                found.append(("latent", str(e)))
        return (np.stack(lats) if len(lats) == n else None), found

    for split in ("train", "val"):
        try:
            entries, labels = read_split(root, split, check_folders=False, check_labels=False)
        except DataError as e:
            problems["list file"].append(str(e))
            continue
        if problem := label_problem(os.path.join(root, f"{split}_labels.npy"), entries, labels):
            problems["label"].append(problem)
        first = object_dir(root, entries[0])                 # the dataset's views and size come from it
        n = (views_in(first) if os.path.isdir(first) else 0) or N_VIEWS
        with contextlib.suppress(OSError), Image.open(os.path.join(first, "image_0.jpg")) as im:
            size = size or im.size                                   # unreadable: reported by the scan
        results = parallel_map(lambda e: scan_object(object_dir(root, e), n), entries, f"check {split}",
                               progress, workers)
        for kind, msg in (p for _, found in results for p in found):
            problems[kind].append(msg)
        path = os.path.join(root, f"all_latents_{split}.npy")
        if os.path.exists(path):
            try:
                table = check_latent_table(path, load_npy(path, "latent table"), entries, n)
                per_view = [lat for lat, _ in results]
                if all(lat is not None for lat in per_view) and not np.array_equal(table, np.concatenate(per_view)):
                    raise DataError(f"{path}: differs from the per-view latent_k.npy files (expected shape "
                                    f"({len(entries) * n}, 7), rows in list order)")
            except DataError as e:
                problems["all_latents"].append(str(e))
    return dict(problems)


def check_imagefolder(root, workers=None, progress=True):
    """check() of an ImageFolder root: both splits, their class folders (the same in val as in train, none
    empty) and every image decoded. Files that are not images (.DS_Store, README.txt) are ignored, as the
    ImageFolder dataset ignores them."""
    problems, classes = defaultdict(list), {}

    def decode(path):
        try:
            load_image(path)
        except DataError as e:
            return str(e)
        return None

    for split in ("train", "val"):
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            problems["split"].append(f"{folder}: missing split folder (expected {folder}/<wnid>/*.JPEG)")
            continue
        classes[split], files = class_folders(folder), []
        if not classes[split]:
            problems["split"].append(f"{folder}: no class folders (expected {folder}/<wnid>/*.JPEG)")
        for wnid in classes[split]:
            images = image_files(os.path.join(folder, wnid))
            if not images:
                problems["class folder"].append(f"{os.path.join(folder, wnid)}: empty class folder "
                                                "(no .JPEG/.jpg/.png images)")
            files += images
        problems["image"] += [m for m in parallel_map(decode, files, f"check {split}", progress, workers) if m]
    if len(classes) == 2 and classes["train"] != classes["val"]:
        problems["classes"].append(class_mismatch(os.path.join(root, "train"), os.path.join(root, "val"),
                                                  classes["train"], classes["val"]))
    return {kind: msgs for kind, msgs in problems.items() if msgs}


# ============================================================ start-up validation (cheap; before the first step)
def preflight(root, kind="3DIEBench", workers=None):
    """Validate in seconds, before training starts, what a run reads only later (its evaluation) -> root, or a
    DataError naming the file. `python data.py check ROOT` is the full scan (every image decoded).
    kind="3DIEBench": both splits' list and label files, every listed folder, >= 2 views; every val folder holds
    each view's image and latent file; the all_latents tables (shape, finite); train and val images of one size.
    kind="ImageFolder": train/ and val/ with the same class folders, none empty in val; every val image passes
    a header/trailer screen (screen_image: its first and last bytes, not a decode)."""
    if kind == "ImageFolder":
        return preflight_imagefolder(root, workers)
    if kind != "3DIEBench":
        raise ValueError(f"preflight: kind must be '3DIEBench' or 'ImageFolder', not {kind!r}")
    ensure(root, generate=False)
    entries, views, sizes = {}, {}, {}
    for split in ("train", "val"):
        entries[split], _ = read_split(root, split)     # list, labels (< NUM_CLASSES), every listed folder exists
        views[split] = count_views(root, entries[split])
        first = os.path.join(object_dir(root, entries[split][0]), "image_0.jpg")
        sizes[split] = (first, load_image(first).size)
    (train_image, train_size), (val_image, val_size) = sizes["train"], sizes["val"]
    if train_size != val_size:
        raise DataError(f"{val_image}: {val_size[0]}x{val_size[1]} pixels, but {train_image} is "
                        f"{train_size[0]}x{train_size[1]}: train and val images must have one size")
    n = views["val"]

    def missing_files(entry):                 # -> a message or None
        folder = object_dir(root, entry)
        present = set(os.listdir(folder))
        missing = [f for k in range(n) for f in (f"image_{k}.jpg", f"latent_{k}.npy") if f not in present]
        return f"{folder}: missing {missing[0]} ({len(missing)} of its {2 * n} view files)" if missing else None

    problem = next((m for m in parallel_map(missing_files, entries["val"], "preflight", False, workers) if m), None)
    if problem:
        raise DataError(problem)
    for split in ("train", "val"):
        path = os.path.join(root, f"all_latents_{split}.npy")
        if os.path.exists(path):                            # absent: evaluation rebuilds it from latent_k.npy
            check_latent_table(path, load_npy(path, "latent table"), entries[split], views[split])
    return root


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def screen_image(path):
    """None, or why the image loader would fail on `path`: a cheap screen first (its first 8 and last 16 bytes:
    JPEG's start and end markers, or PNG's signature and closing IEND chunk; a truncated file has lost its end),
    and only a file failing it is decoded in full, so that a file PIL reads anyway (other trailer) is not an
    error. A screen, not a proof: a file damaged in the middle passes it (`data.py check` decodes everything)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(max(0, os.fstat(f.fileno()).st_size - 16))
            tail = f.read()
    except OSError as e:
        return f"{path}: unreadable image ({e.strerror})"
    if jpeg_markers_ok(head, tail) or (head == PNG_SIGNATURE and b"IEND" in tail):
        return None
    try:
        load_image(path)
    except DataError as e:
        return str(e)
    return None


def preflight_imagefolder(root, workers=None):
    """preflight() of an ImageFolder root."""
    train = os.path.join(ensure(root, "ImageFolder", generate=False), "train")
    if not os.path.isdir(train):
        raise DataError(f"{train}: missing split folder (expected {train}/<wnid>/*.JPEG)")
    val = ImageFolder(root, "val")             # val/ exists, its class folders are train's, none is empty
    bad = [m for m in parallel_map(screen_image, [p for p, _ in val.samples], "preflight", False, workers) if m]
    if bad:
        raise DataError(bad[0] + (f" (and {len(bad) - 1} more val images)" if len(bad) > 1 else ""))
    return root


# ============================================================ renderer (the real scene, sie.md §1.1)
# A small batched triangle rasteriser in torch (z-buffer, perspective camera), used from the camera and from the
# spot light (its shadow). Flat Lambert shading: white sun from above, coloured spot light; a floor; any device.
CAM_DIST, CAM_POLAR, CAM_AZIM = 2.5, math.pi / 4, math.pi / 2   # camera looking at the origin
FOCAL = 50 / 18                      # Blender's default 50 mm lens on a 36 mm sensor (39.6 deg field of view)
FLOOR_Z, SPOT_RADIUS = -1.0, 4.0
SPOT_HALF_ANGLE, SPOT_BLEND = math.pi / 16, 0.15   # spot size pi/8 is Blender's full cone angle
AMBIENT, SUN, SPOT = 0.5, 0.55, 0.8                # light strengths, chosen so images average ~0.5


# Vectors are laid out (3, ...) so that dot products reduce over the first axis (fast on CPU).
def dot(a, b):
    return (a * b).sum(0, keepdim=True)


def look_at(pos, focal):
    """(3, B, 1) positions looking at the origin, z up -> camera (pos, axes [right, up, forward], focal)."""
    fwd = F.normalize(-pos, dim=0)
    z_up = pos.new_tensor([0.0, 0, 1])[:, None, None].expand_as(fwd)
    right = F.normalize(torch.linalg.cross(fwd, z_up, dim=0), dim=0)
    return pos, torch.stack([right, torch.linalg.cross(right, fwd, dim=0), fwd]), focal


def project(points, cam, H, W):
    """(3, B, N) world points -> (3, B, N) [x pixel, y pixel, depth]; pixel (i, j) has its centre at (j+.5, i+.5)."""
    pos, axes, focal = cam
    q = [dot(a, points - pos)[0] for a in axes]
    z = q[2].clamp(min=1e-6)
    return torch.stack([(q[0] / z * focal + 1) * W / 2, (1 - q[1] / z * focal) * H / 2, z])


def rasterize(tri, img, n_images, H, W):
    """Z-buffer. tri: (3 [x pixel, y pixel, depth], T, 3 corners) screen-space triangles, img: (T,) image of each
    -> ids (n_images, H, W): the nearest triangle covering each pixel centre (-1: none), its depth, and its corners'
    perspective-correct barycentric weights there (n_images * H * W, 3). Candidates: each row of a triangle's pixel
    box, and on it the span where its 3 edge functions are >= 0; a scatter-min on depth keeps the nearest."""
    dev, pick = tri.device, lambda a, i: a.index_select(0, i)                       # a[i], faster on CPU

    def expand(counts):                                              # i repeated counts[i] times, 0..counts[i]-1
        i = torch.repeat_interleave(torch.arange(len(counts), device=dev), counts)
        return i, (torch.arange(len(i), device=dev) - pick(counts.cumsum(0) - counts, i)).float()

    lo, hi = (tri[:2].amin(2) - 0.5).ceil().clamp(min=0), (tri[:2].amax(2) - 0.5).floor()
    hi = torch.minimum(hi, hi.new_tensor([[W - 1], [H - 1]]))                       # (2 [x, y], T): pixel box
    keep = (hi >= lo).all(0).nonzero()[:, 0]                                       # boxes holding a pixel centre
    (x, y, z), (lx, ly), (hx, hy) = (a.index_select(1, keep) for a in (tri, lo, hi))
    # Barycentric coordinates and 1/depth are affine in the pixel position: f = a x + b y + c, per triangle.
    x1, x2, y1, y2 = x.roll(-1, 1), x.roll(-2, 1), y.roll(-1, 1), y.roll(-2, 1)
    c = x1 * y2 - x2 * y1
    area = c.sum(1, keepdim=True)                                                  # twice the signed area
    bary = torch.stack([y1 - y2, x2 - x1, c], -1) / area[..., None]                # (T, 3 corners, 3 coefs)
    plane = torch.cat([bary, (bary / z[..., None]).sum(1, keepdim=True)], 1)       # (T, 4, 3): + 1/z
    t, row = expand(((hy - ly + 1) * (area[:, 0].abs() > 1e-9)).long())
    cy, f = pick(ly, t) + row, pick(bary, t)
    a = f[..., 0].where(f[..., 0] != 0, 1e-20)                                     # a x >= -(b y + c): x's bound
    bound = -(f[..., 1] * (cy + 0.5)[:, None] + f[..., 2]) / a
    x0 = torch.maximum((torch.where(a > 0, bound, -torch.inf).amax(1) - 0.5 - 1e-3).ceil(), pick(lx, t))
    x1 = torch.minimum((torch.where(a < 0, bound, torch.inf).amin(1) - 0.5 + 1e-3).floor(), pick(hx, t))
    r, off = expand((x1 - x0 + 1).clamp(min=0).long())
    t, cx, cy = pick(t, r), pick(x0, r) + off, pick(cy, r)                         # candidate pixel indices
    f = pick(plane, t)
    f = f[..., 0] * (cx + 0.5)[:, None] + f[..., 1] * (cy + 0.5)[:, None] + f[..., 2]   # (K, 4)
    k = (f[:, :3].amin(1) >= 0).nonzero()[:, 0]                                    # pixel centre inside
    f, t, tk = pick(f, k), pick(t, k), pick(keep, pick(t, k))
    key = (1 / f[:, 3] / 16 * 2 ** 30).long().clamp(0, 2 ** 30) * 2 ** 32 + tk    # depth, then triangle
    pix = (pick(img, tk) * H + pick(cy, k).long()) * W + pick(cx, k).long()
    zbuf = torch.full((n_images * H * W,), 2 ** 62, dtype=torch.long, device=dev)
    zbuf.scatter_reduce_(0, pix, key, "amin")
    win = (pick(zbuf, pix) == key).nonzero()[:, 0]                                 # each pixel's nearest
    weights = torch.zeros(n_images * H * W, 3, device=dev).index_copy_(0, pick(pix, win), pick(
        f[:, :3] / pick(z, t) / f[:, 3:], win))                                     # lambda_k / z_k / (1 / z)
    empty = zbuf == 2 ** 62
    ids = torch.where(empty, -1, zbuf % 2 ** 32).view(n_images, H, W)
    return ids, torch.where(empty, torch.inf, (zbuf // 2 ** 32) * (16 / 2 ** 30)).view(n_images, H, W), weights


def face_normals(verts, faces):
    t = verts[faces]                                                               # (F, 3 corners, 3) -> unit (F, 3)
    return F.normalize(torch.linalg.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]), dim=1)


def hsv_to_rgb(h, s, v):
    """Tensors or numbers (broadcastable) -> (..., 3) RGB in [0, 1], on the device of the tensor arguments (a number
    made a CPU tensor would not broadcast against a CUDA one)."""
    dev = next((a.device for a in (h, s, v) if torch.is_tensor(a)), None)
    h, s, v = torch.broadcast_tensors(*(torch.as_tensor(a, dtype=torch.float32, device=dev) for a in (h, s, v)))
    k = (h.new_tensor([5.0, 3.0, 1.0]) + h[..., None] * 6) % 6
    return v[..., None] - (v * s)[..., None] * torch.minimum(k, 4 - k).clamp(0, 1)


def render(verts, faces, look, latents, size, ss=2, alpha=False, zoom=1.0):
    """Render one mesh under B latent rows with the 3DIEBench scene (sie.md §1.1). verts (V, 3) centred on the
    origin, faces (F, 3) long, look the albedo: (F, 3) colours or read_obj's (uv, material, atlas), latents (B, 7)
    -> (B, 3, size, size) RGB in [0, 1] (+ the object's coverage as a 4th channel with alpha=True),
    rendered at ss x the size and box-filtered (antialiasing). zoom multiplies the lens's focal length."""
    dev, B, H, nf = verts.device, len(latents), size * ss, len(faces)
    faces = faces.to(dev)                                  # everything on verts' device (look and latents: below)
    if B > 1 and B * H * H > 2 ** 20:                                              # bound memory: views in chunks
        return torch.cat([render(verts, faces, look, lat, size, ss, alpha, zoom) for lat in np.array_split(latents, 2)])
    look = look if isinstance(look, tuple) else (look.new_zeros(nf, 3, 2), torch.arange(nf), look[..., None, None])
    uv, mat, atlas = (x.to(dev) for x in look)
    lat = torch.as_tensor(latents, dtype=torch.float32).to(dev)
    R = euler_xyz_to_matrix(lat[:, :3])                                            # (B, 3, 3)
    world = (verts @ R.transpose(-1, -2)).permute(2, 0, 1)                         # (3, B, V): R v
    c = math.sin(CAM_POLAR) * math.cos(CAM_AZIM), math.sin(CAM_POLAR) * math.sin(CAM_AZIM), math.cos(CAM_POLAR)
    cam = look_at(CAM_DIST * lat.new_tensor(c)[:, None, None].expand(3, B, 1), FOCAL * zoom)
    th, ph = lat[:, 4], lat[:, 5]                                                  # spot light at (theta, phi)
    spot = SPOT_RADIUS * torch.stack([th.sin() * ph.cos(), th.sin() * ph.sin(), th.cos()])[..., None]   # (3, B, 1)
    light_cam = look_at(spot, 1 / (1.25 * math.tan(SPOT_HALF_ANGLE)))              # sees the whole cone
    img = torch.arange(B, device=dev).repeat_interleave(nf)
    corners = lambda pts: pts.index_select(2, faces.flatten()).view(3, B * nf, 3)   # (3, B, V) -> (3, B*F, 3)
    ids, _, bary = rasterize(corners(project(world, cam, H, H)), img, B, H, H)
    S = H // 2                                                                     # shadow map resolution
    shadow_depth = rasterize(corners(project(world, light_cam, S, S)), img, B, S, S)[1]
    # The plane each pixel sees: the floor (z = -1) or a face (unit normal and offset n.x made on the mesh, rotated).
    v, hit, seen = verts[faces], ids.flatten().clamp(min=0), (ids >= 0).view(1, B, -1)   # (F, 3 corners, 3), triangle
    n = face_normals(verts, faces)                                                 # (F, 3)
    normal = (R @ n.T).transpose(0, 1).flatten(1)[:, hit].view(3, B, -1)           # (3, B, H*H)
    normal = torch.where(seen, normal, lat.new_tensor([0, 0, 1.0])[:, None, None])
    offset = torch.where(seen, (n * v[:, 0]).sum(1)[hit % nf].view(1, B, -1), FLOOR_Z)
    # The camera ray through each pixel centre meets that plane at p.
    jj, ii = torch.meshgrid(torch.arange(H, device=dev) + 0.5, torch.arange(H, device=dev) + 0.5, indexing="xy")
    ndc = [(2 * jj / H - 1).flatten() / cam[2], (1 - 2 * ii / H).flatten() / cam[2], torch.ones(H * H, device=dev)]
    ray = F.normalize(sum(a * axis[:, 0] for a, axis in zip(ndc, cam[1])), dim=0)[:, None]   # (3, 1, H*H)
    along = dot(ray, normal)
    p = cam[0] + (offset - dot(normal, cam[0])) / torch.where(along.abs() < 1e-6, 1e-6, along) * ray
    normal = torch.where(along > 0, -normal, normal)                              # two-sided faces: face the camera
    # Albedo: floor HSV(floor_hue, 0.6, 0.6), else the face's material tile at barycentric uv (nearest texel, tiled).
    st, T = (bary[:, :, None] * uv[hit % nf]).sum(1), atlas.shape[-1]              # (B*H*H, 2)
    col, row = (torch.stack([st[:, 0], 1 - st[:, 1]]) % 1 * T).long().clamp(max=T - 1)
    texel = (mat[hit % nf] * T + row) * T + col
    albedo = torch.where(seen, atlas.transpose(0, 1).flatten(1)[:, texel].view(3, B, -1),
                         hsv_to_rgb(lat[:, 3], 0.6, 0.6).T[..., None])
    # Spot light: Blender's smoothstep cone edge, 1/d^2 falloff, HSV(spot_hue, 1, 0.8), shadow map (bias: a few pixels).
    to_light = spot - p
    dist = dot(to_light, to_light).sqrt()
    x = ((dot(to_light, spot) / (dist * SPOT_RADIUS) - math.cos(SPOT_HALF_ANGLE))
         / ((1 - math.cos(SPOT_HALF_ANGLE)) * SPOT_BLEND)).clamp(0, 1)
    u, w, z = project(p, light_cam, S, S)
    depth = shadow_depth.flatten(1).gather(1, w.long().clamp(0, S - 1) * S + u.long().clamp(0, S - 1))
    lit = z <= depth + 4 * z / (light_cam[2] * S) + 1e-3
    spot_light = x * x * (3 - 2 * x) * lit * dot(normal, to_light).clamp(min=0) * 16 / dist ** 3
    spot_rgb = hsv_to_rgb(lat[:, 6], 1.0, 0.8).T[..., None]                      # (3, B, 1)
    light = AMBIENT + SUN * normal[2:].clamp(min=0) + SPOT * spot_rgb * spot_light
    out = (albedo * light).clamp(0, 1)
    out = (torch.cat([out, seen.float()]) if alpha else out).view(-1, B, H, H).transpose(0, 1)
    return F.avg_pool2d(out, ss) if ss > 1 else out


# ============================================================ procedural shape families
def lathe(profile, n, closed=False):
    """Surface of revolution about z: profile (P, 2) of (radius, z) points, n segments -> verts (P*n, 3),
    faces. A radius of 0 closes an end; closed=True joins the last profile point to the first (a torus)."""
    a = torch.arange(n) * 2 * math.pi / n + math.pi / n
    prof = torch.as_tensor(profile, dtype=torch.float32)
    verts = torch.stack([prof[:, :1] * a.cos(), prof[:, :1] * a.sin(), prof[:, 1:].expand(-1, n)], -1).flatten(0, 1)
    P = len(prof)
    i, j = torch.arange(P if closed else P - 1)[:, None] * n, torch.arange(n)[None]
    q = [i + j, i + (j + 1) % n, (i + n) % (P * n) + (j + 1) % n, (i + n) % (P * n) + j]
    return verts, torch.cat([torch.stack([q[0], q[1], q[2]], -1), torch.stack([q[0], q[2], q[3]], -1)]).flatten(0, 1)


def unit_mesh(kind):
    """A primitive in [-1, 1]^3 -> (verts (V, 3), faces (F, 3))."""
    s, t = torch.linspace(0, math.pi, 7), torch.arange(8) * 2 * math.pi / 8
    return {"box": lambda: lathe([[0, -1], [1.41, -1], [1.41, 1], [0, 1]], 4),
            "prism": lambda: lathe([[0, -1], [1, -1], [1, 1], [0, 1]], 3),
            "cylinder": lambda: lathe([[0, -1], [1, -1], [1, 1], [0, 1]], 12),
            "cone": lambda: lathe([[0, -1], [1, -1], [0, 1]], 12),
            "sphere": lambda: lathe(torch.stack([s.sin(), -s.cos()], 1), 12),
            "torus": lambda: lathe(torch.stack([0.7 + 0.3 * t.cos(), 0.3 * t.sin()], 1), 12, closed=True)}[kind]()


def class_recipe(c):
    """Shape family of class c (independent of the seed, so every generated set shares its classes): a body
    and 2-4 parts attached at random points of its surface; list of (kind, scale (3,), euler (3,), position
    (3,), optional). Random attachment points make the families asymmetric, so a pose is recoverable."""
    rng, kinds = np.random.default_rng([20230210, c]), ("box", "cylinder", "cone", "sphere", "prism", "torus")
    parts = [(kinds[rng.integers(len(kinds))], rng.uniform(0.3, 0.6, 3), rng.uniform(-0.4, 0.4, 3), np.zeros(3), False)]
    for _ in range(rng.integers(2, 5)):
        u, scale = rng.normal(size=3), rng.uniform(0.1, 0.28, 3)
        scale[rng.integers(3)] *= rng.uniform(1, 2.2)               # often stick-like: legs, handles, wings
        parts.append((kinds[rng.integers(len(kinds))], scale, rng.uniform(-math.pi, math.pi, 3),
                      parts[0][1] * u / np.linalg.norm(u), rng.random() < 0.3))
    return parts


AXIS_COLOURS = torch.tensor([[.9, .2, .2], [.2, .8, .8], [.2, .8, .2], [.8, .2, .8], [.2, .3, .9], [.9, .8, .2]])


def object_mesh(c, rng, paint="palette"):
    """One object of class c: its family's parts with per-object jitter of size, placement and pose, optional parts
    dropped half the time, two random colours (colour says nothing about the class), normalise()d.
    paint="axes" instead colours every face by its normal in the object's frame (AXIS_COLOURS): the colours
    seen then tell the pose, as a texture would. -> verts (V, 3), faces (F, 3), colors (F, 3)."""
    palette = hsv_to_rgb(torch.tensor(rng.uniform(0, 1, 2)), torch.tensor(rng.uniform(0.1, 0.7, 2)),
                         torch.tensor(rng.uniform(0.5, 0.95, 2))).float()
    f32 = lambda a: torch.tensor(a, dtype=torch.float32)
    verts, faces, colors = [], [], []
    for kind, scale, euler, pos, optional in class_recipe(c):
        size, angles = f32(scale * rng.uniform(0.8, 1.25, 3)), f32(euler + rng.normal(0, 0.12, 3))
        shift = f32(pos + rng.normal(0, 0.04, 3))
        dropped, color = optional and rng.random() < 0.5, palette[rng.integers(2)]
        if dropped:
            continue
        v, f = unit_mesh(kind)
        faces.append(f + sum(map(len, verts)))
        verts.append((v * size) @ euler_xyz_to_matrix(angles).T + shift)
        colors.append(color.expand(len(f), 3))
    verts, faces, colors = normalise(torch.cat(verts)), torch.cat(faces), torch.cat(colors)
    if paint == "axes":                                                   # +x -x +y -y +z -z: colours 0..5
        n = face_normals(verts, faces)
        axis = n.abs().argmax(1)
        colors = AXIS_COLOURS[2 * axis + (n.gather(1, axis[:, None])[:, 0] < 0).long()]
    return verts, faces, colors


def normalise(v):
    """Centre the bounding box on the origin, scale it to a unit diagonal: ShapeNet's normalisation (sie.md §1.1)."""
    v = v - (v.amin(0) + v.amax(0)) / 2
    return v / (v.amax(0) - v.amin(0)).norm()


# ============================================================ real meshes: OBJ + MTL (issue 8)
def read_obj(path, tile=128, fallbacks=None):
    """Minimal OBJ reader: v, vt, f (polygons fan-triangulated; v, v/vt, v//vn, v/vt/vn; negative = relative),
    usemtl, mtllib (Kd, map_Kd; a texture replaces Kd, as in Blender's importer); y-up -> z-up: (x, -z, y), Blender's
    import axes. -> (verts (V, 3) normalised, faces (F, 3), (uv (F, 3, 2), material (F,), atlas (M, 3, T, T)): one
    tile per material: its texture resized, or its colour). Unreadable OBJ, no faces: DataError. A texture file
    missing or unreadable (Sweet Home 3D models name some, e.g. f:/images/..., that the package does not ship)
    leaves its material's colour Kd; a missing MTL file, grey (0.8) for every material; (path, the missing file)
    is then appended to the list `fallbacks`."""
    def lines(file):                                                               # (keyword, arguments)
        with open(file, encoding="latin-1") as f:
            yield from ((w[0], w[1:]) for w in map(str.split, f) if w)

    v, vt, tris, mats, kd, tex, name, m, folder = [], [], [], {"": 0}, {}, {}, "", 0, os.path.dirname(path)
    index = lambda i, n: i - 1 if i > 0 else n + i if i else -1                    # 1-based, relative (< 0), absent
    try:
        for key, w in lines(path):
            if key == "f":
                c = [[index(int(i or 0), n) for i, n in zip((a + "//").split("/"), (len(v), len(vt)))] for a in w]
                tris += [(*c[0], *c[k], *c[k + 1], m) for k in range(1, len(c) - 1)]
            elif key in ("v", "vt"):
                (v if key == "v" else vt).append([float(x) for x in w[:3 if key == "v" else 2]])
            elif key == "usemtl":
                m = mats.setdefault(" ".join(w), len(mats))
            elif key == "mtllib":                                              # texture paths: from the OBJ's folder
                library = os.path.join(folder, " ".join(w))
                try:
                    materials = list(lines(library))
                except OSError:                                 # missing: every material grey, as without a Kd
                    materials = []
                    if fallbacks is not None:
                        fallbacks.append((path, library))
                for k, a in materials:
                    name = " ".join(a) if k == "newmtl" else name
                    {"Kd": kd, "map_Kd": tex}.get(k, {})[name] = a
        t, T = torch.tensor(tris, dtype=torch.long).view(-1, 7), tile if tex else 1
        verts = normalise(torch.tensor(v).view(-1, 3)[:, [0, 2, 1]] * torch.tensor([1.0, -1, 1]))
        if not len(t) or not torch.isfinite(verts).all() or t[:, 0:6:2].min() < 0 or t[:, 0:6:2].max() >= len(v):
            raise ValueError("no faces, a non-finite vertex or a face index out of range")
        uv = torch.tensor(vt + [[0.0, 0.0]])[t[:, 1:6:2]]                         # absent (-1): (0, 0)

        def albedo(n):                                                             # material n's (3, T, T) tile
            if n in tex:
                file = os.path.join(folder, " ".join(tex[n]).replace("\\", "/"))
                try:
                    with Image.open(file) as im:
                        return torch.tensor(np.array(im.convert("RGB").resize((T, T)))).permute(2, 0, 1) / 255
                except (OSError, Image.DecompressionBombError):
                    if fallbacks is not None:
                        fallbacks.append((path, file))
            return torch.tensor([float(x) for x in kd.get(n, [0.8] * 3)[:3]]).view(3, 1, 1).expand(3, T, T)
        atlas = torch.stack([albedo(n) for n in mats])                             # one tile per material
    except (OSError, ValueError, IndexError, RuntimeError) as e:
        raise DataError(f"{path}: unreadable mesh ({e})") from None
    return verts, t[:, 0:6:2], (uv, t[:, 6], atlas)


# ============================================================ generator (the exact layout, sie.md §1.1-1.2)
def sample_latents(rng, views, ood=False):
    """(views, 7) float64, drawn per view in the real generator's order: floor hue, spot theta, spot phi,
    spot hue, then 3 angles U(-pi/2, pi/2); --ood: |angle| in [pi/2, pi] (3DIEBench-OOD, peers.md §5)."""
    out = np.empty((views, 7))
    for k in range(views):
        hue, th, ph = rng.uniform(0, 1), rng.uniform(0, math.pi / 4), rng.uniform(0, 2 * math.pi)
        spot_hue, angles = rng.uniform(0, 1), rng.uniform(-math.pi / 2, math.pi / 2, 3)
        out[k] = [*(np.sign(angles) * (math.pi / 2 + np.abs(angles)) if ood else angles), hue, th, ph, spot_hue]
    return out


def write_object(folder, images, latents):
    """JPEG quality 95 (OpenCV's default) + float64 latents. The real generator passed an RGB array to
    cv2.imwrite, which expects BGR, so the stored JPEGs have R and B swapped (sie.md §6): kept here."""
    os.makedirs(folder)
    pixels = (images.flip(1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()   # flip: RGB -> BGR
    for k, (im, lat) in enumerate(zip(pixels, latents)):
        Image.fromarray(im).save(os.path.join(folder, f"image_{k}.jpg"), quality=95)
        np.save(os.path.join(folder, f"latent_{k}.npy"), lat.astype(np.float64))


def make_3diebench(out, classes=55, objects_per_class=6, views=50, size=64, seed=0, ood=False,
                   device="cpu", progress=True, meshes=None, zoom=1.0, paint="palette"):
    """Write a procedural look-alike in the exact 3DIEBench layout, deterministic for a seed: the first `classes` of
    the 55 real synset ids, random object ids, class c from shape family c; ood=True: the same objects at OOD angles.
    meshes=DIR: render DIR/<class>/<model>[.obj] meshes instead (ShapeNetCore v2: a 3DIEBench re-render, ids kept)."""
    if meshes:
        models = sorted(glob.glob(os.path.join(meshes, "*", "*.obj")) + glob.glob(os.path.join(meshes, "*", "*", "")))
        if not models:
            raise DataError(f"{meshes}: no meshes (expected {meshes}/<class>/<model>.obj or <class>/<model>/*.obj)")
        if len(found := {os.path.dirname(m.rstrip(os.sep)) for m in models}) > NUM_CLASSES:
            raise DataError(f"{meshes}: {len(found)} class folders; 3DIEBench has {NUM_CLASSES} classes at most")
        first_obj = lambda m: (sorted(glob.glob(os.path.join(m, "**", "*.obj"), recursive=True)) or [m])[0]
        fallbacks = []                                                 # (OBJ, texture) rendered with Kd instead
        objects = [(*re.sub(r"\.obj$", "", m.rstrip(os.sep)).split(os.sep)[-2:],
                    lambda p=first_obj(m): read_obj(p, fallbacks=fallbacks)) for m in models]
        write_3diebench(out, objects, views, size, seed, ood, device, progress, zoom, source=meshes)
        if fallbacks:                                        # one line for the whole import; paths in check's style
            first = sorted(fallbacks)[0]
            print(f"{len({obj for obj, _ in fallbacks})} of {len(models)} meshes: a texture or MTL file missing or "
                  f"unreadable, rendered with their material's diffuse colour (Kd; grey without the MTL) instead; "
                  f"first: {first[0]} ({first[1]})", file=sys.stderr)
        return out
    if objects_per_class < 2:
        raise DataError(f"--objects-per-class {objects_per_class}: make-3diebench needs at least 2 (train and val)")
    if not 1 <= classes <= NUM_CLASSES:
        raise DataError(f"--classes {classes}: 3DIEBench has {NUM_CLASSES} classes (1 to {NUM_CLASSES})")
    rng = np.random.default_rng(seed)
    synsets = REAL_SYNSETS[:classes]
    ids = []                                 # distinct hex ids, lengths in the real data's proportions (sie.md §1.1)
    while len(ids) < classes * objects_per_class:
        new = "".join(rng.choice(list("0123456789abcdef"), rng.choice(ID_LENGTHS, p=ID_LENGTH_P)))
        ids += [new] if new not in ids else []
    objects = [(synsets[c], ids.pop(0), lambda c=c, o=o: object_mesh(c, np.random.default_rng([seed, c, o, 0]), paint))
               for c in range(classes) for o in range(objects_per_class)]
    return write_3diebench(out, objects, views, size, seed, ood, device, progress, zoom)


@contextlib.contextmanager
def staged(out):
    """Write into a private OUT.partial-HOST-PID folder, renamed to OUT at the end; an exception or Ctrl-C removes
    it: never a half-written OUT. Private, so that processes writing the same OUT at once (every rank of a torchrun
    generating the default set) leave each other's files alone: the first to finish wins, the others discard theirs
    (the generators write the same files for the same arguments). Folders left by killed processes of this host
    are removed. An OSError (read-only folder, full disk) becomes a DataError naming OUT."""
    out = out.rstrip(os.sep) or out
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        what = "is not empty" if os.path.isdir(out) else "is not a folder"
        raise DataError(f"{out}: already exists and {what}; choose another output folder")
    prefix = f"{out}.partial-{socket.gethostname()}-"
    for stale in glob.glob(glob.escape(prefix) + "*"):
        if not process_alive(stale[len(prefix):]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = prefix + str(os.getpid())
    try:
        os.makedirs(tmp)
    except OSError as e:
        raise DataError(f"{out}: cannot create the output folder ({e.strerror}: {e.filename})") from None
    try:
        yield tmp
        with contextlib.suppress(OSError):
            os.rmdir(out)                                            # an empty OUT: os.replace needs it gone
        try:
            os.replace(tmp, out)
        except OSError:
            if not (os.path.isdir(out) and os.listdir(out)):
                raise
            # another process finished the same OUT first: keep its files, discard ours (finally)
    except OSError as e:
        raise DataError(f"{out}: writing failed ({e}); nothing was left behind") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def process_alive(pid):
    """Whether `pid` (a string, from a staged folder's name) is a running process of this host; unsure: True."""
    if os.name != "posix" or not pid.isdigit():     # (os.kill(pid, 0) would end the process on Windows)
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):                 # e.g. another user's process
        return True
    return True


def write_3diebench(out, objects, views=50, size=64, seed=0, ood=False, device="cpu", progress=True, zoom=1.0,
                    source="make-3diebench"):
    """The writer behind every generator. objects: [(synset, obj_id, mesh_fn)], mesh_fn() -> render's (verts, faces,
    look), rendered on all cores; one failing to load (DataError) is skipped. Label = position of the synset among
    those written (sie.md §1.2); ~20 % of each class's objects go to val; lists shuffled, like the real ones.
    source: what the objects come from, for the messages (the mesh folder)."""
    if views < 2:
        raise DataError(f"--views {views}: make-3diebench needs at least 2 (training pairs are distinct views)")
    latents = [sample_latents(np.random.default_rng([seed, i, 1 + ood]), views, ood) for i in range(len(objects))]
    start = time.time()
    with staged(out) as tmp:
        def job(i):                                                                # -> None, or why it is skipped
            try:
                verts, faces, look = objects[i][2]()
            except DataError as e:
                return str(e)
            images = render(verts.to(device), faces.to(device), look, latents[i], size, zoom=zoom)
            write_object(os.path.join(tmp, objects[i][0], objects[i][1]), images, latents[i])
        errors = parallel_map(job, range(len(objects)), "render", progress)
        print(*(f"skipped {e}\n" for e in errors if e), sep="", end="", file=sys.stderr)
        synsets = sorted({o[0] for o, e in zip(objects, errors) if not e})
        if not synsets:
            raise DataError(f"{source}: none of the {len(objects)} meshes could be read")
        labels = np.array([-1 if e else synsets.index(o[0]) for o, e in zip(objects, errors)])
        in_val = np.zeros(len(objects), bool)
        for c in range(len(synsets)):
            members = np.flatnonzero(labels == c)
            in_val[members[:round(0.2 * len(members)) or (len(members) > 1)]] = True
        if not in_val.any():
            raise DataError(f"{source}: no class has 2 usable objects, so the val split would be empty")
        for name, chosen in (("train", (labels >= 0) & ~in_val), ("val", in_val)):
            order = np.random.default_rng([seed, name == "val"]).permutation(np.flatnonzero(chosen))
            entries = [f"/{objects[i][0]}/{objects[i][1]}/" for i in order]
            np.save(os.path.join(tmp, f"{name}_images.npy"), np.array(entries, f"<U{max([43, *map(len, entries)])}"))
            np.save(os.path.join(tmp, f"{name}_labels.npy"), labels[order].astype(np.int64))
            np.save(os.path.join(tmp, f"all_latents_{name}.npy"), np.array([latents[i] for i in order]).reshape(-1, 7))
    n, seconds = (labels >= 0).sum() * views, time.time() - start
    if progress:
        print(f"wrote {n // views} objects x {views} views = {n} images of {size}x{size} in {seconds:.1f} s: "
              f"{n / seconds:.0f} images/s ({cpu_cores()} cores, {device}); {sum(map(bool, errors))} meshes skipped")
    return out


# Issue 8's 11 classes: (class, pattern searched in the catalogue's "category/name", lower case); first match wins.
SH3D_CLASSES = [("person", r"^characters/.*\b(male|female|boy|girl|mannequin)\b"), ("vehicle", r"^vehicles/"),
    ("window", r"\bwindow\b(?! (blind|shutter))"), ("door", r"\bdoor\b(?! cabinet)"), ("sofa", r"\bsofa|couch"),
    ("cabinet", r"cabinet|cupboard|wardrobe|dresser|drawers|bookcase|shelves|\bchest\b(?! freezer)"),
    ("bed", r"\bbed\b|\bcrib\b|futon"), ("chair", r"(?<!wheel)chair|\bstool\b|\bseat\b"),
    ("lamp", r"lamp|\blight\b|lantern"), ("table", r"(?<!pool )(?<!football )\btable\b(?! fan| tennis)|\bdesk\b"),
    ("plant", r"plant|\btree|flower|cactus|bamboo|bonsai|ficus|palm|pine|orchid|tulip|lily|yucca|spathiphyllum|hedge|"
              r"bush|acacia|maple|beech|cypress|poplar|blossom")]


def import_sweethome3d(unpacked, out):
    """Sort the models of the Sweet Home 3D libraries under `unpacked` (*.sh3f zips, e.g. Debian's package after
    dpkg -x) into out/<class>/<catalogue id>/ (OBJ, MTL, textures) by catalogue category/name; others are left out."""
    counts = defaultdict(int)
    with staged(out) as tmp:
        for library in sorted(glob.glob(os.path.join(unpacked, "**", "*.sh3f"), recursive=True)):
            with zipfile.ZipFile(library) as z:
                catalogue = defaultdict(dict)
                for key, i, value in re.findall(r"^(\w+)#(\d+)\s*[=:]\s*(.*?)\s*$", z.read(
                        "PluginFurnitureCatalog.properties").decode("latin-1"), re.M):
                    catalogue[i][key] = value
                for e in catalogue.values():
                    name = f"{e.get('category')}/{e.get('name')}".lower()
                    label = next((c for c, pattern in SH3D_CLASSES if re.search(pattern, name)), None)
                    if label is None or "model" not in e:
                        continue
                    model, dest = e["model"].strip("/"), os.path.join(tmp, label, re.sub(r"[^\w-]+", "-", e["id"]))
                    z.extractall(dest, [m for m in z.namelist() if m.startswith(os.path.dirname(model) + "/")])
                    counts[label] += 1
        if not counts:
            raise DataError(f"{unpacked}: no Sweet Home 3D library (*.sh3f) with such models (unpacked with dpkg -x?)")
    print(f"{out}: {sum(counts.values())} models:", ", ".join(f"{c} {n}" for n, c in sorted(
        ((n, c) for c, n in counts.items()), reverse=True)))
    return out


def contact_sheet(root, out_png, objects=8, views=8):
    """A grid, one row per object (one per class first), one column per view, as stored on disk."""
    import torchvision
    entries, labels = read_split(root, "train")
    first = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)][:objects]
    to_tensor = torchvision.transforms.ToTensor()
    tiles = [to_tensor(load_image(os.path.join(object_dir(root, entries[i]), f"image_{k}.jpg")))
             for i in first for k in range(views)]
    torchvision.utils.save_image(torch.stack(tiles), out_png, nrow=views, padding=2, pad_value=1.0)
    return out_png


# ============================================================ ImageFolder (ser.py's ImageNet stand-in, issue 7)
def class_folders(folder):
    """Sorted class folders of an ImageFolder split (hidden ones, e.g. .ipynb_checkpoints, left out)."""
    return sorted(d for d in os.listdir(folder) if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))


def image_files(folder):
    """Sorted paths of a class folder's images: IMAGE_EXTENSIONS, not hidden (macOS's ._x.JPEG are not images);
    anything else there (.DS_Store, README.txt) is ignored."""
    with os.scandir(folder) as entries:       # scandir: the file type without one stat per file (1.28 M in train)
        return sorted(e.path for e in entries
                      if e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith(".") and e.is_file())


def class_mismatch(train_dir, folder, train, classes):
    """The message for a split whose class folders are not train's (labels are positions in the sorted list)."""
    def listed(names):
        return ", ".join(names[:3]) + (f" ... ({len(names)} in all)" if len(names) > 3 else "")
    missing, extra = sorted(set(train) - set(classes)), sorted(set(classes) - set(train))
    return (f"{folder}: class folders differ from {train_dir}'s, so labels would not match ("
            + "; ".join(f"{what}: {listed(names)}" for what, names in (("missing", missing), ("extra", extra)) if names)
            + ")")


class ImageFolder(torch.utils.data.Dataset):
    """'<root>/<split>/<wnid>/*.JPEG' (ImageNet's layout) -> (transform(PIL RGB image), label), labels in sorted-wnid
    order; .classes, .samples, .targets. Unlike torchvision's, every problem is a DataError naming the file; files
    that are not images (IMAGE_EXTENSIONS) are ignored, as are hidden files and folders."""

    def __init__(self, root, split, transform=None):
        folder, self.transform = os.path.join(ensure_imagefolder(root), split), transform
        if not os.path.isdir(folder):
            raise DataError(f"{folder}: missing split folder (expected {folder}/<wnid>/*.JPEG)")
        self.classes = class_folders(folder)
        if not self.classes:
            raise DataError(f"{folder}: no class folders (expected {folder}/<wnid>/*.JPEG)")
        train = os.path.join(root, "train")
        if split != "train" and os.path.isdir(train) and class_folders(train) != self.classes:
            raise DataError(class_mismatch(train, folder, class_folders(train), self.classes))
        self.samples = []
        for label, wnid in enumerate(self.classes):
            files = image_files(os.path.join(folder, wnid))
            if not files:
                raise DataError(f"{os.path.join(folder, wnid)}: empty class folder (no .JPEG/.jpg/.png images)")
            self.samples += [(f, label) for f in files]
        self.targets = [label for _, label in self.samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        image, label = load_image(self.samples[i][0]), self.samples[i][1]
        return (self.transform(image) if self.transform else image), label



def backgrounds(gen, n, size):
    """(n, 3, size, size) textures with a canonical "up", like photographs: a sky-to-ground gradient, faint colour
    blotches, stripes of random frequency and direction; low contrast, so that the object carries the class."""
    rand = lambda *shape: torch.rand(*shape, generator=gen)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    sky, ground = 0.6 + 0.4 * rand(n, 3, 1, 1), 0.5 * rand(n, 3, 1, 1)
    blotches = F.interpolate(rand(n, 3, 4, 4), size=(size, size), mode="bicubic", align_corners=False)
    angle, freq = math.pi * rand(n, 1, 1, 1), 3 + 12 * rand(n, 1, 1, 1)
    stripes = (torch.sin(2 * math.pi * freq * (xx * angle.cos() + yy * angle.sin())) > 0).float() * rand(n, 3, 1, 1)
    return (0.55 * (sky * (1 - yy) + ground * yy) + 0.1 * blotches + 0.03 * stripes).clamp(0, 1)


def make_imagefolder(out, classes=10, train_per_class=100, val_per_class=20, size=64, seed=0, progress=True):
    """ImageNet-layout look-alike, deterministic for a seed: class c = shape family c, a new object per 4 images,
    upright with a small pose jitter, ~45-70 % of the frame, centre within the middle 30 %, over a calm background:
    rotations and flips change what an image shows (what SER's equivariance is about)."""
    per_object = 4                                               # images per object instance
    jobs = [(split, c, k) for split, n in (("train", train_per_class), ("val", val_per_class))
            for c in range(classes) for k in range(0, n, per_object)]
    def job(tmp, split, c, k):
        rng = np.random.default_rng([seed, split == "val", c, k])
        gen = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        n = min(per_object, (train_per_class if split == "train" else val_per_class) - k)
        lat = sample_latents(rng, n)
        lat[:, :3] = rng.normal(0, [0.12, 0.12, 0.2], (n, 3))      # upright: small tilt, some turn about z
        zoom = rng.uniform(1.5, 2.3)                      # object scale (~0.31 of the frame at zoom 1); the crop
        big = render(*object_mesh(c, rng), lat, round(size * zoom), alpha=True)   # sets the position
        m = big.shape[-1] / 2
        x0, y0 = rng.integers(round(m - 0.65 * size), round(m - 0.35 * size) + 1, (2, n))
        crop = torch.stack([b[:, y:y + size, x:x + size] for b, x, y in zip(big, x0, y0)])
        rgb, a = crop[:, :3], crop[:, 3:]
        image = a * rgb + (1 - a) * (0.2 * rgb + 0.8 * backgrounds(gen, n, size))   # keeps floor light and shadow
        wnid = f"n{90000000 + c:08d}"
        os.makedirs(os.path.join(tmp, split, wnid), exist_ok=True)
        for j, im in enumerate((image * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()):
            number = k + j if split == "train" else c * val_per_class + k + j + 1
            name = f"{wnid}_{number}.JPEG" if split == "train" else f"ILSVRC2012_val_{number:08d}.JPEG"
            Image.fromarray(im).save(os.path.join(tmp, split, wnid, name), quality=90)
    with staged(out) as tmp:
        parallel_map(lambda j: job(tmp, *j), jobs, "make-imagefolder", progress)
    return out


# ============================================================ command line
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("make-3diebench", help="generate a look-alike data set in the 3DIEBench layout")
    g.add_argument("out", help="output folder (must not exist or be empty)")
    g.add_argument("--classes", type=int, default=55, help="number of classes (real: 55)")
    g.add_argument("--objects-per-class", type=int, default=6, help="objects per class; ~20%% go to val")
    g.add_argument("--views", type=int, default=N_VIEWS, help="views per object (real: 50)")
    g.add_argument("--size", type=int, default=64, help="image side in pixels, e.g. 64, 128, 256 (real: 256)")
    g.add_argument("--seed", type=int, default=0, help="same seed -> identical files")
    g.add_argument("--ood", action="store_true", help="angles in [pi/2, pi] u [-pi, -pi/2] (3DIEBench-OOD)")
    g.add_argument("--zoom", type=float, default=1.0, help="focal length x zoom: objects larger in frame (real: 1)")
    g.add_argument("--paint", choices=("palette", "axes"), default="palette", help="face colours: two random "
                   "ones per object, or by object-frame normal, one colour per +-axis (the toy set: pose visible)")
    g.add_argument("--device", default="cpu", help="torch device for the renderer (cpu, cuda)")
    g.add_argument("--meshes", help="render DIR/<class>/<model>.obj or <class>/<model>/**/*.obj (ShapeNet v2) instead")
    i = sub.add_parser("import-sweethome3d", help="sort an unpacked sweethome3d-furniture's models into class folders")
    i.add_argument("unpacked", help="folder where the package was unpacked (dpkg -x)")
    i.add_argument("mesh_dir", help="output: MESH_DIR/<class>/<model>/ (must not exist or be empty)")
    c = sub.add_parser("check", help="scan a data set (3DIEBench or ImageFolder, real or generated) and report "
                       "every problem")
    c.add_argument("root", help="a 3DIEBench root (list files) or an ImageFolder root (train/<wnid>/, val/<wnid>/)")
    c.add_argument("--quick", action="store_true", help="only the seconds-long start-up checks the training "
                   "scripts run (data.preflight); stops at the first problem")
    c.add_argument("--workers", type=int, default=None, help="decoding threads (default: all cores)")
    m = sub.add_parser("make-imagefolder", help="generate an ImageNet-layout look-alike (train/<wnid>/*.JPEG, val/...)")
    m.add_argument("out", help="output folder (must not exist or be empty)")
    m.add_argument("--classes", type=int, default=10, help="number of classes (shape families)")
    for flag, default in (("--train-per-class", 100), ("--val-per-class", 20), ("--size", 64), ("--seed", 0)):
        m.add_argument(flag, type=int, default=default)
    s = sub.add_parser("contact-sheet", help="PNG grid of a few objects x views")
    s.add_argument("root")
    s.add_argument("out_png")
    for flag in ("--objects", "--views"):
        s.add_argument(flag, type=int, default=8)
    args = p.parse_args(argv)
    try:
        if args.command == "make-3diebench":
            make_3diebench(args.out, args.classes, args.objects_per_class, args.views, args.size, args.seed,
                           args.ood, args.device, meshes=args.meshes, zoom=args.zoom, paint=args.paint)
        elif args.command == "import-sweethome3d":
            import_sweethome3d(args.unpacked, args.mesh_dir)
        elif args.command == "make-imagefolder":
            print(make_imagefolder(args.out, args.classes, args.train_per_class, args.val_per_class, args.size,
                                   args.seed))
        elif args.command == "check":
            kind = layout(ensure(args.root, generate=False))
            if args.quick:
                preflight(args.root, kind, args.workers)                  # a DataError at the first problem
                problems = {}
            else:
                problems = check(args.root, args.workers)
            for what, msgs in problems.items():
                print(f"{what}: {len(msgs)} problem(s)", *(f"  {m}" for m in msgs[:5]), sep="\n", file=sys.stderr)
            if problems:
                sys.exit(1)
            print(f"{args.root}: OK ({kind}{', quick checks' if args.quick else ''})")
        elif args.command == "contact-sheet":
            print(contact_sheet(args.root, args.out_png, args.objects, args.views))
    except (DataError, OSError) as e:           # OSError: e.g. contact-sheet's output folder does not exist
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
