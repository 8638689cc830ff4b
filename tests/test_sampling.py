"""sample.py / uvic.sampling, uvic.drawing, uvic.sample_sets: model kinds, grids, sample sets (npz layout, per-index seeds, resume,
refusal of a folder of another set, two processes), bad input."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from uvic.model import UViT
from uvic.pipeline import UViCPipeline
from uvic.loading import load_pipeline
from uvic.drawing import labels_for
from uvic.sample_sets import generate_samples
from uvic.sampling import main

REPO = Path(__file__).resolve().parents[1]
TINY = dict(sample_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2)
SET = dict(num_samples=7, shard_size=3, batch_size=2, steps=2, scheduler="ddim", progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(num_classes=5, in_channels=3, seed=0):
    torch.manual_seed(seed)
    return UViT(**TINY, in_channels=in_channels, num_classes=num_classes).eval()


def tiny_pipeline(**kwargs):
    return UViCPipeline(transformer=tiny_model(**kwargs), scheduler=DDPMScheduler(num_train_timesteps=100))


def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished run in the run-directory layout (README.md, "Train"): config.yaml, checkpoints/step_XXXXXXX/{model,ema_model,scheduler}
    (steps 10 and 20, raw and EMA weights differing), an incomplete checkpoint, final/."""
    run = tmp_path_factory.mktemp("runs") / "tiny_uvic"
    scheduler = DDPMScheduler(num_train_timesteps=100)
    for step in (10, 20):
        raw, ema = tiny_model(seed=step), tiny_model(seed=step + 1)
        folder = run / "checkpoints" / f"step_{step:07d}"
        raw.save_pretrained(folder / "model")
        ema.save_pretrained(folder / "ema_model")
        scheduler.save_pretrained(folder / "scheduler")
    (run / "checkpoints" / ".step_0000030.tmp" / "model").mkdir(parents=True)  # being written: never `latest`
    UViCPipeline(transformer=ema, scheduler=scheduler).save_pretrained(run / "final")
    (run / "config.yaml").write_text("model:\n  sample_size: 8\ndiffusion: {}\ndata:\n  name: digits\ntrain: {}\neval: {}\n")
    return run


@pytest.fixture(scope="module")
def unconditional(tmp_path_factory):
    """A pipeline folder of an unconditional grey-scale model."""
    folder = tmp_path_factory.mktemp("uncond") / "final"
    tiny_pipeline(num_classes=0, in_channels=1).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------- loading
def test_load_pipeline_accepts_every_model_kind(run_dir, tmp_path):
    final = load_pipeline(run_dir / "final")
    assert state_equal(load_pipeline(run_dir).transformer, final.transformer)  # a run directory means its final/
    latest = run_dir / "checkpoints" / "step_0000020"
    assert state_equal(load_pipeline(run_dir, checkpoint="latest").transformer, UViT.from_pretrained(latest / "ema_model"))
    assert state_equal(load_pipeline(run_dir, checkpoint="latest", ema=False).transformer, UViT.from_pretrained(latest / "model"))
    step10 = run_dir / "checkpoints" / "step_0000010"
    assert state_equal(load_pipeline(run_dir, checkpoint=10, ema=False).transformer, UViT.from_pretrained(step10 / "model"))
    assert state_equal(load_pipeline(step10).transformer, UViT.from_pretrained(step10 / "ema_model"))
    assert load_pipeline(step10).scheduler.config.num_train_timesteps == 100

    # A published U-ViT .pth: reference parameter names, reference keywords in YAML (flat) or JSON (sections).
    model = tiny_model()
    torch.save(model.state_dict(), tmp_path / "nnet_ema.pth")
    (tmp_path / "ref.yaml").write_text("img_size: 8\npatch_size: 2\nin_chans: 3\nembed_dim: 32\ndepth: 2\n"
                                       "num_heads: 2\nnum_classes: 5\nname: uvit\n")
    flat = load_pipeline(tmp_path / "nnet_ema.pth", reference_config=tmp_path / "ref.yaml")
    assert state_equal(flat.transformer, model)
    assert flat.scheduler.config.num_train_timesteps == 1000 and flat.scheduler.config.beta_schedule == "linear"
    nnet = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    (tmp_path / "ref.json").write_text(json.dumps(
        {"nnet": nnet, "uvic": {"attention_type": "cog"}, "scheduler": {"beta_schedule": "scaled_linear"},
         "timestep_offset": 1}))
    sectioned = load_pipeline(tmp_path / "nnet_ema.pth", reference_config=tmp_path / "ref.json")
    assert state_equal(sectioned.transformer, model) and sectioned.transformer.attention_layout() == ["softmax", "cog", "softmax"]
    assert sectioned.scheduler.config.beta_schedule == "scaled_linear" and sectioned.config.timestep_offset == 1
    assert flat.config.timestep_offset == 0


