"""Scoring sample sets and models, and the U-ViC vs U-ViT comparison report (eval_fid.py, `uvic-eval`).

    eval_fid.py SAMPLES --ref REF [--kid] [--isc] [--prc]       one sample set (or model) -> stdout + CSV row
    eval_fid.py SAMPLES --save-stats PATH                        statistics file of any input, for reuse
    eval_fid.py compare RUN_A RUN_B ... --ref REF --num-samples N --scheduler S --steps K
                                                                 every run sampled alike and scored ->
                                                                 report.md, report.csv, fid.png

A model (pipeline folder, run directory, RUN@STEP) is first sampled with uvic.sampling into a
resumable sample set, then scored like any other set. Sampling metadata of a set (sampler, steps,
guidance, model) comes from its manifest.json when there is one.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from . import metrics
from .runs import RunDir

CSV_COLUMNS = (
    "date", "samples", "model", "attention", "params", "step", "sampler", "steps", "guidance", "seed",
    "num_samples", "ref", "num_ref", "extractor", "fid", "isc_mean", "isc_std", "kid_mean", "kid_std",
    "precision", "recall",
)  # fmt: skip
ATTENTION_NAMES = {"softmax": "U-ViT (softmax)", "cog": "U-ViC (Cog)"}
DEFAULT_CSV = "runs/eval_fid.csv"
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


def is_model(path) -> bool:
    """A pipeline folder, run directory or checkpoint folder (as opposed to a set of samples)?"""
    p = Path(str(path).split("@")[0])
    return p.is_dir() and ((p / "model_index.json").exists() or (p / "ema_model").exists() or RunDir.is_run(p))


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
    from .pipeline import SCHEDULERS

    sched = manifest.get("scheduler")
    if not isinstance(sched, dict):
        return sched
    for name, (cls, extra) in SCHEDULERS.items():
        if cls.__name__ == sched.get("class") and all(sched.get(k) == v for k, v in extra.items()):
            return name
    return sched.get("class")


def sample_model(spec: RunSpec, out_dir, *, num_samples: int, scheduler: str, steps: int, guidance: float,
                 seed: int, batch_size: int, device=None, progress: bool = True):
    """Sample `spec` into out_dir (resumable) -> (samples.npz path, model info for reports)."""
    import torch

    from .sampling import generate_samples, load_pipeline

    pipe = load_pipeline(spec.path, checkpoint=spec.checkpoint, ema=True)
    info = {
        "model": spec.label,
        "attention": pipe.transformer.config.attention_type,
        "params": sum(p.numel() for p in pipe.transformer.parameters()),
        "step": spec.steps_trained(),
    }
    pipe.to(torch.device(device) if device else ("cuda" if torch.cuda.is_available() else "cpu"))
    npz = generate_samples(pipe, out_dir, num_samples=num_samples, batch_size=batch_size, seed=seed,
                           scheduler=None if scheduler == "saved" else scheduler, steps=steps, guidance=guidance,
                           progress=progress)
    return npz, info


def default_samples_dir(spec: RunSpec, scheduler: str, steps: int, guidance: float, seed: int) -> Path:
    """<run>/eval_samples/<checkpoint>_<sampler>_<steps>steps_w<guidance>_seed<seed>; beside a pipeline
    folder that is not in a run, <folder>_eval_samples/..."""
    where = spec.run_dir / "eval_samples" if spec.run_dir else spec.path.with_name(f"{spec.path.name}_eval_samples")
    return where / f"{spec.checkpoint or 'final'}_{scheduler}_{steps}steps_w{guidance:g}_seed{seed}"


# ---------------------------------------------------------------------- rows, CSV, report
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
    """Append rows (CSV_COLUMNS) to `path`, writing the header when the file is new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
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
        lines.append(f"KID        {result['kid_mean']:.6f} ± {result['kid_std']:.6f}")
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
        return (f"the 64-d features of uvic's digits classifier (held-out accuracy {float(meta['test_accuracy']):.1%} "
                f"on {meta['test_size']} digits), so \"FID\" is a Fréchet distance in that space and IS its "
                "10-class analogue: comparable between these runs, not with Inception FIDs")
    return f"torch-fidelity extractor {extractor}"


