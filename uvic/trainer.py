"""The accelerate training loop: data, U-ViT/U-ViC, diffusion loss, EMA, checkpoints, logs, grids.

    Trainer(cfg, "runs/x", resume="latest").train()   # the command line: uvic.train_cli (train.py)

One run writes one folder (layout and reuse rules: uvic.runs.RunDir; what a checkpoint holds: uvic.checkpoint).

train.batch_size is the GLOBAL batch: each optimizer step sees batch_size images, split over
processes x grad_accum micro-batches. A resumed run ends with the same weights as an
uninterrupted one: checkpoints hold the RNG states and the step, and the data order is a
function of (seed, epoch), so the data position follows from the step.

train.fsdp=true shards the model with FSDP2 (`shard`): weights, gradients, AdamW and EMA states are DTensor
shards; grids, FID, checkpoints' model/ and ema_model/ and final/ gather whole tensors on the main process.

Faults (README "Failures and recovery"): a step whose loss or gradient norm is non-finite on any
process is skipped (no optimizer or EMA update) and counted; train.max_nonfinite_steps in a row stop
the run with NonFiniteLossError. Checkpoints and final/ are never written with non-finite weights,
nor when the disk lacks the space (DiskFullError).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import time
from pathlib import Path
from typing import Iterator, Optional, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm.auto import tqdm

from . import checkpoint
from .attention import check_cog_kernels
from .caption_latents import drop_context
from .checkpoint import TrainState, gather_into
from .config import model_kwargs, save_config
from .data import resolve_data_config
from .diffusion import build_scheduler, diffusion_loss, drop_labels
from .ema_outputs import EMAOutputs
from .files import DiskFullError, atomic_write, disk_full_message
from .finetune import load_init_weights
from .fsdp import plain_tensor, shard
from .launch import batch_split, check_launch, resolve_mixed_precision, run_summary
from .model import UViT
from .runs import CONFIG, LOGS, RUN_SUMMARY, RunDir, RunLock, record_provenance
from .sigterm import SigtermStop, TrainingStopped

LR_SCHEDULE_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


class FixedDecayEMA(EMAModel):
    """U-ViT's EMA (train.ema_warmup: false): θ_ema ← d θ_ema + (1 − d) θ from the first step, d fixed.

    Kept rather than EMAModel(decay=d, min_decay=d): that one's get_decay returns 0 at the first update (the EMA
    becomes a copy of θ_1), where U-ViT's first update is d θ_0 + (1 − d) θ_1."""

    def get_decay(self, optimization_step: int) -> float:
        return self.decay


class NonFiniteLossError(ValueError):
    """Training diverged: the loss or gradient norm stayed non-finite (an expected error: one message)."""


