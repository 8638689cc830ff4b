"""Training under faults: non-finite losses, damaged and hostile checkpoints, a full disk, refused config values.

Each test asserts the message and that nothing written before the fault changed (README "Failures and recovery").
"""

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when run as the torchrun worker below
from test_train import TINY, tiny
from uvic.config import load_config
from uvic.loading import run_pipeline
from uvic.checkpoint import CheckpointError, checkpoint_problem, write_manifest
from uvic.files import DiskFullError
from uvic.runs import RunDir
from uvic.train_cli import main
from uvic.trainer import NonFiniteLossError, Trainer

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder) -> dict:
    """relative path -> sha256 of every file under `folder`."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def all_finite(folder) -> bool:
    return all(torch.isfinite(t).all() for f in Path(folder).rglob("*.safetensors") for t in load_file(str(f)).values())


class NaNLossAt(Trainer):
    """The loss is NaN during the given optimizer steps (1-based), as a diverging model's would be."""

    nan_steps = ()

    def compute_loss(self, images, labels):
        loss = super().compute_loss(images, labels)
        return loss * float("nan") if self.step + 1 in self.nan_steps else loss


class Recording(NaNLossAt):
    def on_step_end(self, step):
        self.after = getattr(self, "after", {})
        self.after[step] = self.raw_model.pos_embed.detach().clone()


# ---------------------------------------------------------------------- non-finite losses
def test_a_nonfinite_step_is_skipped_counted_and_leaves_the_weights_and_ema(tmp_path):
    trainer = Recording(tiny("train.steps=4", "train.grad_accum=2", "train.log_every=1"), tmp_path / "run")
    trainer.nan_steps = (2,)
    final = trainer.train()
    assert trainer.state.nonfinite_steps == 1 and trainer.state.nonfinite_in_a_row == 0
    assert torch.equal(trainer.after[1], trainer.after[2])  # step 2 skipped: no optimizer update
    assert not torch.equal(trainer.after[2], trainer.after[3])
    assert trainer.ema.optimization_step == 3  # nor an EMA update
    assert all_finite(final)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "logs")).Reload()
    counted = {e.step: e.value for e in events.Scalars("train/nonfinite_steps")}
    assert counted[1] == 0 and counted[2] == 1 and counted[4] == 1


def test_nonfinite_losses_in_a_row_stop_the_run_naming_step_loss_and_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    trainer = NaNLossAt(tiny("train.steps=10", "train.checkpoint_every=2", "train.keep_checkpoints=1",
                             "train.max_nonfinite_steps=3"), out)
    trainer.nan_steps = range(4, 11)
    with pytest.raises(NonFiniteLossError, match=r"stopped at step 6: .*non-finite for 3 steps in a row.*loss nan.*"
                                                 r"last good checkpoint is .*step_0000004.*lower train.lr"):
        trainer.train()
    assert RunDir(out).checkpoints() == [4] and all_finite(RunDir(out).latest())
    assert not (out / "final").exists()


def test_a_huge_learning_rate_never_leaves_a_nonfinite_checkpoint_or_final(tmp_path):
    out = tmp_path / "run"
    cfg = tiny("train.lr=1e12", "train.max_grad_norm=null", "train.warmup_steps=0", "train.steps=12",
               "train.checkpoint_every=1", "train.keep_checkpoints=2", "train.max_nonfinite_steps=2")
    with pytest.raises(NonFiniteLossError, match=r"stopped at step \d+: .*non-finite.*lower train.lr"):
        Trainer(cfg, out).train()
    assert not (out / "final").exists()
    steps = RunDir(out).checkpoints()
    assert steps and all(all_finite(RunDir(out).checkpoint(s)) for s in steps)


