"""Cog attention in plain PyTorch, chunk by chunk, with the closed-form backward.

    S = Q Kᵀ · scale,  A = sign(S) ⊙ softmax(|S|),  O = A V        (DESIGN.md)

Heads are flattened to N = B·H and walked in chunks (a group of whole heads, or a block of
query rows of one head) of about `budget` scores, so no temporary larger than a chunk is ever
allocated and, unless A is kept for backward, memory stays bounded however long the sequence.
The elementwise work of a chunk runs in place (eager) or through torch.compile
(`compiler="inductor"`: one fused pass). Backward uses the closed form

    dV = Aᵀ dO,  dA = dO Vᵀ,  dS = |A| ⊙ dA − A ⊙ rowsum(dO ⊙ O),  dQ = dS K·scale,  dK = dSᵀ Q·scale

and keeps either A itself (`keep_weights=True`: one N·Lq·Lk tensor, no recomputation) or only
the row log-sum-exp of |S| (`keep_weights=False`: O(N·Lq) memory, scores recomputed chunk by
chunk in backward, the way flash attention does it).
"""

from __future__ import annotations

import functools
import warnings
from typing import Iterator, Optional, Tuple

import torch

# Scores per chunk and CPU thread: 2^18 float32 = 1 MiB, so a thread's share of a chunk and its
# scratch stay in a 2 MiB per-core L2 cache. Fastest measured: 2^18 on 1 thread, 2^19 on 2 threads
# (docs/benchmarks.md). On GPUs (the fallback when Triton is absent) chunks are large so that each
# op still fills the device; that size is not tuned.
SCORES_PER_THREAD = 1 << 18
GPU_BUDGET = 1 << 24


def default_budget(device: torch.device) -> int:
    """Scores per chunk: SCORES_PER_THREAD per CPU thread, or GPU_BUDGET elsewhere."""
    return SCORES_PER_THREAD * torch.get_num_threads() if device.type == "cpu" else GPU_BUDGET


