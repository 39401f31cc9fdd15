"""Config sections of the arena's methods (pipeline/arena.py), beside config.py, which is at the
500-line limit; TrainConfig there holds them like its own. No torch at import time."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EnsembleConfig:
    """Reward-model ensembles against over-optimisation (Coste et al. 2023; stages ens_mean, ens_wco,
    ens_uwo, rlp_ens; pipeline/ensemble.py): k reward models trained like rm (cfg.rm's steps, lr,
    batch size) from the SFT policy, member i seeded run.seed + seed_offset + i (its head's init and
    its batch order) and, with bootstrap, trained on its own resample of D with replacement; PPO
    (cfg.ppo) against their mean, min (WCO) or mean - uwo_lambda * population variance (UWO)."""

    k: int = 4  # Coste et al.: the gains level off at 4-5 members; each member costs one rm stage
    bootstrap: bool = False  # Coste et al. vary the seed only
    # tuning seed 100, default size, ppo_ens_uwo's gold (+- SE) vs PPO's 0.827: lambda 0.1 0.871 +- 0.013,
    # 0.5 0.867 +- 0.012 (a tie), 2.0 0.824 +- 0.014 (the penalty outweighs the reward); mean objective
    # 0.848, WCO 0.837. Members' intra-ensemble variance on PPO's samples ~0.3 (standardised units)
    uwo_lambda: float = 0.5
    seed_offset: int = 1000  # keeps member seeds away from run.seed, which the rm stage uses
    # standardise each member to mean 0, std 1 over D's responses before combining: Bradley-Terry
    # fixes a reward model only up to an offset, which a min or a variance would otherwise compare
    normalize: bool = True
