"""Fused flash-style Cog attention in Triton: forward and backward, never holding the score matrix.

    S = Q Kᵀ · scale,  A = sign(S) ⊙ softmax(|S|),  O = A V        (DESIGN.md)

Flash attention with one sign: the online softmax runs over |S| (running max m ≥ 0 and running
sum l of exp(|S| − m)), the numerator takes sign(S), and the row log-sum-exp of |S| is saved.
Backward recomputes |A| = exp(|S| − lse) block by block and uses the closed form
dS = |A| ⊙ dA − A ⊙ rowsum(dO ⊙ O), in two kernels (dK/dV over key blocks, dQ over query blocks),
so no atomics are needed.

Inputs are (B, H, L, D) with any strides; the mask is any boolean tensor broadcastable to
(B, H, Lq, Lk) (read through its broadcast strides, so a key-padding mask costs no memory).
Dots accumulate in float32; float32 inputs use IEEE float32 dots (no TF32), so the result
matches the float32 promise of `uvic.attention`. Import this module only where triton is
importable; it is validated on CPU with TRITON_INTERPRET=1 (the interpreter cannot run bf16
dots, so there every dot is upcast to float32).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@triton.jit
def _dot(a, b, FP32_DOT: tl.constexpr):
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _tile(PTR, b, h, idx, dims, s_b, s_h, s_l, s_d, L, D):
    """(len(idx), BLOCK_D) tile of a (B, H, L, D) tensor: positions idx of head (b, h), zeros outside."""
    mask = (idx[:, None] < L) & (dims[None, :] < D)
    return tl.load(PTR + b * s_b + h * s_h + idx[:, None] * s_l + dims[None, :] * s_d, mask=mask, other=0.0)


@triton.jit
def _weights_and_score_grad(q, k, v, d_o, lse, delta, M, b, h, rows, cols, LQ, LK, smb, smh, smm, smn, scale,
                            HAS_MASK: tl.constexpr, FP32_DOT: tl.constexpr):
    """(A, dS) of one (BLOCK_M, BLOCK_N) block, recomputed from the saved log-sum-exp of |S|."""
    s = _dot(q, tl.trans(k), FP32_DOT) * scale
    valid = _valid(M, b, h, rows, cols, LQ, LK, smb, smh, smm, smn, HAS_MASK)
    a_abs = tl.where(valid, tl.exp(tl.abs(s) - lse[:, None]), 0.0)  # |A|
    a = tl.where(s > 0, a_abs, tl.where(s < 0, -a_abs, 0.0))  # A
    d_a = _dot(d_o, tl.trans(v), FP32_DOT)  # dA = dO Vᵀ
    return a, a_abs * d_a - a * delta[:, None]  # dS = |A| ⊙ dA − A ⊙ rowsum(dO ⊙ O)


@triton.jit
def _valid(M, b, h, rows, cols, LQ, LK, smb, smh, smm, smn, HAS_MASK: tl.constexpr):
    """(BLOCK_M, BLOCK_N) True where the score exists and the mask (if any) says attend."""
    inside = (rows[:, None] < LQ) & (cols[None, :] < LK)
    if HAS_MASK:
        keep = tl.load(M + b * smb + h * smh + rows[:, None] * smm + cols[None, :] * smn, mask=inside, other=0)
        inside = inside & (keep != 0)
    return inside


@triton.jit
def _cog_fwd(Q, K, V, M, O, LSE,
             sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
             smb, smh, smm, smn, sob, soh, som, sod,
             H, LQ, LK, D, scale,
             HAS_MASK: tl.constexpr, FP32_DOT: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = _tile(Q, b, h, rows, dims, sqb, sqh, sqm, sqd, LQ, D)  # (BLOCK_M, BLOCK_D)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running max of |S|; |S| >= 0, so 0 is a valid start
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp(|S| - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, LK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _tile(K, b, h, cols, dims, skb, skh, skn, skd, LK, D)  # (BLOCK_N, BLOCK_D)
        v = _tile(V, b, h, cols, dims, svb, svh, svn, svd, LK, D)
        s = _dot(q, tl.trans(k), FP32_DOT) * scale  # (BLOCK_M, BLOCK_N) float32
        valid = _valid(M, b, h, rows, cols, LQ, LK, smb, smh, smm, smn, HAS_MASK)
        magnitude = tl.where(valid, tl.abs(s), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(magnitude, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(magnitude - m_new[:, None])  # 0 at masked keys
        l_i = l_i * alpha + tl.sum(p, 1)
        signed = tl.where(s > 0, p, tl.where(s < 0, -p, 0.0))  # sign(S) ⊙ exp(|S| - m)
        acc = acc * alpha[:, None] + _dot(signed.to(v.dtype), v, FP32_DOT)
        m_i = m_new
    out = acc / tl.where(rows < LQ, l_i, 1.0)[:, None]  # fully masked rows give NaN, as the plain formula does
    tl.store(O + b * sob + h * soh + rows[:, None] * som + dims[None, :] * sod, out.to(O.dtype.element_ty),
             mask=(rows[:, None] < LQ) & (dims[None, :] < D))
    tl.store(LSE + bh * LQ + rows, m_i + tl.log(tl.where(rows < LQ, l_i, 1.0)), mask=rows < LQ)


@triton.jit
def _cog_bwd_dkdv(Q, K, V, M, DO, LSE, DELTA, DK, DV,
                  sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                  smb, smh, smm, smn, sdb, sdh, sdm, sdd,
                  H, LQ, LK, D, scale,
                  HAS_MASK: tl.constexpr, FP32_DOT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k = _tile(K, b, h, cols, dims, skb, skh, skn, skd, LK, D)  # (BLOCK_N, BLOCK_D)
    v = _tile(V, b, h, cols, dims, svb, svh, svn, svd, LK, D)
    d_k = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    d_v = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start in range(0, LQ, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = _tile(Q, b, h, rows, dims, sqb, sqh, sqm, sqd, LQ, D)  # (BLOCK_M, BLOCK_D)
        d_o = _tile(DO, b, h, rows, dims, sdb, sdh, sdm, sdd, LQ, D)
        lse = tl.load(LSE + bh * LQ + rows, mask=rows < LQ, other=0.0)
        delta = tl.load(DELTA + bh * LQ + rows, mask=rows < LQ, other=0.0)
        a, d_s = _weights_and_score_grad(q, k, v, d_o, lse, delta, M, b, h, rows, cols, LQ, LK, smb, smh, smm, smn,
                                         scale, HAS_MASK, FP32_DOT)
        d_v += _dot(tl.trans(a.to(d_o.dtype)), d_o, FP32_DOT)  # dV = Aᵀ dO
        d_k += _dot(tl.trans(d_s.to(q.dtype)), q, FP32_DOT)  # dK = dSᵀ Q (· scale at the end)
    offsets = bh * LK * D + cols[:, None] * D + dims[None, :]  # DK, DV contiguous (B, H, Lk, D)
    col_mask = (cols[:, None] < LK) & (dims[None, :] < D)
    tl.store(DK + offsets, (d_k * scale).to(DK.dtype.element_ty), mask=col_mask)
    tl.store(DV + offsets, d_v.to(DV.dtype.element_ty), mask=col_mask)


@triton.jit
def _cog_bwd_dq(Q, K, V, M, DO, LSE, DELTA, DQ,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                smb, smh, smm, smn, sdb, sdh, sdm, sdd,
                H, LQ, LK, D, scale,
                HAS_MASK: tl.constexpr, FP32_DOT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = _tile(Q, b, h, rows, dims, sqb, sqh, sqm, sqd, LQ, D)  # (BLOCK_M, BLOCK_D)
    d_o = _tile(DO, b, h, rows, dims, sdb, sdh, sdm, sdd, LQ, D)
    lse = tl.load(LSE + bh * LQ + rows, mask=rows < LQ, other=0.0)
    delta = tl.load(DELTA + bh * LQ + rows, mask=rows < LQ, other=0.0)
    d_q = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, LK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _tile(K, b, h, cols, dims, skb, skh, skn, skd, LK, D)
        v = _tile(V, b, h, cols, dims, svb, svh, svn, svd, LK, D)
        _, d_s = _weights_and_score_grad(q, k, v, d_o, lse, delta, M, b, h, rows, cols, LQ, LK, smb, smh, smm, smn,
                                         scale, HAS_MASK, FP32_DOT)
        d_q += _dot(d_s.to(k.dtype), k, FP32_DOT)  # dQ = dS K (· scale at the end)
    tl.store(DQ + bh * LQ * D + rows[:, None] * D + dims[None, :], (d_q * scale).to(DQ.dtype.element_ty),
             mask=(rows[:, None] < LQ) & (dims[None, :] < D))


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _blocks(head_dim: int):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps): small blocks in the interpreter, flash-sized on GPU."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if interpreting():
        return 16, 16, block_d, 1
    block = 64 if block_d <= 64 else 32
    return block, block, block_d, 4


def _mask_args(mask, q, k):
    """(tensor, strides) of the mask broadcast to (B, H, Lq, Lk) as uint8 with 0-strides, or dummies."""
    if mask is None:
        return q, (0, 0, 0, 0)  # never read: HAS_MASK is False
    mask = mask.expand(*q.shape[:-1], k.shape[-2]).view(torch.uint8)
    return mask, mask.stride()


def _meta(q, mask, fp32_dot):
    block_m, block_n, block_d, num_warps = _blocks(q.shape[-1])
    return dict(HAS_MASK=mask is not None, FP32_DOT=fp32_dot, BLOCK_M=block_m, BLOCK_N=block_n,
                BLOCK_D=block_d, num_warps=num_warps)


class _CogTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        batch, heads, lq, dim = q.shape
        lk = k.shape[-2]
        out = torch.empty(batch, heads, lq, dim, dtype=v.dtype, device=q.device)
        lse = torch.empty(batch, heads, lq, dtype=torch.float32, device=q.device)
        fp32_dot = q.dtype == torch.float32 or interpreting()
        m, m_strides = _mask_args(mask, q, k)
        meta = _meta(q, mask, fp32_dot)
        grid = (triton.cdiv(lq, meta["BLOCK_M"]), batch * heads)
        _cog_fwd[grid](q, k, v, m, out, lse, *q.stride(), *k.stride(), *v.stride(), *m_strides, *out.stride(),
                       heads, lq, lk, dim, scale, **meta)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale, ctx.fp32_dot = mask, scale, fp32_dot
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        batch, heads, lq, dim = q.shape
        lk = k.shape[-2]
        delta = (d_out.float() * out.float()).sum(-1).contiguous()  # (B, H, Lq) rowsum(dO ⊙ O)
        d_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        d_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        d_v = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        m, m_strides = _mask_args(ctx.mask, q, k)
        meta = _meta(q, ctx.mask, ctx.fp32_dot)
        common = (*q.stride(), *k.stride(), *v.stride(), *m_strides, *d_out.stride(), heads, lq, lk, dim, ctx.scale)
        _cog_bwd_dkdv[(triton.cdiv(lk, meta["BLOCK_N"]), batch * heads)](
            q, k, v, m, d_out, lse, delta, d_k, d_v, *common, **meta)
        _cog_bwd_dq[(triton.cdiv(lq, meta["BLOCK_M"]), batch * heads)](
            q, k, v, m, d_out, lse, delta, d_q, *common, **meta)
        return d_q, d_k, d_v, None, None


def cog_attention_triton(q, k, v, scale: float, mask=None):
    """O (B, H, Lq, D) in v's dtype for q (B, H, Lq, D), k, v (B, H, Lk, D) of one dtype (fp16/bf16/fp32).

    mask: None or boolean broadcastable to (B, H, Lq, Lk), True = attend.
    """
    return _CogTriton.apply(q, k, v, mask, float(scale))
