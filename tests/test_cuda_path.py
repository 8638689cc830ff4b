"""The CUDA path on the CPU: auto's self-check and fallback, forced backends, torch.compile without
graph breaks, the doctor and the GPU check script (tiny). Kernel numerics: test_attention_backends.py."""

import contextlib
import json
import os
import re
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


def test_gpu_check_survives_a_hanging_and_a_raising_section(tmp_path):
    """--device cpu --tiny with the attention section made to hang and sampling to raise after their
    first row: each is cut off or recorded, the report keeps every row, the other sections still run."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--device", "cpu",
                             "--tiny", "--out", str(tmp_path), "--section-timeout", "60"], capture_output=True,
                            text=True, timeout=400, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT,
                                 "UVIC_GPU_CHECK_FAULTS": "attention=hang,sampling=raise"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "expected about" in result.stdout.splitlines()[0]
    report = json.loads((tmp_path / "report.json").read_text())
    sections = report["sections"]
    assert [sections[name]["status"] for name in ("correctness", "training")] == ["ok", "ok"]
    assert sections["attention"]["status"].startswith("timed out") and len(sections["attention"]["rows"]) == 1
    assert sections["sampling"]["status"].startswith("failed") and "fault injected" in sections["sampling"]["error"]
    assert len(sections["sampling"]["rows"]) == 1  # written before the fault
    rows = sections["correctness"]["rows"]
    assert report["correct"] and all(row["ok"] for row in rows)
    assert {row["backend used"] for row in rows if "skipped" not in row} == {"lean"}  # what ran, not what was asked
    assert [row["case"] for row in rows][1:4] == ["S = 0 (exact zeros)", "|S| ~ 1e4", "key mask"]
    assert sections["attention"]["rows"][0]["backend used"] == "sdpa-cpu"
    uvic, uvit = sections["training"]["rows"][1], sections["training"]["rows"][0]
    assert uvit["ok"] and uvic["ok"] and "lean for training" in uvic["backends"][0]  # train.py's own line
    text = (tmp_path / "report.md").read_text()
    assert "**Correctness: all passed**" in text and "Attention against SDPA: timed out" in text


# ---------------------------------------------------------------------------------- the self-check, interpreted
# The real kernels in triton's CPU interpreter; TRITON_INTERPRET=1 must be set before triton is first
# imported, so these run in a fresh process (test_self_check_in_the_interpreter).
def test_self_check_in_the_interpreter():
    """Runs the `interpreted` tests of this file in a fresh process with TRITON_INTERPRET=1."""
    pytest.importorskip("numpy", reason="the triton interpreter needs numpy")
    pytest.importorskip("triton", reason="triton is not installed")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("already interpreting in this process")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                             "interpreted"], env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True,
                            text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0 and "5 passed" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]


@pytest.fixture
def interpreted_auto(monkeypatch):
    """auto's CUDA branch on CPU tensors with the interpreted kernels; clean caches. Yields cog_triton."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs in test_self_check_in_the_interpreter's subprocess")
    from uvic.kernels import cog_triton  # noqa: PLC0415

    monkeypatch.setattr(attention, "_SELF_CHECKS", {})
    monkeypatch.setattr(cog_triton, "_CHOSEN", {})
    monkeypatch.setattr(attention, "_auto_triton", attention._triton_allowed)  # skips only the device test
    launches = []
    launch = cog_triton.launch
    monkeypatch.setattr(cog_triton, "launch", lambda kind, call, q: launches.append(kind) or launch(kind, call, q))
    with allow_tf32(True):
        yield cog_triton, launches


def tiny_cog_uvit(seed=0):
    from uvic.model import UViT  # noqa: PLC0415

    torch.manual_seed(seed)
    return UViT(sample_size=8, in_channels=1, patch_size=2, embed_dim=32, depth=2, num_heads=2, attention_type="cog",
                softmax_blocks="none")


