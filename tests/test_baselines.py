"""baselines.py: each loss against a naive reference written here (loops, explicit softmax),
invariants, the module sizes of the official code, 1-vs-2 gloo processes, and short runs of every
method."""
import json
import math
import os
import re

import pytest
import torch
import torch.nn as nn

import baselines as B
from conftest import leave_process_group

torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """In-process training runs share 2 cores with everything else: one intra-op thread is
    faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- naive references (float64 loops)

def naive_variance(z):
    n, d = z.shape
    out = 0.0
    for j in range(d):
        m = sum(z[i, j] for i in range(n)) / n
        var = sum((z[i, j] - m) ** 2 for i in range(n)) / (n - 1)
        out += max(0.0, 1.0 - math.sqrt(var + 1e-4))
    return out / d


def naive_covariance(z, batch_size):
    n, d = z.shape
    m = [sum(z[i, j] for i in range(n)) / n for j in range(d)]
    total = 0.0
    for a in range(d):
        for b in range(d):
            if a != b:
                c = sum((z[i, a] - m[a]) * (z[i, b] - m[b]) for i in range(n)) / (batch_size - 1)
                total += c * c
    return total / d


def naive_mse(a, b):
    pairs = zip(a.flatten().tolist(), b.flatten().tolist())
    return sum((x - y) ** 2 for x, y in pairs) / a.numel()


def naive_vicreg(z1, z2, batch_size, lam=10.0, mu=10.0, nu=1.0):
    z1, z2 = z1.double(), z2.double()
    return (lam * naive_mse(z1, z2) + mu * (naive_variance(z1) + naive_variance(z2)) / 2
            + nu * (naive_covariance(z1, batch_size) + naive_covariance(z2, batch_size)))


def naive_nt_xent(a, b, tau):
    rows = [torch.tensor(r) for r in torch.cat([a, b]).double().tolist()]
    rows = [r / math.sqrt(sum(x * x for x in r)) for r in rows]
    n2 = len(rows)
    total = 0.0
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        sims = {k: math.exp(float(rows[i] @ rows[k]) / tau) for k in range(n2) if k != i}
        total += -math.log(sims[pos] / sum(sims.values()))
    return total / n2


def close(x, ref, rtol=1e-5):
    return abs(float(torch.as_tensor(x).detach()) - ref) <= rtol * max(1.0, abs(ref))


# ---------------------------------------------------------------- losses vs references

def naive_nt_xent_torch(a, b, tau):
    """Explicit softmax, one anchor at a time (differentiable, for gradient checks)."""
    rows = torch.cat([a, b]).double()
    rows = rows / rows.pow(2).sum(1, keepdim=True).sqrt()
    n2, total = rows.shape[0], 0.0
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        den = sum(torch.exp(rows[i] @ rows[k] / tau) for k in range(n2) if k != i)
        total = total - torch.log(torch.exp(rows[i] @ rows[pos] / tau) / den)
    return total / n2


def test_vicreg_matches_naive_reference():
    z1, z2 = torch.randn(12, 6), torch.randn(12, 6)
    t = B.vicreg_loss(z1, z2, batch_size=12)
    assert close(t["loss"], naive_vicreg(z1, z2, 12))
    assert close(t["inv"], naive_mse(z1.double(), z2.double()))
    # the covariance divisor is the configured global batch size, not the rows present (as the
    # official code)
    t16 = B.vicreg_loss(z1, z2, batch_size=16)
    assert close(t16["cov"], naive_covariance(z1.double(), 16) + naive_covariance(z2.double(), 16))


def test_vicreg_invariants():
    z = torch.randn(10, 5)
    assert float(B.vicreg_loss(z, z)["inv"]) == 0.0                    # identical views
    collapsed = torch.ones(10, 5) * 3.0
    t = B.vicreg_loss(collapsed, collapsed)
    assert close(t["std"], 1 - math.sqrt(1e-4))                         # variance hinge at its max
    assert float(t["cov"]) == 0.0
    assert float(B.variance_loss(torch.randn(64, 5) * 10)) == 0.0       # std >> 1: hinge inactive


def test_nt_xent_matches_naive_reference_and_is_symmetric():
    a = torch.randn(7, 5, dtype=torch.double, requires_grad=True)
    b = torch.randn(7, 5, dtype=torch.double, requires_grad=True)
    for tau in (0.1, 0.5):
        assert close(B.nt_xent(a, b, tau), naive_nt_xent(a.detach(), b.detach(), tau))
    ga = torch.autograd.grad(B.nt_xent(a, b, 0.1), (a, b))
    gr = torch.autograd.grad(naive_nt_xent_torch(a, b, 0.1), (a, b))
    assert all(torch.allclose(x.double(), y, atol=1e-5) for x, y in zip(ga, gr))
    swapped = float(B.nt_xent(b, a, 0.1).detach())
    assert close(B.nt_xent(a, b, 0.1), swapped)                          # symmetric in its views
    e = torch.eye(6) * 5                                                 # aligned, separated pairs
    assert float(B.nt_xent(e, e, 0.1)) < 1e-3


def test_simclr_and_augself_losses_match_their_definitions():
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    t = B.simclr_loss(z1, z2, 0.2)
    assert close(t["loss"], naive_nt_xent(z1, z2, 0.2)) and t["inv"] is t["loss"]
    head = B.augself_head(4, 4)
    y1, y2, g = torch.randn(6, 4), torch.randn(6, 4), torch.randn(6, 4)
    t = B.simclr_augself_loss(z1, z2, head, y1, y2, g, temperature=0.2, augself_weight=0.3)
    regression = naive_mse(head(torch.cat([y1, y2], 1)).detach().double(), g.double())
    assert close(t["augself"], regression)
    assert close(t["loss"], naive_nt_xent(z1, z2, 0.2) + 0.3 * regression)


def test_vicreg_partinv_invariance_covers_first_dims_only():
    z1 = torch.randn(9, 8)
    z2 = z1.clone()
    z2[:, 5:] = torch.randn(9, 3)                                       # last 3 dims differ
    t = B.vicreg_partinv_loss(z1, z2, n_inv=5, batch_size=9)
    assert float(t["inv"]) == 0.0
    ref = (10 * (naive_variance(z1.double()) + naive_variance(z2.double())) / 2
           + naive_covariance(z1.double(), 9) + naive_covariance(z2.double(), 9))
    assert close(t["loss"], ref)


def test_equimod_and_onlyequi_losses_match_their_definitions():
    n, d = 8, 6
    zi1, zi2, ze1, ze2, p = (torch.randn(n, d) for _ in range(5))
    t = B.equimod_simclr_loss(zi1, zi2, p, ze2, temperature=0.1, alpha=0.7)
    assert close(t["loss"], naive_nt_xent(zi1, zi2, 0.1) + 0.7 * naive_nt_xent(p, ze2, 0.1))
    t = B.equimod_vicreg_loss(zi1, zi2, ze1, ze2, p, batch_size=n, alpha=0.45)
    e1, e2 = ze1.double(), ze2.double()
    equi = (10 * naive_mse(p.double(), e2)                               # MSE on the prediction,
            + 10 * (naive_variance(e1) + naive_variance(e2)) / 2         # V and C on the
            + naive_covariance(e1, n) + naive_covariance(e2, n))         # embeddings
    assert close(t["loss"], naive_vicreg(zi1, zi2, n) + 0.45 * equi)
    assert close(B.simclr_onlyequi_loss(p, ze2, 0.1)["loss"], naive_nt_xent(p, ze2, 0.1))


def test_augself_regresses_g_from_non_detached_representations():
    head = B.augself_head(5, 6)
    y1, y2 = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    g = torch.randn(4, 6)
    loss = B.augself_loss(head, y1, y2, g)
    out = head(torch.cat([y1, y2], 1)).detach()
    assert close(loss, naive_mse(out.double(), g.double()))
    loss.backward()
    assert y1.grad.abs().sum() > 0 and y2.grad.abs().sum() > 0          # the backbone gets it


def test_hypernet_predictor_equals_materialised_weights():
    d, k = 5, 4
    for deep in (False, True):
        pred = B.HypernetPredictor(d, k, deep=deep).double()
        z, g = torch.randn(3, d, dtype=torch.double), torch.randn(3, k, dtype=torch.double)
        W = pred.hyper(pred.hyper_in(g)).view(3, d, d)              # W[b, o, i] = (H g)[o*d + i]
        ref = torch.stack([W[b] @ z[b] for b in range(3)])
        assert torch.allclose(pred(z, g), ref)


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_module_sizes_of_the_official_code():
    assert count(B.projector(512, [2048, 2048, 2048])) == 9_449_472
    assert count(B.HypernetPredictor(2048, 4)) == 16_777_216
    assert count(B.augself_head(512, 4)) == 2_103_300
    model = B.build_model(B.parse_args(["--method", "equimod-simclr", "--preset", "paper"]))
    assert count(model.backbone) == 11_180_736
    assert count(model.projector) == count(model.proj_equi) == 9_449_472
    assert count(model.predictor) == 16_777_216


# ---------------------------------------------------------------- 1 vs 2 gloo processes

def _losses(model, x1, x2):
    z1, z2 = model(x1), model(x2)
    return {"nt_xent": B.nt_xent(z1, z2, 0.1),
            "vicreg": B.vicreg_loss(z1, z2, batch_size=16)["loss"]}


def _worker(rank, world, init, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    model, x1, x2 = nn.Linear(6, 5), torch.randn(16, 6), torch.randn(16, 6)
    ddp = nn.parallel.DistributedDataParallel(model)
    sl = slice(rank * 8, rank * 8 + 8)
    result = {}
    for name in ("nt_xent", "vicreg"):
        ddp.zero_grad()
        loss = _losses(ddp, x1[sl], x2[sl])[name]
        loss.backward()
        # NT-Xent and the VICReg variance/covariance are global (same value on every rank); the
        # invariance MSE is a per-rank mean, so its rank average is what equals the global value
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        result[name] = (mean_loss / world, model.weight.grad.clone(), model.bias.grad.clone())
    if rank == 0:
        torch.save(result, out)
    del ddp
    leave_process_group()


def test_gathered_losses_equal_one_process_on_the_global_batch(tmp_path):
    import torch.multiprocessing as mp
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(2, f"file://{tmp_path}/init", out), nprocs=2)
    two = torch.load(out)
    torch.manual_seed(0)
    model, x1, x2 = nn.Linear(6, 5), torch.randn(16, 6), torch.randn(16, 6)
    for name in ("nt_xent", "vicreg"):
        model.zero_grad()
        loss = _losses(model, x1, x2)[name]
        loss.backward()
        assert torch.allclose(two[name][0], loss.detach(), atol=1e-6), name
        assert torch.allclose(two[name][1], model.weight.grad, atol=1e-6), name
        assert torch.allclose(two[name][2], model.bias.grad, atol=1e-6), name


# ---------------------------------------------------------------- config

def test_paper_preset_is_the_official_comparison():
    a = B.parse_args(["--method", "vicreg", "--preset", "paper"])
    assert (a.epochs, a.batch_size, a.resolution, a.mlp) == (2000, 1024, 256, "2048-2048-2048")
    assert (a.sim_coeff, a.std_coeff, a.cov_coeff, a.lr, a.wd) == (10.0, 10.0, 1.0, 1e-3, 1e-6)
    assert (a.temperature, a.augself_weight, a.equi_emb_dims) == (0.1, 1.0, 256)
    # EquiMod's alpha: never the official argparse default 4.5 (a forgotten flag would weigh the
    # equivariant term 4.5 times); explicit flags win
    assert B.parse_args(["--method", "equimod-simclr", "--preset", "paper"]).equi_factor == 1.0
    assert B.parse_args(["--method", "equimod-vicreg", "--preset", "paper"]).equi_factor == 0.45
    assert B.parse_args(["--method", "equimod-vicreg", "--equi-factor", "2"]).equi_factor == 2.0
    toy = B.parse_args(["--method", "simclr"])
    toy_run_dir = os.path.join("runs", "baselines-toy-simclr")
    assert (toy.preset, toy.epochs, toy.run_dir) == ("toy", 140, toy_run_dir)
    # every method parses with its toy preset alone (vicreg-partinv's e must fit the toy's 64-d
    # embedding)
    assert B.parse_args(["--method", "vicreg-partinv"]).equi_emb_dims == 32


def test_help_lists_every_method(capsys):
    with pytest.raises(SystemExit) as e:
        B.parse_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--equi-emb-dims" in out
    assert all(f"    {method}  " in out for method in B.METHODS)      # the epilog's method list


@pytest.mark.parametrize("argv, flag", [
    ([], "--method"),
    (["--method", "vicreg", "--rot-color"], "--rot-color"),
    (["--method", "simclr", "--predictor", "mlp"], "--predictor"),
    (["--method", "vicreg-partinv", "--equi-emb-dims", "5000"], "--equi-emb-dims"),
    (["--method", "vicreg-partinv", "--equi-emb-dims", "0"], "--equi-emb-dims"),
    (["--method", "vicreg", "--equi-emb-dims", "16"], "--equi-emb-dims"),     # not vicreg's
    (["--method", "simclr", "--sim-coeff", "2"], "--sim-coeff"),
    (["--method", "vicreg", "--temperature", "0.2"], "--temperature"),
    (["--method", "equimod-simclr", "--augself-weight", "0.5"], "--augself-weight"),
    (["--method", "simclr-augself", "--equi-factor", "2"], "--equi-factor"),
    (["--method", "vicreg", "--mlp", "64-x"], "--mlp"),
    (["--method", "vicreg", "--bogus"], "--bogus")])
def test_bad_flags_fail_with_a_message_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        B.parse_args(argv)
    assert e.value.code == 2 and flag in capsys.readouterr().err


# ---------------------------------------------------------------- runs on the toy set

SMALL = ["--epochs", "1", "--batch-size", "8", "--resolution", "32", "--mlp", "64-64-64",
         "--num-workers", "0"]


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def last_train_line(run_dir):
    return [e for e in read_log(str(run_dir)) if e["kind"] == "train"][-1]


VARIANTS = [["--method", m] for m in B.METHODS] + [
    ["--method", "simclr-augself", "--rot-color"],
    ["--method", "equimod-simclr", "--predictor", "mlp"],
    ["--method", "simclr-onlyequi", "--hypernet", "deep", "--rot-color"]]


@pytest.mark.parametrize("variant", VARIANTS, ids=" ".join)
def test_every_method_trains_two_steps_and_reloads_for_eval(variant, toy_root, tmp_path):
    import eval as evaluation
    run_dir = str(tmp_path / "run")
    B.main(variant + SMALL + ["--data-root", toy_root, "--run-dir", run_dir, "--no-eval"])
    log = read_log(run_dir)
    assert log[0]["kind"] == "config" and log[0]["config"]["method"] == variant[1]
    last = last_train_line(run_dir)
    assert last["step"] == 2
    assert all(math.isfinite(v) for v in last.values() if isinstance(v, float))
    assert any(e["kind"] == "online" for e in log)
    probe, saved = evaluation.load_probeable(run_dir, "cpu")            # strict load via eval.py
    assert saved.method == variant[1] and probe.parts == {"full": slice(0, 512)}
    assert (probe.predict is not None) == (variant[1] in B.PREDICTS)
    assert probe.g_dim == (6 if "--rot-color" in variant else 4)


def test_resume_continues_exactly(toy_root, tmp_path):
    common = ["--method", "simclr-augself"] + SMALL + ["--data-root", toy_root, "--no-eval"]
    B.main(common + ["--run-dir", str(tmp_path / "a"), "--epochs", "2"])
    B.main(common + ["--run-dir", str(tmp_path / "b"), "--epochs", "1"])
    B.main(common + ["--run-dir", str(tmp_path / "b"), "--epochs", "2"])   # longer: resumes
    a, b = last_train_line(tmp_path / "a"), last_train_line(tmp_path / "b")
    assert a["step"] == b["step"] == 4
    for k in ("total", "inv", "augself"):
        assert a[k] == pytest.approx(b[k], rel=1e-5), k


# ---------------------------------------------------------------- README commands

def test_readme_commands_run(workdir):
    from conftest import readme_commands, run
    cmds = readme_commands("baselines.py")
    if not cmds:
        pytest.skip("README has no baselines.py command yet")
    shrink = " ".join(SMALL + ["--eval-protocols", "classify"])
    for cmd in cmds:
        loop = re.match(r"for (\w+) in ([^;]+); do (.+?); done", cmd)
        if loop:                                                         # run the loop body once
            var, values, body = loop.groups()
            cmd = body.replace("$" + var, values.split()[0])
        root = re.search(r"--data-root (\S+)", cmd)
        if root and not os.path.exists(os.path.join(workdir, root.group(1))):
            # real data that is not here: one process, a clear error naming the folder
            cmd = re.sub(r"^torchrun( --\S+)* baselines\.py", "python baselines.py", cmd)
            proc = run(cmd + " " + shrink, workdir, check=False)
            assert proc.returncode == 2 and root.group(1) in proc.stderr, cmd
            continue
        proc = run(cmd + " " + shrink, workdir)
        assert "top1" in proc.stdout, cmd
