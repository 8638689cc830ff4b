"""The checkpoint format: what one saved step holds, how it is written, verified and read back for an exact resume.

    step_XXXXXXX/
        optimizer.bin  scheduler.bin  random_states_<rank>.pkl   accelerate's save_state, without the model
        optimizer_shard_<rank>.safetensors                       train.fsdp: each process's AdamW state shards
        train_state.json                                         the counters (TrainState), JSON
        model/        UViT.save_pretrained of the weights: their one copy, read on resume and by uvic.loading
        ema_model/    UViT.save_pretrained of the EMA weights
        scheduler/    the training noise scheduler
        manifest.json every other file's size and sha256 (CHECKPOINT_MANIFEST), written last

Every weight tensor is stored once: accelerate's own copy of the model (model.safetensors, the same bytes as
model/) is dropped by a save_state hook (skip_model_in_accelerate_state). The folder's name, its temporary name
and the rotation are the run's (uvic.runs.RunDir). Reading unpickles nothing but tensors and plain values:
safetensors, JSON, and torch.load(weights_only=True) for accelerate's optimizer, scheduler and RNG states.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch
from accelerate.utils import load as accelerate_load  # torch.load, weights_only=True with numpy's arrays allowed
from safetensors.torch import load_file, save_file

from .files import DiskFullError, atomic_write, file_sha256, free_space

CHECKPOINT_MANIFEST = "manifest.json"  # {"files": {relative path: {"size", "sha256"}}}; final/ has one too
TRAIN_STATE = "train_state.json"
MODEL, EMA_MODEL, NOISE_SCHEDULER = "model", "ema_model", "scheduler"  # diffusers folders
OPTIMIZER_SHARDS = "optimizer_shard_{}.safetensors"  # train.fsdp: one per process
RNG_STATES = "random_states_{}.pkl"  # accelerate's name, one per process
PICKLED_STATES = "custom_checkpoint_*.pkl"  # accelerate's custom states: uvic writes none and reads none


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: incomplete, damaged, or holding files uvic will not unpickle."""


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


# ---------------------------------------------------------------------- the manifest (verify)
def write_manifest(folder) -> Path:
    """manifest.json of every file under `folder` (size, sha256), written atomically: call it last."""
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != CHECKPOINT_MANIFEST
    }
    text = json.dumps({"files": files}, indent=1).encode()
    return atomic_write(folder / CHECKPOINT_MANIFEST, lambda f: f.write(text))


def manifest_size(folder) -> Optional[int]:
    """Bytes of the files a checkpoint's manifest lists (None without a readable manifest)."""
    try:
        files = json.loads((Path(folder) / CHECKPOINT_MANIFEST).read_text())["files"]
        return sum(int(entry["size"]) for entry in files.values())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def checkpoint_problem(folder, full: bool = False) -> Optional[str]:
    """None if `folder` is an intact checkpoint, else what is wrong with it. full: compare hashes too.

    A folder of weights only (model/, ema_model/, scheduler/: no training state, made by hand for sampling) has no
    manifest and is taken unverified; one with training state but no manifest is incomplete."""
    folder = Path(folder)
    if not (folder / CHECKPOINT_MANIFEST).is_file():
        training = [folder / TRAIN_STATE, *folder.glob("optimizer*"), *folder.glob(RNG_STATES.format("*"))]
        return f"no {CHECKPOINT_MANIFEST} (incomplete)" if any(p.exists() for p in training) else None
    try:
        files: Dict[str, dict] = json.loads((folder / CHECKPOINT_MANIFEST).read_text())["files"]
        entries = [(name, int(e["size"]), str(e["sha256"])) for name, e in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable {CHECKPOINT_MANIFEST} ({type(e).__name__}: {e})"
    for name, size, sha in entries:
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
        if full and file_sha256(path) != sha:
            return f"{name} does not match its sha256 in the manifest"
    return None


# ---------------------------------------------------------------------- whole tensors of (possibly sharded) weights
def gather_into(params: List[torch.Tensor], module: Optional[torch.nn.Module], fsdp: bool) -> None:
    """Copy `params` (module's parameter order) into `module` as whole tensors. fsdp: they are DTensor shards,
    all-gathered one at a time (a collective: every process calls it; `module` is None off the main process)."""
    targets = list(module.parameters()) if module is not None else [None] * len(params)
    with torch.no_grad():
        for param, target in zip(params, targets):
            whole = param.full_tensor() if fsdp else param
            if target is not None:
                target.copy_(whole)
            del whole


def shard_of(whole: torch.Tensor, like) -> torch.Tensor:
    """This process's shard (a local tensor) of the whole tensor `whole`, split as the DTensor `like` is."""
    from torch.distributed.tensor import distribute_tensor  # torch.distributed: only FSDP runs need it

    return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements, src_data_rank=None).to_local()


