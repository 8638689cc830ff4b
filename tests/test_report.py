"""uvic.report / eval_fid.py: the comparison report on two tiny runs (U-ViT and U-ViC), scoring a model
from the command line, the CSV, run specs and bad input."""

import csv
import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from uvic import evaluate, report, report_plots, report_rows, report_stats, run_specs, seed_groups, stats
from uvic.model import UViT
from uvic.pipeline import UViCPipeline

TINY = dict(sample_size=8, in_channels=1, patch_size=2, embed_dim=16, depth=2, num_heads=2)
FAST = ["--steps", "2", "--scheduler", "ddim", "--batch-size", "16"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_run(root, name, attention_type, steps=(2, 4), seed=None, train_extra=""):
    """A finished run in the run-directory layout (README.md, "Train"): config.yaml, checkpoints/step_XXXXXXX/{model,ema_model,scheduler},
    final/ (pipeline folder of the last EMA weights)."""
    run = root / name
    scheduler = DDPMScheduler(num_train_timesteps=100)
    for i, step in enumerate(steps):
        torch.manual_seed(i if seed is None else 1000 * seed + i)  # other seeds, other weights
        model = UViT(**TINY, attention_type=attention_type).eval()
        folder = run / "checkpoints" / f"step_{step:07d}"
        model.save_pretrained(folder / "model")
        model.save_pretrained(folder / "ema_model")
        scheduler.save_pretrained(folder / "scheduler")
    UViCPipeline(transformer=model, scheduler=scheduler).save_pretrained(run / "final")
    seed_line = "" if seed is None else f"  seed: {seed}\n"
    (run / "config.yaml").write_text(f"model:\n  attention_type: {attention_type}\ntrain:\n  steps: {steps[-1]}\n"
                                     f"{seed_line}{train_extra}")
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return make_run(root, "tiny_uvit", "softmax"), make_run(root, "tiny_uvic", "cog")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_compare_report_on_two_tiny_runs(runs, tmp_path):
    out = evaluate.main(["compare", str(runs[0]), str(runs[1]), "--ref", "digits", "--num-samples", "12",
                       "--kid-subset-size", "10", "--out", str(tmp_path / "cmp"), "--samples-dir", str(tmp_path / "s"),
                       *FAST])
    md = out["md"].read_text()
    assert "| tiny_uvit | U-ViT (softmax) |" in md and "| tiny_uvic | U-ViC (Cog) |" in md
    assert "12 samples, sampler ddim, 2 steps" in md and "digits (1,797 images)" in md
    params = sum(p.numel() for p in UViT(**TINY).parameters())
    assert f"| {params:,} | 4 |" in md  # parameters, steps trained (train.steps of the run)
    rows = read_csv(out["csv"])
    assert [r["model"] for r in rows] == ["tiny_uvit", "tiny_uvic"]
    assert all(float(r["fid"]) > 0 and r["kid_mean"] and r["isc_mean"] for r in rows)
    assert {r["num_samples"] for r in rows} == {"12"} and {r["sampler"] for r in rows} == {"ddim"}
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the sample sets stay, resumable: the same report again reuses them and gives the same figures
    assert (tmp_path / "s" / "tiny_uvic" / "samples.npz").is_file() and not (tmp_path / "cmp" / "samples").exists()
    again = report.compare([str(runs[0])], ref="digits", out_dir=tmp_path / "cmp", num_samples=12, steps=2,
                           scheduler="ddim", batch_size=16, kid_subset_size=10, progress=False,
                           samples_dir=tmp_path / "s")
    assert again["rows"][0]["fid"] == pytest.approx(float(rows[0]["fid"]), rel=1e-9)


def test_compare_over_checkpoints_plots_fid_against_step(runs, tmp_path):
    out = report.compare([f"{runs[0]}@all", str(runs[1])], ref="digits", out_dir=tmp_path, num_samples=10,
                         steps=2, scheduler="ddim", batch_size=16, isc=False, kid=False, checkpoints=None,
                         progress=False)
    assert [(r["model"], r["step"]) for r in out["rows"]] == [("tiny_uvit@2", 2), ("tiny_uvit@4", 4), ("tiny_uvic", 4)]
    assert "KID" not in out["md"].read_text() and out["png"].stat().st_size > 0


def svg_text(plot, *args, **kwargs) -> str:
    """The text of a figure drawn as SVG with its text kept as text (not glyph paths)."""
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none"}):
        return plot(*args, **kwargs).read_text()


def test_the_plots_and_report_say_that_runs_trained_for_different_step_counts(runs, tmp_path):
    short = make_run(tmp_path, "short", "cog", steps=(2,))  # 2 steps against tiny_uvit's 4
    opts = dict(ref="digits", num_samples=10, steps=2, scheduler="ddim", batch_size=16, isc=False, kid=False,
                bootstrap=0, progress=False, samples_dir=tmp_path / "s")
    bars = report.compare([str(runs[0]), str(short)], out_dir=tmp_path / "bars", **opts)  # one bar per run
    assert "**Runs trained for different step counts** (tiny_uvit: 4; short: 2)" in bars["md"].read_text()
    svg = svg_text(report_plots.plot_fid, bars["rows"], tmp_path / "bars.svg", groups=bars["groups"])
    assert "4 steps" in svg and "2 steps" in svg and "runs trained for different step counts: 2, 4" in svg
    curves = report.compare([f"{runs[0]}@all", str(short)], out_dir=tmp_path / "curves", **opts)  # FID vs step
    svg = svg_text(report_plots.plot_fid, curves["rows"], tmp_path / "lines.svg", groups=curves["groups"])
    assert "tiny_uvit (2–4 steps)" in svg and "short (2 steps)" in svg and "different step counts: 2, 4" in svg
    svg = svg_text(report_plots.plot_curves, curves["groups"], tmp_path / "curves.svg")
    assert "2–4 steps" in svg and "different step counts: 2, 4" in svg
    same = report.compare([str(runs[0]), str(runs[1])], out_dir=tmp_path / "same", **opts)  # both trained 4 steps
    assert "different step counts" not in same["md"].read_text()
    assert "different step counts" not in svg_text(report_plots.plot_fid, same["rows"], tmp_path / "same.svg",
                                                   groups=same["groups"])


def test_fid_over_checkpoints_of_many_runs_has_one_legend_entry_per_attention_type(tmp_path):
    def row(attention, seed, step):
        return {"model": f"digits_{attention}__seed={seed}@{step}", "attention": attention, "step": step,
                "fid": 1.0 + seed / 10 + 1000 / step, "num_samples": 10, "ref": "digits"}

    n = report_plots.MAX_RUN_LABELS // 2 + 1  # seeds per arm: 2n runs, above the limit
    rows = [row(a, seed, step) for a in ("softmax", "cog") for seed in range(n) for step in (500, 1000)]
    svg = svg_text(report_plots.plot_fid, rows, tmp_path / "many.svg")
    assert f"U-ViT (softmax): {n} runs" in svg and f"U-ViC (Cog): {n} runs" in svg and "seed=0" not in svg
    few = [r for r in rows if r["model"].split("__seed=")[1][0] in "01"]  # 4 runs: each named
    svg = svg_text(report_plots.plot_fid, few, tmp_path / "few.svg")
    assert "digits_cog__seed=1 (500–1,000 steps)" in svg and "runs</" not in svg


def test_a_digits_comparison_reports_classes_and_memorisation_per_run(runs, tmp_path):
    out = report.compare([str(runs[0]), str(runs[1])], ref="digits", out_dir=tmp_path, num_samples=10, steps=2,
                         scheduler="ddim", batch_size=16, isc=False, kid=False, bootstrap=0, progress=False)
    md = out["md"].read_text()
    assert "## Classes and memorisation" in md
    for name in ("tiny_uvit", "tiny_uvic"):
        line = next(line for line in md.splitlines() if line.startswith(f"- **{name}**: classes 0-9 ["))
        counts = json.loads(line[line.index("["):line.index("]") + 1])
        assert len(counts) == 10 and sum(counts) == 10  # every sample labelled once
    assert "nearest training digit (all split)" in md and "data.split=all saw the held-out digits" in md  # no data.split
    for row in read_csv(out["csv"]):
        counts = [int(c) for c in row["classes"].split()]
        assert sum(counts) == 10 and 0 <= float(row["class_tv"]) <= 1
        assert float(row["memorised_low"]) <= float(row["memorised"]) <= float(row["memorised_high"])
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((10, 8, 8, 3), np.uint8))  # not a digits reference: no section
    other = report.compare([str(runs[0])], ref=str(tmp_path / "ref.npz"), out_dir=tmp_path / "other",
                           num_samples=10, steps=2, scheduler="ddim", batch_size=16, isc=False, kid=False,
                           bootstrap=0, progress=False, feature_extractor="digits", download=False)
    assert "Classes and memorisation" not in other["md"].read_text()
    assert read_csv(other["csv"])[0]["classes"] == ""


