"""RunDir: one run folder's complete checkpoints, the run around a path, its pipelines; the atomic write."""

import pytest
import torch
from diffusers import DDPMScheduler

from uvic.model import UViT
from uvic.loading import run_pipeline
from uvic.checkpoint import write_manifest
from uvic.files import atomic_write
from uvic.runs import RunDir, checkpoint_name

TINY = dict(sample_size=8, in_channels=1, patch_size=2, embed_dim=16, depth=2, num_heads=2)


def fake_checkpoint(run, step, seed):
    folder = run / "checkpoints" / checkpoint_name(step)
    for i, sub in enumerate(("model", "ema_model")):
        torch.manual_seed(seed + i)
        UViT(**TINY).save_pretrained(folder / sub)
    DDPMScheduler(num_train_timesteps=10).save_pretrained(folder / "scheduler")
    write_manifest(folder)
    return folder


def test_checkpoints_steps_and_the_run_around_a_path(tmp_path):
    run = tmp_path / "run"
    (run / "config.yaml").parent.mkdir()
    (run / "config.yaml").write_text("train: {steps: 9}\n")
    fake_checkpoint(run, 2, seed=0)
    fake_checkpoint(run, 4, seed=2)
    (run / "checkpoints" / ".step_0000006.tmp").mkdir()  # being written: never listed
    r = RunDir(run)
    assert r.checkpoints() == [2, 4] and r.latest() == run / "checkpoints" / "step_0000004"
    assert (r.steps_trained(), r.steps_trained("latest"), r.steps_trained(2)) == (9, 4, 2)
    assert RunDir.find(run / "checkpoints" / "step_0000002" / "ema_model").path == run
    assert RunDir.find(tmp_path) is None and r.vae_source() is None
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 3; available: \[2, 4\]"):
        r.resolve_step(3)


def test_pipeline_of_a_checkpoint_holds_its_ema_or_raw_weights(tmp_path):
    folder = fake_checkpoint(tmp_path / "run", 2, seed=0)
    r = RunDir(tmp_path / "run")
    ema, raw = run_pipeline(r, "latest"), run_pipeline(r, 2, ema=False)
    assert torch.equal(ema.transformer.pos_embed, UViT.from_pretrained(folder / "ema_model").pos_embed)
    assert torch.equal(raw.transformer.pos_embed, UViT.from_pretrained(folder / "model").pos_embed)
    with pytest.raises(FileNotFoundError, match="has no final/"):
        run_pipeline(r)


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = atomic_write(tmp_path / "a.json", lambda f: f.write(b"old"))

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_run_lock_is_exclusive_names_its_holder_and_is_gone_after_release(tmp_path):
    import os
    import socket

    from uvic.runs import RunLock, RunLockedError

    folder = tmp_path / "run"
    first = RunLock(folder).acquire()
    assert (folder / ".uvic.lock").read_text().strip() == f"pid {os.getpid()} on host {socket.gethostname()}"
    with pytest.raises(RunLockedError, match=rf"in use by another trainer \(pid {os.getpid()} on host"):
        RunLock(folder).acquire()  # flock: another open file of the same lock conflicts, even in one process
    first.release()
    assert not (folder / ".uvic.lock").exists()
    with RunLock(folder):  # free again, no stale-lock warning: the file was removed with the lock
        assert (folder / ".uvic.lock").is_file()
    assert not folder.exists()  # made by the lock for a run that wrote nothing: removed again
