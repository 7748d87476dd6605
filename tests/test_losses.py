"""Every loss against an independent, written-out formula (loops, explicit math):
values and gradients (torch.autograd.grad) agree to 1e-5 on random float64 inputs."""
import math

import torch

from sasi_online.ssl import losses as L

TOL = dict(rtol=1e-5, atol=1e-5)


def rand(*shape, seed=0, normalize=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float64)
    if normalize:
        t = t / t.norm(dim=-1, keepdim=True)
    return t.requires_grad_(True)


def check(fn_value, ref_value, inputs):
    """Same value; same gradient for every input (None-gradients count as zero)."""
    assert torch.isfinite(fn_value)
    torch.testing.assert_close(fn_value, ref_value, **TOL)
    g_fn = torch.autograd.grad(fn_value, inputs, allow_unused=True, retain_graph=True)
    g_ref = torch.autograd.grad(ref_value, inputs, allow_unused=True, retain_graph=True)
    for a, b, x in zip(g_fn, g_ref, inputs):
        a = torch.zeros_like(x) if a is None else a
        b = torch.zeros_like(x) if b is None else b
        torch.testing.assert_close(a, b, **TOL)
    return g_fn


def unit(v):
    return v / torch.sqrt((v * v).sum())


def test_info_nce():
    q, k, queue = rand(6, 5, seed=1, normalize=True), rand(6, 5, seed=2, normalize=True), rand(11, 5, seed=3, normalize=True)
    t = 0.2
    total = 0.0
    for i in range(6):
        pos = torch.exp(torch.dot(q[i], k[i]) / t)
        neg = sum(torch.exp(torch.dot(q[i], queue[j]) / t) for j in range(11))
        total = total - torch.log(pos / (pos + neg))
    check(L.info_nce(q, k, queue, t), total / 6, [q, k, queue])


def test_cross_batch_info_nce_with_offset():
    q, keys = rand(3, 4, seed=1), rand(7, 4, seed=2)  # 3 local queries, 7 gathered keys
    t, offset = 0.3, 2
    total = 0.0
    for i in range(3):
        qi = unit(q[i])
        logits = [torch.dot(qi, unit(keys[j])) / t for j in range(7)]
        denom = sum(torch.exp(x) for x in logits)
        total = total - (logits[offset + i] - torch.log(denom))
    check(L.cross_batch_info_nce(q, keys, t, offset), total / 3 * 2 * t, [q, keys])


def nt_xent_reference(all_a, all_b, t, rows):
    """Global NT-Xent restricted to the anchors listed in `rows` (indices into a ∪ b)."""
    z = torch.cat([all_a, all_b])
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for r in rows:
        pos = (r + n) % n2
        sims = [torch.dot(unit(z[r]), unit(z[c])) / t for c in range(n2)]
        denom = sum(torch.exp(sims[c]) for c in range(n2) if c != r)
        total = total - (sims[pos] - torch.log(denom))
    return total / len(rows)


def test_nt_xent_local():
    a, b = rand(4, 6, seed=1), rand(4, 6, seed=2)
    check(L.nt_xent(a, b, 0.5), nt_xent_reference(a, b, 0.5, range(8)), [a, b])


def test_nt_xent_gathered_rows_average_to_the_global_loss():
    # Two "trainers" with 3 samples each: each computes its local rows against the gathered
    # batch; their mean must be the single-process loss over all 6 samples.
    a, b = rand(6, 5, seed=3), rand(6, 5, seed=4)
    t = 0.1
    per_rank = [L.nt_xent(a[r * 3:(r + 1) * 3], b[r * 3:(r + 1) * 3], t, a, b, offset=3 * r) for r in range(2)]
    rank1_rows = [3, 4, 5, 9, 10, 11]
    check(per_rank[1], nt_xent_reference(a, b, t, rank1_rows), [a, b])
    check((per_rank[0] + per_rank[1]) / 2, nt_xent_reference(a, b, t, range(12)), [a, b])


def test_negative_cosine_and_byol_stop_gradient():
    p, z = rand(5, 7, seed=1), rand(5, 7, seed=2)
    ref = -sum(torch.dot(p[i], z[i].detach()) / (p[i].norm() * z[i].detach().norm()) for i in range(5)) / 5
    grads = check(L.negative_cosine(p, z), ref, [p, z])
    assert grads[1] is None  # stop-gradient on z
    byol_ref = sum(((unit(p[i]) - unit(z[i].detach())) ** 2).sum() for i in range(5)) / 5
    check(L.byol_loss(p, z), byol_ref, [p, z])


def sinkhorn_reference(scores, eps, iters):
    b, k = scores.shape
    q = [[math.exp(float(scores[i, j]) / eps) for i in range(b)] for j in range(k)]  # K x B
    s = sum(map(sum, q))
    q = [[v / s for v in row] for row in q]
    for _ in range(iters):
        q = [[v / sum(row) / k for v in row] for row in q]
        cols = [sum(q[j][i] for j in range(k)) for i in range(b)]
        q = [[q[j][i] / cols[i] / b for i in range(b)] for j in range(k)]
    return torch.tensor([[q[j][i] * b for j in range(k)] for i in range(b)], dtype=torch.float64)


def test_sinkhorn_matches_reference_and_equipartitions():
    scores = rand(6, 4, seed=5, normalize=True).detach()
    codes = L.sinkhorn_knopp(scores, epsilon=0.05, iterations=3)
    torch.testing.assert_close(codes, sinkhorn_reference(scores, 0.05, 3), **TOL)
    torch.testing.assert_close(codes.sum(1), torch.ones(6, dtype=torch.float64), **TOL)
    # Many iterations: every prototype receives the same share of the batch.
    many = L.sinkhorn_knopp(scores, epsilon=0.5, iterations=200)
    torch.testing.assert_close(many.sum(0), torch.full((4,), 6 / 4, dtype=torch.float64), rtol=1e-4, atol=1e-4)


