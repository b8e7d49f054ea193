"""bench.py runs on CPU and reports every field; the --decode gpu data path (data.py's JPEG bytes
in the workers, decode_jpegs in the main process) gives the same batches as the PIL path. No speed
is asserted."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import REPO, run

import data

FIELDS = {"script", "mode", "device", "batch", "resolution", "amp", "compile", "ms_per_step",
          "per_s", "unit", "ms_blocks", "data_wait", "peak_mem_mib", "peak_mem_kind", "vs_ceiling"}


def test_bench_prints_json_lines_and_table(tmp_path, toy_root, toy_imagefolder):
    cmd = (f"python {REPO / 'bench.py'} --scripts sie,baselines,ser --batch 4 --ser-batch 16 "
           f"--resolution 32 --ser-resolution 32 --steps 1 --repeats 2 --warmup 1 --num-workers 0 "
           f"--decode pil,gpu --data-root {toy_root} --imagefolder-root {toy_imagefolder} "
           f"--data-dir {tmp_path / 'gen'}")
    out = run(cmd, cwd=tmp_path, timeout=120).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    modes = [(r["script"], r["mode"], r.get("decode")) for r in rows]
    expected = [("sie", "ceiling", None), ("sie", "step", None), ("sie", "e2e", "pil"),
                ("sie", "e2e", "gpu")]
    expected += [("baselines:vicreg", m, d)
                 for m, d in (("ceiling", None), ("step", None), ("e2e", "pil"))]
    expected += [("ser:moco", m, d)
                 for m, d in (("ceiling", None), ("vanilla", None), ("step", None), ("e2e", "pil"))]
    assert modes == expected
    for r in rows:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["device"] == "cpu" and r["ms_per_step"] > 0 and len(r["ms_blocks"]) == 2
        assert r["per_s"] == pytest.approx(r["batch"] / r["ms_per_step"] * 1e3)
        assert r["unit"] == ("images/s" if r["script"].startswith("ser") else "pairs/s")
        assert (r["vs_ceiling"] is None) == (r["mode"] == "ceiling")
        assert (r["data_wait"] is None) == (r["mode"] != "e2e")
    ser_step = next(r for r in rows if r["script"] == "ser:moco" and r["mode"] == "step")
    vanilla = next(r for r in rows if r["script"] == "ser:moco" and r["mode"] == "vanilla")
    assert ser_step["vs_vanilla"] == pytest.approx(ser_step["ms_per_step"] / vanilla["ms_per_step"])
    table = out[out.index("script  "):].splitlines()
    assert len(table) == 1 + len(rows) and "vs_vanilla" in table[0]
    assert not os.path.exists(tmp_path / "gen")          # given roots: nothing generated


def test_bench_rejects_unknown_script(tmp_path):
    proc = run(f"python {REPO / 'bench.py'} --scripts sie,nope", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "--scripts: unknown nope" in proc.stderr


@pytest.mark.parametrize("size", [None, 24])
@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_fast_decode_paths_match_pil(toy_root, size, decode):
    pil = data.Pairs3DIEBench(toy_root, "train", size=size, seed=3)
    fast = data.JpegPairs3DIEBench(toy_root, "train", size=size, seed=3, decode=decode)
    pil.set_epoch(2), fast.set_epoch(2)
    items = [pil[i] for i in range(6)]
    fast_items = [fast[i] for i in range(6)]
    if decode == "gpu":       # the workers' items hold numpy byte arrays only, no tensors
        assert all(isinstance(it[k], np.ndarray) and it[k].dtype == np.uint8
                   for it in fast_items for k in (0, 1))
        b1, b2, g, labels = data.collate_jpegs(fast_items)
        x1, x2 = (data.decode_jpegs(b, "cpu") for b in (b1, b2))
    else:
        x1, x2, g, labels = torch.utils.data.default_collate(fast_items)
    for k, x in enumerate((x1, x2)):
        assert x.dtype == torch.uint8
        x, ref = data.to_float(x, size), torch.stack([it[k] for it in items])
        assert x.shape == ref.shape and x.dtype == torch.float32
        # The same decoder (libjpeg-turbo) at the native size; a resize differs by PIL's uint8
        # rounding (~1/255 of the range = 0.04 after dividing by STD ~ 0.1).
        assert (x - ref).abs().max() <= (0 if size is None else 0.06)
    assert torch.equal(g, torch.stack([it[2] for it in items]))
    assert labels.tolist() == [it[3] for it in items]


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_sie_fast_decode_loader_matches_pil(toy_root, tmp_path, decode):
    import sie
    batches = {}
    for d in ("pil", decode):
        args = sie.parse_args(["--data-root", toy_root, "--batch-size", "8", "--resolution", "24",
                               "--num-workers", "1", "--decode", d, "--run-dir", str(tmp_path / d)])
        loader, _ = sie.make_loader(args, 0, 1)
        batches[d] = sie.to_device(next(iter(loader)), torch.device("cpu"), args)
    for a, b in zip(batches["pil"], batches[decode]):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert (a.float() - b.float()).abs().max() <= 0.06


def test_bad_jpegs_name_the_file(toy_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(toy_root, root)
    for decode in ("cpu", "gpu"):
        ds = data.JpegPairs3DIEBench(str(root), "train", decode=decode)
        path = ds.path(0, "image_0.jpg")
        with open(path, "rb") as f:
            head = f.read()
        with open(path, "wb") as f:
            f.write(head[:200])                           # truncated
        with pytest.raises(data.DataError, match="image_0.jpg: not a JPEG, or truncated"):
            ds.image(0, 0)
        os.remove(path)
        with pytest.raises(data.DataError, match="image_0.jpg: missing image"):
            ds.image(0, 0)
        with open(path, "wb") as f:                       # markers fine, the body corrupt
            f.write(head[:2] + bytes(len(head) - 4) + head[-2:])
        if decode == "cpu":
            with pytest.raises(data.DataError, match="image_0.jpg: corrupt JPEG"):
                ds.image(0, 0)
        else:
            with pytest.raises(data.DataError, match="does not decode"):
                data.decode_jpegs([ds.image(0, 0)], "cpu")
