"""PPO policy loss (verl's vanilla, with dual clip and truncated-IS weights) and clipped value loss.

Fused design: every aggregation mode is linear with weights w = mask * row_scale[b], so one pass over
[B, T] produces the loss, the metric numerators and d = w * dL/dx; the backward is grad * d (saving d
moves 8 bytes a token in the backward against the 13-17 of recomputing it from the inputs).
Backends: "torch" (kernels.ppo_loss *_ref autograd composites), "cpp" (rlp::ppo_policy_loss_fwd,
rlp::ppo_value_loss_fwd, OpenMP over rows), "triton" (fused kernels). All compute in fp32 (fp64 for
fp64 inputs); the loss has the compute dtype, metrics are 0-dim fp32 tensors (no host sync).

Gradients flow to `logprob` (policy) and `values` (value loss) only: old log-probs, advantages,
importance weights, old values and returns are constants, as in every PPO implementation.
"""

from __future__ import annotations

import numbers

import torch

from rlp_engine.kernels.ppo_loss import (
    ppo_policy_forward,
    ppo_policy_loss_ref,
    ppo_value_forward,
    ppo_value_loss_ref,
)
from rlp_engine.op_names import AGG_MODES
from rlp_engine.ops._backend import cpp_available, cpp_ops, select
from rlp_engine.ops._checks import check_choice, check_mask, check_same_shape, check_tensor
from rlp_engine.ops.reduce import row_scale

__all__ = ["ppo_policy_loss", "ppo_value_loss", "truncated_is_weights"]


def _check_clip(op: str, name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"{op}: {name} must be a number >= 0, got {value!r}")


def _prepare(op: str, first: str, tensors: dict, mask, agg: str):
    """Validate the [B, T] inputs, the mask and agg (before any work); return the mask as contiguous bool."""
    for name, t in tensors.items():
        check_tensor(op, name, t, ndim=2 if name == first else None)
    ref = tensors[first]
    check_same_shape(op, first, ref, **{k: v for k, v in tensors.items() if k != first})
    check_mask(op, mask, ref, first)
    check_choice(op, "agg", agg, AGG_MODES)
    valid = mask if mask.dtype == torch.bool else mask != 0
    return valid.contiguous()


def _dtypes_and_scale(tensors: dict, valid, agg: str, norms: dict):
    """(input dtype, compute dtype, row_scale(...)): fp64 inputs compute in fp64, all else in fp32."""
    dt = _common_dtype(*tensors.values())
    cdt = torch.float64 if dt == torch.float64 else torch.float32
    return dt, cdt, row_scale(valid, agg, cdt, **norms)


