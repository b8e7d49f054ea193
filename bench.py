"""bench.py: how fast the REAL training step of sie.py, baselines.py and ser.py runs (imported,
never re-written), on fixed tensors already on the device, end to end from generated JPEG files
through the script's own DataLoader, and against the backbone alone; prints one JSON line per
configuration, then a table.

    python bench.py                  # CPU, tiny sizes: 1-2 minutes on 2 cores
    python bench.py --preset paper   # one GPU: 256 px (ViT 224 px), per-GPU batch 128/256/1024
    python bench.py --scripts sie --batch 32,64 --resolution 64 --steps 10 --compile
    python bench.py --scripts ser --ser-flags "--equiv-objective equimod"   # an add-on vs the base

Modes (one JSON line each): `ceiling` = the backbone alone, two views, fwd + bwd + Adam(W)
(ResNet-18 for sie/baselines, the ViT for ser); `step` = the script's train_step on one batch
kept on the device; `vanilla` = ser.py's step with --ser off (the base method alone); `e2e` =
next(loader) + to_device + train_step on a generated look-alike data set (data_wait = time
blocked on the loader / total).
Ratios: vs_ceiling = ceiling ms / step ms (the target is >= 0.8), vs_vanilla = SER ms / vanilla
ms (the target is <= 1.05; with --ser-flags, that configuration's ms / the 2-view base's).
Throughput counts pairs for sie/baselines and images for ser (each image of the batch once per
step). Warm-up and compilation are excluded; every timed block ends
with torch.cuda.synchronize on GPU; each figure is the median of --repeats blocks. data_wait and
the host_syncs count (CUDA's sync debug mode) are reported too.
Peak memory: torch.cuda.max_memory_allocated on GPU, the process's ru_maxrss so far on CPU.
"""
import argparse
import gc
import importlib
import json
import math
import os
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import torch

import data
import eval  # noqa: A004 (the project's eval.py: its argparse types)

PRESETS = {  # sizes; every flag overrides
    "toy": dict(batch="16", ser_batch="32", resolution=32, ser_resolution=32, decode="pil,cpu",
                steps=4, warmup=2, repeats=3, num_workers=1, max_objects=2000),
    "paper": dict(batch="128,256,1024", ser_batch="256", resolution=256, ser_resolution=224,
                  decode="pil,cpu,gpu", steps=10, warmup=5, repeats=3, num_workers=16,
                  max_objects=16384),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="toy",
                   help="toy: CPU minutes; paper: the paper's sizes")
    p.add_argument("--scripts", default="sie,baselines,ser",
                   help="comma-separated: sie, baselines, ser")
    p.add_argument("--modes", default="ceiling,step,e2e",
                   help="comma-separated: ceiling, step, e2e")
    p.add_argument("--method", default="vicreg", help="baselines.py --method")
    p.add_argument("--base", default="moco", help="ser.py --base")
    p.add_argument("--ser-flags", default="",
                   help="more ser.py flags for its step and e2e modes, e.g. '--equiv-objective "
                        "essl' or '--local-crops 4' (vanilla stays the 2-view base, --ser off)")
    p.add_argument("--batch",
                   help="per-GPU batch in pairs (sie, baselines), comma-separated for several")
    p.add_argument("--ser-batch", help="per-GPU batch in images (ser), comma-separated")
    p.add_argument("--resolution", type=eval.number(int, 1),
                   help="image side for sie/baselines, px (paper 256)")
    p.add_argument("--ser-resolution", type=eval.number(int, 1),
                   help="crop side for ser, px (paper 224)")
    p.add_argument("--steps", type=eval.number(int, 1), help="timed steps per repeat")
    p.add_argument("--repeats", type=eval.number(int, 1),
                   help="timed blocks; the median is reported")
    p.add_argument("--warmup", type=eval.number(int, 0),
                   help="untimed steps first (compilation, cuDNN autotuning, allocator)")
    p.add_argument("--num-workers", type=eval.number(int, 0), help="DataLoader workers for e2e")
    p.add_argument("--max-objects", type=eval.number(int, 1),
                   help="cap on the generated e2e data set (objects / images)")
    p.add_argument("--data-dir", default="data/bench",
                   help="where generated e2e data sets are cached")
    p.add_argument("--data-root",
                   help="a 3DIEBench root (real or generated) for sie/baselines instead")
    p.add_argument("--imagefolder-root",
                   help="an ImageFolder root (train/<wnid>/*.JPEG) for ser instead")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu")
    p.add_argument("--amp", choices=("bf16", "fp16", "none"), default="bf16",
                   help="the scripts' --amp (CUDA only)")
    p.add_argument("--compile", action="store_true",
                   help="the scripts' --compile (torch.compile; off by default)")
    p.add_argument("--decode",
                   help="sie.py --decode data paths timed e2e, comma-separated: pil, cpu, gpu")
    # After every add_argument: the preset's values become the defaults (a flag's own default=
    # would win).
    p.set_defaults(**PRESETS[p.parse_known_args(argv)[0].preset])
    opts = p.parse_args(argv)
    for flag, value, known in (("--scripts", opts.scripts, ("sie", "baselines", "ser")),
                               ("--modes", opts.modes, ("ceiling", "step", "e2e")),
                               ("--decode", opts.decode, ("pil", "cpu", "gpu"))):
        if not set(value.split(",")) <= set(known):
            unknown = ", ".join(sorted(set(value.split(",")) - set(known)))
            p.error(f"{flag}: unknown {unknown} (choose from {known})")
    return opts


