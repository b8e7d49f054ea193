"""The methods SIE (Garrido, Najman, LeCun, ICML 2023) compares against, on 3DIEBench.

One script, one section per method, each loss a small named function citing its paper:

  vicreg            VICReg (Bardes, Ponce, LeCun, ICLR 2022)
  simclr            SimCLR (Chen, Kornblith, Norouzi, Hinton, ICML 2020), NT-Xent over the global batch
  simclr-augself    SimCLR + AugSelf (Lee et al., NeurIPS 2021): regress the relative transformation
  equimod-simclr    EquiMod (Devillers & Lefort, ICLR 2023), SimCLR version
  equimod-vicreg    EquiMod, the VICReg-based version of the SIE code
  vicreg-partinv    VICReg with the invariance term on part of the embedding only (SIE ablation row)
  simclr-onlyequi   SimCLR on predicted embeddings only, no invariant part (SIE ablation row)

`--color` conditions on rotation + colour (6-d g) instead of the rotation quaternion (4-d).
The training skeleton (backbone, data, optimiser, DDP, checkpoints, online monitor) repeats
sie.py's on purpose, so that this file reads alone. Spec: sie.md §3, peers.md §3.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ============================================================================ distributed

class FullGatherLayer(torch.autograd.Function):
    """all_gather that keeps the autograd graph: forward concatenates every rank's rows; backward
    sums the incoming gradients over ranks and returns this rank's slice. Every rank then computes
    the loss on the global batch; DDP's gradient averaging turns the summed slice back into exactly
    the full-batch gradient (sie.md §2.6 "single-GPU equivalence")."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        all_grads = torch.stack(grads)
        dist.all_reduce(all_grads)
        return all_grads[dist.get_rank()]


def gather(x):
    """(n_local, d) -> (n_global, d), differentiable; identity when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(FullGatherLayer.apply(x), dim=0)

# ============================================================================ model pieces

def Projector(in_dim, mlp):
    """Expander "a-b-c": (Linear + BN + ReLU) for every layer but the last, which is a Linear
    without bias (sie.md §2.2; VICReg Sec. 4.2). 512 -> 2048-2048-2048 has 9,449,472 parameters."""
    dims = [in_dim] + [int(d) for d in mlp.split("-")]
    layers = []
    for a, b in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
    return nn.Sequential(*layers)


class HypernetPredictor(nn.Module):
    """SIE's hypernetwork predictor, as the SIE code uses it for EquiMod and SimCLR only-equi
    (sie.md §2.3): W(g) = reshape(H g) in R^{d x d}, prediction W(g) z, no bias. Computed as
    sum_k g_k (A_k z) with A_k[o, i] = H[o*d + i, k], so no (B, d, d) tensor is built.
    `deep` = the ablation's bias-free Linear(k,k)-ReLU-Linear(k,k)-ReLU before H (hidden width k)."""

    def __init__(self, d, g_dim=4, deep=False):
        super().__init__()
        self.d = d
        self.pre = nn.Sequential(nn.Linear(g_dim, g_dim, bias=False), nn.ReLU(),
                                 nn.Linear(g_dim, g_dim, bias=False), nn.ReLU()) if deep else nn.Identity()
        self.H = nn.Linear(g_dim, d * d, bias=False)     # d^2 * k parameters (16,777,216 for d=2048, k=4)

    def forward(self, z, g):                             # z (B, d), g (B, k) -> (B, d)
        h = self.pre(g)
        A = self.H.weight.t().reshape(-1, self.d, self.d)          # (k, d_out, d_in)
        Az = torch.einsum("koi,bi->bko", A, z)                      # (B, k, d): every A_k z at once
        return (h.unsqueeze(-1) * Az).sum(1)


class MLPPredictor(nn.Module):
    """The concatenation predictor p(z, g) = MLP([g; z]) (sie.md §3 "MLP predictor variant"):
    n_layers Linear layers of width d with ReLU between them; g comes first."""

    def __init__(self, d, g_dim=4, n_layers=1):
        super().__init__()
        layers = [nn.Linear(d + g_dim, d)]
        for _ in range(n_layers - 1):
            layers += [nn.ReLU(inplace=True), nn.Linear(d, d)]
        self.net = nn.Sequential(*layers)

    def forward(self, z, g):
        return self.net(torch.cat([g.to(z.dtype), z], dim=1))


def AugSelfHead(repr_dim, g_dim):
    """AugSelf's auxiliary head phi (Lee et al. 2021, Sec. 3): an MLP on the two views'
    concatenated backbone representations [y; y'] that regresses the relative transformation.
    Sizes of the SIE code (sie.md §3): 1024-1024-k, 2,103,300 parameters for k = 4."""
    w = 2 * repr_dim
    return nn.Sequential(nn.Linear(w, w), nn.ReLU(inplace=True), nn.Linear(w, w), nn.ReLU(inplace=True),
                         nn.Linear(w, g_dim))

# ============================================================================ loss
# Which terms are local and which global (sie.md §2.4, §6): MSE terms (invariance, equivariance,
# AugSelf) are per-rank means; variance, covariance and NT-Xent run on the gathered global batch.
# Statistics are computed in float32 whatever the autocast dtype.

# ---- VICReg (Bardes et al., ICLR 2022) ----

def variance_loss(z):
    """Eq. 1: mean_j ReLU(1 - sqrt(Var_j + eps)), eps = 1e-4, unbiased variance over the rows."""
    std = torch.sqrt(z.var(dim=0) + 1e-4)
    return F.relu(1 - std).mean()


