"""Faster implementations of Cog attention, each tested against `uvic.attention.cog_reference`.

cog_torch    plain PyTorch, every device: closed-form backward, chunked scores (always importable)
cog_triton   fused flash-style Triton kernels for CUDA; import only where triton is importable

`uvic.attention.cog_attention` chooses among them; nothing here is imported by `import uvic`.
"""
