"""Softmax and Cog attention.

Cog attention (Lv et al., arXiv 2411.07176) lets attention weights be negative:

    S = Q Kᵀ · scale                      scale = head_dim^-0.5
    A = sign(S) ⊙ softmax(|S|)            row-wise over keys
    O = A V

Each row's absolute weights sum to 1. Softmax attention is A = softmax(S).

All functions take (B, H, L, D) tensors. `*_reference` are the plain formulas every faster
path is tested against; `cog_attention` / `softmax_attention` are what the model calls.

Backends of `cog_attention` (a runtime choice: `backend=` here, `UViT.set_attention_backend`
on a model; never part of a model's config):

    "math"     the plain formula under autograd (holds several Lq x Lk tensors for backward)
    "lean"     closed-form backward that keeps only A (uvic.kernels.cog_torch)
    "chunked"  keeps only the row log-sum-exp of |S|; scores are made chunk by chunk, forward
               and backward, so memory stays bounded for long sequences
    "triton"   fused flash-style kernels (uvic.kernels.cog_triton): CUDA with triton installed
    "auto"     "triton" where it can run; else "lean" when autograd needs gradients and
               "chunked" when it does not (inference); "math" when the weights are returned

"lean" and "chunked" run their elementwise work eagerly, in place, on cache-sized chunks; with
UVIC_ATTENTION_COMPILE=1 (or =<torch.compile backend>) it goes through torch.compile instead
(compiled on first use, only for score matrices of at least 2^20 entries and not inside an
enclosing torch.compile). Compiling measured no faster on CPU (docs/benchmarks.md), so it is off
by default.

Softmax attention always runs through `F.scaled_dot_product_attention` (which has its own fused
kernels), except with backend "math".
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import einops
import torch
import torch.nn as nn
import torch.nn.functional as F

ATTENTION_TYPES = ("softmax", "cog")
ATTENTION_BACKENDS = ("auto", "math", "lean", "chunked", "triton")
COMPILE_MIN_SCORES = 1 << 20  # below this, compiling the elementwise work costs more than it saves


def _scale(q: torch.Tensor, scale: Optional[float]) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def _scores(q, k, scale, mask):
    """S = Q Kᵀ · scale in at least float32, and the boolean mask broadcast to S (or None)."""
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):  # autocast would run the matmul in half
        s = torch.matmul(q.to(compute_dtype), k.to(compute_dtype).transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a boolean tensor (True = attend), got {mask.dtype}")
        mask = mask.expand_as(s)
    return s, mask


def _weighted_values(a, v):
    """O = A V in A's precision, returned in v's dtype."""
    with torch.autocast(v.device.type, enabled=False):
        return torch.matmul(a, v.to(a.dtype)).to(v.dtype)


def softmax_reference(q, k, v, *, scale=None, mask=None):
    """Plain softmax attention. Returns (O, A): O (B, H, Lq, D) in v's dtype, A (B, H, Lq, Lk)."""
    s, mask = _scores(q, k, _scale(q, scale), mask)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    a = s.softmax(dim=-1)
    return _weighted_values(a, v), a


def cog_reference(q, k, v, *, scale=None, mask=None):
    """Plain Cog attention, A = sign(S) ⊙ softmax(|S|). Returns (O, A) like `softmax_reference`."""
    s, mask = _scores(q, k, _scale(q, scale), mask)
    magnitude = s.abs()
    if mask is not None:
        magnitude = magnitude.masked_fill(~mask, float("-inf"))
    a = torch.sign(s) * magnitude.softmax(dim=-1)  # masked keys: sign * 0 = 0
    return _weighted_values(a, v), a


