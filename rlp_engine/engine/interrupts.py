"""Ctrl-C and SIGTERM during training: under `save_on_sigint()` (the CLI's `train`, single process)
the first SIGINT or SIGTERM inside a training loop is held until the loop's step boundary, where
`LoopCheckpoint.step_done` saves a checkpoint at that step and raises `Interrupted`; one outside a
loop, or a second one, raises KeyboardInterrupt at once (the last complete checkpoint stays the
newest). `SIGINT.signum` says which signal it was (the CLI exits 128 + signum: 130 or 143).
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rlp_engine.engine.distributed import rank_and_world


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run at a training loop's step boundary, where `path` was saved."""

    def __init__(self, stage: str, step: int, path: Path):
        super().__init__(f"interrupted at stage {stage} step {step}; checkpoint {path}")
        self.stage, self.step, self.path = stage, step, path


@dataclass
class _Sigint:
    """What the SIGINT/SIGTERM handler and the training loops share (one process, its main thread)."""

    installed: bool = False
    requested: bool = False  # a SIGINT or SIGTERM is waiting for the loop's next step boundary
    armed: bool = False  # a training loop that saves at its step boundaries is running
    stage: str | None = None  # where the run is, for the message of an immediate stop
    step: int = 0
    signum: int = 0  # the last SIGINT or SIGTERM received inside `save_on_sigint`; kept after it


SIGINT = _Sigint()
_HANDLED = (signal.SIGINT, signal.SIGTERM)


def _on_sigint(signum, frame) -> None:
    SIGINT.signum = signum
    if SIGINT.armed and not SIGINT.requested:
        SIGINT.requested = True
        name = b"Ctrl-C" if signum == signal.SIGINT else b"SIGTERM"
        # os.write, not print: a print interrupted by this handler would raise a reentrant-call error
        os.write(
            2,
            b"\n[rlp-engine] " + name + b": saving a checkpoint at the end of this step "
            b"(Ctrl-C or SIGTERM again stops at once, keeping the last complete checkpoint)\n",
        )
        return
    raise KeyboardInterrupt


@contextmanager
def save_on_sigint():
    """Within this block the first SIGINT or SIGTERM during a training loop makes the loop save a
    checkpoint at its next step boundary and raise `Interrupted`; elsewhere, or a second time,
    either raises KeyboardInterrupt at once (`SIGINT.signum` says which). Single process only
    (under torchrun the ranks would see the signal at different steps and the collective save would
    hang): there, and off the main thread, it changes nothing."""
    # WORLD_SIZE: torchrun's, read before the pipeline creates the process group
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or rank_and_world()[1] > 1
    if distributed or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_sigint) for s in _HANDLED}
    SIGINT.installed, SIGINT.requested, SIGINT.armed, SIGINT.signum = True, False, False, 0
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        SIGINT.installed = SIGINT.requested = SIGINT.armed = False
