"""Sweeps: grid expansion and names, skip / resume, --dry-run, spec files, and one real sweep of tiny runs."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from uvic.sweep import expand_grid, is_finished, load_spec, main
from uvic.trainer import Trainer
from uvic.config import load_config
from uvic.runs import RunDir

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = """
model: {sample_size: 8, in_channels: 1, patch_size: 2, embed_dim: 32, depth: 2, num_heads: 2}
data: {name: digits, limit: 64}
train: {batch_size: 16, steps: 4, warmup_steps: 2, lr: 1e-3, log_every: 2, sample_every: 0, sample_num: 4,
        sample_steps: 2, sample_scheduler: ddim, checkpoint_every: 2, ema_decay: 0.9}
"""


def test_grid_expansion_and_names_seed_major():
    runs = expand_grid(["configs/digits_uvic.yaml", "configs/digits_uvit.yaml"], [0, 1],
                       ["model.patch_size=2,4", "train.lr=1e-3"])
    assert len(runs) == 2 * 2 * 2
    assert [r["name"] for r in runs[:4]] == [
        "digits_uvic__model.patch_size=2__train.lr=1e-3__seed=0",
        "digits_uvic__model.patch_size=4__train.lr=1e-3__seed=0",
        "digits_uvit__model.patch_size=2__train.lr=1e-3__seed=0",
        "digits_uvit__model.patch_size=4__train.lr=1e-3__seed=0",
    ]  # every setting of seed 0 before any of seed 1: a sweep stopped early is still paired
    assert {r["settings"]["train.seed"] for r in runs[4:]} == {"1"}
    assert runs[0]["settings"] == {"model.patch_size": "2", "train.lr": "1e-3", "train.seed": "0"}
    lists = expand_grid(["a/x.yaml"], [3], ["model.softmax_blocks=[0,6],[]"])  # commas in brackets stay
    assert [r["settings"]["model.softmax_blocks"] for r in lists] == ["[0,6]", "[]"]
    assert lists[0]["name"] == "x__model.softmax_blocks=-0-6-__seed=3"  # filesystem-safe
    with pytest.raises(ValueError, match="key=v1,v2"):
        expand_grid(["configs/digits_uvic.yaml"], [0], ["model.patch_size"])
    with pytest.raises(ValueError, match="share a folder name"):
        expand_grid(["configs/digits_uvic.yaml"], [0, 0], [])


def test_dry_run_skips_finished_resumes_interrupted_and_starts_new(tmp_path, capsys):
    done = tmp_path / "digits_uvic__seed=0" / "final"
    done.mkdir(parents=True)
    (done / "model_index.json").write_text("{}")
    assert is_finished(done.parent)
    interrupted = tmp_path / "digits_uvic__seed=1" / "checkpoints" / "step_0001000"
    interrupted.mkdir(parents=True)
    assert not is_finished(interrupted.parents[1])
    assert main(["configs/digits_uvic.yaml", "--seeds", "0", "1", "2", "--out", str(tmp_path), "--dry-run",
                 "--threads", "1"]) == 0
    lines = [shlex.split(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2  # seed 0 is finished
    resumed, fresh = lines
    assert resumed[1:] == [str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "digits_uvic.yaml"), "--output-dir",
                           str(tmp_path / "digits_uvic__seed=1"), "--resume", "latest", "train.seed=1",
                           "train.cpu_threads=1"]
    assert "--resume" not in fresh and fresh[-2:] == ["train.seed=2", "train.cpu_threads=1"]
    assert not (tmp_path / "sweep.json").exists()  # a dry run writes nothing


def test_a_bad_setting_fails_before_any_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["configs/digits_uvic.yaml", "--set", "model.softmax_blocks=first-half,frist", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "softmax_blocks=frist__seed=0: model.softmax_blocks 'frist' is not a preset" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_shipped_spec_files_expand_to_valid_runs():
    spec = load_spec(str(ROOT / "configs" / "sweeps" / "ablation_softmax_blocks.yaml"))
    runs = expand_grid(spec["configs"], spec["seeds"], spec["sets"])
    placements = ["none", "first+last", "first-half", "second-half", "all-but-mid"]
    assert [r["settings"]["model.softmax_blocks"] for r in runs] == placements * 3
    assert runs[0]["name"] == "digits_uvic__model.softmax_blocks=none__seed=0"
    for r in runs[:5]:  # each placement is a valid config
        load_config(ROOT / r["config"], [f"{k}={v}" for k, v in r["settings"].items()])
    for name, seeds in (("digits_default", [0, 1, 2, 3, 4]), ("digits_patch2", [0, 1, 2])):
        spec = load_spec(str(ROOT / "configs" / "sweeps" / f"{name}.yaml"))
        assert spec["seeds"] == seeds and len(spec["configs"]) == 2


def test_a_sweep_runs_new_runs_continues_interrupted_ones_skips_finished_and_reports_failures(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # train.py is run from the repository root
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML)
    out = tmp_path / "sweep"

    class CrashAfter(Trainer):  # seed 1 was killed after its step-2 checkpoint
        def on_step_end(self, step):
            if step == 3:
                raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        CrashAfter(load_config(config, ["train.seed=1"]), out / "tiny__seed=1").train()
    (out / "tiny__seed=2").write_text("a file where the run folder should be")  # this run cannot start
    args = [str(config), "--seeds", "0", "1", "2", "--out", str(out), "--threads", "1"]
    assert main(args + ["--parallel", "2"]) == 1
    assert "FAILED tiny__seed=2" in capsys.readouterr().err  # reported; the others still ran
    assert is_finished(out / "tiny__seed=0") and is_finished(out / "tiny__seed=1")
    assert "resumed from" in (out / "tiny__seed=1.log").read_text()
    assert "resumed from" not in (out / "tiny__seed=0.log").read_text()
    names = [r["name"] for r in json.loads((out / "sweep.json").read_text())["runs"]]
    assert names == ["tiny__seed=0", "tiny__seed=1", "tiny__seed=2"]
    (out / "tiny__seed=2").unlink()
    assert main(args[:-2] + ["--dry-run"]) == 0  # only the failed run is left
    (left,) = capsys.readouterr().out.strip().splitlines()
    assert "train.seed=2" in left and "--resume" not in left


def wait_for(predicate, timeout=240.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_stopping_a_sweep_stops_and_waits_for_its_trainers_which_checkpoint_first(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML.replace("steps: 4,", "steps: 1000000,").replace("checkpoint_every: 2", "checkpoint_every: 0"))
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    sweep = subprocess.Popen([sys.executable, "-m", "uvic.sweep", str(config), "--out", str(out), "--threads", "1"],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run, log = out / "tiny__seed=0", out / "tiny__seed=0.log"
        wait_for(lambda: log.is_file() and "train:" in log.read_text(), what="the trainer's first step")
        holder = (run / ".uvic.lock").read_text()  # "pid N on host H": the trainer that holds the folder
        pid = int(holder.split()[1])
        sweep.send_signal(signal.SIGTERM)
        _, err = sweep.communicate(timeout=240)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 128 + signal.SIGTERM, err
    with pytest.raises(ProcessLookupError):  # the trainer ended and was reaped: nothing left behind
        os.kill(pid, 0)
    assert "stopped by SIGTERM at step" in log.read_text()
    steps = RunDir(run).checkpoints()
    assert len(steps) == 1 and steps[0] >= 1  # train.checkpoint_every=0: written because of the SIGTERM
    assert not (run / ".uvic.lock").exists()  # released
    resumed = Trainer(load_config(config, ["train.seed=0", "train.cpu_threads=1"]), run)  # the rerun continues
    assert resumed.step == steps[0]


def test_rerunning_a_sweep_after_editing_its_config_is_refused_unless_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML)
    out = tmp_path / "sweep"
    args = [str(config), "--out", str(out), "--threads", "1"]
    assert main(args) == 0 and is_finished(out / "tiny__seed=0")
    config.write_text(TINY_YAML.replace("lr: 1e-3", "lr: 5e-4"))  # the folder's name no longer describes its config
    before = (out / "tiny__seed=0" / "config.yaml").read_text()
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "tiny__seed=0 (train.lr)" in err and "--overwrite" in err
    assert (out / "tiny__seed=0" / "config.yaml").read_text() == before  # nothing ran
    assert main(args + ["--overwrite"]) == 0  # started over with the new settings
    assert load_config(out / "tiny__seed=0" / "config.yaml").train.lr == 5e-4
    assert main(args) == 0 and "0 to run" in capsys.readouterr().out  # now it agrees: finished, skipped
