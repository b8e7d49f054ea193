"""3DIEBench data for sie.py and baselines.py, ImageNet-style folders for ser.py: loaders, datasets,
a checker, and a generator of look-alike data sets in the same on-disk formats.

    python data.py {make-3diebench,check,contact-sheet,make-imagefolder,import-sweethome3d} -h

The 3DIEBench layout (official SIE code, github.com/facebookresearch/SIE: data/README.md,
src/dataset.py):
    <root>/<synset>/<obj_id>/image_k.jpg     view k of one object (k = 0..49)
    <root>/<synset>/<obj_id>/latent_k.npy    that view's 7 float64 latents (see load_latent)
    <root>/{train,val}_images.npy            one '/SYNSET/OBJ_ID/' entry per object
    <root>/{train,val}_labels.npy            the int64 label of each entry
    <root>/all_latents_{split}.npy           optional: every view's latents, row obj_idx * 50 + view
The scripts import the loaders; nothing runs at import. Before their first step they call
preflight(root, kind), which takes seconds; `python data.py check ROOT` decodes every file.
The file reads top to bottom as training uses it; the generator comes last, after a banner.
"""
import argparse
import contextlib
import functools
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

# ===================================================================================== constants
# Per-channel statistics of 3DIEBench's own images, not ImageNet's (official SIE code, main.py and
# every eval_*.py normalise with them). With std ~0.1, normalised pixels reach about +-5.
MEAN = (0.5016, 0.5037, 0.5060)
STD = (0.1030, 0.0999, 0.0969)
N_VIEWS = 50                          # renderings per object
NUM_CLASSES = 55                      # ShapeNetCore synsets: labels 0..54, the classifiers' width
DEFAULT_ROOT = "data/3diebench-toy"   # relative to cwd; generated on first use (ensure)
# The toy set that every script's default runs on (10,000 images).
# Deviation: toy only. zoom=2 doubles the lens's focal length, so objects fill ~2x more of the
# 32 px frame, and paint="axes" colours each face by its object-frame normal, so the pose is
# visible at 32 px (README "Data"): on the plain look-alike no method learns rotation in a
# CPU-minutes run, not even a supervised regressor.
TOY_3DIEBENCH = dict(classes=10, objects_per_class=20, views=50, size=32, zoom=2.0, paint="axes",
                     seed=0)

IMAGENET_MEAN = (0.485, 0.456, 0.406)   # the statistics ImageFolder data is normalised with
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")   # what an ImageFolder class holds; others ignored
DEFAULT_IMAGEFOLDER_ROOT = "data/imagefolder-toy"
TOY_IMAGEFOLDER = dict(classes=10, train_per_class=100, val_per_class=20, size=64, seed=0)


class DataError(Exception):
    """A problem with the data that a user can act on, as one message naming the file: the
    scripts print it and exit with code 2."""

    def __str__(self):
        message = super().__str__()
        # A DataLoader worker re-raises the error wrapped in its traceback's text: keep the message.
        if "Original Traceback" in message:
            return message.rsplit("DataError: ", 1)[-1].strip()
        return message


def cpu_cores():
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def parallel_map(fn, jobs, desc, progress=True, workers=None):
    """list(map(fn, jobs)) on one thread per core, with torch single-threaded in each thread
    (torch, PIL and file I/O release the GIL, so threads are enough)."""
    from tqdm import tqdm
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers or cpu_cores()) as pool:
            results = tqdm(pool.map(fn, jobs), total=len(jobs), desc=desc, disable=not progress)
            return list(results)
    finally:
        torch.set_num_threads(threads)


def channel_constants(values, like):
    """Three per-channel numbers -> a (3, 1, 1) tensor of like's dtype on like's device, so that it
    broadcasts over (3, H, W) and (B, 3, H, W). non_blocking: no wait for queued GPU work."""
    return torch.tensor(values, dtype=like.dtype).view(3, 1, 1).to(like.device, non_blocking=True)


def normalize_channels(x, stats=(MEAN, STD)):
    """Images in [0, 1], (3, H, W) or (B, 3, H, W) -> (x - mean) / std per channel, stats =
    (mean, std): the one normalisation of every loader and evaluation (torchvision's Normalize
    computes the same numbers)."""
    mean, std = stats
    return (x - channel_constants(mean, x)) / channel_constants(std, x)


def denormalize_channels(x, stats=(MEAN, STD)):
    """The inverse of normalize_channels: x * std + mean per channel, back to [0, 1] images."""
    mean, std = stats
    return x * channel_constants(std, x) + channel_constants(mean, x)


# ===================================================================================== rotations
# Pure numpy/torch, no scipy: every function takes numpy float64 arrays or torch tensors and
# returns the same kind.
def array_module(x):
    return torch if torch.is_tensor(x) else np


def euler_xyz_to_matrix(angles):
    """(..., 3) -> (..., 3, 3). Extrinsic xyz, R = Rz(a2) Ry(a1) Rx(a0): the rotation the official
    generator sets (Blender's XYZ Euler mode), scipy's Rotation.from_euler("xyz")."""
    xp = array_module(angles)
    ca, cb, cc = (xp.cos(angles[..., k]) for k in range(3))
    sa, sb, sc = (xp.sin(angles[..., k]) for k in range(3))
    entries = [cb * cc, sa * sb * cc - ca * sc, ca * sb * cc + sa * sc,
               cb * sc, sa * sb * sc + ca * cc, ca * sb * sc - sa * cc,
               -sb, sa * cb, ca * cb]
    return xp.stack(entries, -1).reshape(*angles.shape[:-1], 3, 3)


def matrix_to_quaternion(R):
    """(..., 3, 3) -> (..., 4) unit quaternions, scalar-last (x, y, z, w), as scipy's
    Rotation.from_matrix: the largest component is made positive."""
    xp = array_module(R)
    r00, r01, r02 = R[..., 0, 0], R[..., 0, 1], R[..., 0, 2]
    r10, r11, r12 = R[..., 1, 0], R[..., 1, 1], R[..., 1, 2]
    r20, r21, r22 = R[..., 2, 0], R[..., 2, 1], R[..., 2, 2]
    trace = r00 + r11 + r22
    # One unnormalised candidate per component that may be the largest (x, y, z or w); the
    # diagonal tells which is, and that candidate is the numerically safe one.
    candidates = xp.stack([
        xp.stack([1 + 2 * r00 - trace, r10 + r01, r20 + r02, r21 - r12], -1),
        xp.stack([r01 + r10, 1 + 2 * r11 - trace, r21 + r12, r02 - r20], -1),
        xp.stack([r02 + r20, r12 + r21, 1 + 2 * r22 - trace, r10 - r01], -1),
        xp.stack([r21 - r12, r02 - r20, r10 - r01, 1 + trace], -1)], -2)   # (..., 4, 4)
    largest = xp.stack([r00, r11, r22, trace], -1).argmax(-1)[..., None, None]
    if xp is np:
        q = np.take_along_axis(candidates, largest, -2)
    else:
        q = candidates.gather(-2, largest.expand(*largest.shape[:-1], 4))
    q = q[..., 0, :]
    return q / (q ** 2).sum(-1)[..., None] ** 0.5


def quaternion_multiply(p, q):
    """Hamilton product p * q of (..., 4) scalar-last quaternions (applies q first, then p)."""
    x1, y1, z1, w1 = (p[..., k] for k in range(4))
    x2, y2, z2, w2 = (q[..., k] for k in range(4))
    return array_module(p).stack([w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                                  w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
                                  w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
                                  w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2], -1)


def euler_xyz_to_quaternion(angles):
    """(..., 3) -> (..., 4) scalar-last: q_z(a2) q_y(a1) q_x(a0) multiplied out, with the signs of
    scipy's Rotation.from_euler("xyz").as_quat()."""
    xp = array_module(angles)
    cx, cy, cz = (xp.cos(angles[..., k] / 2) for k in range(3))
    sx, sy, sz = (xp.sin(angles[..., k] / 2) for k in range(3))
    return xp.stack([sx * cy * cz - cx * sy * sz,
                     cx * sy * cz + sx * cy * sz,
                     cx * cy * sz - sx * sy * cz,
                     cx * cy * cz + sx * sy * sz], -1)


def relative_quaternion(a1, a2):
    """quat(R1^T R2) from two (..., 3) Euler-angle arrays: the rotation from view 1 to view 2 in
    view 1's OBJECT (body) frame, R2 = R1 r, not the world-frame R2 R1^T. Computed as the official
    code does (src/dataset.py, Dataset3DIEBench.__getitem__: scipy's r1.inv() * r2, which is
    conj(q1) q2), so the sign is the same: w < 0 for ~4.4 % of pairs, and since the hypernetwork
    is linear in g the sign matters (matrix_to_quaternion(R1^T R2) would flip some of them)."""
    q1 = euler_xyz_to_quaternion(a1)
    if torch.is_tensor(q1):
        conjugate = q1.new_tensor([-1.0, -1, -1, 1])
    else:
        conjugate = np.array([-1.0, -1, -1, 1])
    return quaternion_multiply(q1 * conjugate, euler_xyz_to_quaternion(a2))


def hue_differences(lat1, lat2):
    """(..., 7) numpy latents -> (..., 2) float64 lat2[[3, 6]] - lat1[[3, 6]]: the floor-hue and
    spot-hue differences, raw, not wrapped mod 1 although hue is circular (official code,
    src/dataset.py, Dataset3DIEBenchRotColor)."""
    return lat2[..., [3, 6]] - lat1[..., [3, 6]]


def relative_g(lat1, lat2, color=False, float32_angles=True):
    """The transformation g from view 1 to view 2 that a predictor is conditioned on, from (..., 7)
    numpy latents -> float32 tensor (..., 4): relative_quaternion of the angles; color=True:
    (..., 6), followed by the hue_differences. float32_angles: the angles are cast to float32
    first, as the official training pairs and probes do; its MRR and PRE scripts use the float64
    latents (float32_angles=False). The two differ in the last digits only."""
    angles1, angles2 = lat1[..., :3], lat2[..., :3]
    if float32_angles:
        angles1 = angles1.astype(np.float32).astype(np.float64)
        angles2 = angles2.astype(np.float32).astype(np.float64)
    g = relative_quaternion(angles1, angles2)
    if color:
        g = np.concatenate([g, hue_differences(lat1, lat2)], -1)
    return torch.from_numpy(g).float()


# ======================================================== reading the 3DIEBench on-disk format
def ensure(root=None, name="3DIEBench", generate=True):
    """Return root if it exists. The default location of `name` ("3DIEBench" or "ImageFolder") is
    generated on first use, saying so in one line (make_3diebench / make_imagefolder, in the
    generation part below); any other missing root is an error naming the command that
    generates one there."""
    if name == "3DIEBench":
        default, command, make, config = (DEFAULT_ROOT, "make-3diebench", make_3diebench,
                                          TOY_3DIEBENCH)
    elif name == "ImageFolder":
        default, command, make, config = (DEFAULT_IMAGEFOLDER_ROOT, "make-imagefolder",
                                          make_imagefolder, TOY_IMAGEFOLDER)
    else:
        raise KeyError(name)
    root = root or default
    if os.path.isdir(root):
        return root
    if not generate or os.path.abspath(root) != os.path.abspath(default):
        raise DataError(f"{root}: {name} root not found (generate a look-alike there with: "
                        f"python data.py {command} {root})")
    settings = ", ".join(f"{k}={v}" for k, v in config.items())
    print(f"data: {root} not found, generating the toy {name} look-alike there: {settings}",
          file=sys.stderr)
    try:
        return make(root, **config, progress=False)
    except DataError as e:         # e.g. a read-only working directory: the set can live elsewhere
        raise DataError(f"{e}; run from a writable folder, or generate the set elsewhere with "
                        f"`python data.py {command} DIR` and pass --data-root DIR") from None


