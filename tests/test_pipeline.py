"""UViCPipeline: save/load, every scheduler, U-ViT-style guidance, per-sample generators, VAE decoding."""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline
from PIL import Image

from uvic.model import UViT
from uvic.pipeline import PAPER_SAMPLERS, SCHEDULERS, UViCPipeline, make_scheduler, save_grid

TINY = dict(sample_size=8, in_channels=3, patch_size=2, embed_dim=32, depth=2, num_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_pipeline(num_classes=5, scheduler=None, seed=0):
    torch.manual_seed(seed)
    model = UViT(**TINY, num_classes=num_classes).eval()
    pipe = UViCPipeline(transformer=model, scheduler=scheduler or DDPMScheduler(num_train_timesteps=100))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(n, offset=0):
    return [torch.Generator().manual_seed(1000 + offset + i) for i in range(n)]


def test_save_pretrained_round_trip_gives_the_same_samples(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "final")
    loaded = UViCPipeline.from_pretrained(tmp_path / "final")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.transformer, UViT) and isinstance(loaded.scheduler, DDPMScheduler) and loaded.vae is None
    assert loaded.transformer.config.num_classes == 5
    kwargs = dict(batch_size=3, num_inference_steps=4, class_labels=[0, 1, 3], guidance_scale=2.0, output_type="pt")
    expected = pipe(generator=generators(3), **kwargs).images
    assert torch.equal(loaded(generator=generators(3), **kwargs).images, expected)


def test_diffusers_loads_a_saved_pipeline_through_its_custom_pipeline_file(tmp_path, monkeypatch):
    import diffusers.utils.dynamic_modules_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # where diffusers copies the file
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "final")
    # the Hub custom-pipeline convention: [file stem beside model_index.json, class name]
    assert json.loads((tmp_path / "final" / "model_index.json").read_text())["_class_name"] == ["pipeline", "UViCPipeline"]
    for kwargs in ({"trust_remote_code": True}, {"custom_pipeline": "pipeline", "trust_remote_code": True}):
        loaded = DiffusionPipeline.from_pretrained(tmp_path / "final", **kwargs)
        assert type(loaded) is UViCPipeline and loaded.config.timestep_offset == 0
        assert torch.equal(loaded.transformer.pos_embed, pipe.transformer.pos_embed)
    with pytest.raises(ValueError, match="(?s)contains custom code in pipeline.py.*Pass `trust_remote_code=True`"):  # diffusers' own message
        DiffusionPipeline.from_pretrained(tmp_path / "final")


def test_labels_set_the_batch_when_batch_size_is_not_given():
    """DiTPipeline's habit: pipe(class_labels=[...]) draws one sample per label."""
    pipe = tiny_pipeline()
    kwargs = dict(num_inference_steps=2, output_type="pt")
    by_labels = pipe(class_labels=[1, 2, 3], generator=generators(3), **kwargs).images
    explicit = pipe(batch_size=3, class_labels=[1, 2, 3], generator=generators(3), **kwargs).images
    assert by_labels.shape == (3, 3, 8, 8) and torch.equal(by_labels, explicit)


def test_latent_output_is_x0_before_the_vae_decodes_it():
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        sample_size=16, scaling_factor=0.5).eval()
    pipe = UViCPipeline(transformer=UViT(**{**TINY, "in_channels": 4}).eval(),
                        scheduler=DDPMScheduler(num_train_timesteps=100, clip_sample=False), vae=vae)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(batch_size=2, num_inference_steps=2)
    latents = pipe(generator=generators(2), output_type="latent", **kwargs).images
    assert latents.shape == (2, 4, 8, 8)
    images = pipe(generator=generators(2), output_type="pt", **kwargs).images
    with torch.no_grad():  # diffusers' own decode of the returned latents gives the "pt" images
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
    assert torch.allclose(images, (decoded / 2 + 0.5).clamp(0, 1), atol=1e-6)
    pixels = tiny_pipeline(num_classes=0)(batch_size=1, num_inference_steps=2, generator=generators(1),
                                          output_type="latent").images  # no VAE: x_0 in [-1, 1] units
    assert pixels.shape == (1, 3, 8, 8) and pixels.min() < 0