def test_load_pipeline_rejects_what_it_cannot_sample_from(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; expected a pipeline folder"):
        load_pipeline(tmp_path / "missing")
    with pytest.raises(ValueError, match="none of the accepted kinds"):
        load_pipeline(tmp_path)
    (tmp_path / "weights.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"weights.pth is not the name of a published U-ViT checkpoint "
                       r"\(cifar10_uvit_small.pth, .*mscoco_uvit_small_deep.pth\): pass --reference-config"):
        load_pipeline(tmp_path / "weights.pth")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 15; available: \[10, 20\]"):
        load_pipeline(run_dir, checkpoint=15)
    with pytest.raises(ValueError, match="holds EMA weights only"):
        load_pipeline(run_dir / "final", ema=False)
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    (unfinished / "config.yaml").write_text("model: {}\n")
    with pytest.raises(FileNotFoundError, match="has no final/.*--checkpoint latest"):
        load_pipeline(unfinished)


def test_checkpoint_of_a_latent_run_decodes_with_the_vae_of_its_data(tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    run = tmp_path / "latent_run"
    folder = run / "checkpoints" / "step_0000005"
    tiny_model(in_channels=4).save_pretrained(folder / "ema_model")
    DDPMScheduler(num_train_timesteps=100, clip_sample=False).save_pretrained(folder / "scheduler")
    (run / "config.yaml").write_text(f"data:\n  name: latents\n  path: {tmp_path / 'vae'}\n  scale_factor: 0.5\n")
    pipe = load_pipeline(run, checkpoint="latest")
    assert isinstance(pipe.vae, AutoencoderKL) and pipe.vae.config.scaling_factor == 0.5
    assert pipe.image_shape == (3, 16, 16)


# ---------------------------------------------------------------------- sample sets
def test_npz_and_png_layout(tmp_path):
    pipe = tiny_pipeline()
    path = generate_samples(pipe, tmp_path / "set", formats=("npz", "png"), guidance=1.5, **SET)
    assert path == tmp_path / "set" / "samples.npz"
    with np.load(path) as data:
        assert set(data.files) == {"arr_0", "labels"}
        arr, labels = data["arr_0"], data["labels"]
    assert arr.shape == (7, 8, 8, 3) and arr.dtype == np.uint8 and arr.std() > 0
    assert labels.dtype == np.int64 and labels.min() >= 0 and labels.max() <= 3
    shards = sorted((tmp_path / "set" / "shards").glob("shard_*.npz"))
    assert np.array_equal(np.concatenate([np.load(p)["indices"] for p in shards]), np.arange(7))  # each index once
    pngs = sorted((tmp_path / "set" / "png").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(7)]
    assert all(np.array_equal(np.asarray(Image.open(p)), a) for p, a in zip(pngs, arr))
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["steps"] == 2 and manifest["guidance"] == 1.5
    assert manifest["scheduler"]["class"] == "DDIMScheduler" and manifest["classes"] == "uniform"

    grey = generate_samples(tiny_pipeline(num_classes=0, in_channels=1), tmp_path / "grey", **SET)
    with np.load(grey) as data:
        assert data.files == ["arr_0"] and data["arr_0"].shape == (7, 8, 8, 3)  # grey repeated to RGB
        assert (data["arr_0"][..., 0] == data["arr_0"][..., 2]).all()


def test_pngs_of_a_finished_npz_set_come_from_its_shards(tmp_path):
    pipe = tiny_pipeline()
    arr = np.load(generate_samples(pipe, tmp_path / "set", **SET))["arr_0"]
    calls = []
    handle = pipe.transformer.register_forward_hook(lambda *args: calls.append(1))
    folder = generate_samples(pipe, tmp_path / "set", formats=("png",), **SET)
    handle.remove()
    assert folder == tmp_path / "set" / "png" and not calls  # nothing drawn again
    assert all(np.array_equal(np.asarray(Image.open(folder / f"{i:06d}.png")), arr[i]) for i in range(7))


def test_same_seed_and_index_give_the_same_image_whatever_the_batch_size(tmp_path):
    pipe = tiny_pipeline()
    kwargs = dict(SET, scheduler="ddpm", guidance=2.0, seed=5)  # a stochastic sampler: step noise per sample too
    one = np.load(generate_samples(pipe, tmp_path / "a", **{**kwargs, "batch_size": 1, "shard_size": 2}))
    three = np.load(generate_samples(pipe, tmp_path / "b", **{**kwargs, "batch_size": 3, "shard_size": 7}))
    assert np.array_equal(one["arr_0"], three["arr_0"]) and np.array_equal(one["labels"], three["labels"])
    other_seed = np.load(generate_samples(pipe, tmp_path / "c", **{**kwargs, "seed": 6}))
    assert not np.array_equal(other_seed["arr_0"], one["arr_0"])


def test_labels_depend_on_seed_and_index_only():
    uniform = labels_for(range(2000), "uniform", 4, seed=0)
    assert np.array_equal(labels_for(range(100, 300), "uniform", 4, seed=0), uniform[100:300])
    assert not np.array_equal(labels_for(range(2000), "uniform", 4, seed=1), uniform)
    assert np.all(np.abs(np.bincount(uniform, minlength=4) - 500) < 100)
    assert labels_for(range(6), "balanced", 4, seed=0).tolist() == [0, 1, 2, 3, 0, 1]
    assert labels_for(range(5), [3, 1], 4, seed=0).tolist() == [3, 1, 3, 1, 3]


def test_interrupted_then_resumed_set_equals_an_uninterrupted_one(tmp_path):
    pipe = tiny_pipeline()
    kwargs = dict(SET, seed=3, guidance=1.0)
    expected = np.load(generate_samples(pipe, tmp_path / "whole", **kwargs))

    calls = []

    def interrupt(module, inputs, output):  # Ctrl-C in the middle of shard 1 (shard 0 = 2 batches x 2 steps)
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    handle = pipe.transformer.register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        generate_samples(pipe, out, **kwargs)
    handle.remove()
    shards = out / "shards"
    assert [p.name for p in shards.glob("*.npz")] == ["shard_000000.npz"] and not (out / "samples.npz").exists()
    # What a killed process leaves: a half-written temporary file; and a damaged shard under its final name.
    (shards / ".shard_000001.npz.tmp-12345").write_bytes(b"PK\x03\x04 half")
    damaged = (tmp_path / "whole" / "shards" / "shard_000002.npz").read_bytes()
    (shards / "shard_000002.npz").write_bytes(damaged[: len(damaged) // 2])
    first = (shards / "shard_000000.npz").stat().st_mtime_ns

    resumed = np.load(generate_samples(pipe, out, **kwargs))
    assert (shards / "shard_000000.npz").stat().st_mtime_ns == first  # done once, not redone
    assert np.array_equal(resumed["arr_0"], expected["arr_0"]) and np.array_equal(resumed["labels"], expected["labels"])
    assert sorted(p.name for p in shards.iterdir()) == ["shard_000000.npz", "shard_000001.npz", "shard_000002.npz"]

    shutil.rmtree(shards)  # a finished set needs its shards no more: the same command again draws nothing
    handle = pipe.transformer.register_forward_hook(interrupt)
    calls.clear()
    assert generate_samples(pipe, out, **kwargs) == out / "samples.npz" and not calls
    handle.remove()


def test_a_folder_of_another_model_or_seed_is_refused_before_sampling(tmp_path):
    pipe = tiny_pipeline()
    out = tmp_path / "set"
    first = np.load(generate_samples(pipe, out, **SET))["arr_0"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(ValueError, match="already holds a different sample set \\(seed: 0 there, 1 now\\)"):
        generate_samples(pipe, out, **SET, seed=1)
    with pytest.raises(ValueError, match="different sample set \\(model: '[0-9a-f]{16}' there"):
        generate_samples(tiny_pipeline(seed=1), out, **SET)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    bigger = np.load(generate_samples(pipe, out, **{**SET, "num_samples": 9}))["arr_0"]  # the same set, extended
    assert bigger.shape[0] == 9 and np.array_equal(bigger[:7], first)


# ---------------------------------------------------------------------- command line
def test_grid_has_a_row_per_class_and_goes_to_the_run_samples_folder(run_dir, unconditional, tmp_path):
    path = main([str(run_dir / "final"), "--grid", "3", "--steps", "2", "--device", "cpu", "--no-progress"])
    assert path == run_dir / "samples" / "grid_dpm++2m_2steps_w1_seed0.png"
    assert Image.open(path).size == (3 * 66 + 2, 4 * 66 + 2)  # 3 per row, 4 classes; 8 px drawn 8x + 2 px padding
    rows = main([str(run_dir / "final"), "--grid", "2", "--class-labels", "3", "1", "--guidance", "1.4", "--steps", "2",
                 "--out", str(tmp_path / "g.png"), "--device", "cpu", "--no-progress"])
    assert Image.open(rows).size == (134, 134)
    grid = main([str(unconditional), "--grid", "2", "--steps", "2", "--out", str(tmp_path), "--no-progress"])
    assert grid.parent == tmp_path and Image.open(grid).size == (134, 134)


def test_cli_set_from_a_checkpoint_equals_the_library_call(run_dir, tmp_path):
    path = main([str(run_dir), "--checkpoint", "latest", "--no-ema", "--num-samples", "5", "--out", str(tmp_path / "cli"),
                 "--scheduler", "euler", "--steps", "2", "--guidance", "1.4", "--class-labels", "2", "0",
                 "--batch-size", "4", "--device", "cpu", "--no-progress"])
    pipe = load_pipeline(run_dir, checkpoint="latest", ema=False)
    expected = generate_samples(pipe, tmp_path / "lib", num_samples=5, scheduler="euler", steps=2, guidance=1.4,
                                classes=[2, 0], progress=False)
    with np.load(path) as got, np.load(expected) as want:
        assert np.array_equal(got["arr_0"], want["arr_0"]) and got["labels"].tolist() == [2, 0, 2, 0, 2]


@pytest.mark.parametrize(
    "model, options, message",
    [
        ("final", ["--scheduler", "dpm"], r"unknown scheduler 'dpm'; valid: ddpm, ddim, dpm\+\+2m"),
        ("final", ["--class-labels", "1", "4"], r"class labels \[4\] out of range: this model has classes 0..3"),
        ("uncond", ["--class-labels", "1"], r"this model is unconditional: class labels \[1\] cannot be used"),
        ("uncond", ["--guidance", "1.4"], "guidance needs a class-conditional model; got guidance_scale=1.4"),
        ("missing", [], "MODEL .*missing does not exist; expected a pipeline folder"),
        ("empty", [], "MODEL .*empty is none of the accepted kinds"),
        ("run", ["--checkpoint", "15"], r"no checkpoint at step 15; available: \[10, 20\]"),
        ("final", ["--seed", "1"], r"already holds a different sample set \(seed: 0 there, 1 now\)"),
    ],
)
def test_bad_input_ends_with_one_message_before_sampling(run_dir, unconditional, tmp_path, capsys, model, options, message):
    (tmp_path / "empty").mkdir()
    paths = {"final": run_dir / "final", "uncond": unconditional, "run": run_dir,
             "missing": tmp_path / "missing", "empty": tmp_path / "empty"}
    out = tmp_path / "set"
    if "--seed" in options:  # a folder holding the seed-0 set of the same model
        generate_samples(load_pipeline(run_dir / "final"), out, num_samples=2, steps=1, scheduler="dpm++2m",
                         shard_size=1000, progress=False)
    before = sorted(out.rglob("*")) if out.exists() else None
    with pytest.raises(SystemExit) as exit_info:
        main([str(paths[model]), "--num-samples", "2", "--steps", "1", "--out", str(out), "--device", "cpu", *options])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in error
    assert re.search(message, error), error
    assert (sorted(out.rglob("*")) if out.exists() else None) == before  # nothing was drawn or written


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_same_set_as_one(run_dir, tmp_path):
    options = ["--num-samples", "6", "--shard-size", "2", "--batch-size", "2", "--steps", "2", "--scheduler", "dpm++2m",
               "--guidance", "1.4", "--seed", "7", "--device", "cpu", "--no-progress"]
    # Two ranks started the way torchrun / accelerate launch start them: the env:// rendezvous variables.
    command = [sys.executable, str(REPO / "sample.py"), str(run_dir / "final"), *options, "--out", str(tmp_path / "two")]
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
                  "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, **rendezvous, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    outputs = [rank.communicate(timeout=300)[0].decode() for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    assert ["samples.npz" in output for output in outputs] == [True, False]  # one set, by rank 0: a real 2-process run
    one = generate_samples(load_pipeline(run_dir / "final"), tmp_path / "one", num_samples=6, shard_size=2, batch_size=2,
                           steps=2, scheduler="dpm++2m", guidance=1.4, seed=7, progress=False)
    with np.load(tmp_path / "two" / "samples.npz") as two, np.load(one) as single:
        assert np.array_equal(two["arr_0"], single["arr_0"]) and np.array_equal(two["labels"], single["labels"])


def test_no_progress_silences_diffusers_loading_bar_too(run_dir, tmp_path, capsys):
    main([str(run_dir / "final"), "--grid", "2", "--steps", "1", "--out", str(tmp_path / "a.png")])
    assert "Loading pipeline components" in capsys.readouterr().err  # diffusers' bar, shown by default
    main([str(run_dir / "final"), "--grid", "2", "--steps", "1", "--out", str(tmp_path / "b.png"), "--no-progress"])
    said = capsys.readouterr().err
    assert "Loading pipeline components" not in said and "it/s" not in said, said
    from diffusers.utils import logging as diffusers_logging

    assert diffusers_logging.is_progress_bar_enabled()  # switched back on when the command ends
