"""PPO's math (AlpacaFarm's recipe): KL-shaped token rewards, GAE and whitening, the clipped actor
and critic losses, the KL controller. Pure functions over tensors (and, for `critic_values`, the
critic model); the loop that runs rollouts and updates is rlp_engine/recipes/ppo.py."""

from __future__ import annotations

import math

import torch

from rlp_engine import ops
from rlp_engine.data.batch import SeqBatch
from rlp_engine.models.heads import ScalarHeadModel


def critic_values(critic: ScalarHeadModel, batch: SeqBatch) -> torch.Tensor:
    """V(s_t) for each response token t [B, R]: the head on the hidden state just before the token."""
    v = critic.values(batch.input_ids, batch.attention_mask)  # (B, P+R)
    return v[:, batch.prompt_len - 1 : -1]


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """r_t = -beta * kl_t on response tokens, plus the sequence score at the last response token.
    scores [B], kl and mask [B, R] -> [B, R] fp32."""
    rewards = -beta * kl.float() * mask
    last = (mask.sum(-1).long() - 1).clamp_min(0)
    return rewards.scatter_add(1, last[:, None], scores.float()[:, None])


def advantages_and_returns(
    scores: torch.Tensor,
    kl: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    gamma: float,
    lam: float,
    whiten_rewards: bool,
    whiten_advantages: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, R], 0 off the mask, from sequence scores [B], per-token KL to the
    reference and values [B, R]: scores whitened over the batch keeping their mean (AlpacaFarm) when
    whiten_rewards, shaped with -kl_coef * kl, GAE(gamma, lam), advantages whitened on the mask."""
    seq_scores = scores
    if whiten_rewards and scores.numel() > 1:
        seq_scores = ops.masked_whiten(scores[None], torch.ones_like(scores[None]), shift_mean=False)[0]
    rewards = shaped_rewards(seq_scores, kl, mask, kl_coef)
    adv, ret = ops.compute_gae(rewards, values, mask, gamma=gamma, lam=lam)
    if whiten_advantages:
        adv = ops.masked_whiten(adv, mask)
    return adv * mask, ret * mask


def actor_critic_loss(
    logprobs: torch.Tensor,
    entropy: torch.Tensor | None,
    values: torch.Tensor,
    old_logprobs: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float,
    value_clip: float,
    vf_coef: float,
    entropy_coef: float,
    agg: str,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Clipped policy loss + vf_coef * clipped value loss (- entropy_coef * entropy when `entropy` is
    given), all [B, R] on the mask, aggregated by `agg`. Returns (scalar loss, detached metrics)."""
    pg_loss, pg_m = ops.ppo_policy_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_low=clip,
        clip_high=clip,
        agg=agg,
        is_weights=is_weights,
    )
    vf_loss, vf_m = ops.ppo_value_loss(values, old_values, returns, mask, clip=value_clip, agg=agg)
    loss = pg_loss + vf_coef * vf_loss
    metrics = {
        "pg_loss": pg_loss.detach(),
        "vf_loss": vf_loss.detach(),
        "pg_clipfrac": pg_m["clipfrac"],
        "approx_kl": pg_m["approx_kl"],
        "vf_clipfrac": vf_m["clipfrac"],
    }
    if entropy is not None:
        ent = ops.agg_loss(entropy, mask, agg)
        loss = loss - entropy_coef * ent
        metrics["entropy"] = ent.detach()
    return loss, metrics


def adaptive_kl_coef(coef: float, current_kl: float, target: float, horizon: int, n_steps: int) -> float:
    """Ziegler et al. 2019's proportional KL controller (TRL's and verl's AdaptiveKLController.update):
    e = clip(current_kl / target - 1, -0.2, 0.2), returns coef * (1 + e * n_steps / horizon).
    current_kl: the rollout's mean summed KL per sequence (nats); n_steps: the samples it held. A NaN
    KL leaves coef as it is (TRL's would turn NaN and stay NaN for the rest of the run)."""
    if not 0 < target < math.inf:
        raise ValueError(f"adaptive_kl_coef: target must be a finite number > 0, got {target!r}")
    if horizon < 1:
        raise ValueError(f"adaptive_kl_coef: horizon must be >= 1, got {horizon!r}")
    if math.isnan(current_kl):
        return coef
    error = min(max(current_kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)


def next_kl_coef(
    coef: float, current_kl: float, n_steps: int, *, target: float | None, horizon: int
) -> float:
    """The KL coefficient for the next rollout: `coef` itself when target is None (fixed, as
    AlpacaFarm), else adaptive_kl_coef towards `target` over `horizon` samples."""
    if target is None:
        return coef
    return adaptive_kl_coef(coef, current_kl, target, horizon, n_steps)
