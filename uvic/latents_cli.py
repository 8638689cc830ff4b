"""The command line of `python -m uvic.latents`: extract (class-labelled or captioned images) and crops.

It sits above uvic.latents and uvic.caption_latents, so extraction dispatches to either without a cycle:
a data folder with captions.jsonl, or --annotations, makes caption latents.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import torch

from .caption_latents import run_caption_extract
from .cli import add_debug_option, command
from .images import export_crops
from .latents import STORAGE_DTYPES, LatentDataset, extract_latents
from .vae import DEFAULT_VAE

DESCRIPTION = "Autoencoder latents for latent diffusion: extraction to shards, FID reference crops."


@command("python -m uvic.latents")
def main(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(prog="python -m uvic.latents", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("extract", help="encode an ImageNet-layout folder into latent-moment shards")
    ex.add_argument("--data", required=True, help="image folder, one subfolder per class")
    ex.add_argument("--out", required=True, help="output folder (rerun to resume)")
    ex.add_argument("--resolution", type=int, default=256, help="center-crop size in pixels (256 -> 4x32x32 latents)")
    ex.add_argument("--vae", default=DEFAULT_VAE, help="AutoencoderKL hub id or local folder")
    ex.add_argument("--flip", action="store_true", help="also store the moments of the mirrored image")
    ex.add_argument("--batch-size", type=int, default=64, help="images per encoder call, per process")
    ex.add_argument("--shard-size", type=int, default=10_000, help="images per shard (unit of resume)")
    ex.add_argument("--num-workers", type=int, default=4, help="data-loading processes per GPU")
    ex.add_argument("--dtype", default="float16", choices=sorted(STORAGE_DTYPES), help="storage type of the moments")
    ex.add_argument("--vae-dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="encoder precision")
    ex.add_argument("--fail-on-corrupt", action="store_true",
                    help="stop at the first unreadable image (default: skip it, count it, warn once)")
    ex.add_argument("--annotations", help="image-caption data: an MS-COCO captions json (annotations/captions_train2014"
                    ".json); without it, DATA/captions.jsonl makes the data captioned (uvic.caption_latents)")
    ex.add_argument("--text-encoder", default=None, help="captioned data: CLIP text model, a local folder or a cached "
                    "hub name (default openai/clip-vit-large-patch14)")
    cr = sub.add_parser("crops", help="center-cropped PNGs of an image folder (FID reference images)")
    cr.add_argument("--data", required=True, help="image folder, one subfolder per class")
    cr.add_argument("--out", required=True, help="output folder of PNGs (rerun to resume)")
    cr.add_argument("--resolution", type=int, default=256, help="crop size in pixels")
    cr.add_argument("--limit", type=int, help="a random subset of this many images (e.g. 50000)")
    cr.add_argument("--seed", type=int, default=0, help="seed of the --limit subset")
    cr.add_argument("--num-workers", type=int, default=4, help="data-loading processes")
    for p in (ex, cr):
        add_debug_option(p)
    run(parser.parse_args(argv))  # bad input, missing files, VAE not found offline: one message, status 2


def run(args: argparse.Namespace):
    """The command of parsed `python -m uvic.latents` arguments."""
    if args.command == "crops":
        out = export_crops(args.data, args.out, resolution=args.resolution, limit=args.limit, seed=args.seed,
                           num_workers=args.num_workers)
        print(f"{len(list(out.glob('*.png')))} center crops in {out}")
        return

    from accelerate import Accelerator  # accelerate starts torch.distributed: only extraction needs it

    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # cpu=True: several CPU ranks (gloo) under torchrun
    if args.annotations or (Path(args.data) / "captions.jsonl").is_file():  # image-caption data
        return run_caption_extract(args, accelerator)
    out = extract_latents(
        args.data, args.out, resolution=args.resolution, vae=args.vae, flip=args.flip,
        batch_size=args.batch_size, shard_size=args.shard_size, num_workers=args.num_workers,
        dtype=args.dtype, vae_dtype=getattr(torch, args.vae_dtype), device=accelerator.device,
        process_index=accelerator.process_index, num_processes=accelerator.num_processes,
        fail_on_corrupt=args.fail_on_corrupt,
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        dataset = LatentDataset(out)  # checks that every shard is there
        skipped = f" ({dataset.skipped} unreadable images skipped)" if dataset.skipped else ""
        print(f"{len(dataset)} latents {dataset.latent_shape} of {dataset.num_classes} classes in {out}{skipped}")
