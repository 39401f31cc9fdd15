"""Helpers shared by the drop-ins: the dtype the original's eager expression would give, and the
errors torch.gather raises for the log-prob functions (the originals are log_softmax + gather)."""

from __future__ import annotations

import functools

import torch

from rlp_engine import ops

# The drop-ins have no ignore_index (the originals gather every label): pass one no label can equal,
# so that -100 is out of range (a RuntimeError on CPU, as in torch.gather) instead of "ignored".
NO_IGNORE = torch.iinfo(torch.int64).min


def promote(*tensors: torch.Tensor) -> torch.dtype:
    """torch's type promotion over same-rank tensors (what `a * b` or `a - b` gives)."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors))


def check_gather_index(logits: torch.Tensor, index: torch.Tensor) -> None:
    """Raise what the originals' torch.gather / broadcasting raise: RuntimeError for an index whose
    leading shape differs from the logits' or (CPU only: no host sync on GPU) a value outside [0, V)."""
    if index.dim() != logits.dim() or index.shape[:-1] != logits.shape[:-1]:
        raise RuntimeError(
            f"index of shape {tuple(index.shape)} does not match logits of shape {tuple(logits.shape)}"
        )
    if index.device.type != "cpu" or index.numel() == 0:
        return
    vocab = logits.shape[-1]
    bad = (index < 0) | (index >= vocab)
    if bad.any():
        value = int(index[bad][0])
        raise RuntimeError(
            f"index {value} is out of bounds for dimension {logits.dim() - 1} with size {vocab}"
        )


def gather_logprobs(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / temperature).gather(-1, index) for index [..., K], fp32 (fp64 stays fp32:
    the fused op computes in fp32). One fused pass gives lp0 = z[i0] - lse for the first column; the
    other columns are z[ik] - lse = (z[ik] - z[i0]) + lp0, so no [N, V] log-softmax is materialised."""
    check_gather_index(logits, index)
    if index.shape[-1] == 0:
        return logits.float().gather(-1, index)
    lp0 = ops.logprobs_from_logits(logits, index[..., 0], temperature=temperature, ignore_index=NO_IGNORE)
    if index.shape[-1] == 1:
        return lp0.unsqueeze(-1)
    z = logits.gather(-1, index).float() / temperature  # (..., K)
    return (z - z[..., :1]) + lp0.unsqueeze(-1)
