"""What a training run makes of its EMA weights: sample grids (samples/, TensorBoard), FID (metrics.csv,
TensorBoard) and final/, all through one UViCPipeline of them.

    outputs = EMAOutputs(cfg, dataset, ema_model, noise_scheduler, run, accelerator)
    outputs.sample_grid(step); outputs.fid(step); outputs.export(folder)

Main process only: the trainer first copies the EMA weights into `ema_model` (under FSDP a collective gather).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import torch
from omegaconf import DictConfig
from torch.utils.data import Subset
from tqdm.auto import tqdm

from .checkpoint import write_manifest
from .latents import attach_vae
from .metrics import pipeline_fid
from .model import UViT
from .pipeline import UViCPipeline, make_scheduler, save_grid
from .runs import RunDir


class EMAOutputs:
    """The EMA model `ema_model` as a pipeline with the run's sampler, and what is made from it."""

    def __init__(self, cfg: DictConfig, dataset, ema_model: UViT, noise_scheduler, run: RunDir, accelerator):
        self.cfg, self.dataset, self.ema_model, self.noise_scheduler, self.run = cfg, dataset, ema_model, noise_scheduler, run
        self.accelerator = accelerator
        self.base_dataset = dataset.dataset if isinstance(dataset, Subset) else dataset  # without data.limit
        # text-to-image (caption latents): the empty prompt's features (L, D)
        self.empty_context = getattr(self.base_dataset, "empty_context", None)
        self._vae = None  # latent data: the decoder, loaded on first use

    def pipeline(self, scheduler_name: Optional[str] = None, decode: bool = True) -> UViCPipeline:
        """UViCPipeline of ema_model; the training scheduler or a named sampler. decode: for latent data, attach
        the VAE the latents came from (loaded once), so grids, FID and final/ see images."""
        scheduler = (self.noise_scheduler if scheduler_name is None
                     else make_scheduler(scheduler_name, self.noise_scheduler.config))
        pipe = UViCPipeline(transformer=self.ema_model, scheduler=scheduler)
        if decode and self.cfg.data.name == "latents":
            if self._vae is None:
                attach_vae(pipe, self.base_dataset, scale_factor=self.cfg.data.scale_factor)
                self._vae = pipe.vae.to(self.accelerator.device)
            pipe.register_modules(vae=self._vae)
        if self.empty_context is not None:
            pipe.set_empty_context(self.empty_context)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def grid_labels(self) -> Tuple[int, Optional[torch.Tensor]]:
        """(number of images, labels): class-conditional grids have one class per row of 8."""
        if not self.cfg.data.conditional:
            return self.cfg.train.sample_num, None
        classes = self.cfg.model.num_classes - 1  # the last label is "no class"
        rows = torch.linspace(0, classes - 1, min(classes, 10)).round().long()
        return len(rows) * 8, rows.repeat_interleave(8)

    def grid_prompt_embeds(self, num: int) -> torch.Tensor:
        """Text-to-image grids: the first caption of training images 0, 1, ... (num, L, D), fixed over steps."""
        return torch.stack([self.base_dataset.contexts(i % len(self.dataset))[0] for i in range(num)])

    def sample_grid(self, step: int) -> Path:
        """samples/step_XXXXXXX.png and TensorBoard's `samples`: train.sample_* with fixed noise (comparable over
        steps), one class per row when class-conditional, the first captions of the data for text-to-image."""
        t = self.cfg.train
        num, labels = self.grid_labels()
        text = {} if self.empty_context is None else {"prompt_embeds": self.grid_prompt_embeds(num)}
        images = self.pipeline(t.sample_scheduler)(
            batch_size=num, num_inference_steps=t.sample_steps, class_labels=labels, **text,
            guidance_scale=t.sample_guidance, generator=torch.Generator().manual_seed(t.sample_seed), output_type="pt",
        ).images.float().cpu()  # (N, C, H, W) in [0, 1]
        path = self.run.sample_grid(step)
        save_grid(images, path, nrow=8, padding=1)
        self.accelerator.get_tracker("tensorboard").log_images({"samples": images}, step)
        return path

    def fid(self, step: int) -> float:
        """FID by the eval.fid_* protocol, logged (TensorBoard eval/fid), appended to metrics.csv and printed."""
        e = self.cfg.eval
        fid = pipeline_fid(self.pipeline(), num_samples=e.fid_num_samples, ref=e.fid_ref, steps=e.fid_steps,
                           scheduler=e.fid_scheduler, guidance=e.fid_guidance, batch_size=e.fid_batch_size,
                           seed=self.cfg.train.sample_seed, device=self.accelerator.device)
        self.accelerator.log({"eval/fid": fid}, step=step)
        self.run.append_metric(step, "fid", fid, scheduler=e.fid_scheduler, steps=e.fid_steps, guidance=e.fid_guidance)
        tqdm.write(f"step {step}: FID {fid:.3f} ({e.fid_scheduler}, {e.fid_steps} steps, guidance {e.fid_guidance:g}, "
                   f"{e.fid_num_samples} samples)")
        return fid

    def export(self, folder: Path) -> None:
        """The final/ pipeline into `folder`: train.sample_scheduler's sampler with train.sample_steps as the
        default steps (so `pipe()` samples as the grids and sample.py do), the text encoder of the caption
        extraction if any (final/ then samples from prompts), safetensors, and a manifest last."""
        pipe = self.pipeline(self.cfg.train.sample_scheduler)
        pipe.register_to_config(default_num_inference_steps=int(self.cfg.train.sample_steps))
        encoder = getattr(self.base_dataset, "text_encoder_path", None)
        if self.empty_context is not None and encoder is not None:  # without one: the empty context only
            pipe.attach_text_encoder(encoder)  # the extraction's copy (tokenizer/, text_encoder/)
        pipe.save_pretrained(str(folder), safe_serialization=True)
        write_manifest(folder)  # what sample.py checks: an edited config.json or weights file is refused