def ensure_3diebench(root=None, generate=True):
    return ensure(root, "3DIEBench", generate)


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
    """The folder of a list entry: entries are '/SYNSET/OBJ_ID/', with both slashes."""
    return os.path.join(root, str(entry).strip("/"))


def image_file(folder, view):
    return os.path.join(folder, f"image_{view}.jpg")


def latent_file(folder, view):
    return os.path.join(folder, f"latent_{view}.npy")


def read_split(root, split, check_folders=True, check_labels=True):
    """-> (entries, labels): '{split}_images.npy', one entry per object (its order is the row order
    of all_latents_{split}.npy), and '{split}_labels.npy', the int64 position of each object's
    synset among the sorted synsets. Checked: readable, same length, not empty, labels <
    NUM_CLASSES (check_labels), every listed folder exists (check_folders)."""
    root = ensure_3diebench(root)
    list_file = os.path.join(root, f"{split}_images.npy")
    label_file = os.path.join(root, f"{split}_labels.npy")
    entries = load_npy(list_file, f"{split} list file")
    labels = load_npy(label_file, f"{split} label file")
    if entries.ndim != 1 or entries.dtype.kind != "U":
        raise DataError(f"{list_file}: expected '/SYNSET/OBJ_ID/' strings, "
                        f"got {entries.dtype} {entries.shape}")
    if not len(entries):
        raise DataError(f"{list_file}: lists no objects")
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or (len(labels) and labels.min() < 0):
        raise DataError(f"{label_file}: expected non-negative integer labels, "
                        f"got {labels.dtype} {labels.shape}")
    if len(entries) != len(labels):
        raise DataError(f"{label_file}: {len(labels)} labels but {list_file} lists "
                        f"{len(entries)} objects")
    if check_labels:
        problem = label_problem(label_file, entries, labels)
        if problem:
            raise DataError(problem)
    if check_folders:
        missing = [e for e in entries if not os.path.isdir(object_dir(root, e))]
        if missing:
            raise DataError(f"{list_file}: {len(missing)} of {len(entries)} listed object folders "
                            f"are missing, first: {missing[0]} ({object_dir(root, missing[0])})")
    return entries, labels.astype(np.int64)


def label_problem(label_file, entries, labels):
    """None, or why labels >= NUM_CLASSES would crash training (the classifier heads have
    NUM_CLASSES outputs)."""
    bad = labels >= NUM_CLASSES
    if not bad.any():
        return None
    first = int(np.argmax(bad))
    return (f"{label_file}: {int(bad.sum())} label(s) >= {NUM_CLASSES} (3DIEBench has "
            f"{NUM_CLASSES} classes), first: {labels[first]} for {entries[first]}")


def views_in(folder):
    """The number of latent_k.npy files in an object folder (one per view)."""
    return sum(f.startswith("latent_") and f.endswith(".npy") for f in os.listdir(folder))


def too_few_views(folder, views):
    return (f"{folder}: {views} view(s) (latent_k.npy files); training pairs need 2 distinct "
            "views")


def count_views(root, entries):
    """Views per object, from the first object's folder (50 in the real data); at least 2,
    since a training pair is two distinct views of one object."""
    folder = object_dir(root, entries[0])
    try:
        views = views_in(folder)
    except OSError as e:
        raise DataError(f"{folder}: unreadable object folder ({e.strerror})") from None
    if views < 2:
        raise DataError(too_few_views(folder, views))
    return views


# The ranges of the latents that the methods read (official code, data/main.py, which draws them):
# Euler angles U(-pi/2, pi/2), floor and spot hues U(0, 1). The 3DIEBench-OOD set of seq-JEPA
# (arXiv 2505.03176) draws |angle| in [pi/2, pi]: a loader cannot tell the two sets apart, so it
# admits +-pi. A value outside would not crash a run, only poison it (an angle of 1e39 is inf in
# float32; a hue of 1e6 gives an R^2 of -inf). The slack absorbs rounding (a float32 round trip
# moves pi/2 by 4e-8). The spot light's theta and phi are not read by any method: not checked.
LATENT_RANGES = {0: ("angle x", -math.pi, math.pi), 1: ("angle y", -math.pi, math.pi),
                 2: ("angle z", -math.pi, math.pi), 3: ("floor hue", 0.0, 1.0),
                 6: ("spot hue", 0.0, 1.0)}
LATENT_SLACK = 1e-6


def latent_range_problem(latents):
    """(N, 7) float latents -> None, or (the number of rows outside LATENT_RANGES, the first such
    row's index, what is wrong with it)."""
    outside = {column: (latents[:, column] < low - LATENT_SLACK)
               | (latents[:, column] > high + LATENT_SLACK)
               for column, (_, low, high) in LATENT_RANGES.items()}
    bad = np.any(list(outside.values()), 0)
    if not bad.any():
        return None
    row = int(np.argmax(bad))
    column = next(column for column, out in outside.items() if out[row])
    name, low, high = LATENT_RANGES[column]
    limits = "[-pi, pi]" if name.startswith("angle") else f"[{low:g}, {high:g}]"
    return int(bad.sum()), row, (f"{name} {latents[row, column]:g} outside {limits} (3DIEBench: "
                                 "angles within +-pi/2, +-pi in its OOD set; hues in [0, 1])")


def load_latent(path):
    """One view's (7,) float64 latents (official code, data/main.py): 3 Euler angles (extrinsic
    xyz), floor hue, spot-light theta, spot-light phi, spot-light hue; finite, and within
    LATENT_RANGES."""
    lat = load_npy(path, "latent file")
    if lat.shape != (7,) or lat.dtype.kind != "f" or not np.isfinite(lat).all():
        raise DataError(f"{path}: latent must be 7 finite floats, got {lat.dtype} {lat.shape}")
    problem = latent_range_problem(lat[None].astype(np.float64))
    if problem:
        raise DataError(f"{path}: {problem[2]}")
    return lat.astype(np.float64)


def load_image(path, raw=None):
    """A PIL RGB image, decoded now, so that a corrupt or truncated file fails here, naming its
    path (raw: the file's bytes, when they are already read)."""
    try:
        with Image.open(path if raw is None else io.BytesIO(raw)) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: missing image") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: corrupt or truncated image ({e})") from None


def load_all_latents(root, split):
    """(objects * views, 7) float64, row obj_idx * views + view in list order: the
    all_latents_{split}.npy file if there is one, else rebuilt from the latent_k.npy files."""
    entries, _ = read_split(root, split)
    views = count_views(root, entries)
    path = os.path.join(root, f"all_latents_{split}.npy")
    if os.path.exists(path):
        return read_latent_table(path, entries, views)
    return np.stack([load_latent(latent_file(object_dir(root, e), k))
                     for e in entries for k in range(views)])


def check_latent_table(path, table, entries, views):
    """The all_latents table as load_all_latents returns it, or a DataError: its shape, dtype,
    finite values within LATENT_RANGES."""
    if table.shape != (len(entries) * views, 7) or table.dtype.kind != "f":
        raise DataError(f"{path}: expected shape ({len(entries) * views}, 7) float "
                        f"({len(entries)} objects x {views} views), "
                        f"got {table.dtype} {table.shape}")
    finite = np.isfinite(table).all(1)
    if not finite.all():
        row = int(np.argmin(finite))
        raise DataError(f"{path}: {int((~finite).sum())} row(s) not finite, first: row {row} "
                        f"({entries[row // views]} view {row % views})")
    table = table.astype(np.float64)
    problem = latent_range_problem(table)
    if problem:
        count, row, why = problem
        raise DataError(f"{path}: {count} row(s) out of range, first: row {row} "
                        f"({entries[row // views]} view {row % views}): {why}")
    return table


def read_latent_table(path, entries, views):
    return check_latent_table(path, load_npy(path, "latent table"), entries, views)


# ====================================================================================== datasets
class Split3DIEBench(torch.utils.data.Dataset):
    """One split of a 3DIEBench root: the list entries, labels, views per object, the number of
    classes (1 + the largest label of both splits: 55 for the real data) and the image transform:
    PIL -> float32 (3, S, S), resized to size x size if size is given, normalised with MEAN/STD
    (official code, main.py: ToTensor, Normalize; no augmentation)."""

    def __init__(self, root, split, size):
        import torchvision.transforms as T
        self.root = ensure_3diebench(root)
        self.entries, self.labels = read_split(root, split)
        self.views = count_views(root, self.entries)
        label_sets = [self.labels]
        for other in ("train", "val"):
            label_file = os.path.join(root, f"{other}_labels.npy")
            if os.path.isfile(label_file):
                label_sets.append(load_npy(label_file, "label file"))
        self.num_classes = 1 + int(max(labels.max(initial=0) for labels in label_sets))
        resize = [T.Resize((size, size))] if size else []
        self.transform = T.Compose(resize + [T.ToTensor(), normalize_channels])

    def path(self, obj, name):
        return os.path.join(object_dir(self.root, self.entries[obj]), name)

    def image(self, obj, view):
        """One view as the transformed tensor (JpegPairs3DIEBench: uint8, or the JPEG's bytes)."""
        return self.transform(load_image(self.path(obj, f"image_{view}.jpg")))


class Pairs3DIEBench(Split3DIEBench):
    """The training and rotation-probe item: one per OBJECT (an epoch is one pair per object) of
    two DISTINCT random views -> (x1, x2, g, label), g = relative_g: the relative quaternion
    (x, y, z, w), or with color=True [quaternion, d_floor_hue, d_spot_hue] (official code,
    src/dataset.py, Dataset3DIEBench and Dataset3DIEBenchRotColor)."""

    def __init__(self, root, split="train", size=None, color=False, seed=0):
        super().__init__(root, split, size)
        self.color = color
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        # The views are a function of (seed, epoch, i) only: the same for any number of ranks or
        # DataLoader workers (the official code draws them from an unseeded generator).
        rng = np.random.default_rng([self.seed, self.epoch, i])
        v1, v2 = rng.choice(self.views, 2, replace=False)
        x1 = self.image(i, v1)
        x2 = self.image(i, v2)
        lat1 = load_latent(self.path(i, f"latent_{v1}.npy"))
        lat2 = load_latent(self.path(i, f"latent_{v2}.npy"))
        return x1, x2, relative_g(lat1, lat2, self.color), int(self.labels[i])


class Views3DIEBench(Split3DIEBench):
    """The evaluation item: one VIEW. Index i -> object i // len(view_ids), view
    view_ids[i % len(view_ids)] -> (x, label, obj_idx, view). `latents` is load_all_latents's
    per-view table."""

    def __init__(self, root, split="val", size=None, views=None):
        super().__init__(root, split, size)
        if views is None:
            self.view_ids = list(range(self.views))
        else:
            self.view_ids = [int(v) for v in views]
        self.latents = load_all_latents(root, split)

    def __len__(self):
        return len(self.entries) * len(self.view_ids)

    def __getitem__(self, i):
        obj = i // len(self.view_ids)
        view = self.view_ids[i % len(self.view_ids)]
        return self.image(obj, view), int(self.labels[obj]), obj, view