def test_sinkhorn_all_reduce_and_world_size_are_used():
    scores = rand(4, 3, seed=6, normalize=True).detach()
    # An "all_reduce" that doubles (two identical ranks): codes equal one rank over the
    # duplicated batch.
    codes = L.sinkhorn_knopp(scores, 0.05, 3, world_size=2, all_reduce=lambda t: t.mul_(2))
    both = L.sinkhorn_knopp(torch.cat([scores, scores]), 0.05, 3)
    torch.testing.assert_close(codes, both[:4], **TOL)


def test_swav_loss():
    scores = [rand(4, 5, seed=s) for s in range(4)]  # 2 global + 2 local views
    codes = [torch.softmax(rand(4, 5, seed=10 + s).detach(), 1) for s in range(2)]
    t = 0.1
    total, pairs = 0.0, 0
    for i in range(2):
        for v in range(4):
            if v == i:
                continue
            for n in range(4):
                logz = torch.log(sum(torch.exp(scores[v][n, c] / t) for c in range(5)))
                total = total - sum(codes[i][n, c] * (scores[v][n, c] / t - logz) for c in range(5)) / 4
            pairs += 1
    check(L.swav_loss(scores, codes, t), total / pairs, scores)


def test_dino_loss():
    student = [rand(3, 6, seed=s) for s in range(3)]
    teacher = [rand(3, 6, seed=20 + s) for s in range(2)]
    center = rand(1, 6, seed=30).detach()
    st, tt = 0.1, 0.04
    total, pairs = 0.0, 0
    for i in range(2):
        for v in range(3):
            if v == i:
                continue
            for n in range(3):
                te = [torch.exp((teacher[i][n, c].detach() - center[0, c]) / tt) for c in range(6)]
                pt = [x / sum(te) for x in te]
                logz = torch.log(sum(torch.exp(student[v][n, c] / st) for c in range(6)))
                total = total - sum(pt[c] * (student[v][n, c] / st - logz) for c in range(6)) / 3
            pairs += 1
    grads = check(L.dino_loss(student, teacher, center, st, tt), total / pairs, student + teacher)
    assert all(g is None for g in grads[3:])  # the teacher gets no gradient


def test_barlow_twins_loss():
    a, b = rand(8, 4, seed=1), rand(8, 4, seed=2)
    n, d, lambd, eps = 8, 4, 0.0051, 1e-5

    def standardise(z, j):
        mean = sum(z[r, j] for r in range(n)) / n
        var = sum((z[r, j] - mean) ** 2 for r in range(n)) / n
        return [(z[r, j] - mean) / torch.sqrt(var + eps) for r in range(n)]

    sa = [standardise(a, j) for j in range(d)]
    sb = [standardise(b, j) for j in range(d)]
    total = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(sa[i][r] * sb[j][r] for r in range(n)) / n
            total = total + ((1 - c) ** 2 if i == j else lambd * c ** 2)
    check(L.barlow_twins_loss(a, b, lambd), total, [a, b])


def test_vicreg_loss():
    a, b = rand(6, 3, seed=1), rand(6, 3, seed=2) * 0.5
    n, d = 6, 3
    inv = sum((a[r, j] - b[r, j]) ** 2 for r in range(n) for j in range(d)) / (n * d)

    def terms(z):
        mean = [sum(z[r, j] for r in range(n)) / n for j in range(d)]
        cov = [[sum((z[r, i] - mean[i]) * (z[r, j] - mean[j]) for r in range(n)) / (n - 1)
                for j in range(d)] for i in range(d)]
        var = sum(torch.relu(1 - torch.sqrt(cov[j][j] + 1e-4)) for j in range(d)) / d
        off = sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d
        return var, off

    (va, ca), (vb, cb) = terms(a), terms(b)
    ref = 25 * inv + 25 * (va + vb) / 2 + 1 * (ca + cb)
    check(L.vicreg_loss(a, b, 25.0, 25.0, 1.0), ref, [a, b])


def test_adco_loss_normalises_the_bank():
    q, k = rand(4, 5, seed=1, normalize=True), rand(4, 5, seed=2, normalize=True)
    bank = (rand(9, 5, seed=3).detach() * 3).requires_grad_(True)  # not unit-norm on purpose
    t = 0.12
    total = 0.0
    for i in range(4):
        pos = torch.exp(torch.dot(q[i], k[i]) / t)
        neg = sum(torch.exp(torch.dot(q[i], unit(bank[j])) / t) for j in range(9))
        total = total - torch.log(pos / (pos + neg))
    check(L.adco_loss(q, k, bank, t), total / 4, [q, k, bank])



def test_half_precision_inputs_are_computed_in_float32():
    # bf16 embeddings (DeepSpeed bf16): the loss is computed on their exact values in
    # float32, not in bf16 arithmetic.
    q = torch.nn.functional.normalize(torch.randn(8, 16), dim=1).bfloat16()
    k = torch.nn.functional.normalize(torch.randn(8, 16), dim=1).bfloat16()
    queue = torch.nn.functional.normalize(torch.randn(64, 16), dim=1).bfloat16()
    out = L.info_nce(q, k, queue, 0.07)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, L.info_nce(q.float(), k.float(), queue.float(), 0.07))
    a, b = torch.randn(16, 8).bfloat16(), torch.randn(16, 8).bfloat16()
    torch.testing.assert_close(L.barlow_twins_loss(a, b), L.barlow_twins_loss(a.float(), b.float()))