def rank_worker(out: Path) -> None:
    """torchrun worker: rank 1 alone sees an infinite loss at step 2 (its gradients stay finite)."""

    class InfOnRank1(Trainer):
        def compute_loss(self, images, labels):
            loss = super().compute_loss(images, labels)
            bad = self.accelerator.process_index == 1 and self.step + 1 == 2
            return loss + float("inf") if bad else loss

    trainer = InfOnRank1(tiny("train.steps=3", "train.grad_accum=2"), out / "run")
    trainer.train()
    rank = trainer.accelerator.process_index
    torch.save({k: v.detach().clone() for k, v in trainer.raw_model.state_dict().items()}, out / f"weights_{rank}.pt")
    (out / f"state_{rank}.json").write_text(json.dumps({**trainer.state.state_dict(),
                                                         "ema_steps": trainer.ema.optimization_step}))


def test_a_nonfinite_loss_on_one_process_skips_the_step_on_every_process(tmp_path):
    from test_train_multiprocess import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", __file__, str(tmp_path)]
    result = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    states = [json.loads((tmp_path / f"state_{r}.json").read_text()) for r in (0, 1)]
    assert all(s["nonfinite_steps"] == 1 and s["ema_steps"] == 2 for s in states), states
    w0, w1 = (torch.load(tmp_path / f"weights_{r}.pt") for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # the same decision on both: still one model


class InfWeightAfterStep1(Trainer):
    def on_step_end(self, step):
        if step == 1:
            with torch.no_grad():
                self.raw_model.pos_embed[0, 0, 0] = float("inf")


def test_nonfinite_weights_are_never_checkpointed(tmp_path):
    out = tmp_path / "run"
    cfg = tiny("train.checkpoint_every=2", "train.max_nonfinite_steps=10")
    with pytest.raises(NonFiniteLossError, match=r"weights are non-finite at step 2: checkpoint step_0000002 not "
                                                 r"written; the last good checkpoint is none"):
        InfWeightAfterStep1(cfg, out).train()
    assert RunDir(out).step_folders() == [] and not (out / "final").exists()


# ---------------------------------------------------------------------- damaged checkpoints
CKPT = ["train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished run with intact checkpoints at steps 2 and 4 (and its final/), made once."""
    out = tmp_path_factory.mktemp("trained") / "run"
    Trainer(tiny(*CKPT), out).train()
    return out


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":  # the same size: only the hash tells
        path.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
    else:
        path.unlink()


SLOTS = ["optimizer.bin", "scheduler.bin", "random_states_0.pkl", "train_state.json",
         "model/diffusion_pytorch_model.safetensors", "ema_model/diffusion_pytorch_model.safetensors",
         "scheduler/scheduler_config.json", "manifest.json"]


DAMAGES = [(slot, how) for slot in SLOTS for how in ("truncate", "flip", "delete")]


@pytest.mark.parametrize("slot, how", DAMAGES)
def test_a_damaged_latest_checkpoint_is_named_and_resume_falls_back_to_the_one_before(trained, tmp_path, slot, how):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    damage(out / "checkpoints" / "step_0000004" / slot, how)
    before = snapshot(out)
    with pytest.warns(UserWarning, match=r"step_0000004 is damaged or incomplete .*using the one before"):
        resumed = Trainer(tiny(*CKPT), out, resume="latest")
    assert resumed.step == 2
    after = snapshot(out)
    rewritten = ("config.yaml", "run_summary.txt")  # what every start writes (the config, the startup summary)
    assert {k: v for k, v in after.items() if k not in rewritten} == {k: v for k, v in before.items() if k not in rewritten}


def test_resume_after_a_fallback_ends_identical_to_the_uninterrupted_run(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    damage(out / "checkpoints" / "step_0000004" / "optimizer.bin", "flip")
    with pytest.warns(UserWarning, match="step_0000004 is damaged"):
        final = Trainer(tiny(*CKPT), out).train()  # the same command again, no --resume
    for name, tensor in load_file(str(trained / "final" / "transformer" / "diffusion_pytorch_model.safetensors")).items():
        assert torch.equal(tensor, load_file(str(final / "transformer" / "diffusion_pytorch_model.safetensors"))[name])
    assert checkpoint_problem(out / "checkpoints" / "step_0000004", full=True) is None  # rewritten intact


def test_pipeline_latest_falls_back_and_an_explicit_damaged_checkpoint_is_refused_by_name(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    damage(out / "checkpoints" / "step_0000004" / "ema_model" / "diffusion_pytorch_model.safetensors", "flip")
    with pytest.warns(UserWarning, match="step_0000004 is damaged"):
        pipe = run_pipeline(RunDir(out), "latest")
    ema2 = load_file(str(out / "checkpoints" / "step_0000002" / "ema_model" / "diffusion_pytorch_model.safetensors"))
    assert torch.equal(pipe.transformer.pos_embed, ema2["pos_embed"])
    with pytest.raises(CheckpointError, match=r"step_0000004 is damaged.*ema_model/diffusion_pytorch_model"):
        run_pipeline(RunDir(out), 4)
    with pytest.raises(CheckpointError, match=r"not an intact checkpoint: ema_model/diffusion_pytorch_model.* sha256"):
        Trainer(tiny(*CKPT), tmp_path / "other", resume=str(out / "checkpoints" / "step_0000004"))
    assert not (tmp_path / "other").exists()


def test_an_unreadable_rng_state_with_a_matching_manifest_is_refused_not_swallowed(trained, tmp_path):
    ckpt = tmp_path / "step_0000004"
    shutil.copytree(trained / "checkpoints" / "step_0000004", ckpt)
    damage(ckpt / "random_states_0.pkl", "truncate")
    write_manifest(ckpt)
    with pytest.raises(CheckpointError, match=r"cannot read random_states_0.pkl.*not the same run"):
        Trainer(tiny(*CKPT), tmp_path / "run", resume=str(ckpt))


def test_a_checkpoint_folder_given_directly_to_the_sampler_is_verified(trained, tmp_path):
    from uvic.loading import checkpoint_pipeline

    ckpt = tmp_path / "step_0000004"
    shutil.copytree(trained / "checkpoints" / "step_0000004", ckpt)
    assert checkpoint_pipeline(ckpt).transformer is not None
    damage(ckpt / "scheduler" / "scheduler_config.json", "flip")
    with pytest.raises(CheckpointError, match=r"step_0000004 is damaged: scheduler/scheduler_config.json"):
        checkpoint_pipeline(ckpt)


# ---------------------------------------------------------------------- hostile pickles
class Hostile:
    """Unpickling it runs code: it writes the marker file."""

    marker = None

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("slot", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl",
                                  "custom_checkpoint_1.pkl", "train_state.json",
                                  "model/diffusion_pytorch_model.safetensors",
                                  "ema_model/diffusion_pytorch_model.safetensors"])
def test_a_hostile_pickle_in_any_slot_is_never_run(trained, tmp_path, slot):
    ckpt = tmp_path / "step_0000004"
    shutil.copytree(trained / "checkpoints" / "step_0000004", ckpt)
    hostile = Hostile()
    hostile.marker = tmp_path / "marker"
    torch.save({"state": hostile, "param_groups": [hostile]}, ckpt / slot)
    write_manifest(ckpt)  # an attacker's folder can carry a matching manifest
    with pytest.raises(CheckpointError, match=r"step_0000004"):
        Trainer(tiny(*CKPT), tmp_path / "run", resume=str(ckpt))
    assert not hostile.marker.exists()
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_without_a_manifest_is_incomplete_and_its_pickles_never_run(trained, tmp_path):
    """What uvic wrote before manifests (the EMA and step as accelerate custom pickles) is no longer read."""
    hostile = Hostile()
    hostile.marker = tmp_path / "marker"
    ckpt = tmp_path / "step_0000004"
    shutil.copytree(trained / "checkpoints" / "step_0000004", ckpt)
    for name in ("manifest.json", "train_state.json"):
        (ckpt / name).unlink()
    torch.save({"shadow_params": [hostile]}, ckpt / "custom_checkpoint_0.pkl")
    with pytest.raises(CheckpointError, match=r"step_0000004: not an intact checkpoint: no manifest.json \(incomplete"):
        Trainer(tiny(*CKPT), tmp_path / "run", resume=str(ckpt))
    assert not hostile.marker.exists() and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- full disk
def test_too_little_free_space_fails_before_the_checkpoint_and_a_rerun_after_freeing_it_works(tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = ["train.steps=4", "train.checkpoint_every=2"]
    Trainer(tiny(*cfg, "train.steps=2"), tmp_path / "probe").train()  # one checkpoint's real size
    real = shutil.disk_usage

    def full_after_first(path):
        usage = real(path)
        return usage._replace(free=1000) if RunDir(out).checkpoints() else usage

    monkeypatch.setattr(shutil, "disk_usage", full_after_first)
    with pytest.raises(DiskFullError, match=r"disk full: checkpoint step_0000004 needs about .* MB but .*run.* has "
                                            r"0.0 MB free.*rerun the same command.*step_0000002"):
        Trainer(tiny(*cfg), out).train()
    before = snapshot(out / "checkpoints")
    assert list(before) and all(k.startswith("step_0000002/") for k in before)
    monkeypatch.setattr(shutil, "disk_usage", real)
    again = Trainer(tiny(*cfg), out)
    assert again.step == 2
    again.train()
    assert RunDir(out).checkpoints() == [2, 4] and (out / "final").is_dir()


def test_enospc_from_any_write_says_disk_full_and_a_rerun_removes_the_stale_temporary(tmp_path, monkeypatch):
    out = tmp_path / "run"
    import uvic.checkpoint

    real = uvic.checkpoint.write_manifest

    def no_space_at_step_4(folder):
        if "step_0000004" in str(folder):
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "manifest.json"))
        return real(folder)

    monkeypatch.setattr(uvic.checkpoint, "write_manifest", no_space_at_step_4)
    with pytest.raises(DiskFullError, match=r"disk full: no space left writing .*step_0000004.tmp.*manifest.json"):
        Trainer(tiny(*CKPT), out).train()
    assert (out / "checkpoints" / ".step_0000004.tmp").is_dir() and RunDir(out).checkpoints() == [2]
    monkeypatch.undo()
    again = Trainer(tiny(*CKPT), out)  # the same command, space freed
    assert again.step == 2 and not (out / "checkpoints" / ".step_0000004.tmp").exists()
    again.train()
    assert RunDir(out).checkpoints() == [2, 4] and (out / "final").is_dir()


@pytest.mark.parametrize("free_mb, expected", [(10, DiskFullError), (10_000, RuntimeError)])
def test_a_torch_save_failure_is_called_disk_full_only_when_the_disk_is_nearly_full(tmp_path, monkeypatch, free_mb,
                                                                                    expected):
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=free_mb << 20))

    def failing_save(*args, **kwargs):  # what torch.save raises when the disk fills mid-write
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(expected) as raised:
        Trainer(tiny("train.checkpoint_every=2"), tmp_path / "run").train()
    assert (raised.type is DiskFullError) == ("disk full: no space left writing" in str(raised.value))
    assert RunDir(tmp_path / "run").checkpoints() == []


