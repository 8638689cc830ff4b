"""Sweeps: expand configs x --set values x seeds into runs of `python train.py`, one folder each.

    python -m uvic.sweep configs/digits_uvit.yaml configs/digits_uvic.yaml --seeds 0 1 2 \
        [--set model.patch_size=2,4 ...] --out runs/sweep [--parallel N] [--threads T] [--gpus 0,1] [--dry-run]
    python -m uvic.sweep --spec configs/sweeps/ablation_softmax_blocks.yaml --out runs/ablation

Each run's folder is named by its settings (`<config stem>__<key>=<value>...__seed=<s>`), stable and
filesystem-safe. Runs are ordered seed-major (seed 0 of every setting, then seed 1, ...), so a sweep stopped
early still holds complete, paired groups. A run whose final/ exists is skipped; an existing unfinished one
is continued with `--resume latest` (from its latest complete checkpoint, or from scratch if it has none).
A run list (sweep.json in --out) lists every run and its settings. Failed runs are listed at the end with
their log path and the sweep exits non-zero; the others still run.

A spec file (--spec, YAML) holds an experiment's grid: `configs` (list), `seeds` (list) and `set`
(mapping key -> list of values); configs, --seeds and --set given on the command line replace / extend it.
"""
import argparse
import contextlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .cli import add_debug_option, command as cli_command
from .config import config_diff, load_config
from .files import atomic_write
from .runs import RunDir
from .launch import check_inputs

POLL_SECONDS = 2.0  # how often a running sweep checks its runs


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", text)


def split_values(values: str) -> List[str]:
    """"2,4" -> ["2", "4"]; commas inside brackets stay ("[0,6],[]" -> ["[0,6]", "[]"])."""
    parts, depth, current = [], 0, ""
    for ch in values:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + [current]


def expand_grid(configs: Sequence[str], seeds: Sequence[int], sets: Sequence[str]) -> List[Dict]:
    """Runs (dicts: name, config, settings) for every seed x config x --set combination, seed-major."""
    axes = []
    for item in sets:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ValueError(f"--set expects key=v1,v2 (got {item!r})")
        axes.append([(key, v) for v in split_values(values)])
    runs = []
    for seed in seeds:
        for config in configs:
            for combo in itertools.product(*axes):
                settings = dict(combo)
                settings["train.seed"] = str(seed)
                name = "__".join([_safe(Path(config).stem)] + [_safe(f"{k}={v}") for k, v in combo] + [f"seed={seed}"])
                runs.append({"name": name, "config": config, "settings": settings})
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        raise ValueError("two runs share a folder name (duplicate configs, seeds or values?)")
    return runs


def load_spec(path: str) -> Dict:
    """A sweep spec file -> {"configs": [...], "seeds": [...], "sets": ["key=v1,v2", ...]}."""
    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(OmegaConf.load(path))
    unknown = set(spec) - {"configs", "seeds", "set"}
    if unknown:
        raise ValueError(f"sweep spec {path}: unknown keys {sorted(unknown)} (valid: configs, seeds, set)")
    sets = []
    for key, values in (spec.get("set") or {}).items():
        values = values if isinstance(values, list) else [values]
        sets.append(f"{key}=" + ",".join(str(v) for v in values))
    return {"configs": list(spec.get("configs") or []), "seeds": [int(s) for s in spec.get("seeds") or [0]],
            "sets": sets}


def train_command() -> List[str]:
    """The checkout's train.py by absolute path, else the installed console script: works from any folder."""
    script = Path(__file__).resolve().parents[1] / "train.py"
    if script.is_file():
        return [sys.executable, str(script)]
    import shutil

    return [shutil.which("uvic-train") or "uvic-train"]


