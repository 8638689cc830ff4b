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
    monkeypatch.setattr(attention, "_triton_problem", lambda q, k, v: None)
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
    monkeypatch.setattr(attention, "_triton_problem", lambda q, k, v: None)
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


@pytest.mark.parametrize("backend", ["lean", "chunked"])
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
