"""The RLP pipeline as one SPMD program: `torchrun --nproc_per_node 2 -m rlp_engine.cli train` on
CPU with gloo (a cut-down tiny preset), and a rank failing inside a stage ending the job.

Every checkpoint save runs `check_replicas` (rank 1's weights must equal rank 0's bitwise), so a
finished run also proves the explicit gradient all-reduce kept the replicas identical."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from multiproc import clean_env, run_torchrun
from transformers import AutoModelForCausalLM

from rlp_engine.config import load_config
from rlp_engine.engine import distributed
from rlp_engine.engine.generate import GeneratorCache, sample
from rlp_engine.models.loading import load_policy, load_tokenizer
from rlp_engine.models.policy import response_logprobs
from rlp_engine.pipeline.curves import list_snapshots, load_snapshot

# The tiny preset cut to a few steps per stage: every stage runs, each rank on its share.
SMALL = [
    "sft.steps=2",
    "rm.steps=2",
    "ppo.steps=2",
    "uml.steps=1",
    "spg.steps=1",
    "eval.num_prompts=4",
    "eval.samples_per_prompt=1",
    "ppo.sync_bucket_mb=0.03",  # about 31 KB: the ~105 KB actor streams in several buckets
    "run.tensorboard=false",
    "run.threads=1",
]


FAULT_RUNNER = Path(__file__).with_name("fault_runner.py")


def _torchrun(out: Path, fault: tuple = (), limit_s: float = 90, extra: tuple = ()) -> tuple[int, str, float]:
    """torchrun, 2 ranks; fault: tests/fault_runner.py's options (e.g. ("--fail-at", "rm", "--rank", "1"))."""
    cli = [str(FAULT_RUNNER), *fault, "--"] if fault else ["-m", "rlp_engine.cli"]
    argv = [*cli, "train", "--preset", "tiny", "--output-dir", str(out), *SMALL, *extra]
    return run_torchrun(argv, 2, limit_s)


# every policy of the default stages: SFT, PPO, the oracle, RLP-UML, RLP-SPG, both at once, SPG round 2
POLICIES = {"sft", "ppo", "ppo_oracle", "rlp_uml", "rlp_spg", "rlp_uml_spg", "rlp_spg_r2"}
# the training stages (each logs metrics and exports a checkpoint)
STAGES = ("sft", "rm", "ppo", "ppo_oracle", "rm_uml", "ppo_uml", "rm_spg", "ppo_spg")
STAGES += ("rm_uml_spg", "ppo_uml_spg", "rm_spg_r2", "ppo_spg_r2")


def test_two_process_run_writes_one_report_from_rank_zero(tmp_path):
    out = tmp_path / "run"
    code, output, _ = _torchrun(out)
    assert code == 0, output[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["policies"]) == POLICIES
    assert report["machine"]["world_size"] == 2
    # rank 0 alone writes: exactly these files, one summary print, one metrics line per (stage, step)
    assert {p.name for p in out.iterdir()} == {
        "checkpoints",
        "config.yaml",
        "metrics.jsonl",
        "report.json",
        "report.md",
        "resume",
        "training_curves.png",
        "curve",
        "gold_vs_kl.png",
    }
    assert output.count("[rlp-engine] report:") == 1
    # curve snapshots: the FSDP2-sharded actor gathered in full on both ranks, written by rank 0
    sft = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "sft")
    (meta, path), *_ = list_snapshots(out / "curve" / "ppo")
    assert (meta["step"], meta["steps"]) == (1, 2)
    snap = load_snapshot(sft, path)  # every parameter present, full shapes
    assert any(not torch.equal(a, b) for a, b in zip(snap.parameters(), sft.parameters()))
    assert [p["step"] for p in report["policies"]["ppo"]["curve"]] == [0, 1, 2]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(x["stage"], x["step"]) for x in lines]
    assert len(keys) == len(set(keys))
    assert set(STAGES) == {s for s, _ in keys}
    ppo = [x for x in lines if x["stage"].startswith("ppo")]
    assert len(ppo) == 12  # 6 PPO stages x 2 steps
    for x in ppo:
        # the whole fp32 actor went into the generation model at every train -> generate switch
        assert x["switch_bytes"] == 4 * report["model"]["parameters"] and x["switch_buckets"] > 1
        assert x["switch_seconds"] >= 0
        # generator log-probs ("scaled") agree with the trainer's teacher-forced old log-probs
        assert x["gen_logprob_gap"] < 1e-4
    for name in STAGES:
        assert (out / "checkpoints" / name).is_dir()
    # throughput counts both ranks' tokens: 2 PPO runs x 2 steps x 8 prompts + P's 8 x 4 samples
    # responses of at least one token each
    assert report["throughput"]["generation"]["tokens"] >= 3 * 2 * 8 + 8 * 4


