"""Softmax and Cog attention.

Cog attention (Lv et al., arXiv 2411.07176) lets attention weights be negative:

    S = Q Kᵀ · scale                      scale = head_dim^-0.5
    A = sign(S) ⊙ softmax(|S|)            row-wise over keys
    O = A V

Each row's absolute weights sum to 1. Softmax attention is A = softmax(S).

All functions take (B, H, L, D) tensors. `*_reference` are the plain formulas every faster
path is tested against; `cog_attention` / `softmax_attention` are what the model calls.

Backends of `cog_attention` (a runtime choice: `backend=` here, `UViT.set_cog_backend` on a
model; never part of a model's config):

    "math"     the plain formula under autograd (holds several Lq x Lk tensors for backward)
    "lean"     closed-form backward that keeps only A (uvic.kernels.cog_torch)
    "chunked"  keeps only the row log-sum-exp of |S|; scores are made chunk by chunk, forward
               and backward, so memory stays bounded for long sequences
    "triton"   fused flash-style kernels (uvic.kernels.cog_triton): CUDA with triton installed
    "auto"     "triton" on CUDA where the kernels can run, passed their self-check, and (for
               float32) TF32 is allowed; else "lean" when autograd needs gradients and "chunked"
               when it does not (inference); "math" when the weights are returned

`auto` never lets a kernel problem stop a run: the first time it would use "triton" for a
(device, dtype, head dim) it runs the kernels at a small shape against "chunked" (values and
gradients) inside try/except, in a thread of its own so that no autograd context of the caller
applies (checkpointing's saved-tensor hooks, inference_mode, autocast); on an exception or a
mismatch it warns once, naming the cause, and uses the PyTorch backends for that key from then on
(`triton_self_check`, cached per key). `check_cog_kernels(model, ...)` runs it up front (the
trainer, before step 0) and says in one line per shape which backend runs. Float32 follows
torch's TF32 flag (`tf32_allowed`).
The environment variable UVIC_COG_BACKEND=<name> overrides every backend choice (also an
explicit one) except where the weights are returned, e.g. UVIC_COG_BACKEND=chunked to rule the
kernels out.

All backends share one convention where a score is exactly 0: sign(S) = 0, so A = 0 there and
its gradient dS = 0 (what autograd gives for the plain formula).

Softmax attention always runs through `F.scaled_dot_product_attention` (which has its own fused
kernels), except with backend "math".

Mechanisms are registered by name (`MECHANISMS`): "softmax" (U-ViT) and "cog" (U-ViC) here; a new one is one
function and one line, and `model.attention_type=<name>` then trains, samples and analyses with it:

    def sigmoid_reference(q, k, v, *, scale=None, mask=None):   # (B, H, L, D) -> (O, A)
        a = torch.sigmoid(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 - math.log(k.shape[-2]))
        return a @ v, a

    register_attention("sigmoid", sigmoid_reference, signed=False)

A package can register its mechanisms for the command line too, through the `uvic.attention` entry-point group
(setup.cfg: `uvic.attention = sigmoid = mypkg.attention:register`), loaded when an unknown name is asked for.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import einops
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn

from .kernels import tf32_allowed
from .kernels.cog_torch import cog_attention_chunked

ATTENTION_BACKENDS = ("auto", "math", "lean", "chunked", "triton")


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


def _check_backend(backend):
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    return backend


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def triton_problem(q, k, v) -> Optional[str]:
    """Why the Triton kernels cannot run these inputs, or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    from .kernels import cog_triton  # noqa: PLC0415  (triton is importable, checked above)

    return cog_triton.problem(q, k, v)


def _triton_attention(q, k, v, scale, mask):
    """The kernels' entry point (imported on use: needs triton)."""
    from .kernels.cog_triton import cog_attention_triton  # noqa: PLC0415  (triton: optional, CUDA only)

    return cog_attention_triton(q, k, v, scale, mask)


# ---------------------------------------------------------------------------------- Triton self-check
# Results of the kernels' first-use self-check, keyed by (device, dtype, head dim): None = passed, else
# the reason they are not used. Filled by `triton_self_check`; the one piece of module state, so each
# process checks each key once and warns at most once per key.
_SELF_CHECKS: Dict[Tuple[str, torch.dtype, int], Optional[str]] = {}
SELF_CHECK_TOLERANCE = {torch.float32: 2e-2, torch.float16: 2e-2, torch.bfloat16: 6e-2}  # of max |reference|


