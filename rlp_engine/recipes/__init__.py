"""Explicit training loops over rlp_engine.algos' math and an engine.layout TrainHandle, all on one
scaffold (scaffold.py: resume, guard, logging, progress, checkpoints): SFT, reward modelling, PPO,
RLP's sampling of P and refined reward models, and the arena's DPO/IPO/SimPO (preference.py) and
GRPO/RLOO (grpo.py)."""

from rlp_engine.recipes.grpo import grpo
from rlp_engine.recipes.ppo import PPOState, init_ppo, make_experience, ppo, ppo_step
from rlp_engine.recipes.preference import preference_optimize
from rlp_engine.recipes.reward import AuxLoss, train_reward_model
from rlp_engine.recipes.rlp import rlp_spg, rlp_uml, sample_policy
from rlp_engine.recipes.scaffold import Optim, TrainContext, run_loop
from rlp_engine.recipes.sft import sft

__all__ = [
    "AuxLoss",
    "Optim",
    "PPOState",
    "TrainContext",
    "grpo",
    "preference_optimize",
    "init_ppo",
    "make_experience",
    "ppo",
    "ppo_step",
    "rlp_spg",
    "rlp_uml",
    "run_loop",
    "sample_policy",
    "sft",
    "train_reward_model",
]
