"""Drop-in for verl 0.9.1's `verl.trainer.ppo.core_algos` and `verl.utils.torch_functional` loss math.

Same function names, parameter names, defaults, return structures, output dtypes and exceptions as
verl 0.9.1 (tests/test_compat_verl.py compares them with the installed verl), computed by rlp_engine's
fused ops. Usage in a verl tree: `from rlp_engine.compat import verl as core_algos` where
`core_algos.compute_policy_loss_vanilla` etc. were used. Inputs are never modified in place.

Dtypes: every function returns the dtype verl's eager expression gives (bf16 log-probs for bf16
logits; for a loss, torch's promotion of the loss inputs with the mask, and fp32 at least in the
seq-mean modes). fp16/bf16 inputs are computed in fp32 and cast back, which is closer to the fp64
value than verl's own low-precision arithmetic. The fused log-prob, entropy and GAE kernels compute
fp64 inputs in fp32 too (results are cast back to fp64); the losses and masked statistics keep fp64.

Deliberate differences: a NaN or inf at a masked-out position never reaches a loss (verl's seq-mean
modes multiply by the mask, so there it gives NaN), and a bool `response_mask` is accepted by the GAE
(verl's `1 - mask` raises on bool). Where verl returns Python floats in a metrics dict (it calls
.item()), so does this module: the drop-in keeps verl's return structure.
"""

from __future__ import annotations

import torch

from rlp_engine import ops
from rlp_engine.compat._common import NO_IGNORE, check_gather_index, promote
from rlp_engine.ops import reduce

# verl 0.9.1's kl_penalty names: its own list, not ops.KL_KINDS, because the drop-in refuses what
# verl refuses (NotImplementedError, e.g. k1_nonneg, which verl lacks); a subset of ops.KL_KINDS.
_VERL_KL = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")

# verl's loss_agg_mode names (verl's list, today the same five as ops.AGG_MODES) -> (ops agg mode,
# normalisers) for which the fused op returns the un-normalised numerator:
# the masked token sum, the sum of row sums, or the sum of row means. verl's normalisation is then
# applied to it exactly as verl writes it (`_normalise`), which keeps its NaN for an empty batch.
_NUMERATOR = {
    "token-mean": ("token-mean", {"batch_num_tokens": 1}),
    "token-sum": ("token-mean", {"batch_num_tokens": 1}),
    "seq-mean-token-sum": ("seq-mean-token-sum", {"global_batch_size": 1}),
    "seq-mean-token-sum-norm": ("seq-mean-token-sum", {"global_batch_size": 1}),
    "seq-mean-token-mean": ("seq-mean-token-mean", {"global_batch_size": 1}),
}


def _cfg(config, name, default=None):
    # verl passes an ActorConfig dataclass or an omegaconf DictConfig: both answer getattr;
    # plain dicts are accepted too.
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


# ---- torch_functional ----------------------------------------------------------------------------


def masked_sum(values, mask, axis=None):
    """sum(values * mask) over `axis`; values outside the mask (even NaN) never count. The dtype is
    promote(values, mask), as in verl."""
    return reduce.masked_sum(values.to(promote(values, mask)), mask, dim=axis)


def masked_mean(values, mask, axis=None):
    """masked_sum / (mask.sum(axis) + 1e-8): 0 for an empty mask, as in verl."""
    return masked_sum(values, mask, axis) / (mask.sum(axis=axis) + 1e-8)


def masked_var(values, mask, unbiased=True):
    """verl's masked_var, with its exceptions for masks of fewer than two elements (a host sync)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        mask_sum = _check_two_tokens(mask)
        variance = variance * (mask_sum / (mask_sum - 1))
    return variance


def _check_two_tokens(mask):
    mask_sum = mask.sum()
    if mask_sum == 0:
        raise ValueError("At least one element in the mask has to be 1.")
    if mask_sum == 1:
        raise ValueError("The sum of the mask is one, which can cause a division by zero.")
    return mask_sum


def masked_whiten(values, mask, shift_mean=True):
    """(values - mean) * rsqrt(var + 1e-8) over the mask (unbiased variance); mean added back when
    shift_mean=False. ValueError for masks of fewer than two elements, as in verl."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def clip_by_value(x, tensor_min, tensor_max):
    return torch.max(torch.min(x, tensor_max), tensor_min)


