"""What this machine offers uvic, for a first run on a new GPU and for bug reports.

    python -m uvic.doctor                    # versions (installed beside requirements/lock.txt), GPUs, SDPA flash, Cog backend per shipped config
    python -m uvic.doctor --configs configs/imagenet256_uvic_h2.yaml

For every config it prints the attention shape (tokens L, heads, head dim), the dtype training
runs in, and the Cog backend `auto` picks for training and for inference on the first device,
with the Triton self-check result (uvic.attention.triton_self_check) where it ran.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import os
import platform
import re
import shutil
import subprocess
from importlib import metadata

import torch

from . import attention
from .attention import resolve_cog_backend
from .cli import add_debug_option, command
from .config import load_config, resolve_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_GLOB = os.path.join(REPO, "configs", "*.yaml")
LOCK = os.path.join(REPO, "requirements", "lock.txt")  # the exact set the suite passed with (README "Install")
STACK = ("torch", "torchvision", "triton", "diffusers", "accelerate", "transformers", "timm", "einops",
         "torch-fidelity", "safetensors", "huggingface-hub", "numpy", "scipy")
MIXED_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception as error:  # not installed, or broken: say which
        return f"not available ({type(error).__name__})"


def _ptxas() -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: PLC0415

        major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
        ptxas = get_ptxas(10 * major + minor)
        return f"{ptxas.version} ({ptxas.path})"
    except Exception as error:
        return f"not available ({type(error).__name__})"


def _cc() -> str:
    cc = shutil.which(os.environ.get("CC", "cc"))
    if not cc:
        return "none found (triton and torch.compile need one)"
    result = subprocess.run([cc, "--version"], capture_output=True, text=True)
    return (result.stdout.splitlines() or ["?"])[0]


def versions() -> list:
    return [
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"triton {_version('triton')}, diffusers {_version('diffusers')}, accelerate {_version('accelerate')}",
        f"C compiler: {_cc()}; ptxas: {_ptxas()}",
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!s} UVIC_COG_BACKEND="
        f"{os.environ.get('UVIC_COG_BACKEND', '')!s} allow_tf32={torch.backends.cuda.matmul.allow_tf32}",
    ]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(path: str = LOCK) -> dict:
    """{package: version} of a pip-compile lock (its `name==version` lines)."""
    pins = {}
    with open(path) as f:
        for line in f:
            match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
            if match:
                pins[_canonical(match.group(1))] = match.group(2)
    return pins


def lock_report(path: str = LOCK) -> list:
    """The stack's installed versions beside the locked ones, then every locked package that differs.
    A local build tag (2.14.1+cpu) is the machine's choice of build, not a difference."""
    if not os.path.isfile(path):
        return [f"lock: {path} not found (uvic installed as a library: ranges of setup.cfg only)"]
    locked = locked_versions(path)
    installed = {_canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    differ = sorted(name for name, version in locked.items()
                    if name in installed and installed[name].split("+")[0] != version)
    missing = sorted(name for name in locked if name not in installed and not name.startswith(("nvidia-", "cuda-")))
    lines = ["| package | installed | locked |", "|---|---|---|"]
    for name in STACK:
        mark = " (differs)" if name in differ else ""
        lines.append(f"| {name} | {installed.get(name, 'not installed')}{mark} | {locked.get(name, '-')} |")
    if differ or missing:
        lines.append(f"differ from {os.path.relpath(path, REPO)}: " + ", ".join(
            [f"{n} {installed[n]} (locked {locked[n]})" for n in differ] + [f"{n} not installed" for n in missing]))
        lines.append("to install the locked set: pip install -c requirements/lock.txt -e \".[dev]\"")
    else:
        lines.append(f"every installed package of {os.path.relpath(path, REPO)} is at its locked version")
    return lines


def gpus() -> list:
    if not torch.cuda.is_available():
        return ["GPUs: none (CUDA not available): Cog attention runs 'lean' / 'chunked'"]
    lines = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        shared = getattr(p, "shared_memory_per_block_optin", 0) // 1024
        lines.append(f"cuda:{i} {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                     f"{p.multi_processor_count} SMs, {shared} KiB shared memory per block")
    flash = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: "unknown")()
    lines.append(f"SDPA: flash available {flash}, enabled {torch.backends.cuda.flash_sdp_enabled()}; "
                 f"memory-efficient enabled {torch.backends.cuda.mem_efficient_sdp_enabled()}")
    return lines


def config_rows(paths, device: torch.device) -> list:
    """One markdown row per config: shape, dtype, auto's backend for training / inference, self-check."""
    rows = ["| config (Cog) | L | heads | head dim | dtype | auto: train | auto: inference | Triton self-check |",
            "|---|---:|---:|---:|---|---|---|---|"]
    for path in paths:
        cfg = resolve_model(load_config(path))
        m = cfg.model
        if m.attention_type != "cog":
            continue
        length = (m.sample_size // m.patch_size) ** 2 + 1 + (1 if (m.num_classes or 0) > 0 else 0)
        head_dim = m.embed_dim // m.num_heads
        dtype = MIXED_PRECISION.get(cfg.train.get("mixed_precision"), torch.float32)
        q = torch.zeros(1, m.num_heads, 1, head_dim, device=device, dtype=dtype)
        train = resolve_cog_backend(q, q, q.clone().requires_grad_())
        with torch.no_grad():
            infer = resolve_cog_backend(q, q, q)
        key = (str(q.device), dtype, head_dim)
        checks = attention._SELF_CHECKS  # read-only look at auto's cache
        check = "not run" if key not in checks else (checks[key] or "passed")
        rows.append(f"| {os.path.basename(path)} | {length} | {m.num_heads} | {head_dim} | "
                    f"{str(dtype).replace('torch.', '')} | {train} | {infer} | {check} |")
    return rows


@command("python -m uvic.doctor")
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=None, help="config files (default: the shipped configs/*.yaml)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    paths = args.configs or sorted(glob.glob(CONFIG_GLOB))
    print("\n".join(versions() + lock_report() + gpus()))
    print("\n".join(config_rows(paths, torch.device(args.device))))


if __name__ == "__main__":
    main()