def command(run: Dict, out: Path, threads: Optional[int] = None) -> List[str]:
    """train.py's command line for `run`, with absolute paths (it runs from any folder); the key=value overrides
    come last, all together (argparse does not take positionals interleaved with options)."""
    config = Path(run["config"]).resolve() if Path(run["config"]).is_file() else run["config"]
    cmd = [*train_command(), "--config", str(config), "--output-dir", str((out / run["name"]).resolve())]
    if run.get("overwrite"):  # its folder holds a run of other settings and --overwrite was given
        cmd += ["--overwrite"]
    elif (out / run["name"]).exists():
        cmd += ["--resume", "latest"]
    cmd += [f"{k}={v}" for k, v in run["settings"].items()]
    if threads is not None:
        cmd.append(f"train.cpu_threads={threads}")
    return cmd


def is_finished(run_dir: Path) -> bool:
    return RunDir(run_dir).finished()


def check_runs(runs: Sequence[Dict]) -> Dict[str, object]:
    """Load every run's config (file + overrides) and check the files it names, so a typo in --set or a missing
    eval.fid_ref fails before any run starts; name -> config."""
    configs = {}
    for r in runs:
        overrides = [f"{k}={v}" for k, v in r["settings"].items()]
        try:
            configs[r["name"]] = load_config(r["config"], overrides)
            check_inputs(configs[r["name"]])
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"run {r['name']}: {err}") from None
    return configs


def changed_runs(configs: Dict[str, object], out: Path) -> Dict[str, List[str]]:
    """Runs whose folder records (config.yaml) other settings than this sweep gives them (an edited config file
    or spec): name -> the differing keys. --threads (train.cpu_threads) is not a setting."""
    changed = {}
    for name, cfg in configs.items():
        saved = RunDir(out / name).config() if (out / name / "config.yaml").is_file() else None
        keys = [k for k in config_diff(saved, cfg) if k != "train.cpu_threads"] if saved is not None else []
        if keys:
            changed[name] = keys
    return changed


SWEEP_RUNS = "sweep.json"  # in --out: every run of the sweeps into it, with its settings


def write_run_list(out: Path, runs: Sequence[Dict]) -> None:
    """sweep.json: the runs of this and of earlier sweeps into the same --out (by name)."""
    path = out / SWEEP_RUNS
    known = {r["name"]: r for r in json.loads(path.read_text())["runs"]} if path.is_file() else {}
    known.update({r["name"]: {k: v for k, v in r.items() if k != "overwrite"} for r in runs})
    text = json.dumps({"runs": list(known.values())}, indent=2)
    atomic_write(path, lambda f: f.write(text.encode()))


