"""Critic-free online RL math: GRPO (Shao et al. 2024, DeepSeekMath) and RLOO (Ahmadian et al. 2024).
Pure functions over tensors; the loop (n samples per prompt, scoring, updates) is
rlp_engine/recipes/grpo.py.

Each prompt gets a group of n sampled responses, one outcome score each. The advantage of response i
is its score against its group's (GRPO: (s_i - mean) / (std + eps), or s_i - mean without the std,
Dr.GRPO; RLOO: s_i - the mean of the other n - 1), broadcast to every response token (ops.
grpo_advantages / ops.rloo_advantages, exact against verl). No critic, no GAE.

The loss is the clipped surrogate plus kl_coef times a per-token KL estimate to the reference, in the
loss (GRPO's form) rather than in the reward (PPO's and the RLOO paper's): the advantage is then a
pure function of the scores, the same for both estimators, so GRPO and RLOO differ only in their
baseline. The default estimator is k3 = exp(ref - lp) - (ref - lp) - 1 (DeepSeekMath's, verl's
low_var_kl): unbiased for KL(pi || ref) on samples of pi, never negative, and its gradient
(1 - exp(ref - lp)) d lp vanishes at pi = ref and stays bounded where pi drifts up.
"""

from __future__ import annotations

import torch

from rlp_engine import ops

ESTIMATORS = ("grpo", "rloo")


def group_index(batch: int, group_size: int) -> torch.Tensor:
    """Group id of each row [B] for prompt-major rows (prompt i's samples at i*n .. i*n+n-1, as
    generate.sample orders them): arange(B) // n."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_index: group_size must be an int >= 1, got {group_size!r}")
    if batch % group_size:
        raise ValueError(f"group_index: {batch} rows are not whole groups of group_size {group_size}")
    return torch.arange(batch) // group_size


def outcome_advantages(
    scores: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    *,
    estimator: str = "grpo",
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-token advantages [B, T] from one score per row [B] of prompt-major groups of `group_size`
    rows; 0 off the mask. estimator "grpo": (s - mean_g) / (std_g + eps) (std unbiased; without
    norm_by_std s - mean_g), "rloo": s - mean of the group's other rows (norm_by_std unused)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"outcome_advantages: estimator must be one of {ESTIMATORS}, got {estimator!r}")
    index = group_index(scores.shape[0], group_size).to(scores.device)
    if estimator == "rloo":
        return ops.rloo_advantages(scores, mask, index)
    return ops.grpo_advantages(scores, mask, index, norm_by_std=norm_by_std, eps=eps)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float,
    kl_coef: float,
    kl_kind: str = "k3",
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate (ops.ppo_policy_loss, clip both sides) + kl_coef * agg(kl_penalty(logprobs,
    ref_logprobs, kl_kind)) over the mask; tensors [B, T]. Gradient flows to `logprobs` only.
    Returns (scalar loss, detached metrics: pg_loss, kl_loss, pg_clipfrac, approx_kl)."""
    if not kl_coef >= 0:
        raise ValueError(f"grpo_loss: kl_coef must be >= 0, got {kl_coef!r}")
    pg_loss, pg_m = ops.ppo_policy_loss(
        logprobs, old_logprobs, advantages, mask, clip_low=clip, clip_high=clip, agg=agg
    )
    kl = ops.kl_penalty(logprobs, ref_logprobs.detach(), kind=kl_kind)
    kl_loss = ops.agg_loss(kl, mask, agg)
    loss = pg_loss + kl_coef * kl_loss
    metrics = {
        "pg_loss": pg_loss.detach(),
        "kl_loss": kl_loss.detach(),
        "pg_clipfrac": pg_m["clipfrac"],
        "approx_kl": pg_m["approx_kl"],
    }
    return loss, metrics
