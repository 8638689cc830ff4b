from pathlib import Path

from uvic.sweep import expand_grid, is_finished, main


def test_grid_expansion_and_names():
    runs = expand_grid(["configs/digits_uvic.yaml", "configs/digits_uvit.yaml"], [0, 1], ["model.patch_size=2,4"])
    assert len(runs) == 8
    assert runs[0]["name"] == "digits_uvic__model.patch_size=2__seed=0"
    assert runs[0]["settings"] == {"model.patch_size": "2", "train.seed": "0"}


def test_dry_run_skips_finished(tmp_path, capsys):
    done = tmp_path / "digits_uvic__seed=0" / "final"
    done.mkdir(parents=True)
    (done / "model.safetensors").write_text("x")
    assert is_finished(done.parent)
    assert main(["configs/digits_uvic.yaml", "--seeds", "0", "1", "--out", str(tmp_path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "train.seed=1" in lines[0] and "digits_uvic__seed=1" in lines[0]