def test_diffusers_attention_processors_switch_what_each_block_runs(caplog):
    from uvic.attention import MechanismProcessor, SoftmaxProcessor, cog_reference

    torch.manual_seed(0)
    sizes = dict(sample_size=8, in_channels=1, patch_size=2, embed_dim=32, depth=4, num_heads=2)
    uvic_model = UViT(attention_type="cog", **sizes).eval()  # official layout: softmax in blocks 0 and 4
    uvit = UViT(attention_type="softmax", **sizes).eval()
    uvit.load_state_dict(uvic_model.state_dict())
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 500])
    processors = uvic_model.attn_processors  # diffusers' names: one processor per attention module
    assert list(processors) == [f"{name}.attn.processor" for name in
                                ("in_blocks.0", "in_blocks.1", "mid_block", "out_blocks.0", "out_blocks.1")]
    assert [type(p) for p in processors.values()] == [SoftmaxProcessor, *[MechanismProcessor] * 3, SoftmaxProcessor]
    with torch.no_grad():
        uvic_out = uvic_model(x, t).sample
        uvic_model.set_attn_processor(SoftmaxProcessor())  # softmax everywhere: the U-ViT of the same weights
        assert uvic_model.attention_layout() == ["softmax"] * 5
        assert torch.equal(uvic_model(x, t).sample, uvit(x, t).sample)
        # a dict by name, as diffusers takes it: back to the official layout gives the first output again
        uvic_model.set_attn_processor({name: SoftmaxProcessor() if i in (0, 4) else MechanismProcessor("cog", "math")
                                       for i, name in enumerate(processors)})
        assert torch.allclose(uvic_model(x, t).sample, uvic_out, atol=1e-6)  # "math" here, "chunked" by auto

        class Recorded(MechanismProcessor):  # a user's processor: sees the module and its tokens
            calls = []

            def __call__(self, attn, hidden_states, **kwargs):
                self.calls.append(tuple(hidden_states.shape))
                return super().__call__(attn, hidden_states, **kwargs)

        uvic_model.set_attn_processor(Recorded("cog", backend="math"))  # Cog everywhere, checked by its formula
        out = uvic_model(x, t).sample
        assert Recorded.calls == [(2, 17, 32)] * 5  # 16 patches + the time token, in all 5 blocks
        blk = uvic_model.mid_block.attn
        h = torch.randn(2, 17, 32, dtype=torch.float64)
        q, k, v = blk.double().qkv_heads(h)
        expected = blk.proj(cog_reference(q, k, v)[0].transpose(1, 2).reshape(2, 17, 32))
        assert torch.allclose(blk(h), expected, atol=1e-12)
        assert not torch.equal(out, uvic_out)
    with caplog.at_level("WARNING"):  # the dispatcher's kernels reach the softmax blocks; Cog says so
        uvit.set_attention_backend("native")
        fresh = UViT(attention_type="cog", **sizes)
        fresh.set_attention_backend("native")
    assert [p._attention_backend for p in uvit.attn_processors.values()] == ["native"] * 5
    assert "the cog blocks keep uvic's backends (model.set_cog_backend)" in caplog.text
    sdpa = UViT(attention_type="softmax", **sizes).eval()  # no dispatcher backend: PyTorch SDPA
    sdpa.load_state_dict(uvit.state_dict())
    with torch.no_grad():
        assert torch.allclose(uvit(x, t).sample, sdpa(x, t).sample, atol=1e-6)
    pipe = tiny_pipeline()
    for switch in (pipe.enable_xformers_memory_efficient_attention, pipe.enable_attention_slicing):
        with pytest.raises(NotImplementedError, match=r"set_attention_backend\(NAME\).*set_cog_backend\('auto'"):
            switch()


def test_public_api_imports_from_the_package():
    from uvic import UViCPipeline as P, UViT as M, make_scheduler as f

    assert (P, M, f) == (UViCPipeline, UViT, make_scheduler)


