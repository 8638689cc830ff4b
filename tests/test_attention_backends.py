"""Every Cog attention backend against the float64 formula: values, gradients, masks, precision."""

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from uvic.attention import (
    ATTENTION_BACKENDS,
    cog_attention,
    resolve_cog_backend,
    softmax_attention,
    softmax_reference,
)
from uvic.kernels import cog_torch

CPU_BACKENDS = ["math", "lean", "chunked"]


def naive_cog(q, k, v, scale, mask=None):
    """Loop-free float64 statement of the paper's formula (independent of uvic.attention)."""
    q, k, v = q.double(), k.double(), v.double()
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    e = torch.exp(s.abs() - s.abs().amax(-1, keepdim=True))
    if mask is not None:
        e = e * mask
    a = torch.sign(s) * e / e.sum(-1, keepdim=True)
    return torch.einsum("bhqk,bhkd->bhqd", a, v)


def qkv(b=2, h=3, lq=5, lk=7, d=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(dtype) for n in (lq, lk, lk)]


def key_padding_mask(b, lk, seed=1):
    mask = torch.rand(b, 1, 1, lk, generator=torch.Generator().manual_seed(seed)) > 0.4
    mask[..., 0] = True  # no fully masked row (the formula gives NaN there)
    return mask


def values_and_grads(fn, q, k, v, d_out):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), d_out))


