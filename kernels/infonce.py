"""MoCo's InfoNCE over a queue of negatives, forward and backward, without [B, 1+K] logits.

loss = mean_i [ logsumexp_j(l_ij) - l_i0 ],  l_i0 = q_i.k_i / T,  l_ij = q_i.queue_(j-1) / T

The reference builds the logits and calls cross_entropy: autograd keeps a [B, 1+K]
tensor alive between forward and backward (and makes another in the backward). The
Triton path streams the queue in blocks with an online logsumexp (the queue is cut into
ranges handled in parallel and their partial results merged); it keeps only the per-row
logsumexp and positive logit ([B] each) and recomputes the logits block by block in the
backward:

    dL/dq_i = g/(B T) * ( (p_i0 - 1) k_i + sum_j p_ij queue_j ),   p = softmax(l_i)
    dL/dk_i = g/(B T) * (p_i0 - 1) q_i

The queue is a buffer (filled from the key encoder); it gets no gradient.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from sasi_online.errors import UserInputError

from ._triton import jit, next_power_of_2, require_triton

try:
    import triton.language as tl
except Exception:  # noqa: BLE001 - Triton is optional; require_triton explains at call time
    tl = None

MAX_DIM = 512  # one [BLOCK_B, D] tile of q stays in registers; larger D: use the torch path


def _check(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> None:
    if q.ndim != 2 or k.shape != q.shape:
        raise UserInputError(f"q, k: expected two [B, D] tensors of one shape, got "
                             f"{tuple(q.shape)} and {tuple(k.shape)}.")
    if queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise UserInputError(f"queue: expected [K, D] with D={q.shape[1]} (q's feature size), "
                             f"got {tuple(queue.shape)}.")
    if q.shape[0] == 0:
        raise UserInputError("q: the batch is empty; InfoNCE needs at least one query.")
    if not temperature > 0:
        raise UserInputError(f"temperature={temperature}: must be > 0 (MoCo uses 0.07-0.2).")


def infonce_torch(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """Reference: MoCo's logits [B, 1+K] (positive first) and cross-entropy to index 0."""
    _check(q, k, queue, temperature)
    pos = (q * k).sum(1, keepdim=True)
    neg = q @ queue.detach().t()
    logits = torch.cat([pos, neg], 1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


@jit
def infonce_fwd_kernel(q_ptr, k_ptr, queue_ptr, m_ptr, l_ptr, pos_ptr, B, K, D, inv_t, chunk,
                       BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Program (row block, split): running max m and sum l of exp(logit - m) over the
    split's queue range; split 0 also counts the positive logit."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    dims = tl.arange(0, BLOCK_D)
    rmask = rows < B
    qk_mask = rmask[:, None] & (dims[None, :] < D)
    q = tl.load(q_ptr + rows[:, None] * D + dims[None, :], mask=qk_mask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + rows[:, None] * D + dims[None, :], mask=qk_mask, other=0.0).to(tl.float32)
    pos = tl.sum(q * k, 1) * inv_t
    first = split == 0
    m = tl.where(first, pos, float("-inf"))
    l = tl.where(first, 1.0, 0.0) + tl.zeros([BLOCK_B], tl.float32)
    k_lo = split * chunk
    k_hi = tl.minimum(k_lo + chunk, K)
    for start in range(k_lo, k_hi, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        cmask = cols < k_hi
        neg = tl.load(queue_ptr + cols[:, None] * D + dims[None, :],
                      mask=cmask[:, None] & (dims[None, :] < D), other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(neg), input_precision=PRECISION) * inv_t
        s = tl.where(cmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m = m_new
    tl.store(m_ptr + split * B + rows, m, mask=rmask)
    tl.store(l_ptr + split * B + rows, l, mask=rmask)
    tl.store(pos_ptr + rows, pos, mask=rmask & first)


@jit
def infonce_bwd_kernel(q_ptr, k_ptr, queue_ptr, lse_ptr, pos_ptr, gout_ptr, dq_ptr, dk_ptr,
                       B, K, D, inv_t, chunk, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, NEED_DK: tl.constexpr):
    """Program (row block, split): this split's share of dL/dq (summed over splits by the
    caller); split 0 adds the positive's term and writes dL/dk."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    dims = tl.arange(0, BLOCK_D)
    rmask = rows < B
    qk_mask = rmask[:, None] & (dims[None, :] < D)
    q = tl.load(q_ptr + rows[:, None] * D + dims[None, :], mask=qk_mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    acc = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)  # sum_j p_ij queue_j over this split
    k_lo = split * chunk
    k_hi = tl.minimum(k_lo + chunk, K)
    for start in range(k_lo, k_hi, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        cmask = cols < k_hi
        neg = tl.load(queue_ptr + cols[:, None] * D + dims[None, :],
                      mask=cmask[:, None] & (dims[None, :] < D), other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(neg), input_precision=PRECISION) * inv_t
        p = tl.where(cmask[None, :], tl.exp(s - lse[:, None]), 0.0)
        acc += tl.dot(p, neg, input_precision=PRECISION)
    scale = tl.load(gout_ptr).to(tl.float32) * inv_t / B
    if split == 0:
        k = tl.load(k_ptr + rows[:, None] * D + dims[None, :], mask=qk_mask,
                    other=0.0).to(tl.float32)
        pos = tl.load(pos_ptr + rows, mask=rmask, other=0.0)
        pos_coef = tl.exp(pos - lse) - 1.0  # p_i0 - 1
        acc += pos_coef[:, None] * k
        if NEED_DK:
            dk = scale * pos_coef[:, None] * q
            tl.store(dk_ptr + rows[:, None] * D + dims[None, :], dk.to(dk_ptr.dtype.element_ty),
                     mask=qk_mask)
    tl.store(dq_ptr + split * B * D + rows[:, None] * D + dims[None, :], scale * acc,
             mask=qk_mask)


def _blocks(d: int) -> tuple[int, int, int]:
    block_d = max(16, next_power_of_2(d))
    return 16, 64 if block_d <= 256 else 32, block_d


def _split_plan(b: int, k: int, block_b: int, block_k: int, device: torch.device,
                splits: int | None) -> tuple[int, int]:
    """(splits, chunk): the queue is cut into `splits` ranges of `chunk` columns so that
    small batches still fill the GPU (row blocks x splits programs)."""
    k_blocks = max(1, -(-k // block_k))
    if splits is None:
        if device.type == "cuda":
            target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
            splits = -(-target // max(1, -(-b // block_b)))
        else:
            splits = 1  # the interpreter runs programs one by one: no gain
    splits = max(1, min(int(splits), k_blocks))
    chunk = -(-k_blocks // splits) * block_k
    return max(1, -(-k // chunk)) if k > 0 else 1, chunk


def _precision() -> str:
    # Follow torch's own matmul setting, so both paths round the same way.
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


class InfoNCEQueueFunction(torch.autograd.Function):
    """Fused InfoNCE; saves q, k, queue and two [B] vectors for the backward."""

    @staticmethod
    def forward(ctx, q, k, queue, temperature, splits):
        q_, k_, queue_ = q.contiguous(), k.contiguous(), queue.contiguous()
        b, d = q_.shape
        kq = queue_.shape[0]
        block_b, block_k, block_d = _blocks(d)
        n_splits, chunk = _split_plan(b, kq, block_b, block_k, q.device, splits)
        m = torch.empty(n_splits, b, device=q.device, dtype=torch.float32)
        l = torch.empty_like(m)
        pos = torch.empty(b, device=q.device, dtype=torch.float32)
        grid = ((b + block_b - 1) // block_b, n_splits)
        infonce_fwd_kernel[grid](q_, k_, queue_, m, l, pos, b, kq, d, 1.0 / temperature, chunk,
                                 BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_D=block_d,
                                 PRECISION=_precision())
        if n_splits == 1:
            lse = m[0] + torch.log(l[0])
        else:  # merge the splits' running (max, sum) pairs
            top = m.max(0).values
            lse = top + torch.log((l * torch.exp(m - top)).sum(0))
        ctx.save_for_backward(q_, k_, queue_, lse, pos)
        ctx.temperature, ctx.splits = temperature, splits
        return (lse - pos).mean().to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, queue, lse, pos = ctx.saved_tensors
        b, d = q.shape
        block_b, block_k, block_d = _blocks(d)
        n_splits, chunk = _split_plan(b, queue.shape[0], block_b, block_k, q.device,
                                       ctx.splits)
        need_dk = ctx.needs_input_grad[1]
        parts = torch.empty(n_splits, b, d, device=q.device, dtype=torch.float32)
        dk = torch.empty_like(k) if need_dk else parts  # placeholder pointer when unused
        grid = ((b + block_b - 1) // block_b, n_splits)
        infonce_bwd_kernel[grid](q, k, queue, lse, pos, grad_out.contiguous(), parts, dk, b,
                                 queue.shape[0], d, 1.0 / ctx.temperature, chunk,
                                 BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_D=block_d,
                                 PRECISION=_precision(), NEED_DK=need_dk)
        dq = (parts[0] if n_splits == 1 else parts.sum(0)).to(q.dtype)
        return dq, (dk if need_dk else None), None, None, None


def infonce_triton(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor,
                   temperature: float, splits: int | None = None) -> torch.Tensor:
    """Fused InfoNCE with autograd: gradients flow to q (and k if it requires grad).

    `splits` cuts the queue into that many ranges processed in parallel (default: enough
    to fill the GPU; 1 on the CPU interpreter)."""
    _check(q, k, queue, temperature)
    if q.shape[1] > MAX_DIM:
        raise UserInputError(f"q: feature size {q.shape[1]} exceeds the fused kernel's {MAX_DIM}; "
                             f"use backend='torch' for wider features.")
    require_triton([q, k, queue], "infonce")
    return InfoNCEQueueFunction.apply(q, k, queue.detach(), float(temperature), splits)


def infonce_saved_bytes(b: int, k: int, d: int, backend: str, itemsize: int = 4,
                        splits: int = 1) -> dict:
    """Tensor-size accounting of the extra memory each path needs, inputs excluded.

    `held_for_backward`: bytes autograd keeps between forward and backward. The reference
    keeps cross-entropy's [B, 1+K] log-softmax; the fused path two [B] float32 vectors.
    `backward_transient`: the largest extra tensors alive at once in the backward. The
    reference makes the [B, 1+K] gradient of the log-softmax and of the logits; the fused
    path one float32 [B, D] partial gradient per queue split plus the [B, D] gradients.
    """
    if backend == "torch":
        logits = b * (1 + k) * itemsize
        return {"held_for_backward": logits, "backward_transient": 2 * logits}
    if backend == "triton":
        return {"held_for_backward": 2 * b * 4,
                "backward_transient": splits * b * d * 4 + 2 * b * d * itemsize}
    raise UserInputError(f"backend={backend!r}: expected 'torch' or 'triton'.")


def infonce_held_bytes(fn, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor,
                       temperature: float) -> int:
    """Bytes autograd keeps between `fn`'s forward and backward, its inputs excluded —
    measured with saved-tensor hooks, to check `infonce_saved_bytes`' accounting."""
    inputs = {t.data_ptr() for t in (q, k, queue)}
    held = {}

    def pack(t):
        if t.data_ptr() not in inputs:
            held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(q, k, queue, temperature)
    return sum(held.values())
