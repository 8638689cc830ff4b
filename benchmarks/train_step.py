"""Whole training step of U-ViC (Cog attention) against U-ViT (softmax), side by side.

    python benchmarks/train_step.py                                  # CIFAR-10 S/2 and digits, CPU
    python benchmarks/train_step.py --configs cifar10-s2 --batch 16 --repeats 5 --threads 1
    python benchmarks/train_step.py --device cuda --dtype bf16 --batch 128

One step = forward, MSE loss against the noise, backward, AdamW step, as in uvic's trainer. The
models share their weights (Cog attention has no parameters of its own) and are stepped in
alternating order, round after round; the median step time of each is printed with its ratio to
U-ViT. U-ViC runs once per Cog backend in --cog-backends ("math" is the plain formula). The
first round is a warm-up and is not counted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from uvic.model import UViT

CONFIGS = {  # name -> UViT keywords (unconditional)
    "cifar10-s2": dict(sample_size=32, in_channels=3, patch_size=2, embed_dim=512, depth=12, num_heads=8),
    "digits": dict(sample_size=16, in_channels=1, patch_size=2, embed_dim=128, depth=6, num_heads=4),
}


def build(config: dict, attention_type: str, state, device, backend="auto"):
    model = UViT(**config, attention_type=attention_type)
    if state is not None:
        model.load_state_dict(state)
    model.set_cog_backend(backend)
    model = torch.nn.Module.to(model, device)  # ModelMixin.to warns about an empty fp32 module list
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.03, betas=(0.99, 0.999))
    return model, optimizer


def step(model, optimizer, batch, dtype, device) -> float:
    x, noise, t = batch
    labels = t % (model.config.num_classes - 1) if model.config.num_classes > 0 else None  # class-conditional
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = F.mse_loss(model(x + noise, t, class_labels=labels).sample.float(), noise)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--cog-backends", nargs="+", default=["auto", "math"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="autocast dtype")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    print(f"# device {device}, threads {torch.get_num_threads()}, torch {torch.__version__}, batch {args.batch}, "
          f"{args.dtype}, median of {args.repeats} alternating rounds")
    print("| config | tokens | model | step ms | / U-ViT |")
    print("|---|---:|---|---:|---:|")
    for name in args.configs:
        config = CONFIGS[name]
        torch.manual_seed(0)
        uvit, uvit_opt = build(config, "softmax", None, device)
        state = {k: v.cpu() for k, v in uvit.state_dict().items()}
        runs = {"U-ViT": (uvit, uvit_opt)}
        for backend in args.cog_backends:
            runs[f"U-ViC ({backend})"] = build(config, "cog", state, device, backend)
        g = torch.Generator().manual_seed(1)
        shape = (args.batch, config["in_channels"], config["sample_size"], config["sample_size"])
        batch = (torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device),
                 torch.randint(0, 1000, (args.batch,), generator=g).to(device))
        times = {label: [] for label in runs}
        for round_ in range(args.repeats + 1):
            for label, (model, optimizer) in runs.items():
                seconds = step(model, optimizer, batch, dtype, device)
                if round_:
                    times[label].append(seconds)
        tokens = 1 + (config["sample_size"] // config["patch_size"]) ** 2
        base = statistics.median(times["U-ViT"])
        for label, values in times.items():
            median = statistics.median(values)
            print(f"| {name} | {tokens} | {label} | {1e3 * median:.0f} | {median / base:.3f} |", flush=True)


if __name__ == "__main__":
    main()
