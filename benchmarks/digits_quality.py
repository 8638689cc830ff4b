"""Are the digits demo's samples recognisable digits of every class? An independent check.

An sklearn SVC trained on 80% of the original 8x8 digits classifies N samples of a pipeline
(downsampled 16x16 -> 8x8 by 2x2 averaging); reference: the held-out real digits through the same
8 -> 16 -> 8 path. Prints mean confidence, the share above 0.8 and the class spread.

    python benchmarks/digits_quality.py runs/digits_uvic/final [--num-samples 500] [--steps 25]
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC

from uvic.data import DigitsDataset
from uvic.pipeline import UViCPipeline, make_scheduler


def to_8x8(images: torch.Tensor) -> np.ndarray:
    """(N, 1, 16, 16) in [0, 1] -> (N, 64) on sklearn's 0..16 scale."""
    return (F.avg_pool2d(images, 2) * 16).reshape(len(images), -1).numpy()


def report(name, classifier, features, labels=None):
    proba = classifier.predict_proba(features)
    confidence, predicted = proba.max(1), proba.argmax(1)
    counts = np.bincount(predicted, minlength=10)
    line = (f"{name}: n={len(features)} mean confidence {confidence.mean():.3f}, "
            f"confidence>=0.8 {np.mean(confidence >= 0.8):.3f}, class counts {counts.tolist()} "
            f"(smallest share {counts.min() / len(features):.3f})")
    if labels is not None:
        line += f", accuracy {np.mean(predicted == labels):.3f}"
    print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", help="a pipeline folder, e.g. runs/digits_uvic/final")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--scheduler", default="dpm++2m")
    args = parser.parse_args()

    digits = load_digits()
    index = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(index, test_size=0.2, random_state=0, stratify=digits.target)
    classifier = SVC(gamma=0.001, C=10, probability=True, random_state=0)
    classifier.fit(digits.data[train_idx], digits.target[train_idx])

    real = (torch.as_tensor(DigitsDataset(16).images) + 1) / 2  # (N, 1, 16, 16) in [0, 1]
    report("held-out real digits (8->16->8)", classifier, to_8x8(real[test_idx]), digits.target[test_idx])

    pipe = UViCPipeline.from_pretrained(args.pipeline)
    pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    batches = [min(100, args.num_samples - i) for i in range(0, args.num_samples, 100)]
    images = torch.cat([
        pipe(batch_size=n, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(1000 + i),
             output_type="pt").images
        for i, n in enumerate(batches)
    ])
    report(f"samples of {args.pipeline} ({args.scheduler}, {args.steps} steps)", classifier, to_8x8(images))


if __name__ == "__main__":
    main()