def logprobs_from_logits(logits, labels, inplace_backward=True):
    """Log-probs of `labels` [...] under `logits` [..., V], in the logits' dtype (fused kernel, fp32
    inside). `inplace_backward` is accepted for signature compatibility: the backward never holds a
    second [N, V] buffer anyway. Labels outside [0, V) raise RuntimeError on CPU, as torch.gather."""
    check_gather_index(logits, labels.unsqueeze(-1))
    return ops.logprobs_from_logits(logits, labels, ignore_index=NO_IGNORE).to(logits.dtype)


def entropy_from_logits(logits):
    """Entropy of softmax(logits) [..., V] -> [...], in the logits' dtype (fused kernel, fp32 inside)."""
    return ops.entropy_from_logits(logits).to(logits.dtype)


# ---- core_algos ----------------------------------------------------------------------------------


def _check_agg(loss_agg_mode, dp_size, batch_num_tokens, global_batch_size) -> None:
    if loss_agg_mode not in _NUMERATOR:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    if dp_size > 1 and loss_agg_mode == "token-mean" and batch_num_tokens is None:
        raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
    if dp_size > 1 and loss_agg_mode.startswith("seq-mean") and global_batch_size is None:
        raise ValueError("global_batch_size is required when dp_size > 1")


def _numerator_dtype(loss_dtype, mask, mode) -> torch.dtype:
    """The dtype of verl's aggregate before normalisation: promote(loss, mask); the seq-mean modes
    then divide by the row count (fp32 for an integer mask) and multiply by a fp32 row mask."""
    dt = torch.promote_types(loss_dtype, mask.dtype)
    if mode == "seq-mean-token-mean":
        count = mask.dtype if mask.dtype.is_floating_point else torch.get_default_dtype()
        dt = torch.promote_types(dt, count)
    if mode.startswith("seq-mean"):
        dt = torch.promote_types(dt, torch.float32)
    return dt


def _normalise(
    num, mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None
):
    """verl 0.9.1's agg_loss normalisation of the numerator `num`, written as verl writes it (so the
    dtype, and NaN for an empty batch, follow from the same expressions)."""
    if mode == "token-mean":
        if batch_num_tokens is None:
            batch_num_tokens = mask.sum()
        return num / batch_num_tokens * dp_size
    if mode == "token-sum":
        return num * dp_size
    if global_batch_size is None:
        global_batch_size = (mask.sum(dim=-1) > 0).float().sum()
    loss = num / global_batch_size * dp_size
    if mode == "seq-mean-token-sum-norm":
        loss /= mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
    return loss


def agg_loss(
    loss_mat,
    loss_mask,
    loss_agg_mode,
    dp_size=1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
):
    """verl 0.9.1's agg_loss over [bs, T]: token-mean sum / batch_num_tokens * dp_size; token-sum
    sum * dp_size; seq-mean-* (sum of row sums, or of row means) / global_batch_size * dp_size, and
    seq-mean-token-sum-norm further / loss_scale_factor (default T). Default normalisers are this
    batch's token and non-empty-row counts, unclamped (an empty batch gives NaN, as in verl); with
    dp_size > 1 they must be given (ValueError otherwise). Sums in fp32 at least."""
    _check_agg(loss_agg_mode, dp_size, batch_num_tokens, global_batch_size)
    dt = _numerator_dtype(loss_mat.dtype, loss_mask, loss_agg_mode)
    x = loss_mat.to(torch.promote_types(dt, torch.float32))
    if loss_agg_mode in ("token-mean", "token-sum"):
        num = reduce.masked_sum(x, loss_mask)
    else:
        rows = reduce.masked_sum(x, loss_mask, dim=-1)  # [bs]
        count = loss_mask.to(x.dtype).sum(dim=-1)
        if loss_agg_mode == "seq-mean-token-mean":
            rows = rows / (count + 1e-8)
        num = reduce.masked_sum(rows, count > 0)
    return _normalise(
        num.to(dt), loss_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor
    )


def kl_penalty_forward(logprob, ref_logprob, kl_penalty):
    """verl's per-token KL estimate (kl/k1, abs, mse/k2, low_var_kl/k3) in promote(logprob, ref_logprob)."""
    if kl_penalty not in _VERL_KL:
        raise NotImplementedError
    return ops.kl_penalty(logprob, ref_logprob, kind=kl_penalty).to(promote(logprob, ref_logprob))