def assert_matches_formula(fn, q, k, v, mask=None, tol=1e-10, seed=2):
    """fn's output and (dQ, dK, dV) against autograd through the float64 formula."""
    g = torch.Generator().manual_seed(seed)
    d_out = torch.randn(*q.shape[:-1], v.shape[-1], generator=g, dtype=torch.float64).to(v.device)
    got = values_and_grads(fn, q, k, v, d_out.to(v.dtype))
    want = values_and_grads(lambda q, k, v: naive_cog(q, k, v, q.shape[-1] ** -0.5, mask), q.double(), k.double(),
                            v.double(), d_out)
    for name, x, y in zip(["O", "dQ", "dK", "dV"], got, want):
        assert x.dtype == v.dtype and x.shape == y.shape, name
        torch.testing.assert_close(x.double(), y, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------- CPU backends
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
def test_backend_matches_float64_formula(backend, masked):
    q, k, v = qkv(lq=5, lk=7)
    mask = key_padding_mask(2, 7) if masked else None
    assert_matches_formula(lambda q, k, v: cog_attention(q, k, v, mask=mask, backend=backend), q, k, v, mask)


@pytest.mark.parametrize("keep_weights", [True, False])
@pytest.mark.parametrize("budget", [10, 60, 1 << 20])  # rows of one head / several heads / everything at once
def test_chunking_never_changes_the_result(keep_weights, budget):
    q, k, v = qkv(lq=9, lk=11)
    mask = torch.rand(2, 3, 9, 11, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[..., 0] = True
    scale = 4**-0.5

    def fn(q, k, v):
        return cog_torch.cog_attention_chunked(q, k, v, scale, mask, keep_weights=keep_weights, budget=budget)

    assert_matches_formula(fn, q, k, v, mask)
    with torch.no_grad():
        torch.testing.assert_close(fn(q, k, v), naive_cog(q, k, v, scale, mask), rtol=1e-10, atol=1e-10)


def test_chunks_cover_every_score_once_within_budget():
    for n, lq, lk, budget in [(6, 9, 11, 10), (6, 9, 11, 200), (6, 9, 11, 1 << 20), (2, 4, 50, 7)]:
        seen = torch.zeros(n, lq, dtype=torch.int64)
        for heads, rows in cog_torch._chunks(n, lq, lk, budget):
            seen[heads, rows] += 1
            assert (heads.stop - heads.start) * (rows.stop - rows.start) * lk <= max(budget, lk)
        assert (seen == 1).all()


@pytest.mark.parametrize("backend", ["lean", "chunked"])
def test_backend_gradcheck(backend):
    q, k, v = (t.requires_grad_() for t in qkv(b=1, h=2, lq=3, lk=4, d=3))
    mask = torch.tensor([True, False, True, True])
    assert torch.autograd.gradcheck(lambda q, k, v: cog_attention(q, k, v, backend=backend), (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: cog_attention(q, k, v, mask=mask, backend=backend), (q, k, v))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_exactly_zero_scores_get_sign_zero_and_gradient_zero(backend):
    """One convention in every backend: where S == 0, A = 0 and dS = 0, as autograd gives."""
    q, k, v = qkv(lq=5, lk=7)
    k[:, :, 2] = 0  # a key orthogonal to every query: its scores are exactly 0
    q[:, :, 1] = 0  # a query with every score 0: its row of A is 0, so O = 0 and dQ = 0
    assert_matches_formula(lambda q, k, v: cog_attention(q, k, v, backend=backend), q, k, v)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_absolute_weights_of_each_row_sum_to_one(backend):
    """With V = identity over keys, O is A itself."""
    q, k, _ = qkv(lq=6, lk=8)
    v = torch.eye(8, dtype=torch.float64).expand(2, 3, 8, 8)
    mask = key_padding_mask(2, 8)
    a = cog_attention(q, k, v, mask=mask, backend=backend)
    torch.testing.assert_close(a.abs().sum(-1), torch.ones(2, 3, 6, dtype=torch.float64))
    assert (a[~mask.expand_as(a)] == 0).all() and (a < 0).any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_finite_at_logits_of_1e4(backend, dtype):
    q, k, v = qkv(lq=6, lk=8, d=4, dtype=torch.float32)
    q = (q / q.norm(dim=-1, keepdim=True) * 100).to(dtype).requires_grad_()
    k = (k / k.norm(dim=-1, keepdim=True) * 200).to(dtype).requires_grad_()
    v = v.to(dtype).requires_grad_()
    out = cog_attention(q, k, v, backend=backend)
    assert (q.detach().double() @ k.detach().double().transpose(-2, -1) * 0.5).abs().max() > 5e3
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), naive_cog(q.detach(), k.detach(), v.detach(), 0.5), rtol=2e-2, atol=2e-2)
    out.float().square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("backend", ["lean", "chunked"])
def test_autocast_keeps_scores_in_float32(backend):
    q, k, v = (t * 60 for t in qkv(dtype=torch.float32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cog_attention(q, k, v, backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), naive_cog(q, k, v, 0.5), rtol=1e-4, atol=1e-4)


def test_inputs_are_never_modified():
    q, k, v = qkv()
    copies = [t.clone() for t in (q, k, v)]
    for backend in CPU_BACKENDS:
        cog_attention(q, k, v, backend=backend)
    assert all(torch.equal(t, c) for t, c in zip((q, k, v), copies))


def saved_score_tensors(fn, q, k, v):
    """Number of tensors autograd keeps for backward that hold at least one full score matrix."""
    n_scores = q.shape[:-1].numel() * k.shape[-2]
    big = []

    def pack(t):
        if t.numel() >= n_scores:
            big.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*(t.requires_grad_() for t in (q, k, v)))
    return len(big)


def test_lean_keeps_one_score_matrix_and_chunked_none():
    q, k, v = qkv(b=1, h=2, lq=64, lk=64, d=4)  # L x L = 4096 > everything of size L x D
    assert saved_score_tensors(lambda q, k, v: cog_attention(q, k, v, backend="math"), q, k, v) >= 3
    assert saved_score_tensors(lambda q, k, v: cog_attention(q, k, v, backend="lean"), q, k, v) == 1
    assert saved_score_tensors(lambda q, k, v: cog_attention(q, k, v, backend="chunked"), q, k, v) == 0


# ---------------------------------------------------------------------------------- backend choice
def test_auto_picks_lean_for_training_chunked_for_inference_math_for_weights():
    q, k, v = qkv(dtype=torch.float32)
    assert resolve_cog_backend(q, k, v) == "chunked"
    q.requires_grad_()
    assert resolve_cog_backend(q, k, v) == "lean"
    with torch.no_grad():
        assert resolve_cog_backend(q, k, v) == "chunked"
    assert resolve_cog_backend(q, k, v, return_weights=True) == "math"
    assert resolve_cog_backend(q, k, v, backend="math") == "math"


def test_bad_backend_requests_fail_with_one_clear_error():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="one of"):
        cog_attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="return_weights"):
        cog_attention(q, k, v, backend="lean", return_weights=True)
    with pytest.raises(ValueError, match="q \\(B, H, Lq, D\\)"):
        cog_attention(q, k[:1], v[:1], backend="lean")
    with pytest.raises(ValueError, match="one of"):
        softmax_attention(q, k, v, backend="flash")


