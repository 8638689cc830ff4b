"""Validate a GPU for uvic within one short loan: kernel correctness, attention speed, train.py, sampling.

    python benchmarks/gpu_check.py                         # first CUDA device; prints its expected duration
    python benchmarks/gpu_check.py --deadline 600          # the default: stop starting sections after 10 min
    python benchmarks/gpu_check.py --device cpu --tiny     # the same script end to end in about a minute (a test)

Every section runs in its own fresh process with a timeout (the smaller of its budget and what is left
before --deadline), so an exception, a hang or a sticky CUDA fault costs that section only. Each row
is written to <out>/report.json and <out>/report.md the moment it is measured (default out:
gpu_check/), with the Cog backend that actually ran (the uvic / SDPA ops seen while it ran, not what
was asked for), the Triton self-check result and every warning. Sections, in order:

1. correctness: Cog attention of every shipped Cog config's shape (L 257 CIFAR-10 S/2, 258 ImageNet
   L and H, 334 MS-COCO with its 77 text tokens; the configs' heads and head dims) in the config's
   precision (bf16; fp32 with TF32 for CIFAR-10) against autograd through the float64 formula, O and
   dQ/dK/dV, through `auto` and "triton"; then S = 0 (exact zeros), |S| ~ 1e4, a key mask,
   B·H > 65,535 and offsets past 2^31 elements.
2. attention: forward and forward+backward time and peak memory of Cog attention (auto, lean)
   against SDPA (flash on CUDA) at those shapes, batch 32 (median of alternating rounds).
3. training: one `train.py` run of 2 steps for U-ViT-H/2 and U-ViC-H/2 (configs as shipped: bf16,
   gradient checkpointing) in a fresh process each, on synthetic latents made by `uvic.latents
   extract` with a random-weight VAE.
4. sampling: 50-step guided dpm++2m sampling throughput of U-ViT vs U-ViC latent L/2 (median of
   3 runs, no VAE decode).

Only the kernels these rows use get compiled. Exit status 0 when every correctness row passed.
UVIC_GPU_CHECK_FAULTS=section=hang|raise[,...] makes a section hang or raise after its first row
(tests of this script).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)  # the sibling benchmark scripts
import attention as attention_bench  # noqa: E402

from uvic import attention, doctor  # noqa: E402
from uvic.attention import cog_attention, cog_reference, triton_problem  # noqa: E402

SECTIONS = ("correctness", "attention", "training", "sampling")
EXPECTED_SECONDS = {  # section -> (one H100/H200, --tiny on a CPU); a section may take BUDGET_FACTOR times that
    "correctness": (90, 25), "attention": (75, 20), "training": (200, 60), "sampling": (60, 20)}
BUDGET_FACTOR = 2.0
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {"fp32": 1e-3, "tf32": 2e-2, "fp16": 2e-2, "bf16": 6e-2}  # of max |reference|
TINY_SHAPES = [dict(configs="tiny", length=17, heads=2, head_dim=16, precision="fp32")]


# ---------------------------------------------------------------------------------- what ran
OP_BACKENDS = {"uvic::cog_triton": "triton", "uvic::cog_chunked": "chunked",
               "aten::_scaled_dot_product_flash_attention": "sdpa-flash",
               "aten::_scaled_dot_product_efficient_attention": "sdpa-mem-efficient",
               "aten::_scaled_dot_product_cudnn_attention": "sdpa-cudnn",
               "aten::_scaled_dot_product_flash_attention_for_cpu": "sdpa-cpu",
               "aten::_scaled_dot_product_attention_math": "sdpa-math"}


class AttentionOpsSeen(TorchDispatchMode):
    """Records which attention implementations run (uvic's custom ops, SDPA's kernels)."""

    def __init__(self):
        super().__init__()
        self.backends = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = OP_BACKENDS.get(func._schema.name)
        if name == "chunked" and args[5]:  # keep_weights: the "lean" backend
            name = "lean"
        if name:
            self.backends.add(name)
        return func(*args, **(kwargs or {}))


def backend_used(fn) -> str:
    """The attention implementations fn() ran; "unfused" when no uvic op nor SDPA kernel was seen."""
    with AttentionOpsSeen() as seen:
        fn()
    return "+".join(sorted(seen.backends)) or "unfused"


@contextlib.contextmanager
def observed(row: dict, device: torch.device, dtype: torch.dtype, head_dim: int):
    """Adds to row every warning raised inside and the Triton self-check result of its key."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        except Exception as error:  # recorded; the section goes on with its next row
            row.update(ok=False, error=f"{type(error).__name__}: {error}"[:400])
    check = attention._SELF_CHECKS.get((str(device), dtype, head_dim), "not run")
    row["self-check"] = "passed" if check is None else check
    row["warnings"] = sorted({f"{w.category.__name__}: {w.message}"[:300] for w in caught})


