"""uvic.doctor: the attention length L against the model's own token count, and --dry-run (a shipped config
trained, checkpointed, resumed and sampled on synthetic data of its shape through the Trainer)."""

import glob
import os
import re

import pytest
import torch

from uvic import doctor
from uvic.config import load_config, model_kwargs
from uvic.model import UViT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def model_tokens(cfg) -> int:
    """Tokens the built model attends over: the input of its first block (a forward hook)."""
    model = UViT(**model_kwargs(cfg)).eval()
    m, seen = cfg.model, []
    model.in_blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    x = torch.zeros(1, m.in_channels, m.sample_size, m.sample_size)
    kwargs = {"class_labels": torch.zeros(1, dtype=torch.long)} if m.num_classes > 0 else {}
    if (m.get("context_dim") or 0) > 0:
        kwargs["encoder_hidden_states"] = torch.zeros(1, m.num_context_tokens, m.context_dim)
    with torch.no_grad():
        model(x, torch.zeros(1), **kwargs)
    return seen[0]


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_sequence_length_is_the_model_token_count(path, one_thread):
    cfg = load_config(path, ["model.depth=2", "model.embed_dim=64", "model.num_heads=2"])  # tokens do not depend on these
    assert doctor.sequence_length(cfg.model) == model_tokens(cfg)


def test_mscoco_length_counts_the_77_text_tokens():
    cfg = load_config(os.path.join(ROOT, "configs", "mscoco_uvic_s2.yaml"))
    assert doctor.sequence_length(cfg.model) == 16 * 16 + 1 + 77


def test_the_computed_state_is_what_a_trainer_holds(tmp_path, one_thread):
    """The state term against the tensors a real one-process Trainer keeps between steps (every distinct storage
    of its weights, AdamW states, EMA shadow and EMA model), and the working-memory split against a linear case."""
    from uvic.trainer import Trainer

    cfg = load_config(None, ["model.sample_size=8", "model.in_channels=1", "model.patch_size=2", "model.embed_dim=32",
                             "model.depth=2", "model.num_heads=2", "data.name=digits", "data.limit=16",
                             "train.batch_size=8", "train.steps=2", "train.log_every=1", "train.sample_every=0",
                             "train.checkpoint_every=0"])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train()
    held = [*trainer.raw_model.parameters(), *trainer.ema.shadow_params, *trainer.ema_model.parameters(),
            *(v for state in trainer.optimizer.optimizer.state.values() for k, v in state.items() if k != "step")]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
    params = sum(p.numel() for p in trainer.raw_model.parameters())
    memory = doctor.per_gpu_memory(params, fixed=0.0, per_sample=0.0, batch=1, gpus=1)
    grads = doctor.STATE_BYTES["grads"] * params  # allocated by each backward, freed after the optimizer step
    assert sum(storages.values()) == memory["ddp_rank0"] - grads == memory["fsdp_rank0"] - grads
    assert memory["ddp_rank0"] - memory["ddp"] == 4 * params  # the whole EMA model: the main process only
    fixed, per_sample = doctor.step_memory(params, rise_1=grads + 100.0 + 7.0, rise_2=grads + 100.0 + 14.0)
    assert (fixed, per_sample) == (100.0, 7.0)
    assert doctor.step_memory(params, grads / 2 + 107.0, grads / 2 + 114.0, shards=2) == (100.0, 7.0)  # FSDP: a shard


def dry_run(capsys, config, *args):
    doctor.main(["--dry-run", os.path.join(ROOT, "configs", config), *args])
    return capsys.readouterr().out


def check_rows(out: str, cfg, image_side: int) -> None:
    params = sum(p.numel() for p in UViT(**model_kwargs(cfg)).parameters())
    assert re.search(rf": {params} parameters .*L={doctor.sequence_length(cfg.model)} tokens", out)
    assert "checkpoint written: step_0000002 (step 2); resumed from step_0000002 to step 3" in out
    for phase in ("train 1", "train 2", "resumed 3", "batch 2 1", "batch 2 2"):
        assert re.search(rf"\| {phase} \| [\d.]+ \| [\d.]+ \| -?[\d.]+ \|", out), phase
    assert re.search(r"step memory: [\d.]+ GiB fixed \+ [\d.]+ GiB per sample", out)
    assert re.search(r"DDP [\d.]+ GiB \(rank 0, with the whole EMA: [\d.]+\), FSDP [\d.]+ GiB \(rank 0: [\d.]+\)", out)
    assert f"sampled final/ in 2 steps: images (1, 3, {image_side}, {image_side})" in out


def test_dry_run_cifar_s2_at_full_size(capsys, one_thread):
    out = dry_run(capsys, "cifar10_uvic_s2.yaml")
    check_rows(out, load_config(os.path.join(ROOT, "configs", "cifar10_uvic_s2.yaml")), 32)
    assert "44.3M" in out  # U-ViT-S/2 on CIFAR-10: 44M (the U-ViT paper's table 1)


def test_dry_run_imagenet_latents_at_depth_2(capsys, one_thread):
    out = dry_run(capsys, "imagenet256_uvic_l2.yaml", "--depth", "2")
    check_rows(out, load_config(os.path.join(ROOT, "configs", "imagenet256_uvic_l2.yaml"), ["model.depth=2"]), 256)
    assert "gradient checkpointing True" in out and "precision bf16" in out


def test_dry_run_mscoco_at_depth_2(capsys, one_thread):
    out = dry_run(capsys, "mscoco_uvic_s2.yaml", "--depth", "2")
    check_rows(out, load_config(os.path.join(ROOT, "configs", "mscoco_uvic_s2.yaml"), ["model.depth=2"]), 256)
    assert "L=334 tokens" in out


def test_dry_run_under_torchrun_on_two_ranks_runs_every_phase(tmp_path):
    """The launch users run for DDP: each phase builds a new Trainer in the same two processes (before, the second
    one hung in gloo's rendezvous: end_training had destroyed the process group and a new one met the old keys)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "uvic.doctor", "--dry-run", os.path.join(ROOT, "configs", "cifar10_uvic_s2.yaml"),
           "--depth", "2", "--dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ROOT}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert f"depth 2 rank {rank}: " in result.stdout and f"rank {rank} | batch 2 2 |" in result.stdout
    assert "2 process(es)" in result.stdout and "sampled final/ in 2 steps" in result.stdout


RSS_SCRIPT = """
import sys, torch
from uvic.doctor import exact_resident_set, memory_kib
if sys.argv[1] == "exact":
    assert exact_resident_set()
x = torch.ones(256 * 1024); del x  # 1 MiB freed: glibc raises its mmap threshold to 1 MiB
temps, keep = [], []
for i in range(50):  # 1 MiB temporaries between kept 256 KiB tensors: freed, they are holes in the heap
    temps.append(torch.ones(256 * 1024))
    keep.append(torch.ones(64 * 1024))
before = memory_kib()["VmRSS"]
del temps
print((before - memory_kib()["VmRSS"]) / 1024)
"""


def test_the_dry_run_resident_set_follows_freed_tensors():
    """What the CLI's dry run sets (its process only): freed temporaries leave the resident set, so the peak rise of
    a step sees the step's own temporaries. glibc's defaults keep the 50 MiB (the control)."""
    import subprocess
    import sys

    def returned(mode):
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, mode], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
        return float(out.stdout.strip())

    assert returned("exact") > 45 and returned("default") < 5
