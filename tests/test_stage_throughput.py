"""pipeline/run.py's per-stage throughput (report["stage_throughput"]): each stage gets what it added to
the run's Throughput, per phase; a stage finished by an earlier process keeps its saved figures, and a
stage resumed from a checkpoint inside it counts its tokens from before the interruption too. No model:
the stages record made-up token counts directly."""

from __future__ import annotations

import pytest

from rlp_engine.config import load_config
from rlp_engine.engine.checkpoint import CheckpointStore
from rlp_engine.engine.metrics import Throughput
from rlp_engine.pipeline.run import Run, stage_throughput_summary


class Killed(Exception):
    pass


def _record(run: Run, phase: str, tokens: int) -> None:
    with run.throughput.phase(phase) as rec:
        rec["tokens"] = tokens


def _cfg(tmp_path):
    over = [f"run.output_dir={tmp_path}", "run.checkpoint_every=1", "run.tensorboard=false"]
    return load_config(preset="tiny", overrides=over)


def test_stages_get_their_own_tokens_and_a_resume_keeps_them(tmp_path):
    cfg = _cfg(tmp_path)
    store = CheckpointStore(tmp_path / "resume", keep=cfg.run.keep_checkpoints)
    run = Run(cfg, store)
    with run.stage("a"):
        _record(run, "training", 100)
        _record(run, "generation", 7)
        _record(run, "training", 11)
    with run.stage("nothing"):
        pass
    with pytest.raises(Killed), run.stage("b") as st:
        _record(run, "training", 5)
        _record(run, "scoring", 13)
        st.ckpt.step_done(1, 3, lambda: ({}, [], {}))  # a checkpoint inside b, then the process dies
        _record(run, "training", 1000)  # lost with the process: not in the checkpoint
        raise Killed
    assert run.stage_throughput["a"]["tokens"] == {"training": 111, "generation": 7}
    assert run.stage_throughput["nothing"] == {"tokens": {}, "seconds": {}}
    saved_a = run.stage_throughput["a"]
    run.logger.close()

    again = Run(cfg, store, store.latest())  # resumed inside b
    with again.stage("a") as st:
        assert st.done
    with again.stage("nothing"):
        pass
    with again.stage("b"):
        _record(again, "training", 3)
    assert again.stage_throughput["a"] == saved_a
    assert again.stage_throughput["b"]["tokens"] == {"training": 8, "scoring": 13}
    assert set(again.stage_throughput["b"]["seconds"]) == {"training", "scoring"}
    assert all(s > 0 for s in again.stage_throughput["b"]["seconds"].values())

    phases = sorted(again.throughput.seconds)
    per_stage = stage_throughput_summary(again, phases)
    assert list(per_stage) == ["a", "nothing", "b"]
    assert per_stage["nothing"] == {}
    assert set(per_stage["b"]) == {"training", "scoring"}
    total = again.throughput.summary()  # the aggregate: every stage's tokens, phase by phase
    for phase in phases:
        assert sum(s.get(phase, {}).get("tokens", 0) for s in per_stage.values()) == total[phase]["tokens"]
    b = per_stage["b"]["training"]
    assert b["tokens_per_s"] == round(8 / max(again.stage_throughput["b"]["seconds"]["training"], 1e-9), 1)
    again.logger.close()


def test_a_checkpoint_written_before_stage_throughput_existed_gives_empty_figures(tmp_path):
    """A run whose checkpoint lists finished stages without "throughput" (written before this key)
    resumes with no per-stage figures for them, instead of failing."""
    cfg = _cfg(tmp_path)
    store = CheckpointStore(tmp_path / "resume", keep=cfg.run.keep_checkpoints)
    run = Run(cfg, store)
    with run.stage("a"):
        _record(run, "training", 4)
    run.logger.close()
    path, meta = store.latest()
    del meta["finished"]["a"]["throughput"]
    again = Run(cfg, store, (path, meta))
    with again.stage("a") as st:
        assert st.done
    assert again.stage_throughput["a"] == {"tokens": {}, "seconds": {}}
    assert stage_throughput_summary(again, sorted(again.throughput.seconds)) == {"a": {}}
    again.logger.close()


def test_throughput_counts_since_and_from_counts():
    tp = Throughput()
    with tp.phase("generation") as rec:
        rec["tokens"] = 7
    start = tp.counts()
    assert start["tokens"] == {"generation": 7} and set(start["seconds"]) == {"generation"}
    with tp.phase("training") as rec:
        rec["tokens"] = 5
    gained = tp.since(start)
    # generation did not run since `start`: left out; training's tokens and seconds are all new
    assert gained["tokens"] == {"training": 5} and gained["seconds"]["training"] == tp.seconds["training"]
    again = Throughput.from_counts(gained, ["generation", "training"])
    assert again.tokens == {"generation": 0.0, "training": 5} and again.seconds["generation"] == 0.0
