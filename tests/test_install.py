"""The built wheel's package data, repository-relative paths in the committed docs, the tested dependency set (requirements/lock.txt), the doctor's comparison with it, and values from accelerate /
torch.distributed taken whichever form a version returns."""

import configparser
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from uvic import doctor
from uvic.fsdp import plain_tensor

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock.txt"


def requirement_names(lines):
    return {re.split(r"[<>=!~ \[;]", line.strip())[0].lower().replace("_", "-") for line in lines if line.strip()}


def test_the_lock_pins_every_dependency_of_setup_cfg_and_torch_by_version_only():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    needed = requirement_names(setup["options"]["install_requires"].splitlines())
    needed |= requirement_names(setup["options.extras_require"]["dev"].splitlines())
    pins = doctor.locked_versions(str(LOCK))
    assert needed <= pins.keys(), needed - pins.keys()
    text = LOCK.read_text()
    assert re.search(r"^torch==[\d.]+$", text, re.M) and "+cpu" not in text and "+cu" not in text
    assert "--index-url" not in text and "--find-links" not in text and "pip-compile" in text  # made by the tool


def test_doctor_names_the_packages_that_differ_from_the_lock(tmp_path):
    einops = metadata.version("einops")
    lock = tmp_path / "lock.txt"
    lock.write_text(f"einops=={einops}\n    # via uvic\ntimm==0.0.1\n    # via uvic\nno-such-package==1.0\n")
    lines = doctor.lock_report(str(lock))
    assert any(line.startswith("| timm |") and "(differs)" in line and "| 0.0.1 |" in line for line in lines)
    assert any(line.startswith("| einops |") and "(differs)" not in line for line in lines)
    summary = [line for line in lines if line.startswith("differ from")]
    assert summary and "timm" in summary[0] and "no-such-package not installed" in summary[0]
    assert "einops" not in summary[0]
    lock.write_text(f"einops=={einops}\n")
    assert lock_ok(doctor.lock_report(str(lock)))


def lock_ok(lines):
    return any(line.startswith("every installed package") for line in lines)


def test_doctor_on_this_install_compares_with_the_shipped_lock():
    result = subprocess.run([sys.executable, "-m", "uvic.doctor", "--configs", str(REPO / "configs" / "digits_uvic.yaml"),
                             "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| torch |" in result.stdout and ("differ from requirements/lock.txt" in result.stdout or lock_ok(
        result.stdout.splitlines()))


def test_plain_tensor_takes_a_dtensor_a_tensor_or_a_number():
    assert torch.equal(plain_tensor(torch.tensor(2.5)), torch.tensor(2.5))
    assert plain_tensor(3.0).item() == 3.0 and plain_tensor(None).item() == 0.0
    # a replicated DTensor, as clip_grad_norm_ under FSDP2 returned it before accelerate 1.16 (1 gloo rank)
    code = (
        "import os, torch, torch.distributed as dist\n"
        "from torch.distributed.device_mesh import init_device_mesh\n"
        "from torch.distributed.tensor import Replicate, distribute_tensor\n"
        "from uvic.fsdp import plain_tensor\n"
        "dist.init_process_group('gloo', rank=0, world_size=1)\n"
        "d = distribute_tensor(torch.tensor(1.75), init_device_mesh('cpu', (1,)), [Replicate()])\n"
        "v = plain_tensor(d)\n"
        "assert type(v) is torch.Tensor and v.item() == 1.75, (type(v), v)\n"
        "dist.destroy_process_group()\n")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_built_wheel_ships_the_pinned_digits_classifier(tmp_path):
    import hashlib
    import zipfile

    from uvic import digits_classifier

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("uvic-*.whl")
    with zipfile.ZipFile(wheel) as z:
        data = z.read(f"uvic/assets/{digits_classifier.WEIGHTS_FILE}")  # KeyError: not in the wheel
    assert hashlib.sha256(data).hexdigest() == digits_classifier.WEIGHTS_SHA256


def test_committed_docs_results_and_configs_name_no_folder_of_one_machine():
    # results record where samples and runs were: repository-relative (runs/...), so the commands rerun from a clone
    machine_path = re.compile(r"(?<![\w.~])/(work|tmp|home|root|Users|mnt|check|scratch)/")
    files = [REPO / "README.md", *REPO.glob("docs/**/*"), *REPO.glob("configs/**/*")]
    found = [f"{path.relative_to(REPO)}:{n}" for path in files if path.is_file() and path.suffix != ".png"
             for n, line in enumerate(path.read_text().splitlines(), 1) if machine_path.search(line)]
    assert not found, f"absolute paths of one machine in committed files: {found[:5]}"
