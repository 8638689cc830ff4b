"""One run folder: its layout, its complete checkpoints, and the rules for reusing it (pipelines: uvic.loading).

    run = RunDir("runs/digits_uvic")
    run.checkpoints()          # [2000, 4000]: complete, intact checkpoints, ascending
    run.latest()               # runs/digits_uvic/checkpoints/step_0004000, or None

Layout (written by uvic.trainer; what a checkpoint holds: uvic.checkpoint):

    config.yaml  provenance.json  run_summary.txt  checkpoints/step_XXXXXXX/  samples/step_XXXXXXX.png
    logs/ (TensorBoard)  metrics.csv  final/ (UViCPipeline, EMA weights)

A checkpoint or final/ is written under a temporary name (`temporary`), gets its manifest (every file's size and
sha256) last, and is renamed when complete (`publish`). A checkpoint is *intact* when its manifest is there and
its files match it: sizes for listing (`checkpoints()`, cheap), sizes and hashes before a resume or a pipeline is
loaded. A damaged newest checkpoint is named in a warning and the one before it is used.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import socket
import warnings
from pathlib import Path
from typing import List, Optional, Union

from omegaconf import OmegaConf

from .checkpoint import MODEL, EMA_MODEL, CheckpointError, checkpoint_problem
from .config import config_diff, model_kwargs
from .files import atomic_write

CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
FINAL = "final"
SAMPLES = "samples"  # one grid per sampled step, step_XXXXXXX.png
LOGS = "logs"  # TensorBoard (accelerate's tensorboard tracker)
METRICS = "metrics.csv"  # one row per measurement during training (METRICS_COLUMNS)
METRICS_COLUMNS = ["step", "metric", "value", "scheduler", "steps", "guidance"]
RUN_SUMMARY = "run_summary.txt"  # the startup summary, rewritten by every start or resume
RUN_MARKER = ".uvic-run"  # written when uvic makes a run folder: --overwrite deletes only in such folders
PROVENANCE = "provenance.json"  # the code of each start of the run: [{commit, source_sha256, packages, ...}]
RUN_ARTIFACTS = (CHECKPOINTS, SAMPLES, LOGS, FINAL, METRICS)  # what --overwrite deletes
LOCK = ".uvic.lock"  # held by the one trainer writing the folder (RunLock)
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_RE = re.compile(r"^\.(step_\d+|final)\.tmp$")  # temporary folders of the trainer's saves (RunDir.temporary)


def record_provenance(run_path, new_run: bool = False) -> Path:
    """Append the code this start of a run uses to <run>/provenance.json: the git commit of the checkout holding
    uvic (None outside one) and whether uvic/ differs from it, the sha256 of uvic's *.py sources (what was run,
    committed or not) and the versions of the packages behind the numbers. A start with the code of the last
    entry adds nothing, so a run resumed with other code lists both (uvic.report refuses to group it);
    new_run (a start from scratch, not a resume) begins the list anew."""
    import datetime
    import subprocess
    from importlib import metadata

    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode() + b"\0" + source.read_bytes() + b"\0")

    def git(*args) -> Optional[str]:
        try:
            done = subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    versions = {}
    for name in ("uvic", "torch", "diffusers", "accelerate", "torch-fidelity", "numpy", "scipy", "scikit-learn"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    commit = git("rev-parse", "HEAD")
    entry = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
             "uvic_modified": None if commit is None else bool(git("status", "--porcelain", "--", ".")),
             "source_sha256": digest.hexdigest(), "packages": versions}
    path = Path(run_path) / PROVENANCE
    entries = json.loads(path.read_text()) if path.is_file() and not new_run else []
    if not entries or entries[-1]["source_sha256"] != entry["source_sha256"]:
        atomic_write(path, lambda f: f.write(json.dumps(entries + [entry], indent=2).encode()))
    return path


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


class RunLockedError(ValueError):
    """Another trainer holds the run folder (an expected error: the message names the holder)."""


class RunLock:
    """One trainer per run folder: an advisory lock (fcntl.flock) on `folder`/.uvic.lock, which holds the
    holder's pid and host. The kernel drops a flock when its process dies, so a file left by a killed trainer
    is a stale lock: it is taken over with a warning naming the dead holder. The file is removed on release;
    an acquirer checks it locked the file that is still there (the unlink race of lock files)."""

    def __init__(self, folder):
        self.path = Path(folder) / LOCK
        self._file = None
        self._made_folder = False  # a refused run leaves no empty folder behind

    def acquire(self) -> "RunLock":
        import fcntl

        self._made_folder = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            f = open(self.path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "a process that has not written its pid yet"
                f.close()
                raise RunLockedError(
                    f"{self.path.parent} is in use by another trainer ({holder}; lock file {self.path}); wait for it "
                    f"to finish or stop it, or choose another --output-dir") from None
            try:
                same = os.fstat(f.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:  # released and removed between our open and our flock
                same = False
            if same:
                break
            f.close()
        f.seek(0)
        stale = f.read().strip()
        if stale:
            warnings.warn(f"taking over the stale lock {self.path} of a trainer that is not running ({stale}; "
                          f"killed before it could release it)", stacklevel=2)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self.path.unlink(missing_ok=True)  # while still holding it: the next one creates a fresh file
            self._file.close()
            self._file = None
            if self._made_folder and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class RunDir:
    """A training run's folder (it need not exist yet: the trainer creates it)."""

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def finished(self) -> bool:
        """Training ended: final/ is there (the trainer renames it into place complete)."""
        return (self.final / "model_index.json").is_file()

    @staticmethod
    def is_run(path) -> bool:
        path = Path(path)
        return (path / CONFIG).is_file() or (path / CHECKPOINTS).is_dir() or (path / FINAL).is_dir()

    @classmethod
    def find(cls, path) -> Optional["RunDir"]:
        """The run holding `path` (itself or up to 3 levels above: final/, final/transformer/, a checkpoint,
        its ema_model/); None if none."""
        path = Path(path)
        for candidate in (path, *list(path.parents)[:3]):
            if (candidate / CONFIG).is_file() or (candidate / CHECKPOINTS).is_dir():
                return cls(candidate)
        return None

    # ------------------------------------------------------------------ what the folder holds
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def final(self) -> Path:
        return self.path / FINAL

    def config(self):
        """The resolved config.yaml (an OmegaConf DictConfig), or None."""
        path = self.path / CONFIG
        return OmegaConf.load(path) if path.is_file() else None

    def step_folders(self) -> List[int]:
        """Steps of every folder named like a checkpoint (intact or not), ascending; temporary ones never match."""
        root = self.path / CHECKPOINTS
        found = [int(m.group(1)) for p in root.glob("step_*") if p.is_dir() and (m := _STEP_RE.match(p.name))]
        return sorted(found)

    def checkpoints(self) -> List[int]:
        """Steps of the complete and intact checkpoints (manifest present, file sizes match), ascending."""
        return [step for step in self.step_folders() if checkpoint_problem(self.checkpoint(step)) is None]

    def checkpoint(self, step: int) -> Path:
        return self.path / CHECKPOINTS / checkpoint_name(step)

    def sample_grid(self, step: int) -> Path:
        return self.path / SAMPLES / f"{checkpoint_name(step)}.png"

    @staticmethod
    def temporary(folder: Path) -> Path:
        """Where `folder` (a checkpoint, final/) is written before `publish`: a name `latest` never matches."""
        return folder.with_name(f".{folder.name}.tmp")

    @staticmethod
    def publish(tmp: Path, folder: Path) -> None:
        """The complete `tmp` renamed to `folder` (replacing it): only now do readers see it."""
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)  # a folder: files.atomic_write renames single files

    def rotate(self, keep: int, every: int = 0) -> None:
        """Keep the newest `keep` intact checkpoints on the schedule (steps that are multiples of `every`; 0: all
        count) and the newest intact one (the resume point); delete every older step folder (damaged ones included).
        An off-schedule checkpoint (SIGTERM, the end of a run that stopped early) never pushes a scheduled one out:
        with keep_checkpoints covering a learning curve, every point of it survives an interrupted run.
        Not accelerate's ProjectConfiguration(total_limit): that one deletes before the new checkpoint is written,
        counts damaged and temporary folders, and names folders by save count (checkpoint_N), not by step."""
        intact = self.checkpoints()
        if not intact:
            return
        scheduled = [step for step in intact if step % every == 0] if every else intact
        kept = set(scheduled[-keep:]) | {intact[-1]}
        for step in self.step_folders():
            if step < intact[-1] and step not in kept:
                shutil.rmtree(self.checkpoint(step))

    def append_metric(self, step: int, metric: str, value: float, **protocol) -> None:
        """One row of metrics.csv: step, metric, value and how it was measured (FID: scheduler, steps, guidance)."""
        path = self.path / METRICS
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(METRICS_COLUMNS)
            writer.writerow([step, metric, value] + [protocol.get(k, "") for k in METRICS_COLUMNS[3:]])

    def latest(self, verify: bool = False) -> Optional[Path]:
        """The intact checkpoint with the highest step, or None; each newer damaged one is named in a warning.
        verify: check every file's sha256 too (before loading it), not only its size."""
        for step in reversed(self.step_folders()):
            folder = self.checkpoint(step)
            problem = checkpoint_problem(folder, full=verify)
            if problem is None:
                return folder
            warnings.warn(f"checkpoint {folder} is damaged or incomplete ({problem}); skipping it and using the "
                          f"one before it", stacklevel=2)
        return None

    def resolve_step(self, checkpoint: Union[str, int], verify: bool = False) -> int:
        """"latest" (the newest intact one) or a step number -> a step with an intact checkpoint."""
        if str(checkpoint) == "latest":
            found = self.latest(verify=verify)
            if found is None:
                damaged = f" (damaged or incomplete: steps {self.step_folders()})" if self.step_folders() else ""
                raise FileNotFoundError(f"run directory {self.path} has no intact checkpoint under {CHECKPOINTS}/{damaged}")
            return int(_STEP_RE.match(found.name).group(1))
        try:
            step = int(checkpoint)
        except ValueError:
            raise ValueError(f"checkpoint={checkpoint!r} is not valid; use 'latest' or a step number") from None
        if step not in self.step_folders():
            raise FileNotFoundError(
                f"run directory {self.path} has no checkpoint at step {step}; available: {self.checkpoints()}")
        problem = checkpoint_problem(self.checkpoint(step), full=verify)
        if problem is not None:
            raise CheckpointError(f"checkpoint {self.checkpoint(step)} is damaged or incomplete: {problem}; "
                                  f"intact ones: {self.checkpoints()}")
        return step

    def remove_temporaries(self, log=print) -> None:
        """Delete the temporary folders of saves that never finished (`.step_XXXXXXX.tmp`, `.final.tmp`)."""
        for root in (self.path / CHECKPOINTS, self.path):
            for p in root.glob(".*.tmp"):
                if p.is_dir() and _TMP_RE.match(p.name):
                    shutil.rmtree(p)
                    log(f"removed {p}, left by a save that did not finish")

    def steps_trained(self, checkpoint: Optional[Union[str, int]] = None) -> Optional[int]:
        """Training steps behind the weights: the checkpoint's step, or for final/ the run's train.steps
        (its last checkpoint when there is no config)."""
        if checkpoint is not None and str(checkpoint).isdigit():
            return int(checkpoint)
        steps = self.checkpoints()
        if checkpoint == "latest":
            return steps[-1] if steps else None
        cfg = self.config()
        value = cfg.get("train", {}).get("steps") if cfg is not None else None
        if value is not None:
            return int(value)
        return steps[-1] if steps else None

    def vae_source(self):
        """(VAE source, scale factor) of a latent-diffusion run: final/vae if saved, else the latents data
        named by data.path (uvic.latents reads its meta); None for pixel runs."""
        if (self.final / "vae" / "config.json").is_file():
            return self.final / "vae", None
        cfg = self.config()
        data = (cfg.get("data") if cfg is not None else None) or {}
        if data.get("name") == "latents" and data.get("path"):
            return data["path"], data.get("scale_factor")
        return None

    # ------------------------------------------------------------------ reuse policy (the trainer's)
    def prepare(self, cfg, resume: Optional[str] = None, overwrite: bool = False, log=print) -> Optional[Path]:
        """Check the folder before a run of `cfg` and return the checkpoint to resume from (or None).

        resume None: a folder with a run of this config continues from its latest intact checkpoint; one
        of another config is refused. resume "latest": the latest intact checkpoint (none: a fresh run),
        with config changes applied (named in a warning), except the model's architecture, which a
        checkpoint fixes. Any other resume: a checkpoint folder or a run folder. Checkpoints are hashed
        against their manifest before they are chosen; a damaged newest one falls back to the one before.
        overwrite: a new run here whatever the folder holds (the caller deletes it with `clear`).
        Nothing is deleted here: a folder with artifacts but no checkpoint is refused without overwrite.
        """
        if overwrite:
            if resume is not None:
                raise ValueError("--overwrite starts a new run; it cannot be combined with --resume")
            self.check_made_by_uvic()
            return None
        saved = self.config()
        differs = config_diff(saved, cfg) if saved is not None else []
        if resume is None:
            if differs:
                raise ValueError(
                    f"{self.path} holds a run of another config (differs in {', '.join(differs[:6])}); "
                    f"pass --resume latest to continue it with this config, --overwrite to start over, "
                    f"or choose another --output-dir"
                )
            found = self.latest(verify=True) if saved is not None else None
            if found is not None:  # same config, interrupted or finished: nothing is thrown away
                log(f"{self.path} holds a run of this config: continuing from {found.name} "
                    f"(choose another --output-dir for a new run)")
                return found
            left = [name for name in RUN_ARTIFACTS if (self.path / name).exists()]
            if left:  # a run that never checkpointed (or files of unknown origin): keep them
                raise ValueError(
                    f"{self.path} holds {', '.join(left)} but no complete checkpoint to continue from; "
                    f"pass --overwrite to delete them and start over, or choose another --output-dir"
                )
            return None
        if resume == "latest":
            found = self.latest(verify=True)
            if found is None:
                log(f"--resume latest: no intact checkpoint in {self.path / CHECKPOINTS}, starting a new run")
                return None
        else:
            path = Path(resume)
            if (path / CHECKPOINTS).is_dir():  # a run folder
                found = RunDir(path).latest(verify=True)
                if found is None:
                    raise FileNotFoundError(f"--resume {resume}: no intact checkpoint under {path / CHECKPOINTS}")
            elif not path.is_dir():
                raise FileNotFoundError(f"--resume {resume}: no such checkpoint folder (or use --resume latest)")
            else:
                problem = checkpoint_problem(path, full=True)
                if problem is not None:
                    raise CheckpointError(f"--resume {resume}: not an intact checkpoint: {problem}")
                found = path
            from_run = RunDir.find(found)
            if from_run is not None and from_run.path.resolve() != self.path.resolve():
                other = from_run.config()
                differs = config_diff(other, cfg) if other is not None else differs
        architecture = [key for key in differs if key.startswith("model.") and key != "model.gradient_checkpointing"]
        architecture = sorted(set(architecture) | set(architecture_diff(found, cfg)))  # what the weights record
        if architecture:
            raise ValueError(
                f"cannot resume {found} with a changed model architecture ({', '.join(architecture)}): its weights "
                f"fix it; start a new run (another --output-dir, or --overwrite) to train another model"
            )
        done = int(_STEP_RE.match(found.name).group(1)) if _STEP_RE.match(found.name) else None
        if done is not None and done > cfg.train.steps:
            raise ValueError(
                f"{found} has trained {done} steps, more than train.steps={cfg.train.steps}: resuming would record "
                f"fewer steps than were trained, so nothing was changed (final/ included); pass train.steps >= "
                f"{done} to train on, or sample the checkpoint (sample.py {self.path} --checkpoint {done})")
        if differs:
            warnings.warn(f"resuming {found.name} with a changed config, applied from here on: {', '.join(differs)}")
        return found

    def check_made_by_uvic(self) -> None:
        """--overwrite deletes only in a folder uvic made (its RUN_MARKER): another folder holding any RUN_ARTIFACTS
        name is refused."""
        left = [name for name in RUN_ARTIFACTS if (self.path / name).exists()]
        if left and not (self.path / RUN_MARKER).is_file():
            raise ValueError(
                f"--overwrite would delete {', '.join(left)} in {self.path}, a folder uvic did not make (no "
                f"{RUN_MARKER} marker); nothing was deleted: remove them yourself or choose another --output-dir")

    def mark(self) -> None:
        """Write RUN_MARKER: this folder is a uvic run (what --overwrite may clear)."""
        if not (self.path / RUN_MARKER).is_file():
            atomic_write(self.path / RUN_MARKER, lambda f: f.write(b"a uvic training run (uvic.runs.RunDir)\n"))

    def clear(self) -> None:
        """Delete the run's artifacts (RUN_ARTIFACTS): what --overwrite does before a new run."""
        for name in RUN_ARTIFACTS:
            p = self.path / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


def architecture_diff(checkpoint, cfg) -> List[str]:
    """model.* keys where the architecture a checkpoint's weights record (model/config.json, written with them)
    differs from `cfg`'s; [] when the checkpoint records none."""
    for sub in (MODEL, EMA_MODEL):
        path = Path(checkpoint) / sub / "config.json"
        if path.is_file():
            try:
                recorded = json.loads(path.read_text())
            except ValueError:
                return [f"model.* (unreadable {path})"]
            wanted = json.loads(json.dumps(model_kwargs(cfg)))
            return sorted(f"model.{k}" for k, v in wanted.items() if k in recorded and recorded[k] != v)
    return []
