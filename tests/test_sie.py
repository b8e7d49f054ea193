"""sie.py: module sizes and shapes at the paper's setting, the predictor's cheap form, the loss
against a naive reference, the paper preset, 1 vs 2 gloo processes, exact resume, the non-finite
stop, the README commands."""
import json
import math
import os
import shlex
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import sie
from conftest import leave_process_group, readme_commands, run

TINY = ["--resolution", "32", "--batch-size", "8", "--mlp", "64-64-64", "--num-workers", "0",
        "--log-every", "1"]


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- sizes at the paper's setting
def test_parameter_counts_and_shapes():
    model = sie.build_model(sie.parse_args(["--preset", "paper"]))
    assert n_params(model.backbone) == 11_180_736
    assert n_params(model.proj_inv) == n_params(model.proj_equi) == 2_365_440
    assert n_params(model.predictor) == 4_194_304
    model.eval()
    x = torch.randn(2, 3, 256, 256)
    y = model.backbone(x)
    assert y.shape == (2, 512)
    z = model.embed(y)
    assert z.shape == (2, 2048)
    assert model.predictor(z[:, 1024:], torch.randn(2, 4)).shape == (2, 1024)
    # Spatial sizes as in the official src/resnet.py: the stem conv gives 128, the kept maxpool
    # 64, then the four stages 64 -> 32 -> 16 -> 8 (hooked here: bn1 and the stages' outputs).
    sizes = []

    def record_size(module, inputs, output):
        sizes.append(output.shape[-1])
    h = model.backbone.bn1.register_forward_hook(record_size)
    hooks = [h] + [s.register_forward_hook(record_size) for s in model.backbone.layers]
    model.backbone(torch.randn(1, 3, 256, 256))
    for h in hooks:
        h.remove()
    assert sizes == [128, 64, 32, 16, 8]


def predictor_params(*flags):
    """Parameters of the predictor at the paper's setting plus `flags`."""
    return n_params(sie.build_model(sie.parse_args(["--preset", "paper", *flags])).predictor)


def test_ablation_sizes():
    assert predictor_params("--hypernet", "deep") == 4_194_336
    assert predictor_params("--rot-color") == 6_291_456
    only = sie.build_model(sie.parse_args(["--preset", "paper", "--equi-only"]))
    assert only.proj_inv is None and n_params(only.proj_equi) == 9_449_472
    assert n_params(only.predictor) == 16_777_216
    # The official SIEOnlyEqui has no alpha: its equivariance MSE has the weight sim_coeff = 10.
    assert only.loss_kw["sim_coeff"] * only.loss_kw["equi_factor"] == 10.0
    mlp = sie.build_model(sie.parse_args(["--preset", "paper", "--predictor", "mlp"])).predictor
    assert n_params(mlp) == (1024 + 4) * 1024 + 1024


def test_split_takes_first_dims_invariant_last_dims_equivariant():
    model = sie.build_model(sie.parse_args(["--mlp", "64-64-64", "--equi-dims", "128"])).eval()
    y = torch.randn(4, 512)
    y2 = y.clone()
    y2[:, 384:] += 1.0                                  # change only the last e = 128 dims
    z, z2 = model.embed(y), model.embed(y2)
    d_inv = model.inv_emb_dims
    assert d_inv == 48 and z.shape[1] == 64             # widths scaled by 384/512 and 128/512
    assert torch.equal(z[:, :d_inv], z2[:, :d_inv]) and not torch.equal(z[:, d_inv:], z2[:, d_inv:])


# ---------------------------------------------------------------- predictor: cheap form == W(g) z
@pytest.mark.parametrize("deep,bias", [(False, False), (True, False), (False, True)])
def test_predictor_cheap_form_equals_materialised(deep, bias):
    torch.manual_seed(0)
    d, k, B = 6, 4, 5
    pred = sie.HypernetPredictor(d, k, deep=deep, bias=bias).double()
    z = torch.randn(B, d, dtype=torch.double, requires_grad=True)
    g = torch.randn(B, k, dtype=torch.double, requires_grad=True)
    out = pred(z, g)
    w = torch.randn(B, d, dtype=torch.double)
    grads = torch.autograd.grad((out * w).sum(), [z, g] + list(pred.parameters()))
    # Reference: W(g) = reshape(H c(g)) row-major, W[o, i] = (H c)[o*d + i], then W z by loops.
    c = pred.hyper_in(g)
    H = pred.hyper.weight                              # (d*d, k)
    ref = []
    for b in range(B):
        flat = H @ c[b]
        W = torch.stack([torch.stack([flat[o * d + i] for i in range(d)]) for o in range(d)])
        row = W @ z[b]
        ref.append(row + (pred.hyper_bias.weight @ c[b] if bias else 0))
    ref = torch.stack(ref)
    ref_grads = torch.autograd.grad((ref * w).sum(), [z, g] + list(pred.parameters()))
    torch.testing.assert_close(out, ref)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r)


