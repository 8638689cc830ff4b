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
tensors' CUDA device. The head dim is a constexpr, and where every stride is a multiple of 8
(`alignment`, checked per call) the row offsets are declared so, which gives vector loads and
cp.async pipelining also at D = 72. Block sizes and pipeline stages: the first candidate whose
compiled kernel fits the device's shared memory and launches (`launch`; OutOfResources moves to
the next). `problem` says why these kernels cannot run given inputs.

Dots accumulate in float32. Float32 inputs use TF32 tensor cores when torch allows TF32 for
float32 matmuls (uvic.kernels.tf32_allowed), else IEEE float32 dots (correct but slow; `auto`
in uvic.attention then prefers the PyTorch backends). Import this module only where triton is
importable; it is validated on CPU with TRITON_INTERPRET=1 (the interpreter cannot run bf16 dots,
so there every dot is upcast to float32, and blocks are small).

The autograd entry is the custom op `uvic::cog_triton` (torch.library), so torch.compile treats
the kernels as one opaque op without a graph break.
"""

from __future__ import annotations

import contextlib
import os
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import tf32_allowed

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
def _offsets(base, idx, s_n, dims, s_d, ALIGN: tl.constexpr):
    """(len(idx), len(dims)) int64 element offsets base + idx·s_n + dims·s_d. ALIGN: base and s_n are
    multiples of it (the wrapper checked: `alignment`); said to the compiler, it vectorises the loads
    even where the head dim is not a power of two (72: the head stride is only a multiple of 8)."""
    rows = tl.multiple_of(base + idx[:, None].to(tl.int64) * s_n, [ALIGN, ALIGN])  # (len(idx), 1)
    return rows + dims[None, :] * s_d


@triton.jit
def _load(PTR, base, idx, n, s_n, dims, D: tl.constexpr, s_d, ALIGN: tl.constexpr):
    """(len(idx), len(dims)) tile at base + idx·s_n + dims·s_d, zeros outside (n, D)."""
    ptrs = PTR + _offsets(base, idx, s_n, dims, s_d, ALIGN)
    return tl.load(ptrs, mask=(idx[:, None] < n) & (dims[None, :] < D), other=0.0)


@triton.jit
def _store(PTR, base, idx, n, s_n, dims, D: tl.constexpr, s_d, x, ALIGN: tl.constexpr):
    ptrs = PTR + _offsets(base, idx, s_n, dims, s_d, ALIGN)
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
             H, LQ, LK, scale,
             HAS_MASK: tl.constexpr, FP32: tl.constexpr, PRECISION: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
             D: tl.constexpr, ALIGN: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_base, k_base, v_base = b * sqb + h * sqh, b * skb + h * skh, b * svb + h * svh
    d0 = tl.arange(0, D0)
    q0 = _load(Q, q_base, rows, LQ, sqm, d0, D, sqd, ALIGN)  # (BLOCK_M, D0)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:  # the rest of a head dim that is not a power of two
        d1 = D0 + tl.arange(0, D1)
        q1 = _load(Q, q_base, rows, LQ, sqm, d1, D, sqd, ALIGN)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running max of |S|; |S| >= 0, so 0 is a valid start
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp(|S| - m_i)
    for start in range(0, LK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        s = _dot(q0, tl.trans(_load(K, k_base, cols, LK, skn, d0, D, skd, ALIGN)), FP32, PRECISION)
        if D1 > 0:
            s += _dot(q1, tl.trans(_load(K, k_base, cols, LK, skn, d1, D, skd, ALIGN)), FP32, PRECISION)
        s = s * scale  # (BLOCK_M, BLOCK_N) float32
        valid = _valid(M, b, h, rows, cols, LQ, LK, smb, smh, smm, smn, HAS_MASK)
        magnitude = tl.where(valid, tl.abs(s), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(magnitude, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(magnitude - m_new[:, None])  # 0 at masked keys
        l_i = l_i * alpha + tl.sum(p, 1)
        signed = tl.where(s > 0, p, tl.where(s < 0, -p, 0.0))  # sign(S) ⊙ exp(|S| - m)
        v0 = _load(V, v_base, cols, LK, svn, d0, D, svd, ALIGN)
        acc0 = acc0 * alpha[:, None] + _dot(signed.to(v0.dtype), v0, FP32, PRECISION)
        if D1 > 0:
            v1 = _load(V, v_base, cols, LK, svn, d1, D, svd, ALIGN)
            acc1 = acc1 * alpha[:, None] + _dot(signed.to(v1.dtype), v1, FP32, PRECISION)
        m_i = m_new
    l_safe = tl.where(rows < LQ, l_i, 1.0)  # fully masked rows give NaN, as the plain formula does
    o_base = b * sob + h * soh
    _store(O, o_base, rows, LQ, som, d0, D, sod, acc0 / l_safe[:, None], ALIGN)
    if D1 > 0:
        _store(O, o_base, rows, LQ, som, d1, D, sod, acc1 / l_safe[:, None], ALIGN)
    tl.store(LSE + bh * LQ + rows, m_i + tl.log(l_safe), mask=rows < LQ)


@triton.jit
def _cog_bwd_delta(O, DO, DELTA, sob, soh, som, sod, sdb, sdh, sdm, sdd, H, LQ,
                   BLOCK_M: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D: tl.constexpr, ALIGN: tl.constexpr):
    """δ = rowsum(dO ⊙ O) in float32, (B·H, Lq)."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_base, d_base = b * sob + h * soh, b * sdb + h * sdh
    d0 = tl.arange(0, D0)
    o = _load(O, o_base, rows, LQ, som, d0, D, sod, ALIGN).to(tl.float32)
    delta = tl.sum(o * _load(DO, d_base, rows, LQ, sdm, d0, D, sdd, ALIGN).to(tl.float32), 1)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        o1 = _load(O, o_base, rows, LQ, som, d1, D, sod, ALIGN).to(tl.float32)
        delta += tl.sum(o1 * _load(DO, d_base, rows, LQ, sdm, d1, D, sdd, ALIGN).to(tl.float32), 1)
    tl.store(DELTA + bh * LQ + rows, delta, mask=rows < LQ)