def write_report(rows: List[dict], out_dir, *, settings: dict, command: str) -> dict:
    """report.md (table), report.csv (all columns) and fid.png in out_dir -> their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "report.md", "csv": out_dir / "report.csv", "png": out_dir / "fid.png"}
    paths["csv"].unlink(missing_ok=True)
    append_csv(paths["csv"], rows)
    have = {k for r in rows for k, v in r.items() if v is not None}
    header = ["model", "attention", "params", "steps trained", "FID"]
    if "isc_mean" in have:
        header.append("IS")
    if "kid_mean" in have:
        header.append("KID ×10³")
    if "precision" in have:
        header += ["precision", "recall"]
    lines = [
        "# U-ViC vs U-ViT",
        "",
        f"Every model sampled alike: {settings['num_samples']} samples, sampler {settings['scheduler']}, "
        f"{settings['steps']} steps, guidance w = {settings['guidance']:g}, seed {settings['seed']} (EMA weights). "
        f"Reference: {settings['ref']} ({_fmt(rows[0]['num_ref'], ',d')} images). "
        f"Features: {features_note(rows[0]['extractor'])}.",
    ]
    if "kid_mean" in have:
        lines[-1] += f" KID: {settings.get('kid_subsets', 100)} subsets of {settings['kid_subset_size']}."
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["model"], ATTENTION_NAMES.get(r["attention"], r["attention"] or "–"),
                 _fmt(r["params"], ",d"), _fmt(r["step"], ",d"), _fmt(r["fid"])]
        if "isc_mean" in have:
            cells.append(f"{_fmt(r['isc_mean'], '.2f')} ± {_fmt(r['isc_std'], '.2f')}")
        if "kid_mean" in have:
            kid = None if r["kid_mean"] is None else 1e3 * r["kid_mean"]
            std = None if r["kid_std"] is None else 1e3 * r["kid_std"]
            cells.append(f"{_fmt(kid, '.2f')} ± {_fmt(std, '.2f')}")
        if "precision" in have:
            cells += [_fmt(r["precision"]), _fmt(r["recall"])]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", f"![FID]({paths['png'].name})", "", "Made with:", "", f"    {command}",
              "", f"{rows[0]['date']}; rows also in {paths['csv'].name}.", ""]
    paths["md"].write_text("\n".join(lines))
    plot_fid(rows, paths["png"], ylabel="FID" if rows[0]["extractor"] == metrics.INCEPTION else "Fréchet distance")
    return paths


def plot_fid(rows: List[dict], path, ylabel: str = "FID") -> Path:
    """FID per run (bars), or FID against training step when a run comes with several checkpoints."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    by_run: dict = {}
    for r in rows:
        by_run.setdefault(r["model"].split("@")[0], []).append(r)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    colors = {"cog": "tab:red", "softmax": "tab:blue"}
    if any(len(v) > 1 for v in by_run.values()):
        for name, rs in by_run.items():
            rs = sorted((r for r in rs if r["step"] is not None), key=lambda r: r["step"])
            ax.plot([r["step"] for r in rs], [r["fid"] for r in rs], marker="o", label=name,
                    color=colors.get(rs[0]["attention"]) if rs else None)
        ax.set_xlabel("training step")
        ax.legend()
    else:
        labels = [r["model"] for r in rows]
        ax.bar(labels, [r["fid"] for r in rows], color=[colors.get(r["attention"], "tab:gray") for r in rows])
        for i, r in enumerate(rows):
            ax.annotate(f"{r['fid']:.3g}", (i, r["fid"]), ha="center", va="bottom")
        ax.set_ylim(top=1.15 * max(r["fid"] for r in rows))  # room for the labels
    ax.set_ylabel(f"{ylabel} (lower is better)")
    ax.set_title(f"{rows[0]['num_samples']} samples vs {rows[0]['ref']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def compare(runs: Sequence[str], *, ref: str, out_dir, num_samples: int, scheduler: str = "dpm++2m",
            steps: int = 50, guidance: float = 1.0, seed: int = 0, batch_size: int = 64, device=None,
            checkpoints: Optional[Sequence[str]] = None, isc: bool = True, kid: bool = True, prc: bool = False,
            kid_subset_size: int = metrics.KID_SUBSET_SIZE, command: str = "", progress: bool = True,
            samples_dir=None, **metric_kwargs) -> dict:
    """Sample every run alike into samples_dir (default out_dir/samples), score each against `ref`, write the
    report to out_dir.

    KID uses subsets of min(kid_subset_size, num_samples, reference size); KID is left out against a
    reference that holds only statistics. Returns the report's paths and the rows.
    """
    specs = [s for text in runs for s in parse_run_specs(text, checkpoints)]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"runs repeat: {labels}")
    if num_samples < 2:
        raise ValueError(f"--num-samples must be at least 2, got {num_samples}")
    ref_in = metrics.load_input(ref, data_root=metric_kwargs.get("data_root"),
                                download=metric_kwargs.get("download", True), cache=True)
    if kid and ref_in.num_images is None:
        print(f"note: KID left out: {ref} holds only statistics", file=sys.stderr)
        kid = False
    kid_subset_size = min(kid_subset_size, num_samples, ref_in.num_images or num_samples)
    rows = []
    for spec in specs:
        sample_dir = Path(samples_dir or Path(out_dir) / "samples") / spec.label.replace("@", "_at_")
        npz, info = sample_model(spec, sample_dir, num_samples=num_samples, scheduler=scheduler, steps=steps,
                                 guidance=guidance, seed=seed, batch_size=batch_size, device=device,
                                 progress=progress)
        result = metrics.compute_metrics(str(npz), ref_in, fid=True, isc=isc, kid=kid, prc=prc, batch_size=batch_size,
                                         device=device, kid_subset_size=kid_subset_size, **metric_kwargs)
        print(f"{spec.label}: " + format_result(result).replace("\n", "; "), file=sys.stderr)
        rows.append(make_row(result, samples=str(npz), ref=str(ref), manifest=metrics.read_manifest(Path(npz)),
                             **info))
    settings = dict(num_samples=num_samples, scheduler=scheduler, steps=steps, guidance=guidance, seed=seed,
                    ref=ref, kid_subset_size=kid_subset_size)
    command = command or (f"python eval_fid.py compare {' '.join(map(str, runs))} --ref {ref} --num-samples "
                          f"{num_samples} --scheduler {scheduler} --steps {steps} --guidance {guidance:g} --seed {seed}")
    paths = write_report(rows, out_dir, settings=settings, command=command)
    return {**paths, "rows": rows}


