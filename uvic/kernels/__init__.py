"""Faster implementations of Cog attention, each tested against `uvic.attention.cog_reference`.

cog_torch    plain PyTorch, every device: closed-form backward, chunked scores (always importable)
cog_triton   fused flash-style Triton kernels for CUDA; import only where triton is importable

`uvic.attention.cog_attention` chooses among them; nothing here is imported by `import uvic`.
"""

import torch


def tf32_allowed() -> bool:
    """Whether torch lets float32 CUDA matmuls use TF32: torch.backends.cuda.matmul.allow_tf32 = True,
    torch.set_float32_matmul_precision("high"), torch.backends.cuda.matmul.fp32_precision = "tf32", or
    TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1. Float32 Cog attention follows it (README, GPU section)."""
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # torch refuses the legacy read once the legacy and new APIs were mixed
        return torch.backends.cuda.matmul.fp32_precision == "tf32"