# the paper samplers (noise prediction; euler-maruyama needs a VP-SDE model) are tested in test_recipes.py
DIFFUSERS_SAMPLERS = [n for n in SCHEDULERS if n not in PAPER_SAMPLERS]


@pytest.mark.parametrize("name", DIFFUSERS_SAMPLERS)
def test_every_scheduler_runs_a_few_steps(name):
    pipe = tiny_pipeline()
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
    images = pipe(batch_size=2, num_inference_steps=3, guidance_scale=1.5, generator=generators(2), output_type="np").images
    assert images.shape == (2, 8, 8, 3)
    assert images.min() >= 0 and images.max() <= 1 and not (images == images[:1]).all()


@pytest.mark.parametrize("name", DIFFUSERS_SAMPLERS)
def test_make_scheduler_carries_the_training_schedule_and_prediction_type(name):
    base = DDPMScheduler(num_train_timesteps=200, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type="v_prediction")
    scheduler = make_scheduler(name, base.config, timestep_spacing="trailing")
    assert type(scheduler) is SCHEDULERS[name][0]
    for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type"):
        assert scheduler.config[key] == base.config[key], key
    assert scheduler.config.timestep_spacing == "trailing"
    assert torch.allclose(scheduler.alphas_cumprod, base.alphas_cumprod)


def test_unknown_scheduler_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown scheduler 'dpm'.*ddim.*dpm\\+\\+2m.*unipc"):
        make_scheduler("dpm", DDPMScheduler().config)


def test_guidance_one_is_the_conditional_model_alone():
    pipe = tiny_pipeline(scheduler=DDIMScheduler(num_train_timesteps=100))
    labels = torch.tensor([2, 0])
    images = pipe(batch_size=2, num_inference_steps=3, class_labels=labels, guidance_scale=1.0,
                  generator=generators(2), output_type="pt").images

    # The same DDIM loop by hand, with one conditional forward pass per step.
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(3)
    x = torch.cat([torch.randn((1, 3, 8, 8), generator=g) for g in generators(2)])
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(pipe.transformer(x, t, class_labels=labels).sample, t, x).prev_sample
    assert torch.allclose(images, (x / 2 + 0.5).clamp(0, 1), atol=1e-6)

    guided = pipe(batch_size=2, num_inference_steps=3, class_labels=labels, guidance_scale=3.0,
                  generator=generators(2), output_type="pt").images
    assert (guided - images).abs().max() > 1e-3


def test_u_vit_scale_0_4_is_guidance_1_4_and_zero_is_the_null_class():
    pipe = tiny_pipeline()
    x, t, labels = torch.randn(3, 3, 8, 8), torch.tensor(50), torch.tensor([0, 1, 3])
    null = torch.full_like(labels, 4)  # num_classes=5: real classes 0..3, null label 4
    with torch.no_grad():
        cond = pipe.transformer(x, t, class_labels=labels).sample
        uncond = pipe.transformer(x, t, class_labels=null).sample
        assert torch.allclose(pipe.predict(x, t, labels, 1.4), cond + 0.4 * (cond - uncond), atol=1e-5)
        assert torch.allclose(pipe.predict(x, t, labels, 0.0), uncond, atol=1e-6)


@pytest.mark.parametrize("name", ["ddpm", "euler-a", "dpm++2m-sde"])
def test_a_sample_depends_on_its_generator_not_on_its_batch(name):
    """Stochastic samplers too: the noise of every step comes from the sample's own generator."""
    pipe = tiny_pipeline()
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
    labels = [1, 2, 3, 0]
    kwargs = dict(num_inference_steps=3, guidance_scale=1.5, output_type="pt")
    whole = pipe(batch_size=4, class_labels=labels, generator=generators(4), **kwargs).images
    first = pipe(batch_size=1, class_labels=labels[:1], generator=generators(1), **kwargs).images
    rest = pipe(batch_size=3, class_labels=labels[1:], generator=generators(3, offset=1), **kwargs).images
    assert torch.allclose(whole, torch.cat([first, rest]), atol=1e-6)


