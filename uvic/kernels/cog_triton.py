"""Fused flash-style Cog attention in Triton: forward and backward, never holding the score matrix.

    S = Q Kᵀ · scale,  A = sign(S) ⊙ softmax(|S|),  O = A V        (docs/design.md)

Flash attention with one sign: the online softmax runs over |S| (running max m ≥ 0 and running
sum l of exp(|S| − m)), the numerator takes sign(S), and the row log-sum-exp of |S| is saved.
Backward (FlashAttention-2's, five matmuls per block): a small kernel computes
δ = rowsum(dO ⊙ O); one kernel per key block recomputes S, A and dA = dO Vᵀ once, accumulates
dV = Aᵀ dO and dK = dSᵀ Q with dS = |A| ⊙ dA − A ⊙ δ, and adds dQ = dS K into a float32 buffer
with atomics. Where S is exactly 0, sign(S) = 0 gives A = 0 and dS = 0 (autograd's convention).

Head dims that are not a power of two are split into a power-of-two part and a small rest
(72 = 64 + 16 with 8 padded, 80 = 64 + 16, 96 = 64 + 32) instead of padding to 128.
Offsets are 64-bit; batch·heads run on grid axis 0 (no 65,535 limit); launches happen under the
tensors' CUDA device. Block sizes and pipeline stages are chosen to fit the device's shared
memory (`launch_config`); `problem` says why these kernels cannot run given inputs.

Dots accumulate in float32. Float32 inputs use TF32 tensor cores when
torch.backends.cuda.matmul.allow_tf32 is set, else IEEE float32 dots (correct but slow; `auto`
in uvic.attention then prefers the PyTorch backends). Import this module only where triton is
importable; it is validated on CPU with TRITON_INTERPRET=1 (the interpreter cannot run bf16 dots,
so there every dot is upcast to float32, and blocks are small).

The autograd entry is the custom op `uvic::cog_triton` (torch.library), so torch.compile treats
the kernels as one opaque op without a graph break.
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@triton.jit
def _dot(a, b, FP32: tl.constexpr, PRECISION: tl.constexpr):
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    else:
        return tl.dot(a, b)


@triton.jit
def _load(PTR, base, idx, n, s_n, dims, D, s_d):
    """(len(idx), len(dims)) tile at base + idx·s_n + dims·s_d (int64), zeros outside (n, D)."""
    ptrs = PTR + base + idx[:, None].to(tl.int64) * s_n + dims[None, :] * s_d
    return tl.load(ptrs, mask=(idx[:, None] < n) & (dims[None, :] < D), other=0.0)


@triton.jit
def _store(PTR, base, idx, n, s_n, dims, D, s_d, x):
    ptrs = PTR + base + idx[:, None].to(tl.int64) * s_n + dims[None, :] * s_d
    tl.store(ptrs, x.to(PTR.dtype.element_ty), mask=(idx[:, None] < n) & (dims[None, :] < D))


@triton.jit
def _valid(M, b, h, rows, cols, LQ, LK, smb, smh, smm, smn, HAS_MASK: tl.constexpr):
    """(BLOCK_M, BLOCK_N) True where the score exists and the mask (if any) says attend."""
    inside = (rows[:, None] < LQ) & (cols[None, :] < LK)
    if HAS_MASK:
        ptrs = M + b * smb + h * smh + rows[:, None].to(tl.int64) * smm + cols[None, :].to(tl.int64) * smn
        inside = inside & (tl.load(ptrs, mask=inside, other=0) != 0)
    return inside


@triton.jit
def _cog_fwd(Q, K, V, M, O, LSE,
             sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
             smb, smh, smm, smn, sob, soh, som, sod,
             H, LQ, LK, D, scale,
             HAS_MASK: tl.constexpr, FP32: tl.constexpr, PRECISION: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_base, k_base, v_base = b * sqb + h * sqh, b * skb + h * skh, b * svb + h * svh
    d0 = tl.arange(0, D0)
    q0 = _load(Q, q_base, rows, LQ, sqm, d0, D, sqd)  # (BLOCK_M, D0)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:  # the rest of a head dim that is not a power of two
        d1 = D0 + tl.arange(0, D1)
        q1 = _load(Q, q_base, rows, LQ, sqm, d1, D, sqd)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running max of |S|; |S| >= 0, so 0 is a valid start
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp(|S| - m_i)
    for start in range(0, LK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        s = _dot(q0, tl.trans(_load(K, k_base, cols, LK, skn, d0, D, skd)), FP32, PRECISION)
        if D1 > 0:
            s += _dot(q1, tl.trans(_load(K, k_base, cols, LK, skn, d1, D, skd)), FP32, PRECISION)
        s = s * scale  # (BLOCK_M, BLOCK_N) float32
        valid = _valid(M, b, h, rows, cols, LQ, LK, smb, smh, smm, smn, HAS_MASK)
        magnitude = tl.where(valid, tl.abs(s), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(magnitude, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(magnitude - m_new[:, None])  # 0 at masked keys
        l_i = l_i * alpha + tl.sum(p, 1)
        signed = tl.where(s > 0, p, tl.where(s < 0, -p, 0.0))  # sign(S) ⊙ exp(|S| - m)
        v0 = _load(V, v_base, cols, LK, svn, d0, D, svd)
        acc0 = acc0 * alpha[:, None] + _dot(signed.to(v0.dtype), v0, FP32, PRECISION)
        if D1 > 0:
            v1 = _load(V, v_base, cols, LK, svn, d1, D, svd)
            acc1 = acc1 * alpha[:, None] + _dot(signed.to(v1.dtype), v1, FP32, PRECISION)
        m_i = m_new
    l_safe = tl.where(rows < LQ, l_i, 1.0)  # fully masked rows give NaN, as the plain formula does
    o_base = b * sob + h * soh
    _store(O, o_base, rows, LQ, som, d0, D, sod, acc0 / l_safe[:, None])
    if D1 > 0:
        _store(O, o_base, rows, LQ, som, d1, D, sod, acc1 / l_safe[:, None])
    tl.store(LSE + bh * LQ + rows, m_i + tl.log(l_safe), mask=rows < LQ)


@triton.jit
def _cog_bwd_delta(O, DO, DELTA, sob, soh, som, sod, sdb, sdh, sdm, sdd, H, LQ, D,
                   BLOCK_M: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
    """δ = rowsum(dO ⊙ O) in float32, (B·H, Lq)."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_base, d_base = b * sob + h * soh, b * sdb + h * sdh
    d0 = tl.arange(0, D0)
    o = _load(O, o_base, rows, LQ, som, d0, D, sod).to(tl.float32)
    delta = tl.sum(o * _load(DO, d_base, rows, LQ, sdm, d0, D, sdd).to(tl.float32), 1)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        o1 = _load(O, o_base, rows, LQ, som, d1, D, sod).to(tl.float32)
        delta += tl.sum(o1 * _load(DO, d_base, rows, LQ, sdm, d1, D, sdd).to(tl.float32), 1)
    tl.store(DELTA + bh * LQ + rows, delta, mask=rows < LQ)


