"""Train a U-ViT / U-ViC diffusion model (see uvic/train_cli.py, uvic/trainer.py and README.md).

    python train.py                                   # U-ViC on the embedded digits, CPU, minutes
    python train.py --config configs/cifar10_uvic_s2.yaml [key=value ...] [--output-dir DIR] [--resume latest]
"""

from uvic.train_cli import train

if __name__ == "__main__":
    train()  # bad input: one `error:` line, exit 2 (--debug or UVIC_DEBUG=1: the traceback)
