"""Cog attention backends against softmax attention (SDPA): time and peak memory, side by side.

    python benchmarks/attention.py                                   # L 65/257/1025, fp32 + bf16
    python benchmarks/attention.py --lengths 257 --dtypes fp32 --repeats 3 --threads 1
    python benchmarks/attention.py --device cuda --dtypes bf16 fp32   # adds the Triton kernels

Shapes are those of U-ViT-S/2 attention (B=16, H=8, D=64; L=257 is CIFAR-10 32x32 with patch 2).
For every (L, dtype) all backends are timed in alternating order, round after round, and the
median is printed with its ratio to SDPA, so background load hits all of them alike. "fwd" runs
under torch.no_grad (inference); "fwd+bwd" is forward then backward of a fixed dO. The first
round is a warm-up (Triton compiles its kernels there) and is not counted.

Peak memory is measured in a separate, untimed call: on CUDA torch.cuda.max_memory_allocated;
on CPU the largest "Total Allocated" of the CPU allocator seen by torch.profiler
(profile_memory=True) during the call, i.e. bytes allocated by the call on top of its inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from uvic.attention import cog_attention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def backends(device: torch.device):
    """name -> attention function (q, k, v) -> O. "sdpa" is softmax attention, the baseline."""
    table = {"sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v)}
    names = ["math", "lean", "chunked"]
    if device.type == "cuda":
        try:
            import triton  # noqa: F401

            names.append("triton")
        except ImportError:
            pass
    for name in names:
        table[name] = lambda q, k, v, name=name: cog_attention(q, k, v, backend=name)
    return table


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(fn, inputs, d_out, backward: bool):
    if not backward:
        with torch.no_grad():
            return fn(*inputs)
    q, k, v = (t.detach().requires_grad_() for t in inputs)
    fn(q, k, v).backward(d_out)


def timed(fn, inputs, d_out, backward, device) -> float:
    sync(device)
    start = time.perf_counter()
    run(fn, inputs, d_out, backward)
    sync(device)
    return time.perf_counter() - start


def peak_bytes(fn, inputs, d_out, backward, device) -> int:
    """Bytes allocated by one call at its peak, on top of what existed before (module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run(fn, inputs, d_out, backward)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run(fn, inputs, d_out, backward)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[65, 257, 1025], help="sequence lengths L")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--backends", nargs="+", default=None, help="subset of sdpa math lean chunked triton")
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory calls")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    table = backends(device)
    if args.backends:
        unknown = sorted(set(args.backends) - set(table))
        if unknown:
            parser.error(f"unknown or unavailable backends {unknown}; here: {sorted(table)}")
        table = {name: fn for name, fn in table.items() if name in args.backends or name == "sdpa"}
    print(f"# device {device}, threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"B={args.batch} H={args.heads} D={args.head_dim}, median of {args.repeats} alternating rounds")
    print("| L | dtype | backend | fwd ms | fwd / SDPA | fwd+bwd ms | fwd+bwd / SDPA | fwd peak MiB "
          "| fwd+bwd peak MiB | fwd+bwd peak / math |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    generator = torch.Generator().manual_seed(0)
    for length in args.lengths:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            shape = (args.batch, args.heads, length, args.head_dim)
            inputs = [torch.randn(shape, generator=generator).to(device, dtype) for _ in range(3)]
            d_out = torch.randn(shape, generator=generator).to(device, dtype)
            modes = [(mode, mode == "fwd+bwd") for mode in args.modes]
            times = {(name, mode): [] for name in table for mode, _ in modes}
            for round_ in range(args.repeats + 1):
                for name, fn in table.items():
                    for mode, backward in modes:
                        seconds = timed(fn, inputs, d_out, backward, device)
                        if round_:  # round 0 is the warm-up
                            times[name, mode].append(seconds)
            peaks = {}
            if not args.no_memory:
                for name, fn in table.items():
                    for mode, backward in modes:
                        peaks[name, mode] = peak_bytes(fn, inputs, d_out, backward, device)
            median = {key: statistics.median(values) for key, values in times.items()}
            for name in table:
                cells = [str(length), dtype_name, name]
                for mode in ("fwd", "fwd+bwd"):
                    if (name, mode) in median:
                        ms = 1e3 * median[name, mode]
                        cells += [f"{ms:.1f}", f"{median[name, mode] / median['sdpa', mode]:.2f}"]
                    else:
                        cells += ["", ""]
                for mode in ("fwd", "fwd+bwd"):
                    cells.append(f"{peaks[name, mode] / 2**20:.0f}" if (name, mode) in peaks else "")
                plain = peaks.get(("math", "fwd+bwd"))
                cells.append(f"{peaks[name, 'fwd+bwd'] / plain:.2f}" if plain and (name, "fwd+bwd") in peaks else "")
                print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