@triton.jit
def _cog_bwd(Q, K, V, M, DO, LSE, DELTA, DQ, DK, DV,
             sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
             smb, smh, smm, smn, sdb, sdh, sdm, sdd,
             H, LQ, LK, D, scale,
             HAS_MASK: tl.constexpr, FP32: tl.constexpr, PRECISION: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
    """One block of keys: dK, dV written; dQ added (float32 atomics) into DQ, contiguous (B·H, Lq, D)."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    q_base, k_base, v_base, d_base = b * sqb + h * sqh, b * skb + h * skh, b * svb + h * svh, b * sdb + h * sdh
    d0 = tl.arange(0, D0)
    k0 = _load(K, k_base, cols, LK, skn, d0, D, skd)  # (BLOCK_N, D0)
    v0 = _load(V, v_base, cols, LK, svn, d0, D, svd)
    d_k0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    d_v0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        k1 = _load(K, k_base, cols, LK, skn, d1, D, skd)
        v1 = _load(V, v_base, cols, LK, svn, d1, D, svd)
        d_k1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
        d_v1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    for start in range(0, LQ, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q0 = _load(Q, q_base, rows, LQ, sqm, d0, D, sqd)
        do0 = _load(DO, d_base, rows, LQ, sdm, d0, D, sdd)
        s = _dot(q0, tl.trans(k0), FP32, PRECISION)
        d_a = _dot(do0, tl.trans(v0), FP32, PRECISION)  # dA = dO Vᵀ
        if D1 > 0:
            q1 = _load(Q, q_base, rows, LQ, sqm, d1, D, sqd)
            do1 = _load(DO, d_base, rows, LQ, sdm, d1, D, sdd)
            s += _dot(q1, tl.trans(k1), FP32, PRECISION)
            d_a += _dot(do1, tl.trans(v1), FP32, PRECISION)
        s = s * scale
        lse = tl.load(LSE + bh * LQ + rows, mask=rows < LQ, other=0.0)
        delta = tl.load(DELTA + bh * LQ + rows, mask=rows < LQ, other=0.0)
        valid = _valid(M, b, h, rows, cols, LQ, LK, smb, smh, smm, smn, HAS_MASK) & (s != 0)  # sign(0) = 0
        a_abs = tl.where(valid, tl.exp(tl.abs(s) - lse[:, None]), 0.0)  # |A|
        a = tl.where(s > 0, a_abs, -a_abs)  # A
        d_s = a_abs * d_a - a * delta[:, None]  # dS = |A| ⊙ dA − A ⊙ rowsum(dO ⊙ O)
        d_v0 += _dot(tl.trans(a.to(do0.dtype)), do0, FP32, PRECISION)  # dV = Aᵀ dO
        d_k0 += _dot(tl.trans(d_s.to(q0.dtype)), q0, FP32, PRECISION)  # dK = dSᵀ Q (· scale at the end)
        d_s = d_s.to(k0.dtype)
        dq_ptrs = DQ + bh * LQ * D + rows[:, None].to(tl.int64) * D
        tl.atomic_add(dq_ptrs + d0[None, :], _dot(d_s, k0, FP32, PRECISION) * scale,
                      mask=(rows[:, None] < LQ) & (d0[None, :] < D))  # dQ = dS K · scale
        if D1 > 0:
            d_v1 += _dot(tl.trans(a.to(do1.dtype)), do1, FP32, PRECISION)
            d_k1 += _dot(tl.trans(d_s.to(q1.dtype)), q1, FP32, PRECISION)
            tl.atomic_add(dq_ptrs + d1[None, :], _dot(d_s, k1, FP32, PRECISION) * scale,
                          mask=(rows[:, None] < LQ) & (d1[None, :] < D))
    out_base = bh * LK * D  # DK, DV contiguous (B, H, Lk, D)
    _store(DK, out_base, cols, LK, D, d0, D, 1, d_k0 * scale)
    _store(DV, out_base, cols, LK, D, d0, D, 1, d_v0)
    if D1 > 0:
        _store(DK, out_base, cols, LK, D, d1, D, 1, d_k1 * scale)
        _store(DV, out_base, cols, LK, D, d1, D, 1, d_v1)


# ------------------------------------------------------------------------------------- launch choices
class LaunchConfig(NamedTuple):
    """Block sizes of one kernel: rows (queries) x cols (keys), the head dim split D0 + D1."""
    block_m: int
    block_n: int
    d0: int
    d1: int
    num_warps: int
    num_stages: int


# (BLOCK_M, BLOCK_N, num_warps, num_stages), fastest first; the first that fits shared memory wins
FORWARD_CANDIDATES = ((128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (64, 32, 4, 1))
BACKWARD_CANDIDATES = ((64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (64, 32, 4, 1))  # 8 warps: no spills at D 64 (sm_90)


def split_head_dim(head_dim: int) -> Tuple[int, int]:
    """(D0, D1): D0 the largest power of two <= head_dim (>= 16), D1 a power of two >= 16 for the
    rest or 0. 64 -> (64, 0), 72 -> (64, 16), 80 -> (64, 16), 96 -> (64, 32), 128 -> (128, 0)."""
    d0 = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - d0
    return d0, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


def shared_memory_bytes(kind: str, block_m: int, block_n: int, padded_dim: int, element_bytes: int,
                        num_stages: int) -> int:
    """Estimated shared memory of one program, an upper bound of what triton 3.8 allocates for sm_80
    and sm_90 (checked by compiling: tests/test_cuda_path.py): pipelined tiles (stages x loaded
    tiles), tiles held for the whole loop, and score-sized tiles staged as dot operands."""
    if kind == "forward":  # Q held; K, V pipelined; the signed weights staged for the second dot
        return element_bytes * (padded_dim * (block_m + 2 * num_stages * block_n) + block_m * block_n)
    # backward: K, V held; Q, dO pipelined; A and dS transposed through shared memory
    return element_bytes * (padded_dim * (2 * block_n + 2 * num_stages * block_m) + 2 * block_m * block_n)


def max_shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one block may use on `device` (opt-in maximum)."""
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    if optin:
        return int(optin)
    return int(triton.runtime.driver.active.utils.get_device_properties(device.index or 0)["max_shared_mem"])


def launch_config(kind: str, head_dim: int, dtype: torch.dtype, device: torch.device) -> Optional[LaunchConfig]:
    """The first candidate of `kind` ("forward"/"backward") whose shared memory fits the device, or
    None. In the interpreter: small blocks (numpy runs them; no shared memory)."""
    d0, d1 = split_head_dim(head_dim)
    if interpreting() and device.type != "cuda":
        return LaunchConfig(16, 16, d0, d1, 1, 1)
    limit = max_shared_memory(device)
    element_bytes = torch.finfo(dtype).bits // 8
    for block_m, block_n, num_warps, num_stages in (FORWARD_CANDIDATES if kind == "forward" else BACKWARD_CANDIDATES):
        if shared_memory_bytes(kind, block_m, block_n, d0 + d1, element_bytes, num_stages) <= limit:
            return LaunchConfig(block_m, block_n, d0, d1, num_warps, num_stages)
    return None


def problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """Why these kernels cannot run q, k, v (B, H, L, D), or None when they can."""
    if q.device.type != "cuda" and not interpreting():
        return f"tensors are on {q.device.type}; the kernels need CUDA (or TRITON_INTERPRET=1)"
    if not q.shape[-1] == k.shape[-1] == v.shape[-1] <= 256:
        return f"head dims {q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}; the kernels need one head dim <= 256"
    if q.dtype not in SUPPORTED_DTYPES or not q.dtype == k.dtype == v.dtype:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}; the kernels need one of {SUPPORTED_DTYPES} for all three"
    if q.device.type != "cuda":
        return None
    capability = torch.cuda.get_device_capability(q.device)
    if capability < (7, 5) or (q.dtype == torch.bfloat16 and capability < (8, 0)):
        return f"{q.dtype} on a device of compute capability {capability[0]}.{capability[1]}: needs 8.0+ for " \
               "bfloat16 and 7.5+ otherwise"
    for kind in ("forward", "backward"):
        if launch_config(kind, q.shape[-1], q.dtype, q.device) is None:
            return (f"head dim {q.shape[-1]} in {q.dtype}: no {kind} block size fits the "
                    f"{max_shared_memory(q.device) // 1024} KiB of shared memory of {q.device}")
    return None


