"""Faults met by every command (issue 13: 7-9): one `error:` line and exit status 2 for expected errors,
--debug / UVIC_DEBUG for the traceback; sample sets that never shrink, verify samples.npz, adapt their shard
size and write strict JSON; latent extraction that skips unreadable images and keeps the shard in progress."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from uvic import cli, train_cli
from uvic.analysis import main as analysis_main
from uvic.evaluate import main as eval_main
from uvic.latents import LatentDataset, extract_latents, shard_name
from uvic.latents_cli import main as latents_main
from uvic.model import UViT
from uvic.pipeline import UViCPipeline
from uvic.sample_sets import default_shard_size, generate_samples
from uvic.sampling import main as sample_main
from uvic.sweep import main as sweep_main

REPO = Path(__file__).resolve().parents[1]
TINY = dict(sample_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2, in_channels=3, num_classes=5)
SET = dict(batch_size=4, steps=1, scheduler="ddim", progress=False)
RES = 16

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_pipeline():
    torch.manual_seed(0)
    return UViCPipeline(transformer=UViT(**TINY).eval(), scheduler=DDPMScheduler(num_train_timesteps=100))


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "final"
    tiny_pipeline().save_pretrained(folder)
    return folder


def refused(capsys, main, argv, *messages):
    """main(argv) ends with SystemExit(2) and one stderr line `...: error: ...` holding every message."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    line = [l for l in err.strip().splitlines() if ": error: " in l]
    assert len(line) == 1, err
    for message in messages:
        assert message in line[0], line[0]
    return line[0]


def mtimes(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


# ---------------------------------------------------------------------- one error style
def test_the_error_style_sorts_expected_errors_from_bugs(capsys):
    def fails(error):
        def fn(argv):
            raise error
        return fn

    disk = OSError(errno.ENOSPC, "No space left on device", "/data/out/x.npz")
    line = refused(capsys, lambda a: cli.run_main(fails(disk), a, prog="p"), [], "p: error: disk full: /data/out/x.npz")
    assert "free space" in line
    refused(capsys, lambda a: cli.run_main(fails(PermissionError(errno.EACCES, "Permission denied", "/ro")), a),
            [], "permission denied: /ro")
    with pytest.raises(ValueError, match="bad"):  # --debug: the traceback
        cli.run_main(fails(ValueError("bad")), ["--debug"])
    with pytest.raises(RuntimeError):  # a bug keeps its traceback
        cli.run_main(fails(RuntimeError("bug")), [])
    seen = []
    assert cli.run_main(lambda argv: seen.append(argv) or 7, ["a", "--debug", "b"]) == 7 and seen == [["a", "b"]]


def test_train_config_errors_name_the_file_and_exit_2(tmp_path, capsys):
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    refused(capsys, train_cli.train, ["--config", str(listing)], str(listing), "must be a mapping")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {lr: [\n")
    refused(capsys, train_cli.train, ["--config", str(broken)], "not valid YAML", str(broken))
    refused(capsys, train_cli.train, ["train.steps=abc"], "train.steps", "'abc'")
    refused(capsys, train_cli.train, ["data.limit=0", "--output-dir", str(tmp_path / "run")], "data.limit must be >= 1")
    assert not (tmp_path / "run").exists()
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("x")
    refused(capsys, train_cli.train, ["--output-dir", str(in_the_way), "train.steps=1"], str(in_the_way), "in the way")
    assert in_the_way.read_text() == "x"


def test_train_py_prints_one_line_and_debug_shows_the_traceback(tmp_path):
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("UVIC_DEBUG", None)
    plain = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(listing)], capture_output=True,
                           text=True, env=env, timeout=300)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-1].startswith("train.py: error: config file ")
    debug = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(listing)], capture_output=True,
                           text=True, env={**env, "UVIC_DEBUG": "1"}, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ValueError" in debug.stderr


