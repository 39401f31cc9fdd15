"""Supervised fine-tuning math: the response log-likelihood loss and the learning-rate schedule.
The loop that trains with them is rlp_engine/recipes/sft.py."""

from __future__ import annotations

import math

import torch

from rlp_engine import ops
from rlp_engine.data.batch import SeqBatch
from rlp_engine.models.policy import response_logprobs


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warmup over `warmup` steps, then cosine decay to 10% at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


def sft_loss(policy, batch: SeqBatch) -> torch.Tensor:
    """Negative mean log-likelihood of the response tokens (eos included). Scalar fp32.
    policy: a causal LM or a log-prob module (models.policy.response_logprobs)."""
    lp = response_logprobs(policy, batch.input_ids, batch.attention_mask, batch.response_len)
    return -ops.masked_mean(lp, batch.response_mask)
