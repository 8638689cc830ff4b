"""Training-step throughput of U-ViT and U-ViC side by side: images/s, peak memory and their ratio.

    python benchmarks/train_throughput.py --config configs/cifar10_uvit_s2.yaml --batch-size 8 --steps 5
    python benchmarks/train_throughput.py --config configs/digits_uvic.yaml train.mixed_precision=bf16

One training step = forward, diffusion loss, backward, AdamW step, as uvic.trainer runs it (no data
loading: random images of the config's shape). Both variants are built from the same config and
differ only in model.attention_type; their timed rounds alternate (A B A B ...) so a busy machine
slows both alike, and the median round is reported. Peak memory: CUDA max_memory_allocated on a GPU;
on the CPU, the growth of the process's peak RSS over its size before the variant was built, measured
in a fresh child process per variant.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from uvic.config import load_config, model_kwargs  # noqa: E402
from uvic.diffusion import build_scheduler, diffusion_loss  # noqa: E402
from uvic.model import UViT  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

VARIANTS = ("softmax", "cog")  # U-ViT, U-ViC


def build(cfg, attention_type: str, device: torch.device):
    kwargs = model_kwargs(cfg)
    kwargs["attention_type"] = attention_type
    if cfg.data.conditional and kwargs["num_classes"] <= 0:
        kwargs["num_classes"] = 11
    torch.manual_seed(0)
    model = UViT(**kwargs).to(device)
    t = cfg.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    return model, optimizer


def train_step(model, optimizer, scheduler, images, labels, dtype):
    with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
        loss = diffusion_loss(model, scheduler, images, labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def dtype_of(mixed_precision: str):
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def time_rounds(cfg, batch: int, steps: int, warmup: int, rounds: int, device: torch.device) -> dict:
    """All variants in this process, rounds alternating; returns images/s per variant (median round)."""
    scheduler = build_scheduler(cfg.diffusion)
    m, dtype = cfg.model, dtype_of(cfg.train.mixed_precision)
    images = torch.randn(batch, m.in_channels, m.sample_size, m.sample_size, device=device)
    built = {}
    for variant in VARIANTS:
        model, optimizer = build(cfg, variant, device)
        labels = torch.zeros(batch, dtype=torch.long, device=device) if model.config.num_classes > 0 else None
        for _ in range(warmup):
            train_step(model, optimizer, scheduler, images, labels, dtype)
        built[variant] = (model, optimizer, labels)
    per_round = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for variant, (model, optimizer, labels) in built.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                train_step(model, optimizer, scheduler, images, labels, dtype)
            sync(device)
            per_round[variant].append(batch * steps / (time.perf_counter() - start))
    return {v: statistics.median(r) for v, r in per_round.items()}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_memory_child(cfg_yaml: str, variant: str, batch: int, queue) -> None:
    """In a fresh process: peak RSS growth (MiB) over two training steps of one variant (CPU)."""
    cfg = OmegaConf.create(cfg_yaml)
    before = rss_mib()
    model, optimizer = build(cfg, variant, torch.device("cpu"))
    scheduler = build_scheduler(cfg.diffusion)
    m = cfg.model
    images = torch.randn(batch, m.in_channels, m.sample_size, m.sample_size)
    labels = torch.zeros(batch, dtype=torch.long) if model.config.num_classes > 0 else None
    for _ in range(2):
        train_step(model, optimizer, scheduler, images, labels, dtype_of(cfg.train.mixed_precision))
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before)


def peak_memory(cfg, batch: int, device: torch.device) -> dict:
    if device.type == "cuda":
        out = {}
        scheduler = build_scheduler(cfg.diffusion)
        m = cfg.model
        images = torch.randn(batch, m.in_channels, m.sample_size, m.sample_size, device=device)
        for variant in VARIANTS:
            model, optimizer = build(cfg, variant, device)
            labels = torch.zeros(batch, dtype=torch.long, device=device) if model.config.num_classes > 0 else None
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            for _ in range(2):
                train_step(model, optimizer, scheduler, images, labels, dtype_of(cfg.train.mixed_precision))
            out[variant] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            del model, optimizer
        return out
    ctx = mp.get_context("spawn")
    out = {}
    for variant in VARIANTS:
        queue = ctx.Queue()
        proc = ctx.Process(target=peak_memory_child, args=(OmegaConf.to_yaml(cfg), variant, batch, queue))
        proc.start()
        out[variant] = queue.get()
        proc.join()
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/digits_uvic.yaml")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.mixed_precision=bf16")
    parser.add_argument("--batch-size", type=int, help="per-step batch (default: train.batch_size)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    batch = args.batch_size or cfg.train.batch_size
    device = torch.device(args.device)
    speed = time_rounds(cfg, batch, args.steps, args.warmup, args.rounds, device)
    memory = peak_memory(cfg, batch, device)
    m = cfg.model
    result = {
        "config": args.config, "device": str(device), "threads": torch.get_num_threads(), "batch": batch,
        "mixed_precision": cfg.train.mixed_precision,
        "model": f"{m.sample_size}px p{m.patch_size} D{m.embed_dim} depth{m.depth} heads{m.num_heads}",
        "images_per_s": speed, "peak_mib": memory,
        "speed_ratio_uvic_over_uvit": speed["cog"] / speed["softmax"],
        "memory_ratio_uvic_over_uvit": memory["cog"] / max(memory["softmax"], 1e-9),
    }
    if args.json:
        print(json.dumps(result))
        return result
    print(f"{args.config}: {result['model']}, batch {batch}, {device} ({result['threads']} threads), "
          f"mixed precision {cfg.train.mixed_precision}")
    print(f"{'':8} {'images/s':>10} {'peak MiB':>10}")
    for variant, name in zip(VARIANTS, ("U-ViT", "U-ViC")):
        print(f"{name:8} {speed[variant]:10.1f} {memory[variant]:10.1f}")
    print(f"{'U-ViC/U-ViT':8} {result['speed_ratio_uvic_over_uvit']:10.3f} {result['memory_ratio_uvic_over_uvit']:10.3f}")
    return result


if __name__ == "__main__":
    main()