def _common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dt = tensors[0].dtype
    for t in tensors[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def ppo_policy_loss(
    logprob,
    old_logprob,
    advantages,
    mask,
    clip_low=0.2,
    clip_high=0.2,
    dual_clip=None,
    agg="token-mean",
    *,
    is_weights=None,
    dp_size=1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
):
    """PPO clipped surrogate (verl's compute_policy_loss_vanilla). Tensors [B, T] floating (mask bool,
    integer or {0,1} floating; is_weights optional truncated-IS weights). dual_clip: None or c > 1.
    Returns (loss 0-dim, {"clipfrac", "approx_kl", "clipfrac_lower"} 0-dim fp32). Gradient to logprob only."""
    op = "ppo_policy_loss"
    tensors = {"logprob": logprob, "old_logprob": old_logprob, "advantages": advantages}
    if is_weights is not None:
        tensors["is_weights"] = is_weights
    valid = _prepare(op, "logprob", tensors, mask, agg)
    _check_clip(op, "clip_low", clip_low)
    _check_clip(op, "clip_high", clip_high)
    if dual_clip is not None and not (isinstance(dual_clip, numbers.Real) and dual_clip > 1.0):
        raise ValueError(f"{op}: dual_clip must be None or a number > 1, got {dual_clip!r}")
    name = select(op, logprob, old_logprob, advantages)
    norms = dict(
        dp_size=dp_size,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
        loss_scale_factor=loss_scale_factor,
    )
    dt, cdt, (scale, n_tokens) = _dtypes_and_scale(tensors, valid, agg, norms)
    if name == "torch":
        return ppo_policy_loss_ref(
            logprob,
            old_logprob,
            advantages,
            valid,
            valid.to(cdt) * scale[:, None],
            clip_low,
            clip_high,
            dual_clip,
            is_weights,
        )
    lp, old, adv, isw = (
        None if t is None else t.to(dt).contiguous() for t in (logprob, old_logprob, advantages, is_weights)
    )
    clip_low, clip_high = float(clip_low), float(clip_high)
    dual_clip = None if dual_clip is None else float(dual_clip)
    if name == "cpp":
        row_loss, row_stats, _ = cpp_ops().ppo_policy_loss_fwd(
            lp, old, adv, valid, scale, isw, clip_low, clip_high, dual_clip
        )
        loss, sums = row_loss.sum(), row_stats.detach().sum(dim=0)
    else:
        loss, sums = _PolicyTriton.apply(
            lp, old, adv, valid.view(torch.uint8), scale, isw, clip_low, clip_high, dual_clip
        )
    fracs = (sums / (n_tokens + 1e-8)).float()
    return loss, {"clipfrac": fracs[0], "approx_kl": fracs[1], "clipfrac_lower": fracs[2]}


def ppo_value_loss(
    values,
    old_values,
    returns,
    mask,
    clip=0.2,
    agg="token-mean",
    *,
    dp_size=1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
):
    """Clipped value loss 0.5 * agg(max((v - R)^2, (clamp(v, v_old - c, v_old + c) - R)^2)) (verl's
    compute_value_loss); clip=None -> 0.5 * agg((v - R)^2). Tensors [B, T] floating. Returns
    (loss 0-dim, {"clipfrac"} 0-dim fp32). Gradient to values only."""
    op = "ppo_value_loss"
    tensors = {"values": values, "old_values": old_values, "returns": returns}
    valid = _prepare(op, "values", tensors, mask, agg)
    _check_clip(op, "clip", clip, allow_none=True)
    name = select(op, values, old_values, returns)
    norms = dict(
        dp_size=dp_size,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
        loss_scale_factor=loss_scale_factor,
    )
    dt, cdt, (scale, n_tokens) = _dtypes_and_scale(tensors, valid, agg, norms)
    if name == "torch":
        return ppo_value_loss_ref(values, old_values, returns, valid, valid.to(cdt) * scale[:, None], clip)
    v, vo, ret = (t.to(dt).contiguous() for t in (values, old_values, returns))
    clip = None if clip is None else float(clip)
    if name == "cpp":
        row_loss, row_clip, _ = cpp_ops().ppo_value_loss_fwd(v, vo, ret, valid, scale, clip)
        loss, nclip = row_loss.sum(), row_clip.detach().sum()
    else:
        loss, nclip = _ValueTriton.apply(v, vo, ret, valid.view(torch.uint8), scale, clip)
    return loss, {"clipfrac": (nclip / (n_tokens + 1e-8)).float()}


def truncated_is_weights(trainer_logprobs, gen_logprobs, mask, cap):
    """Truncated importance-sampling weights min(exp(trainer_logprobs - gen_logprobs), cap) of the
    sampled tokens, to pass as ppo_policy_loss's `is_weights`: PPO's ratio is taken against the
    trainer's old log-probs, but the tokens came from the generator, whose numerics (vLLM, other
    kernels, bf16) may differ; the cap bounds the variance.

    trainer_logprobs, gen_logprobs: same shape (usually [B, T]), floating; mask: that shape, bool,
    integer or floating (nonzero = on). cap: a number > 0 (inf: no truncation). Returns fp32 computed
    in fp32, exactly 0 off the mask even where the inputs hold NaN or inf there, and no gradient."""
    op = "truncated_is_weights"
    check_tensor(op, "trainer_logprobs", trainer_logprobs)
    check_tensor(op, "gen_logprobs", gen_logprobs)
    check_same_shape(op, "trainer_logprobs", trainer_logprobs, gen_logprobs=gen_logprobs)
    check_mask(op, mask, trainer_logprobs, "trainer_logprobs")
    if not isinstance(cap, numbers.Real) or isinstance(cap, bool) or not cap > 0:
        raise ValueError(f"{op}: cap must be a number > 0, got {cap!r}")
    with torch.no_grad():
        w = torch.exp(trainer_logprobs.float() - gen_logprobs.float()).clamp(max=float(cap))
        # where, not multiply: 0 * NaN (or inf) off the mask would be NaN
        return torch.where(mask.bool(), w, torch.zeros((), dtype=w.dtype, device=w.device))


class _PolicyTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lp, old, adv, mask_u8, scale, isw, clip_low, clip_high, dual_clip):
        loss, sums, d = ppo_policy_forward(lp, old, adv, mask_u8, scale, isw, clip_low, clip_high, dual_clip)
        ctx.save_for_backward(d)
        ctx.lp_dtype = lp.dtype
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx, grad, _grad_sums):
        (d,) = ctx.saved_tensors
        return (grad * d).to(ctx.lp_dtype), *([None] * 8)


class _ValueTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, vo, ret, mask_u8, scale, clip):
        loss, nclip, d = ppo_value_forward(v, vo, ret, mask_u8, scale, clip)
        ctx.save_for_backward(d)
        ctx.v_dtype = v.dtype
        ctx.mark_non_differentiable(nclip)
        return loss, nclip

    @staticmethod
    def backward(ctx, grad, _grad_nclip):
        (d,) = ctx.saved_tensors
        return (grad * d).to(ctx.v_dtype), *([None] * 5)


def _fwd_setup(ctx, inputs, output):
    ctx.save_for_backward(output[2])
    ctx.x_dtype = inputs[0].dtype
    ctx.n_inputs = len(inputs)


def _fwd_backward(ctx, grad_row_loss, _grad_stats, _grad_d):
    # d(row_loss[b]) / dx[b, t] = d[b, t]; the other outputs are statistics and saved gradients.
    (d,) = ctx.saved_tensors
    return (grad_row_loss[:, None] * d).to(ctx.x_dtype), *([None] * (ctx.n_inputs - 1))


def _policy_fake(
    logprob, old_logprob, advantages, mask, row_scale, is_weights, clip_low, clip_high, dual_clip
):
    B, T = logprob.shape
    return row_scale.new_empty(B), row_scale.new_empty(B, 3), row_scale.new_empty(B, T)


def _value_fake(values, old_values, returns, mask, row_scale, clip):
    B, T = values.shape
    return row_scale.new_empty(B), row_scale.new_empty(B), row_scale.new_empty(B, T)


def _register_cpp() -> None:
    """The PPO loss ops' autograd formulas and fake kernels, registered when the extension loads."""
    torch.library.register_fake("rlp::ppo_policy_loss_fwd")(_policy_fake)
    torch.library.register_fake("rlp::ppo_value_loss_fwd")(_value_fake)
    torch.library.register_autograd("rlp::ppo_policy_loss_fwd", _fwd_backward, setup_context=_fwd_setup)
    torch.library.register_autograd("rlp::ppo_value_loss_fwd", _fwd_backward, setup_context=_fwd_setup)


if cpp_available():
    _register_cpp()
