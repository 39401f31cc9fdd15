"""Batched sampling from a causal LM: temperature, top-k, top-p, stop at eos. Returns the tokens as a
SeqBatch, the sampled tokens' log-probs under the sampling distribution, and the decoded texts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlp_engine import ops
from rlp_engine.engine.batch import SeqBatch, encode_prompts, join, pad_left


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


@torch.no_grad()
def _sample_chunk(model, tokenizer, prompt_ids: list[list[int]], cfg, max_new_tokens: int):
    ids, mask = pad_left(prompt_ids, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=cfg.temperature,
        top_k=cfg.top_k if cfg.top_k > 0 else None,
        top_p=cfg.top_p,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        return_dict_in_generate=True,
        output_scores=True,
    )
    tokens = out.sequences[:, ids.shape[1] :]  # (B, R)
    # out.scores are the processed (temperature / top-k / top-p) logits the tokens were drawn from.
    scores = torch.stack(out.scores, dim=1).float()  # (B, R, V)
    logprobs = ops.logprobs_from_logits(scores, tokens)
    rmask = response_mask_from_eos(tokens, tokenizer.eos_token_id)
    tokens = torch.where(rmask.bool(), tokens, torch.full_like(tokens, tokenizer.pad_token_id))
    return join(ids, mask, tokens, rmask), logprobs * rmask


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
    chunks = [
        _sample_chunk(model, tokenizer, encoded[i : i + batch_size], cfg, data_cfg.max_response_tokens)
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