def test_stale_temporaries_are_removed_when_a_run_resumes(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    (out / "checkpoints" / ".step_0000006.tmp" / "model").mkdir(parents=True)
    (out / ".final.tmp").mkdir()
    (out / "checkpoints" / ".keep.tmp").mkdir()  # not ours: kept
    Trainer(tiny(*CKPT), out)
    assert not (out / "checkpoints" / ".step_0000006.tmp").exists() and not (out / ".final.tmp").exists()
    assert (out / "checkpoints" / ".keep.tmp").exists()


# ---------------------------------------------------------------------- refused config values
@pytest.mark.parametrize("override, message", [
    ("train.keep_checkpoints=0", r"train.keep_checkpoints must be >= 1, got 0"),
    ("train.keep_checkpoints=-2", r"train.keep_checkpoints must be >= 1, got -2"),
    ("train.ema_decay=2", r"train.ema_decay must lie in \(0, 1\).*got 2"),
    ("train.ema_decay=1", r"train.ema_decay must lie in \(0, 1\)"),
    ("data.limit=0", r"data.limit must be >= 1 \(or null\), got 0"),
    ("train.lr=0", r"train.lr must be a finite number > 0, got 0"),
    ("train.lr=-1e-4", r"train.lr must be a finite number > 0"),
    ("train.lr=nan", r"train.lr must be a finite number > 0, got nan"),
    ("train.steps=0", r"train.steps must be >= 1, got 0"),
    ("train.max_nonfinite_steps=0", r"train.max_nonfinite_steps must be >= 1"),
    ("train.max_grad_norm=0", r"train.max_grad_norm must be > 0 \(or null"),
    ("train.warmup_steps=-1", r"train.warmup_steps must be >= 0"),
    ("train.betas=[1.5,0.9]", r"train.betas must be two numbers .* in \[0, 1\)"),
    ("train.log_every=0", r"train.log_every must be >= 1"),
    # issue 28 items 2, 7, 12: values that used to fail only at the first grid / FID step, or in a traceback
    ("diffusion.beta_end=2.0", r"must satisfy 0 < beta_start < beta_end < 1, got 0.0001, 2.0"),
    ("diffusion.beta_start=0.05", r"must satisfy 0 < beta_start < beta_end < 1, got 0.05, 0.02"),
    ("train.sample_steps=2000", r"train.sample_steps=2000: ddim takes at most as many steps as the schedule has "
                                r"timesteps \(1000"),
    ("diffusion.snr_gamma=nan", r"diffusion.snr_gamma=nan is not a finite number"),
    ("data.scale_factor=inf", r"data.scale_factor=inf is not a finite number"),
    ("train.max_grad_norm=inf", r"train.max_grad_norm=inf is not a finite number"),
    ("model.patch_size=0", r"model.patch_size must be >= 1, got 0"),
    ("model.num_heads=0", r"model.num_heads must be >= 1, got 0"),
    ("model.depth=-2", r"model.depth must be >= 1, got -2"),
    ("model.sample_size=0", r"model.sample_size must be >= 1, got 0"),
    ("model.num_heads=3", r"model.embed_dim=32 is not divisible by model.num_heads=3"),
])
def test_a_value_out_of_range_is_refused_by_name_and_the_run_is_left_untouched(trained, tmp_path, override, message):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    config = tmp_path / "tiny.yaml"
    OmegaConf.save(OmegaConf.from_dotlist(TINY + CKPT), config)
    before = snapshot(out)
    with pytest.raises(ValueError, match=message):
        main(["--config", str(config), "--output-dir", str(out), "--resume", "latest", override])
    assert snapshot(out) == before


@pytest.fixture(scope="module")
def digits_stats(tmp_path_factory):
    from uvic.metrics import compute_statistics

    return compute_statistics("digits").save(tmp_path_factory.mktemp("ref") / "digits_stats.npz")


FID = ["eval.fid_every=2", "eval.fid_num_samples=4", "eval.fid_steps=2", "eval.fid_scheduler=ddim",
       "eval.fid_batch_size=4"]


def test_an_fid_reference_that_cannot_be_read_is_refused_where_the_run_starts(tmp_path, digits_stats, capsys):
    from uvic.launch import check_inputs
    from uvic.train_cli import train as train_py

    bad = tmp_path / "truncated.npz"
    bad.write_bytes(digits_stats.read_bytes()[:200])
    labels = tmp_path / "labels.npz"
    np.savez(labels, labels=np.arange(4))
    (tmp_path / "empty").mkdir()
    for ref, message in ((tmp_path / "missing.npz", "does not exist"), (bad, "not a usable FID reference"),
                         (labels, "neither images"), (tmp_path / "empty", "holds no images")):
        with pytest.raises((ValueError, FileNotFoundError), match=rf"eval.fid_ref={ref} .*{message}"):
            check_inputs(tiny(*FID, f"eval.fid_ref={ref}"))
    check_inputs(tiny(*FID, f"eval.fid_ref={digits_stats}"))  # a good one passes
    with pytest.raises(SystemExit):  # train.py: one line, before any run folder exists
        train_py([f"--output-dir={tmp_path / 'run'}", *TINY, *FID, f"eval.fid_ref={tmp_path / 'missing.npz'}"])
    assert f"train.py: error: eval.fid_ref={tmp_path / 'missing.npz'} is not a usable FID reference" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"eval.fid_steps=5000: ddim takes at most"):
        tiny(*FID, f"eval.fid_ref={digits_stats}", "eval.fid_steps=5000")