def test_predictor_is_linear_in_g():
    pred = sie.HypernetPredictor(8)
    z, g = torch.randn(3, 8), torch.randn(3, 4)
    # Linear in g: q and -q, the same rotation, give opposite predictions.
    torch.testing.assert_close(pred(z, -g), -pred(z, g))


@pytest.mark.parametrize("d,default_gain", [(32, 1.63), (1024, 9.24)])
def test_hypernet_gain_sets_the_predictors_gain(d, default_gain):
    """|W(g) z| / |z| for unit g: ~0.29 sqrt(d) with PyTorch's init (the official code's),
    ~G with --hypernet-gain G, whatever d."""
    z = torch.randn(256, d)
    g = torch.nn.functional.normalize(torch.randn(256, 4), dim=1)
    for gain, expected in ((None, default_gain), (1.0, 1.0), (0.5, 0.5)):
        torch.manual_seed(0)
        pred = sie.HypernetPredictor(d)
        if gain is not None:
            sie.init_hypernet_gain(pred, gain)
        ratio = (pred(z, g).norm(dim=1) / z.norm(dim=1)).mean().item()
        assert abs(ratio - expected) < 0.05 * expected, (gain, ratio)


def test_hypernet_gain_flag_reaches_the_model():
    """The toy preset starts from W(g) = 0 (its deviation); --hypernet-gain official and the paper
    preset keep PyTorch's Linear init, the official code's: U(-1/2, 1/2)."""
    def predictor_std(*flags):
        return sie.build_model(sie.parse_args(list(flags))).predictor.hyper.weight.std().item()
    d = 32                                                       # the toy's equivariant width
    assert predictor_std() == 0.0
    assert abs(predictor_std("--hypernet-gain", "official") - 12 ** -0.5) < 0.02
    assert abs(predictor_std("--hypernet-gain", "1.6") - 1.6 * d ** -0.5) < 0.02
    assert sie.parse_args(["--hypernet-gain", "1"]).run_dir == "runs/sie-toy-gain1"
    assert sie.parse_args(["--hypernet-gain", "official"]).run_dir == "runs/sie-toy-officialinit"
    assert sie.parse_args([]).run_dir == "runs/sie-toy"
    paper = sie.parse_args(["--preset", "paper"])
    assert paper.hypernet_gain is None and paper.run_dir == "runs/sie-paper"
    H = sie.build_model(paper).predictor.hyper.weight               # PyTorch's U(-1/2, 1/2)
    assert H.abs().max() <= 0.5 and abs(H.std().item() - 12 ** -0.5) < 0.01


