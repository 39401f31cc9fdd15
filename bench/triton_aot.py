"""Ahead-of-time compile of every Triton kernel in kernels/ (and the CUDA sources in csrc/cuda/) for
sm_90 and sm_80, on a machine without a GPU, and the compilers' resource reports.

Triton's compiler needs no driver: `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`
produces PTX and a cubin with the ptxas the wheel ships. The kernels' launch configurations are not
written down here: each case runs the real launcher on `meta` tensors of a representative shape and
records the launches (JITFunction.run is replaced for the duration), then specialises the arguments
the way a launch on the GPU would (16-byte-aligned pointers, integers divisible by 16, ints equal to 1
as constants) through Triton's own binder. The fused LM-head launcher picks its tile config from
the device's compute capability and its vocab splits from the SM count: for each target arch it is
told that arch and the SM count of kernels' SM_COUNT table, and its scratch size sees "cuda".

Per kernel and arch: num_warps, num_stages, registers (the cubin's), spill store/load bytes and stack
frame (`ptxas -v`), shared memory (Triton's dynamic allocation, what a launch requests), and the
matrix instructions: `wgmma.mma_async` / `mma.sync` in the PTX, HGMMA / HMMA in the SASS.
CUDA sources: `nvcc --resource-usage` per kernel, with torch's headers (the CPU wheel lacks the
generated cuda_cmake_macros.h: a stub supplies it, as in scripts/check_cuda.sh).

Usage: python bench/triton_aot.py [--json OUT.json] [--md] [--only SUBSTR] [--arch 90,80] [--no-cuda]
"""

from __future__ import annotations

import os

# The interpreter replaces @triton.jit functions with Python ones: compiling needs the real ones.
os.environ.pop("TRITON_INTERPRET", None)
# Triton 3.9 warns that its FP-fusion default will change; launches today fuse, so compile as they do.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import sysconfig  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, MockTensor, create_function_from_signature  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

from rlp_engine.kernels import fused_linear_logprobs as K_fused  # noqa: E402
from rlp_engine.kernels import gae as K_gae  # noqa: E402
from rlp_engine.kernels import gaussian_ib as K_ib  # noqa: E402
from rlp_engine.kernels import kl as K_kl  # noqa: E402
from rlp_engine.kernels import logprobs as K_lp  # noqa: E402
from rlp_engine.kernels import ppo_loss as K_ppo  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
META = torch.device("meta")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The fused LM-head kernels: matrix-bound, so they must reach the tensor cores without spilling.
FUSED = ("_fwd_kernel", "_dlogits_kernel")
SPILL_LINE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device=META)


# ------------------------------------------------------------------------------------------------
# Cases: each runs a launcher at a representative shape (DESIGN "Floors": N=16384 H=4096 V=131072 for
# the LM head, 4.2M tokens = [512, 8192] for the per-token losses and GAE).
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _cuda_device_for(module, names):
    """Make `module`'s device-dependent helpers see the meta device as "cuda"."""

    def as_cuda(a):
        return torch.device("cuda") if isinstance(a, torch.device) and a.type == "meta" else a

    saved = {n: getattr(module, n) for n in names}
    for n, f in saved.items():
        setattr(module, n, lambda *args, f=f: f(*(as_cuda(a) for a in args)))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(module, n, f)


def case_fused_linear(dt, arch):
    n, h, v = 16384, 4096, 131072
    hid, w, y = _meta(n, h, dtype=dt), _meta(v, h, dtype=dt), _meta(n, dtype=torch.int64)
    info = K_fused._device_info  # the launcher asks the device for its arch and SM count
    sms = K_fused.SM_COUNT.get(arch, 132)  # an arch outside the table: the H100's count
    K_fused._device_info = lambda device: (arch, sms)
    try:
        with _cuda_device_for(K_fused, ("rows_per_chunk",)):
            _fused_launches(hid, w, y, n)
    finally:
        K_fused._device_info = info
    return f"N={n} H={h} V={v}"


