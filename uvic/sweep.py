"""Sweeps: expand configs x seeds x --set values into runs of `python train.py`, one folder each.

    python -m uvic.sweep configs/digits_uvic.yaml configs/digits_uvit.yaml --seeds 0 1 2 \
        [--set model.patch_size=2,4 ...] --out runs/sweep [--parallel N] [--threads T] [--dry-run]

Each run's folder is named by its settings (`<config stem>__<key>=<value>...__seed=<s>`), stable and
filesystem-safe. A run whose final/ exists is skipped; an existing unfinished one is continued with
`--resume latest`. A manifest (sweep.json in --out) lists every run and its settings. Failed runs are
listed at the end with their log path and the sweep exits non-zero; the others still run.
"""
import argparse
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .cli import add_debug_option, command as cli_command


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", text)


def expand_grid(configs: Sequence[str], seeds: Sequence[int], sets: Sequence[str]) -> List[Dict]:
    """Runs (dicts: name, config, overrides) for every config x --set combination x seed."""
    axes = []
    for item in sets:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ValueError(f"--set expects key=v1,v2 (got {item!r})")
        axes.append([(key, v) for v in values.split(",")])
    runs = []
    for config in configs:
        for combo in itertools.product(*axes):
            for seed in seeds:
                settings = dict(combo)
                settings["train.seed"] = str(seed)
                name = "__".join([_safe(Path(config).stem)] + [_safe(f"{k}={v}") for k, v in combo] + [f"seed={seed}"])
                runs.append({"name": name, "config": config, "settings": settings})
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        raise ValueError("two runs share a folder name (duplicate configs, seeds or values?)")
    return runs


def command(run: Dict, out: Path) -> List[str]:
    cmd = [sys.executable, "train.py", "--config", run["config"]]
    cmd += [f"{k}={v}" for k, v in run["settings"].items()]
    cmd += ["--output-dir", str(out / run["name"])]
    if (out / run["name"]).exists():
        cmd += ["--resume", "latest"]
    return cmd


def is_finished(run_dir: Path) -> bool:
    final = run_dir / "final"
    return final.is_dir() and any(final.iterdir())


@cli_command("python -m uvic.sweep")
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--set", dest="sets", action="append", default=[], help="key=v1,v2 (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="train.cpu_threads per run on the CPU")
    p.add_argument("--dry-run", action="store_true")
    add_debug_option(p)
    a = p.parse_args(argv)
    for c in a.configs:
        if not Path(c).is_file():
            p.error(f"config not found: {c}")
    out = Path(a.out)
    runs = expand_grid(a.configs, a.seeds, a.sets)
    todo = [r for r in runs if not is_finished(out / r["name"])]
    if a.dry_run:
        for r in todo:
            print(shlex.join(command(r, out) + [f"train.cpu_threads={a.threads}"]))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"runs": runs}, indent=2))
    failed, active = [], []
    for i, r in enumerate(todo):
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
        if os.environ.get("UVIC_SWEEP_GPUS"):
            gpus = os.environ["UVIC_SWEEP_GPUS"].split(",")
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        (out / r["name"]).parent.mkdir(parents=True, exist_ok=True)
        log = out / f"{r['name']}.log"
        cmd = command(r, out) + [f"train.cpu_threads={a.threads}"]
        active.append((r, log, subprocess.Popen(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT, env=env)))
        while len(active) >= a.parallel or (i == len(todo) - 1 and active):
            r0, log0, proc = active.pop(0)
            if proc.wait() != 0:
                failed.append((r0["name"], log0))
    for name, log in failed:
        print(f"FAILED {name}: see {log}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
