"""Fused LM-head ops: per-token log-probs / entropy and the PPO actor loss computed from the last
hidden states and the LM-head weight, never holding the [N, V] logits (16k tokens x 152k vocab in
fp32 is 10 GB, twice with its gradient).

Backends: "triton" (CUDA; CPU under TRITON_INTERPRET=1) and "torch" = "cpp" (chunked: only an
[R, Vc] block of logits alive; GEMMs in oneDNN/MKL or cuBLAS: the fastest CPU path, also on GPU). The
materialising `fused_linear_logprobs_ref` in rlp_engine.kernels.fused_linear_logprobs is the test
reference. Semantics: DESIGN "Op semantics", Log-probs, KL estimators, PPO policy loss.
"""

from __future__ import annotations

import dataclasses
import numbers

import torch

from rlp_engine.kernels import fused_linear_logprobs as K
from rlp_engine.kernels.kl import kl_value_grad
from rlp_engine.kernels.ppo_loss import clipped_surrogate
from rlp_engine.op_names import AGG_MODES, KL_KINDS
from rlp_engine.ops._backend import backend, select
from rlp_engine.ops._checks import check_choice, check_mask, check_same_shape, check_tensor
from rlp_engine.ops.kl import kl_penalty
from rlp_engine.ops.logprobs import check_label_range
from rlp_engine.ops.ppo import ppo_policy_loss
from rlp_engine.ops.reduce import masked_mean, row_scale

SUPPORTED = ("torch", "cpp", "triton")
_CHUNKED = (K.chunked_forward, K.chunked_backward, K.chunked_fused_pass)
# "cpp" runs the chunked path too: its work is the GEMMs, which are already oneDNN/MKL C++, and the
# softmax passes are vectorised torch kernels; a backend("cpp") block therefore works here as well.
_IMPLS = {
    "torch": _CHUNKED,
    "cpp": _CHUNKED,
    "triton": (K.triton_forward, K.triton_backward, K.triton_fused_pass),
}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_lm_head(op, hidden, weight, labels, bias, temperature) -> None:
    check_tensor(op, "hidden", hidden)
    check_tensor(op, "weight", weight, ndim=2)
    if hidden.dim() < 2:
        raise ValueError(
            f"{op}: hidden must be [..., H] with at least 2 dims, got shape {tuple(hidden.shape)}"
        )
    if hidden.dtype not in _DTYPES:
        raise TypeError(f"{op}: hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{op}: weight has dtype {weight.dtype} but hidden has dtype {hidden.dtype}")
    if weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(
            f"{op}: weight must be [V, H] with V >= 1 and H = hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.device != hidden.device:
        raise ValueError(f"{op}: weight is on {weight.device} but hidden is on {hidden.device}")
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(f"{op}: labels must be an int64 tensor, got {got}")
    if labels.shape != hidden.shape[:-1] or labels.device != hidden.device:
        raise ValueError(
            f"{op}: labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])} on "
            f"{hidden.device}, got {tuple(labels.shape)} on {labels.device}"
        )
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0] or bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(
                f"{op}: bias must be [V] = [{weight.shape[0]}] with weight's dtype and device, "
                f"got {tuple(bias.shape)} {bias.dtype} on {bias.device}"
            )
    if not isinstance(temperature, numbers.Real) or not temperature > 0:
        raise ValueError(f"{op}: temperature must be a positive number, got {temperature!r}")


def _prepare(op, hidden, weight, labels, bias):
    """Backend choice and the 2-D contiguous views the kernels take."""
    name = select(op, hidden, supported=SUPPORTED)
    if name == "triton" and hidden.dtype == torch.float64:
        raise TypeError(f"{op}: backend 'triton' takes float32/bfloat16/float16 hidden, got float64")
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    if h2.shape[0] == 0:
        name = "torch"  # nothing to launch
    y = labels.reshape(-1).to(torch.int64).contiguous()
    return name, h2, weight.contiguous(), None if bias is None else bias.contiguous(), y