def precision_context(precision: str):
    """TF32 on for "tf32" rows (CIFAR-10 fp32 with TF32), as torch's flag would set it for a run."""
    if precision != "tf32":
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def tf32():
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old

    return tf32()


# ---------------------------------------------------------------------------------- shapes
def real_shapes() -> list:
    """The attention shapes of the shipped Cog configs: one entry per (L, heads, head dim, precision)."""
    from uvic.config import load_config, resolve_model  # noqa: PLC0415

    shapes = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*uvic*.yaml"))):
        if os.path.basename(path).startswith("digits"):  # CPU-sized demo configs
            continue
        cfg = resolve_model(load_config(path))
        m = cfg.model
        length = (m.sample_size // m.patch_size) ** 2 + 1 + ((m.num_classes or 0) > 0)
        length += m.get("num_context_tokens", 0) if (m.get("context_dim") or 0) > 0 else 0
        precision = {"bf16": "bf16", "fp16": "fp16"}.get(cfg.train.get("mixed_precision"), "tf32")
        key = (length, m.num_heads, m.embed_dim // m.num_heads, precision)
        shapes.setdefault(key, []).append(os.path.basename(path).removesuffix(".yaml"))
    return [dict(configs=" ".join(names), length=key[0], heads=key[1], head_dim=key[2], precision=key[3])
            for key, names in shapes.items()]


def packed_qkv(batch, shape, device, dtype, seed=0):
    """(B, L, 3, H, D) packed qkv as the model makes it, drawn on the device."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(batch, shape["length"], 3, shape["heads"], shape["head_dim"], generator=g, device=device,
                       dtype=dtype)


def heads(qkv):
    return [qkv[:, :, i].transpose(1, 2) for i in range(3)]  # (B, H, L, D) strided views


def relative_error(x, ref) -> float:
    x, ref = x.detach().double(), ref.detach()
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


# ---------------------------------------------------------------------------------- 1. correctness
def compare(row, backend, shape, device, *, batch=2, mask=None, transform=None, rows=slice(None), grads=True):
    """Fills row with O / dQ / dK / dV errors of cog_attention(backend) against float64 autograd of the
    formula on batch entries `rows`, and the backend that ran."""
    dtype = DTYPES[shape["precision"]]
    qkv = packed_qkv(batch, shape, device, torch.float32 if batch <= 64 else dtype)  # big batches: no copies
    if transform is not None:
        qkv = transform(qkv)
    leaf = qkv.to(dtype).detach().requires_grad_(grads)
    q, k, v = heads(leaf)
    row["backend used"] = backend_used(lambda: cog_attention(q, k, v, mask=mask, backend=backend))
    out = cog_attention(q, k, v, mask=mask, backend=backend)
    ref_leaf = leaf[rows].detach().double().requires_grad_(grads)  # the formula on the very same inputs
    ref = cog_reference(*heads(ref_leaf), mask=None if mask is None else mask[rows])[0]
    errors = {"O": relative_error(out[rows], ref)}
    if grads:
        d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        got = torch.autograd.grad(out, leaf, d_out)[0][rows]
        want = torch.autograd.grad(ref, ref_leaf, d_out[rows].double())[0]
        errors.update({name: relative_error(got[:, :, i], want[:, :, i]) for i, name in enumerate(("dQ", "dK", "dV"))})
        row["finite"] = bool(torch.isfinite(out).all() and torch.isfinite(got).all())
    else:
        row["finite"] = bool(torch.isfinite(out).all())
    row.update(errors)
    row["ok"] = row["finite"] and all(e <= TOLERANCE[shape["precision"]] for e in errors.values())
    return out


def correctness_rows(p, device):
    """Every real shape through auto and "triton"; then the special cases (module docstring)."""
    for shape in p["shapes"]:
        for backend in p["backends"]:
            row = dict(case="real shape", backend=backend, **shape)
            with precision_context(shape["precision"]), observed(row, device, DTYPES[shape["precision"]],
                                                                shape["head_dim"]):
                compare(row, backend, shape, device)
            yield row
    shape = dict(p["shapes"][-1])  # the last real shape (bf16 on a GPU)
    dtype = DTYPES[shape["precision"]]
    for case, kwargs in special_cases(p, shape, device).items():
        row = dict(case=case, backend=p["backends"][-1], **shape)
        if kwargs is None:
            row.update(ok=True, skipped="needs CUDA and the memory")
            yield row
            continue
        with observed(row, device, dtype, shape["head_dim"]):
            check = kwargs.pop("check", None)
            out = compare(row, row["backend"], dict(shape, **kwargs.pop("shape", {})), device, **kwargs)
            if check is not None:
                row["ok"] = row["ok"] and bool(check(out))
        yield row


def special_cases(p, shape, device) -> dict:
    """case -> keyword arguments of `compare` (None: not run here)."""
    gpu = device.type == "cuda" and not p["tiny"]
    mask = torch.rand(2, 1, 1, shape["length"], generator=torch.Generator().manual_seed(2)).to(device) > 0.3
    mask[..., 0] = True

    def zero_scores(qkv):
        qkv = qkv.clone()
        qkv[:, 3, 1] = 0  # key 3 orthogonal to every query: its scores are exactly 0
        qkv[:, 5, 0] = 0  # query 5: every score 0, so its row of A is 0 and O = 0 there
        return qkv

    def large_scores(qkv):
        qkv = qkv / qkv.norm(dim=-1, keepdim=True)
        return torch.cat([qkv[:, :, :1] * 200, qkv[:, :, 1:2] * 400, qkv[:, :, 2:]], dim=2)  # |S| up to ~1e4

    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    big = dict(length=257, heads=16, head_dim=72)  # packed batch stride 3·1152·257: past 2^31 at batch 2420
    return {
        "S = 0 (exact zeros)": dict(transform=zero_scores, check=lambda out: bool((out[:, :, 5] == 0).all())),
        "|S| ~ 1e4": dict(transform=large_scores),
        "key mask": dict(mask=mask),
        "B·H > 65535": dict(shape=dict(length=17, heads=16), batch=4100, rows=slice(-2, None)) if gpu else None,
        "offset > 2^31": (dict(shape=big, batch=2420, rows=slice(-2, None), grads=False)
                          if gpu and free > 3 * 2420 * 257 * 3 * 1152 * 2 else None),
    }


# ---------------------------------------------------------------------------------- 2. attention
def attention_rows(p, device):
    """Cog attention (auto, lean) against SDPA at every real shape: fwd and fwd+bwd medians."""
    a = p["attn"]
    table = {"sdpa": attention_bench.backends(device)["sdpa"],
             **{name: (lambda q, k, v, name=name: cog_attention(q, k, v, backend=name)) for name in a["backends"]}}
    for shape in p["shapes"]:
        dtype = DTYPES[shape["precision"]]
        with precision_context(shape["precision"]):
            q, k, v = (t.contiguous() for t in heads(packed_qkv(a["batch"], shape, device, dtype)))
            d_out = torch.randn_like(q)
            rows = {name: dict(backend=name, batch=a["batch"], **shape) for name in table}
            times = {(name, mode): [] for name in table for mode in ("fwd", "fwd+bwd")}
            with observed(rows["auto"], device, dtype, shape["head_dim"]):
                for name, fn in table.items():
                    leaf = [t.detach().requires_grad_() for t in (q, k, v)]
                    rows[name]["backend used"] = backend_used(lambda: fn(*leaf).backward(d_out))
                for round_ in range(a["repeats"] + 1):  # alternating rounds; round 0 warms up (compiles)
                    for name, fn in table.items():
                        for mode in ("fwd", "fwd+bwd"):
                            seconds = attention_bench.timed(fn, (q, k, v), d_out, mode == "fwd+bwd", device)
                            if round_:
                                times[name, mode].append(seconds)
                for name, fn in table.items():
                    for mode in ("fwd", "fwd+bwd"):
                        median = statistics.median(times[name, mode])
                        rows[name][f"{mode} ms"] = 1e3 * median
                        rows[name][f"{mode} / sdpa"] = median / statistics.median(times["sdpa", mode])
                    peak = attention_bench.peak_bytes(fn, (q, k, v), d_out, True, device)
                    rows[name]["fwd+bwd peak MiB"] = peak / 2**20
            yield from rows.values()


# ---------------------------------------------------------------------------------- 3. training
def synthetic_latents(folder: Path, tiny: bool) -> Path:
    """A latent folder of the real shape (4 x 32 x 32 from 256 px) made by `uvic.latents extract` from
    random images with a random-weight VAE that downsamples 8x; tiny: 4 x 8 x 8 from 64 px."""
    import numpy as np  # noqa: PLC0415
    from diffusers import AutoencoderKL  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    from uvic.latents import extract_latents  # noqa: PLC0415

    resolution, count = (64, 8) if tiny else (256, 64)
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(8, 8, 8, 8), sample_size=resolution).save_pretrained(folder / "vae")
    rng = np.random.default_rng(0)
    for i in range(count):
        (folder / "images" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(image).save(folder / "images" / f"c{i % 2}" / f"{i}.png")
    return Path(extract_latents(folder / "images", folder / "latents", vae=folder / "vae", resolution=resolution,
                                batch_size=8, shard_size=count, num_workers=0, progress=False))


def train_command(config: str, out: Path, latents: Path, p) -> list:
    overrides = [f"data.path={latents}", "data.num_workers=0", "data.persistent_workers=false",
                 "data.pin_memory=false", f"train.batch_size={p['train']['batch']}", "train.grad_accum=1",
                 "train.steps=2", "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=0",
                 "eval.fid_every=0", "model.num_classes=3"]  # the synthetic data's 2 classes + the null label
    if p["tiny"]:  # the H/2 layout (long skips, checkpointing) at a CPU size
        overrides += ["model.sample_size=8", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
                      "train.mixed_precision='no'"]  # quoted: a bare no is YAML's False
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", config),
            "--output-dir", str(out), "--overwrite", *overrides]


def training_rows(p, device):
    """One fresh `train.py` process per model, as configured (module docstring)."""
    out = Path(p["out"]) / "training"
    latents = synthetic_latents(out / "data", p["tiny"])
    for name, config in (("U-ViT-H/2", "imagenet256_uvit_h2.yaml"), ("U-ViC-H/2", "imagenet256_uvic_h2.yaml")):
        row = dict(model=name, config=config, batch=p["train"]["batch"], steps=2)
        start = time.perf_counter()
        try:
            result = subprocess.run(train_command(config, out / name.replace("/", "_"), latents, p), cwd=ROOT,
                                    capture_output=True, text=True, timeout=p["train"]["timeout"])
            said = result.stdout + result.stderr
            row.update(ok=result.returncode == 0, returncode=result.returncode)
            row["backends"] = [line.strip() for line in said.splitlines() if line.startswith("Cog attention")]
            row["warnings"] = sorted({line.strip()[:300] for line in said.splitlines() if "Warning" in line})
            if result.returncode:
                row["error"] = said[-1500:]
        except subprocess.TimeoutExpired:
            row.update(ok=False, error=f"train.py did not finish within {p['train']['timeout']} s")
        row["wall s"] = time.perf_counter() - start  # process start, model build, 2 steps, final/ saved
        yield row


# ---------------------------------------------------------------------------------- 4. sampling
def sampling_rows(p, device):
    """Guided dpm++2m sampling, U-ViT vs U-ViC with the same weights, median of alternating runs."""
    from uvic.config import load_config  # noqa: PLC0415
    from uvic.diffusion import build_scheduler  # noqa: PLC0415
    from uvic.model import UViT  # noqa: PLC0415
    from uvic.pipeline import UViCPipeline, make_scheduler  # noqa: PLC0415

    s = p["sample"]
    cfg = load_config(os.path.join(ROOT, "configs", "imagenet256_uvic_l2.yaml"))
    scheduler = make_scheduler("dpm++2m", build_scheduler(cfg.diffusion).config)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    models = {}
    for label, attention_type in (("U-ViT", "softmax"), ("U-ViC", "cog")):
        model = UViT(**s["model"], attention_type=attention_type)
        if models:
            model.load_state_dict(models["U-ViT"].state_dict())
        models[label] = torch.nn.Module.to(model.eval(), device=device, dtype=dtype)
    labels = torch.arange(s["batch"]) % (s["model"]["num_classes"] - 1)
    rows = {label: dict(model=s["name"], attention=label, batch=s["batch"], steps=s["steps"], guidance=1.4)
            for label in models}
    seconds = {label: [] for label in models}
    with observed(rows["U-ViC"], device, dtype, s["model"]["embed_dim"] // s["model"]["num_heads"]):
        for label, model in models.items():
            x = torch.randn(2, s["model"]["in_channels"], s["model"]["sample_size"], s["model"]["sample_size"],
                            device=device, dtype=dtype)
            with torch.inference_mode():
                rows[label]["backend used"] = backend_used(lambda: model(x, torch.tensor([500, 500], device=device),
                                                                         class_labels=labels[:2].to(device)))
        for round_ in range(s["runs"] + 1):  # round 0: 2 steps, warms up (compiles)
            for label, model in models.items():
                pipe = UViCPipeline(transformer=model, scheduler=scheduler)
                pipe.set_progress_bar_config(disable=True)
                attention_bench.sync(device)
                start = time.perf_counter()
                pipe(batch_size=s["batch"], num_inference_steps=s["steps"] if round_ else 2, class_labels=labels,
                     guidance_scale=1.4, output_type="pt")
                attention_bench.sync(device)
                if round_:
                    seconds[label].append(time.perf_counter() - start)
    for label in models:
        rows[label]["img/s"] = s["batch"] / statistics.median(seconds[label])
        rows[label]["/ U-ViT"] = statistics.median(seconds["U-ViT"]) / statistics.median(seconds[label])
        rows[label]["runs"] = s["runs"]
    yield from rows.values()


SECTION_ROWS = {"correctness": correctness_rows, "attention": attention_rows, "training": training_rows,
                "sampling": sampling_rows}
TITLES = {"correctness": "Correctness against float64 (max |x - ref| / max |ref|)",
          "attention": "Attention against SDPA", "training": "train.py, 2 steps in a fresh process",
          "sampling": "Guided sampling (dpm++2m, w = 1.4)"}
LATENT_L2 = dict(sample_size=32, in_channels=4, patch_size=2, num_classes=1001, embed_dim=1024, depth=20,
                 num_heads=16)
TINY_MODEL = dict(sample_size=8, in_channels=1, patch_size=2, num_classes=11, embed_dim=32, depth=2, num_heads=2)


def plan(tiny: bool, device: torch.device, out: str) -> dict:
    """Every row's sizes. The Triton backend is asked for explicitly only where it can run."""
    shapes = TINY_SHAPES if tiny else real_shapes()
    backends = ["auto"]
    q = torch.zeros(1, 1, 1, shapes[0]["head_dim"], device=device)
    if importlib_available("triton") and triton_problem(q, q, q) is None:
        backends.append("triton")
    return dict(tiny=tiny, out=out, shapes=shapes, backends=backends,
                attn=dict(batch=2 if tiny else 32, backends=["auto", "lean"], repeats=1 if tiny else 10),
                train=dict(batch=2 if tiny else 32, timeout=240 if tiny else 420),
                sample=dict(name="tiny" if tiny else "latent L/2", model=TINY_MODEL if tiny else LATENT_L2,
                            batch=2 if tiny else 32, steps=2 if tiny else 50, runs=1 if tiny else 3))


def importlib_available(name: str) -> bool:
    import importlib.util  # noqa: PLC0415

    return importlib.util.find_spec(name) is not None


# ---------------------------------------------------------------------------------- the report
def atomic_write(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a reader never sees half a report


def read_rows(path: Path) -> list:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a kill
                rows.append(json.loads(line))
    return rows


def write_report(out: Path) -> dict:
    """report.json and report.md from what is on disk: the plan (meta.json), each section's rows
    (<section>.jsonl, appended by its process) and status (<section>.status.json, by the parent)."""
    meta = json.loads((out / "meta.json").read_text())
    report = {**meta, "sections": {}}
    for name in meta["sections"]:
        status_path = out / f"{name}.status.json"
        status = json.loads(status_path.read_text()) if status_path.exists() else {"status": "not started"}
        rows = read_rows(out / f"{name}.jsonl")
        if status["status"] == "not started" and rows:
            status["status"] = "running"
        report["sections"][name] = {**status, "rows": rows}
    correctness = report["sections"].get("correctness", {"status": "skipped", "rows": []})
    failed = [row for row in correctness["rows"] if not row.get("ok")]
    report["correct"] = correctness["status"] == "ok" and not failed
    verdict = ("all passed" if report["correct"] else f"{len(failed)} FAILED" if failed else
               f"incomplete (section {correctness['status']})")
    md = ["# GPU check", "", f"**Correctness: {verdict}**", "", *[f"    {line}" for line in meta["environment"]], "",
          f"device {meta['device']}, tiny {meta['tiny']}, started {meta['started']}, expected "
          f"{meta['expected_s'] / 60:.1f} min, deadline {meta['deadline_s'] / 60:.1f} min", ""]
    for name, section in report["sections"].items():
        md.append(markdown(f"{TITLES[name]}: {section['status']}" + (f" ({section['seconds']:.0f} s)"
                                                                     if "seconds" in section else ""),
                           section["rows"], section.get("error")))
    atomic_write(out / "report.json", json.dumps(report, indent=1, default=str))
    atomic_write(out / "report.md", "\n".join(md))
    return report


def markdown(title: str, rows: list, error=None) -> str:
    lines = [f"## {title}", ""]
    if error:
        lines += ["```", error.strip()[-1500:], "```", ""]
    if not rows:
        return "\n".join(lines + ["(no rows)", ""])
    keys = [key for key in dict.fromkeys(key for row in rows for key in row) if key not in ("warnings", "error")]
    cell = lambda x: f"{x:.3g}" if isinstance(x, float) else str(x).replace("|", "/")  # noqa: E731
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row.get(key, "")) for key in keys) + " |" for row in rows]
    notes = [f"- row {i + 1}: {text}" for i, row in enumerate(rows)
             for text in ([f"error: {row['error']}"] if row.get("error") else []) + row.get("warnings", [])]
    return "\n".join(lines + ([""] + notes if notes else []) + [""])