def _check_backend(backend: str) -> str:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    return backend


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _triton_problem(q, k, v) -> Optional[str]:
    """Why the Triton kernels cannot run these inputs, or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if q.device.type != "cuda":
        from .kernels import cog_triton  # noqa: PLC0415  (triton is importable, checked above)

        if not cog_triton.interpreting():
            return f"tensors are on {q.device.type}; the kernels need CUDA (or TRITON_INTERPRET=1)"
    from .kernels.cog_triton import SUPPORTED_DTYPES  # noqa: PLC0415

    if not q.shape[-1] == k.shape[-1] == v.shape[-1] <= 256:
        return f"head dims {q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}; the kernels need one head dim <= 256"
    if q.dtype not in SUPPORTED_DTYPES or not q.dtype == k.dtype == v.dtype:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}; the kernels need one of {SUPPORTED_DTYPES} for all three"
    return None


def resolve_cog_backend(q, k, v, *, backend: Optional[str] = None, return_weights: bool = False) -> str:
    """The backend `cog_attention` uses for these inputs: `backend` checked, or "auto" resolved."""
    name = _check_backend("auto" if backend is None else backend)
    if return_weights:
        if name not in ("auto", "math"):
            raise ValueError(f"return_weights=True needs backend 'math' or 'auto', got {name!r}: "
                             "only the plain formula materialises A for the caller")
        return "math"
    if name == "triton":
        problem = _triton_problem(q, k, v)
        if problem:
            raise ValueError(f"attention backend 'triton' cannot run here: {problem}")
    if name != "auto":
        return name
    if q.device.type == "cuda" and _triton_problem(q, k, v) is None:
        return "triton"
    return "lean" if _needs_grad(q, k, v) else "chunked"


def _check_shapes(q, k, v):
    if not (q.dim() == k.dim() == v.dim() == 4 and q.shape[:2] == k.shape[:2] == v.shape[:2]
            and k.shape[-2] == v.shape[-2] and q.shape[-1] == k.shape[-1]):
        raise ValueError(f"fast Cog backends need q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} (backend 'math' broadcasts)")


def _compiler(q, k) -> Optional[str]:
    """torch.compile backend for the elementwise work of "lean"/"chunked", or None (module docstring).

    UVIC_ATTENTION_COMPILE: unset/"0" = never, "1" = "inductor", any other value = that backend.
    """
    setting = os.environ.get("UVIC_ATTENTION_COMPILE", "0")
    if setting == "0" or torch.compiler.is_compiling():
        return None
    if q.shape[:-1].numel() * k.shape[-2] < COMPILE_MIN_SCORES:
        return None
    return "inductor" if setting == "1" else setting


def cog_attention(q, k, v, *, scale=None, mask=None, return_weights=False, backend=None):
    """Cog attention for (B, H, L, D) inputs; scores and softmax always run in float32 or wider.

    mask: boolean, broadcastable to (B, H, Lq, Lk), True = attend; masked keys get weight 0.
    backend: None/"auto", "math", "lean", "chunked" or "triton" (module docstring).
    Returns O (B, H, Lq, D), or (O, A) with return_weights=True.
    """
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be a boolean tensor (True = attend), got {mask.dtype}")
    name = resolve_cog_backend(q, k, v, backend=backend, return_weights=return_weights)
    if name == "math":
        out, a = cog_reference(q, k, v, scale=scale, mask=mask)
        return (out, a) if return_weights else out
    _check_shapes(q, k, v)
    scale = _scale(q, scale)
    if name == "triton":
        from .kernels.cog_triton import cog_attention_triton  # noqa: PLC0415  (needs triton)

        return cog_attention_triton(q, k, v, scale, mask)
    from .kernels.cog_torch import cog_attention_chunked  # noqa: PLC0415

    return cog_attention_chunked(q, k, v, scale, mask, keep_weights=name == "lean",
                                 compiler=_compiler(q, k))


def softmax_attention(q, k, v, *, scale=None, mask=None, return_weights=False, backend=None):
    """Softmax attention through `F.scaled_dot_product_attention` (same signature as cog_attention).

    backend "math" runs the plain formula; every other backend name means SDPA.
    """
    name = _check_backend("auto" if backend is None else backend)
    if return_weights or name == "math":
        out, a = softmax_reference(q, k, v, scale=scale, mask=mask)
        return (out, a) if return_weights else out
    if mask is not None:  # SDPA wants a mask of at least 2 dims; expanding is a free view
        mask = mask.expand(*q.shape[:-1], k.shape[-2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


ATTENTION_FUNCTIONS = {"softmax": softmax_attention, "cog": cog_attention}


class Attention(nn.Module):
    """Multi-head self-attention with the parameter names of U-ViT (`qkv`, `proj`).

    attention_type: "softmax" or "cog". `backend` (set_backend) picks the implementation at run
    time; it is not part of the model's configuration.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attention_type: str = "softmax"):
        super().__init__()
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type must be one of {ATTENTION_TYPES}, got {attention_type!r}")
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attention_type = attention_type
        self.backend = "auto"  # runtime choice (set_backend), not configuration
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, attention_type={self.attention_type!r}, backend={self.backend!r}"

    def set_backend(self, backend: str):
        """Choose the attention backend ("auto", "math", "lean", "chunked", "triton")."""
        self.backend = _check_backend(backend)

    def qkv_heads(self, x: torch.Tensor):
        """(B, L, C) -> q, k, v each (B, H, L, D)."""
        qkv = einops.rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, L, C)
        q, k, v = self.qkv_heads(x)
        out = ATTENTION_FUNCTIONS[self.attention_type](q, k, v, backend=self.backend)  # (B, H, L, D)
        return self.proj(einops.rearrange(out, "B H L D -> B L (H D)"))