@pytest.mark.parametrize("flags", [["--hypernet-gain", "1"], ["--hypernet", "deep"]])
def test_hypernet_flags_with_the_mlp_predictor_are_refused(flags, capsys):
    """They would be silently ignored: the MLP predictor has no hypernetwork."""
    with pytest.raises(SystemExit) as e:
        sie.parse_args(["--predictor", "mlp", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and flags[0] in err and "Traceback" not in err


# ---------------------------------------------------------------- loss vs a naive reference
def naive_variance(A):
    N, D = A.shape
    total = 0.0
    for j in range(D):
        mean = sum(A[n, j] for n in range(N)) / N
        var = sum((A[n, j] - mean) ** 2 for n in range(N)) / (N - 1)
        total += max(0.0, 1.0 - math.sqrt(var + 1e-4))
    return total / D


def naive_covariance(A, divisor):
    N, D = A.shape
    mean = [sum(A[n, j] for n in range(N)) / N for j in range(D)]
    total = 0.0
    for i in range(D):
        for j in range(D):
            if i != j:
                c = sum((A[n, i] - mean[i]) * (A[n, j] - mean[j]) for n in range(N)) / divisor
                total += c ** 2
    return total / D


def naive_mse(A, B):
    return float(np.mean([(a - b) ** 2 for a, b in zip(A.ravel(), B.ravel())]))


def float32(a):
    return torch.tensor(a, dtype=torch.float32)


@pytest.mark.parametrize("batch_size", [None, 9])
def test_loss_matches_naive_reference(batch_size):
    rng = np.random.default_rng(0)
    N, d_inv, d_equi = 6, 5, 3
    z1, z2 = rng.normal(size=(N, d_inv + d_equi)) * 0.3, rng.normal(size=(N, d_inv + d_equi)) * 2
    pred = rng.normal(size=(N, d_equi))
    terms = sie.sie_loss(float32(z1), float32(z2), float32(pred), d_inv, batch_size=batch_size)
    # The covariance divides by the CLI global batch - 1 (args.batch_size - 1 in the official
    # SIE.forward), the actual batch's N - 1 when none is given.
    divisor = (batch_size or N) - 1
    ref = {"inv": naive_mse(z1[:, :d_inv], z2[:, :d_inv]), "equi": naive_mse(pred, z2[:, d_inv:]),
           "std": 0.5 * naive_variance(z1) + 0.5 * naive_variance(z2),
           "pred_std": 0.5 * naive_variance(pred),
           "cov": naive_covariance(z1, divisor) + naive_covariance(z2, divisor)}
    for k, v in ref.items():
        assert terms[k].item() == pytest.approx(v, rel=1e-5, abs=1e-6), k
    # The official command's weights: 10 L_inv + 4.5 L_equi (sim_coeff 10 x equi_factor 0.45)
    # + 10 L_std + 10 L_pred_std + 1 L_cov.
    total = (10 * ref["inv"] + 4.5 * ref["equi"] + 10 * ref["std"] + 10 * ref["pred_std"]
             + ref["cov"])
    assert terms["loss"].item() == pytest.approx(total, rel=1e-5)
    no_pred_var = sie.sie_loss(float32(z1), float32(z2), float32(pred), d_inv, pred_var=False)
    assert no_pred_var["pred_std"].item() == 0.0


def test_loss_invariants():
    z = torch.randn(16, 8)
    assert sie.sie_loss(z, z, z[:, 4:], 4)["inv"].item() == 0.0            # identical views
    collapsed = torch.ones(16, 8)
    assert sie.variance_loss(collapsed).item() == pytest.approx(1 - 1e-2)   # hinge at its maximum
    assert sie.covariance_loss(torch.randn(16, 1) * torch.ones(1, 8), 15).item() > 0


def test_model_loss_uses_paper_coefficients():
    kw = sie.build_model(sie.parse_args(["--preset", "paper"])).loss_kw
    assert kw == dict(batch_size=1024, sim_coeff=10.0, equi_factor=0.45, std_coeff=10.0,
                      cov_coeff=1.0, pred_var=True)


# ---------------------------------------------------------------- presets and flags
def test_paper_preset_is_the_official_command():
    a = sie.parse_args(["--preset", "paper"])
    assert ((a.epochs, a.batch_size, a.resolution, a.mlp, a.equi_dims)
            == (2000, 1024, 256, "2048-2048-2048", 256))
    assert (a.sim_coeff, a.equi_factor, a.std_coeff, a.cov_coeff) == (10.0, 0.45, 10.0, 1.0)
    assert ((a.lr, a.wd, a.predictor, a.hypernet, a.pred_bias)
            == (1e-3, 1e-6, "hypernet", "linear", False))
    assert not (a.no_pred_var or a.equi_only or a.rot_color)
    assert a.run_dir == os.path.join("runs", "sie-paper")
    # explicit flags override the preset
    assert sie.parse_args(["--preset", "paper", "--epochs", "3"]).epochs == 3
    assert sie.parse_args(["--no-pred-var"]).run_dir == os.path.join("runs", "sie-toy-nopredvar")


@pytest.mark.parametrize("argv", [["--bogus"], ["--equi-dims", "0"], ["--equi-dims", "512"],
                                  ["--amp", "fp8"]])
def test_bad_flags_fail_with_argparse_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        sie.parse_args(argv)
    assert e.value.code == 2 and "error" in capsys.readouterr().err


# ---------------------------------------------------------------- 1 vs 2 gloo processes
def _make_batch(n=8, size=32):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(n, 3, size, size, generator=gen),
            torch.randn(n, 3, size, size, generator=gen),
            torch.randn(n, 4, generator=gen), torch.randint(0, 4, (n,), generator=gen))


def _loss_and_grads(model, batch):
    loss, terms, _ = model(*batch)
    loss.backward()
    module = model.module if isinstance(model, DistributedDataParallel) else model
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    return {k: v.detach() for k, v in terms.items()}, grads


def _tiny_model():
    torch.manual_seed(0)
    # BN in eval mode: SyncBatchNorm does not exist on CPU, so train-mode BN would see per-rank
    # batches; everything this test is about (gather, global var/cov, DDP averaging) is unaffected.
    return sie.build_model(sie.parse_args(TINY)).eval()


def _ddp_worker(rank, world, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    x1, x2, g, y = _make_batch()
    per = x1.shape[0] // world
    local = tuple(t[rank * per:(rank + 1) * per] for t in (x1, x2, g, y))
    model = DistributedDataParallel(_tiny_model())
    terms, grads = _loss_and_grads(model, local)
    for v in terms.values():                              # local MSEs differ per rank: average them
        dist.all_reduce(v)
        v /= world
    if rank == 0:
        torch.save({"terms": terms, "grads": grads}, out)
    del model
    leave_process_group()


def prefixed(name):
    """An assert_close msg: `name`, then torch's own message."""
    def message(generated):
        return f"{name}: {generated}"
    return message


def test_one_vs_two_gloo_processes(tmp_path):
    torch.set_num_threads(1)
    terms1, grads1 = _loss_and_grads(_tiny_model(), _make_batch())
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "out.pt")), nprocs=2)
    two = torch.load(tmp_path / "out.pt")
    for k in ("inv", "equi", "std", "pred_std", "cov", "loss"):
        torch.testing.assert_close(two["terms"][k], terms1[k], rtol=1e-5, atol=1e-6)
    for n, g in grads1.items():
        torch.testing.assert_close(two["grads"][n], g, rtol=1e-4, atol=1e-6, msg=prefixed(n))


