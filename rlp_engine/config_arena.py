"""Config sections of the arena's methods (pipeline/arena.py): offline (DPO, IPO, SimPO), grpo (GRPO,
RLOO) and ensemble; config.py's TrainConfig holds them like its own. No torch at import time."""

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


@dataclass
class OfflineConfig:
    """The arena's offline preference methods on D (stages dpo, ipo, simpo): each trains a copy of the
    SFT policy; DPO and IPO against the SFT policy as reference, SimPO reference-free."""

    steps: int = 300
    batch_size: int = 64  # pairs per step
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20  # then cosine decay to 10% (as SFT)
    max_grad_norm: float = 1.0
    # tuned on seeds 100, 101 (gold - SFT): DPO beta 0.1 -> 0.5: +0.12 -> +0.26 on both; SimPO 2 -> 5:
    # +0.14/+0.22 -> +0.24/+0.23; IPO tau 0.1 best of 0.03-0.3 (+0.30/+0.27); lr 3e-4 did worse
    dpo_beta: float = 0.5
    ipo_beta: float = 0.1  # IPO's tau: the target margin of the summed log-ratios is 1 / (2 tau)
    simpo_beta: float = 5.0
    simpo_gamma_beta_ratio: float = 0.5  # SimPO's margin gamma = ratio * beta
    label_smoothing: float = 0.0  # conservative DPO / SimPO; IPO does not use it


@dataclass
class GRPOConfig:
    """The arena's critic-free online methods (stages grpo, rloo; recipes/grpo.py): n samples per
    prompt from the SFT policy against the proxy RM, group-baseline advantages (GRPO: mean and std of
    the group; RLOO: leave-one-out mean), clipped surrogate + kl_coef * KL to the SFT reference in the
    loss. Defaults see as many samples per step (16 x 4) and make as many updates (2 epochs x 2) as
    PPO's 64 prompts."""

    n: int = 4  # group size: samples per prompt
    prompts_per_step: int = 16
    steps: int = 30
    lr: float = 1e-4
    max_grad_norm: float = 1.0
    epochs: int = 2
    mini_batch_size: int = 32  # sequences (prompts_per_step * n rows a step)
    clip: float = 0.2
    # k3 in the loss. Seeds 100/101 gold GRPO 0.884/0.770 at 0.2, 0.873/0.722 at 0.05; RLOO 0.893/0.688,
    # 0.879/0.709 (SFT 0.610/0.553, PPO 0.827/0.667; SEs ~0.02); 0.01, lr 3e-4 no better (seed 100)
    kl_coef: float = 0.2
    kl_kind: str = "k3"  # DeepSeekMath's estimator in the loss (algos/grpo.py says why)
    agg: str = "token-mean"
    norm_by_std: bool = True  # GRPO only; False: Dr.GRPO's s - mean
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    sync_bucket_mb: float = 64.0
