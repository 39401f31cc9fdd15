"""vLLM backend against a small fake `vllm` module (vLLM itself cannot be installed beside the
CPU torch): engine arguments, the sleep / wake_up / bucketed load / prefix-reset call sequence,
sampling-parameter mapping, output conversion, and the error when vLLM is absent."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from rlp_engine.engine import vllm_backend
from rlp_engine.engine.generator import SamplingConfig


@dataclass
class _Logprob:
    logprob: float


@dataclass
class _Completion:
    token_ids: list
    logprobs: list


@dataclass
class _RequestOutput:
    outputs: list


@dataclass
class _FakeModel:
    calls: list
    weights: dict = field(default_factory=dict)

    def load_weights(self, weights):
        names = [n for n, _ in weights]
        self.calls.append(("load_weights", names))
        for n, t in weights:
            self.weights[n] = t.clone()  # a real loader copies into its own parameters


class _FakeLLM:
    """Records every call; generates token k+1 after token k, log-prob -0.5 per token."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls = [("init", kwargs)]
        self.model = _FakeModel(self.calls)
        self.worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=self.model))

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags) if tags else None))

    def collective_rpc(self, method, args=(), kwargs=None):
        self.calls.append(("collective_rpc", method.__name__))
        return [method(self.worker, *args, **(kwargs or {}))]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append(("generate", len(prompts)))
        outs = []
        for p in prompts:
            ids, last = [], p["prompt_token_ids"][-1]
            for _ in range(sampling_params.kwargs["max_tokens"]):
                last += 1
                ids.append(last)
                if last in sampling_params.kwargs["stop_token_ids"]:
                    break
            outs.append(_RequestOutput([_Completion(ids, [{t: _Logprob(-0.5)} for t in ids])]))
        return outs


class _FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = _FakeLLM, _FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", mod)
    return mod


def _policy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def test_engine_is_created_asleep_ready_with_dummy_weights(fake_vllm):
    eng = vllm_backend.VLLMEngine("some/model", tensor_parallel_size=2, max_model_len=64)
    kw = eng.llm.kwargs
    assert kw["load_format"] == "dummy" and kw["enable_sleep_mode"] is True
    assert kw["tensor_parallel_size"] == 2 and kw["max_model_len"] == 64
    assert kw["distributed_executor_backend"] == "external_launcher"
    assert kw["logprobs_mode"] == "processed_logprobs"
    raw = vllm_backend.VLLMEngine("m", logprobs_mode="raw", external_launcher=False, enforce_eager=True)
    assert raw.llm.kwargs["logprobs_mode"] == "raw_logprobs" and raw.llm.kwargs["enforce_eager"]
    assert "distributed_executor_backend" not in raw.llm.kwargs


def test_sleep_sync_generate_call_sequence(fake_vllm):
    eng = vllm_backend.VLLMEngine("m")
    policy = _policy()
    eng.sleep(level=1)
    with pytest.raises(RuntimeError, match="asleep"):
        eng.generate(torch.tensor([[1, 2]]), max_new_tokens=2)
    record = eng.sync_weights(policy, bucket_mb=0.002)  # 2 KB buckets: several loads
    calls = [c[0] if c[0] != "wake_up" else c for c in eng.llm.calls[1:]]
    loads = [c for c in eng.llm.calls if c[0] == "load_weights"]
    n_loads = len(loads)
    assert n_loads == record.buckets > 1
    assert calls == (
        ["sleep", ("wake_up", ("weights",))]
        + ["collective_rpc", "load_weights"] * n_loads
        + [("wake_up", ("kv_cache",)), "reset_prefix_cache"]
    )
    assert [n for c in loads for n in c[1]] == [n for n, _ in policy.named_parameters()]
    for n, p in policy.named_parameters():
        assert torch.equal(eng.llm.model.weights[n], p)
    assert [r["phase"] for r in eng.records] == ["sleep", "sync"] and eng.records[1]["buckets"] == n_loads


def test_name_map_reaches_load_weights(fake_vllm):
    eng = vllm_backend.VLLMEngine("m")
    eng.sync_weights(_policy(), name_map=lambda n: "model." + n)
    assert set(eng.llm.model.weights) == {"model." + n for n, _ in _policy().named_parameters()}


def test_generate_maps_sampling_params_and_outputs(fake_vllm):
    eng = vllm_backend.VLLMEngine("m")
    ids = torch.tensor([[0, 0, 5], [3, 4, 10]])
    mask = torch.tensor([[0, 0, 1], [1, 1, 1]])
    cfg = SamplingConfig(
        max_new_tokens=4, temperature=0.7, top_p=0.9, top_k=0, eos_token_ids=(7,), pad_token_id=0
    )
    out = eng.generate(ids, mask, cfg, seed=3)
    # row 0: 6, 7 (stop, included) -> mask 1 1 0 0; row 1: 11 12 13 14
    assert out.tokens.tolist() == [[6, 7, 0, 0], [11, 12, 13, 14]]
    assert out.mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert out.logprobs.tolist() == [[-0.5, -0.5, 0, 0], [-0.5] * 4]
    sp = vllm_backend.sampling_params(fake_vllm, cfg, seed=3).kwargs
    assert sp == {
        "n": 1,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": -1,
        "max_tokens": 4,
        "stop_token_ids": [7],
        "logprobs": 0,
        "seed": 3,
        "detokenize": False,
    }
    assert ("generate", 2) in eng.llm.calls


def test_old_vllm_without_tagged_wake_up(fake_vllm):
    class OldLLM(_FakeLLM):
        def wake_up(self):  # no tags argument
            self.calls.append(("wake_up", None))

    fake_vllm.LLM = OldLLM
    eng = vllm_backend.VLLMEngine("m")
    eng.sync_weights(_policy())
    assert [c for c in eng.llm.calls if c[0] == "wake_up"] == [("wake_up", None), ("wake_up", None)]


def test_bad_arguments(fake_vllm):
    with pytest.raises(ValueError, match="logprobs_mode"):
        vllm_backend.VLLMEngine("m", logprobs_mode="scaled")
    eng = vllm_backend.VLLMEngine("m")
    with pytest.raises(ValueError, match="level must be 1 or 2"):
        eng.sleep(level=3)


def test_clear_error_without_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(ImportError, match="needs vLLM"):
        vllm_backend.VLLMEngine("m")