# ---------------------------------------------------------------------- save
def check_free_space(folder: Path, accelerator, latest: Optional[Path], num_params: int) -> None:
    """Fail before a checkpoint the disk cannot hold, on every process (DiskFullError): its size estimated from
    the main process's `latest` checkpoint, or from the weights (num_params) before the first."""
    short = torch.zeros((), device=accelerator.device)
    message = ""
    if accelerator.is_main_process:
        size = manifest_size(latest) if latest is not None else None
        if size is None:  # AdamW's 2 moments + model/ + ema_model/, in float32
            size = 4 * 4 * num_params
        need = int(size * 1.1) + (1 << 20)
        root = next(p for p in (folder, *folder.parents) if p.exists())
        free = free_space(root)
        if free < need:
            short += 1
            message = (f"disk full: checkpoint {folder.name} needs about {need / 1e6:.1f} MB but {root} has "
                       f"{free / 1e6:.1f} MB free; free space there (or lower train.keep_checkpoints, or choose "
                       f"another --output-dir) and rerun the same command: it continues from "
                       f"{latest if latest is not None else 'the start (no checkpoint yet)'}")
    if accelerator.reduce(short, reduction="sum").item() > 0:
        raise DiskFullError(message or f"disk full on the main process writing {folder}")


def skip_model_in_accelerate_state(accelerator) -> None:
    """accelerate's save_state / load_state without the model (diffusers' training scripts do the same): its
    weights are model/ (`save`), restored from there by `load`."""
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())


def save(folder: Path, accelerator, model, ema, optimizer, state: TrainState, noise_scheduler, export,
         fsdp: bool) -> None:
    """Write a checkpoint into `folder` (a temporary name: the caller renames it once this returns), its manifest
    last. Every process calls it. model: the trained UViT (DTensor shards under fsdp); ema: its EMAModel;
    export: the main process's whole-tensor UViT that both sets of weights pass through (None elsewhere)."""
    folder, main = Path(folder), accelerator.is_main_process
    state.ema_optimization_step = ema.optimization_step
    accelerator.save_state(str(folder))  # the LR schedule, RNG states and (not fsdp) the optimizer
    if fsdp:
        save_optimizer_shard(folder / OPTIMIZER_SHARDS.format(accelerator.process_index), model, optimizer)
    for sub, params in ((MODEL, list(model.parameters())), (EMA_MODEL, list(ema.shadow_params))):
        gather_into(params, export, fsdp)
        if main:
            export.save_pretrained(folder / sub)
    if main:
        noise_scheduler.save_pretrained(folder / NOISE_SCHEDULER)
        text = json.dumps(state.state_dict()).encode()
        atomic_write(folder / TRAIN_STATE, lambda f: f.write(text))
    accelerator.wait_for_everyone()  # every process's RNG state (and shard) is written
    if main:
        write_manifest(folder)


def save_optimizer_shard(path: Path, model, optimizer) -> None:
    """FSDP: this process's AdamW state (its shards of exp_avg, exp_avg_sq, and step) as safetensors."""
    tensors = {}
    for name, param in model.named_parameters():
        for key, value in optimizer.state.get(param, {}).items():
            value = value.to_local() if hasattr(value, "to_local") else value
            tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


