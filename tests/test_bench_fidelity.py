"""bench/bench_fidelity.py: the across-seed aggregation on hand-made reports (expected values worked
out by hand), the markdown, the bad-input paths, and one end-to-end run of the script on the tiny
preset (two seeds, then a rerun that must skip both)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "bench_fidelity.py"
_spec = importlib.util.spec_from_file_location("bench_fidelity", SCRIPT)
bf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bf)

R3 = math.sqrt(3.0)


def _pol(gold, win=None, **extra):
    row = {"gold": gold, "gold_se": 0.01, "exact": gold / 2, "exact_se": 0.0}
    if win is not None:
        row["win_rate"] = win
    row.update(extra)
    return row


def fake_reports() -> dict[int, dict]:
    """Three seeds. Seed 1 has no "exact" for rlp_uml, seed 2 no win-rate or diff_vs_sft for rlp_uml,
    no rm_uml and no total_seconds; ppo_oracle only in seed 0; rm's on-policy accuracy of rlp_uml is
    NaN in seed 1 (no gold-labelled pair), as report.json writes it."""
    r0 = {
        "policies": {
            "sft": _pol(0.2, 50.0),
            "ppo": _pol(0.5, 55.0, diff_vs_sft={"gold": 0.3, "gold_se": 0.04}),
            "rlp_uml": _pol(0.6, 60.0, diff_vs_sft={"gold": 0.4, "gold_se": 0.05}),
            "ppo_oracle": _pol(0.9),
        },
        "reward_models": {
            "rm": {
                "offline_accuracy": 0.6,
                "offline_accuracy_se": 0.03,
                "on_policy_accuracy": {"sft": 0.5, "rlp_uml": 0.8, "pairs": 12},
            },
            "rm_uml": {"offline_accuracy": 0.9, "on_policy_accuracy": {}},
        },
        "total_seconds": 10.0,
        "stage_seconds": {"sft": 4.0, "eval": 1.0},
    }
    r1 = {
        "policies": {
            "sft": _pol(0.4, 40.0),
            "ppo": _pol(0.6, 45.0),
            "rlp_uml": {"gold": 0.9, "win_rate": 70.0, "diff_vs_sft": {"gold": 0.5, "gold_se": 0.07}},
        },
        "reward_models": {
            "rm": {
                "offline_accuracy": 0.7,
                "on_policy_accuracy": {"sft": 0.7, "rlp_uml": math.nan, "pairs": 9},
            },
            "rm_uml": {"offline_accuracy": 0.7, "on_policy_accuracy": {}},
        },
        "total_seconds": 14.0,
        "stage_seconds": {"sft": 6.0, "eval": 2.0},
    }
    r2 = {
        "policies": {"sft": _pol(0.3, 45.0), "ppo": _pol(0.7, 50.0), "rlp_uml": _pol(0.6)},
        "reward_models": {
            "rm": {"offline_accuracy": 0.8, "on_policy_accuracy": {"sft": 0.6, "rlp_uml": 0.6}}
        },
        "stage_seconds": {"sft": 5.0},
    }
    return {0: r0, 1: r1, 2: r2}


def test_summarize_hand_worked():
    s = bf.summarize(fake_reports(), wall_seconds={0: 20.0, 2: 30.0})
    assert s["seeds"] == [0, 1, 2]
    assert list(s["policies"]) == ["sft", "ppo", "rlp_uml", "ppo_oracle"]
    approx = pytest.approx

    # sft gold 0.2, 0.4, 0.3: mean 0.3; deviations -0.1, 0.1, 0 -> sum of squares 0.02, var (ddof=1)
    # 0.02 / 2 = 0.01, se = sqrt(0.01 / 3) = 0.1 / sqrt(3)
    sft = s["policies"]["sft"]
    assert sft["gold"] == {"mean": approx(0.3), "se": approx(0.1 / R3), "n": 3, "per_seed": [0.2, 0.4, 0.3]}
    # the baseline is not paired against itself
    assert sft["diff_vs_sft"] is None
    # sft - ppo per seed: -0.3, -0.2, -0.4: mean -0.3, deviations 0, 0.1, -0.1 -> se 0.1 / sqrt(3)
    assert sft["diff_vs_ppo"]["mean"] == approx(-0.3)
    assert sft["diff_vs_ppo"]["se"] == approx(0.1 / R3)
    # win-rate 50, 40, 45: mean 45; deviations 5, -5, 0 -> ss 50, var 25, se 5 / sqrt(3)
    assert sft["win_rate"]["mean"] == approx(45.0)
    assert sft["win_rate"]["se"] == approx(5.0 / R3)

    uml = s["policies"]["rlp_uml"]
    # gold 0.6, 0.9, 0.6: mean 0.7; deviations -0.1, 0.2, -0.1 -> ss 0.06, var 0.03, se sqrt(0.01) = 0.1
    assert uml["gold"]["mean"] == approx(0.7)
    assert uml["gold"]["se"] == approx(0.1)
    # paired within seed: 0.6-0.2, 0.9-0.4, 0.6-0.3 = 0.4, 0.5, 0.3: mean 0.4, ss 0.02, se 0.1 / sqrt(3)
    # (unpaired, the two SEs would add to about 0.16: the seed's draw cancels in the difference)
    d = uml["diff_vs_sft"]
    assert d["per_seed"] == approx([0.4, 0.5, 0.3])
    assert (d["mean"], d["se"], d["n"]) == (approx(0.4), approx(0.1 / R3), 3)
    # the runs' own prompt-clustered SEs of the difference, None where seed 2's report lacks it
    assert d["within_seed_se"] == [0.05, 0.07, None]
    # vs ppo: 0.6-0.5, 0.9-0.6, 0.6-0.7 = 0.1, 0.3, -0.1: mean 0.1; deviations 0, 0.2, -0.2 -> ss 0.08,
    # var 0.04, se 0.2 / sqrt(3)
    assert uml["diff_vs_ppo"]["mean"] == approx(0.1)
    assert uml["diff_vs_ppo"]["se"] == approx(0.2 / R3)
    assert uml["diff_vs_ppo"]["within_seed_se"] == [None, None, None]
    # win-rate only in seeds 0, 1: 60, 70 -> mean 65, ss 50, var 50, se sqrt(50 / 2) = 5
    assert uml["win_rate"] == {
        "mean": approx(65.0),
        "se": approx(5.0),
        "n": 2,
        "per_seed": [60.0, 70.0, None],
    }
    # exact: 0.3 (seed 0), missing (seed 1), 0.3 (seed 2) -> mean 0.3, se 0
    assert uml["exact"]["per_seed"] == [0.3, None, 0.3]
    assert uml["exact"]["n"] == 2

    # one seed only: a mean, no spread (se None, not an error)
    oracle = s["policies"]["ppo_oracle"]
    assert oracle["gold"] == {"mean": 0.9, "se": None, "n": 1, "per_seed": [0.9, None, None]}
    assert oracle["win_rate"] == {"mean": None, "se": None, "n": 0, "per_seed": [None, None, None]}
    # ppo_oracle - sft only in seed 0: 0.9 - 0.2 = 0.7
    assert oracle["diff_vs_sft"]["mean"] == approx(0.7)
    assert oracle["diff_vs_sft"]["se"] is None

    rm = s["reward_models"]["rm"]
    # held-out 0.6, 0.7, 0.8: mean 0.7, ss 0.02, se 0.1 / sqrt(3)
    assert rm["heldout_accuracy"]["mean"] == approx(0.7)
    assert rm["heldout_accuracy"]["se"] == approx(0.1 / R3)
    assert rm["heldout_accuracy"]["within_seed_se"] == [0.03, None, None]
    # "pairs" is a count, not an accuracy: left out
    assert list(rm["on_policy_accuracy"]) == ["sft", "rlp_uml"]
    # on sft 0.5, 0.7, 0.6: mean 0.6, se 0.1 / sqrt(3)
    assert rm["on_policy_accuracy"]["sft"]["mean"] == approx(0.6)
    assert rm["on_policy_accuracy"]["sft"]["se"] == approx(0.1 / R3)
    # on rlp_uml 0.8, NaN, 0.6: the NaN seed is missing; mean 0.7, ss 0.02, var 0.02, se sqrt(0.01) = 0.1
    on_uml = rm["on_policy_accuracy"]["rlp_uml"]
    assert (on_uml["mean"], on_uml["se"], on_uml["n"]) == (approx(0.7), approx(0.1), 2)
    assert on_uml["per_seed"] == [0.8, None, 0.6]
    # rm_uml only in seeds 0, 1: 0.9, 0.7 -> mean 0.8, ss 0.02, var 0.02, se 0.1
    rm_uml = s["reward_models"]["rm_uml"]["heldout_accuracy"]
    assert (rm_uml["mean"], rm_uml["se"], rm_uml["n"]) == (approx(0.8), approx(0.1), 2)

    # total seconds 10, 14, missing: mean 12, ss 8, var 8, se sqrt(8 / 2) = 2
    sec = s["seconds"]
    assert (sec["mean"], sec["se"], sec["per_seed"]) == (approx(12.0), approx(2.0), [10.0, 14.0, None])
    # stage means over the seeds that ran the stage: sft (4 + 6 + 5) / 3 = 5, eval (1 + 2) / 2 = 1.5
    assert sec["stages"] == {"sft": approx(5.0), "eval": approx(1.5)}
    # process wall 20, missing, 30: mean 25, ss 50, var 50, se 5
    assert (sec["process"]["mean"], sec["process"]["se"]) == (approx(25.0), approx(5.0))
    json.dumps(s, allow_nan=False)  # strict JSON: no NaN left


def test_summarize_empty_reports_tolerated():
    s = bf.summarize({3: {}, 4: {"policies": {"sft": {}}}})
    assert s["seeds"] == [3, 4]
    assert s["policies"]["sft"]["gold"] == {"mean": None, "se": None, "n": 0, "per_seed": [None, None]}
    assert s["reward_models"] == {}
    assert "n/a" in bf.render_markdown(s)


def test_render_markdown_rows():
    s = {**bf.summarize(fake_reports()), "date": "2026-01-01T00:00:00", "commit": "abc1234"}
    s["command"] = "python bench/bench_fidelity.py --seeds 0,1,2 --output-dir out"
    md = bf.render_markdown(s)
    assert "2026-01-01T00:00:00, commit abc1234" in md
    assert "`python bench/bench_fidelity.py --seeds 0,1,2 --output-dir out`" in md
    assert "| SFT | 0.300 ± 0.058 (3) | — | -0.300 ± 0.058 | 45.0 ± 2.9 | 0.200, 0.400, 0.300 | — |" in md
    # 0.1 / sqrt(3) = 0.0577, 0.2 / sqrt(3) = 0.1155; win-rate from 2 of 3 seeds
    row = "| RLP-UML | 0.700 ± 0.100 (3) | +0.400 ± 0.058 | +0.100 ± 0.115 | 65.0 ± 5.0 (n=2) "
    assert row + "| 0.600, 0.900, 0.600 | 0.050, 0.070, n/a |" in md
    assert "| PPO (oracle: gold reward) | 0.900 (1) | +0.700 (n=1) | +0.400 (n=1) | n/a |" in md
    assert "| RM (D only) | 0.700 ± 0.058 | 0.600 ± 0.058 | 0.700 ± 0.100 (n=2) |" in md
    assert "| RM RLP-UML | 0.800 ± 0.100 (n=2) | n/a | n/a |" in md
    assert "Time per seed: stages 12.0 ± 2.0 s (per seed: 10.0, 14.0, n/a s)" in md


def _main(argv: list[str]) -> int:
    """bf.main's exit code, also where argparse exits."""
    try:
        return bf.main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seeds", "0,a"], "not a comma-separated list of integers"),
        (["--seeds", "0,-1"], "seeds are integers >= 0"),
        (["--seeds", "1,1"], "repeats a seed"),
        (["--seeds", "0", "--preset", "huge"], "unknown preset 'huge'"),
        (["--seeds", "0", "ppo.no_such_key=1"], "unknown key"),
        (["--seeds", "0", "ppo.kl_coef"], "expected key=value"),
        (["--seeds", "0", "run.seed=3"], "the bench sets run.seed"),
        (["--seeds", "0", "--jobs", "0"], "--jobs: 0 is not >= 1"),
        (["--seeds", "0", "--jobs", "two"], "invalid int value"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    rc = _main([*args, "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("bench_fidelity: error: ")
    assert not out.exists()  # nothing ran, nothing was written


def test_finished_seed_with_another_config_refused(tmp_path, capsys):
    # a seed folder left by a bench with ppo.kl_coef=0.05 must not be mixed into one without it
    saved = bf._expected_config("tiny", ["ppo.kl_coef=0.05"], 0)
    (tmp_path / "seed_0").mkdir()
    (tmp_path / "seed_0" / "report.json").write_text(json.dumps({"config": saved}))
    rc = bf.main(["--seeds", "0,1", "--preset", "tiny", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "seed_0/report.json was made with another config (ppo.kl_coef: 0.05 (this command:" in err
    assert not (tmp_path / "seed_1").exists()


def test_failed_seed_reported_and_nothing_aggregated(tmp_path):
    # the CLI's own input check fails the run (about 0.3 s, before torch is imported)
    cmd = [sys.executable, str(SCRIPT), "--seeds", "0", "--output-dir", str(tmp_path), "--preset", "tiny"]
    res = subprocess.run([*cmd, "model.path=/nonexistent/model"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "seed 0: FAILED (exit 2)" in res.stdout
    assert "model.path: /nonexistent/model does not exist" in res.stderr  # the log's tail
    assert "seeds [0] failed" in res.stderr
    assert "model.path: /nonexistent/model" in (tmp_path / "seed_0" / "bench.log").read_text()
    assert not (tmp_path / "fidelity.json").exists()


@pytest.mark.slow
def test_end_to_end_tiny_two_seeds_then_resume(tmp_path):
    # Two tiny pipeline runs, two at a time (about 20 s on the 2-core dev box), then a rerun that skips both.
    out = tmp_path / "bench"
    cmd = [sys.executable, str(SCRIPT), "--seeds", "0,1", "--output-dir", str(out), "--preset", "tiny"]
    cmd += ["--jobs", "2", "run.threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    for name in ("fidelity.json", "fidelity.md", "fidelity.png"):
        assert (out / name).stat().st_size > 0, name
    s = json.loads((out / "fidelity.json").read_text())
    assert s["seeds"] == [0, 1]
    assert s["config_overrides"] == ["run.threads=1"] and s["preset"] == "tiny"
    reports = {k: json.loads((out / f"seed_{k}" / "report.json").read_text()) for k in (0, 1)}
    for name, row in s["policies"].items():
        assert row["gold"]["per_seed"] == [reports[k]["policies"][name]["gold"] for k in (0, 1)]
    assert {"sft", "ppo"} <= set(s["policies"]) and s["reward_models"]
    assert s["seconds"]["process"]["n"] == 2
    assert "| SFT |" in first.stdout and "| reward model |" in first.stdout
    stamps = {k: (out / f"seed_{k}" / "report.json").stat().st_mtime_ns for k in (0, 1)}

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("report.json exists, skipped") == 2
    assert "started" not in again.stdout
    assert stamps == {k: (out / f"seed_{k}" / "report.json").stat().st_mtime_ns for k in (0, 1)}
    assert json.loads((out / "fidelity.json").read_text())["policies"] == s["policies"]
