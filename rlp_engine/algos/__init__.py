"""RLHF stages as plain functions over models and data (no trainer classes): SFT, Bradley-Terry
reward modelling, PPO, and RLP's policy sampling, RLP-UML and RLP-SPG."""

from rlp_engine.algos.ppo import PPOState, init_ppo, make_experience, ppo, ppo_step, shaped_rewards
from rlp_engine.algos.reward import bt_loss, preference_accuracy, score_texts, train_reward_model
from rlp_engine.algos.rlp import (
    EQUIVALENCES,
    PolicySamples,
    cluster,
    rlp_spg,
    rlp_uml,
    sample_policy,
    spg_pair,
    synthetic_preferences,
)
from rlp_engine.algos.sft import sft, sft_loss

__all__ = [
    "EQUIVALENCES",
    "PPOState",
    "PolicySamples",
    "bt_loss",
    "cluster",
    "init_ppo",
    "make_experience",
    "ppo",
    "ppo_step",
    "preference_accuracy",
    "rlp_spg",
    "rlp_uml",
    "sample_policy",
    "score_texts",
    "sft",
    "sft_loss",
    "shaped_rewards",
    "spg_pair",
    "synthetic_preferences",
    "train_reward_model",
]