def kl_penalty(logprob, ref_logprob, kl_penalty):
    """verl's kl_penalty: the estimator's value; with a '+' suffix, k2's gradient (straight-through).
    Returns promote(logprob, ref_logprob) (the fused op computes fp16/bf16 in fp32)."""
    base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    if base not in _VERL_KL:
        raise NotImplementedError
    return ops.kl_penalty(logprob, ref_logprob, kind=kl_penalty).to(promote(logprob, ref_logprob))


def compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
    """verl's GAE: the carried-mask recurrence, then advantages whitened over the mask. Returns
    (advantages, returns) [bs, response_length] in promote(rewards, values, mask); no gradient (verl
    runs it under no_grad). The fused GAE computes in fp32; the whitening in fp32 at least."""
    dt = promote(token_level_rewards, values, response_mask)
    with torch.no_grad():
        advantages, returns = ops.compute_gae(
            token_level_rewards, values, response_mask, gamma=float(gamma), lam=float(lam), mask_mode="carry"
        )
        advantages = masked_whiten(advantages.to(torch.promote_types(dt, torch.float32)), response_mask)
    return advantages.to(dt), returns.to(dt)


def compute_policy_loss_vanilla(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="token-mean",
    config=None,
    rollout_is_weights=None,
):
    """verl's vanilla PPO clipped objective with dual clip, one fused pass. Reads config.clip_ratio,
    clip_ratio_low, clip_ratio_high, clip_ratio_c (default 3.0) and global_batch_info (dp_size,
    batch_num_tokens, global_batch_size, loss_scale_factor: see agg_loss). Returns (pg_loss, {
    "actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"} as floats); pg_loss has verl's
    dtype (promote of the inputs with the mask, fp32 at least in the seq-mean modes)."""
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
    _check_agg(
        loss_agg_mode, info.get("dp_size", 1), info.get("batch_num_tokens"), info.get("global_batch_size")
    )
    mode, unit = _NUMERATOR[loss_agg_mode]
    num, m = ops.ppo_policy_loss(
        log_prob,
        old_log_prob,
        advantages,
        response_mask,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=clip_ratio_c,
        agg=mode,
        is_weights=rollout_is_weights,
        **unit,
    )
    inputs = (log_prob, old_log_prob, advantages) + (
        () if rollout_is_weights is None else (rollout_is_weights,)
    )
    dt = _numerator_dtype(promote(*inputs), response_mask, loss_agg_mode)
    pg_loss = _normalise(num.to(dt), response_mask, loss_agg_mode, **info)
    pg_metrics = {
        "actor/pg_clipfrac": m["clipfrac"].detach().item(),
        "actor/ppo_kl": m["approx_kl"].detach().item(),
        "actor/pg_clipfrac_lower": m["clipfrac_lower"].detach().item(),
    }
    return pg_loss, pg_metrics


def compute_value_loss(
    vpreds,
    returns,
    values,
    response_mask,
    cliprange_value,
    loss_agg_mode="token-mean",
    dp_size=1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
):
    """verl's clipped value loss 0.5 * agg_loss(max((v - R)^2, (clip(v, old +- c) - R)^2)), with the
    same normalisers as agg_loss. Returns (vf_loss, vf_clipfrac tensor), in verl's dtypes."""
    _check_agg(loss_agg_mode, dp_size, batch_num_tokens, global_batch_size)
    mode, unit = _NUMERATOR[loss_agg_mode]
    num, m = ops.ppo_value_loss(
        vpreds, values, returns, response_mask, clip=cliprange_value, agg=mode, **unit
    )  # num already carries the 0.5
    dt = _numerator_dtype(promote(vpreds, returns, values), response_mask, loss_agg_mode)
    vf_loss = _normalise(
        num.to(dt),
        response_mask,
        loss_agg_mode,
        dp_size,
        batch_num_tokens,
        global_batch_size,
        loss_scale_factor,
    )
    # verl: masked_mean(fp32 indicator, mask) -> fp32, or the mask's dtype when that is wider.
    mask_dt = response_mask.dtype if response_mask.dtype.is_floating_point else torch.float32
    return vf_loss, m["clipfrac"].to(torch.promote_types(torch.float32, mask_dt))


def compute_rewards(token_level_scores, old_log_prob, ref_log_prob, kl_ratio):
    kl = old_log_prob - ref_log_prob
    return token_level_scores - kl * kl_ratio


# ---- advantage estimators (core_algos) -----------------------------------------------------------