@triton.jit
def _cog_bwd(Q, K, V, M, DO, LSE, DELTA, DQ, DK, DV,
             sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
             smb, smh, smm, smn, sdb, sdh, sdm, sdd,
             H, LQ, LK, scale,
             HAS_MASK: tl.constexpr, FP32: tl.constexpr, PRECISION: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
             D: tl.constexpr, ALIGN: tl.constexpr):
    """One block of keys: dK, dV written; dQ added (float32 atomics) into DQ, contiguous (B·H, Lq, D)."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    q_base, k_base = b * sqb + h * sqh, b * skb + h * skh
    v_base, d_base = b * svb + h * svh, b * sdb + h * sdh
    d0 = tl.arange(0, D0)
    k0 = _load(K, k_base, cols, LK, skn, d0, D, skd, ALIGN)  # (BLOCK_N, D0)
    v0 = _load(V, v_base, cols, LK, svn, d0, D, svd, ALIGN)
    d_k0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    d_v0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        k1 = _load(K, k_base, cols, LK, skn, d1, D, skd, ALIGN)
        v1 = _load(V, v_base, cols, LK, svn, d1, D, svd, ALIGN)
        d_k1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
        d_v1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    for start in range(0, LQ, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q0 = _load(Q, q_base, rows, LQ, sqm, d0, D, sqd, ALIGN)
        do0 = _load(DO, d_base, rows, LQ, sdm, d0, D, sdd, ALIGN)
        s = _dot(q0, tl.trans(k0), FP32, PRECISION)
        d_a = _dot(do0, tl.trans(v0), FP32, PRECISION)  # dA = dO Vᵀ
        if D1 > 0:
            q1 = _load(Q, q_base, rows, LQ, sqm, d1, D, sqd, ALIGN)
            do1 = _load(DO, d_base, rows, LQ, sdm, d1, D, sdd, ALIGN)
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
    _store(DK, out_base, cols, LK, D, d0, D, 1, d_k0 * scale, ALIGN)
    _store(DV, out_base, cols, LK, D, d0, D, 1, d_v0, ALIGN)
    if D1 > 0:
        _store(DK, out_base, cols, LK, D, d1, D, 1, d_k1 * scale, ALIGN)
        _store(DV, out_base, cols, LK, D, d1, D, 1, d_v1, ALIGN)


# ------------------------------------------------------------------------------------- launch choices
class LaunchConfig(NamedTuple):
    """Block sizes of one kernel: rows (queries) x cols (keys), the head dim split D0 + D1."""
    block_m: int
    block_n: int
    d0: int
    d1: int
    num_warps: int
    num_stages: int


# (BLOCK_M, BLOCK_N, num_warps, num_stages), fastest first. The first whose compiled kernel fits the
# device's shared memory and launches is used (`launch`); the small ones exist so that every dtype and
# head dim <= 128 has one that fits sm_80 and sm_90 (tests/test_cuda_path.py compiles them all).
FORWARD_CANDIDATES = ((128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (64, 32, 4, 1),
                      (32, 32, 4, 1))
BACKWARD_CANDIDATES = ((64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (64, 32, 4, 1), (32, 32, 4, 1))
# float32 (TF32) tiles take twice the registers: 32 query rows per step keeps the backward free of
# spills at D = 64 (0 B on sm_80 and sm_90 against 24 B at 64 x 64; ptxas -v, docs/benchmarks.md)
BACKWARD_CANDIDATES_FP32 = ((32, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2), (32, 32, 4, 1))
DELTA_BLOCK_M = 64
INTERPRETER_BLOCK = 16  # numpy runs the interpreter's blocks: small ones keep the CPU tests fast
ALIGNMENT = 8  # elements; strides that are multiples of it let the compiler vectorise loads (D = 72)


def split_head_dim(head_dim: int) -> Tuple[int, int]:
    """(D0, D1): D0 the largest power of two <= head_dim (>= 16), D1 a power of two >= 16 for the
    rest or 0. 64 -> (64, 0), 72 -> (64, 16), 80 -> (64, 16), 96 -> (64, 32), 128 -> (128, 0)."""
    d0 = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - d0
    return d0, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


def candidates(kind: str, head_dim: int, dtype: torch.dtype) -> List[LaunchConfig]:
    """Launch configurations of `kind` ("forward" / "backward") in the order they are tried. In the
    interpreter the blocks are capped at INTERPRETER_BLOCK (no shared memory there)."""
    d0, d1 = split_head_dim(head_dim)
    table = (FORWARD_CANDIDATES if kind == "forward" else
             BACKWARD_CANDIDATES_FP32 if dtype == torch.float32 else BACKWARD_CANDIDATES)
    cap = INTERPRETER_BLOCK if interpreting() else 1 << 30
    configs = (LaunchConfig(min(m, cap), min(n, cap), d0, d1, w, s) for m, n, w, s in table)
    return list(dict.fromkeys(configs))  # capped blocks repeat: each once


def max_shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one block may use on `device` (opt-in maximum)."""
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    if optin:
        return int(optin)
    return int(triton.runtime.driver.active.utils.get_device_properties(device.index or 0)["max_shared_mem"])