# ---------------------------------------------------------------------- load
def load(folder, accelerator, model, ema, optimizer, state: TrainState, fsdp: bool) -> None:
    """Restore a checkpoint (intact: its manifest was checked) into the training objects: counters, optimizer,
    LR schedule, RNG states, weights and EMA, unpickling nothing but tensors and plain values."""
    folder = Path(folder)
    pickled = sorted(p.name for p in folder.glob(PICKLED_STATES))
    if pickled:
        raise CheckpointError(f"checkpoint {folder} holds pickled objects ({', '.join(pickled)}); uvic does not load "
                              f"them (they could run code): resume from a checkpoint uvic wrote, or start a new run")
    try:
        state.load_state_dict(json.loads((folder / TRAIN_STATE).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {folder}: cannot read {TRAIN_STATE} ({type(e).__name__}: {e})") from None
    check_processes(folder, accelerator.num_processes, fsdp)
    check_rng_state(folder, accelerator.process_index)
    try:  # accelerate reads optimizer, scheduler and RNG states with torch.load(weights_only=True)
        accelerator.load_state(str(folder))
    except Exception as e:
        raise CheckpointError(f"cannot load checkpoint {folder}: {type(e).__name__}: {str(e)[:300]}") from None
    load_weights(folder / MODEL, model, list(model.parameters()), "model", fsdp)
    if fsdp:
        load_optimizer_shard(folder / OPTIMIZER_SHARDS.format(accelerator.process_index), model, optimizer)
    load_weights(folder / EMA_MODEL, model, list(ema.shadow_params), "EMA", fsdp)
    ema.optimization_step = state.ema_optimization_step


def check_processes(folder: Path, processes: int, fsdp: bool) -> None:
    """An FSDP checkpoint resumes with the processes that wrote it, and a DDP one without train.fsdp."""
    shards = len(list(folder.glob(OPTIMIZER_SHARDS.format("*"))))
    if bool(shards) != fsdp or (shards and shards != processes):
        kind = f"an FSDP checkpoint of {shards} processes" if shards else "a DDP / single-process checkpoint"
        raise CheckpointError(
            f"checkpoint {folder} is {kind}; this run has {processes} processes and train.fsdp={fsdp}: resume it "
            f"with the processes and train.fsdp it was written with, or start a new run from its weights (its "
            f"{MODEL}/ and {EMA_MODEL}/ folders hold whole tensors)")


def check_rng_state(folder: Path, rank: int) -> None:
    """This process's RNG state is there and readable (accelerate would skip an unreadable one without a word)."""
    rng = folder / RNG_STATES.format(rank)
    if not rng.is_file():
        warnings.warn(f"checkpoint {folder} has no {rng.name} (it was written by fewer processes): the resumed "
                      f"run draws other random numbers than an uninterrupted one would")
        return
    try:
        states = accelerate_load(rng)
        states["random_state"], states["torch_manual_seed"], states["numpy_random_seed"]
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {folder}: cannot read {rng.name} ({type(e).__name__}: {str(e)[:200]}); without it a "
            f"resumed run is not the same run; resume from an earlier checkpoint") from None


def load_weights(folder: Path, model, targets: List[torch.Tensor], what: str, fsdp: bool) -> None:
    """Whole tensors from a diffusers folder's safetensors into `targets` (model's parameter order; under fsdp
    DTensors, of which each process keeps its shard), matched by parameter name."""
    tensors = {}
    try:
        for path in sorted(folder.glob("*.safetensors")):
            tensors.update(load_file(str(path)))
    except Exception as e:
        raise CheckpointError(f"cannot read the {what} weights in {folder}: {type(e).__name__}: {e}") from None
    for (name, param), target in zip(model.named_parameters(), targets):
        if name not in tensors or tensors[name].shape != param.shape:
            raise CheckpointError(f"{folder} has no {what} weight {name} of shape {tuple(param.shape)}: "
                                  f"not a checkpoint of this model")
        with torch.no_grad():
            if fsdp:
                target.to_local().copy_(shard_of(tensors[name], target))
            else:
                target.copy_(tensors[name])


def load_optimizer_shard(path: Path, model, optimizer) -> None:
    """FSDP: the AdamW state this process saved (save_optimizer_shard), wrapped back into DTensors."""
    from torch.distributed.tensor import DTensor  # torch.distributed: only FSDP runs need it

    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    state = optimizer.state_dict()
    for i, (name, param) in enumerate(model.named_parameters()):
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
    optimizer.load_state_dict(state)
