"""Attention analysis: statistics with known answers, hooks that change nothing, the command end to end."""

import csv
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from uvic.analysis import (
    STATISTICS,
    AttentionRecorder,
    ImageSource,
    analyse,
    attention_statistics,
    load_model,
    main,
    resolve_query_tokens,
    token_similarity,
)
from uvic.diffusion import VPSDE, vp_proxy_scheduler
from uvic.model import UViT
from uvic.pipeline import UViCPipeline

TINY = dict(sample_size=8, in_channels=3, patch_size=2, embed_dim=32, depth=4, num_heads=4)


def test_pure_sink_puts_all_mass_on_one_key_with_zero_entropy():
    a = torch.zeros(1, 1, 5, 5)
    a[..., 0] = 1.0  # every query attends only to key 0 (the time token with extras=1)
    stats = attention_statistics(a, extras=1)
    assert stats["sink_score"].item() == pytest.approx(1.0)
    assert stats["extras_mass"].item() == pytest.approx(1.0)
    assert stats["entropy"].item() == pytest.approx(0.0)
    assert stats["neg_mass"].item() == 0 and stats["neg_keys"].item() == 0


def test_uniform_weights_have_maximal_entropy_and_no_sink():
    n = 6
    a = torch.full((2, 3, n, n), 1.0 / n)
    stats = attention_statistics(a, extras=2)
    assert torch.allclose(stats["entropy"], torch.full((2, 3), math.log(n)))
    assert torch.allclose(stats["sink_score"], torch.full((2, 3), 1.0 / n))
    assert torch.allclose(stats["extras_mass"], torch.full((2, 3), 2.0 / n))
    assert torch.allclose(stats["head_similarity"], torch.ones(2, 3))  # identical heads


def test_negative_mass_and_share_of_negative_keys_of_a_known_row():
    a = torch.tensor([[[[0.5, -0.3, 0.2, 0.0], [0.25, 0.25, -0.25, -0.25]]]])  # (1, 1, 2, 4), |rows| sum to 1
    stats = attention_statistics(a, extras=1)
    assert stats["neg_mass"].item() == pytest.approx((0.3 + 0.5) / 2)
    assert stats["neg_keys"].item() == pytest.approx(3 / 8)
    assert stats["sink_score"].item() == pytest.approx(0.375)  # key 0: (0.5 + 0.25) / 2
    expected_entropy = (-sum(p * math.log(p) for p in (0.5, 0.3, 0.2)) + math.log(4)) / 2
    assert stats["entropy"].item() == pytest.approx(expected_entropy, rel=1e-5)


def test_orthogonal_heads_have_zero_similarity():
    a = torch.zeros(1, 2, 3, 3)
    a[0, 0, :, 0] = 1.0
    a[0, 1, :, 1] = 1.0
    assert torch.allclose(attention_statistics(a, extras=1)["head_similarity"], torch.zeros(1, 2))


def test_heads_that_differ_only_in_sign_look_alike_but_not_signed():
    a = torch.full((1, 2, 2, 2), 0.5)
    a[0, 1, :, 1] = -0.5  # head 1 subtracts key 1 where head 0 adds it
    stats = attention_statistics(a, extras=1)
    assert torch.allclose(stats["head_similarity"], torch.ones(1, 2))
    assert torch.allclose(stats["head_similarity_signed"], torch.zeros(1, 2), atol=1e-6)


def test_token_similarity_is_one_for_collapsed_and_zero_for_orthogonal_tokens():
    collapsed = torch.randn(1, 1, 8).expand(2, 5, 8) * torch.rand(2, 5, 1).add(0.1)
    assert torch.allclose(token_similarity(collapsed), torch.ones(2), atol=1e-5)
    assert torch.allclose(token_similarity(torch.eye(4)[None]), torch.zeros(1), atol=1e-6)


@pytest.mark.parametrize("attention_type", ["softmax", "cog"])
def test_capturing_weights_leaves_model_outputs_bit_identical(attention_type):
    torch.manual_seed(0)
    model = UViT(**TINY, num_classes=3, attention_type=attention_type).eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10, 900]), torch.tensor([0, 2])
    with torch.no_grad():
        plain = model(x, t, y).sample
        captured = []
        with AttentionRecorder(model, lambda b, a: captured.append((b, a)), lambda b, h: None):
            hooked = model(x, t, y).sample
        after = model(x, t, y).sample
    assert torch.equal(plain, hooked) and torch.equal(plain, after)
    assert [b for b, _ in captured] == list(range(5))
    a = captured[1][1]
    assert a.shape == (2, 4, 2 + 16, 2 + 16)
    assert torch.allclose(a.abs().sum(-1), torch.ones(2, 4, 18), atol=1e-5)
    assert all(not blk.attn._forward_hooks and not blk._forward_hooks for blk in model.blocks)  # no cost when off


def test_softmax_model_reports_zero_negative_mass_and_cog_model_some():
    torch.manual_seed(0)
    scheduler = DDPMScheduler()
    results = {}
    for kind in ("softmax", "cog"):
        model = UViT(**TINY, attention_type=kind)
        results[kind] = analyse(model, scheduler, kind, [100, 900], num_images=3, batch_size=2, query_tokens=["center"])
    soft, cog = (r.rows() for r in (results["softmax"], results["cog"]))
    assert len(soft) == 2 * 5 * 4 and all(r["neg_mass"] == 0 and r["neg_keys"] == 0 for r in soft)
    cog_rows = [r for r in cog if r["attention_type"] == "cog"]
    assert cog_rows and all(r["neg_mass"] > 0 for r in cog_rows)
    assert all(r["neg_mass"] == 0 for r in cog if r["attention_type"] == "softmax")
    assert results["cog"].counts == {100: 3, 900: 3}
    assert results["cog"].maps[(100, 0)].shape == (4, 1, 1 + 16)


