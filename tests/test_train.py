"""Trainer: the run folder, exact resume, half-written checkpoints, and each bad input failing before training."""

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from omegaconf import OmegaConf
from safetensors.torch import load_file

from uvic.config import load_config, save_config
from uvic.pipeline import UViCPipeline
from uvic.checkpoint import write_manifest
from uvic.runs import RunDir
from uvic.train_cli import main
from uvic.trainer import Trainer

# A model and run small enough for seconds on a CPU: 8x8 digits, embed 32, depth 2.
TINY = [
    "model.sample_size=8", "model.in_channels=1", "model.patch_size=2", "model.embed_dim=32", "model.depth=2",
    "model.num_heads=2", "data.name=digits", "data.limit=64", "train.batch_size=16", "train.steps=4",
    "train.warmup_steps=2", "train.lr=1e-3", "train.log_every=2", "train.sample_every=0", "train.sample_num=4",
    "train.sample_steps=2", "train.sample_scheduler=ddim", "train.checkpoint_every=0", "train.ema_decay=0.9",
]


def tiny(*overrides):
    return load_config(None, TINY + list(overrides))


def weights(folder) -> dict:
    return load_file(str(Path(folder) / "diffusion_pytorch_model.safetensors"))


def test_run_writes_the_contract_layout_and_a_loadable_final_pipeline(tmp_path):
    out = tmp_path / "run"
    cfg = tiny("train.checkpoint_every=2", "train.keep_checkpoints=1", "train.sample_every=2",
               "data.conditional=true", "train.sample_guidance=1.5")
    final = Trainer(cfg, out).train()
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.model.num_classes == 11  # 10 digits + the null label, derived from the data
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000004"]  # keep_checkpoints=1
    ckpt = out / "checkpoints" / "step_0000004"
    for sub in ("model", "ema_model", "scheduler"):
        assert (ckpt / sub).is_dir()
    assert not torch.equal(weights(ckpt / "model")["pos_embed"], weights(ckpt / "ema_model")["pos_embed"])
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    with Image.open(out / "samples" / "step_0000004.png") as grid:  # 8 px digits drawn 8x: 64 px cells, 1 px gaps
        assert grid.size == (8 * 65 + 1, 10 * 65 + 1)  # 8 columns, a row per class
    assert any((out / "logs").iterdir())
    pipe = UViCPipeline.from_pretrained(final)
    assert pipe.transformer.config.num_classes == 11 and pipe.scheduler.config.prediction_type == "epsilon"
    for name, tensor in weights(final / "transformer").items():  # final/ holds the EMA weights
        assert torch.equal(tensor, weights(ckpt / "ema_model")[name])
    images = pipe(batch_size=2, num_inference_steps=2, class_labels=[3, 7], output_type="pt").images
    assert images.shape == (2, 1, 8, 8)


def test_a_checkpoint_stores_each_weight_tensor_once(tmp_path):
    """The weights and the EMA weights, one copy each (accelerate's model.safetensors repeated model/: ~2 GB more
    per U-ViT-H/2 checkpoint); the raw weights load as a pipeline from model/."""
    from uvic.loading import checkpoint_pipeline

    trainer = Trainer(tiny("train.steps=2", "train.checkpoint_every=2"), tmp_path / "run")
    trainer.train()
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000002"
    stored = [t for f in ckpt.rglob("*.safetensors") for t in load_file(str(f)).values()]
    params = list(trainer.raw_model.parameters())
    assert sum(t.numel() * t.element_size() for t in stored) == 2 * sum(p.numel() * p.element_size() for p in params)
    raw = checkpoint_pipeline(ckpt, ema=False).transformer
    assert all(torch.equal(a, b.detach().cpu()) for a, b in zip(raw.parameters(), params))


def test_an_off_schedule_checkpoint_never_pushes_a_scheduled_one_out(tmp_path):
    """A run stopped at step 3 (SIGTERM's checkpoint, or train.steps raised afterwards) then continued: with
    keep_checkpoints=3 every scheduled checkpoint (2, 4, 6: a learning curve) is still there at the end, the
    off-schedule 3 gone once a newer one exists. Rotation by age alone kept 3, 4, 6 and lost step 2."""
    every = ["train.checkpoint_every=2", "train.keep_checkpoints=3"]
    Trainer(tiny("train.steps=3", *every), tmp_path / "run").train()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_0000002", "step_0000003"]
    Trainer(tiny("train.steps=6", *every), tmp_path / "run", resume="latest").train()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step_0000002", "step_0000004", "step_0000006"]


