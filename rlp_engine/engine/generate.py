"""Batched sampling from a causal LM: temperature, top-k, top-p, stop at eos. Returns the tokens as a
SeqBatch, the sampled tokens' log-probs, and the decoded texts.

Rollouts run on the built-in static-KV-cache generator (rlp_engine.engine.generator); one Generator
(and its cache) is kept per model and reused while the batch fits. The log-probs are the generator's
"scaled" ones: log_softmax(logits / temperature)[token] before top-k/top-p filtering, i.e. the
quantity a trainer recomputes by teacher forcing (`response_logprobs(..., temperature=T)`).
PPO does not train on them: it recomputes its old log-probs with the actor in the scoring phase
(so the first ratio is exactly 1 whatever the generator's numerics) and logs the mean absolute
gap to these as `gen_logprob_gap` (the size a truncated-IS correction would have to absorb)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlp_engine.data.batch import SeqBatch, encode_prompts, join, pad_left
from rlp_engine.engine.generator import Generator, SamplingConfig


class _GeneratorSlot:
    """Holds a model's Generator on the model itself (so it lives and dies with the model); a
    deepcopy of the model (PPO's actor, reference) starts with an empty slot, not a copied cache."""

    def __init__(self, gen: Generator | None = None):
        self.gen = gen

    def __deepcopy__(self, memo):
        return _GeneratorSlot()


@dataclass
class Samples:
    batch: SeqBatch  # prompts + responses
    logprobs: torch.Tensor  # (B, R) fp32, log-prob of each sampled token under the sampler; 0 off-mask
    prompts: list[str]
    responses: list[str]
    truncated: torch.Tensor  # (B,) bool: no eos within max_new_tokens


def response_mask_from_eos(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first eos of each row, 0 after it. [B, R] -> [B, R] float32.
    Positions decide, not the pad id, so pad == eos (common in HF tokenizers) is fine."""
    is_eos = (tokens == eos_id).long()
    before = is_eos.cumsum(-1) - is_eos  # eos tokens strictly before t
    return (before == 0).float()


def generator_for(model, max_len: int) -> Generator:
    """The cached Generator of `model`, rebuilt when a longer max_len is needed."""
    slot = model.__dict__.get("_rlp_generator")
    if slot is None or slot.gen is None or slot.gen.max_len < max_len:
        slot = _GeneratorSlot(Generator(model, max_len))
        model.__dict__["_rlp_generator"] = slot  # a plain attribute: not a submodule, not in state_dict
    return slot.gen


@torch.no_grad()
def _sample_chunk(model, tokenizer, prompt_ids: list[list[int]], cfg, max_new_tokens: int, max_len: int):
    ids, mask = pad_left(prompt_ids, tokenizer.pad_token_id)
    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=max(cfg.top_k, 0),
        eos_token_ids=(tokenizer.eos_token_id,),
        pad_token_id=tokenizer.pad_token_id,
        logprobs_mode="scaled",
    )
    out = generator_for(model, max_len).generate(ids, mask, sampling)
    # the generator already pads after the first eos and zeroes log-probs off the mask
    return join(ids.to(out.tokens.device), mask.to(out.tokens.device), out.tokens, out.mask), out.logprobs


def sample(
    model,
    tokenizer,
    prompts: list[str],
    cfg,
    data_cfg,
    *,
    n: int = 1,
    batch_size: int = 256,
) -> Samples:
    """`n` responses for each prompt (rows ordered prompt-major: prompt i's samples at i*n .. i*n+n-1).

    cfg: anything with temperature, top_k, top_p (PPOConfig, SampleConfig, EvalConfig).
    data_cfg: DataConfig (max_prompt_tokens, max_response_tokens, chat_template).
    """
    was_training = model.training
    model.eval()
    expanded = [p for p in prompts for _ in range(n)]
    encoded = encode_prompts(tokenizer, expanded, data_cfg.max_prompt_tokens, data_cfg.chat_template)
    max_new = data_cfg.max_response_tokens
    max_len = max(map(len, encoded)) + max_new if encoded else max_new + 1
    chunks = [
        _sample_chunk(model, tokenizer, encoded[i : i + batch_size], cfg, max_new, max_len)
        for i in range(0, len(encoded), batch_size)
    ]
    model.train(was_training)
    batch, logprobs = _concat(chunks, tokenizer.pad_token_id)
    r = batch.response_len
    eos = tokenizer.eos_token_id
    has_eos = ((batch.input_ids[:, -r:] == eos) & batch.response_mask.bool()).any(-1)
    responses = decode_responses(tokenizer, batch)
    return Samples(batch, logprobs, expanded, responses, truncated=~has_eos)


def decode_responses(tokenizer, batch: SeqBatch) -> list[str]:
    r = batch.response_len
    toks = batch.input_ids[:, -r:].tolist()
    masks = batch.response_mask.tolist()
    eos = tokenizer.eos_token_id
    return [
        tokenizer.decode([t for t, m in zip(row, mrow) if m and t != eos], skip_special_tokens=True)
        for row, mrow in zip(toks, masks)
    ]


def _concat(chunks, pad_id: int) -> tuple[SeqBatch, torch.Tensor]:
    """Concatenate sampled chunks, re-padding prompts (left) and responses (right) to common widths."""
    p = max(c.prompt_len for c, _ in chunks)
    r = max(c.response_len for c, _ in chunks)
    ids, attn, rmask, lps = [], [], [], []
    for c, lp in chunks:
        dp, dr = p - c.prompt_len, r - c.response_len
        ids.append(torch.nn.functional.pad(c.input_ids, (dp, dr), value=pad_id))
        attn.append(torch.nn.functional.pad(c.attention_mask, (dp, dr), value=0))
        rmask.append(torch.nn.functional.pad(c.response_mask, (0, dr), value=0.0))
        lps.append(torch.nn.functional.pad(lp, (0, dr), value=0.0))
    return SeqBatch(torch.cat(ids), torch.cat(attn), torch.cat(rmask)), torch.cat(lps)
