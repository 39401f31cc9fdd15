"""The built-in rollout (rlp_engine.engine.rollout) and generate.sample's explicit Generator cache:
weights loaded in buckets, the same samples, log-probs and torch RNG use as sample() on the trained
model, nothing stored on any model, bit-identical results with or without a cache. The vLLM rollout
runs against the fake vLLM in tests/test_vllm_backend.py."""

from __future__ import annotations

import copy

import pytest
import torch

from rlp_engine.config import load_config
from rlp_engine.engine import reshard
from rlp_engine.engine.generate import GeneratorCache, sample
from rlp_engine.engine.rollout import BuiltinRollout, make_rollout
from rlp_engine.models.loading import load_policy, load_tokenizer

PROMPTS = ["1+2=", "4+5=", "7+1=", "12+30=", "3+3="]


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(None, ["data.max_response_tokens=6", "ppo.temperature=0.7"], preset="tiny")
    tok = load_tokenizer(cfg.model, ["1+2=3", "4+5=9", "7+1=8", "12+30=42"])
    torch.manual_seed(0)
    trained = load_policy(cfg.model, tok).eval()
    torch.manual_seed(1)  # a different init: load_weights must overwrite every parameter
    stale = load_policy(cfg.model, tok).eval().requires_grad_(False)
    return cfg, tok, trained, stale


def _same(a, b) -> bool:
    return (
        torch.equal(a.batch.input_ids, b.batch.input_ids)
        and torch.equal(a.batch.response_mask, b.batch.response_mask)
        and torch.equal(a.logprobs, b.logprobs)
        and a.responses == b.responses
        and torch.equal(a.truncated, b.truncated)
    )


def test_builtin_rollout_loads_weights_and_samples_as_the_trained_model(setup):
    cfg, tok, trained, stale = setup
    rollout = make_rollout("builtin", copy.deepcopy(stale), tok, cfg.data)
    assert isinstance(rollout, BuiltinRollout)
    record = rollout.load_weights(reshard.iter_full_params(trained), bucket_mb=0.01)
    for (name, a), b in zip(trained.named_parameters(), rollout.model.parameters()):
        assert torch.equal(a, b), name
    assert record.buckets > 1 and record.tensors == len(list(trained.parameters()))
    torch.manual_seed(3)
    got = rollout.sample(PROMPTS, cfg.ppo, n=2)
    after_rollout = torch.rand(4)  # the global RNG state after sampling
    torch.manual_seed(3)
    want = sample(trained, tok, PROMPTS, cfg.ppo, cfg.data, n=2)
    assert _same(got, want) and torch.equal(torch.rand(4), after_rollout)
    assert got.batch.response_mask.sum() > 0 and len(got.responses) == 10
    # the rollout keeps its Generator itself: reused by the next call, nothing on either model
    gen = rollout.cache.generator
    rollout.sample(PROMPTS[:2], cfg.ppo, n=1)
    assert rollout.cache.generator is gen and gen.model is rollout.model
    for model in (rollout.model, trained):
        assert not any(isinstance(v, GeneratorCache) or "generator" in k for k, v in vars(model).items())


def test_load_weights_checks_every_parameter_arrives(setup):
    cfg, tok, trained, stale = setup
    rollout = make_rollout("builtin", copy.deepcopy(stale), tok, cfg.data)
    named = [(n, t) for n, t in reshard.iter_full_params(trained) if n != "lm_head.weight"]
    with pytest.raises(RuntimeError, match="not written: \\['lm_head.weight'\\]"):
        rollout.load_weights(iter(named))
    with pytest.raises(KeyError, match="no parameter named 'extra.weight'"):
        rollout.load_weights(iter([("extra.weight", torch.randn(3))]))


def test_sample_is_bit_identical_with_a_reused_or_a_fresh_generator(setup):
    # a cache built for longer prompts (a larger max_len, stale KV buffers) gives the same bits as
    # a Generator sized for this call alone: the pipeline's plain sample() calls pass no cache
    cfg, tok, trained, _ = setup
    cache = GeneratorCache(trained)
    sample(trained, tok, ["123456789+987654321=" * 2], cfg.eval, cfg.data, n=3, cache=cache)
    long_gen = cache.generator
    for batch_size in (256, 3):  # one chunk, and chunks of 3 rows (KV buffers resized)
        torch.manual_seed(5)
        reused = sample(trained, tok, PROMPTS, cfg.eval, cfg.data, n=2, batch_size=batch_size, cache=cache)
        torch.manual_seed(5)
        fresh = sample(trained, tok, PROMPTS, cfg.eval, cfg.data, n=2, batch_size=batch_size)
        assert _same(reused, fresh)
    assert cache.generator is long_gen and long_gen.max_len == 40 + 6  # byte tokens + responses


def test_cache_is_rebuilt_only_for_a_longer_max_len_and_belongs_to_one_model(setup):
    cfg, tok, trained, stale = setup
    cache = GeneratorCache(trained)
    g10 = cache.get(10)
    assert cache.get(8) is g10 and g10.max_len == 10
    g12 = cache.get(12)
    assert g12 is not g10 and g12.max_len == 12 and g12.model is trained
    with pytest.raises(ValueError, match="cache belongs to another model"):
        sample(stale, tok, PROMPTS, cfg.ppo, cfg.data, cache=cache)


def test_sample_restores_the_training_mode(setup):
    cfg, tok, trained, _ = setup
    model = copy.deepcopy(trained).train()
    sample(model, tok, PROMPTS[:1], cfg.ppo, cfg.data)
    assert model.training


def test_make_rollout_bad_arguments(setup):
    cfg, tok, _, stale = setup
    with pytest.raises(ValueError, match="unknown backend 'hf'; expected one of \\('builtin', 'vllm'\\)"):
        make_rollout("hf", stale, tok, cfg.data)
    with pytest.raises(TypeError, match="builtin backend takes no engine arguments, got \\['tensor_parallel"):
        make_rollout("builtin", stale, tok, cfg.data, tensor_parallel_size=2)
