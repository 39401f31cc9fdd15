"""Batched sampling from a causal LM: temperature, top-k, top-p, stop at eos. Returns the tokens as a
SeqBatch, the sampled tokens' log-probs, and the decoded texts.

Rollouts run on the built-in static-KV-cache generator (rlp_engine.engine.generator). A call builds
its own Generator unless the caller passes a GeneratorCache (kept by whoever owns the model, e.g. the
built-in rollout of rlp_engine.engine.rollout), which reuses one Generator and its KV buffers across
calls. `sample_with` is the same sampling over any generate function (the vLLM rollout).
The log-probs are the generator's "scaled" ones: log_softmax(logits / temperature)[token] before
top-k/top-p filtering, i.e. the quantity a trainer recomputes by teacher forcing
(`response_logprobs(..., temperature=T)`).
PPO does not train on them: it recomputes its old log-probs with the actor in the scoring phase
(so the first ratio is exactly 1 whatever the generator's numerics) and logs the mean absolute
gap to these as `gen_logprob_gap` (the size a truncated-IS correction would have to absorb)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlp_engine.data.batch import SeqBatch, encode_prompts, join, pad_left
from rlp_engine.engine.console import progress
from rlp_engine.engine.generator import GenerationOutput, Generator, SamplingConfig


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


class GeneratorCache:
    """One model's Generator, kept between sample() calls by the caller that owns the model (its KV
    buffers, its rotary table and on CUDA its compiled decode step are reused); rebuilt when a call
    needs a longer max_len. Nothing is stored on the model."""

    def __init__(self, model):
        self.model = model
        self.generator: Generator | None = None

    def get(self, max_len: int) -> Generator:
        if self.generator is None or self.generator.max_len < max_len:
            self.generator = Generator(self.model, max_len)
        return self.generator

    def generate(self, ids, mask, sampling: SamplingConfig, max_len: int) -> GenerationOutput:
        return self.get(max_len).generate(ids, mask, sampling)


def sampling_config(cfg, tokenizer, max_new_tokens: int) -> SamplingConfig:
    """cfg's temperature / top-k / top-p with the tokenizer's eos and pad, "scaled" log-probs."""
    return SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=max(cfg.top_k, 0),
        eos_token_ids=(tokenizer.eos_token_id,),
        pad_token_id=tokenizer.pad_token_id,
        logprobs_mode="scaled",
    )


def sample(
    model,
    tokenizer,
    prompts: list[str],
    cfg,
    data_cfg,
    *,
    n: int = 1,
    batch_size: int = 256,
    cache: GeneratorCache | None = None,
    show_progress: bool = False,
    desc: str = "sampling",
) -> Samples:
    """`n` responses for each prompt (rows ordered prompt-major: prompt i's samples at i*n .. i*n+n-1)
    from the built-in generator over `model` (in eval mode for the call, its mode restored after).

    cfg: anything with temperature, top_k, top_p (PPOConfig, SampleConfig, EvalConfig).
    data_cfg: DataConfig (max_prompt_tokens, max_response_tokens, chat_template).
    cache: a GeneratorCache of `model` to reuse across calls; None builds a Generator for this call.
    show_progress: a progress bar `desc` over the prompt chunks (engine.console.progress: stderr,
    only on a terminal); the samples and the RNG draws are the same either way.
    """
    if cache is None:
        cache = GeneratorCache(model)
    elif cache.model is not model:
        raise ValueError("sample: cache belongs to another model (pass the model's own GeneratorCache)")
    was_training = model.training
    model.eval()
    try:
        return sample_with(
            cache.generate,
            tokenizer,
            prompts,
            cfg,
            data_cfg,
            n=n,
            batch_size=batch_size,
            show_progress=show_progress,
            desc=desc,
        )
    finally:
        model.train(was_training)


@torch.no_grad()
def sample_with(
    generate,
    tokenizer,
    prompts: list[str],
    cfg,
    data_cfg,
    *,
    n: int = 1,
    batch_size: int = 256,
    show_progress: bool = False,
    desc: str = "sampling",
) -> Samples:
    """As `sample`, through generate(ids, mask, sampling, max_len) -> GenerationOutput: (B, P)
    left-padded prompt chunks of at most batch_size rows; max_len = longest prompt + response."""
    expanded = [p for p in prompts for _ in range(n)]
    encoded = encode_prompts(tokenizer, expanded, data_cfg.max_prompt_tokens, data_cfg.chat_template)
    max_new = data_cfg.max_response_tokens
    max_len = max(map(len, encoded)) + max_new if encoded else max_new + 1
    sampling = sampling_config(cfg, tokenizer, max_new)
    chunks = []
    for i in progress(range(0, len(encoded), batch_size), desc=desc, enabled=show_progress):
        ids, mask = pad_left(encoded[i : i + batch_size], tokenizer.pad_token_id)
        out = generate(ids, mask, sampling, max_len)
        # the generator already pads after the first eos and zeroes log-probs off the mask
        dev = out.tokens.device
        chunks.append((join(ids.to(dev), mask.to(dev), out.tokens, out.mask), out.logprobs))
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