def _dot_args(dtype: torch.dtype, device: torch.device) -> dict:
    """FP32: dots on float32 operands (float32 inputs, or the interpreter, which cannot dot halves);
    PRECISION: "tf32" when float32 inputs may use TF32 tensor cores, else "ieee"."""
    tf32 = dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return dict(FP32=dtype == torch.float32 or interpreting(), PRECISION="tf32" if tf32 else "ieee")


def _mask_args(mask, q, k):
    """(tensor, strides) of the mask broadcast to (B, H, Lq, Lk) as uint8 with 0-strides, or dummies."""
    if mask is None:
        return q, (0, 0, 0, 0)  # never read: HAS_MASK is False
    mask = mask.expand(*q.shape[:-1], k.shape[-2]).view(torch.uint8)
    return mask, mask.stride()


def _launch(kind, q, mask):
    config = launch_config(kind, q.shape[-1], q.dtype, q.device)
    if config is None:
        raise RuntimeError(problem(q, q, q) or f"no {kind} launch configuration fits")
    meta = dict(HAS_MASK=mask is not None, BLOCK_M=config.block_m, BLOCK_N=config.block_n, D0=config.d0,
                D1=config.d1, num_warps=config.num_warps, num_stages=config.num_stages, **_dot_args(q.dtype, q.device))
    return config, meta