class _LogprobsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, inv_t, ignore_index, need_entropy, impl):
        lp, ent, lse = _IMPLS[impl][0](hidden, weight, bias, labels, inv_t, ignore_index, need_entropy)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, ent)
        ctx.inv_t, ctx.ignore_index, ctx.impl = inv_t, ignore_index, impl
        ctx.set_materialize_grads(False)
        if ent is None:
            ent = lp.new_empty(0)
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
        keep = labels != ctx.ignore_index
        zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
        # where, not multiply: an upstream NaN on an ignored row must not leak.
        g_lp = zero.expand_as(lse) if g_lp is None else torch.where(keep, g_lp.to(lse.dtype), zero)
        if g_ent is not None and ent is not None:
            g_ent = torch.where(keep, g_ent.to(lse.dtype), zero)
        else:
            g_ent = None
        backward = _IMPLS[ctx.impl][1]
        gh, gw, gb = backward(
            hidden, weight, bias, labels, lse, ent, g_lp, g_ent, ctx.inv_t, ctx.ignore_index
        )
        return gh, gw, gb, None, None, None, None, None


def fused_linear_logprobs(
    hidden, weight, labels, temperature=1.0, bias=None, return_entropy=False, ignore_index=-100
):
    """Per-token log-probs (and entropy) of z = (hidden weight^T + bias) / temperature, tile by tile.

    hidden [..., H] and weight [V, H] (fp32, bf16, fp16; fp64 on the torch backend; same dtype),
    bias [V] or None, labels [...] int64. Returns logprob [...] fp32 (fp64 for fp64 inputs), and
    entropy [...] when `return_entropy`. Rows whose label is `ignore_index` give 0 and no gradient;
    any other label outside [0, V) raises ValueError (one host sync per call, before any work).
    Differentiable in hidden, weight and bias; the backward recomputes the logits per tile.
    """
    op = "fused_linear_logprobs"
    _check_lm_head(op, hidden, weight, labels, bias, temperature)
    check_label_range(op, labels, weight.shape[0], ignore_index)
    impl, h2, w, b, y = _prepare(op, hidden, weight, labels, bias)
    lp, ent = _LogprobsFn.apply(
        h2, w, b, y, 1.0 / float(temperature), int(ignore_index), return_entropy, impl
    )
    lead = hidden.shape[:-1]
    return (lp.view(lead), ent.view(lead)) if return_entropy else lp.view(lead)


# ----------------------------------------------------------------------------------------------
# Fused-linear PPO actor loss
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _PPO:
    """Per-token inputs (flat [N], detached) and the loss settings."""

    old: torch.Tensor
    adv: torch.Tensor
    ref: torch.Tensor | None
    w: torch.Tensor  # agg weights, 0 off the mask
    valid: torch.Tensor  # bool mask
    clip_low: float
    clip_high: float
    dual_clip: float | None
    kl_kind: str
    kl_coef: float
    entropy_coef: float


def _max_grad(a, b, da, db):
    """d max(a, b) as torch.maximum's backward: the gradient is shared equally on ties."""
    return torch.where(a > b, da, torch.where(a < b, db, 0.5 * (da + db)))


