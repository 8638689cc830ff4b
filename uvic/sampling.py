"""The command line of sample.py and `uvic-sample`: a grid or a sample set from any model path (uvic.loading),
every option checked before the model is loaded, on one process or several (accelerate launch / torchrun).

Drawing and grids are uvic.drawing; the sample-set format (shards, manifest, resume) is uvic.sample_sets. See `main`
and `python sample.py --help`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from .cli import add_debug_option, command, progress_bars
from .config import TIMESTEP_SPACINGS, sampler_steps_problem
from .drawing import CLASS_MODES, check_prompts, resolve_classes, sample_grid
from .latents import attach_vae
from .loading import (MODEL_KINDS, PUBLISHED_CHECKPOINTS, REFERENCE_CONFIGS, load_pipeline, published_reference_config,
                      reference_sample_settings)
from .pipeline import SCHEDULERS
from .runs import RunDir
from .sample_sets import FORMATS, SingleProcess, generate_samples
from .text import read_prompts


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Sample a grid or a large sample set (e.g. 50K for FID) from a U-ViT / U-ViC.",
        epilog=(
            "examples:\n"
            "  python sample.py runs/digits_uvic/final --grid 8\n"
            "  python sample.py runs/cifar10_uvic_s2 --checkpoint latest --num-samples 50000 --out samples/c10\n"
            "  accelerate launch sample.py runs/in256_uvit_l2/final --num-samples 50000 --guidance 1.4 --out s/in256\n"
            "  torchrun --nproc_per_node 2 sample.py MODEL --num-samples 1000 --out s/x --device cpu   (CPU ranks)\n"
            "guidance: eps = uncond + w (cond - uncond); w = 1 is off, U-ViT's 'scale 0.4' is w = 1.4."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("model", metavar="MODEL", help=f"what to sample from: {MODEL_KINDS}")
    add("--checkpoint", help="run directory: 'latest' or a step number instead of final/")
    add("--ema", action=argparse.BooleanOptionalAction, default=True, help="EMA weights of a checkpoint (default on)")
    add("--reference-config", help=f"a published U-ViT .pth: its {REFERENCE_CONFIGS}*.yaml (architecture, schedule, "
        "VAE, and the paper's sampler, steps and guidance as defaults); picked by the file name for "
        f"{', '.join(PUBLISHED_CHECKPOINTS)}")
    add("--vae", help="AutoencoderKL folder (or latents extraction folder) that decodes a latent model")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--grid", type=int, metavar="N", help="one PNG grid, N per row: a row per class (conditional)")
    what.add_argument("--num-samples", type=int, metavar="N", help="a set of N samples in --out (resumable)")
    add("--out", help="grid: a .png file or a folder; set: the folder (required)")
    add("--format", nargs="+", default=["npz"], choices=FORMATS, help="set: npz (arr_0 NHWC uint8 + labels) and/or png")
    add("--shard-size", type=int, help="set: samples per shard, the unit of resume (default: the existing "
        "set's, else min(1000, ceil(N/10)))")
    add("--scheduler", help=f"sampler: {', '.join(SCHEDULERS)}, or 'saved' (the pipeline's own); default dpm++2m, "
        "or the reference config's (paper samplers: uvic.diffusion.PAPER_SAMPLERS)")
    add("--steps", type=int, help="number of sampling steps (default 50, or the reference config's)")
    add("--timestep-spacing", choices=TIMESTEP_SPACINGS, help="override the sampler's timestep spacing")
    add("--guidance", type=float, help="classifier-free guidance w (1 = off; U-ViT's 0.4 is 1.4); default 1, "
        "or the reference config's")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--class-labels", type=int, nargs="+", metavar="Y", help="labels taken in turn (grid: the rows)")
    labels.add_argument("--classes", choices=CLASS_MODES, help="set: uniform (i.i.d., default) or balanced (index mod K)")
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--prompt", action="append", metavar="TEXT", help="text-to-image: a prompt (repeat for more; "
                      "grid: a row each)")
    text.add_argument("--prompts", metavar="FILE", help="text-to-image: prompts, one per line (.jsonl: \"caption\"); "
                      "grid: a row each; set: sample i from prompt i, in order")
    add("--text-encoder", metavar="DIR", help="text-to-image: CLIP tokenizer + text model folder for a pipeline "
        "saved without them")
    add("--seed", type=int, default=0, help="sample i is drawn from a generator seeded from (seed, i)")
    add("--batch-size", type=int, default=64, help="samples per forward pass (per process)")
    add("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available; accelerate launch: one per process)")
    add("--dtype", choices=DTYPES, default="fp32", help="model weights and activations")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--no-progress", dest="progress", action="store_false", help="no progress bars (diffusers' loading too)")
    add_debug_option(parser)
    return parser


def _grid_path(args) -> Path:
    """--out (a .png, or a folder), else MODEL's run directory samples/ folder, else the working directory."""
    name = f"grid_{args.scheduler}_{args.steps}steps_w{args.guidance:g}_seed{args.seed}.png"
    if args.out:
        return Path(args.out) if args.out.lower().endswith(".png") else Path(args.out) / name
    run = RunDir.find(args.model) if Path(args.model).is_dir() else None
    if run is not None:
        return run.path / "samples" / name
    return Path(name)