def covariance_loss(z, batch_size):
    """Eq. 3-4: (1/D) sum_{i != j} Cov_ij^2 with Cov = Zc^T Zc / (batch_size - 1). Like the official
    code, the divisor is the configured global batch size (sie.md §2.4), not the rows present."""
    z = z - z.mean(dim=0)
    cov = z.T @ z / (batch_size - 1)
    off = cov - torch.diag(torch.diag(cov))
    return off.pow(2).sum() / z.shape[1]


def vicreg_regularizer(z1, z2, batch_size):
    """Variance (halved per view, as in the VICReg code; Deviation from the paper's Eq. 6, which has
    no 1/2) and covariance of both views, on the gathered batch. Returns (std_term, cov_term)."""
    z1, z2 = gather(z1.float()), gather(z2.float())
    std = variance_loss(z1) / 2 + variance_loss(z2) / 2
    cov = covariance_loss(z1, batch_size) + covariance_loss(z2, batch_size)
    return std, cov


def vicreg_loss(z1, z2, batch_size, sim_coeff=10.0, std_coeff=10.0, cov_coeff=1.0):
    """Eq. 6: lambda s(Z, Z') + mu [v(Z) + v(Z')] + nu [c(Z) + c(Z')], lambda/mu/nu = 10/10/1 in the
    SIE comparison (sie.md §3). Returns (loss, terms) with each term separately for the log."""
    inv = F.mse_loss(z1.float(), z2.float())                # local, as in the official code
    std, cov = vicreg_regularizer(z1, z2, batch_size)
    return sim_coeff * inv + std_coeff * std + cov_coeff * cov, dict(inv=inv, std=std, cov=cov)

# ---- SimCLR (Chen et al., ICML 2020) ----

def nt_xent(a, b, temperature=0.1):
    """Eq. 1, the NT-Xent loss, on the 2N gathered rows [a; b]: cosine similarity / tau, the positive
    of row i is row i +- N, the other 2N - 2 rows are negatives; mean over the 2N anchors. Negatives
    come from every rank, with gradients (gather). tau = 0.1 is the SIE code's default (sie.md §3)."""
    z = F.normalize(torch.cat([gather(a.float()), gather(b.float())]), dim=1)     # (2N, d)
    n = z.shape[0] // 2
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, positive)

# ---- SimCLR + AugSelf (Lee et al., NeurIPS 2021) ----

def augself_loss(head, y1, y2, g):
    """Sec. 3 of AugSelf with the SIE code's target: MSE between phi([y; y']) and the relative transformation g
    (quaternion, + two hue differences with --color). y, y' are NOT detached: the head's gradient
    shapes the backbone, which is the point of AugSelf. One order only, as in the SIE code
    (Deviation from AugSelf's code, which also feeds [y'; y])."""
    return F.mse_loss(head(torch.cat([y1, y2], dim=1)).float(), g.float())

# ---- EquiMod (Devillers & Lefort, ICLR 2023) ----

def equimod_simclr_loss(z1_inv, z2_inv, pred, z2_equi, temperature=0.1, alpha=1.0):
    """EquiMod Sec. 3: L_inv + alpha L_equi, both NT-Xent. The equivariant term is NT-Xent between
    the predictions p(z_equi, g) and the actual embeddings of the second view: prediction i is positive
    with target i; all other predictions and targets are negatives (sie.md §3)."""
    inv, equi = nt_xent(z1_inv, z2_inv, temperature), nt_xent(pred, z2_equi, temperature)
    return inv + alpha * equi, dict(inv=inv, equi=equi)


def equimod_vicreg_loss(z1_inv, z2_inv, z1_equi, z2_equi, pred, batch_size, alpha=0.45,
                        sim_coeff=10.0, std_coeff=10.0, cov_coeff=1.0):
    """The SIE code's VICReg-based EquiMod (sie.md §3): VIC on the invariant embeddings + alpha x
    [lambda MSE(p(z_equi, g), z'_equi) + mu v + nu c], where v and c act on the equivariant
    embeddings of both views (not on the predictions). No cross-decorrelation of inv and equi."""
    loss_inv, t = vicreg_loss(z1_inv, z2_inv, batch_size, sim_coeff, std_coeff, cov_coeff)
    equi = F.mse_loss(pred.float(), z2_equi.float())
    std_e, cov_e = vicreg_regularizer(z1_equi, z2_equi, batch_size)
    loss_equi = sim_coeff * equi + std_coeff * std_e + cov_coeff * cov_e
    return loss_inv + alpha * loss_equi, dict(inv=t["inv"], equi=equi, std=t["std"] + std_e, cov=t["cov"] + cov_e)

# ---- SIE ablation rows: VICReg part-inv, SimCLR only-equi ----

def vicreg_partinv_loss(z1, z2, n_inv, batch_size, sim_coeff=10.0, std_coeff=10.0, cov_coeff=1.0):
    """VICReg whose invariance MSE covers only the first n_inv embedding dims; variance and
    covariance cover all of them (sie.md §3 "VICRegPartInv"). The last dims are left free."""
    inv = F.mse_loss(z1[:, :n_inv].float(), z2[:, :n_inv].float())
    std, cov = vicreg_regularizer(z1, z2, batch_size)
    return sim_coeff * inv + std_coeff * std + cov_coeff * cov, dict(inv=inv, std=std, cov=cov)


def simclr_onlyequi_loss(pred, z2, temperature=0.1):
    """NT-Xent(p(z, g), z'): SimCLR where view 1 must first be moved by the predictor (sie.md §3)."""
    return nt_xent(pred, z2, temperature)