class CrashAfter(Trainer):
    """A run killed after a given step (the checkpoint before it is complete, the steps after it lost)."""

    crash_at = 4

    def on_step_end(self, step):
        if step == self.crash_at:
            raise KeyboardInterrupt("simulated kill")


def test_resume_matches_uninterrupted_run(tmp_path):
    # mid-epoch resume (4 optimizer steps = 8 micro-batches per epoch), flips and label dropout use the RNG
    overrides = ["train.steps=6", "train.checkpoint_every=3", "train.grad_accum=2", "data.random_flip=true",
                 "data.conditional=true", "diffusion.p_uncond=0.3", "train.lr_schedule=cosine"]
    Trainer(tiny(*overrides), tmp_path / "a").train()
    with pytest.raises(KeyboardInterrupt):
        CrashAfter(tiny(*overrides), tmp_path / "b").train()
    assert RunDir(tmp_path / "b").latest().name == "step_0000003"
    resumed = Trainer(tiny(*overrides), tmp_path / "b", resume="latest")
    assert resumed.step == 3
    resumed.train()
    for sub in ("model", "ema_model"):
        a = weights(tmp_path / "a" / "checkpoints" / "step_0000006" / sub)
        b = weights(tmp_path / "b" / "checkpoints" / "step_0000006" / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    trained = weights(tmp_path / "a" / "checkpoints" / "step_0000003" / "model")
    assert not torch.equal(trained["pos_embed"], a["pos_embed"])  # the resumed steps did change the weights


def test_train_seed_sets_every_random_source(tmp_path):
    # flips, label dropout, noise, timesteps, init and data order all draw from the seeded sources
    overrides = ["train.steps=3", "data.random_flip=true", "data.conditional=true", "diffusion.p_uncond=0.3"]
    draws = {}
    for name, seed, outside in [("a", 5, 1), ("b", 5, 2), ("c", 6, 1)]:
        random.seed(outside), np.random.seed(outside), torch.manual_seed(outside)  # what ran before differs
        trainer = Trainer(tiny(*overrides, f"train.seed={seed}"), tmp_path / name)
        draws[name] = (random.random(), float(np.random.rand()), float(torch.rand(())),
                       [int(i) for i in itertools.islice(iter(trainer.sampler), 8)])
        trainer.train()
    assert draws["a"] == draws["b"]  # python random, numpy, torch and the data order: set by train.seed alone
    assert all(x != y for x, y in zip(draws["a"], draws["c"]))
    a, b, c = (weights(tmp_path / n / "final" / "transformer") for n in "abc")  # EMA weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same seed: identical weights
    assert not torch.equal(a["pos_embed"], c["pos_embed"])  # another seed: other weights


def test_rerunning_the_same_config_continues_instead_of_starting_over(tmp_path):
    overrides = ["train.steps=6", "train.checkpoint_every=2"]
    with pytest.raises(KeyboardInterrupt):
        CrashAfter(tiny(*overrides), tmp_path / "run").train()
    again = Trainer(tiny(*overrides), tmp_path / "run")  # the same command, no --resume
    assert again.step == 4 and RunDir(tmp_path / "run").latest().name == "step_0000004"


def test_a_run_that_never_checkpointed_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        CrashAfter(tiny("train.steps=6"), out).train()  # no checkpoint yet, but logs/ written
    assert any((out / "logs").iterdir()) and not (out / "checkpoints").exists()
    with pytest.raises(ValueError, match=r"holds logs but no complete checkpoint.*--overwrite"):
        NoTraining(tiny("train.steps=6"), out).train()
    assert any((out / "logs").iterdir())  # nothing deleted
    fresh = Trainer(tiny("train.steps=6", "train.lr=5e-4"), out, overwrite=True)  # any config: a new run
    assert fresh.step == 0 and not (out / "logs").exists()
    assert OmegaConf.load(out / "config.yaml").train.lr == 5e-4


def test_latest_ignores_a_half_written_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_0000003").mkdir(parents=True)
    write_manifest(root / "step_0000003")  # complete: its manifest is written last
    (root / ".step_0000009.tmp").mkdir()  # a save that crashed before its rename
    (root / "step_0000012-broken").mkdir()
    assert RunDir(tmp_path).latest().name == "step_0000003"
    assert RunDir(tmp_path / "elsewhere").latest() is None


def test_command_line_overrides_and_default_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.yaml"
    OmegaConf.save(OmegaConf.from_dotlist(TINY), config)
    final = main(["--config", str(config), "train.steps=2", "model.attention_type=softmax"])
    assert final.resolve() == (tmp_path / "runs" / "tiny" / "final").resolve()
    saved = OmegaConf.load(tmp_path / "runs" / "tiny" / "config.yaml")
    assert saved.train.steps == 2 and saved.model.attention_type == "softmax"


# ---------------------------------------------------------------------- bad input: one clear error, before training
class NoTraining(Trainer):
    def train(self):  # pragma: no cover - reaching it means a check did not fire
        raise AssertionError("training started")


def test_missing_dataset_path_fails_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path .*nowhere"):
        NoTraining(tiny("data.name=imagefolder", f"data.path={tmp_path / 'nowhere'}"), tmp_path / "run").train()
    assert not (tmp_path / "run").exists()


def test_image_size_not_divisible_by_patch_size_fails_before_training():
    with pytest.raises(ValueError, match="model.sample_size=10 is not divisible by model.patch_size=4"):
        tiny("model.sample_size=10", "model.patch_size=4")


def test_class_conditional_config_on_unlabelled_data_fails_before_training(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
    cfg = tiny("data.name=imagefolder", f"data.path={folder}", "data.conditional=true", "model.in_channels=3",
               "train.batch_size=2", "data.limit=null")
    with pytest.raises(ValueError, match="data.conditional=true needs labelled data.*images"):
        NoTraining(cfg, tmp_path / "run").train()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, key", [("train.sample_scheduler=fancy", "train.sample_scheduler"),
                                           ("diffusion.prediction_type=noise", "diffusion.prediction_type")])
