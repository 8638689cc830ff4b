"""The accelerate training loop: data, U-ViT/U-ViC, diffusion loss, EMA, checkpoints, logs, grids.

    python train.py --config configs/digits_uvic.yaml train.lr=1e-4 --output-dir runs/x [--resume latest | --overwrite]

One run writes one folder (layout and reuse rules: uvic.runs.RunDir).

train.batch_size is the GLOBAL batch: each optimizer step sees batch_size images, split over
processes x grad_accum micro-batches. A resumed run ends with the same weights as an
uninterrupted one: checkpoints hold the RNG states and the step, and the data order is a
function of (seed, epoch), so the data position follows from the step.

train.fsdp=true shards the model with FSDP2 (`shard`): weights, gradients, AdamW and EMA states are DTensor
shards; grids, FID, checkpoints' model/ and ema_model/ and final/ gather whole tensors on the main process.

Faults (README "Failures and recovery"): a step whose loss or gradient norm is non-finite on any
process is skipped (no optimizer or EMA update) and counted; train.max_nonfinite_steps in a row stop
the run with NonFiniteLossError. Checkpoints and final/ are never written with non-finite weights,
nor when the disk lacks the space (DiskFullError). Resuming unpickles nothing but plain tensors and
numbers (torch.load weights_only=True): the step and EMA counters are JSON, the EMA weights
safetensors.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm.auto import tqdm

from .attention import check_cog_kernels
from .cli import run_main
from .config import MIXED_PRECISION, load_config, model_kwargs, save_config
from .data import resolve_data_config
from .diffusion import build_scheduler, diffusion_loss, drop_labels
from .finetune import check_init_source
from .metric_inputs import check_reference
from .model import UViT
from .pipeline import UViCPipeline, make_scheduler, save_grid
from .runs import (CONFIG, MANIFEST, TRAIN_STATE, CheckpointError, DiskFullError, RunDir, RunLock, atomic_write,
                   checkpoint_name, disk_full_message, free_space, manifest_size, record_provenance, write_manifest)

RUN_SUMMARY = "run_summary.txt"  # the startup summary (run_summary), rewritten by every start or resume
OPTIMIZER_SHARDS = "optimizer_shard_{}.safetensors"  # train.fsdp: one per process (its AdamW state shards)
LR_SCHEDULE_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


METRICS_COLUMNS = ["step", "metric", "value", "scheduler", "steps", "guidance"]  # metrics.csv


class FixedDecayEMA(EMAModel):
    """U-ViT's EMA (train.ema_warmup: false): θ_ema ← d θ_ema + (1 − d) θ from the first step, d fixed.

    Kept rather than EMAModel(decay=d, min_decay=d): that one's get_decay returns 0 at the first update (the EMA
    becomes a copy of θ_1), where U-ViT's first update is d θ_0 + (1 − d) θ_1."""

    def get_decay(self, optimization_step: int) -> float:
        return self.decay


def shard(model: UViT, processes: int, mixed_precision: str) -> UViT:
    """FSDP2 in place (torch fully_shard): one unit per transformer Block, then the rest; each parameter becomes a
    DTensor split along dim 0 over the processes. bf16: compute in bf16, gradients reduced and kept in float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from .model import Block

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (processes,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if mixed_precision == "bf16" else None,
                                  reduce_dtype=torch.float32)
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def plain_tensor(value) -> torch.Tensor:
    """A value from accelerate / torch.distributed as one whole plain tensor, whichever form this version returns:
    a replicated DTensor (clip_grad_norm_ under FSDP2 in accelerate <= 1.15), a plain tensor (1.16+, DDP, one
    process) or a Python number; None (a norm not computed) as 0."""
    if value is None:
        return torch.zeros(())
    full_tensor = getattr(value, "full_tensor", None)  # torch.distributed.tensor.DTensor
    return full_tensor() if callable(full_tensor) else torch.as_tensor(value)


def shard_of(full: torch.Tensor, like) -> torch.Tensor:
    """This process's shard (a local tensor) of the whole tensor `full`, split as the DTensor `like` is."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None).to_local()


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


def attention_summary(cfg: DictConfig, model: UViT, batch: int, device: torch.device, precision: str) -> str:
    """Which attention each kind of block runs and, for Cog blocks, the backend `auto` picks at the training shape."""
    from .attention import resolve_cog_backend

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


def run_summary(trainer: "Trainer") -> List[str]:
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


class EpochSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch, drop_last) that can start `skip` indices into an epoch."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class NonFiniteLossError(ValueError):
    """Training diverged: the loss or gradient norm stayed non-finite (an expected error: one message)."""


class TrainingStopped(Exception):
    """Training ended early on SIGTERM, its state checkpointed (train.py exits with 128 + 15)."""


class EvaluationError(ValueError):
    """A sample grid or FID during training failed; its step's checkpoint was written first (one message)."""


class TrainState:
    """The counters a checkpoint keeps beside accelerate's state, saved as JSON (train_state.json).

    step: optimizer steps taken (skipped ones included: the data position follows from it);
    nonfinite_steps: steps skipped for a non-finite loss or gradient norm, in all and in a row;
    ema_optimization_step: the EMA's own counter (its decay warm-up).
    """

    def __init__(self):
        self.step = 0
        self.nonfinite_steps = 0
        self.nonfinite_in_a_row = 0
        self.ema_optimization_step = 0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        for key in vars(self):
            setattr(self, key, int(state[key]))


