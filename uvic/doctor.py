"""What this machine offers uvic, for a first run on a new GPU and for bug reports.

    python -m uvic.doctor                    # versions (installed beside requirements/lock.txt), GPUs, SDPA flash, Cog backend per shipped config
    python -m uvic.doctor --configs configs/imagenet256_uvic_h2.yaml

For every config it prints the attention shape (tokens L, heads, head dim), the dtype training
runs in, and the Cog backend `auto` picks for training and for inference on the first device,
with the Triton self-check result (uvic.attention.triton_self_check) where it ran.

    python -m uvic.doctor --dry-run configs/imagenet256_uvic_h2.yaml [--depth N] [--gpus 8] [overrides]
    torchrun --nproc_per_node 2 -m uvic.doctor --dry-run configs/imagenet256_uvic_h2.yaml train.fsdp=true

The dry run builds the config at its real size and drives uvic's Trainer on synthetic data of its
shape: DRY_RUN_HELP below (also the epilog of --help); docs/benchmarks.md has the formula and results.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import glob
import importlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from accelerate.state import AcceleratorState

from . import attention
from .attention import resolve_cog_backend
from .cli import add_debug_option, command
from .caption_latents import CAPTIONS_LIST, CAPTIONS_META, EMPTY_CONTEXT, text_shard_name
from .config import load_config, resolve_model
from .data import resolve_data_config
from .files import atomic_write
from .latents import META, VAE_DIR, shard_name
from .pipeline import UViCPipeline
from .trainer import Trainer

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


def sequence_length(m) -> int:
    """Tokens L of a model config: patches, the time token, the label token, the text tokens (U-ViT's extras)."""
    text = m.num_context_tokens if (m.get("context_dim") or 0) > 0 else 0
    return (m.sample_size // m.patch_size) ** 2 + 1 + (1 if (m.num_classes or 0) > 0 else 0) + text


def config_rows(paths, device: torch.device) -> list:
    """One markdown row per config: shape, dtype, auto's backend for training / inference, self-check."""
    rows = ["| config (Cog) | L | heads | head dim | dtype | auto: train | auto: inference | Triton self-check |",
            "|---|---:|---:|---:|---|---|---|---|"]
    for path in paths:
        cfg = resolve_model(load_config(path))
        m = cfg.model
        if m.attention_type != "cog":
            continue
        length = sequence_length(m)
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


# ---------------------------------------------------------------------- --dry-run: a shipped config at its real size
DRY_RUN_HELP = """--dry-run CONFIG: writes synthetic data of the config's real shape (a latent folder in uvic.latents' layout with
a tiny random VAE: latents 4x32x32 or 4x64x64, for MS-COCO also 77x768 caption contexts; images for pixel
configs), trains 2 steps at batch 1 through uvic's Trainer with the config's precision and gradient
checkpointing, writes the checkpoint, resumes from it for one more step, samples final/ in 2 steps, trains 2
steps of a second run at batch 2, and prints: parameters, seconds and peak memory per step (this process's
resident set, VmHWM of /proc/self/status, reset before each step through /proc/self/clear_refs; glibc set to
return freed blocks of 64 KiB and more), and the
computed per-GPU memory at the config's batch for DDP and FSDP: fp32 weights 4 + gradients 4 + AdamW 8 + EMA
shadow 4 bytes per parameter (FSDP: divided by --gpus), + 4 on the main process (its whole EMA model), + the
step's working memory, fixed + per-GPU batch x per sample, from the rise of step 2 (less the gradients it
allocates) at batch 1 and at batch 2."""
GiB = 2 ** 30
STATE_BYTES = {"params": 4, "grads": 4, "adam": 8, "ema": 4}  # per parameter: fp32 weights, gradients, AdamW m and v, EMA shadow


def memory_kib() -> dict:
    """This process's resident set now (VmRSS) and its peak since the last reset (VmHWM), in KiB (Linux)."""
    with open("/proc/self/status") as f:
        return {k: int(v) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", f.read(), re.M)}


def exact_resident_set() -> bool:
    """Make the resident set follow the live tensors (glibc): blocks of 64 KiB and more are mapped and unmapped
    one by one (mallopt M_MMAP_THRESHOLD, which also stops glibc raising that threshold after frees) and freed
    heap tops are returned (M_TRIM_THRESHOLD). Otherwise a step's temporaries land in memory freed by the step
    before, and the peak rise of a step misses them. False where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(-3, 64 * 1024)) and bool(libc.mallopt(-1, 64 * 1024))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


def reset_peak() -> None:
    """Start VmHWM again from the current resident set (Linux >= 4.0: /proc/self/clear_refs, value 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _save_safetensors(tensors: dict, path: Path, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save  # noqa: PLC0415  (safetensors: only the dry run writes data)

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def _write_json(value, path: Path) -> None:
    text = json.dumps(value, indent=1)
    atomic_write(path, lambda f: f.write(text.encode()))


def tiny_vae(latent_channels: int):
    """A random AutoencoderKL with the SD VAE's 8x downsampling and 8 channels: decodes latents, costs nothing."""
    from diffusers import AutoencoderKL  # noqa: PLC0415  (diffusers' VAE: only latent dry runs need it)

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=1,
                         norm_num_groups=4, block_out_channels=(8, 8, 8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def write_synthetic_latents(folder: Path, cfg, num: int = 8) -> Path:
    """An extraction folder in uvic.latents' layout (meta.json, vae/, shard_00000) of `num` random latents of the
    model's shape; for a text model (model.context_dim > 0) also uvic.caption_latents' files, one random
    caption context (num_context_tokens, context_dim) per image."""
    m = cfg.model
    folder.mkdir(parents=True, exist_ok=True)
    shape = (m.in_channels, m.sample_size, m.sample_size)  # (C, h, w)
    classes = max(m.num_classes - 1, 1) if (m.num_classes or 0) > 0 else 1
    tiny_vae(m.in_channels).save_pretrained(str(folder / VAE_DIR))
    g = torch.Generator().manual_seed(0)
    _save_safetensors({"mean": torch.randn(num, 1, *shape, generator=g).half(),
                       "std": torch.full((num, 1, *shape), 0.1).half(),
                       "labels": torch.arange(num) % classes, "index": torch.arange(num)},
                      folder / shard_name(0), {"start": "0", "count": str(num), "next": str(num),
                                               "process": "0/1", "skipped": "[]"})
    _write_json({"vae": "synthetic (uvic.doctor --dry-run)", "scale_factor": cfg.data.scale_factor,
                 "resolution": 8 * m.sample_size, "latent_shape": list(shape), "flip": False,
                 "classes": [f"class_{i}" for i in range(classes)], "num_classes": classes, "num_images": num,
                 "shard_size": num, "num_shards": 1}, folder / META)
    if (m.get("context_dim") or 0) > 0:
        tokens = (m.num_context_tokens, m.context_dim)  # (L, D)
        _save_safetensors({"empty_context": torch.randn(*tokens, generator=g)}, folder / EMPTY_CONTEXT)
        _save_safetensors({"context": torch.randn(num, *tokens, generator=g).half(), "first": torch.arange(num),
                           "count": torch.ones(num, dtype=torch.int64), "index": torch.arange(num)},
                          folder / text_shard_name(0))
        lines = "".join(json.dumps({"file_name": f"{i}.png", "captions": ["synthetic"]}) + "\n" for i in range(num))
        atomic_write(folder / CAPTIONS_LIST, lambda f: f.write(lines.encode()))
        _write_json({"text_encoder": "synthetic", "max_length": tokens[0], "context_dim": tokens[1],
                     "num_captions": num, "dtype": "float16", "files_sha1": ""}, folder / CAPTIONS_META)
    return folder


def write_synthetic_images(folder: Path, size: int, num: int = 8) -> Path:
    """An image folder (data.name=imagefolder) of `num` random RGB PNGs size x size, one class."""
    from PIL import Image  # noqa: PLC0415  (PIL: only pixel-space dry runs write images)

    (folder / "class_0").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(num):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / "class_0" / f"{i}.png")
    return folder


def synthetic_data(cfg, folder: Path) -> list:
    """Overrides that point the config's data at synthetic data of its real shape, written under `folder`."""
    loader = ["data.num_workers=0", "data.pin_memory=false", "data.persistent_workers=false"]
    if cfg.data.name == "latents":
        return [f"data.path={write_synthetic_latents(folder / 'latents', cfg)}"] + loader
    images = write_synthetic_images(folder / "images", cfg.model.sample_size)
    return ["data.name=imagefolder", f"data.path={images}", "data.conditional=false", "data.limit=null"] + loader


def _shared_folder() -> Optional[str]:
    """Launched as several processes (torchrun): one folder for all of them, named by the launcher's process
    id (kept: remove it, or pass --dir)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return None
    return os.path.join(tempfile.gettempdir(), f"uvic-dry-run-launch-{os.getppid()}")


def _synthetic_data_once(cfg, folder: Path) -> list:
    """synthetic_data written by local rank 0 (the others wait for its marker: no process group exists yet)."""
    marker = folder / "synthetic.done"
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        overrides = synthetic_data(cfg, folder)
        _write_json(overrides, marker)
        return overrides
    while not marker.exists():
        time.sleep(0.5)
    return json.loads(marker.read_text())


class MeasuredTrainer(Trainer):
    """uvic's Trainer, recording per optimizer step the wall time and the resident set (start, peak).
    The step ends where the trainer evaluates (before its checkpoint); the sample grid is skipped
    (the dry run samples final/ itself, at batch 1)."""

    def __init__(self, *args, **kwargs):
        self.measured = []  # (step, seconds, RSS at start KiB, peak KiB)
        super().__init__(*args, **kwargs)

    def start_step(self) -> None:
        reset_peak()
        self._start = (time.perf_counter(), memory_kib()["VmRSS"])

    def evaluate(self, step: int, done: bool) -> None:
        seconds, kib = time.perf_counter() - self._start[0], memory_kib()
        self.measured.append((step, seconds, self._start[1], kib["VmHWM"]))
        super().evaluate(step, done)

    def save_sample_grid(self):
        return None

    def on_step_end(self, step: int) -> None:
        super().on_step_end(step)
        self.start_step()

    def train(self) -> Path:
        self.start_step()
        return super().train()


def per_gpu_memory(params: int, fixed: float, per_sample: float, batch: int, gpus: int) -> dict:
    """Bytes per GPU at per-GPU batch `batch`: the training state plus the step's working memory, `fixed` + `batch`
    times `per_sample` (measured at batch 1 and 2). Every process holds the trained weights, their gradients,
    AdamW's m and v and the EMA's shadow weights (STATE_BYTES per parameter: whole under DDP, one shard of each
    under uvic's FSDP, train.fsdp=true); the main process also holds the whole EMA model for grids, FID and
    saving (4 bytes per parameter). DDP's gradients are views of its reducer buckets (no second copy)."""
    state = sum(STATE_BYTES.values()) * params
    step = fixed + batch * per_sample
    whole_ema = STATE_BYTES["ema"] * params
    return {"ddp": state + step, "ddp_rank0": state + whole_ema + step,
            "fsdp": state / gpus + step, "fsdp_rank0": state / gpus + whole_ema + step}


def _step_rows(name: str, phase: str, measured: list) -> list:
    return [f"| {name} | {phase} {step} | {seconds:.1f} | {peak / 2**20:.2f} | {(peak - start) / 2**20:.2f} |"
            for step, seconds, start, peak in measured]


def _sample_final(final: Path, cfg) -> tuple:
    """Shape of one image sampled from the exported final/ pipeline in 2 steps, at batch 1."""
    pipe = UViCPipeline.from_pretrained(str(final))
    pipe.set_progress_bar_config(disable=True)
    m = cfg.model
    kwargs = {"class_labels": [0]} if (m.num_classes or 0) > 0 else {}
    if (m.get("context_dim") or 0) > 0:
        kwargs["prompt_embeds"] = torch.randn(1, m.num_context_tokens, m.context_dim)  # (1, L, D)
    images = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="pt", **kwargs).images  # (1, 3, H, W)
    return tuple(images.shape)


def _train_phase(cfg, run: Path, dataset, steps: int, resume: Optional[str], last: bool) -> dict:
    """Train to `steps` through MeasuredTrainer; what the report needs, the trainer itself freed (H models:
    two trainers' weights and optimizer states at once would not fit).

    Under torchrun the phases share one process group: accelerate's end_training destroys it, and a second
    init_process_group in the same processes would rendezvous through the launcher's store again, where the
    first group's keys still are (both ranks hang in gloo's connect). So every phase but the last keeps it."""
    cfg = cfg.copy()
    cfg.train.steps = steps
    trainer = MeasuredTrainer(cfg, run, resume=resume, dataset=dataset)
    if not last:  # AcceleratorState's shared state: cleared by the _reset_state below
        trainer.accelerator.state.destroy_process_group = lambda group=None: None
    trainer.train()
    acc = trainer.accelerator
    done = {"step": trainer.step, "measured": trainer.measured, "latest": trainer.run.latest(),
            "resumed_from": trainer.resume_from, "final": trainer.run.final, "is_main": trainer.is_main,
            "rank": acc.process_index, "processes": acc.num_processes, "precision": trainer.mixed_precision,
            "params": sum(p.numel() for p in trainer.raw_model.parameters())}  # DTensor shards: their whole tensor
    del trainer, acc
    gc.collect()
    # the next Accelerator (the next phase, a caller's, a test's) chooses its own precision; the last phase
    # also forgets the (destroyed) process group
    AcceleratorState._reset_state(reset_partial_state=last)
    return done


def dry_run(config: str, depth: Optional[int] = None, gpus: int = 8, folder: Optional[str] = None,
            overrides: Sequence[str] = ()) -> list:
    """Train `config` at its real size (or at model.depth=depth) for 2 steps at batch 1 on synthetic data of its
    shape through uvic's Trainer (the config's precision and gradient checkpointing), resume from the
    checkpoint for one step, sample final/ in 2 steps; the printed rows (markdown). folder: where the data and
    the run go (default: a temporary folder, removed)."""
    given = list(overrides) + ([f"model.depth={depth}"] if depth else [])
    shipped = load_config(config, given)
    with tempfile.TemporaryDirectory(prefix="uvic-dry-run-") as tmp:
        root = Path(folder or _shared_folder() or tmp)
        processes = int(os.environ.get("WORLD_SIZE", "1"))  # batch 1 per process
        dry = _synthetic_data_once(shipped, root) + [f"train.batch_size={processes}", "train.grad_accum=1", "train.log_every=1",
                                                "train.sample_every=0", "train.checkpoint_every=0", "eval.fid_every=0"]
        cfg, dataset = resolve_data_config(load_config(config, given + dry))
        run = root / "run"
        first = _train_phase(cfg, run, dataset, 2, None, last=False)
        second = _train_phase(cfg, run, dataset, 3, "latest", last=False)
        cfg2 = cfg.copy()
        cfg2.train.batch_size = 2 * processes  # the working memory's per-sample part: batch 2 against batch 1
        batch_2 = _train_phase(cfg2, root / "run_batch_2", dataset, 2, None, last=True)
        name = f"{Path(config).stem}" + (f" depth {depth}" if depth else "") + (
            f" rank {second['rank']}" if second["processes"] > 1 else "")
        params = second["params"]
        shape = _sample_final(second["final"], cfg) if second["is_main"] else None
        rows = [f"{name}: {params} parameters ({params / 1e6:.1f}M), precision {second['precision']}, "
                f"gradient checkpointing {bool(cfg.model.gradient_checkpointing)}, "
                f"{second['processes']} process(es), L={sequence_length(cfg.model)} tokens",
                f"checkpoint written: {first['latest'].name} (step {first['step']}); resumed from "
                f"{second['resumed_from'].name} to step {second['step']}",
                "| config | step | seconds | peak RSS GiB | step peak - start GiB |", "|---|---|---:|---:|---:|"]
        rows += _step_rows(name, "train", first["measured"]) + _step_rows(name, "resumed", second["measured"])
        rows += _step_rows(name, "batch 2", batch_2["measured"])
        shards = second["processes"] if cfg.train.fsdp else 1  # FSDP: this process's gradients are one shard
        rows += _memory_rows(shipped, params, first["measured"][1], batch_2["measured"][1], gpus, shards)
        if shape is not None:
            rows.append(f"sampled final/ in 2 steps: images {shape}")
    return rows


def step_memory(params: int, rise_1: float, rise_2: float, shards: int = 1) -> tuple:
    """(fixed, per sample) bytes of a steady step from its resident-set rise at batch 1 and at batch 2 (AdamW states
    already there): the rise less the gradients it allocates again is fixed + batch · per sample. An upper bound:
    the gradients and the activations are counted as if both peaked at once (the backward frees the one as it
    makes the other); fixed is floored at 0. shards: the processes FSDP split the gradients over (1: whole)."""
    grads = STATE_BYTES["grads"] * params / shards
    per_sample = max(rise_2 - rise_1, 0.0)
    return max(rise_1 - grads - per_sample, 0.0), per_sample


def _memory_rows(shipped, params: int, step_2_batch_1: tuple, step_2_batch_2: tuple, gpus: int, shards: int) -> list:
    """The step's working memory from the resident-set rise of step 2 (AdamW states already there) of the batch-1
    run and of the batch-2 run (like with like: the same step of a fresh trainer), and the computed per-GPU memory
    at the shipped config's batch on `gpus` GPUs."""
    rise = [(peak - start) * 1024 for _, _, start, peak in (step_2_batch_1, step_2_batch_2)]
    fixed, per_sample = step_memory(params, *rise, shards=shards)
    t = shipped.train
    batch = t.batch_size // (gpus * t.grad_accum)
    memory = per_gpu_memory(params, fixed, per_sample, batch, gpus)
    return [f"step memory: {fixed / GiB:.3f} GiB fixed + {per_sample / GiB:.3f} GiB per sample (rise of step 2: "
            f"{rise[0] / GiB:.3f} GiB at batch 1, {rise[1] / GiB:.3f} at batch 2, less "
            f"{STATE_BYTES['grads'] * params / shards / GiB:.2f} GiB of gradients)",
            f"computed per-GPU memory at train.batch_size={t.batch_size} on {gpus} GPUs (per-GPU batch {batch}): "
            f"DDP {memory['ddp'] / GiB:.1f} GiB (rank 0, with the whole EMA: {memory['ddp_rank0'] / GiB:.1f}), "
            f"FSDP {memory['fsdp'] / GiB:.1f} GiB (rank 0: {memory['fsdp_rank0'] / GiB:.1f})"]


@command("python -m uvic.doctor")
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=DRY_RUN_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=None, help="config files (default: the shipped configs/*.yaml)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dry-run", metavar="CONFIG", help="build CONFIG at its real size and train, checkpoint, "
                        "resume and sample it on synthetic data (below)")
    parser.add_argument("--depth", type=int, default=None, help="--dry-run: model.depth=N instead of the config's")
    parser.add_argument("--gpus", type=int, default=8, help="--dry-run: GPUs of the computed per-GPU memory (default 8)")
    parser.add_argument("--dir", default=None, help="--dry-run: keep the synthetic data and the run here "
                        "(default: a temporary folder, removed)")
    parser.add_argument("overrides", nargs="*", help="--dry-run: dotted overrides, e.g. train.fsdp=true")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    if args.dry_run:
        print("\n".join(dry_run(args.dry_run, args.depth, args.gpus, args.dir, args.overrides)), flush=True)
        return
    paths = args.configs or sorted(glob.glob(CONFIG_GLOB))
    print("\n".join(versions() + lock_report() + gpus()))
    print("\n".join(config_rows(paths, torch.device(args.device))))


if __name__ == "__main__":
    exact_resident_set()  # a process of its own: the malloc settings stay out of callers' processes (tests)
    main()