@pytest.mark.parametrize("suffix, checkpoints, expected", [
    ("", None, [None]),
    ("@latest", None, ["latest"]),
    ("@2", None, ["2"]),
    ("@all", None, ["2", "4"]),
    ("", ["2", "final"], ["2", None]),
])
def test_run_spec_syntax(runs, suffix, checkpoints, expected):
    specs = run_specs.parse_run_specs(f"{runs[0]}{suffix}", checkpoints)
    assert [s.checkpoint for s in specs] == expected
    assert specs[-1].steps_trained() == (4 if expected[-1] in (None, "latest") else int(expected[-1]))


def test_eval_cli_scores_a_pipeline_folder_and_appends_a_csv_row(runs, tmp_path, capsys):
    args = [str(runs[1] / "final"), "--ref", "digits", "--num-samples", "10", "--csv", str(tmp_path / "r.csv"),
            "--samples-out", str(tmp_path / "s"), *FAST]
    first = evaluate.main(args)
    second = evaluate.main([*args, "--isc"])
    assert second["fid"] == pytest.approx(first["fid"], rel=1e-9)  # the same samples, resumed, not redrawn
    printed = capsys.readouterr().out
    assert f"FID        {first['fid']:.4f}" in printed and "IS " in printed
    rows = read_csv(tmp_path / "r.csv")  # one header, two rows
    assert len(rows) == 2 and rows[0]["model"] == "tiny_uvic" and rows[0]["attention"] == "cog"
    assert (rows[0]["sampler"], rows[0]["steps"], rows[0]["num_samples"], rows[0]["ref"]) == ("ddim", "2", "10", "digits")
    assert rows[0]["isc_mean"] == "" and float(rows[1]["isc_mean"]) >= 1


