"""The `rlp-engine` command for a person at a terminal: --version, train --print-config, the key
metrics printed at every logging step, Ctrl-C (SIGINT) during train saving a checkpoint at the step
boundary and resuming from it bit for bit, what a directory left by a stopped run tells its user,
and no deprecation warning from our own generator calls."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from rlp_engine import __version__, cli
from rlp_engine.cli import main
from rlp_engine.config import load_config, to_dict
from rlp_engine.engine.checkpoint import CheckpointStore, LoopCheckpoint, from_plain, to_plain
from rlp_engine.engine.interrupts import SIGINT, Interrupted, save_on_sigint
from rlp_engine.engine.metrics import MetricsLogger, console_line

# ---- --version and --print-config ----


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"rlp-engine {__version__}"


def test_print_config_prints_the_resolved_yaml_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    f = tmp_path / "c.yaml"
    f.write_text("preset: tiny\nppo:\n  kl_coef: 0.05\n")
    args = ["train", "--config", str(f), "--output-dir", str(out), "--print-config", "sft.lr=1e-4"]
    assert main(args) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    want = load_config(f, ["sft.lr=1e-4"])
    want.run.output_dir = str(out)
    assert printed == to_dict(want)
    assert (printed["model"]["hidden_size"], printed["ppo"]["kl_coef"], printed["sft"]["lr"]) == (
        32,
        0.05,
        1e-4,
    )
    assert not out.exists()
    # a bad value is still refused, with nothing printed on stdout
    assert main([*args, "sft.batch_size=0"]) == 2
    got = capsys.readouterr()
    assert got.out == "" and "sft.batch_size: 0 is out of range" in got.err


# ---- one line of key metrics per logging step ----


def test_console_line_shows_the_key_metrics_present(tmp_path, capsys):
    """The CLI prints the metrics logger's `logging` records on stdout (tests/test_console.py: the
    records themselves, and that the library alone prints nothing)."""
    values = {"loss": 0.123456, "grad_norm": 3.0, "score": -1.23456e-5, "kl": 2.0, "gold": 0.5, "lr": 1e-3}
    assert console_line("ppo", 7, values) == (
        "{'stage': 'ppo', 'step': 7, 'loss': 0.1235, 'score': -1.235e-05, 'kl': 2.0, 'gold': 0.5, "
        "'grad_norm': 3.0}"
    )
    assert console_line("sft", 0, {"lr": 0.1}) == "{'stage': 'sft', 'step': 0}"
    assert main(["train", "--output-dir", str(tmp_path / "run"), "--print-config"]) == 0  # sets up stdout
    capsys.readouterr()
    logger = MetricsLogger(tmp_path, console=True)
    logger.log("rm", 3, {"loss": torch.tensor(0.75), "acc": 0.5, "grad_norm": 1.0})
    want = "{'stage': 'rm', 'step': 3, 'loss': 0.75, 'acc': 0.5, 'grad_norm': 1.0}\n"
    assert capsys.readouterr().out == want
    MetricsLogger(tmp_path / "quiet").log("rm", 3, {"loss": 0.75})  # console off: the default
    logger.replay([{"stage": "rm", "step": 4, "loss": 0.5}])  # replayed lines (resume) are not printed
    assert capsys.readouterr().out == ""
    logger.close()


# ---- no deprecation warning from our own transformers calls ----


def test_generator_model_call_raises_no_future_warning():
    """transformers 5.2x renamed forward's past_key_values to cache; the old name warned on every run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlp_engine.engine.generator import Generator

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 64, (2, 5))
    gen = Generator(model, 12, fast=False)  # the model's own forward at every step
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = gen.generate(ids, torch.ones_like(ids), max_new_tokens=4, temperature=1.0)
    assert out.tokens.shape == (2, 4)


# ---- checkpoint files load with weights_only=True ----


