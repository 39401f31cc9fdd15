"""Drop-in for OpenRLHF 0.11's `openrlhf.models.utils` helpers (compute_approx_kl,
log_probs_from_logits, compute_entropy, masked_mean) and its GAE (`get_advantages_and_returns`, a
method of its experience maker, here a function without `self`), backed by rlp_engine's fused ops.
Same parameters, results, dtypes and exceptions (tests/test_compat_openrlhf.py compares them with the
installed OpenRLHF). Unlike OpenRLHF, `log_probs_from_logits` does not divide `logits` in place.
"""

from __future__ import annotations

import torch

from rlp_engine import ops
from rlp_engine.compat._common import gather_logprobs, promote

_ESTIMATORS = ("k1", "k2", "k3")
KL_IS_WEIGHT_CLIP = 10.0  # OpenRLHF's bound on the importance weight of the unbiased KL gradient


def compute_approx_kl(
    log_probs,
    log_probs_base,
    log_probs_old=None,
    kl_estimator: str = "k1",
    unbiased_gradient: bool = False,
):
    """OpenRLHF's per-token KL estimate (k1, k2 or k3) in fp32, clamped to [-10, 10]. With
    unbiased_gradient the value is kept and the gradient is that of w * k2, w = exp(log_probs -
    log_probs_old) clamped to KL_IS_WEIGHT_CLIP and detached (1 without log_probs_old)."""
    if kl_estimator not in _ESTIMATORS:
        raise ValueError(f"Unknown kl_estimator: {kl_estimator}")
    lp, base = log_probs.float(), log_probs_base.float()
    if kl_estimator == "k3":
        # OpenRLHF's order, (e^-r - 1) + r with r clamped at -10: the fused k3 (verl's (e^-r + r) - 1)
        # rounds differently near r = 0 by about 1e-7, and OpenRLHF's own tests pin its rounding.
        r = (lp - base).clamp(min=-10)
        value = (-r).exp() - 1 + r
    else:
        value = ops.kl_penalty(lp, base, kind=kl_estimator)
    value = value.clamp(min=-10, max=10)
    if not unbiased_gradient:
        return value
    w = 1.0
    if log_probs_old is not None:
        w = (lp - log_probs_old.float()).exp().clamp(max=KL_IS_WEIGHT_CLIP).detach()
    surrogate = w * ops.kl_penalty(lp, base, kind="k2")
    return value.detach() + surrogate - surrogate.detach()


def log_probs_from_logits(logits, labels, temperature: float = 1.0):
    """Log-probs of labels under logits / temperature, in the logits' dtype (fused kernel, fp32
    inside). Labels outside [0, V) raise RuntimeError on CPU, as torch.gather does in OpenRLHF."""
    return gather_logprobs(logits, labels.unsqueeze(-1), temperature).squeeze(-1).to(logits.dtype)


def compute_entropy(logits):
    """Entropy of softmax(logits) [..., V] -> [...], in the logits' dtype (fused kernel, fp32 inside)."""
    return ops.entropy_from_logits(logits).to(logits.dtype)


def masked_mean(tensor, mask, dim=None):
    if mask is None:
        return tensor.mean(dim=dim)
    return (tensor * mask).sum(dim=dim) / mask.sum(dim=dim)


def get_advantages_and_returns(values, rewards, action_mask, gamma: float, lambd: float):
    """OpenRLHF's GAE (values and rewards zeroed outside the mask first): (advantages, returns) in
    promote(values, rewards, action_mask), no gradient. The fused GAE computes in fp32."""
    dt = promote(values, rewards) if action_mask is None else promote(values, rewards, action_mask)
    if action_mask is None:
        action_mask = torch.ones_like(values)
    with torch.no_grad():
        advantages, returns = ops.compute_gae(
            rewards, values, action_mask, gamma=float(gamma), lam=float(lambd), mask_mode="zero"
        )
    return advantages.to(dt), returns.to(dt)
