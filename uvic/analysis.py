"""Attention analysis: negative weights, attention sinks, head diversity and token collapse.

The Cog attention paper (Lv et al., arXiv 2411.07176) argues by mechanism: heads that use
negative weights to delete while they copy, fewer attention sinks, more diverse heads, less
representational collapse across depth. This module measures those in a trained U-ViT / U-ViC:

    python -m uvic.analysis attention runs/digits_uvit runs/digits_uvic --timesteps 50,500,950 --out DIR

Weights are captured by forward hooks that recompute A from each Attention module's input with the
plain reference formulas (`cog_reference` / `softmax_reference`). Hooks return nothing, so the
model's numbers are unchanged, and they exist only inside `AttentionRecorder`'s `with` block.
Statistics are reduced per batch (of A only the mapped query rows of the first image are kept), so
any model size runs in bounded memory.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from diffusers import DDPMScheduler

from .attention import MECHANISMS
from .cli import add_debug_option, command
from .config import load_config
from .data import build_dataset
from .diffusion import make_scheduler, model_time
from .files import IMAGE_EXTENSIONS
from .model import UViT
from .loading import load_pipeline
from .runs import RunDir

# statistic -> what it means (summary.md and the README quote these). All are means over images.
STATISTICS = {
    "neg_mass": "share of the absolute attention mass on negative weights: Σ|A| over A<0 / Σ|A| (0 for softmax)",
    "neg_keys": "share of (query, key) pairs whose weight is negative",
    "entropy": "entropy of a row of |A| in nats, mean over queries (uniform over L keys: log L; one key: 0)",
    "sink_score": "mass on the most-attended key: max over keys of |A| averaged over queries "
    "(uniform: 1/L; pure sink: 1)",
    "extras_mass": "mass on the time/label tokens (the first model.extras tokens), averaged over queries",
    "head_similarity": "cosine similarity of this head's rows of |A| with those of the block's other heads: "
    "where heads look (lower: more diverse heads)",
    "head_similarity_signed": "the same on the signed rows of A: where and with which sign heads look",
    "collapse": "mean pairwise cosine similarity of the patch-token representations after the block "
    "(1: all tokens alike)",
}
HEAD_STATISTICS = [s for s in STATISTICS if s != "collapse"]
CSV_FIELDS = ["model", "timestep", "block", "head", "attention_type", *STATISTICS, "sink_key"]


# ---------------------------------------------------------------------------------- statistics
def attention_statistics(a: torch.Tensor, extras: int) -> Dict[str, torch.Tensor]:
    """Per-image, per-head statistics of attention weights a (B, H, Lq, Lk) -> {name: (B, H)}.

    extras: number of leading non-patch keys (time token, label token). Also returns
    "key_mass" (B, H, Lk): |A| averaged over queries, from which the sink is read.
    """
    a = a.float()
    mag = a.abs()  # (B, H, Lq, Lk); each row sums to 1
    total = mag.sum(dim=(-2, -1)).clamp_min(1e-30)  # (B, H)
    negative = a < 0
    key_mass = mag.mean(dim=-2)  # (B, H, Lk)
    stats = {
        "neg_mass": (mag * negative).sum(dim=(-2, -1)) / total,
        "neg_keys": negative.float().mean(dim=(-2, -1)),
        "entropy": torch.special.entr(mag).sum(-1).mean(-1),
        "sink_score": key_mass.max(dim=-1).values,
        "extras_mass": key_mass[..., :extras].sum(-1),
        "head_similarity": head_similarity(mag),
        "head_similarity_signed": head_similarity(a),
        "key_mass": key_mass,
    }
    return stats


def head_similarity(a: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of each head's attention rows with the other heads' -> (B, H).

    a: (B, H, Lq, Lk). NaN for a single head.
    """
    b, h, lq, _ = a.shape
    if h == 1:
        return torch.full((b, 1), float("nan"), device=a.device)
    rows = F.normalize(a.float(), dim=-1).transpose(1, 2)  # (B, Lq, H, Lk)
    cos = rows @ rows.transpose(-2, -1)  # (B, Lq, H, H)
    self_cos = torch.diagonal(cos, dim1=-2, dim2=-1)  # (B, Lq, H): 1, or 0 for an all-zero row
    return ((cos.sum(-1) - self_cos) / (h - 1)).mean(1)  # (B, H)


