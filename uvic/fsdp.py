"""FSDP2 for train.fsdp=true: the model sharded per transformer Block, and the values accelerate / torch.distributed
return under it taken as plain tensors.

    shard(model, processes=8, mixed_precision="bf16")   # in place: every parameter a DTensor split along dim 0
    plain_tensor(accelerator.clip_grad_norm_(...))      # one whole plain tensor, whichever form the version returns
"""

from __future__ import annotations

import torch

from .model import Block, UViT


def shard(model: UViT, processes: int, mixed_precision: str) -> UViT:
    """FSDP2 in place (torch fully_shard): one unit per transformer Block, then the rest; each parameter becomes a
    DTensor split along dim 0 over the processes. bf16: compute in bf16, gradients reduced and kept in float32."""
    from torch.distributed.device_mesh import init_device_mesh  # torch.distributed: only FSDP runs need it
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (processes,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if mixed_precision == "bf16" else None,
                                  reduce_dtype=torch.float32)
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def plain_tensor(value) -> torch.Tensor:
    """A value from accelerate / torch.distributed as one whole plain tensor, whichever form this version returns:
    a replicated DTensor (clip_grad_norm_ under FSDP2 in accelerate <= 1.15), a plain tensor (1.16+, DDP, one
    process) or a Python number; None (a norm not computed) as 0."""
    if value is None:
        return torch.zeros(())
    full_tensor = getattr(value, "full_tensor", None)  # torch.distributed.tensor.DTensor
    return full_tensor() if callable(full_tensor) else torch.as_tensor(value)
