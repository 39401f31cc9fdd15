"""Fault injection for the tests: the hooks that kill or fail a run at a chosen point, and a driver
that runs `rlp-engine` with one (the pipeline reads no environment variable for faults).

    python tests/fault_runner.py [--kill-at STAGE:STEP[:saving]] [--fail-at STAGE] [--rank R] -- ARGS...
    torchrun --nproc_per_node 2 tests/fault_runner.py --kill-at ppo:1 --rank 1 -- train ...

runs `rlp_engine.cli.main(ARGS, hook=...)` and exits with its code. --kill-at SIGKILLs rank R (default
0) right after loop step STEP of STAGE and its checkpoint, if any, is written; with ":saving" in the
middle of writing that step's checkpoint (its files written, the rename not done). --fail-at raises
RuntimeError on rank R at the start of STAGE. Each prints one line saying what it does first.
In-process tests import `kill_at` / `fail_at` and pass the hook to `main` themselves.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from rlp_engine.cli import main
from rlp_engine.engine.distributed import rank_and_world


def kill_at(point: str, rank: int = 0):
    """The hook that SIGKILLs `rank` at `point` ("stage:step" after the step, "stage:step:saving"
    while writing its checkpoint)."""
    stage, step, *phase = point.split(":")
    event, n = ("saving" if phase == ["saving"] else "step_done"), int(step)

    def hook(ev: str, st: str, k: int) -> None:
        if (ev, st, k) == (event, stage, n) and rank_and_world()[0] == rank:
            print(f"[fault_runner] kill at {point}: killing rank {rank}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def fail_at(stage: str, rank: int = 0):
    """The hook that raises RuntimeError on `rank` at the start of `stage`."""

    def hook(ev: str, st: str, k: int) -> None:
        if (ev, st) == ("stage_start", stage) and rank_and_world()[0] == rank:
            raise RuntimeError(f"fault_runner: injected failure in stage {stage} on rank {rank}")

    return hook


def _run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fault_runner")
    p.add_argument("--kill-at", help="STAGE:STEP or STAGE:STEP:saving")
    p.add_argument("--fail-at", help="STAGE")
    p.add_argument("--rank", type=int, default=0, help="the rank to kill or fail")
    p.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the rlp-engine arguments")
    args = p.parse_args(argv)
    if (args.kill_at is None) == (args.fail_at is None):
        p.error("pass exactly one of --kill-at and --fail-at")
    hook = kill_at(args.kill_at, args.rank) if args.kill_at else fail_at(args.fail_at, args.rank)
    cli = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    return main(cli, hook=hook)


if __name__ == "__main__":
    sys.exit(_run(sys.argv[1:]))
