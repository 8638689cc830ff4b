"""The runs a report names: RUN, RUN@STEP, RUN@latest, RUN@all; each one's config (as the seed groups read it), the
code it trained with (provenance.json), where its samples go, and its sampling into a resumable sample set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from omegaconf import OmegaConf

from . import loading
from .config import load_config
from .metric_inputs import MetricInput, check_resolution, choose_extractor
from .model import softmax_block_indices
from .runs import CONFIG, PROVENANCE, RunDir
from .sample_sets import generate_samples


@dataclass(frozen=True)
class RunSpec:
    """A model to sample: a pipeline folder or run directory, at `checkpoint` (None: final/, "latest", a step)."""

    path: Path
    checkpoint: Optional[str] = None

    @property
    def run(self) -> Optional[RunDir]:
        """The run folder of `path`: itself, or the folder holding it (final/)."""
        run = RunDir.find(self.path)
        return run if run is not None and run.path in (self.path, self.path.parent) else None

    @property
    def run_dir(self) -> Optional[Path]:
        return self.run.path if self.run is not None else None

    @property
    def name(self) -> str:
        return (self.run_dir or self.path).name

    @property
    def label(self) -> str:
        return self.name if self.checkpoint is None else f"{self.name}@{self.checkpoint}"

    def steps_trained(self) -> Optional[int]:
        """Training steps behind the weights: the checkpoint's step, or for final/ the run's train.steps
        (its last checkpoint when there is no config)."""
        if self.checkpoint is not None and str(self.checkpoint).isdigit():
            return int(self.checkpoint)
        return self.run.steps_trained(self.checkpoint) if self.run is not None else None


def parse_run_specs(text: str, checkpoints: Optional[Sequence[str]] = None) -> List[RunSpec]:
    """"RUN", "RUN@STEP", "RUN@latest", "RUN@all" (every checkpoint); `checkpoints` applies to a plain RUN
    ("final" meaning final/)."""
    path_text, _, at = str(text).partition("@")
    path = Path(path_text).expanduser()
    if not path.is_dir():
        hint = ""
        if any(c in path_text for c in "*?["):  # a pattern the shell left alone: it matched no folder name as written
            hint = (f"; {path_text!r} is a pattern the shell did not expand (RUN@STEP names no file): pass the run "
                    f"folders and the step as an option, e.g. {str(Path(path_text).parent)}/*/ --checkpoints "
                    f"{at or 'all'}")
        raise FileNotFoundError(f"run {path} does not exist (expected a run directory or a pipeline folder){hint}")
    wanted = [at] if at else list(checkpoints or [None])
    specs = []
    for ck in wanted:
        if ck == "all":
            steps = RunDir(path).checkpoints()
            if not steps:
                raise FileNotFoundError(f"{path}@all: the run has no complete checkpoint under checkpoints/")
            specs += [RunSpec(path, str(s)) for s in steps]
        elif ck in (None, "final"):
            specs.append(RunSpec(path))
        elif ck == "latest" or str(ck).isdigit():
            specs.append(RunSpec(path, str(ck)))
        else:
            raise ValueError(f"checkpoint {ck!r} in {text!r} is not valid; use a step number, latest, all or final")
    return specs


def run_config(spec: RunSpec) -> Optional[dict]:
    """The run's config.yaml as a dict (None for a pipeline folder outside a run), over the schema's defaults and
    with model.softmax_blocks as block indices: a run saved before an option existed groups with the runs saved
    after it, and `first+last`, null and [0, depth] are one placement. A config the schema refuses (a newer
    version's) is taken as saved."""
    if spec.run is None or not (spec.run.path / CONFIG).is_file():
        return None
    try:
        config = OmegaConf.to_container(load_config(str(spec.run.path / CONFIG)), resolve=True)
    except (ValueError, OSError):
        return OmegaConf.to_container(spec.run.config())
    model = config["model"]
    model["softmax_blocks"] = softmax_block_indices(model.get("softmax_blocks"), model["depth"])
    return config


def run_code(spec: RunSpec) -> Optional[str]:
    """The code a run trained with, from its provenance.json (uvic.runs.record_provenance): the sha256 prefix of
    the uvic sources, several joined by "+" when it was resumed with other code; None when not recorded."""
    path = spec.run.path / PROVENANCE if spec.run is not None else None
    if path is None or not path.is_file():
        return None
    hashes = []
    for entry in json.loads(path.read_text()):
        if entry.get("source_sha256", "")[:12] not in hashes:
            hashes.append(entry.get("source_sha256", "")[:12])
    return "+".join(hashes) or None


def default_samples_dir(spec: RunSpec, scheduler: str, steps: int, guidance: float, seed: int,
                        timestep_spacing: Optional[str] = None) -> Path:
    """<run>/eval_samples/<checkpoint>_<sampler>_<steps>steps_w<guidance>_seed<seed>[_<spacing>]; beside a pipeline
    folder that is not in a run, <folder>_eval_samples/..."""
    where = spec.run_dir / "eval_samples" if spec.run_dir else spec.path.with_name(f"{spec.path.name}_eval_samples")
    spacing = f"_{timestep_spacing}" if timestep_spacing else ""
    return where / f"{spec.checkpoint or 'final'}_{scheduler}_{steps}steps_w{guidance:g}_seed{seed}{spacing}"


def sample_model(spec: RunSpec, out_dir, *, num_samples: int, scheduler: str, steps: int, guidance: float,
                 seed: int, batch_size: int, device=None, progress: bool = True, ref=None,
                 feature_extractor: Optional[str] = None, allow_resize: bool = False, prompts=None,
                 timestep_spacing: Optional[str] = None):
    """Sample `spec` into out_dir (resumable) -> (samples.npz path, model info for reports). With `ref` (a
    MetricInput), images of another size than the reference's are refused before sampling (check_resolution).
    prompts: text-to-image models draw sample i from prompts[i] (every model the same captions)."""
    pipe = loading.load_pipeline(spec.path, checkpoint=spec.checkpoint, ema=True)
    info = {
        "model": spec.label,
        "attention": pipe.transformer.config.attention_type,
        "params": sum(p.numel() for p in pipe.transformer.parameters()),
        "step": spec.steps_trained(),
    }
    if ref is not None:
        size = MetricInput(spec.label, image_size=tuple(pipe.image_shape[1:]))
        check_resolution(size, ref, choose_extractor(feature_extractor, ref), allow_resize)
    pipe.to(torch.device(device) if device else ("cuda" if torch.cuda.is_available() else "cpu"))
    npz = generate_samples(pipe, out_dir, num_samples=num_samples, batch_size=batch_size, seed=seed,
                           scheduler=None if scheduler == "saved" else scheduler, steps=steps, guidance=guidance,
                           progress=progress, prompts=prompts, timestep_spacing=timestep_spacing)
    return npz, info
