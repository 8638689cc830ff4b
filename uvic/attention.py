"""Softmax and Cog attention.

Cog attention (Lv et al., arXiv 2411.07176) lets attention weights be negative:

    S = Q Kᵀ · scale                      scale = head_dim^-0.5
    A = sign(S) ⊙ softmax(|S|)            row-wise over keys
    O = A V

Each row's absolute weights sum to 1. Softmax attention is A = softmax(S).

All functions take (B, H, L, D) tensors. `*_reference` are the plain formulas every faster
path is tested against; `cog_attention` / `softmax_attention` are what the model calls.
"""

from __future__ import annotations

from typing import Optional

import einops
import torch
import torch.nn as nn
import torch.nn.functional as F

ATTENTION_TYPES = ("softmax", "cog")


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


def cog_attention(q, k, v, *, scale=None, mask=None, return_weights=False):
    """Cog attention for (B, H, L, D) inputs; scores and softmax always run in float32 or wider.

    mask: boolean, broadcastable to (B, H, Lq, Lk), True = attend; masked keys get weight 0.
    Returns O (B, H, Lq, D), or (O, A) with return_weights=True.
    """
    out, a = cog_reference(q, k, v, scale=scale, mask=mask)
    return (out, a) if return_weights else out


def softmax_attention(q, k, v, *, scale=None, mask=None, return_weights=False):
    """Softmax attention through `F.scaled_dot_product_attention` (same signature as cog_attention)."""
    if return_weights:
        out, a = softmax_reference(q, k, v, scale=scale, mask=mask)
        return out, a
    if mask is not None:  # SDPA wants a mask of at least 2 dims; expanding is a free view
        mask = mask.expand(*q.shape[:-1], k.shape[-2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


ATTENTION_FUNCTIONS = {"softmax": softmax_attention, "cog": cog_attention}


class Attention(nn.Module):
    """Multi-head self-attention with the parameter names of U-ViT (`qkv`, `proj`).

    attention_type: "softmax" or "cog".
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attention_type: str = "softmax"):
        super().__init__()
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type must be one of {ATTENTION_TYPES}, got {attention_type!r}")
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attention_type = attention_type
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, attention_type={self.attention_type!r}"

    def qkv_heads(self, x: torch.Tensor):
        """(B, L, C) -> q, k, v each (B, H, L, D)."""
        qkv = einops.rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, L, C)
        q, k, v = self.qkv_heads(x)
        out = ATTENTION_FUNCTIONS[self.attention_type](q, k, v)  # (B, H, L, D)
        return self.proj(einops.rearrange(out, "B H L D -> B L (H D)"))