class Children:
    """The sweep's running train.py processes. SIGINT / SIGTERM to the sweep are forwarded to each of them (once:
    a second signal to train.py ends it without its checkpoint) and no new run starts; the sweep then waits for
    them, so stopping a sweep leaves no trainer behind. Each child has its own session: a terminal's Ctrl-C
    reaches it only through the sweep, once."""

    def __init__(self):
        self.procs: List[subprocess.Popen] = []
        self.signalled: set = set()
        self.stop: Optional[int] = None

    def start(self, cmd: List[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
        self.procs.append(proc)
        if self.stop is not None:  # a signal came while it started
            self.forward(self.stop)
        return proc

    def forward(self, signum: int, frame=None) -> None:
        self.stop = signum
        for proc in self.procs:
            if proc.poll() is None and proc.pid not in self.signalled:
                self.signalled.add(proc.pid)
                proc.send_signal(signum)

    @contextlib.contextmanager
    def forwarding(self):
        previous = {s: signal.signal(s, self.forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for proc in self.procs:  # also when the sweep itself fails: never an orphan
                if proc.poll() is None:
                    self.forward(self.stop or signal.SIGTERM)
                    proc.wait()
            for s, handler in previous.items():
                signal.signal(s, handler)


def run_all(todo: Sequence[Dict], out: Path, parallel: int, threads: Optional[int],
            gpus: Sequence[str]) -> List[tuple]:
    """Run `todo`, `parallel` at a time; slot i uses GPU gpus[i % len(gpus)]. Returns [(name, log)] of failures.
    SIGINT / SIGTERM: forwarded to the running runs, waited for, then SystemExit(128 + signal)."""
    failed, active, free = [], {}, list(range(parallel))  # active: slot -> (run, log, process)

    def reap():
        for slot, (r, log, proc) in list(active.items()):
            if proc.poll() is not None:
                del active[slot]
                free.append(slot)
                if proc.returncode != 0 and children.stop is None:
                    failed.append((r["name"], log))

    with Children().forwarding() as children:
        for r in todo:
            while not free and children.stop is None:
                time.sleep(POLL_SECONDS)
                reap()
            if children.stop is not None:
                break
            slot = free.pop(0)
            env = dict(os.environ)
            if threads is not None:
                env["OMP_NUM_THREADS"] = str(threads)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
            log = out / f"{r['name']}.log"
            print(f"start {r['name']}" + (f" (GPU {env['CUDA_VISIBLE_DEVICES']})" if gpus else "") + f": log {log}",
                  flush=True)
            with open(log, "a") as stream:
                proc = children.start(command(r, out, threads), stdout=stream, stderr=subprocess.STDOUT, env=env)
            active[slot] = (r, log, proc)
        while active:
            time.sleep(POLL_SECONDS if children.stop is None else 0.2)
            reap()
    if children.stop is not None:
        print(f"sweep stopped by signal {children.stop}: its runs were stopped (train.py checkpoints on SIGTERM); "
              f"rerun the same command to continue", file=sys.stderr, flush=True)
        raise SystemExit(128 + children.stop)
    return failed


@cli_command("python -m uvic.sweep")
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", help="training configs (replace the spec's)")
    p.add_argument("--spec", help="sweep spec YAML: configs, seeds, set")
    p.add_argument("--seeds", nargs="+", type=int, help="train.seed values (default: the spec's, else 0)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="key=v1,v2 (repeatable)")
    p.add_argument("--out", required=True, help="sweep folder: one run folder, one log and sweep.json")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=None, help="train.cpu_threads (and OMP_NUM_THREADS) per run")
    p.add_argument("--gpus", default="", help="comma-separated GPU ids: run slot i gets CUDA_VISIBLE_DEVICES="
                                              "the (i mod n)-th (e.g. --gpus 0,1,2,3 --parallel 4)")
    p.add_argument("--dry-run", action="store_true", help="print the commands of the unfinished runs, run nothing")
    p.add_argument("--overwrite", action="store_true", help="start over the runs whose folder holds other settings "
                                                            "(refused without it)")
    add_debug_option(p)
    a = p.parse_args(argv)
    try:
        spec = load_spec(a.spec) if a.spec else {"configs": [], "seeds": [0], "sets": []}
        configs = a.configs or spec["configs"]
        if not configs:
            raise ValueError("no configs: give config files or a --spec with configs")
        for c in configs:
            if not Path(c).is_file():
                raise ValueError(f"config not found: {c}")
        if a.parallel < 1 or (a.threads is not None and a.threads < 1):
            raise ValueError("--parallel and --threads must be at least 1")
        runs = expand_grid(configs, a.seeds or spec["seeds"], spec["sets"] + a.sets)
        changed = changed_runs(check_runs(runs), Path(a.out))
        if changed and not a.overwrite:
            listed = "; ".join(f"{name} ({', '.join(keys[:4])})" for name, keys in list(changed.items())[:4])
            raise ValueError(f"{len(changed)} run folder(s) hold other settings than this sweep gives them: {listed}; "
                             f"continuing them would mix two configs in one folder. Pass --overwrite to start them "
                             f"over, or choose another --out")
    except (ValueError, FileNotFoundError) as err:
        p.error(str(err))
    out = Path(a.out)
    for r in runs:
        r["overwrite"] = r["name"] in changed
    todo = [r for r in runs if r["overwrite"] or not is_finished(out / r["name"])]
    if a.dry_run:
        for r in todo:
            print(shlex.join(command(r, out, a.threads)))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    write_run_list(out, runs)
    print(f"{len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to run", flush=True)
    failed = run_all(todo, out, a.parallel, a.threads, [g for g in a.gpus.split(",") if g.strip()])
    for name, log in failed:
        print(f"FAILED {name}: see {log}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