# ---------------------------------------------------------------------------------- processes
def faults() -> dict:
    """section -> "hang" | "raise" from UVIC_GPU_CHECK_FAULTS (tests of this script)."""
    spec = os.environ.get("UVIC_GPU_CHECK_FAULTS", "")
    return dict(item.split("=", 1) for item in spec.split(",") if "=" in item)


def inject(fault: str, name: str):
    if fault == "hang":
        print(f"{name}: hanging (UVIC_GPU_CHECK_FAULTS)", flush=True)
        time.sleep(1e6)
    if fault == "raise":
        raise RuntimeError(f"fault injected into section {name} (UVIC_GPU_CHECK_FAULTS)")


def run_section(name: str, args) -> None:
    """The section's rows, one by one, each appended to <out>/<name>.jsonl and the report rewritten."""
    out, device = Path(args.out), torch.device(args.device)
    fault = faults().get(name)
    rows = 0
    for row in SECTION_ROWS[name](plan(args.tiny, device, args.out), device):
        with open(out / f"{name}.jsonl", "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        write_report(out)
        rows += 1
        print(f"{name} row {rows}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                 for k, v in row.items() if k != "warnings"), flush=True)
        if fault:
            inject(fault, name)
    if fault:
        inject(fault, name)


def supervise(name: str, args, timeout: float) -> dict:
    """Runs one section in a fresh process (its own session: a timeout kills train.py children too)."""
    command = [sys.executable, os.path.abspath(__file__), "--section", name, "--device", args.device, "--out",
               args.out] + (["--tiny"] if args.tiny else [])
    log = Path(args.out) / f"{name}.log"
    start = time.perf_counter()
    with open(log, "w") as f:
        process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                   env={**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get(
                                       "PYTHONPATH", "")]).rstrip(os.pathsep)})
        try:
            code = process.wait(timeout=timeout)
            status = {"status": "ok" if code == 0 else f"failed (exit {code})"}
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=10)
                    break
            status = {"status": f"timed out after {timeout:.0f} s"}
    status["seconds"] = time.perf_counter() - start
    if status["status"] != "ok":
        status["error"] = log.read_text()[-1500:]
    return status


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: the whole script in about a minute (tests)")
    parser.add_argument("--out", default="gpu_check", help="folder for report.md and report.json")
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS)
    parser.add_argument("--deadline", type=float, default=600, help="seconds; no section starts or runs past it")
    parser.add_argument("--section-timeout", type=float, default=None,
                        help=f"seconds per section (default {BUDGET_FACTOR:g}x its expected time)")
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)  # a section's own process
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available here (use --device cpu --tiny to test the script)")
    if args.section:
        run_section(args.section, args)
        return 0
    return check(args)


