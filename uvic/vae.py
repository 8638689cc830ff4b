"""The autoencoder of latent diffusion: Stable Diffusion's VAE (diffusers AutoencoderKL), loaded offline-first.

U-ViT and DiT encode ImageNet with stabilityai/sd-vae-ft-ema and scale its latents by 0.18215 (unit variance);
uvic.latents extracts with it, and a latent model's pipeline decodes with it (uvic.latents.attach_vae).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"  # the VAE of U-ViT (autoencoder_kl_ema) and DiT
SCALE_FACTOR = 0.18215  # Stable Diffusion's latent scale: unit variance for the SD VAE
VAE_DIR = "vae"  # the VAE's folder inside a pipeline or an extraction folder


def load_vae(id_or_path: Union[str, Path] = DEFAULT_VAE, *, dtype: torch.dtype = torch.float32,
             local_files_only: Optional[bool] = None):
    """AutoencoderKL from a local folder (save_pretrained layout, or a pipeline folder with vae/)
    or a hub id. Offline, a hub id fails with one message that says to pass a local folder."""
    from diffusers import AutoencoderKL  # diffusers takes seconds to import: only a VAE's user pays for it

    path = Path(id_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists() and (path / VAE_DIR / "config.json").exists():
            path = path / VAE_DIR  # a pipeline folder
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"VAE folder {str(path)!r} has no config.json (expected AutoencoderKL.save_pretrained output)")
        vae = AutoencoderKL.from_pretrained(path, torch_dtype=dtype)
    elif str(id_or_path).startswith((".", "/", "~")) or str(id_or_path).count("/") != 1:
        raise FileNotFoundError(f"VAE {str(id_or_path)!r}: no such folder, and not a hub id of the form 'org/name'")
    else:
        if local_files_only is None:
            local_files_only = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        try:
            vae = AutoencoderKL.from_pretrained(str(id_or_path), torch_dtype=dtype, local_files_only=local_files_only)
        except OSError as err:
            raise OSError(
                f"VAE {str(id_or_path)!r} is no local folder and could not be loaded from the Hugging Face hub "
                f"or its cache ({type(err).__name__}). "
                f"Offline, pass a local folder instead: download it once where there is internet "
                f"(`huggingface-cli download {id_or_path} --local-dir VAE_DIR`) and use --vae VAE_DIR."
            ) from None
    return vae.eval().requires_grad_(False)


def downsample_factor(vae) -> int:
    """Pixels per latent cell: 2 ** (number of encoder stages - 1), 8 for the SD VAE."""
    return 2 ** (len(vae.config.block_out_channels) - 1)
