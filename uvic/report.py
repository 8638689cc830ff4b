"""Scoring models and the U-ViC vs U-ViT comparison report (report.md, report.csv, fid.png).

A model (pipeline folder, run directory, RUN@STEP) is first sampled with uvic.sampling into a
resumable sample set, then scored like any other set. Sampling metadata of a set (sampler, steps,
guidance, model) comes from its manifest.json when there is one. Runs that differ only in train.seed
are grouped and summarised over seeds (uvic.stats); the command line is uvic.evaluate.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

from . import loading, metrics, stats
from .attention import MECHANISMS
from .clip_score import load_clip, sample_set_clip_score
from .config import TrainConfig, load_config
from .digits_checks import check_lines, digits_checks
from .digits_classifier import SPLITS as DIGITS_INPUTS
from .model import softmax_block_indices
from .pipeline import SCHEDULERS
from .runs import CONFIG, PROVENANCE, RunDir
from .sampling import generate_samples

CSV_COLUMNS = (
    "date", "samples", "model", "attention", "params", "step", "sampler", "steps", "guidance", "seed",
    "num_samples", "ref", "num_ref", "extractor", "fid", "isc_mean", "isc_std", "kid_mean", "kid_std",
    "precision", "recall", "clip_score", "train_seed", "fid_low", "fid_high", "kid", "kid_se", "code",
    "classes", "class_tv", "class_p", "memorised", "memorised_low", "memorised_high",
)  # fmt: skip; the last six: digits references only (uvic.digits_checks)
DEFAULT_CSV = "runs/eval_fid.csv"
LOOKS_LOG = "looks.jsonl"  # in a report folder: one line per look at a comparison (uvic.report.record_looks)
MAX_DEFAULT_SAMPLES = 50_000


# ---------------------------------------------------------------------- models as sample sources
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
        raise FileNotFoundError(f"run {path} does not exist (expected a run directory or a pipeline folder)")
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


def sampler_name(manifest: dict) -> Optional[str]:
    """The uvic.pipeline.SCHEDULERS name of a manifest's scheduler (its class name if none matches)."""
    sched = manifest.get("scheduler")
    if not isinstance(sched, dict):
        return sched
    for name, (cls, extra) in SCHEDULERS.items():
        if cls.__name__ == sched.get("class") and all(sched.get(k) == v for k, v in extra.items()):
            return name
    return sched.get("class")


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
        size = metrics.MetricInput(spec.label, image_size=tuple(pipe.image_shape[1:]))
        metrics.check_resolution(size, ref, metrics.choose_extractor(feature_extractor, ref), allow_resize)
    pipe.to(torch.device(device) if device else ("cuda" if torch.cuda.is_available() else "cpu"))
    npz = generate_samples(pipe, out_dir, num_samples=num_samples, batch_size=batch_size, seed=seed,
                           scheduler=None if scheduler == "saved" else scheduler, steps=steps, guidance=guidance,
                           progress=progress, prompts=prompts, timestep_spacing=timestep_spacing)
    return npz, info


def default_samples_dir(spec: RunSpec, scheduler: str, steps: int, guidance: float, seed: int,
                        timestep_spacing: Optional[str] = None) -> Path:
    """<run>/eval_samples/<checkpoint>_<sampler>_<steps>steps_w<guidance>_seed<seed>[_<spacing>]; beside a pipeline
    folder that is not in a run, <folder>_eval_samples/..."""
    where = spec.run_dir / "eval_samples" if spec.run_dir else spec.path.with_name(f"{spec.path.name}_eval_samples")
    spacing = f"_{timestep_spacing}" if timestep_spacing else ""
    return where / f"{spec.checkpoint or 'final'}_{scheduler}_{steps}steps_w{guidance:g}_seed{seed}{spacing}"


# ---------------------------------------------------------------------- seeds: groups, intervals, pairs
# Keys a U-ViC group and its U-ViT partner may differ in: the attention itself, and where the softmax blocks of
# a U-ViC sit (a U-ViT has softmax in every block whatever model.softmax_blocks says), so every placement of the
# layer-placement ablation is paired with the one U-ViT of the same seeds.
PAIR_IGNORES = ("train.seed", "model.attention_type", "model.softmax_blocks")


@dataclass
class SeedGroup:
    """Runs whose configs differ only in train.seed (at the same checkpoint), and their FIDs by seed."""

    name: str
    attention: Optional[str]
    rows: List[dict]
    pair_key: str  # the config less PAIR_IGNORES: U-ViC / U-ViT partners share it

    @property
    def fid_by_seed(self) -> Dict[Any, float]:
        return {r["train_seed"]: r["fid"] for r in self.rows}

    @property
    def interval(self) -> stats.Interval:
        """Mean FID over seeds with its t-interval (one seed: no interval)."""
        return stats.t_interval([r["fid"] for r in self.rows])


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


