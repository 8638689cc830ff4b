"""The accelerate training loop: data, U-ViT/U-ViC, diffusion loss, EMA, checkpoints, logs, grids.

    python train.py --config configs/digits_uvic.yaml train.lr=1e-4 --output-dir runs/x [--resume latest | --overwrite]

One run writes one folder (layout and reuse rules: uvic.runs.RunDir).

train.batch_size is the GLOBAL batch: each optimizer step sees batch_size images, split over
processes x grad_accum micro-batches. A resumed run ends with the same weights as an
uninterrupted one: checkpoints hold the RNG states and the step, and the data order is a
function of (seed, epoch), so the data position follows from the step.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import shutil
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm.auto import tqdm

from .config import load_config, model_kwargs, save_config
from .data import resolve_data_config
from .diffusion import build_scheduler, diffusion_loss, drop_labels
from .model import UViT
from .pipeline import UViCPipeline, make_scheduler, save_grid
from .runs import CONFIG, RunDir, checkpoint_name

LR_SCHEDULE_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


class FixedDecayEMA(EMAModel):
    """U-ViT's EMA (train.ema_warmup: false): θ_ema ← d θ_ema + (1 − d) θ from the first step, d fixed."""

    def get_decay(self, optimization_step: int) -> float:
        return self.decay


class EpochSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch, drop_last) that can start `skip` indices into an epoch."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class TrainState:
    """The step counter, checkpointed with the rest (accelerate register_for_checkpointing)."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class Trainer:
    """Builds everything from a config, checks it before any training, then `train()`.

    resume: None (fresh run, or the continuation of this config's run in output_dir), "latest"
    (highest complete checkpoint of output_dir, or a fresh run if there is none) or a checkpoint /
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
        self.accelerator = accelerator = Accelerator(
            mixed_precision=t.mixed_precision,
            gradient_accumulation_steps=t.grad_accum,
            step_scheduler_with_optimizer=False,  # one LR step per optimizer step, whatever the process count
            cpu=cpu,
        )
        self.is_main = accelerator.is_main_process
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
        self.resume_from = self.run.prepare(cfg, resume, overwrite, log=accelerator.print)

        set_seed(t.seed)  # identical initial weights on every process
        self._build_model()
        self.state = TrainState()
        accelerator.register_for_checkpointing(self.ema)
        accelerator.register_for_checkpointing(self.state)
        self.sampler, self.loader = self._build_loader()
        if self.is_main:  # the run folder
            if overwrite:
                self.run.clear()
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / CONFIG)
        accelerator.wait_for_everyone()
        if self.resume_from is None:
            set_seed(t.seed, device_specific=True)  # each process draws its own noise and timesteps
        else:  # weights, optimizer, LR schedule, EMA, step and every RNG state
            accelerator.load_state(str(self.resume_from))
            self.ema.to(accelerator.device)
            accelerator.print(f"resumed from {self.resume_from} at step {self.state.step}")
        self.writer = None
        self._vae = None  # latent data: the decoder, loaded on first use

    def _build_model(self) -> None:
        """The noise scheduler, UViT, its EMA, AdamW and the LR schedule (prepared by accelerate)."""
        cfg, t = self.cfg, self.cfg.train
        self.noise_scheduler = build_scheduler(cfg.diffusion)
        self.raw_model = UViT(**model_kwargs(cfg))
        if cfg.model.gradient_checkpointing:
            self.raw_model.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(
            self.raw_model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, eps=t.adam_eps
        )
        lr_scheduler = get_scheduler(
            LR_SCHEDULE_NAMES[t.lr_schedule], optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.steps
        )
        train_model = torch.compile(self.raw_model) if t.compile else self.raw_model
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(train_model, optimizer, lr_scheduler)
        self.ema = (EMAModel if t.ema_warmup else FixedDecayEMA)(self.raw_model.parameters(), decay=t.ema_decay, update_after_step=t.ema_update_after_step,
                            model_cls=UViT, model_config=self.raw_model.config)
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

    def on_step_end(self, step: int) -> None:
        """Called after every optimizer step (a hook for subclasses: extra logging, early stops)."""

    def train(self) -> Path:
        """Train to train.steps; returns the final/ pipeline folder."""
        cfg, t, accelerator = self.cfg, self.cfg.train, self.accelerator
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "logs"))
        max_norm = t.max_grad_norm if t.max_grad_norm is not None else math.inf
        batches = self.batches(self.step * t.grad_accum)
        progress = tqdm(total=t.steps, initial=self.step, disable=not self.is_main, desc="train", dynamic_ncols=True)
        loss_sum, loss_count, tick, tick_step = torch.zeros((), device=accelerator.device), 0, time.perf_counter(), self.step
        grad_norm = torch.zeros(())
        self.model.train()
        while self.step < t.steps:
            for _ in range(t.grad_accum):
                images, labels = next(batches)
                with accelerator.accumulate(self.model):
                    loss = self.compute_loss(images, labels)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach().float()
                loss_count += 1
            self.lr_scheduler.step()
            self.ema.step(self.raw_model.parameters())
            self.state.step += 1
            step = self.step
            progress.update(1)

            if step % t.log_every == 0 or step == t.steps:
                mean_loss = accelerator.reduce(loss_sum / loss_count, reduction="mean").item()
                elapsed = time.perf_counter() - tick
                images_per_s = (step - tick_step) * t.batch_size / max(elapsed, 1e-9)
                lr = self.lr_scheduler.get_last_lr()[0]
                if self.is_main:
                    for name, value in (("loss", mean_loss), ("lr", lr), ("grad_norm", float(grad_norm)), ("images_per_s", images_per_s)):
                        self.writer.add_scalar(f"train/{name}", value, step)
                    progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}")
                loss_sum.zero_()
                loss_count, tick, tick_step = 0, time.perf_counter(), step
            done = step == t.steps
            if (t.sample_every and step % t.sample_every == 0) or done:
                self.save_sample_grid()
            if self.cfg.eval.fid_every and (step % self.cfg.eval.fid_every == 0 or done):
                self.evaluate_fid()
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or done:
                self.save_checkpoint()
            self.on_step_end(step)
        progress.close()
        final = self.save_final()
        if self.writer is not None:
            self.writer.close()
        accelerator.end_training()
        return final

    # ------------------------------------------------------------------ EMA artifacts
    def ema_pipeline(self, scheduler_name: Optional[str] = None, decode: bool = True) -> UViCPipeline:
        """UViCPipeline of the current EMA weights; the training scheduler or a named sampler.

        decode: for latent data, attach the VAE the latents came from (loaded once), so grids,
        FID and final/ see images.
        """
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

    def evaluate_fid(self) -> None:
        e = self.cfg.eval
        if self.is_main:
            from .metrics import pipeline_fid  # another part of uvic; needed only here

            fid = pipeline_fid(
                self.ema_pipeline(),
                num_samples=e.fid_num_samples,
                ref=e.fid_ref,
                steps=e.fid_steps,
                scheduler=e.fid_scheduler,
                batch_size=e.fid_batch_size,
                seed=self.cfg.train.sample_seed,
                device=self.accelerator.device,
            )
            self.writer.add_scalar("eval/fid", fid, self.step)
            self.append_metric("fid", fid)
            self.accelerator.print(f"step {self.step}: FID {fid:.3f}")
        self.accelerator.wait_for_everyone()

    def append_metric(self, metric: str, value: float) -> None:
        path = self.out / "metrics.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "metric", "value"])
            writer.writerow([self.step, metric, value])

    def save_checkpoint(self) -> Path:
        """checkpoints/step_XXXXXXX: accelerate state + model/, ema_model/, scheduler/; atomic rename; rotation."""
        final = self.run.checkpoint(self.step)
        tmp = final.with_name(f".{final.name}.tmp")  # never matches a complete checkpoint's name
        if self.is_main and tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        if self.is_main:
            self.raw_model.save_pretrained(tmp / "model")
            self.ema_pipeline(decode=False).transformer.save_pretrained(tmp / "ema_model")
            self.noise_scheduler.save_pretrained(tmp / "scheduler")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)  # complete: only now does `latest` see it
            steps = self.run.checkpoints()
            for step in steps[: max(0, len(steps) - self.cfg.train.keep_checkpoints)]:
                shutil.rmtree(self.run.checkpoint(step))
        self.accelerator.wait_for_everyone()
        return final

    def save_final(self) -> Path:
        """final/: UViCPipeline(EMA model, training scheduler), safetensors."""
        final = self.run.final
        if self.is_main:
            tmp = final.with_name(".final.tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            self.attach_text_encoder(self.ema_pipeline()).save_pretrained(str(tmp), safe_serialization=True)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self.accelerator.print(f"saved {final}")
        self.accelerator.wait_for_everyone()
        return final


# ---------------------------------------------------------------------- command line
def default_config_path() -> Path:
    return Path(__file__).resolve().parents[1] / "configs" / "digits_uvic.yaml"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a U-ViT / U-ViC diffusion model. With no arguments: U-ViC on the embedded digits set (CPU).",
        epilog="example: python train.py --config configs/cifar10_uvic_s2.yaml train.batch_size=64 --resume latest",
    )
    parser.add_argument("--config", help="YAML config (default: configs/digits_uvic.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 model.attention_type=softmax")
    parser.add_argument("--output-dir", help="run folder (default: runs/<config name>)")
    parser.add_argument("--resume", help="'latest' or a checkpoint / run folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in --output-dir, deleting its checkpoints, samples, logs, final/ and metrics.csv")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Path:
    args = parse_args(argv)
    config = Path(args.config) if args.config else default_config_path()
    if not args.config and not config.is_file():
        raise FileNotFoundError(f"no --config given and the default {config} is missing")
    overrides = list(args.overrides) + (["train.compile=true"] if args.compile else [])
    cfg, dataset = resolve_data_config(load_config(config, overrides))
    output_dir = args.output_dir or str(Path("runs") / config.stem)
    trainer = Trainer(cfg, output_dir, resume=args.resume, cpu=True if args.cpu else None, overwrite=args.overwrite,
                      dataset=dataset)
    return trainer.train()