# ---------------------------------------------------------------------- command line
def _add_metric_options(add):
    add("--ref", help="reference: cifar10-train, cifar10-val, digits, ... (torch-fidelity registered), a folder "
                      "of images, an .npz of images or a statistics .npz (mu, sigma)")
    add("--batch-size", type=int, default=64, help="images per feature-extractor batch (and per sampling batch)")
    add("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    add("--feature-extractor", help="inception | digits | a torch-fidelity extractor name "
                                    "(default: digits for --ref digits, else inception)")
    add("--inception-weights", metavar="PATH", help=f"local copy of {metrics.INCEPTION_WEIGHTS_FILE}")
    add("--data-root", metavar="PATH", help="where registered datasets' files are (downloads off)")
    add("--offline", action="store_true", help="never download (weights, datasets)")
    add("--kid-subset-size", type=int, default=metrics.KID_SUBSET_SIZE, help="KID subset size")
    add("--cache-root", metavar="PATH", help="reference feature cache (default $UVIC_CACHE_DIR/fidelity_cache)")
    add("--no-cache", action="store_true", help="do not cache reference features")
    add("--scheduler", default="dpm++2m", help="sampler for models (uvic.pipeline.SCHEDULERS or 'saved')")
    add("--steps", type=int, default=50, help="sampling steps for models")
    add("--guidance", type=float, default=1.0, help="classifier-free guidance w for models (1 = off)")
    add("--seed", type=int, default=0, help="sampling seed for models")
    add("--verbose", action="store_true", help="torch-fidelity's progress output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eval_fid.py",
        description="FID / IS / KID / precision-recall of a sample set or model with torch-fidelity "
                    "(compare: the U-ViC vs U-ViT report, see `eval_fid.py compare -h`).",
        epilog="examples:\n"
               "  python eval_fid.py runs/digits_uvic/final --ref digits\n"
               "  python eval_fid.py samples/c10/samples.npz --ref cifar10-train --isc --kid\n"
               "  python eval_fid.py cifar10-train --save-stats stats/cifar10_train.npz\n"
               "  python eval_fid.py compare runs/digits_uvit runs/digits_uvic --ref digits --num-samples 500",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("samples", metavar="SAMPLES", help="folder of PNGs, .npz (arr_0 NHWC uint8), statistics .npz, registered "
                                           "input, or a model: pipeline folder / run directory / RUN@STEP")
    add("--isc", action="store_true", help="Inception Score")
    add("--kid", action="store_true", help="Kernel Inception Distance")
    add("--prc", action="store_true", help="precision and recall (k = 3)")
    add("--no-fid", dest="fid", action="store_false", help="skip FID")
    add("--save-stats", metavar="PATH", help="write SAMPLES' FID statistics (tagged .npz) to PATH")
    add("--csv", default=DEFAULT_CSV, help=f"append the result row here (default {DEFAULT_CSV}; '' = off)")
    add("--num-samples", type=int, help="models: samples to draw (default: the reference's size, at most 50K)")
    add("--samples-out", metavar="DIR", help="models: where the sample set goes (default RUN/eval_samples/...)")
    _add_metric_options(add)
    return parser


def build_compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eval_fid.py compare",
        description="Sample every run with the same settings, score each, and write report.md, report.csv "
                    "and fid.png (FID per run, or against training step for several checkpoints).",
    )
    add = parser.add_argument
    add("runs", nargs="+", metavar="RUN", help="run directory or pipeline folder; RUN@STEP, RUN@latest, RUN@all")
    add("--num-samples", type=int, required=True, help="samples per model")
    add("--checkpoints", help="comma-separated checkpoints for every plain RUN: steps, latest, final")
    add("--out", default="docs/results/compare", help="report folder")
    add("--samples-dir", help="where the sample sets go (default OUT/samples; resumable, reused by reruns)")
    add("--no-isc", dest="isc", action="store_false", help="skip IS")
    add("--no-kid", dest="kid", action="store_false", help="skip KID")
    add("--prc", action="store_true", help="also precision and recall")
    _add_metric_options(add)
    return parser


