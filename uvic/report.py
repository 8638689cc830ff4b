"""The U-ViC vs U-ViT comparison report (report.md, report.csv, fid.png): every run sampled alike, scored, grouped
over seeds, compared and written up.

Each run (uvic.run_specs) is sampled into a resumable sample set and scored against one reference (uvic.metrics);
the rows (uvic.report_rows) are grouped over train.seed and paired (uvic.seed_groups), their statistics written as
markdown (uvic.report_stats) and plotted (uvic.report_plots). The command line is uvic.evaluate.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import metrics, stats
from .clip_score import load_clip, sample_set_clip_score
from .config import TrainConfig
from .digits_checks import check_lines, digits_checks
from .digits_classifier import SPLITS as DIGITS_INPUTS
from .feature_extractors import INCEPTION
from .metric_inputs import load_input
from .report_plots import plot_curves, plot_fid
from .report_rows import (append_csv, attention_label, different_steps, digits_columns, features_note, fmt, format_result,
                          make_row, steps_by_run)
from .report_stats import parse_plan, record_looks, statistics_lines
from .run_specs import RunSpec, parse_run_specs, run_code, run_config, sample_model
from .sample_sets import read_set_manifest
from .seed_groups import SeedGroup, group_by_seed, paired_comparisons


def check_code(rows: List[dict], allow_mixed_code: bool = False) -> List[str]:
    """Runs of different code are not compared unless allowed (a batch effect would pass for an effect of the
    model): raises ValueError naming them; returns the report's lines about the code of its runs."""
    codes: Dict[str, List[str]] = {}
    for r in rows:
        codes.setdefault(r.get("code") or "not recorded", []).append(r["model"])
    known = [c for c in codes if c != "not recorded"]
    listing = "; ".join(f"{code}: {', '.join(models)}" for code, models in codes.items())
    if len(known) > 1 or any("+" in c for c in known):
        if not allow_mixed_code:
            raise ValueError(f"the runs ran different code (uvic source sha256 by run: {listing}); compare runs of "
                             "one code version, or pass --allow-mixed-code to group them anyway (the report says so)")
        return [f"**Runs of different code grouped (--allow-mixed-code):** {listing}. A difference between code "
                "versions can pass for a difference between models.", ""]
    if "not recorded" in codes:
        return [f"Code (uvic source sha256, from each run's provenance.json): {listing}; runs without "
                "provenance.json predate the record and cannot be checked.", ""]
    return [f"Code: every run trained with uvic source sha256 {known[0]} (provenance.json).", ""]


def sample_set_digits_checks(npz, config: Optional[dict]) -> dict:
    """uvic.digits_checks of a sample set (its arr_0, uint8 NHWC) against the digits its run trained on: the
    run config's data.split ("all" for a model without one)."""
    split = ((config or {}).get("data") or {}).get("split") or "all"
    with np.load(npz) as f:
        images = f["arr_0"]  # (N, H, W, 3) uint8
    return digits_checks(images, split)


def digits_lines(rows: List[dict], checks: List[dict]) -> List[str]:
    """The report's "Classes and memorisation" section: one run's lines per run."""
    lines = ["## Classes and memorisation", "",
             "Beside the Fréchet distance (uvic.digits_checks): which classes each set holds, by the digits CNN's "
             "labels, against the held-out digits; and how many samples lie nearer a training digit than new "
             "digits do (a copying model approaches 100 %).", ""]
    for row, run_checks in zip(rows, checks):
        lines += check_lines(row["model"], run_checks)
    if any(c["train_split"] == "all" for c in checks):
        lines += ["", "Runs trained on data.split=all saw the held-out digits too: their nearest-digit threshold is 0, "
                  "so that line cannot show copying (train with data.split=train for it)."]
    return lines + [""]


