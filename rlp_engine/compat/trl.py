"""Drop-in for TRL's `trl.trainer.utils` loss helpers (same names, parameters and results),
backed by rlp_engine's fused ops."""

from __future__ import annotations

from rlp_engine import ops
from rlp_engine.ops import reduce


def selective_log_softmax(logits, index):
    """log_softmax(logits)[..., index] without materialising the log-softmax: [..., V] -> [...]."""
    return ops.logprobs_from_logits(logits, index)


def entropy_from_logits(logits, chunk_size: int = 128):
    """Entropy of softmax(logits) [..., V] -> [...]; `chunk_size` is accepted for signature
    compatibility (the kernel walks rows itself and never holds a softmax copy)."""
    return ops.entropy_from_logits(logits)


def masked_mean(values, mask, axis=None):
    """TRL's masked mean: sum(values * mask) / sum(mask) (no epsilon: an empty mask gives NaN)."""
    m = mask.to(values.dtype)
    if axis is None:
        return reduce.masked_sum(values, mask) / m.sum()
    return reduce.masked_sum(values, mask, dim=axis) / m.sum(axis)


def masked_var(values, mask, unbiased=True):
    """TRL's masked variance, with its errors for masks of fewer than two elements."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        mask_sum = mask.sum()
        if mask_sum == 0:
            raise ValueError(
                "The sum of the mask is zero, which can happen when `mini_batch_size=1`;"
                "try increase the `mini_batch_size` or `gradient_accumulation_steps`"
            )
        variance = variance * (mask_sum / (mask_sum - 1))
    return variance


def masked_whiten(values, mask, shift_mean=True):
    """(values - mean) * rsqrt(var + 1e-8) over the mask, mean added back when shift_mean=False."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * (var + 1e-8).rsqrt()
    if not shift_mean:
        whitened = whitened + mean
    return whitened