def token_similarity(x: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity of tokens, x (B, N, D) -> (B,); 1 = collapsed to one direction."""
    n = x.shape[1]
    u = F.normalize(x.float(), dim=-1)
    s = u.sum(1)  # (B, D); |Σu|² = Σ_ij u_i·u_j = N + Σ_{i≠j} u_i·u_j
    return ((s * s).sum(-1) - (u * u).sum((1, 2))) / (n * (n - 1))


# ---------------------------------------------------------------------------------- capture
class AttentionRecorder:
    """Forward hooks on a UViT that hand each block's attention weights and output to callbacks.

        with AttentionRecorder(model, on_weights=f, on_output=g):
            model(x, t)          # f(block, A (B, H, L, L)), g(block, tokens (B, L, D)) per block

    Weights are recomputed from the Attention module's input with the reference formula of its
    attention_type; the hooks return None, so the model's outputs are bit-identical. Outside the
    `with` block no hook is registered.
    """

    def __init__(
        self,
        model: UViT,
        on_weights: Callable[[int, torch.Tensor], None],
        on_output: Optional[Callable[[int, torch.Tensor], None]] = None,
    ):
        self.model = model
        self.on_weights = on_weights
        self.on_output = on_output
        self._handles = []

    def __enter__(self) -> "AttentionRecorder":
        for i, blk in enumerate(self.model.blocks):
            self._handles.append(blk.attn.register_forward_hook(self._weights_hook(i)))
            if self.on_output is not None:
                self._handles.append(blk.register_forward_hook(self._output_hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _weights_hook(self, block: int):
        def hook(module, args, output):
            with torch.no_grad():
                q, k, v = module.qkv_heads(args[0])  # (B, H, L, D)
                _, a = module.mechanism.reference(q, k, v)  # the plain formula of its mechanism
                self.on_weights(block, a)

        return hook

    def _output_hook(self, block: int):
        def hook(module, args, output):
            with torch.no_grad():
                self.on_output(block, output)

        return hook


@dataclass
class ModelAnalysis:
    """Accumulated statistics of one model: sums over images, turned into means by `rows()`."""

    name: str
    layout: List[str]  # attention type per block
    extras: int
    grid: Tuple[int, int]  # patch grid (h, w)
    sums: Dict[Tuple[int, int], Dict[str, torch.Tensor]] = field(default_factory=dict)  # (t, block) -> stat -> (H,)
    collapse_sums: Dict[Tuple[int, int], float] = field(default_factory=dict)  # (t, block) -> Σ over images
    key_mass: Dict[Tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (t, block) -> (H, Lk)
    counts: Dict[int, int] = field(default_factory=dict)  # t -> images seen
    maps: Dict[Tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (t, block) -> (H, Q, Lk), first image
    query_tokens: List[Tuple[str, int]] = field(default_factory=list)  # (label, token index)
    first_input: Dict[int, torch.Tensor] = field(default_factory=dict)  # t -> x_t of the first image (C, H, W)

    def add_weights(self, t: int, block: int, a: torch.Tensor) -> None:
        stats = attention_statistics(a, self.extras)
        sums = self.sums.setdefault((t, block), {})
        for name in HEAD_STATISTICS:
            sums[name] = sums.get(name, 0) + stats[name].double().sum(0).cpu()
        self.key_mass[(t, block)] = self.key_mass.get((t, block), 0) + stats["key_mass"].double().sum(0).cpu()

    def add_tokens(self, t: int, block: int, x: torch.Tensor) -> None:
        similarity = token_similarity(x[:, self.extras :])
        self.collapse_sums[(t, block)] = self.collapse_sums.get((t, block), 0.0) + similarity.double().sum().item()

    def timesteps(self) -> List[int]:
        return list(self.counts)

    def rows(self) -> List[dict]:
        """One dict per (timestep, block, head) with the mean of every statistic (CSV_FIELDS)."""
        out = []
        for (t, block), sums in self.sums.items():
            n = self.counts[t]
            collapse = self.collapse_sums.get((t, block), float("nan")) / n
            sink_keys = self.key_mass[(t, block)].argmax(-1)
            for head in range(len(sums["neg_mass"])):
                row = dict(model=self.name, timestep=t, block=block, head=head, attention_type=self.layout[block])
                row.update({name: sums[name][head].item() / n for name in HEAD_STATISTICS})
                row.update(collapse=collapse, sink_key=int(sink_keys[head]))
                out.append(row)
        return out


# ---------------------------------------------------------------------------------- inputs
@dataclass
class LoadedModel:
    """A model to analyse, loaded as sample.py loads it (uvic.loading.load_pipeline)."""

    path: Path
    model: UViT
    scheduler: DDPMScheduler  # the forward process q(x_t | x_0) of the model's own noise schedule
    timestep_offset: int  # of a published discrete checkpoint (trained on 1..N); model_time applies it
    run_dir: Optional[Path]


def load_model(path) -> LoadedModel:
    """Any model sample.py takes (pipeline folder, run directory, checkpoint folder, published .pth), or a
    checkpoint's ema_model/ or model/ folder. The noise comes from the model's saved schedule (never a default),
    and the model sees its own time input (uvic.diffusion.model_time: 999·t for continuous-time models)."""
    path = Path(path)
    if path.is_dir() and path.name in ("ema_model", "model") and (path.parent / "scheduler").is_dir():
        pipe = load_pipeline(path.parent, ema=path.name == "ema_model")
    else:
        pipe = load_pipeline(path)
    run = RunDir.find(path) if path.is_dir() else None
    return LoadedModel(path, pipe.transformer.eval(), make_scheduler("ddpm", pipe.scheduler.config),
                       int(pipe.config.get("timestep_offset", 0) or 0), run.path if run is not None else None)


@dataclass
class ImageSource:
    """Clean images x0 in [-1, 1], (C, S, S), with labels (-1 = none): a data set, an .npz or an image folder."""

    description: str
    length: int
    get: Callable[[int], Tuple[torch.Tensor, int]]  # index -> (x0, label)

    def __len__(self) -> int:
        return self.length


def image_source_from_path(path, channels: int, size: int) -> ImageSource:
    """.npz (arr_0 NHWC uint8, optional labels) or a folder of PNG/JPEG files, resized to size x size."""
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data {path} does not exist (give 'auto', 'noise', an .npz or an image folder)")
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ValueError(f"--data {path}: images need a 1- or 3-channel model, this one has in_channels={channels}")

    def to_tensor(image: "Image.Image") -> torch.Tensor:
        image = image.convert(mode).resize((size, size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32)).reshape(size, size, channels)
        return x.permute(2, 0, 1) / 127.5 - 1  # (C, S, S)

    if path.suffix == ".npz":
        data = np.load(path)
        if "arr_0" not in data:
            raise ValueError(f"--data {path}: expected an arr_0 array (NHWC uint8), found {list(data)}")
        images = data["arr_0"]
        labels = data["labels"] if "labels" in data else np.full(len(images), -1)

        def get(i):
            return to_tensor(Image.fromarray(images[i].squeeze())), int(labels[i])

        return ImageSource(f"{len(images)} images from {path}", len(images), get)
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"--data {path}: no {'/'.join(sorted(IMAGE_EXTENSIONS))} images found")
    return ImageSource(f"{len(files)} images from {path}", len(files), lambda i: (to_tensor(Image.open(files[i])), -1))


def image_source_from_run(run_dir: Path, sample_size: int) -> ImageSource:
    """The evaluation split of the data set in a run's config.yaml (uvic.data.build_dataset)."""
    cfg = load_config(run_dir / "config.yaml", [])
    dataset = build_dataset(cfg.data, sample_size, train=False)
    name = cfg.data.get("name", "data")

    def get(i):
        x, y = dataset[i]
        return torch.as_tensor(x, dtype=torch.float32), int(y)

    return ImageSource(f"data set {name!r} of {run_dir} ({len(dataset)} images)", len(dataset), get)


# ---------------------------------------------------------------------------------- analysis
def resolve_query_tokens(specs: Sequence[str], grid: Tuple[int, int], extras: int) -> List[Tuple[str, int]]:
    """'center', 'corner', 'time', 'label', 'R:C' (patch row:col) or an int (patch index) -> (label, token)."""
    gh, gw = grid
    out = []
    for spec in specs:
        spec = str(spec).strip().lower()
        if spec == "center":
            r, c = gh // 2, gw // 2
        elif spec == "corner":
            r, c = 0, 0
        elif spec == "time":
            out.append(("time", extras - 1))
            continue
        elif spec == "label":
            if extras < 2:
                raise ValueError("query token 'label': this model is unconditional and has no label token")
            out.append(("label", 0))
            continue
        elif re.fullmatch(r"\d+:\d+", spec):
            r, c = map(int, spec.split(":"))
        elif spec.isdigit():
            r, c = divmod(int(spec), gw)
        else:
            raise ValueError(f"query token {spec!r}: use center, corner, time, label, R:C or a patch index")
        if not (0 <= r < gh and 0 <= c < gw):
            raise ValueError(f"query token {spec!r} is outside the {gh}x{gw} patch grid")
        out.append((f"patch{r}_{c}", extras + r * gw + c))
    return out


def analyse(
    model: UViT,
    scheduler,
    name: str,
    timesteps: Sequence[int],
    *,
    images: Optional[ImageSource] = None,
    num_images: int = 16,
    batch_size: int = 16,
    labels: str = "null",
    query_tokens: Sequence[str] = ("center", "corner"),
    seed: int = 0,
    device="cpu",
    progress: bool = False,
    timestep_offset: int = 0,
) -> ModelAnalysis:
    """Run noisy inputs x_t = add_noise(x0, ε, t) (or pure noise without images) through the model.

    scheduler: the model's training DDPMScheduler (its forward process); the model sees model_time(t), its own
    time input (999·(t+1)/T for a continuous-time model, t + timestep_offset for a published discrete one).

    Images and noise are drawn from `seed` in a fixed order, so models analysed with the same
    arguments see the same inputs. labels: "null" (num_classes - 1), "data" or "3,1,4" (cycled).
    """
    cfg = model.config
    grid = (cfg.sample_size // cfg.patch_size,) * 2
    result = ModelAnalysis(name=name, layout=model.attention_layout(), extras=model.extras, grid=grid)
    result.query_tokens = resolve_query_tokens(query_tokens, grid, model.extras)
    query_index = [token for _, token in result.query_tokens]
    label_fn = _label_function(labels, cfg.num_classes, images)
    steps = scheduler.config.num_train_timesteps
    bad = [t for t in timesteps if not 0 <= t < steps]
    if bad:
        raise ValueError(f"timesteps {bad} out of range: the scheduler has timesteps 0..{steps - 1}")

    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)[:num_images].tolist() if images is not None else None
    num_images = len(order) if order is not None else num_images
    current = {}

    def on_weights(block, a):
        result.add_weights(current["t"], block, a)
        if current["first"] and query_index:
            result.maps[(current["t"], block)] = a[0][:, query_index].float().cpu()  # (H, Q, Lk)

    def on_output(block, x):
        result.add_tokens(current["t"], block, x)

    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    starts = range(0, num_images, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"{name}", unit="batch")
    with torch.no_grad(), AttentionRecorder(model, on_weights, on_output):
        for start in starts:
            n = min(batch_size, num_images - start)
            if order is not None:
                items = [images.get(i) for i in order[start : start + n]]
                x0 = torch.stack([x for x, _ in items])
                if x0.shape[1:] != shape:
                    raise ValueError(
                        f"{images.description}: images have shape {tuple(x0.shape[1:])}, model {name} wants {shape}"
                    )
                data_labels = [y for _, y in items]
            else:
                x0, data_labels = None, [-1] * n
            y = label_fn(start, data_labels)
            for t in timesteps:
                noise = torch.randn((n, *shape), generator=generator)
                tt = torch.full((n,), t, dtype=torch.long)
                x_t = noise if x0 is None else scheduler.add_noise(x0, noise, tt)
                current.update(t=t, first=start == 0)
                if start == 0:
                    result.first_input[t] = x_t[0].clone()
                time = model_time(tt, scheduler.config, timestep_offset)  # (n,) the model's own time input
                model(x_t.to(device), time.to(device), class_labels=None if y is None else y.to(device))
                result.counts[t] = result.counts.get(t, 0) + n
    return result


def _label_function(labels: str, num_classes: int, images: Optional[ImageSource]):
    """-> f(start, data_labels) giving (n,) class labels, or None for an unconditional model."""
    if num_classes <= 0:
        return lambda start, data_labels: None
    labels = str(labels).strip().lower()
    if labels == "null":
        return lambda start, data_labels: torch.full((len(data_labels),), num_classes - 1, dtype=torch.long)
    if labels == "data":
        if images is None:
            raise ValueError("--labels data needs images (--data auto with a run's data set, an .npz or a folder)")
        if len(images) and images.get(0)[1] < 0:
            raise ValueError(f"--labels data: {images.description} carry no labels; use --labels null or 0,1,...")
        return lambda start, data_labels: torch.tensor(data_labels, dtype=torch.long)
    try:
        values = [int(v) for v in labels.split(",")]
    except ValueError:
        raise ValueError(f"--labels {labels!r}: use null, data or comma-separated class indices") from None
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"--labels {bad} out of range: classes are 0..{num_classes - 1} ({num_classes - 1} = null)")
    return lambda start, data_labels: torch.tensor(
        [values[(start + i) % len(values)] for i in range(len(data_labels))], dtype=torch.long
    )


