"""Cog attention in plain PyTorch, chunk by chunk, with the closed-form backward.

    S = Q Kᵀ · scale,  A = sign(S) ⊙ softmax(|S|),  O = A V        (docs/design.md)

Heads are flattened to N = B·H and walked in chunks (a group of whole heads, or a block of
query rows of one head) of about `budget` scores, so no temporary larger than a chunk is ever
allocated and, unless A is kept for backward, memory stays bounded however long the sequence.
The elementwise work of a chunk runs in place. Backward uses the closed form

    dV = Aᵀ dO,  dA = dO Vᵀ,  dS = |A| ⊙ dA − A ⊙ rowsum(dO ⊙ O),  dQ = dS K·scale,  dK = dSᵀ Q·scale

and keeps either A itself (`keep_weights=True`: one N·Lq·Lk tensor, no recomputation) or only
the row log-sum-exp of |S| (`keep_weights=False`: O(N·Lq) memory, scores recomputed chunk by
chunk in backward, the way flash attention does it). Where a score is exactly 0, sign(S) = 0
makes A and dS 0 there (autograd's convention for sign and abs at 0), in every backend.

The autograd entry is the custom op `uvic::cog_chunked` (torch.library), so torch.compile traces
a model through it without a graph break.
"""

from __future__ import annotations

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


def _recomputed_eager(s, mask_c, lse, scratch):
    """(A over s, |A| in scratch) from scores and the saved row lse of |S|; |A| is 0 where S is 0."""
    e = torch.abs(s, out=scratch)
    if mask_c is not None:
        e.masked_fill_(~mask_c, float("-inf"))
    e.sub_(lse).exp_()
    a = s.sign_().mul_(e)
    return a, torch.abs(a, out=e)


def _score_grad_eager(a, a_abs, d_a, delta):
    """dS = |A| ⊙ dA − A ⊙ delta, over d_a."""
    return d_a.mul_(a_abs).addcmul_(a, delta, value=-1)


def cog_forward(q, k, v, mask=None, *, keep_weights=False, budget=None):
    """Forward on flattened heads. q (N, Lq, D) already multiplied by scale, k, v (N, Lk, D).

    mask: None or boolean (B, H, Lq, Lk) view with B·H = N.
    Returns (O (N, Lq, D), A (N, Lq, Lk) if keep_weights else None, lse (N, Lq, 1)).
    """
    budget = budget or default_budget(q.device)
    n, lq, _ = q.shape
    lk = k.shape[1]
    num_heads = mask.shape[1] if mask is not None else 1
    kt = k.transpose(1, 2)  # (N, D, Lk)
    out = q.new_empty(n, lq, v.shape[-1])
    lse = q.new_empty(n, lq, 1)
    weights = q.new_empty(n, lq, lk) if keep_weights else None
    chunk = _largest_chunk(n, lq, lk, budget)
    s_buffer = q.new_empty(chunk) if weights is None else None
    e_buffer = q.new_empty(chunk)
    for heads, rows in _chunks(n, lq, lk, budget):
        shape = (heads.stop - heads.start, rows.stop - rows.start, lk)
        s_out = _scratch(s_buffer, shape) if weights is None else weights[heads, rows]
        s = torch.bmm(q[heads, rows], kt[heads], out=s_out)  # (g, r, Lk) scores
        mask_c = _mask_chunk(mask, heads, rows, num_heads)
        # without A to keep, normalise the (r, D) output instead of the (r, Lk) weights
        a, z, m = _weights_eager(s, mask_c, _scratch(e_buffer, shape), normalize=keep_weights)
        out_c = torch.bmm(a, v[heads], out=out[heads, rows])
        if not keep_weights:
            out_c.div_(z)
        lse[heads, rows] = z.log_().add_(m)
    return out, weights, lse