# ============================================================ fast paths: JPEG decoding off PIL
class JpegPairs3DIEBench(Pairs3DIEBench):
    """Pairs3DIEBench for a fast training loop: images come as uint8 and to_float finishes them on
    the device. decode="cpu": the workers decode with libjpeg-turbo into uint8 (3, H, W);
    decode="gpu": they only read the files, x1 and x2 are the bytes as numpy uint8 arrays (a
    tensor each would hold a file descriptor), for collate_jpegs and decode_jpegs."""

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
            if self.decode == "gpu":
                return raw
            return decode_jpeg(torch.from_numpy(raw), mode=ImageReadMode.RGB)
        except OSError:
            raise DataError(f"{path}: missing image") from None
        except RuntimeError as e:
            raise DataError(f"{path}: corrupt JPEG ({e})") from None


def jpeg_markers_ok(head, tail):
    """True if a file's first bytes hold JPEG's start-of-image marker and its last 16 its
    end-of-image marker: what the fast paths demand of a file (libjpeg-turbo and nvJPEG read JPEG
    only, and a truncated one badly)."""
    return head[:2] == b"\xff\xd8" and b"\xff\xd9" in tail[-16:]


def collate_jpegs(items):
    """decode="gpu" batches: [(bytes1, bytes2, g, label)] -> ([bytes1], [bytes2], g (B, k),
    labels (B,))."""
    first, second, g, labels = zip(*items)
    return list(first), list(second), torch.stack(g), torch.tensor(labels)


