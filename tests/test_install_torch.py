"""scripts/install_torch.sh (issue 14 item 6): torch's CPU build on a stock machine. The shell
function runs against a fake `pip` on PATH that answers the dry run with a canned report and logs
every call, so the choice between pip's own pick (the fast local wheel) and PyTorch's CPU index is
tested without a network (this machine may not reach download.pytorch.org)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install_torch.sh"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

# The wheels pip could pick (name, version, url, requires_dist), as in pip's --report.
NVIDIA = ['nvidia-cuda-runtime-cu12==12.8.90; platform_system == "Linux"', "filelock", "sympy>=1.13.3"]
PICKS = {
    "local-cpu": ("2.13.0+cpu", "file:///opt/wheels/torch-2.13.0%2Bcpu-cp311-manylinux_2_28_x86_64.whl", []),
    "pypi-linux-cuda": ("2.13.0", "https://files.pythonhosted.org/torch-2.13.0-cp311-manylinux.whl", NVIDIA),
    "index-cu126": ("2.13.0+cu126", "https://download.pytorch.org/whl/cu126/torch-2.13.0.whl", []),
    "pypi-macos": ("2.13.0", "https://files.pythonhosted.org/torch-2.13.0-cp311-macosx_14_0_arm64.whl", []),
}

FAKE_PIP = r"""#!/usr/bin/env python3
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(args) + "\n")
if "--dry-run" in args:
    pick = os.environ["FAKE_PICK"]
    if pick == "none":
        sys.exit(1)  # no torch matches (or no network): pip fails
    version, url, reqs = json.loads(os.environ["FAKE_PICKS"])[pick]
    meta = {"name": "torch", "version": version, "requires_dist": reqs}
    with open(args[args.index("--report") + 1], "w") as f:
        json.dump({"install": [{"metadata": meta, "download_info": {"url": url}}]}, f)
    sys.exit(0)
if "--index-url" not in args and os.environ.get("FAKE_PLAIN_INSTALL_FAILS"):
    sys.exit(1)
sys.exit(0)
"""


def _install(tmp_path, pick: str, plain_fails: bool = False) -> tuple[subprocess.CompletedProcess, list]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pip").write_text(FAKE_PIP.replace("/usr/bin/env python3", sys.executable))
    (bin_dir / "pip").chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "TORCH_PIP": "pip",
        "TORCH_PY": sys.executable,
        "FAKE_LOG": str(log),
        "FAKE_PICK": pick,
        "FAKE_PICKS": json.dumps(PICKS),
    }
    env.pop("RLP_TORCH_INDEX", None)
    if plain_fails:
        env["FAKE_PLAIN_INSTALL_FAILS"] = "1"
    cmd = f'source "{SCRIPT}" && install_torch "torch==2.13.0"'
    res = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return res, [c for c in calls if "--dry-run" not in c]  # the installs


@pytest.mark.parametrize(
    ("pick", "plain_fails", "want"),
    [
        ("local-cpu", False, "plain"),  # this machine: the fast local wheel, no network
        ("pypi-macos", False, "plain"),  # PyPI's macOS wheel is a CPU build
        ("pypi-linux-cuda", False, "cpu-index"),  # a stock Linux machine: PyPI's CUDA torch refused
        ("index-cu126", False, "cpu-index"),
        ("none", False, "cpu-index"),  # pip cannot resolve torch at all
        ("local-cpu", True, "plain-then-cpu-index"),  # pip's CPU pick fails to install
    ],
)
def test_install_torch_keeps_a_cpu_pick_and_falls_back_to_the_cpu_index(tmp_path, pick, plain_fails, want):
    res, installs = _install(tmp_path, pick, plain_fails)
    assert res.returncode == 0, res.stderr
    plain = ["install", "-q", "torch==2.13.0"]
    index = ["install", "-q", "--index-url", CPU_INDEX, "torch==2.13.0"]
    expected = {"plain": [plain], "cpu-index": [index], "plain-then-cpu-index": [plain, index]}[want]
    assert installs == expected, (res.stdout, res.stderr)
    if pick in PICKS:
        build = "CUDA" if want == "cpu-index" and not plain_fails else "CPU"
        assert f"{build} build" in res.stdout


def test_install_torch_fails_when_the_cpu_index_fails_too(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pip").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "pip").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TORCH_PIP": "pip"}
    cmd = f'set -e; source "{SCRIPT}"; install_torch "torch==2.13.0"; echo unreachable'
    res = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "unreachable" not in res.stdout
