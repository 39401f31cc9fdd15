"""report.md from evaluate_policies' structure (figures with SEs, paired differences, RM table), from
the older structure without SEs, and display names of policies beyond the four of the paper."""

from rlp_engine.pipeline.report import policy_name, render_markdown, rm_name, write_report


def _policy(gold, se, diffs=None, win=None, proxy=0.25):
    row = {
        "gold": gold,
        "gold_se": se,
        "exact": gold / 2,
        "exact_se": se / 2,
        "win_rate": win,
        "win_rate_se": None if win is None else 2.5,
        "proxy_reward_by_rm": {"rm": proxy, "rm_uml": None},
        "proxy_reward_se_by_rm": {"rm": 0.01, "rm_uml": None},
        "proxy_reward": proxy,
        "proxy_reward_se": 0.01,
        "response_tokens": 3.25,
        "n_prompts": 128,
        "samples_per_prompt": 4,
        "examples": [],
    }
    for target, (d, dse) in (diffs or {}).items():
        row[f"diff_vs_{target}"] = {
            "gold": d,
            "gold_se": dse,
            "win_rate": None,
            "win_rate_se": None,
            "n_prompts": 128,
        }
    return row


def _rm(acc, pols):
    return {
        "on_policy_accuracy": {**{p: acc for p in pols}, "all": acc, "pairs": 300},
        "on_policy_accuracy_se": {**{p: 0.04 for p in pols}, "all": 0.02},
        "on_policy_pairs": {**{p: 100 for p in pols}, "all": 300},
        "on_policy_prompts": {**{p: 90 for p in pols}, "all": 120},
        "offline_accuracy": 0.8125,
        "offline_accuracy_se": 0.0244,
        "offline_pairs": 256,
        "best_of": {"rate": 0.5, "rate_se": 0.05, "chance": 0.3125, "chance_se": 0.02, "n_prompts": 100},
    }


def test_new_structure_renders_se_deltas_and_readable_names():
    pols = ["sft", "ppo", "rlp_spg", "ppo_oracle"]
    report = {
        "policies": {
            "sft": _policy(0.4, 0.03, win=36.7),
            "ppo": _policy(0.5, 0.03, {"sft": (0.1, 0.02)}, win=46.8),
            "rlp_spg": _policy(0.55, 0.03, {"sft": (0.15, 0.02), "ppo": (0.05, 0.0125)}, win=50.2),
            "ppo_oracle": _policy(0.7, 0.02, {"sft": (0.3, 0.025)}),
        },
        "reward_models": {"rm": _rm(0.75, pols), "rm_spg_r2": _rm(0.8, pols)},
        "reference": {"gold": 0.9, "gold_se": 0.01, "exact": 0.8, "exact_se": 0.02, "n_prompts": 128},
        "eval": {"n_prompts": 128, "samples_per_prompt": 4, "temperature": 0.7, "seed": 0},
        "stage_seconds": {"sft": 1.0},
        "total_seconds": 2.0,
    }
    md = render_markdown(report)
    assert (
        "| policy | gold ± SE | exact ± SE | win-rate vs reference (%) ± SE | "
        "Δ gold vs SFT ± SE | Δ gold vs PPO ± SE |" in md
    )
    assert (
        "| RLP-SPG | 0.550 ± 0.030 | 0.275 ± 0.015 | 50.2 ± 2.5 | +0.150 ± 0.020 | +0.050 ± 0.013 | "
        "0.250 ± 0.010 | n/a | 3.2 |" in md  # KL to SFT: not in this report
    )
    # SFT has no difference to itself; the oracle is not paired against PPO; it has no win-rate
    assert "| SFT | 0.400 ± 0.030 | 0.200 ± 0.015 | 36.7 ± 2.5 | n/a | n/a |" in md
    assert "| PPO (oracle: gold reward) | 0.700 ± 0.020 | 0.350 ± 0.010 | n/a | +0.300 ± 0.025 | n/a |" in md
    assert "| Reference (demonstrator) | 0.900 ± 0.010 | 0.800 ± 0.020 | 50.0 |" in md
    assert "4 responses to each of 128 held-out prompts at temperature 0.7, seed 0" in md
    assert "| RM RLP-SPG (round 2) | 0.812 ± 0.024 | 0.800 ± 0.020 | 0.800 ± 0.040 |" in md
    assert "| 0.500 ± 0.050 (0.312) |" in md
    assert "On-policy: 300 gold-labelled pairs" in md and "256 pairs on held-out prompts" in md
    assert "| total | 2.0 | | | |" in md and "## Time" in md
    assert "| sft | 1.0 | n/a | n/a | n/a |" in md  # no stage_throughput in this report


