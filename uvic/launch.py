"""How a run was launched: the files its config names (checked before anything is built), its config file (a path
or a shipped config's name), the mixed precision the launcher and the config ask for, what the launch cannot run,
overrode or did not honour, how the global batch splits over processes, and the startup summary that says it all.

    check_inputs(cfg)               # train.init_from / init_reset, eval.fid_ref: one message naming the key
    batch_split(cfg.train, 1797, 2) # (per-process micro-batch, micro-batches per epoch) of the global batch
    find_config("digits_uvit")      # configs/digits_uvit.yaml, also from an installed copy
    run_summary(trainer)            # diffusers' "***** Running training *****" lines
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from accelerate.utils import DistributedType
from omegaconf import DictConfig

from .attention import resolve_cog_backend
from .config import MIXED_PRECISION
from .finetune import check_init_source
from .metric_inputs import check_reference
from .model import UViT

# ---------------------------------------------------------------------- the files a config names
def check_inputs(cfg: DictConfig) -> None:
    """The files a run's config names, checked where a run starts (train.py, the sweep) before anything is built:
    train.init_from / init_reset, and eval.fid_ref when the run measures FID. One line names the key."""
    check_init_source(cfg.train.init_from, list(cfg.train.init_reset or []))
    if cfg.eval.fid_every > 0:
        check_reference(cfg.eval.fid_ref, "eval.fid_ref")


# ---------------------------------------------------------------------- the config file
DEFAULT_CONFIG = "digits_uvic"


def config_dirs() -> List[Path]:
    """Where a config NAME is looked up: ./configs, the checkout's configs/ beside uvic/, and the copy an install
    puts in PREFIX/share/uvic/configs (setup.cfg data_files)."""
    return [Path("configs"), Path(__file__).resolve().parents[1] / "configs", Path(sys.prefix) / "share" / "uvic" / "configs"]


def find_config(name: Optional[str]) -> Path:
    """--config as given: a YAML path, else a shipped config's name looked up in config_dirs() (`digits_uvit`,
    `sweeps/digits_default`; `configs/digits_uvit.yaml` from any folder too)."""
    path = Path(name or DEFAULT_CONFIG)
    if path.is_file():
        return path
    relative = Path(*path.parts[1:]) if path.parts[0] == "configs" and len(path.parts) > 1 else path
    if relative.suffix not in (".yaml", ".yml"):
        relative = relative.with_name(relative.name + ".yaml")
    if not path.is_absolute():
        for folder in config_dirs():
            if (folder / relative).is_file():
                return folder / relative
    where = ", ".join(str(d) for d in config_dirs())
    raise FileNotFoundError(f"no config {name or DEFAULT_CONFIG!r}: neither a file nor a shipped config name "
                            f"(looked in {where}); give a YAML path or a name such as digits_uvic")


def default_config_path() -> Path:
    return find_config(None)


# ---------------------------------------------------------------------- launch settings and the startup summary
PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"  # set by `accelerate launch` (--mixed_precision, or its config file)


def resolve_mixed_precision(configured: str, on_cpu: bool) -> Tuple[str, str]:
    """(precision to train in, where it came from). The launcher's ACCELERATE_MIXED_PRECISION wins over
    train.mixed_precision, except "no": accelerate launch sets that by default, so it cannot mean "off".
    fp16 on the CPU is refused: accelerate has neither fp16 autocast nor a GradScaler there and would train in
    float32 without a word."""
    launched = os.environ.get(PRECISION_ENV, "").strip().lower()
    precision, source = configured, f"train.mixed_precision={configured}"
    if launched and launched != "no":
        if launched not in MIXED_PRECISION:
            raise ValueError(f"{PRECISION_ENV}={launched} (accelerate launch --mixed_precision): uvic trains with "
                             f"{' / '.join(MIXED_PRECISION)}")
        precision = launched
        source = f"{PRECISION_ENV}={launched} from the launcher" + (
            f", overriding train.mixed_precision={configured}" if configured != launched else "")
    elif launched == "no" and configured != "no":
        source += f" ({PRECISION_ENV}=no is accelerate launch's default and does not turn it off)"
    if precision == "fp16" and on_cpu:
        raise ValueError(f"mixed precision fp16 ({source}) on the CPU: accelerate has no fp16 autocast or GradScaler "
                         "there and would silently train in float32; use bf16 or no")
    return precision, source


def launch_notes(num_processes: int, precision: str, source: str) -> List[str]:
    """One line for each launch setting that was overridden or not honoured, or is costly."""
    notes = []
    if "overriding" in source:
        notes.append(f"mixed precision: {precision} ({source})")
    if precision == "bf16" and not torch.cuda.is_available():
        notes.append("mixed precision bf16 on the CPU: bfloat16 autocast is emulated on CPUs without native bf16 "
                     "(AMX / AVX512-BF16) and is then slower than float32; train.mixed_precision=no trains faster there")
    # accelerate's simple launcher (no --multi_gpu) exports MASTER_ADDR for --num_processes > 1 but runs the script once
    if num_processes == 1 and os.environ.get("MASTER_ADDR") and "WORLD_SIZE" not in os.environ and \
            PRECISION_ENV in os.environ:
        notes.append("accelerate launch --num_processes N started ONE process (without --multi_gpu accelerate runs "
                     "the script once); for N processes on the CPU use `accelerate launch --multi_gpu --num_processes N "
                     "train.py` (gloo) or `torchrun --nproc_per_node N train.py`")
    return notes


def check_launch(t: DictConfig, accelerator, fsdp: bool, precision: str, source: str) -> None:
    """What this launch cannot run (t: cfg.train), refused before anything is built; what it overrode or costs,
    said; train.cpu_threads applied on a CPU."""
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError("uvic shards the model itself (train.fsdp=true): launch with a multi-GPU accelerate config "
                         "(configs/accelerate/fsdp_h.yaml), not accelerate's distributed_type: FSDP")
    if fsdp and (t.compile or precision == "fp16"):
        raise ValueError("train.fsdp=true supports mixed precision no or bf16, without train.compile; "
                         f"got mixed_precision={precision} ({source}), compile={t.compile}")
    for line in launch_notes(accelerator.num_processes, precision, source):
        accelerator.print(line)  # what the launcher asked for and did not get, or costs: before the work
    if t.cpu_threads and accelerator.device.type == "cpu":
        torch.set_num_threads(t.cpu_threads)


def batch_split(t: DictConfig, num_examples: int, processes: int) -> Tuple[int, int]:
    """(per-process micro-batch, micro-batches per epoch) of the global t.batch_size (t: cfg.train) over
    processes x t.grad_accum, for a data set of num_examples."""
    if t.batch_size % (processes * t.grad_accum):
        raise ValueError(
            f"train.batch_size={t.batch_size} (the global batch) must be divisible by processes ({processes}) "
            f"x train.grad_accum ({t.grad_accum}) = {processes * t.grad_accum}"
        )
    per_process = t.batch_size // (processes * t.grad_accum)
    per_epoch = (num_examples // processes) // per_process
    if per_epoch < 1:
        raise ValueError(
            f"the data set has {num_examples} examples, fewer than one global batch "
            f"(train.batch_size={t.batch_size}); lower train.batch_size"
        )
    return per_process, per_epoch


def attention_summary(cfg: DictConfig, model: UViT, batch: int, device: torch.device, precision: str) -> str:
    """Which attention each kind of block runs and, for Cog blocks, the backend `auto` picks at the training shape."""
    layout = model.attention_layout()
    cog = [i for i, kind in enumerate(layout) if kind == "cog"]
    if not cog:
        return "softmax (PyTorch SDPA) in every block"
    m = cfg.model
    length = model.pos_embed.shape[1]  # tokens: time, label / text, patches
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    q = torch.zeros(1, m.num_heads, 1, m.embed_dim // m.num_heads, device=device, dtype=dtype)  # (B, H, L, D)
    train = resolve_cog_backend(q, q, q.clone().requires_grad_())
    with torch.no_grad():
        infer = resolve_cog_backend(q, q, q)
    softmax = [i for i in range(len(layout)) if i not in cog]
    return (f"Cog in blocks {cog} via {train} (training) / {infer} (grids, FID), softmax (SDPA) in {softmax}; "
            f"shape (B={batch}, H={m.num_heads}, L={length}, D={m.embed_dim // m.num_heads}), "
            f"{str(dtype).replace('torch.', '')}")


def run_summary(trainer) -> List[str]:
    """diffusers' "***** Running training *****" block: everything a launch setting can silently change."""
    t, accelerator, n = trainer.cfg.train, trainer.accelerator, trainer.accelerator.num_processes
    parallel = "FSDP2 (train.fsdp=true)" if trainer.fsdp else "DDP" if n > 1 else "none"
    ignored = "; train.fsdp=true ignored: one process has nothing to shard" if t.fsdp and n == 1 else ""
    params = sum(p.numel() for p in trainer.raw_model.parameters())
    start = (f"step {trainer.step} (resumed from {trainer.resume_from})" if trainer.resume_from is not None
             else "step 0 (a new run)")
    rows = [
        ("device", str(accelerator.device)),
        ("parallelism", f"{parallel} over {n} process{'es' if n > 1 else ''} ({accelerator.distributed_type.value}, "
                        f"{accelerator.device.type}){ignored}"),
        ("mixed precision", f"{trainer.mixed_precision} ({trainer.precision_source})"),
        ("batch per device", f"{trainer.per_process_batch} (micro-batch) x grad_accum {t.grad_accum}"),
        ("global batch", f"{t.batch_size} = {n} process{'es' if n > 1 else ''} x {t.grad_accum} x {trainer.per_process_batch} "
                         "(train.batch_size is the global batch)"),
        ("examples", f"{len(trainer.dataset)} ({trainer.batches_per_epoch} micro-batches per process per epoch)"),
        ("parameters", f"{params:,}"),
        ("steps", f"{t.steps} optimizer steps, from {start}"),
        ("attention", attention_summary(trainer.cfg, trainer.raw_model, trainer.per_process_batch,
                                        accelerator.device, trainer.mixed_precision)),
        ("run folder", str(trainer.out)),
    ]
    return ["***** Running training *****"] + [f"  {key}: {value}" for key, value in rows]