def _config_key(config: dict, checkpoint, drop: Sequence[str]) -> str:
    config = json.loads(json.dumps(config))  # a deep copy of plain values
    for dotted in drop:
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return json.dumps([config, checkpoint], sort_keys=True)


def _group_name(names: List[str]) -> str:
    """The members' common name prefix, less a trailing "_seed" / "_s" / "__seed=" ("digits_uvic_s0",
    "digits_uvic_s1" -> "digits_uvic"; sweep folders "digits_uvic__seed=0", ... -> "digits_uvic")."""
    prefix = re.sub(r"[_\-.]*((seed|s)=?\d*)?$", "", os.path.commonprefix(names))  # seeds 100, 101: "seed=1"
    return prefix if len(names) > 1 and prefix else names[0]


def group_by_seed(rows: List[dict], configs: List[Optional[dict]], checkpoints: List[Optional[str]]) -> List[SeedGroup]:
    """Rows (with "train_seed") grouped by their run config without train.seed, in first-seen order. A run
    without config.yaml is a group of its own."""
    groups: Dict[str, List[int]] = {}
    for i, (config, ck) in enumerate(zip(configs, checkpoints)):
        key = f"run {i}" if config is None else _config_key(config, ck, ["train.seed"])
        groups.setdefault(key, []).append(i)
    out = []
    for key, members in groups.items():
        first = members[0]
        config = configs[first]
        pair_key = f"run {first}" if config is None else _config_key(config, checkpoints[first], PAIR_IGNORES)
        seeds = [rows[i]["train_seed"] for i in members]
        if len(set(seeds)) != len(seeds):
            names = ", ".join(rows[i]["model"] for i in members)
            raise ValueError(f"runs {names} have the same config and the same train.seed: the same run twice?")
        name, ck = _group_name([rows[i]["model"] for i in members]), checkpoints[first]
        if ck is not None and not name.endswith(f"@{ck}"):  # seeds at one checkpoint: the step stays in the name
            name += f"@{ck}"
        out.append(SeedGroup(name, rows[first]["attention"], [rows[i] for i in members], pair_key))
    return out


# ---------------------------------------------------------------------- provenance: the code behind each run
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


# ---------------------------------------------------------------------- looks: every comparison over growing seeds
def parse_plan(text: Optional[str]) -> Optional[dict]:
    """--plan SPENDING:MAX_PAIRS (e.g. obrien-fleming:24) -> {"spending", "max_pairs", "alpha"}."""
    if not text:
        return None
    spending, _, max_pairs = str(text).partition(":")
    if spending not in stats.SPENDING or not max_pairs.isdigit() or int(max_pairs) < 2:
        raise ValueError(f"--plan {text!r} is not valid; use SPENDING:MAX_PAIRS with SPENDING one of "
                         f"{', '.join(stats.SPENDING)} and MAX_PAIRS >= 2 (e.g. obrien-fleming:24)")
    return {"spending": spending, "max_pairs": int(max_pairs), "alpha": round(1 - stats.CONFIDENCE, 10)}


def record_looks(out_dir, pairs: List[tuple], plan: Optional[dict] = None) -> Dict[str, List[dict]]:
    """Append a look to out_dir/looks.jsonl for each comparison whose paired seeds differ from its last look
    (a rerun on the same seeds is no new look), and return every comparison's looks. The plan recorded with a
    comparison's first look is the one its boundaries use."""
    path = Path(out_dir) / LOOKS_LOG
    old = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    new = []
    for cog, soft, cmp in pairs:
        name = f"{cog.name} vs {soft.name}"
        mine = [e for e in old if e["comparison"] == name]
        seeds = [str(s) for s in cmp.seeds]
        if not mine or mine[-1]["seeds"] != seeds:
            new.append({"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                        "comparison": name, "seeds": seeds, "n": len(seeds), "difference": cmp.interval.mean,
                        "p": cmp.p_value, "plan": plan})
    if new:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.writelines(json.dumps(e) + "\n" for e in new)
    looks: Dict[str, List[dict]] = {}
    for e in old + new:
        looks.setdefault(e["comparison"], []).append(e)
    return {f"{c.name} vs {s.name}": looks[f"{c.name} vs {s.name}"] for c, s, _ in pairs}


