"""Bench hygiene: every bench built on bench/common.py takes `--threads`, and every CSV row records the
conditions it ran under (threads, load average, torch and triton versions) and the spread of its
repeats (min/median/max); the GAE bench's vectorised torch baseline computes the same GAE as the loop."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from rlp_engine.kernels.gae import gae_ref

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if "from common import" in p.read_text())


def _load(name):
    sys.path.insert(0, str(BENCH))  # the bench scripts import common from their own folder
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_rows_record_conditions_and_spread(tmp_path):
    common = _load("common")
    parser = argparse.ArgumentParser()
    common.add_threads_arg(parser)
    common.add_csv_args(parser)
    args = parser.parse_args(["--threads", "1", "--csv", str(tmp_path / "r.csv")])
    common.set_threads(args)
    calls = []
    stats = common.time_stats(lambda: calls.append(1), warmup=1, reps=5)
    assert len(calls) == 6 and stats["reps"] == 5
    assert stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]
    common.save_rows(args, "toy", "cpu", [{"variant": "v", "shape": "s", **stats, "ratio": 1.0}])
    (row,) = csv.DictReader((tmp_path / "r.csv").open())
    assert row["threads"] == "1" and row["torch"] == torch.__version__
    assert row["triton"] not in ("", None) and len(row["loadavg"].split("/")) == 3
    for k in ("min_ms", "median_ms", "max_ms"):
        assert float(row[k]) == pytest.approx(stats[k])
    assert row["reps"] == "5"


def test_spread_of_known_times():
    common = _load("common")
    assert common.spread([3.0, 1.0, 2.0, 10.0]) == {
        "min_ms": 1.0,
        "median_ms": 2.5,
        "max_ms": 10.0,
        "reps": 4,
    }


def test_old_csv_gets_the_new_columns_and_keeps_its_rows(tmp_path):
    common = _load("common")
    old = ["date", "commit", "device", "bench", "variant", "shape", "median_ms", "ratio", "peak_mb"]
    path = tmp_path / "results.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old)
        w.writeheader()
        w.writerow(dict(zip(old, ["2026-11-23", "abc", "cpu", "gae", "old", "B=1", "1.5", "2.0", "3.0"])))
    common.append_csv(
        "gae", "cpu", [{"variant": "new", "shape": "B=1", "median_ms": 0.5, "min_ms": 0.4}], path
    )
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == common.CSV_FIELDS
    assert [r["variant"] for r in rows] == ["old", "new"]
    assert rows[0]["median_ms"] == "1.5" and rows[0]["min_ms"] == "" and rows[0]["threads"] == ""
    assert rows[1]["min_ms"] == "0.4" and rows[1]["threads"] == str(torch.get_num_threads())


def test_gpu_floors_list_h100_and_h200():
    common = _load("common")
    assert common.GPU_PEAKS["H200"]["hbm_bytes_per_s"] == 4.8e12
    assert common.GPU_PEAKS["H100 SXM"]["hbm_bytes_per_s"] == 3.35e12
    # 26 MB of GAE traffic: 7.8 us on the H100, 5.4 us on the H200; 17.6 TFLOP: the same bf16 rate
    assert common.floor_note(nbytes=26.2e6) == "H100 SXM 7.82 us, H200 5.46 us"
    assert common.floor_note(flops=2 * 16384 * 4096 * 131072) == "H100 SXM 17.79 ms, H200 17.79 ms"


@pytest.mark.parametrize("mask_mode", ["carry", "zero"])
def test_vectorised_gae_baseline_matches_the_time_loop(mask_mode):
    # Fresh rewards and values, padding plus holes in the mask, and a row fully masked out.
    bench_gae = _load("bench_gae")
    g = torch.Generator().manual_seed(3)
    B, T = 5, 301
    r, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    mask = (torch.arange(T) < torch.randint(T // 3, T + 1, (B, 1), generator=g)) & (
        torch.rand(B, T, generator=g) < 0.8
    )
    mask[2] = False
    got = bench_gae.vectorised_gae(r, v, mask, 0.99, 0.95, mask_mode)
    want = gae_ref(r.double(), v.double(), mask, 0.99, 0.95, mask_mode)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_summary_shows_spread_and_conditions_where_recorded():
    summarize = _load("summarize")
    base = {"date": "2026-12-06", "commit": "abc", "device": "cpu", "shape": "s", "ratio": "2"}
    base["peak_mb"] = "3"
    rows = [
        {**base, "bench": "old", "variant": "v0", "median_ms": "1.5"},  # a row from before the columns
        {**base, "bench": "new", "variant": "v1", "median_ms": "1.5", "min_ms": "1.25", "max_ms": "9.5",
         "threads": "1", "loadavg": "9.10/8.00/7.00", "torch": "2.13.0", "triton": "3.9.0"},
    ]  # fmt: skip
    out = summarize.render(summarize.latest_runs(rows))
    assert "| v1 | s | 1.5 | 1.25-9.5 | 2 | 3 |" in out
    assert "| v0 | s | 1.5 |  | 2 | 3 |" in out
    assert "1 threads, load average 9.10/8.00/7.00, torch 2.13.0, triton 3.9.0" in out
    assert out.count("threads, load average") == 1
