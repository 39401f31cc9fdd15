"""Offline preference losses on per-sequence log-probs: DPO (and its IPO, hinge, robust variants) and
SimPO, with TRL's semantics (DPOTrainer and CPOTrainer of TRL 1.12; see dpo_loss for where they differ).

Pure torch: the work is O(B) elementwise, far below one kernel launch's worth, so there is no fused
backend. fp16/bf16 inputs are computed in fp32 and the results cast back to the inputs' dtype (the
log-ratio differences of summed log-probs lose several bits in half precision); fp32 and fp64 are
computed in their own dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rlp_engine.ops._checks import check_choice, check_same_shape, check_tensor

__all__ = ["DPO_LOSS_TYPES", "dpo_loss", "simpo_loss"]

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
_SMOOTHED = ("sigmoid", "robust")  # the loss types that read label_smoothing


def _check_positive(op: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"{op}: {name} must be a finite number > 0, got {value!r}")


def _check_smoothing(op: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 0.5:
        raise ValueError(f"{op}: label_smoothing must lie in [0, 0.5), got {value!r}")


def _inputs(op: str, **tensors: torch.Tensor) -> tuple[list[torch.Tensor], torch.dtype]:
    """The tensors checked (floating, one shape and device) and cast to the compute dtype, and the
    dtype the outputs take (the inputs' promoted dtype)."""
    names = list(tensors)
    for name in names:
        check_tensor(op, name, tensors[name])
    first = tensors[names[0]]
    check_same_shape(op, names[0], first, **{n: tensors[n] for n in names[1:]})
    out_dtype = first.dtype
    for t in tensors.values():
        out_dtype = torch.promote_types(out_dtype, t.dtype)
    dt = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    return [t.to(dt) for t in tensors.values()], out_dtype


def _smoothed_sigmoid_loss(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    # -log sigmoid(z), with the label flipped with probability label_smoothing (conservative DPO)
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = loss * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing
    return loss


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss and the implicit rewards, as TRL's DPOTrainer computes them.

    Inputs: log-probs of each response summed over its tokens, [B] (any one shape, elementwise), any
    float dtype. With d = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected), z = beta d:
    - "sigmoid" (DPO): -log sigmoid(z); label_smoothing = eps > 0 gives conservative DPO,
      -(1 - eps) log sigmoid(z) - eps log sigmoid(-z). TRL 1.12's DPOTrainer no longer reads
      label_smoothing for "sigmoid" (its CPOTrainer and earlier DPOTrainers do, with this formula).
    - "robust" (rDPO): (-(1 - eps) log sigmoid(z) + eps log sigmoid(-z)) / (1 - 2 eps).
    - "hinge" (SLiC): relu(1 - z).
    - "ipo": (d - 1 / (2 beta))^2. TRL 1.12 divides each response's log-ratio by its completion length
      first: pass log-probs averaged over tokens (policy and reference alike) to get its loss.
    label_smoothing must lie in [0, 0.5) and be 0 for "hinge" and "ipo", which do not use it.

    Returns (losses, chosen_rewards, rejected_rewards), each of the inputs' shape and promoted dtype
    (fp16/bf16 computed in fp32): rewards are beta * (policy - ref), detached. The losses are
    differentiable in all four inputs (the reference log-probs usually carry no gradient).
    """
    op = "dpo_loss"
    (pc, pr, rc, rr), out_dtype = _inputs(
        op,
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    _check_positive(op, "beta", beta)
    check_choice(op, "loss_type", loss_type, DPO_LOSS_TYPES)
    _check_smoothing(op, label_smoothing)
    if label_smoothing and loss_type not in _SMOOTHED:
        raise ValueError(
            f"{op}: label_smoothing must be 0 for loss_type {loss_type!r} (only {_SMOOTHED} use it), "
            f"got {label_smoothing!r}"
        )

    chosen_logratios = pc - rc  # (B,)
    rejected_logratios = pr - rr
    delta = chosen_logratios - rejected_logratios  # TRL's delta_score, same operation order
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid_loss(beta * delta, label_smoothing)
    elif loss_type == "robust":
        z = beta * delta
        clean = -(1 - label_smoothing) * F.logsigmoid(z)
        flipped = -label_smoothing * F.logsigmoid(-z)
        losses = (clean - flipped) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:  # ipo: the squared distance of the margin from its target 1 / (2 beta)
        losses = (delta - 1 / (2 * beta)) ** 2

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses.to(out_dtype), chosen_rewards.to(out_dtype), rejected_rewards.to(out_dtype)


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair SimPO loss (reference-free, with a target margin) and its rewards.

    chosen_logps, rejected_logps: the policy's log-probs averaged over each response's tokens, [B]
    (any one shape), any float dtype. With z = beta * ((chosen - rejected) - gamma_beta_ratio), i.e.
    beta (chosen - rejected) - gamma for the margin gamma = gamma_beta_ratio * beta:
    -(1 - eps) log sigmoid(z) - eps log sigmoid(-z), eps = label_smoothing in [0, 0.5). This is the
    SimPO paper's trainer and TRL's CPOTrainer with loss_type="simpo", simpo_gamma = gamma.

    Returns (losses, chosen_rewards, rejected_rewards), each of the inputs' shape and promoted dtype
    (fp16/bf16 computed in fp32): rewards are beta * logps, detached.
    """
    op = "simpo_loss"
    (c, r), out_dtype = _inputs(op, chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    _check_positive(op, "beta", beta)
    number = isinstance(gamma_beta_ratio, (int, float)) and not isinstance(gamma_beta_ratio, bool)
    if not (number and math.isfinite(gamma_beta_ratio)):
        raise ValueError(f"{op}: gamma_beta_ratio must be a finite number, got {gamma_beta_ratio!r}")
    _check_smoothing(op, label_smoothing)

    losses = _smoothed_sigmoid_loss(beta * ((c - r) - gamma_beta_ratio), label_smoothing)
    chosen_rewards = beta * c.detach()
    rejected_rewards = beta * r.detach()
    return losses.to(out_dtype), chosen_rewards.to(out_dtype), rejected_rewards.to(out_dtype)
