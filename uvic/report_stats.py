"""The report's statistics as markdown lines: each seed group's mean FID with its t-interval, the paired U-ViC − U-ViT
comparisons with their tests and verdict, multiplicity (Holm, Bonferroni, Dunnett), equivalence (TOST), failure
rates, learning curves, and the sequential looks recorded in a report folder (looks.jsonl) with their
alpha-spending boundaries.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Dict, List, Optional

from . import stats
from .report_rows import attention_label, fmt
from .seed_groups import SeedGroup, paired_comparisons


LOOKS_LOG = "looks.jsonl"  # in a report folder: one line per look at a comparison (record_looks)


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
        by_seed = ", ".join(f"{s}: {fmt(v)}" for s, v in g.fid_by_seed.items())
        lines.append(f"| {g.name} | {attention_label(g.attention)} | {len(g.rows)} | "
                     f"{fmt(g.rows[0]['num_samples'], ',d')} | {g.interval.format()} | {by_seed} |")
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
            f"{fmt(cmp.p_value, '.3g')} | {fmt(flip, '.3g')}{'' if exact else ' (MC)'} | "
            f"{fmt(cmp.wilcoxon, '.3g')} | {fmt(dz.mean, '+.2f')} {_bracket(dz, '+.2f')} | "
            f"{fmt(ratio.mean if ratio else None, '.3f')} {_bracket(ratio)} | {fmt(p_holm, '.3g')} | "
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
                     f"{fmt(eq.p, '.3g')}: {verdict}")
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
        lines.append(f"| {fmt(cog.rows[0].get('step'), ',d')} | {cog.name} | {soft.name} | {len(cmp.seeds)} | "
                     f"{cog.interval.format()} | {soft.interval.format()} | {cmp.interval.format('+.3f')} | "
                     f"{fmt(cmp.p_value, '.3g')} |")
    return lines + [""]


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
    """For each comparison looked at more than once, or once under a plan (an interim look): the alpha-spending
    boundary of every look (the plan recorded with its first look; none recorded: Pocock type, the latest look
    taken as the last) and whether a look crossed it."""
    lines = []
    for name, entries in looks.items():
        if len(entries) < 2 and not entries[0].get("plan"):
            continue
        ns = [e["n"] for e in entries]
        lines += [f"**Sequential looks: {name}** ({len(entries)} look{'s' if len(entries) > 1 else ''} in "
                  f"{LOOKS_LOG}).", ""]
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
            lines.append(f"| {k} | {e['date']} | {e['n']} | {fmt(e['p'], '.3g')} | {stats.nominal_p(z):.3g} | "
                         f"{'yes' if hit else 'no'} |")
        if crossed:
            end = f"Boundary crossed at look {crossed}: the difference holds at the overall {alpha:g} level."
        elif plan and ns[-1] < plan["max_pairs"]:
            end = (f"Not crossed at look {len(ns)} ({ns[-1]} of at most {plan['max_pairs']} paired seeds): no "
                   f"difference established yet; the plan's later looks decide.")
        else:
            end = f"No look crossed its boundary: no difference established at the overall {alpha:g} level."
        lines += ["", end, ""]
    return lines