def _fused_launches(hid, w, y, n):
    lp, ent, lse = K_fused.triton_forward(hid, w, None, y, 1.0, -100, True)
    K_fused.triton_backward(hid, w, None, y, lse, ent, _meta(n), _meta(n), 1.0, -100)


def case_logprobs(dt, arch):
    n, v = 16384, 131072
    x, y = _meta(n, v, dtype=dt), _meta(n, dtype=torch.int64)
    lp, ent, lse = K_lp.logprobs_forward(x, y, 1.0, -100)
    K_lp.logprobs_backward(_meta(n), _meta(n), x, y, lse, ent, 1.0, -100)
    return f"N={n} V={v}"


def case_kl(dt, arch):
    b, t = 512, 8192
    lp, ref = _meta(b, t, dtype=dt), _meta(b, t, dtype=dt)
    K_kl.kl_penalty_forward(lp, ref, "k3")
    K_kl.kl_penalty_backward(_meta(b, t), lp, ref, "k3")
    return f"[{b},{t}] k3"


def case_gae(dt, arch):
    b, t = 512, 8192
    r, v, m = _meta(b, t, dtype=dt), _meta(b, t, dtype=dt), _meta(b, t, dtype=torch.bool)
    K_gae.gae_forward(r, v, m, 1.0, 0.95, True)
    K_gae.gae_forward(r, v, m, 1.0, 0.95, False)
    return f"[{b},{t}] carry+zero"


def case_ppo(dt, arch):
    b, t = 512, 8192
    x = [_meta(b, t, dtype=dt) for _ in range(3)]
    mask, scale = _meta(b, t, dtype=torch.uint8), _meta(b)  # row_scale: the fp32 compute dtype
    K_ppo.ppo_policy_forward(*x, mask, scale, None, 0.2, 0.2, 3.0)
    K_ppo.ppo_value_forward(*x, mask, scale, 0.2)
    return f"[{b},{t}] dual-clip, value-clip"


def case_gaussian_ib(dt, arch):
    m, d = 8192, 16  # latent_dim 16 (rlp_engine.config)
    x = [_meta(m, d, dtype=dt) for _ in range(4)]
    K_ib.gaussian_skl_forward(*x)
    K_ib.gaussian_skl_backward(_meta(m), *x)
    return f"M={m} D={d}"


CASES = {
    "fused_linear_logprobs": case_fused_linear,
    "logprobs": case_logprobs,
    "kl": case_kl,
    "gae": case_gae,
    "ppo_loss": case_ppo,
    "gaussian_ib": case_gaussian_ib,
}


@contextlib.contextmanager
def _recording(launches):
    """kernel[grid](*args, **kwargs) appends (kernel, args, kwargs) instead of launching."""
    run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = run


def collect(archs, only: str | None = None):
    """[(op, dtype, shape, arch, kernel, args, kwargs)], one per distinct launch of each case and arch
    (the fused LM head's launcher picks its config per arch; the other launchers ignore the arch).
    op: the kernel's file in kernels/ (a case may launch kernels of several files)."""
    out = []
    for case in CASES.values():
        for dname, dt in DTYPES.items():
            for arch in archs:
                launches = []
                with _recording(launches):
                    shape = case(dt, arch)
                seen = set()
                for fn, args, kwargs in launches:
                    op = fn.fn.__module__.rsplit(".", 1)[-1]
                    if only and only not in f"{op}.{fn.__name__}":
                        continue
                    # Launches that specialise alike (e.g. the backward's equal row chunks) compile once.
                    src, options = specialise(fn, GPUTarget("cuda", arch, 32), args, kwargs)
                    key = (src.hash(), options.num_warps, options.num_stages)
                    if key not in seen:
                        seen.add(key)
                        out.append((op, dname, shape, arch, fn, args, kwargs))
    return out


# ------------------------------------------------------------------------------------------------
# Compile and inspect
# ------------------------------------------------------------------------------------------------


