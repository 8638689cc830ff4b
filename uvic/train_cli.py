"""The command line of train.py and `uvic-train`: a config (a path or a shipped config's name), dotted overrides, the
run folder and how to treat what is in it; the checks of the files the config names, then uvic.trainer.Trainer.

    python train.py --config configs/digits_uvic.yaml train.lr=1e-4 --output-dir runs/x [--resume latest | --overwrite]

A SIGTERM'd run (uvic.sigterm.TrainingStopped, its checkpoint written) exits with 128 + 15, the schedulers' convention.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Optional, Sequence

from .cli import run_main
from .config import load_config
from .data import resolve_data_config
from .launch import check_inputs, find_config
from .sigterm import TrainingStopped
from .trainer import Trainer


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
