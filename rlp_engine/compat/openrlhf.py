"""Drop-in for OpenRLHF's `openrlhf.models.utils` helpers and its GAE
(`get_advantages_and_returns`), backed by rlp_engine's fused ops."""

from __future__ import annotations

import torch

from rlp_engine import ops

_ESTIMATORS = ("k1", "k2", "k3")


def compute_approx_kl(log_probs, log_probs_base, kl_estimator: str = "k1"):
    """OpenRLHF's per-token KL estimate (k1, k2 or k3), in fp32, clamped to [-10, 10]."""
    if kl_estimator not in _ESTIMATORS:
        raise ValueError(f"Unknown kl_estimator: {kl_estimator}")
    kl = ops.kl_penalty(log_probs.float(), log_probs_base.float(), kind=kl_estimator)
    return kl.clamp(min=-10, max=10)


def log_probs_from_logits(logits, labels, temperature: float = 1.0):
    """Log-probs of labels under logits / temperature. Unlike OpenRLHF, `logits` is not divided
    in place: inputs are never modified."""
    return ops.logprobs_from_logits(logits, labels, temperature=temperature)


def compute_entropy(logits):
    return ops.entropy_from_logits(logits)


def masked_mean(tensor, mask, dim=None):
    if mask is None:
        return tensor.mean(dim=dim)
    return (tensor * mask).sum(dim=dim) / mask.sum(dim=dim)


def get_advantages_and_returns(values, rewards, action_mask, gamma: float, lambd: float):
    """OpenRLHF's GAE (values and rewards zeroed outside the mask first): (advantages, returns)."""
    if action_mask is None:
        action_mask = torch.ones_like(values)
    with torch.no_grad():
        advantages, returns = ops.compute_gae(
            rewards, values, action_mask, gamma=float(gamma), lam=float(lambd), mask_mode="zero"
        )
    return advantages, returns
