"""Two CPU ranks (torchrun + accelerate's CPU mode, gloo) split the global batch and end with identical weights.

Run as a script under torchrun, this file is the worker: it trains a tiny model and writes, per rank,
the micro-batch sizes it saw, a fingerprint of every image it trained on, and its final weights.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH, GRAD_ACCUM, STEPS = 16, 2, 3


def worker(out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_train import tiny

    from uvic.trainer import Trainer

    class Recording(Trainer):
        seen = []

        def compute_loss(self, images, labels):
            self.seen.append([round(float(x), 5) for x in images.flatten(1).sum(1)])  # one number per image
            return super().compute_loss(images, labels)

    trainer = Recording(tiny(f"train.batch_size={GLOBAL_BATCH}", f"train.grad_accum={GRAD_ACCUM}",
                             f"train.steps={STEPS}", "train.checkpoint_every=2"), out / "run")
    rank, processes = trainer.accelerator.process_index, trainer.accelerator.num_processes
    trainer.train()
    torch.save({k: v.detach().clone() for k, v in trainer.raw_model.state_dict().items()}, out / f"weights_{rank}.pt")
    (out / f"rank_{rank}.json").write_text(json.dumps({"processes": processes, "seen": Recording.seen}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_ranks_split_the_global_batch_and_end_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", __file__, str(tmp_path)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1)]
    per_process = GLOBAL_BATCH // (2 * GRAD_ACCUM)
    for info in ranks:
        assert info["processes"] == 2
        assert len(info["seen"]) == STEPS * GRAD_ACCUM  # micro-batches
        assert all(len(batch) == per_process for batch in info["seen"])
    images = [sorted(x for batch in info["seen"] for x in batch) for info in ranks]
    assert images[0] != images[1]  # each rank trained on its own share of every global batch
    w0, w1 = (torch.load(tmp_path / f"weights_{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert (tmp_path / "run" / "final" / "transformer").is_dir() and (tmp_path / "run" / "checkpoints" / "step_0000003").is_dir()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