def _run_self_check(device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """Kernels against "chunked" at a small shape (several blocks, ragged ends, both kernel variants (mask or none),
    packed-qkv strides, a key mask): values and gradients. None when they agree, else why not."""
    g = torch.Generator().manual_seed(0)
    b, h = 2, 2
    length = 130 if device.type == "cuda" else 34  # GPU blocks: 128 + 2 query rows, 64 + 64 + 2 keys (interpreter: 16)
    packed = torch.randn(b, length, 3, h, head_dim, generator=g).to(device, dtype)  # qkv as in the model
    mask = torch.rand(b, 1, 1, length, generator=g).to(device) > 0.2
    mask[..., 0] = True
    d_out = torch.randn(b, h, length, head_dim, generator=g).to(device, dtype)
    scale = head_dim**-0.5
    try:
        for m in (None, mask):  # both kernel variants
            results = []
            for fn in (_triton_attention, _chunked_attention):
                leaf = packed.detach().clone().requires_grad_()
                q, k, v = (leaf[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, D) strided views
                out = fn(q, k, v, scale, m)
                (grad,) = torch.autograd.grad(out, leaf, d_out)
                results.append([out.detach().float(), grad.float()])
            for name, got, want in zip(("O", "dQ/dK/dV"), *results):
                error = float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))
                if not error <= SELF_CHECK_TOLERANCE[dtype]:  # also catches NaN
                    return f"{name} differs from 'chunked' by {error:.2g} of its largest value (tolerance " \
                           f"{SELF_CHECK_TOLERANCE[dtype]})"
    except Exception as error:  # any kernel failure: compile, launch, every launch configuration out of resources
        return f"the kernels raised {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


