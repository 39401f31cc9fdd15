"""Every bench script that writes CSV rows takes `--no-csv` (and `--csv PATH`) through bench/common.py's
`add_csv_args`, and writes through its `save_rows`: --no-csv writes nothing, --csv writes there."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
# The scripts that time variants and write rows: those built on bench/common.py
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if "from common import" in p.read_text())


def _common():
    spec = importlib.util.spec_from_file_location("bench_common", BENCH / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_csv_writing_scripts_are_found():
    assert {"bench_losses.py", "bench_fused_linear.py", "bench_gae.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_bench_writes_through_save_rows(script):
    text = (BENCH / script).read_text()
    assert "add_csv_args(parser)" in text and "save_rows(args," in text
    assert "append_csv(" not in text  # a direct append would ignore --no-csv


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_bench_help_lists_no_csv_and_threads(script):
    """One --help per bench for both flags: --no-csv / --csv PATH (bench/common.add_csv_args) and
    --threads (add_threads_arg, issue 15's bench hygiene)."""
    # PYTHONSAFEPATH: bench/ is not put on sys.path for the script; it must find common.py itself
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
    got = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"],
        cwd=BENCH.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert got.returncode == 0, got.stderr[-2000:]
    assert "--no-csv" in got.stdout and "--csv PATH" in got.stdout, got.stdout
    assert "--threads" in got.stdout, got.stdout


def test_save_rows_honours_no_csv_and_csv_path(tmp_path):
    common = _common()
    parser = argparse.ArgumentParser()
    common.add_csv_args(parser)
    rng = random.Random(7)
    rows = [
        {"variant": f"v{i}", "shape": "B=3", "median_ms": rng.uniform(0.1, 9), "ratio": 1.0} for i in range(3)
    ]
    target = tmp_path / "out.csv"

    assert parser.parse_args([]).csv == common.CSV_PATH  # the default, documented in --help
    common.save_rows(parser.parse_args(["--no-csv"]), "toy", "cpu", rows)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    common.save_rows(parser.parse_args(["--csv", str(target)]), "toy", "cpu", rows)
    written = list(csv.DictReader(target.open()))
    assert [r["variant"] for r in written] == ["v0", "v1", "v2"]
    assert [float(r["median_ms"]) for r in written] == pytest.approx([r["median_ms"] for r in rows])
    assert {r["bench"] for r in written} == {"toy"}


def test_csv_and_no_csv_together_are_refused(capsys):
    parser = argparse.ArgumentParser(prog="bench_x")
    _common().add_csv_args(parser)
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--no-csv", "--csv", "x.csv"])
    assert stop.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_the_default_csv_is_outside_the_tree(tmp_path, monkeypatch):
    common = _common()
    parser = argparse.ArgumentParser()
    common.add_csv_args(parser)
    default = Path(parser.parse_args([]).csv).resolve()
    assert BENCH.parent.resolve() not in default.parents  # a plain bench run changes no tracked file
    assert common.RECORD_CSV == BENCH / "results.csv"
    # save_rows creates the default's directory (a fresh temp dir holds none)
    monkeypatch.setattr(common, "CSV_PATH", tmp_path / "new" / "results.csv")
    parser = argparse.ArgumentParser()
    common.add_csv_args(parser)
    common.save_rows(parser.parse_args([]), "toy", "cpu", [{"variant": "v", "shape": "s", "median_ms": 1.5}])
    assert [r["variant"] for r in csv.DictReader((tmp_path / "new" / "results.csv").open())] == ["v"]
