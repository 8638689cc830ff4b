"""The command line of eval_fid.py and `uvic-eval`: parse, check, and hand over to uvic.metrics (one sample
set or model) or uvic.report (the comparison report).

    eval_fid.py SAMPLES --ref REF [--kid] [--isc] [--prc]       one sample set (or model) -> stdout + CSV row
    eval_fid.py SAMPLES --save-stats PATH                        statistics file of any input, for reuse
    eval_fid.py compare RUN_A RUN_B ... --ref REF --num-samples N --scheduler S --steps K
                                                                 every run sampled alike and scored ->
                                                                 report.md, report.csv, fid.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import feature_extractors, loading, metric_inputs, metrics
from .cli import DEBUG_HELP, add_renamed_option, command, progress_bars
from .text import read_prompts
from .config import TIMESTEP_SPACINGS
from .pipeline import SCHEDULERS
from .report import compare
from .report_rows import DEFAULT_CSV, append_csv, format_result, make_row
from .run_specs import default_samples_dir, parse_run_specs, sample_model
from .sample_sets import read_set_manifest

MAX_DEFAULT_SAMPLES = 50_000  # a model scored without --num-samples: the reference's size, at most this


def _add_metric_options(add):
    add("--ref", help="reference: cifar10-train, cifar10-val, digits, ... (torch-fidelity registered), a folder "
                      "of images, an .npz of images or a statistics .npz (mu, sigma)")
    add("--batch-size", type=int, default=64, help="images per feature-extractor batch (and per sampling batch)")
    add("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    add("--feature-extractor", help="inception | digits | a torch-fidelity extractor name "
                                    "(default: digits for --ref digits, else inception)")
    add("--inception-weights", metavar="PATH", help=f"local copy of {feature_extractors.INCEPTION_WEIGHTS_FILE}")
    add("--data-root", metavar="PATH", help="where registered datasets' files are (downloads off)")
    add("--offline", action="store_true", help="never download (weights, datasets)")
    add("--kid-subset-size", type=int, default=metrics.KID_SUBSET_SIZE, help="KID subset size")
    add("--cache-root", metavar="PATH", help="reference feature cache (default $UVIC_CACHE_DIR/fidelity_cache)")
    add("--no-cache", action="store_true", help="do not cache reference features")
    add("--scheduler", default="dpm++2m", help="sampler for models (uvic.pipeline.SCHEDULERS or 'saved')")
    add("--steps", type=int, default=50, help="sampling steps for models")
    add("--timestep-spacing", choices=TIMESTEP_SPACINGS, help="models: override the sampler's timestep spacing")
    add("--guidance", type=float, default=1.0, help="classifier-free guidance w for models (1 = off)")
    add("--seed", type=int, default=0, help="sampling seed for models")
    add("--prompts", metavar="FILE", help="text-to-image models: sample i from line i of FILE (the same captions "
        "for every model; FID-30K: `python -m uvic.caption_latents draw`)")
    add("--allow-resize", action="store_true", help="score samples and a reference of different sizes (the "
                                                    "extractor resizes both; refused by default)")
    add("--verbose", action="store_true", help="torch-fidelity's progress output")
    add("--no-progress", dest="progress", action="store_false", help="no progress bars (sampling, diffusers' loading)")
    add("--prc", action=argparse.BooleanOptionalAction, default=False, help="precision and recall (k = 3; default off)")
    add("--samples-dir", metavar="DIR", help="models: where the sample sets go (resumable, reused by reruns; "
        "default: eval_fid.py RUN/eval_samples/..., compare OUT/samples)")
    add("--debug", action="store_true", help=DEBUG_HELP)


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
    # the same flags as compare (--isc/--no-isc ...); one set is scored for FID only unless asked
    add("--isc", action=argparse.BooleanOptionalAction, default=False, help="Inception Score (default off)")
    add("--kid", action=argparse.BooleanOptionalAction, default=False, help="Kernel Inception Distance (default off)")
    add("--fid", action=argparse.BooleanOptionalAction, default=True, help="FID (default on)")
    add("--save-stats", metavar="PATH", help="write SAMPLES' FID statistics (tagged .npz) to PATH")
    add("--csv", default=DEFAULT_CSV, help=f"append the result row here (default {DEFAULT_CSV}; '' = off)")
    add("--num-samples", type=int, help="models: samples to draw (default: the reference's size, at most 50K)")
    _add_metric_options(add)
    add_renamed_option(parser, "--samples-out", "--samples-dir", "eval_fid.py")
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
    add("--out", default="runs/compare", help="report folder (default runs/compare)")
    add("--csv", default="", help=f"also append every run's row here (e.g. {DEFAULT_CSV}; default '' = off)")
    # the same flags as eval_fid.py (--isc/--no-isc ...); a comparison reports all three unless told not to
    add("--isc", action=argparse.BooleanOptionalAction, default=True, help="Inception Score (default on)")
    add("--kid", action=argparse.BooleanOptionalAction, default=True, help="Kernel Inception Distance (default on)")
    add("--clip", metavar="DIR", help="text-to-image: also the CLIP score of each set against its --prompts "
        "(a CLIP model folder, e.g. openai/clip-vit-large-patch14)")
    add("--bootstrap", type=int, default=200, metavar="B",
        help="resamples of each run's sample and reference features for its FID interval (0 = off; seeded by "
             "--seed)")
    add("--margin", type=float, metavar="M", help="also test equivalence within ±M (TOST on the paired differences)")
    add("--plan", metavar="SPENDING:MAX_PAIRS", help="the sequential plan, recorded with a comparison's first look "
        "in OUT/looks.jsonl: obrien-fleming:N or pocock:N (N the most paired seeds the study will reach)")
    add("--fail-above", type=float, metavar="FID", help="count a run whose FID is above this as failed (rate per "
        "group with an exact binomial interval)")
    add("--allow-mixed-code", action="store_true", help="group runs whose provenance.json names different uvic "
        "code (refused by default; the report says so)")
    _add_metric_options(add)
    return parser


def _metric_kwargs(args) -> dict:
    return dict(
        inception_weights=args.inception_weights, data_root=args.data_root, feature_extractor=args.feature_extractor,
        download=not args.offline, cache_root=False if args.no_cache else args.cache_root, verbose=args.verbose,
        allow_resize=args.allow_resize,
    )


def _check_common(args) -> None:
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
    if loading.kind(str(args.samples).partition("@")[0]) in ("pipeline", "checkpoint", "run"):  # a model to sample
        (spec,) = parse_run_specs(args.samples)
        ref_in = metric_inputs.load_input(args.ref, data_root=args.data_root, download=not args.offline) if args.ref else None
        num = args.num_samples
        if num is None:
            ref_count = ref_in.count if ref_in is not None else None
            num = min(ref_count or MAX_DEFAULT_SAMPLES, MAX_DEFAULT_SAMPLES)
        out = Path(args.samples_dir) if args.samples_dir else default_samples_dir(
            spec, args.scheduler, args.steps, args.guidance, args.seed, args.timestep_spacing)
        npz, info = sample_model(spec, out, num_samples=num, scheduler=args.scheduler, steps=args.steps,
                                 guidance=args.guidance, seed=args.seed, batch_size=args.batch_size,
                                 timestep_spacing=args.timestep_spacing, progress=args.progress,
                                 device=args.device, ref=ref_in, feature_extractor=args.feature_extractor,
                                 allow_resize=args.allow_resize,
                                 prompts=read_prompts(args.prompts) if args.prompts else None)
        samples = str(npz)
        print(f"samples    {npz} ({num} from {spec.label}, {args.scheduler}, {args.steps} steps, "
              f"w={args.guidance:g})")
    if args.save_stats:
        if args.ref and not args.feature_extractor:  # the features the metrics below use
            ref_in = metric_inputs.load_input(args.ref, data_root=args.data_root, download=not args.offline)
            mk["feature_extractor"] = metric_inputs.choose_extractor(None, metric_inputs.load_input(samples), ref_in)
        mk_stats = {k: v for k, v in mk.items() if k != "allow_resize"}  # one input: no sizes to compare
        stats = metrics.compute_statistics(samples, batch_size=args.batch_size, device=args.device, **mk_stats)
        print(f"statistics {stats.save(args.save_stats)} ({stats.describe()}, {stats.num_samples} images)")
    if not args.ref:
        return {}
    result = metrics.compute_metrics(samples, args.ref, fid=args.fid, kid=args.kid, isc=args.isc, prc=args.prc,
                                     batch_size=args.batch_size, device=args.device,
                                     kid_subset_size=args.kid_subset_size, **mk)
    print(format_result(result))
    manifest = read_set_manifest(Path(samples)) if Path(samples).exists() else None
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
                  kid_subset_size=args.kid_subset_size, bootstrap=args.bootstrap, command=command, samples_dir=args.samples_dir,
                  timestep_spacing=args.timestep_spacing, progress=args.progress,
                  prompts=read_prompts(args.prompts) if args.prompts else None, clip=args.clip, margin=args.margin,
                  plan=args.plan, allow_mixed_code=args.allow_mixed_code, fail_above=args.fail_above,
                  **_metric_kwargs(args))
    print(Path(out["md"]).read_text())
    print(f"report: {out['md']}, {out['csv']}, {out['png']}")
    if args.csv:
        print(f"rows appended to {append_csv(args.csv, out['rows'])}")
    return out


@command("eval_fid.py")
def main(argv: Optional[Sequence[str]] = None):
    """Entry point of eval_fid.py and `uvic-eval`. Bad input ends with one message and exit status 2 (uvic.cli)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    compare_mode = bool(argv) and argv[0] == "compare"
    parser = build_compare_parser() if compare_mode else build_parser()
    args = parser.parse_args(argv[1:] if compare_mode else argv)
    with progress_bars(args.progress):
        if compare_mode:
            return run_compare(args, "python eval_fid.py " + " ".join(argv))
        return run_eval(args)