def test_plain_round_trip_of_records_and_refusals():
    from rlp_engine.algos.rlp import PolicySamples
    from rlp_engine.data.records import Preference

    meta = {
        "results": {"pairs": [Preference("a", "b", "c")], "samples": PolicySamples(["p"], [["x", "y"]])},
        "stats": {"acc": np.float64(0.25), "n": np.int64(3)},
        "loop": {"gen": torch.randint(0, 255, (8,), dtype=torch.uint8), "order": (1, 2)},
    }
    plain = to_plain(meta)
    assert type(plain["stats"]["acc"]) is float and type(plain["stats"]["n"]) is int
    back = from_plain(plain)
    assert back["results"] == meta["results"] and back["loop"]["order"] == (1, 2)
    with pytest.raises(TypeError, match=r"meta\['x'\] is a set"):
        to_plain({"x": {1}})
    with pytest.raises(ValueError, match="not an rlp_engine dataclass"):
        from_plain({"__dataclass__": "os.PathLike", "fields": {}})


# ---- Ctrl-C (SIGINT) and SIGTERM ----


def _toy():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return lambda: ({"m": model}, [opt], {"extra": 1})


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_is_held_to_the_step_boundary_then_saved(tmp_path, sig):
    state = _toy()
    store = CheckpointStore(tmp_path / "resume")
    # SIG_IGN for SIGINT when the suite runs as a background job; SIG_DFL for SIGTERM
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with save_on_sigint():
        ckpt = LoopCheckpoint(store, "toy", every=0, base_meta=lambda: {"note": "x"})
        assert ckpt.resume(*state()[:2]) is None  # the loop starts: a signal now waits for its step
        ckpt.step_done(1, 5, state)
        os.kill(os.getpid(), sig)  # held: no KeyboardInterrupt, and for SIGTERM no death, here
        assert store.complete() == []
        with pytest.raises(Interrupted) as stop:
            ckpt.step_done(2, 5, state)
    assert (stop.value.stage, stop.value.step, stop.value.path) == ("toy", 2, store.complete()[-1])
    assert SIGINT.signum == sig  # kept after the block, for the CLI's exit code
    path, meta = store.latest()
    assert (meta["stage"], meta["note"], meta["loop"]) == ("toy", "x", {"extra": 1, "step": 2})
    assert {s: signal.getsignal(s) for s in before} == before  # restored


@pytest.mark.parametrize(
    "first,second",
    [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGTERM)],
)
def test_sigint_outside_a_loop_or_twice_stops_at_once(tmp_path, first, second):
    state = _toy()
    store = CheckpointStore(tmp_path / "resume")
    with save_on_sigint():
        ckpt = LoopCheckpoint(store, "toy", every=0, base_meta=dict)
        ckpt.resume(*state()[:2])
        ckpt.step_done(3, 3, state)  # the loop's last step: the loop is over
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), first)
            time.sleep(2)  # the handler raises at the next bytecode: never slept through
    assert SIGINT.signum == first
    with save_on_sigint():
        ckpt = LoopCheckpoint(store, "toy", every=0, base_meta=dict)
        ckpt.resume(*state()[:2])
        os.kill(os.getpid(), first)  # held
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), second)  # the second one: at once
            time.sleep(2)
    assert SIGINT.signum == second
    assert store.complete() == []


ARGS = ["--preset", "tiny", "sft.steps=200", "run.stages=ppo", "run.tensorboard=false", "run.threads=1"]


