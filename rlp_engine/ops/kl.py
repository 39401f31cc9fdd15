"""Per-token KL estimators between the policy and the reference (DESIGN "KL estimators").

Backends: "torch" (kernels.kl.kl_penalty_ref, autograd composite), "cpp" (rlp::kl_penalty and
rlp::kl_penalty_backward, fused elementwise loops) and "triton" (fused kernels). All compute in fp32
and return fp32 for fp16/bf16/fp32 inputs; fp64 inputs compute and return fp64 on every backend.
"""

from __future__ import annotations

import torch

from rlp_engine.kernels.kl import compute_dtype, kl_penalty_backward, kl_penalty_forward, kl_penalty_ref
from rlp_engine.op_names import KL_KINDS
from rlp_engine.ops._backend import cpp_available, cpp_ops, select
from rlp_engine.ops._checks import check_choice, check_same_shape, check_tensor

__all__ = ["KL_KINDS", "kl_penalty"]


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL estimate of `kind` (one of KL_KINDS) from log-probs of the sampled tokens.

    logprob, ref_logprob: same shape (usually [B, T]), floating. Returns the same shape, fp32 (fp64
    for fp64 inputs). Differentiable in both inputs; the gradient to ref_logprob is minus that to logprob.
    """
    op = "kl_penalty"
    check_tensor(op, "logprob", logprob)
    check_tensor(op, "ref_logprob", ref_logprob)
    check_same_shape(op, "logprob", logprob, ref_logprob=ref_logprob)
    check_choice(op, "kind", kind, KL_KINDS)
    name = select(op, logprob, ref_logprob)
    if name == "torch":
        return kl_penalty_ref(logprob, ref_logprob, kind)
    # The kernels take one input dtype: promote a mixed pair (differentiably) first.
    dt = torch.promote_types(logprob.dtype, ref_logprob.dtype)
    lp, ref = logprob.to(dt).contiguous(), ref_logprob.to(dt).contiguous()
    if name == "cpp":
        return cpp_ops().kl_penalty(lp, ref, kind)
    return _KLTriton.apply(lp, ref, kind)


def _split_grad(ctx, g: torch.Tensor, lp: torch.Tensor, ref: torch.Tensor):
    # g = grad * dvalue/dlogprob; dvalue/dref_logprob = -dvalue/dlogprob for every kind
    glp = g.to(lp.dtype) if ctx.needs_input_grad[0] else None
    gref = (-g).to(ref.dtype) if ctx.needs_input_grad[1] else None
    return glp, gref, None


class _KLTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lp, ref, kind):
        ctx.save_for_backward(lp, ref)
        ctx.kind = kind
        return kl_penalty_forward(lp, ref, kind)

    @staticmethod
    def backward(ctx, grad):
        lp, ref = ctx.saved_tensors
        return _split_grad(ctx, kl_penalty_backward(grad, lp, ref, ctx.kind), lp, ref)


def _cpp_setup(ctx, inputs, output):
    lp, ref, kind = inputs
    ctx.save_for_backward(lp, ref)
    ctx.kind = kind


def _cpp_backward(ctx, grad):
    lp, ref = ctx.saved_tensors
    g = torch.ops.rlp.kl_penalty_backward(grad.contiguous(), lp, ref, ctx.kind)
    return _split_grad(ctx, g, lp, ref)


def _kl_fake(logprob, ref_logprob, kind):
    return logprob.new_empty(logprob.shape, dtype=compute_dtype(logprob))


def _kl_backward_fake(grad, logprob, ref_logprob, kind):
    return grad.new_empty(logprob.shape)


def _register_cpp() -> None:
    """The KL ops' autograd formula and fake (meta) kernels, registered when the extension loads."""
    torch.library.register_fake("rlp::kl_penalty")(_kl_fake)
    torch.library.register_fake("rlp::kl_penalty_backward")(_kl_backward_fake)
    torch.library.register_autograd("rlp::kl_penalty", _cpp_backward, setup_context=_cpp_setup)


if cpp_available():
    _register_cpp()
