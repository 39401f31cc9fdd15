"""Launch, FSDP2 and offload: single-process behaviour, and 2-process runs on CPU with gloo.

The 2-process tests start tests/dist_worker.py either under torchrun (.venv/bin/torchrun) or as
two plain processes with torchrun's environment set by hand (no launcher to clean up after a
failure: the collective timeout and the excepthook must do it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from multiproc import run_ranks, run_torchrun
from tiny import tiny_llama

from rlp_engine.engine import distributed, offload
from rlp_engine.engine.layout import fsdp

WORKER = Path(__file__).with_name("dist_worker.py")


def launch_plain(scenario: str, out: Path, n: int = 2, worker_timeout: float = 30, limit_s: float = 90):
    """n processes with torchrun's environment, no launcher."""
    return run_ranks([str(WORKER), scenario, str(out), str(worker_timeout)], n, limit_s)


def launch_torchrun(scenario: str, out: Path, n: int = 2, worker_timeout: float = 30, limit_s: float = 90):
    code, out_text, elapsed = run_torchrun([str(WORKER), scenario, str(out), str(worker_timeout)], n, limit_s)
    return [code], [out_text], elapsed


def test_fsdp_ppo_update_matches_one_rank_sync_is_exact_and_offload_round_trips(tmp_path):
    codes, outs, _ = launch_plain("train", tmp_path)
    assert codes == [0, 0], "\n".join(outs)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for res in results:
        assert res["world_size"] == 2 and res["sharded"].startswith("FSDP")
        # the update moved the weights (about 2 steps x lr 1e-3), so agreement below means something
        assert res["changed"] > 1e-3
        # Same math, different fp32 summation order (each rank sums half the tokens, then the two
        # gradients are averaged): gradients agree to ~1e-7 relative, and AdamW's g / sqrt(v) maps
        # that to at most a few 1e-7 absolute per step at lr 1e-3 (measured 8.7e-7 after 4 steps).
        assert res["max_param_diff"] < 1e-5, res
        # the generation model is bit-identical to the gathered training weights, moved in buckets
        assert res["sync_equal"], res
        assert res["sync_buckets"] > 1 and res["sync_bytes"] == res["model_bytes"], res
        # offload moved this rank's half of params + grads + both Adam moments (4 x half the model)
        assert res["offload_bytes"] == 2 * res["model_bytes"], res
        # ... and training after the round trip still tracks the one-rank run, forward included
        assert res["after_offload_diff"] < 1e-5 and res["after_offload_logit_diff"] < 1e-4, res


def test_failing_rank_ends_torchrun_job(tmp_path):
    codes, outs, elapsed = launch_torchrun("raise", tmp_path, worker_timeout=30, limit_s=60)
    assert codes[0] != 0
    assert "[rank 1] failed with RuntimeError: rank 1 fails on purpose" in outs[0]
    assert elapsed < 60


def test_failing_rank_ends_every_process_without_launcher(tmp_path):
    # no launcher kills rank 0: its all_reduce must fail (peer gone or timeout) and it must exit
    codes, outs, elapsed = launch_plain("raise", tmp_path, worker_timeout=10, limit_s=60)
    assert codes[0] != 0 and codes[1] != 0, outs
    assert "[rank 1] failed with RuntimeError" in outs[1]
    assert "[rank 0] failed" in outs[0]
    assert elapsed < 60


def test_single_process_needs_no_group(monkeypatch):
    for k in distributed._ENV:
        monkeypatch.delenv(k, raising=False)
    info = distributed.init_distributed(timeout_s=5)
    assert (info.rank, info.world_size, info.backend, info.distributed) == (0, 1, None, False)
    assert info.device == torch.device("cpu") and info.is_main
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 is outside"),
        ({"WORLD_SIZE": "2", "RANK": "1"}, "MASTER_ADDR"),
    ],
)
def test_bad_launch_environment(monkeypatch, env, match):
    for k in distributed._ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises((ValueError, RuntimeError), match=match):
        distributed.init_distributed()
    with pytest.raises(ValueError, match="timeout_s"):
        distributed.init_distributed(timeout_s=0)


def _tiny(seed=0):
    return tiny_llama(seed, vocab_size=97, hidden_size=32, intermediate_size=64)


def test_shard_model_single_process_and_arguments():
    model = _tiny()
    assert fsdp.shard_model(model) is model and not fsdp.is_sharded(model)
    assert len(fsdp.decoder_layers(model)) == 2
    with pytest.raises(ValueError, match="no submodule of class"):
        fsdp.decoder_layers(model, ("NoSuchLayer",))
    with pytest.raises(ValueError, match="_no_split_modules"):
        fsdp.decoder_layers(torch.nn.Linear(2, 2))
    cpu = torch.device("cpu")
    assert fsdp.mixed_precision_policy(None, cpu) is None
    assert fsdp.mixed_precision_policy(None, torch.device("cuda")).param_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="needs a CUDA device"):
        fsdp.mixed_precision_policy("bf16", cpu)
    with pytest.raises(ValueError, match="unknown mixed_precision"):
        fsdp.mixed_precision_policy("int8", cpu)


def _trained(seed=0):
    model = _tiny(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 97, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model(input_ids=ids, labels=ids).loss.backward()  # grads present at offload time
    return model, opt, ids


def test_offload_on_cpu_is_a_recorded_noop():
    model, opt, _ = _trained()
    ptrs = [p.data_ptr() for p in model.parameters()]
    with offload.offloaded(model, opt, params=True) as state:
        pass
    assert [r.noop for r in state.records] == [True, True]
    assert state.records[0].what == ("optimizer", "grads", "params")
    assert [p.data_ptr() for p in model.parameters()] == ptrs


def test_forced_offload_round_trip_keeps_training_identical():
    # force=True copies even on CPU: the swap (new storage in, same values back) is what is tested
    model, opt, ids = _trained(seed=3)
    twin, twin_opt, _ = _trained(seed=3)
    ptrs = [p.data_ptr() for p in model.parameters()]
    state = offload.offload(model, opt, params=True, force=True)
    assert all(p.grad is None for p in model.parameters())
    rec = state.records[0]
    n_params = sum(p.numel() * 4 for p in model.parameters())
    assert not rec.noop and rec.bytes > 3 * n_params  # params + grads + exp_avg + exp_avg_sq
    offload.reload(model, opt, state)
    assert [p.data_ptr() for p in model.parameters()] != ptrs
    assert state.records[1].bytes == rec.bytes and state.records[1].direction == "reload"
    for m, o in ((model, opt), (twin, twin_opt)):
        o.step()
        o.zero_grad()
        m(input_ids=ids, labels=ids).loss.backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
