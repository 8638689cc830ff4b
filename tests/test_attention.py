"""Cog and softmax attention against plain float64 formulas."""

import pytest
import torch

from uvic.attention import Attention, cog_attention, cog_reference, softmax_attention, softmax_reference


def naive_cog(q, k, v, scale, mask=None):
    """Independent loop-free float64 statement of the paper's formula."""
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    e = torch.exp(s.abs() - s.abs().amax(-1, keepdim=True))
    if mask is not None:
        e = e * mask
    a = torch.sign(s) * e / e.sum(-1, keepdim=True)
    return torch.einsum("bhqk,bhkd->bhqd", a, v), a


def qkv(b=2, h=3, lq=5, lk=7, d=4, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype, requires_grad=requires_grad) for n in (lq, lk, lk)]


def test_cog_attention_matches_float64_formula():
    q, k, v = qkv()
    out, a = cog_attention(q, k, v, return_weights=True)
    ref_out, ref_a = naive_cog(q, k, v, q.shape[-1] ** -0.5)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a, ref_a, rtol=1e-12, atol=1e-12)
    assert (a < 0).any() and (a > 0).any()


def test_cog_rows_have_absolute_weights_summing_to_one():
    q, k, v = qkv(lq=9, lk=9)
    _, a = cog_attention(q, k, v, scale=0.7, return_weights=True)
    torch.testing.assert_close(a.abs().sum(-1), torch.ones_like(a[..., 0]))


def test_cog_attention_gradcheck():
    q, k, v = qkv(b=1, h=2, lq=3, lk=4, d=3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: cog_attention(q, k, v), (q, k, v))
    mask = torch.tensor([True, False, True, True])
    assert torch.autograd.gradcheck(lambda q, k, v: cog_attention(q, k, v, mask=mask), (q, k, v))


def test_cog_gradients_match_closed_form_backward():
    """DESIGN.md: dS = |A| ⊙ dA − A ⊙ rowsum(dO ⊙ O)."""
    q, k, v = qkv(requires_grad=True)
    scale = q.shape[-1] ** -0.5
    out, a = cog_attention(q, k, v, return_weights=True)
    d_out = torch.randn_like(out)
    out.backward(d_out)
    a, o = a.detach(), out.detach()
    d_v = a.transpose(-2, -1) @ d_out
    d_a = d_out @ v.detach().transpose(-2, -1)
    d_s = a.abs() * d_a - a * (d_out * o).sum(-1, keepdim=True)
    torch.testing.assert_close(v.grad, d_v)
    torch.testing.assert_close(q.grad, d_s @ k.detach() * scale)
    torch.testing.assert_close(k.grad, d_s.transpose(-2, -1) @ q.detach() * scale)


@pytest.mark.parametrize("shape", [(7,), (1, 1, 5, 7), (2, 1, 1, 7)])
def test_masked_keys_get_exactly_zero_weight(shape):
    q, k, v = qkv()
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(shape, generator=g) > 0.4
    mask[..., 0] = True  # no fully masked row
    out, a = cog_attention(q, k, v, mask=mask, return_weights=True)
    full = mask.expand_as(a)
    assert (a[~full] == 0).all()
    torch.testing.assert_close(a.abs().sum(-1), torch.ones_like(a[..., 0]))
    ref_out, _ = naive_cog(q, k, v, q.shape[-1] ** -0.5, mask=full)
    torch.testing.assert_close(out, ref_out)
    # softmax with the same mask agrees with its plain formula
    sm = softmax_attention(q, k, v, mask=mask)
    torch.testing.assert_close(sm, softmax_reference(q, k, v, mask=mask)[0])


def test_mask_must_be_boolean():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="boolean"):
        cog_attention(q, k, v, mask=torch.ones(7))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_finite_at_extreme_logits(dtype):
    # |S| up to 1e4: q·k = 100*100*d * scale with d=4 -> 2e4*... keep |S| around 1e4.
    q, k, v = qkv(d=4, dtype=torch.float32)
    q = (q / q.norm(dim=-1, keepdim=True) * 100).to(dtype)
    k = (k / k.norm(dim=-1, keepdim=True) * 200).to(dtype)
    v = v.to(dtype)
    out, a = cog_attention(q, k, v, return_weights=True)
    s = (q.double() @ k.double().transpose(-2, -1)) * 0.5
    assert s.abs().max() > 5e3
    assert out.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(a).all()
    ref, _ = naive_cog(q.double(), k.double(), v.double(), 0.5)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


def test_autocast_runs_scores_in_float32():
    q, k, v = qkv(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, a = cog_attention(q * 60, k * 60, v, return_weights=True)
    assert a.dtype == torch.float32 and torch.isfinite(out).all()


def test_softmax_attention_matches_reference():
    q, k, v = qkv()
    torch.testing.assert_close(softmax_attention(q, k, v), softmax_reference(q, k, v)[0])
    out, a = softmax_attention(q, k, v, return_weights=True)
    assert (a >= 0).all()
    torch.testing.assert_close(a.sum(-1), torch.ones_like(a[..., 0]))


@pytest.mark.parametrize("attention_type, reference", [("softmax", softmax_reference), ("cog", cog_reference)])
def test_attention_module_uses_its_formula(attention_type, reference):
    torch.manual_seed(0)
    attn = Attention(16, num_heads=4, attention_type=attention_type).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    # U-ViT's split, written out: the qkv features are [q | k | v], each [head 0 | head 1 | ...]
    qkv = (x @ attn.qkv.weight.T).reshape(2, 6, 3, 4, 4).permute(2, 0, 3, 1, 4)  # (3, B, H, L, D)
    q, k, v = qkv[0], qkv[1], qkv[2]
    expected = attn.proj(reference(q, k, v)[0].transpose(1, 2).reshape(2, 6, 16))
    torch.testing.assert_close(attn(x), expected)


def test_attention_module_rejects_unknown_type():
    with pytest.raises(ValueError, match="attention_type"):
        Attention(16, num_heads=4, attention_type="linear")