def _device_guard(t: torch.Tensor):
    """Launch on t's CUDA device, whichever device is current."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@torch.library.custom_op("uvic::cog_triton", mutates_args=())
def cog_triton_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                  scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(O (B, H, Lq, D) in v's dtype, lse (B, H, Lq) float32 of |S|)."""
    batch, heads, lq, dim = q.shape
    out = q.new_empty(batch, heads, lq, dim, dtype=v.dtype)
    lse = q.new_empty(batch, heads, lq, dtype=torch.float32)
    m, m_strides = _mask_args(mask, q, k)
    config, meta = _launch("forward", q, mask)
    with _device_guard(q):
        _cog_fwd[(batch * heads, triton.cdiv(lq, config.block_m))](
            q, k, v, m, out, lse, *q.stride(), *k.stride(), *v.stride(), *m_strides, *out.stride(),
            heads, lq, k.shape[-2], dim, scale, **meta)
    return out, lse


@cog_triton_op.register_fake
def _(q, k, v, mask, scale):
    return q.new_empty(*q.shape[:-1], v.shape[-1], dtype=v.dtype), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("uvic::cog_triton_backward", mutates_args=())
def cog_triton_backward_op(d_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor, mask: Optional[torch.Tensor],
                           scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) in the dtypes of q, k, v."""
    batch, heads, lq, dim = q.shape
    lk = k.shape[-2]
    delta = q.new_empty(batch, heads, lq, dtype=torch.float32)
    d_q = q.new_zeros(batch, heads, lq, dim, dtype=torch.float32)  # atomics add into it
    d_k = k.new_empty(batch, heads, lk, dim)
    d_v = v.new_empty(batch, heads, lk, dim)
    m, m_strides = _mask_args(mask, q, k)
    config, meta = _launch("backward", q, mask)
    with _device_guard(q):
        _cog_bwd_delta[(batch * heads, triton.cdiv(lq, config.block_m))](
            out, d_out, delta, *out.stride(), *d_out.stride(), heads, lq, dim,
            BLOCK_M=config.block_m, D0=config.d0, D1=config.d1)
        _cog_bwd[(batch * heads, triton.cdiv(lk, config.block_n))](
            q, k, v, m, d_out, lse, delta, d_q, d_k, d_v,
            *q.stride(), *k.stride(), *v.stride(), *m_strides, *d_out.stride(), heads, lq, lk, dim, scale, **meta)
    return d_q.to(q.dtype), d_k, d_v


@cog_triton_backward_op.register_fake
def _(d_out, q, k, v, out, lse, mask, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.mask, ctx.scale = mask, scale


def _backward(ctx, d_out, _d_lse):
    q, k, v, out, lse = ctx.saved_tensors
    d_q, d_k, d_v = cog_triton_backward_op(d_out, q, k, v, out, lse, ctx.mask, ctx.scale)
    return d_q, d_k, d_v, None, None


cog_triton_op.register_autograd(_backward, setup_context=_setup_context)


def cog_attention_triton(q, k, v, scale: float, mask=None):
    """O (B, H, Lq, D) in v's dtype for q (B, H, Lq, D), k, v (B, H, Lk, D) of one dtype (fp16/bf16/fp32).

    mask: None or boolean broadcastable to (B, H, Lq, Lk), True = attend.
    """
    if mask is not None:
        mask = mask.expand(*q.shape[:-1], k.shape[-2])
    return cog_triton_op(q, k, v, mask, float(scale))[0]
