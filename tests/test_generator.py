"""Built-in static-cache generator against HF generate and teacher-forced log-probs; sampling
filters, stop tokens, determinism, argument errors."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlp_engine.engine.generator import (
    Generator,
    SamplingConfig,
    filter_logits,
    generate,
    pad_prompts,
    sample_tokens,
)

V = 256
EOS = 2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # a larger init than HF's default makes logits peaked: no near-ties for greedy comparisons
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
    )
    return LlamaForCausalLM(cfg).eval()


def _prompts(batch=6, lo=2, hi=11):
    lens = torch.randint(lo, hi, (batch,))
    lens[0] = hi - 1  # at least one row without padding
    return pad_prompts([torch.randint(3, V, (int(n),)).tolist() for n in lens])


def _teacher_forced(model, ids, pmask, tokens, temperature):
    """log_softmax(logits / T) at the given response tokens, from one full forward. (B, N) fp32."""
    seq = torch.cat([ids, tokens], 1)
    att = torch.cat([pmask, torch.ones_like(tokens)], 1)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=seq, attention_mask=att, position_ids=pos).logits.float()
    logits = logits[:, ids.shape[1] - 1 : -1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]


@pytest.mark.parametrize("fast", [True, False])
def test_greedy_matches_hf_generate(model, fast):
    ids, pmask = _prompts()
    n = 24
    out = Generator(model, ids.shape[1] + n, fast=fast).generate(
        ids, pmask, max_new_tokens=n, temperature=0.0, eos_token_ids=(EOS,), pad_token_id=0
    )
    hf = model.generate(
        input_ids=ids,
        attention_mask=pmask,
        do_sample=False,
        max_new_tokens=n,
        eos_token_id=EOS,
        pad_token_id=0,
    )[:, ids.shape[1] :]
    assert torch.equal(out.tokens[:, : hf.shape[1]], hf)
    assert (out.tokens[:, hf.shape[1] :] == 0).all()
    # greedy log-probs are those of the unscaled distribution (temperature 0 uses T = 1)
    ref = _teacher_forced(model, ids, pmask, out.tokens, 1.0)
    torch.testing.assert_close(out.logprobs, ref * out.mask, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 20, 0.9)])
def test_sampled_logprobs_equal_teacher_forced(model, temperature, top_k, top_p):
    ids, pmask = _prompts()
    g = torch.Generator().manual_seed(7)
    out = generate(model, ids, pmask, g, max_new_tokens=16, temperature=temperature, top_k=top_k, top_p=top_p)
    ref = _teacher_forced(model, ids, pmask, out.tokens, temperature)
    assert out.mask.all()  # no eos ids given: every token is a response token
    torch.testing.assert_close(out.logprobs, ref, atol=1e-4, rtol=0)


def test_processed_logprobs_are_those_of_the_filtered_distribution(model):
    ids, pmask = _prompts()
    g = torch.Generator().manual_seed(3)
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.8, top_k=5, top_p=0.8, logprobs_mode="processed")
    out = Generator(model, ids.shape[1] + 8).generate(ids, pmask, cfg, g)
    seq, att = torch.cat([ids, out.tokens], 1), torch.cat([pmask, torch.ones_like(out.tokens)], 1)
    with torch.no_grad():
        logits = model(
            input_ids=seq, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp(min=0)
        ).logits
    z = logits[:, ids.shape[1] - 1 : -1].float() / 0.8
    filtered = torch.stack([filter_logits(z[:, t], 5, 0.8) for t in range(8)], 1)
    ref = torch.log_softmax(filtered, -1).gather(-1, out.tokens[..., None])[..., 0]
    torch.testing.assert_close(out.logprobs, ref, atol=1e-4, rtol=0)
    assert torch.isfinite(out.logprobs).all()  # every sampled token lies inside the filter


def test_deterministic_given_a_generator(model):
    ids, pmask = _prompts()
    gen = Generator(model, ids.shape[1] + 12)
    runs = [
        gen.generate(ids, pmask, generator=torch.Generator().manual_seed(s), max_new_tokens=12)
        for s in (5, 5, 6)
    ]
    assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].logprobs, runs[1].logprobs)
    assert not torch.equal(runs[0].tokens, runs[2].tokens)
    assert gen.cache is not None and gen.cache.shape[0] == ids.shape[0]  # allocated once, reused


def test_top_k_one_equals_greedy(model):
    ids, pmask = _prompts()
    gen = Generator(model, ids.shape[1] + 12)
    greedy = gen.generate(ids, pmask, max_new_tokens=12, temperature=0.0)
    top1 = gen.generate(ids, pmask, generator=torch.Generator().manual_seed(1), max_new_tokens=12, top_k=1)
    assert torch.equal(greedy.tokens, top1.tokens)


def test_stop_tokens_mask_and_padding(model):
    ids, pmask = _prompts(batch=8)
    gen = Generator(model, ids.shape[1] + 20, stop_check_every=1)
    free = gen.generate(ids, pmask, max_new_tokens=20, temperature=0.0)
    stop = int(free.tokens[0, 4])  # a token row 0 emits at step 4 (maybe earlier too)
    out = gen.generate(
        ids, pmask, max_new_tokens=20, temperature=0.0, eos_token_ids=(stop, 1), pad_token_id=7
    )
    for row in range(ids.shape[0]):
        hits = ((free.tokens[row] == stop) | (free.tokens[row] == 1)).nonzero()
        end = int(hits[0]) + 1 if len(hits) else 20  # mask covers the stop token itself
        assert out.mask[row, :end].eq(1).all() and out.mask[row, end:].eq(0).all()
        assert torch.equal(out.tokens[row, :end], free.tokens[row, :end])
        assert (out.tokens[row, end:] == 7).all() and (out.logprobs[row, end:] == 0).all()
    assert out.mask[0, :5].sum() <= 5 and out.mask[0, 5:].sum() == 0
    everyone = gen.generate(ids, pmask, max_new_tokens=20, temperature=0.0, eos_token_ids=tuple(range(V)))
    assert everyone.steps == 1 and everyone.mask[:, 0].eq(1).all() and everyone.mask[:, 1:].eq(0).all()


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(40000, 1)
    g = torch.Generator().manual_seed(0)
    tok, lp = sample_tokens(logits, SamplingConfig(max_new_tokens=1, temperature=1.0), g)
    freq = torch.bincount(tok, minlength=5).float() / len(tok)
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.01, rtol=0)
    torch.testing.assert_close(lp, logits[0].log_softmax(-1)[tok])
    tok, _ = sample_tokens(logits, SamplingConfig(max_new_tokens=1, top_k=2), g)
    freq = torch.bincount(tok, minlength=5).float() / len(tok)
    torch.testing.assert_close(freq[:2], logits[0, :2].softmax(-1), atol=0.01, rtol=0)
    assert freq[2:].sum() == 0


def test_filter_logits_by_hand():
    z = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    # nucleus 0.7: 0.5 (<0.7), then 0.3 (0.5 before it < 0.7) kept; 0.15 has 0.8 before it: dropped
    assert torch.isinf(filter_logits(z, 0, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(z, 0, 0.85)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(z, 0, 0.1)).tolist() == [[False, True, True, True]]  # keeps one
    assert torch.isinf(filter_logits(z, 3, 1.0)).tolist() == [[False, False, False, True]]
    assert torch.equal(filter_logits(z, 0, 1.0), z)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 4, "temperature": -0.5}, "temperature"),
        ({"max_new_tokens": 4, "top_p": 0.0}, "top_p"),
        ({"max_new_tokens": 4, "top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 4, "top_k": -1}, "top_k"),
        ({"max_new_tokens": 4, "logprobs_mode": "raw"}, "logprobs_mode"),
        ({"max_new_tokens": 4, "eos_token_ids": (-1,)}, "eos_token_ids"),
    ],
)
def test_bad_sampling_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_bad_prompts_and_models(model):
    gen = Generator(model, 16)
    ids = torch.randint(3, V, (2, 5))
    with pytest.raises(ValueError, match="left-padded"):
        gen.generate(ids, torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="exceeds max_len 16"):
        gen.generate(ids, None, max_new_tokens=12)
    with pytest.raises(ValueError, match="attention_mask shape"):
        gen.generate(ids, torch.ones(2, 4, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids must be"):
        gen.generate(ids.float(), None, max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one token"):
        gen.generate([[5, 6], []], None, max_new_tokens=2)
    with pytest.raises(TypeError, match="Hugging Face causal LM"):
        Generator(torch.nn.Linear(2, 2), 8)
    with pytest.raises(ValueError, match="max_len"):
        Generator(model, 1)
    sliding = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
        )
    )
    sliding.config.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="only full-attention"):
        Generator(sliding, 8)
    sliding.config.layer_types = None
    sliding.config.sliding_window = 8
    with pytest.raises(ValueError, match="exceeds the model's sliding_window 8"):
        Generator(sliding, 9)


def test_list_prompts_are_left_padded(model):
    out = Generator(model, 12).generate([[5, 6, 7], [9]], max_new_tokens=4, temperature=0.0)
    single = Generator(model, 12).generate([[9]], max_new_tokens=4, temperature=0.0)
    assert torch.equal(out.tokens[1], single.tokens[0])  # padding does not change a row's output


def test_fast_decode_step_matches_the_model_forward_on_qwen2_mha():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    cfg = Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,  # no grouping; q/k/v projections with bias
        initializer_range=0.2,
    )
    qwen = Qwen2ForCausalLM(cfg).eval()
    ids, pmask = pad_prompts([[5, 6, 7, 8], [9, 10]])
    fast = Generator(qwen, 24, fast=True).generate(ids, pmask, max_new_tokens=16, temperature=0.0)
    slow = Generator(qwen, 24, fast=False).generate(ids, pmask, max_new_tokens=16, temperature=0.0)
    assert torch.equal(fast.tokens, slow.tokens)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_compiled_cuda_decode_matches_eager(model):
    gpu_model = LlamaForCausalLM(model.config).cuda().eval()
    gpu_model.load_state_dict(model.state_dict())
    ids, pmask = _prompts()
    ids, pmask = ids.cuda(), pmask.cuda()
    eager = Generator(gpu_model, ids.shape[1] + 16, compile=False)
    compiled = Generator(gpu_model, ids.shape[1] + 16, compile=True)
    for _ in range(2):  # the second call replays the captured CUDA graph
        a = eager.generate(ids, pmask, max_new_tokens=16, temperature=0.0)
        b = compiled.generate(ids, pmask, max_new_tokens=16, temperature=0.0)
        assert torch.equal(a.tokens, b.tokens)
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=0)