def decode_jpegs(blobs, device):
    """JPEG byte arrays -> uint8 (B, 3, H, W) on device: nvJPEG in one batched call on CUDA."""
    from torchvision.io import ImageReadMode, decode_jpeg
    if torch.device(device).type == "cuda":
        # torchvision's nvJPEG path can write into memory blocks that queued kernels still read
        # (pytorch/vision#9606): let the stream drain first.
        torch.cuda.current_stream(device).synchronize()
    try:
        tensors = [torch.from_numpy(b) for b in blobs]
        return torch.stack(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except RuntimeError as e:
        raise DataError(f"a JPEG of this batch does not decode ({e}); "
                        "`python data.py check ROOT` names it") from None


def to_float(x, size=None):
    """uint8 (B, 3, H, W) -> float32 as Split3DIEBench's transform, on x's device: the same values
    at the native size; after a resize within ~1/255 (antialiased bilinear on floats here, on
    uint8 in PIL)."""
    x = x.float().div_(255)
    if size and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
    return normalize_channels(x)


def jpeg_pairs(root, split="train", size=None, color=False, seed=0, decode="cpu"):
    """(JpegPairs3DIEBench, its collate_fn): sie.py's --decode cpu|gpu training set."""
    dataset = JpegPairs3DIEBench(root, split, size, color, seed, decode)
    return dataset, collate_jpegs if decode == "gpu" else None


def images_to_device(x, device, size=None):
    """A loader's image batch -> normalised floats on the device at `size`: JPEG bytes
    (decode="gpu") are decoded there, uint8 (decode="cpu"|"gpu") normalised and resized there;
    Split3DIEBench's floats just move."""
    if isinstance(x, list):
        x = decode_jpegs(x, device)
    x = x.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        x = to_float(x, size)
    return x


# ===================================================== ImageFolder (ser.py's ImageNet stand-in)
def expected_layout(folder):
    return f"(expected {folder}/<wnid>/*.JPEG)"


def class_folders(folder):
    """Sorted class folders of an ImageFolder split (hidden ones, e.g. .ipynb_checkpoints, left
    out)."""
    return sorted(name for name in os.listdir(folder)
                  if not name.startswith(".") and os.path.isdir(os.path.join(folder, name)))


def image_files(folder):
    """Sorted paths of a class folder's images: IMAGE_EXTENSIONS, not hidden (macOS's ._x.JPEG are
    not images); anything else there (.DS_Store, README.txt) is ignored."""
    # scandir: the file type without one stat per file (1.28 M of them in ImageNet's train)
    with os.scandir(folder) as entries:
        return sorted(e.path for e in entries
                      if e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith(".")
                      and e.is_file())


def empty_class_folder(folder):
    return f"{folder}: empty class folder (no .JPEG/.jpg/.png images)"


def class_mismatch(train_dir, folder, train, classes):
    """The message for a split whose class folders are not train's (labels are positions in the
    sorted list, so they would not match)."""
    def listed(names):
        shown = ", ".join(names[:3])
        return shown + (f" ... ({len(names)} in all)" if len(names) > 3 else "")

    missing = sorted(set(train) - set(classes))
    extra = sorted(set(classes) - set(train))
    differences = [f"{what}: {listed(names)}"
                   for what, names in (("missing", missing), ("extra", extra)) if names]
    return (f"{folder}: class folders differ from {train_dir}'s, so labels would not match ("
            + "; ".join(differences) + ")")


class ImageFolder(torch.utils.data.Dataset):
    """'<root>/<split>/<wnid>/*.JPEG' (ImageNet's layout) -> (transform(PIL RGB image), label), the
    labels in sorted-wnid order; .classes, .samples, .targets. Unlike torchvision's, every problem
    is a DataError naming the file; files that are not images (IMAGE_EXTENSIONS) are ignored, and
    so are hidden files and folders."""

    def __init__(self, root, split, transform=None):
        folder = os.path.join(ensure_imagefolder(root), split)
        self.transform = transform
        if not os.path.isdir(folder):
            raise DataError(f"{folder}: missing split folder {expected_layout(folder)}")
        self.classes = class_folders(folder)
        if not self.classes:
            raise DataError(f"{folder}: no class folders {expected_layout(folder)}")
        train = os.path.join(root, "train")
        if split != "train" and os.path.isdir(train) and class_folders(train) != self.classes:
            raise DataError(class_mismatch(train, folder, class_folders(train), self.classes))
        self.samples = []
        for label, wnid in enumerate(self.classes):
            files = image_files(os.path.join(folder, wnid))
            if not files:
                raise DataError(empty_class_folder(os.path.join(folder, wnid)))
            self.samples += [(f, label) for f in files]
        self.targets = [label for _, label in self.samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        image = load_image(path)
        return (self.transform(image) if self.transform else image), label


# ====================================================================== checking a whole data set
def check(root, workers=None, progress=True):
    """Scan every list, folder, decoded image and latent -> {kind: [messages]}, empty if all is
    well: every problem at once. root: a 3DIEBench root (list files) or an ImageFolder root
    (train/<wnid>/, val/<wnid>/), told apart by layout()."""
    ensure(root, generate=False)
    if layout(root) == "ImageFolder":
        return check_imagefolder(root, workers, progress)
    return check_3diebench(root, workers, progress)


LIST_FILES = [f"{split}_{what}.npy" for split in ("train", "val") for what in ("images", "labels")]


def layout(root, expected=None):
    """The layout of root, decided once for training and evaluation alike: '3DIEBench' (it holds a
    list file, LIST_FILES) or 'ImageFolder' (a train/ or val/ folder). A root holding both is
    ambiguous, and with expected (the layout the caller reads: a script's DATA_KIND) a root of
    the other layout is wrong: a DataError naming the file that shows it. A root with neither (not
    there yet, or empty) is the expected layout, else the one whose default root it is, else
    3DIEBench; the loaders then name what is missing."""
    lists = [os.path.join(root, name) for name in LIST_FILES
             if os.path.isfile(os.path.join(root, name))]
    folders = [os.path.join(root, split) for split in ("train", "val")
               if os.path.isdir(os.path.join(root, split))]
    if lists and folders:
        raise DataError(f"{lists[0]}: a 3DIEBench list file in a root that has the ImageFolder "
                        f"split folder {folders[0]}: which data set {root} holds is ambiguous; "
                        "move one of them out")
    found = "3DIEBench" if lists else "ImageFolder" if folders else None
    if expected and found and found != expected:
        marker = "a 3DIEBench list file" if lists else "an ImageFolder split folder"
        raise DataError(f"{(lists or folders)[0]}: {marker}: {root} is a {found} root, not the "
                        f"{expected} root expected here")
    if found or expected:
        return found or expected
    if os.path.abspath(root) == os.path.abspath(DEFAULT_IMAGEFOLDER_ROOT):
        return "ImageFolder"
    return "3DIEBench"


def check_image(path, size=None):
    """None, or why `path` would fail a 3DIEBench run: the PIL loader cannot decode it, the JPEG
    markers that the --decode cpu/gpu paths demand are missing (a PNG renamed .jpg, say), or its
    size is not the set's (W, H)."""
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
            if im.format != "JPEG":
                what = f"{im.format} data under a .jpg name"
            else:
                what = "JPEG without its end marker"
        return f"{path}: {what}; sie.py --decode cpu/gpu read JPEG files only"
    if size and image.size != size:
        return (f"{path}: {image.size[0]}x{image.size[1]} pixels, "
                f"the set's images are {size[0]}x{size[1]}")
    return None


def image_size(path):
    """(W, H) from an image's header, or None if it cannot be read (the scan says why)."""
    try:
        with Image.open(path) as im:
            return im.size
    except OSError:
        return None


def scan_object(folder, views, size):
    """Every file of one object folder -> (its (views, 7) latents, or None if one is bad,
    [(kind, message)] of its problems)."""
    if not os.path.isdir(folder):
        return None, [("object folder", f"{folder}: listed object folder is missing")]
    found, latents = [], []
    present = views_in(folder)
    if present < 2:
        found.append(("object folder", too_few_views(folder, present)))
    for k in range(views):
        problem = check_image(image_file(folder, k), size)
        if problem:
            found.append(("image", problem))
        try:
            latents.append(load_latent(latent_file(folder, k)))
        except DataError as e:
            found.append(("latent", str(e)))
    if len(latents) != views:
        return None, found
    return np.stack(latents), found


def latent_table_problem(root, split, entries, views, per_object):
    """None, or what is wrong with all_latents_{split}.npy (if there is one): its shape, dtype or
    values, or rows that differ from the latent_k.npy files (per_object: scan_object's latents)."""
    path = os.path.join(root, f"all_latents_{split}.npy")
    if not os.path.exists(path):
        return None
    try:
        table = read_latent_table(path, entries, views)
    except DataError as e:
        return str(e)
    complete = all(lat is not None for lat in per_object)
    if complete and not np.array_equal(table, np.concatenate(per_object)):
        return (f"{path}: differs from the per-view latent_k.npy files (expected shape "
                f"({len(entries) * views}, 7), rows in list order)")
    return None


def check_3diebench(root, workers=None, progress=True):
    """check() of a 3DIEBench root."""
    problems = defaultdict(list)
    size = None                 # the first listed image's (W, H), which every image must have
    for split in ("train", "val"):
        try:
            entries, labels = read_split(root, split, check_folders=False, check_labels=False)
        except DataError as e:
            problems["list file"].append(str(e))
            continue
        problem = label_problem(os.path.join(root, f"{split}_labels.npy"), entries, labels)
        if problem:
            problems["label"].append(problem)
        first = object_dir(root, entries[0])          # the data set's views and size come from it
        views = (views_in(first) if os.path.isdir(first) else 0) or N_VIEWS
        size = size or image_size(image_file(first, 0))

        folders = [object_dir(root, entry) for entry in entries]
        scan = functools.partial(scan_object, views=views, size=size)
        results = parallel_map(scan, folders, f"check {split}", progress, workers)
        for _, found in results:
            for kind, message in found:
                problems[kind].append(message)
        problem = latent_table_problem(root, split, entries, views, [lat for lat, _ in results])
        if problem:
            problems["all_latents"].append(problem)
    return dict(problems)


def decode_problem(path):
    """None, or why load_image fails on `path`."""
    try:
        load_image(path)
    except DataError as e:
        return str(e)
    return None


def check_imagefolder(root, workers=None, progress=True):
    """check() of an ImageFolder root: both splits, their class folders (the same in val as in
    train, none empty) and every image decoded. Files that are not images (.DS_Store, README.txt)
    are ignored, as the ImageFolder dataset ignores them."""
    problems = defaultdict(list)
    classes = {}
    for split in ("train", "val"):
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            problems["split"].append(f"{folder}: missing split folder {expected_layout(folder)}")
            continue
        classes[split] = class_folders(folder)
        if not classes[split]:
            problems["split"].append(f"{folder}: no class folders {expected_layout(folder)}")
        files = []
        for wnid in classes[split]:
            images = image_files(os.path.join(folder, wnid))
            if not images:
                problems["class folder"].append(empty_class_folder(os.path.join(folder, wnid)))
            files += images
        decoded = parallel_map(decode_problem, files, f"check {split}", progress, workers)
        problems["image"] += [message for message in decoded if message]
    if len(classes) == 2 and classes["train"] != classes["val"]:
        train, val = os.path.join(root, "train"), os.path.join(root, "val")
        problems["classes"].append(class_mismatch(train, val, classes["train"], classes["val"]))
    return {kind: messages for kind, messages in problems.items() if messages}


# ====================================================== start-up validation (before the first step)
def preflight(root, kind="3DIEBench", workers=None):
    """Validate in seconds, before training starts, what a run reads only later (its evaluation)
    -> root, or a DataError naming the file. `python data.py check ROOT` is the full scan (every
    image decoded). kind: the layout the caller reads (a script's DATA_KIND); a root of the other
    layout, or of both, is refused (layout).
    kind="3DIEBench": both splits' list and label files, every listed folder; every object folder
    holds each view's image and latent file (>= 2 views: a training pair is two distinct views);
    every val image passes a header/trailer screen (screen_image: its first and last bytes, not a
    decode); the all_latents tables (shape, finite, LATENT_RANGES); train and val images of one
    size.
    kind="ImageFolder": train/ and val/ with the same class folders, none empty in val; every val
    image passes the same screen."""
    if kind not in ("3DIEBench", "ImageFolder"):
        raise ValueError(f"preflight: kind must be '3DIEBench' or 'ImageFolder', not {kind!r}")
    root = ensure(root, kind, generate=False)
    layout(root, kind)
    if kind == "ImageFolder":
        return preflight_imagefolder(root, workers)
    entries, views, first_image, size = {}, {}, {}, {}
    for split in ("train", "val"):
        # the list and labels (< NUM_CLASSES), and every listed folder exists
        entries[split], _ = read_split(root, split)
        views[split] = count_views(root, entries[split])
        first_image[split] = image_file(object_dir(root, entries[split][0]), 0)
        size[split] = load_image(first_image[split]).size
    if size["train"] != size["val"]:
        (train_width, train_height), (val_width, val_height) = size["train"], size["val"]
        raise DataError(f"{first_image['val']}: {val_width}x{val_height} pixels, but "
                        f"{first_image['train']} is {train_width}x{train_height}: "
                        "train and val images must have one size")

    def problem_in(job):                   # training draws any two views of every train object
        split, entry = job
        return object_problem(object_dir(root, entry), views[split], screen=split == "val")
    jobs = [(split, entry) for split in ("train", "val") for entry in entries[split]]
    bad = [m for m in parallel_map(problem_in, jobs, "preflight", False, workers) if m]
    if bad:
        more = f" (and {len(bad) - 1} more object folders)" if len(bad) > 1 else ""
        raise DataError(bad[0] + more)
    for split in ("train", "val"):
        path = os.path.join(root, f"all_latents_{split}.npy")
        if os.path.exists(path):               # absent: evaluation rebuilds it from latent_k.npy
            read_latent_table(path, entries[split], views[split])
    return root


def object_problem(folder, views, screen):
    """None, or preflight's first finding in one object folder: fewer than 2 views, one of the
    `views` image and latent files missing, or (screen=True) an image failing screen_image."""
    try:
        present = views_in(folder)
        missing = missing_view_files(folder, views)
    except OSError as e:
        return f"{folder}: unreadable object folder ({e.strerror})"
    if present < 2:
        return too_few_views(folder, present)
    if missing:
        return missing
    if screen:
        return next(filter(None, (screen_image(image_file(folder, k)) for k in range(views))),
                    None)
    return None


def missing_view_files(folder, views):
    """None, or a message naming the first of the `views` image and latent files missing there."""
    present = set(os.listdir(folder))
    missing = [name for k in range(views) for name in (f"image_{k}.jpg", f"latent_{k}.npy")
               if name not in present]
    if not missing:
        return None
    return f"{folder}: missing {missing[0]} ({len(missing)} of its {2 * views} view files)"


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def screen_image(path):
    """None, or why the image loader would fail on `path`. A cheap screen first, its first 8 and
    last 16 bytes: JPEG's start and end markers, or PNG's signature and closing IEND chunk (a
    truncated file has lost its end); only a file failing it is decoded in full, so that a file
    PIL reads anyway (another trailer) is not an error. A screen, not a proof: a file damaged in
    the middle passes it (`data.py check` decodes everything)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(max(0, os.fstat(f.fileno()).st_size - 16))
            tail = f.read()
    except OSError as e:
        return f"{path}: unreadable image ({e.strerror})"
    if jpeg_markers_ok(head, tail) or (head == PNG_SIGNATURE and b"IEND" in tail):
        return None
    return decode_problem(path)


def preflight_imagefolder(root, workers=None):
    """preflight() of an ImageFolder root."""
    train = os.path.join(ensure(root, "ImageFolder", generate=False), "train")
    if not os.path.isdir(train):
        raise DataError(f"{train}: missing split folder {expected_layout(train)}")
    val = ImageFolder(root, "val")        # val/ exists, its class folders are train's, none empty
    val_images = [path for path, _ in val.samples]
    bad = [m for m in parallel_map(screen_image, val_images, "preflight", False, workers) if m]
    if len(bad) > 1:
        raise DataError(bad[0] + f" (and {len(bad) - 1} more val images)")
    if bad:
        raise DataError(bad[0])
    return root


def check_batch(root, kind, batch_size):
    """A DataError unless the training split holds one global batch: one pair per object per
    step on 3DIEBench, images on an ImageFolder (whose loader drops a last, smaller batch)."""
    if kind == "ImageFolder":
        n_items, what = len(ImageFolder(root, "train").samples), "training images"
    else:
        n_items, what = len(read_split(root, "train", check_folders=False)[0]), "training objects"
    if batch_size > n_items:
        raise DataError(f"--batch-size {batch_size} is larger than the {n_items} {what} of "
                        f"{root} (one full batch is needed; lower --batch-size)")


# ===== generation tool: training never calls what follows, except through ensure() ===========
# A look-alike of 3DIEBench in its exact on-disk format, rendered here (the official data was
# rendered with BlenderProc by data/main.py of the SIE code), and an ImageFolder look-alike.

# ============================================================ renderer (the scene of 3DIEBench)
# A small batched triangle rasteriser in torch (z-buffer, perspective camera), used from the
# camera and from the spot light (for its shadow). Flat Lambert shading: a white sun from above,
# a coloured spot light, a floor; runs on any device. The scene's numbers are the official
# generator's (data/main.py).
CAM_DIST, CAM_POLAR, CAM_AZIM = 2.5, math.pi / 4, math.pi / 2   # a camera looking at the origin
FOCAL = 50 / 18                     # Blender's default 50 mm lens on a 36 mm sensor (39.6 deg)
FLOOR_Z, SPOT_RADIUS = -1.0, 4.0
SPOT_HALF_ANGLE, SPOT_BLEND = math.pi / 16, 0.15   # a spot size of pi/8 is Blender's full cone
AMBIENT, SUN, SPOT = 0.5, 0.55, 0.8                # light strengths: images average ~0.5
EMPTY = 2 ** 62                                    # the z-buffer's value where no triangle is


# Vectors are laid out (3, ...) so that dot products reduce over the first axis (fast on CPU).
def dot(a, b):
    return (a * b).sum(0, keepdim=True)


def look_at(pos, focal):
    """(3, B, 1) positions looking at the origin, z up -> a camera (pos, axes [right, up,
    forward], focal)."""
    forward = F.normalize(-pos, dim=0)
    z_up = pos.new_tensor([0.0, 0, 1])[:, None, None].expand_as(forward)
    right = F.normalize(torch.linalg.cross(forward, z_up, dim=0), dim=0)
    up = torch.linalg.cross(right, forward, dim=0)
    return pos, torch.stack([right, up, forward]), focal


def project(points, cam, H, W):
    """(3, B, N) world points -> (3, B, N) [x pixel, y pixel, depth]; pixel (i, j) has its centre
    at (j + 0.5, i + 0.5)."""
    pos, axes, focal = cam
    q = [dot(axis, points - pos)[0] for axis in axes]
    z = q[2].clamp(min=1e-6)
    return torch.stack([(q[0] / z * focal + 1) * W / 2, (1 - q[1] / z * focal) * H / 2, z])


def rows(a, index):
    """a[index] along the first axis (index_select: faster than indexing on CPU)."""
    return a.index_select(0, index)


def expand_counts(counts):
    """counts (n,) -> (owner, position): each i repeated counts[i] times, and alongside it
    0, 1, ..., counts[i] - 1 (as floats)."""
    owner = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    starts = counts.cumsum(0) - counts
    position = torch.arange(len(owner), device=counts.device) - rows(starts, owner)
    return owner, position.float()


def rasterize(tri, img, n_images, H, W):
    """A z-buffer. tri: (3 [x pixel, y pixel, depth], T, 3 corners) screen-space triangles, img:
    (T,) the image of each -> (ids (n_images, H, W): the nearest triangle covering each pixel
    centre, -1 for none; its depth there (n_images, H, W); its corners' perspective-correct
    barycentric weights there (n_images * H * W, 3)). The candidates are each row of a triangle's
    pixel box, and on it the span where its 3 edge functions are >= 0; a scatter-min on depth
    keeps the nearest."""
    device = tri.device
    low = (tri[:2].amin(2) - 0.5).ceil().clamp(min=0)        # (2 [x, y], T): the pixel box
    high = (tri[:2].amax(2) - 0.5).floor()
    high = torch.minimum(high, high.new_tensor([[W - 1], [H - 1]]))
    keep = (high >= low).all(0).nonzero()[:, 0]              # boxes holding a pixel centre
    x, y, z = tri.index_select(1, keep)                      # (T, 3 corners) each
    low_x, low_y = low.index_select(1, keep)
    high_x, high_y = high.index_select(1, keep)
    # Barycentric coordinates and 1/depth are affine in the pixel position: f = a x + b y + c,
    # with coefficients per triangle.
    x1, x2 = x.roll(-1, 1), x.roll(-2, 1)
    y1, y2 = y.roll(-1, 1), y.roll(-2, 1)
    c = x1 * y2 - x2 * y1
    area = c.sum(1, keepdim=True)                                    # twice the signed area
    bary = torch.stack([y1 - y2, x2 - x1, c], -1) / area[..., None]  # (T, 3 corners, 3 coefs)
    inverse_depth = (bary / z[..., None]).sum(1, keepdim=True)       # (T, 1, 3 coefs)
    plane = torch.cat([bary, inverse_depth], 1)                      # (T, 4, 3 coefs)
    # Candidate rows: every row of a triangle's box (none for a degenerate triangle).
    row_counts = ((high_y - low_y + 1) * (area[:, 0].abs() > 1e-9)).long()
    t, row = expand_counts(row_counts)
    cy = rows(low_y, t) + row
    coefs = rows(bary, t)                                            # (rows, 3 corners, 3 coefs)
    # On each row, each edge function a x + (b y + c) >= 0 bounds x from one side.
    a = coefs[..., 0].where(coefs[..., 0] != 0, 1e-20)
    bound = -(coefs[..., 1] * (cy + 0.5)[:, None] + coefs[..., 2]) / a
    lower = torch.where(a > 0, bound, -torch.inf).amax(1)
    upper = torch.where(a < 0, bound, torch.inf).amin(1)
    x_first = torch.maximum((lower - 0.5 - 1e-3).ceil(), rows(low_x, t))
    x_last = torch.minimum((upper - 0.5 + 1e-3).floor(), rows(high_x, t))
    r, offset = expand_counts((x_last - x_first + 1).clamp(min=0).long())
    t = rows(t, r)                                   # candidate pixel (cx, cy) of triangle t
    cx = rows(x_first, r) + offset
    cy = rows(cy, r)
    p = rows(plane, t)
    # the 3 barycentric coordinates and 1/depth at each candidate: (K, 4)
    values = p[..., 0] * (cx + 0.5)[:, None] + p[..., 1] * (cy + 0.5)[:, None] + p[..., 2]
    inside = (values[:, :3].amin(1) >= 0).nonzero()[:, 0]            # the pixel centre is inside
    values = rows(values, inside)
    t = rows(t, inside)
    triangle = rows(keep, t)                                         # the caller's index
    # The nearest: a scatter-min on a key that orders by depth, then by triangle.
    key = (1 / values[:, 3] / 16 * 2 ** 30).long().clamp(0, 2 ** 30) * 2 ** 32 + triangle
    pix = (rows(img, triangle) * H + rows(cy, inside).long()) * W + rows(cx, inside).long()
    zbuf = torch.full((n_images * H * W,), EMPTY, dtype=torch.long, device=device)
    zbuf.scatter_reduce_(0, pix, key, "amin")
    win = (rows(zbuf, pix) == key).nonzero()[:, 0]                   # each pixel's nearest
    perspective = values[:, :3] / rows(z, t) / values[:, 3:]         # lambda_k / z_k / (1 / z)
    weights = torch.zeros(n_images * H * W, 3, device=device)
    weights = weights.index_copy_(0, rows(pix, win), rows(perspective, win))
    empty = zbuf == EMPTY
    ids = torch.where(empty, -1, zbuf % 2 ** 32).view(n_images, H, W)
    depth = torch.where(empty, torch.inf, (zbuf // 2 ** 32) * (16 / 2 ** 30))
    return ids, depth.view(n_images, H, W), weights


def face_normals(verts, faces):
    """verts (V, 3), faces (F, 3) -> unit normals (F, 3), by the corners' order."""
    t = verts[faces]                                                 # (F, 3 corners, 3)
    return F.normalize(torch.linalg.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]), dim=1)


