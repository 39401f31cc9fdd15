"""Reward-model ensembles against over-optimisation (Coste et al. 2023, "Reward Model Ensembles Help
Mitigate Overoptimization"): K reward models' scores of the same responses combined into one reward.

Objectives over member scores R_1..R_K of one response (`ensemble_objective`):
- "mean": (1/K) sum_i R_i;
- "wco" (worst-case optimisation): min_i R_i;
- "uwo" (uncertainty-weighted optimisation): mean - lambda * Var, Var the intra-ensemble variance
  (1/K) sum_i (R_i - mean)^2: the population variance, as Coste et al. write it. The members are the
  whole ensemble, not a sample from a larger one whose variance we estimate, and K is small (3-5),
  where the unbiased 1/(K-1) would weigh the penalty by 1.5x (K = 3) for no statistical reason.

Bradley-Terry fixes a reward model only up to an additive constant, so member i's raw scores carry
an arbitrary offset: a min or a variance across members would compare offsets, not opinions. Each
member is therefore standardised first, (R_i - shift_i) / scale_i, with shift_i and scale_i its
mean and std over reference responses (the pipeline uses D's: SFT samples, as Gao et al. normalise
the proxy on the initial policy's outputs): `standardisation`.
"""

from __future__ import annotations

import torch

OBJECTIVES = ("mean", "wco", "uwo")


def ensemble_objective(scores: torch.Tensor, objective: str, uwo_lambda: float = 0.0) -> torch.Tensor:
    """scores [K, B] (member k's score of response b) -> [B] under `objective` (module docstring).
    uwo_lambda: the variance weight of "uwo" (ignored by the others), finite and >= 0."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: {objective!r} is not one of {OBJECTIVES}")
    if scores.dim() != 2 or scores.shape[0] < 1:
        raise ValueError(f"scores: expected [K, B] with K >= 1 members, got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores: expected a floating-point tensor, got {scores.dtype}")
    lam = float(uwo_lambda)
    if not 0.0 <= lam < float("inf"):
        raise ValueError(f"uwo_lambda: must be finite and >= 0, got {uwo_lambda!r}")
    if objective == "wco":
        return scores.min(dim=0).values
    mean = scores.mean(dim=0)
    if objective == "mean":
        return mean
    # population variance over the K members (1/K): Coste et al.'s intra-ensemble variance
    return mean - lam * (scores - mean).square().mean(dim=0)


def standardisation(scores: torch.Tensor, min_scale: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift [K], scale [K]) of reference scores [K, N]: each member's mean and population std over
    the N reference responses (std floored at `min_scale`: a constant member stays finite)."""
    if scores.dim() != 2 or scores.shape[1] < 1:
        raise ValueError(f"scores: expected [K, N] with N >= 1 responses, got shape {tuple(scores.shape)}")
    shift = scores.mean(dim=1)
    scale = scores.std(dim=1, correction=0).clamp_min(min_scale)
    return shift, scale


class EnsembleScorer(torch.nn.Module):
    """K reward models as one: `.score(input_ids, attention_mask)` -> [B], the objective over the
    members' standardised scores (what evaluation's proxy reward and PPO's reward read). The members
    are shared, not copied: several scorers (mean, wco, uwo) over one ensemble hold one set of weights."""

    def __init__(self, members, shift, scale, objective: str = "mean", uwo_lambda: float = 0.0):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective: {objective!r} is not one of {OBJECTIVES}")
        self.members = torch.nn.ModuleList(members)
        k = len(self.members)
        shift = torch.as_tensor(shift, dtype=torch.float32)
        scale = torch.as_tensor(scale, dtype=torch.float32)
        if shift.shape != (k,) or scale.shape != (k,):
            got = f"{tuple(shift.shape)}, {tuple(scale.shape)}"
            raise ValueError(f"shift, scale: expected [{k}] each, got {got}")
        if not bool((scale > 0).all()):
            raise ValueError("scale: every member's scale must be > 0")
        self.register_buffer("shift", shift)
        self.register_buffer("scale", scale)
        self.objective, self.uwo_lambda = objective, float(uwo_lambda)

    def member_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[K, B] standardised scores of every member."""
        raw = torch.stack([m.score(input_ids, attention_mask).float() for m in self.members])
        return (raw - self.shift[:, None]) / self.scale[:, None]

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        scores = self.member_scores(input_ids, attention_mask)
        return ensemble_objective(scores, self.objective, self.uwo_lambda)