def _train(out: Path, *args: str, popen: bool = False):
    cmd = [sys.executable, "-m", "rlp_engine.cli", "train", "--output-dir", str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _signal_at_sft_step_5(out: Path, signum: int) -> tuple[int, str]:
    """A tiny run sent `signum` once SFT has logged step 5: (exit code, stderr)."""
    proc = _train(out, *ARGS, popen=True)
    for line in proc.stdout:
        if line.startswith("{'stage': 'sft', 'step': 5,"):
            proc.send_signal(signum)
            break
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def _outcome(out: Path) -> tuple[dict, list]:
    weights = {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((out / "checkpoints").rglob("*.safetensors"))
    }
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return weights, [{k: v for k, v in x.items() if "seconds" not in k} for x in lines]


def test_sigint_during_train_saves_the_step_and_resume_finishes_bit_identical(tmp_path, capsys):
    """SIGINT from outside once SFT has logged step 5 (of 200): exit 130 with one line naming the
    stage, the step and the checkpoint written at it; the directory then explains itself (a plain
    rerun and a resume with another config are refused, saying what to do), and --resume finishes
    with the weights and metrics of an uninterrupted run."""
    out = tmp_path / "run"
    code, err = _signal_at_sft_step_5(out, signal.SIGINT)
    assert code == 130, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    found = re.fullmatch(
        rf"rlp-engine: interrupted at stage sft step (\d+); the last checkpoint is (\S+); continue with "
        rf"`rlp-engine train --output-dir {re.escape(str(out))} --resume`",
        last,
    )
    assert found, err[-3000:]
    step, path = int(found.group(1)), Path(found.group(2))
    assert 5 < step < 200 and path == max((out / "resume").glob("ckpt-*"))
    # every checkpoint file holds plain types and tensors only
    for f in (out / "resume").rglob("*.pt"):
        torch.load(f, weights_only=True)
    meta = torch.load(path / "meta.pt", weights_only=True)
    assert (meta["stage"], meta["loop"]["step"]) == ("sft", step)
    assert not (out / "report.json").exists()

    assert main(["train", "--output-dir", str(out), *ARGS]) == 2
    assert "holds checkpoints of an earlier run" in capsys.readouterr().err
    assert main(["train", "--output-dir", str(out), "--resume", "--preset", "tiny", "run.stages=ppo"]) == 2
    err = capsys.readouterr().err
    assert "sft.steps: 200 -> 8" in err
    assert "pass only --output-dir and --resume" in err and "choose another --output-dir" in err

    resumed = _train(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"stage sft: resuming at step {step}" in resumed.stdout
    baseline = tmp_path / "baseline"
    assert _train(baseline, *ARGS).returncode == 0
    assert _outcome(out) == _outcome(baseline)


def test_sigterm_during_train_saves_the_step_exits_143_and_resume_finishes(tmp_path):
    """SIGTERM (what a job scheduler or `kill` sends) behaves as Ctrl-C: the step is saved, the same
    one line is printed, the exit code is 143 (128 + 15), and --resume finishes the run."""
    out = tmp_path / "run"
    code, err = _signal_at_sft_step_5(out, signal.SIGTERM)
    assert code == 143, err[-3000:]
    assert "Traceback" not in err and "[rlp-engine] SIGTERM: saving a checkpoint" in err
    found = re.fullmatch(
        rf"rlp-engine: interrupted at stage sft step (\d+); the last checkpoint is (\S+); continue with "
        rf"`rlp-engine train --output-dir {re.escape(str(out))} --resume`",
        err.strip().splitlines()[-1],
    )
    assert found, err[-3000:]
    step, path = int(found.group(1)), Path(found.group(2))
    assert 5 < step < 200 and path == max((out / "resume").glob("ckpt-*"))
    assert torch.load(path / "meta.pt", weights_only=True)["loop"]["step"] == step
    resumed = _train(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"stage sft: resuming at step {step}" in resumed.stdout
    assert (out / "report.json").exists()


# ---- eval and sample of a saved run: its config, wrong directories, missing packages ----

RUN_ARGS = ["--preset", "tiny", "run.stages=ppo", "run.tensorboard=false", "run.threads=1"]
# Settings no preset has, so a test can tell the run's config.yaml from the preset's.
RUN_SETTINGS = ["data.task=arithmetic", "eval.num_prompts=6", "eval.samples_per_prompt=3"]


@pytest.fixture(scope="module")
def arith_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("arith") / "run"
    assert main(["train", "--output-dir", str(out), *RUN_ARGS, *RUN_SETTINGS]) == 0
    return out


def _eval_summary(capsys, *args) -> dict:
    assert main(["eval", *args]) == 0
    got = capsys.readouterr()
    return json.loads(got.out), got.err


def test_eval_and_sample_use_the_runs_config_unless_given_one(arith_run, capsys):
    ppo = str(arith_run / "checkpoints" / "ppo")
    summary, err = _eval_summary(capsys, "--policy", ppo)
    assert (summary["n_prompts"], summary["samples_per_prompt"]) == (6, 3)
    assert all(x["prompt"].endswith("=") for x in summary["examples"])  # arithmetic, not reverse ("...>")
    assert f"config: {arith_run / 'config.yaml'}" in err
    # overrides apply on top of the run's config
    summary, _ = _eval_summary(capsys, "--policy", ppo, "eval.num_prompts=4")
    assert (summary["n_prompts"], summary["samples_per_prompt"]) == (4, 3)
    # --preset (or --config) replaces it: the tiny preset's reverse task and eval sizes
    summary, err = _eval_summary(capsys, "--policy", ppo, "--preset", "tiny")
    assert (summary["n_prompts"], summary["samples_per_prompt"]) == (16, 2)
    assert all(x["prompt"].endswith(">") for x in summary["examples"]) and "config.yaml" not in err

    assert main(["sample", "--policy", ppo]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    want = load_config(arith_run / "config.yaml")
    from rlp_engine.data.build import build_data

    assert [r["prompt"] for r in rows] == build_data(want.data, seed=want.run.seed).eval_prompts[:8]
    assert all(r["prompt"].endswith("=") for r in rows)


def _refused(capsys, *args) -> str:
    assert main(list(args)) == 2
    got = capsys.readouterr()
    assert got.out == "" and "Traceback" not in got.err
    lines = got.err.strip().splitlines()
    assert len(lines) == 1, got.err
    return lines[0]


def test_eval_and_sample_refuse_a_directory_that_is_not_the_right_checkpoint(arith_run, tmp_path, capsys):
    ckpt = arith_run / "checkpoints"
    rm, ppo, sft = ckpt / "rm", ckpt / "ppo", ckpt / "sft"
    for command in ("eval", "sample"):
        assert _refused(capsys, command, "--policy", str(rm)) == (
            f"rlp-engine: error: --policy: {rm} is a reward-model checkpoint (scalar_head.pt); pass it as "
            "--reward-model and a policy checkpoint as --policy"
        )
        line = _refused(capsys, command, "--policy", str(arith_run))
        assert line.startswith(f"rlp-engine: error: --policy: {arith_run} is not a policy checkpoint (")
        assert "config.json, model.safetensors and tokenizer.json" in line
        assert line.endswith(f"it is a run directory, whose policy checkpoints are: {ppo}, {sft}")
    # a policy checkpoint as the reward model
    line = _refused(capsys, "eval", "--policy", str(ppo), "--reward-model", str(sft))
    assert line.startswith(
        f"rlp-engine: error: --reward-model: {sft} is a policy checkpoint (no scalar_head.pt)"
    )
    # a directory with a model but no tokenizer, and an empty one
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((ppo / name).read_bytes())
    line = _refused(capsys, "sample", "--policy", str(bare), "--prompt", "1+2=")
    assert line.startswith(f"rlp-engine: error: --policy: {bare} is not a policy checkpoint")
    assert "run directory" not in line
    line = _refused(capsys, "eval", "--policy", str(tmp_path / "missing"))
    assert line == f"rlp-engine: error: --policy: {tmp_path / 'missing'} is not a directory"


def test_a_missing_optional_package_names_it_and_the_extra(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "matplotlib", None)  # as if the train extra were not installed
        assert _refused(capsys, "train", "--output-dir", str(out), *RUN_ARGS) == (
            "rlp-engine: train needs the package 'matplotlib', which is not installed; install the train "
            "extra: pip install -e .[train]"
        )
        assert not out.exists()
        assert main(["train", "--output-dir", str(out), "--print-config", *RUN_ARGS]) == 0  # no plot
        capsys.readouterr()
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "transformers", None)
        line = _refused(capsys, "sample", "--policy", str(tmp_path), "--prompt", "1+2=")
        assert line.startswith("rlp-engine: sample needs the package 'transformers', which is not installed")

    def needs_gguf(args, cfg, hook=None):
        raise ModuleNotFoundError("No module named 'gguf'", name="gguf")

    # one the startup check does not list, met later: the same line, no traceback
    monkeypatch.setattr(cli, "_train", needs_gguf)
    assert _refused(capsys, "train", "--output-dir", str(out), *RUN_ARGS) == (
        "rlp-engine: train needs the package 'gguf', which is not installed; install the smollm extra: "
        "pip install -e .[smollm]"
    )