@pytest.mark.parametrize("labels, expected", [("null", [3, 3, 3]), ("data", [2, 0, 1]), ("1,2", [1, 2, 1])])
def test_class_conditional_models_get_null_data_or_given_labels(labels, expected):
    model = UViT(**TINY, num_classes=4)
    seen = []
    model.label_emb.register_forward_hook(lambda module, args, out: seen.append(args[0].tolist()))
    images = ImageSource("3 test images", 3, lambda i: (torch.zeros(3, 8, 8), [2, 0, 1][i]))
    analyse(model, DDPMScheduler(), "m", [10], images=images, num_images=3, batch_size=2, labels=labels, seed=0)
    order = torch.randperm(3, generator=torch.Generator().manual_seed(0)).tolist()  # analyse's image order
    got = seen[0] + seen[1]
    assert got == ([expected[i] for i in order] if labels == "data" else expected)


def test_query_tokens_resolve_to_token_indices_and_reject_bad_specs():
    tokens = resolve_query_tokens(["center", "corner", "time", "label", "1:3", "5"], (4, 4), extras=2)
    assert [t for _, t in tokens] == [2 + 10, 2, 1, 0, 2 + 7, 2 + 5]
    with pytest.raises(ValueError, match="outside the 4x4 patch grid"):
        resolve_query_tokens(["4:0"], (4, 4), extras=1)
    with pytest.raises(ValueError, match="unconditional"):
        resolve_query_tokens(["label"], (4, 4), extras=1)


def _save_pipeline_folder(path, **config):
    UViCPipeline(transformer=UViT(**TINY, **config), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(path)


def test_command_compares_two_models_and_writes_every_file(tmp_path):
    torch.manual_seed(0)
    _save_pipeline_folder(tmp_path / "uvit", num_classes=3)
    run = tmp_path / "runs" / "uvic"
    _save_pipeline_folder(run / "final", num_classes=3, attention_type="cog")
    assert load_model(run).model.config.attention_type == "cog"  # a folder holding final/ loads its final/
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", arr_0=images, labels=np.array([0, 1, 2, 1]))
    out = tmp_path / "out"
    main(["attention", str(tmp_path / "uvit"), str(run), "--timesteps", "5,95", "--num-images", "3",
          "--batch-size", "2", "--device", "cpu", "--data", str(tmp_path / "images.npz"), "--labels", "data",
          "--query-tokens", "center", "--dpi", "40", "--out", str(out)])
    with open(out / "stats.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["model"] for r in rows} == {"uvit", "uvic"}
    assert len(rows) == 2 * 2 * 5 * 4  # models x timesteps x blocks x heads
    assert set(STATISTICS) <= set(rows[0])
    summary = (out / "summary.md").read_text()
    assert "| uvit | uvic |" in summary and "| neg_mass | 95 | 0.000 |" in summary
    assert "3 images of 4 images from" in summary
    expected = {f"maps_{m}_{q}_t{t}.png" for m in ("uvit", "uvic") for q in ("patch2_2",) for t in (5, 95)}
    expected |= {f"stats_{s}.png" for s in STATISTICS if s != "collapse"} | {"collapse.png"}
    written = {p.name for p in out.iterdir()}
    assert expected | {"stats.csv", "summary.md"} == written
    for name in expected:
        assert (out / name).read_bytes()[:4] == b"\x89PNG" and f"]({name})" in summary


def test_command_rejects_a_bad_timestep_before_running(tmp_path, capsys):
    _save_pipeline_folder(tmp_path / "m")
    with pytest.raises(SystemExit) as exit_info:  # one `error:` line, status 2 (uvic.cli)
        main(["attention", str(tmp_path / "m"), "--timesteps", "100", "--out", str(tmp_path / "o"), "--data", "noise"])
    assert exit_info.value.code == 2 and "out of range" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):  # --debug: the exception itself
        main(["attention", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--debug"])


def test_a_continuous_time_model_is_analysed_at_the_noise_level_of_the_time_it_is_given(tmp_path):
    # U-ViT's CIFAR-10 model is a VP-SDE in continuous time t, fed 999·t. Independent of uvic's code: for x0 = 0
    # the input's variance is 1 - ᾱ(t) with ᾱ(t) = exp(-(β_min t + (β_max - β_min) t² / 2)) (Song et al. 2021,
    # eq. 33), and the time the model receives must name that same t. At diffusion index 5 the two readings
    # of "time" (5 vs 999·6/1000) differ in variance by ~28%.
    sde = VPSDE(0.1, 20.0)
    UViCPipeline(transformer=UViT(**TINY), scheduler=vp_proxy_scheduler(sde, clip_sample=False)).save_pretrained(
        tmp_path / "cifar")
    loaded = load_model(tmp_path / "cifar")
    seen = []
    loaded.model.register_forward_pre_hook(lambda module, args: seen.append((args[0].clone(), args[1].clone())))
    zeros = ImageSource("64 zero images", 64, lambda i: (torch.zeros(3, 8, 8), -1))
    for t in (5, 900):
        seen.clear()
        analyse(loaded.model, loaded.scheduler, "m", [t], images=zeros, num_images=64, batch_size=64,
                query_tokens=[], timestep_offset=loaded.timestep_offset)
        (x_t, time), = seen
        s = float(time[0]) / 999.0  # the continuous time the model was told
        expected = 1.0 - math.exp(-(0.1 * s + 0.5 * (20.0 - 0.1) * s * s))
        assert float(x_t.var()) == pytest.approx(expected, rel=0.03), (t, float(time[0]))