def test_interpreted_self_check_survives_gradient_checkpointing(interpreted_auto):
    """The first forward runs the self-check inside a checkpointed block: it must not change what the
    checkpoint saves (torch's CheckpointError at recomputation) nor turn the kernels off."""
    _, launches = interpreted_auto
    model, reference = tiny_cog_uvit(), tiny_cog_uvit()
    model.enable_gradient_checkpointing()
    reference.set_cog_backend("math")  # the plain formula, no checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 500])
    model(x, t).sample.square().mean().backward()
    reference(x, t).sample.square().mean().backward()
    assert attention._SELF_CHECKS == {("cpu", torch.float32, 16): None}
    self_check = 2  # without and with a mask
    assert launches.count("forward") == self_check + 2 * 3  # 3 Cog blocks, forward and recomputation
    assert launches.count("backward") == self_check + 3
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-4, atol=1e-6, msg=name)
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_interpreted_trainer_checks_the_kernels_before_step_0(interpreted_auto, tmp_path, capsys):
    from uvic.config import load_config  # noqa: PLC0415
    from uvic.trainer import Trainer  # noqa: PLC0415

    cfg = load_config(None, ["model.sample_size=8", "model.in_channels=1", "model.patch_size=2", "model.embed_dim=32",
                             "model.depth=2", "model.num_heads=2", "model.attention_type=cog",
                             "model.gradient_checkpointing=true", "data.name=digits", "data.limit=16",
                             "train.batch_size=4", "train.steps=1", "train.warmup_steps=0", "train.sample_every=0",
                             "train.checkpoint_every=0", "train.sample_num=2", "train.sample_steps=2"])
    Trainer(cfg, tmp_path / "run").train()
    said = capsys.readouterr().out
    line = "Cog attention 2 heads x 16 in float32 on cpu (backend 'auto'): triton for training, triton for inference"
    assert line in said, said
    assert said.index("***** Running training *****") < said.index(line)  # at start-up, with the summary
    assert attention._SELF_CHECKS == {("cpu", torch.float32, 16): None}


