"""The training harness that sie.py and baselines.py share (the same text in each): presets that
take effect, flags refused in one line, the run dir lock, damaged and unwritable checkpoints, the
start-up checks that run before the first step, Ctrl-C, and torchrun launches (a fresh clone with
no data, two agents as two nodes)."""
import difflib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import baselines
import ser
import sie
from conftest import REPO, run

TINY = ["--resolution", "32", "--batch-size", "8", "--mlp", "64-64-64", "--num-workers", "0",
        "--log-every", "1", "--no-eval", "--epochs", "1"]
SER_TINY = ["--resolution", "16", "--patch", "4", "--dim", "32", "--depth", "3", "--heads", "2",
            "--ser-layer", "1", "--batch-size", "16", "--b2-ratio", "0.25", "--head-hidden", "64",
            "--head-dim", "32", "--token-dim", "32", "--num-workers", "0", "--log-every", "1",
            "--no-eval", "--epochs", "1"]
FLAGS = {"sie": TINY, "baselines": ["--method", "vicreg"] + TINY, "ser": SER_TINY}
METHOD_FLAGS = {"sie": [], "baselines": ["--method", "vicreg"], "ser": []}
MODULES = {"sie": sie, "baselines": baselines, "ser": ser}
DATA = {"sie": "toy_root", "baselines": "toy_root", "ser": "toy_imagefolder"}


@pytest.fixture(params=["sie", "baselines", "ser"])
def script(request):
    return request.param


@pytest.fixture()
def root(script, request):
    """The script's generated test data set (3DIEBench look-alike or ImageFolder)."""
    return request.getfixturevalue(DATA[script])


def tiny(script, data_root, run_dir, *extra):
    return FLAGS[script] + ["--data-root", data_root, "--run-dir", str(run_dir), *extra]


def epochs(script, done, total):
    """Flags that train `done` of `total` epochs: ser's lr schedule depends on --epochs, so it
    stops early with --stop-after-epochs; the others' constant lr allows a longer --epochs."""
    if script == "ser":
        return ["--epochs", str(total), "--stop-after-epochs", str(done)]
    return ["--epochs", str(done)]


def main_exit(script, argv, capsys):
    """Run script.main(argv) in-process; returns (exit code, what it printed on stderr)."""
    capsys.readouterr()                                          # forget earlier output
    with pytest.raises(SystemExit) as e:
        MODULES[script].main(argv)
    return e.value.code, capsys.readouterr().err


def read_log(run_dir, kind="train"):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [e for e in map(json.loads, f) if e["kind"] == kind]


# ---------------------------------------------------------------- presets and flags
@pytest.mark.parametrize("name", ["sie", "baselines"])   # ser.py's presets: tests/test_ser.py
def test_every_preset_value_takes_effect(name, monkeypatch):
    """Each preset key, changed to another valid value, is what parse_args returns (a flag's own
    default= must not win over the preset)."""
    module = MODULES[name]
    changed = {"epochs": 7, "batch_size": 6, "resolution": 40, "mlp": "24-24-24", "equi_dims": 200,
               "equi_emb_dims": 12, "num_workers": 3, "sim_coeff": 3.5, "equi_factor": 0.7,
               "std_coeff": 2.5, "cov_coeff": 0.3, "temperature": 0.3, "augself_weight": 0.4,
               "lr": 3e-4, "wd": 2e-5, "hypernet_gain": 0.5}
    for preset in module.PRESETS:
        for key in module.PRESETS[preset]:
            assert key in changed, f"{name} preset key {key}: add a changed value to this test"
            monkeypatch.setitem(module.PRESETS[preset], key, changed[key])
            args = module.parse_args(METHOD_FLAGS[name] + ["--preset", preset])
            assert getattr(args, key) == changed[key], f"{name} --preset {preset}: {key}"
            monkeypatch.undo()


