"""A new attention mechanism is one function and one registration: it trains, samples and is analysed like Cog.

The toy mechanism is sigmoid attention (Ramapuram et al. 2024, "Theory, analysis, and best practices for
sigmoid self-attention": A = σ(S − log L)), written here, outside uvic, as a researcher would.
"""

import csv
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from uvic.analysis import main as analysis_main
from uvic.attention import MECHANISMS, Attention, attention_mechanism, register_attention
from uvic.config import load_config
from uvic.pipeline import UViCPipeline
from uvic.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.sample_size=8", "model.in_channels=1", "model.patch_size=2", "model.embed_dim=32", "model.depth=2",
        "model.num_heads=2", "data.name=digits", "data.limit=64", "train.batch_size=16", "train.steps=4",
        "train.warmup_steps=2", "train.lr=1e-3", "train.log_every=2", "train.sample_every=0", "train.sample_num=4",
        "train.sample_steps=2", "train.sample_scheduler=ddim", "train.checkpoint_every=0", "train.ema_decay=0.9"]


def sigmoid_reference(q, k, v, *, scale=None, mask=None):  # (B, H, L, D) -> O (B, H, Lq, D), A (B, H, Lq, Lk)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    a = torch.sigmoid(q @ k.transpose(-2, -1) * scale - math.log(k.shape[-2]))
    return a @ v, a


@pytest.fixture
def sigmoid():
    register_attention("sigmoid", sigmoid_reference, signed=False)  # the one line
    yield
    MECHANISMS.pop("sigmoid", None)


def test_every_registered_mechanism_matches_its_float64_reference_in_values_and_gradients(sigmoid):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for name, mechanism in MECHANISMS.items():
        out = mechanism.function(q, k, v, backend="auto")
        expected, _ = mechanism.reference(q, k, v)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12, msg=name)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11, msg=name)


def test_a_registered_mechanism_trains_samples_and_is_analysed(sigmoid, tmp_path):
    out = tmp_path / "run"
    Trainer(load_config(None, TINY + ["model.attention_type=sigmoid"]), out).train()
    pipe = UViCPipeline.from_pretrained(out / "final")
    # softmax keeps the first in-block and last out-block (U-ViC's layout, model.softmax_blocks), sigmoid elsewhere
    assert pipe.transformer.attention_layout() == ["softmax", "sigmoid", "softmax"]
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    analysis_main(["attention", str(out), "--timesteps", "10", "--num-images", "2", "--batch-size", "2",
                   "--device", "cpu", "--data", "noise", "--query-tokens", "center", "--dpi", "40",
                   "--out", str(tmp_path / "analysis")])
    with open(tmp_path / "analysis" / "stats.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["attention_type"] == "sigmoid"]
    assert len(rows) == 2 and all(float(r["neg_mass"]) == 0.0 for r in rows)  # σ > 0: no negative weights
    # the analysis recomputes A with the mechanism's own reference: rows of σ(S - log L) do not sum to 1
    assert "Sigmoid in 1 of 3 blocks" in (tmp_path / "analysis" / "summary.md").read_text()


def test_an_unknown_mechanism_is_refused_with_the_registered_names():
    with pytest.raises(ValueError, match=r"model.attention_type='sigmoidal' is not a registered .* softmax, cog"):
        load_config(None, TINY + ["model.attention_type=sigmoidal"])
    with pytest.raises(ValueError, match="baseline"):
        register_attention("softmax", sigmoid_reference, signed=False)


def test_a_package_registers_its_mechanism_for_the_command_line_through_an_entry_point(tmp_path):
    # an installed package declaring `uvic.attention = relu = relu_attention:register` (its dist-info on sys.path)
    plugin = tmp_path / "plugin"
    (plugin / "relu_attention-0.1.dist-info").mkdir(parents=True)
    (plugin / "relu_attention-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: relu-attention\n"
                                                                       "Version: 0.1\n")
    (plugin / "relu_attention-0.1.dist-info" / "entry_points.txt").write_text(
        "[uvic.attention]\nrelu = relu_attention:register\n")
    (plugin / "relu_attention.py").write_text(textwrap.dedent("""
        import torch
        from uvic.attention import register_attention

        def relu_reference(q, k, v, *, scale=None, mask=None):
            a = torch.relu(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5) / k.shape[-2]
            return a @ v, a

        def register():
            register_attention("relu", relu_reference, signed=False, label="U-ViT (ReLU)")
    """))
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "train.py", "--output-dir", str(out), *TINY, "model.attention_type=relu",
                             "train.steps=2"], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "PYTHONPATH": str(plugin), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"attention_type": "relu"' in (out / "final" / "transformer" / "config.json").read_text()


def test_attention_module_names_its_mechanism(sigmoid):
    layer = Attention(16, num_heads=2, attention_type="sigmoid")
    assert layer.mechanism is attention_mechanism("sigmoid") and "sigmoid" in repr(layer)
