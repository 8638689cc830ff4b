"""Text-to-image UViT (libs/uvit_t2i.py layout): context tokens, official names, forward, presets."""

import math

import pytest
import torch
import torch.nn.functional as F

from uvic.model import UViT, config_from_reference, load_reference_checkpoint, preset_config

TINY_T2I = dict(sample_size=8, in_channels=4, patch_size=2, embed_dim=32, depth=4, num_heads=4,
                context_dim=12, num_context_tokens=5)


def official_t2i_forward(model, x, t, context, cog):
    """The official t2i forward restated with plain ops: tokens [time, context..., patches];
    with cog=True every block but in_blocks.0 and the last out-block uses sign(s) * softmax(|s|)."""
    w = dict(model.named_parameters())
    cfg = model.config
    d, p, c, heads = cfg.embed_dim, cfg.patch_size, cfg.in_channels, cfg.num_heads
    b, half_depth = x.shape[0], cfg.depth // 2
    patches = F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=p)
    gh, gw = patches.shape[-2:]
    patches = patches.flatten(2).transpose(1, 2)  # (B, N, D)
    freqs = torch.exp(-math.log(10000) * torch.arange(d // 2, dtype=torch.float64) / (d // 2))
    time = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1)[:, None]
    ctx = context @ w["context_embed.weight"].T + w["context_embed.bias"]  # (B, T, D)
    h = torch.cat([time, ctx, patches], 1) + w["pos_embed"]
    extras = 1 + ctx.shape[1]

    def block(name, h, use_cog, skip=None):
        if skip is not None:
            h = torch.cat([h, skip], -1) @ w[name + "skip_linear.weight"].T + w[name + "skip_linear.bias"]
        a = F.layer_norm(h, (d,), w[name + "norm1.weight"], w[name + "norm1.bias"])
        q, k, v = (a @ w[name + "attn.qkv.weight"].T).reshape(b, -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-1, -2)) * (d // heads) ** -0.5
        probs = torch.sign(s) * torch.softmax(s.abs(), -1) if use_cog else torch.softmax(s, -1)
        o = (probs @ v).transpose(1, 2).reshape(b, -1, d)
        h = h + o @ w[name + "attn.proj.weight"].T + w[name + "attn.proj.bias"]
        m = F.layer_norm(h, (d,), w[name + "norm2.weight"], w[name + "norm2.bias"])
        m = F.gelu(m @ w[name + "mlp.fc1.weight"].T + w[name + "mlp.fc1.bias"])
        return h + m @ w[name + "mlp.fc2.weight"].T + w[name + "mlp.fc2.bias"]

    skips = []
    for i in range(half_depth):
        h = block(f"in_blocks.{i}.", h, cog and i != 0)
        skips.append(h)
    h = block("mid_block.", h, cog)
    for i in range(half_depth):
        h = block(f"out_blocks.{i}.", h, cog and i != half_depth - 1, skips.pop())
    h = F.layer_norm(h, (d,), w["norm.weight"], w["norm.bias"]) @ w["decoder_pred.weight"].T + w["decoder_pred.bias"]
    h = h[:, extras:].reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, gh * p, gw * p)
    return F.conv2d(h, w["final_layer.weight"], w["final_layer.bias"], padding=1)


