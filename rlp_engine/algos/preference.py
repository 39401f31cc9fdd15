"""Offline preference optimisation math (DPO, IPO, SimPO): sequence log-probs of a PairData batch
and the per-method loss on them, thin over ops.dpo_loss / ops.simpo_loss. The loop that trains with
them is rlp_engine/recipes/preference.py.

A data.batch.PairData batch holds chosen rows then rejected rows [2n, ...]: `split_pairs` cuts a
per-row tensor into its (chosen [n], rejected [n]) halves.
"""

from __future__ import annotations

import torch

from rlp_engine import ops

METHODS = ("dpo", "ipo", "simpo")


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Log-prob of each response [B] from its token log-probs [B, R] and response mask [B, R] (1 on
    response tokens): the sum over the masked tokens, or (average=True, SimPO's length-normalised
    log-prob) their mean. A row with no response token has no mean: average=True refuses it."""
    if token_logps.dim() != 2 or token_logps.shape != mask.shape:
        raise ValueError(
            f"sequence_logps: token_logps and mask must be [B, R] of one shape, got "
            f"{tuple(token_logps.shape)} and {tuple(mask.shape)}"
        )
    mask = mask.to(token_logps.dtype)
    total = (token_logps * mask).sum(-1)
    if not average:
        return total
    count = mask.sum(-1)
    if bool((count == 0).any()):
        raise ValueError("sequence_logps: mask has a row with no response token (its mean is undefined)")
    return total / count


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) halves of a PairData-ordered tensor [2n, ...]."""
    if x.shape[0] % 2:
        raise ValueError(
            f"split_pairs: expected chosen rows then rejected rows (an even count), got {x.shape[0]}"
        )
    n = x.shape[0] // 2
    return x[:n], x[n:]


def preference_losses(
    method: str,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    beta: float,
    gamma_beta_ratio: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses [n] and implicit rewards (chosen [n], rejected [n]) of `method`:
    - "dpo": ops.dpo_loss, loss_type "sigmoid" (conservative DPO with label_smoothing > 0), on summed
      log-probs; rewards beta * (policy - reference).
    - "ipo": ops.dpo_loss, loss_type "ipo", (d - 1 / (2 beta))^2 with beta IPO's tau, on the log-probs
      given (summed here, as in the IPO paper; TRL averages them per token); label_smoothing must be 0.
    - "simpo": ops.simpo_loss on length-normalised log-probs, no reference (ref_* must be None);
      margin gamma = gamma_beta_ratio * beta; rewards beta * logps.
    Rewards are detached."""
    if method not in METHODS:
        raise ValueError(f"preference_losses: method must be one of {METHODS}, got {method!r}")
    if method == "simpo":
        if ref_chosen_logps is not None or ref_rejected_logps is not None:
            raise ValueError(
                "preference_losses: simpo is reference-free; ref_chosen_logps and ref_rejected_logps "
                "must be None"
            )
        return ops.simpo_loss(chosen_logps, rejected_logps, beta, gamma_beta_ratio, label_smoothing)
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"preference_losses: {method} needs ref_chosen_logps and ref_rejected_logps")
    loss_type = "sigmoid" if method == "dpo" else "ipo"
    return ops.dpo_loss(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type, label_smoothing
    )


def preference_metrics(
    losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Scalars of one batch: mean loss, implicit-reward accuracy (share of pairs with the chosen
    reward strictly above the rejected), mean margin, mean chosen and rejected rewards."""
    margins = chosen_rewards - rejected_rewards
    return {
        "loss": losses.mean(),
        "reward_acc": (margins > 0).float().mean(),
        "margin": margins.mean(),
        "chosen_reward": chosen_rewards.mean(),
        "rejected_reward": rejected_rewards.mean(),
    }