def test_rank_failing_inside_a_stage_ends_the_job(tmp_path):
    out = tmp_path / "run"
    code, output, elapsed = _torchrun(out, ("--fail-at", "rm", "--rank", "1"), limit_s=60)
    assert code != 0
    assert "[rank 1] failed with RuntimeError: fault_runner: injected failure in stage rm" in output
    assert elapsed < 60
    assert not (out / "report.json").exists()


def test_rank_killed_mid_ppo_ends_the_job_and_its_checkpoint_resumes_on_one_process(tmp_path):
    """Rank 1 is SIGKILLed right after PPO's step-1 checkpoint: rank 0 must not hang, and the sharded
    (DCP) checkpoint both ranks wrote is complete and loads in a single process, which finishes the run."""
    out = tmp_path / "run"
    kill = ("--kill-at", "ppo:1", "--rank", "1")
    code, output, elapsed = _torchrun(out, kill, limit_s=90, extra=("run.checkpoint_every=1",))
    assert code != 0 and elapsed < 90, output[-3000:]
    assert "[fault_runner] kill at ppo:1: killing rank 1" in output
    assert not (out / "report.json").exists()
    latest = max((out / "resume").glob("ckpt-*"))
    meta = torch.load(latest / "meta.pt", weights_only=False)
    assert (meta["stage"], meta["loop"]["step"], meta["world_size"]) == ("ppo", 1, 2)
    assert {p.name for p in latest.glob("rng-rank*.pt")} == {"rng-rank0.pt", "rng-rank1.pt"}
    assert len(list((latest / "state").glob("*.distcp"))) == 2  # each rank wrote its part
    res = subprocess.run(
        [sys.executable, "-m", "rlp_engine.cli", "train", "--output-dir", str(out), "--resume"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "stage ppo: resuming at step 1" in res.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["machine"]["world_size"] == 1 and set(report["policies"]) == POLICIES


def test_data_parallel_helpers_are_identities_single_process():
    assert distributed.rank_and_world() == (0, 1) and distributed.is_main()
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert distributed.shard_bounds(5) == (0, 5)
    assert distributed.mean_over_ranks({"a": 1.5}) == {"a": 1.5}
    assert distributed.gather_lists([[1], [2]]) == [[1], [2]]


def test_sampler_reuses_its_cached_generator_and_its_logprobs_are_the_trainers():
    overrides = ["data.max_response_tokens=5", "ppo.temperature=0.7", "ppo.top_k=5"]
    cfg = load_config(None, overrides, preset="tiny")
    tok = load_tokenizer(cfg.model, ["1+2=3", "4+5=9", "7+1=8"])
    model = load_policy(cfg.model, tok).eval()
    prompts = ["1+2=", "4+5=", "7+1="]
    cache = GeneratorCache(model)  # the caller keeps the Generator (nothing is stored on the model)
    s = sample(model, tok, prompts, cfg.ppo, cfg.data, n=2, cache=cache)
    gen = cache.generator
    assert gen.model is model and cache.get(2) is gen  # reused while it fits
    # "scaled" log-probs: log_softmax(logits / T) before top-k, what the trainer recomputes
    b = s.batch
    with torch.no_grad():
        lp = response_logprobs(model, b.input_ids, b.attention_mask, b.response_len, temperature=0.7)
    torch.testing.assert_close(s.logprobs, lp * b.response_mask, atol=1e-5, rtol=1e-5)
    assert b.response_mask.sum() > 0 and len(s.responses) == 6


# one method of each arena family: offline (DPO), critic-free online (GRPO), PPO on an ensemble and
# RLP-SPG on every member (rlp_ens), each a few steps
ARENA = ["run.stages=dpo,grpo,ens_mean,rlp_ens", "offline.steps=2", "grpo.steps=1", "ensemble.k=2"]


def test_arena_methods_run_under_torchrun_with_replicas_in_step(tmp_path):
    out = tmp_path / "arena"
    code, output, _ = _torchrun(out, limit_s=150, extra=tuple(ARENA))
    assert code == 0, output[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert {"sft", "ppo", "dpo", "grpo", "ppo_ens_mean", "rlp_ens"} <= set(report["policies"])
    assert report["machine"]["world_size"] == 2
    for p in ("dpo", "grpo", "ppo_ens_mean", "rlp_ens"):
        assert 0.0 <= report["policies"][p]["gold"] <= 1.0
    assert [m["seed"] for m in report["ensemble"]["members"]] == [1000, 1001]
    # every export went through run.save's check that both ranks hold the same weights
    for name in ("dpo", "grpo", "rm_ens_m0", "rm_ens_m1", "ppo_ens_mean", "rm_ens_spg_m1", "ppo_rlp_ens"):
        assert (out / "checkpoints" / name / "model.safetensors").is_file(), name
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(x["stage"], x["step"]) for x in lines]
    assert len(keys) == len(set(keys))  # rank 0 alone logs
    logged = {s for s, _ in keys}
    assert {"dpo", "grpo", "rm_ens_m0", "ppo_ens_mean", "rm_ens_spg_m0", "ppo_rlp_ens"} <= logged
