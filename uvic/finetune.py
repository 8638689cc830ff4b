"""Fine-tuning: the initial weights of a new run from a published U-ViT .pth or a uvic model (train.init_from).

The weights load strictly into the configured model: every tensor must be there with the same shape, except
the parts named in train.init_reset, which keep their fresh initialisation (a new class count: label_emb; a
new channel count: patch_embed and head). The EMA starts from the loaded weights (the trainer builds it after).

    train.init_from: imagenet256_uvit_large.pth   a published checkpoint, recognised by its file name
                     runs/NAME/final | runs/NAME  a uvic pipeline folder, or a run directory (its final/)
                     runs/NAME/checkpoints/step_X a checkpoint folder (its EMA weights, ema_model/)
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

from .loading import published_reference_config
from .model import UViT, read_reference_state

# train.init_reset names -> the parameter prefixes they re-initialise
INIT_RESET_PARTS = {
    "label_emb": ("label_emb.",),  # the class table: another number of classes
    "head": ("decoder_pred.", "final_layer."),  # the output layers: another number of channels
    "patch_embed": ("patch_embed.",),  # the input projection: another number of channels
}
INIT_KINDS = ("a published U-ViT .pth (by its file name), a uvic pipeline folder (final/), a run directory or "
              "a checkpoint folder (ema_model/)")


def init_weights_folder(path: Path) -> Path:
    """The UViT folder (config.json + safetensors) of a uvic pipeline, run or checkpoint folder."""
    for sub in ("transformer", "model", "ema_model", "final/transformer", "final/model"):
        if (path / sub / "config.json").is_file() and (sub != "model" or not (path / "ema_model").is_dir()):
            return path / sub
    raise ValueError(f"train.init_from={path}: no model weights there; expected {INIT_KINDS}")


def check_init_source(path, reset: Sequence[str]) -> None:
    """train.init_from / init_reset at config load, before anything is built: a bad one fails in one line."""
    bad = [name for name in reset if name not in INIT_RESET_PARTS]
    if bad:
        raise ValueError(f"train.init_reset: unknown part(s) {bad}; choose from {', '.join(INIT_RESET_PARTS)}")
    if path is None:
        if reset:
            raise ValueError("train.init_reset needs train.init_from (the weights the other parts come from)")
        return
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"train.init_from={path} does not exist; expected {INIT_KINDS}")
    if path.is_file():
        try:
            published_reference_config(path)
        except ValueError as err:  # another name: the list of the published ones
            raise ValueError(f"train.init_from: {str(err).split(': pass')[0]}") from None
    else:
        init_weights_folder(path)


def source_state(path) -> Dict:
    """The state dict (name -> tensor) that train.init_from names."""
    path = Path(path)
    if path.is_file():  # a published .pth
        return read_reference_state(str(path))
    return UViT.from_pretrained(init_weights_folder(path)).state_dict()


def load_init_weights(model, path, reset: Sequence[str] = ()) -> List[str]:
    """Copy train.init_from's weights into `model` (strictly, but for the `reset` parts); returns the names of
    the re-initialised tensors. Differing shapes, missing or unexpected tensors fail, listed by name."""
    prefixes = tuple(p for name in reset for p in INIT_RESET_PARTS[name])
    state = {k: v for k, v in source_state(path).items() if not k.startswith(prefixes)}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    shapes = [f"{k} {tuple(state[k].shape)} there, {tuple(v.shape)} here" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if shapes or missing or unexpected:
        found = [f"shapes differ: {'; '.join(shapes)}" if shapes else "", f"missing: {', '.join(missing)}" if missing else "",
                 f"unexpected: {', '.join(unexpected)}" if unexpected else ""]
        raise ValueError(f"train.init_from={path} does not fit the configured model ({'; '.join(f for f in found if f)}); "
                         "train.init_reset=[label_emb] re-initialises the class table (another class count), [head] "
                         "and [patch_embed] the output and input layers (another channel count)")
    model.load_state_dict(state, strict=False)  # strict for every tensor but the reset ones, checked above
    return sorted(k for k in model.state_dict() if k.startswith(prefixes))