BAD_FLAGS = [
    (["--resolution", "7"], "--resolution"), (["--resolution", "0"], "--resolution"),
    (["--mlp", "0-0-0"], "--mlp"), (["--mlp", "abc"], "--mlp"), (["--seed", "-1"], "--seed"),
    (["--num-workers", "-1"], "--num-workers"), (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"),
    (["--lr", "1e39"], "--lr"), (["--epochs", "0"], "--epochs"),
    (["--batch-size", "1"], "--batch-size"), (["--log-every", "0"], "--log-every"),
    (["--wd", "-1"], "--wd"), (["--resume", "missing.pt"], "--resume"),
]


def argv_id(value):
    """Test id: the flags of an argv, nothing for the flag it names (already in the argv)."""
    return " ".join(value) if isinstance(value, list) else ""


@pytest.mark.parametrize("name", ["sie", "baselines"])   # ser.py's flags: tests/test_ser.py
@pytest.mark.parametrize("argv, flag", BAD_FLAGS + [(["--equi-dims", "1"], "--equi-dims")],
                         ids=argv_id)
def test_bad_flags_are_one_argparse_line(name, argv, flag, capsys):
    if flag == "--equi-dims" and name == "baselines":
        argv, flag = ["--method", "vicreg-partinv", "--equi-emb-dims", "0"], "--equi-emb-dims"
    with pytest.raises(SystemExit) as e:
        MODULES[name].parse_args(METHOD_FLAGS[name] + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and flag in err and "Traceback" not in err


@pytest.mark.parametrize("argv, flag", [
    (["--seed", "4294967296"], "--seed"), (["--data-root", ""], "--data-root"),
    (["--equi-only", "--equi-dims", "100"], "--equi-dims"),
    (["--equi-dims", "512"], "--equi-dims")],
    ids=argv_id)
def test_sie_flags_that_were_ignored_or_a_traceback(argv, flag, capsys):
    """A seed numpy cannot take, an empty --data-root (it trained on the toy set) and an
    --equi-dims that --equi-only would drop: each one argparse line, exit 2."""
    with pytest.raises(SystemExit) as e:
        sie.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and flag in err and "Traceback" not in err


def test_batch_not_divisible_by_world_is_refused_once(script, monkeypatch, capsys):
    """Under torchrun every rank parses the flags: rank 0 prints one line, all exit 2."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    for rank, prints in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as e:
            MODULES[script].parse_args(METHOD_FLAGS[script] + ["--batch-size", "32"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and ("--batch-size" in err) == prints and (err != "") == prints


# ---------------------------------------------------------------- start-up checks, before step 1
def test_batch_larger_than_the_training_set_is_refused(script, root, tmp_path, capsys):
    code, err = main_exit(script, tiny(script, root, tmp_path / "r", "--batch-size", "256"), capsys)
    assert code == 2 and "--batch-size 256" in err
    assert not os.path.exists(tmp_path / "r" / "checkpoint.pt")


def test_eval_protocol_typo_is_refused_before_training(script, root, tmp_path, capsys):
    argv = [a for a in tiny(script, root, tmp_path / "r") if a != "--no-eval"]
    good = "linear" if script == "ser" else "classify"
    code, err = main_exit(script, argv + ["--eval-protocols", f"{good},retreival"], capsys)
    assert code == 2 and "retreival" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "r" / "log.jsonl")          # no step was taken


def test_a_second_run_on_a_locked_run_dir_is_refused(script, root, tmp_path, capsys):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    with open(run_dir / "lock", "a+") as held:                   # another run holds the dir
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("process 4242 on somehost\n")
        held.flush()
        code, err = main_exit(script, tiny(script, root, run_dir), capsys)
    assert code == 2 and "in use by process 4242" in err
    assert not os.path.exists(run_dir / "log.jsonl")
    MODULES[script].main(tiny(script, root, run_dir))        # released: the run goes ahead
    assert len(read_log(run_dir)) >= 2


def test_unwritable_run_dir_is_one_message(script, root, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    code, err = main_exit(script, tiny(script, root, tmp_path / "a_file" / "run"), capsys)
    assert code == 2 and "a_file" in err and "--run-dir" in err


# ---------------------------------------------------------------- checkpoint faults
def test_truncated_checkpoint_names_the_file_and_offers_the_previous_one(script, root, tmp_path,
                                                                         capsys):
    run_dir = tmp_path / "r"
    MODULES[script].main(tiny(script, root, run_dir, *epochs(script, 2, 3)))
    ckpt, prev = run_dir / "checkpoint.pt", run_dir / "checkpoint.prev.pt"
    assert torch.load(prev, weights_only=True)["epoch"] == 1     # the one before the last
    ckpt.write_bytes(ckpt.read_bytes()[:5000])                   # a damaged file
    code, err = main_exit(script, tiny(script, root, run_dir, "--epochs", "3"), capsys)
    assert code == 2 and str(ckpt) in err and f"--resume {prev}" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    MODULES[script].main(tiny(script, root, run_dir, "--epochs", "3", "--resume", str(prev)))
    assert torch.load(ckpt, weights_only=True)["epoch"] == 3


def test_full_disk_leaves_no_tmp_and_keeps_the_last_checkpoint(script, root, tmp_path,
                                                                monkeypatch, capsys):
    run_dir = tmp_path / "r"
    module = MODULES[script]
    module.main(tiny(script, root, run_dir, *epochs(script, 1, 2)))
    real_save = torch.save

    def save_then_disk_full(obj, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_then_disk_full)
    code, err = main_exit(script, tiny(script, root, run_dir, "--epochs", "2"), capsys)
    monkeypatch.setattr(torch, "save", real_save)
    assert code == 2 and "No space left on device" in err and "checkpoint.pt" in err
    assert not [f for f in os.listdir(run_dir) if f.endswith(".tmp")]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_stale_tmp_from_a_kill_while_saving_is_removed(script, root, tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint")
    MODULES[script].main(tiny(script, root, run_dir))
    assert not (run_dir / "checkpoint.pt.tmp").exists()


def test_start_up_removes_only_its_own_temporary_files(script, root, tmp_path):
    """A user's notes.tmp in the run dir survives the start-up clean-up of checkpoint.pt.tmp."""
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "notes.tmp").write_text("mine")
    (run_dir / "checkpoint.prev.pt.tmp").write_bytes(b"half a checkpoint")
    MODULES[script].main(tiny(script, root, run_dir))
    assert (run_dir / "notes.tmp").read_text() == "mine"
    assert not (run_dir / "checkpoint.prev.pt.tmp").exists()


def test_a_checkpoint_of_another_script_is_refused(script, root, tmp_path, capsys):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    torch.save({"script": "other", "args": {}, "model": {}}, run_dir / "checkpoint.pt")
    code, err = main_exit(script, tiny(script, root, run_dir), capsys)
    assert code == 2 and "checkpoint.pt" in err and "Traceback" not in err


# ---------------------------------------------------------------- the loss statistics are fp32
def test_loss_statistics_are_fp32_under_bf16_autocast():
    """.float() alone does not leave autocast: each loss, computed inside a bf16 autocast
    region, equals its fp32 value (fails if a matmul of the statistics runs in bf16)."""
    gen = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(64, 96, generator=gen), torch.randn(64, 96, generator=gen)
    pred = torch.randn(64, 48, generator=gen)

    def losses():
        """Every loss on the same inputs, by name."""
        return {
            "sie": sie.sie_loss(z1, z2, pred, 48)["loss"],
            "vicreg": baselines.vicreg_loss(z1, z2)["loss"],
            "nt_xent": baselines.nt_xent(z1, z2, 0.1),
            "equimod_simclr": baselines.equimod_simclr_loss(z1, z2, pred, z2[:, :48])["loss"],
            "equimod_vicreg": baselines.equimod_vicreg_loss(
                z1, z2, z1[:, :48], z2[:, :48], pred)["loss"],
            "vicreg_partinv": baselines.vicreg_partinv_loss(z1, z2, 48)["loss"],
            "simclr_onlyequi": baselines.simclr_onlyequi_loss(pred, z2[:, :48])["loss"],
        }

    exact = losses()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = losses()
    for name in exact:
        assert under_autocast[name].dtype == torch.float32, name
        torch.testing.assert_close(under_autocast[name], exact[name], rtol=1e-5, atol=1e-6,
                                   msg=name)


# ---------------------------------------------------------------- Ctrl-C, torchrun launches
def links_to_scripts(folder):
    folder.mkdir(exist_ok=True)
    for f in REPO.glob("*.py"):
        (folder / f.name).symlink_to(f)
    return folder


def default_sigint():
    """A shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT:
    restore the default so the child turns Ctrl-C into KeyboardInterrupt, as in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_is_one_line_and_the_same_command_resumes(toy_root, tmp_path):
    cmd = [sys.executable, "sie.py", *tiny("sie", toy_root, tmp_path / "r", "--epochs", "50")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=default_sigint)
    deadline = time.time() + 120
    while not (tmp_path / "r" / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err + out
    epoch = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["epoch"]
    sie.main(tiny("sie", toy_root, tmp_path / "r", "--epochs", str(epoch + 1)))
    assert read_log(tmp_path / "r", "resume")[0]["epoch"] == epoch


@pytest.mark.parametrize("script_name", ["sie", "baselines"])
def test_readme_torchrun_command_on_a_clone_without_data(script_name, tmp_path):
    """Two ranks start at once on a checkout with no data/: rank 0 generates the default toy set
    behind a barrier, the other waits (it used to race it and crash on the .partial folder)."""
    clone = links_to_scripts(tmp_path / "clone")
    flags = " ".join(METHOD_FLAGS[script_name])
    proc = run(f"torchrun --standalone --nproc_per_node=2 {script_name}.py {flags} --epochs 1 "
               f"--no-eval --run-dir runs/ddp", cwd=clone, timeout=600)
    assert "Traceback" not in proc.stderr
    assert os.path.isfile(clone / "data" / "3diebench-toy" / "train_images.npy")
    assert len(read_log(clone / "runs" / "ddp")) >= 1


def children(pid):
    """The pids whose parent is pid (read from /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.isdigit() and int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"     # a zombie has ended
    except OSError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_end_when_the_torchrun_agent_is_killed(toy_root, tmp_path):
    """kill -9 of torchrun's agent: its workers end too (they used to train on, unsupervised)."""
    flags = tiny("sie", toy_root, tmp_path / "r", "--epochs", "200")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node=2", "sie.py", *flags], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not (tmp_path / "r" / "log.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    workers = children(agent.pid)
    assert len(workers) == 2 and all(alive(w) for w in workers)
    agent.kill()
    agent.wait()
    deadline = time.time() + 60
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(alive(w) for w in workers)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_agents_as_two_nodes_train_like_one_agent(toy_root, tmp_path):
    """--nnodes 2 --nproc_per_node 1 with a c10d rendezvous on 127.0.0.1 (the README's multi-node
    line, both 'nodes' on this machine) gives the same losses as one agent with 2 processes."""
    flags = " ".join(tiny("sie", toy_root, "RUN", "--epochs", "1"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    single = run(f"torchrun --standalone --nproc_per_node=2 sie.py "
                 f"{flags.replace('RUN', str(tmp_path / 'one'))}", cwd=REPO)
    assert single.returncode == 0
    port = free_port()
    agents = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc_per_node", "1", "--node_rank", str(node), "--rdzv_backend", "c10d",
               "--rdzv_id", "test", "--rdzv_endpoint", f"127.0.0.1:{port}", "sie.py",
               *flags.replace("RUN", str(tmp_path / "two")).split()]
        agents.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True))
    for agent in agents:
        out, err = agent.communicate(timeout=300)
        assert agent.returncode == 0, err[-3000:]
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert len(one) == len(two) >= 1
    for a, b in zip(one, two):
        assert (a["step"], a["total"], a["cov"]) == (b["step"], b["total"], b["cov"])
    assert read_log(tmp_path / "two", "config")[0]["world_size"] == 2


# ---------------------------------------------------------------- one harness, three copies
BANNER = "# ============ harness: the same text in sie.py, baselines.py and ser.py ============"


def harness_lines(text):
    """The lines after the harness banner, without those marked '# per-method'."""
    assert text.count(BANNER) == 1, "the harness banner must appear exactly once"
    section = text.split(BANNER, 1)[1]
    return [line for line in section.splitlines() if not line.rstrip().endswith("# per-method")]


def harness_differences(texts):
    """{script: unified diff against sie.py's harness} for every script whose harness differs."""
    reference = harness_lines(texts["sie"])
    differences = {}
    for name, text in texts.items():
        diff = list(difflib.unified_diff(reference, harness_lines(text), "sie.py", f"{name}.py",
                                         lineterm="", n=1))
        if diff:
            differences[name] = "\n".join(diff[:60])
    return differences


def script_texts():
    return {name: (REPO / f"{name}.py").read_text() for name in ("sie", "baselines", "ser")}


def test_the_harness_is_the_same_text_in_every_script():
    differences = harness_differences(script_texts())
    assert not differences, "\n\n".join(differences.values())


def test_the_harness_check_catches_an_edited_copy():
    texts = script_texts()
    edited = texts["ser"].replace("def log_event(args, kind, **fields):",
                                  "def log_event(args, kind, **fields):\n    kind = kind")
    assert edited != texts["ser"]
    assert set(harness_differences({**texts, "ser": edited})) == {"ser"}
