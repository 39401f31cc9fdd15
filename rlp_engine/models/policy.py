"""Per-token log-probs of a policy's responses, through the fused LM-head op (no [B, T, V] logits)."""

from __future__ import annotations

import torch

from rlp_engine.models.heads import position_ids
from rlp_engine.ops.hf import causal_lm_logprobs


def response_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_len: int,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """Log-probs [B, R] (fp32) of the last `response_len` tokens of `input_ids` [B, P+R] under `model`
    (and their entropies [B, R] when asked); 0 where attention_mask is 0. Only the response positions
    reach the LM head. Positions count real tokens only, so left padding does not shift them."""
    return causal_lm_logprobs(
        model,
        input_ids,
        attention_mask,
        temperature=temperature,
        return_entropy=return_entropy,
        response_start=input_ids.shape[1] - response_len,
        position_ids=position_ids(attention_mask),
    )
