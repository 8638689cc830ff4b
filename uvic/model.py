"""U-ViT (Bao et al., CVPR 2023) as a diffusers model, with softmax or Cog attention.

Everything is a token: [label token, time token, patch tokens], or for text-to-image
(libs/uvit_t2i.py) [time token, context tokens..., patch tokens]; shallow and deep blocks are
joined by long skip connections. The parameter names and the forward pass are those of the
reference implementation (github.com/baofff/U-ViT, libs/uvit.py), so its checkpoints load with
`strict=True`. With attention_type="cog" the model is a U-ViC: Cog attention in every block but
`softmax_blocks` (default: the first in-block and the last out-block, the official layout; named
placements for the ablation in SOFTMAX_BLOCK_PRESETS).

Blocks are numbered 0..depth in forward order: in-blocks 0..depth//2-1, the mid-block depth//2,
out-blocks depth//2+1..depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import einops
import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput, logging
from timm.layers import Mlp, trunc_normal_

from .attention import Attention

logger = logging.get_logger(__name__)  # diffusers' logger: its verbosity switches apply

# name -> architecture; the patch size comes from the "/2" or "/4" suffix (docs/design.md, U-ViT paper).
PRESETS = {
    "uvit-s": dict(embed_dim=512, depth=12, num_heads=8),
    "uvit-s-deep": dict(embed_dim=512, depth=16, num_heads=8),
    "uvit-m": dict(embed_dim=768, depth=16, num_heads=12),
    "uvit-l": dict(embed_dim=1024, depth=20, num_heads=16),
    "uvit-h": dict(embed_dim=1152, depth=28, num_heads=16),
}

# MS-COCO text-to-image models (U-ViT paper, configs/mscoco_uvit_*.py): 256 px through the SD VAE
# (32x32x4 latents), 77 CLIP ViT-L/14 text tokens of width 768.
T2I_PRESETS = {
    "mscoco-uvit-s/2": dict(PRESETS["uvit-s"], patch_size=2, sample_size=32, in_channels=4,
                            context_dim=768, num_context_tokens=77),
    "mscoco-uvit-s-deep/2": dict(PRESETS["uvit-s-deep"], patch_size=2, sample_size=32, in_channels=4,
                                 context_dim=768, num_context_tokens=77),
}


@dataclass
class UViTOutput(BaseOutput):
    """sample: (B, C, H, W), the network's prediction (noise, velocity or clean sample)."""

    sample: torch.Tensor


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of (B,) timesteps -> (B, dim), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, D) with a stride-p convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Block(nn.Module):
    """Pre-LayerNorm transformer block; out-blocks first fuse the long skip: Linear(cat[x, skip])."""

    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, attention_type, skip=False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attention_type=attention_type)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:  # (B, L, D)
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# Named placements of the softmax blocks in a U-ViC (model.softmax_blocks), for the layer-placement
# ablation. Blocks are numbered 0..depth: in-blocks 0..depth//2-1, mid depth//2, out depth//2+1..depth.
SOFTMAX_BLOCK_PRESETS = {
    "none": lambda depth: [],  # Cog attention everywhere
    "first+last": lambda depth: [0, depth],  # official U-ViC (CogAttn U-ViC/libs/uvit_t2i.py)
    "first-half": lambda depth: list(range(depth // 2)),  # every in-block
    "second-half": lambda depth: list(range(depth // 2 + 1, depth + 1)),  # every out-block
    "all-but-mid": lambda depth: [i for i in range(depth + 1) if i != depth // 2],  # Cog only in the mid-block
}


def default_softmax_blocks(depth: int) -> List[int]:
    """The official U-ViC layout: softmax in the first in-block and the last out-block."""
    return SOFTMAX_BLOCK_PRESETS["first+last"](depth)


def softmax_block_indices(softmax_blocks: Union[None, str, Sequence[int]], depth: int) -> List[int]:
    """Block indices (0..depth) that keep softmax in a U-ViC: None = the official "first+last", a preset
    name from SOFTMAX_BLOCK_PRESETS, or explicit indices (checked against the depth)."""
    if softmax_blocks is None:
        return default_softmax_blocks(depth)
    if isinstance(softmax_blocks, str):
        if softmax_blocks not in SOFTMAX_BLOCK_PRESETS:
            raise ValueError(f"softmax_blocks {softmax_blocks!r} is not a preset: use one of "
                             f"{list(SOFTMAX_BLOCK_PRESETS)} or a list of block indices 0..{depth}")
        return SOFTMAX_BLOCK_PRESETS[softmax_blocks](depth)
    keep = [int(i) for i in softmax_blocks]
    bad = [i for i in keep if not 0 <= i <= depth]
    if bad:
        raise ValueError(f"softmax_blocks {bad} out of range: blocks are numbered 0..{depth}")
    return sorted(set(keep))


# UViT's blocks run diffusers attention processors (uvic.attention.MechanismProcessor), so attn_processors,
# set_attn_processor and set_attention_backend work; diffusers' processors written for its own Attention class
# (xformers, slicing) do not fit U-ViT's fused qkv, so those switches say what works instead.
COG_BACKEND_HINT = ("UViT's attention runs uvic's processors (uvic.attention.MechanismProcessor), not diffusers' "
                    "Attention class: pick the softmax kernels with model.set_attention_backend(NAME) (diffusers' "
                    "dispatcher: 'native', 'flash', 'xformers', ...) and the Cog backend with "
                    "model.set_cog_backend('auto' | 'math' | 'lean' | 'chunked' | 'triton') or UVIC_COG_BACKEND=NAME")


class UViT(ModelMixin, AttentionMixin, ConfigMixin):
    """U-ViT / U-ViC noise-prediction network.

    num_classes: size of the label-embedding table, as in the reference code (0 or less =
        unconditional). Class-conditional uvic models reserve the last index for "no class",
        so a 10-class data set gives num_classes=11 and the null label is 10.
    softmax_blocks: block indices (0..depth) that keep softmax when attention_type="cog", or a preset
        name from SOFTMAX_BLOCK_PRESETS ("none", "first+last", "first-half", "second-half",
        "all-but-mid"); None = "first+last", the official U-ViC layout [0, depth]. Ignored for
        attention_type="softmax".
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        patch_size: int = 2,
        embed_dim: int = 512,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        mlp_time_embed: bool = False,
        num_classes: int = -1,
        use_final_conv: bool = True,
        long_skip: bool = True,
        attention_type: str = "softmax",
        softmax_blocks: Union[None, str, Sequence[int]] = None,
        context_dim: int = 0,
        num_context_tokens: int = 77,
    ):
        super().__init__()  # attention_type is checked once, by Attention (every block builds one)
        if sample_size % patch_size:
            raise ValueError(f"sample_size {sample_size} is not divisible by patch_size {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if depth % 2:
            raise ValueError(f"depth must be even (depth//2 in-blocks, 1 mid, depth//2 out), got {depth}")
        if context_dim > 0 and num_classes > 0:
            raise ValueError(
                f"class labels (num_classes={num_classes}) and text context (context_dim={context_dim}) are "
                "mutually exclusive: set num_classes=-1 for a text-to-image model"
            )
        self.gradient_checkpointing = False
        num_patches = (sample_size // patch_size) ** 2
        layout = self._layout(depth, attention_type, softmax_blocks)

        self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dim)
        self.time_embed = (
            nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim))
            if mlp_time_embed
            else nn.Identity()
        )
        if num_classes > 0:
            self.label_emb = nn.Embedding(num_classes, embed_dim)
        if context_dim > 0:  # text-to-image (libs/uvit_t2i.py): [time, context..., patches]
            self.context_embed = nn.Linear(context_dim, embed_dim)
        self.extras = 1 + (1 if num_classes > 0 else 0) + (num_context_tokens if context_dim > 0 else 0)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, embed_dim))

        def block(i, skip=False):
            return Block(embed_dim, num_heads, mlp_ratio, qkv_bias, layout[i], skip=skip)

        half = depth // 2
        self.in_blocks = nn.ModuleList([block(i) for i in range(half)])
        self.mid_block = block(half)
        self.out_blocks = nn.ModuleList([block(half + 1 + i, skip=long_skip) for i in range(half)])

        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch_size**2 * in_channels)
        self.final_layer = nn.Conv2d(in_channels, in_channels, 3, padding=1) if use_final_conv else nn.Identity()

        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _layout(depth, attention_type, softmax_blocks) -> List[str]:
        if attention_type == "softmax":
            return ["softmax"] * (depth + 1)
        keep = softmax_block_indices(softmax_blocks, depth)
        return ["softmax" if i in keep else attention_type for i in range(depth + 1)]

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "UViT":
        """Build a named preset, e.g. `UViT.from_preset("uvit-s/2", sample_size=32, attention_type="cog")`."""
        return cls(**preset_config(name, **overrides))

    @property
    def blocks(self) -> List[Block]:
        """All depth+1 blocks in forward order (in, mid, out)."""
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    def attention_layout(self) -> List[str]:
        """Which attention each block uses, in forward order, e.g. ['softmax', 'cog', ..., 'softmax']."""
        return [blk.attn.running for blk in self.blocks]

    def set_cog_backend(self, backend: str):
        """Run every block's Cog attention through `backend`: "auto", "math", "lean", "chunked" or
        "triton" (uvic.attention). A runtime choice, like the device: not stored in the config.
        diffusers' `set_attention_backend` picks the softmax blocks' kernels (its dispatcher has no Cog kernels)."""
        for blk in self.blocks:
            blk.attn.set_backend(backend)

    def set_attention_backend(self, backend: str) -> None:
        """diffusers' attention dispatcher backend for the softmax blocks; Cog blocks keep uvic's Cog backends
        (set_cog_backend), since the dispatcher's kernels compute softmax only."""
        super().set_attention_backend(backend)
        signed = sorted({blk.attn.running for blk in self.blocks if not hasattr(blk.attn.processor, "_attention_backend")})
        if signed:
            logger.warning(f"set_attention_backend({backend!r}) sets the softmax blocks; the {', '.join(signed)} blocks "
                           "keep uvic's backends (model.set_cog_backend)")

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, float, int],
        class_labels: Optional[torch.Tensor] = None,
        return_dict: bool = True,
        encoder_hidden_states: Optional[torch.Tensor] = None,
    ):
        """sample (B, C, H, W), timestep scalar or (B,), class_labels (B,) long or
        encoder_hidden_states (B, num_context_tokens, context_dim) -> UViTOutput(sample (B, C, H, W))."""
        batch = sample.shape[0]
        timesteps = torch.as_tensor(timestep, device=sample.device)
        timesteps = timesteps.reshape(-1).expand(batch) if timesteps.numel() == 1 else timesteps.reshape(batch)

        x = self.patch_embed(sample)  # (B, N, D)
        time_token = self.time_embed(timestep_embedding(timesteps, self.config.embed_dim).to(x.dtype))
        tokens = [time_token[:, None], x]
        if self.config.num_classes > 0:
            if class_labels is None:
                raise ValueError(
                    f"this model is class-conditional (num_classes={self.config.num_classes}): pass class_labels"
                )
            tokens.insert(0, self.label_emb(class_labels.reshape(batch))[:, None])
        elif class_labels is not None:
            raise ValueError(
                "this model is unconditional or text-conditional (num_classes <= 0): class_labels must be None"
            )
        if self.config.context_dim > 0:
            expected = (self.config.num_context_tokens, self.config.context_dim)
            if encoder_hidden_states is None or tuple(encoder_hidden_states.shape[1:]) != expected:
                got = None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)
                raise ValueError(f"this model is text-conditional: pass encoder_hidden_states (B, {expected[0]}, "
                                 f"{expected[1]}), got {got}")
            context = self.context_embed(encoder_hidden_states.to(x.dtype))  # (B, T, D)
            tokens = [tokens[0], context, *tokens[1:]]
        elif encoder_hidden_states is not None:
            raise ValueError("this model has no text context (context_dim=0): encoder_hidden_states must be None")
        x = torch.cat(tokens, dim=1) + self.pos_embed  # (B, extras + N, D)

        skips = []
        for blk in self.in_blocks:
            x = self._run_block(blk, x)
            skips.append(x)
        x = self._run_block(self.mid_block, x)
        for blk in self.out_blocks:
            x = self._run_block(blk, x, skips.pop())

        x = self.decoder_pred(self.norm(x))[:, self.extras :]  # (B, N, p*p*C)
        p, c = self.config.patch_size, self.config.in_channels
        h = sample.shape[-2] // p
        x = einops.rearrange(x, "B (h w) (p1 p2 C) -> B C (h p1) (w p2)", h=h, p1=p, p2=p, C=c)
        x = self.final_layer(x)
        return UViTOutput(sample=x) if return_dict else (x,)

    def _run_block(self, blk: Block, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(blk, x, skip)
        return blk(x, skip)


def preset_config(name: str, **overrides) -> dict:
    """Config dict of a preset "uvit-<size>/<patch>" with overrides applied."""
    if name.lower() in T2I_PRESETS:
        return {**T2I_PRESETS[name.lower()], **overrides}
    base, sep, patch = name.lower().partition("/")
    if base not in PRESETS or not sep or not patch.isdigit():
        valid = ", ".join([f"{n}/2, {n}/4" for n in PRESETS] + list(T2I_PRESETS))
        raise ValueError(f"unknown preset {name!r}; valid: {valid}")
    return {**PRESETS[base], "patch_size": int(patch), **overrides}


# ---------------------------------------------------------------------- reference checkpoints
# keyword of the reference UViT.__init__ -> ours; keys mapped to None are accepted and ignored.
_REFERENCE_KEYS = {
    "img_size": "sample_size",
    "patch_size": "patch_size",
    "in_chans": "in_channels",
    "embed_dim": "embed_dim",
    "depth": "depth",
    "num_heads": "num_heads",
    "mlp_ratio": "mlp_ratio",
    "qkv_bias": "qkv_bias",
    "mlp_time_embed": "mlp_time_embed",
    "num_classes": "num_classes",
    "conv": "use_final_conv",
    "skip": "long_skip",
    "clip_dim": "context_dim",
    "num_clip_token": "num_context_tokens",
    "use_checkpoint": None,
    "name": None,
}


def config_from_reference(reference: dict, **overrides) -> dict:
    """Map a reference U-ViT `nnet` config (libs/uvit.py keywords) onto UViT's config."""
    unknown = sorted(set(reference) - set(_REFERENCE_KEYS) - {"qk_scale"})
    if unknown:
        raise ValueError(f"unsupported reference config keys {unknown}; known: {sorted(_REFERENCE_KEYS)}")
    if reference.get("qk_scale") is not None:
        raise ValueError("qk_scale other than None (head_dim^-0.5) is not supported")
    config = {ours: reference[theirs] for theirs, ours in _REFERENCE_KEYS.items() if ours and theirs in reference}
    if reference.get("name") == "uvit_t2i":  # libs/uvit_t2i.py defaults: 77 CLIP tokens of width 768
        config = {"context_dim": 768, "num_context_tokens": 77, **config}
    return {**config, **overrides}


def read_reference_state(path: str) -> dict:
    """The tensors of a published U-ViT `.pth` under libs/uvit.py's names, which are UViT's (a wrapping
    state_dict / model / nnet entry and DDP's `module.` prefix removed). Only tensors are unpickled."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "nnet"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_reference_checkpoint(path: str, reference_config: dict, **overrides) -> UViT:
    """Load a published U-ViT `.pth` (e.g. nnet_ema.pth) with `strict=True`.

    reference_config: the `nnet` keywords of the reference config (img_size, patch_size, ...);
    overrides: uvic fields such as attention_type. Only tensors are unpickled (weights_only).
    Note: the reference discrete-time models were trained with timesteps 1..N, where diffusers
    counts 0..N-1.
    """
    state = read_reference_state(path)
    model = UViT(**config_from_reference(reference_config, **overrides))
    model.load_state_dict(state, strict=True)
    return model