def test_interpreted_self_check_under_inference_mode_keeps_the_kernels(interpreted_auto):
    """A first call under inference_mode (sampling) checks gradients too, in its own autograd context."""
    q, k, v = qkv(requires_grad=False, d=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.inference_mode():
            out = cog_attention(q, k, v)
    assert attention._SELF_CHECKS == {("cpu", torch.float32, 16): None}
    torch.testing.assert_close(out, attention.cog_reference(q, k, v)[0], rtol=1e-5, atol=1e-6)
    assert resolve_cog_backend(*qkv(d=16)) == "triton"  # training keeps them too


def test_interpreted_out_of_resources_tries_the_next_launch_configuration(interpreted_auto, monkeypatch):
    import triton  # noqa: PLC0415

    cog_triton, _ = interpreted_auto
    first = {kind: cog_triton.candidates(kind, 16, torch.float32)[0] for kind in ("forward", "backward")}
    refused = []
    launch_kernel = cog_triton.launch_kernel

    def too_big_first(call, config):  # what triton raises for a kernel that needs more shared memory than the device's
        kind = {cog_triton._cog_fwd: "forward", cog_triton._cog_bwd: "backward"}.get(call.kernel)
        if kind and config == first[kind]:
            refused.append(config)
            raise triton.runtime.OutOfResources(262144, 232448, "shared memory")
        launch_kernel(call, config)

    monkeypatch.setattr(cog_triton, "launch_kernel", too_big_first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert triton_self_check(torch.device("cpu"), torch.float32, 16) is None
    assert refused == [first["forward"], first["backward"], first["forward"], first["backward"]]  # once per key
    chosen = {key[0]: config for key, config in cog_triton._CHOSEN.items() if not key[4]}  # without a mask
    assert chosen == {kind: cog_triton.candidates(kind, 16, torch.float32)[1] for kind in ("forward", "backward")}


def test_interpreted_kernels_are_disabled_only_when_no_configuration_fits(interpreted_auto, monkeypatch):
    import triton  # noqa: PLC0415

    cog_triton, _ = interpreted_auto

    def nothing_fits(call, config):
        raise triton.runtime.OutOfResources(262144, 232448, "shared memory")

    monkeypatch.setattr(cog_triton, "launch_kernel", nothing_fits)
    q, k, v = qkv(d=16)
    with pytest.warns(UserWarning, match="disabled for torch.float32 head dim 16 on cpu .*no forward launch "
                                         "configuration of head dim 16 in torch.float32 fits cpu"):
        out = cog_attention(q, k, v)
    torch.testing.assert_close(out, attention.cog_reference(q, k, v)[0])  # the run goes on, through "lean"
    assert resolve_cog_backend(q, k, v) == "lean"


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
# triton.compile for sm_80 / sm_90 with triton's own ptxas (no GPU needed), specialised from real
# arguments exactly as triton's launcher does (pointer alignment, strides divisible by 16, ones).
SHARED_MEMORY = {80: 163 * 1024, 90: 227 * 1024}  # opt-in bytes per block: A100, H100/H200
compiles = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles real kernels")


def aot_compiler(arch: int):
    """compile(call, config) -> the CompiledKernel a launch of `call` with `config` would build on sm_<arch>."""
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource, make_backend  # noqa: PLC0415
    from triton.runtime.jit import create_function_from_signature  # noqa: PLC0415

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)

    def compile_call(call, config):
        kernel, meta = call.kernel, call.meta(config)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*call.args, **meta)  # what JITFunction.run does before compiling
        options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, specialization, options)
        try:
            return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        except (FileNotFoundError, RuntimeError) as error:
            if "ptxas" in str(error).lower() and "not found" in str(error).lower():
                pytest.skip(f"no ptxas: {error}")
            raise

    return compile_call


