"""README's default-run figures cannot drift (issue 14 item 9): the block between README's
figures markers is exactly scripts/readme_figures.py's rendering of bench/default_report.json, and
the script extracts, renders and checks as it says."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("readme_figures", ROOT / "scripts" / "readme_figures.py")
figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(figures)


def test_readme_block_is_the_rendering_of_the_committed_figures():
    fig = json.loads((ROOT / "bench" / "default_report.json").read_text())
    readme = (ROOT / "README.md").read_text()
    assert figures.BLOCK.search(readme).group(2) == figures.render(fig)
    assert figures.main(["--check"]) == 0


def _report() -> dict:
    """A report.json's shape with the fields extract() reads (and some it drops)."""
    policies = {
        name: {
            "gold": 0.5 + i / 20,
            "gold_se": 0.01,
            "exact": 0.4 + i / 20,
            "win_rate": 50.0 + i,
            "proxy_reward": 1.0,
            "diff_vs_sft": None if name == "sft" else {"gold": i / 20, "gold_se": 0.02, "exact": 0.1},
        }
        for i, name in enumerate(figures.POLICIES)
    }
    stages = {"sft": 30.2, "pref": 1.6, "rm": 25.0, "rm_uml": 36.4, "ppo": 6.1, "ppo_uml": 7.0, "eval": 8.0}
    return {
        "policies": policies,
        "stage_seconds": stages,
        "total_seconds": 230.4,
        "eval": {"n_prompts": 256, "samples_per_prompt": 16, "seed": 0, "temperature": 0.7},
        "machine": {"platform": "Linux", "threads": 1, "device": "cpu", "world_size": 1},
        "config": {"run": {"seed": 0}},
    }


def test_extract_render_and_check(tmp_path):
    fig = figures.extract(_report(), "abc1234")
    assert "config" not in fig and "proxy_reward" not in fig["policies"]["ppo"]
    block = figures.render(fig)
    assert "at commit abc1234" in block and "pipeline 230 s (SFT 30 s, D 2 s, each RM 25-36 s" in block
    assert "| SFT | 0.500 ± 0.010 | 0.400 | | 50.0% |" in block
    assert "| PPO | 0.550 ± 0.010 | 0.450 | +0.050 ± 0.020 | 51.0% |" in block
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- figures:begin: x -->\nold\n<!-- figures:end -->\noutro\n")
    report = tmp_path / "report.json"
    report.write_text(json.dumps(_report()))
    out = tmp_path / "figs.json"
    paths = ["--figures", str(out), "--readme", str(readme)]
    assert figures.main([*paths, "--from-report", str(report), "--commit", "abc1234"]) == 0
    assert json.loads(out.read_text()) == fig
    assert readme.read_text() == f"intro\n<!-- figures:begin: x -->\n{block}<!-- figures:end -->\noutro\n"
    assert figures.main([*paths, "--check"]) == 0
    changed = copy.deepcopy(fig)
    changed["policies"]["ppo"]["gold"] = 0.9
    out.write_text(json.dumps(changed))
    assert figures.main([*paths, "--check"]) == 1  # a figure changed, README not rewritten


def test_missing_markers_and_commit_are_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="no `<!-- figures:begin"):
        figures.rewrite("no block here\n", "x\n")
    with pytest.raises(SystemExit):
        figures.main(["--from-report", str(tmp_path / "report.json")])
    assert "--from-report needs --commit" in capsys.readouterr().err


def test_kl_to_sft_column_when_the_report_has_it():
    report = _report()
    for i, row in enumerate(report["policies"].values()):
        row["kl_to_sft"], row["kl_to_sft_se"] = 0.25 * i, 0.01 * i
    fig = figures.extract(report, "abc1234")
    assert fig["policies"]["ppo"]["kl_to_sft"] == 0.25
    block = figures.render(fig)
    assert "| policy | gold | exact | Δ gold vs SFT | win-rate vs demonstrator | KL to SFT |" in block
    assert "|---|---|---|---|---|---|" in block
    assert "KL to the SFT policy in nats per response" in " ".join(block.split())  # wrapped sentence
    assert "| SFT | 0.500 ± 0.010 | 0.400 | | 50.0% | 0 |" in block
    assert "| PPO | 0.550 ± 0.010 | 0.450 | +0.050 ± 0.020 | 51.0% | 0.25 ± 0.01 |" in block
    # a report without KL (as before the column) renders the five columns
    assert "KL to SFT" not in figures.render(figures.extract(_report(), "abc1234"))


def test_stage_seconds_that_round_alike_are_one_figure():
    assert figures._seconds({"sample": 0.87, "sample_r2": 0.81, "ppo": 6.5, "ppo_uml": 7.9}) == (
        "each PPO 6-8 s, sampling P 1 s"
    )
