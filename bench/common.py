"""Shared bench helpers: median timing, peak memory, device/commit stamps, table and CSV output.

Every bench script times each variant as the median of several runs after warm-up (`time_stats`:
min/median/max of the repeats), reports the ratio against the baseline measured in the same run, and
appends its rows to a CSV outside the tree (CSV_PATH; `--csv PATH` elsewhere, e.g. the tracked
bench/results.csv that bench/summarize.py reads and scripts/bench.sh records to; `--no-csv` nowhere:
`add_csv_args` and `save_rows`). Every row records the conditions it ran under: torch's thread count
(`--threads`, `add_threads_arg`), the 1-minute load average when the rows were written, torch and
triton versions. GPU floors: `GPU_PEAKS` (H100 SXM and H200 side by side).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
# A bench run leaves the tree alone unless told: rows go to the temp dir by default, and to the
# tracked record (RECORD_CSV, read by bench/summarize.py) only with --csv bench/results.csv.
RECORD_CSV = BENCH_DIR / "results.csv"
CSV_PATH = Path(tempfile.gettempdir()) / "rlp-engine-bench" / "results.csv"
CSV_FIELDS = [
    "date", "commit", "device", "bench", "variant", "shape", "median_ms", "ratio", "peak_mb",
    "min_ms", "max_ms", "reps", "threads", "loadavg", "torch", "triton",
]  # fmt: skip
# Dense (no sparsity) peaks of the GPUs this project runs on, for the floors: HBM bytes/s and bf16
# tensor-core FLOP/s. The H200 is the H100 SXM's GH100 at the same clocks with HBM3e (141 GB).
GPU_PEAKS = {
    "H100 SXM": {"hbm_bytes_per_s": 3.35e12, "bf16_flops": 989e12},
    "H200": {"hbm_bytes_per_s": 4.8e12, "bf16_flops": 989e12},
}


def floor_note(nbytes: float = 0.0, flops: float = 0.0) -> str:
    """'H100 SXM 7.8 us, H200 5.4 us': the time floor of moving nbytes through HBM and doing flops
    bf16 tensor-core FLOPs (whichever bounds), on each GPU of GPU_PEAKS."""
    parts = []
    for name, peak in GPU_PEAKS.items():
        s = max(nbytes / peak["hbm_bytes_per_s"], flops / peak["bf16_flops"])
        parts.append(f"{name} {s * 1e6:.3g} us" if s < 1e-3 else f"{name} {s * 1e3:.4g} ms")
    return ", ".join(parts)


def commit() -> str:
    try:
        sha = subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, text=True
        ).strip()
        dirty = subprocess.call(["git", "diff", "--quiet", "HEAD", "--", "."], cwd=BENCH_DIR.parent) != 0
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu} x{torch.get_num_threads()} threads"


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_stats(fn, device="cpu", warmup: int = 2, reps: int = 7) -> dict:
    """{min_ms, median_ms, max_ms, reps}: wall time of fn() over `reps` runs after `warmup` runs (the
    keys of a CSV row: `dict(variant=..., **time_stats(fn))`)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return spread(times)


def spread(times_ms: list[float]) -> dict:
    """{min_ms, median_ms, max_ms, reps} of repeated timings in milliseconds."""
    return {
        "min_ms": min(times_ms),
        "median_ms": statistics.median(times_ms),
        "max_ms": max(times_ms),
        "reps": len(times_ms),
    }


def time_fn(fn, device="cpu", warmup: int = 2, reps: int = 7) -> float:
    """Median wall time of fn() in milliseconds over `reps` runs after `warmup` runs."""
    return time_stats(fn, device, warmup, reps)["median_ms"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_mb(fn, device="cpu") -> float:
    """Peak memory fn() allocates beyond what exists when it starts, in MB.

    CUDA: the caching allocator's peak. CPU: fn runs once in a forked child, whose peak resident set
    (ru_maxrss) minus its resident set at the start is the figure (the child inherits the inputs).
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: touch nothing else, run once, report the peak delta
        os.close(r)
        # libgomp is not fork-safe: after the parent ran an OpenMP region, a multi-threaded one in the
        # child waits forever for the parent's pool threads. One thread runs the same allocations.
        torch.set_num_threads(1)
        base = _rss_bytes()
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        os.write(w, str(max(peak - base, 0)).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 64):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return int(data or b"0") / 2**20


def print_table(title: str, rows: list[dict]) -> None:
    cols = ["variant", "shape", "median_ms", "min_ms", "max_ms", "ratio", "peak_mb"]
    cols = [c for c in cols if c in ("variant", "shape") or any(r.get(c) is not None for r in rows)]
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    print(f"\n{title}")
    e = conditions()
    print(f"({e['threads']} threads, load average {e['loadavg']}, torch {e['torch']}, triton {e['triton']})")
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return "" if v is None else str(v)


def conditions() -> dict:
    """What a timing depends on besides the code: torch's threads, the 1/5/15-minute load averages
    (another process on the cores stretches every figure), torch and triton versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    threads = torch.get_num_threads()
    return {"threads": threads, "loadavg": load, "torch": torch.__version__, "triton": triton_version}


def _upgrade_header(path: Path) -> None:
    """Rewrite a CSV written with fewer columns under CSV_FIELDS (old rows keep empty new cells), so
    appended rows line up with the header."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames == CSV_FIELDS:
            return
        rows = list(reader)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in CSV_FIELDS} for r in rows)


def append_csv(bench: str, device, rows: list[dict], path: Path = CSV_PATH) -> None:
    """Append rows (dicts with variant, shape, median_ms and optionally min_ms, max_ms, reps, ratio,
    peak_mb) stamped with date, commit, device and `conditions()`."""
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        _upgrade_header(path)
    stamp = {
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "device": device_name(device),
        "bench": bench,
        **conditions(),
    }
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({**stamp, **{k: r.get(k) for k in CSV_FIELDS if k in r}})


def add_threads_arg(parser: argparse.ArgumentParser, default: int | None = None) -> None:
    """`--threads N`: torch's CPU threads for the run (recorded in every row); `set_threads(args)`."""
    shown = "torch's default: one per core" if default is None else default
    parser.add_argument(
        "--threads", type=int, default=default, metavar="N", help=f"CPU threads for torch (default: {shown})"
    )


def set_threads(args: argparse.Namespace) -> None:
    """torch.set_num_threads(args.threads) when given (on a loaded machine an OpenMP barrier waits
    for descheduled threads, ~10 ms a region: fewer threads than cores can be faster)."""
    if args.threads:
        torch.set_num_threads(args.threads)


def add_csv_args(parser: argparse.ArgumentParser) -> None:
    """The CSV flags every bench script takes: `--csv PATH` (default bench/results.csv) or `--no-csv`."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--csv",
        type=Path,
        default=CSV_PATH,
        metavar="PATH",
        help=f"append the rows to this CSV (default: {CSV_PATH}, outside the tree; bench/results.csv is "
        "the record bench/summarize.py reads)",
    )
    group.add_argument("--no-csv", action="store_true", help="print the table only; write no CSV")


def save_rows(args: argparse.Namespace, bench: str, device, rows: list[dict]) -> None:
    """append_csv to args.csv, unless --no-csv (args from a parser given `add_csv_args`)."""
    if not args.no_csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        append_csv(bench, device, rows, path=Path(args.csv))
        print(f"{len(rows)} rows appended to {args.csv}")