def test_sample_py_refuses_a_corrupt_model_a_file_as_out_and_a_full_disk(pipeline_folder, tmp_path, capsys,
                                                                         monkeypatch):
    broken = tmp_path / "broken"
    shutil.copytree(pipeline_folder, broken)
    weights = next((broken / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    refused(capsys, sample_main, [str(broken), "--num-samples", "2", "--out", str(tmp_path / "s"), "--steps", "1"],
            str(weights), "truncated or corrupt")
    pth = tmp_path / "nnet_ema.pth"
    pth.write_bytes(b"PK\x03\x04 truncated")
    reference = REPO / "configs" / "reference" / "cifar10_uvit_s2.yaml"
    refused(capsys, sample_main, [str(pth), "--reference-config", str(reference), "--grid", "2", "--out", str(tmp_path)],
            str(pth), "not a readable PyTorch checkpoint", "download it again")
    out_file = tmp_path / "out_file"
    out_file.write_text("keep")
    refused(capsys, sample_main, [str(pipeline_folder), "--num-samples", "2", "--out", str(out_file), "--steps", "1"],
            f"--out {out_file} is a file")
    assert out_file.read_text() == "keep"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "full" / "shards"))

    monkeypatch.setattr(np, "savez", full)
    refused(capsys, sample_main, [str(pipeline_folder), "--num-samples", "2", "--out", str(tmp_path / "full"),
                                  "--steps", "1", "--no-progress"], "disk full: ", str(tmp_path / "full"))
    with pytest.raises(OSError):
        sample_main([str(pipeline_folder), "--num-samples", "2", "--out", str(tmp_path / "full"), "--steps", "1",
                     "--no-progress", "--debug"])