def hsv_to_rgb(h, s, v):
    """Tensors or numbers (broadcastable) -> (..., 3) RGB in [0, 1], on the device of the tensor
    arguments (a number made a CPU tensor would not broadcast against a CUDA one)."""
    device = next((a.device for a in (h, s, v) if torch.is_tensor(a)), None)
    h, s, v = (torch.as_tensor(a, dtype=torch.float32, device=device) for a in (h, s, v))
    h, s, v = torch.broadcast_tensors(h, s, v)
    k = (h.new_tensor([5.0, 3.0, 1.0]) + h[..., None] * 6) % 6
    return v[..., None] - (v * s)[..., None] * torch.minimum(k, 4 - k).clamp(0, 1)


def render(verts, faces, look, latents, size, ss=2, alpha=False, zoom=1.0):
    """Render one mesh under B latent rows in the 3DIEBench scene. verts (V, 3) centred on the
    origin, faces (F, 3) long, look the albedo: (F, 3) colours or read_obj's (uv, material,
    atlas); latents (B, 7) -> (B, 3, size, size) RGB in [0, 1] (with alpha=True a 4th channel:
    the object's coverage), rendered at ss x the size and box-filtered (antialiasing). zoom
    multiplies the lens's focal length."""
    device, B, H, n_faces = verts.device, len(latents), size * ss, len(faces)
    faces = faces.to(device)                  # everything on verts' device (look, latents: below)
    if B > 1 and B * H * H > 2 ** 20:                        # bound the memory: views in chunks
        chunks = np.array_split(latents, 2)
        return torch.cat([render(verts, faces, look, lat, size, ss, alpha, zoom) for lat in chunks])
    if not isinstance(look, tuple):           # (F, 3) colours: one 1 x 1 tile per face
        look = (look.new_zeros(n_faces, 3, 2), torch.arange(n_faces), look[..., None, None])
    uv, material, atlas = (x.to(device) for x in look)
    lat = torch.as_tensor(latents, dtype=torch.float32).to(device)
    R = euler_xyz_to_matrix(lat[:, :3])                                    # (B, 3, 3)
    world = (verts @ R.transpose(-1, -2)).permute(2, 0, 1)                 # (3, B, V): R v
    cam_dir = (math.sin(CAM_POLAR) * math.cos(CAM_AZIM), math.sin(CAM_POLAR) * math.sin(CAM_AZIM),
               math.cos(CAM_POLAR))
    cam = look_at(CAM_DIST * lat.new_tensor(cam_dir)[:, None, None].expand(3, B, 1), FOCAL * zoom)
    cam_pos, cam_axes, cam_focal = cam
    theta, phi = lat[:, 4], lat[:, 5]                                     # the spot light's place
    spot = torch.stack([theta.sin() * phi.cos(), theta.sin() * phi.sin(), theta.cos()])
    spot = SPOT_RADIUS * spot[..., None]                                  # (3, B, 1)
    light_cam = look_at(spot, 1 / (1.25 * math.tan(SPOT_HALF_ANGLE)))     # sees the whole cone
    light_focal = light_cam[2]
    img = torch.arange(B, device=device).repeat_interleave(n_faces)

    def corners(points):                                   # (3, B, V) -> (3, B * F, 3 corners)
        return points.index_select(2, faces.flatten()).view(3, B * n_faces, 3)
    ids, _, bary = rasterize(corners(project(world, cam, H, H)), img, B, H, H)
    S = H // 2                                                            # shadow map resolution
    shadow_depth = rasterize(corners(project(world, light_cam, S, S)), img, B, S, S)[1]
    # The plane each pixel sees: the floor (z = -1) or a face (its unit normal and offset n.x,
    # made on the mesh, then rotated).
    v = verts[faces]                                                      # (F, 3 corners, 3)
    hit = ids.flatten().clamp(min=0)                                      # triangle per pixel
    seen = (ids >= 0).view(1, B, -1)
    n = face_normals(verts, faces)                                        # (F, 3)
    normal = (R @ n.T).transpose(0, 1).flatten(1)[:, hit].view(3, B, -1)  # (3, B, H*H)
    normal = torch.where(seen, normal, lat.new_tensor([0, 0, 1.0])[:, None, None])
    offset = torch.where(seen, (n * v[:, 0]).sum(1)[hit % n_faces].view(1, B, -1), FLOOR_Z)
    # The camera ray through each pixel centre meets that plane at p.
    centres = torch.arange(H, device=device) + 0.5
    jj, ii = torch.meshgrid(centres, centres, indexing="xy")
    ray_in_camera = [(2 * jj / H - 1).flatten() / cam_focal, (1 - 2 * ii / H).flatten() / cam_focal,
                     torch.ones(H * H, device=device)]
    ray = sum(a * axis[:, 0] for a, axis in zip(ray_in_camera, cam_axes))
    ray = F.normalize(ray, dim=0)[:, None]                                # (3, 1, H*H)
    along = dot(ray, normal)
    along_safe = torch.where(along.abs() < 1e-6, 1e-6, along)
    p = cam_pos + (offset - dot(normal, cam_pos)) / along_safe * ray
    normal = torch.where(along > 0, -normal, normal)         # two-sided faces: face the camera
    # Albedo: the floor's HSV(floor_hue, 0.6, 0.6), else the face's material tile at its
    # barycentric uv (nearest texel, the texture tiled).
    st = (bary[:, :, None] * uv[hit % n_faces]).sum(1)                   # (B*H*H, 2)
    T = atlas.shape[-1]
    col, row = (torch.stack([st[:, 0], 1 - st[:, 1]]) % 1 * T).long().clamp(max=T - 1)
    texel = (material[hit % n_faces] * T + row) * T + col
    surface = atlas.transpose(0, 1).flatten(1)[:, texel].view(3, B, -1)
    floor = hsv_to_rgb(lat[:, 3], 0.6, 0.6).T[..., None]
    albedo = torch.where(seen, surface, floor)
    # The spot light: Blender's smoothstep cone edge, 1/d^2 falloff, HSV(spot_hue, 1, 0.8), and a
    # shadow map (its bias: a few pixels).
    to_light = spot - p
    dist = dot(to_light, to_light).sqrt()
    cos_half = math.cos(SPOT_HALF_ANGLE)
    x = ((dot(to_light, spot) / (dist * SPOT_RADIUS) - cos_half)
         / ((1 - cos_half) * SPOT_BLEND)).clamp(0, 1)
    u, w, z = project(p, light_cam, S, S)
    shadow_pixel = w.long().clamp(0, S - 1) * S + u.long().clamp(0, S - 1)
    depth = shadow_depth.flatten(1).gather(1, shadow_pixel)
    lit = z <= depth + 4 * z / (light_focal * S) + 1e-3
    spot_light = x * x * (3 - 2 * x) * lit * dot(normal, to_light).clamp(min=0) * 16 / dist ** 3
    spot_rgb = hsv_to_rgb(lat[:, 6], 1.0, 0.8).T[..., None]              # (3, B, 1)
    light = AMBIENT + SUN * normal[2:].clamp(min=0) + SPOT * spot_rgb * spot_light
    out = (albedo * light).clamp(0, 1)
    if alpha:
        out = torch.cat([out, seen.float()])
    out = out.view(-1, B, H, H).transpose(0, 1)
    return F.avg_pool2d(out, ss) if ss > 1 else out


# ==================================================================== procedural shape families
def lathe(profile, n, closed=False):
    """A surface of revolution about z: profile (P, 2) of (radius, z) points, n segments -> verts
    (P*n, 3), faces. A radius of 0 closes an end; closed=True joins the last profile point to the
    first (a torus)."""
    a = torch.arange(n) * 2 * math.pi / n + math.pi / n
    prof = torch.as_tensor(profile, dtype=torch.float32)
    ring = [prof[:, :1] * a.cos(), prof[:, :1] * a.sin(), prof[:, 1:].expand(-1, n)]
    verts = torch.stack(ring, -1).flatten(0, 1)
    P = len(prof)
    i = torch.arange(P if closed else P - 1)[:, None] * n
    j = torch.arange(n)[None]
    q = [i + j, i + (j + 1) % n, (i + n) % (P * n) + (j + 1) % n, (i + n) % (P * n) + j]
    quads = [torch.stack([q[0], q[1], q[2]], -1), torch.stack([q[0], q[2], q[3]], -1)]
    return verts, torch.cat(quads).flatten(0, 1)


