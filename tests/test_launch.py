"""DDP and FSDP through the commands users run: `torchrun --nproc_per_node 2 train.py ...` and
`accelerate launch --config_file configs/accelerate/fsdp_h.yaml train.py ...` (adjusted for 2 CPU ranks), on gloo.

Each run finishes and leaves a final/ that loads and samples; a run killed right after its first checkpoint
(tests/launch_killed.py: one rank exits with no cleanup, the launcher stops the other) continues with the same
command and ends with the weights of the uninterrupted run; FSDP ends within 1e-4 of DDP.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["model.sample_size=8", "model.in_channels=1", "model.patch_size=2", "model.embed_dim=32", "model.depth=2",
         "model.num_heads=2", "data.name=digits", "data.limit=64", "data.conditional=true", "data.random_flip=true",
         "diffusion.p_uncond=0.3", "train.batch_size=16", "train.steps=4", "train.warmup_steps=2", "train.lr=1e-3",
         "train.grad_accum=2", "train.lr_schedule=cosine", "train.max_grad_norm=0.5", "train.log_every=2",
         "train.sample_every=0", "train.sample_num=4", "train.sample_steps=2", "train.sample_scheduler=ddim",
         "train.checkpoint_every=2", "train.ema_decay=0.9", "train.cpu_threads=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, *args, env=None):
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), *args]


def launch(cmd, env=None, ok=True):
    result = subprocess.run(cmd, cwd=REPO, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=300)
    if ok:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def train_args(out, *extra):
    return ["--output-dir", str(out), *TRAIN, *extra]


def weights(folder) -> dict:
    return load_file(str(Path(folder) / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("launch")
    # configs/accelerate/fsdp_h.yaml as shipped, on 2 CPU processes (fp32: bf16 on CPU is only slower here)
    accelerate_config = yaml.safe_load((REPO / "configs" / "accelerate" / "fsdp_h.yaml").read_text())
    accelerate_config.update(num_processes=2, use_cpu=True, mixed_precision="no")
    accelerate_config.pop("gpu_ids", None)
    (out / "fsdp_cpu.yaml").write_text(yaml.safe_dump(accelerate_config))
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(out / "fsdp_cpu.yaml"),
                  "--main_process_port", str(free_port()), "train.py"]
    said = {"ddp": launch(torchrun("train.py", *train_args(out / "ddp"))).stdout,
            "fsdp": launch(accelerate + train_args(out / "fsdp", "train.fsdp=true")).stdout}
    for name, extra in (("ddp_killed", ()), ("fsdp_killed", ("train.fsdp=true",))):
        killed = launch(torchrun(REPO / "tests" / "launch_killed.py", *train_args(out / name, *extra)),
                        env={"UVIC_KILL_AT_STEP": "2"}, ok=False)
        assert killed.returncode != 0 and not (out / name / "final").exists(), killed.stderr[-2000:]
        assert sorted(p.name for p in (out / name / "checkpoints").iterdir()) == ["step_0000002"]
        launch(torchrun("train.py", *train_args(out / name, *extra)))  # the same command continues
    refused = launch(torchrun("train.py", *train_args(out / "ddp", "train.steps=6", "train.fsdp=true"),
                              "--resume", "latest"), ok=False)
    return out, refused, said


@pytest.mark.parametrize("run", ["ddp", "fsdp"])
def test_a_launched_run_finishes_and_its_final_loads_and_samples(runs, run):
    from uvic.pipeline import UViCPipeline

    out, _, _ = runs
    pipe = UViCPipeline.from_pretrained(out / run / "final")
    images = pipe(batch_size=4, num_inference_steps=3, class_labels=torch.arange(4),
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()
    ema = weights(out / run / "checkpoints" / "step_0000004" / "ema_model")
    final = weights(out / run / "final" / "transformer")
    assert ema.keys() == final.keys() and all(torch.equal(final[k], ema[k]) for k in ema)


@pytest.mark.parametrize("run", ["ddp", "fsdp"])
def test_a_killed_launch_continues_with_the_same_command_to_the_uninterrupted_weights(runs, run):
    out, _, _ = runs
    for sub in ("model", "ema_model"):
        a = weights(out / run / "checkpoints" / "step_0000004" / sub)
        b = weights(out / f"{run}_killed" / "checkpoints" / "step_0000004" / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub


def test_fsdp_launched_by_accelerate_ends_within_1e4_of_ddp_by_torchrun(runs):
    out, _, _ = runs
    assert (out / "fsdp" / "checkpoints" / "step_0000004" / "optimizer_shard_1.safetensors").is_file()  # 2 ranks
    for sub in ("model", "ema_model"):
        d, f = (weights(out / run / "checkpoints" / "step_0000004" / sub) for run in ("ddp", "fsdp"))
        assert d.keys() == f.keys()
        for k in d:
            torch.testing.assert_close(f[k], d[k], rtol=1e-4, atol=1e-4, msg=f"{sub} {k}")
    first = weights(out / "fsdp" / "checkpoints" / "step_0000002" / "model")
    assert not torch.equal(first["pos_embed"], f["pos_embed"])  # training moved the weights


def test_a_ddp_run_resumed_under_fsdp_is_refused_in_one_line(runs):
    _, refused, _ = runs
    assert refused.returncode != 0, refused.stderr[-2000:]  # each rank exits 2; torchrun reports 1
    errors = [line for line in refused.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 2 and all("DDP / single-process checkpoint" in e for e in errors), refused.stderr[:3000]


@pytest.mark.parametrize("run, line", [("ddp", "parallelism: DDP over 2 processes (MULTI_CPU"),
                                       ("fsdp", "parallelism: FSDP2 (train.fsdp=true) over 2 processes (MULTI_CPU")])
def test_a_launched_run_says_whether_it_shards(runs, run, line):
    _, _, said = runs
    assert line in said[run], said[run][-2000:]