def test_eval_analysis_sweep_refuse_with_one_line(tmp_path, capsys):
    npz = tmp_path / "s.npz"
    np.savez(npz, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    npz.write_bytes(npz.read_bytes()[:100])  # truncated
    refused(capsys, eval_main, [str(npz), "--save-stats", str(tmp_path / "st.npz")], str(npz))
    small, large = tmp_path / "s16.npz", tmp_path / "s32.npz"
    np.savez(small, arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    np.savez(large, arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    refused(capsys, eval_main, [str(small), "--ref", str(large), "--csv", "", "--offline"], "16x16 px", "32x32 px",
            "--allow-resize")  # torch-fidelity would resize silently
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / f"{i}.png")
    (folder / "2.png").write_bytes(b"broken")
    refused(capsys, eval_main, [str(folder), "--save-stats", str(tmp_path / "st.npz"), "--feature-extractor", "digits"],
            str(folder / "2.png"), "not a readable image")
    refused(capsys, analysis_main, ["attention", str(tmp_path / "nothere"), "--out", str(tmp_path / "a")],
            str(tmp_path / "nothere"))
    with pytest.raises(SystemExit) as exit_info:
        sweep_main([str(tmp_path / "none.yaml"), "--out", str(tmp_path / "sw")])
    assert exit_info.value.code == 2 and "config not found" in capsys.readouterr().err


# ---------------------------------------------------------------------- sample sets
def test_a_set_never_shrinks_and_grows_keeping_its_shards(tmp_path, capsys):
    pipe = tiny_pipeline()
    out = tmp_path / "set"
    first = np.load(generate_samples(pipe, out, num_samples=6, shard_size=3, **SET))["arr_0"]
    before = mtimes(out)
    with pytest.raises(ValueError, match="holds a set of 6 samples; --num-samples 4 would shrink it"):
        generate_samples(pipe, out, num_samples=4, **SET)
    assert mtimes(out) == before  # untouched
    shards = sorted((out / "shards").glob("*.npz"))
    grown = np.load(generate_samples(pipe, out, num_samples=9, **SET))["arr_0"]  # the set's shard size, 3, is kept
    assert grown.shape[0] == 9 and np.array_equal(grown[:6], first)
    assert all(p.stat().st_mtime_ns == before[p] for p in shards)  # complete shards were not drawn again
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 9


def test_a_truncated_samples_npz_is_rebuilt_not_taken(tmp_path, capsys):
    pipe = tiny_pipeline()
    out = tmp_path / "set"
    npz = generate_samples(pipe, out, num_samples=5, shard_size=2, **SET)
    expected = np.load(npz)["arr_0"]
    record = json.loads((out / "manifest.json").read_text())["samples_npz"]
    assert record["count"] == 5 and record["shape"] == [5, 8, 8, 3] and record["bytes"] == npz.stat().st_size
    npz.write_bytes(npz.read_bytes()[:-200])
    assert np.array_equal(np.load(generate_samples(pipe, out, num_samples=5, **SET))["arr_0"], expected)
    assert "does not match its record" in capsys.readouterr().err
    shutil.rmtree(out / "shards")  # no shards left: the damaged file is drawn again, the same samples
    npz.write_bytes(npz.read_bytes()[:300])
    assert np.array_equal(np.load(generate_samples(pipe, out, num_samples=5, **SET))["arr_0"], expected)
    mtime = npz.stat().st_mtime_ns
    generate_samples(pipe, out, num_samples=5, **SET)  # verified: nothing redone
    assert npz.stat().st_mtime_ns == mtime


def test_default_shard_size_adapts_and_manifest_is_strict_json(tmp_path):
    assert [default_shard_size(n) for n in (1, 7, 25, 9_999, 50_000)] == [1, 1, 3, 1000, 1000]
    pipe = tiny_pipeline()
    out = tmp_path / "set"
    generate_samples(pipe, out, num_samples=25, **{**SET, "scheduler": "dpm++2m"})  # lambda_min_clipped = -inf
    assert len(list((out / "shards").glob("*.npz"))) == 9

    def refuse(constant):
        raise AssertionError(f"not strict JSON: {constant}")

    manifest = json.loads((out / "manifest.json").read_text(), parse_constant=refuse)
    assert manifest["shard_size"] == 3 and manifest["scheduler"]["lambda_min_clipped"] is None
    generate_samples(pipe, out, num_samples=30, **{**SET, "scheduler": "dpm++2m"})
    assert json.loads((out / "manifest.json").read_text(), parse_constant=refuse)["shard_size"] == 3


# ---------------------------------------------------------------------- latent extraction
@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), sample_size=RES)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture
def images(tmp_path):
    """2 classes x 4 images; a good copy of n00/img_2.png is kept beside the folder."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for name in ("n00", "n01"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (18, 20, 3), dtype=np.uint8)).save(root / name / f"img_{i}.png")
    return root


def extract(data, out, vae, **kw):
    return extract_latents(data, out, vae=vae, resolution=RES, batch_size=2, shard_size=3, num_workers=0,
                           progress=False, **kw)


def shards(folder):
    return [load_file(str(folder / shard_name(s))) for s in range(3)]


def test_extract_skips_an_unreadable_image_and_counts_it(images, tiny_vae, tmp_path):
    clean = LatentDataset(extract(images, tmp_path / "clean", tiny_vae), scale_factor=1)
    bad = images / "n00" / "img_2.png"  # file 2: shard 0, second batch
    bad.write_bytes(b"\x89PNG broken")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\) of 8 .*img_2.png"):
        out = extract(images, tmp_path / "skip", tiny_vae)
    data = LatentDataset(out, scale_factor=1)
    assert len(data) == 7 and data.skipped == 1
    kept = [i for i in range(8) if i != 2]
    for row, index in enumerate(kept):  # every other image, in order, with its own moments
        assert torch.equal(data.moments(row)[0], clean.moments(index)[0]) and data.moments(row)[2] == index // 4
    with safe_open(str(out / shard_name(0)), framework="pt") as f:
        assert json.loads(f.metadata()["skipped"]) == [2] and f.metadata()["count"] == "2"


def test_fail_on_corrupt_stops_naming_the_file_and_the_rerun_continues_the_shard(images, tiny_vae, tmp_path, capsys):
    good = (images / "n01" / "img_0.png").read_bytes()  # file 4: shard 1 (files 3-5), its second row
    expected = shards(extract(images, tmp_path / "clean", tiny_vae))
    (images / "n01" / "img_0.png").write_bytes(b"not an image")
    out = tmp_path / "lat"
    argv = ["extract", "--data", str(images), "--out", str(out), "--vae", str(tiny_vae), "--resolution", str(RES),
            "--batch-size", "2", "--shard-size", "3", "--num-workers", "0", "--fail-on-corrupt"]
    refused(capsys, latents_main, argv, "unreadable image", "img_0.png", "--fail-on-corrupt")
    assert (out / shard_name(0)).is_file() and not (out / shard_name(1)).exists()
    partial = load_file(str(out / f".{shard_name(1)}.partial"))
    assert partial["index"].tolist() == [3]  # the rows before the bad file are kept

    (images / "n01" / "img_0.png").write_bytes(good)
    first = (out / shard_name(0)).stat().st_mtime_ns
    latents_main(argv)
    assert (out / shard_name(0)).stat().st_mtime_ns == first and not (out / f".{shard_name(1)}.partial").exists()
    for got, want in zip(shards(out), expected):  # the resumed extraction equals an uninterrupted one
        assert got.keys() == want.keys()
        assert torch.equal(got["index"], want["index"]) and torch.equal(got["labels"], want["labels"])
        for k in ("mean", "std"):  # other batch sizes: the encoder's float rounding may differ
            torch.testing.assert_close(got[k].float(), want[k].float(), rtol=0, atol=2e-3)


# ---------------------------------------------------------------------- issue 28 item 7: one message, not a traceback
@pytest.mark.parametrize("override, message", [
    ("model.patch_size=0", "model.patch_size must be >= 1, got 0"),
    ("model.num_heads=0", "model.num_heads must be >= 1, got 0"),
    ("model.depth=-2", "model.depth must be >= 1, got -2"),
    ("model.sample_size=0", "model.sample_size must be >= 1, got 0"),
])
def test_train_py_refuses_nonpositive_model_sizes_with_one_line(tmp_path, capsys, override, message):
    refused(capsys, train_cli.train, [override, "--output-dir", str(tmp_path / "run")], "train.py: error: ", message)
    assert not (tmp_path / "run").exists()


def test_sample_py_refuses_more_steps_than_the_schedule_has(pipeline_folder, tmp_path, capsys):
    # the pipeline's DDPMScheduler has 100 training timesteps; a discrete sampler visits distinct ones
    refused(capsys, sample_main, [str(pipeline_folder), "--grid", "2", "--steps", "500", "--out", str(tmp_path / "g")],
            "--steps 500: dpm++2m takes at most as many steps as the schedule has timesteps (100")
    assert not (tmp_path / "g").exists()


def test_after_an_interrupted_growth_a_smaller_set_is_served_from_the_complete_shards(tmp_path, monkeypatch):
    from uvic import sample_sets

    pipe = tiny_pipeline()
    out = tmp_path / "set"
    first = np.load(generate_samples(pipe, out, num_samples=6, shard_size=3, **SET))["arr_0"]
    draw = sample_sets.draw

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while drawing shard 2")

    monkeypatch.setattr(sample_sets, "draw", killed)
    with pytest.raises(KeyboardInterrupt):
        generate_samples(pipe, out, num_samples=9, **SET)  # growth to 9 interrupted: shards 0 and 1 complete
    monkeypatch.setattr(sample_sets, "draw", draw)
    shards = {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.npz")}
    served = np.load(generate_samples(pipe, out, num_samples=6, **SET))["arr_0"]  # held by the complete shards
    assert np.array_equal(served, first)
    assert np.array_equal(np.load(generate_samples(pipe, out, num_samples=5, **SET))["arr_0"], first[:5])
    assert {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.npz")} == shards  # nothing drawn again
    with pytest.raises(ValueError, match="would shrink it"):  # sample 6 is in the shard that was never written
        generate_samples(pipe, out, num_samples=7, **SET)
    grown = np.load(generate_samples(pipe, out, num_samples=9, **SET))["arr_0"]  # the growth continues
    assert grown.shape[0] == 9 and np.array_equal(grown[:6], first)
    with pytest.raises(ValueError, match="holds a set of 9 samples; --num-samples 6 would shrink it"):
        generate_samples(pipe, out, num_samples=6, **SET)  # a finished set never shrinks