class EvaluationError(ValueError):
    """A sample grid or FID during training failed; its step's checkpoint was written first (one message)."""


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
        self.cfg, self.dataset = cfg, dataset
        self.run = RunDir(output_dir)
        self.out = self.run.path
        self.accelerator = self._build_accelerator(cpu)
        self.is_main = self.accelerator.is_main_process
        # parameters, gradients, AdamW and EMA states are DTensor shards (uvic.fsdp.shard); one process has
        # nothing to shard (the H configs set train.fsdp: true and still train on one GPU)
        self.fsdp = bool(cfg.train.fsdp) and self.accelerator.num_processes > 1
        check_launch(cfg.train, self.accelerator, self.fsdp, self.mixed_precision, self.precision_source)
        processes = self.accelerator.num_processes
        self.per_process_batch, self.batches_per_epoch = batch_split(cfg.train, len(dataset), processes)
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

    def _build_accelerator(self, cpu: Optional[bool]) -> Accelerator:
        """accelerate in the launcher's precision (it wins over the config's), TensorBoard in RUN/logs, its
        save_state / load_state without the model (uvic.checkpoint keeps the weights once, in model/)."""
        t = self.cfg.train
        if cpu is None:  # no GPU: accelerate's CPU mode (gloo when launched with torchrun)
            cpu = not torch.cuda.is_available()
        on_cpu = cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        self.mixed_precision, self.precision_source = resolve_mixed_precision(t.mixed_precision, on_cpu)
        accelerator = Accelerator(
            mixed_precision=self.mixed_precision,
            gradient_accumulation_steps=t.grad_accum,
            step_scheduler_with_optimizer=False,  # one LR step per optimizer step, whatever the process count
            cpu=cpu,
            log_with="tensorboard",
            project_dir=str(self.out),  # init_trackers(LOGS): RUN/logs
            # DDP: the gradients are views of the reducer's buckets, not a second copy (4 bytes per parameter less)
            kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)],
        )
        checkpoint.skip_model_in_accelerate_state(accelerator)
        return accelerator

    def _init_run(self, cfg: DictConfig, resume: Optional[str], overwrite: bool) -> None:
        """The run folder checked (RunDir.prepare), the model built and restored, the folder written."""
        t, accelerator = cfg.train, self.accelerator
        self.resume_from = self.run.prepare(cfg, resume, overwrite, log=accelerator.print)
        set_seed(t.seed)  # identical initial weights on every process
        self._build_model()
        self.outputs = EMAOutputs(cfg, self.dataset, self.ema_model, self.noise_scheduler, self.run, accelerator)
        self.state = TrainState()  # saved in checkpoints as JSON, never pickled
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

    def _build_model(self) -> None:
        """The noise scheduler, UViT, the main process's whole-weights copy (ema_model), the EMA, AdamW and the
        LR schedule (prepared by accelerate)."""
        cfg, t = self.cfg, self.cfg.train
        self.noise_scheduler = build_scheduler(cfg.diffusion)
        self.raw_model = UViT(**model_kwargs(cfg))
        if t.init_from and self.resume_from is None:  # fine-tuning; the EMA below starts from these weights too
            fresh = load_init_weights(self.raw_model, t.init_from, list(t.init_reset or []))
            self.accelerator.print(f"initial weights from {t.init_from}" + (f"; re-initialised {', '.join(fresh)}"
                                                                            if fresh else ""))
        if cfg.model.gradient_checkpointing:
            self.raw_model.enable_gradient_checkpointing()
        self.raw_model.to(self.accelerator.device)
        # the EMA weights (grids, FID, final/) and whole tensors of checkpoints pass through this copy
        self.ema_model = copy.deepcopy(self.raw_model).eval().requires_grad_(False) if self.is_main else None
        if self.fsdp:
            shard(self.raw_model, self.accelerator.num_processes, self.mixed_precision)
        optimizer = torch.optim.AdamW(
            self.raw_model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, eps=t.adam_eps
        )
        lr_scheduler = get_scheduler(
            LR_SCHEDULE_NAMES[t.lr_schedule], optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.steps
        )
        train_model = torch.compile(self.raw_model) if t.compile else self.raw_model
        if self.fsdp:  # accelerate sees the LR schedule only: the optimizer's state is saved as shards
            self.model, self.optimizer = self.raw_model, optimizer
            self.lr_scheduler = self.accelerator.prepare(lr_scheduler)
        else:
            self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(train_model, optimizer, lr_scheduler)
        # under FSDP raw_model's parameters are now DTensor shards, and so are the EMA's shadow copies of them
        self.ema = (EMAModel if t.ema_warmup else FixedDecayEMA)(
            self.raw_model.parameters(), decay=t.ema_decay, update_after_step=t.ema_update_after_step,
            model_cls=UViT, model_config=self.raw_model.config)

    def _build_loader(self) -> Tuple[DistributedSampler, DataLoader]:
        """Data order = f(seed, epoch): never touches the global RNG."""
        d, seed, accelerator = self.cfg.data, self.cfg.train.seed, self.accelerator
        sampler = DistributedSampler(self.dataset, num_replicas=accelerator.num_processes,
                                     rank=accelerator.process_index, shuffle=True, seed=seed, drop_last=True)
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
            loader = self.accelerator.skip_first_batches(self.loader, offset) if offset else self.loader
            for images, labels in loader:
                yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            epoch, offset = epoch + 1, 0

    def compute_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of one micro-batch: images (b, C, H, W) in [-1, 1], labels (b,)."""
        if self.cfg.data.random_flip:
            flip = torch.rand(images.shape[0], device=images.device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        if self.empty_context is not None:  # labels: the captions' context (b, L, D)
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

    def on_step_end(self, step: int) -> None:
        """Called after every optimizer step (a hook for subclasses: extra logging, early stops)."""

    def holding_lock(self) -> contextlib.AbstractContextManager:
        """The run folder's RunLock on the main process (another trainer there: RunLockedError)."""
        return self.lock if self.lock is not None else contextlib.nullcontext()

    def stop_with_checkpoint(self) -> None:
        """SIGTERM: this step's checkpoint (unless just written), then TrainingStopped."""
        saved = self.run.checkpoint(self.step)
        if self.step not in self.run.checkpoints():
            saved = self.save_checkpoint()
        for tracker in self.accelerator.trackers:
            tracker.finish()
        raise TrainingStopped(f"stopped by SIGTERM at step {self.step}: checkpoint {saved} written; rerun the same "
                              f"command to continue from it")

    def train(self) -> Path:
        """Train to train.steps; returns the final/ pipeline folder. SIGTERM: TrainingStopped after a checkpoint."""
        with self.holding_lock(), SigtermStop() as self.sigterm, disk_full_message(self.out):
            return self._train()

    def _train(self) -> Path:
        t, accelerator = self.cfg.train, self.accelerator
        accelerator.init_trackers(LOGS)  # TensorBoard in RUN/logs, on the main process
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
                self.log_train(step, progress, loss_sum, loss_count, grad_norm, time.perf_counter() - tick, tick_step)
                tick, tick_step = time.perf_counter(), step
            done = step == t.steps
            self.evaluate(step, done)
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or done:
                self.save_checkpoint()
            self.on_step_end(step)
            if self.sigterm.requested(accelerator):
                progress.close()
                self.stop_with_checkpoint()
        progress.close()
        final = self.save_final()
        accelerator.end_training()  # closes TensorBoard
        return final

    def log_train(self, step: int, progress, loss_sum: torch.Tensor, loss_count: torch.Tensor,
                  grad_norm: torch.Tensor, elapsed: float, tick_step: int) -> None:
        """train/* scalars to TensorBoard and the progress bar: the mean finite loss since the last log (over all
        processes), the LR, the gradient norm, throughput and the skipped steps; the loss sums start over."""
        total, count = self.accelerator.reduce(torch.stack([loss_sum, loss_count]), reduction="sum").tolist()
        mean_loss = total / count if count else math.nan
        images_per_s = (step - tick_step) * self.cfg.train.batch_size / max(elapsed, 1e-9)
        lr = self.lr_scheduler.get_last_lr()[0]
        skipped = self.state.nonfinite_steps
        scalars = {"loss": mean_loss, "lr": lr, "grad_norm": float(grad_norm), "images_per_s": images_per_s,
                   "nonfinite_steps": skipped}
        self.accelerator.log({f"train/{name}": value for name, value in scalars.items()}, step=step)
        progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}",
                             **({"skipped": skipped} if skipped else {}))
        loss_sum.zero_()
        loss_count.zero_()

    # ------------------------------------------------------------------ EMA outputs: grids, FID, final/
    def gather_ema(self) -> None:
        """The EMA weights, whole, into the main process's ema_model (under FSDP a collective: every process calls
        it, and no process holds more than one whole parameter beside its shards)."""
        gather_into(list(self.ema.shadow_params), self.ema_model, self.fsdp)

    def save_sample_grid(self) -> None:
        self.gather_ema()
        if self.is_main:
            self.outputs.sample_grid(self.step)
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
        self.gather_ema()
        if self.is_main:
            self.outputs.fid(self.step)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ checkpoints and final/
    def save_checkpoint(self) -> Path:
        """checkpoints/step_XXXXXXX (uvic.checkpoint.save), written under a temporary name and renamed when
        complete; rotation then keeps the newest train.keep_checkpoints intact ones on the train.checkpoint_every
        schedule, and the newest. A full disk names it."""
        final = self.run.checkpoint(self.step)
        tmp = self.run.temporary(final)
        with disk_full_message(self.out, writing=f"checkpoint {final}"):
            self.check_weights_finite(f"checkpoint {final.name}")
            checkpoint.check_free_space(final, self.accelerator, self.run.latest() if self.is_main else None,
                                        sum(p.numel() for p in self.raw_model.parameters()))
            if self.is_main and tmp.exists():
                shutil.rmtree(tmp)
            self.accelerator.wait_for_everyone()
            checkpoint.save(tmp, self.accelerator, self.raw_model, self.ema, self.optimizer, self.state,
                            self.noise_scheduler, self.ema_model, self.fsdp)
            if self.is_main:
                self.run.publish(tmp, final)  # complete: only now does `latest` see it
                self.run.rotate(self.cfg.train.keep_checkpoints, self.cfg.train.checkpoint_every)
            self.accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, folder) -> None:
        """Restore a checkpoint (intact: RunDir.prepare checked its manifest), then apply this config's
        optimisation values (README: changed values)."""
        checkpoint.load(folder, self.accelerator, self.raw_model, self.ema, self.optimizer, self.state, self.fsdp)
        self.apply_optimisation_config()

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
        """final/ (EMAOutputs.export), written under a temporary name and renamed when complete."""
        final = self.run.final
        self.check_weights_finite("final/")
        self.gather_ema()
        if self.is_main:
            tmp = self.run.temporary(final)
            if tmp.exists():
                shutil.rmtree(tmp)
            with disk_full_message(self.out, writing=f"{final} (the pipeline export, written as {tmp})"):
                self.outputs.export(tmp)
            self.run.publish(tmp, final)
            self.accelerator.print(f"saved {final}")
        self.accelerator.wait_for_everyone()
        return final
