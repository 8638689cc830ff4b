"""One scored sample set as a row: the CSV columns (report.csv, eval_fid.py --csv), the row from a metrics result
and the set's manifest, and the cell and stdout formats of its figures.
"""

from __future__ import annotations

import csv
import datetime
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import digits_classifier
from .attention import MECHANISMS
from .feature_extractors import INCEPTION
from .pipeline import SCHEDULERS


CSV_COLUMNS = (
    "date", "samples", "model", "attention", "params", "step", "sampler", "steps", "guidance", "seed",
    "num_samples", "ref", "num_ref", "extractor", "fid", "isc_mean", "isc_std", "kid_mean", "kid_std",
    "precision", "recall", "clip_score", "train_seed", "fid_low", "fid_high", "kid", "kid_se", "code",
    "classes", "class_tv", "class_p", "memorised", "memorised_low", "memorised_high",
)  # fmt: skip; the last six: digits references only (uvic.digits_checks)
DEFAULT_CSV = "runs/eval_fid.csv"


def sampler_name(manifest: dict) -> Optional[str]:
    """The uvic.pipeline.SCHEDULERS name of a manifest's scheduler (its class name if none matches)."""
    sched = manifest.get("scheduler")
    if not isinstance(sched, dict):
        return sched
    for name, (cls, extra) in SCHEDULERS.items():
        if cls.__name__ == sched.get("class") and all(sched.get(k) == v for k, v in extra.items()):
            return name
    return sched.get("class")


def attention_label(name: Optional[str]) -> str:
    """"U-ViC (Cog)" for "cog": the registered mechanism's label (uvic.attention.MECHANISMS), else the name."""
    return MECHANISMS[name].label if name in MECHANISMS else (name or "–")


def make_row(result: dict, *, samples: str, ref: str, manifest: Optional[dict] = None, **info) -> dict:
    """One CSV / report row from compute_metrics' result, the sample set's manifest and model info."""
    manifest = manifest or {}
    row = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "samples": samples,
        "model": manifest.get("source") or manifest.get("model"),
        "sampler": sampler_name(manifest),
        "steps": manifest.get("steps"),
        "guidance": manifest.get("guidance"),
        "seed": manifest.get("seed"),
        "ref": ref,
    }
    row.update({k: v for k, v in info.items() if v is not None})
    row.update({k: v for k, v in result.items() if k in CSV_COLUMNS})
    return {k: row.get(k) for k in CSV_COLUMNS}


def append_csv(path, rows: Sequence[dict]) -> Path:
    """Append rows (CSV_COLUMNS) to `path`, writing the header when the file is new; a file of other columns is
    refused (its rows would land under the wrong headers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != list(CSV_COLUMNS):
            raise ValueError(f"{path} has other columns than this version writes ({', '.join(CSV_COLUMNS)}); "
                             "append to another CSV file")
    with open(path, "w" if new else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in rows])
    return path


def digits_columns(checks: dict) -> dict:
    """The CSV columns of one run's digits checks: class counts, their balance, the memorisation score."""
    closer = checks["memorisation"]["closer"]
    return {"classes": " ".join(map(str, checks["counts"])), "class_tv": checks["balance"]["tv"],
            "class_p": checks["balance"]["p"], "memorised": closer.mean, "memorised_low": closer.low,
            "memorised_high": closer.high}


def steps_by_run(rows: Sequence[dict]) -> Dict[str, Optional[int]]:
    """Training steps of each run (a row's model up to its "@checkpoint"): the most of its rows' steps; None:
    not recorded (a pipeline folder outside a run)."""
    out: Dict[str, Optional[int]] = {}
    for r in rows:
        run = r["model"].split("@")[0]
        known = [s for s in (out.get(run), r.get("step")) if s is not None]
        out[run] = max(known) if known else None
    return out


def different_steps(rows: Sequence[dict]) -> List[int]:
    """The runs' step counts (steps_by_run, the recorded ones) when they differ, smallest first; [] when not."""
    steps = sorted({s for s in steps_by_run(rows).values() if s is not None})
    return steps if len(steps) > 1 else []


def steps_label(rows: List[dict]) -> str:
    """"4 steps", "2–4 steps" (the steps of a seed group's runs), "" when none is recorded."""
    steps = sorted({r["step"] for r in rows if r.get("step") is not None})
    if not steps:
        return ""
    return f"{steps[0]:,} steps" if len(steps) == 1 else f"{steps[0]:,}–{steps[-1]:,} steps"


def fmt(value, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def format_result(result: dict) -> str:
    """The figures of compute_metrics' result as stdout lines."""
    lines = [f"FID        {result['fid']:.4f}"] if "fid" in result else []
    if "isc_mean" in result:
        lines.append(f"IS         {result['isc_mean']:.4f} ± {result['isc_std']:.4f}")
    if "kid_mean" in result:
        lines.append(f"KID        {result['kid_mean']:.6f} ± {result['kid_std']:.6f} (spread over subsets)")
    if "kid" in result:
        lines.append(f"KID        {result['kid']:.6f} ± {result['kid_se']:.6f} (all vs all, standard error)")
    if "precision" in result:
        lines.append(f"precision  {result['precision']:.4f}")
        lines.append(f"recall     {result['recall']:.4f}")
    lines.append(f"({result['num_samples']} samples vs {result['num_ref']} reference; features: {result['extractor']})")
    return "\n".join(lines)


def features_note(extractor: str) -> str:
    """What the numbers are, for the report."""
    if extractor == INCEPTION:
        return ("torch-fidelity's Inception-v3 (the TensorFlow FID network): FID on its 2048-d pool features, "
                "IS on its logits, KID on the 2048-d features")
    if extractor == digits_classifier.EXTRACTOR_NAME:
        _, meta = digits_classifier.load_digits_cnn()
        return (f"the 64-d features (penultimate layer before its ReLU, every unit live) of uvic's digits classifier "
                f"(held-out accuracy {float(meta['test_accuracy']):.1%} "
                f"on {meta['test_size']} digits), so \"FID\" is a Fréchet distance in that space and IS its "
                "10-class analogue: comparable between these runs, not with Inception FIDs")
    return f"torch-fidelity extractor {extractor}"
