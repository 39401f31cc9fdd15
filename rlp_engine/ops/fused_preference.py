"""Fused-linear DPO and SimPO: the preference loss of a batch of (chosen, rejected) pairs straight from
the policy's last hidden states and LM head, never holding the [N, V] logits (4 pairs x 2 x 2048
tokens x 152k vocab in fp32 is 10 GB; Liger-Kernel's chunked losses hold 3-4 logit-sized buffers per
pair plus a second grad_weight).

Layout: hidden_chosen [B, Tc, H] and hidden_rejected [B, Tr, H] are laid side by side per pair
([B, Tc + Tr, H], the rows of pair b contiguous). labels[b, t] is the token predicted from
hidden[b, t], i.e. already shifted, as TRL's DPOTrainer builds them (`labels = input_ids.roll(-1, 1)`
with the last column and the prompt set to ignore_index) and as fused_linear_logprobs and Liger take
them: the op does not shift. A response's log-prob is the sum (DPO) or the mean (SimPO) of its
tokens' log-probs over the labels that are not ignore_index.

Two paths, one result (tests compare both with the float64 reference):
- one pass (training, when one pair's [Tc + Tr, V] fp32 logits fit in PAIR_SCRATCH_BYTES): per chunk
  of whole pairs, logits -> softmax in place -> token log-probs -> the pairs' losses and d loss /
  d logp (tiny autograd on [k] vectors, the exact ops.dpo_loss / simpo_loss) -> dz = g (onehot - p)
  in the same buffer -> grad_hidden rows and grad_weight. 3 GEMMs (2 when the LM head is frozen),
  one [rows, V] buffer; the backward only scales the saved gradients (Liger's trick, without its
  extra buffers). A forward under grad mode pays for the gradients: evaluate under torch.no_grad().
- recompute (no gradient wanted, or a pair too long for the budget): fused_linear_logprobs, whose
  forward and backward walk [R, Vc] tiles within its 32 MiB scratch: 4 GEMMs, the least memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlp_engine.kernels import fused_linear_logprobs as K
from rlp_engine.ops._checks import check_tensor
from rlp_engine.ops.fused_linear import _check_lm_head, fused_linear_logprobs
from rlp_engine.ops.preference import dpo_loss, simpo_loss

__all__ = [
    "fused_linear_dpo_loss",
    "fused_linear_dpo_loss_ref",
    "fused_linear_simpo_loss",
    "fused_linear_simpo_loss_ref",
]

# Most bytes one pair's [Tc + Tr, V] fp32 logits may take for the one-pass path. CPU: 256 MiB is
# 2 x 1024 tokens of a 32k vocab, or 2 x 256 of 128k; Liger holds about 4x that per pair. GPU: 2 GiB.
PAIR_SCRATCH_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30}


def _check_side(op, side, hidden, labels, weight) -> None:
    """hidden_<side> [B, T, H] floating with weight's dtype, labels_<side> [B, T] int64/int32."""
    h_name, y_name = f"hidden_{side}", f"labels_{side}"
    check_tensor(op, h_name, hidden, ndim=3)
    check_tensor(op, "weight", weight, ndim=2)
    if hidden.dtype != weight.dtype or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{op}: {h_name} must be [B, T, H] with weight's dtype {weight.dtype} and H = "
            f"weight.shape[1] = {weight.shape[1]}, got {tuple(hidden.shape)} {hidden.dtype}"
        )
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(f"{op}: {y_name} must be an int64 tensor, got {got}")
    if labels.shape != hidden.shape[:-1] or labels.device != hidden.device:
        raise ValueError(
            f"{op}: {y_name} must have shape {h_name}.shape[:-1] = {tuple(hidden.shape[:-1])} on "
            f"{hidden.device}, got {tuple(labels.shape)} on {labels.device}"
        )