def cog_backward(d_out, q, k, v, out, scale: float, mask=None, *, weights=None, lse=None, budget=None):
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
    e_buffer = q.new_empty(chunk)
    da_buffer = q.new_empty(chunk)
    for heads, rows in _chunks(n, lq, lk, budget):
        shape = (heads.stop - heads.start, rows.stop - rows.start, lk)
        if weights is not None:
            a = weights[heads, rows]
            a_abs = torch.abs(a, out=_scratch(e_buffer, shape))
        else:  # recompute A from the saved log-sum-exp
            s = torch.bmm(q[heads, rows], kt[heads], out=_scratch(s_buffer, shape))
            mask_c = _mask_chunk(mask, heads, rows, num_heads)
            a, a_abs = _recomputed_eager(s, mask_c, lse[heads, rows], _scratch(e_buffer, shape))
        d_o = d_out[heads, rows]
        if whole_heads:
            torch.bmm(a.transpose(1, 2), d_o, out=d_v[heads])
        else:
            d_v[heads].baddbmm_(a.transpose(1, 2), d_o)
        d_a = torch.bmm(d_o, vt[heads], out=_scratch(da_buffer, shape))  # dA
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


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.promote_types(q.dtype, torch.float32)


@torch.library.custom_op("uvic::cog_chunked", mutates_args=())
def cog_chunked_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
                   keep_weights: bool, budget: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(O (B, H, Lq, Dv) in v's dtype, kept): kept is A (B·H, Lq, Lk) or the lse of |S| (B·H, Lq, 1).
    budget: scores per chunk, 0 for default_budget."""
    dtype = _compute_dtype(q)
    with torch.autocast(q.device.type, enabled=False):
        out, weights, lse = cog_forward(_flat(q, dtype) * scale, _flat(k, dtype), _flat(v, dtype), mask,
                                        keep_weights=keep_weights, budget=budget)
    return out.view(*q.shape[:-1], v.shape[-1]).to(v.dtype), weights if keep_weights else lse


@cog_chunked_op.register_fake
def _(q, k, v, mask, scale, keep_weights, budget):
    dtype = _compute_dtype(q)
    n, lq, lk = q.shape[:-1].numel(), q.shape[-2], k.shape[-2]
    kept = q.new_empty(n, lq, lk if keep_weights else 1, dtype=dtype)
    return q.new_empty(*q.shape[:-1], v.shape[-1], dtype=v.dtype), kept


@torch.library.custom_op("uvic::cog_chunked_backward", mutates_args=())
def cog_chunked_backward_op(d_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            out: torch.Tensor, kept: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
                            keep_weights: bool, budget: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) in the dtypes of q, k, v."""
    dtype = kept.dtype
    with torch.autocast(q.device.type, enabled=False):
        weights, lse = (kept, None) if keep_weights else (None, kept)
        grads = cog_backward(_flat(d_out, dtype), _flat(q, dtype) * scale, _flat(k, dtype), _flat(v, dtype),
                             _flat(out, dtype), scale, mask, weights=weights, lse=lse, budget=budget)
    return tuple(g.view(t.shape).to(t.dtype) for g, t in zip(grads, (q, k, v)))


@cog_chunked_backward_op.register_fake
def _(d_out, q, k, v, out, kept, mask, scale, keep_weights, budget):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale, keep_weights, budget = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1])
    ctx.mask, ctx.scale, ctx.keep_weights, ctx.budget = mask, scale, keep_weights, budget


def _backward(ctx, d_out, _d_kept):
    q, k, v, out, kept = ctx.saved_tensors
    d_q, d_k, d_v = cog_chunked_backward_op(d_out, q, k, v, out, kept, ctx.mask, ctx.scale, ctx.keep_weights,
                                            ctx.budget)
    return d_q, d_k, d_v, None, None, None, None


cog_chunked_op.register_autograd(_backward, setup_context=_setup_context)


def cog_attention_chunked(q, k, v, scale: float, mask=None, *, keep_weights=True, budget=None):
    """O (B, H, Lq, D) of Cog attention for q (B, H, Lq, D), k, v (B, H, Lk, D), in v's dtype.

    Scores run in float32 (float64 for float64 inputs). mask: None or boolean broadcastable to
    (B, H, Lq, Lk), True = attend. keep_weights: save A for backward (fast) or only the row
    log-sum-exp of |S| (lean memory). Without autograd A is never kept.
    """
    if mask is not None:
        mask = mask.expand(*q.shape[:-1], k.shape[-2])
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    # budget 0: default_budget, read inside the op (torch.get_num_threads would break a compiled graph)
    return cog_chunked_op(q, k, v, mask, float(scale), keep_weights and training, budget or 0)[0]