def model_calls(dtype, head_dim, heads=16, length=258):
    """(forward, delta, backward) KernelCalls on CPU tensors laid out as in the model: q, k, v strided
    views of packed qkv (B, L, 3, H, D), dO the gradient of a (B, L, H·D) rearrangement."""
    from uvic.kernels import cog_triton as ct  # noqa: PLC0415

    packed = torch.zeros(1, length, 3, heads, head_dim, dtype=dtype)
    q, k, v = (packed[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, D)
    out = torch.zeros(1, heads, length, head_dim, dtype=dtype)
    d_out = torch.zeros(1, length, heads, head_dim, dtype=dtype).transpose(1, 2)
    lse, delta = torch.zeros(1, heads, length), torch.zeros(1, heads, length)
    d_q = torch.zeros(1, heads, length, head_dim)
    d_k, d_v = torch.zeros_like(out), torch.zeros_like(out)
    forward = ct.forward_call(q, k, v, None, out, lse, head_dim**-0.5)
    delta_call, backward = ct.backward_calls(d_out, q, k, v, out, lse, None, delta, d_q, d_k, d_v, head_dim**-0.5)
    if dtype == torch.float32:  # on CUDA with TF32 allowed (these are CPU tensors: "ieee" otherwise)
        forward, backward = (c._replace(constants={**c.constants, "PRECISION": "tf32"}) for c in (forward, backward))
    return forward, delta_call, backward


@compiles
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chosen_launch_configurations_fit_the_shared_memory_of_ampere_and_hopper(arch, dtype):
    """For every head dim in use, the configuration `launch` picks (the first candidate whose compiled
    kernel fits) exists and fits the device: what the compiler allocates, for the model's layout."""
    pytest.importorskip("triton")
    from uvic.kernels import cog_triton as ct  # noqa: PLC0415

    compile_call = aot_compiler(arch)
    chosen = {}
    for head_dim in (32, 64, 72, 80, 128):
        forward, delta, backward = model_calls(dtype, head_dim)
        for kind, call in (("forward", forward), ("backward", backward)):
            compiled = {}

            def fits(config):
                compiled[config] = compile_call(call, config)
                ct.check_fits(compiled[config], SHARED_MEMORY[arch])

            config, failures = ct.first_that_fits(ct.candidates(kind, head_dim, dtype), fits)
            assert config is not None, f"{kind} D={head_dim} on sm_{arch}: nothing fits: {failures}"
            shared = compiled[config].metadata.shared
            assert shared <= SHARED_MEMORY[arch]
            assert ("wgmma" if arch == 90 else "mma.sync") in compiled[config].asm["ptx"], "no tensor-core instructions"
            chosen[kind, head_dim] = (config.block_m, config.block_n, config.num_warps, config.num_stages, shared)
        delta_kernel = compile_call(delta, ct.delta_config(head_dim))
        ct.check_fits(delta_kernel, SHARED_MEMORY[arch])
    print(f"sm_{arch} {dtype}: {chosen}")


def global_loads(ptx: str) -> dict:
    """Counts of cp.async copies, vector global loads and scalar 16-bit global loads in PTX."""
    return {"cp.async": len(re.findall(r"\bcp\.async\.c[ag]", ptx)),
            "vector": len(re.findall(r"\bld\.global(?:\.\w+)*\.v[248]", ptx)),
            "scalar16": len(re.findall(r"\bld\.global(?:\.\w+)*\.[bu]16\b", ptx))}


@compiles
@pytest.mark.parametrize("arch", [80, 90])
def test_head_dim_72_loads_are_vectorised_and_pipelined(arch):
    """U-ViT-H's head dim 72: the head stride is only a multiple of 8, which the wrapper checks and the
    kernels declare; with the head dim a constexpr, the loads are 16-byte vectors and cp.async copies."""
    pytest.importorskip("triton")
    from uvic.kernels import cog_triton as ct  # noqa: PLC0415

    compile_call = aot_compiler(arch)
    forward, delta, backward = model_calls(torch.bfloat16, 72)
    assert forward.constants["ALIGN"] == backward.constants["ALIGN"] == delta.constants["ALIGN"] == 8
    counts = {}
    for name, call, config in (("forward", forward, ct.candidates("forward", 72, torch.bfloat16)[0]),
                               ("backward", backward, ct.candidates("backward", 72, torch.bfloat16)[0]),
                               ("delta", delta, ct.delta_config(72))):
        counts[name] = global_loads(compile_call(call, config).asm["ptx"])
        assert counts[name]["scalar16"] == 0 and counts[name]["vector"] + counts[name]["cp.async"] > 0, counts
    assert counts["forward"]["cp.async"] > 0, counts  # K and V blocks pipelined
    unaligned = forward._replace(constants={**forward.constants, "ALIGN": 1})  # no claim: what D=72 got before
    before = global_loads(compile_call(unaligned, ct.candidates("forward", 72, torch.bfloat16)[0]).asm["ptx"])
    assert before["scalar16"] > 0 and before["cp.async"] == 0, before
    print(f"sm_{arch} D=72 bf16: {counts}; without the alignment claim: {before}")


def test_alignment_is_claimed_only_for_strides_that_are_multiples_of_8():
    pytest.importorskip("triton")
    from uvic.kernels import cog_triton as ct  # noqa: PLC0415

    packed = torch.zeros(1, 5, 3, 2, 72)
    assert ct.alignment(packed[:, :, 0].transpose(1, 2)) == 8  # head stride 72, row stride 432
    odd = torch.zeros(1, 5, 3, 2, 20)
    assert ct.alignment(odd[:, :, 0].transpose(1, 2)) == 1  # head stride 20
    assert ct.alignment(torch.zeros(2, 2, 5, 72).transpose(-1, -2)) == 1  # head dim not contiguous