def _isolated(fn, *args):
    """fn(*args) in a fresh thread, eagerly and outside every autograd context of the caller: grad mode,
    inference mode, autocast, saved-tensor hooks (gradient checkpointing records every tensor saved in
    the forward and expects the same ones when it recomputes) and dispatch modes are thread-local."""
    result = {}

    def run():
        try:
            with torch.inference_mode(False), torch.enable_grad():  # a fresh thread's defaults, stated
                result["value"] = fn(*args)
        except BaseException as error:  # re-raised in the caller's thread
            result["error"] = error

    thread = threading.Thread(target=run, name="uvic-cog-self-check", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def triton_self_check(device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """None when the Triton kernels passed their self-check for this key, else why they are not used
    (warned once). Runs once per key and process (cached in _SELF_CHECKS), isolated from the caller
    (`_isolated`), so it may run at any point of a forward, under checkpointing or inference_mode."""
    key = (str(device), dtype, head_dim)
    if key not in _SELF_CHECKS:
        problem = _isolated(_run_self_check, device, dtype, head_dim)
        if problem:
            warnings.warn(f"Cog attention: Triton kernels disabled for {dtype} head dim {head_dim} on {device} "
                          f"({problem}); using the PyTorch backends instead (set UVIC_COG_BACKEND to force one)")
        _SELF_CHECKS[key] = problem
    return _SELF_CHECKS[key]


@torch.compiler.assume_constant_result  # decided eagerly while torch.compile traces: no graph break
def _auto_triton(q, k, v) -> bool:
    """Whether "auto" uses the kernels for these inputs (module docstring)."""
    return q.device.type == "cuda" and _triton_allowed(q, k, v)


def _triton_allowed(q, k, v) -> bool:
    return _why_not_triton(q, k, v) is None


def _why_not_triton(q, k, v) -> Optional[str]:
    """None when the kernels can run these inputs, are faster than the PyTorch backends and passed their
    self-check; else why "auto" does not use them."""
    problem = triton_problem(q, k, v)
    if problem is not None:
        return problem
    if q.dtype == torch.float32 and not tf32_allowed():  # IEEE float32 dots: the PyTorch backends are faster
        return "float32 without TF32 (torch.backends.cuda.matmul.allow_tf32 is False)"
    return triton_self_check(q.device, q.dtype, q.shape[-1])


def check_cog_kernels(model: nn.Module, device, dtype) -> List[str]:
    """Run auto's Triton self-check now for every Cog attention shape of `model` (call it before the
    first training step) and say in one line per shape which backend it uses. dtype: the attention's
    compute dtype, a torch.dtype or accelerate's mixed precision ("no", "bf16", "fp16")."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}.get(dtype, dtype)
    device = torch.device(device)
    shapes = sorted({(m.num_heads, m.qkv.out_features // 3 // m.num_heads, m.backend) for m in model.modules()
                     if isinstance(m, Attention) and m.running == "cog"})
    lines = []
    for heads, head_dim, backend in shapes:
        q = torch.zeros(1, heads, 1, head_dim, device=device, dtype=dtype)
        train = resolve_cog_backend(q, q, q.clone().requires_grad_(), backend=backend)  # runs the self-check
        infer = resolve_cog_backend(q, q, q.detach(), backend=backend)
        line = (f"Cog attention {heads} heads x {head_dim} in {str(dtype).replace('torch.', '')} on {device} "
                f"(backend {backend!r}): {train} for training, {infer} for inference")
        if backend == "auto" and "triton" not in (train, infer):
            line += f"; Triton kernels not used: {_why_not_triton(q, q, q) if device.type == 'cuda' else 'not CUDA'}"
        lines.append(line)
    return lines


def resolve_cog_backend(q, k, v, *, backend: Optional[str] = None, return_weights: bool = False) -> str:
    """The backend `cog_attention` uses for these inputs: `backend` checked, or "auto" resolved."""
    name = _check_backend("auto" if backend is None else backend)
    forced = os.environ.get("UVIC_COG_BACKEND")
    if forced:
        if forced not in ATTENTION_BACKENDS:
            raise ValueError(f"UVIC_COG_BACKEND must be one of {ATTENTION_BACKENDS}, got {forced!r}")
        name = name if return_weights else forced
    if return_weights:
        if name not in ("auto", "math"):
            raise ValueError(f"return_weights=True needs backend 'math' or 'auto', got {name!r}: "
                             "only the plain formula materialises A for the caller")
        return "math"
    if name == "triton":
        problem = triton_problem(q, k, v)
        if problem:
            raise ValueError(f"attention backend 'triton' cannot run here: {problem}")
    if name != "auto":
        return name
    if _auto_triton(q, k, v):
        return "triton"
    return "lean" if _needs_grad(q, k, v) else "chunked"


def _check_shapes(q, k, v):
    if not (q.dim() == k.dim() == v.dim() == 4 and q.shape[:2] == k.shape[:2] == v.shape[:2]
            and k.shape[-2] == v.shape[-2] and q.shape[-1] == k.shape[-1]):
        raise ValueError(f"fast Cog backends need q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} (backend 'math' broadcasts)")


def _chunked_attention(q, k, v, scale, mask, keep_weights=False):
    return cog_attention_chunked(q, k, v, scale, mask, keep_weights=keep_weights)


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
        return _triton_attention(q, k, v, scale, mask)
    return _chunked_attention(q, k, v, scale, mask, keep_weights=name == "lean")


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


# ---------------------------------------------------------------------- the registry of mechanisms
@dataclass(frozen=True)
class AttentionMechanism:
    """One attention mechanism: the plain formula it is defined by and tested against, what the model calls, and
    whether its weights can be negative (the analysis reports negative mass only where they can)."""

    name: str
    reference: Callable  # (q, k, v, *, scale=None, mask=None) -> (O (B, H, Lq, D), A (B, H, Lq, Lk))
    function: Callable  # (q, k, v, *, backend) -> O (B, H, Lq, D): what the model runs
    signed: bool  # weights can be negative
    label: str  # how reports name a model with it, e.g. "U-ViC (Cog)"


MECHANISMS: Dict[str, AttentionMechanism] = {}  # name -> mechanism; filled by register_attention
ENTRY_POINT_GROUP = "uvic.attention"


def register_attention(name: str, reference: Callable, function: Optional[Callable] = None, *, signed: bool,
                       label: Optional[str] = None) -> AttentionMechanism:
    """Make `model.attention_type=name` available. reference: the plain formula (returns O and A); function: a
    faster implementation taking `backend=` (default: the reference's O under autograd). Registering a name
    again replaces it (a notebook re-running its cell); "softmax" is the baseline and cannot be replaced."""
    if not name or not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"attention mechanism name must be a word (letters, digits, - or _), got {name!r}")
    if name == "softmax" and "softmax" in MECHANISMS:
        raise ValueError("'softmax' is U-ViT's attention, the baseline every mechanism is compared with: "
                         "register yours under another name")
    if function is None:
        def function(q, k, v, *, backend=None):
            return reference(q, k, v)[0]
    mechanism = AttentionMechanism(name, reference, function, bool(signed), label or f"U-ViT ({name})")
    MECHANISMS[name] = mechanism
    return mechanism


def attention_mechanism(name: str) -> AttentionMechanism:
    """The registered mechanism `name` (loading the `uvic.attention` entry points once if it is unknown)."""
    if name not in MECHANISMS:
        _load_entry_points()
    if name not in MECHANISMS:
        raise ValueError(f"attention_type={name!r} is not a registered attention mechanism; registered: "
                         f"{', '.join(MECHANISMS)} (register one with uvic.attention.register_attention)")
    return MECHANISMS[name]


def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        registered = entry.load()  # the module's import (or calling the object it names) registers
        if callable(registered) and not isinstance(registered, AttentionMechanism):
            registered()


register_attention("softmax", softmax_reference, softmax_attention, signed=False, label="U-ViT (softmax)")
register_attention("cog", cog_reference, cog_attention, signed=True, label="U-ViC (Cog)")


# ---------------------------------------------------------------------- diffusers attention processors
class MechanismProcessor:
    """A diffusers attention processor that runs a registered mechanism with the module's own `qkv` and `proj`:
    `processor(attn, hidden_states)`. UViT's blocks hold one each, so diffusers' `attn_processors`,
    `set_attn_processor` and `set_attention_backend` work on a UViT as on a diffusers model.

        model.set_attn_processor(MechanismProcessor("cog", backend="chunked"))    # Cog in every block

    backend: the mechanism's implementation ("auto", "math", "lean", "chunked", "triton"; see above)."""

    def __init__(self, mechanism: str = "cog", backend: str = "auto"):
        self.mechanism = attention_mechanism(mechanism)
        self.backend = _check_backend(backend)

    def __call__(self, attn: "Attention", hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, **kwargs) -> torch.Tensor:  # (B, L, C) -> (B, L, C)
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("U-ViT attention is self-attention over all tokens (text tokens are tokens too): "
                             "no encoder_hidden_states, no attention_mask")
        q, k, v = attn.qkv_heads(hidden_states)  # (B, H, L, D)
        out = self.attend(q, k, v)  # (B, H, L, D)
        return attn.proj(einops.rearrange(out, "B H L D -> B L (H D)"))

    def attend(self, q, k, v) -> torch.Tensor:
        return self.mechanism.function(q, k, v, backend=self.backend)

    def __repr__(self):
        return f"{type(self).__name__}({self.mechanism.name!r}, backend={self.backend!r})"


class SoftmaxProcessor(MechanismProcessor):
    """U-ViT's softmax attention: PyTorch SDPA, or the diffusers attention-dispatcher backend that
    `model.set_attention_backend(name)` sets ("native", "flash", "sage", ...; diffusers.attention_dispatch)."""

    def __init__(self, backend: str = "auto"):
        super().__init__("softmax", backend)
        self._attention_backend = None  # diffusers' set_attention_backend / reset_attention_backend set this

    def attend(self, q, k, v) -> torch.Tensor:
        if self._attention_backend is None:
            return super().attend(q, k, v)
        out = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                    backend=self._attention_backend)  # the dispatcher's layout: (B, L, H, D)
        return out.transpose(1, 2)


def default_processor(attention_type: str) -> MechanismProcessor:
    return SoftmaxProcessor() if attention_type == "softmax" else MechanismProcessor(attention_type)


class Attention(AttentionModuleMixin, nn.Module):
    """Multi-head self-attention with the parameter names of U-ViT (`qkv`, `proj`).

    attention_type: a registered mechanism ("softmax", "cog", or one of register_attention), run by the module's
    diffusers attention processor (`processor`; default_processor). `backend` (set_backend) picks the
    implementation at run time; neither the processor nor the backend is part of the model's configuration.
    """

    _supports_qkv_fusion = False  # q, k and v are one projection already (U-ViT's qkv)

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attention_type: str = "softmax"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attention_type = attention_type
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.processor = default_processor(attention_type)

    @property
    def mechanism(self) -> Optional[AttentionMechanism]:
        """The mechanism the processor runs (None for a processor that is not a MechanismProcessor)."""
        return getattr(self.processor, "mechanism", None)

    @property
    def running(self) -> str:
        """The name of what runs: the processor's mechanism (the configured one unless a processor was set)."""
        return self.mechanism.name if self.mechanism is not None else type(self.processor).__name__

    @property
    def backend(self) -> str:
        return getattr(self.processor, "backend", "auto")

    @backend.setter
    def backend(self, backend: str) -> None:
        self.set_backend(backend)

    def extra_repr(self):
        return f"num_heads={self.num_heads}, attention_type={self.attention_type!r}, processor={self.processor!r}"

    def set_backend(self, backend: str):
        """Choose the attention backend ("auto", "math", "lean", "chunked", "triton") of the processor."""
        backend = _check_backend(backend)
        if hasattr(self.processor, "backend"):
            self.processor.backend = backend

    def qkv_heads(self, x: torch.Tensor):
        """(B, L, C) -> q, k, v each (B, H, L, D)."""
        qkv = einops.rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x):  # x: (B, L, C)
        return self.processor(self, x)
