"""Training under FSDP2: the wrappers that keep every weight read inside an FSDP-managed forward
(single process), and a 2-process gloo run of the SFT, PPO and reward-model updates against one
process on the whole batch (tests/fsdp_worker.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from multiproc import run_ranks
from tiny import tiny_llama
from transformers import LlamaForCausalLM

from rlp_engine.engine.layout import fsdp
from rlp_engine.models.heads import ScalarHeadModel, position_ids
from rlp_engine.models.policy import CausalLMLogprobs, response_logprobs, unwrap_lm

WORKER = Path(__file__).with_name("fsdp_worker.py")
V, R, TEMP = 40, 4, 0.7


def tiny(tied: bool, seed: int = 0) -> LlamaForCausalLM:
    sizes = {"vocab_size": V, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2}
    return tiny_llama(seed, **sizes, max_position_embeddings=32, tie_word_embeddings=tied)


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.int64)
    mask[0, :3] = 0  # left padding
    mask[2, -1] = 0  # a masked response token
    return ids, mask


def reference(model, ids, mask):
    """(log-probs, entropies) [B, R] of the last R tokens from the full logits (materialising)."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits.float()
    logp = torch.log_softmax(logits[:, -R - 1 : -1] / TEMP, -1)
    m = mask[:, -R:]
    return logp.gather(-1, ids[:, -R:, None])[..., 0] * m, -(logp.exp() * logp).sum(-1) * m


@pytest.mark.parametrize("tied", [False, True])
def test_wrapper_forward_is_response_logprobs_values_and_grads(tied):
    model = tiny(tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    wrapped = CausalLMLogprobs(model)
    assert list(wrapped.parameters()) == list(model.parameters()) and unwrap_lm(wrapped) is model
    ids, mask = batch()
    lp, ent = response_logprobs(wrapped, ids, mask, R, temperature=TEMP, return_entropy=True)
    torch.testing.assert_close(lp, response_logprobs(model, ids, mask, R, temperature=TEMP), rtol=0, atol=0)
    (lp.sum() + ent.sum()).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want_lp, want_ent = reference(model, ids, mask)
    torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, want_ent, rtol=1e-5, atol=1e-5)
    (want_lp.sum() + want_ent.sum()).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_wrapper_refuses_what_is_not_a_causal_lm():
    with pytest.raises(TypeError, match="not a causal LM"):
        CausalLMLogprobs(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="already wrapped"):
        CausalLMLogprobs(CausalLMLogprobs(tiny(False)))


def test_scalar_head_methods_go_through_forward():
    lm = tiny(False)
    rm = ScalarHeadModel.from_causal_lm(lm)
    ids, mask = batch(2)
    calls = []
    rm.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs["output"]), with_kwargs=True)
    with torch.no_grad():
        h = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).last_hidden_state
        want_values = h @ rm.head.weight[0] + rm.head.bias[0]  # [B, T]
        last = torch.stack([h[b, int(mask[b].nonzero().max())] for b in range(h.shape[0])])
        torch.testing.assert_close(rm.hidden(ids, mask), h)
        torch.testing.assert_close(rm.values(ids, mask), want_values)
        torch.testing.assert_close(rm.final_hidden(ids, mask), last)
        torch.testing.assert_close(rm.score(ids, mask), last @ rm.head.weight[0] + rm.head.bias[0])
    # every method is a forward call: the one place FSDP2 gathers the root's parameters
    assert calls == ["hidden", "values", "final_hidden", "score"]
    with pytest.raises(ValueError, match="output must be one of"):
        rm(ids, mask, output="logits")


def test_single_process_prepare_is_identity_and_full_weights_round_trip():
    assert not torch.distributed.is_initialized()
    lm = tiny(True)
    assert fsdp.prepare_for_training(lm) is lm
    rm = ScalarHeadModel.from_causal_lm(lm)
    assert fsdp.prepare_for_training(rm) is rm
    state = fsdp.full_state_dict(CausalLMLogprobs(lm))  # LM names, no wrapper prefix, on CPU
    assert state.keys() == lm.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in lm.state_dict().items())
    other = tiny(True, seed=5)
    fsdp.load_full_weights(other, CausalLMLogprobs(lm))
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), lm.parameters()))
    assert other.lm_head.weight is other.model.embed_tokens.weight  # still tied
    fsdp.load_full_weights(lm, lm)  # the same module: nothing to do


def _launch(out: Path, n: int = 2, limit_s: float = 150.0) -> list[str]:
    """n worker processes with torchrun's environment (no launcher), OMP_NUM_THREADS=1."""
    codes, outs, _ = run_ranks([str(WORKER), str(out), "60"], n, limit_s)
    assert codes == [0] * n, "\n".join(outs)
    return outs


def test_fsdp2_updates_match_one_process_and_sync_is_exact(tmp_path):
    outs = _launch(tmp_path)
    assert "returned a view tensor" not in "".join(outs)  # FSDP2's warning about bypassed hooks
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # Tolerance: 2 AdamW steps at lr 1e-3 move weights by ~2e-3 ("changed"). The sharded run does the
    # same math in another fp32 order (each rank sums half the tokens; FSDP2 averages the two halves'
    # gradients in its reduce-scatter; the clip norm is a sum of per-shard squares), so gradients
    # differ by ~1e-7 relative and AdamW's m / sqrt(v) passes that on at ~1e-7 x lr-scale per step
    # (measured: at most 2.5e-7 here). 1e-5 is 40x that and 200x below a single step's size.
    for r in res:
        assert r["world_size"] == 2
        for part in ("sft", "ppo", "rm"):
            assert r[f"{part}_changed"] > 1e-3, r
        for key in ("sft_param_diff", "sft_plain_diff", "ppo_actor_diff", "ppo_critic_diff", "rm_param_diff"):
            assert r[key] < 1e-5, (key, r)
        assert r["sft_grad_norm_diff"] < 1e-4 and r["ppo_grad_norm_diff"] < 1e-4, r
        # the sharded no-grad scoring passes (actor, critic, reference, reward model) equal the
        # plain models' with the same weights: the gathered weights are exactly the full ones
        assert r["ppo_scoring_diff"] < 1e-6 and r["ppo_score_diff"] < 1e-6, r
        assert r["ppo_frozen_sharded"] and r["sft_tied_after"] and r["sft_broadcast_refused"], r
        assert r["sft_logprob_diff"] < 1e-5, r
        # the generation copy streamed from the shards is bit-identical to the gathered weights
        assert r["sft_sync_exact"] and r["ppo_sync_exact"], r
    # rank 0 alone receives the full CPU state dict for saving; it matches the one-process weights
    for key in (
        "sft_state_dict_diff",
        "ppo_state_dict_diff",
        "ppo_critic_state_dict_diff",
        "rm_state_dict_diff",
    ):
        assert res[0][key] is not None and res[0][key] < 1e-5, (key, res[0])
        assert res[1][key] is None, (key, res[1])