def unit_mesh(kind):
    """A primitive in [-1, 1]^3 -> (verts (V, 3), faces (F, 3))."""
    s = torch.linspace(0, math.pi, 7)                   # the sphere's profile: polar angles
    t = torch.arange(8) * 2 * math.pi / 8               # the torus's: angles around its tube
    if kind == "box":
        return lathe([[0, -1], [1.41, -1], [1.41, 1], [0, 1]], 4)
    if kind == "prism":
        return lathe([[0, -1], [1, -1], [1, 1], [0, 1]], 3)
    if kind == "cylinder":
        return lathe([[0, -1], [1, -1], [1, 1], [0, 1]], 12)
    if kind == "cone":
        return lathe([[0, -1], [1, -1], [0, 1]], 12)
    if kind == "sphere":
        return lathe(torch.stack([s.sin(), -s.cos()], 1), 12)
    if kind == "torus":
        return lathe(torch.stack([0.7 + 0.3 * t.cos(), 0.3 * t.sin()], 1), 12, closed=True)
    raise KeyError(kind)


PRIMITIVES = ("box", "cylinder", "cone", "sphere", "prism", "torus")


def class_recipe(c):
    """The shape family of class c (independent of the seed, so every generated set shares its
    classes): a body and 2-4 parts attached at random points of its surface, as a list of (kind,
    scale (3,), euler (3,), position (3,), optional). Random attachment points make the families
    asymmetric, so that a pose can be recovered."""
    rng = np.random.default_rng([20230210, c])
    body = (PRIMITIVES[rng.integers(len(PRIMITIVES))], rng.uniform(0.3, 0.6, 3),
            rng.uniform(-0.4, 0.4, 3), np.zeros(3), False)
    parts = [body]
    for _ in range(rng.integers(2, 5)):
        u = rng.normal(size=3)
        scale = rng.uniform(0.1, 0.28, 3)
        stretched = rng.integers(3)
        scale[stretched] *= rng.uniform(1, 2.2)             # often stick-like: legs, handles, wings
        kind = PRIMITIVES[rng.integers(len(PRIMITIVES))]
        euler = rng.uniform(-math.pi, math.pi, 3)
        on_body = body[1] * u / np.linalg.norm(u)
        parts.append((kind, scale, euler, on_body, rng.random() < 0.3))
    return parts


AXIS_COLOURS = torch.tensor([[.9, .2, .2], [.2, .8, .8], [.2, .8, .2], [.8, .2, .8], [.2, .3, .9],
                             [.9, .8, .2]])   # +x -x +y -y +z -z


def float32_tensor(a):
    return torch.tensor(a, dtype=torch.float32)


def object_mesh(c, rng, paint="palette"):
    """One object of class c: its family's parts with per-object jitter of size, placement and
    pose, optional parts dropped half the time, two random colours (colour says nothing about the
    class), centred and scaled (centre_and_scale). paint="axes" instead colours every face by its
    normal in the object's frame (AXIS_COLOURS): the colours seen then tell the pose, as a texture
    would. -> verts (V, 3), faces (F, 3), colors (F, 3)."""
    hue = torch.tensor(rng.uniform(0, 1, 2))
    saturation = torch.tensor(rng.uniform(0.1, 0.7, 2))
    value = torch.tensor(rng.uniform(0.5, 0.95, 2))
    palette = hsv_to_rgb(hue, saturation, value).float()
    verts, faces, colors = [], [], []
    for kind, scale, euler, pos, optional in class_recipe(c):
        size = float32_tensor(scale * rng.uniform(0.8, 1.25, 3))
        angles = float32_tensor(euler + rng.normal(0, 0.12, 3))
        shift = float32_tensor(pos + rng.normal(0, 0.04, 3))
        dropped = optional and rng.random() < 0.5
        color = palette[rng.integers(2)]
        if dropped:
            continue
        v, f = unit_mesh(kind)
        faces.append(f + sum(len(part) for part in verts))
        verts.append((v * size) @ euler_xyz_to_matrix(angles).T + shift)
        colors.append(color.expand(len(f), 3))
    verts = centre_and_scale(torch.cat(verts))
    faces = torch.cat(faces)
    colors = torch.cat(colors)
    if paint == "axes":
        colors = axis_paint(verts, faces)
    return verts, faces, colors


def axis_paint(verts, faces):
    """Every face coloured by its normal in the object's frame, one AXIS_COLOURS entry per
    +-axis -> colors (F, 3)."""
    n = face_normals(verts, faces)
    axis = n.abs().argmax(1)
    negative = (n.gather(1, axis[:, None])[:, 0] < 0).long()
    return AXIS_COLOURS[2 * axis + negative]


def painted_by_axes(mesh):
    """A mesh function's model with its materials replaced by axis_paint (--meshes --paint axes:
    the real shapes, with the toy set's pose cue)."""
    verts, faces, _ = mesh()
    return verts, faces, axis_paint(verts, faces)


def centre_and_scale(v):
    """Centre the bounding box on the origin and scale it to a unit diagonal: ShapeNet's
    normalisation of its models."""
    v = v - (v.amin(0) + v.amax(0)) / 2
    return v / (v.amax(0) - v.amin(0)).norm()


def procedural_mesh(c, o, seed, paint):
    """Object o of class c of a generated set: object_mesh with its own seeded generator."""
    return object_mesh(c, np.random.default_rng([seed, c, o, 0]), paint)


# ============================================================== real meshes: OBJ + MTL files
def obj_lines(file):
    """The (keyword, arguments) of each non-empty line of an OBJ or MTL file."""
    with open(file, encoding="latin-1") as f:
        for words in map(str.split, f):
            if words:
                yield words[0], words[1:]


def obj_index(i, n):
    """An OBJ index -> 0-based: OBJ counts from 1, a negative index counts back from the last of
    the n so far, and 0 (absent) becomes -1."""
    if i > 0:
        return i - 1
    if i:
        return n + i
    return -1


def obj_corner(corner, n_verts, n_texcoords):
    """One face corner, 'v', 'v/vt', 'v//vn' or 'v/vt/vn' -> [vertex index, texcoord index]."""
    fields = (corner + "//").split("/")
    return [obj_index(int(fields[0] or 0), n_verts), obj_index(int(fields[1] or 0), n_texcoords)]


def inside(path, folder):
    """Whether `path` resolves (symbolic links followed) to a file within `folder`."""
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, top]) == top


def read_obj(path, tile=128, fallbacks=None, model_folder=None):
    """A minimal OBJ reader: v, vt, f (polygons fan-triangulated; v, v/vt, v//vn, v/vt/vn;
    negative = relative), usemtl, mtllib (Kd, map_Kd; a texture replaces Kd, as in Blender's
    importer); y-up -> z-up as (x, -z, y), Blender's import axes. -> (verts (V, 3) centred and
    scaled, faces (F, 3), (uv (F, 3, 2), material (F,), atlas (M, 3, T, T))), one atlas tile per
    material: its texture resized, or its colour. An unreadable OBJ, or one without faces: a
    DataError. A texture file missing or unreadable (Sweet Home 3D models name some, such as
    f:/images/..., that the package does not ship) leaves its material's colour Kd; a missing MTL
    file, grey (0.8) for every material; (path, the missing file, "missing or unreadable") is then
    appended to the list `fallbacks`. An MTL or texture path that resolves outside model_folder
    (default: the OBJ's folder; ShapeNet's models/model_normalized.obj names ../images/) is not
    read, whatever is there (`mtllib ../../x.mtl`, `map_Kd /etc/...`): rendered the same way, with
    "outside the model's folder (refused)" in `fallbacks`."""
    folder = os.path.dirname(path)           # texture and MTL paths are relative to the OBJ's
    model_folder = model_folder or folder

    def refused(file):                       # outside the model: as if missing, and said so
        if inside(file, model_folder):
            return False
        if fallbacks is not None:
            fallbacks.append((path, file, "outside the model's folder (refused)"))
        return True
    verts, texcoords, triangles = [], [], []     # triangles: (v0, t0, v1, t1, v2, t2, material)
    materials = {"": 0}                          # material name -> index (its atlas tile)
    colours, textures = {}, {}                   # material name -> Kd / map_Kd arguments
    name, current = "", 0                        # the MTL's current newmtl, the OBJ's usemtl
    try:
        for key, words in obj_lines(path):
            if key == "f":
                c = [obj_corner(corner, len(verts), len(texcoords)) for corner in words]
                triangles += [(*c[0], *c[k], *c[k + 1], current) for k in range(1, len(c) - 1)]
            elif key == "v":
                verts.append([float(x) for x in words[:3]])
            elif key == "vt":
                texcoords.append([float(x) for x in words[:2]])
            elif key == "usemtl":
                current = materials.setdefault(" ".join(words), len(materials))
            elif key == "mtllib":
                library = os.path.join(folder, " ".join(words))
                try:
                    definitions = [] if refused(library) else list(obj_lines(library))
                except OSError:             # missing: every material grey, as without a Kd
                    definitions = []
                    if fallbacks is not None:
                        fallbacks.append((path, library, "missing or unreadable"))
                for k, args in definitions:
                    if k == "newmtl":
                        name = " ".join(args)
                    elif k == "Kd":
                        colours[name] = args
                    elif k == "map_Kd":
                        textures[name] = args
        t = torch.tensor(triangles, dtype=torch.long).view(-1, 7)
        T = tile if textures else 1
        y_up = torch.tensor(verts).view(-1, 3)
        v = centre_and_scale(y_up[:, [0, 2, 1]] * torch.tensor([1.0, -1, 1]))
        corners = t[:, 0:6:2]
        if (not len(t) or not torch.isfinite(v).all() or corners.min() < 0
                or corners.max() >= len(verts)):
            raise ValueError("no faces, a non-finite vertex or a face index out of range")
        uv = torch.tensor(texcoords + [[0.0, 0.0]])[t[:, 1:6:2]]     # absent (-1): (0, 0)

        def albedo(material):                                        # its (3, T, T) tile
            if material in textures:
                file = os.path.join(folder, " ".join(textures[material]).replace("\\", "/"))
                try:
                    if not refused(file):
                        with Image.open(file) as im:
                            pixels = np.array(im.convert("RGB").resize((T, T)))
                            return torch.tensor(pixels).permute(2, 0, 1) / 255
                except (OSError, Image.DecompressionBombError):
                    if fallbacks is not None:
                        fallbacks.append((path, file, "missing or unreadable"))
            kd = [float(x) for x in colours.get(material, [0.8] * 3)[:3]]
            return torch.tensor(kd).view(3, 1, 1).expand(3, T, T)
        atlas = torch.stack([albedo(material) for material in materials])
    except (OSError, ValueError, IndexError, RuntimeError) as e:
        raise DataError(f"{path}: unreadable mesh ({e})") from None
    return v, corners, (uv, t[:, 6], atlas)


# The 11 classes sorted out of Sweet Home 3D's furniture catalogue: (class, a pattern searched in
# the catalogue's "category/name", lower case); the first match wins.
SH3D_CLASSES = [
    ("person", r"^characters/.*\b(male|female|boy|girl|mannequin)\b"),
    ("vehicle", r"^vehicles/"),
    ("window", r"\bwindow\b(?! (blind|shutter))"),
    ("door", r"\bdoor\b(?! cabinet)"),
    ("sofa", r"\bsofa|couch"),
    ("cabinet", r"cabinet|cupboard|wardrobe|dresser|drawers|bookcase|shelves|"
                r"\bchest\b(?! freezer)"),
    ("bed", r"\bbed\b|\bcrib\b|futon"),
    ("chair", r"(?<!wheel)chair|\bstool\b|\bseat\b"),
    ("lamp", r"lamp|\blight\b|lantern"),
    ("table", r"(?<!pool )(?<!football )\btable\b(?! fan| tennis)|\bdesk\b"),
    ("plant", r"plant|\btree|flower|cactus|bamboo|bonsai|ficus|palm|pine|orchid|tulip|lily|yucca|"
              r"spathiphyllum|hedge|bush|acacia|maple|beech|cypress|poplar|blossom"),
]
CATALOGUE_LINE = re.compile(r"^(\w+)#(\d+)\s*[=:]\s*(.*?)\s*$", re.M)   # key#index = value