def _ppo_terms(lp, ent, t: _PPO, sl: slice):
    """Weighted per-token loss [n] and its derivatives in lp and in entropy (None without bonus).
    The values are the unfused ops' own torch expressions (kernels' clipped_surrogate and kl_value);
    the derivatives are written out here, with torch autograd's conventions, to form the gradients
    while the logits are in hand."""
    valid, w = t.valid[sl], t.w[sl].to(lp.dtype)
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    old = torch.where(valid, t.old[sl].to(lp.dtype), lp)  # off the mask: finite, ratio 1
    adv = torch.where(valid, t.adv[sl].to(lp.dtype), zero)
    s = clipped_surrogate(lp, old, adv, t.clip_low, t.clip_high, t.dual_clip)
    drho = s.ratio * ((lp - old).abs() <= 20.0)  # exp's derivative inside the +-20 clamp, else 0
    inside = (s.ratio >= 1.0 - t.clip_low) & (s.ratio <= 1.0 + t.clip_high)
    dc = _max_grad(s.pg1, s.pg2, -adv * drho, -adv * drho * inside)
    if t.dual_clip is not None:
        pg3 = -adv * t.dual_clip
        dc2 = _max_grad(-s.c1, -pg3, dc, torch.zeros_like(dc))  # min(pg3, c1) = -max(-c1, -pg3)
        dc = torch.where(adv < 0, dc2, dc)
    loss = s.loss
    if t.ref is not None and t.kl_coef != 0.0:
        ref = torch.where(valid, t.ref[sl].to(lp.dtype), lp)
        kl, dkl = kl_value_grad(lp - ref, t.kl_kind)
        loss = loss + t.kl_coef * kl
        dc = dc + t.kl_coef * dkl
    g_ent = None
    if t.entropy_coef != 0.0:
        loss = loss - t.entropy_coef * ent
        g_ent = -t.entropy_coef * w
    return torch.where(valid, loss * w, zero), dc * w, g_ent


class _PPOFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, inv_t, impl, tokens, need_grad):
        n = hidden.shape[0]
        loss_tok = torch.zeros(n, dtype=K._compute_dtype(hidden.dtype), device=hidden.device)

        def row_grads(s, e, lp, ent):
            loss, g_lp, g_ent = _ppo_terms(lp, ent, tokens, slice(s, e))
            loss_tok[s:e] = loss
            return g_lp, g_ent

        if need_grad:  # gradients now, from the logits already in hand (Liger's trick)
            lp, ent, gh, gw, gb = _IMPLS[impl][2](hidden, weight, bias, labels, inv_t, -100, row_grads)
            ctx.save_for_backward(gh, gw, gb)
        else:
            lp, ent, _ = _IMPLS[impl][0](hidden, weight, bias, labels, inv_t, -100, True)
            row_grads(0, n, lp, ent)
        ctx.mark_non_differentiable(lp, ent)
        return loss_tok.sum(), lp, ent

    @staticmethod
    def backward(ctx, g_loss, _g_lp, _g_ent):
        gh, gw, gb = ctx.saved_tensors
        g = g_loss.to(torch.float32)
        return gh * g, gw * g, None if gb is None else gb * g, None, None, None, None, None


def _ppo_metrics(lp, ent, t: _PPO, mask) -> dict[str, torch.Tensor]:
    """verl's policy-loss metrics plus mean KL and entropy over the response tokens, computed by the
    unfused ops on the log-probs of this pass (0-dim fp32 tensors, no host sync). Their torch
    backend: a cheap elementwise pass that runs on every device (rlp's C++ has no CUDA kernels for
    these, and "cpp" here may be on GPU). mask: bool [B, T]."""
    lp, ent = lp.view(mask.shape), ent.view(mask.shape)
    old, adv = (x.to(lp.dtype).view(mask.shape) for x in (t.old, t.adv))
    with backend("torch"):
        _, metrics = ppo_policy_loss(lp, old, adv, mask, t.clip_low, t.clip_high, t.dual_clip)
        kl = torch.zeros_like(lp)
        if t.ref is not None:
            ref = torch.where(t.valid.view(mask.shape), t.ref.to(lp.dtype).view(mask.shape), lp)
            kl = kl_penalty(lp, ref, t.kl_kind)
    metrics.update(kl=masked_mean(kl, mask).float(), entropy=masked_mean(ent, mask).float())
    return metrics