def sequential_lines(looks: Dict[str, List[dict]]) -> List[str]:
    """For each comparison looked at more than once: the alpha-spending boundary of every look (the plan
    recorded with its first look; none recorded: Pocock type, the latest look taken as the last) and whether
    a look crossed it."""
    lines = []
    for name, entries in looks.items():
        if len(entries) < 2:
            continue
        ns = [e["n"] for e in entries]
        lines += [f"**Sequential looks: {name}** ({len(entries)} looks in {LOOKS_LOG}).", ""]
        if any(b <= a for a, b in zip(ns, ns[1:])):
            lines += [f"The paired seeds do not grow from look to look ({ns}): no boundary applies; read the "
                      "latest look alone, nominal p.", ""]
            continue
        plan = entries[0].get("plan")
        if plan:
            total, spending, alpha = max(plan["max_pairs"], ns[-1]), plan["spending"], plan["alpha"]
            lines.append(f"Plan recorded with the first look: Lan-DeMets {spending}-type alpha spending, "
                         f"{alpha:g} two-sided over at most {plan['max_pairs']} paired seeds.")
        else:
            total, spending, alpha = ns[-1], "pocock", 1 - stats.CONFIDENCE
            lines.append("No plan was recorded with the first look (--plan): Pocock-type alpha spending over the "
                         "looks so far, the latest taken as the last. Chosen after the fact, this is a guide, not "
                         "the guarantee a plan stated up front gives.")
        bounds = stats.sequential_boundaries([n / total for n in ns], alpha, spending)
        lines += ["", "| look | date | paired seeds | t-test p | boundary p | crossed |", "|---|---|---|---|---|---|"]
        crossed = None
        for k, (e, z) in enumerate(zip(entries, bounds), 1):
            hit = e["p"] is not None and e["p"] <= stats.nominal_p(z)
            crossed = crossed or (k if hit else None)
            lines.append(f"| {k} | {e['date']} | {e['n']} | {_fmt(e['p'], '.3g')} | {stats.nominal_p(z):.3g} | "
                         f"{'yes' if hit else 'no'} |")
        lines += ["", f"Boundary crossed at look {crossed}: the difference holds at the overall {alpha:g} level."
                  if crossed else f"No look crossed its boundary: no difference established at the overall "
                                  f"{alpha:g} level.", ""]
    return lines


def learning_curve_lines(pairs: List[tuple]) -> List[str]:
    """With paired comparisons at several checkpoints: U-ViC and U-ViT mean FID and their difference by step."""
    steps = {cog.rows[0].get("step") for cog, _, _ in pairs}
    if len(steps - {None}) < 2:
        return []
    lines = ["## Learning curves", "", "Mean FID over seeds ± its 95% t-interval at each checkpoint, and the "
             "paired difference (plot: curves.png, bands = the t-intervals).", "",
             "| step | U-ViC | U-ViT | paired seeds | U-ViC mean | U-ViT mean | difference | t p |",
             "|---|---|---|---|---|---|---|---|"]
    for cog, soft, cmp in sorted(pairs, key=lambda p: (p[0].rows[0].get("step") or 0, p[0].name)):
        lines.append(f"| {_fmt(cog.rows[0].get('step'), ',d')} | {cog.name} | {soft.name} | {len(cmp.seeds)} | "
                     f"{cog.interval.format()} | {soft.interval.format()} | {cmp.interval.format('+.3f')} | "
                     f"{_fmt(cmp.p_value, '.3g')} |")
    return lines + [""]


def paired_comparisons(groups: List[SeedGroup]) -> List[tuple]:
    """(U-ViC group, U-ViT group, PairedComparison of FID U-ViC − U-ViT by train.seed) for every pair of
    groups that differ only in model.attention_type (and model.softmax_blocks) and share a seed."""
    pairs = []
    for cog in (g for g in groups if g.attention not in (None, "", "softmax")):  # U-ViC, or any other mechanism
        for soft in (g for g in groups if g.attention == "softmax" and g.pair_key == cog.pair_key):
            if set(cog.fid_by_seed) & set(soft.fid_by_seed):
                pairs.append((cog, soft, stats.paired_difference(cog.fid_by_seed, soft.fid_by_seed)))
    return pairs


# ---------------------------------------------------------------------- rows, CSV, report
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