def test_unknown_scheduler_or_prediction_type_fails_before_training(override, key):
    with pytest.raises(ValueError, match=rf"{key}=.* is not valid; choose one of"):
        main(["--config", str(Path(__file__).resolve().parents[1] / "configs" / "digits_uvic.yaml"), override])


def test_output_dir_of_another_config_fails_without_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    save_config(tiny("train.lr=5e-4"), out / "config.yaml")
    with pytest.raises(ValueError, match=r"holds a run of another config \(differs in train.lr\).*--resume latest"):
        NoTraining(tiny(), out).train()


def test_global_batch_not_divisible_by_grad_accum_fails(tmp_path):
    with pytest.raises(ValueError, match=r"train.batch_size=15 .* divisible by processes \(1\) x train.grad_accum \(2\)"):
        NoTraining(tiny("train.batch_size=15", "train.grad_accum=2"), tmp_path / "run").train()


def test_resume_from_a_missing_path_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="--resume .*nope"):
        NoTraining(tiny(), tmp_path / "run", resume=str(tmp_path / "nope")).train()


def test_fid_during_training_follows_the_recipe_and_is_logged_with_its_protocol_to_metrics_csv(tmp_path, monkeypatch):
    monkeypatch.setenv("UVIC_CACHE_DIR", str(tmp_path / "cache"))  # the digits feature CNN trains here once
    # no eval.fid_scheduler / fid_steps / fid_guidance: the recipe's sampler (TINY: ddim, 2 steps) and guidance
    cfg = tiny("eval.fid_every=2", "eval.fid_ref=digits", "eval.fid_num_samples=64", "train.steps=2",
               "data.conditional=true", "train.sample_guidance=1.5")
    assert (cfg.eval.fid_scheduler, cfg.eval.fid_steps, cfg.eval.fid_guidance) == ("ddim", 2, 1.5)
    out = tmp_path / "run"
    trainer = Trainer(cfg, out)
    (out / "metrics.csv").write_text("step,metric,value,scheduler,steps,guidance\n1,fid,9.5,,,\n")  # kept: appended to
    trainer.train()
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,metric,value,scheduler,steps,guidance" and rows[1] == "1,fid,9.5,,," and len(rows) == 3
    step, metric, value, scheduler, steps, guidance = rows[2].split(",")
    assert (step, metric, scheduler, steps, guidance) == ("2", "fid", "ddim", "2", "1.5") and float(value) > 0
    explicit = tiny("eval.fid_scheduler=euler", "eval.fid_steps=3", "data.conditional=true", "eval.fid_guidance=1.2")
    assert (explicit.eval.fid_scheduler, explicit.eval.fid_steps, explicit.eval.fid_guidance) == ("euler", 3, 1.2)
    with pytest.raises(ValueError, match="eval.fid_guidance != 1 needs a conditional run"):
        tiny("eval.fid_guidance=2")


