"""train.fsdp=true on two CPU ranks (torchrun, gloo): the same run as DDP, exact resume, and a normal final/.

Run as a script under torchrun, this file is the worker: it trains one tiny run under DDP, one under FSDP,
and one under FSDP that is killed after its step-2 checkpoint and rerun (it continues from there); each writes
its run folder, and rank 0 notes how the FSDP parameters were split.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["train.steps=4", "train.checkpoint_every=2", "train.grad_accum=2", "data.random_flip=true",
             "data.conditional=true", "diffusion.p_uncond=0.3", "train.lr_schedule=cosine", "train.max_grad_norm=0.5"]


def worker(out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_train import CrashAfter, tiny

    from uvic.trainer import Trainer

    class Trainer(Trainer):
        """Four runs share one launch (three launches would triple the test's time): the process group stays open
        (accelerate's end_training would close it; it has no trackers to finish here)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.accelerator.end_training = self.accelerator.wait_for_everyone

    Trainer(tiny(*OVERRIDES), out / "ddp").train()
    fsdp = Trainer(tiny(*OVERRIDES, "train.fsdp=true"), out / "fsdp")
    params = list(fsdp.raw_model.parameters())
    split = {"full": sum(p.numel() for p in params), "local": sum(p.to_local().numel() for p in params),
             "ema_local": sum(p.to_local().numel() for p in fsdp.ema.shadow_params)}
    fsdp.train()
    crash = type("Crash", (Trainer, CrashAfter), {"crash_at": 2})
    try:
        crash(tiny(*OVERRIDES, "train.fsdp=true"), out / "resumed").train()
    except KeyboardInterrupt:
        pass
    again = Trainer(tiny(*OVERRIDES, "train.fsdp=true"), out / "resumed")  # the same command continues
    split["resumed_at"] = again.step
    again.train()
    try:  # a DDP checkpoint under FSDP: refused before any training
        Trainer(tiny(*OVERRIDES, "train.steps=6", "train.fsdp=true"), out / "ddp", resume="latest")
    except Exception as e:
        split["refused"] = f"{type(e).__name__}: {e}"
    if fsdp.is_main:
        (out / "split.json").write_text(json.dumps(split))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(folder) -> dict:
    return load_file(str(Path(folder) / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", __file__, str(out)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def test_fsdp_shards_and_ends_with_the_weights_and_ema_of_ddp(runs):
    split = json.loads((runs / "split.json").read_text())
    assert split["local"] < 0.6 * split["full"] and split["ema_local"] == split["local"]  # rank 0 holds ~half, EMA too
    for step in ("step_0000002", "step_0000004"):
        for sub in ("model", "ema_model"):
            d, f = (weights(runs / run / "checkpoints" / step / sub) for run in ("ddp", "fsdp"))
            assert d.keys() == f.keys()
            for k in d:
                torch.testing.assert_close(f[k], d[k], rtol=1e-5, atol=1e-6, msg=f"{step} {sub} {k}")
    first = weights(runs / "fsdp" / "checkpoints" / "step_0000002" / "model")
    assert not torch.equal(first["pos_embed"], f["pos_embed"])  # training moved the weights


def test_fsdp_resume_matches_the_uninterrupted_fsdp_run(runs):
    assert json.loads((runs / "split.json").read_text())["resumed_at"] == 2
    for sub in ("model", "ema_model"):
        a = weights(runs / "fsdp" / "checkpoints" / "step_0000004" / sub)
        b = weights(runs / "resumed" / "checkpoints" / "step_0000004" / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub


def test_fsdp_final_is_a_normal_pipeline_that_samples_like_ddps(runs):
    from uvic.pipeline import UViCPipeline

    ema = weights(runs / "fsdp" / "checkpoints" / "step_0000004" / "ema_model")
    final = weights(runs / "fsdp" / "final" / "transformer")
    assert all(torch.equal(final[k], ema[k]) for k in ema)  # final/ holds the gathered EMA
    images = []
    for run in ("ddp", "fsdp"):
        pipe = UViCPipeline.from_pretrained(runs / run / "final")
        images.append(pipe(batch_size=4, num_inference_steps=3, class_labels=torch.arange(4),
                           generator=torch.Generator().manual_seed(0), output_type="pt").images)
    torch.testing.assert_close(images[1], images[0], rtol=1e-4, atol=1e-4)


def test_a_ddp_checkpoint_is_refused_under_fsdp_with_a_clear_message(runs):
    refused = json.loads((runs / "split.json").read_text())["refused"]
    assert refused.startswith("CheckpointError") and "DDP / single-process checkpoint" in refused
    assert "model/ and ema_model/" in refused


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
