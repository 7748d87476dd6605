"""Self-supervised losses as pure functions of tensors.

No module state, no collectives: a method gathers across trainers first (see
`ssl/distributed.py`) and passes what it gathered in. Embeddings are normalised inside
a loss only where the loss's definition says so (documented per function).
Half-precision inputs are computed in float32 (softmaxes and correlations over
thousands of terms lose too much in bf16); float32/float64 inputs keep their dtype.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _wide(*tensors: Tensor):
    """Upcast half-precision tensors to float32; leave the others alone."""
    out = [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors]
    return out[0] if len(out) == 1 else out


def info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """MoCo's InfoNCE: each query against its own key (positive) and a queue of negatives.

    q, k: [B, D] L2-normalised; queue: [K, D] L2-normalised. Keys and queue carry no
    gradient in MoCo; the caller detaches them. Returns the mean cross-entropy with the
    positive at index 0.
    """
    q, k, queue = _wide(q, k, queue)
    pos = (q * k).sum(dim=1, keepdim=True)
    logits = torch.cat([pos, q @ queue.t()], dim=1)
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits / temperature, labels)


def cross_batch_info_nce(q: Tensor, keys: Tensor, temperature: float, offset: int = 0) -> Tensor:
    """MoCo-v3's loss: queries [B, D] against every key of the (gathered) batch [N, D].

    The positive of query i is key `offset + i` (offset = rank x local batch). Inputs are
    normalised here, as in MoCo-v3. Returns 2·T·CE, the scale MoCo-v3 uses.
    """
    q, keys = _wide(q, keys)
    q = F.normalize(q, dim=1)
    keys = F.normalize(keys, dim=1)
    logits = q @ keys.t() / temperature
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2 * temperature)


def nt_xent(z_a: Tensor, z_b: Tensor, temperature: float, all_a: Optional[Tensor] = None,
            all_b: Optional[Tensor] = None, offset: int = 0) -> Tensor:
    """SimCLR's NT-Xent. Each of the 2B local embeddings is classified against every other
    of the 2N global ones (N = gathered batch; `all_a`/`all_b` default to the local ones);
    the positive of a_i is b_{offset+i} and vice versa. Normalised here.
    """
    all_a = z_a if all_a is None else all_a
    all_b = z_b if all_b is None else all_b
    z_a, z_b, all_a, all_b = _wide(z_a, z_b, all_a, all_b)
    rows = F.normalize(torch.cat([z_a, z_b]), dim=1)
    cols = F.normalize(torch.cat([all_a, all_b]), dim=1)
    b, n = z_a.shape[0], all_a.shape[0]
    logits = rows @ cols.t() / temperature
    idx = torch.arange(b, device=z_a.device) + offset
    row_self = torch.cat([idx, idx + n])  # column of each row's own embedding
    logits = logits.masked_fill(
        F.one_hot(row_self, 2 * n).bool(), float("-inf"))
    labels = torch.cat([idx + n, idx])
    return F.cross_entropy(logits, labels)


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam's D(p, z) = -cos(p, stopgrad(z)), averaged over the batch (z is detached)."""
    p, z = _wide(p, z)
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's ||p̂ - ẑ||² = 2 - 2·cos(p, stopgrad(z)), averaged over the batch."""
    return 2 + 2 * negative_cosine(p, z)


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, epsilon: float = 0.05, iterations: int = 3,
                   world_size: int = 1, all_reduce: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """SwAV's equipartitioned soft codes from prototype scores [B, K].

    `all_reduce` (sum over trainers, in place) and `world_size` make the row/column
    sums global, as in SwAV's distributed_sinkhorn. Returns codes [B, K]; rows sum to 1.
    """
    reduce = all_reduce or (lambda t: t)
    q = torch.exp(scores.float() / epsilon).t()  # K x B
    k, b = q.shape[0], q.shape[1] * world_size
    total = reduce(q.sum().clone())
    q = q / total
    for _ in range(iterations):
        rows = reduce(q.sum(dim=1, keepdim=True).clone())
        q = q / rows / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t().to(scores.dtype)


