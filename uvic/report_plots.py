"""The comparison report's figures: FID per seed group (bars over seeds, a dot per run) or against training step
(fid.png), and the learning curves of seed groups over checkpoints (curves.png). Each bar's label and each
curve's legend entry says how long its runs trained; a title says so when the runs trained for different step counts.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from . import stats
from .report_rows import attention_label, different_steps, steps_label
from .seed_groups import SeedGroup


MAX_RUN_LABELS = 8  # fid.png over checkpoints: above this many runs, one legend entry per attention type


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
    lines = any(len(v) > 1 for v in by_run.values())
    bars = len(groups) if groups else len(rows)
    fig, ax = plt.subplots(figsize=(6.5 if lines else max(6.0, 1.7 * bars), 3.8), dpi=120)  # room per bar label
    colors = {"cog": "tab:red", "softmax": "tab:blue"}
    if lines:
        many = len(by_run) > MAX_RUN_LABELS  # a legend entry per run would bury the plot: one per attention type
        counts = Counter(rs[0]["attention"] for rs in by_run.values())  # runs per attention type
        labelled = set()
        for name, rs in by_run.items():
            rs = sorted((r for r in rs if r["step"] is not None), key=lambda r: r["step"])
            attention = rs[0]["attention"] if rs else None
            color = colors.get(attention)
            if many:
                label = None if attention in labelled else f"{attention_label(attention)}: {counts[attention]} runs"
                labelled.add(attention)
            else:
                label = f"{name} ({steps_label(rs)})" if rs else name
            ax.plot([r["step"] for r in rs], [r["fid"] for r in rs], marker="o", color=color, label=label,
                    **(dict(linewidth=0.8, markersize=3, alpha=0.7) if many else {}))
            boot_bars([r["step"] for r in rs], rs, color)
        ax.set_xlabel("training step")
        _legend_below(ax)
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
        ax.set_xticks(range(len(groups)), [g.name.replace("__", "\n").replace("=", "=\n")
                                            + (f"\n{steps_label(g.rows)}" if steps_label(g.rows) else "")
                                            for g in groups], fontsize=7)
        ax.set_ylim(top=1.25 * top)  # room for the labels
        ax.set_xlabel(f"bars: mean ± {stats.CONFIDENCE:.0%} t-interval over seeds; dots: runs (gray: bootstrap)",
                      fontsize=8)
    ax.set_ylabel(f"{ylabel} (lower is better)")
    ax.set_title(_with_steps_note(f"{rows[0]['num_samples']} samples vs {rows[0]['ref']}", rows), fontsize=9)
    fig.savefig(path, bbox_inches="tight")
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
                        label=f"{name} (n = {max(iv.n for iv in ivs)}, {steps_label([g.rows[0] for g in gs])})")
        have = [(xi, iv) for xi, iv in zip(x, ivs) if iv.low is not None]
        if have:
            ax.fill_between([xi for xi, _ in have], [iv.low for _, iv in have], [iv.high for _, iv in have],
                            color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("training step")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(_with_steps_note("mean over seeds, band: 95% t-interval", [r for g in groups for r in g.rows]),
                 fontsize=9)
    _legend_below(ax)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def _legend_below(ax) -> None:
    """The legend under the axes (long sweep names would cover the curves inside them)."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.16), frameon=False)


def _with_steps_note(title: str, rows: List[dict]) -> str:
    """The title, and on a line of its own that the runs trained for different step counts (if they did)."""
    steps = different_steps(rows)
    return title if not steps else f"{title}\nruns trained for different step counts: {', '.join(f'{s:,}' for s in steps)}"