# ---------------------------------------------------------------- exact resume, non-finite stop
def _train_log(run_dir, kind="train"):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [e for e in map(json.loads, f) if e["kind"] == kind]


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_fast_decode_paths_train_like_pil(decode, toy_root, tmp_path):
    """--decode cpu|gpu (uint8 / JPEG bytes through the loader, finished by to_device) trains the
    same steps as the PIL path: same pixels at the native size, so the same losses."""
    common = TINY + ["--data-root", toy_root, "--no-eval", "--epochs", "1"]
    sie.main(common + ["--run-dir", str(tmp_path / "pil")])
    sie.main(common + ["--decode", decode, "--run-dir", str(tmp_path / decode)])
    for a, b in zip(_train_log(tmp_path / "pil"), _train_log(tmp_path / decode), strict=True):
        assert a["step"] == b["step"] and a["total"] == pytest.approx(b["total"], rel=1e-4)


def test_resume_is_exact(toy_root, tmp_path, capsys):
    common = TINY + ["--data-root", toy_root, "--no-eval"]
    sie.main(common + ["--epochs", "2", "--run-dir", str(tmp_path / "straight")])
    sie.main(common + ["--epochs", "1", "--run-dir", str(tmp_path / "resumed")])
    sie.main(common + ["--epochs", "2", "--run-dir", str(tmp_path / "resumed")])
    straight, resumed = _train_log(tmp_path / "straight"), _train_log(tmp_path / "resumed")
    assert len(straight) == len(resumed) == 4    # 16 train objects / batch 8 = 2 steps per epoch
    for a, b in zip(straight, resumed):
        assert ((a["step"], a["total"], a["equi"], a["cov"])
                == (b["step"], b["total"], b["equi"], b["cov"]))
    assert _train_log(tmp_path / "resumed", "resume")[0]["step"] == 2
    ck = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert ck["script"] == "sie" and ck["epoch"] == 2 and ck["step"] == 4
    assert os.path.exists(tmp_path / "resumed" / "backbone.pt")
    with pytest.raises(SystemExit) as e:          # different training flags: refuse, name the flag
        sie.main(common + ["--epochs", "3", "--lr", "0.1", "--run-dir", str(tmp_path / "resumed")])
    assert e.value.code == 2 and "--lr" in capsys.readouterr().err


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(toy_root, tmp_path, monkeypatch,
                                                              capsys):
    run_dir = tmp_path / "nan"
    calls, real_loss = [], sie.sie_loss

    def loss_that_breaks_at_step_3(*a, **kw):
        calls.append(1)
        terms = real_loss(*a, **kw)
        if len(calls) >= 3:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(sie, "sie_loss", loss_that_breaks_at_step_3)
    with pytest.raises(SystemExit) as e:
        sie.main(TINY + ["--data-root", toy_root, "--no-eval", "--epochs", "3",
                         "--run-dir", str(run_dir)])
    assert e.value.code == 3
    assert "non-finite loss at step 3" in capsys.readouterr().err
    ck = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["step"] == 2
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert _train_log(run_dir, "error")[0]["step"] == 3