def _check_ppo(op, hidden, labels, old_logprob, advantages, mask, ref_logprob, kw) -> None:
    if hidden.dim() not in (2, 3):
        raise ValueError(f"{op}: hidden must be [B, T, H] or [N, H], got shape {tuple(hidden.shape)}")
    check_tensor(op, "old_logprob", old_logprob)
    check_tensor(op, "advantages", advantages)
    others = {"old_logprob": old_logprob, "advantages": advantages}
    if ref_logprob is not None:
        check_tensor(op, "ref_logprob", ref_logprob)
        others["ref_logprob"] = ref_logprob
    check_same_shape(op, "labels", labels, **others)
    check_mask(op, mask, labels, "labels")
    check_choice(op, "kl_kind", kw["kl_kind"], KL_KINDS)
    check_choice(op, "agg", kw["agg"], AGG_MODES)
    if kw["kl_coef"] != 0.0 and ref_logprob is None:
        raise ValueError(f"{op}: ref_logprob is required when kl_coef != 0 (got kl_coef={kw['kl_coef']})")
    if not (kw["clip_low"] >= 0 and kw["clip_high"] >= 0):
        raise ValueError(
            f"{op}: clip_low and clip_high must be >= 0, got {kw['clip_low']}, {kw['clip_high']}"
        )
    if kw["dual_clip"] is not None and not kw["dual_clip"] > 1.0:
        raise ValueError(f"{op}: dual_clip must be None or > 1.0, got {kw['dual_clip']}")


def fused_linear_ppo_loss(
    hidden,
    weight,
    labels,
    old_logprob,
    advantages,
    mask,
    *,
    ref_logprob=None,
    kl_coef=0.0,
    kl_kind="k3",
    clip_low=0.2,
    clip_high=0.2,
    dual_clip=None,
    entropy_coef=0.0,
    temperature=1.0,
    agg="token-mean",
    bias=None,
):
    """PPO actor loss straight from the LM head: agg(ppo per-token loss) + kl_coef *
    agg(kl_penalty(lp, ref, kl_kind)) - entropy_coef * agg(entropy), in one chunked pass that also
    forms the gradients of hidden, weight and bias (backward only scales them).

    hidden [B, T, H] (or [N, H], one sequence), weight [V, H], bias [V] | None; labels, old_logprob,
    advantages, mask (and ref_logprob) [B, T] (or [N]). old_logprob, advantages and ref_logprob are
    treated as constants. Returns (loss 0-dim fp32, metrics: clipfrac, approx_kl, clipfrac_lower, kl,
    entropy as 0-dim tensors). Matches fused_linear_logprobs composed with ppo_policy_loss and
    kl_penalty, in value and gradients. Labels must lie in [0, V) or be -100, also off the mask
    (ValueError otherwise: one host sync per call).
    """
    op = "fused_linear_ppo_loss"
    _check_lm_head(op, hidden, weight, labels, bias, temperature)
    kw = dict(
        kl_kind=kl_kind, agg=agg, kl_coef=kl_coef, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip
    )
    _check_ppo(op, hidden, labels, old_logprob, advantages, mask, ref_logprob, kw)
    check_label_range(op, labels, weight.shape[0], -100)
    impl, h2, w, b, y = _prepare(op, hidden, weight, labels, bias)
    valid = (mask.reshape(1, -1) if hidden.dim() == 2 else mask).bool()  # [B, T]
    # the agg weights w = valid * s[b] of ppo_policy_loss, in the compute dtype (fp64 for fp64)
    scale, _ = row_scale(valid, agg, K._compute_dtype(hidden.dtype))
    tokens = _PPO(
        old=old_logprob.detach().reshape(-1),
        adv=advantages.detach().reshape(-1),
        ref=None if ref_logprob is None else ref_logprob.detach().reshape(-1),
        w=(valid * scale[:, None]).reshape(-1),
        valid=valid.reshape(-1),
        clip_low=float(clip_low),
        clip_high=float(clip_high),
        dual_clip=None if dual_clip is None else float(dual_clip),
        kl_kind=kl_kind,
        kl_coef=float(kl_coef),
        entropy_coef=float(entropy_coef),
    )
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    loss, lp, ent = _PPOFn.apply(h2, w, b, y, 1.0 / float(temperature), impl, tokens, need_grad)
    with torch.no_grad():
        metrics = _ppo_metrics(lp, ent, tokens, valid)
    return loss, metrics
