"""`rlp-engine train --output-dir DIR --restart` (issue 14 item 2): a directory left by a crashed or
changed run is never unusable. --restart deletes the earlier run's files in DIR (only when DIR looks
like a run directory) after the inputs are checked and starts over; the refusals of a plain rerun
and of a --resume with another config name --restart."""

from __future__ import annotations

import json
import os

import pytest

from rlp_engine.cli import _parser, main
from rlp_engine.config import ConfigError, dump_yaml, load_config, to_dict
from rlp_engine.engine.checkpoint import CheckpointStore
from rlp_engine.pipeline.run import RUN_FILES, check_restartable, discard_run, open_store

TINY = ["--preset", "tiny", "sft.steps=3", "ppo.steps=2", "run.tensorboard=false", "run.threads=1"]


def _cfg(out, *overrides: str):
    return load_config(None, [f"run.output_dir={out}", *overrides], preset="tiny")


def _crashed_run(out, cfg) -> None:
    """What a run killed inside training leaves: config.yaml, metrics, an export, two checkpoints."""
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(dump_yaml(cfg))
    (out / "metrics.jsonl").write_text('{"stage": "old", "step": 1, "loss": 9.0}\n')
    (out / "checkpoints" / "sft").mkdir(parents=True)
    (out / "checkpoints" / "sft" / "config.json").write_text("{}")
    store = CheckpointStore(out / "resume")
    for step in (2, 4):
        store.save({"config": to_dict(cfg), "loop": {"step": step}})


def test_check_restartable_accepts_only_run_directories(tmp_path):
    check_restartable(tmp_path / "missing")
    check_restartable(tmp_path)  # empty
    (tmp_path / "config.yaml").write_text("sft: {}\n")
    check_restartable(tmp_path)
    (tmp_path / "config.yaml").unlink()
    (tmp_path / "resume").mkdir()
    check_restartable(tmp_path)
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "chapter1.tex").write_text("x")
    with pytest.raises(ConfigError, match=r"--restart: .*thesis is not an rlp-engine run directory"):
        check_restartable(other)
    with pytest.raises(ConfigError, match="not an rlp-engine run directory"):
        check_restartable(other / "chapter1.tex")  # a file
    assert (other / "chapter1.tex").read_text() == "x"


def test_discard_run_deletes_the_run_files_only(tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(out)
    _crashed_run(out, cfg)
    (out / "report.md").write_text("old")
    (out / "notes.txt").write_text("mine")
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "metrics.jsonl", "checkpoints", "resume"}
    store = discard_run(cfg)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert store.seq == 0 and store.latest() is None
    assert set(RUN_FILES) >= {"config.yaml", "resume", "checkpoints", "metrics.jsonl", "report.json"}


def test_refusals_name_restart_and_restart_skips_the_old_checkpoints(tmp_path):
    out = tmp_path / "run"
    _crashed_run(out, _cfg(out))
    with pytest.raises(ConfigError, match=r"holds checkpoints .*pass --resume .*--restart to discard it"):
        open_store(_cfg(out), resume=False)
    with pytest.raises(ConfigError, match=r"sft\.lr: .* -> 0\.5.*pass --restart instead of --resume"):
        open_store(_cfg(out, "sft.lr=0.5"), resume=True)
    with pytest.raises(ConfigError, match="--restart and --resume exclude each other"):
        open_store(_cfg(out), resume=True, restart=True)
    (out / "resume" / "ckpt-000002" / "meta.pt").write_bytes(b"not a checkpoint")  # never read
    store, latest = open_store(_cfg(out, "sft.lr=0.5"), resume=False, restart=True)
    assert latest is None and (out / "resume" / "ckpt-000002").is_dir()  # deleted later, by discard_run


def test_cli_restart_and_resume_together_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as stop:
        _parser().parse_args(["train", "--resume", "--restart"])
    assert stop.value.code == 2
    assert "--restart: not allowed with argument --resume" in capsys.readouterr().err


def test_cli_restart_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "data.jsonl").write_text("{}\n")
    assert main(["train", "--output-dir", str(tmp_path), "--restart", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not an rlp-engine run directory" in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]


def test_cli_restart_starts_a_crashed_directory_over(tmp_path, capsys):
    """Slow (a tiny run): the plain rerun is refused naming --restart; --restart then runs to the
    end from scratch: the old metrics and checkpoints are gone, a file of the user's stays."""
    out = tmp_path / "run"
    _crashed_run(out, _cfg(out, "sft.lr=0.5"))
    (out / "notes.txt").write_text("mine")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    assert main(["train", "--output-dir", str(out), *TINY]) == 2
    assert "--restart to discard it" in capsys.readouterr().err
    assert main(["train", "--output-dir", str(out), "--restart", *TINY]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines and all(rec["stage"] != "old" for rec in lines)
    assert json.loads((out / "report.json").read_text())["config"]["sft"]["lr"] != 0.5
    assert (out / "notes.txt").read_text() == "mine"
    _, meta = CheckpointStore(out / "resume").latest()
    assert meta["config"]["sft"]["lr"] != 0.5  # the new run's checkpoint, not the crashed one's