# ================================== timing ==================================
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_blocks(step, opts, device):
    """Warm-up steps, then --repeats blocks of --steps steps -> (ms per step of each block, wall
    seconds). Each block starts and ends with a device synchronize, so queued GPU work is inside
    its block."""
    for _ in range(opts.warmup):
        step()
    sync(device)
    block_ms, t0 = [], time.perf_counter()
    for _ in range(opts.repeats):
        t = time.perf_counter()
        for _ in range(opts.steps):
            step()
        sync(device)
        block_ms.append((time.perf_counter() - t) * 1e3 / opts.steps)
    return block_ms, time.perf_counter() - t0


def host_syncs(step, device):
    """Host-device synchronisations in one step, counted by CUDA's sync debug mode (None on
    CPU)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(device)
    return sum("called a synchronizing" in str(w.message) for w in caught)


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # KiB on Linux


def release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ================================ data sets =================================
def bench_data(kind, size, n, opts, device):
    """A generated look-alike big enough for the timed e2e steps (capped), cached under
    --data-dir."""
    n = min(n, opts.max_objects)
    root = os.path.join(opts.data_dir, f"{kind}-{size}px-{n}")
    if not os.path.isdir(root):
        print(f"bench: generating {root} (one-off)", flush=True)
        if kind == "3diebench":     # ~20 % of the objects go to val; 2 views are enough for pairs
            data.make_3diebench(root, classes=4, objects_per_class=math.ceil(n / 4 / 0.75) + 1,
                                views=2, size=size,
                                device="cuda" if device.type == "cuda" else "cpu", progress=False)
        else:
            data.make_imagefolder(root, classes=4, train_per_class=math.ceil(n / 4),
                                  val_per_class=2, size=size, progress=False)
    return root


# ============================== configurations ==============================
def script_setup(name, opts, batch, device, extra=()):
    """The script's own args and setup_run (loader, model, optimiser, scaler) in a scratch run
    dir -> (module, args, loader, step(batch) = the script's train_step)."""
    mod = importlib.import_module(name)
    ser = name == "ser"
    res = opts.ser_resolution if ser else opts.resolution
    n = batch * (opts.warmup + opts.steps * opts.repeats + 1)
    root = (opts.imagefolder_root if ser else opts.data_root) or bench_data(
        "imagefolder" if ser else "3diebench", max(64, res * 8 // 7) if ser else res, n, opts,
        device)
    argv = ["--preset", opts.preset, "--batch-size", str(batch), "--resolution", str(res),
            "--data-root", root, "--num-workers", str(opts.num_workers), "--amp", opts.amp,
            "--no-eval", *extra, "--run-dir", tempfile.mkdtemp(prefix=f"bench-{name}-")]
    argv += ["--compile"] if opts.compile else []
    a = mod.parse_args(argv)
    loader, _, model, optimizer, scaler, _, _ = mod.setup_run(a, 0, 1, device)
    model.train()
    count = [0]

    def step(batch):     # ser's step also takes the global step (its schedules and b2 draws)
        count[0] += 1
        more = (count[0], 1000) if ser else ()
        return mod.train_step(model, batch, optimizer, scaler, a, *more)
    return mod, a, loader, step


def loader_forever(loader):
    """Epoch after epoch, as the scripts' train loops do (sampler and view choice re-seeded per
    epoch)."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        yield from loader
        epoch += 1


def ceiling_step(mod, a, batch, device):
    """The backbone alone on the step's two views: fwd + bwd + fused Adam(W), same autocast and
    layout."""
    amp = dict(dtype=torch.float16 if a.amp == "fp16" else torch.bfloat16,
               enabled=device.type == "cuda" and a.amp != "none")
    if mod.__name__ == "ser":
        net = mod.ViT(a.resolution, a.patch, a.dim, a.depth, a.heads, cls_at=0).to(device)
        views = [mod.normalize(x) for x in batch[:2]]
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    else:
        net = mod.ResNet18().to(device, memory_format=torch.channels_last)
        views = batch[:2]
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=device.type == "cuda")
    if a.compile:
        net.compile()

    def step():
        with torch.autocast(device.type, **amp):
            out = [net(v) for v in views]
            loss = sum((o[0] if isinstance(o, tuple) else o).float().square().mean()
                       for o in out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def bench_config(name, batch, opts, device, emit):
    """Every mode of one script at one batch size; emits rows as they are measured."""
    label = {"sie": "sie", "baselines": f"baselines:{opts.method}",
             "ser": f"ser:{opts.base} {opts.ser_flags}".strip()}[name]
    extra = {"sie": [], "baselines": ["--method", opts.method],
             "ser": ["--base", opts.base, *shlex.split(opts.ser_flags)]}[name]
    modes, unit = opts.modes.split(","), "images/s" if name == "ser" else "pairs/s"
    mod, a, loader, step = script_setup(name, opts, batch, device, extra)
    def to_dev(batch):
        return mod.to_device(batch, device, a)
    fixed = to_dev(next(iter(loader)))                  # one real batch, kept on the device
    ms = {}

    def measure(mode, step, wait=None, **more):
        release(device)
        blocks, wall = time_blocks(step, opts, device)
        ms[mode] = statistics.median(blocks)
        row = dict(script=label, mode=mode, device=str(device), batch=batch,
                   resolution=a.resolution, amp=a.amp if device.type == "cuda" else "fp32",
                   compile=opts.compile, ms_per_step=ms[mode], per_s=batch / ms[mode] * 1e3,
                   unit=unit, ms_blocks=blocks,
                   data_wait=None if wait is None else wait[0] / wall,
                   peak_mem_mib=peak_memory_mib(device),
                   peak_mem_kind=("cuda_max_allocated" if device.type == "cuda"
                                  else "process_ru_maxrss"), **more)
        has_ceiling = "ceiling" in ms and mode != "ceiling"
        row["vs_ceiling"] = ms["ceiling"] / ms[mode] if has_ceiling else None
        if name == "ser" and mode == "step" and "vanilla" in ms:
            row["vs_vanilla"] = ms[mode] / ms["vanilla"]
        emit(row)

    if "ceiling" in modes:
        measure("ceiling", ceiling_step(mod, a, fixed, device))
    if name == "ser" and "step" in modes:          # the base method alone, same sizes, side by side
        v_step = script_setup(name, opts, batch, device, ["--base", opts.base, "--ser", "off"])[3]

        def vanilla_on_fixed():
            return v_step(fixed)
        measure("vanilla", vanilla_on_fixed, syncs=host_syncs(vanilla_on_fixed, device))
        del v_step, vanilla_on_fixed
    if "step" in modes:
        def step_on_fixed():
            return step(fixed)
        measure("step", step_on_fixed, syncs=host_syncs(step_on_fixed, device))
    decodes = opts.decode.split(",") if name == "sie" else ["pil"]      # only sie.py has --decode
    for decode in decodes if "e2e" in modes else []:
        if name == "sie":              # sie.py --decode: its own loader for each data path
            a.decode = decode
            loader = mod.make_loader(a, 0, 1)[0]
        batches, wait = loader_forever(loader), [0.0]

        def e2e():
            t = time.perf_counter()
            b = next(batches)
            wait[0] += time.perf_counter() - t
            step(to_dev(b))
        for _ in range(opts.warmup):   # workers started and warm before the wait is counted
            e2e()
        wait[0] = 0.0
        measure("e2e", e2e, wait=wait, num_workers=a.num_workers, decode=decode)
        del batches
    shutil.rmtree(a.run_dir, ignore_errors=True)
    return ms


# ================================== report ==================================
def print_table(rows):
    cols = [("script", "{}"), ("mode", "{}"), ("decode", "{}"), ("batch", "{}"),
            ("resolution", "{}"), ("ms_per_step", "{:.1f}"), ("per_s", "{:.0f}"), ("unit", "{}"),
            ("data_wait", "{:.0%}"), ("peak_mem_mib", "{:.0f}"), ("vs_ceiling", "{:.2f}"),
            ("vs_vanilla", "{:.3f}")]
    cells = [[c for c, _ in cols]]
    cells += [["-" if r.get(c) is None else f.format(r[c]) for c, f in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for row in cells:
        print("  ".join(v.rjust(w) if i > 2 else v.ljust(w)
                        for i, (v, w) in enumerate(zip(row, widths))))


def main(argv=None):
    opts = parse_args(argv)
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench.py: error: --device cuda but no GPU is visible (use --device cpu)",
              file=sys.stderr)
        sys.exit(2)
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"bench: {name}, torch {torch.__version__}, {torch.get_num_threads()} threads",
          flush=True)
    for name in opts.scripts.split(","):
        for batch in (opts.ser_batch if name == "ser" else opts.batch).split(","):
            bench_config(name, int(batch), opts, device, emit)
            release(device)
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
