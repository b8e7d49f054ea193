"""Shared test fixtures: one tiny generated 3DIEBench look-alike per test session, a scratch
working directory in which the README's commands run exactly as a user types them, and a
helper that runs such a command with this interpreter."""
import gc
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Tiny but complete: 4 classes x 5 objects x 50 views at 32x32 (1,000 JPEGs, a few seconds).
TOY = dict(classes=4, objects_per_class=5, views=50, size=32, seed=0)


@pytest.fixture()
def one_thread():
    """Small tensors: one intra-op thread is faster, and far faster on a shared CPU."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """Path (str) of a generated data set in the real 3DIEBench layout."""
    import data
    out = tmp_path_factory.mktemp("toy3die") / "3diebench"
    data.make_3diebench(str(out), **TOY)
    return str(out)


@pytest.fixture()
def workdir(tmp_path, toy_root):
    """A cwd holding links to the project's scripts and the toy set at the scripts' default data
    location, so a README command such as `python sie.py ...` runs unchanged."""
    for f in REPO.glob("*.py"):
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "3diebench-toy").symlink_to(toy_root)
    return tmp_path


@pytest.fixture()
def imagefolder_workdir(tmp_path, toy_imagefolder):
    """Like `workdir`, with the toy ImageFolder at its default location (for ser.py commands)."""
    for f in REPO.glob("*.py"):
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "imagefolder-toy").symlink_to(toy_imagefolder)
    return tmp_path


def run(cmd, cwd, timeout=300, check=True, env=None):
    """Run a shell-style command as a user would; `python` and `torchrun` are mapped to this
    interpreter so the test uses the same environment. Returns the CompletedProcess."""
    argv = shlex.split(cmd)
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    elif argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run"] + argv[1:]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    full_env.update(env or {})
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"`{cmd}` exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


def readme_commands(script):
    """Every command line in the README's ```bash blocks that runs `script` (e.g. "sie.py")."""
    text = (REPO / "README.md").read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if re.search(rf"(^|\s){re.escape(script)}(\s|$)", line):
                cmds.append(line)
    return list(dict.fromkeys(cmds))                 # a command shown twice runs once


@pytest.fixture(scope="session")
def toy_imagefolder(tmp_path_factory):
    """Path (str) of a generated ImageNet-style folder (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG)."""
    import data
    out = tmp_path_factory.mktemp("toyimf") / "imagefolder"
    data.make_imagefolder(str(out), classes=4, train_per_class=16, val_per_class=8, size=32, seed=0)
    return str(out)


def leave_process_group():
    """The end of a spawned multi-process test worker. A DDP wrapper's reducer keeps the process
    group alive past destroy_process_group, so its gloo context would live on until the interpreter
    exits; a rank that exits first then closes its sockets under that live context, and the worker
    dies with SIGABRT ('terminate called without an active exception'). So: drop the wrappers
    (the caller deletes its references; gc breaks their cycles), meet the other ranks at a
    barrier, and only then destroy the group, on every rank."""
    import torch.distributed as dist
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