def test_latent_data_trains_and_grids_and_final_decode_through_the_vae(tmp_path):
    import numpy as np
    from diffusers import AutoencoderKL
    from PIL import Image

    from uvic.latents import extract_latents

    torch.manual_seed(0)
    vae = AutoencoderKL(  # a tiny random-weight VAE: 16x16 RGB <-> 4x8x8 latents
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), sample_size=16, scaling_factor=0.18215,
    )
    vae.save_pretrained(tmp_path / "vae")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "images" / c / f"{i}.png")
    latents = extract_latents(tmp_path / "images", tmp_path / "latents", vae=tmp_path / "vae", resolution=16,
                              batch_size=4, shard_size=8, num_workers=0, progress=False)
    cfg = tiny("data.name=latents", f"data.path={latents}", "data.conditional=true", "data.limit=null",
               "model.in_channels=4", "diffusion.clip_sample=false", "train.batch_size=4", "train.steps=2")
    final = Trainer(cfg, tmp_path / "run").train()
    pipe = UViCPipeline.from_pretrained(final)
    assert pipe.vae is not None and pipe.transformer.config.num_classes == 3
    assert pipe(batch_size=2, num_inference_steps=2, output_type="pt").images.shape == (2, 3, 16, 16)
    grid = Image.open(tmp_path / "run" / "samples" / "step_0000002.png")
    assert grid.mode == "RGB" and grid.size[1] == 2 * 65 + 1  # 2 class rows of decoded 16x16 images, drawn 4x


def test_fsdp_on_one_process_trains_unsharded_and_says_so(tmp_path, capsys):
    # the H configs set train.fsdp: true; on one GPU (or this CPU) there is nothing to shard
    Trainer(tiny("train.fsdp=true", "train.checkpoint_every=4"), tmp_path / "run").train()
    said = capsys.readouterr().out
    assert "parallelism: none over 1 process" in said and "train.fsdp=true ignored: one process" in said, said
    step = tmp_path / "run" / "checkpoints" / "step_0000004"
    assert step.is_dir() and not list(step.glob("optimizer_shard_*"))


# ---------------------------------------------------------------------- fine-tuning (train.init_from)
def official_tiny_state(num_classes=-1, seed=0) -> dict:
    """libs/uvit.py's state-dict layout (names and shapes read off its __init__: timm Mlp fc1/fc2, skip_linear in
    the out blocks, final_layer conv) for the TINY architecture, random weights: a published-layout checkpoint."""
    g, d, c, p, hidden = torch.Generator().manual_seed(seed), 32, 1, 2, 128
    shapes = {"patch_embed.proj.weight": (d, c, p, p), "patch_embed.proj.bias": (d,),
              "pos_embed": (1, 1 + (num_classes > 0) + 16, d)}
    if num_classes > 0:
        shapes["label_emb.weight"] = (num_classes, d)
    for prefix, skip in (("in_blocks.0", False), ("mid_block", False), ("out_blocks.0", True)):
        for name, shape in (("norm1.weight", (d,)), ("norm1.bias", (d,)), ("attn.qkv.weight", (3 * d, d)),
                            ("attn.proj.weight", (d, d)), ("attn.proj.bias", (d,)), ("norm2.weight", (d,)),
                            ("norm2.bias", (d,)), ("mlp.fc1.weight", (hidden, d)), ("mlp.fc1.bias", (hidden,)),
                            ("mlp.fc2.weight", (d, hidden)), ("mlp.fc2.bias", (d,))):
            shapes[f"{prefix}.{name}"] = shape
        if skip:
            shapes.update({f"{prefix}.skip_linear.weight": (d, 2 * d), f"{prefix}.skip_linear.bias": (d,)})
    shapes.update({"norm.weight": (d,), "norm.bias": (d,), "decoder_pred.weight": (p * p * c, d),
                   "decoder_pred.bias": (p * p * c,), "final_layer.weight": (c, c, 3, 3), "final_layer.bias": (c,)})
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}