def test_triton_backend_is_refused_on_cpu_with_the_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = qkv(dtype=torch.float32)
    with pytest.raises(ValueError, match="'triton' cannot run here: (triton is not installed|tensors are on cpu)"):
        cog_attention(q, k, v, backend="triton")


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS[:-1])
def test_softmax_attention_is_sdpa_or_the_formula(backend):
    q, k, v = qkv()
    mask = key_padding_mask(2, 7)
    expected = softmax_reference(q, k, v, mask=mask)[0]
    torch.testing.assert_close(softmax_attention(q, k, v, mask=mask, backend=backend), expected)
    if backend != "math":
        torch.testing.assert_close(softmax_attention(q, k, v, mask=mask, backend=backend),
                                   F.scaled_dot_product_attention(q, k, v, attn_mask=mask.expand(2, 3, 5, 7)))


def test_model_cog_backend_is_a_runtime_choice(tmp_path):
    from uvic.model import UViT  # imports diffusers: kept out of the interpreter subprocess

    torch.manual_seed(0)
    model = UViT(sample_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=4, attention_type="cog").double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([3, 500])
    outputs = {}
    for backend in CPU_BACKENDS:
        model.set_cog_backend(backend)
        assert {blk.attn.backend for blk in model.blocks} == {backend}
        outputs[backend] = model(x, t).sample
    for backend in CPU_BACKENDS[1:]:
        torch.testing.assert_close(outputs[backend], outputs["math"], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="one of"):
        model.set_cog_backend("flash")
    assert "backend" not in model.config
    model.save_pretrained(tmp_path)
    assert {blk.attn.backend for blk in UViT.from_pretrained(tmp_path).blocks} == {"auto"}


# ---------------------------------------------------------------------------------- Triton (interpreted)
# The interpreter only works when TRITON_INTERPRET=1 is set before triton is first imported (its own
# library functions are decorated at import), so these tests run in a subprocess started below.
def _interpreter_problem():
    try:
        import numpy  # noqa: F401  (the interpreter runs on numpy)
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError as error:
        return f"triton interpreter not importable: {error}"
    if not isinstance(tl.standard.sigmoid, InterpretedFunction):
        return "triton was imported without TRITON_INTERPRET=1 (test_triton_kernels_in_the_interpreter runs these)"
    return None


@pytest.fixture
def interpreted_triton():
    problem = _interpreter_problem()
    if problem:
        pytest.skip(problem)


def test_triton_kernels_in_the_interpreter():
    """Runs the triton tests of this file in a fresh process with TRITON_INTERPRET=1."""
    pytest.importorskip("numpy", reason="the triton interpreter needs numpy")
    pytest.importorskip("triton", reason="triton is not installed")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("already interpreting in this process")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton_kernel_"],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    report = result.stdout[-3000:] + result.stderr[-2000:]
    assert result.returncode == 0 and re.search(r"\b8 passed", result.stdout), report


