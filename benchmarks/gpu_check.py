"""Validate a GPU for uvic in one command: kernel correctness, attention speed, training and sampling.

    python benchmarks/gpu_check.py                          # first CUDA device, <= 8 min on one H100/H200
    python benchmarks/gpu_check.py --device cpu --tiny      # the same script end to end in < 1 min (a test)

Writes <out>/report.md and <out>/report.json (default out: gpu_check/):

1. Correctness: Cog attention (the backend `auto` picks, and "triton" where it can run) against
   autograd through the float64 formula, O and dQ/dK/dV, at head dims 64/72/80/128, L
   17/257/1025/4097, packed-qkv strides, bf16/fp16/fp32. Error is max |x - ref| / max |ref|.
2. Attention forward and forward+backward time and peak memory against SDPA (flash on CUDA),
   L = 1025, D = 64 and 72, bf16 (target: Cog fwd+bwd <= 1.3x SDPA) and fp32 (which of lean /
   chunked / IEEE-float32 triton `auto` should use where TF32 is off).
3. Training-step throughput (img/s, peak memory), U-ViT vs U-ViC: CIFAR-10 S/2 batch 128, latent
   L/2 and H/2 batch 32 (bf16 autocast, gradient checkpointing). Target: U-ViC <= 1.1x U-ViT step.
4. 50-step guided sampling throughput (img/s), U-ViT vs U-ViC, latent L/2 (no VAE decode).

Every timing alternates the candidates round after round and reports medians (benchmarks/
attention.py and train_step.py do the timing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling benchmark scripts
import attention as attention_bench  # noqa: E402
import train_step as train_step_bench  # noqa: E402

from uvic import doctor  # noqa: E402
from uvic.attention import ATTENTION_BACKENDS, cog_attention, cog_reference, resolve_cog_backend, triton_problem  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {"fp32": 2e-2, "fp16": 2e-2, "bf16": 6e-2}  # of max |reference|; fp32 may run TF32
LATENT = dict(sample_size=32, in_channels=4, patch_size=2, num_classes=1001)
MODELS = {  # name -> (UViT keywords, batch)
    "cifar10-s2": (dict(sample_size=32, in_channels=3, patch_size=2, embed_dim=512, depth=12, num_heads=8), 128),
    "latent-l2": (dict(LATENT, embed_dim=1024, depth=20, num_heads=16), 32),
    "latent-h2": (dict(LATENT, embed_dim=1152, depth=28, num_heads=16, use_final_conv=False), 32),
}
TINY_MODEL = (dict(sample_size=8, in_channels=1, patch_size=2, embed_dim=32, depth=2, num_heads=2, num_classes=11), 4)


def plan(tiny: bool) -> dict:
    if tiny:
        return dict(dims=[16, 24], lengths=[17, 33], dtypes=["fp32"], heads=2,
                    attn=dict(batch=2, heads=2, lengths=[65], dims=[16], dtypes=["fp32"], repeats=1),
                    models={"tiny": TINY_MODEL}, repeats=1, sample=dict(batch=2, steps=2))
    return dict(dims=[64, 72, 80, 128], lengths=[17, 257, 1025, 4097], dtypes=["bf16", "fp16", "fp32"], heads=2,
                attn=dict(batch=16, heads=16, lengths=[1025], dims=[64, 72], dtypes=["bf16", "fp32"], repeats=10),
                models=MODELS, repeats=5, sample=dict(batch=32, steps=50))


def relative_error(x, ref) -> float:
    return float((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def correctness(p: dict, device: torch.device) -> list:
    rows = []
    g = torch.Generator().manual_seed(0)
    for dtype_name in p["dtypes"]:
        dtype = DTYPES[dtype_name]
        for dim in p["dims"]:
            for length in p["lengths"]:
                packed = torch.randn(1, length, 3, p["heads"], dim, generator=g, dtype=torch.float64).to(device)
                d_out = torch.randn(1, p["heads"], length, dim, generator=g, dtype=torch.float64).to(device)
                leaf = packed.clone().requires_grad_()
                ref = cog_reference(*(leaf[:, :, i].transpose(1, 2) for i in range(3)))[0]
                want = [ref.detach(), *torch.autograd.grad(ref, leaf, d_out)[0].unbind(2)]
                inputs = [packed.to(dtype)[:, :, i].transpose(1, 2) for i in range(3)]
                backends = {resolve_cog_backend(*inputs[:2], inputs[2].detach().requires_grad_())}
                if triton_problem(*inputs) is None:
                    backends.add("triton")
                for backend in sorted(backends):
                    row = dict(backend=backend, dtype=dtype_name, head_dim=dim, length=length)
                    try:
                        leaf = packed.to(dtype).requires_grad_()
                        out = cog_attention(*(leaf[:, :, i].transpose(1, 2) for i in range(3)), backend=backend)
                        got = [out, *torch.autograd.grad(out, leaf, d_out.to(dtype))[0].unbind(2)]
                        # got/want dQ, dK, dV: (1, L, H, D) slices of the packed gradient
                        row.update({name: relative_error(x, y) for name, x, y in zip(("O", "dQ", "dK", "dV"), got, want)})
                        row["ok"] = all(row[name] <= TOLERANCE[dtype_name] for name in ("O", "dQ", "dK", "dV"))
                    except Exception as error:  # reported, not fatal: the rest of the check still runs
                        row.update(ok=False, error=f"{type(error).__name__}: {error}"[:300])
                    rows.append(row)
    return rows


def attention_speed(p: dict, device: torch.device) -> list:
    """fp32 rows (TF32 as configured) show which PyTorch backend `auto` should prefer on CUDA."""
    a = p["attn"]
    table = attention_bench.backends(device)
    table.pop("math")  # the plain formula is not a contender
    rows = []
    g = torch.Generator().manual_seed(1)
    for dtype_name in a["dtypes"]:
        for length in a["lengths"]:
            for dim in a["dims"]:
                shape = (a["batch"], a["heads"], length, dim)
                inputs = [torch.randn(shape, generator=g).to(device, DTYPES[dtype_name]) for _ in range(3)]
                d_out = torch.randn(shape, generator=g).to(device, DTYPES[dtype_name])
                times = {(name, mode): [] for name in table for mode in ("fwd", "fwd+bwd")}
                for round_ in range(a["repeats"] + 1):
                    for name, fn in table.items():
                        for mode in ("fwd", "fwd+bwd"):
                            seconds = attention_bench.timed(fn, inputs, d_out, mode == "fwd+bwd", device)
                            if round_:  # round 0 warms up
                                times[name, mode].append(seconds)
                median = {key: statistics.median(values) for key, values in times.items()}
                for name, fn in table.items():
                    row = dict(backend=name, length=length, head_dim=dim, dtype=dtype_name)
                    for mode in ("fwd", "fwd+bwd"):
                        row[f"{mode} ms"] = 1e3 * median[name, mode]
                        row[f"{mode} / sdpa"] = median[name, mode] / median["sdpa", mode]
                        row[f"{mode} peak MiB"] = attention_bench.peak_bytes(fn, inputs, d_out, mode == "fwd+bwd",
                                                                              device) / 2**20
                    rows.append(row)
    return rows


def peak_memory(device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def training(p: dict, device: torch.device) -> list:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for name, (config, batch_size) in p["models"].items():
        torch.manual_seed(0)
        runs = {}
        uvit = train_step_bench.build(config, "softmax", None, device)
        state = {k: v.cpu() for k, v in uvit[0].state_dict().items()}
        runs["U-ViT"] = uvit
        runs["U-ViC"] = train_step_bench.build(config, "cog", state, device)
        for model, _ in runs.values():
            model.enable_gradient_checkpointing()
        g = torch.Generator().manual_seed(1)
        shape = (batch_size, config["in_channels"], config["sample_size"], config["sample_size"])
        batch = (torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device),
                 torch.randint(0, 1000, (batch_size,), generator=g).to(device))
        times, peaks = {label: [] for label in runs}, {}
        for round_ in range(p["repeats"] + 1):
            for label, (model, optimizer) in runs.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                seconds = train_step_bench.step(model, optimizer, batch, dtype, device)
                peaks[label] = peak_memory(device)
                if round_:
                    times[label].append(seconds)
        base = statistics.median(times["U-ViT"])
        for label, values in times.items():
            median = statistics.median(values)
            rows.append({"model": name, "attention": label, "batch": batch_size, "step ms": 1e3 * median,
                         "img/s": batch_size / median, "/ U-ViT": median / base, "peak MiB": peaks[label]})
        del runs
    return rows


def sampling(p: dict, device: torch.device) -> list:
    from uvic.diffusion import build_scheduler  # noqa: PLC0415
    from uvic.config import load_config  # noqa: PLC0415
    from uvic.pipeline import UViCPipeline, make_scheduler  # noqa: PLC0415

    name, (config, _) = next(iter(p["models"].items())) if "tiny" in p["models"] else ("latent-l2", MODELS["latent-l2"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    scheduler = make_scheduler("dpm++2m", build_scheduler(load_config(doctor.CONFIG_GLOB.replace(
        "*.yaml", "imagenet256_uvic_l2.yaml")).diffusion).config)
    torch.manual_seed(0)
    models = {}
    for attention in ("softmax", "cog"):
        model = train_step_bench.UViT(**config, attention_type=attention)
        if models:
            model.load_state_dict(models["softmax"].state_dict())
        models[attention] = torch.nn.Module.to(model.eval(), device=device, dtype=dtype)
    batch, steps = p["sample"]["batch"], p["sample"]["steps"]
    labels = torch.arange(batch) % (config["num_classes"] - 1)
    seconds = {attention: [] for attention in models}
    for round_ in range(2):
        for attention, model in models.items():
            pipe = UViCPipeline(transformer=model, scheduler=scheduler)
            pipe.set_progress_bar_config(disable=True)
            attention_bench.sync(device)
            start = time.perf_counter()
            pipe(batch_size=batch, num_inference_steps=steps if round_ else 2, class_labels=labels,
                 guidance_scale=1.4, output_type="pt")
            attention_bench.sync(device)
            if round_:
                seconds[attention].append(time.perf_counter() - start)
    base = batch / seconds["softmax"][0]
    return [{"model": name, "attention": "U-ViT" if a == "softmax" else "U-ViC", "batch": batch, "steps": steps,
             "guidance": 1.4, "img/s": batch / s[0], "/ U-ViT img/s": batch / s[0] / base} for a, s in seconds.items()]


def markdown(title: str, rows: list) -> str:
    if not rows:
        return f"## {title}\n\n(none)\n"
    keys = list(dict.fromkeys(key for row in rows for key in row))
    cell = lambda x: f"{x:.3g}" if isinstance(x, float) else str(x)  # noqa: E731
    lines = [f"## {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row.get(key, "")) for key in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: the whole script in seconds (tests)")
    parser.add_argument("--out", default="gpu_check", help="folder for report.md and report.json")
    parser.add_argument("--skip", nargs="*", default=[], choices=["correctness", "attention", "training", "sampling"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available here (use --device cpu --tiny to test the script)")
    p = plan(args.tiny)
    os.makedirs(args.out, exist_ok=True)
    report = {"environment": doctor.versions() + doctor.gpus(), "device": str(device), "tiny": args.tiny,
              "backends": ATTENTION_BACKENDS}
    sections = [("correctness", "Correctness against float64 (max |x - ref| / max |ref|)", correctness),
                ("attention", "Attention against SDPA", attention_speed),
                ("training", "Training step, U-ViT vs U-ViC", training),
                ("sampling", "Guided sampling (dpm++2m, w = 1.4)", sampling)]
    md = ["# GPU check", "", *[f"    {line}" for line in report["environment"]], ""]
    for key, title, fn in sections:
        if key in args.skip:
            continue
        start = time.perf_counter()
        report[key] = fn(p, device)
        print(f"{key}: {time.perf_counter() - start:.1f} s", flush=True)
        md.append(markdown(title, report[key]))
    failed = [row for row in report.get("correctness", []) if not row["ok"]]
    report["correct"] = not failed
    md.insert(2, f"**Correctness: {'all passed' if not failed else f'{len(failed)} FAILED'}**\n")
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("\n".join(md))
    print(f"wrote {args.out}/report.md and report.json; correctness {'passed' if not failed else 'FAILED'}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
