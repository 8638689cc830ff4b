"""Caption latents for text-to-image training: image latents plus the CLIP features of every caption.

U-ViT's MS-COCO recipe (scripts/extract_mscoco_feature.py): each image is center-cropped and encoded
once by the Stable Diffusion VAE (its moments, as uvic.latents), each of its captions (5 or more for
MS-COCO) once by CLIP ViT-L/14's text model (last hidden state, 77 tokens); training draws one
caption per image per step and drops it to the empty prompt's features with probability p_uncond.

    python -m uvic.latents extract --data COCO/train2014 --annotations COCO/annotations/captions_train2014.json \\
        --out data/mscoco256_latents [--text-encoder CLIP_DIR] [--vae VAE_DIR]
    python -m uvic.latents extract --data FOLDER --out OUT     (FOLDER/captions.jsonl: {"file_name", "caption"} lines)

An extraction folder holds the class path's layout (meta.json, vae/, shard_*.safetensors with the
image moments) and, for the captions:

    captions.json              text_encoder, max_length, context_dim, num_captions, dtype, files_sha1
    captions.jsonl             {"file_name", "captions": [...]} per image, in latent order
    empty_context.safetensors  empty_context (max_length, context_dim) float32: the unconditional context
    text_encoder/, tokenizer/  CLIPTextModel / CLIPTokenizer copies (sampling needs no hub)
    text_00000.safetensors     context (M, max_length, context_dim) (all captions of the shard's images,
                               image by image), first, count (n,) int64: image i's captions are
                               context[first[i] : first[i] + count[i]]; index (n,) int64

Shards are written under a temporary name and renamed when complete: a rerun encodes only the missing ones.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .files import atomic_path, atomic_save_file, atomic_write
from .images import read_captions
from .latents import STORAGE_DTYPES, LatentDataset, extract_latents, shards_for_process
from .text import CLIP_TEXT_ENCODER, MAX_LENGTH, empty_context, encode_prompts, load_text_encoder

CAPTIONS_META = "captions.json"
CAPTIONS_LIST = "captions.jsonl"
EMPTY_CONTEXT = "empty_context.safetensors"
TEXT_ENCODER_DIR, TOKENIZER_DIR = "text_encoder", "tokenizer"


def text_shard_name(shard: int) -> str:
    return f"text_{shard:05d}.safetensors"


def is_caption_latents(folder: Union[str, Path]) -> bool:
    """True for an extraction folder made from image-caption data."""
    return (Path(folder) / CAPTIONS_META).is_file()


@torch.no_grad()
def extract_caption_latents(
    data: Union[str, Path],
    out: Union[str, Path],
    *,
    annotations: Optional[Union[str, Path]] = None,
    text_encoder: str = CLIP_TEXT_ENCODER,
    max_length: int = MAX_LENGTH,
    text_batch_size: int = 256,
    dtype: str = "float16",
    device: Optional[Union[str, torch.device]] = None,
    process_index: int = 0,
    num_processes: int = 1,
    shard_size: int = 10_000,
    **latent_kwargs,
) -> Path:
    """Latents of the captioned images of `data` (uvic.latents.extract_latents) and the text features of
    all their captions, in shards of `shard_size` images (see the module docstring).

    annotations: an MS-COCO captions json; else data/captions.jsonl. text_encoder: a local CLIP folder
    or a cached hub name (nothing is downloaded). latent_kwargs: resolution, vae, flip, batch_size, ...
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    if text_batch_size < 1:
        raise ValueError(f"text_batch_size must be at least 1, got {text_batch_size}")
    files, captions = read_captions(data, annotations)  # bad captions fail before any work
    if not files:
        raise ValueError(f"no captioned images in {data}")
    tokenizer, encoder = load_text_encoder(text_encoder)  # missing weights: one message, before the VAE work
    out = Path(out)
    meta = {
        "format": "uvic-caption-latents/1",
        "text_encoder": str(Path(text_encoder).resolve()) if Path(text_encoder).is_dir() else text_encoder,
        "max_length": int(max_length),
        "context_dim": int(encoder.config.hidden_size),
        "num_captions": sum(len(c) for c in captions),
        "dtype": dtype,
        "files_sha1": hashlib.sha1("\n".join(files).encode()).hexdigest(),
        "captions_sha1": hashlib.sha1(json.dumps(captions).encode()).hexdigest(),
    }
    if (out / CAPTIONS_META).exists():  # resuming: the same command, or a clear refusal
        old = json.loads((out / CAPTIONS_META).read_text())
        changed = [k for k in meta if k != "text_encoder" and old.get(k) != meta[k]]
        if changed:
            k = changed[0]
            raise ValueError(f"{str(out)!r} holds caption features made with {k}={old.get(k)!r}, this run has "
                             f"{k}={meta[k]!r}; use another --out or the same settings to resume")

    extract_latents(data, out, images=(files, [-1] * len(files), []), dtype=dtype, device=device,
                    process_index=process_index, num_processes=num_processes, shard_size=shard_size,
                    fail_on_corrupt=True, **latent_kwargs)  # text shards are per file: no image may be skipped
    if process_index == 0:
        _write_caption_files(out, meta, files, captions, tokenizer, encoder)

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    num_shards = -(-len(files) // shard_size)  # as extract_latents (other ranks may not see meta.json yet)
    for s in shards_for_process(num_shards, process_index, num_processes):
        if not (out / text_shard_name(s)).exists():
            lo, hi = s * shard_size, min((s + 1) * shard_size, len(files))
            _write_text_shard(out, s, lo, captions[lo:hi], tokenizer, encoder.to(device), max_length=max_length,
                              batch_size=text_batch_size, store=STORAGE_DTYPES[dtype])
    return out


def _write_text_shard(out: Path, shard: int, start: int, captions: Sequence[List[str]], tokenizer, encoder, *,
                      max_length: int, batch_size: int, store: torch.dtype) -> None:
    """text_XXXXX.safetensors of the images start, start + 1, ...: the features of all their captions, image by
    image, and where each image's begin (first) and how many it has (count)."""
    texts = [c for image_captions in captions for c in image_captions]
    counts = torch.tensor([len(c) for c in captions], dtype=torch.long)  # (n,)
    context = torch.cat([
        encode_prompts(texts[j : j + batch_size], tokenizer, encoder, max_length).to("cpu", store)
        for j in range(0, len(texts), batch_size)
    ])  # (M, max_length, D)
    first = torch.cumsum(counts, 0) - counts
    index = torch.arange(start, start + len(captions))
    tensors = {"context": context, "first": first, "count": counts, "index": index}
    atomic_save_file(out / text_shard_name(shard), tensors, {"start": str(start), "count": str(len(captions))})


def _write_caption_files(out: Path, meta: dict, files: Sequence[str], captions: Sequence[List[str]], tokenizer,
                         encoder):
    """captions.json, captions.jsonl, empty_context and the text encoder's copy (process 0)."""
    if not (out / TEXT_ENCODER_DIR / "config.json").exists():
        with atomic_path(out / TEXT_ENCODER_DIR) as tmp:
            encoder.save_pretrained(tmp)
    if not (out / TOKENIZER_DIR).is_dir():
        with atomic_path(out / TOKENIZER_DIR) as tmp:
            tokenizer.save_pretrained(tmp)
    empty = empty_context(tokenizer, encoder, meta["max_length"]).float().cpu()  # (L, D)
    atomic_save_file(out / EMPTY_CONTEXT, {"empty_context": empty})
    lines = "".join(json.dumps({"file_name": f, "captions": c}) + "\n" for f, c in zip(files, captions))
    atomic_write(out / CAPTIONS_LIST, lambda f: f.write(lines.encode()))
    text = json.dumps(meta, indent=1)
    atomic_write(out / CAPTIONS_META, lambda f: f.write(text.encode()))


def run_caption_extract(args, accelerator) -> Path:
    """`python -m uvic.latents extract` on image-caption data (parsed arguments of uvic.latents_cli, an accelerate
    Accelerator)."""
    out = extract_caption_latents(
        args.data, args.out, annotations=args.annotations, text_encoder=args.text_encoder or CLIP_TEXT_ENCODER,
        resolution=args.resolution, vae=args.vae, flip=args.flip, batch_size=args.batch_size,
        shard_size=args.shard_size, num_workers=args.num_workers, dtype=args.dtype,
        vae_dtype=getattr(torch, args.vae_dtype), device=accelerator.device,
        process_index=accelerator.process_index, num_processes=accelerator.num_processes,
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        dataset = CaptionLatentDataset(out)  # checks that every shard is there
        print(f"{len(dataset)} latents {dataset.latent_shape} with {dataset.text_meta['num_captions']} captions "
              f"({dataset.num_context_tokens} x {dataset.context_dim} text tokens) in {out}")
    return out


class CaptionLatentDataset(LatentDataset):
    """Latents with captions: item i = (z (C, h, w) float32, context (L, D) float32), z drawn as in
    LatentDataset and the context one of image i's captions, picked at random (torch's RNG, so the
    trainer's seeding fixes the draw). Exposes empty_context (L, D), context_dim, num_context_tokens,
    text_encoder_path (the copy of the extraction's CLIP text model, or None)."""

    def __init__(self, path: Union[str, Path], scale_factor: Optional[float] = None):
        super().__init__(path, scale_factor)
        if not is_caption_latents(self.path):
            raise FileNotFoundError(f"{str(self.path)!r} has no {CAPTIONS_META}: not caption latents (extract "
                                    "image-caption data with `python -m uvic.latents extract --annotations ...`)")
        self.text_meta = json.loads((self.path / CAPTIONS_META).read_text())
        missing = [text_shard_name(s) for s in range(self.meta["num_shards"])
                   if not (self.path / text_shard_name(s)).exists()]
        if missing:
            raise FileNotFoundError(f"{str(self.path)!r} is incomplete: {len(missing)} caption shards missing (first: "
                                    f"{missing[0]}); rerun the same `python -m uvic.latents extract` command")
        self.empty_context = load_file(str(self.path / EMPTY_CONTEXT))["empty_context"]  # (L, D)
        self.num_context_tokens, self.context_dim = self.empty_context.shape
        has_copy = (self.path / TEXT_ENCODER_DIR).is_dir() and (self.path / TOKENIZER_DIR).is_dir()
        self.text_encoder_path = str(self.path) if has_copy else None
        self._text_files = {}

    def __getstate__(self):  # open file handles stay in their process
        return {**super().__getstate__(), "_text_files": {}}

    def contexts(self, index: int) -> torch.Tensor:
        """All caption features of image `index`: (K, L, D) float32."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        shard, row = divmod(index, self.shard_size)
        if shard not in self._text_files:
            self._text_files[shard] = safe_open(str(self.path / text_shard_name(shard)), framework="pt")
        f = self._text_files[shard]
        first = int(f.get_slice("first")[row : row + 1][0])
        count = int(f.get_slice("count")[row : row + 1][0])
        return f.get_slice("context")[first : first + count].float()

    def captions(self) -> List[List[str]]:
        """The captions of every image, in latent order."""
        lines = (self.path / CAPTIONS_LIST).read_text().splitlines()
        return [json.loads(line)["captions"] for line in lines if line.strip()]

    def __getitem__(self, index: int):
        z, _ = super().__getitem__(index)
        contexts = self.contexts(index)  # (K, L, D)
        k = int(torch.randint(contexts.shape[0], ())) if contexts.shape[0] > 1 else 0
        return z, contexts[k]


def drop_context(context: torch.Tensor, p_uncond: float, empty: torch.Tensor) -> torch.Tensor:
    """Replace each sample's context (B, L, D) by the empty prompt's (L, D) with probability p_uncond."""
    if p_uncond <= 0:
        return context
    drop = torch.rand(context.shape[0], device=context.device) < p_uncond  # (B,)
    return torch.where(drop[:, None, None], empty.to(context).expand_as(context), context)


# ---------------------------------------------------------------------- FID caption draws
def draw_captions(data, annotations=None, num: int = 30_000, seed: int = 0) -> List[tuple]:
    """U-ViT's FID-30K prompts: `num` images drawn at random without replacement (fixed by `seed`) and one
    of each image's captions at random -> [(file_name, caption)], in draw order."""
    files, captions = read_captions(data, annotations)
    if not 0 < num <= len(files):
        raise ValueError(f"--num must lie in 1..{len(files)} (the captioned images of {data}), got {num}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(files))[:num]
    return [(files[i], " ".join(captions[i][int(rng.integers(len(captions[i])))].split())) for i in order]


def main(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(prog="python -m uvic.caption_latents",
                                     description="Caption draws for text-to-image FID (U-ViT's FID-30K protocol).")
    sub = parser.add_subparsers(dest="command", required=True)
    dr = sub.add_parser("draw", help="NUM captions of distinct random images, one per line (sample.py --prompts)")
    dr.add_argument("--data", required=True, help="image folder (MS-COCO val2014)")
    dr.add_argument("--annotations", help="MS-COCO captions json (annotations/captions_val2014.json); "
                    "else DATA/captions.jsonl")
    dr.add_argument("--num", type=int, default=30_000, help="number of captions (one sample each)")
    dr.add_argument("--seed", type=int, default=0, help="seed of the image and caption draw")
    dr.add_argument("--out", required=True, help="a .txt (one caption per line) or .jsonl (file_name, caption)")
    args = parser.parse_args(argv)
    try:
        rows = draw_captions(args.data, args.annotations, args.num, args.seed)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    if args.out.endswith(".jsonl"):
        text = "".join(json.dumps({"file_name": f, "caption": c}) + "\n" for f, c in rows)
    else:
        text = "".join(c + "\n" for _, c in rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(args.out), lambda f: f.write(text.encode()))
    print(f"{len(rows)} captions (seed {args.seed}) in {args.out}")


if __name__ == "__main__":
    main()
