"""Ctrl-C during training: the optimizer step in progress finishes, then the run stops (saving a state with
--save_state); a second Ctrl-C interrupts at once. With several processes they agree on the step to stop at."""

from __future__ import annotations

import os
import signal
import threading

import torch
from accelerate import Accelerator


class StopRequest:
    def __init__(self):
        self.requested = False
        self.previous = None
        self.pid = os.getpid()

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.pid:  # a forked data-loader worker: the training process decides
            return
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)
        print("\nCtrl-C: stopping after this optimizer step (press it again to stop at once)", flush=True)

    def agreed(self, accelerator: Accelerator) -> bool:
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor(float(self.requested), device=accelerator.device)
        return bool(accelerator.reduce(flag, "max").item())