def test_missing_data_root_is_one_message(tmp_path):
    proc = run(f"python sie.py --data-root {tmp_path / 'nowhere'} --epochs 1",
               cwd=sie.__file__.rsplit("/", 1)[0], check=False)
    assert proc.returncode == 2 and "nowhere" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- ablations, README commands
@pytest.mark.parametrize("flags", [[], ["--no-pred-var"], ["--equi-only"], ["--rot-color"],
                                   ["--equi-dims", "128"], ["--predictor", "mlp"],
                                   ["--hypernet", "deep"], ["--pred-bias"],
                                   ["--hypernet-gain", "1"]])
def test_every_ablation_trains(flags):
    args = sie.parse_args(TINY + flags)
    torch.manual_seed(0)
    model = sie.build_model(args)
    optimizer = sie.make_optimizer(model, args)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x1, x2, g, y = _make_batch()
    g = torch.cat([g, torch.rand(8, 2) - 0.5], 1) if args.rot_color else g
    before = [p.detach().clone() for p in model.backbone.parameters()]
    terms, sums = sie.train_step(model, (x1, x2, g, y), optimizer, scaler, args)
    assert all(torch.isfinite(v) for v in terms.values())
    assert (terms["pred_std"] == 0) == ("--no-pred-var" in flags)
    assert (terms["inv"] == 0) == ("--equi-only" in flags)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.backbone.parameters()))
    assert set(sums) >= {"pairs", "full_correct", "full_sse"}


def test_readme_commands(workdir):
    """Every README command for sie.py: the flags parse; the toy ones run for one epoch, evaluation
    included. The 2-process torchrun launch always runs, even before the README shows it."""
    cmds = readme_commands("sie.py")
    assert any(c.startswith("python sie.py") for c in cmds)
    if not any(c.startswith("torchrun") and "paper" not in c for c in cmds):
        cmds.append("torchrun --standalone --nproc_per_node=2 sie.py --run-dir runs/sie-toy-ddp")
    for cmd in cmds:
        argv = shlex.split(cmd)
        flags = argv[argv.index("sie.py") + 1:]
        args = sie.parse_args(flags)                       # every README flag exists and parses
        if args.preset == "paper" or "--data-root" in flags:
            continue                           # real data, GPUs: parsing is what CI can check
        shutil.rmtree(workdir / "runs", ignore_errors=True)
        proc = run(cmd + " --epochs 1 --batch-size 8", cwd=workdir)   # the test set has 16 objects
        assert "Traceback" not in proc.stderr and "mrr" in proc.stdout, cmd   # the evaluation table
        assert os.path.exists(workdir / args.run_dir / "checkpoint.pt"), cmd
        assert os.path.exists(workdir / args.run_dir / "eval.json"), cmd


def test_eval_probes_the_embeddings_with_features_embeddings(toy_root, tmp_path):
    """eval.py --features embeddings probes z_inv / z_equi (where the loss acts) instead of the
    representation, into another folder; the run's own eval.json stays as it was."""
    import eval as evaluation
    run_dir = tmp_path / "run"
    sie.main(TINY + ["--data-root", toy_root, "--epochs", "1", "--no-eval",
                     "--run-dir", str(run_dir)])
    out = tmp_path / "embeddings"
    evaluation.main([str(run_dir), "--features", "embeddings", "--protocol", "classify",
                     "rotation", "--out", str(out), "--epochs", "2"])
    with open(out / "eval.json") as f:
        summary = json.load(f)["summary"]
    assert {"top1/z", "top1/z_inv", "top1/z_equi", "rot_r2_pooled/z_inv",
            "rot_r2_pooled/z_equi"} <= set(summary)
    assert not (run_dir / "eval.json").exists()
    model = sie.build_model(sie.parse_args(TINY))
    probe = sie.probeable(model.eval(), sie.parse_args(TINY))
    probe = evaluation.Probeable(backbone=evaluation.EmbeddingsOf(probe.backbone, probe.embeddings),
                                 parts=probe.embedding_parts)
    images = torch.randn(4, 3, 32, 32)
    embeddings = probe.backbone(images)
    assert embeddings.shape == (4, model.inv_emb_dims + model.equi_emb_dims)
    torch.testing.assert_close(embeddings, model.embed(model.backbone(images)))
