"""Crash-safe checkpoints and exact resume.

The end-to-end tests run `rlp-engine train` (tiny preset, a few steps per stage) as a subprocess,
SIGKILL it at a chosen point (fault injection: tests/fault_runner.py's hook, or a kill from outside
at an arbitrary moment), run `rlp-engine train --output-dir DIR --resume`, and require what an
uninterrupted run gives: bit-identical weights of every exported model, the same metrics.jsonl line
for line (wall-clock keys aside) and the same report numbers. On CPU with one thread every op is
deterministic, so the tolerance is zero.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from rlp_engine.cli import main
from rlp_engine.engine.checkpoint import CheckpointStore, LoopCheckpoint

ARGS = [
    "--preset",
    "tiny",
    "sft.steps=5",
    "ppo.steps=3",
    "run.checkpoint_every=2",
    "run.tensorboard=false",
    "run.threads=1",
]


FAULT_RUNNER = Path(__file__).with_name("fault_runner.py")


def _train(out: Path, *extra: str, kill: str | None = None, resume: bool = False, popen: bool = False):
    """`rlp-engine train` as a subprocess; kill="stage:step[:saving]": SIGKILLed there (fault_runner)."""
    cli = ["-m", "rlp_engine.cli"] if kill is None else [str(FAULT_RUNNER), "--kill-at", kill, "--"]
    cmd = [sys.executable, *cli, "train", "--output-dir", str(out)]
    cmd += ["--resume"] if resume else [*ARGS, *extra]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(
            cmd, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300)


def _outcome(out: Path) -> dict:
    """What must not depend on interruptions: exported weights (hashes), metrics lines without
    wall-clock values, and the report's numbers."""
    weights = {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((out / "checkpoints").rglob("*"))
        if p.suffix in (".safetensors", ".pt")
    }
    lines = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        lines.append({k: v for k, v in rec.items() if "seconds" not in k})
    report = json.loads((out / "report.json").read_text())
    numbers = {k: report[k] for k in ("policies", "reward_models", "spg", "data")}
    return {"weights": weights, "metrics": lines, "report": numbers}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    res = _train(out)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, _outcome(out)


def _assert_same(out: Path, baseline) -> None:
    got, want = _outcome(out), baseline[1]
    assert got["weights"] == want["weights"] and len(got["weights"]) == 17  # 12 models, 5 with a head file
    assert got["metrics"] == want["metrics"]
    assert got["report"] == want["report"]
    resume = out / "resume"
    assert len(list(resume.glob("ckpt-*"))) <= 2  # run.keep_checkpoints
    assert not list(resume.glob(".tmp-*")) and not list(resume.glob("stages/.tmp-*"))


# Kill points (SFT, PPO, RLP): "stage:k" right after step k (and its checkpoint, if k is a multiple
# of run.checkpoint_every=2); ":saving" in the middle of writing step k's checkpoint.
KILLS = {
    "sft:3": "inside SFT, one step after the step-2 checkpoint: step 3 is done again",
    "ppo:2": "inside PPO, right after the step-2 checkpoint (actor, critic, optimizer, prompt order)",
    "rm_uml:2:saving": "RLP-UML, killed while writing its step-2 checkpoint: that one must not count",
    "ppo_spg:3": "the last PPO after RLP-SPG, at its last step (before the stage's checkpoint)",
}


@pytest.mark.parametrize("kill", list(KILLS))
def test_killed_run_resumes_to_the_uninterrupted_result(kill, baseline, tmp_path):
    out = tmp_path / "run"
    first = _train(out, kill=kill)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert not (out / "report.json").exists()
    res = _train(out, resume=True)
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same(out, baseline)


def test_curve_snapshots_written_before_a_kill_are_not_redone(baseline, tmp_path):
    """ppo.steps=3 and eval.curve_points=4: PPO saves its policy after steps 1 and 2 (curve/ppo/).
    Killed right after step 2 and its checkpoint, the resumed run continues at step 2: both snapshots
    stay as written (same files, untouched), and the curves equal the uninterrupted run's."""
    out = tmp_path / "run"
    first = _train(out, kill="ppo:2")
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    snaps = sorted((out / "curve" / "ppo").glob("step-*/model.safetensors"))
    assert [p.parent.name for p in snaps] == ["step-000001", "step-000002"]
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in snaps}
    res = _train(out, resume=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in snaps} == before
    _assert_same(out, baseline)  # report["policies"] holds the curves
    report = json.loads((out / "report.json").read_text())
    assert [p["step"] for p in report["policies"]["ppo"]["curve"]] == [0, 1, 2, 3]


