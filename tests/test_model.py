"""UViT: published parameter names and counts, forward, presets, save/load, checkpointing."""

import math

import pytest
import torch
import torch.nn.functional as F

from uvic.model import PRESETS, SOFTMAX_BLOCK_PRESETS, UViT, load_reference_checkpoint, preset_config, softmax_block_indices

TINY = dict(sample_size=8, in_channels=3, patch_size=2, embed_dim=32, depth=4, num_heads=4)


def test_cifar10_s2_has_the_published_parameter_names_and_count():
    with torch.device("meta"):
        model = UViT(sample_size=32, patch_size=2, embed_dim=512, depth=12, num_heads=8)
    state = model.state_dict()
    assert len(state) == 164
    assert sum(p.numel() for p in model.parameters()) == 44_255_328
    expected = {"pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
                "decoder_pred.weight", "decoder_pred.bias", "final_layer.weight", "final_layer.bias"}
    for prefix in ["in_blocks.0.", "in_blocks.5.", "mid_block.", "out_blocks.0.", "out_blocks.5."]:
        expected |= {prefix + n for n in ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight",
                                          "attn.proj.bias", "norm2.weight", "mlp.fc1.weight", "mlp.fc2.bias"]}
    expected |= {"out_blocks.3.skip_linear.weight", "out_blocks.3.skip_linear.bias"}
    assert expected <= set(state)
    assert "in_blocks.0.attn.qkv.bias" not in state and "in_blocks.0.skip_linear.weight" not in state
    assert state["pos_embed"].shape == (1, 1 + 256, 512)


def test_time_mlp_and_label_embedding_names():
    model = UViT(**TINY, mlp_time_embed=True, num_classes=11, qkv_bias=True)
    state = model.state_dict()
    assert {"time_embed.0.weight", "time_embed.2.bias", "label_emb.weight", "in_blocks.0.attn.qkv.bias"} <= set(state)
    assert state["label_emb.weight"].shape == (11, 32)
    assert state["time_embed.0.weight"].shape == (128, 32)
    assert state["pos_embed"].shape == (1, 2 + 16, 32)


def restated_forward(model, x, t, y=None):
    """The published U-ViT forward, restated from the paper/issue text with plain ops."""
    sd = dict(model.named_parameters())
    cfg = model.config
    d, p, c = cfg.embed_dim, cfg.patch_size, cfg.in_channels
    tokens = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    b, _, gh, gw = tokens.shape
    tokens = tokens.reshape(b, d, gh * gw).transpose(1, 2)
    half = d // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    emb = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1)
    seq = [emb[:, None], tokens]
    if y is not None:
        seq.insert(0, sd["label_emb.weight"][y][:, None])
    h = torch.cat(seq, 1) + sd["pos_embed"]

    def attn(pre, h):
        q, k, v = F.linear(h, sd[pre + "attn.qkv.weight"]).reshape(b, -1, 3, cfg.num_heads, d // cfg.num_heads).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) / math.sqrt(d // cfg.num_heads)
        a = torch.sign(s) * s.abs().softmax(-1) if model.get_submodule(pre + "attn").attention_type == "cog" else s.softmax(-1)
        o = (a @ v).transpose(1, 2).reshape(b, -1, d)
        return F.linear(o, sd[pre + "attn.proj.weight"], sd[pre + "attn.proj.bias"])

    def block(pre, h, skip=None):
        if skip is not None:
            h = F.linear(torch.cat([h, skip], -1), sd[pre + "skip_linear.weight"], sd[pre + "skip_linear.bias"])
        h = h + attn(pre, F.layer_norm(h, (d,), sd[pre + "norm1.weight"], sd[pre + "norm1.bias"]))
        m = F.layer_norm(h, (d,), sd[pre + "norm2.weight"], sd[pre + "norm2.bias"])
        m = F.linear(F.gelu(F.linear(m, sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"])), sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"])
        return h + m

    skips = []
    for i in range(cfg.depth // 2):
        h = block(f"in_blocks.{i}.", h)
        skips.append(h)
    h = block("mid_block.", h)
    for i in range(cfg.depth // 2):
        h = block(f"out_blocks.{i}.", h, skips.pop())
    h = F.layer_norm(h, (d,), sd["norm.weight"], sd["norm.bias"])
    h = F.linear(h, sd["decoder_pred.weight"], sd["decoder_pred.bias"])[:, len(seq) - 1:]
    # token (i, j) holds a p x p x C patch flattened as (p1, p2, C)
    img = h.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, gh * p, gw * p)
    return F.conv2d(img, sd["final_layer.weight"], sd["final_layer.bias"], padding=1)


@pytest.mark.parametrize("attention_type", ["softmax", "cog"])
@pytest.mark.parametrize("num_classes", [0, 5])
def test_forward_matches_published_uvit(attention_type, num_classes):
    torch.manual_seed(0)
    model = UViT(**TINY, num_classes=num_classes, attention_type=attention_type).double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.0, 17.0, 999.0], dtype=torch.float64)
    y = torch.tensor([0, 4, 2]) if num_classes else None
    out = model(x, t, class_labels=y).sample
    assert out.shape == x.shape
    torch.testing.assert_close(out, restated_forward(model, x, t, y))


def test_forward_accepts_scalar_and_tensor_timesteps_and_tuple_output():
    model = UViT(**TINY).eval()
    x = torch.randn(2, 3, 8, 8)
    a = model(x, 10).sample
    torch.testing.assert_close(model(x, torch.tensor(10)).sample, a)
    torch.testing.assert_close(model(x, torch.tensor([10, 10])).sample, a)
    (b,) = model(x, 10.0, return_dict=False)
    torch.testing.assert_close(b, a)
    assert not torch.allclose(model(x, 500).sample, a)


def test_class_labels_are_checked_against_conditioning():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="class_labels"):
        UViT(**TINY, num_classes=4)(x, 1)
    with pytest.raises(ValueError, match="unconditional"):
        UViT(**TINY)(x, 1, class_labels=torch.tensor([0, 1]))