def test_class_labels_one_int_for_the_batch_and_bad_labels():
    pipe = tiny_pipeline()
    assert pipe.check_inputs(3, 2, 1.0).tolist() == [2, 2, 2]
    assert pipe.check_inputs(5, None, 1.0).tolist() == [0, 1, 2, 3, 0]
    with pytest.raises(ValueError, match="class labels must lie in 0..3, got 0..4"):
        pipe(batch_size=2, class_labels=[0, 4], num_inference_steps=1)
    with pytest.raises(ValueError, match="got 3 class labels for batch_size=2"):
        pipe(batch_size=2, class_labels=[0, 1, 2], num_inference_steps=1)
    with pytest.raises(ValueError, match="got 1 generators for batch_size=2"):
        pipe(batch_size=2, generator=generators(1), num_inference_steps=1)


def test_unconditional_model_refuses_labels_and_guidance():
    pipe = tiny_pipeline(num_classes=0)
    assert pipe.num_real_classes == 0
    assert pipe(batch_size=2, num_inference_steps=2, output_type="pt").images.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="unconditional: class_labels must be None"):
        pipe(batch_size=1, class_labels=[0], num_inference_steps=1)
    with pytest.raises(ValueError, match="guidance needs a class-conditional model; got guidance_scale=1.5"):
        pipe(batch_size=1, guidance_scale=1.5, num_inference_steps=1)


def test_latent_model_decodes_through_its_vae_and_saves_it(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        sample_size=16, scaling_factor=0.5).eval()
    model = UViT(**{**TINY, "in_channels": 4}, num_classes=3).eval()
    pipe = UViCPipeline(transformer=model, scheduler=DDPMScheduler(num_train_timesteps=100, clip_sample=False), vae=vae)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.image_shape == (3, 16, 16)
    images = pipe(batch_size=2, num_inference_steps=2, generator=generators(2), output_type="pt").images
    assert images.shape == (2, 3, 16, 16)
    pipe.save_pretrained(tmp_path / "final")
    loaded = UViCPipeline.from_pretrained(tmp_path / "final")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.vae, AutoencoderKL) and loaded.vae.config.scaling_factor == 0.5
    assert torch.equal(loaded(batch_size=2, num_inference_steps=2, generator=generators(2), output_type="pt").images, images)


def test_non_finite_samples_fail_with_one_message():
    pipe = tiny_pipeline()
    with torch.no_grad():
        pipe.transformer.decoder_pred.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="DDPMScheduler produced non-finite samples"):
        pipe(batch_size=1, num_inference_steps=2)


def test_timestep_offset_shifts_what_the_model_sees_and_is_saved(tmp_path):
    """Reference discrete-time U-ViT checkpoints were trained on timesteps 1..N (offset 1)."""
    pipe = tiny_pipeline()
    shifted = UViCPipeline(transformer=pipe.transformer, scheduler=pipe.scheduler, timestep_offset=1)
    x, labels = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    t = torch.tensor(10)
    with torch.no_grad():
        assert torch.equal(shifted.predict(x, t, labels, 1.0), pipe.transformer(x, 11, class_labels=labels).sample)
        assert not torch.allclose(pipe.predict(x, t, labels, 1.0), shifted.predict(x, t, labels, 1.0))
    shifted.save_pretrained(tmp_path / "final")
    assert UViCPipeline.from_pretrained(tmp_path / "final").config.timestep_offset == 1


@pytest.mark.parametrize("side, cell", [(8, 64), (24, 72), (100, 100)])  # x8, x3 (ceil 64/24), as is
def test_grids_are_saved_upscaled_to_cells_of_at_least_64_pixels(tmp_path, side, cell):
    images = torch.rand(6, 3, side, side)
    path = save_grid(images, tmp_path / "g.png", nrow=3, padding=2)
    grid = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)
    assert grid.shape == (3, 2 * (cell + 2) + 2, 3 * (cell + 2) + 2)
    first = grid[:, 2 : 2 + cell, 2 : 2 + cell].float()  # nearest-neighbour: each pixel a k x k block
    k = cell // side
    assert torch.equal(first, first[:, ::k, ::k].repeat_interleave(k, 1).repeat_interleave(k, 2))
