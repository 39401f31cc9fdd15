"""Shared bench helpers: median timing, peak memory, device/commit stamps, table and CSV output.

Every bench script times each variant as the median of several runs after warm-up, reports the
ratio against the baseline measured in the same run, and appends its rows to bench/results.csv
(`--csv PATH` elsewhere, `--no-csv` nowhere: `add_csv_args` and `save_rows`).
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
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
CSV_PATH = BENCH_DIR / "results.csv"
CSV_FIELDS = ["date", "commit", "device", "bench", "variant", "shape", "median_ms", "ratio", "peak_mb"]


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


def time_fn(fn, device="cpu", warmup: int = 2, reps: int = 7) -> float:
    """Median wall time of fn() in milliseconds over `reps` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


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
    cols = ["variant", "shape", "median_ms", "ratio", "peak_mb"]
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    print(f"\n{title}")
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return "" if v is None else str(v)


def append_csv(bench: str, device, rows: list[dict], path: Path = CSV_PATH) -> None:
    """Append rows (dicts with variant, shape, median_ms, ratio, peak_mb) stamped with date/commit/device."""
    new = not path.exists()
    stamp = {
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "device": device_name(device),
        "bench": bench,
    }
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({**stamp, **{k: r.get(k) for k in CSV_FIELDS if k in r}})


def add_csv_args(parser: argparse.ArgumentParser) -> None:
    """The CSV flags every bench script takes: `--csv PATH` (default bench/results.csv) or `--no-csv`."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--csv",
        type=Path,
        default=CSV_PATH,
        metavar="PATH",
        help="append the rows to this CSV (default: bench/results.csv, which bench/summarize.py reads)",
    )
    group.add_argument("--no-csv", action="store_true", help="print the table only; write no CSV")


def save_rows(args: argparse.Namespace, bench: str, device, rows: list[dict]) -> None:
    """append_csv to args.csv, unless --no-csv (args from a parser given `add_csv_args`)."""
    if not args.no_csv:
        append_csv(bench, device, rows, path=args.csv)