@pytest.mark.parametrize("attention_type", ["softmax", "cog"])
def test_t2i_forward_matches_the_official_forward(attention_type):
    torch.manual_seed(0)
    model = UViT(**TINY_T2I, attention_type=attention_type).double().eval()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([3.0, 900.0], dtype=torch.float64)
    ctx = torch.randn(2, 5, 12, dtype=torch.float64)
    out = model(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(out, official_t2i_forward(model, x, t, ctx, cog=attention_type == "cog"))
    # the context matters
    assert not torch.allclose(out, model(x, t, encoder_hidden_states=ctx.flip(0)).sample)


def test_context_and_labels_are_checked():
    with pytest.raises(ValueError, match="mutually exclusive"):
        UViT(**TINY_T2I, num_classes=11)
    model = UViT(**TINY_T2I).eval()
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(x, 1)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(x, 1, encoder_hidden_states=torch.randn(1, 4, 12))
    with pytest.raises(ValueError, match="class_labels must be None"):
        model(x, 1, class_labels=torch.tensor([0]), encoder_hidden_states=torch.randn(1, 5, 12))
    plain = UViT(**{k: v for k, v in TINY_T2I.items() if k not in ("context_dim", "num_context_tokens")})
    with pytest.raises(ValueError, match="no text context"):
        plain(x, 1, encoder_hidden_states=torch.randn(1, 5, 12))
    assert "context_embed.weight" not in plain.state_dict()


def official_mscoco_s2_param_count(d=512, depth=12, latent=32, chans=4, patch=2, clip=768, tokens=77):
    """Parameters of libs/uvit_t2i.py's UViT with configs/mscoco_uvit_small.py, counted layer by layer."""
    block = 2 * d + 3 * d * d + (d * d + d) + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d)
    skip = 2 * d * d + d
    length = 1 + tokens + (latent // patch) ** 2
    return ((chans * patch * patch * d + d) + length * d + (clip * d + d) + (depth + 1) * block
            + (depth // 2) * skip + 2 * d + (d * patch * patch * chans + patch * patch * chans)
            + (chans * chans * 9 + chans))


@pytest.mark.parametrize("name,depth", [("mscoco-uvit-s/2", 12), ("mscoco-uvit-s-deep/2", 16)])
def test_mscoco_presets_have_the_official_shapes_and_count(name, depth):
    with torch.device("meta"):
        model = UViT.from_preset(name)
    assert sum(p.numel() for p in model.parameters()) == official_mscoco_s2_param_count(depth=depth)
    state = model.state_dict()
    assert state["pos_embed"].shape == (1, 1 + 77 + 256, 512)
    assert state["context_embed.weight"].shape == (512, 768)
    assert preset_config(name, attention_type="cog")["attention_type"] == "cog"


def test_official_state_dict_loads_strictly(tmp_path):
    reference = dict(name="uvit_t2i", img_size=8, in_chans=4, patch_size=2, embed_dim=32, depth=4, num_heads=4,
                     mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, clip_dim=12, num_clip_token=5)
    assert config_from_reference(reference)["context_dim"] == 12
    torch.manual_seed(1)
    source = UViT(**TINY_T2I)
    # official names: the same keys as our model, written as a published .pth would be
    official_names = {"pos_embed", "context_embed.weight", "context_embed.bias", "patch_embed.proj.weight",
                      "in_blocks.0.attn.qkv.weight", "out_blocks.1.skip_linear.weight", "final_layer.bias"}
    state = source.state_dict()
    assert official_names <= set(state)
    torch.save(state, tmp_path / "nnet_ema.pth")
    for attention_type in ("softmax", "cog"):
        loaded = load_reference_checkpoint(str(tmp_path / "nnet_ema.pth"), reference, attention_type=attention_type)
        for key, value in state.items():
            torch.testing.assert_close(loaded.state_dict()[key], value)
    # a t2i reference without explicit clip keys takes the official defaults (77 x 768)
    defaults = {k: v for k, v in reference.items() if k not in ("clip_dim", "num_clip_token")}
    assert config_from_reference(defaults)["num_context_tokens"] == 77


# ---------------------------------------------------------------------- text encoder (tiny, offline)
def write_tiny_clip(folder):
    """A random 2-layer CLIPTextModel and a character-level CLIPTokenizer saved to `folder`."""
    import json

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {tok: i for i, tok in enumerate(letters + [ch + "</w>" for ch in letters] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=12, intermediate_size=24, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77,
                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                            pad_token_id=vocab["<|endoftext|>"])
    CLIPTextModel(config).save_pretrained(folder)
    return folder


def test_text_encoder_pads_to_77_and_gives_the_empty_context(tmp_path):
    from uvic.text import empty_context, encode_prompts, load_text_encoder

    tokenizer, encoder = load_text_encoder(str(write_tiny_clip(tmp_path / "clip")))
    ctx = encode_prompts(["a cat", "a dog on a skateboard"], tokenizer, encoder)
    assert ctx.shape == (2, 77, 12)
    assert not torch.allclose(ctx[0], ctx[1])
    empty = empty_context(tokenizer, encoder)
    assert empty.shape == (77, 12)
    torch.testing.assert_close(empty, encode_prompts([""], tokenizer, encoder)[0])
    # features feed the t2i model directly
    model = UViT(**{**TINY_T2I, "context_dim": 12, "num_context_tokens": 77}).eval()
    assert model(torch.randn(2, 4, 8, 8), 5, encoder_hidden_states=ctx).sample.shape == (2, 4, 8, 8)


def test_missing_text_encoder_says_what_to_download(tmp_path):
    from uvic.text import load_text_encoder

    with pytest.raises(FileNotFoundError, match="openai/clip-vit-large-patch14"):
        load_text_encoder(str(tmp_path / "nothing"))


def test_mscoco_twin_configs_differ_only_in_attention_type():
    from pathlib import Path

    from uvic.config import config_diff, load_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    uvic, uvit = load_config(configs / "mscoco_uvic_s2.yaml"), load_config(configs / "mscoco_uvit_s2.yaml")
    assert config_diff(uvic, uvit) == ["model.attention_type"]
    fields = {k: v for k, v in dict(uvic.model).items() if k not in ("preset", "gradient_checkpointing")}
    with torch.device("meta"):
        model = UViT(**fields)
    assert model.attention_layout()[1:-1] == ["cog"] * 11
    assert sum(p.numel() for p in model.parameters()) == official_mscoco_s2_param_count()
    assert (uvic.train.batch_size, uvic.train.lr, uvic.train.betas, uvic.diffusion.p_uncond) == (256, 2e-4, [0.9, 0.9], 0.1)


def test_read_captions_from_jsonl_and_coco(tmp_path):
    import json

    from PIL import Image

    from uvic.images import read_captions

    for name in ("b.png", "a.png", "c.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    rows = [("b.png", "two dogs"), ("a.png", "a cat"), ("b.png", "dogs playing")]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps({"file_name": f, "caption": c}) for f, c in rows))
    assert read_captions(tmp_path) == (["a.png", "b.png"], [["a cat"], ["two dogs", "dogs playing"]])
    coco = {"images": [{"id": 7, "file_name": "c.png"}, {"id": 3, "file_name": "a.png"}],
            "annotations": [{"image_id": 7, "caption": " a red bus "}, {"image_id": 3, "caption": "a cat"},
                            {"image_id": 7, "caption": "a bus"}]}
    (tmp_path / "captions_train2014.json").write_text(json.dumps(coco))
    files, captions = read_captions(tmp_path, tmp_path / "captions_train2014.json")
    assert files == ["a.png", "c.png"] and captions == [["a cat"], ["a red bus", "a bus"]]
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file_name": "gone.png", "caption": "x"}))
    with pytest.raises(FileNotFoundError, match="1 captioned images missing"):
        read_captions(tmp_path)


# ---------------------------------------------------------------------- pipeline with prompts
def tiny_t2i_pipeline(tmp_path, with_text_encoder=True):
    from diffusers import DDPMScheduler

    from uvic.pipeline import UViCPipeline, make_scheduler
    from uvic.text import load_text_encoder

    tokenizer, encoder = load_text_encoder(str(write_tiny_clip(tmp_path / "clip")))
    torch.manual_seed(0)
    model = UViT(**TINY_T2I).eval()
    scheduler = make_scheduler("ddim", DDPMScheduler(num_train_timesteps=100).config)
    if with_text_encoder:
        return UViCPipeline(transformer=model, scheduler=scheduler, text_encoder=encoder, tokenizer=tokenizer)
    pipe = UViCPipeline(transformer=model, scheduler=scheduler)
    pipe.set_empty_context(encode_prompts_5([""], tokenizer, encoder)[0])
    return pipe, tokenizer, encoder


def encode_prompts_5(prompts, tokenizer, encoder):
    from uvic.text import encode_prompts

    return encode_prompts(prompts, tokenizer, encoder, max_length=TINY_T2I["num_context_tokens"])


def test_pipeline_samples_from_prompts_with_guidance_and_saves_the_empty_context(tmp_path):
    from uvic.pipeline import EMPTY_CONTEXT_FILE, UViCPipeline

    pipe = tiny_t2i_pipeline(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a cat", "a dog on a skateboard"]
    kwargs = dict(num_inference_steps=3, guidance_scale=2.0, output_type="pt")
    images = pipe(prompt=prompts, generator=[torch.Generator().manual_seed(i) for i in range(2)], **kwargs).images
    assert images.shape == (2, 4, 8, 8)
    ctx = encode_prompts_5(prompts, pipe.tokenizer, pipe.text_encoder)
    torch.testing.assert_close(pipe.empty_context, encode_prompts_5([""], pipe.tokenizer, pipe.text_encoder)[0])
    same = pipe(prompt_embeds=ctx, generator=[torch.Generator().manual_seed(i) for i in range(2)], **kwargs).images
    torch.testing.assert_close(images, same)
    # guidance: eps_uncond (empty prompt) + w (eps_cond - eps_uncond); the prompt changes the sample
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(50)
    with torch.no_grad():
        cond = pipe.transformer(x, t, encoder_hidden_states=ctx).sample
        uncond = pipe.transformer(x, t, encoder_hidden_states=pipe.empty_context.expand(2, -1, -1)).sample
        torch.testing.assert_close(pipe.predict(x, t, None, 2.0, ctx), uncond + 2.0 * (cond - uncond), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pipe.predict(x, t, None, 0.0, ctx), uncond)
    other = pipe(prompt=prompts[::-1], generator=[torch.Generator().manual_seed(i) for i in range(2)], **kwargs).images
    assert not torch.allclose(images, other)
    # one prompt, several samples
    assert pipe(prompt="a cat", batch_size=3, **kwargs).images.shape[0] == 3

    pipe.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / EMPTY_CONTEXT_FILE).is_file()
    loaded = UViCPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.tokenizer is not None and loaded.text_encoder is not None
    torch.testing.assert_close(loaded.empty_context, pipe.empty_context)
    again = loaded(prompt=prompts, generator=[torch.Generator().manual_seed(i) for i in range(2)], **kwargs).images
    torch.testing.assert_close(again, images)


def test_pipeline_without_text_encoder_keeps_the_saved_empty_context(tmp_path):
    from uvic.pipeline import UViCPipeline

    pipe, tokenizer, encoder = tiny_t2i_pipeline(tmp_path, with_text_encoder=False)
    pipe.save_pretrained(tmp_path / "saved")
    loaded = UViCPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.text_encoder is None
    torch.testing.assert_close(loaded.empty_context, pipe.empty_context)
    ctx = encode_prompts_5(["a cat"], tokenizer, encoder)
    out = loaded(prompt_embeds=ctx, guidance_scale=3.0, num_inference_steps=2, output_type="pt").images
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="tokenizer and text_encoder"):
        loaded(prompt=["a cat"], num_inference_steps=2)


def test_custom_pipeline_route_finds_the_saved_empty_context(tmp_path, monkeypatch):
    import diffusers.utils.dynamic_modules_utils as dynamic
    from diffusers import DiffusionPipeline

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    pipe, tokenizer, encoder = tiny_t2i_pipeline(tmp_path, with_text_encoder=False)
    pipe.save_pretrained(tmp_path / "saved")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "saved", custom_pipeline="pipeline", trust_remote_code=True)
    loaded.set_progress_bar_config(disable=True)
    ctx = encode_prompts_5(["a cat"], tokenizer, encoder)
    kwargs = dict(prompt_embeds=ctx, guidance_scale=3.0, num_inference_steps=2, output_type="pt")
    out = loaded(generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(loaded.empty_context, pipe.empty_context)
    pipe.set_progress_bar_config(disable=True)
    torch.testing.assert_close(out, pipe(generator=torch.Generator().manual_seed(0), **kwargs).images)


def test_pipeline_checks_prompts_against_labels(tmp_path):
    from diffusers import DDPMScheduler

    from uvic.pipeline import UViCPipeline

    pipe = tiny_t2i_pipeline(tmp_path)
    with pytest.raises(ValueError, match="mutually exclusive"):
        pipe(prompt=["a cat"], class_labels=[0], num_inference_steps=1)
    with pytest.raises(ValueError, match="pass prompt"):
        pipe(num_inference_steps=1)
    with pytest.raises(ValueError, match="not both"):
        pipe(prompt=["a"], prompt_embeds=torch.zeros(1, 5, 12), num_inference_steps=1)
    with pytest.raises(ValueError, match=r"shape \(B, 5, 12\)"):
        pipe(prompt_embeds=torch.zeros(1, 4, 12), num_inference_steps=1)
    with pytest.raises(ValueError, match="3 prompts for batch_size=2"):
        pipe(prompt=["a", "b", "c"], batch_size=2, num_inference_steps=1)
    labelled = UViCPipeline(transformer=UViT(sample_size=8, in_channels=4, patch_size=2, embed_dim=32, depth=2,
                                             num_heads=4, num_classes=3), scheduler=DDPMScheduler())
    with pytest.raises(ValueError, match="not text-conditional"):
        labelled(prompt=["a cat"], num_inference_steps=1)


# ---------------------------------------------------------------------- caption latents, training
CAPTIONS = {"img_0.png": ["a red square", "red"], "img_1.png": ["a green field"],
            "img_2.png": ["a blue sky", "sky", "blue"], "img_3.png": ["a cat"], "img_4.png": ["a dog", "dogs"]}


@pytest.fixture(scope="module")
def caption_data(tmp_path_factory):
    """Five captioned images (captions.jsonl, several captions per image), a tiny VAE and a tiny CLIP."""
    import json

    import numpy as np
    from diffusers import AutoencoderKL
    from PIL import Image

    root = tmp_path_factory.mktemp("captioned")
    rng = np.random.default_rng(0)
    for i, name in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 256, (16 + 2 * i, 20, 3), dtype=np.uint8)).save(root / name)
    lines = [json.dumps({"file": name, "caption": c}) for name, caps in reversed(CAPTIONS.items()) for c in caps]
    (root / "captions.jsonl").write_text("\n".join(lines))  # images in any order, captions in file order
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), sample_size=16)
    vae.save_pretrained(root.parent / "vae")
    clip = write_tiny_clip(root.parent / "clip")
    return root, root.parent / "vae", clip