def _check_pairs(op, hc, hr, weight, yc, yr, bias, ignore_index) -> None:
    _check_side(op, "chosen", hc, yc, weight)
    _check_side(op, "rejected", hr, yr, weight)
    if hr.shape[0] != hc.shape[0] or hr.device != hc.device:
        raise ValueError(
            f"{op}: hidden_rejected has {hr.shape[0]} rows on {hr.device} but hidden_chosen has "
            f"{hc.shape[0]} on {hc.device} (one rejected response per chosen one)"
        )
    if hc.shape[0] == 0:
        raise ValueError(f"{op}: hidden_chosen has no pairs (B = 0); the mean loss is undefined")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {ignore_index!r}")
    _check_lm_head(op, hc, weight, yc, bias, 1.0)  # weight and bias
    vocab = weight.shape[0]
    bounds = []  # (min, max) label per side, ignored labels counted as 0
    for y in (yc, yr):
        safe = torch.where(y == ignore_index, 0, y.to(torch.int64)).reshape(-1)
        bounds += [safe.min(), safe.max()] if safe.numel() else [safe.new_zeros(())] * 2
    bounds = torch.stack(bounds).tolist()  # one host sync, before any [N, V] work
    for name, (lo, hi) in (("labels_chosen", bounds[:2]), ("labels_rejected", bounds[2:])):
        if lo < 0 or hi >= vocab:
            raise ValueError(
                f"{op}: {name}: {lo if lo < 0 else hi} is outside [0, {vocab}) and is not "
                f"ignore_index ({ignore_index})"
            )


def _token_weights(op, yc, yr, ignore_index, average, dt):
    """Per-token weights [B, Tc + Tr] of the response log-probs: 1 (sum) or 1 / n_kept (mean) on the
    kept tokens, 0 on ignored ones. The mean of a response with no kept token is undefined: ValueError
    naming the side and the row (one host sync)."""
    keep = torch.cat([yc, yr], dim=1) != ignore_index  # (B, Tc + Tr)
    w = keep.to(dt)
    if average:
        tc = yc.shape[1]
        for name, part in (("labels_chosen", w[:, :tc]), ("labels_rejected", w[:, tc:])):
            n = part.sum(dim=1, keepdim=True)  # (B, 1)
            empty = (n == 0).nonzero()
            if empty.numel():
                raise ValueError(
                    f"{op}: {name} row {empty[0, 0].item()} has no label other than ignore_index "
                    f"({ignore_index}): its mean log-prob (SimPO) is undefined"
                )
            part.div_(n)
    return w


def _pair_logps(lp, w, tc):
    """Response log-probs from token log-probs lp [k, Tc + Tr]: (chosen [k], rejected [k])."""
    wl = lp * w
    return wl[:, :tc].sum(dim=1), wl[:, tc:].sum(dim=1)


def _pair_loss_grads(loss_fn, pc, pr, sl, n_pairs):
    """The pairs' losses, rewards and d (sum of losses / n_pairs) / d (pc, pr): autograd on [k]."""
    pc, pr = pc.detach().requires_grad_(), pr.detach().requires_grad_()
    with torch.enable_grad():
        losses, cr, rr = loss_fn(pc, pr, sl)
        gc, gr = torch.autograd.grad(losses.sum() / n_pairs, (pc, pr), allow_unused=True)
    zero = torch.zeros_like(pc)  # a loss that ignores one side (none today) gives None
    return losses.detach(), cr, rr, zero if gc is None else gc, zero if gr is None else gr


def _exp_logprobs_(z, safe, keep):
    """z [C, V] logits -> exp(z - rowmax) in place (softmax = z / total, left to the caller's one
    scaling pass); returns the label log-probs [C] (0 where not kept) and total [C, 1]."""
    zy = z.gather(1, safe.unsqueeze(1)).squeeze(1)
    m, total = K._shifted_exp(z, z)  # z - max, exponentiated in place
    lp = zy - m.squeeze(1) - total.log().squeeze(1)
    return torch.where(keep, lp, torch.zeros_like(lp)), total


def _new_grads(h2, weight, bias, need, dt):
    """fp32 (fp64) accumulators of the gradients asked for (need: hidden, weight, bias), else None."""
    gh = torch.empty_like(h2) if need[0] else None
    gw = torch.zeros(weight.shape, dtype=dt, device=weight.device) if need[1] else None
    gb = (
        torch.zeros(weight.shape[0], dtype=dt, device=weight.device) if bias is not None and need[2] else None
    )
    return gh, gw, gb