def test_time_table_gives_each_stage_its_tokens_per_second():
    phase = {"tokens": 300.0, "seconds": 0.5, "tokens_per_s": 600.0}
    report = {
        "stage_seconds": {"sft": 1.0, "ppo": 3.0, "eval": 0.5},
        "total_seconds": 4.5,
        "stage_throughput": {
            "sft": {"training": phase},
            "ppo": {"training": phase, "generation": {**phase, "tokens_per_s": 1234.4}},
        },
    }
    md = render_markdown(report)
    assert "| stage | seconds | training tokens/s | generation tokens/s | scoring tokens/s |" in md
    assert "| sft | 1.0 | 600 | n/a | n/a |" in md
    assert "| ppo | 3.0 | 600 | 1234 | n/a |" in md
    assert "| eval | 0.5 | n/a | n/a | n/a |" in md


def test_kl_column_and_gold_vs_kl_plot(tmp_path):
    curve = [
        {"step": 0, "fraction": 0.0, "gold": 0.4, "gold_se": 0.03, "kl_to_sft": 0.0, "kl_to_sft_se": 0.0},
        {"step": 5, "fraction": 0.5, "gold": 0.5, "gold_se": None, "kl_to_sft": 1.5, "kl_to_sft_se": 0.2},
        {"step": 10, "fraction": 1.0, "gold": 0.45, "gold_se": 0.03, "kl_to_sft": 3.25, "kl_to_sft_se": 0.5},
    ]
    report = {
        "policies": {
            "sft": {**_policy(0.4, 0.03), "kl_to_sft": 0.0, "kl_to_sft_se": 0.0},
            "ppo": {**_policy(0.45, 0.03), "kl_to_sft": 3.25, "kl_to_sft_se": 0.5, "curve": curve},
        }
    }
    md = render_markdown(report)
    assert "| proxy reward ± SE | KL to SFT ± SE | response tokens |" in md
    assert "| 0.000 ± 0.000 | 3.2 |" in md and "| 3.250 ± 0.500 | 3.2 |" in md
    assert "gold_vs_kl.png" in md
    write_report(tmp_path, report, {})
    assert (tmp_path / "gold_vs_kl.png").read_bytes()[:4] == b"\x89PNG"
    del report["policies"]["ppo"]["curve"]  # no curves: no plot, no mention
    (tmp_path / "none").mkdir()
    write_report(tmp_path / "none", report, {})
    assert not (tmp_path / "none" / "gold_vs_kl.png").exists()
    assert "gold_vs_kl.png" not in render_markdown(report)


def test_older_structure_without_se_still_renders():
    pols = {"sft": {"gold": 0.4, "exact": 0.2, "proxy_reward_by_rm": {"rm": 0.1}, "proxy_reward": 0.1}}
    rms = {"rm": {"on_policy_accuracy": {"sft": 0.7, "all": 0.7, "pairs": 12}, "offline_accuracy": 0.8}}
    md = render_markdown({"policies": pols, "reward_models": rms})
    assert "| SFT | 0.400 | 0.200 | n/a | 0.100 | n/a |" in md
    assert "| RM (D only) | 0.800 | 0.700 | 0.700 | n/a |" in md
    assert "On-policy: 12 gold-labelled pairs" in md and "## Time" not in md


def test_display_names():
    assert [policy_name(k) for k in ("rlp_uml", "rlp_uml_spg", "rlp_spg_r2", "ppo_oracle", "my_policy")] == [
        "RLP-UML",
        "RLP-UML+SPG",
        "RLP-SPG (round 2)",
        "PPO (oracle: gold reward)",
        "my_policy",
    ]
    assert rm_name("rm_uml_r3") == "RM RLP-UML (round 3)" and rm_name("rm") == "RM (D only)"