def extract_args(data, out, vae, clip, *extra):
    return ["extract", "--data", str(data), "--out", str(out), "--vae", str(vae), "--text-encoder", str(clip),
            "--resolution", "16", "--batch-size", "2", "--shard-size", "2", "--num-workers", "0", *extra]


@pytest.fixture(scope="module")
def caption_latents(caption_data, tmp_path_factory):
    from uvic.latents_cli import main as latents_main

    data, vae, clip = caption_data
    out = tmp_path_factory.mktemp("caption_latents") / "lat"
    latents_main(extract_args(data, out, vae, clip))
    return out


def test_extract_stores_latents_and_the_clip_features_of_every_caption(caption_latents, caption_data):
    from uvic.caption_latents import CaptionLatentDataset
    from uvic.text import encode_prompts, load_text_encoder

    tokenizer, encoder = load_text_encoder(str(caption_data[2]))
    data = CaptionLatentDataset(caption_latents)
    assert len(data) == 5 and data.num_classes == 0 and data.text_meta["num_captions"] == 9
    assert data.captions() == [CAPTIONS[name] for name in sorted(CAPTIONS)]
    for i, name in enumerate(sorted(CAPTIONS)):
        torch.testing.assert_close(data.contexts(i), encode_prompts(CAPTIONS[name], tokenizer, encoder), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(data.empty_context, encode_prompts([""], tokenizer, encoder)[0])
    # one caption per draw, every caption drawn in turn
    torch.manual_seed(0)
    drawn = set()
    for _ in range(30):
        z, ctx = data[2]
        assert z.shape == (4, 8, 8) and ctx.shape == (77, 12)
        drawn.add(int(torch.argmin((data.contexts(2) - ctx).abs().flatten(1).sum(1))))
    assert drawn == {0, 1, 2}


def test_caption_extraction_resumes_and_refuses_other_captions(caption_latents, caption_data, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from uvic.caption_latents import text_shard_name
    from uvic.latents_cli import main as latents_main

    data, vae, clip = caption_data
    out = tmp_path / "lat"
    shutil.copytree(caption_latents, out)
    before = load_file(str(out / text_shard_name(1)))
    (out / text_shard_name(1)).unlink()
    (out / ".text_00001.safetensors.tmp-1").write_bytes(b"half")
    latents_main(extract_args(data, out, vae, clip))
    after = load_file(str(out / text_shard_name(1)))
    assert all(torch.equal(before[k], after[k]) for k in before)
    other = tmp_path / "other"
    shutil.copytree(data, other)
    (other / "captions.jsonl").write_text('{"file_name": "img_0.png", "caption": "something else"}')
    with pytest.raises(SystemExit):
        latents_main(extract_args(other, out, vae, clip))


def test_missing_text_encoder_fails_before_any_encoding(caption_data, tmp_path, capsys):
    from uvic.latents_cli import main as latents_main

    data, vae, _ = caption_data
    with pytest.raises(SystemExit):
        latents_main(extract_args(data, tmp_path / "out", vae, tmp_path / "no_clip"))
    assert "openai/clip-vit-large-patch14" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_drop_context_uses_the_empty_prompt_with_p_uncond():
    from uvic.caption_latents import drop_context

    ctx, empty = torch.randn(64, 5, 3), torch.randn(5, 3)
    assert torch.equal(drop_context(ctx, 0.0, empty), ctx)
    assert torch.equal(drop_context(ctx, 1.0, empty), empty.expand(64, -1, -1))
    torch.manual_seed(0)
    dropped = (drop_context(ctx, 0.5, empty) == empty).flatten(1).all(1)
    assert 10 < int(dropped.sum()) < 54


def t2i_config(tmp_path, latents, **train):
    extra = ", ".join(f"{k}: {v}" for k, v in train.items())
    config = tmp_path / "tiny_t2i.yaml"
    config.write_text(f"""
model: {{sample_size: 8, in_channels: 4, patch_size: 2, embed_dim: 32, depth: 2, num_heads: 2, attention_type: cog,
        context_dim: 12, num_context_tokens: 77}}
diffusion: {{beta_schedule: scaled_linear, beta_start: 0.00085, beta_end: 0.012, clip_sample: false, p_uncond: 0.1,
            timestep_offset: 1}}
data: {{name: latents, path: "{latents}", scale_factor: 0.23010}}
train: {{steps: 2, batch_size: 2, warmup_steps: 1, log_every: 1, sample_every: 0, checkpoint_every: 0,
        sample_steps: 2, sample_guidance: 2.0, sample_num: 4, sample_scheduler: dpm-solver++-fast{", " + extra if extra else ""}}}
""")
    return config


def test_train_on_captions_then_sample_from_prompts(caption_latents, tmp_path):
    from uvic import train_cli
    from uvic.pipeline import UViCPipeline

    final = train_cli.main(["--config", str(t2i_config(tmp_path, caption_latents)), "--output-dir", str(tmp_path / "run"),
                          "--cpu"])
    assert (tmp_path / "run" / "samples" / "step_0000002.png").is_file()
    pipe = UViCPipeline.from_pretrained(final)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder is not None and pipe.tokenizer is not None and pipe.vae is not None
    from uvic.caption_latents import CaptionLatentDataset

    torch.testing.assert_close(pipe.empty_context, CaptionLatentDataset(caption_latents).empty_context)
    images = pipe(prompt=["a cat", "a dog"], guidance_scale=2.0, num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_text_models_need_caption_data_and_the_right_token_shape(caption_latents, tmp_path):
    from uvic.config import load_config
    from uvic.data import resolve_data_config

    cfg = load_config(t2i_config(tmp_path, caption_latents), ["model.num_context_tokens=5"])
    with pytest.raises(ValueError, match="77 x 12 text tokens"):
        resolve_data_config(cfg)
    cfg = load_config(t2i_config(tmp_path, caption_latents), ["model.context_dim=0", "train.sample_guidance=1.0"])
    with pytest.raises(ValueError, match="holds captions"):
        resolve_data_config(cfg)


def test_sample_py_grids_and_fid_sets_from_prompts(caption_latents, tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from uvic import sampling, train_cli

    run = tmp_path / "run"
    train_cli.main(["--config", str(t2i_config(tmp_path, caption_latents)), "--output-dir", str(run), "--cpu"])
    common = ["--steps", "2", "--guidance", "2.0", "--scheduler", "dpm-solver++-fast", "--device", "cpu", "--no-progress"]
    grid = sampling.main([str(run), "--grid", "3", "--prompt", "a cat", "--prompt", "a dog", "--out",
                          str(tmp_path / "grid.png"), *common])
    with Image.open(grid) as im:  # 2 rows (prompts) x 3 columns of 16 px, enlarged to >= 64 px cells
        assert im.size[0] > im.size[1] > 0
    prompts = tmp_path / "captions.txt"
    prompts.write_text("a red square\n\na cat\na dog\na blue sky\n")
    out = tmp_path / "set"
    args = [str(run), "--num-samples", "3", "--prompts", str(prompts), "--out", str(out), "--batch-size", "2", *common]
    with np.load(sampling.main(args)) as npz:
        images = npz["arr_0"]
    assert images.shape == (3, 16, 16, 3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompts"]["count"] == 3
    assert (out / "prompts.txt").read_text().splitlines() == ["a red square", "a cat", "a dog"]
    from uvic import clip_score

    score = clip_score.main([str(out), "--clip", str(write_tiny_full_clip(tmp_path / "full_clip")), "--device", "cpu"])
    assert 0.0 <= score <= 100.0
    # sample i depends on prompt i only: a set drawn in other batches is the same
    again = sampling.main([*args[:5], "--out", str(tmp_path / "set2"), "--batch-size", "3", *common])
    with np.load(again) as npz:
        np.testing.assert_array_equal(npz["arr_0"], images)
    # another prompt list is another set: refused in the same folder
    prompts.write_text("a dog\na cat\na red square\n")
    with pytest.raises(SystemExit):
        sampling.main(args)
    with pytest.raises(SystemExit):  # more samples than prompts
        sampling.main([str(run), "--num-samples", "9", "--prompts", str(prompts), "--out", str(tmp_path / "s3"), *common])
    with pytest.raises(SystemExit):  # a text model needs prompts
        sampling.main([str(run), "--grid", "2", "--out", str(tmp_path / "g.png"), *common])
    with pytest.raises(SystemExit):
        sampling.main([str(run), "--grid", "2", "--prompt", "a", "--class-labels", "1", *common])


def test_mscoco_reference_config_samples_a_published_style_checkpoint_from_prompts(tmp_path):
    from pathlib import Path

    from omegaconf import OmegaConf

    from uvic import loading

    shipped = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "reference" /
                                                    "mscoco_uvit_s2.yaml"))
    assert config_from_reference(shipped["nnet"])["context_dim"] == 768
    assert shipped["schedule"]["timestep_offset"] == 1 and shipped["sample"]["scheduler"] == "dpm-solver++-fast"
    # the same file, made tiny (no VAE: latents out), with a .pth of the official names
    tiny = {**shipped, "nnet": {**shipped["nnet"], "img_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
                                "clip_dim": 12}, "vae": None}
    (tmp_path / "ref.yaml").write_text(OmegaConf.to_yaml(tiny))
    torch.manual_seed(0)
    source = UViT(sample_size=8, in_channels=4, patch_size=2, embed_dim=32, depth=2, num_heads=2, context_dim=12,
                  num_context_tokens=77)
    torch.save(source.state_dict(), tmp_path / "mscoco_uvit_small.pth")
    pipe = loading.load_pipeline(tmp_path / "mscoco_uvit_small.pth", reference_config=tmp_path / "ref.yaml")
    assert pipe.is_text_conditional and pipe.config.timestep_offset == 1
    pipe.attach_text_encoder(str(write_tiny_clip(tmp_path / "clip")))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=["a cat"], guidance_scale=2.0, num_inference_steps=3, output_type="pt").images
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


# ---------------------------------------------------------------------- evaluation: caption draw, CLIP score
def test_fid_caption_draw_is_seeded_and_takes_distinct_images(caption_data, tmp_path):
    import json

    from uvic.caption_latents import draw_captions, main as captions_main
    from uvic.text import read_prompts

    data = caption_data[0]
    rows = draw_captions(data, num=4, seed=3)
    assert rows == draw_captions(data, num=4, seed=3) and rows != draw_captions(data, num=4, seed=4)
    assert len({f for f, _ in rows}) == 4 and all(c in CAPTIONS[f] for f, c in rows)
    captions_main(["draw", "--data", str(data), "--num", "4", "--seed", "3", "--out", str(tmp_path / "c.txt")])
    assert read_prompts(tmp_path / "c.txt") == [c for _, c in rows]
    captions_main(["draw", "--data", str(data), "--num", "4", "--seed", "3", "--out", str(tmp_path / "c.jsonl")])
    assert [json.loads(l)["file_name"] for l in (tmp_path / "c.jsonl").read_text().splitlines()] == [f for f, _ in rows]
    assert read_prompts(tmp_path / "c.jsonl") == [c for _, c in rows]
    with pytest.raises(SystemExit):
        captions_main(["draw", "--data", str(data), "--num", "6", "--out", str(tmp_path / "x.txt")])


def write_tiny_full_clip(folder):
    """A random CLIPModel (text + 32 px vision tower) with a CLIPProcessor, saved to `folder`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip(folder / "tok"))
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=tokenizer.vocab_size, hidden_size=12, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=12, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=8)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_score_is_torchmetrics_definition_through_clip_forward(tmp_path):
    import numpy as np

    from uvic.clip_score import clip_score, load_clip

    model, processor = load_clip(str(write_tiny_full_clip(tmp_path / "clip")))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 40, 48, 3), dtype=np.uint8)
    prompts = ["a cat", "a dog on a skateboard", "sky", "a red bus", "two dogs"]
    score = clip_score(images, prompts, model, processor, batch_size=2)
    # independent: CLIPModel.forward's logits_per_image = exp(logit_scale) * cos(E_I, E_C)
    inputs = processor(text=prompts, images=list(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image.double()  # (N, N)
    cos = logits.diagonal() / model.logit_scale.exp().double()
    assert float(cos.mean()) > 0  # the tiny random CLIP happens to give a positive mean: no clamping hides it
    assert score == pytest.approx(100 * float(cos.mean()), abs=1e-4)
    assert score != pytest.approx(clip_score(images, prompts[::-1], model, processor), abs=1e-6)
    with pytest.raises(ValueError, match="5 images and 4 prompts"):
        clip_score(images, prompts[:4], model, processor)
    with pytest.raises(FileNotFoundError, match="openai/clip-vit-large-patch14"):
        load_clip(str(tmp_path / "none"))


def test_compare_report_scores_t2i_runs_on_the_same_captions_with_clip_score(caption_latents, tmp_path):
    import json
    from pathlib import Path

    import numpy as np

    from uvic import evaluate, train_cli

    runs = []
    for attention in ("softmax", "cog"):
        runs.append(tmp_path / f"run_{attention}")
        train_cli.main(["--config", str(t2i_config(tmp_path, caption_latents)), f"model.attention_type={attention}",
                      "--output-dir", str(runs[-1]), "--cpu"])
    np.savez(tmp_path / "ref.npz", arr_0=np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    (tmp_path / "captions.txt").write_text("a cat\na dog\na red bus\n")
    out = evaluate.main(["compare", *map(str, runs), "--ref", str(tmp_path / "ref.npz"), "--num-samples", "3",
                         "--prompts", str(tmp_path / "captions.txt"), "--clip", str(write_tiny_full_clip(tmp_path / "c")),
                         "--feature-extractor", "digits", "--offline", "--no-kid", "--no-isc",  # any size, 64-d, fast
                         "--bootstrap", "0", "--steps", "2", "--scheduler", "dpm-solver++-fast", "--guidance", "2.0",
                         "--device", "cpu", "--out", str(tmp_path / "cmp")])
    assert [r["attention"] for r in out["rows"]] == ["softmax", "cog"]
    assert all(0.0 <= r["clip_score"] <= 100.0 and np.isfinite(r["fid"]) for r in out["rows"])
    assert "CLIP score" in (tmp_path / "cmp" / "report.md").read_text()
    prompts = [json.loads((Path(r["samples"]).parent / "manifest.json").read_text())["prompts"] for r in out["rows"]]
    assert prompts[0] == prompts[1] and prompts[0]["count"] == 3


def test_caption_ranks_encode_disjoint_shards_and_the_dataset_pickles(caption_data, caption_latents, tmp_path):
    import pickle

    from safetensors.torch import load_file

    from uvic.caption_latents import CaptionLatentDataset, extract_caption_latents, text_shard_name

    data, vae, clip = caption_data
    kw = dict(text_encoder=str(clip), vae=str(vae), resolution=16, batch_size=2, shard_size=2, num_workers=0, progress=False)
    out = tmp_path / "ranks"
    extract_caption_latents(data, out, process_index=1, num_processes=2, **kw)  # rank 1 first: shard 1 only
    assert sorted(p.name for p in out.glob("text_*")) == [text_shard_name(1)]
    extract_caption_latents(data, out, process_index=0, num_processes=2, **kw)
    for s in range(3):
        a, b = load_file(str(out / text_shard_name(s))), load_file(str(caption_latents / text_shard_name(s)))
        assert all(torch.equal(a[k], b[k]) for k in a)
    dataset = CaptionLatentDataset(out)
    dataset.contexts(4)  # opens a shard: the copy a DataLoader worker gets has no open files
    clone = pickle.loads(pickle.dumps(dataset))
    torch.testing.assert_close(clone.contexts(4), dataset.contexts(4))


def test_t2i_resume_matches_the_uninterrupted_run(caption_latents, tmp_path):
    """Caption draws and context dropout come from the checkpointed RNG: a resumed run ends on the same weights."""
    from safetensors.torch import load_file

    from uvic.config import load_config
    from uvic.trainer import Trainer

    class CrashAfter(Trainer):
        def on_step_end(self, step):
            if step == 3:
                raise KeyboardInterrupt("simulated kill")

    cfg = load_config(t2i_config(tmp_path, caption_latents), ["train.steps=4", "train.checkpoint_every=2",
                                                              "diffusion.p_uncond=0.5", "train.sample_every=0"])
    Trainer(cfg, tmp_path / "a", cpu=True).train()
    with pytest.raises(KeyboardInterrupt):
        CrashAfter(cfg, tmp_path / "b", cpu=True).train()
    resumed = Trainer(cfg, tmp_path / "b", resume="latest", cpu=True)
    assert resumed.step == 2
    resumed.train()
    a, b = (load_file(str(tmp_path / r / "checkpoints" / "step_0000004" / "model" / "diffusion_pytorch_model.safetensors"))
            for r in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