def _add_grads(grads, s, e, h, weight, dz):
    """grad_hidden[s:e] = dz W; grad_weight += dz^T h; grad_bias += column sums of dz."""
    gh, gw, gb = grads
    if gh is not None:  # a frozen trunk skips this GEMM
        torch.mm(dz.to(weight.dtype) if weight.dtype != dz.dtype else dz, weight, out=gh[s:e])
    if gw is not None:  # and a frozen LM head (LoRA) this one: 2 GEMMs instead of 3
        gw.addmm_(dz.t(), h.to(dz.dtype))
    if gb is not None:
        gb.add_(dz.sum(dim=0))


def _one_pass(h2, weight, bias, y, w, tc, loss_fn, need):
    """Forward and gradients in one walk over chunks of whole pairs (see the module docstring).
    h2 [B L, H], y [B L] int64, w [B, L] token weights, need (hidden, weight, bias) flags -> (mean
    loss, chosen and rejected rewards [B], (grad_hidden, grad_weight, grad_bias), None where not
    needed, of the mean loss)."""
    n_pairs, length = w.shape
    vocab, dt = weight.shape[0], K._compute_dtype(h2.dtype)
    rows = K.rows_per_chunk(h2.shape[0], vocab, torch.finfo(dt).bits // 8, h2.device)
    k = min(n_pairs, max(1, rows // length))  # whole pairs per chunk: their losses close in it
    buf = torch.empty(k * length * vocab, dtype=dt, device=h2.device)  # reused by every chunk
    grads = _new_grads(h2, weight, bias, need, dt)
    losses, cr, rr = [], [], []
    for p0 in range(0, n_pairs, k):
        p1 = min(n_pairs, p0 + k)
        s, e, wk = p0 * length, p1 * length, w[p0:p1]  # wk (k, L)
        keep = wk.reshape(-1) != 0
        safe = torch.where(keep, y[s:e], 0)
        z = K._chunk_logits(h2[s:e], weight, bias, 1.0, K._tile(buf, e - s, vocab))  # (k L, V)
        lp, total = _exp_logprobs_(z, safe, keep)  # z now holds exp(z - max) = p total
        lp = lp.view(p1 - p0, length)
        pc, pr = _pair_logps(lp, wk, tc)
        loss_k, cr_k, rr_k, gc, gr = _pair_loss_grads(loss_fn, pc, pr, slice(p0, p1), n_pairs)
        g = torch.cat([gc.unsqueeze(1) * wk[:, :tc], gr.unsqueeze(1) * wk[:, tc:]], 1).reshape(-1, 1)
        dz = z.mul_(-g / total).scatter_add_(1, safe.unsqueeze(1), g)  # d loss / d z = g (onehot - p)
        _add_grads(grads, s, e, h2[s:e], weight, dz)
        losses.append(loss_k)
        cr.append(cr_k)
        rr.append(rr_k)
    loss = torch.cat(losses).sum() / n_pairs
    gh, gw, gb = grads
    gw = None if gw is None else gw.to(weight.dtype)
    return loss, torch.cat(cr), torch.cat(rr), (gh, gw, None if gb is None else gb.to(bias.dtype))


class _OnePassFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h2, weight, bias, y, w, tc, loss_fn):
        need = ctx.needs_input_grad[:3]
        loss, cr, rr, (gh, gw, gb) = _one_pass(h2, weight, bias, y, w, tc, loss_fn, need)
        ctx.save_for_backward(gh, gw, gb)
        ctx.mark_non_differentiable(cr, rr)
        return loss, cr, rr

    @staticmethod
    def backward(ctx, g_loss, _g_cr, _g_rr):
        grads = [None if t is None else t * g_loss for t in ctx.saved_tensors]
        return *grads, None, None, None, None


def _recompute(h2, weight, bias, y, w, tc, loss_fn, ignore_index):
    """fused_linear_logprobs (autograd; its backward recomputes the logit tiles), then the loss."""
    lp = fused_linear_logprobs(h2, weight, y, bias=bias, ignore_index=ignore_index).view(w.shape)
    pc, pr = _pair_logps(lp, w, tc)
    losses, cr, rr = loss_fn(pc, pr, slice(None))
    return losses.mean(), cr, rr


def _run(op, hc, hr, weight, yc, yr, bias, ignore_index, average, loss_fn):
    """Shared driver: token weights, the pair layout, and the path (module docstring)."""
    dt = K._compute_dtype(hc.dtype)
    w = _token_weights(op, yc, yr, ignore_index, average, dt)  # (B, Tc + Tr)
    n_pairs, length = w.shape
    h2 = torch.cat([hc, hr], dim=1).reshape(n_pairs * length, hc.shape[-1])  # pair b: rows b L ...
    y = torch.cat([yc, yr], dim=1).reshape(-1).to(torch.int64)
    tc = yc.shape[1]
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hc, hr, weight, bias)
    )
    pair_bytes = length * weight.shape[0] * (torch.finfo(dt).bits // 8)
    limit = PAIR_SCRATCH_BYTES.get(hc.device.type, PAIR_SCRATCH_BYTES["cpu"])
    if need_grad and 0 < pair_bytes <= limit:
        return _OnePassFn.apply(h2, weight, bias, y, w.detach(), tc, loss_fn)
    return _recompute(h2, weight, bias, y, w, tc, loss_fn, ignore_index)


def _settings(op, loss, *args, **kwargs) -> None:
    """Validate the loss settings once, before the [N, V] work, by a call on tiny inputs; the
    error keeps the loss op's text (it names the argument) under this op's name."""
    try:
        loss(*args, **kwargs)
    except ValueError as err:
        raise ValueError(f"{op}: {str(err).split(': ', 1)[-1]}") from None


def _refs(op, hc, ref_chosen_logps, ref_rejected_logps):
    dt = K._compute_dtype(hc.dtype)
    out = []
    for name, ref in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        check_tensor(op, name, ref)
        if ref.shape != hc.shape[:1] or ref.device != hc.device:
            raise ValueError(
                f"{op}: {name} must be [B] = [{hc.shape[0]}] on {hc.device}, "
                f"got {tuple(ref.shape)} on {ref.device}"
            )
        out.append(ref.detach().to(dt))  # the reference model's log-probs: constants
    return out


def fused_linear_dpo_loss(
    hidden_chosen,
    hidden_rejected,
    weight,
    labels_chosen,
    labels_rejected,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta=0.1,
    loss_type="sigmoid",
    label_smoothing=0.0,
    ignore_index=-100,
    bias=None,
):
    """Mean DPO loss over B pairs from the LM head: ops.dpo_loss on the policy's summed response
    log-probs, which are formed tile by tile from z = hidden weight^T + bias.

    hidden_chosen [B, Tc, H], hidden_rejected [B, Tr, H], weight [V, H] (fp32, bf16, fp16, fp64; one
    dtype), bias [V] | None; labels_* [B, T*] int64, already shifted (labels[b, t] is predicted from
    hidden[b, t]; module docstring), ignore_index marks prompt and padding; ref_*_logps [B] (treated
    as constants). A response whose labels are all ignore_index has log-prob 0 (the empty sum).
    beta, loss_type ("sigmoid", "ipo", "hinge", "robust"), label_smoothing as ops.dpo_loss.

    Returns (loss 0-dim, chosen_rewards [B], rejected_rewards [B]) in fp32 (fp64 for fp64 inputs);
    rewards = beta (policy - ref), detached. The loss is differentiable in the hidden states, weight
    and bias. Labels outside [0, V) other than ignore_index raise ValueError (checked with one host
    sync before any work).
    """
    op = "fused_linear_dpo_loss"
    _check_pairs(
        op, hidden_chosen, hidden_rejected, weight, labels_chosen, labels_rejected, bias, ignore_index
    )
    rc, rr = _refs(op, hidden_chosen, ref_chosen_logps, ref_rejected_logps)
    kw = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    _settings(op, dpo_loss, rc[:1], rr[:1], rc[:1], rr[:1], **kw)

    def loss_fn(pc, pr, sl):
        return dpo_loss(pc, pr, rc[sl], rr[sl], **kw)

    return _run(
        op,
        hidden_chosen,
        hidden_rejected,
        weight,
        labels_chosen,
        labels_rejected,
        bias,
        ignore_index,
        False,
        loss_fn,
    )


def fused_linear_simpo_loss(
    hidden_chosen,
    hidden_rejected,
    weight,
    labels_chosen,
    labels_rejected,
    *,
    beta=2.0,
    gamma_beta_ratio=0.5,
    label_smoothing=0.0,
    ignore_index=-100,
    bias=None,
):
    """Mean SimPO loss over B pairs from the LM head: ops.simpo_loss on the policy's response
    log-probs averaged over each response's kept tokens (length-normalised), formed tile by tile.

    Shapes, dtypes and labels as fused_linear_dpo_loss; no reference model. A response whose labels
    are all ignore_index has no mean log-prob: ValueError naming labels_chosen / labels_rejected and
    the row (TRL and Liger return NaN there; checked with a second host sync). beta,
    gamma_beta_ratio, label_smoothing as ops.simpo_loss (Liger's gamma = gamma_beta_ratio * beta).

    Returns (loss 0-dim, chosen_rewards [B], rejected_rewards [B]) in fp32 (fp64 for fp64 inputs);
    rewards = beta * mean log-prob, detached.
    """
    op = "fused_linear_simpo_loss"
    _check_pairs(
        op, hidden_chosen, hidden_rejected, weight, labels_chosen, labels_rejected, bias, ignore_index
    )
    kw = dict(beta=beta, gamma_beta_ratio=gamma_beta_ratio, label_smoothing=label_smoothing)
    probe = torch.zeros(1, dtype=K._compute_dtype(hidden_chosen.dtype), device=hidden_chosen.device)
    _settings(op, simpo_loss, probe, probe, **kw)

    def loss_fn(pc, pr, sl):
        return simpo_loss(pc, pr, **kw)

    return _run(
        op,
        hidden_chosen,
        hidden_rejected,
        weight,
        labels_chosen,
        labels_rejected,
        bias,
        ignore_index,
        True,
        loss_fn,
    )


# ----------------------------------------------------------------------------------------------
# Materialising references (tests and the bench's baseline): the [B, T, V] logits, log_softmax,
# masked sums / means, ops.dpo_loss / simpo_loss, the mean over pairs. fp64-capable.
# ----------------------------------------------------------------------------------------------


def _ref_logps(hidden, weight, labels, bias, ignore_index, average):
    dt = K._compute_dtype(hidden.dtype)
    b = None if bias is None else bias.to(dt)
    logp = F.linear(hidden.to(dt), weight.to(dt), b).log_softmax(-1)  # (B, T, V)
    keep = labels != ignore_index
    tok = logp.gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1) * keep  # (B, T)
    return tok.sum(-1) / keep.sum(-1) if average else tok.sum(-1)  # mean: NaN with no kept token