def import_sweethome3d(unpacked, out):
    """Sort the models of the Sweet Home 3D libraries under `unpacked` (*.sh3f zips, e.g. Debian's
    package after dpkg -x) into out/<class>/<catalogue id>/ (OBJ, MTL, textures) by their
    catalogue category/name; the others are left out."""
    counts = defaultdict(int)
    with staged(out) as tmp:
        libraries = sorted(glob.glob(os.path.join(unpacked, "**", "*.sh3f"), recursive=True))
        for library in libraries:
            with zipfile.ZipFile(library) as z:
                text = z.read("PluginFurnitureCatalog.properties").decode("latin-1")
                catalogue = defaultdict(dict)                 # index -> {key: value}
                for key, i, value in CATALOGUE_LINE.findall(text):
                    catalogue[i][key] = value
                for entry in catalogue.values():
                    name = f"{entry.get('category')}/{entry.get('name')}".lower()
                    label = next((c for c, pattern in SH3D_CLASSES if re.search(pattern, name)),
                                 None)
                    if label is None or "model" not in entry:
                        continue
                    model = entry["model"].strip("/")
                    dest = os.path.join(tmp, label, re.sub(r"[^\w-]+", "-", entry["id"]))
                    model_folder = os.path.dirname(model) + "/"
                    z.extractall(dest, [m for m in z.namelist() if m.startswith(model_folder)])
                    counts[label] += 1
        if not counts:
            raise DataError(f"{unpacked}: no Sweet Home 3D library (*.sh3f) with such models "
                            "(unpacked with dpkg -x?)")
    by_count = sorted(((n, c) for c, n in counts.items()), reverse=True)
    print(f"{out}: {sum(counts.values())} models:", ", ".join(f"{c} {n}" for n, c in by_count))
    return out


# ============================================================ generator (the exact layout)
# The 55 real ShapeNetCore synset ids, sorted (a label is a position in this list), borrowed by
# the generator.
REAL_SYNSETS = """
02691156 02747177 02773838 02801938 02808440 02818832 02828884 02843684 02871439 02876657 02880940
02924116 02933112 02942699 02946921 02954340 02958343 02992529 03001627 03046257 03085013 03207941
03211117 03261776 03325088 03337140 03467517 03513137 03593526 03624134 03636649 03642806 03691459
03710193 03759954 03761084 03790512 03797390 03928116 03938244 03948459 03991062 04004475 04074963
04090263 04099429 04225987 04256520 04330267 04379243 04401088 04460130 04468005 04530566 04554684
""".split()
# Object-id lengths in the real val list, 29-32 hex characters, and their frequencies.
ID_LENGTHS, ID_LENGTH_P = (32, 31, 30, 29), (0.8824, 0.1082, 0.0088, 0.0006)
HEX_DIGITS = list("0123456789abcdef")


def sample_latents(rng, views, ood=False):
    """(views, 7) float64, drawn per view in the official generator's order (data/main.py): floor
    hue, spot theta, spot phi, spot hue, then 3 angles U(-pi/2, pi/2); ood=True: |angle| in
    [pi/2, pi] instead, as in the 3DIEBench-OOD set of seq-JEPA (arXiv 2505.03176)."""
    out = np.empty((views, 7))
    for k in range(views):
        hue = rng.uniform(0, 1)
        theta = rng.uniform(0, math.pi / 4)
        phi = rng.uniform(0, 2 * math.pi)
        spot_hue = rng.uniform(0, 1)
        angles = rng.uniform(-math.pi / 2, math.pi / 2, 3)
        if ood:
            angles = np.sign(angles) * (math.pi / 2 + np.abs(angles))
        out[k] = [*angles, hue, theta, phi, spot_hue]
    return out


def write_object(folder, images, latents):
    """JPEG quality 95 (OpenCV's default) and float64 latents. The official generator passed an
    RGB array to cv2.imwrite, which expects BGR, so the stored JPEGs have R and B swapped
    (data/main.py): kept here, so that the hues relate to the pixels as in the real data."""
    os.makedirs(folder)
    bgr = images.flip(1)
    pixels = (bgr * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for k, (im, lat) in enumerate(zip(pixels, latents)):
        Image.fromarray(im).save(image_file(folder, k), quality=95)
        np.save(latent_file(folder, k), lat.astype(np.float64))


def first_obj_file(model):
    """A model's OBJ file: the model itself (x.obj), or the first OBJ found in its folder (a
    folder without one is returned as it is, and fails to read)."""
    found = sorted(glob.glob(os.path.join(model, "**", "*.obj"), recursive=True))
    return found[0] if found else model


def check_counts(**flags):
    """A DataError naming the first flag (its name with dashes) whose value is below its least
    sensible value: 0 for seed, 1 for the others (sizes, counts)."""
    for name, value in flags.items():
        least = 0 if name == "seed" else 1
        if value < least:
            raise DataError(f"--{name.replace('_', '-')} {value}: must be at least {least}")


def check_device(device):
    """A DataError naming --device unless torch can allocate on it (`cuda` on a machine without
    CUDA, a misspelt name)."""
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, NotImplementedError, ValueError) as e:
        reason = str(e).strip().splitlines()[0].split(". ")[0]
        raise DataError(f"--device {device}: not usable on this machine ({reason})") from None


def make_3diebench(out, classes=55, objects_per_class=6, views=50, size=64, seed=0, ood=False,
                   device="cpu", progress=True, meshes=None, zoom=1.0, paint="palette"):
    """Write a procedural look-alike in the exact 3DIEBench layout, deterministic for a seed: the
    first `classes` of the 55 real synset ids, random object ids, class c from shape family c;
    ood=True: the same objects at OOD angles. meshes=DIR: render DIR/<class>/<model>[.obj]
    meshes instead (ShapeNetCore v2: a 3DIEBench re-render, the ids kept), with their own
    materials, or paint="axes" by axis_paint."""
    check_counts(size=size, seed=seed)
    if not (math.isfinite(zoom) and zoom > 0):      # 0: a zero focal length; nan: black images
        raise DataError(f"--zoom {zoom:g}: must be a positive number (the real data's lens: 1)")
    check_device(device)
    if meshes:
        return make_3diebench_from_meshes(out, meshes, views, size, seed, ood, device, progress,
                                          zoom, paint)
    if objects_per_class < 2:
        raise DataError(f"--objects-per-class {objects_per_class}: make-3diebench needs at least "
                        "2 (train and val)")
    if not 1 <= classes <= NUM_CLASSES:
        raise DataError(f"--classes {classes}: 3DIEBench has {NUM_CLASSES} classes "
                        f"(1 to {NUM_CLASSES})")
    rng = np.random.default_rng(seed)
    ids = []                      # distinct hex ids, their lengths in the real data's proportions
    while len(ids) < classes * objects_per_class:
        length = rng.choice(ID_LENGTHS, p=ID_LENGTH_P)
        new = "".join(rng.choice(HEX_DIGITS, length))
        if new not in ids:
            ids.append(new)
    objects = []
    for c in range(classes):
        for o in range(objects_per_class):
            mesh = functools.partial(procedural_mesh, c, o, seed, paint)
            objects.append((REAL_SYNSETS[c], ids[len(objects)], mesh))
    return write_3diebench(out, objects, views, size, seed, ood, device, progress, zoom)


def make_3diebench_from_meshes(out, meshes, views, size, seed, ood, device, progress, zoom,
                               paint="palette"):
    """make_3diebench(meshes=DIR): DIR/<class>/<model>.obj or DIR/<class>/<model>/**/*.obj;
    paint="axes": axis_paint instead of the models' materials."""
    models = sorted(glob.glob(os.path.join(meshes, "*", "*.obj"))
                    + glob.glob(os.path.join(meshes, "*", "*", "")))
    if not models:
        raise DataError(f"{meshes}: no meshes (expected {meshes}/<class>/<model>.obj or "
                        "<class>/<model>/*.obj)")
    class_dirs = {os.path.dirname(m.rstrip(os.sep)) for m in models}
    if len(class_dirs) > NUM_CLASSES:
        raise DataError(f"{meshes}: {len(class_dirs)} class folders; 3DIEBench has "
                        f"{NUM_CLASSES} classes at most")
    fallbacks = []            # (OBJ, texture or MTL, why) rendered with a colour instead
    objects = []
    for model in models:
        synset, obj_id = re.sub(r"\.obj$", "", model.rstrip(os.sep)).split(os.sep)[-2:]
        # a model folder's files may name each other across its subfolders (ShapeNet v2:
        # models/model_normalized.mtl names ../images/texture0.jpg), never outside it
        model_folder = model if os.path.isdir(model) else None
        mesh = functools.partial(read_obj, first_obj_file(model), fallbacks=fallbacks,
                                 model_folder=model_folder)
        if paint == "axes":
            mesh = functools.partial(painted_by_axes, mesh)
        objects.append((synset, obj_id, mesh))
    write_3diebench(out, objects, views, size, seed, ood, device, progress, zoom, source=meshes)
    # one line for the whole import per reason; the paths in check's style
    for why in ("missing or unreadable", "outside the model's folder (refused)"):
        found = sorted((obj, file) for obj, file, reason in fallbacks if reason == why)
        if found:
            n_meshes = len({obj for obj, _ in found})
            print(f"{n_meshes} of {len(models)} meshes: a texture or MTL file {why}, rendered "
                  "with their material's diffuse colour (Kd; grey without the MTL) instead; "
                  f"first: {found[0][0]} ({found[0][1]})", file=sys.stderr)
    return out


@contextlib.contextmanager
def staged(out):
    """Write into a private OUT.partial-HOST-PID folder, renamed to OUT at the end; an exception or
    Ctrl-C removes it: never a half-written OUT. Private, so that processes writing the same OUT
    at once (every rank of a torchrun generating the default set) leave each other's files alone:
    the first to finish wins, the others discard theirs (the generators write the same files for
    the same arguments). Folders left by killed processes of this host are removed. An OSError
    (a read-only folder, a full disk) becomes a DataError naming OUT."""
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
        reason = f"{e.strerror}: {e.filename}"
        raise DataError(f"{out}: cannot create the output folder ({reason})") from None
    try:
        yield tmp
        with contextlib.suppress(OSError):
            os.rmdir(out)                                   # an empty OUT: os.replace needs it gone
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
    """Whether `pid` (a string, from a staged folder's name) is a running process of this host;
    when unsure, True."""
    if os.name != "posix" or not pid.isdigit():     # (os.kill(pid, 0) would end it on Windows)
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):                 # e.g. another user's process
        return True
    return True


def val_members(labels, n_classes):
    """(objects,) bool: ~20 % of each class's objects go to val (at least one of a class of 2)."""
    in_val = np.zeros(len(labels), bool)
    for c in range(n_classes):
        members = np.flatnonzero(labels == c)
        n_val = round(0.2 * len(members))
        if n_val == 0 and len(members) > 1:
            n_val = 1
        in_val[members[:n_val]] = True
    return in_val


