"""Every Triton kernel compiles ahead of time for sm_90 and sm_80 at the configs its launcher picks
(bench/triton_aot.py, no GPU needed), and the fused LM-head kernels reach the tensor cores without
spilling.

The script runs in a subprocess without TRITON_INTERPRET (conftest sets it for this process, and the
interpreter replaces the jit functions that the compiler needs). Triton's own cache (~/.triton)
makes reruns faster; nothing is cached in the repository.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "triton_aot.py"
ARCHS = ("sm_90", "sm_80")
FUSED = ("_fwd_kernel", "_dlogits_kernel")


def _run(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    """(rows of the Triton report, exit code, stderr): every kernel, sm_90 and sm_80. Under xdist the
    workers share one run (the recipe in pytest-xdist's docs: a lock in the run's common temp dir)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    out, done = shared / "triton_aot.json", shared / "triton_aot.done.json"
    with open(shared / "triton_aot.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            proc = _run("--no-cuda", "--json", str(out), timeout=600)
            done.write_text(json.dumps({"rc": proc.returncode, "stderr": proc.stderr[-4000:]}))
    status = json.loads(done.read_text())
    assert out.exists(), f"bench/triton_aot.py crashed (rc {status['rc']}):\n{status['stderr']}"
    return json.loads(out.read_text())["triton"], status["rc"], status["stderr"]


def _row(rows, kernel, dtype, arch, op="fused_linear_logprobs"):
    found = [r for r in rows if (r["op"], r["kernel"], r["dtype"], r["arch"]) == (op, kernel, dtype, arch)]
    assert len(found) == 1, f"expected one row for {op}.{kernel} {dtype} {arch}, got {len(found)}"
    return found[0]


def test_every_kernel_compiles(aot):
    rows, rc, stderr = aot
    errors = [f"{r['op']}.{r['kernel']} {r['dtype']} {r['arch']}: {r['error']}" for r in rows if "error" in r]
    assert not errors, "compile errors:\n" + "\n".join(errors)
    assert rc == 0, stderr


def test_every_kernel_in_kernels_dir_is_compiled(aot):
    # Each launched kernel (a @triton.jit def named *_kernel) in kernels/*.py, for both archs and
    # both dtypes: a new kernel without a case in bench/triton_aot.py fails here.
    rows = aot[0]
    seen = {(r["op"], r["kernel"], r["dtype"], r["arch"]) for r in rows}
    expected = set()
    for path in (ROOT / "kernels").glob("*.py"):
        for name in re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", path.read_text()):
            expected |= {(path.stem, name, d, a) for d in ("fp32", "bf16") for a in ARCHS}
    assert len(expected) >= 4 * 11, sorted(expected)  # 11 kernels in 6 files when this was written
    assert not expected - seen, f"not compiled: {sorted(expected - seen)}"


# The first AOT compile (Hopper tiles on every GPU, IEEE fp32) spilled in _fwd_kernel: fp32 on sm_90
# (64 / 48 B) and sm_80 (200 / 132 B), bf16 on sm_80 (8 / 8 B). The launcher now picks tiles per arch
# (kernels/fused_linear_logprobs.py GPU_TILES) and tf32 dots for fp32; these were strict xfails then.
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("kernel", FUSED)
def test_fused_logprob_kernels_do_not_spill(aot, kernel, dtype, arch):
    r = _row(aot[0], kernel, dtype, arch)
    assert "error" not in r, r["error"]
    assert (r["spill_stores"], r["spill_loads"], r["sass_ldl_stl"]) == (0, 0, 0), (
        f"{kernel} {dtype} {arch}: {r['n_regs']} registers, {r['spill_stores']} B spill stores, "
        f"{r['spill_loads']} B spill loads, {r['sass_ldl_stl']} LDL/STL in the SASS"
    )


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("kernel", FUSED)
def test_fused_logprob_kernels_use_tensor_cores(aot, kernel, dtype, arch):
    # sm_90: Hopper's wgmma (HGMMA in the SASS); sm_80: mma.sync (HMMA). An HMMA-only or FFMA-only
    # Hopper build would run the GEMM far below the tensor-core rate. fp32 inputs take tf32 operands
    # (PRECISION=tf32, fp32 accumulation): they were IEEE dots on FFMA before.
    r = _row(aot[0], kernel, dtype, arch)
    assert "error" not in r, r["error"]
    assert "PRECISION=tf32" in r["config"], r["config"]
    if arch == "sm_90":
        assert r["ptx_wgmma"] > 0 and r["sass_hgmma"] > 0, r
        assert r["ptx_mma_sync"] == 0 and r["sass_hmma"] == 0, r
    else:
        assert r["ptx_mma_sync"] > 0 and r["sass_hmma"] > 0, r


@pytest.mark.parametrize("kernel", FUSED)
def test_fused_logprob_tiles_are_per_arch(aot, kernel):
    # The launcher's per-arch tiles reach the compile: 128x128 on sm_90, 128x64 on sm_80.
    for dtype in ("bf16", "fp32"):
        assert "BLOCK_V=128" in _row(aot[0], kernel, dtype, "sm_90")["config"]
        assert "BLOCK_V=64" in _row(aot[0], kernel, dtype, "sm_80")["config"]


def test_compile_error_is_reported():
    # The error path: a kernel that cannot compile (no sm_10 target) becomes an error row and exit 1.
    proc = _run("--only", "kl._kl_fwd", "--arch", "10", "--no-cuda", timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "compile error" in proc.stdout
    assert "kl._kl_fwd_kernel | fp32 | sm_10" in proc.stdout