def test_eval_cli_reads_the_manifest_of_a_sample_set(runs, tmp_path, capsys):
    evaluate.main([str(runs[0] / "final"), "--ref", "digits", "--num-samples", "10", "--csv", "",
                 "--samples-out", str(tmp_path / "set"), *FAST])
    by_npz = evaluate.main([str(tmp_path / "set" / "samples.npz"), "--ref", "digits", "--csv", str(tmp_path / "r.csv"),
                          "--save-stats", str(tmp_path / "stats.npz")])
    by_folder = evaluate.main([str(tmp_path / "set"), "--ref", "digits", "--csv", str(tmp_path / "r.csv")])
    assert by_folder["fid"] == by_npz["fid"]  # a sample.py folder means its samples.npz
    for row in read_csv(tmp_path / "r.csv"):
        assert (row["sampler"], row["steps"], row["guidance"], row["num_samples"]) == ("ddim", "2", "1.0", "10")
    assert "statistics" in capsys.readouterr().out and (tmp_path / "stats.npz").is_file()


def test_eval_cli_bad_input_exits_with_one_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        evaluate.main([str(tmp_path / "nowhere"), "--ref", "digits"])
    assert err.value.code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main([str(tmp_path), "--ref", "digits", "--scheduler", "magic"])
    assert "unknown scheduler 'magic'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main([str(tmp_path)])
    assert "--ref is required" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_specs.parse_run_specs(str(tmp_path / "no_run"))
    with pytest.raises(FileNotFoundError, match=r"did not expand .*/\*/ --checkpoints all"):
        run_specs.parse_run_specs(f"{tmp_path}/*@all")  # bash leaves "runs/*@all" as it is: no file is named so
    with pytest.raises(ValueError, match="not valid"):
        run_specs.parse_run_specs(f"{tmp_path}@soon")


