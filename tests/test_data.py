"""data.py: rotations (the official code's test vector), the real on-disk format (generated,
hand-built and the official list files), every bad-input message, the checker and the start-up
checks (preflight), the generator (atomic output) and the renderer (on another device too)."""
import contextlib
import glob
import io
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import data

REPO = Path(__file__).resolve().parents[1]
# A folder holding the official repository's split lists (val_images.npy, val_labels.npy,
# train_labels.npy; it ships no train_images.npy), named by this environment variable. Unset, or
# without those files, the test that reads them is skipped.
REAL_LISTS = Path(os.environ.get("OFFICIAL_3DIEBENCH_LISTS", ""))
HAS_REAL_LISTS = bool(os.environ.get("OFFICIAL_3DIEBENCH_LISTS")) and all(
    (REAL_LISTS / name).is_file() for name in ("val_images.npy", "val_labels.npy"))
A1 = np.array([0.3, -0.7, 1.1], np.float32).astype(np.float64)
A2 = np.array([-1.2, 0.5, 0.2], np.float32).astype(np.float64)


def cli(*args):
    """Run `python data.py ...` as a user would; -> CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "data.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=env)


# ---------------------------------------------------------------- rotations
def test_relative_quaternion_test_vector_body_frame():
    # the official code (src/dataset.py): scipy (r1.inv() * r2).as_quat() on these float32 angles,
    # scalar-last
    q = data.relative_quaternion(A1, A2)
    assert np.allclose(q, [-0.538347, 0.646065, -0.168557, 0.514170], atol=1e-6)
    q_torch = data.relative_quaternion(torch.tensor(A1), torch.tensor(A2))
    assert torch.allclose(q_torch, torch.tensor(q), atol=1e-12)
    # the world-frame R2 R1^T is another rotation (same angle, other axis): the "wrong" vector
    world = data.quaternion_multiply(data.euler_xyz_to_quaternion(A2),
                                     data.euler_xyz_to_quaternion(A1) * [-1, -1, -1, 1])
    assert np.allclose(world, [-0.789959, -0.081562, -0.323947, 0.514170], atol=1e-6)
    # body frame: R2 = R1 r, with r the rotation of q
    R1, R2 = data.euler_xyz_to_matrix(A1), data.euler_xyz_to_matrix(A2)
    r = R1.T @ R2
    assert np.allclose(np.abs(data.matrix_to_quaternion(r) @ q), 1, atol=1e-9)
    assert not np.allclose(np.abs(data.matrix_to_quaternion(R2 @ R1.T) @ q), 1, atol=1e-3)


def test_euler_is_extrinsic_xyz_and_quaternions_agree():
    a = np.random.default_rng(0).uniform(-np.pi, np.pi, (100, 3))
    c, s = np.cos(a), np.sin(a)
    o, z = np.ones(100), np.zeros(100)
    Rx = np.stack([o, z, z, z, c[:, 0], -s[:, 0], z, s[:, 0], c[:, 0]], -1).reshape(-1, 3, 3)
    Ry = np.stack([c[:, 1], z, s[:, 1], z, o, z, -s[:, 1], z, c[:, 1]], -1).reshape(-1, 3, 3)
    Rz = np.stack([c[:, 2], -s[:, 2], z, s[:, 2], c[:, 2], z, z, z, o], -1).reshape(-1, 3, 3)
    R = data.euler_xyz_to_matrix(a)
    assert np.allclose(R, Rz @ Ry @ Rx)
    q = data.euler_xyz_to_quaternion(a)
    assert np.allclose(np.abs((data.matrix_to_quaternion(R) * q).sum(-1)), 1)
    # scipy's from_matrix sign: the largest component positive
    assert (data.matrix_to_quaternion(R)[np.arange(100), np.abs(q).argmax(-1)] > 0).all()
    Rt = data.euler_xyz_to_matrix(torch.tensor(a))
    assert torch.allclose(data.matrix_to_quaternion(Rt), torch.tensor(data.matrix_to_quaternion(R)))


def test_relative_quaternion_statistics():
    # scipy on uniform angles: means (0, 0, 0, 0.533), w < 0 in ~4.4 % of pairs (not canonicalised)
    rng = np.random.default_rng(0)
    q = data.relative_quaternion(*rng.uniform(-np.pi / 2, np.pi / 2, (2, 50000, 3)))
    assert abs(q[:, 3].mean() - 0.533) < 0.01 and np.abs(q[:, :3].mean(0)).max() < 0.01
    assert 0.035 < (q[:, 3] < 0).mean() < 0.055


def test_relative_g_is_the_one_g_of_pairs_probes_and_retrieval():
    """relative_g: quaternion of float32-cast angles (training pairs, probes), then the raw hue
    differences (color=True); float32_angles=False keeps the float64 angles (MRR, PRE)."""
    rng = np.random.default_rng(3)
    lat1, lat2 = rng.uniform(-1.5, 1.5, (2, 40, 7))
    g = data.relative_g(lat1, lat2, color=True)
    assert g.dtype == torch.float32 and g.shape == (40, 6)
    f32 = [a[:, :3].astype(np.float32).astype(np.float64) for a in (lat1, lat2)]
    assert torch.equal(g[:, :4], torch.from_numpy(data.relative_quaternion(*f32)).float())
    assert torch.equal(g[:, 4:], torch.from_numpy(lat2[:, [3, 6]] - lat1[:, [3, 6]]).float())
    assert torch.equal(data.relative_g(lat1, lat2), g[:, :4])
    exact = data.relative_g(lat1, lat2, float32_angles=False)
    float64_angles = data.relative_quaternion(lat1[:, :3], lat2[:, :3])
    assert torch.equal(exact, torch.from_numpy(float64_angles).float())
    assert not torch.equal(exact, g[:, :4]) and torch.allclose(exact, g[:, :4], atol=1e-6)
    assert torch.equal(data.relative_g(lat1[0], lat2[0], color=True), g[0])     # one pair, (7,)


def test_normalize_channels_is_torchvisions_normalize():
    import torchvision.transforms as T
    x = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    for stats in ((data.MEAN, data.STD), (data.IMAGENET_MEAN, data.IMAGENET_STD)):
        want = torch.stack([T.Normalize(*stats)(image) for image in x])
        assert torch.equal(data.normalize_channels(x, stats), want)          # bit for bit
        assert torch.equal(data.normalize_channels(x[0], stats), want[0])    # (3, H, W) too
        assert torch.allclose(data.denormalize_channels(want, stats), x, atol=1e-6)
    default = data.normalize_channels(x)
    assert torch.equal(default, data.normalize_channels(x, (data.MEAN, data.STD)))
    assert data.normalize_channels(x.double()).dtype == torch.float64


# ---------------------------------------------------------------- loaders on the generated set
def test_generated_layout_is_the_real_format(toy_root):
    root = Path(toy_root)
    entries = np.load(root / "train_images.npy")
    assert entries.dtype == np.dtype("<U43")
    assert all(e.startswith("/") and e.endswith("/") for e in entries)
    synset, obj = entries[0].strip("/").split("/")
    assert len(synset) == 8 and synset in data.REAL_SYNSETS and 29 <= len(obj) <= 32
    assert np.load(root / "train_labels.npy").dtype == np.int64
    lat = np.load(root / entries[0].strip("/") / "latent_0.npy")
    assert lat.dtype == np.float64 and lat.shape == (7,)
    assert (np.abs(lat[:3]) <= np.pi / 2).all() and 0 <= lat[4] <= np.pi / 4
    with Image.open(root / entries[0].strip("/") / "image_0.jpg") as im:
        assert im.format == "JPEG" and im.size == (32, 32)
    # ~20 % of each class in val: 1 of 5 here, labels = position of the synset in the sorted list
    val, vlab = data.read_split(toy_root, "val")
    train, tlab = data.read_split(toy_root, "train")
    assert len(val) == 4 and len(train) == 16 and sorted(vlab) == [0, 1, 2, 3]
    syn = sorted({e.split("/")[1] for e in train})
    assert all(syn.index(e.split("/")[1]) == lab for e, lab in zip(train, tlab))
    table = data.load_all_latents(toy_root, "train")
    assert table.shape == (16 * 50, 7) and table.dtype == np.float64
    assert np.array_equal(table[3 * 50 + 7], np.load(root / train[3].strip("/") / "latent_7.npy"))


def test_pairs_item(toy_root):
    ds = data.Pairs3DIEBench(toy_root, "train")
    assert len(ds) == 16 and ds.num_classes == 4
    x1, x2, g, label = ds[3]
    assert x1.shape == x2.shape == (3, 32, 32) and x1.dtype == torch.float32
    assert not torch.equal(x1, x2)
    assert g.shape == (4,) and g.dtype == torch.float32 and abs(float(g.norm()) - 1) < 1e-5
    assert label == ds.labels[3]
    # the target is the relative quaternion of the two chosen views' latents
    v1, v2 = np.random.default_rng([0, 0, 3]).choice(50, 2, replace=False)
    table = data.load_all_latents(toy_root, "train")
    expected = data.relative_quaternion(table[3 * 50 + v1, :3].astype(np.float32).astype(float),
                                        table[3 * 50 + v2, :3].astype(np.float32).astype(float))
    assert np.allclose(g.numpy(), expected, atol=1e-6)
    color = data.Pairs3DIEBench(toy_root, "train", color=True)[3][2]
    assert color.shape == (6,)
    assert np.allclose(color[4:], table[3 * 50 + v2, [3, 6]] - table[3 * 50 + v1, [3, 6]],
                       atol=1e-6)
    assert data.Pairs3DIEBench(toy_root, "val", size=16)[0][0].shape == (3, 16, 16)


def test_pairs_views_distinct_and_seeded_independently_of_workers(toy_root):
    ds = data.Pairs3DIEBench(toy_root, "train", seed=1)

    def views(d, workers):
        loader = torch.utils.data.DataLoader(d, batch_size=4, num_workers=workers)
        return torch.cat([g for _, _, g, _ in loader])

    a = views(ds, 0)
    assert torch.equal(a, views(ds, 2))                      # any number of workers: same pairs
    assert (a[:, 3] < 0.9999).all()                  # two distinct views (never the identity)
    sampler = [torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=r, shuffle=False)
               for r in (0, 1)]
    per_rank = [torch.stack([ds[i][2] for i in s]) for s in sampler]   # each rank sees its part
    assert torch.equal(per_rank[0], a[0::2]) and torch.equal(per_rank[1], a[1::2])
    ds.set_epoch(1)
    assert not torch.equal(a, views(ds, 0))                 # a new epoch draws new views


def test_views_dataset(toy_root):
    ds = data.Views3DIEBench(toy_root, "val", views=[0, 5])
    assert len(ds) == 4 * 2
    x, label, obj, view = ds[3]
    assert x.shape == (3, 32, 32) and (obj, view) == (1, 5) and label == ds.labels[1]
    full = data.Views3DIEBench(toy_root, "val")
    assert len(full) == 200 and full.latents.shape == (200, 7)


def write_hand_built(root, ids=("0123456789abcdef0123456789abc", "fedcba9876543210fedcba98765",
                                "a" * 32), views=3):
    """A tiny set written without the generator: 2 synsets, 29-, 27+2- and 32-character ids."""
    entries = []
    for i, obj in enumerate(ids):
        entry = f"/{'02691156' if i < 2 else '04379243'}/{obj}/"
        folder = root / entry.strip("/")
        folder.mkdir(parents=True)
        for k in range(views):
            image = Image.fromarray(np.full((24, 24, 3), 40 * k + i, np.uint8))
            image.save(folder / f"image_{k}.jpg", quality=95)
            latent = np.array([0.1 * k, 0.2, -0.3 * i, 0.5, 0.2, 1.0, 0.25 * k])
            np.save(folder / f"latent_{k}.npy", latent)
        entries.append(entry)
    np.save(root / "val_images.npy", np.array(entries, dtype="<U43"))
    np.save(root / "val_labels.npy", np.array([0, 0, 1], dtype=np.int64))
    return entries


def test_hand_built_set_with_29_char_ids(tmp_path):
    entries = write_hand_built(tmp_path, ids=("0123456789abcdef0123456789abc", "b" * 30, "a" * 32))
    got, labels = data.read_split(str(tmp_path), "val")
    assert list(got) == entries and list(labels) == [0, 0, 1]
    # rebuilt from the latent_k.npy files (there is no all_latents file)
    table = data.load_all_latents(str(tmp_path), "val")
    assert table.shape == (9, 7) and table[1 * 3 + 2, 6] == 0.5
    x1, x2, g, label = data.Pairs3DIEBench(str(tmp_path), "val", size=32)[0]
    assert x1.shape == (3, 32, 32) and label == 0
    assert data.Views3DIEBench(str(tmp_path), "val")[8][1:] == (1, 2, 2)


@pytest.mark.skipif(not HAS_REAL_LISTS, reason="OFFICIAL_3DIEBENCH_LISTS does not name a folder "
                    "holding the official val_images.npy and val_labels.npy")
def test_real_official_list_files():
    entries, labels = data.read_split(str(REAL_LISTS), "val", check_folders=False)
    assert entries.dtype == np.dtype("<U43") and len(entries) == len(labels) == 10552
    synsets = sorted({e.split("/")[1] for e in entries})
    assert len(synsets) == 55 and synsets == data.REAL_SYNSETS
    assert all(synsets.index(e.split("/")[1]) == lab
               for e, lab in zip(entries[:2000], labels[:2000]))
    assert {len(data.object_dir("", e).split("/")[1]) for e in entries} == {29, 30, 31, 32}
    with pytest.raises(data.DataError, match="/02691156/dc8d9003cde43b66c8727b27ee96a4b7/"):
        data.read_split(str(REAL_LISTS), "val")         # the images are not here: names the entry
    with pytest.raises(data.DataError, match="train_images.npy"):
        data.read_split(str(REAL_LISTS), "train")               # only train_labels.npy ships


# ---------------------------------------------------------------- bad inputs: API and CLI
@pytest.fixture()
def broken(toy_root, tmp_path):
    """A copy of the toy set, to damage."""
    root = tmp_path / "broken"
    shutil.copytree(toy_root, root)
    entries = np.load(root / "train_images.npy")
    return root, [root / e.strip("/") for e in entries]


def test_missing_root_names_folder_and_command(tmp_path):
    missing = tmp_path / "nowhere"
    for make in (data.Pairs3DIEBench, data.ensure_3diebench):
        with pytest.raises(data.DataError) as e:
            make(str(missing))
        assert str(missing) in str(e.value)
        assert f"python data.py make-3diebench {missing}" in str(e.value)
    p = cli("check", missing)
    assert p.returncode == 2 and "make-3diebench" in p.stderr and str(missing) in p.stderr
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr                  # one line


def plant(root, folders, fault):
    """Damage the copy; -> (text the message must contain, a call into the Python API that must
    fail)."""
    if fault == "missing folder":
        shutil.rmtree(folders[2])

        def load_pairs():
            return data.Pairs3DIEBench(str(root))
        return folders[2].name, load_pairs
    if fault == "latent shape":
        np.save(folders[1] / "latent_4.npy", np.zeros(9))
        os.remove(root / "all_latents_train.npy")           # so the table is rebuilt from the files

        def load_latents():
            return data.load_all_latents(str(root), "train")
        return str(folders[1] / "latent_4.npy"), load_latents
    if fault in ("corrupt jpeg", "truncated jpeg"):
        bad = folders[3 if fault == "corrupt jpeg" else 4] / "image_4.jpg"
        raw = bad.read_bytes()
        bad.write_bytes(raw[: len(raw) // 2] if fault == "truncated jpeg"
                        else b"not a jpeg" + raw[100:])
        i = 3 if fault == "corrupt jpeg" else 4

        def load_view():
            return data.Views3DIEBench(str(root), "train", views=[4])[i]
        return str(bad), load_view
    # list/label length mismatch
    np.save(root / "val_labels.npy", np.load(root / "val_labels.npy")[:-1])

    def load_val_pairs():
        return data.Pairs3DIEBench(str(root), "val")
    return str(root / "val_labels.npy"), load_val_pairs


FAULTS = ["missing folder", "latent shape", "corrupt jpeg", "truncated jpeg", "length mismatch"]


@pytest.mark.parametrize("fault", FAULTS)
def test_bad_input_raises_data_error_naming_the_file(broken, fault):
    root, folders = broken
    needle, load = plant(root, folders, fault)
    with pytest.raises(data.DataError) as e:
        load()
    assert needle in str(e.value)
    assert any(needle in m for msgs in data.check(str(root), progress=False).values() for m in msgs)


def test_check_cli_reports_every_fault_at_once(broken):
    root, folders = broken
    needles = [plant(root, folders, f)[0] for f in FAULTS]
    np.save(folders[0] / "latent_2.npy", np.array([np.nan] * 7))
    (folders[5] / "image_9.jpg").unlink()
    np.save(root / "all_latents_train.npy", np.zeros((3, 7)))
    problems = data.check(str(root), progress=False)
    # all_latents: the table's shape, even with bad files
    assert {k: len(v) for k, v in problems.items()} == {"list file": 1, "object folder": 1,
                                                        "latent": 2, "image": 3, "all_latents": 1}
    p = cli("check", root)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert all(n in p.stderr for n in needles), p.stderr
    assert "image: 3 problem(s)" in p.stderr and "latent: 2 problem(s)" in p.stderr


def test_all_latents_table_is_checked(broken):
    root, _ = broken
    table = np.load(root / "all_latents_val.npy")
    np.save(root / "all_latents_val.npy", table[::-1])          # rows out of list order
    assert list(data.check(str(root), progress=False)) == ["all_latents"]
    np.save(root / "all_latents_val.npy", table[:10])
    with pytest.raises(data.DataError, match="all_latents_val.npy"):
        data.load_all_latents(str(root), "val")


def test_check_passes_on_generated_set(toy_root):
    assert data.check(toy_root, progress=False) == {}
    p = cli("check", toy_root)
    assert p.returncode == 0 and "OK" in p.stdout


def test_dataloader_worker_error_keeps_clean_message(broken):
    root, folders = broken
    (folders[0] / "image_0.jpg").write_bytes(b"garbage")
    ds = data.Views3DIEBench(str(root), "train", views=[0])
    with pytest.raises(data.DataError) as e:
        list(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1))
    assert str(e.value).startswith(str(folders[0] / "image_0.jpg"))
    assert "Traceback" not in str(e.value)


# ---------------------------------------------------------------- generator and renderer
def test_generator_is_deterministic_and_ood(tmp_path):
    cfg = dict(classes=2, objects_per_class=2, views=3, size=16, progress=False)
    a, b, c = (data.make_3diebench(str(tmp_path / n), seed=s, **cfg)
               for n, s in (("a", 0), ("b", 0), ("c", 1)))
    files = sorted(p.relative_to(a) for p in Path(a).rglob("*") if p.is_file())
    assert len(files) == 4 * 3 * 2 + 6
    assert all((Path(a) / f).read_bytes() == (Path(b) / f).read_bytes() for f in files)
    assert (not (Path(c) / files[0]).exists()
            or (Path(c) / files[-1]).read_bytes() != (Path(a) / files[-1]).read_bytes())
    ood = data.make_3diebench(str(tmp_path / "ood"), seed=0, ood=True, **cfg)
    # the same objects
    assert np.array_equal(np.load(Path(ood) / "val_images.npy"),
                          np.load(Path(a) / "val_images.npy"))
    angles = np.load(Path(ood) / "all_latents_train.npy")[:, :3]
    assert (np.abs(angles) >= np.pi / 2).all() and (np.abs(angles) <= np.pi).all()
    with pytest.raises(data.DataError, match="not empty"):
        data.make_3diebench(a, **cfg)


def test_every_latent_changes_the_pixels():
    verts, faces, colors = data.object_mesh(0, np.random.default_rng(0))
    base = np.array([0.3, -0.2, 0.4, 0.1, 0.3, 1.0, 0.6])
    rows = [base]
    for i, delta in enumerate([0.6, 0.6, 0.6, 0.5, 0.4, 2.0, 0.5]):
        rows.append(base.copy())
        rows[-1][i] += delta
    img = data.render(verts, faces, colors, np.stack(rows), 48)
    diff = (img[1:] - img[0]).abs().mean((1, 2, 3))
    assert (diff > 0.004).all(), diff


def test_render_rotation_convention():
    # Euler angles a render as the vertices rotated by R(a) = Rz Ry Rx do at zero angles
    verts, faces, colors = data.object_mesh(3, np.random.default_rng(1))
    lat = np.array([[0.4, -0.9, 1.2, 0.3, 0.2, 2.0, 0.7]])
    R = data.euler_xyz_to_matrix(torch.tensor(lat[0, :3], dtype=torch.float32))
    zero = lat.copy()
    zero[0, :3] = 0
    a = data.render(verts, faces, colors, lat, 32)
    b = data.render(verts @ R.T, faces, colors, zero, 32)
    assert (a - b).abs().max() < 0.05
    assert (a - data.render(verts, faces, colors, zero, 32)).abs().mean() > 0.01


def test_paint_axes_colours_faces_by_their_object_frame_normal(tmp_path):
    # same object (same random stream, same geometry), painted: each face gets the colour of the
    # axis its normal points along most; the toy set is painted, the generator's default is the
    # two-colour palette
    stream = [0, 3, 1, 0]
    v, f, plain = data.object_mesh(3, np.random.default_rng(stream))
    v2, f2, painted = data.object_mesh(3, np.random.default_rng(stream), paint="axes")
    assert torch.equal(v, v2) and torch.equal(f, f2) and len(set(map(tuple, plain.tolist()))) <= 2
    n = torch.linalg.cross(v[f][:, 1] - v[f][:, 0], v[f][:, 2] - v[f][:, 0])
    axis = n.abs().argmax(1)
    expected = data.AXIS_COLOURS[2 * axis + (n[torch.arange(len(n)), axis] < 0).long()]
    assert torch.equal(painted, expected) and len(set(map(tuple, painted.tolist()))) == 6
    assert data.TOY_3DIEBENCH["paint"] == "axes"
    data.main(["make-3diebench", str(tmp_path / "p"), "--classes", "1", "--objects-per-class", "2",
               "--views", "2", "--size", "16", "--paint", "axes"])
    assert len(data.Pairs3DIEBench(str(tmp_path / "p"))) == 1


def test_default_root_is_generated_on_first_use(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "TOY_3DIEBENCH",
                        dict(classes=2, objects_per_class=2, views=2, size=16, seed=0))
    assert data.ensure_3diebench() == data.DEFAULT_ROOT
    assert "generating" in capsys.readouterr().err
    assert len(data.Pairs3DIEBench(data.DEFAULT_ROOT)) == 2


def test_contact_sheet(toy_root, tmp_path):
    data.main(["contact-sheet", toy_root, str(tmp_path / "sheet.png"), "--objects", "3",
               "--views", "4"])
    with Image.open(tmp_path / "sheet.png") as im:
        assert im.size == (4 * 34 + 2, 3 * 34 + 2)


# ---------------------------------------------------------------- ImageFolder look-alike
def image_tensor(image):
    """A PIL image -> its (H, W, 3) uint8 pixels as a tensor."""
    return torch.tensor(np.asarray(image))


def float_image_tensor(image):
    """A PIL image -> its (H, W, 3) pixels as a float32 tensor."""
    return torch.tensor(np.asarray(image), dtype=torch.float32)


def test_imagefolder_layout_and_dataset(toy_imagefolder):
    root = Path(toy_imagefolder)
    wnids = sorted(p.name for p in (root / "train").iterdir())
    assert len(wnids) == 4 and all(w.startswith("n") and len(w) == 9 for w in wnids)
    assert sorted(p.name for p in (root / "val").iterdir()) == wnids
    assert all(len(list((root / "train" / w).glob("*.JPEG"))) == 16 for w in wnids)
    ds = data.ImageFolder(toy_imagefolder, "train")
    assert ds.classes == wnids and len(ds) == 64 and ds.targets == sorted(ds.targets)
    image, label = ds[20]
    assert image.mode == "RGB" and image.size == (32, 32) and label == 1
    val = data.ImageFolder(toy_imagefolder, "val", transform=image_tensor)
    assert len(val) == 32 and val[0][0].shape == (32, 32, 3)


def test_imagefolder_images_have_an_up(toy_imagefolder):
    # sky-to-ground backgrounds, upright objects: a 180-degree turn changes the image statistics
    ds = data.ImageFolder(toy_imagefolder, "train", transform=float_image_tensor)
    mean = torch.stack([ds[i][0] for i in range(len(ds))]).mean((0, 3))      # (rows, cols)
    assert mean[:8].mean() > mean[-8:].mean() + 10


def test_imagefolder_errors_and_determinism(tmp_path, toy_imagefolder):
    missing = tmp_path / "none"
    with pytest.raises(data.DataError, match=f"python data.py make-imagefolder {missing}"):
        data.ImageFolder(str(missing), "train")
    cfg = dict(classes=2, train_per_class=4, val_per_class=4, size=16, progress=False)
    a = data.make_imagefolder(str(tmp_path / "a"), **cfg)
    b = data.make_imagefolder(str(tmp_path / "b"), **cfg)
    files = sorted(p.relative_to(a) for p in Path(a).rglob("*.JPEG"))
    assert len(files) == 16
    assert all((Path(a) / f).read_bytes() == (Path(b) / f).read_bytes() for f in files)
    with pytest.raises(data.DataError, match="test"):
        data.ImageFolder(a, "test")                                 # no such split folder
    bad = Path(a) / "train" / files[0].parent.name / files[0].name
    bad.write_bytes(b"broken")
    with pytest.raises(data.DataError, match=str(bad)):
        data.ImageFolder(a, "train")[0]
    (Path(a) / "val" / "n99999999").mkdir()
    with pytest.raises(data.DataError, match="differ"):
        data.ImageFolder(a, "val")
    (Path(a) / "train" / "n99999999").mkdir()
    with pytest.raises(data.DataError, match="empty class folder"):
        data.ImageFolder(a, "train")


def test_default_imagefolder_is_generated_on_first_use(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "TOY_IMAGEFOLDER",
                        dict(classes=2, train_per_class=2, val_per_class=1, size=16, seed=0))
    assert len(data.ImageFolder(data.DEFAULT_IMAGEFOLDER_ROOT, "val")) == 2


def test_render_alpha_is_the_object_coverage():
    verts, faces, colors = data.object_mesh(2, np.random.default_rng(0))
    out = data.render(verts, faces, colors, data.sample_latents(np.random.default_rng(0), 2), 32,
                      alpha=True)
    a = out[:, 3]
    assert out.shape == (2, 4, 32, 32) and a.min() == 0 and a.max() == 1 and a[:, 0, 0].sum() == 0
    rgb = data.render(verts, faces, colors, data.sample_latents(np.random.default_rng(0), 2), 32)
    assert torch.equal(out[:, :3], rgb)


def test_object_colour_does_not_depend_on_the_class():
    # the palette is drawn from the object's own random stream before its shape: same stream, same
    # colours, whatever the class (class is told by shape only)
    colours = [set(map(tuple, data.object_mesh(c, np.random.default_rng(7))[2].tolist()))
               for c in range(6)]
    assert len(set.union(*colours)) <= 2              # one two-colour palette for every class


# ---------------------------------------------------------------- real meshes: OBJ reader, importer
TETRA = ("v 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\n"
         "f 1 3 2\nf 1 2 4\nf -4 -1 -2\nf 2 3 4\n")                  # incl. relative indices
QUAD = ("v -1 -1 0\nv 1 -1 0\nv 1 1 0\nv -1 1 0\nvt 0 0\nvt 1 0\nvt 1 1\nvt 0 1\nvn 0 0 1\n"
        "f 1/1/1 2/2/1 3/3/1 4/4/1\n")


def write_mesh(folder, name, obj, mtl=None, texture=None):
    """folder/name.obj (+ name.mtl with one material, + a texture PNG) -> path of the OBJ."""
    folder.mkdir(parents=True, exist_ok=True)
    if mtl:
        (folder / f"{name}.mtl").write_text(f"newmtl paint\n{mtl}\n")
        obj = f"mtllib {name}.mtl\nusemtl paint\n{obj}"
    if texture is not None:
        Image.fromarray(texture).save(folder / "tex.png")
    (folder / f"{name}.obj").write_text(obj)
    return folder / f"{name}.obj"


def camera_pixels(points, size):
    """(N, 3) world points -> (N, 2) [x, y] pixel coordinates in the 3DIEBench camera (as render
    places it)."""
    c = [math.sin(data.CAM_POLAR) * math.cos(data.CAM_AZIM),
         math.sin(data.CAM_POLAR) * math.sin(data.CAM_AZIM), math.cos(data.CAM_POLAR)]
    cam = data.look_at(data.CAM_DIST * torch.tensor(c)[:, None, None], data.FOCAL)
    return data.project(points.T[:, None].float(), cam, size, size)[:2, 0].T


def hull_mask(verts, size):
    """Silhouette predicted for a tetrahedron: pixel centres inside the projection of its 4 corners
    (the union of the projected triangles of any 3 of them)."""
    q = camera_pixels(verts, size)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    mask = torch.zeros(size, size, dtype=torch.bool)
    for tri in ([0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]):
        a, b, c = q[tri]
        side = [(p2[0] - p1[0]) * (yy - p1[1]) - (p2[1] - p1[1]) * (xx - p1[0])
                for p1, p2 in ((a, b), (b, c), (c, a))]
        mask |= torch.stack(side).ge(0).all(0) | torch.stack(side).le(0).all(0)
    return mask


def test_obj_tetrahedron_silhouette_colour_and_rotation(tmp_path):
    path = write_mesh(tmp_path, "tetra", TETRA, mtl="Kd 1 0 0")
    verts, faces, look = data.read_obj(str(path))
    assert faces.tolist() == [[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]]
    assert look[2].shape == (2, 3, 1, 1)
    # normalised like ShapeNet: bounding box centred, unit diagonal; OBJ y-up -> z-up:
    # (x, y, z) -> (x, -z, y)
    assert torch.allclose(verts.amax(0) + verts.amin(0), torch.zeros(3))
    assert abs((verts.amax(0) - verts.amin(0)).norm() - 1) < 1e-6
    assert torch.allclose(verts[3] - verts[0], torch.tensor([0, -1, 0]) / 3 ** 0.5)
    lat = np.zeros((4, 7))
    lat[:, :3] = [[0, 0, 0], [0.9, -0.4, 0.2], [-1.2, 0.3, 1.4], [0.4, 1.5, -0.7]]
    lat[:, 3:] = [0.3, 0.5, 2.0, 0.6]
    out = data.render(verts, faces, look, lat, 96, alpha=True)
    inside = out[:, 3] == 1
    # Kd red: no green or blue, some red
    assert (out[:, 1:3].permute(1, 0, 2, 3)[:, inside] == 0).all()
    assert (out[:, 0][inside] > 0.2).all()
    masks = []
    for row, image in zip(lat, out):
        # the latent angles rotate the silhouette exactly as R(a) = Rz Ry Rx applied to the
        # vertices predicts
        R = data.euler_xyz_to_matrix(torch.tensor(row[:3], dtype=torch.float32))
        predicted, seen = hull_mask(verts @ R.T, 96), image[3] > 0.5
        assert (predicted & seen).sum() / (predicted | seen).sum() > 0.93
        # R^T (the wrong way round) does not fit
        assert (hull_mask(verts @ R, 96) ^ seen).sum() > 40 or not row[:3].any()
        masks.append(seen)
    assert all((masks[0] ^ m).sum() > 100 for m in masks[1:])


def test_meshes_painted_by_axes_replace_their_materials(tmp_path):
    # --meshes --paint axes: the real shapes with the toy set's pose cue, every face coloured by
    # its normal (axis_paint) instead of its Kd; without --paint the materials stay
    meshes = tmp_path / "meshes"
    write_mesh(meshes / "chair", "tetra", TETRA, mtl="Kd 1 0 0")
    write_mesh(meshes / "chair", "tetra2", TETRA, mtl="Kd 1 0 0")    # train and val
    verts, faces, look = data.read_obj(str(meshes / "chair" / "tetra.obj"))
    v2, f2, painted = data.painted_by_axes(lambda: (verts, faces, look))
    assert torch.equal(v2, verts) and torch.equal(painted, data.axis_paint(verts, faces))
    assert painted.shape == (4, 3) and len(set(map(tuple, painted.tolist()))) >= 3
    common = ["--views", "2", "--size", "16", "--meshes", str(meshes)]
    data.main(["make-3diebench", str(tmp_path / "plain"), *common])
    data.main(["make-3diebench", str(tmp_path / "axes"), *common, "--paint", "axes"])
    image = {}
    for name in ("plain", "axes"):
        view = glob.glob(str(tmp_path / name / "*" / "*" / "image_0.jpg"))[0]
        image[name] = np.asarray(Image.open(view)).astype(float)
    assert np.abs(image["plain"] - image["axes"]).max() > 50       # another colour on the faces


def test_obj_textured_quad_maps_uv_to_image(tmp_path):
    # texture: red | green (top half), blue | white (bottom half); v = 1 is the image's top row
    texture = np.zeros((8, 8, 3), np.uint8)
    texture[:4, :4], texture[:4, 4:] = [255, 0, 0], [0, 255, 0]
    texture[4:, :4], texture[4:, 4:] = [0, 0, 255], 255
    path = write_mesh(tmp_path / "sub", "quad", QUAD, mtl="Kd 0.2 0.2 0.2\nmap_Kd tex.png",
                      texture=texture)
    verts, faces, (uv, material, atlas) = data.read_obj(str(path))
    # the quad: 2 triangles
    assert len(faces) == 2 and atlas.shape == (2, 3, 128, 128) and material.tolist() == [1, 1]
    lat = np.array([[0, 0, 0, 0.1, 0.3, 1.0, 0.5]])
    out = data.render(verts, faces, (uv, material, atlas), lat, 128)[0]
    quarters = {(0.25, 0.75): "r", (0.75, 0.75): "g", (0.25, 0.25): "b", (0.75, 0.25): "rgb"}
    for (u, v), colour in quarters.items():
        # OBJ (x, y, 0) -> (x, 0, y), unit diagonal
        point = torch.tensor([[2 * u - 1, 0, 2 * v - 1]]) / 8 ** 0.5
        x, y = camera_pixels(point, 128)[0].long()
        assert (out[:, y, x] > 0.1).tolist() == [c in colour for c in "rgb"], (colour, out[:, y, x])


def make_library(root):
    """A planted Sweet Home 3D library: catalogue entries with names and categories, one folder per
    model."""
    entries = [("Armchair", "Living room"), ("Coffee table", "Living room"),
               ("Bedside table", "Bedroom"), ("Table fan", "Miscellaneous"),
               ("Wheelchair", "Miscellaneous"), ("Sitting female", "Characters"),
               ("Dog", "Characters"), ("Double-hung window", "Doors and windows"),
               ("Window blind", "Miscellaneous"), ("Corner sofa", "Living room"),
               ("Desk lamp", "Lights"), ("Ficus", "Exterior"), ("Scooter", "Vehicles")]
    catalogue = "id=Test#catalog\nname=Test catalog\n\n"
    root.mkdir(parents=True)
    with zipfile.ZipFile(root / "Test.sh3f", "w") as z:
        for i, (name, category) in enumerate(entries, 1):
            model = f"test/m{i}/m{i}.obj"
            catalogue += (f"id#{i}=Test#m {i}\nname#{i}={name}\ncategory#{i}={category}\n"
                          f"model#{i}=/{model}\n\n")
            z.writestr(model, "mtllib m.mtl\nusemtl a\n" + TETRA)
            z.writestr(f"test/m{i}/m.mtl", "newmtl a\nKd 0.1 0.5 0.9\n")
        z.writestr("PluginFurnitureCatalog.properties", catalogue)
    return entries


def test_import_sweethome3d_sorts_a_planted_catalogue(tmp_path):
    make_library(tmp_path / "pkg" / "usr" / "share")
    meshes = tmp_path / "meshes"
    data.import_sweethome3d(str(tmp_path / "pkg"), str(meshes))
    found = {p.name: sorted(q.name for q in p.iterdir()) for p in meshes.iterdir()}
    assert found == {"chair": ["Test-m-1"], "table": ["Test-m-2", "Test-m-3"],
                     "person": ["Test-m-6"], "window": ["Test-m-8"], "sofa": ["Test-m-10"],
                     "lamp": ["Test-m-11"], "plant": ["Test-m-12"], "vehicle": ["Test-m-13"]}
    assert (meshes / "chair" / "Test-m-1" / "test" / "m1" / "m.mtl").is_file()
    with pytest.raises(data.DataError, match="sh3f"):
        data.import_sweethome3d(str(tmp_path / "meshes"), str(tmp_path / "other"))
    assert sorted(os.listdir(tmp_path)) == ["meshes", "pkg"]          # no other.partial-* left


def test_bad_meshes_are_skipped_and_counted(tmp_path, capsys):
    good = [write_mesh(tmp_path / "m" / "02691156" / f"{k:032x}" / "models", "model_normalized",
                       TETRA)
            for k in range(3)]                                      # ShapeNetCore v2's layout
    write_mesh(tmp_path / "m" / "mugs", "a_mug", TETRA, mtl="Kd 0 0.5 1")      # <class>/<model>.obj
    write_mesh(tmp_path / "m" / "mugs", "b_mug", TETRA.replace("v 1 0 0", "v 2 0 0"))
    bad = [write_mesh(tmp_path / "m" / "mugs", "garbage", "v 0 0 0\nf a b c\n"),
           write_mesh(tmp_path / "m" / "mugs", "no_faces", "v 0 0 0\nv 1 1 1\n"),
           write_mesh(tmp_path / "m" / "mugs", "nan", TETRA.replace("v 1 0 0", "v nan 0 0")),
           write_mesh(tmp_path / "m" / "mugs", "out_of_range", TETRA + "f 1 2 9\n")]
    # kept: rendered with Kd
    write_mesh(tmp_path / "m" / "mugs", "no_texture", QUAD, mtl="map_Kd tex.png")
    out = tmp_path / "out"
    data.main(["make-3diebench", str(out), "--meshes", str(tmp_path / "m"), "--views", "3",
               "--size", "16"])
    printed = capsys.readouterr()
    assert all(f"skipped {b}" in printed.err for b in bad), printed
    assert "4 meshes skipped" in printed.out, printed
    entries = sorted(np.concatenate([np.load(out / f"{s}_images.npy") for s in ("train", "val")]))
    assert entries == [f"/02691156/{k:032x}/" for k in range(3)] + ["/mugs/a_mug/", "/mugs/b_mug/",
                                                                    "/mugs/no_texture/"]
    assert len(good) == 3 and data.check(str(out), progress=False) == {}
    # synsets in sorted order: one of each in val
    assert sorted(np.load(out / "val_labels.npy").tolist()) == [0, 1]


def test_interrupted_render_leaves_nothing(tmp_path, monkeypatch):
    write_mesh(tmp_path / "m" / "a", "one", TETRA)
    write_mesh(tmp_path / "m" / "a", "two", TETRA)

    def interrupted(*args):
        raise KeyboardInterrupt

    def disk_full(*args):
        raise OSError(28, "No space left")
    monkeypatch.setattr(data, "write_object", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.make_3diebench(str(tmp_path / "out"), views=2, size=16, meshes=str(tmp_path / "m"),
                            progress=False)
    assert sorted(os.listdir(tmp_path)) == ["m"]
    monkeypatch.setattr(data, "write_object", disk_full)
    with pytest.raises(data.DataError, match=f"{tmp_path / 'out'}: writing failed .*No space left"):
        data.make_3diebench(str(tmp_path / "out"), views=2, size=16, meshes=str(tmp_path / "m"),
                            progress=False)
    assert sorted(os.listdir(tmp_path)) == ["m"]


# ---------------------------------------------------------------- checker: what crashed training
def test_check_reports_what_crashes_training(broken):
    root, folders = broken
    labels = np.load(root / "val_labels.npy")
    labels[1] = 60                                          # >= the 55 classes of 3DIEBench
    np.save(root / "val_labels.npy", labels)
    for k in range(1, 50):                                  # an object with one view
        (folders[6] / f"image_{k}.jpg").unlink()
        (folders[6] / f"latent_{k}.npy").unlink()
    Image.new("RGB", (24, 24), "red").save(folders[7] / "image_3.jpg", quality=95)   # other size
    Image.new("RGB", (32, 32), "red").save(folders[8] / "image_5.jpg", format="PNG")  # PNG as .jpg
    problems = data.check(str(root), progress=False)
    assert problems["label"] == [f"{root / 'val_labels.npy'}: 1 label(s) >= 55 (3DIEBench has 55 "
                                 f"classes), first: 60 for {np.load(root / 'val_images.npy')[1]}"]
    assert problems["object folder"] == [f"{folders[6]}: 1 view(s) (latent_k.npy files); training "
                                         "pairs need 2 distinct views"]
    images = "\n".join(problems["image"])
    assert f"{folders[7] / 'image_3.jpg'}: 24x24 pixels, the set's images are 32x32" in images
    assert f"{folders[8] / 'image_5.jpg'}: PNG data under a .jpg name" in images
    p = cli("check", root)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "label: 1 problem(s)" in p.stderr
    with pytest.raises(data.DataError, match="val_labels.npy: 1 label"):
        data.Pairs3DIEBench(str(root), "val")               # the loaders refuse them too


def test_dataset_refuses_an_object_with_one_view(broken):
    root, folders = broken
    for k in range(1, 50):
        (folders[0] / f"latent_{k}.npy").unlink()
    with pytest.raises(data.DataError, match=f"^{folders[0]}: 1 view"):
        # not `Cannot take a larger sample than population` mid-epoch
        data.Pairs3DIEBench(str(root))


def test_empty_lists_are_one_clear_message(broken):
    root, _ = broken
    np.save(root / "val_images.npy", np.array([], "<U43"))
    np.save(root / "val_labels.npy", np.array([], np.int64))
    assert data.check(str(root), progress=False) == {
        "list file": [f"{root / 'val_images.npy'}: lists no objects"]}
    p = cli("check", root)
    assert p.returncode == 1 and "lists no objects" in p.stderr and "Traceback" not in p.stderr
    with pytest.raises(data.DataError, match="val_images.npy: lists no objects"):
        data.Views3DIEBench(str(root), "val")


def test_nan_in_latent_table_is_refused(broken):
    root, _ = broken
    table = np.load(root / "all_latents_val.npy")
    table[57, 2] = np.nan                                              # object 1, view 7
    np.save(root / "all_latents_val.npy", table)
    entry = np.load(root / "val_images.npy")[1]
    message = f"{root / 'all_latents_val.npy'}: 1 row(s) not finite, first: row 57 ({entry} view 7)"
    with pytest.raises(data.DataError) as e:
        data.load_all_latents(str(root), "val")
    assert str(e.value) == message
    with pytest.raises(data.DataError, match="not finite"):
        data.Views3DIEBench(str(root), "val")                          # what eval.py reads
    assert data.check(str(root), progress=False) == {"all_latents": [message]}


def imagefolder_copy(toy_imagefolder, tmp_path):
    """A copy of the toy ImageFolder with stray files everywhere, which the loader and the checks
    ignore."""
    root = tmp_path / "imf"
    shutil.copytree(toy_imagefolder, root)
    for folder in [root / "train", root / "val", *(root / "train").iterdir(),
                   *(root / "val").iterdir()]:
        (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        (folder / "README.txt").write_text("notes\n")
    # a macOS AppleDouble file, hidden
    (next((root / "val").iterdir()) / "._x.JPEG").write_bytes(b"\0\5\26\7")
    return root


def test_imagefolder_ignores_stray_files(toy_imagefolder, tmp_path):
    root = imagefolder_copy(toy_imagefolder, tmp_path)
    assert [len(data.ImageFolder(str(root), split)) for split in ("train", "val")] == [64, 32]
    assert data.check(str(root), progress=False) == {}
    assert data.preflight(str(root), "ImageFolder") == str(root)
    p = cli("check", root)
    assert p.returncode == 0 and "OK (ImageFolder" in p.stdout, p.stderr


def test_check_imagefolder_reports_every_problem(toy_imagefolder, tmp_path):
    root = imagefolder_copy(toy_imagefolder, tmp_path)
    val_image = sorted((root / "val").rglob("*.JPEG"))[3]
    val_image.write_bytes(val_image.read_bytes()[:300])                 # truncated
    (root / "train" / "n99999999").mkdir()                              # empty, and not in val
    problems = data.check(str(root), progress=False)
    assert problems == {
        "class folder": [f"{root / 'train' / 'n99999999'}: empty class folder "
                         "(no .JPEG/.jpg/.png images)"],
        "image": problems["image"],
        "classes": [f"{root / 'val'}: class folders differ from {root / 'train'}'s, so labels "
                    "would not match (missing: n99999999)"]}
    assert len(problems["image"]) == 1
    assert problems["image"][0].startswith(f"{val_image}: corrupt or truncated")
    shutil.rmtree(root / "val")
    assert data.check(str(root), progress=False)["split"] == [
        f"{root / 'val'}: missing split folder (expected {root / 'val'}/<wnid>/*.JPEG)"]


# ---------------------------------------------------------------- start-up checks (data.preflight)
def test_preflight_passes_on_good_sets(toy_root, toy_imagefolder):
    assert data.preflight(toy_root) == toy_root
    assert data.preflight(toy_imagefolder, "ImageFolder") == toy_imagefolder
    p = cli("check", toy_root, "--quick")
    assert p.returncode == 0 and "OK (3DIEBench, quick checks)" in p.stdout


def damage_val(root, fault):
    """One fault in what a run reads only later (a train object that is not the first one, the
    evaluation's val set); -> the text the DataError must start with."""
    entries = np.load(root / "val_images.npy")
    folder = root / entries[2].strip("/")
    train_folder = root / np.load(root / "train_images.npy")[5].strip("/")
    if fault == "train object with one view":          # found mid-epoch, when drawn
        for k in range(1, 50):
            (train_folder / f"image_{k}.jpg").unlink()
            (train_folder / f"latent_{k}.npy").unlink()
        return f"{train_folder}: 1 view(s) (latent_k.npy files); training pairs need 2"
    if fault == "train view file":
        (train_folder / "image_40.jpg").unlink()
        return f"{train_folder}: missing image_40.jpg"
    if fault == "truncated val jpeg":                  # found by the evaluation, after training
        image = folder / "image_7.jpg"
        image.write_bytes(image.read_bytes()[:300])
        return f"{image}: corrupt or truncated image"
    if fault == "latent out of range":
        table = np.load(root / "all_latents_val.npy")
        table[57, 3] = 1e6                                # a floor hue: object 1, view 7
        np.save(root / "all_latents_val.npy", table)
        return (f"{root / 'all_latents_val.npy'}: 1 row(s) out of range, first: row 57 "
                f"({entries[1]} view 7): floor hue 1e+06 outside [0, 1]")
    if fault == "val folder":
        shutil.rmtree(folder)
        return f"{root / 'val_images.npy'}: 1 of 4 listed object folders are missing"
    if fault == "val view file":
        (folder / "latent_31.npy").unlink()
        return f"{folder}: missing latent_31.npy"
    if fault == "nan table":
        table = np.load(root / "all_latents_val.npy")
        table[120, 0] = np.inf
        np.save(root / "all_latents_val.npy", table)
        return (f"{root / 'all_latents_val.npy'}: 1 row(s) not finite, first: row 120 "
                f"({entries[2]} view 20)")
    if fault == "short table":
        np.save(root / "all_latents_val.npy", np.load(root / "all_latents_val.npy")[:-50])
        return f"{root / 'all_latents_val.npy'}: expected shape (200, 7)"
    if fault == "label":
        np.save(root / "val_labels.npy", np.array([0, 1, 55, 3]))
        return f"{root / 'val_labels.npy'}: 1 label(s) >= 55"
    (root / "val_labels.npy").unlink()
    return f"{root / 'val_labels.npy'}: missing val label file"


@pytest.mark.parametrize("fault", ["val folder", "val view file", "nan table", "short table",
                                   "label", "no labels", "train object with one view",
                                   "train view file", "truncated val jpeg",
                                   "latent out of range"])
def test_preflight_3diebench_names_the_file(broken, fault, capsys):
    root, _ = broken
    needle = damage_val(root, fault)
    with pytest.raises(data.DataError) as e:
        data.preflight(str(root))
    assert str(e.value).startswith(needle), str(e.value)
    with pytest.raises(SystemExit) as end:
        data.main(["check", str(root), "--quick"])                 # what `python data.py` runs
    assert end.value.code == 2 and capsys.readouterr().err == f"error: {e.value}\n"     # one line


def test_preflight_imagefolder_names_the_file(toy_imagefolder, tmp_path):
    root = imagefolder_copy(toy_imagefolder, tmp_path)
    val = sorted(p for p in (root / "val").iterdir() if p.is_dir())
    image = sorted(val[1].glob("*.JPEG"))[2]
    raw = image.read_bytes()
    image.write_bytes(raw + bytes(100))    # bytes after the end marker: PIL reads it, so fine
    # a PNG: fine too
    Image.open(io.BytesIO(raw)).save(sorted(val[1].glob("*.JPEG"))[3].with_suffix(".png"))
    assert data.preflight(str(root), "ImageFolder") == str(root)
    image.write_bytes(raw[: len(raw) * 2 // 3])             # truncated
    with pytest.raises(data.DataError, match=f"^{image}: corrupt or truncated image"):
        data.preflight(str(root), "ImageFolder")
    image.write_bytes(raw)
    for stray in val[0].glob("*.JPEG"):
        stray.unlink()                     # an empty val class (README.txt, .DS_Store remain)
    with pytest.raises(data.DataError, match=f"^{val[0]}: empty class folder"):
        data.preflight(str(root), "ImageFolder")
    shutil.rmtree(val[0])                                    # a missing val class
    with pytest.raises(data.DataError,
                       match=f"^{root / 'val'}: class folders differ .*missing: {val[0].name}"):
        data.preflight(str(root), "ImageFolder")
    shutil.rmtree(root / "val")
    with pytest.raises(data.DataError, match=f"^{root / 'val'}: missing split folder"):
        data.preflight(str(root), "ImageFolder")


# ---------------------------------------------------------------- generator limits, atomic output
def test_generator_flags_are_checked_in_one_line(tmp_path, toy_root, capsys):
    out = str(tmp_path / "out")
    cases = [(["make-3diebench", out, "--classes", "56"],
              "--classes 56: 3DIEBench has 55 classes"),
             (["make-3diebench", out, "--views", "1"],
              "--views 1: make-3diebench needs at least 2"),
             (["make-3diebench", out, "--objects-per-class", "1"],
              "--objects-per-class 1: make-3diebench needs at least 2"),
             # accepted before, then garbage images (0: a zero focal length, nan: black)
             (["make-3diebench", out, "--zoom", "0"], "--zoom 0: must be a positive number"),
             (["make-3diebench", out, "--zoom", "nan"], "--zoom nan: must be a positive number"),
             (["make-imagefolder", out, "--classes", "0"], "--classes 0: must be at least 1"),
             (["make-imagefolder", out, "--train-per-class", "0"],
              "--train-per-class 0: must be at least 1"),
             (["make-imagefolder", out, "--val-per-class", "0"],
              "--val-per-class 0: must be at least 1"),
             # tracebacks before
             (["make-3diebench", out, "--size", "0"], "--size 0: must be at least 1"),
             (["make-3diebench", out, "--size", "-5"], "--size -5: must be at least 1"),
             (["make-3diebench", out, "--seed", "-1"], "--seed -1: must be at least 0"),
             (["make-3diebench", out, "--device", "bogus"],
              "--device bogus: not usable on this machine (Expected one of cpu, cuda"),
             (["make-imagefolder", out, "--size", "0"], "--size 0: must be at least 1"),
             (["check", toy_root, "--workers", "-3"], "--workers -3: must be at least 1"),
             (["contact-sheet", toy_root, str(tmp_path / "sheet.png"), "--objects", "0"],
              "--objects 0: must be at least 1")]
    if not torch.cuda.is_available():
        cases.append((["make-3diebench", out, "--device", "cuda"],
                      "--device cuda: not usable on this machine"))
    for argv, needle in cases:
        if argv[0] == "make-3diebench" and "--size" not in argv:
            argv = [*argv, "--size", "16"]
        with pytest.raises(SystemExit) as end:
            data.main(argv)
        err = capsys.readouterr().err
        assert end.value.code == 2, (argv, err)
        assert err.startswith(f"error: {needle}") and err.count("\n") == 1, (argv, err)
        assert os.listdir(tmp_path) == []


def test_read_only_working_dir_is_one_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "TOY_3DIEBENCH",
                        dict(classes=2, objects_per_class=2, views=2, size=16, seed=0))
    real_makedirs = os.makedirs

    def read_only(path, *args, **kwargs):     # as in a read-only folder (tests may run as root)
        if str(path).startswith("data"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_makedirs(path, *args, **kwargs)

    monkeypatch.setattr(data.os, "makedirs", read_only)
    with pytest.raises(data.DataError) as e:
        data.ensure_3diebench()
    assert str(e.value).startswith("data/3diebench-toy: cannot create the output folder "
                                   "(Permission denied")
    assert "--data-root DIR" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    # a real failure: not a directory
    (tmp_path / "data").write_text("a file where the folder would go")
    with pytest.raises(data.DataError,
                       match="^data/3diebench-toy: cannot create the output folder .*--data-root"):
        data.ensure_3diebench()
    assert os.listdir(tmp_path) == ["data"]


def test_staged_writers_of_one_output_do_not_collide(tmp_path, monkeypatch):
    # torchrun: every rank generates the default set at once. Each writes its own partial folder;
    # the first to finish wins, the others discard theirs. Played here in one process, the second
    # "rank" inside the first.
    out = str(tmp_path / "set")
    with data.staged(out) as first:
        (Path(first) / "x").write_text("first")
        monkeypatch.setattr(data.os, "getpid", os.getppid)             # another live process id
        with data.staged(out) as second:
            assert second != first
            (Path(second) / "x").write_text("second")
        monkeypatch.undo()
        (Path(first) / "y").write_text("first")           # the first rank still writes its copy
    assert os.listdir(tmp_path) == ["set"] and os.listdir(out) == ["x"]
    assert (Path(out) / "x").read_text() == "second"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # left by a killed process
    stale = tmp_path / f"again.partial-{socket.gethostname()}-{dead.pid}"
    stale.mkdir()
    with data.staged(str(tmp_path / "again")) as tmp:
        (Path(tmp) / "z").write_text("z")
    assert sorted(os.listdir(tmp_path)) == ["again", "set"]


# ---------------------------------------------------------------- the renderer on another device
class MetaComputes(TorchDispatchMode):
    """Tensors on the `meta` device (present on every machine) that compute: each has a CPU twin
    holding its values, so code runs on "meta" end to end as on an accelerator, and an op mixing a
    meta tensor with a CPU tensor of >= 1 dimension fails as on CUDA (a 0-dim CPU tensor is
    allowed, as there)."""

    def __init__(self):
        super().__init__()
        self.values = {}                        # id(meta tensor) -> (meta tensor, its CPU values)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        cpu = [tuple(t.shape) for t in tensors if not t.is_meta and t.dim() > 0]
        if cpu and any(t.is_meta for t in tensors) and func not in (torch.ops.aten._to_copy.default,
                                                                     torch.ops.aten.copy_.default):
            raise RuntimeError(f"{func}: a CPU tensor of shape {cpu[0]} meets tensors on the "
                               "device")
        device, back = kwargs.get("device"), {}
        if device is not None:
            on_meta = torch.device(device).type == "meta"
        else:
            on_meta = any(t.is_meta for t in tensors)

        def values(x):
            if isinstance(x, torch.Tensor) and x.is_meta:
                back[id(self.values[id(x)][1])] = x
                return self.values[id(x)][1]
            return torch.device("cpu") if isinstance(x, torch.device) and x.type == "meta" else x

        def to_meta(out):
            if not isinstance(out, torch.Tensor) or not on_meta:
                return out
            if id(out) in back:                           # an in-place op returns its input
                return back[id(out)]
            twin = torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device="meta")
            self.values[id(twin)] = (twin, out)
            return twin
        return tree_map(to_meta, func(*tree_map(values, args), **tree_map(values, kwargs)))


class MetaFromData(TorchFunctionMode):
    """torch.tensor, torch.as_tensor and Tensor.new_tensor make a device tensor from data without a
    dispatched op: made on the CPU and copied over, they get their values under MetaComputes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.new_tensor and args[0].is_meta and kwargs.get("device") is None:
            return torch.tensor(args[1], dtype=kwargs.get("dtype") or args[0].dtype).to("meta")
        device = kwargs.get("device")
        from_data = func in (torch.tensor, torch.as_tensor) and device is not None
        if from_data and torch.device(device).type == "meta" and not torch.is_tensor(args[0]):
            return func(*args, **dict(kwargs, device="cpu")).to("meta")
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_device():
    with MetaComputes(), MetaFromData():
        yield


def test_render_runs_on_another_device(tmp_path):
    # The meta device stands in for CUDA: a tensor made on the CPU (a constant without device=)
    # that meets the device tensors fails here as it does on a GPU (`make-3diebench --device cuda`
    # crashed so in hsv_to_rgb).
    # real meta tensors
    assert data.hsv_to_rgb(torch.rand(5, device="meta"), 0.6, 0.6).device.type == "meta"
    verts, faces, colors = data.object_mesh(1, np.random.default_rng(0), paint="axes")
    lat = data.sample_latents(np.random.default_rng(0), 2)
    path = write_mesh(tmp_path, "quad", QUAD, mtl="map_Kd tex.png",
                      texture=np.full((4, 4, 3), 200, np.uint8))
    quad = data.read_obj(str(path))
    expected = [data.render(verts, faces, colors, lat, 16, alpha=True), data.render(*quad, lat, 16)]
    with meta_device():
        # the quad's faces and texture stay on the CPU
        on_meta = [data.render(verts.to("meta"), faces.to("meta"), colors.to("meta"), lat, 16,
                               alpha=True),
                   data.render(quad[0].to("meta"), *quad[1:], lat, 16)]
        assert all(x.is_meta for x in on_meta)
        got = [x.cpu() for x in on_meta]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))         # the very same pixels


# ---------------------------------------------------------------- missing textures: Kd colour
def test_missing_texture_renders_with_the_material_colour(tmp_path, capsys):
    lost = write_mesh(tmp_path / "m" / "lamp" / "lost", "lamp", QUAD,
                      mtl="Kd 0.1 0.5 0.9\nmap_Kd f:/images/wood.jpg")
    fallbacks = []
    verts, faces, (uv, material, atlas) = data.read_obj(str(lost), fallbacks=fallbacks)
    assert fallbacks == [(str(lost), str(lost.parent / "f:/images/wood.jpg"),
                          "missing or unreadable")]
    assert torch.allclose(atlas[1], torch.tensor([0.1, 0.5, 0.9]).view(3, 1, 1).expand(3, 128, 128))
    write_mesh(tmp_path / "m" / "lamp" / "kept", "lamp", TETRA, mtl="Kd 1 1 0")
    write_mesh(tmp_path / "m" / "bed" / "a", "bed", TETRA, mtl="Kd 0 1 0")
    write_mesh(tmp_path / "m" / "bed" / "b", "bed", QUAD,
               mtl="Kd 0 1 0\nmap_Kd C:\\Documents and Settings\\x.jpg")
    no_mtl = write_mesh(tmp_path / "m" / "bed" / "c", "bed",
                        "mtllib gone.mtl\nusemtl wood\n" + TETRA)
    # grey, as without Kd
    assert torch.equal(data.read_obj(str(no_mtl))[2][2], torch.full((2, 3, 1, 1), 0.8))
    out = tmp_path / "out"
    data.main(["make-3diebench", str(out), "--meshes", str(tmp_path / "m"), "--views", "2",
               "--size", "16"])
    err = capsys.readouterr().err.splitlines()
    notes = [line for line in err if "MTL" in line]
    assert len(notes) == 1, err
    assert notes[0].startswith("3 of 5 meshes: a texture or MTL file missing or unreadable, "
                               "rendered with their material's diffuse colour (Kd; grey without "
                               f"the MTL) instead; first: {tmp_path / 'm' / 'bed' / 'b'}"), err
    assert not [line for line in err if "skipped" in line]
    entries = sorted(np.concatenate([np.load(out / f"{s}_images.npy") for s in ("train", "val")]))
    assert entries == ["/bed/a/", "/bed/b/", "/bed/c/", "/lamp/kept/", "/lamp/lost/"]
    assert data.check(str(out), progress=False) == {}


def test_mesh_sets_that_training_cannot_use_are_refused(tmp_path):
    for c in ("bed", "lamp"):
        write_mesh(tmp_path / "one" / c, "only", TETRA)        # one model per class: no val object
    with pytest.raises(data.DataError, match=f"^{tmp_path / 'one'}: no class has 2 usable objects"):
        data.make_3diebench(str(tmp_path / "out"), views=2, size=16, meshes=str(tmp_path / "one"),
                            progress=False)
    for c in range(56):
        write_mesh(tmp_path / "many" / f"class{c}", "m", TETRA)
    with pytest.raises(data.DataError,
                       match=f"^{tmp_path / 'many'}: 56 class folders; 3DIEBench has 55"):
        data.make_3diebench(str(tmp_path / "out"), views=2, size=16, meshes=str(tmp_path / "many"),
                            progress=False)
    assert sorted(os.listdir(tmp_path)) == ["many", "one"]


# ---------------------------------------------------------------- the torch floor
def requirement_floor(name):
    """The (major, minor) of `name>=X.Y` in requirements.txt."""
    text = (REPO / "requirements.txt").read_text()
    return tuple(int(x) for x in re.search(rf"^{name}>=(\d+)\.(\d+)", text, re.M).groups())


def test_torch_floor_admits_no_known_weights_only_bypass():
    # Checkpoints are read with torch.load(weights_only=True); a crafted file runs code through it
    # below 2.6.0 (CVE-2025-32434) and below 2.10.0 (CVE-2026-24747).
    torch_floor, vision_floor = requirement_floor("torch"), requirement_floor("torchvision")
    assert torch_floor >= (2, 10)
    # torchvision 0.(N + 15) is the release for torch 2.N (0.25.0 requires torch==2.10.0): a lower
    # torchvision floor would only admit pairs that the torch floor excludes
    assert torch_floor[0] == 2 and vision_floor == (0, torch_floor[1] + 15)
    import torchvision
    installed = [tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", v).groups())
                 for v in (torch.__version__, torchvision.__version__)]
    assert installed[0] >= torch_floor and installed[1] >= vision_floor


# ---------------------------------------------------------------- mesh import: no path outside
def test_mesh_paths_outside_the_model_folder_are_refused(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.fromarray(np.full((4, 4, 3), [255, 0, 0], np.uint8)).save(outside / "evil.png")
    (outside / "evil.mtl").write_text("newmtl paint\nKd 0 1 0\nmap_Kd evil.png\n")
    meshes = tmp_path / "m"
    # mtllib up and out of the model's folder: not read, grey as without an MTL
    climbing = meshes / "lamp" / "a" / "a.obj"
    climbing.parent.mkdir(parents=True)
    climbing.write_text("mtllib ../../../outside/evil.mtl\nusemtl paint\n" + QUAD)
    # an absolute texture path, and a link inside the model to a file outside it: Kd instead
    absolute = write_mesh(meshes / "lamp" / "b", "b", QUAD,
                          mtl=f"Kd 0.1 0.5 0.9\nmap_Kd {outside / 'evil.png'}")
    linked = write_mesh(meshes / "lamp" / "c", "c", QUAD, mtl="Kd 0.1 0.5 0.9\nmap_Kd tex.png")
    (linked.parent / "tex.png").symlink_to(outside / "evil.png")
    # ShapeNet v2: models/model_normalized.mtl names ../images/, inside the model's folder: read
    shapenet = write_mesh(meshes / "bed" / "d" / "models", "model_normalized", QUAD,
                          mtl="Kd 0.1 0.5 0.9\nmap_Kd ../images/tex.png")
    (meshes / "bed" / "d" / "images").mkdir()
    Image.fromarray(np.full((4, 4, 3), [0, 0, 255], np.uint8)).save(
        meshes / "bed" / "d" / "images" / "tex.png")
    write_mesh(meshes / "bed" / "e", "e", TETRA, mtl="Kd 0 1 0")
    refused = "outside the model's folder (refused)"
    fallbacks = []
    atlas = data.read_obj(str(climbing), fallbacks=fallbacks)[2][2]
    assert fallbacks == [(str(climbing), str(meshes / "lamp" / "a/../../../outside/evil.mtl"),
                          refused)]
    assert torch.equal(atlas, torch.full((2, 3, 1, 1), 0.8))
    kd = torch.tensor([0.1, 0.5, 0.9]).view(3, 1, 1).expand(3, 128, 128)
    for model in (absolute, linked):
        fallbacks = []
        assert torch.equal(data.read_obj(str(model), fallbacks=fallbacks)[2][2][1], kd)
        assert [why for _, _, why in fallbacks] == [refused]
    fallbacks = []
    texture = data.read_obj(str(shapenet), fallbacks=fallbacks,
                            model_folder=str(meshes / "bed" / "d"))[2][2][1]
    assert fallbacks == [] and torch.equal(texture, torch.tensor([0.0, 0, 1]).view(3, 1, 1)
                                           .expand(3, 128, 128))
    data.main(["make-3diebench", str(tmp_path / "out"), "--meshes", str(meshes), "--views", "2",
               "--size", "16"])
    err = capsys.readouterr().err.splitlines()
    notes = [line for line in err if "MTL" in line]
    assert notes == [f"3 of 5 meshes: a texture or MTL file {refused}, rendered with their "
                     "material's diffuse colour (Kd; grey without the MTL) instead; first: "
                     f"{climbing} ({meshes / 'lamp' / 'a/../../../outside/evil.mtl'})"], err


# ---------------------------------------------------------------- one layout per root
def test_layout_is_decided_once_and_refuses_an_ambiguous_root(toy_root, toy_imagefolder,
                                                              tmp_path, monkeypatch, capsys):
    assert data.layout(toy_root) == data.layout(toy_root, "3DIEBench") == "3DIEBench"
    assert data.layout(toy_imagefolder, "ImageFolder") == "ImageFolder"
    # an ImageFolder root with a stray 3DIEBench list file: ser.py trained on it, then the
    # evaluation read it as 3DIEBench
    root = tmp_path / "imf"
    shutil.copytree(toy_imagefolder, root)
    np.save(root / "train_images.npy", np.array(["/a/b/"]))
    stray = (f"^{root / 'train_images.npy'}: a 3DIEBench list file in a root that has the "
             f"ImageFolder split folder {root / 'train'}")
    for call in (data.layout, data.check):
        with pytest.raises(data.DataError, match=stray):
            call(str(root))
    for kind in ("ImageFolder", "3DIEBench"):
        with pytest.raises(data.DataError, match=stray):
            data.preflight(str(root), kind)
    with pytest.raises(SystemExit) as end:
        data.main(["check", str(root), "--quick"])
    assert end.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    # the other layout than the script reads: named by the file that shows it
    with pytest.raises(data.DataError, match=f"^{Path(toy_root) / 'train_images.npy'}: a "
                       f"3DIEBench list file: {toy_root} is a 3DIEBench root, not the "
                       "ImageFolder root expected here"):
        data.preflight(toy_root, "ImageFolder")
    with pytest.raises(data.DataError, match=f"^{Path(toy_imagefolder) / 'train'}: an ImageFolder "
                       "split folder"):
        data.preflight(toy_imagefolder, "3DIEBench")
    # a root not there yet: the expected layout, else the one of its default location
    monkeypatch.chdir(tmp_path)
    assert data.layout("nowhere", "ImageFolder") == "ImageFolder"
    assert data.layout("nowhere") == "3DIEBench"
    assert data.layout(data.DEFAULT_IMAGEFOLDER_ROOT) == "ImageFolder"


# ---------------------------------------------------------------- latents within 3DIEBench's ranges
def test_out_of_range_latents_are_named_at_load_time(broken, tmp_path):
    root, folders = broken
    path = folders[3] / "latent_5.npy"
    good = np.load(path)
    for column, value, what in ((0, 1e6, "angle x 1e+06 outside [-pi, pi]"),
                                (2, -1e39, "angle z -1e+39 outside [-pi, pi]"),   # inf in float32
                                (6, 1.01, "spot hue 1.01 outside [0, 1]")):
        bad = good.copy()
        bad[column] = value
        np.save(path, bad)
        with pytest.raises(data.DataError) as e:
            data.load_latent(str(path))                    # what the training pairs read
        assert str(e.value) == (f"{path}: {what} (3DIEBench: angles within +-pi/2, +-pi in "
                                "its OOD set; hues in [0, 1])")
    p = cli("check", root)                                 # the checker's finding
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"{path}: spot hue 1.01" in p.stderr
    # float rounding at the limits passes: a float32 pi/2, a hue of 1 + 1e-7
    edge = good.copy()
    edge[[0, 3]] = [np.float32(np.pi / 2), 1 + 1e-7]
    np.save(path, edge)
    assert np.array_equal(data.load_latent(str(path)), edge)
    # a val table: evaluation's loader and the start-up check name the table, the row, the object
    table = np.load(root / "all_latents_val.npy")
    table[120, 1] = 4.0
    np.save(root / "all_latents_val.npy", table)
    entry = np.load(root / "val_images.npy")[2]
    message = (f"{root / 'all_latents_val.npy'}: 1 row(s) out of range, first: row 120 ({entry} "
               "view 20): angle y 4 outside [-pi, pi]")
    for load in (data.load_all_latents, data.Views3DIEBench):
        with pytest.raises(data.DataError, match=re.escape(message)):
            load(str(root), "val")
    with pytest.raises(data.DataError, match=re.escape(message)):
        data.preflight(str(root))
    # the OOD set (|angle| up to pi) is in range
    ood = data.make_3diebench(str(tmp_path / "ood"), classes=1, objects_per_class=2, views=50,
                              size=8, ood=True, progress=False)
    assert np.abs(data.load_all_latents(ood, "train")[:, :3]).max() > 3.0
    assert data.check(ood, progress=False) == {}