def test_fine_tuning_starts_model_and_ema_from_a_saved_run_and_a_published_checkpoint(tmp_path):
    final = Trainer(tiny("train.steps=2"), tmp_path / "base").train()
    source = weights(final / "transformer")
    tuned = Trainer(tiny(f"train.init_from={final}"), tmp_path / "tuned")
    assert all(torch.equal(v.cpu(), source[k]) for k, v in tuned.raw_model.state_dict().items())
    assert all(torch.equal(s.cpu(), p.detach().cpu()) for s, p in zip(tuned.ema.shadow_params, tuned.raw_model.parameters()))
    assert torch.equal(tuned.ema_model.state_dict()["pos_embed"].cpu(), source["pos_embed"])
    tuned.train()  # and it trains on from there

    published = official_tiny_state()
    torch.save(published, tmp_path / "cifar10_uvit_small.pth")  # recognised by the name; a tiny one of that layout
    run = Trainer(tiny(f"train.init_from={tmp_path / 'cifar10_uvit_small.pth'}"), tmp_path / "from_pth")
    assert all(torch.equal(v.cpu(), published[k]) for k, v in run.raw_model.state_dict().items())
    assert all(torch.equal(s.cpu(), published[k]) for s, (k, _) in zip(run.ema.shadow_params, run.raw_model.named_parameters()))
    run.train()


def test_fine_tuning_to_another_class_count_lists_the_differing_tensors_or_resets_the_label_table(tmp_path):
    imagenet_like = official_tiny_state(num_classes=1001)  # 1000 classes + the null label
    torch.save(imagenet_like, tmp_path / "imagenet256_uvit_large.pth")
    init = f"train.init_from={tmp_path / 'imagenet256_uvit_large.pth'}"
    with pytest.raises(ValueError, match=r"does not fit the configured model \(shapes differ: label_emb.weight "
                                         r"\(1001, 32\) there, \(11, 32\) here\).*init_reset=\[label_emb\]"):
        Trainer(tiny(init, "data.conditional=true"), tmp_path / "bad")
    run = Trainer(tiny(init, "data.conditional=true", "train.init_reset=[label_emb]"), tmp_path / "digits")
    state = run.raw_model.state_dict()
    assert state["label_emb.weight"].shape == (11, 32) and not torch.equal(state["label_emb.weight"], imagenet_like["label_emb.weight"][:11])
    assert all(torch.equal(v.cpu(), imagenet_like[k]) for k, v in state.items() if not k.startswith("label_emb."))
    run.train()


def test_a_bad_init_from_fails_where_the_run_starts(tmp_path, capsys):
    from uvic.launch import check_inputs

    with pytest.raises(FileNotFoundError, match="train.init_from=.*missing does not exist"):
        check_inputs(tiny(f"train.init_from={tmp_path / 'missing'}"))
    (tmp_path / "nnet_ema.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"train.init_from: nnet_ema.pth is not the name of a published U-ViT "
                                         r"checkpoint \(cifar10_uvit_small.pth, "):
        check_inputs(tiny(f"train.init_from={tmp_path / 'nnet_ema.pth'}"))
    with pytest.raises(ValueError, match="no model weights there"):
        check_inputs(tiny(f"train.init_from={tmp_path}"))
    with pytest.raises(ValueError, match=r"train.init_reset: unknown part\(s\) \['labels'\]; choose from label_emb, head"):
        check_inputs(tiny(f"train.init_from={tmp_path / 'nnet_ema.pth'}", "train.init_reset=[labels]"))
    from uvic.train_cli import train as train_py

    with pytest.raises(SystemExit) as exit_:  # train.py: one line, before any run folder exists
        train_py([f"--output-dir={tmp_path / 'run'}", *TINY, f"train.init_from={tmp_path / 'missing'}"])
    assert exit_.value.code == 2 and not (tmp_path / "run").exists()
    assert f"train.py: error: train.init_from={tmp_path / 'missing'} does not exist" in capsys.readouterr().err


