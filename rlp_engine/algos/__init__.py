"""RLHF math as plain functions over tensors and models (no loops, no layouts, no configs): the SFT
loss, Bradley-Terry, PPO's shaped rewards, advantages and clipped losses, RLP's synthetic
preferences and information-bottleneck diagnostics, and the arena's: DPO/IPO/SimPO on sequence
log-probs, GRPO/RLOO group advantages and loss, reward-model ensemble objectives. The loops are
rlp_engine/recipes."""

from rlp_engine.algos.ensemble import EnsembleScorer, ensemble_objective
from rlp_engine.algos.grpo import grpo_loss, outcome_advantages
from rlp_engine.algos.ppo import (
    actor_critic_loss,
    adaptive_kl_coef,
    advantages_and_returns,
    critic_values,
    next_kl_coef,
    shaped_rewards,
)
from rlp_engine.algos.preference import preference_losses, sequence_logps
from rlp_engine.algos.reward import bt_loss, pair_rewards, preference_accuracy, score_texts
from rlp_engine.algos.rlp import EQUIVALENCES, PolicySamples, cluster, spg_pair, synthetic_preferences
from rlp_engine.algos.sft import sft_loss, warmup_cosine

__all__ = [
    "EQUIVALENCES",
    "EnsembleScorer",
    "ensemble_objective",
    "grpo_loss",
    "outcome_advantages",
    "preference_losses",
    "sequence_logps",
    "PolicySamples",
    "actor_critic_loss",
    "adaptive_kl_coef",
    "advantages_and_returns",
    "bt_loss",
    "cluster",
    "critic_values",
    "next_kl_coef",
    "pair_rewards",
    "preference_accuracy",
    "score_texts",
    "sft_loss",
    "shaped_rewards",
    "spg_pair",
    "synthetic_preferences",
    "warmup_cosine",
]