def _outcome(token_level_rewards, response_mask, index, tensor_index_raises=True):
    """verl's inputs for the group estimators: scores = rewards summed over every position (fp32 at
    least), and the group keys index[0..bs) exactly as verl reads them. A torch.Tensor index gives
    verl 0-d tensors as dict keys, hashed by identity, so its second lookup misses: GRPO and
    REINFORCE++-baseline raise KeyError, RLOO sees no group of more than one row (raw scores)."""
    bsz = token_level_rewards.shape[0]
    if isinstance(index, torch.Tensor):
        if tensor_index_raises and bsz > 0:
            raise KeyError(index[0])
        keys = list(range(bsz))
    else:
        keys = [index[i] for i in range(bsz)]
    r = token_level_rewards.detach()
    scores = r.sum(dim=-1, dtype=torch.promote_types(r.dtype, torch.float32))
    return scores, keys, promote(token_level_rewards, response_mask)


def compute_grpo_outcome_advantage(
    token_level_rewards,
    response_mask,
    index,
    epsilon=1e-6,
    norm_adv_by_std_in_grpo=True,
    config=None,
):
    """verl's GRPO: (s - group mean) / (group std + epsilon) on the response tokens (no division when
    norm_adv_by_std_in_grpo=False); a one-sequence group has mean 0 and std 1. Returns (advantages,
    advantages), the same tensor twice, [bs, T] in promote(rewards, mask), without grad."""
    scores, keys, dt = _outcome(token_level_rewards, response_mask, index)
    adv = ops.grpo_advantages(
        scores, response_mask, keys, norm_by_std=bool(norm_adv_by_std_in_grpo), eps=epsilon
    ).to(dt)
    return adv, adv


def compute_rloo_outcome_advantage(
    token_level_rewards, response_mask, index, epsilon=1e-6, config=None, **kwargs
):
    """verl's RLOO: n/(n-1) * (s - group mean) on the response tokens, a one-sequence group's raw
    score. Returns (advantages, advantages), [bs, T] in promote(rewards, mask). `epsilon` unused."""
    scores, keys, dt = _outcome(token_level_rewards, response_mask, index, tensor_index_raises=False)
    adv = ops.rloo_advantages(scores, response_mask, keys).to(dt)
    return adv, adv


def compute_reinforce_plus_plus_baseline_outcome_advantage(
    token_level_rewards, response_mask, index, epsilon=1e-6, config=None, **kwargs
):
    """verl's REINFORCE++-baseline: s - group mean on every response token, whitened over the
    batch's response tokens, times the mask. ValueError (verl's messages) for fewer than two
    response tokens. Returns (advantages, advantages) in promote(rewards, mask). The centred scores
    are GRPO's without the std; the whitening is verl's masked_whiten expression for expression."""
    scores, keys, dt = _outcome(token_level_rewards, response_mask, index)
    with torch.no_grad():
        centred = ops.grpo_advantages(scores, response_mask, keys, norm_by_std=False).to(dt)
        adv = masked_whiten(centred, response_mask) * response_mask
    return adv, adv


def compute_reinforce_plus_plus_outcome_advantage(token_level_rewards, response_mask, config=None, **kwargs):
    """verl's REINFORCE++: discounted returns with gamma = config.gamma, carried across mask holes
    (0 there), whitened over the mask (verl's masked_whiten) and times the mask. Returns (advantages
    in promote(rewards, mask), returns in the rewards' dtype). The returns are GAE's carried
    recurrence with V = 0, lam = 1, so the GAE kernels compute them (in fp32, like
    compute_gae_advantage_return); gamma must lie in [0, 1] (verl takes any float)."""
    assert config is not None
    gamma = _cfg(config, "gamma")
    r = token_level_rewards.detach()
    with torch.no_grad():
        g, _ = ops.compute_gae(r, torch.zeros_like(r), response_mask, gamma=gamma, lam=1.0, mask_mode="carry")
        returns = (g * response_mask).to(r.dtype)
        adv = masked_whiten(returns, response_mask) * response_mask
    return adv, returns


def compute_remax_outcome_advantage(
    token_level_rewards, reward_baselines, response_mask, config=None, **kwargs
):
    """verl's ReMax: returns = reverse cumsum of rewards * mask, advantages = returns - baseline *
    mask. Returns (advantages in promote(rewards, baselines, mask), returns in promote(rewards,
    mask)), without grad."""
    adv, returns = ops.remax_advantages(token_level_rewards, reward_baselines, response_mask)
    dt = promote(token_level_rewards, response_mask)
    return adv.to(torch.promote_types(dt, reward_baselines.dtype)), returns.to(dt)
