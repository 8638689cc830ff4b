"""Sampling throughput (images/s) per scheduler, U-ViT (softmax) and U-ViC (Cog) side by side.

    python benchmarks/sample_throughput.py                               # the digits demo model, CPU
    python benchmarks/sample_throughput.py --config configs/imagenet256_uvit_l2.yaml --device cuda \\
        --dtype bf16 --batch-size 64 --guidance 1.4 --schedulers dpm++2m ddim

Both models share one set of weights (Cog attention has no parameters of its own) and run in
alternating order, so the ratio is measured under the same conditions. Images/s counts whole
samples: `--steps` sampler steps, model evaluations per image as printed (NFE; Heun takes two per
step, guidance doubles the batch). Latent models are timed without VAE decoding.
"""

from __future__ import annotations

import argparse
import time

import torch

from uvic.config import load_config
from uvic.diffusion import build_scheduler
from uvic.drawing import index_generators
from uvic.model import UViT
from uvic.pipeline import SCHEDULERS, UViCPipeline, make_scheduler
from uvic.sampling import DTYPES


def build_models(cfg, num_classes: int, device, dtype):
    """{"softmax": U-ViT, "cog": U-ViC} with the same weights."""
    kwargs = {k: v for k, v in cfg.model.items() if k not in ("preset", "gradient_checkpointing", "attention_type")}
    kwargs["num_classes"] = num_classes
    torch.manual_seed(0)
    uvit = UViT(**kwargs, attention_type="softmax")
    uvic = UViT(**kwargs, attention_type="cog")
    uvic.load_state_dict(uvit.state_dict())
    # nn.Module.to: ModelMixin.to warns about an empty list of float32 modules
    return {name: torch.nn.Module.to(m.eval(), device=device, dtype=dtype) for name, m in (("softmax", uvit), ("cog", uvic))}


def time_call(pipe, args, device) -> float:
    labels = torch.arange(args.batch_size) % (args.num_classes - 1) if args.num_classes > 0 else None
    generators = index_generators(0, range(args.batch_size))
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    pipe(batch_size=args.batch_size, num_inference_steps=args.steps, class_labels=labels,
         guidance_scale=args.guidance, generator=generators, output_type="pt")
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/digits_uvic.yaml", help="uvic config: its model and diffusion sections")
    parser.add_argument("--num-classes", type=int, default=11, help="label table incl. the null class (0: unconditional)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=1.0, help="w; != 1 runs cond and null halves in one batch")
    parser.add_argument("--schedulers", nargs="+", default=list(SCHEDULERS), choices=list(SCHEDULERS))
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per scheduler and model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    cfg = load_config(args.config)
    base = build_scheduler(cfg.diffusion)
    models = build_models(cfg, args.num_classes, device, DTYPES[args.dtype])
    m = cfg.model
    print(f"# {args.config}: {m.sample_size}x{m.sample_size}x{m.in_channels}, patch {m.patch_size}, "
          f"embed {m.embed_dim}, depth {m.depth}, heads {m.num_heads}, num_classes {args.num_classes}; "
          f"batch {args.batch_size}, {args.steps} steps, guidance {args.guidance:g}, {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads, {args.repeats} repeats")
    pipes = {}
    for name in args.schedulers:
        for attention, model in models.items():
            pipe = UViCPipeline(transformer=model, scheduler=make_scheduler(name, base.config))
            pipe.set_progress_bar_config(disable=True)
            pipes[name, attention] = pipe
    for attention in models:  # warm-up (allocator, kernels)
        warm = pipes[args.schedulers[0], attention]
        warm(batch_size=args.batch_size, num_inference_steps=2, guidance_scale=args.guidance, output_type="pt",
             class_labels=0 if args.num_classes > 0 else None)

    seconds = {key: 0.0 for key in pipes}
    for r in range(args.repeats):
        for name in args.schedulers:
            order = ["softmax", "cog"] if (r + args.schedulers.index(name)) % 2 == 0 else ["cog", "softmax"]
            for attention in order:
                seconds[name, attention] += time_call(pipes[name, attention], args, device)

    images = args.batch_size * args.repeats
    print("| scheduler | NFE / image | U-ViT img/s | U-ViC img/s | U-ViC / U-ViT |")
    print("|---|---:|---:|---:|---:|")
    for name in args.schedulers:
        scheduler = pipes[name, "softmax"].scheduler
        scheduler.set_timesteps(args.steps)
        nfe = len(scheduler.timesteps) * (2 if args.guidance != 1.0 and args.num_classes > 0 else 1)
        uvit, uvic = images / seconds[name, "softmax"], images / seconds[name, "cog"]
        print(f"| {name} | {nfe} | {uvit:.1f} | {uvic:.1f} | {uvic / uvit:.2f} |")


if __name__ == "__main__":
    main()