def test_a_run_saved_before_the_fine_tuning_and_fid_keys_existed_continues_with_the_same_command(tmp_path):
    overrides = ["train.steps=6", "train.checkpoint_every=3"]
    with pytest.raises(KeyboardInterrupt):
        CrashAfter(tiny(*overrides), tmp_path / "run").train()
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")  # as uvic wrote it before these keys
    for section, key in (("train", "init_from"), ("train", "init_reset"), ("eval", "fid_guidance")):
        del saved[section][key]
    save_config(saved, tmp_path / "run" / "config.yaml")
    again = Trainer(tiny(*overrides), tmp_path / "run")
    assert again.resume_from is not None and again.state.step == 3


def test_final_loads_through_diffusers_and_samples_with_the_configured_sampler(tmp_path, monkeypatch):
    """A diffusers user's route: DiffusionPipeline.from_pretrained(final, trust_remote_code=True), then pipe()."""
    import diffusers.utils.dynamic_modules_utils as dynamic
    from diffusers import DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # where diffusers copies pipeline.py
    final = Trainer(tiny("data.conditional=true", "train.sample_scheduler=dpm++2m", "train.sample_steps=3",
                         "train.checkpoint_every=4"), tmp_path / "run").train()
    with pytest.raises(ValueError, match="contains custom code"):
        DiffusionPipeline.from_pretrained(final)
    pipe = DiffusionPipeline.from_pretrained(final, trust_remote_code=True)
    assert type(pipe) is UViCPipeline and type(pipe.scheduler) is DPMSolverMultistepScheduler
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++" and pipe.scheduler.config.solver_order == 2
    pipe.set_progress_bar_config(disable=True)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    default = pipe(class_labels=[1, 2, 3], generator=gens(), output_type="pt").images  # batch from the labels
    # the same sampler built by hand from the training schedule (the checkpoint's scheduler/), 3 steps
    training = DDPMScheduler.from_pretrained(tmp_path / "run" / "checkpoints" / "step_0000004" / "scheduler")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(training.config, algorithm_type="dpmsolver++",
                                                             solver_order=2, timestep_spacing="trailing")
    by_hand = pipe(batch_size=3, num_inference_steps=3, class_labels=[1, 2, 3], generator=gens(), output_type="pt").images
    assert default.shape == (3, 1, 8, 8) and torch.allclose(default, by_hand, atol=1e-6)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state whose precision cannot change: start and leave it blank."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_the_launchers_mixed_precision_wins_over_the_config_in_one_line(tmp_path, monkeypatch, capsys,
                                                                         fresh_accelerate_state):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    trainer = Trainer(tiny(), tmp_path / "run")  # train.mixed_precision: "no" (the default)
    assert trainer.accelerator.mixed_precision == "bf16" and trainer.accelerator.native_amp  # accelerate autocasts
    said = capsys.readouterr().out
    overridden = [line for line in said.splitlines() if "overriding train.mixed_precision=no" in line]
    assert len(overridden) == 2 and overridden[0].startswith("mixed precision: bf16"), said  # the line + summary
    assert "bf16 on the CPU" in said and "slower than float32" in said
    assert "mixed precision: bf16 (ACCELERATE_MIXED_PRECISION=bf16" in (tmp_path / "run" / "run_summary.txt").read_text()


def test_accelerate_launchs_default_no_leaves_the_configs_precision(tmp_path, monkeypatch, fresh_accelerate_state):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # plain `accelerate launch train.py`
    trainer = Trainer(tiny("train.mixed_precision=bf16"), tmp_path / "run")
    assert trainer.accelerator.mixed_precision == "bf16"


@pytest.mark.parametrize("configured, launched", [("fp16", None), (None, "fp16")])
def test_fp16_on_the_cpu_is_refused_before_anything_is_written(tmp_path, monkeypatch, configured, launched,
                                                               fresh_accelerate_state):
    if launched:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
    with pytest.raises(ValueError, match="fp16 .* on the CPU: accelerate has no fp16 autocast.*use bf16 or no"):
        Trainer(tiny(*([f"train.mixed_precision={configured}"] if configured else [])), tmp_path / "run", cpu=True)
    assert not (tmp_path / "run").exists()


