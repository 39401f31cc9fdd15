"""vLLM backend against a small fake `vllm` module (vLLM itself cannot be installed beside the
CPU torch): engine arguments, the sleep / wake_up / bucketed load / prefix-reset call sequence,
sampling-parameter mapping, output conversion, and the error when vLLM is absent; the config key
rollout.backend=vllm through make_rollout, load_weights and sample (and its errors at load)."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from rlp_engine import cli
from rlp_engine.config import ConfigError, load_config
from rlp_engine.engine import reshard, vllm_backend
from rlp_engine.engine.generator import SamplingConfig
from rlp_engine.engine.rollout import VLLMRollout, make_rollout


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


# ---------------------------------------------------------------- rollout.backend=vllm


def _saved_policy(tmp_path):
    """A tiny policy saved as a Hugging Face directory (vLLM builds its model from one)."""
    from rlp_engine.models.loading import tiny_llama, train_byte_tokenizer

    cfg = load_config(None, [], preset="tiny")
    tok = train_byte_tokenizer(["1+2=3", "4+5=9"])
    torch.manual_seed(0)
    tiny_llama(cfg.model, tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return str(tmp_path)


def test_config_selects_vllm_and_the_rollout_loads_and_samples(fake_vllm, tmp_path):
    from rlp_engine.models.loading import load_policy, load_tokenizer

    cfg = load_config(None, ["rollout.backend=vllm", f"model.path={_saved_policy(tmp_path)}"], preset="tiny")
    assert cfg.rollout.backend == "vllm" and load_config(None, []).rollout.backend == "builtin"
    tok = load_tokenizer(cfg.model)
    policy = load_policy(cfg.model, tok)
    rollout = make_rollout(cfg.rollout.backend, policy, tok, cfg.data, seed=7)
    assert isinstance(rollout, VLLMRollout) and rollout.model is None
    kw = rollout.engine.llm.kwargs
    assert kw["model"] == cfg.model.path and kw["load_format"] == "dummy" and kw["seed"] == 7
    assert kw["dtype"] == "float32" and kw["max_model_len"] == 64 + 8
    assert rollout.engine.llm.calls[1:] == [("sleep", 1)]  # asleep until the first weights

    record = rollout.load_weights(reshard.iter_full_params(policy), bucket_mb=0.01)
    loaded = rollout.engine.llm.model.weights
    assert record.buckets == sum(c[0] == "load_weights" for c in rollout.engine.llm.calls) > 1
    assert list(loaded) == [n for n, _ in policy.named_parameters()]
    assert all(torch.equal(loaded[n], p) for n, p in policy.named_parameters())

    rng = torch.get_rng_state()
    samples = rollout.sample(["1+2=", "4+5="], cfg.ppo, n=2)
    assert torch.equal(torch.get_rng_state(), rng)  # vLLM samples with its own seeded RNG
    ids = tok(["1+2=", "4+5="], add_special_tokens=False)["input_ids"]
    # the fake answers token k+1 after token k, 8 tokens (data.max_response_tokens), no eos
    want = [[row[-1] + 1 + i for i in range(8)] for row in ids for _ in range(2)]
    assert samples.batch.input_ids[:, -8:].tolist() == want
    assert samples.batch.response_mask.tolist() == [[1.0] * 8] * 4 and samples.truncated.all()
    assert samples.logprobs.tolist() == [[-0.5] * 8] * 4
    assert samples.prompts == ["1+2=", "1+2=", "4+5=", "4+5="]
    assert samples.responses[0] == tok.decode(want[0], skip_special_tokens=True)
    rollout.sample(["1+2="], cfg.ppo)  # asleep after the first rollout: woken for the second
    tail = [c if c[0] != "generate" else c[:2] for c in rollout.engine.llm.calls[-7:]]
    assert tail == [
        ("wake_up", ("kv_cache",)),
        ("reset_prefix_cache",),
        ("generate", 4),
        ("sleep", 1),
        ("wake_up", ("weights", "kv_cache")),
        ("generate", 1),
        ("sleep", 1),
    ]


def test_vllm_backend_without_vllm_or_model_path_is_a_config_error(fake_vllm, tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="rollout.backend: 'vllm' builds the policy from its Hugging Face"):
        load_config(None, ["rollout.backend=vllm"], preset="tiny")  # model.path unset
    with pytest.raises(ConfigError, match="rollout.backend: 'hf' is not one of \\('builtin', 'vllm'\\)"):
        load_config(None, ["rollout.backend=hf"])
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    out = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "rollout.backend=vllm", "model.path=x", f"run.output_dir={out}"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "rlp-engine: config error: rollout.backend: 'vllm' but vLLM is not installed; "
        "pip install 'rlp-engine[vllm]' (CUDA, its own torch pin) or use rollout.backend=builtin"
    )
    assert not out.exists()


def test_make_rollout_vllm_needs_a_model_directory(fake_vllm):
    cfg = load_config(None, [], preset="tiny")
    with pytest.raises(ValueError, match="has none \\(set model.path, or pass model_path\\)"):
        make_rollout("vllm", _policy_lm(), None, cfg.data)
    rollout = make_rollout("vllm", _policy_lm(), None, cfg.data, model_path="some/dir", dtype="bfloat16")
    kw = rollout.engine.llm.kwargs
    assert kw["model"] == "some/dir" and kw["dtype"] == "bfloat16"


def _policy_lm():
    from tiny import tiny_llama

    return tiny_llama(0, vocab_size=64, hidden_size=16, intermediate_size=32)
