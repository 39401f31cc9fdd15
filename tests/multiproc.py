"""Starting multi-process (gloo) workers for the tests: n plain processes with torchrun's
environment set by hand (no launcher: the collective timeout and the failure hook must end a
failed run), or torchrun itself. Every test that runs ranks goes through `run_ranks`/`run_torchrun`.

A port from `free_port` is free when chosen but may be taken before rank 0 binds it (another test
worker picked the same one); such a run fails with EADDRINUSE, and is started once more on a new port.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

TORCHRUN = Path(sys.executable).with_name("torchrun")
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_PORT_TAKEN = ("EADDRINUSE", "Address already in use")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict:
    """The test process's environment without launcher variables, one OpenMP thread per process,
    plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _wait(procs, limit_s: float, what: str) -> tuple[list[int], list[str], float]:
    t0 = time.monotonic()
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1.0, limit_s - (time.monotonic() - t0)))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        pytest.fail(f"{what} still running after {limit_s} s (a rank hangs)")
    return [p.returncode for p in procs], outs, time.monotonic() - t0


def _retry_on_taken_port(start):
    codes, outs, elapsed = start(free_port())
    if any(c != 0 for c in codes) and any(m in "".join(outs) for m in _PORT_TAKEN):
        codes, outs, elapsed = start(free_port())
    return codes, outs, elapsed


def run_ranks(argv: list[str], n: int = 2, limit_s: float = 90, env: dict | None = None):
    """`python argv...` as n ranks (RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* set by hand), stdout and
    stderr merged. Returns (return codes, outputs, seconds); fails the test after limit_s."""

    def start(port: int):
        base = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **(env or {}))
        procs = [
            subprocess.Popen(
                [sys.executable, *argv],
                env={**base, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for r in range(n)
        ]
        return _wait(procs, limit_s, f"{argv[0]} ranks")

    return _retry_on_taken_port(start)


def run_torchrun(argv: list[str], n: int = 2, limit_s: float = 90, env: dict | None = None):
    """`torchrun --nproc_per_node n argv...` (argv: a script or -m module and its arguments).
    Returns (return code, output, seconds); fails the test after limit_s."""

    def start(port: int):
        cmd = [
            str(TORCHRUN),
            f"--nproc_per_node={n}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            *argv,
        ]
        proc = subprocess.Popen(
            cmd, env=clean_env(**(env or {})), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        return _wait([proc], limit_s, "torchrun")

    codes, outs, elapsed = _retry_on_taken_port(start)
    return codes[0], outs[0], elapsed
