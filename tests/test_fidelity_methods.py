"""bench/fidelity_methods.py through bench_fidelity: the per-method figures across seeds (proxy reward,
KL to SFT, wall time, training tokens/s) against a direct computation of mean and SE, the stage
attribution of wall time, "—" for figures the reports lack, the gold-vs-KL curves across seeds and
their figure, and `--aggregate-only` on hand-made seed folders."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_fidelity", REPO / "bench" / "bench_fidelity.py")
bf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bf)
import fidelity_methods as fm  # noqa: E402  (bench/ is on sys.path once bench_fidelity is loaded)


def mean_se(values):
    """The SE over seeds computed directly: sd(ddof=1) / sqrt(n)."""
    return statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))


def _tps(value):
    return {"training": {"tokens": 1000.0, "seconds": 1000.0 / value, "tokens_per_s": value}}


def _curve(points):
    """[(fraction, step, gold, kl)] -> report curve points (H2's contract)."""
    return [
        {"step": s, "fraction": f, "gold": g, "gold_se": 0.01, "kl_to_sft": k, "kl_to_sft_se": 0.1}
        for f, s, g, k in points
    ]


def reports() -> dict[int, dict]:
    """Three seeds. KL of dpo missing in seed 1; stage_throughput absent in seed 1 and without dpo in
    seed 2; rlp_spg only in seed 0; seed 2 lacks the ppo curve's half-way point and seed 1's last
    step differs from the others'."""
    rm = {"rm": {"offline_accuracy": 0.7, "on_policy_accuracy": {}}}
    r0 = {
        "policies": {
            "sft": {"gold": 0.30, "proxy_reward": -0.5, "kl_to_sft": 0.0},
            "ppo": {"gold": 0.50, "proxy_reward": 1.0, "kl_to_sft": 2.0, "kl_to_sft_se": 0.2},
            "dpo": {"gold": 0.60, "proxy_reward": 0.5, "kl_to_sft": 4.0},
            "rlp_spg": {"gold": 0.55, "proxy_reward": 3.0},
        },
        "reward_models": rm,
        "stage_seconds": {
            "sft": 10,
            "pref": 1,
            "rm": 5,
            "ppo": 3,
            "dpo": 7,
            "sample": 2,
            "rm_spg": 6,
            "ppo_spg": 4,
        },
        "stage_throughput": {"ppo": _tps(100.0), "dpo": _tps(300.0), "sft": _tps(50.0)},
    }
    r1 = {
        "policies": {
            "sft": {"gold": 0.40, "proxy_reward": -0.1, "kl_to_sft": 0.0},
            "ppo": {"gold": 0.70, "proxy_reward": 2.0, "kl_to_sft": 3.0, "kl_to_sft_se": 0.3},
            "dpo": {"gold": 0.65, "proxy_reward": 0.7},
        },
        "reward_models": rm,
        "stage_seconds": {"sft": 11, "pref": 1, "rm": 5, "ppo": 5, "dpo": 9},
    }
    r2 = {
        "policies": {
            "sft": {"gold": 0.35, "proxy_reward": -0.3, "kl_to_sft": 0.0},
            "ppo": {"gold": 0.60, "proxy_reward": 1.5, "kl_to_sft": 4.5},
            "dpo": {"gold": 0.62, "proxy_reward": 0.9, "kl_to_sft": 6.0},
        },
        "reward_models": rm,
        "stage_seconds": {"sft": 12, "pref": 1, "rm": 5, "ppo": 4, "dpo": 8},
        "stage_throughput": {"ppo": _tps(200.0)},
    }
    r0["policies"]["ppo"]["curve"] = _curve([(0, 0, 0.30, 0.0), (0.5, 5, 0.45, 1.0), (1, 10, 0.50, 2.0)])
    r1["policies"]["ppo"]["curve"] = _curve([(0, 0, 0.40, 0.0), (0.5, 5, 0.65, 1.6), (1, 11, 0.70, 3.0)])
    r2["policies"]["ppo"]["curve"] = _curve([(0, 0, 0.35, 0.0), (1, 10, 0.60, 4.5)])
    return {0: r0, 1: r1, 2: r2}


def test_method_figures_are_mean_and_se_over_seeds():
    s = bf.summarize(reports())
    ppo, dpo, spg = s["policies"]["ppo"], s["policies"]["dpo"], s["policies"]["rlp_spg"]
    approx = pytest.approx
    for est, values in [
        (ppo["proxy_reward"], [1.0, 2.0, 1.5]),
        (ppo["kl_to_sft"], [2.0, 3.0, 4.5]),
        (ppo["wall_seconds"], [3, 5, 4]),  # ppo's own stage: rm is shared by every method
        (dpo["proxy_reward"], [0.5, 0.7, 0.9]),
        (dpo["kl_to_sft"], [4.0, 6.0]),  # seed 1 has no KL: the mean and SE of the two that do
        (dpo["wall_seconds"], [7, 9, 8]),
        (ppo["train_tokens_per_s"], [100.0, 200.0]),
    ]:
        mean, se = mean_se(values)
        assert (est["mean"], est["se"], est["n"]) == (approx(mean), approx(se), len(values))
    assert ppo["kl_to_sft"]["within_seed_se"] == [0.2, 0.3, None]
    assert dpo["kl_to_sft"]["per_seed"] == [4.0, None, 6.0]
    # one seed of dpo's stage throughput: a mean, no SE
    assert dpo["train_tokens_per_s"] == {"mean": 300.0, "se": None, "n": 1, "per_seed": [300.0, None, None]}
    # rlp_spg (seed 0 only): ppo 3 + sample 2 + rm_spg 6 + ppo_spg 4 (its P comes from PPO's policy)
    assert spg["wall_seconds"]["per_seed"] == [15.0, None, None]
    assert spg["wall_seconds"]["stages"] == ["ppo", "sample", "rm_spg", "ppo_spg"]
    assert s["policies"]["sft"]["wall_seconds"]["mean"] == approx(11.0)  # SFT's own stage
    json.dumps(s, allow_nan=False)


ARENA = ["sft", "pref", "rm", "ppo", "ppo_oracle", "sample", "rm_uml", "ppo_uml", "rm_spg", "ppo_spg"]
ARENA += ["rm_uml_spg", "ppo_uml_spg", "sample_r2", "rm_spg_r2", "ppo_spg_r2", "sample_r3", "rm_spg_r3"]
ARENA += ["ppo_spg_r3", "dpo", "grpo", "rm_ens_m0", "rm_ens_m1", "ppo_ens_mean", "ppo_ens_wco"]
ARENA += ["sample_ens", "rm_ens_spg_m0", "rm_ens_spg_m1", "ppo_rlp_ens", "grpo_spg", "eval"]


@pytest.mark.parametrize(
    "policy, stages",
    [
        ("sft", ["sft"]),
        ("ppo", ["ppo"]),
        ("dpo", ["dpo"]),
        ("grpo", ["grpo"]),
        ("rlp_uml", ["ppo", "sample", "rm_uml", "ppo_uml"]),
        ("rlp_uml_spg", ["ppo", "sample", "rm_spg", "rm_uml_spg", "ppo_uml_spg"]),
        ("rlp_spg_r2", ["ppo", "sample", "rm_spg", "ppo_spg", "sample_r2", "rm_spg_r2", "ppo_spg_r2"]),
        (
            "rlp_spg_r3",
            ["ppo", "sample", "rm_spg", "ppo_spg", "sample_r2", "rm_spg_r2", "ppo_spg_r2"]
            + ["sample_r3", "rm_spg_r3", "ppo_spg_r3"],
        ),
        ("ppo_ens_wco", ["rm_ens_m0", "rm_ens_m1", "ppo_ens_wco"]),
        (
            "rlp_ens",
            ["rm_ens_m0", "rm_ens_m1", "ppo_ens_mean", "sample_ens", "rm_ens_spg_m0", "rm_ens_spg_m1"]
            + ["ppo_rlp_ens"],
        ),
        ("grpo_spg", ["ppo", "sample", "rm_spg", "grpo_spg"]),
        ("simpo", None),  # not in this run
    ],
)
def test_wall_time_attribution(policy, stages):
    assert fm.method_stages(policy, ARENA) == stages


def test_missing_figures_show_a_dash():
    old = {k: {"policies": {"sft": {"gold": 0.3}, "ppo": {"gold": 0.5, "proxy_reward": 1.0}}} for k in (0, 1)}
    s = bf.summarize(old)
    md = bf.render_markdown(s)
    assert "| SFT | — | — | — | — | — |" in md  # no proxy reward, KL, stage seconds or throughput
    assert "| PPO | 1.000 ± 0.000 | — | — | — | — |" in md
    assert s["policies"]["ppo"]["curve"] == []
    assert s["policies"]["ppo"]["kl_to_sft"]["n"] == 0


def test_curves_are_matched_by_fraction_across_seeds():
    curve = bf.summarize(reports())["policies"]["ppo"]["curve"]
    assert [p["fraction"] for p in curve] == [0.0, 0.5, 1.0]
    assert [p["step"] for p in curve] == [0, 5, None]  # seed 1 ended at step 11: no common step
    half = curve[1]  # seed 2 has no such point
    assert half["gold"]["per_seed"] == [0.45, 0.65, None]
    for est, values in [(half["gold"], [0.45, 0.65]), (half["kl_to_sft"], [1.0, 1.6])]:
        mean, se = mean_se(values)
        assert (est["mean"], est["se"], est["n"]) == (pytest.approx(mean), pytest.approx(se), 2)
    mean, se = mean_se([0.50, 0.70, 0.60])
    assert (curve[2]["gold"]["mean"], curve[2]["gold"]["se"]) == (pytest.approx(mean), pytest.approx(se))
    assert curve[0]["kl_to_sft"] == {"mean": 0.0, "se": 0.0, "n": 3, "per_seed": [0.0, 0.0, 0.0]}


def test_kl_plot_written_only_when_there_is_kl(tmp_path):
    path = tmp_path / "fidelity_kl.png"
    assert fm.plot_kl(bf.summarize(reports()), path) is True
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    none = tmp_path / "none.png"
    assert fm.plot_kl(bf.summarize({0: {"policies": {"sft": {"gold": 0.3}}}}), none) is False
    assert not none.exists()


def _seed_dirs(out: Path, seeds=(0, 1, 2)) -> None:
    for k, r in reports().items():
        if k in seeds:
            (out / f"seed_{k}").mkdir(parents=True)
            (out / f"seed_{k}" / "report.json").write_text(json.dumps(r))


def test_aggregate_only_summarises_existing_seed_folders(tmp_path, capsys):
    _seed_dirs(tmp_path)
    assert bf.main(["--seeds", "0,1,2", "--output-dir", str(tmp_path), "--aggregate-only"]) == 0
    printed = capsys.readouterr().out
    assert "| PPO | 1.500 ± 0.289 | 3.167 ± 0.726 | 4.0 ± 0.6 | 150 ± 50 (n=2) | ppo |" in printed
    assert "Aggregated from existing seed reports (--aggregate-only)" in printed
    for name in ("fidelity.json", "fidelity.md", "fidelity.png", "fidelity_kl.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    s = json.loads((tmp_path / "fidelity.json").read_text())
    assert s["aggregate_only"] is True and s["seeds"] == [0, 1, 2]
    assert [p["fraction"] for p in s["policies"]["ppo"]["curve"]] == [0.0, 0.5, 1.0]
    assert not any((tmp_path / f"seed_{k}" / "bench.log").exists() for k in (0, 1, 2))  # nothing ran


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seeds", "0,1,2"], "--aggregate-only: no report for these seeds: "),
        (["--seeds", "0,1", "--preset", "tiny"], "drop --preset and the overrides"),
        (["--seeds", "0,1", "ppo.kl_coef=0.1"], "drop --preset and the overrides"),
    ],
)
def test_aggregate_only_refusals(tmp_path, capsys, extra, message):
    _seed_dirs(tmp_path, seeds=(0, 1))
    assert bf.main([*extra, "--output-dir", str(tmp_path), "--aggregate-only"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "fidelity.json").exists()