def test_kill_from_outside_at_an_arbitrary_moment(baseline, tmp_path):
    """SIGKILL from another process as soon as PPO has logged a step, wherever the run then is."""
    out = tmp_path / "run"
    proc = _train(out, popen=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and '"stage": "ppo"' in metrics.read_text():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    res = _train(out, resume=True)
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same(out, baseline)


def test_resume_refusals_name_the_reason(baseline, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(baseline[0], out)
    # a directory holding checkpoints is not silently overwritten by a new run
    assert main(["train", "--output-dir", str(out), *ARGS]) == 2
    err = capsys.readouterr().err
    assert "holds checkpoints of an earlier run" in err and "--resume" in err
    # a resumed run may not change what it computes
    assert main(["train", "--output-dir", str(out), "--resume", "sft.lr=0.5", "ppo.kl_coef=0.5"]) == 2
    err = capsys.readouterr().err
    assert "sft.lr: 0.003 -> 0.5" in err and "ppo.kl_coef: 0.15 -> 0.5" in err
    assert (out / "report.json").read_bytes() == (baseline[0] / "report.json").read_bytes()


def test_resume_of_a_finished_run_only_evaluates_again(baseline, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(baseline[0], out)
    res = _train(out, resume=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "finished before" in res.stdout and "stage sft ..." not in res.stdout
    _assert_same(out, baseline)


# ---------------------------------------------------------------- the store on its own


def _model_and_opt(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, opt


def _steps(model, opt, xs):
    for x in xs:
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_store_round_trip_continues_training_bitwise(tmp_path):
    xs = torch.randn(6, 4, 7)
    ref, ref_opt = _model_and_opt(0)
    _steps(ref, ref_opt, xs)
    model, opt = _model_and_opt(0)
    _steps(model, opt, xs[:3])
    store = CheckpointStore(tmp_path / "resume", keep=2)
    ckpt = LoopCheckpoint(store, "toy", every=1, base_meta=lambda: {"note": "x"})
    torch.manual_seed(123)
    ckpt.step_done(3, 6, lambda: ({"m": model}, [opt], {"extra": [1, 2]}))
    after_save = torch.rand(3)
    # a fresh process: other weights, an optimizer without state, another RNG state
    model2, opt2 = _model_and_opt(1)
    torch.manual_seed(999)
    path, meta = CheckpointStore(tmp_path / "resume").latest()
    assert meta["stage"] == "toy" and meta["note"] == "x" and meta["loop"] == {"extra": [1, 2], "step": 3}
    loop = LoopCheckpoint(store, "toy", 1, dict, resume_from=(path, meta)).resume({"m": model2}, [opt2])
    assert loop["step"] == 3
    assert torch.equal(torch.rand(3), after_save)  # the RNG continues where it was saved
    _steps(model2, opt2, xs[3:])
    for a, b in zip(ref.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)


def test_store_keeps_the_last_k_and_ignores_unfinished(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for i in range(4):
        store.save({"i": i})
    assert [p.name for p in store.complete()] == ["ckpt-000003", "ckpt-000004"]
    # a directory being written when the process died: never read, removed by the next store
    (tmp_path / ".tmp-ckpt-000005").mkdir()
    (tmp_path / ".tmp-ckpt-000005" / "meta.pt").write_bytes(b"partial")
    path, meta = CheckpointStore(tmp_path, keep=2).latest()
    assert path.name == "ckpt-000004" and meta["i"] == 3 and meta["seq"] == 4
    assert not (tmp_path / ".tmp-ckpt-000005").exists()
    with pytest.raises(ValueError, match="keep_checkpoints"):
        CheckpointStore(tmp_path, keep=0)


def test_loop_hook_sees_saving_before_the_rename_and_step_done_after(tmp_path):
    """The fault-injection points (fault_runner's kills): "saving" with this rank's files written and
    no complete checkpoint yet; "step_done" after the step's checkpoint, if any, is complete."""
    store = CheckpointStore(tmp_path, keep=2)
    seen = []

    def hook(event: str, stage: str, step: int) -> None:
        partial = sorted(p.name for p in tmp_path.glob(".tmp-*/*"))
        seen.append((event, stage, step, [p.name for p in store.complete()], partial))

    ckpt = LoopCheckpoint(store, "toy", every=2, base_meta=dict, hook=hook)
    model, opt = _model_and_opt(0)
    for step in (1, 2, 3):  # step 3 of 3: the stage's end saves, not the loop
        ckpt.step_done(step, 3, lambda: ({"m": model}, [opt], {}))
    assert seen == [
        ("step_done", "toy", 1, [], []),
        ("saving", "toy", 2, [], ["meta.pt", "rng-rank0.pt", "state"]),
        ("step_done", "toy", 2, ["ckpt-000001"], []),
        ("step_done", "toy", 3, ["ckpt-000001"], []),
    ]


def test_diverging_run_skips_non_finite_steps_then_stops_with_a_clear_error(tmp_path, capsys):
    """A learning rate of 1e9 makes SFT's gradients non-finite from the second step: those steps are
    skipped and counted, and past run.max_nonfinite_steps the run stops (exit 3) naming the key,
    leaving its last checkpoint and no report."""
    out = tmp_path / "run"
    rc = main(["train", "--output-dir", str(out), *ARGS, "sft.lr=1e9", "run.max_nonfinite_steps=2"])
    assert rc == 3
    err = capsys.readouterr().err
    assert "sft: 3 steps with a non-finite loss or gradient" in err and "run.max_nonfinite_steps=2" in err
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["nonfinite_steps"] for x in lines] == [0, 1, 2]
    assert (out / "resume" / "ckpt-000001" / "meta.pt").is_file() and not (out / "report.json").exists()


def test_a_run_written_before_a_config_key_existed_resumes_when_it_has_its_default():
    """A checkpoint's config that lacks a section added since (rollout) held its default then: it
    resumes under today's default and is refused, naming the key, under another value."""
    from rlp_engine.config import ConfigError, load_config, to_dict
    from rlp_engine.pipeline.run import check_resumable

    saved = to_dict(load_config())
    del saved["rollout"]
    check_resumable(load_config(), saved)  # rollout.backend builtin then and now
    other = load_config()
    other.rollout.backend = "vllm"  # set after loading: load_config refuses vllm where it is absent
    with pytest.raises(ConfigError, match=r"rollout.backend: 'builtin' -> 'vllm'"):
        check_resumable(other, saved)