def _fmt(value, spec: str = ".3f") -> str:
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
    if extractor == metrics.INCEPTION:
        return ("torch-fidelity's Inception-v3 (the TensorFlow FID network): FID on its 2048-d pool features, "
                "IS on its logits, KID on the 2048-d features")
    if extractor == metrics.digits_classifier.EXTRACTOR_NAME:
        _, meta = metrics.digits_classifier.load_digits_cnn()
        return (f"the 64-d features (penultimate layer before its ReLU, every unit live) of uvic's digits classifier "
                f"(held-out accuracy {float(meta['test_accuracy']):.1%} "
                f"on {meta['test_size']} digits), so \"FID\" is a Fréchet distance in that space and IS its "
                "10-class analogue: comparable between these runs, not with Inception FIDs")
    return f"torch-fidelity extractor {extractor}"


def statistics_lines(groups: List[SeedGroup], settings: dict) -> List[str]:
    """The report's statistics: per group mean ± t-interval over seeds, the paired U-ViC − U-ViT comparisons with
    their tests, the multiplicity adjustments, equivalence (with a margin), the sequential looks and the
    learning curves, and the verdict the intervals support."""
    conf = f"{stats.CONFIDENCE:.0%}"
    boot = settings.get("bootstrap") or 0
    lines = [
        "## Statistics over seeds",
        "",
        f"Runs whose config.yaml differ only in train.seed form a group. Per group: mean FID over its seeds ± the "
        f"half-width of the {conf} t-interval (t · s / √n, n − 1 degrees of freedom); a group of one seed is "
        f"reported as that one seed, without an interval. "
        + (f"Per run (table above): the {conf} basic bootstrap interval of its FID ({boot} resamples, seed "
           f"{settings.get('bootstrap_seed', 0)}; the sample features and the reference features each resampled "
           "with replacement, a reference given as statistics kept fixed): the spread from the finite sample "
           "and reference sets alone, not from training. Resampling repeats images, which raises FID; the basic "
           "interval (2·FID − the resampled quantiles) reflects that shift instead of copying it, and where the "
           "shift is larger than the spread (near the real-vs-real floor) it can fall below the FID: read its "
           "width." if boot else "No bootstrap over samples (--bootstrap 0)."),
        "",
        f"| group | attention | seeds | samples per run | FID mean ± {conf} t-interval | FID by seed |",
        "|---|---|---|---|---|---|",
    ]
    for g in groups:
        by_seed = ", ".join(f"{s}: {_fmt(v)}" for s, v in g.fid_by_seed.items())
        lines.append(f"| {g.name} | {attention_label(g.attention)} | {len(g.rows)} | "
                     f"{_fmt(g.rows[0]['num_samples'], ',d')} | {g.interval.format()} | {by_seed} |")
    pairs = paired_comparisons(groups)
    lines += ["", "## U-ViC against U-ViT, paired by seed", ""]
    if not pairs:
        lines += ["No U-ViC group has a U-ViT partner (configs that differ only in model.attention_type, with a "
                  "train.seed in common): no paired comparison, no verdict.", ""]
        return lines
    lines += comparison_lines(pairs)
    lines += multiple_comparison_lines(pairs) + dunnett_lines(pairs)
    if settings.get("margin"):
        lines += equivalence_lines(pairs, settings["margin"])
    lines += sequential_lines(settings.get("looks") or {})
    lines += learning_curve_lines(pairs) + failure_lines(groups, settings.get("fail_above"))
    return lines


