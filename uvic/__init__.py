"""uvic: U-ViT and U-ViC diffusion models (train, sample, evaluate)."""

from .attention import Attention, cog_attention, cog_reference, softmax_attention, softmax_reference
from .model import PRESETS, UViT, UViTOutput, load_reference_checkpoint, preset_config
from .pipeline import UViCPipeline, make_scheduler
from .runs import RunDir

__version__ = "0.1.0"