def results_lines(rows: List[dict], settings: dict) -> List[str]:
    """The report's head: how every model was sampled and scored, and the table of one row per run."""
    have = {k for r in rows for k, v in r.items() if v is not None}
    intro = (f"Every model sampled alike: {settings['num_samples']} samples, sampler {settings['scheduler']}, "
             f"{settings['steps']} steps, guidance w = {settings['guidance']:g}, seed {settings['seed']} (EMA weights). "
             f"Reference: {settings['ref']} ({fmt(rows[0]['num_ref'], ',d')} images). "
             f"Features: {features_note(rows[0]['extractor'])}.")
    if "kid_mean" in have:
        intro += (" KID: the unbiased MMD² of all samples against all reference images (each capped at 5,000), "
                  "± its jackknife standard error." if "kid" in have else
                  f" KID: {settings.get('kid_subsets', 100)} subsets of {settings['kid_subset_size']}.")
    columns = _table_columns(have)
    lines = ["# U-ViC vs U-ViT", "", intro, "", "| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(str(cell(r)) for _, cell in columns) + " |" for r in rows] + [""] + steps_lines(rows)


def steps_lines(rows: List[dict]) -> List[str]:
    """When the runs trained for different step counts, a line that says so, with each run's count."""
    if not different_steps(rows):
        return []
    listing = "; ".join(f"{run}: {fmt(s, ',d')}" for run, s in steps_by_run(rows).items())
    return [f"**Runs trained for different step counts** ({listing}): a difference in training length can pass "
            "for a difference between models.", ""]


def _table_columns(have: set) -> List[tuple]:
    """(header, cell of a row) of the table's columns: the fixed ones, then those the rows have values for."""
    kid, spread = ("kid", "kid_se") if "kid" in have else ("kid_mean", "kid_std")

    def milli(value):
        return None if value is None else 1e3 * value

    fixed = [("model", lambda r: r["model"]), ("attention", lambda r: attention_label(r["attention"])),
             ("params", lambda r: fmt(r["params"], ",d")), ("steps trained", lambda r: fmt(r["step"], ",d")),
             ("FID", lambda r: fmt(r["fid"]))]
    optional = [  # (the row key that must have a value, header, cell)
        ("fid_low", f"FID {stats.CONFIDENCE:.0%} bootstrap",
         lambda r: "–" if r["fid_low"] is None else f"[{r['fid_low']:.3f}, {r['fid_high']:.3f}]"),
        ("train_seed", "train seed", lambda r: fmt(r["train_seed"], "d")),
        ("isc_mean", "IS", lambda r: f"{fmt(r['isc_mean'], '.2f')} ± {fmt(r['isc_std'], '.2f')}"),
        ("kid_mean", "KID ×10³ ± SE" if "kid" in have else "KID ×10³ (± spread over subsets)",
         lambda r: f"{fmt(milli(r[kid]), '.2f')} ± {fmt(milli(r[spread]), '.2f')}"),
        ("precision", "precision", lambda r: fmt(r["precision"])),
        ("precision", "recall", lambda r: fmt(r["recall"])),
        ("clip_score", "CLIP score", lambda r: fmt(r["clip_score"], ".2f")),
    ]
    return fixed + [(header, cell) for key, header, cell in optional if key in have]


def write_report(rows: List[dict], out_dir, *, settings: dict, command: str,
                 groups: Optional[List[SeedGroup]] = None, digits: Optional[List[dict]] = None) -> dict:
    """report.md (tables, statistics, verdict), report.csv (all columns) and fid.png in out_dir -> their paths.
    digits: each row's digits checks (a digits reference), for the "Classes and memorisation" section."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "report.md", "csv": out_dir / "report.csv", "png": out_dir / "fid.png"}
    paths["csv"].unlink(missing_ok=True)
    append_csv(paths["csv"], rows)
    lines = results_lines(rows, settings) + (settings.get("code_lines") or [])
    if digits:
        lines += digits_lines(rows, digits)
    if groups:
        lines += statistics_lines(groups, settings)
        if plot_curves(groups, out_dir / "curves.png") is not None:
            lines += ["![learning curves](curves.png)", ""]
    lines += [f"![FID]({paths['png'].name})", "", "Made with:", "", f"    {command}",
              "", f"{rows[0]['date']}; rows also in {paths['csv'].name}.", ""]
    paths["md"].write_text("\n".join(lines))
    plot_fid(rows, paths["png"], groups=groups,
             ylabel="FID" if rows[0]["extractor"] == INCEPTION else "Fréchet distance")
    return paths


def compare(runs: Sequence[str], *, ref: str, out_dir, num_samples: int, scheduler: str = "dpm++2m",
            steps: int = 50, guidance: float = 1.0, seed: int = 0, batch_size: int = 64, device=None,
            checkpoints: Optional[Sequence[str]] = None, isc: bool = True, kid: bool = True, prc: bool = False,
            kid_subset_size: int = metrics.KID_SUBSET_SIZE, bootstrap: int = 200, command: str = "",
            progress: bool = True, samples_dir=None, prompts=None, clip=None, timestep_spacing=None, margin: Optional[float] = None,
            plan: Optional[str] = None, allow_mixed_code: bool = False, fail_above: Optional[float] = None,
            **metric_kwargs) -> dict:
    """Sample every run alike into samples_dir (default out_dir/samples), score each against `ref` (with a
    bootstrap interval over samples from `bootstrap` resamples; 0: none), group runs that differ only by
    train.seed, and write the report to out_dir.

    KID uses subsets of min(kid_subset_size, num_samples, reference size); KID is left out against a
    reference that holds only statistics. Returns the report's paths, the rows and the seed groups.
    Text-to-image runs: `prompts` (sample i from prompts[i], the same for every model) and `clip` (a CLIP
    model folder: the CLIP score of each set against its prompts, uvic.clip_score). A digits reference (digits,
    digits-train, digits-heldout) adds each set's class histogram and memorisation score (uvic.digits_checks).

    Inference: margin (TOST equivalence within ±margin), plan ("SPENDING:MAX_PAIRS", recorded with a
    comparison's first look in out_dir/looks.jsonl: the alpha-spending plan of later looks), fail_above (a run
    with a higher FID counts as failed). Runs whose provenance.json names other code are refused before any
    sampling unless allow_mixed_code.
    """
    plan_dict = parse_plan(plan)  # bad input: before any sampling
    if margin is not None and not margin > 0:
        raise ValueError(f"--margin must be positive, got {margin}")
    specs = [s for text in runs for s in parse_run_specs(text, checkpoints)]
    _check_options([s.label for s in specs], num_samples=num_samples, bootstrap=bootstrap, clip=clip, prompts=prompts)
    configs = [run_config(s) for s in specs]
    code_lines = check_code([{"model": s.label, "code": run_code(s)} for s in specs], allow_mixed_code)
    clip_model = None if clip is None else load_clip(clip, device or "cpu")  # missing weights: before any sampling
    ref_in = load_input(ref, data_root=metric_kwargs.get("data_root"), download=metric_kwargs.get("download", True),
                        cache=True)
    if kid and ref_in.num_images is None:
        print(f"note: KID left out: {ref} holds only statistics", file=sys.stderr)
        kid = False
    kid_subset_size = min(kid_subset_size, num_samples, ref_in.num_images or num_samples)
    sampling = dict(num_samples=num_samples, scheduler=scheduler, steps=steps, guidance=guidance, seed=seed,
                    batch_size=batch_size, device=device, progress=progress, prompts=prompts,
                    timestep_spacing=timestep_spacing, feature_extractor=metric_kwargs.get("feature_extractor"),
                    allow_resize=metric_kwargs.get("allow_resize", False))
    scoring = dict(fid=True, isc=isc, kid=kid, prc=prc, batch_size=batch_size, device=device,
                   kid_subset_size=kid_subset_size, bootstrap=bootstrap, bootstrap_seed=seed, **metric_kwargs)
    rows, digits = [], []
    for spec, config in zip(specs, configs):
        sample_dir = Path(samples_dir or Path(out_dir) / "samples") / spec.label.replace("@", "_at_")
        row, checks = score_run(spec, config, sample_dir, ref_in, ref=str(ref), clip_model=clip_model,
                                sampling=sampling, scoring=scoring)
        rows.append(row)
        digits += [checks] if checks is not None else []
    groups = group_by_seed(rows, configs, [s.checkpoint for s in specs])
    settings = dict(num_samples=num_samples, scheduler=scheduler, steps=steps, guidance=guidance, seed=seed,
                    **({"timestep_spacing": timestep_spacing} if timestep_spacing else {}),
                    ref=ref, kid_subset_size=kid_subset_size, bootstrap=bootstrap, bootstrap_seed=seed, margin=margin,
                    fail_above=fail_above, code_lines=code_lines,
                    looks=record_looks(out_dir, paired_comparisons(groups), plan_dict))
    command = command or (f"python eval_fid.py compare {' '.join(map(str, runs))} --ref {ref} --num-samples "
                          f"{num_samples} --scheduler {scheduler} --steps {steps} --guidance {guidance:g} --seed {seed} "
                          f"--bootstrap {bootstrap}" + (f" --plan {plan}" if plan else "")
                          + (f" --margin {margin:g}" if margin else ""))
    paths = write_report(rows, out_dir, settings=settings, command=command, groups=groups, digits=digits)
    return {**paths, "rows": rows, "groups": groups}


def _check_options(labels: List[str], *, num_samples: int, bootstrap: int, clip, prompts):
    """compare's options, before anything is loaded or sampled."""
    if len(set(labels)) != len(labels):
        raise ValueError(f"runs repeat: {labels}")
    if num_samples < 2:
        raise ValueError(f"--num-samples must be at least 2, got {num_samples}")
    if bootstrap == 1 or bootstrap < 0:
        raise ValueError(f"--bootstrap must be 0 (off) or at least 2 resamples, got {bootstrap}")
    if clip is not None and prompts is None:
        raise ValueError("--clip scores samples against their prompts: give --prompts FILE")


def score_run(spec: RunSpec, config: Optional[dict], sample_dir: Path, ref_in, *, ref: str, clip_model,
              sampling: dict, scoring: dict) -> tuple:
    """One run of a comparison sampled into sample_dir (resumable) and scored -> (its row, its digits checks: None
    unless the reference is a digits input). sampling: sample_model's options; scoring: compute_metrics'."""
    npz, info = sample_model(spec, sample_dir, ref=ref_in, **sampling)
    result = metrics.compute_metrics(str(npz), ref_in, **scoring)
    if clip_model is not None:
        result["clip_score"] = sample_set_clip_score(Path(npz).parent, clip_model, scoring["batch_size"])
    print(f"{spec.label}: " + format_result(result).replace("\n", "; "), file=sys.stderr)
    checks = sample_set_digits_checks(npz, config) if ref in DIGITS_INPUTS.values() else None
    if checks is not None:
        result.update(digits_columns(checks))
    train_seed = None if config is None else config.get("train", {}).get("seed", TrainConfig.seed)
    row = make_row(result, samples=str(npz), ref=ref, manifest=read_set_manifest(Path(npz)), train_seed=train_seed,
                   code=run_code(spec), **info)
    return row, checks
