"""A SIGTERM (what job schedulers send before a kill) as a request to stop: the training loop checkpoints after the
step in progress and raises TrainingStopped; train.py then exits with 128 + 15.

    with SigtermStop() as sigterm:
        ...
        if sigterm.requested(accelerator):   # the same answer on every process
            ...checkpoint, then raise TrainingStopped(...)
"""

from __future__ import annotations

import os
import signal
import threading

import torch


class TrainingStopped(Exception):
    """Training ended early on SIGTERM, its state checkpointed (train.py exits with 128 + 15)."""


class SigtermStop:
    """While entered, the first SIGTERM is recorded (`signal`) and a second one ends the process at once; the
    previous handler comes back on exit. Only the main thread can install handlers: elsewhere nothing is recorded."""

    def __init__(self):
        self.signal = None
        self._previous = None

    def __enter__(self) -> "SigtermStop":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._request_stop)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _request_stop(self, signum, frame) -> None:
        if self.signal is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signal = signum

    def requested(self, accelerator) -> bool:
        """Whether any process got SIGTERM (the same answer everywhere: all of them checkpoint together)."""
        if accelerator.num_processes == 1:  # no tensor: no device synchronisation per step
            return self.signal is not None
        flag = torch.tensor(float(self.signal is not None), device=accelerator.device)
        return accelerator.reduce(flag, reduction="sum").item() > 0