# ---------------------------------------------------------------------------------- outputs
def write_stats_csv(analyses: Sequence[ModelAnalysis], path) -> List[dict]:
    rows = [row for analysis in analyses for row in analysis.rows()]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    return rows


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def _fmt(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.3f}"


def _layout_text(layout: List[str]) -> str:
    other = [i for i, a in enumerate(layout) if a != "softmax"]
    if not other:
        return f"softmax in all {len(layout)} blocks"
    soft = [i for i, a in enumerate(layout) if a == "softmax"]
    names = " / ".join(sorted({layout[i].capitalize() for i in other}))
    return f"{names} in {len(other)} of {len(layout)} blocks (softmax: {', '.join(map(str, soft)) or 'none'})"


def _average(rows: List[dict], stat: str) -> float:
    """Mean of a statistic over rows; `collapse` (one value per block) counts once, not once per head."""
    return _mean([r[stat] for r in rows if stat != "collapse" or r["head"] == 0])


def _md_row(*cells) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def _md_header(*cells) -> str:
    return _md_row(*cells) + "\n|" + "---|" * len(cells)


def write_summary(analyses, rows, path, *, inputs: str, figures: Sequence[str], sources: Sequence[str]) -> None:
    """summary.md: the models side by side (overall, Cog blocks only, per block), definitions, figures."""
    names = [a.name for a in analyses]
    timesteps = sorted({r["timestep"] for r in rows})

    def select(**match):
        return [r for r in rows if all(r[k] == v for k, v in match.items())]

    lines = [f"# Attention analysis: {' vs '.join(names)}\n",
             f"Inputs: {inputs}. Timesteps: {', '.join(map(str, timesteps))}.\n", "## Models\n",
             _md_header("", *names),
             _md_row("weights", *(f"`{s}`" for s in sources)),
             _md_row("attention", *(_layout_text(a.layout) for a in analyses)),
             _md_row("blocks × heads", *(f"{len(a.layout)} × {len(a.sums[(a.timesteps()[0], 0)]['neg_mass'])}"
                                         for a in analyses)),
             _md_row("tokens (extras + grid)", *(f"{a.extras} + {a.grid[0]}×{a.grid[1]}" for a in analyses)),
             _md_row("uniform entropy log L", *(f"{math.log(a.extras + a.grid[0] * a.grid[1]):.3f}" for a in analyses)),
             _md_row("images per timestep", *(a.counts[a.timesteps()[0]] for a in analyses)),
             "\n## Overview (mean over all blocks and heads)\n", _md_header("statistic", "t", *names)]
    for stat in STATISTICS:
        lines += [_md_row(stat, t, *(_fmt(_average(select(model=n, timestep=t), stat)) for n in names))
                  for t in timesteps]
    signed = sorted({kind for a in analyses for kind in a.layout if kind in MECHANISMS and MECHANISMS[kind].signed})
    for kind in signed:  # mechanisms whose weights can be negative (Cog)
        lines += [f"\n{kind.capitalize()} blocks only (negative weights exist only there):\n",
                  _md_header("statistic", "t", *names)]
        for stat in ("neg_mass", "neg_keys"):
            lines += [_md_row(stat, t, *(_fmt(_average(select(model=n, timestep=t, attention_type=kind), stat))
                                         for n in names)) for t in timesteps]

    lines.append("\n## Per block (mean over heads and timesteps; s = softmax block, c = Cog block)\n")
    for stat in ("neg_mass", "sink_score", "extras_mass", "entropy", "head_similarity", "head_similarity_signed",
                 "collapse"):
        lines += [f"**{stat}**\n", _md_header("block", *names)]
        for b in sorted({r["block"] for r in rows}):
            cells = []
            for n in names:
                group = select(model=n, block=b)
                cells.append(f"{_fmt(_average(group, stat))} {group[0]['attention_type'][0]}" if group else "")
            lines.append(_md_row(b, *cells))
        lines.append("")

    lines.append("## What the statistics mean\n")
    lines += [f"- `{k}`: {v}" for k, v in STATISTICS.items()]
    lines += ["- `sink_key` (stats.csv): the token receiving the most |A| over all images (0..extras-1: label/time)\n",
              "## Figures\n"]
    lines += [f"![{Path(f).stem}]({f})" for f in figures]
    Path(path).write_text("\n".join(lines) + "\n")