def test_the_startup_summary_is_printed_once_and_kept_in_the_run_folder(tmp_path, capsys):
    Trainer(tiny("train.grad_accum=2", "model.attention_type=cog"), tmp_path / "run").train()
    said = capsys.readouterr().out
    assert said.count("***** Running training *****") == 1
    summary = (tmp_path / "run" / "run_summary.txt").read_text()
    assert summary.splitlines()[0] == "***** Running training *****" and summary.strip() in said
    model = UViCPipeline.from_pretrained(tmp_path / "run" / "final").transformer
    for line in ("  device: cpu", "  parallelism: none over 1 process (NO, cpu)", "  mixed precision: no",
                 "  batch per device: 8 (micro-batch) x grad_accum 2",
                 "  global batch: 16 = 1 process x 2 x 8 (train.batch_size is the global batch)",
                 f"  parameters: {sum(p.numel() for p in model.parameters()):,}",
                 "  steps: 4 optimizer steps, from step 0 (a new run)",
                 "  attention: Cog in blocks [1] via lean (training) / chunked (grids, FID), softmax (SDPA) in [0, 2]"):
        assert line in summary, (line, summary)
    resumed = Trainer(tiny("train.grad_accum=2", "model.attention_type=cog", "train.steps=6"), tmp_path / "run",
                      resume="latest")
    assert f"from step 4 (resumed from {tmp_path / 'run' / 'checkpoints' / 'step_0000004'})" in "\n".join(resumed.summary)


def test_accelerate_launch_num_processes_2_without_multi_gpu_says_it_runs_one_process(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "train.py", "--output-dir", str(tmp_path / "run"),
           *TINY, "train.steps=1", "train.log_every=1"]
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "started ONE process" in line]
    assert len(lines) == 1 and "accelerate launch --multi_gpu --num_processes N" in lines[0], result.stdout
    assert "parallelism: none over 1 process" in (tmp_path / "run" / "run_summary.txt").read_text()


def test_an_installed_uvic_train_finds_the_shipped_configs_and_errors_in_one_line(tmp_path):
    """pip install of a wheel built from this tree: the console script is the one-error-style wrapper and the
    default configs come with the package (the checkout's configs/ is not there)."""
    import shutil
    import subprocess
    import sys
    import sysconfig

    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    for name in ("uvic", "configs"):
        shutil.copytree(repo / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    run = lambda *cmd, **kw: subprocess.run(cmd, capture_output=True, text=True, timeout=240, **kw)  # noqa: E731
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), ".",
                cwd=src)
    assert built.returncode == 0, built.stderr[-2000:]
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", "--without-pip", str(venv)).returncode == 0
    # the new environment sees this one's packages (torch, diffusers...) but not its editable uvic
    purelib = Path(sysconfig.get_paths()["purelib"])
    (next((venv / "lib").glob("python*")) / "site-packages" / "deps.pth").write_text(str(purelib) + "\n")
    wheel = next(tmp_path.glob("uvic-*.whl"))
    installed = run(sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", "-q",
                    str(wheel))
    assert installed.returncode == 0, installed.stderr[-2000:]
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    bad = run(str(venv / "bin" / "uvic-train"), "--config", "digits_uvix", cwd=elsewhere, env=env)
    assert bad.returncode == 2 and bad.stderr.count("error: no config 'digits_uvix'") == 1, bad.stderr[-2000:]
    assert "Traceback" not in bad.stderr and str(venv / "share" / "uvic" / "configs") in bad.stderr  # the copy
    # the default config (digits_uvic) from the installed copy: loaded and checked up to the missing data folder
    found = run(str(venv / "bin" / "uvic-train"), "data.name=imagefolder", "data.path=nowhere", cwd=elsewhere, env=env)
    assert found.returncode == 2 and "data.path" in found.stderr and "nowhere" in found.stderr, found.stderr[-2000:]
    assert "Traceback" not in found.stderr and "no config" not in found.stderr
