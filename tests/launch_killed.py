"""train.py as launched, killed (os._exit: no cleanup, like kill -9 of one rank) right after the step given by
UVIC_KILL_AT_STEP has ended, its checkpoint written. The launcher then stops the other ranks.

    torchrun --nproc_per_node 2 tests/launch_killed.py [train.py arguments]
"""

import os
import runpy
import sys
from pathlib import Path

from uvic.trainer import Trainer

KILL_AT = int(os.environ["UVIC_KILL_AT_STEP"])
on_step_end = Trainer.on_step_end


def kill_after(self, step):
    on_step_end(self, step)
    if step == KILL_AT:
        os._exit(137)


Trainer.on_step_end = kill_after
train_py = Path(__file__).resolve().parents[1] / "train.py"
sys.argv = [str(train_py)] + sys.argv[1:]
runpy.run_path(str(train_py), run_name="__main__")