def comparison_lines(pairs: List[tuple]) -> List[str]:
    """The paired table: difference with its t-interval, the t, exact sign-flip and Wilcoxon p, d_z with its
    interval, the ratio on log FID, Holm's adjusted p over the report's comparisons, and the verdict."""
    conf = f"{stats.CONFIDENCE:.0%}"
    holm = stats.holm([cmp.p_value for _, _, cmp in pairs])
    lines = [
        f"Difference = FID(U-ViC) − FID(U-ViT) for the same train.seed, with its {conf} t-interval over the "
        "paired seeds. FID is lower-is-better: a negative difference favours U-ViC, a positive one U-ViT. Tests of "
        "a zero difference, two-sided: the paired t-test, the sign-flip permutation test (exact: all 2^n sign "
        f"patterns up to n = {stats.EXACT_SIGN_FLIP_MAX}, else {stats.SIGN_FLIP_DRAWS:,} seeded draws) and the "
        "Wilcoxon signed-rank test (exact for small n), which do not assume normal differences. d_z = mean / SD "
        f"of the differences ({conf} interval from the noncentral t). Ratio: FID(U-ViC) / FID(U-ViT) as the "
        f"geometric mean over seeds ({conf} t-interval of log FID differences). Holm: the t-test p adjusted "
        f"step-down over the {len(pairs)} comparison{'s' if len(pairs) > 1 else ''} of this report.",
        "",
        f"| U-ViC | U-ViT | paired seeds | difference U-ViC − U-ViT ± {conf} t-interval | interval | t p | "
        "sign-flip p | Wilcoxon p | d_z [interval] | ratio [interval] | Holm p | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (cog, soft, cmp), p_holm in zip(pairs, holm):
        iv, dz = cmp.interval, cmp.dz
        flip, exact = cmp.sign_flip
        ratio = _ratio(cog, soft)
        lines.append(
            f"| {cog.name} | {soft.name} | {len(cmp.seeds)} | {iv.format('+.3f')} | {_bracket(iv)} | "
            f"{_fmt(cmp.p_value, '.3g')} | {_fmt(flip, '.3g')}{'' if exact else ' (MC)'} | "
            f"{_fmt(cmp.wilcoxon, '.3g')} | {_fmt(dz.mean, '+.2f')} {_bracket(dz, '+.2f')} | "
            f"{_fmt(ratio.mean if ratio else None, '.3f')} {_bracket(ratio)} | {_fmt(p_holm, '.3g')} | "
            f"{cmp.verdict('U-ViC', 'U-ViT')} |")
    for cog, soft, cmp in pairs:
        note = cmp.unpaired_note(cog.name, soft.name)
        if note:
            lines.append(f"\n{cog.name} vs {soft.name}: {note}.")
    lines += ["", "**Verdict:** " + "; ".join(
        f"{cog.name} vs {soft.name}: {cmp.verdict('U-ViC', 'U-ViT')}" + (f" (Holm-adjusted p = {p:.3g})" if
                                                                        len(pairs) > 1 and p is not None else "")
        for (cog, soft, cmp), p in zip(pairs, holm)) + ".", ""]
    return lines


def _bracket(iv: Optional[stats.Interval], spec: str = ".3f") -> str:
    return "–" if iv is None or iv.low is None else f"[{iv.low:{spec}}, {iv.high:{spec}}]"


def _ratio(cog: SeedGroup, soft: SeedGroup) -> Optional[stats.Interval]:
    try:
        return stats.ratio_interval(cog.fid_by_seed, soft.fid_by_seed)
    except ValueError:  # a zero or negative score (a KID-like metric): no log
        return None


def multiple_comparison_lines(pairs: List[tuple]) -> List[str]:
    """With k > 1 paired comparisons, the chance that some 95% interval excludes 0 by luck grows with k: the
    Bonferroni reading widens each interval to confidence 1 − 0.05/k and says which verdicts survive (Holm's
    adjusted p, in the table, is the uniformly more powerful step-down version of the same guarantee)."""
    k = len(pairs)
    if k < 2:
        return []
    level = 1 - (1 - stats.CONFIDENCE) / k
    lines = [f"**{k} comparisons.** Each interval above holds at {stats.CONFIDENCE:.0%} on its own; read together, "
             f"Bonferroni-corrected ({level * 100:.4g}% each, so that all hold at {stats.CONFIDENCE:.0%} jointly):", ""]
    for cog, soft, cmp in pairs:
        wide = stats.paired_difference(cog.fid_by_seed, soft.fid_by_seed, confidence=level)
        where = "–" if wide.interval.low is None else f"[{wide.interval.low:.3f}, {wide.interval.high:.3f}]"
        lines.append(f"- {cog.name} − {soft.name}: {where}: {wide.verdict('U-ViC', 'U-ViT')}")
    return lines + [""]


def dunnett_lines(pairs: List[tuple]) -> List[str]:
    """Several U-ViC arms against one U-ViT control (the layer-placement ablation): Dunnett's many-to-one
    adjusted p over the seeds every arm and the control share, the arms' correlation taken from the data."""
    by_control: Dict[str, List[tuple]] = {}
    for cog, soft, cmp in pairs:
        by_control.setdefault(soft.name, []).append((cog, soft))
    lines = []
    for control, members in by_control.items():
        if len(members) < 2:
            continue
        arms = {cog.name: cog.fid_by_seed for cog, _ in members}
        try:
            adjusted = stats.dunnett_paired(arms, members[0][1].fid_by_seed)
        except ValueError as err:
            lines += [f"**Dunnett ({len(arms)} arms vs {control}):** not computed: {err}.", ""]
            continue
        lines += [f"**Dunnett, {len(arms)} U-ViC arms against the one control {control}** (paired by seed, "
                  "single-step many-to-one adjusted p of each arm − control):", ""]
        lines += [f"- {name} − {control}: adjusted p = {p:.3g}" for name, p in adjusted.items()] + [""]
    return lines


def equivalence_lines(pairs: List[tuple], margin: float) -> List[str]:
    """TOST for each comparison: equivalent within ±margin when the 90% interval lies inside it."""
    lines = [f"**Equivalence within ±{margin:g}** (TOST, two one-sided t-tests at 5%: equivalent when the 90% "
             "t-interval lies inside the margin; a 95% interval that contains 0 alone is not equivalence):", ""]
    for cog, soft, cmp in pairs:
        eq = stats.tost(cmp.differences, margin)
        verdict = "equivalent" if eq.equivalent else "not shown equivalent (inconclusive unless the interval " \
                                                     "lies outside the margin)"
        lines.append(f"- {cog.name} − {soft.name}: 90% interval {_bracket(eq.interval)}, TOST p = "
                     f"{_fmt(eq.p, '.3g')}: {verdict}")
    return lines + [""]


def failure_lines(groups: List[SeedGroup], fail_above: Optional[float]) -> List[str]:
    """Failed runs per attention (FID above the stated failure level, or not finite): the rate with its exact
    (Clopper-Pearson) interval. Runs that crashed never reach the report: the sweep lists them."""
    if fail_above is None:
        return []
    lines = [f"**Failed runs** (FID above {fail_above:g} or not finite, at each group's checkpoint):", ""]
    for g in groups:
        failed = [r for r in g.rows if r["fid"] is None or not math.isfinite(r["fid"]) or r["fid"] > fail_above]
        iv = stats.binomial_interval(len(failed), len(g.rows))
        seeds = ", ".join(str(r["train_seed"]) for r in failed)
        lines.append(f"- {g.name}: {len(failed)} of {len(g.rows)} = {iv.mean:.0%}, 95% exact interval "
                     f"[{iv.low:.0%}, {iv.high:.0%}]" + (f" (seeds {seeds})" if failed else ""))
    return lines + [""]


def sample_set_digits_checks(npz, config: Optional[dict]) -> dict:
    """uvic.digits_checks of a sample set (its arr_0, uint8 NHWC) against the digits its run trained on: the
    run config's data.split ("all" for a model without one)."""
    split = ((config or {}).get("data") or {}).get("split") or "all"
    with np.load(npz) as f:
        images = f["arr_0"]  # (N, H, W, 3) uint8
    return digits_checks(images, split)


def digits_columns(checks: dict) -> dict:
    """The CSV columns of one run's digits checks: class counts, their balance, the memorisation score."""
    closer = checks["memorisation"]["closer"]
    return {"classes": " ".join(map(str, checks["counts"])), "class_tv": checks["balance"]["tv"],
            "class_p": checks["balance"]["p"], "memorised": closer.mean, "memorised_low": closer.low,
            "memorised_high": closer.high}


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


def write_report(rows: List[dict], out_dir, *, settings: dict, command: str,
                 groups: Optional[List[SeedGroup]] = None, digits: Optional[List[dict]] = None) -> dict:
    """report.md (tables, statistics, verdict), report.csv (all columns) and fid.png in out_dir -> their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "report.md", "csv": out_dir / "report.csv", "png": out_dir / "fid.png"}
    paths["csv"].unlink(missing_ok=True)
    append_csv(paths["csv"], rows)
    have = {k for r in rows for k, v in r.items() if v is not None}
    header = ["model", "attention", "params", "steps trained", "FID"]
    if "fid_low" in have:
        header.append(f"FID {stats.CONFIDENCE:.0%} bootstrap")
    if "train_seed" in have:
        header.append("train seed")
    if "isc_mean" in have:
        header.append("IS")
    if "kid" in have:
        header.append("KID ×10³ ± SE")
    elif "kid_mean" in have:
        header.append("KID ×10³ (± spread over subsets)")
    if "precision" in have:
        header += ["precision", "recall"]
    if "clip_score" in have:
        header.append("CLIP score")
    lines = [
        "# U-ViC vs U-ViT",
        "",
        f"Every model sampled alike: {settings['num_samples']} samples, sampler {settings['scheduler']}, "
        f"{settings['steps']} steps, guidance w = {settings['guidance']:g}, seed {settings['seed']} (EMA weights). "
        f"Reference: {settings['ref']} ({_fmt(rows[0]['num_ref'], ',d')} images). "
        f"Features: {features_note(rows[0]['extractor'])}.",
    ]
    if "kid_mean" in have:
        lines[-1] += (" KID: the unbiased MMD² of all samples against all reference images (each capped at 5,000), "
                      "± its jackknife standard error." if "kid" in have else
                      f" KID: {settings.get('kid_subsets', 100)} subsets of {settings['kid_subset_size']}.")
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["model"], attention_label(r["attention"]),
                 _fmt(r["params"], ",d"), _fmt(r["step"], ",d"), _fmt(r["fid"])]
        if "fid_low" in have:
            cells.append("–" if r["fid_low"] is None else f"[{r['fid_low']:.3f}, {r['fid_high']:.3f}]")
        if "train_seed" in have:
            cells.append(_fmt(r["train_seed"], "d"))
        if "isc_mean" in have:
            cells.append(f"{_fmt(r['isc_mean'], '.2f')} ± {_fmt(r['isc_std'], '.2f')}")
        if "kid_mean" in have:
            kid, spread = ("kid", "kid_se") if "kid" in have else ("kid_mean", "kid_std")
            kid, spread = (None if r[k] is None else 1e3 * r[k] for k in (kid, spread))
            cells.append(f"{_fmt(kid, '.2f')} ± {_fmt(spread, '.2f')}")
        if "precision" in have:
            cells += [_fmt(r["precision"]), _fmt(r["recall"])]
        if "clip_score" in have:
            cells.append(_fmt(r["clip_score"], ".2f"))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
    lines += settings.get("code_lines") or []
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
             ylabel="FID" if rows[0]["extractor"] == metrics.INCEPTION else "Fréchet distance")
    return paths


def plot_fid(rows: List[dict], path, ylabel: str = "FID", groups: Optional[List[SeedGroup]] = None) -> Path:
    """FID against training step when a run comes with several checkpoints; else one bar per seed group (its
    mean, error bar: the t-interval over seeds) with each run's FID as a dot (error bar: its bootstrap
    interval over samples, drawn as a segment)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    def boot_bars(xs, rs, color):  # bootstrap intervals as segments: they need not contain the FID (bias)
        have = [(x, r) for x, r in zip(xs, rs) if r.get("fid_low") is not None]
        if have:
            ax.vlines([x for x, _ in have], [r["fid_low"] for _, r in have], [r["fid_high"] for _, r in have],
                      color=color, linewidth=1)

    by_run: dict = {}
    for r in rows:
        by_run.setdefault(r["model"].split("@")[0], []).append(r)
    bars = len(groups) if groups else len(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.7 * bars), 3.8), dpi=120)  # room for a label per bar
    colors = {"cog": "tab:red", "softmax": "tab:blue"}
    if any(len(v) > 1 for v in by_run.values()):
        for name, rs in by_run.items():
            rs = sorted((r for r in rs if r["step"] is not None), key=lambda r: r["step"])
            color = colors.get(rs[0]["attention"]) if rs else None
            ax.plot([r["step"] for r in rs], [r["fid"] for r in rs], marker="o", label=name, color=color)
            boot_bars([r["step"] for r in rs], rs, color)
        ax.set_xlabel("training step")
        ax.legend()
    else:
        groups = groups or [SeedGroup(r["model"], r["attention"], [r], "") for r in rows]
        top = 0.0
        for i, g in enumerate(groups):
            iv = g.interval
            half = iv.half_width or 0.0
            ax.bar(i, iv.mean, yerr=half if iv.low is not None else None, capsize=6, alpha=0.6,
                   color=colors.get(g.attention, "tab:gray"))
            fids = [r["fid"] for r in g.rows]
            xs = [i + d for d in ((np.arange(len(fids)) - (len(fids) - 1) / 2) * 0.12)]
            ax.plot(xs, fids, "o", color="black", markersize=3)
            boot_bars(xs, g.rows, "gray")
            group_top = max(iv.mean + half, *(r.get("fid_high") or r["fid"] for r in g.rows))
            ax.annotate(f"{iv.mean:.3g}" + (f"±{half:.2g}" if iv.low is not None else "") + f"\nn={iv.n}",
                        (i, group_top), ha="center", va="bottom", fontsize=8)
            top = max(top, group_top)
        # sweep names ("digits_uvic__model.softmax_blocks=none") break at their "__" and "=" separators
        ax.set_xticks(range(len(groups)), [g.name.replace("__", "\n").replace("=", "=\n") for g in groups],
                      fontsize=7)
        ax.set_ylim(top=1.25 * top)  # room for the labels
        ax.set_xlabel(f"bars: mean ± {stats.CONFIDENCE:.0%} t-interval over seeds; dots: runs (gray: bootstrap)",
                      fontsize=8)
    ax.set_ylabel(f"{ylabel} (lower is better)")
    ax.set_title(f"{rows[0]['num_samples']} samples vs {rows[0]['ref']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_curves(groups: List[SeedGroup], path) -> Optional[Path]:
    """FID against training step per seed-group family (the groups of one config at several checkpoints):
    the mean over seeds with its 95% t-interval as a band. None (no file) with fewer than 2 steps."""
    families: Dict[tuple, List[SeedGroup]] = {}
    for g in groups:
        if g.rows[0].get("step") is not None:
            families.setdefault((g.name.split("@")[0], g.attention), []).append(g)
    if not any(len({g.rows[0]["step"] for g in gs}) > 1 for gs in families.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=120)
    colors = {"cog": "tab:red", "softmax": "tab:blue"}
    for (name, attention), gs in families.items():
        gs = sorted(gs, key=lambda g: g.rows[0]["step"])
        x = [g.rows[0]["step"] for g in gs]
        ivs = [g.interval for g in gs]
        line, = ax.plot(x, [iv.mean for iv in ivs], marker="o", color=colors.get(attention),
                        label=f"{name} (n = {max(iv.n for iv in ivs)})")
        have = [(xi, iv) for xi, iv in zip(x, ivs) if iv.low is not None]
        if have:
            ax.fill_between([xi for xi, _ in have], [iv.low for _, iv in have], [iv.high for _, iv in have],
                            color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("training step")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title("mean over seeds, band: 95% t-interval")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


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
    model folder: the CLIP score of each set against its prompts, uvic.clip_score).

    Inference: margin (TOST equivalence within ±margin), plan ("SPENDING:MAX_PAIRS", recorded with a
    comparison's first look in out_dir/looks.jsonl: the alpha-spending plan of later looks), fail_above (a run
    with a higher FID counts as failed). Runs whose provenance.json names other code are refused before any
    sampling unless allow_mixed_code.
    """
    plan_dict = parse_plan(plan)  # bad input: before any sampling
    if margin is not None and not margin > 0:
        raise ValueError(f"--margin must be positive, got {margin}")
    specs = [s for text in runs for s in parse_run_specs(text, checkpoints)]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"runs repeat: {labels}")
    if num_samples < 2:
        raise ValueError(f"--num-samples must be at least 2, got {num_samples}")
    if bootstrap == 1 or bootstrap < 0:
        raise ValueError(f"--bootstrap must be 0 (off) or at least 2 resamples, got {bootstrap}")
    configs = [run_config(s) for s in specs]
    code_lines = check_code([{"model": s.label, "code": run_code(s)} for s in specs], allow_mixed_code)
    if clip is not None and prompts is None:
        raise ValueError("--clip scores samples against their prompts: give --prompts FILE")
    clip_model = None
    if clip is not None:
        clip_model = load_clip(clip, device or "cpu")  # missing weights: one message, before any sampling
    ref_in = metrics.load_input(ref, data_root=metric_kwargs.get("data_root"),
                                download=metric_kwargs.get("download", True), cache=True)
    if kid and ref_in.num_images is None:
        print(f"note: KID left out: {ref} holds only statistics", file=sys.stderr)
        kid = False
    kid_subset_size = min(kid_subset_size, num_samples, ref_in.num_images or num_samples)
    rows, digits = [], []
    for spec, config in zip(specs, configs):
        sample_dir = Path(samples_dir or Path(out_dir) / "samples") / spec.label.replace("@", "_at_")
        npz, info = sample_model(spec, sample_dir, num_samples=num_samples, scheduler=scheduler, steps=steps,
                                 guidance=guidance, seed=seed, batch_size=batch_size, device=device,
                                 progress=progress, ref=ref_in, feature_extractor=metric_kwargs.get("feature_extractor"),
                                 allow_resize=metric_kwargs.get("allow_resize", False), prompts=prompts,
                                 timestep_spacing=timestep_spacing)
        result = metrics.compute_metrics(str(npz), ref_in, fid=True, isc=isc, kid=kid, prc=prc, batch_size=batch_size,
                                         device=device, kid_subset_size=kid_subset_size, bootstrap=bootstrap,
                                         bootstrap_seed=seed, **metric_kwargs)
        if clip_model is not None:
            result["clip_score"] = sample_set_clip_score(Path(npz).parent, clip_model, batch_size)
        print(f"{spec.label}: " + format_result(result).replace("\n", "; "), file=sys.stderr)
        train_seed = None if config is None else config.get("train", {}).get("seed", TrainConfig.seed)
        if str(ref) in DIGITS_INPUTS.values():
            digits.append(sample_set_digits_checks(npz, config))
            result.update(digits_columns(digits[-1]))
        rows.append(make_row(result, samples=str(npz), ref=str(ref), manifest=metrics.read_manifest(Path(npz)),
                             train_seed=train_seed, code=run_code(spec), **info))
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