def _chunks(n: int, lq: int, lk: int, budget: int) -> Iterator[Tuple[slice, slice]]:
    """(heads, rows) slices covering (N, Lq) with about `budget` scores each."""
    if lq * lk <= budget:  # several whole heads per chunk
        group = max(1, budget // (lq * lk))
        for i in range(0, n, group):
            yield slice(i, min(i + group, n)), slice(0, lq)
    else:  # one head, a block of query rows
        rows = max(1, budget // lk)
        for i in range(n):
            for r in range(0, lq, rows):
                yield slice(i, i + 1), slice(r, min(r + rows, lq))


def _largest_chunk(n: int, lq: int, lk: int, budget: int) -> int:
    """Scores in the first (largest) chunk of `_chunks`."""
    heads, rows = next(_chunks(n, lq, lk, budget))
    return (heads.stop - heads.start) * (rows.stop - rows.start) * lk


def _scratch(buffer: torch.Tensor, shape) -> torch.Tensor:
    """A contiguous view of the first prod(shape) elements of a flat buffer."""
    return buffer[: shape[0] * shape[1] * shape[2]].view(shape)


def _mask_chunk(mask: Optional[torch.Tensor], heads: slice, rows: slice, num_heads: int):
    """(B, H, Lq, Lk) boolean view -> the (g, r, Lk) block of flattened heads `heads`, or None."""
    if mask is None:
        return None
    index = torch.arange(heads.start, heads.stop, device=mask.device)
    return mask[index // num_heads, index % num_heads, rows]


def _weights_eager(s, mask_c, scratch, normalize: bool):
    """sign(S) ⊙ exp(|S| − m) written over s, divided by its row sum z if `normalize` (then it is A);
    returns (that, z, m), both (g, r, 1), m = row max of |S|."""
    e = torch.abs(s, out=scratch)
    if mask_c is not None:
        e.masked_fill_(~mask_c, float("-inf"))
    m = e.amax(-1, keepdim=True)  # |S| >= 0, so the row max is a safe shift
    e.sub_(m).exp_()
    z = e.sum(-1, keepdim=True)
    a = s.sign_().mul_(e)
    return (a.div_(z) if normalize else a), z, m


def _weights_fused(s, mask_c):
    """`_weights_eager` without scratch, written for torch.compile to fuse into one pass."""
    magnitude = s.abs() if mask_c is None else s.abs().masked_fill(~mask_c, float("-inf"))
    m = magnitude.amax(-1, keepdim=True)
    e = torch.exp(magnitude - m)
    z = e.sum(-1, keepdim=True)
    return torch.sign(s) * e / z, torch.log(z) + m


def _recomputed_eager(s, mask_c, lse, scratch):
    """(A over s, |A| in scratch) from scores and the saved row lse of |S|."""
    e = torch.abs(s, out=scratch)
    if mask_c is not None:
        e.masked_fill_(~mask_c, float("-inf"))
    e.sub_(lse).exp_()
    return s.sign_().mul_(e), e


def _recomputed_fused(s, mask_c, lse):
    magnitude = s.abs() if mask_c is None else s.abs().masked_fill(~mask_c, float("-inf"))
    e = torch.exp(magnitude - lse)
    return torch.sign(s) * e, e


def _score_grad_eager(a, a_abs, d_a, delta):
    """dS = |A| ⊙ dA − A ⊙ delta, over d_a."""
    return d_a.mul_(a_abs).addcmul_(a, delta, value=-1)


def _score_grad_fused(a, d_a, delta):
    return a.abs() * d_a - a * delta


class _Compiled:
    """fn through torch.compile(backend=...), built on the first call (never at import); if compiling
    fails (no C++ compiler, unsupported device) it warns once and runs fn eagerly from then on."""

    def __init__(self, fn, backend: str):
        self.fn, self.backend, self.compiled, self.failed = fn, backend, None, False

    def __call__(self, *args):
        if self.failed:
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, backend=self.backend, dynamic=True)
        try:
            return self.compiled(*args)
        except Exception as error:  # a compiler problem; a real error in fn re-raises just below
            self.failed = True
            warnings.warn(f"torch.compile of {self.fn.__name__} failed, running it eagerly: {error}")
            return self.fn(*args)


@functools.cache
def _compiled(fn, backend: str) -> _Compiled:
    """One lazily compiled wrapper per (function, compiler), cached the way torch caches kernels."""
    return _Compiled(fn, backend)


def cog_forward(q, k, v, scale: float, mask=None, *, keep_weights=False, budget=None, compiler=None):
    """Forward on flattened heads. q (N, Lq, D) already multiplied by scale, k, v (N, Lk, D).

    mask: None or boolean (B, H, Lq, Lk) view with B·H = N. compiler: None (eager, in place) or a
    torch.compile backend ("inductor") that fuses each chunk's elementwise work.
    Returns (O (N, Lq, D), A (N, Lq, Lk) if keep_weights else None, lse (N, Lq, 1)).
    """
    budget = budget or default_budget(q.device)
    n, lq, _ = q.shape
    lk = k.shape[1]
    num_heads = mask.shape[1] if mask is not None else 1
    kt = k.transpose(1, 2)  # (N, D, Lk)
    out = q.new_empty(n, lq, v.shape[-1])
    lse = q.new_empty(n, lq, 1)
    if keep_weights and compiler:  # A is kept whole anyway: one fused pass makes it, no copies
        budget = max(budget, n * lq * lk)
    chunks = list(_chunks(n, lq, lk, budget))
    weights = q.new_empty(n, lq, lk) if keep_weights and not compiler else None
    chunk = _largest_chunk(n, lq, lk, budget)
    s_buffer = q.new_empty(chunk) if weights is None else None
    e_buffer = None if compiler else q.new_empty(chunk)
    for heads, rows in chunks:
        shape = (heads.stop - heads.start, rows.stop - rows.start, lk)
        s_out = _scratch(s_buffer, shape) if weights is None else weights[heads, rows]
        s = torch.bmm(q[heads, rows], kt[heads], out=s_out)  # (g, r, Lk) scores
        mask_c = _mask_chunk(mask, heads, rows, num_heads)
        if compiler:
            a, lse_c = _compiled(_weights_fused, compiler)(s, mask_c)
            if keep_weights:
                weights = a  # the budget above made this the one chunk
            torch.bmm(a, v[heads], out=out[heads, rows])
        else:  # without A to keep, normalise the (r, D) output instead of the (r, Lk) weights
            a, z, m = _weights_eager(s, mask_c, _scratch(e_buffer, shape), normalize=keep_weights)
            out_c = torch.bmm(a, v[heads], out=out[heads, rows])
            if not keep_weights:
                out_c.div_(z)
            lse_c = z.log_().add_(m)
        lse[heads, rows] = lse_c
    return out, weights, lse


def cog_backward(d_out, q, k, v, out, scale: float, mask=None, *, weights=None, lse=None, budget=None,
                 compiler=None):
    """Gradients (dQ, dK, dV) of `cog_forward`; needs `weights` (A) or `lse`, q pre-scaled as there."""
    budget = budget or default_budget(q.device)
    n, lq, _ = q.shape
    lk = k.shape[1]
    num_heads = mask.shape[1] if mask is not None else 1
    delta = (d_out * out).sum(-1, keepdim=True)  # (N, Lq, 1) rowsum(dO ⊙ O) = rowsum(dA ⊙ A)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    d_q = torch.empty_like(q)
    whole_heads = lq * lk <= budget  # then every chunk has all rows: dK, dV are written, not summed
    d_k = torch.empty_like(k) if whole_heads else torch.zeros_like(k)
    d_v = torch.empty_like(v) if whole_heads else torch.zeros_like(v)
    chunk = _largest_chunk(n, lq, lk, budget)
    s_buffer = q.new_empty(chunk) if weights is None else None
    e_buffer = None if compiler and weights is not None else q.new_empty(chunk)
    da_buffer = q.new_empty(chunk)
    for heads, rows in _chunks(n, lq, lk, budget):
        shape = (heads.stop - heads.start, rows.stop - rows.start, lk)
        a_abs = None
        if weights is not None:
            a = weights[heads, rows]
        else:  # recompute A from the saved log-sum-exp
            s = torch.bmm(q[heads, rows], kt[heads], out=_scratch(s_buffer, shape))
            mask_c = _mask_chunk(mask, heads, rows, num_heads)
            if compiler:
                a, a_abs = _compiled(_recomputed_fused, compiler)(s, mask_c, lse[heads, rows])
            else:
                a, a_abs = _recomputed_eager(s, mask_c, lse[heads, rows], _scratch(e_buffer, shape))
        d_o = d_out[heads, rows]
        if whole_heads:
            torch.bmm(a.transpose(1, 2), d_o, out=d_v[heads])
        else:
            d_v[heads].baddbmm_(a.transpose(1, 2), d_o)
        d_a = torch.bmm(d_o, vt[heads], out=_scratch(da_buffer, shape))  # dA
        if compiler:
            d_s = _compiled(_score_grad_fused, compiler)(a, d_a, delta[heads, rows])
        else:
            a_abs = torch.abs(a, out=_scratch(e_buffer, shape)) if a_abs is None else a_abs
            d_s = _score_grad_eager(a, a_abs, d_a, delta[heads, rows])  # dS = |A| ⊙ dA − A ⊙ delta
        torch.bmm(d_s, k[heads], out=d_q[heads, rows])
        if whole_heads:  # q carries the scale already
            torch.bmm(d_s.transpose(1, 2), q[heads], out=d_k[heads])
        else:
            d_k[heads].baddbmm_(d_s.transpose(1, 2), q[heads, rows])
    return d_q.mul_(scale), d_k, d_v


def _flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, L, D) -> contiguous (B·H, L, D) in dtype."""
    return x.to(dtype).reshape(-1, *x.shape[-2:]).contiguous()


class _CogAttention(torch.autograd.Function):
    """Autograd wrapper of cog_forward / cog_backward for (B, H, L, D) inputs."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, keep_weights, budget, compiler):
        dtype = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            q3 = _flat(q, dtype) * scale  # never in place: _flat may return q itself
            k3, v3 = _flat(k, dtype), _flat(v, dtype)
            out, weights, lse = cog_forward(q3, k3, v3, scale, mask, keep_weights=keep_weights, budget=budget,
                                               compiler=compiler)
        ctx.save_for_backward(q3, k3, v3, out, weights if keep_weights else lse)
        ctx.mask, ctx.scale, ctx.keep_weights, ctx.budget = mask, scale, keep_weights, budget
        ctx.compiler = compiler
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        return out.view(*q.shape[:-1], v.shape[-1]).to(v.dtype)

    @staticmethod
    def backward(ctx, d_out):
        q3, k3, v3, out, kept = ctx.saved_tensors
        with torch.autocast(q3.device.type, enabled=False):
            d_out3 = _flat(d_out, q3.dtype)
            weights, lse = (kept, None) if ctx.keep_weights else (None, kept)
            grads = cog_backward(d_out3, q3, k3, v3, out, ctx.scale, ctx.mask, weights=weights, lse=lse,
                                 budget=ctx.budget, compiler=ctx.compiler)
        shape = d_out.shape[:2]
        d_q, d_k, d_v = (g.view(*shape, *g.shape[1:]).to(t) for g, t in zip(grads, ctx.dtypes))
        return d_q, d_k, d_v, None, None, None, None, None


def cog_attention_chunked(q, k, v, scale: float, mask=None, *, keep_weights=True, budget=None,
                          compiler=None):
    """O (B, H, Lq, D) of Cog attention for q (B, H, Lq, D), k, v (B, H, Lk, D), in v's dtype.

    Scores run in float32 (float64 for float64 inputs). mask: None or boolean broadcastable to
    (B, H, Lq, Lk), True = attend. keep_weights: save A for backward (fast) or only the row
    log-sum-exp of |S| (lean memory). Without autograd nothing is saved and no chunk is kept.
    """
    if mask is not None:
        mask = mask.expand(*q.shape[:-1], k.shape[-2])
    budget = budget or default_budget(q.device)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _CogAttention.apply(q, k, v, mask, scale, keep_weights, budget, compiler)
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        out, _, _ = cog_forward(_flat(q, dtype) * scale, _flat(k, dtype), _flat(v, dtype), scale, mask,
                                budget=budget, compiler=compiler)
    return out.view(*q.shape[:-1], v.shape[-1]).to(v.dtype)