class KernelCall(NamedTuple):
    """One kernel launch but for its block sizes (a LaunchConfig)."""
    kernel: object
    batch_heads: int
    rows: int  # along grid axis 1: query rows (forward, delta) or keys (backward), cut into blocks
    by_keys: bool  # grid axis 1 counts key blocks (BLOCK_N) instead of query blocks (BLOCK_M)
    args: tuple
    constants: dict

    def grid(self, config: LaunchConfig) -> Tuple[int, int]:
        return self.batch_heads, triton.cdiv(self.rows, config.block_n if self.by_keys else config.block_m)

    def meta(self, config: LaunchConfig) -> dict:
        blocks = dict(BLOCK_M=config.block_m, D0=config.d0, D1=config.d1, num_warps=config.num_warps,
                      num_stages=config.num_stages)
        if self.kernel is not _cog_bwd_delta:
            blocks["BLOCK_N"] = config.block_n
        return {**self.constants, **blocks}


def check_fits(compiled, limit: int) -> None:
    """triton.runtime.OutOfResources unless the compiled kernel (triton's CompiledKernel) allocates at
    most `limit` bytes of shared memory: what the compiler allocates, not an estimate."""
    if compiled.metadata.shared > limit:
        raise triton.runtime.OutOfResources(compiled.metadata.shared, limit, "shared memory")


