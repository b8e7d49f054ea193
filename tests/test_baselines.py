"""baselines.py: each loss against a naive reference written here (loops, explicit softmax),
invariants, module sizes from sie.md §7, 1-vs-2 gloo processes, and short runs of every method."""
import math
import os

import pytest
import torch
import torch.nn as nn

import baselines as B

torch.manual_seed(0)


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
    return sum((x - y) ** 2 for x, y in zip(a.flatten().tolist(), b.flatten().tolist())) / a.numel()


def naive_vicreg(z1, z2, batch_size, lam=10.0, mu=10.0, nu=1.0):
    z1, z2 = z1.double(), z2.double()
    return (lam * naive_mse(z1, z2) + mu * (naive_variance(z1) + naive_variance(z2)) / 2
            + nu * (naive_covariance(z1, batch_size) + naive_covariance(z2, batch_size)))


def naive_nt_xent(a, b, tau):
    rows = [r / math.sqrt(sum(x * x for x in r)) for r in torch.cat([a, b]).double().tolist() for r in [torch.tensor(r)]]
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

def test_vicreg_matches_naive_reference():
    z1, z2 = torch.randn(12, 6), torch.randn(12, 6)
    loss, terms = B.vicreg_loss(z1, z2, batch_size=12)
    assert close(loss, naive_vicreg(z1, z2, 12))
    assert close(terms["inv"], naive_mse(z1.double(), z2.double()))
    # the covariance divisor is the configured global batch size, not the rows present (sie.md §2.4)
    assert close(B.covariance_loss(z1, 16), naive_covariance(z1.double(), 16))


def test_vicreg_invariants():
    z = torch.randn(10, 5)
    _, terms = B.vicreg_loss(z, z, batch_size=10)
    assert float(terms["inv"]) == 0.0                                   # identical views
    collapsed = torch.ones(10, 5) * 3.0
    _, terms = B.vicreg_loss(collapsed, collapsed, batch_size=10)
    assert close(terms["std"], 1 - math.sqrt(1e-4))                    # variance term at its maximum
    assert float(terms["cov"]) == 0.0
    wide = torch.randn(64, 5) * 10                                      # std >> 1 -> hinge inactive
    assert float(B.variance_loss(wide)) == 0.0


def test_nt_xent_matches_naive_reference_and_is_symmetric():
    a, b = torch.randn(7, 5), torch.randn(7, 5)
    for tau in (0.1, 0.5):
        assert close(B.nt_xent(a, b, tau), naive_nt_xent(a, b, tau))
    assert close(B.nt_xent(a, b, 0.1), float(B.nt_xent(b, a, 0.1)))
    # perfectly aligned, well separated pairs -> loss near its minimum
    e = torch.eye(6) * 5
    assert float(B.nt_xent(e, e, 0.1)) < 1e-3


def test_vicreg_partinv_invariance_covers_first_dims_only():
    z1 = torch.randn(9, 8)
    z2 = z1.clone()
    z2[:, 5:] = torch.randn(9, 3)                                       # last 3 dims differ
    loss, terms = B.vicreg_partinv_loss(z1, z2, n_inv=5, batch_size=9)
    assert float(terms["inv"]) == 0.0
    ref = (10 * (naive_variance(z1.double()) + naive_variance(z2.double())) / 2
           + naive_covariance(z1.double(), 9) + naive_covariance(z2.double(), 9))
    assert close(loss, ref)


def test_equimod_losses_match_their_definitions():
    n, d = 8, 6
    zi1, zi2, ze1, ze2, p = (torch.randn(n, d) for _ in range(5))
    loss, terms = B.equimod_simclr_loss(zi1, zi2, p, ze2, temperature=0.1, alpha=0.7)
    assert close(loss, naive_nt_xent(zi1, zi2, 0.1) + 0.7 * naive_nt_xent(p, ze2, 0.1))
    loss, terms = B.equimod_vicreg_loss(zi1, zi2, ze1, ze2, p, batch_size=n, alpha=0.45)
    equi = (10 * naive_mse(p.double(), ze2.double())                   # MSE on the prediction,
            + 10 * (naive_variance(ze1.double()) + naive_variance(ze2.double())) / 2   # V and C on the
            + naive_covariance(ze1.double(), n) + naive_covariance(ze2.double(), n))   # embeddings
    assert close(loss, naive_vicreg(zi1, zi2, n) + 0.45 * equi)
    assert close(B.simclr_onlyequi_loss(p, ze2, 0.1), naive_nt_xent(p, ze2, 0.1))


def test_augself_regresses_g_from_non_detached_representations():
    head = B.AugSelfHead(5, 6)
    y1, y2 = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    g = torch.randn(4, 6)
    loss = B.augself_loss(head, y1, y2, g)
    out = head(torch.cat([y1, y2], 1)).detach()
    assert close(loss, naive_mse(out.double(), g.double()))
    loss.backward()
    assert y1.grad.abs().sum() > 0 and y2.grad.abs().sum() > 0          # the backbone gets the signal


def test_hypernet_predictor_equals_materialised_weights():
    d, k = 5, 4
    for deep in (False, True):
        pred = B.HypernetPredictor(d, k, deep=deep).double()
        z, g = torch.randn(3, d, dtype=torch.double), torch.randn(3, k, dtype=torch.double)
        W = pred.H(pred.pre(g)).view(3, d, d)                           # W[b, o, i] = (H g)[o*d + i]
        ref = torch.stack([W[b] @ z[b] for b in range(3)])
        assert torch.allclose(pred(z, g), ref)
    mlp = B.MLPPredictor(d, k, n_layers=2)
    assert mlp.net[0].in_features == d + k and len(mlp.net) == 3


def test_module_sizes_from_the_spec():
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(B.Projector(512, "2048-2048-2048")) == 9_449_472
    assert count(B.HypernetPredictor(2048, 4)) == 16_777_216
    assert count(B.AugSelfHead(512, 4)) == 2_103_300


# ---------------------------------------------------------------- 1 vs 2 gloo processes

def _losses(model, x1, x2):
    z1, z2 = model(x1), model(x2)
    return {"nt_xent": B.nt_xent(z1, z2, 0.1), "vicreg": B.vicreg_loss(z1, z2, batch_size=16)[0]}


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
    dist.destroy_process_group()


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
