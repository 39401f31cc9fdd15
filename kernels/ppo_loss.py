"""PPO policy loss (verl's vanilla, optional dual clip and truncated-IS weights) and clipped value loss:
fused Triton forward kernels, their launchers, and the pure-torch references `*_ref`.

Every aggregation mode is linear with per-token weights w = mask * row_scale[b] (see
rlp_engine.ops.reduce.agg_weights), so one pass over [B, T] computes the per-token loss L, the
weighted loss sum, the metric numerators and d = w * dL/dx; the backward is then grad * d. The kernels
compute in the dtype of `d` (fp32, or fp64 for fp64 inputs). Gradient conventions are torch autograd's
for the composite: clamp passes the gradient on its closed interval, max/min split it on ties.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


def _mean(x: torch.Tensor, valid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, x.to(count.dtype), 0).sum() / (count + 1e-8)


class Surrogate(NamedTuple):
    """verl's vanilla per-token PPO pieces (see clipped_surrogate)."""

    nk: torch.Tensor  # clamp(lp - old, -20, 20): the log-ratio; approx_kl averages -nk
    ratio: torch.Tensor  # exp(nk)
    pg1: torch.Tensor  # -adv * ratio
    pg2: torch.Tensor  # -adv * clamp(ratio, 1 - clip_low, 1 + clip_high); clipfrac counts pg2 > pg1
    c1: torch.Tensor  # max(pg1, pg2)
    loss: torch.Tensor  # c1, or with dual clip where(adv < 0, min(-adv * dual_clip, c1), c1)
    lower: torch.Tensor | None  # dual clip only: (c1 > -adv * dual_clip) & (adv < 0), clipfrac_lower


def clipped_surrogate(lp, old, adv, clip_low, clip_high, dual_clip) -> Surrogate:
    """The per-token clipped surrogate as one differentiable torch expression (same shapes, one
    dtype): ppo_policy_loss_ref differentiates it by autograd, the fused-linear PPO loss pairs it
    with its derivative written out (rlp_engine/ops/fused_linear.py)."""
    nk = torch.clamp(lp - old, min=-20.0, max=20.0)
    ratio = torch.exp(nk)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    c1 = torch.maximum(pg1, pg2)
    if dual_clip is None:
        return Surrogate(nk, ratio, pg1, pg2, c1, c1, None)
    pg3 = -adv * dual_clip
    loss = torch.where(adv < 0, torch.min(pg3, c1), c1)
    return Surrogate(nk, ratio, pg1, pg2, c1, loss, (c1 > pg3) & (adv < 0))


def ppo_policy_loss_ref(
    logprob,
    old_logprob,
    advantages,
    mask,
    weights,
    clip_low=0.2,
    clip_high=0.2,
    dual_clip=None,
    is_weights=None,
):
    """verl's compute_policy_loss_vanilla as a torch autograd composite. Tensors [B, T]; `weights` [B, T]
    are the aggregation weights (loss = sum(weights * L) over the mask). Computes in weights.dtype.
    Masked-out inputs are replaced by 0 first so that NaN there cannot reach a value or a gradient.
    Returns (loss 0-dim, {"clipfrac", "approx_kl", "clipfrac_lower"} 0-dim fp32)."""
    dt = weights.dtype
    valid = mask.bool()
    lp = torch.where(valid, logprob.to(dt), 0)
    # old log-probs, advantages and IS weights are constants (no gradient), as in every PPO implementation
    old, adv = (torch.where(valid, t.detach().to(dt), 0) for t in (old_logprob, advantages))
    s = clipped_surrogate(lp, old, adv, clip_low, clip_high, dual_clip)
    count = valid.to(dt).sum()
    metrics = {"clipfrac": _mean(s.pg2 > s.pg1, valid, count), "approx_kl": _mean(-s.nk, valid, count)}
    if s.lower is None:
        metrics["clipfrac_lower"] = torch.zeros((), dtype=dt, device=lp.device)
    else:
        metrics["clipfrac_lower"] = _mean(s.lower, valid, count)
    losses = s.loss
    if is_weights is not None:
        losses = losses * torch.where(valid, is_weights.detach().to(dt), 0)
    loss = (torch.where(valid, losses, 0) * weights).sum()
    return loss, {k: v.detach().float() for k, v in metrics.items()}