def launch_kernel(call: KernelCall, config: LaunchConfig) -> None:
    """Compile (once) and launch `call` with `config`; triton.runtime.OutOfResources when the compiled
    kernel needs more shared memory (or threads) than the tensors' device has."""
    device = call.args[0].device
    grid, meta = call.grid(config), call.meta(config)
    if device.type == "cuda" and not interpreting():
        check_fits(call.kernel.warmup(*call.args, grid=grid, **meta), max_shared_memory(device))
    call.kernel[grid](*call.args, **meta)


def first_that_fits(configs, run) -> Tuple[Optional[LaunchConfig], List[str]]:
    """(the first of `configs` for which run(config) does not raise OutOfResources, or None; why each
    one before it did not fit). run launches a config (`launch`) or compiles it for a target (tests)."""
    failures = []
    for config in configs:
        try:
            run(config)
        except triton.runtime.OutOfResources as error:
            failures.append(f"{config.block_m}x{config.block_n}/{config.num_warps}w/{config.num_stages}s: {error}")
            continue
        return config, failures
    return None, failures


# Launch configurations that worked, keyed by (kind, device, dtype, head dim, mask, precision,
# alignment): each process searches each key once. Module state like uvic.attention's self-check cache.
_CHOSEN: Dict[tuple, LaunchConfig] = {}


def launch(kind: str, call: KernelCall, q: torch.Tensor) -> LaunchConfig:
    """Launch `call` with the first candidate of `kind` that fits q's device (from the one chosen
    before for this key); on triton's OutOfResources the next candidate is tried."""
    c = call.constants
    key = (kind, str(q.device), q.dtype, q.shape[-1], c["HAS_MASK"], c["PRECISION"], c["ALIGN"])
    configs = candidates(kind, q.shape[-1], q.dtype)
    start = configs.index(_CHOSEN[key]) if _CHOSEN.get(key) in configs else 0
    config, failures = first_that_fits(configs[start:], lambda config: launch_kernel(call, config))
    if config is None:
        raise RuntimeError(f"no {kind} launch configuration of head dim {q.shape[-1]} in {q.dtype} fits {q.device}: "
                           + "; ".join(failures))
    _CHOSEN[key] = config
    return config


def alignment(*tensors: torch.Tensor) -> int:
    """ALIGNMENT when every tensor's last stride is 1 and its other strides are multiples of ALIGNMENT
    (what the kernels may then declare to the compiler), else 1 (no claim: scalar loads, still correct)."""
    ok = all(t.stride(-1) == 1 and all(s % ALIGNMENT == 0 for s in t.stride()[:-1]) for t in tensors)
    return ALIGNMENT if ok else 1


def problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """Why these kernels cannot run q, k, v (B, H, L, D), or None when they can. (Whether a launch
    configuration fits the device's shared memory is found by compiling: `launch`.)"""
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
    return None


