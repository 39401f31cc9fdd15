"""Models: HF save/load round trips, left-padding invariance of log-probs, scalar heads, sampling."""

import pytest
import torch
from tiny import tiny_preset

from rlp_engine.config import ModelConfig
from rlp_engine.data.batch import make_batch
from rlp_engine.engine.generate import response_mask_from_eos, sample
from rlp_engine.models import (
    ScalarHeadModel,
    last_token_index,
    load_policy,
    load_tokenizer,
    response_logprobs,
)


@pytest.fixture(scope="module")
def tiny():
    cfg, tok, policy = tiny_preset(alphabet="0123456789+=abc")
    return cfg, tok, policy.eval()


def test_hf_model_and_tokenizer_load_from_a_directory(tmp_path, tiny):
    cfg, tok, policy = tiny
    policy.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    mcfg = ModelConfig(path=str(tmp_path))
    tok2 = load_tokenizer(mcfg)
    loaded = load_policy(mcfg, tok2).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert tok2("12+7=")["input_ids"] == tok("12+7=")["input_ids"]
    assert (tok2.pad_token_id, tok2.eos_token_id, tok2.padding_side) == (
        tok.pad_token_id,
        tok.eos_token_id,
        "left",
    )
    batch = make_batch(tok, ["12+7=", "3+4="], ["19", "7"], cfg.data)
    a = response_logprobs(policy, batch.input_ids, batch.attention_mask, batch.response_len)
    b = response_logprobs(loaded, batch.input_ids, batch.attention_mask, batch.response_len)
    torch.testing.assert_close(a, b)
    with pytest.raises(FileNotFoundError, match="model.path"):
        load_policy(ModelConfig(path=str(tmp_path / "nope")), tok)


def test_response_logprobs_match_logits_and_ignore_left_padding(tiny):
    cfg, tok, policy = tiny
    # Row 0 is left-padded (shorter prompt); its log-probs must equal those of the row alone.
    batch = make_batch(tok, ["1+2=", "12+13="], ["3", "25"], cfg.data)
    lp = response_logprobs(policy, batch.input_ids, batch.attention_mask, batch.response_len)
    alone = make_batch(tok, ["1+2="], ["3"], cfg.data)
    lp_alone = response_logprobs(policy, alone.input_ids, alone.attention_mask, alone.response_len)
    torch.testing.assert_close(lp[0, :2], lp_alone[0, :2], rtol=1e-4, atol=1e-5)
    assert lp[0, 2] == 0  # padding after "3<eos>"
    # Reference: the full logits of the unpadded second row, log-softmax, shifted by one.
    ids = batch.input_ids[1:]
    logits = policy(input_ids=ids).logits[0].float()
    ref = logits.log_softmax(-1)[:-1].gather(-1, ids[0, 1:, None])[-3:, 0]
    torch.testing.assert_close(lp[1], ref, rtol=1e-4, atol=1e-5)


def test_scalar_head_reads_last_real_token_and_round_trips(tmp_path, tiny):
    cfg, tok, policy = tiny
    rm = ScalarHeadModel.from_causal_lm(policy).eval()
    batch = make_batch(tok, ["1+2=", "12+13="], ["3", "25"], cfg.data)
    # Layout [B, P+R]: P = 6 (row 0 has 2 pads), R = 3: row 0 ends "3<eos><pad>" -> last real at 7.
    assert last_token_index(batch.attention_mask).tolist() == [7, 8]
    scores = rm.score(batch.input_ids, batch.attention_mask)
    values = rm.values(batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(scores, values[[0, 1], [7, 8]])
    rm.save_pretrained(tmp_path)
    again = ScalarHeadModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again.score(batch.input_ids, batch.attention_mask), scores)
    # The reward model is a copy: training it leaves the policy alone.
    assert rm.backbone is not policy.base_model


def test_response_mask_from_eos():
    eos = 1
    tokens = torch.tensor([[5, 6, 1, 0], [1, 0, 0, 0], [5, 5, 5, 5], [5, 1, 1, 1]])
    expected = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(response_mask_from_eos(tokens, eos), expected)


def test_sample_returns_masked_tokens_and_their_logprobs(tiny):
    cfg, tok, policy = tiny
    cfg.ppo.temperature = 1.0
    s = sample(policy, tok, ["1+2=", "12+13="], cfg.ppo, cfg.data, n=3)
    assert s.prompts == ["1+2="] * 3 + ["12+13="] * 3 and len(s.responses) == 6
    m = s.batch.response_mask
    assert m.shape == s.logprobs.shape and (s.logprobs[m == 0] == 0).all()
    assert s.batch.response_len <= cfg.data.max_response_tokens
    # At temperature 1 with no top-k/top-p the sampler's log-probs are the policy's own.
    lp = response_logprobs(policy, s.batch.input_ids, s.batch.attention_mask, s.batch.response_len)
    torch.testing.assert_close(s.logprobs, lp * m, rtol=1e-4, atol=1e-4)