def ppo_value_loss_ref(values, old_values, returns, mask, weights, clip=0.2):
    """verl's compute_value_loss: 0.5 * sum(weights * max((v - R)^2, (clamp(v, v_old - c, v_old + c) - R)^2));
    clip=None -> unclipped. Tensors [B, T]; computes in weights.dtype. Returns (loss, {"clipfrac"})."""
    dt = weights.dtype
    valid = mask.bool()
    v = torch.where(valid, values.to(dt), 0)
    vo, ret = (torch.where(valid, t.detach().to(dt), 0) for t in (old_values, returns))  # constants
    l1 = (v - ret) ** 2
    count = valid.to(dt).sum()
    if clip is None:
        losses, clipfrac = l1, torch.zeros((), dtype=dt, device=v.device)
    else:
        l2 = (torch.clamp(v, vo - clip, vo + clip) - ret) ** 2
        losses = torch.max(l1, l2)
        clipfrac = _mean(l2 > l1, valid, count)
    loss = 0.5 * (torch.where(valid, losses, 0) * weights).sum()
    return loss, {"clipfrac": clipfrac.detach().float()}


@triton.jit
def _dmax(a, b, da, db):
    # d max(a, b), torch's convention: half to each side on a tie
    return tl.where(a > b, da, tl.where(a < b, db, 0.5 * (da + db)))


