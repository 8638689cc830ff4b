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


def test_per_gpu_memory_is_the_documented_formula():
    memory = doctor.per_gpu_memory(params=1000, activations_1=10.0, batch=4, gpus=8)
    assert memory == {"ddp": 20 * 1000 + 40, "fsdp": 20 * 1000 / 8 + 40, "fsdp_rank0": 20 * 1000 / 8 + 4000 + 40}


def dry_run(capsys, config, *args):
    doctor.main(["--dry-run", os.path.join(ROOT, "configs", config), *args])
    return capsys.readouterr().out


def check_rows(out: str, cfg, image_side: int) -> None:
    params = sum(p.numel() for p in UViT(**model_kwargs(cfg)).parameters())
    assert re.search(rf": {params} parameters .*L={doctor.sequence_length(cfg.model)} tokens", out)
    assert "checkpoint written: step_0000002 (step 2); resumed from step_0000002 to step 3" in out
    for phase in ("train 1", "train 2", "resumed 3"):
        assert re.search(rf"\| {phase} \| [\d.]+ \| [\d.]+ \| -?[\d.]+ \|", out), phase
    assert re.search(r"DDP [\d.]+ GiB, FSDP [\d.]+ GiB", out)
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