def _new_figure(width: float, height: float, dpi: int):
    """A matplotlib Figure on the Agg canvas (no pyplot, no global backend state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _mosaic(panels: torch.Tensor, gap_h: int, gap_w: int) -> np.ndarray:
    """(R, C, h, w) panels -> one (R (h + gap_h), C (w + gap_w)) array with NaN in the gaps."""
    r, c, h, w = panels.shape
    out = np.full((r, h + gap_h, c, w + gap_w), np.nan)
    out[:, :h, :, :w] = panels.permute(0, 2, 1, 3).numpy()
    return out.reshape(r * (h + gap_h), c * (w + gap_w))


def plot_attention_maps(analysis: ModelAnalysis, out_dir: Path, dpi: int = 80) -> List[Path]:
    """One PNG per (query token, timestep): rows = blocks, columns = heads, weights on the patch grid.

    Each panel is scaled by its own max |weight| over patches, red positive and blue negative
    around a white 0; under it, x = mass on the time/label tokens and n = negative mass of the row.
    The panels are drawn as one image (one axes), which keeps deep, many-head models fast to plot.
    """
    from matplotlib import colormaps

    gh, gw = analysis.grid
    gap_h, gap_w = max(1, math.ceil(0.45 * gh)), max(1, gw // 4)  # room for the x/n labels
    blocks, extras = len(analysis.layout), analysis.extras
    cmap = colormaps["RdBu_r"].with_extremes(bad="white")
    paths = []
    for t in analysis.timesteps():
        for qi, (label, token) in enumerate(analysis.query_tokens):
            weights = torch.stack([analysis.maps[(t, b)][:, qi] for b in range(blocks)])  # (blocks, H, Lk)
            heads = weights.shape[1]
            patches = weights[..., extras:].reshape(blocks, heads, gh, gw)
            scaled = patches / patches.abs().amax((-2, -1), keepdim=True).clamp_min(1e-12)
            mosaic = _mosaic(scaled, gap_h, gap_w)
            left, right, top, bottom = 0.75, 1.3, 0.7, 0.1  # inches: block labels | input + colour bar
            map_w = 0.75 * heads * (gw + gap_w) / gw
            map_h = map_w * mosaic.shape[0] / mosaic.shape[1]
            width, height = left + map_w + right, top + max(map_h, 2.0) + bottom
            fig = _new_figure(width, height, dpi)
            ax = fig.add_axes([left / width, (height - top - map_h) / height, map_w / width, map_h / height])
            image = ax.imshow(mosaic, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
            ax.set_frame_on(False)
            ax.xaxis.tick_top()
            ax.set_xticks([c * (gw + gap_w) + (gw - 1) / 2 for c in range(heads)])
            ax.set_xticklabels([f"head {h}" for h in range(heads)], fontsize=6)
            ax.set_yticks([b * (gh + gap_h) + (gh - 1) / 2 for b in range(blocks)])
            ax.set_yticklabels([f"block {b}\n{kind}" for b, kind in enumerate(analysis.layout)], fontsize=6)
            ax.tick_params(length=0)
            for b in range(blocks):
                for h in range(heads):
                    row = weights[b, h]
                    text = f"x{row[:extras].abs().sum():.2f} n{row.clamp_max(0).abs().sum():.2f}"
                    y = b * (gh + gap_h) + gh - 0.5 + gap_h / 2
                    ax.text(h * (gw + gap_w) + (gw - 1) / 2, y, text, ha="center", va="center", fontsize=5)
            if token >= extras:  # mark the query patch in every panel
                r, c = divmod(token - extras, gw)
                xs = [h * (gw + gap_w) + c for b in range(blocks) for h in range(heads)]
                ys = [b * (gh + gap_h) + r for b in range(blocks) for h in range(heads)]
                ax.scatter(xs, ys, marker="s", s=6, facecolors="none", edgecolors="k", linewidths=0.5)
            x_t = analysis.first_input[t]  # (C, S, S), top right
            shown = (x_t[:3] if x_t.shape[0] >= 3 else x_t[:1]).permute(1, 2, 0).clamp(-1, 1).add(1).div(2).numpy()
            side = left + map_w + 0.25
            ax_input = fig.add_axes([side / width, (height - top - 0.8) / height, 0.8 / width, 0.8 / height])
            ax_input.imshow(shown.squeeze(-1) if shown.shape[-1] == 1 else shown, cmap="gray", vmin=0, vmax=1)
            ax_input.set_title("input x_t", fontsize=6)
            ax_input.axis("off")
            bar_h = min(2.5, height - top - bottom - 1.2)
            bar_bottom = height - top - 1.1 - bar_h
            cax = fig.add_axes([(side + 0.1) / width, bar_bottom / height, 0.12 / width, bar_h / height])
            bar = fig.colorbar(image, cax=cax)
            bar.set_label("weight / panel max |weight|", fontsize=6)
            bar.ax.tick_params(labelsize=6)
            fig.suptitle(f"{analysis.name}: attention of query {label} at t={t}\n"
                         "(x = mass on time/label tokens, n = negative mass)", fontsize=8)
            path = out_dir / f"maps_{_safe(analysis.name)}_{label}_t{t}.png"
            fig.savefig(path)
            paths.append(path)
    return paths


def plot_statistic_heatmaps(analyses: Sequence[ModelAnalysis], rows: List[dict], out_dir: Path,
                            dpi: int = 80) -> List[Path]:
    """One PNG per head statistic: rows = timesteps, columns = models, each a (block x head) heatmap."""
    timesteps = sorted({r["timestep"] for r in rows})
    paths = []
    for stat in HEAD_STATISTICS:
        values = [r[stat] for r in rows if not math.isnan(r[stat])]
        vmin, vmax = (min(values), max(values)) if values else (0.0, 1.0)
        if vmax - vmin < 1e-9:
            vmax = vmin + 1e-9
        fig = _new_figure(2.2 * len(analyses) + 1.0, 2.0 * len(timesteps) + 0.6, dpi)
        axes = fig.subplots(len(timesteps), len(analyses), squeeze=False)
        image = None
        for i, t in enumerate(timesteps):
            for j, analysis in enumerate(analyses):
                blocks = len(analysis.layout)
                heads = len(analysis.sums[(t, 0)]["neg_mass"])
                grid = np.full((blocks, heads), np.nan)
                for r in rows:
                    if r["model"] == analysis.name and r["timestep"] == t:
                        grid[r["block"], r["head"]] = r[stat]
                ax = axes[i, j]
                image = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
                if blocks * heads <= 64:  # small models: print the values too
                    for (b, h), value in np.ndenumerate(grid):
                        light = (value - vmin) / (vmax - vmin) > 0.6
                        ax.text(h, b, f"{value:.2f}", ha="center", va="center", fontsize=4.5,
                                color="black" if light else "white")
                ax.set_yticks(range(blocks))
                ax.set_yticklabels([f"{b}{analysis.layout[b][0]}" for b in range(blocks)], fontsize=5)
                ax.set_xticks(range(heads))
                ax.set_xticklabels(range(heads), fontsize=5)
                if i == 0:
                    ax.set_title(analysis.name, fontsize=8)
                if j == 0:
                    ax.set_ylabel(f"t={t}\nblock", fontsize=7)
                if i == len(timesteps) - 1:
                    ax.set_xlabel("head", fontsize=7)
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.7)
        fig.suptitle(f"{stat} (block suffix: s = softmax, c = Cog)", fontsize=8)
        path = out_dir / f"stats_{stat}.png"
        fig.savefig(path)
        paths.append(path)
    return paths


def plot_collapse(analyses: Sequence[ModelAnalysis], rows: List[dict], out_dir: Path, dpi: int = 80) -> Path:
    """Mean pairwise cosine similarity of patch tokens after each block, one line per model and timestep."""
    fig = _new_figure(5.0, 3.2, dpi)
    ax = fig.subplots()
    styles = ["-", "--", ":", "-."]
    colours = ["tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown"]
    timesteps = sorted({r["timestep"] for r in rows})
    for j, analysis in enumerate(analyses):
        for i, t in enumerate(timesteps):
            curve = {}
            for r in rows:
                if r["model"] == analysis.name and r["timestep"] == t:
                    curve[r["block"]] = r["collapse"]
            blocks = sorted(curve)
            ax.plot(blocks, [curve[b] for b in blocks], styles[i % len(styles)], color=colours[j % len(colours)],
                    marker="o", markersize=3, label=f"{analysis.name} t={t}")
    ax.set_xlabel("block (in → mid → out)", fontsize=8)
    ax.set_ylabel("mean pairwise cosine similarity", fontsize=8)
    ax.set_title("representational collapse across depth (patch tokens)", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6)
    fig.tight_layout()
    path = out_dir / "collapse.png"
    fig.savefig(path)
    return path


# ---------------------------------------------------------------------------------- command line
def _model_names(paths: Sequence[str], names: Optional[str]) -> List[str]:
    if names:
        out = [n.strip() for n in names.split(",")]
        if len(out) != len(paths):
            raise ValueError(f"--names has {len(out)} names for {len(paths)} models")
    else:
        out = []
        for p in paths:  # runs/X/final -> X
            p = Path(p).resolve()
            out.append(p.parent.name if p.name in {"final", "transformer", "model", "ema_model"} and p.parent.name else p.name)
    seen = {}
    unique = []
    for n in out:
        seen[n] = seen.get(n, 0) + 1
        unique.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return unique


def _parse_timesteps(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--timesteps {text!r}: expected comma-separated integers such as 50,500,950") from None
    if not values:
        raise ValueError("--timesteps is empty")
    return list(dict.fromkeys(values))


def run_attention(args) -> List[Path]:
    """The `attention` subcommand: analyse every model, write stats.csv, summary.md and PNGs."""
    timesteps = _parse_timesteps(args.timesteps)
    query_tokens = [q for q in args.query_tokens.split(",") if q.strip()]
    if args.num_images < 1 or args.batch_size < 1:
        raise ValueError(f"--num-images and --batch-size must be >= 1, got {args.num_images} and {args.batch_size}")
    names = _model_names(args.models, args.names)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = [load_model(p) for p in args.models]
    first = loaded[0].model.config
    images = None
    if args.data == "auto":
        run_dir = next((m.run_dir for m in loaded if m.run_dir is not None), None)
        if run_dir is not None:
            try:
                images = image_source_from_run(run_dir, first.sample_size)
            except Exception as error:  # no data module yet, data not available offline, ...
                warnings.warn(f"could not load the data set of {run_dir} ({error}); using pure-noise inputs")
    elif args.data != "noise":
        images = image_source_from_path(args.data, first.in_channels, first.sample_size)
    for name, m in zip(names, loaded):  # fail fast on bad options, before any forward pass
        cfg, scheduler = m.model.config, m.scheduler
        resolve_query_tokens(query_tokens, (cfg.sample_size // cfg.patch_size,) * 2, m.model.extras)
        _label_function(args.labels, cfg.num_classes, images)
        steps = scheduler.config.num_train_timesteps
        bad = [t for t in timesteps if not 0 <= t < steps]
        if bad:
            raise ValueError(f"--timesteps {bad} out of range for {name}: its scheduler has timesteps 0..{steps - 1}")
        if images is not None and (cfg.in_channels, cfg.sample_size) != (first.in_channels, first.sample_size):
            raise ValueError(f"{name} takes {cfg.in_channels}x{cfg.sample_size}² inputs, the first model "
                             f"{first.in_channels}x{first.sample_size}²: compare models of one input shape")
    inputs = (
        f"{min(args.num_images, len(images))} images of {images.description}, noised by each model's own schedule"
        if images is not None
        else f"{args.num_images} pure Gaussian noise inputs (no data)"
    )
    inputs += f"; seed {args.seed}; class labels: {args.labels} (for class-conditional models)"

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    analyses = []
    for name, m in zip(names, loaded):
        analyses.append(
            analyse(m.model, m.scheduler, name, timesteps, images=images, num_images=args.num_images,
                    batch_size=args.batch_size, labels=args.labels, query_tokens=query_tokens,
                    seed=args.seed, device=device, progress=True, timestep_offset=m.timestep_offset)
        )
        m.model.to("cpu")
    rows = write_stats_csv(analyses, out_dir / "stats.csv")
    figures = []
    for analysis in analyses:
        figures += plot_attention_maps(analysis, out_dir, args.dpi)
    figures += plot_statistic_heatmaps(analyses, rows, out_dir, args.dpi)
    figures.append(plot_collapse(analyses, rows, out_dir, args.dpi))
    figures = [f.name for f in figures]
    described = [f"{m.path} (its own noise schedule)" for m in loaded]
    write_summary(analyses, rows, out_dir / "summary.md", inputs=inputs, figures=figures, sources=described)
    print(f"wrote {out_dir / 'stats.csv'}, {out_dir / 'summary.md'} and {len(figures)} figures")
    return [out_dir / "stats.csv", out_dir / "summary.md", *(out_dir / f for f in figures)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m uvic.analysis", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("attention", help="attention statistics, maps and collapse curves of one or more models")
    p.add_argument("models", nargs="+", help="what sample.py takes (pipeline folder, run directory, checkpoint folder, published .pth with "
                   "--reference-config there) or a checkpoint's ema_model/ folder")
    p.add_argument("--out", required=True, help="output folder for stats.csv, summary.md and PNG figures")
    p.add_argument("--timesteps", default="50,500,950", help="comma-separated diffusion timesteps (default 50,500,950)")
    p.add_argument("--num-images", type=int, default=16, help="images (noisy inputs) per timestep (default 16)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0, help="seed of the image subset and the noise (default 0)")
    p.add_argument("--query-tokens", default="center,corner",
                   help="comma-separated query tokens to map: center, corner, time, label, R:C (patch row:col) "
                   "or a patch index (default center,corner)")
    p.add_argument("--data", default="auto",
                   help="auto (the run's data set, else noise), noise, an .npz (arr_0 NHWC uint8) or an image folder")
    p.add_argument("--labels", default="null", help="class labels: null (num_classes-1), data, or e.g. 3 or 0,1,2")
    p.add_argument("--names", default=None, help="comma-separated display names (default: from the paths)")
    p.add_argument("--dpi", type=int, default=80, help="resolution of the PNG figures (default 80)")
    add_debug_option(p)
    return parser


@command("python -m uvic.analysis")
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "attention":
        run_attention(args)


if __name__ == "__main__":
    main()