def test_a_failing_evaluation_step_writes_its_checkpoint_first_and_the_rerun_continues(tmp_path, digits_stats):
    from uvic.trainer import EvaluationError

    ref = tmp_path / "ref.npz"
    shutil.copy(digits_stats, ref)

    class RefGoneAfterStep1(Trainer):  # valid at load, gone at the FID step: a failure no load check can see
        def on_step_end(self, step):
            if step == 1:
                ref.rename(tmp_path / "moved.npz")

    out = tmp_path / "run"
    cfg = tiny(*FID, f"eval.fid_ref={ref}")
    with pytest.raises(EvaluationError, match=r"evaluation at step 2 failed .*ref.npz.*step_0000002.*--resume latest"):
        RefGoneAfterStep1(cfg, out).train()
    assert RunDir(out).checkpoints() == [2]  # train.checkpoint_every=0: written because the evaluation failed
    (tmp_path / "moved.npz").rename(ref)
    resumed = Trainer(cfg, out, resume="latest")
    assert resumed.step == 2
    resumed.train()
    fids = (out / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in fids[1:]] == ["4"]  # the FID of the last step (2's failed)


def test_a_list_yaml_config_is_refused_naming_the_file(tmp_path):
    config = tmp_path / "list.yaml"
    config.write_text("- train.lr=1e-4\n- train.steps=2\n")
    with pytest.raises(ValueError, match=rf"config file {config} must be a mapping of sections"):
        load_config(config)


