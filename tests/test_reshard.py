"""Bucketed weight sync in one process: exact copies, bucket bounds, name maps, named tensors, errors;
the ZeRO-3 wrapper (config, missing deepspeed, module-by-module gather against a fake
`deepspeed.zero.GatheredParameters`). The sharded paths run with 2 processes: FSDP2 -> full weights in
tests/test_distributed.py, a real ZeRO-3 gather (DeepSpeed installed) in tests/test_deepspeed.py."""

from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch
from tiny import tiny_llama
from torch import nn

from rlp_engine.engine import reshard
from rlp_engine.engine.layout import zero3


def _tiny(seed: int, tie: bool = False):
    return tiny_llama(seed, vocab_size=97, hidden_size=32, intermediate_size=64, tie_word_embeddings=tie)


@pytest.mark.parametrize("bucket_mb", [0.001, 0.02, 64.0])
def test_sync_is_bit_identical_for_any_bucket_size(bucket_mb):
    src, dst = _tiny(0), _tiny(1)
    record = reshard.sync_to_module(src, dst, bucket_mb=bucket_mb)
    for (n, a), b in zip(src.named_parameters(), dst.parameters()):
        assert torch.equal(a, b), n
    total = sum(p.numel() * p.element_size() for p in src.parameters())
    assert record.bytes == total and record.tensors == len(list(src.parameters()))
    largest = max(p.numel() * p.element_size() for p in src.parameters())
    # no bucket holds more than its size, except a tensor larger than the bucket, which goes alone
    expected_min = -(-total // max(int(bucket_mb * 2**20), largest))
    assert record.buckets >= expected_min
    assert record.seconds >= 0 and record.as_dict()["bucket_bytes"] == int(bucket_mb * 2**20)


def test_buckets_respect_size_and_reuse_one_buffer():
    named = [(f"t{i}", torch.randn(5 + i, 7)) for i in range(6)] + [("big", torch.randn(200, 10))]
    seen, ptrs = [], set()
    for bucket in reshard.iter_buckets(iter(named), bucket_bytes=1024):
        packed = [t for n, t in bucket if n != "big"]
        assert sum(t.numel() * 4 for t in packed) <= 1024
        ptrs.update(t.untyped_storage().data_ptr() for t in packed)
        seen += [(n, t.clone()) for n, t in bucket]
    assert len(ptrs) == 1  # every small tensor was packed in the one reused buffer
    assert [n for n, _ in seen] == [n for n, _ in named]
    for (_, a), (_, b) in zip(seen, named):
        assert torch.equal(a, b)


def test_name_map_dict_and_callable_and_skip():
    src, dst = _tiny(0), _tiny(1)
    # destination = the inner LlamaModel: names lose the "model." prefix, lm_head is skipped
    rename = lambda n: n.removeprefix("model.") if n.startswith("model.") else None
    reshard.sync_to_module(src, dst.model, bucket_mb=0.01, name_map=rename)
    for n, p in dst.model.named_parameters():
        assert torch.equal(p, src.get_parameter("model." + n))
    assert not torch.equal(dst.lm_head.weight, src.lm_head.weight)

    src2, dst2 = _tiny(2), _tiny(3)
    wrapped = nn.ModuleDict({"policy": dst2})
    mapping = {n: "policy." + n for n, _ in src2.named_parameters()}
    reshard.sync_to_module(src2, wrapped, name_map=mapping)
    assert torch.equal(dst2.lm_head.weight, src2.lm_head.weight)


def test_missing_names_are_reported():
    src, dst = _tiny(0), _tiny(1)
    with pytest.raises(KeyError, match="no parameter named 'policy.model.embed_tokens.weight'"):
        reshard.sync_to_module(src, dst, name_map=lambda n: "policy." + n)
    skip_head = {"lm_head.weight": None}
    with pytest.raises(RuntimeError, match="not written: \\['lm_head.weight'\\]"):
        reshard.sync_to_module(src, dst, name_map=skip_head)
    with pytest.raises(TypeError, match="name_map"):
        reshard.sync_to_module(src, dst, name_map=3)
    with pytest.raises(ValueError, match="bucket_mb"):
        reshard.sync_to_module(src, dst, bucket_mb=0)


def test_tied_destination_accepts_either_name():
    src, dst = _tiny(0, tie=True), _tiny(1, tie=True)
    reshard.sync_to_module(src, dst, bucket_mb=0.01)
    assert dst.lm_head.weight is dst.model.embed_tokens.weight
    assert torch.equal(dst.lm_head.weight, src.model.embed_tokens.weight)


def test_shape_mismatch_names_the_tensor():
    full = nn.Linear(6, 6, bias=False)
    with pytest.raises(ValueError, match="'weight' has shape \\(6, 6\\), destination \\(6, 5\\)"):
        reshard.sync_to_module(full, nn.Linear(5, 6, bias=False).requires_grad_(False))


def test_load_into_module_takes_named_tensors():
    src, dst = _tiny(0), _tiny(1)
    named = ((n, p.detach().clone()) for n, p in src.named_parameters())  # lazy, as a gather would be
    record = reshard.load_into_module(named, dst, bucket_mb=0.01)
    assert record.buckets > 1 and record.tensors == len(list(src.parameters()))
    for (n, a), b in zip(src.named_parameters(), dst.parameters()):
        assert torch.equal(a, b), n


def _ds_policy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 4), nn.LayerNorm(4)))


def test_zero3_config():
    cfg = zero3.zero3_config(4, grad_accum=2, bf16=False, offload_optimizer=True)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "none"}
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["bf16"] == {"enabled": False} and cfg["gradient_clipping"] == 1.0
    assert "gradient_clipping" not in zero3.zero3_config(1, grad_clip=None)
    with pytest.raises(ValueError, match="micro_batch_size"):
        zero3.zero3_config(0)


def test_clear_error_without_deepspeed(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(ImportError, match="needs DeepSpeed"):
        zero3.initialize(_ds_policy(), None, {})


def test_gather_module_by_module_into_buckets(monkeypatch):
    gathered = []

    @contextlib.contextmanager
    def gathered_parameters(params, modifier_rank=None):
        assert modifier_rank is None
        gathered.append(len(params))
        yield

    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=gathered_parameters)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    src, dst = _ds_policy(), _ds_policy()
    with torch.no_grad():
        for p in dst.parameters():
            p.zero_()
    sink = reshard.ModuleSink(dst)
    record = zero3.sync_zero3(types.SimpleNamespace(module=src), sink, bucket_mb=0.0005)
    sink.check_complete()
    assert gathered == [2, 2, 2]  # weight + bias of each Linear and of the LayerNorm, per module
    assert record.buckets > 1
    for a, b in zip(src.parameters(), dst.parameters()):
        assert torch.equal(a, b)