# ---------------------------------------------------------------------- seeds: groups, intervals, pairs
def test_group_by_seed_groups_configs_that_differ_only_in_train_seed():
    def cfg(attention, seed, lr=1e-3):
        return {"model": {"attention_type": attention}, "train": {"seed": seed, "lr": lr}}

    configs = [cfg("cog", 0), cfg("softmax", 0), cfg("cog", 1), cfg("cog", 0, lr=2e-3), None, cfg("cog", 2)]
    names = ["c_s0", "t_s0", "c_s1", "c_lr", "pipe", "c_s2"]
    rows = [{"model": n, "attention": c and c["model"]["attention_type"], "fid": float(i),
             "train_seed": c and c["train"]["seed"]} for i, (n, c) in enumerate(zip(names, configs))]
    groups = seed_groups.group_by_seed(rows, configs, [None] * 6)
    assert [[r["model"] for r in g.rows] for g in groups] == [["c_s0", "c_s1", "c_s2"], ["t_s0"], ["c_lr"], ["pipe"]]
    assert [g.name for g in groups] == ["c", "t_s0", "c_lr", "pipe"]
    assert groups[0].fid_by_seed == {0: 0.0, 1: 2.0, 2: 5.0} and groups[1].interval.low is None
    (cog, soft, cmp), = seed_groups.paired_comparisons(groups)  # c and t differ only in attention; c_lr has no partner
    assert (cog.name, soft.name, cmp.seeds, cmp.differences) == ("c", "t_s0", (0,), (0.0 - 1.0,))
    assert seed_groups._group_name(["digits_uvic__model.patch_size=2__seed=0", "digits_uvic__model.patch_size=2__seed=1"]) \
        == "digits_uvic__model.patch_size=2"  # uvic.sweep's folder names
    # the same checkpoint of two runs with equal config and seed is one run twice
    with pytest.raises(ValueError, match="same train.seed"):
        seed_groups.group_by_seed(rows[:1] * 2, configs[:1] * 2, [None, None])
    # other checkpoints are other groups
    assert len(seed_groups.group_by_seed(rows[:1] * 2, configs[:1] * 2, ["2", "4"])) == 2


def test_every_softmax_placement_pairs_with_the_u_vit_and_many_pairs_get_a_bonferroni_reading():
    def cfg(attention, seed, blocks):
        return {"model": {"attention_type": attention, "softmax_blocks": blocks}, "train": {"seed": seed}}

    # the layer-placement ablation: U-ViC placements + the U-ViT of the same seeds (its softmax_blocks is moot)
    fids = {("softmax", "first+last"): [1.0, 1.2, 1.1], ("cog", "none"): [3.0, 3.1, 3.2],
            ("cog", "second-half"): [1.5, 1.0, 1.4]}
    configs, rows = [], []
    for (attention, blocks), values in fids.items():
        for seed, fid in enumerate(values):
            configs.append(cfg(attention, seed, blocks))
            rows.append({"model": f"{attention}_{blocks}_s{seed}", "attention": attention, "fid": fid,
                         "train_seed": seed})
    groups = seed_groups.group_by_seed(rows, configs, [None] * len(rows))
    assert [g.name for g in groups] == ["softmax_first+last", "cog_none", "cog_second-half"]
    pairs = seed_groups.paired_comparisons(groups)
    assert [(c.name, s.name) for c, s, _ in pairs] == [("cog_none", "softmax_first+last"),
                                                          ("cog_second-half", "softmax_first+last")]
    assert pairs[0][2].differences == pytest.approx((2.0, 1.9, 2.1))  # U-ViC − U-ViT, seed by seed
    lines = "\n".join(report_stats.multiple_comparison_lines(pairs))
    assert "**2 comparisons.**" in lines and "97.5% each" in lines
    wide = stats.paired_difference({0: 3.0, 1: 3.1, 2: 3.2}, {0: 1.0, 1: 1.2, 2: 1.1}, confidence=0.975)
    assert wide.interval.high - wide.interval.low > pairs[0][2].interval.high - pairs[0][2].interval.low
    assert f"[{wide.interval.low:.3f}, {wide.interval.high:.3f}]: U-ViT is better (lower) than U-ViC " \
           "(the 97.5% interval excludes 0)" in lines
    assert report_stats.multiple_comparison_lines(pairs[:1]) == []  # one comparison: the 95% interval as it is


def test_runs_saved_before_an_option_existed_group_and_pair_with_newer_runs(tmp_path):
    """config.yaml is read over the schema's defaults, and null / first+last / [0, depth] are one placement."""
    old = make_run(tmp_path, "old_uvic_s0", "cog", steps=(4,), seed=0)  # a minimal config, as older versions saved
    new = make_run(tmp_path, "new_uvic_s1", "cog", steps=(4,), seed=1,
                   train_extra="  fsdp: false\n  max_nonfinite_steps: 5\n")
    text = new.joinpath("config.yaml").read_text().replace("model:\n", "model:\n  softmax_blocks: first+last\n")
    new.joinpath("config.yaml").write_text(text)
    soft = make_run(tmp_path, "uvit_s1", "softmax", steps=(4,), seed=1, train_extra="  fsdp: false\n")
    specs = [run_specs.parse_run_specs(str(r))[0] for r in (old, new, soft)]
    configs = [run_specs.run_config(s) for s in specs]
    depth = configs[0]["model"]["depth"]
    assert configs[0]["model"]["softmax_blocks"] == configs[1]["model"]["softmax_blocks"] == [0, depth]
    rows = [{"model": r.name, "attention": c["model"]["attention_type"], "fid": 1.0 + i,
             "train_seed": c["train"]["seed"]} for i, (r, c) in enumerate(zip((old, new, soft), configs))]
    groups = seed_groups.group_by_seed(rows, configs, [None] * 3)
    assert [[r["model"] for r in g.rows] for g in groups] == [["old_uvic_s0", "new_uvic_s1"], ["uvit_s1"]]
    (cog, uvit, cmp), = seed_groups.paired_comparisons(groups)
    assert cmp.seeds == (1,) and cmp.differences == (2.0 - 3.0,)
    # a config this version refuses (a newer version's key) is taken as saved, not dropped
    new.joinpath("config.yaml").write_text(text + "  from_the_future: 1\n")
    assert run_specs.run_config(run_specs.parse_run_specs(str(new))[0])["train"]["from_the_future"] == 1


