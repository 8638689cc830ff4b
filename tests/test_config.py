"""Config schema: defaults, YAML + overrides, unknown keys, resolved model fields, shipped configs."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from uvic.config import config_diff, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_the_u_vit_cifar10_recipe():
    cfg = load_config(None)
    t = cfg.train
    assert (t.lr, t.weight_decay, list(t.betas), t.warmup_steps, t.batch_size, t.steps, t.ema_decay) == (
        2e-4, 0.03, [0.99, 0.999], 2500, 128, 500_000, 0.9999)
    d = cfg.diffusion
    assert (d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end, d.prediction_type) == (
        1000, "linear", 1e-4, 0.02, "epsilon")
    assert d.p_uncond == 0.1 and cfg.eval.fid_every == 0
    assert set(cfg) == {"model", "diffusion", "data", "train", "eval"}


def test_overrides_win_over_the_file_and_the_model_is_resolved(tmp_path):
    path = write(tmp_path, "model:\n  preset: uvit-s/4\n  sample_size: 32\ntrain:\n  lr: 0.001\n")
    cfg = load_config(path, ["train.lr=1e-4", "model.attention_type=cog", "model.depth=16"])
    assert cfg.train.lr == 1e-4
    m = cfg.model
    assert (m.embed_dim, m.num_heads, m.patch_size, m.depth, m.attention_type) == (512, 8, 4, 16, "cog")
    assert m.qkv_bias is False and m.use_final_conv is True and m.num_classes == -1  # UViT's defaults


@pytest.mark.parametrize(
    "source, key, level",
    [("file", "train.lrr", "'train'"), ("override", "model.atention_type", "'model'"), ("override", "trian.lr", "the top level")],
)
def test_unknown_key_fails_naming_it_and_the_valid_keys(tmp_path, source, key, level):
    section, name = key.split(".")
    if source == "file":
        path, overrides = write(tmp_path, f"{section}:\n  {name}: 1\n"), []
    else:
        path, overrides = None, [f"{key}=1"]
    with pytest.raises(ValueError) as err:
        load_config(path, overrides)
    message = str(err.value)
    bad = key if section in ("train", "model") else section
    assert repr(bad) in message and f"valid keys at {level}" in message
    valid = "lr, weight_decay" if section == "train" else "attention_type" if section == "model" else "model, diffusion"
    assert valid.split(",")[0] in message


def test_a_wrong_type_fails_with_the_key():
    with pytest.raises(ValueError, match="train.steps"):
        load_config(None, ["train.steps=abc"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.sample_scheduler=dpm++9", "train.sample_scheduler"),
        ("eval.fid_scheduler=nope", "eval.fid_scheduler"),
        ("diffusion.prediction_type=noise", "diffusion.prediction_type"),
        ("diffusion.beta_schedule=quadratic", "diffusion.beta_schedule"),
        ("data.name=mnist", "data.name"),
        ("train.mixed_precision=fp8", "train.mixed_precision"),
    ],
)
def test_unknown_choice_fails_naming_the_key_and_the_choices(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + ".*choose one of"):
        load_config(None, [override])


def test_image_size_not_divisible_by_patch_size_fails():
    with pytest.raises(ValueError, match="sample_size=30 is not divisible by model.patch_size=4"):
        load_config(None, ["model.sample_size=30", "model.patch_size=4"])


def test_softmax_blocks_takes_a_preset_name_or_indices_and_rejects_typos():
    cfg = load_config(CONFIGS / "digits_uvic.yaml", ["model.softmax_blocks=second-half"])
    assert cfg.model.softmax_blocks == "second-half"
    assert list(load_config(None, ["model.depth=4", "model.softmax_blocks=[1,3]"]).model.softmax_blocks) == [1, 3]
    with pytest.raises(ValueError, match=r"model\.softmax_blocks 'second_half' is not a preset"):
        load_config(None, ["model.softmax_blocks=second_half"])
    with pytest.raises(ValueError, match=r"model\.softmax_blocks \[7\] out of range"):
        load_config(None, ["model.depth=4", "model.softmax_blocks=[7]"])


def test_shipped_configs_load_and_twins_differ_only_in_attention_type():
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert {"digits_uvic", "digits_uvit", "digits_cond_uvic", "cifar10_uvit_s2", "cifar10_uvic_s2"} <= names
    for uvic in sorted(CONFIGS.glob("digits_*uvic*.yaml")) + sorted(CONFIGS.glob("cifar10_*uvic*.yaml")):
        uvit = uvic.with_name(uvic.name.replace("_uvic", "_uvit"))
        if not uvit.exists():
            continue
        a, b = load_config(uvic), load_config(uvit)
        assert config_diff(a, b) == ["model.attention_type"], uvic.name
        assert (a.model.attention_type, b.model.attention_type) == ("cog", "softmax")


def test_cifar10_s2_config_is_the_paper_recipe():
    cfg = load_config(CONFIGS / "cifar10_uvit_s2.yaml")
    m, t = cfg.model, cfg.train
    assert (m.sample_size, m.patch_size, m.embed_dim, m.depth, m.num_heads) == (32, 2, 512, 12, 8)
    assert (m.qkv_bias, m.mlp_time_embed, m.use_final_conv) == (False, False, True)
    assert (t.lr, t.weight_decay, list(t.betas), t.warmup_steps, t.batch_size, t.steps, t.ema_decay) == (
        2e-4, 0.03, [0.99, 0.999], 2500, 128, 500_000, 0.9999)
    assert cfg.data.name == "cifar10" and cfg.data.random_flip is True


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "digits_uvic.yaml", ["train.steps=7"])
    OmegaConf.save(cfg, tmp_path / "config.yaml")
    assert config_diff(load_config(tmp_path / "config.yaml"), cfg) == []


# ---------------------------------------------------------------------- ImageNet configs
IMAGENET_CONFIGS = ["imagenet256_uvit_l2", "imagenet256_uvit_h2", "imagenet512_uvit_l4", "imagenet512_uvit_h4"]


@pytest.mark.parametrize("name", IMAGENET_CONFIGS)
def test_imagenet_configs_are_twins_with_the_paper_recipe(name):
    uvit = load_config(CONFIGS / f"{name}.yaml")
    uvic = load_config(CONFIGS / f"{name.replace('uvit', 'uvic')}.yaml")
    assert (uvit.model.attention_type, uvic.model.attention_type) == ("softmax", "cog")
    uvic.model.attention_type = "softmax"
    assert OmegaConf.to_container(uvit) == OmegaConf.to_container(uvic)  # twins differ only there
    large = "_l" in name
    m, d, t = uvit.model, uvit.diffusion, uvit.train
    assert (m.embed_dim, m.depth, m.num_heads) == ((1024, 20, 16) if large else (1152, 28, 16))
    assert (m.sample_size, m.patch_size) == ((32, 2) if "256" in name else (64, 4))
    assert (m.in_channels, m.num_classes, m.use_final_conv, m.gradient_checkpointing) == (4, 1001, large, True)
    if large:  # train_ldm.py: the continuous-time VP-SDE, model time 999·t
        assert (d.schedule, d.beta_min, d.beta_max) == ("vp_continuous", 0.1, 20.0)
    else:  # train_ldm_discrete.py: Stable Diffusion's betas, the model sees n = 1..N
        assert (d.schedule, d.beta_schedule, d.beta_start, d.beta_end, d.num_train_timesteps, d.timestep_offset) == (
            "discrete", "scaled_linear", 0.00085, 0.012, 1000, 1)
    assert d.prediction_type == "epsilon" and d.clip_sample is False
    assert d.p_uncond == (0.15 if large else 0.1)  # baofff/U-ViT configs: L 0.15, H 0.1
    assert (t.batch_size, t.lr, t.weight_decay, list(t.betas), t.warmup_steps) == (1024, 2e-4, 0.03, [0.99, 0.99], 5000)
    assert t.steps == (300_000 if large and "256" in name else 500_000)
    paper_sampler = "dpm-solver-fast" if large else "dpm-solver++-fast"  # eval_ldm.py / eval_ldm_discrete.py
    assert (t.mixed_precision, t.ema_decay, t.ema_warmup, t.sample_scheduler, t.sample_steps) == (
        "bf16", 0.9999, False, paper_sampler, 50)
    assert (uvit.eval.fid_scheduler, uvit.eval.fid_steps) == (paper_sampler, 50)
    assert t.sample_guidance == (1.4 if "256" in name else 1.7)  # U-ViT's scale 0.4 (256) and 0.7 (512)
    assert uvit.data.name == "latents" and uvit.data.conditional and uvit.data.scale_factor == 0.18215


def test_data_derived_values_are_filled_in_when_the_config_is_resolved():
    from uvic.data import resolve_data_config

    cfg = load_config(CONFIGS / "digits_uvic.yaml", ["data.conditional=true", "data.limit=32"])
    resolved, dataset = resolve_data_config(cfg)
    assert resolved.model.num_classes == 11 and dataset.num_classes == 10  # 10 digits + the null label
    assert cfg.model.num_classes == -1  # the given config is left as it was
    with pytest.raises(ValueError, match="model.num_classes=5 but the data has 10 classes"):
        resolve_data_config(load_config(CONFIGS / "digits_uvic.yaml", ["data.conditional=true", "model.num_classes=5"]))


def test_a_string_setting_keeps_the_word_typed_where_yaml_reads_a_boolean(tmp_path):
    # YAML 1.1 reads an unquoted no / off / yes as a boolean; accelerate's spelling of "no mixed precision" is "no"
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(None, ["data.path=off"]).data.path == "off"
    assert load_config(None, ["data.download=yes"]).data.download is True  # a boolean field stays a boolean
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  mixed_precision: no\n")
    assert load_config(str(config)).train.mixed_precision == "no"


def test_a_saved_config_stays_readable_after_the_files_it_names_moved(tmp_path):
    # reports and analysis read old runs' config.yaml; train.py checks init_from / fid_ref where a run starts
    cfg = load_config(None, [f"train.init_from={tmp_path / 'gone.pth'}", "eval.fid_every=10",
                             f"eval.fid_ref={tmp_path / 'gone.npz'}"])
    assert cfg.train.init_from == str(tmp_path / "gone.pth")
