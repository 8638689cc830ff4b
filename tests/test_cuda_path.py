"""The CUDA path on the CPU: auto's self-check and fallback, forced backends, torch.compile without
graph breaks, the doctor and the GPU check script (tiny). Kernel numerics: test_attention_backends.py."""

import contextlib
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from uvic import attention
from uvic.attention import Attention, cog_attention, resolve_cog_backend, triton_self_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def allow_tf32(value: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = value
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture
def kernels_usable(monkeypatch):
    """A clean self-check cache, and the kernels' entry point reported usable on CPU tensors, so that
    auto's CUDA branch runs here with whatever `_triton_attention` the test installs."""
    monkeypatch.setattr(attention, "_SELF_CHECKS", {})
    monkeypatch.setattr(attention, "triton_problem", lambda q, k, v: None)
    monkeypatch.setattr(attention, "_auto_triton", attention._triton_allowed)  # skips only the device test
    with allow_tf32(True):
        yield


def qkv(requires_grad=True, d=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 2, 9, d, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def chunked(q, k, v, scale, mask):
    return attention._chunked_attention(q, k, v, scale, mask)


def test_auto_uses_kernels_that_pass_their_self_check(kernels_usable, monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "_triton_attention", lambda *a: calls.append(1) or chunked(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_cog_backend(*qkv()) == "triton"
    assert calls and attention._SELF_CHECKS == {("cpu", torch.float32, 8): None}
    calls.clear()
    resolve_cog_backend(*qkv())  # cached: no second check
    assert not calls


@pytest.mark.parametrize("failure, cause", [
    (lambda *a: (_ for _ in ()).throw(RuntimeError("out of resources: shared memory")), "raised RuntimeError: out of"),
    (lambda q, k, v, scale, mask: chunked(q, k, v, scale, mask) * 1.5, "O differs from 'chunked'"),
    (lambda q, k, v, scale, mask: chunked(q, k, v, scale, mask) * float("nan"), "O differs from 'chunked'"),
])
def test_auto_falls_back_and_warns_once_when_the_kernels_fail_or_mismatch(kernels_usable, monkeypatch, failure,
                                                                          cause):
    monkeypatch.setattr(attention, "_triton_attention", failure)
    q, k, v = qkv()
    with pytest.warns(UserWarning, match=f"Triton kernels disabled for torch.float32 head dim 8 on cpu .*{cause}"):
        out = cog_attention(q, k, v)
    expected = attention.cog_reference(q, k, v)[0]
    torch.testing.assert_close(out, expected)  # the run goes on, through "lean"
    out.sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per key
        assert resolve_cog_backend(q, k, v) == "lean"
        with torch.no_grad():
            assert resolve_cog_backend(q, k, v) == "chunked"
    assert cause.split(":")[0].split(" '")[0] in attention._SELF_CHECKS["cpu", torch.float32, 8]


def test_float32_goes_to_the_kernels_only_when_tf32_is_allowed(monkeypatch):
    monkeypatch.setattr(attention, "triton_problem", lambda q, k, v: None)
    monkeypatch.setattr(attention, "triton_self_check", lambda *a: None)
    q, k, v = qkv()
    with allow_tf32(False):
        assert not attention._triton_allowed(q, k, v)
        assert attention._triton_allowed(q.bfloat16(), k.bfloat16(), v.bfloat16())
    with allow_tf32(True):
        assert attention._triton_allowed(q, k, v)


def test_uvic_cog_backend_forces_a_backend(monkeypatch):
    q, k, v = qkv()
    monkeypatch.setenv("UVIC_COG_BACKEND", "chunked")
    assert resolve_cog_backend(q, k, v) == "chunked"
    assert resolve_cog_backend(q, k, v, backend="lean") == "chunked"
    assert resolve_cog_backend(q, k, v, return_weights=True) == "math"  # weights need the formula
    monkeypatch.setenv("UVIC_COG_BACKEND", "flash")
    with pytest.raises(ValueError, match="UVIC_COG_BACKEND must be one of"):
        resolve_cog_backend(q, k, v)


@pytest.mark.parametrize("backend", ["auto", "lean", "chunked"])
def test_compiled_attention_has_no_graph_break(backend):
    import torch._dynamo  # noqa: PLC0415

    torch._dynamo.reset()
    module = Attention(16, num_heads=2, attention_type="cog")
    module.backend = backend
    x = torch.randn(2, 5, 16, requires_grad=True)
    explanation = torch._dynamo.explain(module)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, module(x))
    (g_compiled,) = torch.autograd.grad(out.sum(), x)
    (g_eager,) = torch.autograd.grad(module(x).sum(), x)
    torch.testing.assert_close(g_compiled, g_eager)


def test_compiled_uvic_is_one_graph():
    import torch._dynamo  # noqa: PLC0415

    from uvic.model import UViT  # noqa: PLC0415

    torch._dynamo.reset()
    model = UViT(sample_size=8, in_channels=1, patch_size=2, embed_dim=32, depth=2, num_heads=2, attention_type="cog")
    for backend in ("lean", "chunked"):
        model.set_cog_backend(backend)
        explanation = torch._dynamo.explain(model)(torch.randn(2, 1, 8, 8), torch.tensor([3, 5]))
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


def test_doctor_reports_versions_and_auto_choice_per_config(capsys):
    from uvic import doctor  # noqa: PLC0415

    doctor.main(["--configs", os.path.join(ROOT, "configs", "imagenet256_uvic_h2.yaml"), "--device", "cpu"])
    text = capsys.readouterr().out
    assert "torch " + torch.__version__ in text
    assert "| imagenet256_uvic_h2.yaml | 258 | 16 | 72 | bfloat16 | lean | chunked | not run |" in text


def test_gpu_check_tiny_runs_end_to_end_on_cpu(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--device", "cpu",
                             "--tiny", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["correct"] and {row["backend"] for row in report["correctness"]} == {"lean"}
    assert {row["backend"] for row in report["attention"]} == {"sdpa", "lean", "chunked"}
    assert [row["attention"] for row in report["training"]] == ["U-ViT", "U-ViC"]
    assert all(row["img/s"] > 0 for row in report["training"] + report["sampling"])
    assert "**Correctness: all passed**" in (tmp_path / "report.md").read_text()


# ---------------------------------------------------------------------------------- on a GPU
# Skipped without CUDA; the same kernels run in the interpreter in test_attention_backends.py.
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def packed(batch, length, heads, dim, dtype, device, seed=0):
    """(B, L, 3, H, D) packed qkv, as the model makes it."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(batch, length, 3, heads, dim, generator=g, device=device, dtype=dtype)


def heads(qkv):
    """q, k, v (B, H, L, D): strided views of packed qkv."""
    return [qkv[:, :, i].transpose(1, 2) for i in range(3)]


def relative_error(fn, qkv, rows=slice(None)):
    """max |x - ref| / max |ref| over O and dQKV against float64 autograd of the formula, on the
    batch entries `rows` (the kernel runs on the whole batch)."""
    leaf = qkv.detach().clone().requires_grad_()
    out = fn(*heads(leaf))
    d_out = torch.randn_like(out)
    got = [out, torch.autograd.grad(out, leaf, d_out)[0]]
    ref_leaf = qkv[rows].detach().double().requires_grad_()
    ref = attention.cog_reference(*heads(ref_leaf))[0]
    want = [ref, torch.autograd.grad(ref, ref_leaf, d_out[rows].double())[0]]
    return max(float((x[rows].double() - y).abs().max() / y.abs().max()) for x, y in zip(got, want))


def triton(q, k, v):
    return cog_attention(q, k, v, backend="triton")


@cuda
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 6e-2), (torch.float16, 2e-2), (torch.float32, 2e-2)])
@pytest.mark.parametrize("dim", [64, 72, 80, 128])
@pytest.mark.parametrize("length", [17, 257, 1025, 4097])
def test_triton_on_cuda_matches_float64(dtype, tol, dim, length):
    pytest.importorskip("triton")
    assert relative_error(triton, packed(1, length, 2, dim, dtype, "cuda")) <= tol


@cuda
def test_triton_on_cuda_with_batch_times_heads_past_65535():
    pytest.importorskip("triton")
    qkv = packed(4100, 17, 16, 64, torch.bfloat16, "cuda")  # B·H = 65,600
    assert relative_error(triton, qkv, slice(-2, None)) <= 6e-2


@cuda
def test_triton_on_cuda_with_offsets_past_2_to_the_31():
    pytest.importorskip("triton")
    batch, length, num_heads, dim = 2420, 257, 16, 72  # packed batch stride 3·1152·257: 2.15e9 elements at the end
    if torch.cuda.mem_get_info()[0] < 3 * batch * length * 3 * num_heads * dim * 2:
        pytest.skip("not enough GPU memory")
    q, k, v = heads(packed(batch, length, num_heads, dim, torch.bfloat16, "cuda"))
    assert v.storage_offset() + v.stride(0) * (batch - 1) > 2**31
    with torch.no_grad():
        out = triton(q, k, v)
        ref = attention.cog_reference(*(t[-2:].double() for t in (q, k, v)))[0]
    assert float((out[-2:].double() - ref).abs().max() / ref.abs().max()) <= 6e-2


@cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_triton_on_a_device_that_is_not_current():
    pytest.importorskip("triton")
    assert torch.cuda.current_device() == 0
    assert relative_error(triton, packed(2, 65, 4, 64, torch.bfloat16, "cuda:1")) <= 6e-2


@cuda
def test_auto_self_check_passes_on_this_gpu():
    pytest.importorskip("triton")
    for dtype in (torch.bfloat16, torch.float16):
        for dim in (64, 72):
            assert triton_self_check(torch.device("cuda", 0), dtype, dim) is None


# ---------------------------------------------------------------------------------- compiled for GPUs, on the CPU
def compile_kernel(kernel, pointers: dict, constants: dict, arch: int, num_warps: int, num_stages: int):
    """triton.compile of `kernel` for sm_<arch> (triton's own ptxas; no GPU needed)."""
    import inspect  # noqa: PLC0415

    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    params = list(inspect.signature(kernel.fn).parameters)
    signature = {p: "constexpr" if p in constants else pointers.get(p, "fp32" if p == "scale" else "i32")
                 for p in params}
    source = ASTSource(kernel, signature, {(params.index(k),): v for k, v in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles real kernels")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype, head_dim", [("bf16", 72), ("fp32", 64)])
def test_kernels_compile_for_ampere_and_hopper_within_their_shared_memory_estimate(arch, dtype, head_dim):
    pytest.importorskip("triton")
    from uvic.kernels import cog_triton as ct  # noqa: PLC0415

    d0, d1 = ct.split_head_dim(head_dim)
    fp32 = dtype == "fp32"
    element = 4 if fp32 else 2
    for kind, kernel, (block_m, block_n, warps, stages), tensors in [
        ("forward", ct._cog_fwd, ct.FORWARD_CANDIDATES[0], "Q K V M O"),
        ("backward", ct._cog_bwd, ct.BACKWARD_CANDIDATES[0], "Q K V M DO DK DV"),
    ]:
        pointers = {name: f"*{dtype}" for name in tensors.split()}
        pointers.update(M="*u8", LSE="*fp32", DELTA="*fp32", DQ="*fp32")
        constants = dict(HAS_MASK=True, FP32=fp32, PRECISION="tf32" if fp32 else "ieee", BLOCK_M=block_m,
                         BLOCK_N=block_n, D0=d0, D1=d1)
        try:
            compiled = compile_kernel(kernel, pointers, constants, arch, warps, stages)
        except (FileNotFoundError, RuntimeError) as error:
            if "ptxas" in str(error).lower() and "not found" in str(error).lower():
                pytest.skip(f"no ptxas: {error}")
            raise
        assert compiled.metadata.shared <= ct.shared_memory_bytes(kind, block_m, block_n, d0 + d1, element, stages)
        ptx = compiled.asm["ptx"]
        assert ("wgmma" if arch == 90 else "mma.sync") in ptx, f"{kind}: no tensor-core instructions for sm_{arch}"
    delta = compile_kernel(ct._cog_bwd_delta, {"O": f"*{dtype}", "DO": f"*{dtype}", "DELTA": "*fp32"},
                           dict(BLOCK_M=64, D0=d0, D1=d1), arch, 4, 1)
    assert delta.metadata.shared <= 64 * 1024
