"""Masked reductions and loss aggregation (pure torch: they are memory-bound one-pass reductions
that torch already runs at bandwidth). Positions where mask == 0 never affect a result, even when
they hold NaN or inf. Shapes: x, mask [B, T] (any shape for the masked_* helpers)."""

from __future__ import annotations

import torch

from rlp_engine.op_names import AGG_MODES
from rlp_engine.ops._checks import check_choice, check_mask, check_tensor


def _valid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where (not multiply) so that NaN/inf outside the mask cannot leak in: 0 * nan = nan.
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """sum(x * mask) over `dim` (all dims when None), ignoring values outside the mask."""
    check_tensor("masked_sum", "x", x)
    check_mask("masked_sum", mask, x, "x")
    prod = _valid(x, mask) * mask.to(x.dtype)
    return prod.sum() if dim is None else prod.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """sum(x * mask) / (sum(mask) + 1e-8): 0 for an empty mask (verl's and OpenRLHF's convention)."""
    check_tensor("masked_mean", "x", x)
    check_mask("masked_mean", mask, x, "x")
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim=dim)
    return masked_sum(x, mask, dim) / (count + 1e-8)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over the mask (Bessel-corrected when `unbiased`). Needs at least two tokens
    when unbiased: raises ValueError otherwise (this check reads the count on the host)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        n_host = float(n)
        if n_host < 2:
            raise ValueError(f"masked_var: the mask selects {n_host:g} elements; at least 2 are needed")
        var = var * (n / (n - 1))
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) * rsqrt(var + 1e-8) with mean and unbiased variance over the mask; the mean is
    added back when shift_mean=False. Statistics in fp32; returns x's dtype. [B, T] -> [B, T]."""
    check_tensor("masked_whiten", "x", x)
    check_mask("masked_whiten", mask, x, "x")
    xf = x.float()
    mean = masked_mean(xf, mask)
    var = masked_var(xf, mask)
    out = (xf - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out.to(x.dtype)


def row_scale(
    mask: torch.Tensor,
    mode: str,
    dtype: torch.dtype = torch.float32,
    *,
    dp_size: int = 1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one place the aggregation normalisers are computed: (s [B], n_tokens 0-dim) in `dtype`
    with agg_weights(mask, mode, ...) == mask * s[:, None]. mask [B, T] (a bool mask for the PPO
    losses, whose kernels take s; 0/1 or fractional weights for agg_loss); `mode` already checked."""
    B, T = mask.shape
    rows = mask.to(dtype).sum(dim=-1)  # [B] tokens (or mask weight) per sequence
    n_tokens = rows.sum()
    if mode == "token-sum":
        s = 1.0
    elif mode == "token-mean":
        s = dp_size / (n_tokens.clamp_min(1.0) if batch_num_tokens is None else batch_num_tokens)
    elif mode == "seq-mean-token-sum-norm":
        # max(T, 1): with T = 0 there is no loss to scale (agg_loss gives 0 there too)
        s = 1.0 / (max(T, 1) if loss_scale_factor is None else loss_scale_factor)
    else:
        seqs = (rows > 0).sum(dtype=dtype).clamp_min(1.0) if global_batch_size is None else global_batch_size
        s = dp_size / seqs
        if mode == "seq-mean-token-mean":
            return s / (rows + 1e-8), n_tokens
    s = torch.as_tensor(s, dtype=dtype, device=mask.device)
    return s.expand(B).contiguous(), n_tokens


def agg_weights(
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    dp_size: int = 1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
) -> torch.Tensor:
    """Per-token weights w [B, T] (fp32) with agg_loss(L, mask, mode) == sum(w * L) over the mask.

    Every aggregation mode is linear in the loss matrix, so fused kernels take these weights and
    reduce in one pass. Normalisers follow verl: `batch_num_tokens` / `global_batch_size` are the
    global token / non-empty-sequence counts (default: this batch's, at least 1), multiplied by
    `dp_size` so that summing gradients over data-parallel ranks gives the global mean;
    `loss_scale_factor` is the constant divisor of seq-mean-token-sum-norm (default: T).
    """
    check_choice("agg_loss", "mode", mode, AGG_MODES)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"agg_loss: mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"agg_loss: mask must be [B, T], got shape {tuple(mask.shape)}")
    m = mask.float()
    scale, _ = row_scale(
        m,
        mode,
        dp_size=dp_size,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
        loss_scale_factor=loss_scale_factor,
    )
    return m * scale[:, None]


def agg_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    dp_size: int = 1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
) -> torch.Tensor:
    """Aggregate a per-token loss matrix [B, T] into a scalar. Modes: token-mean, token-sum,
    seq-mean-token-sum, seq-mean-token-mean (sequence means over non-empty rows),
    seq-mean-token-sum-norm (sum / loss_scale_factor). See `agg_weights` for the normalisers."""
    check_tensor("agg_loss", "loss_mat", loss_mat, ndim=2)
    check_mask("agg_loss", mask, loss_mat, "loss_mat")
    w = agg_weights(
        mask,
        mode,
        dp_size=dp_size,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
        loss_scale_factor=loss_scale_factor,
    )
    return (_valid(loss_mat, mask).float() * w).sum()