def specialise(fn, target, args, kwargs):
    """(ASTSource, options) exactly as a launch of fn with these arguments on `target` would build."""
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    mock = [MockTensor(a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
    bound, spec, options = binder(*mock, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return ASTSource(fn, signature, constexprs, attrs), options


def _tool(name: str) -> str:
    return str(BIN / name) if (BIN / name).exists() else shutil.which(name) or name


def _ptxas(arch: int) -> str:
    try:
        return get_ptxas(arch).path  # triton 3.9: a separate ptxas for sm_90 and newer
    except TypeError:  # older triton (the GPU machine's 3.6): one ptxas
        return get_ptxas().path


def ptxas_report(ptx: str, arch: int, fp_fusion: bool) -> dict:
    """Registers, stack frame and spill bytes from `ptxas -v`, rerun on the kernel's PTX with the flags
    Triton's make_cubin uses (the cubin keeps no spill counts; cuobjdump's LOCAL stays 0 even when
    ptxas spills into the stack frame)."""
    fmad = [] if fp_fusion else ["--fmad=false"]
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        gpu = f"--gpu-name={sm_arch_from_capability(arch)}"
        cmd = [_ptxas(arch), "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2", gpu, str(src)]
        cmd += ["-o", str(Path(d) / "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    spill = SPILL_LINE.search(log)
    return {
        "ptxas_regs": int(re.search(r"Used (\d+) registers", log).group(1)),
        "stack_bytes": int(spill.group(1)),
        "spill_stores": int(spill.group(2)),
        "spill_loads": int(spill.group(3)),
    }


def sass_report(cubin: bytes) -> dict:
    """Registers (the cubin's own count) and the SASS instructions that matter here: tensor-core
    matrix ops (HGMMA: Hopper wgmma; HMMA: mma.sync) and local-memory loads/stores (spills)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True)
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", sass.stdout, re.MULTILINE)
    if not ops:
        raise RuntimeError(f"cuobjdump -sass gave no instructions: {sass.stderr.strip()[:200]}")
    count = lambda prefix: sum(op.startswith(prefix) for op in ops)
    return {
        "n_regs": int(re.search(r"REG:(\d+)", res.stdout).group(1)),
        "sass_hgmma": count("HGMMA"),
        "sass_hmma": count("HMMA"),
        "sass_ldl_stl": count("LDL") + count("STL"),
    }


def compile_one(fn, args, kwargs, arch: int) -> dict:
    target = GPUTarget("cuda", arch, 32)
    t0 = time.perf_counter()
    try:
        src, options = specialise(fn, target, args, kwargs)
        # Triton prints the whole PTX on a ptxas failure: keep stdout for the table.
        with contextlib.redirect_stdout(io.StringIO()):
            kernel = triton.compile(src, target=target, options=options.__dict__)
    except Exception as e:  # a compile error is a result to report, not a crash
        return {"error": _first_lines(e)}
    try:
        return inspect_kernel(kernel, arch, options, time.perf_counter() - t0)
    except Exception as e:
        return {"error": f"compiled, but the inspection failed: {_first_lines(e)}"}


def _first_lines(e: Exception) -> str:
    """The exception's first line and its first other line that names an error (ptxas's own)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [""]
    more = [ln for ln in lines[1:] if "error" in ln.lower() or "fatal" in ln.lower()][:1]
    return f"{type(e).__name__}: " + " / ".join(lines[:1] + more)[:400]


def inspect_kernel(kernel, arch: int, options, seconds: float) -> dict:
    ptx = kernel.asm["ptx"]
    md = kernel.metadata
    row = {
        "num_warps": md.num_warps,
        "num_stages": md.num_stages,
        "shared": md.shared,
        "ptx_wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
        "ptx_mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
        "compile_s": round(seconds, 2),
    }
    row.update(sass_report(kernel.asm["cubin"]))
    row.update(ptxas_report(ptx, arch, options.enable_fp_fusion))
    row["spills"] = row["spill_stores"] + row["spill_loads"]
    if row.pop("ptxas_regs") != row["n_regs"]:
        row["note"] = "ptxas rerun allocated a different register count than the cubin's"
    return row


def constexpr_summary(fn, kwargs) -> str:
    names = [p.name for p in fn.params if p.is_constexpr]
    return " ".join(f"{k}={kwargs[k]}" for k in names if k in kwargs)


def compile_triton(archs, only=None) -> list[dict]:
    rows = []
    for op, dname, shape, arch, fn, args, kwargs in collect(archs, only):
        row = {
            "op": op,
            "kernel": fn.__name__,
            "dtype": dname,
            "shape": shape,
            "arch": f"sm_{arch}",
            "config": constexpr_summary(fn, kwargs),
            "fused_logprob": op == "fused_linear_logprobs" and fn.__name__ in FUSED,
        }
        row.update(compile_one(fn, args, kwargs, arch))
        rows.append(row)
        print(_status(row), file=sys.stderr, flush=True)
    return rows


def _status(r) -> str:
    what = r.get("error") or f"regs {r['n_regs']} spills {r['spills']} B, {r['compile_s']} s"
    return f"{r['op']}.{r['kernel']} {r['dtype']} {r['arch']}: {what}"


# ------------------------------------------------------------------------------------------------
# CUDA sources through nvcc
# ------------------------------------------------------------------------------------------------


def compile_cuda(archs) -> list[dict]:
    """Each csrc/cuda/*.cu once, one -gencode per arch (the host pass over torch's headers, most of
    the ~100 s a file takes here, runs once); a row per kernel and arch, or per file with the error."""
    files = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return [{"file": f.name, "error": "not compiled: nvcc not found"} for f in files]
    tinc = Path(torch.__file__).parent / "include"
    pyinc = sysconfig.get_paths()["include"]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    rows = []
    with tempfile.TemporaryDirectory() as stub:
        macros = Path(stub) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        macros.parent.mkdir(parents=True)
        macros.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        for f in files:
            cmd = [
                nvcc, "-std=c++20", "-O3", *gencode, "--resource-usage", f"-I{stub}", f"-I{tinc}",
                f"-I{tinc}/torch/csrc/api/include", f"-I{pyinc}", f"-I{ROOT / 'csrc'}",
                "-c", str(f), "-o", str(Path(stub) / "out.o"),
            ]  # fmt: skip
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True)
            took = round(time.perf_counter() - t0, 1)
            print(f"{f.name}: nvcc {took} s, rc {p.returncode}", file=sys.stderr, flush=True)
            if p.returncode != 0:
                err = next((ln for ln in p.stderr.splitlines() if "error" in ln), p.stderr.strip()[-300:])
                rows.append({"file": f.name, "error": f"not compiled: {err.strip()[:300]}"})
                continue
            rows += [{"file": f.name, **r} for r in parse_nvcc_usage(p.stdout + p.stderr)]
    return rows


def parse_nvcc_usage(text: str) -> list[dict]:
    """Per kernel and arch: registers, stack frame, spill bytes, static shared memory, from the
    ptxas lines of `nvcc --resource-usage`."""
    rows, cur = [], None
    for line in text.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line):
            cur = {"kernel": _demangle(m.group(1)), "arch": m.group(2), "static_smem": 0}
            rows.append(cur)
        elif cur is None:
            continue
        elif m := SPILL_LINE.search(line):
            cur["stack_bytes"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        elif m := re.search(r"Used (\d+) registers", line):
            cur["n_regs"] = int(m.group(1))
            if sm := re.search(r"(\d+) bytes smem", line):
                cur["static_smem"] = int(sm.group(1))
    return rows


def _demangle(name: str) -> str:
    """'_ZN..gae_kernelILb1EEEv..' -> 'gae_kernel<true>' (the mangled name when c++filt is absent)."""
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        return name
    out = subprocess.run([cxxfilt, name], capture_output=True, text=True).stdout.strip() or name
    out = out.replace("(anonymous namespace)::", "").removeprefix("void ")
    return out.split("(")[0]


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _cell(text) -> str:
    return str(text).replace("|", "\\|")


def markdown(report: dict) -> str:
    """The Triton table (a row per kernel, dtype, arch) and the CUDA table (a row per kernel, arch)."""
    lines = [
        "| kernel | dtype | arch | config (constexprs) | warps | stages | regs | spill st/ld B | stack B "
        "| smem B | wgmma / mma.sync (PTX) | HGMMA / HMMA (SASS) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["triton"]:
        head = f"| {r['op']}.{r['kernel']} | {r['dtype']} | {r['arch']} | {r['config']} |"
        if "error" in r:
            lines.append(f"{head} compile error: {_cell(r['error'])} |||||||")
            continue
        regs = f"{r['n_regs']} ({r['note']})" if "note" in r else r["n_regs"]
        lines.append(
            f"{head} {r['num_warps']} | {r['num_stages']} | {regs} | "
            f"{r['spill_stores']} / {r['spill_loads']} | {r['stack_bytes']} | {r['shared']} | "
            f"{r['ptx_wgmma']} / {r['ptx_mma_sync']} | {r['sass_hgmma']} / {r['sass_hmma']} |"
        )
    if report["cuda"]:
        lines += ["", "| CUDA kernel | arch | regs | spill st/ld B | stack B | static smem B |"]
        lines.append("|---|---|---|---|---|---|")
        for r in report["cuda"]:
            if "error" in r:
                lines.append(f"| {r['file']} | | {_cell(r['error'])} ||||")
                continue
            lines.append(
                f"| {r['file']}: {_cell(r['kernel'])} | {r['arch']} | {r['n_regs']} | "
                f"{r['spill_stores']} / {r['spill_loads']} | {r['stack_bytes']} | {r['static_smem']} |"
            )
    return "\n".join(lines)


def stamp(archs) -> dict:
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    versions = []
    for arch in archs:  # triton 3.9 runs a newer ptxas for sm_90+ than for sm_80
        out = subprocess.run([_ptxas(arch), "--version"], capture_output=True, text=True).stdout
        release = (re.findall(r"release ([\d.]+)", out) or ["?"])[0]
        versions.append(f"{release} for sm_{arch}")
    return {
        "date": datetime.date.today().isoformat(),
        "commit": sha,
        "triton_version": triton.__version__,
        "ptxas": ", ".join(versions),
        "torch": torch.__version__,
        # compile_s per kernel is wall time on a shared machine: the load it ran under
        "loadavg": "/".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def section(report: dict) -> str:
    """The bench/RESULTS.md section: title, stamp, tables."""
    return (
        "## Triton ahead-of-time compile (sm_90, sm_80)\n\n"
        f"{report['date']}, commit {report['commit']}, triton {report['triton_version']} "
        f"(ptxas {report['ptxas']}), torch {report['torch']}, load average {report['loadavg']}; no GPU: "
        "`python bench/triton_aot.py --md`.\n\n" + markdown(report) + "\n"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, help="write the report (stamp and every row) here")
    p.add_argument("--md", action="store_true", help="print the bench/RESULTS.md section")
    p.add_argument("--only", help="compile only the Triton kernels whose '<op>.<kernel>' contains this")
    p.add_argument("--arch", default="90,80", help="comma list of compute capabilities (default 90,80)")
    p.add_argument("--no-cuda", action="store_true", help="skip csrc/cuda/*.cu (nvcc)")
    args = p.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]
    report = stamp(archs)
    report["triton"] = compile_triton(archs, args.only)
    report["cuda"] = [] if args.no_cuda else compile_cuda(archs)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.md:
        print(section(report))
    else:
        print(f"triton {report['triton_version']}, ptxas {report['ptxas']}, commit {report['commit']}")
        print(markdown(report))
    return 1 if any("error" in r for r in report["triton"] + report["cuda"]) else 0


if __name__ == "__main__":
    sys.exit(main())
