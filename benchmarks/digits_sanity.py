"""What a Fréchet distance in the digits classifier's feature space means: the distance of real and degraded digits
to the held-out reference (the 360 digits of `--ref digits-heldout`), so a difference between models reads against
a floor (real vs real) and known damage. Writes docs/results/digits_sanity.md (seconds on a CPU).

    python benchmarks/digits_sanity.py [--out docs/results/digits_sanity.md]
"""
import argparse
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from uvic import digits_classifier as dc
from uvic.fid import FIDStatistics, frechet_distance, kid_with_se


def reading(fd: dict) -> str:
    """What a difference of 0.3 means, read against the measured rows (fd: name -> Fréchet distance)."""
    floor, shift = fd[FLOOR_360], fd[SHIFT]
    return (f"Reading: a difference of 0.3 between two models is about {0.3 / floor:.0f}× the real-vs-real floor at "
            f"the reference's size ({floor:.3f}) and about {0.3 / shift:.2f} of a 1-px shift ({shift:.2f}); dropping one "
            f"class ({fd[CLASS_8]:.3f}) is barely penalised and mild pixel noise ({fd[NOISE_32]:.3f}) little more, so "
            "this score is blind to some failures a histogram of classes shows.")


KID_READING = (
    "Reading: between halves of one split the estimate is centred on 0 and the jackknife SE is at or above its "
    "spread over re-splits: there the SE holds. For the training split against the held-out digits (1,437 vs 360) "
    "the jackknife SE is about half the spread of the re-drawn splits, and the observed KID lies below nearly every "
    "re-draw: the two splits are not exchangeable in this feature space (the classifier trained on one of them), and "
    "KID's SE is a lower bound when the two sets differ much in size.")


def features(model, images: np.ndarray) -> np.ndarray:
    """uint8 (N, 8, 8) -> (N, 64) features."""
    x = dc.resize(torch.from_numpy(images).float().unsqueeze(1) / 255.0)  # (N, 1, 16, 16)
    with torch.no_grad():
        return model(x)[0].numpy()


FLOOR_360 = "real, training split, 360 drawn at random (floor at the reference's size)"
SHIFT = "1-px shift (8x8 pixels, right)"
CLASS_8 = "class 8 dropped"
NOISE_32 = "Gaussian noise σ = 32 (of 255) added"


def degradations(images: np.ndarray, labels: np.ndarray, rng) -> dict:
    """Name -> uint8 (N, 8, 8) image set made from the training-split digits."""
    f = images.astype(np.float64)
    return {
        "real, training split (floor: what a perfect model of the training digits scores)": images,
        FLOOR_360: images[rng.choice(len(images), 360, replace=False)],
        CLASS_8: images[labels != 8],
        SHIFT: np.roll(images, 1, axis=2),
        "blur, Gaussian σ = 1 px": np.clip(gaussian_filter(f, sigma=(0, 1, 1)), 0, 255).round().astype(np.uint8),
        "classes 0–4 only": images[labels < 5],
        NOISE_32: np.clip(f + rng.normal(0, 32, f.shape), 0, 255).round().astype(np.uint8),
        "uniform noise images": rng.integers(0, 256, images.shape).astype(np.uint8),
    }


def kid_calibration(train: np.ndarray, held: np.ndarray, rng, splits: int = 100) -> list:
    """Is KID's jackknife SE the spread KID really has? Against random re-splits (the permutation distribution):
    halves of one split (exchangeable by construction), and train vs held-out re-drawn from their pool."""
    rows = []
    for name, f in (("two halves of the training split", train), ("two halves of the held-out split", held)):
        draws = [kid_with_se(*np.split(f[rng.permutation(len(f))][: len(f) // 2 * 2], 2)) for _ in range(splits)]
        kid, se = np.array(draws).T
        rows.append(f"| {name} | {1e3 * kid.mean():.2f} | {1e3 * kid.std(ddof=1):.2f} | {1e3 * se.mean():.2f} | |")
    observed, se = kid_with_se(train, held)
    pool = np.concatenate([train, held])
    null = np.array([kid_with_se(*np.split(pool[rng.permutation(len(pool))], [len(train)]))[0] for _ in range(splits)])
    rows.append(f"| training split vs held-out, re-drawn from their pool | {1e3 * null.mean():.2f} | "
                f"{1e3 * null.std(ddof=1):.2f} | {1e3 * se:.2f} | observed {1e3 * observed:.2f}: below "
                f"{(null > observed).mean():.0%} of the re-draws |")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/results/digits_sanity.md")
    a = p.parse_args()
    torch.set_num_threads(1)
    model, meta = dc.load_digits_cnn()
    images, labels = dc.digits_images()
    train, held = dc.split_index("train"), dc.split_index("heldout")
    ref = features(model, images[held])
    ref_stats = FIDStatistics.from_features(ref)
    live, pr = dc.feature_dimensions(features(model, images))
    rows, fds = [], {}
    for name, imgs in degradations(images[train], labels[train], np.random.default_rng(0)).items():
        f = features(model, imgs)
        kid, se = kid_with_se(f, ref)
        fd = frechet_distance(f.mean(0), np.cov(f, rowvar=False), ref_stats.mu, ref_stats.sigma)
        fds[name] = fd
        rows.append(f"| {name} | {len(imgs):,} | {fd:.3f} | {1e3 * kid:.2f} ± {1e3 * se:.2f} |")
        print(rows[-1])
    calibration = kid_calibration(features(model, images[train]), ref, np.random.default_rng(1))
    print(*calibration, sep="\n")
    text = "\n".join([
        "# The digits score: floor and degradations", "",
        f"Fréchet distance (\"FID\") and KID in the feature space of uvic's digits classifier ({meta['path'].split('/')[-1]}, "
        f"sha256 {meta['sha256'][:12]}, held-out accuracy {float(meta['test_accuracy']):.1%}; features before the "
        f"penultimate ReLU: {live} of 64 units live, participation-ratio dimension {pr:.1f}) of each image set "
        "against the reference `digits-heldout` (the 360 digits of the fixed stratified split that neither the "
        "classifier nor a `data.split=train` diffusion model trains on). Every set is made from the 1,437 "
        "training-split digits. KID ×10³ ± its jackknife standard error. Lower is better.", "",
        "| image set | images | Fréchet distance | KID ×10³ ± SE |", "|---|---|---|---|", *rows, "",
        "Made with `python benchmarks/digits_sanity.py` (deterministic: fixed split, seeded noise).", "",
        reading(fds), "",
        "## KID's standard error against re-drawn splits", "",
        "KID ×10³ over 100 random re-splits (seeded): the mean and spread of the estimates, beside the mean "
        "jackknife SE (`uvic.fid.kid_with_se`).", "",
        "| sets | mean KID | SD over re-splits | jackknife SE | |", "|---|---|---|---|---|", *calibration, "",
        KID_READING, ""])
    Path(a.out).write_text(text)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