@triton.jit
def _policy_fwd_kernel(
    lp_ptr,
    old_ptr,
    adv_ptr,
    mask_ptr,
    scale_ptr,
    isw_ptr,
    part_ptr,
    d_ptr,
    T,
    n_parts,
    lo,
    hi,
    cdual,
    HAS_ISW: tl.constexpr,
    DUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < T
    offs = row * T + cols
    cdt = d_ptr.dtype.element_ty
    m = (tl.load(mask_ptr + offs, mask=ok, other=0) != 0) & ok
    a = tl.load(adv_ptr + offs, mask=ok, other=0.0).to(cdt)
    x = tl.load(lp_ptr + offs, mask=ok, other=0.0).to(cdt) - tl.load(old_ptr + offs, mask=ok, other=0.0).to(
        cdt
    )
    nk = tl.minimum(tl.maximum(x, -20.0), 20.0)
    rho = tl.exp(nk)
    u = -a * rho
    v = -a * tl.minimum(tl.maximum(rho, lo), hi)
    du = tl.where((x >= -20.0) & (x <= 20.0), u, 0.0)
    dv = tl.where((rho >= lo) & (rho <= hi), du, 0.0)
    c1 = tl.maximum(u, v)
    L = c1
    dL = _dmax(u, v, du, dv)
    pid = row * tl.num_programs(1) + tl.program_id(1)
    if DUAL:  # without it the clipped-lower partial stays at its initial 0
        p3 = -a * cdual
        neg = a < 0
        low = m & neg & (c1 > p3)
        tl.store(part_ptr + 3 * n_parts + pid, tl.sum(tl.where(low, 1.0, 0.0), axis=0))
        dc2 = tl.where(c1 < p3, dL, tl.where(c1 > p3, 0.0, 0.5 * dL))
        L = tl.where(neg, tl.minimum(p3, c1), c1)
        dL = tl.where(neg, dc2, dL)
    scale = tl.load(scale_ptr + row).to(cdt)
    if HAS_ISW:
        scale = scale * tl.load(isw_ptr + offs, mask=ok, other=0.0).to(cdt)
    tl.store(d_ptr + offs, tl.where(m, dL * scale, 0.0).to(cdt), mask=ok)
    tl.store(part_ptr + pid, tl.sum(tl.where(m, L * scale, 0.0), axis=0))
    tl.store(part_ptr + n_parts + pid, tl.sum(tl.where(m & (v > u), 1.0, 0.0), axis=0))
    tl.store(part_ptr + 2 * n_parts + pid, tl.sum(tl.where(m, -nk, 0.0), axis=0))


@triton.jit
def _value_fwd_kernel(
    v_ptr,
    old_ptr,
    ret_ptr,
    mask_ptr,
    scale_ptr,
    part_ptr,
    d_ptr,
    T,
    n_parts,
    clip,
    CLIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < T
    offs = row * T + cols
    cdt = d_ptr.dtype.element_ty
    m = (tl.load(mask_ptr + offs, mask=ok, other=0) != 0) & ok
    v = tl.load(v_ptr + offs, mask=ok, other=0.0).to(cdt)
    ret = tl.load(ret_ptr + offs, mask=ok, other=0.0).to(cdt)
    e1 = v - ret
    L = e1 * e1
    dL = 2.0 * e1
    pid = row * tl.num_programs(1) + tl.program_id(1)
    if CLIP:  # without it the clipped-count partial stays at its initial 0
        vo = tl.load(old_ptr + offs, mask=ok, other=0.0).to(cdt)
        vlo = vo - clip
        vhi = vo + clip
        e2 = tl.minimum(tl.maximum(v, vlo), vhi) - ret
        l2 = e2 * e2
        dl2 = tl.where((v >= vlo) & (v <= vhi), 2.0 * e2, 0.0)
        tl.store(part_ptr + n_parts + pid, tl.sum(tl.where(m & (l2 > L), 1.0, 0.0), axis=0))
        dL = _dmax(L, l2, dL, dl2)
        L = tl.maximum(L, l2)
    half_scale = 0.5 * tl.load(scale_ptr + row).to(cdt)
    tl.store(d_ptr + offs, tl.where(m, dL * half_scale, 0.0).to(cdt), mask=ok)
    tl.store(part_ptr + pid, tl.sum(tl.where(m, L * half_scale, 0.0), axis=0))


def _grid(B: int, T: int) -> tuple[int, int, int]:
    # rows on grid dim 0 (up to 2^31 - 1); column blocks on dim 1 (<= 65535 blocks of up to 2048)
    block = min(2048, triton.next_power_of_2(max(T, 1)))
    return B, triton.cdiv(T, block), block


def ppo_policy_forward(
    logprob, old_logprob, advantages, mask_u8, row_scale, is_weights, clip_low, clip_high, dual_clip
):
    """One fused pass. Inputs [B, T] contiguous, one floating dtype; mask_u8 [B, T] uint8; row_scale [B]
    in the compute dtype. Returns (loss 0-dim, sums [3] = (#clipped, sum(-nk), #clipped-lower),
    d [B, T] = w * dL/dlogprob), all in the compute dtype (row_scale.dtype)."""
    B, T = logprob.shape
    n_b, n_t, block = _grid(B, T)
    cdt = row_scale.dtype
    d = torch.empty((B, T), dtype=cdt, device=logprob.device)
    parts = torch.zeros((4, n_b * n_t), dtype=cdt, device=logprob.device)
    if B * T:
        _policy_fwd_kernel[(n_b, n_t)](
            logprob,
            old_logprob,
            advantages,
            mask_u8,
            row_scale,
            logprob if is_weights is None else is_weights,
            parts,
            d,
            T,
            n_b * n_t,
            1.0 - clip_low,
            1.0 + clip_high,
            0.0 if dual_clip is None else dual_clip,
            HAS_ISW=is_weights is not None,
            DUAL=dual_clip is not None,
            BLOCK=block,
        )
    sums = parts.sum(dim=1)
    return sums[0], sums[1:], d


def ppo_value_forward(values, old_values, returns, mask_u8, row_scale, clip):
    """One fused pass (see ppo_policy_forward). Returns (loss 0-dim, #clipped 0-dim, d = w * dL/dvalues)."""
    B, T = values.shape
    n_b, n_t, block = _grid(B, T)
    cdt = row_scale.dtype
    d = torch.empty((B, T), dtype=cdt, device=values.device)
    parts = torch.zeros((2, n_b * n_t), dtype=cdt, device=values.device)
    if B * T:
        _value_fwd_kernel[(n_b, n_t)](
            values,
            old_values,
            returns,
            mask_u8,
            row_scale,
            parts,
            d,
            T,
            n_b * n_t,
            0.0 if clip is None else clip,
            CLIP=clip is not None,
            BLOCK=block,
        )
    sums = parts.sum(dim=1)
    return sums[0], sums[1], d