class Trainer:
    """Builds everything from a config, checks it before any training, then `train()`.

    resume: None (fresh run, or the continuation of this config's run in output_dir), "latest"
    (newest intact checkpoint of output_dir, or a fresh run if there is none) or a checkpoint /
    run folder; overwrite: start over in output_dir, deleting its run artifacts (RunDir.prepare has
    the rules). dataset: the training set from `resolve_data_config(cfg)`, built here when None.
    """

    def __init__(self, cfg: DictConfig, output_dir, resume: Optional[str] = None, cpu: Optional[bool] = None,
                 overwrite: bool = False, dataset=None):
        if dataset is None:
            cfg, dataset = resolve_data_config(cfg)
        self.cfg, self.dataset, t = cfg, dataset, cfg.train
        self.run = RunDir(output_dir)
        self.out = self.run.path
        if cpu is None:  # no GPU: accelerate's CPU mode (gloo when launched with torchrun)
            cpu = not torch.cuda.is_available()
        on_cpu = cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        # the launcher's precision (accelerate launch --mixed_precision / its config) wins over the config's
        self.mixed_precision, self.precision_source = resolve_mixed_precision(t.mixed_precision, on_cpu)
        self.accelerator = accelerator = Accelerator(
            mixed_precision=self.mixed_precision,
            gradient_accumulation_steps=t.grad_accum,
            step_scheduler_with_optimizer=False,  # one LR step per optimizer step, whatever the process count
            cpu=cpu,
        )
        self.is_main = accelerator.is_main_process
        # parameters, gradients, AdamW and EMA states are DTensor shards (uvic.trainer.shard); one process has
        # nothing to shard (the H configs set train.fsdp: true and still train on one GPU)
        self.fsdp = bool(t.fsdp) and accelerator.num_processes > 1
        if accelerator.distributed_type == DistributedType.FSDP:
            raise ValueError("uvic shards the model itself (train.fsdp=true): launch with a multi-GPU accelerate config "
                             "(configs/accelerate/fsdp_h.yaml), not accelerate's distributed_type: FSDP")
        if self.fsdp and (t.compile or self.mixed_precision == "fp16"):
            raise ValueError("train.fsdp=true supports mixed precision no or bf16, without train.compile; "
                             f"got mixed_precision={self.mixed_precision} ({self.precision_source}), compile={t.compile}")
        for line in launch_notes(accelerator.num_processes, self.mixed_precision, self.precision_source):
            accelerator.print(line)  # what the launcher asked for and did not get, or costs: before the work
        if t.cpu_threads and accelerator.device.type == "cpu":
            torch.set_num_threads(t.cpu_threads)
        self.per_process_batch, self.batches_per_epoch = self._batch_split(accelerator.num_processes)
        self.conditional = bool(cfg.data.conditional)
        self.null_label = cfg.model.num_classes - 1 if self.conditional else None
        # text-to-image (caption latents): the empty prompt's features (L, D), the context dropped to
        self.empty_context = getattr(self.base_dataset, "empty_context", None)
        if self.empty_context is not None and cfg.eval.fid_every:
            raise ValueError("eval.fid_every applies to class-conditional and unconditional models; for text-to-image "
                             "FID-30K sample captions with `sample.py MODEL --prompts FILE --num-samples N` and score "
                             "them with eval_fid.py; set eval.fid_every=0")
        self.lock = RunLock(self.out) if self.is_main else None  # one trainer per run folder
        with self.holding_lock():  # also while the folder is checked, cleared and its config written
            self._init_run(cfg, resume, overwrite)

    def _init_run(self, cfg: DictConfig, resume: Optional[str], overwrite: bool) -> None:
        """The run folder checked (RunDir.prepare), the model built and restored, the folder written."""
        t, accelerator = cfg.train, self.accelerator
        self.resume_from = self.run.prepare(cfg, resume, overwrite, log=accelerator.print)

        set_seed(t.seed)  # identical initial weights on every process
        self._build_model()
        self.state = TrainState()  # saved by save_checkpoint as JSON, never pickled
        self.sampler, self.loader = self._build_loader()
        if self.resume_from is None:
            set_seed(t.seed, device_specific=True)  # each process draws its own noise and timesteps
        else:  # weights, optimizer, LR schedule, EMA, counters and every RNG state
            self.load_checkpoint(self.resume_from)
        if self.is_main:  # the run folder, once the checkpoint loaded: a refused one changes nothing
            with disk_full_message(self.out):
                if overwrite:
                    self.run.clear()
                self.out.mkdir(parents=True, exist_ok=True)
                self.run.remove_temporaries(log=accelerator.print)
                save_config(cfg, self.out / CONFIG)
                self.run.mark()
                record_provenance(self.out, new_run=self.resume_from is None)  # the code behind the numbers
        accelerator.wait_for_everyone()
        self.summary = run_summary(self)  # printed once and kept in the run folder (run_summary.txt)
        accelerator.print("\n".join(self.summary))
        if self.is_main:
            with disk_full_message(self.out):
                text = "\n".join(self.summary) + "\n"
                atomic_write(self.out / RUN_SUMMARY, lambda f: f.write(text.encode()))
        self.writer = None
        self._vae = None  # latent data: the decoder, loaded on first use

    def _build_model(self) -> None:
        """The noise scheduler, UViT, its EMA, AdamW and the LR schedule (prepared by accelerate)."""
        cfg, t = self.cfg, self.cfg.train
        self.noise_scheduler = build_scheduler(cfg.diffusion)
        self.raw_model = UViT(**model_kwargs(cfg))
        if t.init_from and self.resume_from is None:  # fine-tuning; the EMA below starts from these weights too
            from .finetune import load_init_weights

            fresh = load_init_weights(self.raw_model, t.init_from, list(t.init_reset or []))
            self.accelerator.print(f"initial weights from {t.init_from}" + (f"; re-initialised {', '.join(fresh)}"
                                                                            if fresh else ""))
        if cfg.model.gradient_checkpointing:
            self.raw_model.enable_gradient_checkpointing()
        if self.fsdp:  # whole weights are gathered into this copy (grids, FID, saving), on the main process only
            self.raw_model.to(self.accelerator.device)
            self.ema_model = copy.deepcopy(self.raw_model).eval().requires_grad_(False) if self.is_main else None
            shard(self.raw_model, self.accelerator.num_processes, self.mixed_precision)
        optimizer = torch.optim.AdamW(
            self.raw_model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, eps=t.adam_eps
        )
        lr_scheduler = get_scheduler(
            LR_SCHEDULE_NAMES[t.lr_schedule], optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.steps
        )
        train_model = torch.compile(self.raw_model) if t.compile else self.raw_model
        if self.fsdp:  # accelerate sees the LR schedule only: the optimizer's state is saved as shards here
            self.model, self.optimizer = self.raw_model, optimizer
            self.lr_scheduler = self.accelerator.prepare(lr_scheduler)
        else:
            self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(train_model, optimizer, lr_scheduler)
        # under FSDP raw_model's parameters are now DTensor shards, and so are the EMA's shadow copies of them
        self.ema = (EMAModel if t.ema_warmup else FixedDecayEMA)(self.raw_model.parameters(), decay=t.ema_decay, update_after_step=t.ema_update_after_step,
                            model_cls=UViT, model_config=self.raw_model.config)
        if not self.fsdp:
            self.ema_model = copy.deepcopy(self.raw_model).eval().requires_grad_(False)  # EMA weights go here

    def _build_loader(self) -> Tuple[EpochSampler, DataLoader]:
        """Data order = f(seed, epoch): never touches the global RNG."""
        d, seed, accelerator = self.cfg.data, self.cfg.train.seed, self.accelerator
        sampler = EpochSampler(self.dataset, accelerator.num_processes, accelerator.process_index, seed=seed)
        loader = DataLoader(
            self.dataset,
            batch_size=self.per_process_batch,
            sampler=sampler,
            drop_last=True,
            num_workers=d.num_workers,
            pin_memory=d.pin_memory,
            persistent_workers=d.persistent_workers and d.num_workers > 0,
            generator=torch.Generator().manual_seed(seed),
        )
        return sampler, loader

    def _batch_split(self, processes: int) -> Tuple[int, int]:
        """(per-process micro-batch, micro-batches per epoch) of the global train.batch_size."""
        t = self.cfg.train
        if t.batch_size % (processes * t.grad_accum):
            raise ValueError(
                f"train.batch_size={t.batch_size} (the global batch) must be divisible by processes ({processes}) "
                f"x train.grad_accum ({t.grad_accum}) = {processes * t.grad_accum}"
            )
        per_process = t.batch_size // (processes * t.grad_accum)
        per_epoch = (len(self.dataset) // processes) // per_process
        if per_epoch < 1:
            raise ValueError(
                f"the data set has {len(self.dataset)} examples, fewer than one global batch "
                f"(train.batch_size={t.batch_size}); lower train.batch_size"
            )
        return per_process, per_epoch

    @property
    def base_dataset(self):
        """The training set without a `data.limit` Subset around it."""
        return self.dataset.dataset if isinstance(self.dataset, Subset) else self.dataset

    # ------------------------------------------------------------------ the loop
    @property
    def step(self) -> int:
        return self.state.step

    def batches(self, start: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Micro-batches from micro-batch index `start` on, forever (epoch e is shuffled by seed + e)."""
        epoch, offset = divmod(start, self.batches_per_epoch)
        device = self.accelerator.device
        while True:
            self.sampler.set_epoch(epoch)
            self.sampler.skip = offset * self.per_process_batch
            for images, labels in self.loader:
                yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            epoch, offset = epoch + 1, 0

    def compute_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of one micro-batch: images (b, C, H, W) in [-1, 1], labels (b,)."""
        if self.cfg.data.random_flip:
            flip = torch.rand(images.shape[0], device=images.device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        if self.empty_context is not None:  # labels: the captions' context (b, L, D)
            from .caption_latents import drop_context

            context = drop_context(labels, self.cfg.diffusion.p_uncond, self.empty_context)
            return diffusion_loss(self.model, self.noise_scheduler, images, None, self.cfg.diffusion.snr_gamma,
                                  encoder_hidden_states=context)
        class_labels = None
        if self.conditional:
            class_labels = drop_labels(labels, self.cfg.diffusion.p_uncond, self.null_label)
        return diffusion_loss(self.model, self.noise_scheduler, images, class_labels, self.cfg.diffusion.snr_gamma)

    def optimizer_step(self, nonfinite_losses: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """The optimizer step, unless this step's loss (any micro-batch) or gradient norm is non-finite on
        any process: the same decision everywhere. Returns whether the weights changed.

        With fp16's GradScaler an inf/NaN gradient is the scaler's business (it skips the step and lowers
        its scale, and that is not counted here); a non-finite loss is counted either way.
        """
        scaler = self.accelerator.scaler
        flag = nonfinite_losses.float()
        if scaler is None:
            flag = flag + (~torch.isfinite(grad_norm)).float().to(flag.device)
        skip = self.accelerator.reduce(flag, reduction="sum").item() > 0
        if skip:
            self.state.nonfinite_steps += 1
            self.state.nonfinite_in_a_row += 1
            if scaler is not None:  # gradients were unscaled for clipping: close the scaler's step
                scaler.update()
            return False
        self.state.nonfinite_in_a_row = 0
        self.optimizer.step()
        return not (scaler is not None and self.optimizer.step_was_skipped)

    def stop_nonfinite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Raise NonFiniteLossError: where training diverged, what is left and what to try."""
        t = self.cfg.train
        latest = self.run.latest()
        last_good = f"the last good checkpoint is {latest}" if latest is not None else "no checkpoint was written yet"
        precision = " or train.mixed_precision=bf16 instead of fp16" if t.mixed_precision == "fp16" else ""
        raise NonFiniteLossError(
            f"training stopped at step {self.step}: the loss or gradient norm was non-finite for "
            f"{self.state.nonfinite_in_a_row} steps in a row (train.max_nonfinite_steps={t.max_nonfinite_steps}; "
            f"last loss {float(loss)}, gradient norm {float(grad_norm)}); those steps were skipped and nothing "
            f"was saved after them; {last_good}. Try a lower train.lr (now {t.lr}), gradient clipping "
            f"train.max_grad_norm (now {t.max_grad_norm}){precision}, then continue with --resume latest and the "
            f"changed values (they are applied on resume)"
        )

    def weights_finite(self) -> bool:
        """Whether the model and EMA weights are all finite, on every process."""
        params = [p.detach() for p in self.raw_model.parameters()] + list(self.ema.shadow_params)
        if self.fsdp:  # each process checks its own shards
            params = [p.to_local() for p in params]
        bad = torch.stack([(~torch.isfinite(p)).any() for p in params]).any().float()
        return self.accelerator.reduce(bad, reduction="sum").item() == 0

    def check_weights_finite(self, what: str) -> None:
        if not self.weights_finite():
            latest = self.run.latest()
            raise NonFiniteLossError(
                f"the weights are non-finite at step {self.step}: {what} not written; the last good checkpoint is "
                f"{latest if latest is not None else 'none'}. Try a lower train.lr (now {self.cfg.train.lr}) or "
                f"train.max_grad_norm, then --resume latest"
            )

    def check_free_space(self, folder: Path) -> None:
        """Fail before a checkpoint the disk cannot hold (size estimated from the last one, or the weights)."""
        short = torch.zeros((), device=self.accelerator.device)
        message = ""
        if self.is_main:
            latest = self.run.latest()
            size = manifest_size(latest) if latest is not None else None
            if size is None:  # accelerate's model + optimizer (2 moments) + model/ + ema_model/, in float32
                size = 5 * 4 * sum(p.numel() for p in self.raw_model.parameters())
            need = int(size * 1.1) + (1 << 20)
            root = next(p for p in (folder, *folder.parents) if p.exists())
            free = free_space(root)
            if free < need:
                short += 1
                message = (f"disk full: checkpoint {folder.name} needs about {need / 1e6:.1f} MB but {root} has "
                           f"{free / 1e6:.1f} MB free; free space there (or lower train.keep_checkpoints, or choose "
                           f"another --output-dir) and rerun the same command: it continues from "
                           f"{latest if latest is not None else 'the start (no checkpoint yet)'}")
        if self.accelerator.reduce(short, reduction="sum").item() > 0:
            raise DiskFullError(message or f"disk full on the main process writing {folder}")

    def on_step_end(self, step: int) -> None:
        """Called after every optimizer step (a hook for subclasses: extra logging, early stops)."""

    @contextlib.contextmanager
    def holding_lock(self) -> Iterator[None]:
        """The run folder's RunLock on the main process (another trainer there: RunLockedError)."""
        if self.lock is None:
            yield
            return
        with self.lock:
            yield

    @contextlib.contextmanager
    def stop_on_sigterm(self) -> Iterator[None]:
        """The first SIGTERM (what schedulers send before a kill) asks the loop to checkpoint and stop after the
        step in progress; a second one ends the process at once. Only the main thread can install handlers."""
        self.stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            if self.stop_signal is not None:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            self.stop_signal = signum

        previous = signal.signal(signal.SIGTERM, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def stop_requested(self) -> bool:
        """Whether any process got SIGTERM (the same answer everywhere: all of them checkpoint together)."""
        if self.accelerator.num_processes == 1:  # no tensor: no device synchronisation per step
            return self.stop_signal is not None
        flag = torch.tensor(float(self.stop_signal is not None), device=self.accelerator.device)
        return self.accelerator.reduce(flag, reduction="sum").item() > 0

    def stop_with_checkpoint(self) -> None:
        """SIGTERM: this step's checkpoint (unless just written), then TrainingStopped."""
        saved = self.run.checkpoint(self.step)
        if self.step not in self.run.checkpoints():
            saved = self.save_checkpoint()
        if self.writer is not None:
            self.writer.close()
        raise TrainingStopped(f"stopped by SIGTERM at step {self.step}: checkpoint {saved} written; rerun the same "
                              f"command to continue from it")

    def train(self) -> Path:
        """Train to train.steps; returns the final/ pipeline folder. SIGTERM: TrainingStopped after a checkpoint."""
        with self.holding_lock(), self.stop_on_sigterm(), disk_full_message(self.out):
            return self._train()

    def _train(self) -> Path:
        t, accelerator = self.cfg.train, self.accelerator
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "logs"))
        max_norm = t.max_grad_norm if t.max_grad_norm is not None else math.inf
        batches = self.batches(self.step * t.grad_accum)
        progress = tqdm(total=t.steps, initial=self.step, disable=not self.is_main, desc="train", dynamic_ncols=True)
        device = accelerator.device
        loss_sum, loss_count = torch.zeros((), device=device), torch.zeros((), device=device)  # finite losses only
        tick, tick_step = time.perf_counter(), self.step
        grad_norm = torch.zeros(())
        self.model.train()
        for line in check_cog_kernels(self.raw_model, device, t.mixed_precision):  # before step 0
            accelerator.print(line)
        while self.step < t.steps:
            nonfinite_losses = torch.zeros((), device=device)  # this step's micro-batches, this process
            stepped = False
            for _ in range(t.grad_accum):
                images, labels = next(batches)
                with accelerator.accumulate(self.model):
                    loss = self.compute_loss(images, labels)
                    accelerator.backward(loss)
                    loss = loss.detach().float()
                    finite = torch.isfinite(loss)
                    nonfinite_losses += ~finite
                    if accelerator.sync_gradients:
                        grad_norm = plain_tensor(accelerator.clip_grad_norm_(self.model.parameters(), max_norm))
                        stepped = self.optimizer_step(nonfinite_losses, grad_norm)
                    if accelerator.sync_gradients or not self.fsdp:  # (accelerate's optimizer wrapper does this)
                        self.optimizer.zero_grad(set_to_none=True)
                loss_sum += torch.where(finite, loss, 0.0)
                loss_count += finite
            self.lr_scheduler.step()  # the LR follows the step counter, skipped steps included
            if stepped:
                self.ema.step(self.raw_model.parameters())
            self.state.step += 1
            step = self.step
            progress.update(1)
            if self.state.nonfinite_in_a_row >= t.max_nonfinite_steps:
                self.stop_nonfinite(loss, grad_norm)

            if step % t.log_every == 0 or step == t.steps:
                total, count = accelerator.reduce(torch.stack([loss_sum, loss_count]), reduction="sum").tolist()
                mean_loss = total / count if count else math.nan
                elapsed = time.perf_counter() - tick
                images_per_s = (step - tick_step) * t.batch_size / max(elapsed, 1e-9)
                lr = self.lr_scheduler.get_last_lr()[0]
                if self.is_main:
                    scalars = (("loss", mean_loss), ("lr", lr), ("grad_norm", float(grad_norm)),
                               ("images_per_s", images_per_s), ("nonfinite_steps", self.state.nonfinite_steps))
                    for name, value in scalars:
                        self.writer.add_scalar(f"train/{name}", value, step)
                    progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}",
                                         **({"skipped": self.state.nonfinite_steps} if self.state.nonfinite_steps else {}))
                loss_sum.zero_()
                loss_count.zero_()
                tick, tick_step = time.perf_counter(), step
            done = step == t.steps
            self.evaluate(step, done)
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or done:
                self.save_checkpoint()
            self.on_step_end(step)
            if self.stop_requested():
                progress.close()
                self.stop_with_checkpoint()
        progress.close()
        final = self.save_final()
        if self.writer is not None:
            self.writer.close()
        accelerator.end_training()
        return final

    # ------------------------------------------------------------------ EMA artifacts
    def gather_ema(self) -> None:
        """FSDP: gather the EMA shards into the main process's full ema_model, one parameter at a time (every
        process must call it; no process holds more than one whole parameter beside its shards). Else nothing."""
        if self.fsdp:
            self.gather_into_ema_model(self.ema.shadow_params)

    def gather_into_ema_model(self, shards) -> None:
        """FSDP: copy the whole tensors of `shards` (DTensors, raw_model's parameter order) into the main
        process's ema_model (a collective: every process calls it)."""
        targets = list(self.ema_model.parameters()) if self.is_main else [None] * len(shards)
        with torch.no_grad():
            for shard, target in zip(shards, targets):
                full = shard.full_tensor()  # all-gather of one parameter
                if target is not None:
                    target.copy_(full)
                del full

    def ema_pipeline(self, scheduler_name: Optional[str] = None, decode: bool = True) -> UViCPipeline:
        """UViCPipeline of the current EMA weights; the training scheduler or a named sampler.

        decode: for latent data, attach the VAE the latents came from (loaded once), so grids,
        FID and final/ see images.
        """
        if not self.fsdp:  # under FSDP every process called gather_ema() first
            self.ema.copy_to(self.ema_model.parameters())
        scheduler = self.noise_scheduler if scheduler_name is None else make_scheduler(scheduler_name, self.noise_scheduler.config)
        pipe = UViCPipeline(transformer=self.ema_model, scheduler=scheduler)
        if decode and self.cfg.data.name == "latents":
            if self._vae is None:
                from .latents import attach_vae  # the latents part; needed only for latent data

                source = self.dataset.dataset if isinstance(self.dataset, Subset) else self.dataset
                attach_vae(pipe, source, scale_factor=self.cfg.data.scale_factor)
                self._vae = pipe.vae.to(self.accelerator.device)
            pipe.register_modules(vae=self._vae)
        if self.empty_context is not None:
            pipe.set_empty_context(self.empty_context)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def attach_text_encoder(self, pipe: UViCPipeline) -> UViCPipeline:
        """Text-to-image: give the pipeline the extraction's copy of the text encoder (final/ then samples
        from prompts); without one it keeps only the empty context (prompt_embeds still work)."""
        path = getattr(self.base_dataset, "text_encoder_path", None)
        if self.empty_context is None or path is None:
            return pipe
        pipe.attach_text_encoder(path)  # the extraction's copy (tokenizer/, text_encoder/)
        return pipe

    def grid_prompt_embeds(self, num: int) -> torch.Tensor:
        """Text-to-image grids: the first caption of training images 0, 1, ... (num, L, D), fixed over steps."""
        data = self.base_dataset
        return torch.stack([data.contexts(i % len(self.dataset))[0] for i in range(num)])

    def grid_labels(self) -> Tuple[int, Optional[torch.Tensor]]:
        """(number of images, labels): class-conditional grids have one class per row of 8."""
        if not self.conditional:
            return self.cfg.train.sample_num, None
        classes = self.null_label
        rows = torch.linspace(0, classes - 1, min(classes, 10)).round().long()
        return len(rows) * 8, rows.repeat_interleave(8)

    def save_sample_grid(self) -> Optional[Path]:
        self.gather_ema()
        if self.is_main:
            t = self.cfg.train
            num, labels = self.grid_labels()
            pipe = self.ema_pipeline(t.sample_scheduler)
            generator = torch.Generator().manual_seed(t.sample_seed)  # fixed noise: grids comparable over steps
            text = {} if self.empty_context is None else {"prompt_embeds": self.grid_prompt_embeds(num)}
            images = pipe(
                batch_size=num,
                num_inference_steps=t.sample_steps,
                class_labels=labels,
                **text,
                guidance_scale=t.sample_guidance,
                generator=generator,
                output_type="pt",
            ).images  # (N, C, H, W) in [0, 1]
            save_grid(images.float().cpu(), self.out / "samples" / f"{checkpoint_name(self.step)}.png", nrow=8, padding=1)
            self.writer.add_images("samples", images.float().cpu(), self.step)
        self.accelerator.wait_for_everyone()

    def evaluate(self, step: int, done: bool) -> None:
        """This step's sample grid and FID, when due. A failure there (a reference gone, a sampler that cannot
        run, memory) first writes this step's checkpoint, so nothing trained is lost, then stops the run with
        EvaluationError; --resume latest continues from this step."""
        t, e = self.cfg.train, self.cfg.eval
        try:
            if (t.sample_every and step % t.sample_every == 0) or done:
                self.save_sample_grid()
            if e.fid_every and (step % e.fid_every == 0 or done):
                self.evaluate_fid()
        except (NonFiniteLossError, DiskFullError):
            raise
        except Exception as err:
            saved = self.save_checkpoint()
            raise EvaluationError(
                f"evaluation at step {step} failed ({type(err).__name__}: {' '.join(str(err).split())[:400]}); "
                f"the weights of step {step} were saved first ({saved}); fix the cause (train.sample_*, eval.*) "
                f"and continue with --resume latest") from err

    def evaluate_fid(self) -> None:
        e = self.cfg.eval
        self.gather_ema()
        if self.is_main:
            from .metrics import pipeline_fid  # another part of uvic; needed only here

            fid = pipeline_fid(
                self.ema_pipeline(),
                num_samples=e.fid_num_samples,
                ref=e.fid_ref,
                steps=e.fid_steps,
                scheduler=e.fid_scheduler,
                guidance=e.fid_guidance,
                batch_size=e.fid_batch_size,
                seed=self.cfg.train.sample_seed,
                device=self.accelerator.device,
            )
            self.writer.add_scalar("eval/fid", fid, self.step)
            self.append_metric("fid", fid, scheduler=e.fid_scheduler, steps=e.fid_steps, guidance=e.fid_guidance)
            tqdm.write(f"step {self.step}: FID {fid:.3f} ({e.fid_scheduler}, {e.fid_steps} steps, "
                       f"guidance {e.fid_guidance:g}, {e.fid_num_samples} samples)")
        self.accelerator.wait_for_everyone()

    def append_metric(self, metric: str, value: float, **protocol) -> None:
        """One row of metrics.csv: step, metric, value and how it was measured (FID: scheduler, steps, guidance)."""
        path = self.out / "metrics.csv"
        rows = []
        if path.exists():
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
        if rows and rows[0] != METRICS_COLUMNS:  # a file of an older uvic: its rows under the current header
            rows = [METRICS_COLUMNS] + [row + [""] * (len(METRICS_COLUMNS) - len(row)) for row in rows[1:]]
            with open(path, "w", newline="") as f:
                csv.writer(f).writerows(rows)
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if not rows:
                writer.writerow(METRICS_COLUMNS)
            writer.writerow([self.step, metric, value] + [protocol.get(k, "") for k in METRICS_COLUMNS[3:]])

    def save_checkpoint(self) -> Path:
        """This step's checkpoint (_save_checkpoint); a full disk names it."""
        with disk_full_message(self.out, writing=f"checkpoint {self.run.checkpoint(self.step)}"):
            return self._save_checkpoint()

    def _save_checkpoint(self) -> Path:
        """checkpoints/step_XXXXXXX: accelerate state (weights, optimizer, LR schedule, RNG states),
        train_state.json, model/, ema_model/ (the EMA weights, also what resume reads), scheduler/, and
        manifest.json last; atomic rename; rotation keeps the newest train.keep_checkpoints intact ones."""
        final = self.run.checkpoint(self.step)
        tmp = final.with_name(f".{final.name}.tmp")  # never matches a complete checkpoint's name
        self.check_weights_finite(f"checkpoint {final.name}")
        self.check_free_space(final)
        if self.is_main and tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        self.state.ema_optimization_step = self.ema.optimization_step
        self.accelerator.save_state(str(tmp))  # FSDP: the LR schedule and RNG states only
        if self.fsdp:
            self.save_optimizer_shard(tmp)
            # whole tensors, gathered into the main process's ema_model: first the weights, then the EMA
            self.gather_into_ema_model(list(self.raw_model.parameters()))
            if self.is_main:
                self.ema_model.save_pretrained(tmp / "model")
            self.gather_ema()
        if self.is_main:
            if not self.fsdp:
                self.raw_model.save_pretrained(tmp / "model")
            self.ema_pipeline(decode=False).transformer.save_pretrained(tmp / "ema_model")
            self.noise_scheduler.save_pretrained(tmp / "scheduler")
            text = json.dumps(self.state.state_dict()).encode()
            atomic_write(tmp / TRAIN_STATE, lambda f: f.write(text))
        self.accelerator.wait_for_everyone()  # every process's RNG state is written
        if self.is_main:
            write_manifest(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)  # complete: only now does `latest` see it
            kept = self.run.checkpoints()[-self.cfg.train.keep_checkpoints:]  # the newest intact: this one
            for step in self.run.step_folders():
                if kept and step < kept[0]:
                    shutil.rmtree(self.run.checkpoint(step))
        self.accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, folder) -> None:
        """Restore a checkpoint (intact: RunDir.prepare checked its manifest) without unpickling anything but
        tensors and plain values; then apply this config's optimisation values (README: changed values)."""
        folder, accelerator = Path(folder), self.accelerator
        pickled = sorted(p.name for p in folder.glob("custom_checkpoint_*.pkl"))
        legacy = not (folder / MANIFEST).is_file() and not (folder / TRAIN_STATE).exists()
        if pickled and not legacy:
            raise CheckpointError(
                f"checkpoint {folder} holds pickled objects ({', '.join(pickled)}) beside its {TRAIN_STATE}; uvic "
                f"does not load them (they could run code): resume from a checkpoint uvic wrote, or start a new run")
        if legacy:  # written before train_state.json: EMA and step as accelerate custom states
            ema_state = self.load_legacy_states(folder, pickled)
        else:
            try:
                self.state.load_state_dict(json.loads((folder / TRAIN_STATE).read_text()))
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"checkpoint {folder}: cannot read {TRAIN_STATE} ({type(e).__name__}: {e})") from None
        shards = len(list(folder.glob(OPTIMIZER_SHARDS.format("*"))))
        if bool(shards) != self.fsdp or (shards and shards != accelerator.num_processes):
            kind = f"an FSDP checkpoint of {shards} processes" if shards else "a DDP / single-process checkpoint"
            raise CheckpointError(
                f"checkpoint {folder} is {kind}; this run has {accelerator.num_processes} processes and "
                f"train.fsdp={self.fsdp}: resume it with the processes and train.fsdp it was written with, or start a "
                f"new run from its weights (its model/ and ema_model/ folders hold whole tensors)")
        rng = folder / f"random_states_{accelerator.process_index}.pkl"
        if rng.is_file():
            from accelerate.utils import load  # torch.load, weights_only=True with numpy's arrays allowed

            try:
                states = load(rng)
                states["random_state"], states["torch_manual_seed"], states["numpy_random_seed"]
            except Exception as e:
                raise CheckpointError(
                    f"checkpoint {folder}: cannot read {rng.name} ({type(e).__name__}: {str(e)[:200]}); without it "
                    f"a resumed run is not the same run; resume from an earlier checkpoint") from None
        else:
            warnings.warn(f"checkpoint {folder} has no {rng.name} (it was written by fewer processes): the resumed "
                          f"run draws other random numbers than an uninterrupted one would")
        try:  # accelerate loads optimizer, scheduler and RNG states with torch.load(weights_only=True)
            if pickled:  # a legacy checkpoint: accelerate would unpickle its custom states without weights_only
                with tempfile.TemporaryDirectory() as view:
                    for entry in folder.iterdir():
                        if entry.name not in pickled:
                            os.symlink(entry.absolute(), Path(view) / entry.name)
                    accelerator.load_state(view)
            else:
                accelerator.load_state(str(folder))
        except Exception as e:
            raise CheckpointError(f"cannot load checkpoint {folder}: {type(e).__name__}: {str(e)[:300]}") from None
        if self.fsdp:
            self.load_weights(folder / "model", list(self.raw_model.parameters()), "model")
            self.load_optimizer_shard(folder)
        if legacy:
            self.ema.load_state_dict(ema_state)
            self.ema.to(accelerator.device)
        else:
            self.load_ema(folder / "ema_model")
            self.ema.optimization_step = self.state.ema_optimization_step
        self.apply_optimisation_config()

    def load_legacy_states(self, folder: Path, pickled) -> dict:
        """A pre-manifest checkpoint's custom states (custom_checkpoint_0.pkl: the EMA's state_dict, _1: the step),
        read with torch.load(weights_only=True): tensors, numbers and containers only. Returns the EMA state."""
        if pickled != ["custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"]:
            raise CheckpointError(f"checkpoint {folder} has neither {TRAIN_STATE} nor the EMA and step states of older "
                                  f"uvic checkpoints (found {pickled or 'none'}): not a uvic checkpoint")
        try:
            ema_state, train_state = (torch.load(folder / name, map_location="cpu", weights_only=True) for name in pickled)
            self.state.step = int(train_state["step"])
            ema_state["optimization_step"], ema_state["shadow_params"]
        except Exception as e:
            raise CheckpointError(f"checkpoint {folder}: cannot read its EMA and step states safely "
                                  f"({type(e).__name__}: {str(e)[:200]}); uvic unpickles only tensors and numbers") from None
        return ema_state

    def load_ema(self, folder: Path) -> None:
        """The EMA (shadow) weights from a checkpoint's ema_model/ safetensors, matched by parameter name."""
        self.load_weights(folder, self.ema.shadow_params, "EMA")
        self.ema.to(self.accelerator.device)

    def load_weights(self, folder: Path, targets, what: str) -> None:
        """Whole tensors from a pipeline folder's safetensors into `targets` (raw_model's parameter order; under
        FSDP DTensors, of which each process keeps its shard), matched by parameter name."""
        from safetensors.torch import load_file

        tensors = {}
        try:
            for path in sorted(folder.glob("*.safetensors")):
                tensors.update(load_file(str(path)))
        except Exception as e:
            raise CheckpointError(f"cannot read the {what} weights in {folder}: {type(e).__name__}: {e}") from None
        for (name, param), target in zip(self.raw_model.named_parameters(), targets):
            if name not in tensors or tensors[name].shape != param.shape:
                raise CheckpointError(f"{folder} has no {what} weight {name} of shape {tuple(param.shape)}: "
                                      f"not a checkpoint of this model")
            with torch.no_grad():
                if self.fsdp:
                    target.to_local().copy_(shard_of(tensors[name], target))
                else:
                    target.copy_(tensors[name])

    def save_optimizer_shard(self, folder: Path) -> None:
        """FSDP: this process's AdamW state (its shards of exp_avg, exp_avg_sq, and step) as safetensors."""
        from safetensors.torch import save_file

        tensors = {}
        for name, param in self.raw_model.named_parameters():
            for key, value in self.optimizer.state.get(param, {}).items():
                value = value.to_local() if hasattr(value, "to_local") else value
                tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
        rank = self.accelerator.process_index
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / OPTIMIZER_SHARDS.format(rank)))

    def load_optimizer_shard(self, folder: Path) -> None:
        """FSDP: the AdamW state this process saved (save_optimizer_shard), wrapped back into DTensors."""
        from safetensors.torch import load_file
        from torch.distributed.tensor import DTensor

        path = folder / OPTIMIZER_SHARDS.format(self.accelerator.process_index)
        try:
            tensors = load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None
        state = self.optimizer.state_dict()
        for i, (name, param) in enumerate(self.raw_model.named_parameters()):
            entry = {}
            for key in ("step", "exp_avg", "exp_avg_sq"):
                if f"{name}.{key}" not in tensors:
                    continue
                value = tensors[f"{name}.{key}"]
                if key != "step":
                    value = DTensor.from_local(value.to(param.device), param.device_mesh, param.placements,
                                               shape=param.shape, stride=param.stride())
                entry[key] = value
            if entry:
                state["state"][i] = entry
        self.optimizer.load_state_dict(state)

    def apply_optimisation_config(self) -> None:
        """This config's lr, betas, weight decay, eps and EMA decay over the restored ones: a changed value on
        resume takes effect (warm-up, schedule and steps do anyway: the LR schedule is built from the config)."""
        t, sched = self.cfg.train, self.lr_scheduler.scheduler
        for group in self.optimizer.param_groups:
            group.update(betas=tuple(t.betas), weight_decay=t.weight_decay, eps=t.adam_eps, initial_lr=t.lr)
        sched.base_lrs = [t.lr] * len(sched.base_lrs)
        lrs = [base * lmbda(sched.last_epoch) for base, lmbda in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = lrs
        self.ema.decay, self.ema.update_after_step = t.ema_decay, t.ema_update_after_step  # ema_warmup: the class

    def save_final(self) -> Path:
        """final/: UViCPipeline(EMA model, train.sample_scheduler's sampler with train.sample_steps as the default
        steps, so `pipe()` samples as the grids and sample.py do), safetensors."""
        final = self.run.final
        self.check_weights_finite("final/")
        self.gather_ema()
        if self.is_main:
            tmp = final.with_name(".final.tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            with disk_full_message(self.out, writing=f"{final} (the pipeline export, written as {tmp})"):
                pipe = self.ema_pipeline(self.cfg.train.sample_scheduler)
                pipe.register_to_config(default_num_inference_steps=int(self.cfg.train.sample_steps))
                self.attach_text_encoder(pipe).save_pretrained(str(tmp), safe_serialization=True)
                write_manifest(tmp)  # what sample.py checks: an edited config.json or weights file is refused
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self.accelerator.print(f"saved {final}")
        self.accelerator.wait_for_everyone()
        return final


# ---------------------------------------------------------------------- command line
DEFAULT_CONFIG = "digits_uvic"


def config_dirs() -> List[Path]:
    """Where a config NAME is looked up: ./configs, the checkout's configs/ beside uvic/, and the copy an install
    puts in PREFIX/share/uvic/configs (setup.cfg data_files)."""
    import sys

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


def check_inputs(cfg: DictConfig) -> None:
    """The files a run's config names, checked where a run starts (train.py, the sweep) before anything is built:
    train.init_from / init_reset, and eval.fid_ref when the run measures FID. One line names the key."""
    check_init_source(cfg.train.init_from, list(cfg.train.init_reset or []))
    if cfg.eval.fid_every > 0:
        check_reference(cfg.eval.fid_ref, "eval.fid_ref")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a U-ViT / U-ViC diffusion model. With no arguments: U-ViC on the embedded digits set (CPU).",
        epilog="example: python train.py --config configs/cifar10_uvic_s2.yaml train.batch_size=64 --resume latest",
    )
    parser.add_argument("--config", help="YAML config path or a shipped config's name, e.g. digits_uvit "
                                         "(default: digits_uvic)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 model.attention_type=softmax")
    parser.add_argument("--output-dir", "--out", dest="output_dir", help="run folder (default: runs/<config name>)")
    parser.add_argument("--resume", help="'latest' or a checkpoint / run folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in --output-dir, deleting its checkpoints, samples, logs, final/ and metrics.csv "
                             "(only in a folder uvic made)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Path:
    args = parse_args(argv)
    config = find_config(args.config)
    overrides = list(args.overrides) + (["train.compile=true"] if args.compile else [])
    cfg, dataset = resolve_data_config(load_config(config, overrides))
    check_inputs(cfg)
    output_dir = args.output_dir or str(Path("runs") / config.stem)
    trainer = Trainer(cfg, output_dir, resume=args.resume, cpu=True if args.cpu else None, overwrite=args.overwrite,
                      dataset=dataset)
    try:
        return trainer.train()
    except TrainingStopped as stopped:  # a clean stop, not an error: the scheduler's convention 128 + SIGTERM
        print(f"train.py: {stopped}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGTERM) from None


def train(argv: Optional[Sequence[str]] = None):
    """train.py and `uvic-train`: main under the common error style (one `train.py: error:` line, exit 2)."""
    return run_main(main, argv, prog="train.py")