@pytest.mark.parametrize(
    "dtype, mask_shape, tol",
    [(torch.float32, None, 1e-5), (torch.float32, "keys", 1e-5), (torch.bfloat16, "full", 3e-2)],
)
def test_triton_kernel_matches_float64_formula(interpreted_triton, dtype, mask_shape, tol):
    b, h, lq, lk, d = 2, 1, 18, 21, 8  # two blocks of 16 queries and of keys, ragged ends
    qkv_packed = torch.randn(b, lq, 3, h, d, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    q, k, v = (qkv_packed[:, :, i].transpose(1, 2).to(dtype) for i in range(3))  # strided views, as in the model
    k, v = torch.cat([k, k[:, :, :lk - lq] * 0.5], dim=2), torch.cat([v, v[:, :, :lk - lq]], dim=2)
    g = torch.Generator().manual_seed(5)
    mask = {None: None, "keys": key_padding_mask(b, lk),
            "full": torch.rand(b, h, lq, lk, generator=g) > 0.5}[mask_shape]
    if mask is not None:
        mask[..., 0] = True
    assert resolve_cog_backend(q, k, v, backend="triton") == "triton"
    assert_matches_formula(lambda q, k, v: cog_attention(q, k, v, mask=mask, backend="triton"), q, k, v, mask, tol)


@pytest.mark.parametrize("head_dim, gpu_blocks", [(72, False), (80, False), (72, True)])
def test_triton_kernel_non_power_of_two_head_dims_and_zero_scores(interpreted_triton, monkeypatch, head_dim,
                                                                  gpu_blocks):
    """72: U-ViT-H (1152 / 16), 64 + 16 with 8 padded; 80: 64 + 16 exactly. gpu_blocks: the block
    sizes a GPU launches (first candidates) instead of the interpreter's small ones."""
    from uvic.kernels import cog_triton  # noqa: PLC0415

    assert cog_triton.split_head_dim(head_dim) == (64, 16)
    length = 20
    if gpu_blocks:
        length = 130  # 128 + 2 query rows, 64 + 64 + 2 keys
        monkeypatch.setattr(cog_triton, "INTERPRETER_BLOCK", 1 << 30)  # the candidates' own block sizes
        assert cog_triton.candidates("forward", head_dim, torch.float32)[0][:2] == (128, 64)
    packed = torch.randn(1, length, 3, 2, head_dim, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    q, k, v = (packed[:, :, i].transpose(1, 2).float() for i in range(3))  # packed-qkv strides
    k[:, :, 4] = 0  # exact zero scores: sign 0, gradient 0, as autograd gives
    q[:, :, 17] = 0
    assert_matches_formula(lambda q, k, v: cog_attention(q, k, v, backend="triton"), q, k, v, None, 1e-5)


def test_triton_kernel_passes_the_self_check_of_auto(interpreted_triton, monkeypatch):
    from uvic import attention  # noqa: PLC0415

    monkeypatch.setattr(attention, "_SELF_CHECKS", {})
    assert attention.triton_self_check(torch.device("cpu"), torch.float32, 24) is None


def test_triton_kernel_rows_sum_to_one_and_half_precision_is_finite(interpreted_triton):
    q, k, _ = qkv(b=1, h=2, lq=6, lk=8, d=8, dtype=torch.float32)
    v = torch.eye(8).expand(1, 2, 8, 8)  # O = A
    a = cog_attention(q, k, v, backend="triton")
    torch.testing.assert_close(a.abs().sum(-1), torch.ones(1, 2, 6))
    assert (a < 0).any()
    q = (q / q.norm(dim=-1, keepdim=True) * 100).to(torch.bfloat16).requires_grad_()
    k = (k / k.norm(dim=-1, keepdim=True) * 200).to(torch.bfloat16).requires_grad_()
    v = torch.randn(1, 2, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    out = cog_attention(q, k, v, backend="triton")
    assert (q.detach().double() @ k.detach().double().transpose(-2, -1) * 8**-0.5).abs().max() > 5e3
    out.float().square().sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in (q, k, v))
    expected = naive_cog(q.detach(), k.detach(), v.detach(), 8**-0.5)
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


# On a GPU: tests/test_cuda_path.py.