@pytest.fixture(scope="module")
def seeded_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeded")
    runs = [make_run(root, f"tiny_{name}_s{seed}", attention, steps=(4,), seed=seed)
            for name, attention in (("uvit", "softmax"), ("uvic", "cog")) for seed in (0, 1, 2)]
    return runs + [make_run(root, "tiny_uvic_lr", "cog", steps=(4,), seed=0, train_extra="  lr: 0.002\n")]


def test_compare_reports_seed_groups_bootstrap_and_paired_difference(seeded_runs, tmp_path):
    out = report.compare([str(r) for r in seeded_runs], ref="digits", out_dir=tmp_path, num_samples=12, steps=2,
                         scheduler="ddim", batch_size=16, isc=False, kid=False, bootstrap=20, progress=False)
    groups = out["groups"]
    assert [(g.name, len(g.rows)) for g in groups] == [("tiny_uvit", 3), ("tiny_uvic", 3), ("tiny_uvic_lr", 1)]
    csv_rows = read_csv(out["csv"])
    assert [r["train_seed"] for r in csv_rows] == ["0", "1", "2", "0", "1", "2", "0"]
    assert all(float(r["fid_low"]) < float(r["fid_high"]) for r in csv_rows)
    fid = {r["model"]: float(r["fid"]) for r in csv_rows}
    uvic = groups[1]
    assert uvic.interval.mean == pytest.approx(np.mean([fid[f"tiny_uvic_s{s}"] for s in range(3)]))
    (cog, soft, cmp), = seed_groups.paired_comparisons(groups)  # tiny_uvic_lr differs in lr too: no partner
    assert (cog.name, soft.name, cmp.seeds) == ("tiny_uvic", "tiny_uvit", (0, 1, 2))
    assert cmp.differences == pytest.approx([fid[f"tiny_uvic_s{s}"] - fid[f"tiny_uvit_s{s}"] for s in range(3)])

    md = out["md"].read_text()
    assert "FID(U-ViC) − FID(U-ViT)" in md and "negative difference favours U-ViC" in md
    assert f"| tiny_uvic | U-ViC (Cog) | 3 | 12 | {uvic.interval.format()} |" in md
    assert f"| tiny_uvic_lr | U-ViC (Cog) | 1 | 12 | {groups[2].interval.mean:.3f} (n = 1) |" in md  # no interval
    assert f"| tiny_uvic | tiny_uvit | 3 | {cmp.interval.format('+.3f')} |" in md
    verdict = "no significant difference" if cmp.interval.contains(0.0) else "is better (lower) than"
    assert f"**Verdict:** tiny_uvic vs tiny_uvit: {cmp.verdict('U-ViC', 'U-ViT')}." in md and verdict in md
    assert "20 resamples" in md and out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_model_of_another_size_than_the_reference_is_refused_before_sampling(runs, tmp_path, capsys):
    np.savez(tmp_path / "ref16.npz", arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    with pytest.raises(SystemExit) as err:
        evaluate.main([str(runs[1] / "final"), "--ref", str(tmp_path / "ref16.npz"), "--num-samples", "4", "--offline",
                       "--samples-out", str(tmp_path / "s"), "--csv", "", *FAST])
    message = capsys.readouterr().err
    assert err.value.code == 2 and "8x8 px" in message and "16x16 px" in message and "--allow-resize" in message
    assert not (tmp_path / "s").exists()  # nothing sampled
    with pytest.raises(ValueError, match="8x8 px"):
        report.compare([str(runs[0])], ref=str(tmp_path / "ref16.npz"), out_dir=tmp_path / "cmp", num_samples=4,
                       steps=2, scheduler="ddim", isc=False, kid=False, progress=False, download=False)
    assert not (tmp_path / "cmp" / "samples").exists()


def test_a_csv_of_other_columns_is_refused_not_appended_to(tmp_path):
    other = report_rows.CSV_COLUMNS[:report_rows.CSV_COLUMNS.index("train_seed")]  # e.g. a file with fewer columns
    (tmp_path / "r.csv").write_text(",".join(other) + "\n" + ",".join("x" * len(other)) + "\n")
    before = (tmp_path / "r.csv").read_text()
    with pytest.raises(ValueError, match="has other columns"):
        report_rows.append_csv(tmp_path / "r.csv", [{"model": "new", "train_seed": 3}])
    assert (tmp_path / "r.csv").read_text() == before
    report_rows.append_csv(tmp_path / "new.csv", [{"model": "first"}])
    report_rows.append_csv(tmp_path / "new.csv", [{"model": "second", "train_seed": 3}])  # current columns: appended
    rows = read_csv(tmp_path / "new.csv")
    assert list(rows[0]) == list(report_rows.CSV_COLUMNS)
    assert [(r["model"], r["train_seed"]) for r in rows] == [("first", ""), ("second", "3")]


# ---------------------------------------------------------------------- tests, multiplicity, looks, provenance
def synthetic_groups(fids):
    """Seed groups from {(attention, name): [FID by seed]}, all arms of one config apart from the attention."""
    configs, rows = [], []
    for (attention, name), values in fids.items():
        for seed, fid in enumerate(values):
            configs.append({"model": {"attention_type": attention, "softmax_blocks": name}, "train": {"seed": seed}})
            rows.append({"model": f"{name}_s{seed}", "attention": attention, "fid": fid, "train_seed": seed,
                         "num_samples": 10})
    return seed_groups.group_by_seed(rows, configs, [None] * len(rows))


def test_paired_table_gives_the_exact_tests_effect_size_ratio_and_holm():
    from scipy import stats as scipy_stats

    groups = synthetic_groups({("softmax", "uvit"): [1.0, 1.2, 1.1], ("cog", "none"): [3.0, 3.1, 3.2],
                               ("cog", "half"): [1.5, 1.0, 1.4]})
    md = "\n".join(report_stats.statistics_lines(groups, {"bootstrap": 0}))
    # none − uvit = (2.0, 1.9, 2.1): mean 2, s = 0.1, t = 2 / (0.1 / √3); every difference positive, so the
    # exact sign-flip and Wilcoxon p are both 2 / 2³
    p_t = 2 * scipy_stats.t.sf(2 / (0.1 / 3 ** 0.5), 2)
    row = next(line for line in md.splitlines() if line.startswith("| none | uvit |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[5] == f"{p_t:.3g}" and cells[6] == "0.25" and cells[7] == "0.25"
    assert cells[8].startswith(f"{2 / 0.1:+.2f} [")  # d_z = mean / s
    ratio = (3.0 / 1.0 * 3.1 / 1.2 * 3.2 / 1.1) ** (1 / 3)  # geometric mean of the per-seed ratios
    assert cells[9].startswith(f"{ratio:.3f} [")
    # half − uvit = (0.5, −0.2, 0.3): Holm over 2 tests: the smaller p doubled, the larger max(itself, that)
    p_half = stats.paired_difference({0: 1.5, 1: 1.0, 2: 1.4}, {0: 1.0, 1: 1.2, 2: 1.1}).p_value
    assert cells[10] == f"{min(1, 2 * p_t):.3g}"
    assert f"| {max(p_half, 2 * p_t):.3g} |" in next(line for line in md.splitlines() if line.startswith("| half | uvit |"))
    assert "**Dunnett, 2 U-ViC arms against the one control uvit**" in md  # two arms share the one U-ViT


def test_dunnett_tost_and_failure_rates_in_the_report():
    rng = np.random.default_rng(0)
    base = rng.normal(1.0, 0.2, 6)
    groups = synthetic_groups({("softmax", "uvit"): list(base), ("cog", "a"): list(base + 0.4 + rng.normal(0, 0.1, 6)),
                               ("cog", "b"): list(base + rng.normal(0, 0.1, 6))})
    pairs = seed_groups.paired_comparisons(groups)
    md = "\n".join(report_stats.statistics_lines(groups, {"margin": 0.3, "fail_above": 1.3}))
    adjusted = stats.dunnett_paired({"a": groups[1].fid_by_seed, "b": groups[2].fid_by_seed}, groups[0].fid_by_seed)
    assert "**Dunnett, 2 U-ViC arms against the one control uvit**" in md
    assert f"- a − uvit: adjusted p = {adjusted['a']:.3g}" in md
    eq = stats.tost(pairs[1][2].differences, 0.3)
    assert f"- b − uvit: 90% interval [{eq.interval.low:.3f}, {eq.interval.high:.3f}], TOST p = {eq.p:.3g}" in md
    failed = sum(f > 1.3 for f in groups[1].fid_by_seed.values())
    iv = stats.binomial_interval(failed, 6)
    assert f"- a: {failed} of 6 = {iv.mean:.0%}, 95% exact interval [{iv.low:.0%}, {iv.high:.0%}]" in md


def test_unpaired_seeds_are_named_in_the_report():
    groups = synthetic_groups({("softmax", "uvit"): [1.0, 1.2, 1.1, 0.9], ("cog", "uvic"): [1.5, 1.0, 1.4]})
    md = "\n".join(report_stats.statistics_lines(groups, {}))
    assert "uvic vs uvit: unpaired, left out: uvit seed 3 (no uvic partner)." in md


def test_looks_grow_with_the_seeds_and_get_the_alpha_spending_boundary(tmp_path):
    def pairs(n):
        return seed_groups.paired_comparisons(synthetic_groups({("softmax", "uvit"): [1.0, 1.2, 1.1, 0.9][:n],
                                                           ("cog", "uvic"): [1.5, 1.0, 1.4, 1.6][:n]}))

    report_stats.record_looks(tmp_path, pairs(2))
    report_stats.record_looks(tmp_path, pairs(2))  # the same seeds again: no new look
    looks = report_stats.record_looks(tmp_path, pairs(4))
    lines = (tmp_path / report_stats.LOOKS_LOG).read_text().splitlines()
    assert len(lines) == 2 and [e["n"] for e in looks["uvic vs uvit"]] == [2, 4]
    md = "\n".join(report_stats.sequential_lines(looks))
    # no plan recorded: Pocock type at fractions 1/2, 1: z = 2.157, 2.201 (DeMets & Lan 1994) -> nominal p
    from scipy.stats import norm

    assert "No plan was recorded" in md
    assert f"| 1 | {looks['uvic vs uvit'][0]['date']} | 2 |" in md and f"| {2 * norm.sf(2.157):.3g} | no |" in md
    assert f"| {2 * norm.sf(2.201):.3g} |" in md and "No look crossed its boundary" in md


def test_a_plan_stated_with_the_first_look_holds_for_later_looks(tmp_path):
    groups = synthetic_groups({("softmax", "uvit"): [1.0, 1.2, 1.1], ("cog", "uvic"): [2.0, 2.3, 2.1]})
    (cog, soft, cmp), = seed_groups.paired_comparisons(groups)
    first = stats.paired_difference({0: 2.0, 1: 2.3}, {0: 1.0, 1: 1.2})
    report_stats.record_looks(tmp_path, [(cog, soft, first)], report_stats.parse_plan("obrien-fleming:4"))
    looks = report_stats.record_looks(tmp_path, [(cog, soft, cmp)], report_stats.parse_plan("pocock:3"))  # too late to change
    md = "\n".join(report_stats.sequential_lines(looks))
    bounds = stats.sequential_boundaries([2 / 4, 3 / 4], spending="obrien-fleming")
    assert "obrien-fleming-type alpha spending, 0.05 two-sided over at most 4" in md
    assert f"| {stats.nominal_p(bounds[1]):.3g} | {'yes' if cmp.p_value <= stats.nominal_p(bounds[1]) else 'no'} |" in md
    with pytest.raises(ValueError, match="--plan 'fleming:4' is not valid"):
        report_stats.parse_plan("fleming:4")


def test_a_first_look_under_a_plan_is_an_interim_look_with_its_boundary(tmp_path):
    def pairs(soft, cog):
        return seed_groups.paired_comparisons(synthetic_groups({("softmax", "uvit"): soft, ("cog", "uvic"): cog}))

    # Lan-DeMets O'Brien-Fleming type: alpha(t) = 2 - 2 Phi(z_{alpha/2} / sqrt t); the first boundary spends it all
    from scipy.stats import norm

    boundary_p = 2 - 2 * norm.cdf(norm.isf(0.025) / (6 / 12) ** 0.5)  # 6 of 12 pairs: 0.00557
    clear = pairs([1.0, 1.2, 1.1, 0.9, 1.0, 1.1], [2.0, 2.3, 2.1, 1.9, 2.2, 2.0])  # p far below the boundary
    md = "\n".join(report_stats.sequential_lines(
        report_stats.record_looks(tmp_path / "a", clear, report_stats.parse_plan("obrien-fleming:12"))))
    assert "(1 look in looks.jsonl)" in md and f"| 6 | {clear[0][2].p_value:.3g} | {boundary_p:.3g} | yes |" in md
    assert "Boundary crossed at look 1" in md
    weak = pairs([1.0, 1.2, 1.1, 0.9, 1.0, 1.1], [1.3, 1.2, 1.4, 1.0, 1.1, 1.3])  # 0.0056 < p < 0.05
    assert boundary_p < weak[0][2].p_value < 0.05
    md = "\n".join(report_stats.sequential_lines(
        report_stats.record_looks(tmp_path / "b", weak, report_stats.parse_plan("obrien-fleming:12"))))
    assert f"| {boundary_p:.3g} | no |" in md and "Not crossed at look 1 (6 of at most 12 paired seeds)" in md
    assert report_stats.sequential_lines(report_stats.record_looks(tmp_path / "c", weak)) == []  # no plan: one look


def test_compare_twice_over_growing_seeds_appends_looks_and_curves_over_checkpoints(tmp_path):
    runs = [make_run(tmp_path, f"lc_{name}_s{seed}", attention, steps=(2, 4), seed=seed)
            for name, attention in (("uvit", "softmax"), ("uvic", "cog")) for seed in (0, 1, 2)]
    common = dict(ref="digits", out_dir=tmp_path / "out", num_samples=10, steps=2, scheduler="ddim", batch_size=16,
                  isc=False, kid=False, bootstrap=0, progress=False, plan="pocock:3")
    report.compare([f"{r}@4" for r in runs if not r.name.endswith("s2")], **common)
    out = report.compare([f"{r}@all" for r in runs], **common)
    looks = [json.loads(line) for line in (tmp_path / "out" / report_stats.LOOKS_LOG).read_text().splitlines()]
    assert [(e["comparison"], e["n"]) for e in looks] == [("lc_uvic@4 vs lc_uvit@4", 2), ("lc_uvic@2 vs lc_uvit@2", 3),
                                                          ("lc_uvic@4 vs lc_uvit@4", 3)]
    md = out["md"].read_text()
    assert "**Sequential looks: lc_uvic@4 vs lc_uvit@4** (2 looks" in md and "pocock-type" in md
    assert "## Learning curves" in md and "![learning curves](curves.png)" in md
    assert (tmp_path / "out" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_runs_of_different_code_are_refused_unless_allowed(tmp_path, capsys):
    import subprocess

    from uvic.runs import PROVENANCE, record_provenance

    a, b = make_run(tmp_path, "code_uvit", "softmax", steps=(4,)), make_run(tmp_path, "code_uvic", "cog", steps=(4,))
    path = record_provenance(a)
    entry, = json.loads(path.read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=report.__file__.rsplit("/", 2)[0])
    assert entry["commit"] == head.stdout.strip() and entry["uvic_modified"] in (True, False)
    assert entry["packages"]["torch"] == torch.__version__.split("+")[0]  # the distribution version, no local tag
    assert len(entry["source_sha256"]) == 64 and record_provenance(a) == path and len(json.loads(path.read_text())) == 1
    other = dict(entry, source_sha256="f" * 64)
    (b / PROVENANCE).write_text(json.dumps([other]))
    with pytest.raises(SystemExit) as err:
        evaluate.main(["compare", str(a), str(b), "--ref", "digits", "--num-samples", "4", "--out", str(tmp_path / "c"),
                       "--no-isc", "--no-kid", *FAST])
    message = capsys.readouterr().err
    assert err.value.code == 2 and "different code" in message and "--allow-mixed-code" in message
    assert entry["source_sha256"][:12] in message and "ffffffffffff" in message
    assert not (tmp_path / "c").exists()  # refused before sampling
    out = report.compare([str(a), str(b)], ref="digits", out_dir=tmp_path / "c", num_samples=4, steps=2,
                         scheduler="ddim", isc=False, kid=False, bootstrap=0, progress=False, allow_mixed_code=True)
    assert "**Runs of different code grouped (--allow-mixed-code):**" in out["md"].read_text()
    # a start from scratch begins the record anew; a resume with other code would add a second entry
    (a / PROVENANCE).write_text(json.dumps([other]))
    assert len(json.loads(record_provenance(a).read_text())) == 2
    assert len(json.loads(record_provenance(a, new_run=True).read_text())) == 1
