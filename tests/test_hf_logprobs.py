"""causal_lm_logprobs on a tiny LlamaForCausalLM built from a config, against log_softmax of the
model's own logits (forward and the gradient of every parameter)."""

import pytest
import torch

from rlp_engine.ops.hf import causal_lm_logprobs

transformers = pytest.importorskip("transformers")


@pytest.fixture
def model():
    config = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).float()


def naive(model, ids, mask, temperature=1.0, start=1):
    """What users write today: the full [B, T, V] logits, log_softmax, gather."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float() / temperature
    logp = logits[:, start - 1 : -1].log_softmax(-1)
    lp = logp.gather(-1, ids[:, start:].unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    if mask is not None:
        keep = mask[:, start:].bool()
        lp, ent = torch.where(keep, lp, 0.0), torch.where(keep, ent, 0.0)
    return lp, ent


def param_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("temperature,start", [(1.0, None), (0.7, 4)])
def test_matches_full_logits_forward_and_param_grads(model, temperature, start):
    ids = torch.randint(0, 1000, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0  # right padding: those positions give 0
    lp, ent = causal_lm_logprobs(
        model, ids, mask, temperature=temperature, return_entropy=True, response_start=start
    )
    rlp, rent = naive(model, ids, mask, temperature, start or 1)
    assert lp.shape == rlp.shape == (3, 10 - (start or 1)) and lp.dtype == torch.float32
    torch.testing.assert_close(lp, rlp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent, rent, atol=2e-5, rtol=1e-5)
    assert (lp[1, 6 - (start or 1) + 1 :] == 0).all()
    w = torch.randn_like(lp)
    got = param_grads(model, (lp * w).sum() + (ent * w.flip(0)).sum())
    lp, ent = naive(model, ids, mask, temperature, start or 1)
    want = param_grads(model, (lp * w).sum() + (ent * w.flip(0)).sum())
    assert got.keys() == want.keys() and "lm_head.weight" in got
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=2e-5, rtol=1e-4, msg=name)


def test_tied_embeddings_and_no_mask(model):
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = torch.randint(0, 1000, (2, 6))
    lp = causal_lm_logprobs(model, ids)
    torch.testing.assert_close(lp, naive(model, ids, None)[0], atol=2e-5, rtol=1e-5)


def test_bad_arguments(model):
    ids = torch.randint(0, 1000, (2, 6))
    with pytest.raises(ValueError, match="response_start"):
        causal_lm_logprobs(model, ids, response_start=6)
    with pytest.raises(ValueError, match="attention_mask"):
        causal_lm_logprobs(model, ids, torch.ones(2, 5))
    with pytest.raises(ValueError, match="input_ids"):
        causal_lm_logprobs(model, ids.float())
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="softcapping"):
        causal_lm_logprobs(model, ids)
