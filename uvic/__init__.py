"""uvic: U-ViT and U-ViC diffusion models (train, sample, evaluate).

The names below load on first use (PEP 562), so `import uvic.config` does not import torch, diffusers or timm.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {  # name -> the module that defines it
    "Attention": "attention", "cog_attention": "attention", "cog_reference": "attention",
    "softmax_attention": "attention", "softmax_reference": "attention",
    "PRESETS": "model", "UViT": "model", "UViTOutput": "model", "load_reference_checkpoint": "model",
    "preset_config": "model",
    "UViCPipeline": "pipeline", "make_scheduler": "pipeline",
    "RunDir": "runs",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'uvic' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
