"""The text encoder of text-to-image U-ViT: CLIP ViT-L/14's text model through transformers.

As U-ViT's FrozenCLIPEmbedder (libs/clip.py): prompts are tokenized with padding and truncation to
77 tokens and encoded to the last hidden state (B, 77, 768); the unconditional context for
classifier-free guidance is the empty prompt's features (U-ViT's `empty_context`).
"""

from __future__ import annotations

import os
from typing import List, Sequence

import torch

CLIP_TEXT_ENCODER = "openai/clip-vit-large-patch14"  # the CLIP used by U-ViT's MS-COCO models
MAX_LENGTH = 77


def load_text_encoder(name_or_path: str = CLIP_TEXT_ENCODER, device="cpu", dtype=torch.float32):
    """(CLIPTokenizer, CLIPTextModel in eval mode, frozen) from a local folder or a hub name already cached.
    A folder with tokenizer/ and text_encoder/ subfolders (a saved pipeline, a caption-latents folder)
    works too. Nothing is downloaded here; missing weights end with one message saying what to fetch and where."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer_path = encoder_path = name_or_path
    if os.path.isdir(os.path.join(name_or_path, "text_encoder")) and os.path.isdir(os.path.join(name_or_path, "tokenizer")):
        tokenizer_path, encoder_path = os.path.join(name_or_path, "tokenizer"), os.path.join(name_or_path, "text_encoder")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
        encoder = CLIPTextModel.from_pretrained(encoder_path, local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError) as err:
        where = name_or_path if os.path.isdir(name_or_path) else "the Hugging Face cache (HF_HOME)"
        raise FileNotFoundError(
            f"CLIP text encoder {name_or_path!r} not found in {where}: download it once with "
            f"`huggingface-cli download {CLIP_TEXT_ENCODER} --local-dir DIR` (tokenizer files + text-model "
            f"weights) and pass DIR as the text encoder (--text-encoder DIR). ({type(err).__name__})"
        ) from None
    encoder = encoder.to(device).eval().requires_grad_(False)
    return tokenizer, encoder


@torch.no_grad()
def encode_prompts(prompts: Sequence[str], tokenizer, text_encoder, max_length: int = MAX_LENGTH) -> torch.Tensor:
    """prompts (B strings) -> last hidden state (B, max_length, hidden), padded/truncated to max_length."""
    if isinstance(prompts, str):
        prompts = [prompts]
    tokens = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length,
                       return_tensors="pt")
    ids = tokens["input_ids"].to(text_encoder.device)  # (B, max_length)
    return text_encoder(input_ids=ids).last_hidden_state  # (B, max_length, hidden)


def empty_context(tokenizer, text_encoder, max_length: int = MAX_LENGTH) -> torch.Tensor:
    """The empty prompt's features (max_length, hidden): the unconditional context for guidance."""
    return encode_prompts([""], tokenizer, text_encoder, max_length)[0]


def read_prompts(path) -> List[str]:
    """Prompts of a text file, one per line (blank lines skipped); a .jsonl file gives each line's "caption"
    (or "prompt"). Fails with one message on a missing or empty file."""
    import json

    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file {str(path)!r} not found (one prompt per line)")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if str(path).endswith(".jsonl"):
        rows = [json.loads(line) for line in lines]
        lines = [str(row.get("caption", row.get("prompt", ""))).strip() for row in rows]
    if not lines:
        raise ValueError(f"prompts file {str(path)!r} has no prompts")
    return lines
