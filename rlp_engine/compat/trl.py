"""Drop-in for TRL 1.12's loss helpers: `trl.trainer.utils.selective_log_softmax` and
`entropy_from_logits`, and the PPO trainer's `masked_mean/var/whiten` (`trl.experimental.ppo`).
Same names, parameters, results, dtypes and exceptions (tests/test_compat_trl.py compares them with
the installed TRL), backed by rlp_engine's fused ops, which compute fp16/bf16/fp64 logits in fp32;
results are cast back to the logits' dtype, as TRL returns them.
"""

from __future__ import annotations

from rlp_engine import ops
from rlp_engine.compat._common import gather_logprobs, promote
from rlp_engine.ops import reduce


def selective_log_softmax(logits, index):
    """log_softmax(logits)[..., index] without materialising the log-softmax. logits (..., V); index
    (...) or (..., K) (K log-probs per position, e.g. top-K). Returns index's shape, in logits' dtype.
    RuntimeError for an index of another shape or (on CPU) outside [0, V), as torch.gather raises."""
    if index.dim() == logits.dim() - 1:
        return gather_logprobs(logits, index.unsqueeze(-1)).squeeze(-1).to(logits.dtype)
    return gather_logprobs(logits, index).to(logits.dtype)


def entropy_from_logits(logits, chunk_size: int = 128):
    """Entropy of softmax(logits) (..., V) -> (...), in logits' dtype. `chunk_size` only bounds TRL's
    peak memory (the fused kernel never holds a softmax copy); it is checked as TRL's split checks it."""
    rows = logits.numel() // logits.shape[-1] if logits.shape[-1] else 0
    if chunk_size < 0 or (chunk_size == 0 and rows > 0):
        raise RuntimeError(f"entropy_from_logits: chunk_size must be > 0, got {chunk_size}")
    return ops.entropy_from_logits(logits).to(logits.dtype)


def masked_mean(values, mask, axis=None):
    """TRL's masked mean: sum(values * mask) / sum(mask) (no epsilon: an empty mask gives NaN), in
    promote(values, mask); values outside the mask (even NaN) never count."""
    s = reduce.masked_sum(values.to(promote(values, mask)), mask, dim=axis)
    return s / (mask.sum() if axis is None else mask.sum(axis=axis))


def masked_var(values, mask, unbiased=True):
    """TRL's masked variance, with its error for an empty mask."""
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