def test_softmax_blocks_layout():
    assert UViT(**TINY).attention_layout() == ["softmax"] * 5
    assert UViT(**TINY, attention_type="cog").attention_layout() == ["softmax", "cog", "cog", "cog", "softmax"]
    custom = UViT(**TINY, attention_type="cog", softmax_blocks=[2])
    assert custom.attention_layout() == ["cog", "cog", "softmax", "cog", "cog"]
    assert UViT(**TINY, attention_type="cog", softmax_blocks=[]).attention_layout() == ["cog"] * 5
    with pytest.raises(ValueError, match="0..4"):
        UViT(**TINY, attention_type="cog", softmax_blocks=[5])


def test_softmax_block_presets_map_to_block_indices():
    # depth 6: in-blocks 0 1 2, mid 3, out-blocks 4 5 6
    expected = {
        "none": [],
        "first+last": [0, 6],
        "first-half": [0, 1, 2],
        "second-half": [4, 5, 6],
        "all-but-mid": [0, 1, 2, 4, 5, 6],
    }
    assert sorted(SOFTMAX_BLOCK_PRESETS) == sorted(expected)
    for name, blocks in expected.items():
        assert softmax_block_indices(name, 6) == blocks, name
    assert softmax_block_indices(None, 6) == [0, 6]  # the default is the official layout
    model = UViT(**TINY, attention_type="cog", softmax_blocks="all-but-mid")  # depth 4: mid is block 2
    assert model.attention_layout() == ["softmax", "softmax", "cog", "softmax", "softmax"]
    assert model.config.softmax_blocks == "all-but-mid"  # the name is what the saved config keeps
    with pytest.raises(ValueError, match="not a preset.*first-half"):
        softmax_block_indices("first_half", 6)


def test_bad_architecture_fails_with_a_message():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        UViT(**{**TINY, "sample_size": 9})
    with pytest.raises(ValueError, match="attention_type"):
        UViT(**TINY, attention_type="flash")


def test_no_long_skip_and_no_final_conv():
    model = UViT(**TINY, long_skip=False, use_final_conv=False)
    names = set(model.state_dict())
    assert not any("skip_linear" in n or "final_layer" in n for n in names)
    assert model(torch.randn(1, 3, 8, 8), 3).sample.shape == (1, 3, 8, 8)


@pytest.mark.parametrize("name", [f"{n}/{p}" for n in PRESETS for p in (2, 4)])
def test_every_preset_builds_on_meta(name):
    with torch.device("meta"):
        model = UViT.from_preset(name, sample_size=32, in_channels=4, attention_type="cog")
    cfg = preset_config(name)
    d = cfg["embed_dim"]
    assert len(model.in_blocks) == len(model.out_blocks) == cfg["depth"] // 2
    assert model.pos_embed.shape == (1, 1 + (32 // cfg["patch_size"]) ** 2, d)
    assert model.decoder_pred.weight.shape == (cfg["patch_size"] ** 2 * 4, d)
    assert model.in_blocks[0].attn.num_heads == cfg["num_heads"]


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="uvit-s/2"):
        UViT.from_preset("uvit-xl/2")


def test_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = UViT(**TINY, num_classes=3, attention_type="cog", softmax_blocks=[1]).eval()
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").exists()
    loaded = UViT.from_pretrained(tmp_path / "m").eval()
    assert loaded.attention_layout() == model.attention_layout()
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    torch.testing.assert_close(loaded(x, 5, y).sample, model(x, 5, y).sample, rtol=0, atol=0)


def test_reference_checkpoint_loads_strictly(tmp_path):
    torch.manual_seed(0)
    model = UViT(**TINY, num_classes=4).eval()
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "nnet_ema.pth")
    ref_cfg = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=4, num_heads=4, mlp_ratio=4,
                   qkv_bias=False, mlp_time_embed=False, num_classes=4, use_checkpoint=True, conv=True)
    loaded = load_reference_checkpoint(tmp_path / "nnet_ema.pth", ref_cfg).eval()
    x, y = torch.randn(1, 3, 8, 8), torch.tensor([3])
    torch.testing.assert_close(loaded(x, 7, y).sample, model(x, 7, y).sample, rtol=0, atol=0)
    with pytest.raises(RuntimeError):  # strict: a wrong config does not load silently
        load_reference_checkpoint(tmp_path / "nnet_ema.pth", {**ref_cfg, "mlp_time_embed": True})


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = UViT(**TINY, attention_type="cog")
    x = torch.randn(2, 3, 8, 8)

    def grads():
        model.zero_grad()
        model(x, torch.tensor([3, 700])).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    checkpointed = grads()
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], msg=n)