def _dot_args(dtype: torch.dtype, device: torch.device) -> dict:
    """FP32: dots on float32 operands (float32 inputs, or the interpreter, which cannot dot halves);
    PRECISION: "tf32" when float32 inputs may use TF32 tensor cores, else "ieee"."""
    tf32 = dtype == torch.float32 and device.type == "cuda" and tf32_allowed()
    return dict(FP32=dtype == torch.float32 or interpreting(), PRECISION="tf32" if tf32 else "ieee")


def _mask_args(mask, q, k):
    """(tensor, strides) of the mask broadcast to (B, H, Lq, Lk) as uint8 with 0-strides, or dummies."""
    if mask is None:
        return q, (0, 0, 0, 0)  # never read: HAS_MASK is False
    mask = mask.expand(*q.shape[:-1], k.shape[-2]).view(torch.uint8)
    return mask, mask.stride()


def _device_guard(t: torch.Tensor):
    """Launch on t's CUDA device, whichever device is current."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def forward_call(q, k, v, mask, out, lse, scale: float) -> KernelCall:
    """The forward kernel's launch for q (B, H, Lq, D), k, v (B, H, Lk, D) into out, lse (B, H, Lq)."""
    batch, heads, lq, dim = q.shape
    m, m_strides = _mask_args(mask, q, k)
    constants = dict(HAS_MASK=mask is not None, D=dim, ALIGN=alignment(q, k, v, out), **_dot_args(q.dtype, q.device))
    args = (q, k, v, m, out, lse, *q.stride(), *k.stride(), *v.stride(), *m_strides, *out.stride(),
            heads, lq, k.shape[-2], scale)
    return KernelCall(_cog_fwd, batch * heads, lq, False, args, constants)


def backward_calls(d_out, q, k, v, out, lse, mask, delta, d_q, d_k, d_v, scale: float) -> Tuple[KernelCall, KernelCall]:
    """(δ kernel, key-block kernel) launches of the backward."""
    batch, heads, lq, dim = q.shape
    m, m_strides = _mask_args(mask, q, k)
    delta_call = KernelCall(_cog_bwd_delta, batch * heads, lq, False,
                            (out, d_out, delta, *out.stride(), *d_out.stride(), heads, lq),
                            dict(D=dim, ALIGN=alignment(out, d_out)))
    constants = dict(HAS_MASK=mask is not None, D=dim, ALIGN=alignment(q, k, v, d_out, d_k, d_v),
                     **_dot_args(q.dtype, q.device))
    args = (q, k, v, m, d_out, lse, delta, d_q, d_k, d_v, *q.stride(), *k.stride(), *v.stride(), *m_strides,
            *d_out.stride(), heads, lq, k.shape[-2], scale)
    return delta_call, KernelCall(_cog_bwd, batch * heads, k.shape[-2], True, args, constants)


def delta_config(head_dim: int) -> LaunchConfig:
    """The δ kernel's one configuration (elementwise and a row sum: little shared memory)."""
    block = min(DELTA_BLOCK_M, INTERPRETER_BLOCK) if interpreting() else DELTA_BLOCK_M
    return LaunchConfig(block, block, *split_head_dim(head_dim), 4, 1)


@torch.library.custom_op("uvic::cog_triton", mutates_args=())
def cog_triton_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                  scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(O (B, H, Lq, D) in v's dtype, lse (B, H, Lq) float32 of |S|)."""
    batch, heads, lq, dim = q.shape
    out = q.new_empty(batch, heads, lq, dim, dtype=v.dtype)
    lse = q.new_empty(batch, heads, lq, dtype=torch.float32)
    with _device_guard(q):
        launch("forward", forward_call(q, k, v, mask, out, lse, scale), q)
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
    delta_call, key_call = backward_calls(d_out, q, k, v, out, lse, mask, delta, d_q, d_k, d_v, scale)
    with _device_guard(q):
        launch_kernel(delta_call, delta_config(dim))
        launch("backward", key_call, q)
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
