"""The `rlp-engine` command end to end on the tiny preset, and its error paths."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlp_engine.cli import main


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    rc = main(
        ["train", "--preset", "tiny", "--output-dir", str(out), "run.threads=1", "run.tensorboard=true"]
    )
    assert rc == 0
    return out


def test_train_writes_report_curves_metrics_and_checkpoints(tiny_run):
    report = json.loads((tiny_run / "report.json").read_text())
    policies = {"sft", "ppo", "ppo_oracle", "rlp_uml", "rlp_spg", "rlp_uml_spg", "rlp_spg_r2"}
    assert set(report["policies"]) == policies
    for row in report["policies"].values():
        assert 0.0 <= row["gold"] <= 1.0 and row["proxy_reward"] is not None
    assert set(report["reward_models"]) == {"rm", "rm_uml", "rm_spg", "rm_uml_spg", "rm_spg_r2"}
    for row in report["reward_models"].values():
        assert set(row["on_policy_accuracy"]) >= {
            "sft",
            "ppo",
            "ppo_oracle",
            "rlp_uml",
            "rlp_spg",
            "all",
            "pairs",
        }
        assert 0.0 <= row["offline_accuracy"] <= 1.0
    stages = (
        "sft",
        "pref",
        "rm",
        "ppo",
        "ppo_oracle",
        "sample",
        "rm_uml",
        "ppo_uml",
        "rm_spg",
        "ppo_spg",
        "rm_uml_spg",  # both refinements at once
        "ppo_uml_spg",
        "sample_r2",  # rlp.rounds=2: P again from RLP-SPG's policy, refined again
        "rm_spg_r2",
        "ppo_spg_r2",
        "eval",
    )
    assert list(report["stage_seconds"]) == list(stages)
    assert set(report["throughput"]) == {"generation", "scoring", "training"}
    assert all(v["tokens"] > 0 for v in report["throughput"].values())
    md = (tiny_run / "report.md").read_text()
    assert "| RLP-SPG |" in md and "tokens/s" in md
    assert (tiny_run / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    lines = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    logged = {"sft", "rm", "ppo", "ppo_oracle", "rm_uml", "ppo_uml", "rm_spg", "ppo_spg"}
    logged |= {"rm_uml_spg", "ppo_uml_spg", "rm_spg_r2", "ppo_spg_r2"}
    assert {x["stage"] for x in lines} == logged
    assert any(x["stage"] == "rm_uml" and "mi" in x for x in lines)
    assert any((tiny_run / "tb").iterdir())
    for name in ("sft", "ppo", "ppo_oracle", "ppo_uml", "ppo_spg", "ppo_uml_spg", "ppo_spg_r2"):
        assert (tiny_run / "checkpoints" / name / "config.json").is_file()
        assert (tiny_run / "checkpoints" / name / "tokenizer.json").is_file()
    for name in ("rm", "rm_uml", "rm_spg", "rm_uml_spg", "rm_spg_r2"):
        assert (tiny_run / "checkpoints" / name / "scalar_head.pt").is_file()


def test_kl_to_sft_and_gold_vs_kl_curves(tiny_run):
    """Every policy's KL to SFT (SFT's own: 0) and, for the trained ones, its curve: SFT start,
    the snapshots (tiny: ppo.steps=2 and eval.curve_points=4 give one, after step 1), the final row."""
    report = json.loads((tiny_run / "report.json").read_text())
    rows = report["policies"]
    assert (
        rows["sft"]["kl_to_sft"] == 0.0 and rows["sft"]["kl_to_sft_se"] == 0.0 and "curve" not in rows["sft"]
    )
    keys = {"step", "fraction", "gold", "gold_se", "kl_to_sft", "kl_to_sft_se"}
    for name, row in rows.items():
        assert isinstance(row["kl_to_sft"], float) and row["kl_to_sft_se"] >= 0.0, name
        if name == "sft":
            continue
        curve = row["curve"]
        assert [p["step"] for p in curve] == [0, 1, 2] and [p["fraction"] for p in curve] == [0.0, 0.5, 1.0]
        assert all(keys <= set(p) for p in curve)
        # every point on the same prompts and samples: SFT's (KL 0, the same for every policy) ...
        assert curve[0]["kl_to_sft"] == 0.0 and curve[0] == rows["ppo"]["curve"][0]
        for point in curve:
            assert (
                point["n_prompts"] == 16 and point["samples_per_prompt"] == 4
            )  # min(curve_prompts, num_prompts)
            assert 0.0 <= point["gold"] <= 1.0 and point["gold_se"] >= 0.0
        # ... a snapshot's and the trained policy's (moved from SFT: a k1 estimate, near 0 but not 0
        # after two tiny steps, either sign; the full evaluation's row is on more samples)
        assert curve[1]["kl_to_sft_se"] > 0.0 and curve[-1]["kl_to_sft_se"] > 0.0
    stages = {p.name for p in (tiny_run / "curve").iterdir()}
    assert stages == {"ppo", "ppo_oracle", "ppo_uml", "ppo_spg", "ppo_uml_spg", "ppo_spg_r2"}
    assert (tiny_run / "gold_vs_kl.png").read_bytes()[:4] == b"\x89PNG"
    assert "KL to SFT ± SE" in (tiny_run / "report.md").read_text()


def test_eval_and_sample_a_saved_policy(tiny_run, capsys):
    ckpt = tiny_run / "checkpoints"
    rc = main(["eval", "--preset", "tiny", "--policy", str(ckpt / "ppo"), "--reward-model", str(ckpt / "rm")])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert 0.0 <= summary["gold"] <= 1.0 and "rm" in summary["proxy_reward_by_rm"]
    rc = main(["sample", "--preset", "tiny", "--policy", str(ckpt / "sft"), "--prompt", "3+4=", "-n", "2"])
    assert rc == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["3+4=", "3+4="]


def test_console_script_rejects_bad_config(tmp_path):
    exe = shutil.which("rlp-engine") or str(Path(sys.executable).parent / "rlp-engine")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo:\n  clip_ratio: 0.3\n")
    res = subprocess.run([exe, "train", "--config", str(bad)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "bad.yaml: ppo.clip_ratio: unknown key" in res.stderr
    res = subprocess.run([exe, "train", "sft.steps=ten"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "sft.steps: expected int, got str 'ten'" in res.stderr


def test_train_rejects_malformed_jsonl_naming_file_and_line(tmp_path, capsys):
    bad = tmp_path / "sft.jsonl"
    bad.write_text('{"prompt": "1+1=", "response": "2"}\n{"prompt": "2+2=", "response": 4}\n')
    rc = main(["train", "--preset", "tiny", "--output-dir", str(tmp_path / "out"), f"data.sft_path={bad}"])
    assert rc == 2
    assert "sft.jsonl:2: field 'response' must be a string (int)" in capsys.readouterr().err
