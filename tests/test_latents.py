"""Latent diffusion: ADM center crop, VAE-moment shards (resume, ranks), LatentDataset sampling,
attach_vae, ImageNet presets, and the whole path extract -> train -> sample -> FID (ImageNet configs: test_config)."""

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from uvic.images import center_crop, export_crops, find_images
from uvic.latents import LatentDataset, attach_vae, extract_latents, shard_name, shards_for_process
from uvic.latents_cli import main as latents_main
from uvic.vae import load_vae
from uvic.model import UViT
from uvic.pipeline import UViCPipeline

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["n01", "n02", "n03"]
SIZES = [(20, 24), (24, 20), (16, 16), (30, 17)]  # (W, H): portrait, landscape, square, odd
RES = 16  # pixels; the tiny VAE halves once -> latents (4, 8, 8)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A 2-stage AutoencoderKL with random weights, saved like a hub download."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), sample_size=RES, scaling_factor=0.18215,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """ImageNet layout, 3 classes x 4 images of mixed sizes, left/right asymmetric (flips differ)."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i, (w, h) in enumerate(SIZES):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            arr[:, : w // 3] = (80 * c, 40 * i, 200)
            Image.fromarray(arr).save(root / name / f"img_{i}.png")
    (root / "n02" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def latents(tiny_vae, image_folder, tmp_path_factory):
    """One extraction (float16, no flip, 3 shards of 5/5/2 images) shared by the read-only tests."""
    return extract(image_folder, tmp_path_factory.mktemp("latents") / "lat", tiny_vae)


def extract(data, out, vae, **kw):
    kw = {"resolution": RES, "batch_size": 3, "shard_size": 5, "num_workers": 0, "progress": False, **kw}
    return extract_latents(data, out, vae=vae, **kw)


def reference_moments(vae_path, data, rel, flip=False):
    vae = load_vae(vae_path)
    with Image.open(data / rel) as im:
        x = torch.from_numpy(np.asarray(center_crop(im.convert("RGB"), RES), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    x = x.flip(-1) if flip else x
    with torch.no_grad():
        d = vae.encode(x[None]).latent_dist
    return d.mean[0], d.std[0]


# ---------------------------------------------------------------------- preprocessing
def test_center_crop_resizes_the_shorter_side_and_keeps_the_center():
    arr = np.zeros((40, 100, 3), np.uint8)  # H 40, W 100: center 40x40 white, sides black
    arr[:, 30:70] = 255
    out = center_crop(Image.fromarray(arr), 20)
    assert out.size == (20, 20)
    assert np.asarray(out)[:, 2:-2].min() >= 250  # only the white middle survives
    big = center_crop(Image.fromarray(np.full((300, 200, 3), 7, np.uint8)), 64)  # box-halved first, then bicubic
    assert big.size == (64, 64) and np.asarray(big).max() == 7


def test_find_images_sorts_classes_and_skips_non_images(image_folder):
    files, labels, classes = find_images(image_folder)
    assert classes == CLASSES and len(files) == 12
    assert labels == [0] * 4 + [1] * 4 + [2] * 4
    assert files[4] == os.path.join("n02", "img_0.png")


def test_exported_crops_are_the_center_crops_and_resume(image_folder, tmp_path):
    files, _, _ = find_images(image_folder)
    out = export_crops(image_folder, tmp_path / "crops", resolution=RES, limit=5, seed=1, num_workers=0, progress=False)
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == [f"{k:06d}.png" for k in range(5)]
    chosen = np.sort(np.random.default_rng(1).permutation(12)[:5])
    with Image.open(image_folder / files[chosen[2]]) as im:
        expected = np.asarray(center_crop(im.convert("RGB"), RES))
    np.testing.assert_array_equal(np.asarray(Image.open(pngs[2])), expected)
    pngs[0].unlink()
    before = pngs[1].stat().st_mtime_ns
    export_crops(image_folder, out, resolution=RES, limit=5, seed=1, num_workers=0, progress=False)
    assert pngs[0].exists() and pngs[1].stat().st_mtime_ns == before


# ---------------------------------------------------------------------- extraction
def test_extract_stores_the_vae_moments_of_both_flips_with_labels_and_meta(tiny_vae, image_folder, tmp_path, capsys):
    out = tmp_path / "lat"
    latents_main(["extract", "--data", str(image_folder), "--out", str(out), "--vae", str(tiny_vae), "--flip",
                  "--resolution", str(RES), "--batch-size", "3", "--shard-size", "5", "--num-workers", "0",
                  "--dtype", "float32"])
    assert "12 latents (4, 8, 8) of 3 classes" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_images"] == 12 and meta["num_shards"] == 3 and meta["num_classes"] == 3
    assert meta["classes"] == CLASSES and meta["latent_shape"] == [4, 8, 8] and meta["scale_factor"] == 0.18215
    assert meta["vae"] == str(tiny_vae.resolve()) and (out / "vae" / "config.json").exists()

    ds = LatentDataset(out)
    assert len(ds) == 12 and ds.num_classes == 3 and ds.classes == CLASSES and ds.latent_shape == (4, 8, 8)
    files, labels, _ = find_images(image_folder)
    for i in (0, 6, 11):
        mean, std, label = ds.moments(i)
        assert mean.shape == (2, 4, 8, 8) and label == labels[i]
        for view in (0, 1):
            ref_mean, ref_std = reference_moments(tiny_vae, image_folder, files[i], flip=bool(view))
            torch.testing.assert_close(mean[view], ref_mean, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(std[view], ref_std, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(mean[0], mean[1], atol=1e-3)  # the mirror is really a different image


def test_latent_dataset_draws_from_the_moments_and_scales(latents):
    ds = LatentDataset(latents, scale_factor=0.5)
    mean, std, label = ds.moments(7)
    torch.manual_seed(0)
    draws = torch.stack([ds[7][0] for _ in range(64)])  # (64, 4, 8, 8)
    assert draws.dtype == torch.float32 and ds[7][1] == label == 1 and isinstance(ds[7][1], int)
    z = (draws / 0.5 - mean[0]) / std[0]  # standardized: N(0, 1) if z = 0.5 (mean + std eps)
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05
    torch.testing.assert_close(draws.mean(0), 0.5 * mean[0], atol=4 * 0.5 * std[0].max().item() / 8, rtol=0)
    assert not torch.equal(draws[0], draws[1])  # a fresh latent at every access
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=0)
    x, y = next(iter(loader))
    assert x.shape == (5, 4, 8, 8) and y.tolist() == [0, 0, 0, 0, 1]
    copy = pickle.loads(pickle.dumps(ds))  # what DataLoader workers get: no open file handles travel
    torch.testing.assert_close(copy.moments(7)[0], mean)


def test_the_trainers_latents_data_section_builds_a_latent_dataset(latents):
    from uvic.data import build_dataset

    ds = build_dataset(OmegaConf.create({"name": "latents", "path": str(latents), "scale_factor": None}), 8)
    assert isinstance(ds, LatentDataset) and ds.scale_factor == 0.18215 and ds.num_classes == 3 and len(ds) == 12


def test_extraction_resumes_missing_shards_and_never_takes_half_written_ones(latents, tiny_vae, image_folder, tmp_path):
    out = Path(shutil.copytree(latents, tmp_path / "lat"))
    kept = {s: (out / shard_name(s)).stat().st_mtime_ns for s in (0, 2)}
    complete = LatentDataset(out).moments(6)
    (out / shard_name(1)).rename(out / f".{shard_name(1)}.tmp-999")  # as if killed before the rename
    with pytest.raises(FileNotFoundError, match="incomplete.*shard_00001.*rerun"):
        LatentDataset(out)

    extract(image_folder, out, tiny_vae)
    assert {s: (out / shard_name(s)).stat().st_mtime_ns for s in (0, 2)} == kept  # complete shards skipped
    assert not list(out.glob(".*tmp*"))  # the half-written file was cleaned up, not renamed
    for a, b in zip(LatentDataset(out).moments(6), complete):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))

    with pytest.raises(ValueError, match="resolution=16.*resolution=32"):
        extract(image_folder, out, tiny_vae, resolution=32)


def test_a_partial_file_with_all_rows_of_its_shard_becomes_the_shard(latents, tiny_vae, image_folder, tmp_path):
    """A stop between encoding a shard's last batch and its rename leaves every row in the partial file."""
    out = Path(shutil.copytree(latents, tmp_path / "lat"))
    complete = load_file(str(out / shard_name(1)))
    (out / shard_name(1)).rename(out / f".{shard_name(1)}.partial")  # its metadata says next = the shard's end
    (out / f"..{shard_name(1)}.partial.tmp-999").write_bytes(b"half")  # a partial write killed before its rename
    extract(image_folder, out, tiny_vae)
    assert all(torch.equal(load_file(str(out / shard_name(1)))[k], v) for k, v in complete.items())
    assert not list(out.glob(".*")), "the partial file and the half-written one are gone"
    assert len(LatentDataset(out)) == 12


def test_accelerate_ranks_encode_disjoint_shards_that_together_cover_the_data(latents, tiny_vae, image_folder, tmp_path):
    from safetensors import safe_open

    assert shards_for_process(7, 1, 3) == [1, 4] and sorted(sum((shards_for_process(7, r, 3) for r in range(3)), [])) == list(range(7))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "lat"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "uvic.latents", "extract", "--data", str(image_folder), "--out", str(out),
           "--vae", str(tiny_vae), "--resolution", str(RES), "--batch-size", "3", "--shard-size", "5", "--num-workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "12 latents (4, 8, 8) of 3 classes" in result.stdout  # rank 0, after every rank finished
    for s in range(3):
        with safe_open(str(out / shard_name(s)), "pt") as f:
            assert f.metadata()["process"] == f"{s % 2}/2"  # rank r wrote shards r, r + 2, ...
    two, single = LatentDataset(out), LatentDataset(latents)
    for i in range(12):  # the same latents as one process (float16, encoded with another thread count)
        (mean2, std2, label2), (mean1, std1, label1) = two.moments(i), single.moments(i)
        assert label2 == label1
        torch.testing.assert_close(mean2, mean1, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(std2, std1, atol=2e-3, rtol=2e-3)


def test_bad_input_fails_fast_with_one_clear_message(tiny_vae, image_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        extract(tmp_path / "missing_dir", tmp_path / "o", tiny_vae)
    with pytest.raises(ValueError, match="resolution 15 is not divisible"):
        extract(image_folder, tmp_path / "o", tiny_vae, resolution=15)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        LatentDataset(tmp_path)
    with pytest.raises(SystemExit) as exit_:  # the command line: one message, status 2
        latents_main(["extract", "--data", str(tmp_path / "missing_dir"), "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2
    with pytest.raises(FileNotFoundError, match="no_such_vae_folder"):
        load_vae(str(tmp_path / "no_such_vae_folder"))


def test_offline_hub_id_asks_for_a_local_folder():
    with pytest.raises(OSError, match="pass a local folder") as err:
        load_vae("uvic-tests/no-such-vae", local_files_only=True)
    assert "--vae" in str(err.value)


def test_attach_vae_decodes_latents_and_travels_with_the_pipeline(latents, tmp_path):
    ds = LatentDataset(latents, scale_factor=0.25)
    model = UViT(sample_size=8, in_channels=4, patch_size=2, embed_dim=32, depth=2, num_heads=2,
                 num_classes=ds.num_classes + 1)
    pipe = attach_vae(UViCPipeline(model, DDPMScheduler(num_train_timesteps=50)), ds)
    assert pipe.vae.config.scaling_factor == 0.25  # the factor the model was trained with
    images = pipe(batch_size=2, num_inference_steps=2, guidance_scale=1.4, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, RES, RES)
    pipe.save_pretrained(tmp_path / "final")
    loaded = UViCPipeline.from_pretrained(tmp_path / "final")
    assert loaded.vae is not None and loaded.vae.config.scaling_factor == 0.25
    again = loaded(batch_size=2, num_inference_steps=2, guidance_scale=1.4, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(again, images)
    assert attach_vae(UViCPipeline(model, DDPMScheduler()), latents).vae.config.scaling_factor == 0.18215  # meta.json's
    assert LatentDataset(latents, scale_factor=None).scale_factor == 0.18215


# ---------------------------------------------------------------------- ImageNet presets and configs
def expected_parameters(D, depth, p, C, S, K, conv):
    """U-ViT parameter count from the architecture: blocks of 12 D^2 + 10 D (LayerNorms, qkv without
    bias, proj, 4x MLP), long-skip Linear(2D, D) in the depth/2 out-blocks, patch/label/position
    embeddings, final LayerNorm, patch decoder and optional 3x3 conv."""
    n = (S // p) ** 2
    return ((C * p * p * D + D) + K * D + (2 + n) * D + (depth + 1) * (12 * D * D + 10 * D)
            + depth // 2 * (2 * D * D + D) + 2 * D + (D * p * p * C + p * p * C) + (9 * C * C + C if conv else 0))


@pytest.mark.parametrize("preset, size, conv, published_m", [
    ("uvit-l/2", 32, True, 287), ("uvit-h/2", 32, False, 501), ("uvit-l/4", 64, True, 287), ("uvit-h/4", 64, False, 501),
])
def test_imagenet_presets_have_the_expected_parameter_counts(preset, size, conv, published_m):
    with torch.device("meta"):
        model = UViT.from_preset(preset, sample_size=size, in_channels=4, num_classes=1001, use_final_conv=conv)
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    assert n == expected_parameters(cfg.embed_dim, cfg.depth, cfg.patch_size, 4, size, 1001, conv)
    assert round(n / 1e6) == published_m  # U-ViT paper, Table 1 / Table 5


def test_uvit_h2_trains_one_step_at_batch_1_with_gradient_checkpointing():
    # H/2's width, heads, patch and input at depth 2 (the full 28 blocks add nothing to what is checked:
    # 501M parameters took 58 s and 5.4 GB on a CPU); the parameter count of depth 28 is checked above.
    with torch.device("meta"):
        model = UViT.from_preset("uvit-h/2", sample_size=32, in_channels=4, num_classes=1001, use_final_conv=False,
                                 depth=2)
    assert (model.config.embed_dim, model.config.num_heads, model.config.patch_size) == (1152, 16, 2)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.03, 0.03)  # std ~0.017, like U-ViT's trunc_normal_(std=0.02)
    model.enable_gradient_checkpointing()
    x = torch.randn(1, 4, 32, 32)
    out = model(x, torch.tensor([500]), class_labels=torch.tensor([1000])).sample  # null label
    assert out.shape == x.shape
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and all(torch.isfinite(g).all() for g in grads[:5])


def test_fsdp_config_for_the_h_models_launches_8_bf16_processes_that_uvic_shards_itself():
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(REPO / "configs/accelerate/fsdp_h.yaml"), "train.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert args.num_processes == 8 and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert env.get("ACCELERATE_USE_FSDP", "false") == "false"  # train.fsdp=true shards (uvic.fsdp.shard), not accelerate


# ---------------------------------------------------------------------- the whole path, tiny
@pytest.fixture()
def random_inception(tmp_path):
    """torch-fidelity's FeatureExtractorInceptionV3 structure with random weights, saved as a state dict."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    torch.save({}, tmp_path / "empty.pth")
    torch.manual_seed(0)
    net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(tmp_path / "empty.pth"))
    torch.save(net.state_dict(), tmp_path / "random-inception.pth")
    return tmp_path / "random-inception.pth"


def test_extract_train_sample_with_guidance_decode_and_score(latents, image_folder, random_inception, tmp_path, monkeypatch):
    from uvic import evaluate, loading, sampling, train_cli

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # nothing is found or fetched there
    monkeypatch.setenv("UVIC_CACHE_DIR", str(tmp_path / "cache"))
    config = tmp_path / "tiny_latent_uvic.yaml"
    config.write_text(f"""
model: {{sample_size: 8, in_channels: 4, patch_size: 2, embed_dim: 32, depth: 2, num_heads: 2, attention_type: cog}}
diffusion: {{beta_schedule: scaled_linear, beta_start: 0.00085, beta_end: 0.012, clip_sample: false, p_uncond: 0.1}}
data: {{name: latents, path: "{latents}", conditional: true, scale_factor: 0.18215}}
train: {{steps: 3, batch_size: 4, warmup_steps: 1, log_every: 1, sample_every: 0, checkpoint_every: 0,
        sample_steps: 2, sample_guidance: 1.4}}
""")
    run = tmp_path / "run"
    final = train_cli.main(["--config", str(config), "--output-dir", str(run), "--cpu"])
    assert (final / "vae" / "config.json").exists(), "latent runs keep their VAE in final/ (uvic.latents.attach_vae)"
    pipe = loading.load_pipeline(run)
    assert pipe.transformer.config.num_classes == 4 and pipe.vae.config.scaling_factor == 0.18215

    samples = sampling.main([str(run), "--num-samples", "6", "--out", str(tmp_path / "samples"), "--steps", "2",
                             "--guidance", "1.4", "--batch-size", "6", "--device", "cpu", "--no-progress"])
    with np.load(samples) as npz:
        images, labels = npz["arr_0"], npz["labels"]
    assert images.shape == (6, RES, RES, 3) and images.dtype == np.uint8  # decoded pixels, not latents
    assert set(labels.tolist()) <= {0, 1, 2}

    crops = export_crops(image_folder, tmp_path / "ref", resolution=RES, limit=6, num_workers=0, progress=False)
    common = ["--inception-weights", str(random_inception), "--offline", "--batch-size", "12", "--device", "cpu",
              "--csv", ""]
    evaluate.main([str(crops), "--save-stats", str(tmp_path / "ref_stats.npz"), *common])
    result = evaluate.main([str(samples), "--ref", str(tmp_path / "ref_stats.npz"), *common])
    assert np.isfinite(result["fid"]) and result["fid"] > 0