def swav_loss(scores: Sequence[Tensor], codes: Sequence[Tensor], temperature: float) -> Tensor:
    """SwAV's swapped prediction. `scores[v]` are prototype scores of view v [B, K];
    `codes[i]` the Sinkhorn codes of view i (views 0..len(codes)-1 are assigned). Each
    code predicts every OTHER view; the mean over (code, view) pairs is returned.
    """
    total, pairs = 0.0, 0
    for i, q in enumerate(codes):
        q = _wide(q).detach()
        for v, s in enumerate(scores):
            if v == i:
                continue
            total = total - (q * F.log_softmax(_wide(s) / temperature, dim=1)).sum(dim=1).mean()
            pairs += 1
    return total / pairs


def dino_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], center: Tensor,
              student_temp: float, teacher_temp: float) -> Tensor:
    """DINO's cross-entropy between centred, sharpened teacher outputs of the global views
    and the student's outputs of every OTHER view; mean over (teacher view, student view).
    """
    total, pairs = 0.0, 0
    for i, t in enumerate(teacher):
        t, c = _wide(t, center)
        p_t = F.softmax((t.detach() - c) / teacher_temp, dim=1)
        for v, s in enumerate(student):
            if v == i:
                continue
            total = total - (p_t * F.log_softmax(_wide(s) / student_temp, dim=1)).sum(dim=1).mean()
            pairs += 1
    return total / pairs


def barlow_twins_loss(z_a: Tensor, z_b: Tensor, lambd: float = 0.0051, eps: float = 1e-5) -> Tensor:
    """Barlow Twins: standardise each dimension over the batch (as BatchNorm without
    affine: biased variance), cross-correlation C = z_aᵀ z_b / N, loss Σ(1-C_ii)² + λ Σ_{i≠j} C_ij².
    """
    z_a, z_b = _wide(z_a, z_b)
    n = z_a.shape[0]

    def standardise(z: Tensor) -> Tensor:
        return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)

    c = standardise(z_a).t() @ standardise(z_b) / n
    diag = torch.diagonal(c)
    on = (1 - diag).pow(2).sum()
    off = c.pow(2).sum() - diag.pow(2).sum()
    return on + lambd * off


def vicreg_loss(z_a: Tensor, z_b: Tensor, sim_weight: float = 25.0, var_weight: float = 25.0,
                cov_weight: float = 1.0, eps: float = 1e-4) -> Tensor:
    """VICReg: invariance (MSE) + variance (hinge on each dimension's std at 1) +
    covariance (squared off-diagonal covariances / D), for both branches."""
    z_a, z_b = _wide(z_a, z_b)
    n, d = z_a.shape
    invariance = F.mse_loss(z_a, z_b)

    def variance(z: Tensor) -> Tensor:
        return F.relu(1 - torch.sqrt(z.var(0) + eps)).mean()

    def covariance(z: Tensor) -> Tensor:
        z = z - z.mean(0)
        cov = z.t() @ z / (n - 1)
        off = cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()
        return off / d

    var = (variance(z_a) + variance(z_b)) / 2
    cov = covariance(z_a) + covariance(z_b)
    return sim_weight * invariance + var_weight * var + cov_weight * cov


def adco_loss(q: Tensor, k: Tensor, memory_bank: Tensor, temperature: float) -> Tensor:
    """AdCo: InfoNCE of each query against its key and a learnable bank of negatives
    [M, D]. q and k are L2-normalised by the caller; the bank is normalised here (it is
    a free parameter). Gradients reach q and the bank: the encoder descends on this
    loss while the bank ASCENDS on it (the method reverses the bank's gradient).
    """
    q, k, memory_bank = _wide(q, k, memory_bank)
    bank = F.normalize(memory_bank, dim=1)
    pos = (q * k).sum(dim=1, keepdim=True)
    logits = torch.cat([pos, q @ bank.t()], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)