def check(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = [name for name in SECTIONS if name not in args.skip]
    for name in sections:
        for suffix in (".jsonl", ".status.json", ".log"):
            (out / f"{name}{suffix}").unlink(missing_ok=True)
    expected = {name: EXPECTED_SECONDS[name][args.tiny] for name in sections}
    meta = dict(environment=doctor.versions() + doctor.gpus(), device=args.device, tiny=args.tiny,
                started=time.strftime("%Y-%m-%d %H:%M:%S"), sections=sections, expected_s=sum(expected.values()),
                deadline_s=args.deadline)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(f"gpu_check: {', '.join(sections)}; expected about {sum(expected.values()) / 60:.1f} min, deadline "
          f"{args.deadline / 60:.1f} min; {out}/report.md is rewritten after every row", flush=True)
    end = time.monotonic() + args.deadline
    for name in sections:
        left = end - time.monotonic()
        if left < 5:
            status = {"status": "skipped: deadline reached", "seconds": 0.0}
        else:
            status = supervise(name, args, min(args.section_timeout or BUDGET_FACTOR * expected[name], left))
        (out / f"{name}.status.json").write_text(json.dumps(status))
        report = write_report(out)
        print(f"{name}: {status['status']} in {status['seconds']:.0f} s, "
              f"{len(report['sections'][name]['rows'])} rows", flush=True)
    print(f"wrote {out}/report.md and report.json; correctness {'passed' if report['correct'] else 'NOT passed'}")
    return 0 if report["correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