def _metric_kwargs(args) -> dict:
    return dict(
        inception_weights=args.inception_weights, data_root=args.data_root, feature_extractor=args.feature_extractor,
        download=not args.offline, cache_root=False if args.no_cache else args.cache_root, verbose=args.verbose,
    )


def _check_common(args) -> None:
    from .pipeline import SCHEDULERS

    for name in ("batch_size", "steps", "kid_subset_size", "num_samples"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.scheduler != "saved" and args.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {args.scheduler!r}; valid: {', '.join(SCHEDULERS)}, saved")


def run_eval(args) -> dict:
    """eval_fid.py SAMPLES ...: score one set (sampling it first when it is a model)."""
    _check_common(args)
    if not args.ref and not args.save_stats:
        raise ValueError("--ref is required (or --save-stats PATH to only write SAMPLES' statistics)")
    mk = _metric_kwargs(args)
    samples, info = args.samples, {}
    if is_model(args.samples):
        (spec,) = parse_run_specs(args.samples)
        num = args.num_samples
        if num is None:
            ref_count = metrics.load_input(args.ref, data_root=args.data_root, download=not args.offline).count
            num = min(ref_count or MAX_DEFAULT_SAMPLES, MAX_DEFAULT_SAMPLES)
        out = Path(args.samples_out) if args.samples_out else default_samples_dir(
            spec, args.scheduler, args.steps, args.guidance, args.seed)
        npz, info = sample_model(spec, out, num_samples=num, scheduler=args.scheduler, steps=args.steps,
                                 guidance=args.guidance, seed=args.seed, batch_size=args.batch_size,
                                 device=args.device)
        samples = str(npz)
        print(f"samples    {npz} ({num} from {spec.label}, {args.scheduler}, {args.steps} steps, "
              f"w={args.guidance:g})")
    if args.save_stats:
        if args.ref and not args.feature_extractor:  # the features the metrics below use
            ref_in = metrics.load_input(args.ref, data_root=args.data_root, download=not args.offline)
            mk["feature_extractor"] = metrics.choose_extractor(None, metrics.load_input(samples), ref_in)
        stats = metrics.compute_statistics(samples, batch_size=args.batch_size, device=args.device, **mk)
        print(f"statistics {stats.save(args.save_stats)} ({stats.describe()}, {stats.num_samples} images)")
    if not args.ref:
        return {}
    result = metrics.compute_metrics(samples, args.ref, fid=args.fid, kid=args.kid, isc=args.isc, prc=args.prc,
                                     batch_size=args.batch_size, device=args.device,
                                     kid_subset_size=args.kid_subset_size, **mk)
    print(format_result(result))
    manifest = metrics.read_manifest(Path(samples)) if Path(samples).exists() else None
    row = make_row(result, samples=args.samples, ref=args.ref, manifest=manifest, **info)
    if args.csv:
        print(f"row appended to {append_csv(args.csv, [row])}")
    return result


def run_compare(args, command: str) -> dict:
    _check_common(args)
    if not args.ref:
        raise ValueError("compare needs --ref")
    checkpoints = [c.strip() for c in args.checkpoints.split(",")] if args.checkpoints else None
    out = compare(args.runs, ref=args.ref, out_dir=args.out, num_samples=args.num_samples, scheduler=args.scheduler,
                  steps=args.steps, guidance=args.guidance, seed=args.seed, batch_size=args.batch_size,
                  device=args.device, checkpoints=checkpoints, isc=args.isc, kid=args.kid, prc=args.prc,
                  kid_subset_size=args.kid_subset_size, command=command, samples_dir=args.samples_dir,
                  **_metric_kwargs(args))
    print(Path(out["md"]).read_text())
    print(f"report: {out['md']}, {out['csv']}, {out['png']}")
    return out


def main(argv: Optional[Sequence[str]] = None):
    """Entry point of eval_fid.py and `uvic-eval`. Bad input ends with one message and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    compare_mode = bool(argv) and argv[0] == "compare"
    parser = build_compare_parser() if compare_mode else build_parser()
    args = parser.parse_args(argv[1:] if compare_mode else argv)
    try:
        if compare_mode:
            return run_compare(args, "python eval_fid.py " + " ".join(argv))
        return run_eval(args)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