def fused_linear_dpo_loss_ref(
    hidden_chosen,
    hidden_rejected,
    weight,
    labels_chosen,
    labels_rejected,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta=0.1,
    loss_type="sigmoid",
    label_smoothing=0.0,
    ignore_index=-100,
    bias=None,
):
    pc = _ref_logps(hidden_chosen, weight, labels_chosen, bias, ignore_index, False)
    pr = _ref_logps(hidden_rejected, weight, labels_rejected, bias, ignore_index, False)
    rc, rr = (r.detach().to(pc.dtype) for r in (ref_chosen_logps, ref_rejected_logps))
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    return losses.mean(), cr, rj


def fused_linear_simpo_loss_ref(
    hidden_chosen,
    hidden_rejected,
    weight,
    labels_chosen,
    labels_rejected,
    *,
    beta=2.0,
    gamma_beta_ratio=0.5,
    label_smoothing=0.0,
    ignore_index=-100,
    bias=None,
):
    pc = _ref_logps(hidden_chosen, weight, labels_chosen, bias, ignore_index, True)
    pr = _ref_logps(hidden_rejected, weight, labels_rejected, bias, ignore_index, True)
    losses, cr, rj = simpo_loss(
        pc, pr, beta=beta, gamma_beta_ratio=gamma_beta_ratio, label_smoothing=label_smoothing
    )
    return losses.mean(), cr, rj
