"""Drop-in for verl's `verl.trainer.ppo.core_algos` and `verl.utils.torch_functional` loss math.

Same function names, parameter names, defaults, return structures and exceptions as verl (checked
against verl's source, 0.8-0.9 line), computed by rlp_engine's fused ops. Usage in a verl tree:
`from rlp_engine.compat import verl as core_algos` where `core_algos.compute_policy_loss_vanilla`
etc. were used. Inputs are never modified in place. Where verl returns Python floats in a metrics
dict (it calls .item()), so does this module: the drop-in keeps verl's return structure.
"""

from __future__ import annotations

import torch

from rlp_engine import ops
from rlp_engine.ops import reduce

_VERL_KL = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")


def _cfg(config, name, default=None):
    # verl passes an ActorConfig dataclass or an omegaconf DictConfig: both answer getattr;
    # plain dicts are accepted too.
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


# ---- torch_functional ----------------------------------------------------------------------------


def masked_sum(values, mask, axis=None):
    return reduce.masked_sum(values, mask, dim=axis)


def masked_mean(values, mask, axis=None):
    return reduce.masked_mean(values, mask, dim=axis)


def masked_var(values, mask, unbiased=True):
    """verl's masked_var, with its exceptions for masks of fewer than two elements."""
    if unbiased:
        _check_two_tokens(mask)
    return reduce.masked_var(values, mask, unbiased=unbiased)


def _check_two_tokens(mask) -> None:
    mask_sum = mask.sum()
    if mask_sum == 0:
        raise ValueError("At least one element in the mask has to be 1.")
    if mask_sum == 1:
        raise ValueError("The sum of the mask is one, which can cause a division by zero.")


def masked_whiten(values, mask, shift_mean=True):
    _check_two_tokens(mask)
    return ops.masked_whiten(values, mask, shift_mean=shift_mean)


def clip_by_value(x, tensor_min, tensor_max):
    return torch.max(torch.min(x, tensor_max), tensor_min)


def logprobs_from_logits(logits, labels, inplace_backward=True):
    """Log-probs of `labels` under `logits` [..., V] (fused kernel; `inplace_backward` is accepted
    for signature compatibility: the backward never holds a second [N, V] buffer anyway)."""
    return ops.logprobs_from_logits(logits, labels)


def entropy_from_logits(logits):
    return ops.entropy_from_logits(logits)


# ---- core_algos ----------------------------------------------------------------------------------


def agg_loss(
    loss_mat,
    loss_mask,
    loss_agg_mode,
    dp_size=1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
):
    """verl's agg_loss. Like verl, the default normalisers are this batch's token count and
    non-empty sequence count, unclamped (an all-empty batch gives NaN, as in verl)."""
    if loss_agg_mode not in reduce.AGG_MODES:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    batch_num_tokens, global_batch_size = _verl_normalisers(
        loss_mask, loss_agg_mode, batch_num_tokens, global_batch_size
    )
    return reduce.agg_loss(
        loss_mat,
        loss_mask,
        loss_agg_mode,
        dp_size=dp_size,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
        loss_scale_factor=loss_scale_factor,
    )


def _verl_normalisers(mask, mode, batch_num_tokens, global_batch_size):
    if mode == "token-mean" and batch_num_tokens is None:
        batch_num_tokens = mask.sum()
    if mode.startswith("seq-mean-token-") and mode != "seq-mean-token-sum-norm" and global_batch_size is None:
        global_batch_size = (mask.sum(dim=-1) > 0).float().sum()
    return batch_num_tokens, global_batch_size


def kl_penalty_forward(logprob, ref_logprob, kl_penalty):
    if kl_penalty == "full":
        raise NotImplementedError
    if kl_penalty not in _VERL_KL:
        raise NotImplementedError
    return ops.kl_penalty(logprob, ref_logprob, kind=kl_penalty)


def kl_penalty(logprob, ref_logprob, kl_penalty):
    """verl's kl_penalty: the estimator's value; with a '+' suffix, k2's gradient (straight-through)."""
    base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    if base == "full" or base not in _VERL_KL:
        raise NotImplementedError
    return ops.kl_penalty(logprob, ref_logprob, kind=kl_penalty)


def compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
    """verl's GAE: the carried-mask recurrence, then advantages whitened over the mask.
    Returns (advantages, returns), both [bs, response_length]; no gradient (verl runs it under no_grad)."""
    with torch.no_grad():
        advantages, returns = ops.compute_gae(
            token_level_rewards, values, response_mask, gamma=float(gamma), lam=float(lam), mask_mode="carry"
        )
        advantages = masked_whiten(advantages, response_mask)
    return advantages, returns


def compute_policy_loss_vanilla(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="token-mean",
    config=None,
    rollout_is_weights=None,
):
    """verl's vanilla PPO clipped objective with dual clip. Reads config.clip_ratio,
    clip_ratio_low, clip_ratio_high, clip_ratio_c (default 3.0) and global_batch_info.
    Returns (pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"} as floats)."""
    assert config is not None
    clip_ratio = _cfg(config, "clip_ratio")
    clip_low = _cfg(config, "clip_ratio_low")
    clip_high = _cfg(config, "clip_ratio_high")
    clip_low = clip_ratio if clip_low is None else clip_low
    clip_high = clip_ratio if clip_high is None else clip_high
    clip_ratio_c = _cfg(config, "clip_ratio_c", 3.0)
    if clip_ratio_c is None:
        clip_ratio_c = 3.0
    assert clip_ratio_c > 1.0, (
        "The lower bound of the clip_ratio_c for dual-clip PPO should be greater than 1.0,"
        + f" but get the value: {clip_ratio_c}."
    )
    info = dict(_cfg(config, "global_batch_info", None) or {})
    info["batch_num_tokens"], info["global_batch_size"] = _verl_normalisers(
        response_mask, loss_agg_mode, info.get("batch_num_tokens"), info.get("global_batch_size")
    )
    pg_loss, m = ops.ppo_policy_loss(
        log_prob,
        old_log_prob,
        advantages,
        response_mask,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=clip_ratio_c,
        agg=loss_agg_mode,
        is_weights=rollout_is_weights,
        **info,
    )
    pg_metrics = {
        "actor/pg_clipfrac": m["clipfrac"].detach().item(),
        "actor/ppo_kl": m["approx_kl"].detach().item(),
        "actor/pg_clipfrac_lower": m["clipfrac_lower"].detach().item(),
    }
    return pg_loss, pg_metrics


def compute_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode="token-mean"):
    """verl's clipped value loss: (0.5 * agg(max(unclipped, clipped)), vf_clipfrac tensor)."""
    batch_num_tokens, global_batch_size = _verl_normalisers(response_mask, loss_agg_mode, None, None)
    vf_loss, m = ops.ppo_value_loss(
        vpreds,
        values,
        returns,
        response_mask,
        clip=cliprange_value,
        agg=loss_agg_mode,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
    )
    return vf_loss, m["clipfrac"]


def compute_rewards(token_level_scores, old_log_prob, ref_log_prob, kl_ratio):
    kl = old_log_prob - ref_log_prob
    return token_level_scores - kl * kl_ratio
