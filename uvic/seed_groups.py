"""Runs grouped over training seeds, and U-ViC groups paired with their U-ViT partners seed by seed.

Runs whose configs differ only in train.seed (at the same checkpoint) form a SeedGroup; a U-ViC group and a U-ViT
group whose configs differ only in the attention (PAIR_IGNORES) are compared on the seeds they share (uvic.stats).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from . import stats


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


def paired_comparisons(groups: List[SeedGroup]) -> List[tuple]:
    """(U-ViC group, U-ViT group, PairedComparison of FID U-ViC − U-ViT by train.seed) for every pair of
    groups that differ only in model.attention_type (and model.softmax_blocks) and share a seed."""
    pairs = []
    for cog in (g for g in groups if g.attention not in (None, "", "softmax")):  # U-ViC, or any other mechanism
        for soft in (g for g in groups if g.attention == "softmax" and g.pair_key == cog.pair_key):
            if set(cog.fid_by_seed) & set(soft.fid_by_seed):
                pairs.append((cog, soft, stats.paired_difference(cog.fid_by_seed, soft.fid_by_seed)))
    return pairs