# ---------------------------------------------------------------------- changed values on resume
def test_a_changed_learning_rate_on_resume_is_applied_and_named(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    with pytest.warns(UserWarning, match=r"changed config, applied from here on: .*train.betas.*train.lr"):
        resumed = Trainer(tiny(*CKPT, "train.lr=1e-4", "train.betas=[0.9,0.95]", "train.steps=8"), out,
                          resume="latest")
    group = resumed.optimizer.param_groups[0]
    assert resumed.step == 4 and group["betas"] == (0.9, 0.95) and group["initial_lr"] == 1e-4
    assert group["lr"] == resumed.lr_scheduler.get_last_lr()[0] == 1e-4  # past warm-up, constant schedule
    assert OmegaConf.load(out / "config.yaml").train.lr == 1e-4


def test_a_changed_architecture_on_resume_is_refused(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"changed model architecture \(model.embed_dim\).*start a new run"):
        Trainer(tiny(*CKPT, "model.embed_dim=16"), out, resume="latest")
    assert snapshot(out) == before


# ---------------------------------------------------------------------- one trainer per run folder (issue 28 item 3)
def test_a_second_trainer_on_a_run_folder_is_refused_naming_the_holder(trained, tmp_path):
    import socket

    from uvic.runs import RunLock, RunLockedError

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before = snapshot(out)
    with RunLock(out):  # as a running train.py holds it (flock: another open file, even in this process)
        for argv in (["--resume", "latest"], ["--overwrite"]):
            with pytest.raises(RunLockedError, match=rf"in use by another trainer \(pid {os.getpid()} on host "
                                                     rf"{socket.gethostname()}"):
                main(["--output-dir", str(out), *argv] + TINY + CKPT)
        assert {k: v for k, v in snapshot(out).items() if k != ".uvic.lock"} == before  # --overwrite deleted nothing
    assert snapshot(out) == before  # released: the lock file is gone


def test_a_stale_lock_of_a_killed_trainer_is_taken_over_with_a_warning(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    (out / ".uvic.lock").write_text("pid 999999 on host gone\n")  # kill -9 leaves the file; the kernel drops the flock
    with pytest.warns(UserWarning, match=r"taking over the stale lock .*pid 999999 on host gone"):
        trainer = Trainer(tiny(*CKPT), out)
    assert trainer.step == 4 and not (out / ".uvic.lock").exists()


def test_sigterm_checkpoints_the_step_and_train_py_exits_cleanly(tmp_path):
    import signal

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--output-dir", str(out), *TINY,
                             "train.steps=1000000", "train.checkpoint_every=0"], env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    try:
        lines = []
        for line in iter(proc.stderr.readline, ""):  # tqdm's first line: the loop has started
            lines.append(line)
            if "train:" in line:
                break
        proc.send_signal(signal.SIGTERM)
        err = "".join(lines) + proc.communicate(timeout=240)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    (step,) = RunDir(out).checkpoints()
    assert f"stopped by SIGTERM at step {step}" in err and "Traceback" not in err
    from uvic.launch import default_config_path  # train.py's config when no --config is given

    cfg = load_config(default_config_path(), TINY + ["train.steps=1000000", "train.checkpoint_every=0"])
    assert Trainer(cfg, out).step == step  # the rerun continues there


def test_sigterm_stop_records_the_first_signal_ends_on_the_second_and_restores_the_handler():
    import signal

    code = ("import os, signal, time\n"
            "from uvic.sigterm import SigtermStop\n"
            "before = signal.getsignal(signal.SIGTERM)\n"
            "with SigtermStop() as stop:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(0.2)\n"
            "    print('first', stop.signal == signal.SIGTERM, flush=True)\n"
            "print('restored', signal.getsignal(signal.SIGTERM) is before, flush=True)\n"
            "with SigtermStop():\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(0.2)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)  # a second one: the process ends at once\n"
            "    time.sleep(5)\n"
            "    print('not reached', flush=True)\n")
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.split("\n")[:2] == ["first True", "restored True"], result.stdout + result.stderr
    assert result.returncode == -signal.SIGTERM and "not reached" not in result.stdout


# ---------------------------------------------------------------------- identity checks (issue 28 items 4, 5, 6, 13, 15)
def tiny_yaml(tmp_path) -> Path:
    """The trained fixture's config as a file for train.py (whose default config is digits_uvic.yaml)."""
    config = tmp_path / "tiny.yaml"
    OmegaConf.save(OmegaConf.from_dotlist(TINY + CKPT), config)
    return config


def test_a_loose_checkpoint_of_another_architecture_is_refused_naming_the_keys(trained, tmp_path):
    loose = tmp_path / "loose_step_4"  # copied out of its run: no config.yaml around it
    shutil.copytree(trained / "checkpoints" / "step_0000004", loose)
    recorded = json.loads((loose / "model" / "config.json").read_text())["attention_type"]
    other = "softmax" if recorded == "cog" else "cog"  # a U-ViC checkpoint under a U-ViT config, or the reverse
    with pytest.raises(ValueError, match=r"changed model architecture \(model.attention_type\)"):
        Trainer(tiny(*CKPT, f"model.attention_type={other}"), tmp_path / "new", resume=str(loose))
    with pytest.raises(ValueError, match=r"changed model architecture \(model.depth\)"):
        Trainer(tiny(*CKPT, "model.depth=4"), tmp_path / "new", resume=str(loose))
    assert not (tmp_path / "new").exists()
    assert Trainer(tiny(*CKPT), tmp_path / "new", resume=str(loose)).step == 4  # the same architecture resumes


def test_a_newest_step_folder_without_manifest_and_train_state_falls_back_to_the_one_before(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    for name in ("manifest.json", "train_state.json"):  # a copy cut short
        (out / "checkpoints" / "step_0000004" / name).unlink()
    with pytest.warns(UserWarning, match=r"step_0000004 is damaged or incomplete \(no manifest.json \(incomplete\)"):
        resumed = Trainer(tiny(*CKPT), out)
    assert resumed.step == 2 and RunDir(out).checkpoints() == [2]


def test_resume_latest_with_fewer_steps_than_trained_is_refused_and_final_is_untouched(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"step_0000004 has trained 4 steps, more than train.steps=2.*nothing was "
                                         r"changed \(final/ included\)"):
        main(["--config", str(tiny_yaml(tmp_path)), "--output-dir", str(out), "--resume", "latest", "train.steps=2"])
    assert snapshot(out) == before


def test_overwrite_deletes_only_in_a_folder_uvic_made(trained, tmp_path):
    foreign = tmp_path / "mine"
    for name in ("logs/notes.txt", "samples/figure.png", "metrics.csv"):
        (foreign / name).parent.mkdir(parents=True, exist_ok=True)
        (foreign / name).write_text("keep")
    before = snapshot(foreign)
    with pytest.raises(ValueError, match=r"--overwrite would delete samples, logs, metrics.csv in .*mine, a folder "
                                         r"uvic did not make \(no .uvic-run marker\); nothing was deleted"):
        main(["--config", str(tiny_yaml(tmp_path)), "--output-dir", str(foreign), "--overwrite"])
    assert snapshot(foreign) == before
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    assert (out / ".uvic-run").is_file()  # written when the run was made
    fresh = Trainer(tiny(*CKPT), out, overwrite=True)
    assert fresh.step == 0 and not (out / "checkpoints").exists() and (out / ".uvic-run").is_file()


@pytest.mark.parametrize("edit, message", [
    ({"depth": 4}, "missing: "),
    ({"embed_dim": 48, "num_heads": 2}, "mis-shaped: "),
])
def test_a_pipeline_folder_whose_config_disagrees_with_its_weights_is_refused_naming_the_keys(
        trained, tmp_path, capsys, edit, message):
    from uvic.sampling import main as sample_main

    final = tmp_path / "final"
    shutil.copytree(trained / "final", final)
    config = final / "transformer" / "config.json"
    assert sample_main([str(final), "--grid", "2", "--steps", "2", "--out", str(tmp_path / "ok")]).is_file()
    config.write_text(json.dumps({**json.loads(config.read_text()), **edit}))
    with pytest.raises(SystemExit) as exit_:
        sample_main([str(final), "--grid", "2", "--steps", "2", "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "is damaged or was edited: transformer/config.json" in err  # the manifest
    (final / "manifest.json").unlink()  # a pipeline folder from elsewhere: the keys themselves are compared
    with pytest.raises(SystemExit) as exit_:
        sample_main([str(final), "--grid", "2", "--steps", "2", "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "weights do not match its config.json" in err and message in err
    assert not (tmp_path / "g").exists()


def test_a_full_disk_during_the_final_export_says_disk_full_and_names_final(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    save_file = safetensors.torch.save_file

    def full(tensors, filename, *args, **kwargs):
        if ".final.tmp" in str(filename):
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        return save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "run"
    with pytest.raises(DiskFullError, match=r"disk full: no space left writing .*final \(the pipeline export"):
        Trainer(tiny(*CKPT), out).train()
    assert RunDir(out).checkpoints() == [2, 4] and not (out / "final").exists()  # the rerun exports from step 4


if __name__ == "__main__":  # the torchrun worker of test_a_nonfinite_loss_on_one_process_skips_the_step_on_every_process
    rank_worker(Path(sys.argv[1]))