def write_3diebench(out, objects, views=50, size=64, seed=0, ood=False, device="cpu", progress=True,
                    zoom=1.0, source="make-3diebench"):
    """The writer behind every generator. objects: [(synset, obj_id, mesh_fn)], mesh_fn() ->
    render's (verts, faces, look), rendered on all cores; one that fails to load (DataError) is
    skipped. Label = the position of the synset among those written; ~20 % of each class's
    objects go to val; the lists are shuffled, like the real ones. source: what the objects come
    from, for the messages (the mesh folder)."""
    if views < 2:
        raise DataError(f"--views {views}: make-3diebench needs at least 2 (training pairs are "
                        "distinct views)")
    latents = [sample_latents(np.random.default_rng([seed, i, 1 + ood]), views, ood)
               for i in range(len(objects))]
    start = time.time()
    with staged(out) as tmp:
        def render_object(i):                              # -> None, or why it is skipped
            synset, obj_id, mesh = objects[i]
            try:
                verts, faces, look = mesh()
            except DataError as e:
                return str(e)
            images = render(verts.to(device), faces.to(device), look, latents[i], size, zoom=zoom)
            write_object(os.path.join(tmp, synset, obj_id), images, latents[i])
            return None
        errors = parallel_map(render_object, range(len(objects)), "render", progress)
        print(*(f"skipped {e}\n" for e in errors if e), sep="", end="", file=sys.stderr)
        synsets = sorted({o[0] for o, e in zip(objects, errors) if not e})
        if not synsets:
            raise DataError(f"{source}: none of the {len(objects)} meshes could be read")
        labels = np.array([-1 if e else synsets.index(o[0]) for o, e in zip(objects, errors)])
        in_val = val_members(labels, len(synsets))
        if not in_val.any():
            raise DataError(f"{source}: no class has 2 usable objects, so the val split would be "
                            "empty")
        for name, chosen in (("train", (labels >= 0) & ~in_val), ("val", in_val)):
            order = np.random.default_rng([seed, name == "val"]).permutation(np.flatnonzero(chosen))
            entries = [f"/{objects[i][0]}/{objects[i][1]}/" for i in order]
            width = max([43, *map(len, entries)])               # the real lists are '<U43'
            np.save(os.path.join(tmp, f"{name}_images.npy"), np.array(entries, f"<U{width}"))
            np.save(os.path.join(tmp, f"{name}_labels.npy"), labels[order].astype(np.int64))
            table = np.array([latents[i] for i in order]).reshape(-1, 7)
            np.save(os.path.join(tmp, f"all_latents_{name}.npy"), table)
    n = (labels >= 0).sum() * views
    seconds = time.time() - start
    if progress:
        print(f"wrote {n // views} objects x {views} views = {n} images of {size}x{size} in "
              f"{seconds:.1f} s: {n / seconds:.0f} images/s ({cpu_cores()} cores, {device}); "
              f"{sum(map(bool, errors))} meshes skipped")
    return out


# ================================================ ImageFolder look-alike (for ser.py's defaults)
def backgrounds(gen, n, size):
    """(n, 3, size, size) textures with a canonical "up", like photographs: a sky-to-ground
    gradient, faint colour blotches, stripes of random frequency and direction; low contrast, so
    that the object carries the class."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    sky = 0.6 + 0.4 * torch.rand(n, 3, 1, 1, generator=gen)
    ground = 0.5 * torch.rand(n, 3, 1, 1, generator=gen)
    blotches = F.interpolate(torch.rand(n, 3, 4, 4, generator=gen), size=(size, size),
                             mode="bicubic", align_corners=False)
    angle = math.pi * torch.rand(n, 1, 1, 1, generator=gen)
    freq = 3 + 12 * torch.rand(n, 1, 1, 1, generator=gen)
    on = torch.sin(2 * math.pi * freq * (xx * angle.cos() + yy * angle.sin())) > 0
    stripes = on.float() * torch.rand(n, 3, 1, 1, generator=gen)
    return (0.55 * (sky * (1 - yy) + ground * yy) + 0.1 * blotches + 0.03 * stripes).clamp(0, 1)


IMAGES_PER_OBJECT = 4


def write_imagefolder_object(tmp, split, c, k, n_split, val_per_class, size, seed):
    """Images k .. k+3 of class c in split (of n_split per class): one object, upright with a small
    pose jitter, ~45-70 % of the frame, its centre within the middle 30 %, over a calm background.
    Written as tmp/split/<wnid>/<ImageNet's file name>."""
    rng = np.random.default_rng([seed, split == "val", c, k])
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
    n = min(IMAGES_PER_OBJECT, n_split - k)
    lat = sample_latents(rng, n)
    lat[:, :3] = rng.normal(0, [0.12, 0.12, 0.2], (n, 3))   # upright: small tilt, some turn about z
    zoom = rng.uniform(1.5, 2.3)       # the object's scale (~0.31 of the frame at zoom 1)
    mesh = object_mesh(c, rng)
    big = render(*mesh, lat, round(size * zoom), alpha=True)
    # a random crop of the bigger rendering sets the object's position
    m = big.shape[-1] / 2
    x0, y0 = rng.integers(round(m - 0.65 * size), round(m - 0.35 * size) + 1, (2, n))
    crop = torch.stack([b[:, y:y + size, x:x + size] for b, x, y in zip(big, x0, y0)])
    rgb, a = crop[:, :3], crop[:, 3:]
    # keeps the floor's light and shadow, faintly, over the background
    image = a * rgb + (1 - a) * (0.2 * rgb + 0.8 * backgrounds(gen, n, size))
    wnid = f"n{90000000 + c:08d}"
    folder = os.path.join(tmp, split, wnid)
    os.makedirs(folder, exist_ok=True)
    pixels = (image * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for j, im in enumerate(pixels):
        if split == "train":
            name = f"{wnid}_{k + j}.JPEG"
        else:
            name = f"ILSVRC2012_val_{c * val_per_class + k + j + 1:08d}.JPEG"
        Image.fromarray(im).save(os.path.join(folder, name), quality=90)


def make_imagefolder(out, classes=10, train_per_class=100, val_per_class=20, size=64, seed=0,
                     progress=True):
    """An ImageNet-layout look-alike, deterministic for a seed: class c = shape family c, a new
    object per 4 images (write_imagefolder_object). Rotations and flips change what an image shows,
    which is what SER's equivariance is about."""
    check_counts(classes=classes, train_per_class=train_per_class, val_per_class=val_per_class,
                 size=size, seed=seed)
    per_split = {"train": train_per_class, "val": val_per_class}
    jobs = [(split, c, k) for split, n in per_split.items()
            for c in range(classes) for k in range(0, n, IMAGES_PER_OBJECT)]
    with staged(out) as tmp:
        def write(job):
            split, c, k = job
            write_imagefolder_object(tmp, split, c, k, per_split[split], val_per_class, size, seed)
        parallel_map(write, jobs, "make-imagefolder", progress)
    return out


# ==================================================================================== contact sheet
def contact_sheet(root, out_png, objects=8, views=8):
    """A grid, one row per object (one per class first), one column per view, as stored on disk."""
    import torchvision
    check_counts(objects=objects, views=views)
    entries, labels = read_split(root, "train")
    first = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)][:objects]
    to_tensor = torchvision.transforms.ToTensor()
    tiles = [to_tensor(load_image(image_file(object_dir(root, entries[i]), k)))
             for i in first for k in range(views)]
    torchvision.utils.save_image(torch.stack(tiles), out_png, nrow=views, padding=2, pad_value=1.0)
    return out_png


# ===================================================================================== command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("make-3diebench",
                       help="generate a look-alike data set in the 3DIEBench layout")
    g.add_argument("out", help="output folder (must not exist or be empty)")
    g.add_argument("--classes", type=int, default=55, help="number of classes (real: 55)")
    g.add_argument("--objects-per-class", type=int, default=6,
                   help="objects per class; ~20%% go to val")
    g.add_argument("--views", type=int, default=N_VIEWS, help="views per object (real: 50)")
    g.add_argument("--size", type=int, default=64,
                   help="image side in pixels, e.g. 64, 128, 256 (real: 256)")
    g.add_argument("--seed", type=int, default=0, help="same seed -> identical files")
    g.add_argument("--ood", action="store_true",
                   help="angles in [pi/2, pi] u [-pi, -pi/2] (3DIEBench-OOD)")
    g.add_argument("--zoom", type=float, default=1.0,
                   help="focal length x zoom: objects larger in frame (real: 1)")
    g.add_argument("--paint", choices=("palette", "axes"), default="palette",
                   help="face colours: two random ones per object (--meshes: the models' own "
                        "materials), or by object-frame normal, one colour per +-axis (the toy "
                        "set: pose visible)")
    g.add_argument("--device", default="cpu", help="torch device for the renderer (cpu, cuda)")
    g.add_argument("--meshes", help="render DIR/<class>/<model>.obj or <class>/<model>/**/*.obj "
                                    "(ShapeNet v2) instead")

    i = sub.add_parser("import-sweethome3d",
                       help="sort an unpacked sweethome3d-furniture's models into class folders")
    i.add_argument("unpacked", help="folder where the package was unpacked (dpkg -x)")
    i.add_argument("mesh_dir",
                   help="output: MESH_DIR/<class>/<model>/ (must not exist or be empty)")

    c = sub.add_parser("check", help="scan a data set (3DIEBench or ImageFolder, real or "
                                     "generated) and report every problem")
    c.add_argument("root", help="a 3DIEBench root (list files) or an ImageFolder root "
                                "(train/<wnid>/, val/<wnid>/)")
    c.add_argument("--quick", action="store_true",
                   help="only the seconds-long start-up checks the training scripts run "
                        "(data.preflight); stops at the first problem")
    c.add_argument("--workers", type=int, default=None,
                   help="decoding threads (default: all cores)")

    m = sub.add_parser("make-imagefolder",
                       help="generate an ImageNet-layout look-alike (train/<wnid>/*.JPEG, val/...)")
    m.add_argument("out", help="output folder (must not exist or be empty)")
    m.add_argument("--classes", type=int, default=10, help="number of classes (shape families)")
    m.add_argument("--train-per-class", type=int, default=100)
    m.add_argument("--val-per-class", type=int, default=20)
    m.add_argument("--size", type=int, default=64)
    m.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("contact-sheet", help="PNG grid of a few objects x views")
    s.add_argument("root")
    s.add_argument("out_png")
    s.add_argument("--objects", type=int, default=8)
    s.add_argument("--views", type=int, default=8)
    return p.parse_args(argv)


def run_check(args):
    """`data.py check`: exit 1 after listing the problems (5 per kind), else one OK line."""
    if args.workers is not None:
        check_counts(workers=args.workers)
    kind = layout(ensure(args.root, generate=False))
    if args.quick:
        preflight(args.root, kind, args.workers)                 # a DataError at the first problem
        problems = {}
    else:
        problems = check(args.root, args.workers)
    for what, messages in problems.items():
        print(f"{what}: {len(messages)} problem(s)", *(f"  {m}" for m in messages[:5]), sep="\n",
              file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"{args.root}: OK ({kind}{', quick checks' if args.quick else ''})")


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.command == "make-3diebench":
            make_3diebench(args.out, args.classes, args.objects_per_class, args.views, args.size,
                           args.seed, args.ood, args.device, meshes=args.meshes, zoom=args.zoom,
                           paint=args.paint)
        elif args.command == "import-sweethome3d":
            import_sweethome3d(args.unpacked, args.mesh_dir)
        elif args.command == "make-imagefolder":
            print(make_imagefolder(args.out, args.classes, args.train_per_class,
                                   args.val_per_class, args.size, args.seed))
        elif args.command == "check":
            run_check(args)
        elif args.command == "contact-sheet":
            print(contact_sheet(args.root, args.out_png, args.objects, args.views))
    except (DataError, OSError) as e:     # OSError: e.g. contact-sheet's output folder is missing
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
