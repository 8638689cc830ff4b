"""CLIP score of text-to-image samples against their prompts, as torchmetrics' CLIPScore defines it.

    CLIPScore = max(100 · mean_i cos(E_I(image_i), E_C(prompt_i)), 0)

with E_I, E_C the projected image and text embeddings of one CLIP model (default
openai/clip-vit-large-patch14, torchmetrics' default), images through the model's CLIPProcessor
(resize, center crop, normalise) and prompts padded to the longest and truncated to 77 tokens.
Computed here through transformers (torchmetrics is not a dependency).

    python -m uvic.clip_score SAMPLE_SET --clip CLIP_DIR     (a sample.py --prompts set: samples.npz + prompts.txt)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

CLIP_MODEL = "openai/clip-vit-large-patch14"


def load_clip(name_or_path: str = CLIP_MODEL, device="cpu"):
    """(CLIPModel in eval mode, CLIPProcessor) from a local folder or a cached hub name; nothing is downloaded."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(name_or_path, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError) as err:
        where = name_or_path if os.path.isdir(name_or_path) else "the Hugging Face cache (HF_HOME)"
        raise FileNotFoundError(
            f"CLIP model {name_or_path!r} not found in {where}: download it once with `huggingface-cli download "
            f"{CLIP_MODEL} --local-dir DIR` (the full model: image and text towers, processor files) and pass "
            f"--clip DIR. ({type(err).__name__})") from None
    return model.to(device).eval().requires_grad_(False), processor


def _features(output) -> torch.Tensor:
    """transformers 4 returns the projected embeddings, 5 a model output holding them as pooler_output."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def clip_cosines(images: np.ndarray, prompts: Sequence[str], model, processor, batch_size: int = 64) -> torch.Tensor:
    """images (N, H, W, 3) uint8, N prompts -> (N,) float64 cosine similarities of their CLIP embeddings."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images and {len(prompts)} prompts; CLIP score pairs them one to one")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
    device = model.device
    max_length = model.config.text_config.max_position_embeddings
    cosines = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        pixels = processor(images=list(batch), return_tensors="pt")["pixel_values"].to(device)  # (B, 3, S, S)
        text = processor(text=list(prompts[start : start + batch_size]), return_tensors="pt", padding=True,
                         truncation=True, max_length=max_length)
        e_image = _features(model.get_image_features(pixel_values=pixels)).double()  # (B, P)
        e_text = _features(model.get_text_features(input_ids=text["input_ids"].to(device),
                                                   attention_mask=text["attention_mask"].to(device))).double()
        cosines.append(torch.nn.functional.cosine_similarity(e_image, e_text, dim=-1).cpu())
    return torch.cat(cosines)


def clip_score(images: np.ndarray, prompts: Sequence[str], model, processor, batch_size: int = 64) -> float:
    """torchmetrics' CLIPScore: max(100 · mean cosine, 0)."""
    return max(100.0 * float(clip_cosines(images, prompts, model, processor, batch_size).mean()), 0.0)


def sample_set_clip_score(folder, clip=CLIP_MODEL, batch_size: int = 64, device=None) -> float:
    """CLIP score of a `sample.py --prompts` set: OUT/samples.npz against OUT/prompts.txt (sample i, prompt i).
    clip: a CLIP folder / cached hub name, or a loaded (CLIPModel, CLIPProcessor)."""
    folder = Path(folder)
    npz, listing = folder / "samples.npz", folder / "prompts.txt"
    if not npz.is_file() or not listing.is_file():
        raise FileNotFoundError(f"{folder} is no finished prompt sample set (needs samples.npz and prompts.txt: "
                                "`sample.py MODEL --prompts FILE --num-samples N --out DIR`)")
    prompts = listing.read_text(encoding="utf-8").splitlines()
    with np.load(npz) as data:
        images = data["arr_0"]
    if isinstance(clip, tuple):
        model, processor = clip
    else:
        model, processor = load_clip(clip, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return clip_score(images, prompts, model, processor, batch_size)


def main(argv: Optional[Sequence[str]] = None) -> float:
    parser = argparse.ArgumentParser(prog="python -m uvic.clip_score", description=__doc__.split("\n")[0])
    parser.add_argument("samples", metavar="SAMPLE_SET", help="folder of `sample.py --prompts ... --num-samples N`")
    parser.add_argument("--clip", default=CLIP_MODEL, help="CLIP model: a local folder or a cached hub name")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    args = parser.parse_args(argv)
    try:
        score = sample_set_clip_score(args.samples, args.clip, args.batch_size, args.device)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    print(f"CLIP score {score:.3f} ({args.samples}, {args.clip})")
    return score


if __name__ == "__main__":
    main()