def run(args) -> Path:
    """sample.py with parsed arguments; returns the grid, samples.npz or png folder."""
    # Everything that can be checked without the model is checked first.
    if args.reference_config is None and Path(args.model).is_file():
        args.reference_config = str(published_reference_config(args.model))
        print(f"sample.py: {Path(args.model).name} is a published U-ViT checkpoint: reference config "
              f"{args.reference_config}", file=sys.stderr)
    paper = reference_sample_settings(args.reference_config) if args.reference_config else {}
    if args.scheduler is None:  # the paper's sampler is the reference pipeline's own
        args.scheduler = "saved" if paper.get("scheduler") else "dpm++2m"
    if args.steps is None:
        args.steps = int(paper.get("steps", 50))
    if args.guidance is None:
        args.guidance = float(paper.get("guidance", 1.0))
    if args.scheduler != "saved" and args.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {args.scheduler!r}; valid: {', '.join(SCHEDULERS)}, saved")
    if args.num_samples is not None and not args.out:
        raise ValueError("--num-samples needs --out FOLDER")
    if args.grid is not None and args.classes is not None:
        raise ValueError("--classes applies to sample sets; a grid takes --class-labels (its rows)")
    for name in ("grid", "num_samples", "steps", "batch_size", "shard_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.seed < 0:
        raise ValueError(f"--seed must be non-negative, got {args.seed}")
    prompts = read_prompts(args.prompts) if args.prompts else args.prompt
    if prompts is not None and (args.class_labels is not None or args.classes is not None):
        raise ValueError("--prompt/--prompts and --class-labels/--classes are mutually exclusive")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    state = _process_state(device)
    if state.num_processes > 1:
        device = state.device
    pipe = load_pipeline(args.model, checkpoint=args.checkpoint, ema=args.ema, reference_config=args.reference_config,
                         vae=args.vae)
    steps_problem = sampler_steps_problem(args.scheduler if args.scheduler != "saved" else type(pipe.scheduler).__name__,
                                          args.steps, pipe.scheduler.config.num_train_timesteps)
    if steps_problem:
        raise ValueError(f"--steps {args.steps}: {steps_problem}")
    if args.vae and not args.reference_config:
        attach_vae(pipe, args.vae)
    if args.text_encoder:
        pipe.attach_text_encoder(args.text_encoder)
    check_prompts(pipe, prompts, args.guidance)
    scheduler = None if args.scheduler == "saved" else args.scheduler
    classes = args.class_labels if args.class_labels is not None else (args.classes or "uniform")
    # labels and guidance against the model, before the weights move or anything is drawn
    resolved = resolve_classes(classes, pipe.num_real_classes)
    pipe.check_inputs(1, None if resolved is None else 0, args.guidance)
    pipe.to(device)
    for module in (pipe.transformer, pipe.vae):
        if module is not None and module.dtype != DTYPES[args.dtype]:
            torch.nn.Module.to(module, DTYPES[args.dtype])  # ModelMixin.to warns about an empty fp32-module list
    if args.compile:
        pipe.transformer.compile()

    common = dict(seed=args.seed, scheduler=scheduler, steps=args.steps, guidance=args.guidance,
                  batch_size=args.batch_size, timestep_spacing=args.timestep_spacing, progress=args.progress)
    if args.grid is not None:
        path = _grid_path(args)
        if state.is_main_process:
            sample_grid(pipe, path, per_row=args.grid, class_labels=args.class_labels, prompts=prompts, **common)
        state.wait_for_everyone()
    else:
        path = generate_samples(pipe, args.out, num_samples=args.num_samples, classes=classes, formats=args.format,
                                accelerator=state, shard_size=args.shard_size, prompts=prompts, **common)
    if state.is_main_process:
        print(path)
    return path


def _process_state(device: str):
    """accelerate's PartialState under `accelerate launch` / torchrun (several processes), else one process."""
    launched = any(int(os.environ.get(k, "1")) > 1 for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    if not launched:
        return SingleProcess()
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu")


@command("sample.py")
def main(argv: Optional[Sequence[str]] = None) -> Path:
    """Entry point of sample.py and `uvic-sample`. Bad input ends with one message and exit status 2 (uvic.cli)."""
    args = build_parser().parse_args(argv)
    with progress_bars(args.progress):
        return run(args)
